//! Helpers shared by the tests that read the timm fixtures.

use std::path::{Path, PathBuf};

use effnet_model::family::{ArchConfig, Preprocess, StageSpec};
use effnet_model::io::{RawTensor, TensorData};
use effnet_model::{arch, Act};

/// A folder under `tests/fixtures`.
#[allow(dead_code)] // not every test file uses every helper
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[allow(dead_code)]
pub fn floats(t: &RawTensor) -> &[f32] {
    match &t.data {
        TensorData::F32(v) => v,
        TensorData::I64(_) => panic!("{} holds integers", t.name),
    }
}

/// The network a fixture folder's `config.json` describes: a named timm model, or a custom block
/// table (`arch_def`) built the way timm builds its `tf_` models.
#[allow(dead_code)]
pub fn config_from(dir: &Path) -> (ArchConfig, serde_json::Value) {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    let num = |k: &str| {
        cfg[k]
            .as_f64()
            .unwrap_or_else(|| panic!("config.json lacks {k}"))
    };
    let img = num("img_size") as usize;
    let config = if let Some(name) = cfg["timm_name"].as_str() {
        let mut c = arch(name).unwrap();
        c.num_classes = num("num_classes") as usize;
        c
    } else {
        let stages = cfg["arch_def"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|stage| {
                stage
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| StageSpec::parse(s.as_str().unwrap()).unwrap())
            })
            .collect();
        ArchConfig {
            name: "parity".into(),
            stages,
            stem_size: num("stem_size") as usize,
            num_features: num("num_features") as usize,
            width: num("channel_multiplier"),
            depth: num("depth_multiplier"),
            round_limit: 0.9,
            fix_stem_head: cfg["fix_stem_head"].as_bool().unwrap(),
            act: match cfg["act"].as_str().unwrap() {
                "silu" => Act::Silu,
                "relu6" => Act::Relu6,
                other => panic!("act {other}"),
            },
            num_classes: num("num_classes") as usize,
            dropout: 0.0,
            drop_path: 0.0,
            bn_eps: num("bn_eps") as f32,
            eval_size: img,
            preprocess: Preprocess::default(),
        }
    };
    (config, cfg)
}
