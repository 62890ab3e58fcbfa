//! Parity with timm: a small network that uses every block kind, with weights, input, logits,
//! loss, every gradient and the BN running statistics after one step computed by timm in float64
//! (fixtures written by `tools/make_parity_fixtures.py`).
//!
//! `EFFNET_FULL_FIXTURES=DIR cargo test --release -p effnet-model --test parity -- --ignored`
//! runs the same comparison on full-size fixtures written by the script's `--arch` mode.

use std::collections::HashMap;
use std::path::Path;

use effnet_engine::loss;
use effnet_engine::rng::Rng;
use effnet_model::io::{read_safetensors, RawTensor, TensorData};

mod common;
use common::{config_from, floats};
use effnet_model::{weights, Mode, Network};

/// max |a − b| over max |b|.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1e-30f64, |m, v| m.max(v.abs() as f64));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

/// ‖a − b‖₂ / ‖b‖₂.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn check_parity(dir: &Path) {
    let (config, cfg) = config_from(dir);
    let net = Network::new(config);
    let (tensors, _) = read_safetensors(&dir.join("weights.safetensors")).unwrap();
    let mut w = weights::from_tensors(&net, tensors).unwrap();
    let (io, _) = read_safetensors(&dir.join("io.safetensors")).unwrap();
    let io: HashMap<String, RawTensor> = io.into_iter().map(|t| (t.name.clone(), t)).collect();

    // NCHW (PyTorch) → NHWC.
    let input = &io["input"];
    let (n, c, h, wd) = (
        input.shape[0],
        input.shape[1],
        input.shape[2],
        input.shape[3],
    );
    let src = floats(input);
    let mut x = vec![0f32; src.len()];
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h * wd {
                x[(b * h * wd + i) * c + ch] = src[(b * c + ch) * h * wd + i];
            }
        }
    }
    let mut ws = net.workspace(n, h, wd);
    let mut rng = Rng::new(0);

    let logits = net
        .forward(&mut w, &mut ws, &x, Mode::Eval, &mut rng)
        .to_vec();
    let err = max_rel(&logits, floats(&io["logits_eval"]));
    eprintln!("eval logits: max error {err:.2e} of the largest magnitude");
    assert!(
        err < 1e-4,
        "eval logits: max error {err:.2e} of the largest magnitude"
    );

    let momentum = cfg["bn_momentum"].as_f64().unwrap() as f32;
    let mode = Mode::Train {
        bn_momentum: momentum,
        stochastic: false,
    };
    let logits = net.forward(&mut w, &mut ws, &x, mode, &mut rng).to_vec();
    let err = max_rel(&logits, floats(&io["logits_train"]));
    eprintln!("train logits: max error {err:.2e}");
    assert!(err < 1e-4, "train logits: max error {err:.2e}");

    let labels: Vec<usize> = match &io["labels"].data {
        TensorData::I64(v) => v.iter().map(|&l| l as usize).collect(),
        TensorData::F32(_) => panic!("labels are integers"),
    };
    let classes = net.classes;
    let mut targets = vec![0f32; n * classes];
    loss::smoothed_targets(
        &labels,
        classes,
        cfg["label_smoothing"].as_f64().unwrap() as f32,
        &mut targets,
    );
    let mut dlogits = vec![0f32; n * classes];
    let value = loss::softmax_cross_entropy(&logits, classes, &targets, &mut dlogits);
    let expected = floats(&io["loss"])[0];
    assert!(
        ((value - expected) / expected).abs() < 1e-5,
        "loss {value} vs timm {expected}"
    );

    let mut grads = vec![0f32; w.params.len()];
    net.backward(&w, &mut ws, &dlogits, &mut grads);
    // Some gradients are zero in exact arithmetic (a BN bias whose constant the next train-mode
    // BN removes); timm's float64 leaves ~1e-17 there. Those are held to an absolute bound
    // against the typical gradient instead of a relative one.
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let typical = net
        .layout
        .params
        .iter()
        .map(|e| norm(floats(&io[&format!("grad.{}", e.name)])))
        .fold(0.0, f64::max);
    let mut worst = (0.0, "");
    for e in &net.layout.params {
        let reference = floats(&io[&format!("grad.{}", e.name)]);
        let ours = &grads[e.range.clone()];
        if norm(reference) < 1e-9 * typical {
            assert!(
                norm(ours) < 1e-6 * typical,
                "gradient of {} should vanish: norm {:.2e}",
                e.name,
                norm(ours)
            );
            continue;
        }
        let err = rel_l2(ours, reference);
        assert!(
            err < 1e-4,
            "gradient of {}: relative L2 error {err:.2e}",
            e.name
        );
        if err > worst.0 {
            worst = (err, &e.name);
        }
    }
    eprintln!(
        "worst gradient: {} with relative L2 error {:.2e}",
        worst.1, worst.0
    );
    for e in &net.layout.buffers {
        let reference = floats(&io[&format!("after.{}", e.name)]);
        let err = max_rel(&w.buffers[e.range.clone()], reference);
        assert!(err < 1e-5, "{} after the step: error {err:.2e}", e.name);
    }
    for (i, name) in net.layout.tracked.iter().enumerate() {
        if let TensorData::I64(v) = &io[&format!("after.{name}")].data {
            assert_eq!(w.tracked[i], v[0], "{name}");
        }
    }
}

#[test]
fn small_network_matches_timm() {
    check_parity(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity"));
}

#[test]
#[ignore = "needs full-size fixtures: EFFNET_FULL_FIXTURES=DIR (tools/make_parity_fixtures.py --arch NAME --out DIR)"]
fn full_size_network_matches_timm() {
    let dir = std::env::var("EFFNET_FULL_FIXTURES")
        .expect("set EFFNET_FULL_FIXTURES to a fixture folder");
    check_parity(Path::new(&dir));
}
