//! `effnet train` end to end on real Fashion-MNIST (Debian's dataset-fashion-mnist, which .ci/run
//! installs): it learns, writes DLLogger lines, checkpoints and a final model, and resumes.

mod common;
use common::effnet;

#[test]
fn trains_checkpoints_resumes_and_predicts() {
    assert!(
        std::path::Path::new("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
            .exists(),
        "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (.ci/run does)"
    );
    let dir = std::env::temp_dir().join(format!("effnet-train-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let common = [
        "train",
        "--arch",
        "efficientnet_lite0",
        "--img-size",
        "32",
        "--max-train-images",
        "1280",
        "--max-eval-images",
        "200",
        "--batch-size",
        "32",
        "--bn-momentum",
        "0.9",
        "--model-dir",
        d,
        "--log-steps",
        "10",
    ];
    let mut first: Vec<&str> = common.to_vec();
    first.extend(["--epochs", "1"]);
    let (ok, stdout, stderr) = effnet(&first);
    assert!(ok, "{stderr}");
    assert!(dir.join("checkpoint-epoch0001.safetensors").exists());
    let mut second: Vec<&str> = common.to_vec();
    second.extend(["--epochs", "2", "--resume"]);
    let (ok, stdout2, stderr) = effnet(&second);
    assert!(ok, "{stderr}");
    assert!(
        stdout2.contains("resumed from") && stdout2.contains("epoch 1"),
        "{stdout2}"
    );
    assert!(
        !stdout2.contains("epoch 1/2"),
        "epoch 1 is not trained again: {stdout2}"
    );
    assert!(dir.join("checkpoint-epoch0002.safetensors").exists());

    // DLLogger lines: one per epoch across both runs, with the evaluation.
    let log = std::fs::read_to_string(dir.join("log.json")).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(&l[5..]).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{log}");
    let acc = records[1]["data"]["eval_accuracy_top_1"].as_f64().unwrap();
    assert!(
        acc > 0.3,
        "after 80 steps the network is well above chance (0.1): {acc}"
    );
    assert!(stdout.contains("predictions on the first test images"));

    // The final model loads into predict (it carries its architecture and preprocessing).
    let model = dir.join("model.safetensors");
    let (_, meta) = effnet_model::io::read_safetensors(&model).unwrap();
    assert!(matches!(
        meta["effnet.weights_source"].as_str(),
        "raw" | "ema"
    ));
    let (net, _) = effnet_model::weights::load(&model, None).unwrap();
    assert_eq!(net.classes, 10);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn trains_on_image_folders_and_on_tfrecords_made_from_them() {
    let photos = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    let root = std::env::temp_dir().join(format!("effnet-train-images-{}", std::process::id()));
    let images = root.join("images");
    for split in ["train", "val"] {
        for (class, file) in [
            ("cat", "chelsea.png"),
            ("drink", "coffee.png"),
            ("fruit", "orange.jpg"),
        ] {
            let dir = images.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for copy in 0..3 {
                std::fs::copy(photos.join(file), dir.join(format!("{copy}-{file}"))).unwrap();
            }
        }
    }
    let run = |data_dir: &std::path::Path, model_dir: &std::path::Path| {
        let (ok, stdout, stderr) = effnet(&[
            "train",
            "--arch",
            "efficientnet_lite0",
            "--img-size",
            "32",
            "--batch-size",
            "3",
            "--epochs",
            "1",
            "--random-crop",
            "--raug-magnitude",
            "5",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--model-dir",
            model_dir.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        let labels = std::fs::read_to_string(model_dir.join("labels.txt")).unwrap();
        assert_eq!(labels, "cat\ndrink\nfruit\n");
        let (net, _) =
            effnet_model::weights::load(&model_dir.join("model.safetensors"), None).unwrap();
        assert_eq!(net.classes, 3);
        assert_eq!(net.config.preprocess.normalize, "imagenet");
        stdout
    };
    let out = run(&images, &root.join("run-folders"));
    assert!(
        out.contains("image folders") && out.contains("9 training images"),
        "{out}"
    );

    // The same photos as ImageNet-layout TFRecords (make_tfrecords), class names from the records.
    let shards = root.join("shards");
    for (split, prefix) in [("train", "train"), ("val", "validation")] {
        let (ok, _, stderr) = effnet(&[
            "make_tfrecords",
            "--data-dir",
            images.join(split).to_str().unwrap(),
            "--out",
            shards.to_str().unwrap(),
            "--prefix",
            prefix,
            "--shards",
            "2",
        ]);
        assert!(ok, "{stderr}");
    }
    let out = run(&shards, &root.join("run-records"));
    assert!(
        out.contains("TFRecords") && out.contains("9 training images"),
        "{out}"
    );
    std::fs::remove_dir_all(root).unwrap();
}
