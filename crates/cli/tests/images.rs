//! Image files as users have them: every JPEG and PNG flavour decodes upright; broken files are
//! reported with their path and reason while the others are still processed.

use std::path::{Path, PathBuf};
use std::process::Command;

use effnet_data::load_rgb;

fn formats() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats")
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn every_format_decodes_to_the_same_upright_picture() {
    let reference = load_rgb(&formats().join("rgb.png")).unwrap();
    assert_eq!((reference.width, reference.height), (64, 48));
    for (file, tolerance) in [
        ("rgb.jpg", 6.0),
        ("progressive.jpg", 6.0),
        ("cmyk.jpg", 10.0),
        ("palette.png", 8.0),
        ("rgba.png", 0.0),
        ("exif_rotated.jpg", 6.0),
    ] {
        let img = load_rgb(&formats().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            (img.width, img.height),
            (64, 48),
            "{file}: EXIF orientation applied"
        );
        let d = mean_abs_diff(&img.pixels, &reference.pixels);
        assert!(
            d <= tolerance,
            "{file}: mean difference {d:.2} from rgb.png"
        );
    }
    for file in ["gray.jpg", "gray16.png"] {
        let img = load_rgb(&formats().join(file)).unwrap();
        assert_eq!((img.width, img.height), (64, 48));
        assert!(
            img.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]),
            "{file}: gray as R=G=B"
        );
    }
    // 16-bit samples are scaled to 8 bits: v·257 → v.
    let g8 = load_rgb(&formats().join("gray.jpg")).unwrap();
    let g16 = load_rgb(&formats().join("gray16.png")).unwrap();
    assert!(mean_abs_diff(&g8.pixels, &g16.pixels) < 3.0);
}

#[test]
fn broken_files_say_what_is_wrong() {
    for (file, words) in [
        ("truncated.jpg", "decode"),
        ("empty.jpg", ""),
        ("not_an_image.png", ""),
    ] {
        let e = load_rgb(&formats().join(file)).unwrap_err();
        assert!(!e.is_empty() && e.contains(words), "{file}: {e}");
    }
}

#[test]
fn predict_skips_and_counts_unreadable_files() {
    // Random weights are enough to exercise the file handling.
    let dir = std::env::temp_dir().join(format!("effnet-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("w.safetensors");
    let net = effnet_model::Network::new({
        let mut c = effnet_model::arch("efficientnet_lite0").unwrap();
        c.num_classes = 3;
        c
    });
    effnet_model::weights::save(&net, &effnet_model::Weights::init(&net, 1), &weights).unwrap();
    let labels = dir.join("labels.txt");
    std::fs::write(&labels, "alpha\nbeta\ngamma\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args([
            "predict",
            "--weights",
            weights.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--top-k",
            "2",
            "--img-size",
            "32",
            "--format",
            "csv",
        ])
        .arg(formats())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "unreadable files make the exit code non-zero"
    );
    assert!(
        stderr.contains("3 of 12 images could not be read"),
        "{stderr}"
    );
    for bad in ["truncated.jpg", "empty.jpg", "not_an_image.png"] {
        assert!(
            stderr.lines().any(|l| l.contains(bad)),
            "{bad} is named: {stderr}"
        );
    }
    // The nine good files each got two rows after the header, with the custom labels.
    assert_eq!(stdout.lines().count(), 1 + 9 * 2, "{stdout}");
    assert!(stdout
        .lines()
        .skip(1)
        .all(|l| l.contains("alpha") || l.contains("beta") || l.contains("gamma")));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn make_tfrecords_leaves_out_and_counts_unreadable_images() {
    let dir = std::env::temp_dir().join(format!("effnet-records-{}", std::process::id()));
    for (class, file) in [
        ("cat", "rgb.jpg"),
        ("cat", "truncated.jpg"),
        ("dog", "rgb.png"),
        ("dog", "empty.jpg"),
    ] {
        std::fs::create_dir_all(dir.join("data").join(class)).unwrap();
        std::fs::copy(
            formats().join(file),
            dir.join("data").join(class).join(file),
        )
        .unwrap();
    }
    let run = |prefix: &str| {
        Command::new(env!("CARGO_BIN_EXE_effnet"))
            .args(["make_tfrecords", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--out")
            .arg(dir.join("out"))
            .args(["--prefix", prefix])
            .output()
            .unwrap()
    };
    let out = run("train");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "unreadable images fail the command");
    for file in ["truncated.jpg", "empty.jpg"] {
        assert!(stderr.contains(file), "{file} named: {stderr}");
    }
    assert!(
        stderr.contains("2 of 4 images could not be read"),
        "{stderr}"
    );
    assert!(stdout.contains("2 images of 2 classes"), "{stdout}");
    let shard = dir.join("out").join("train-00000-of-00001");
    let records = effnet_data::tfrecord::list_shards(&dir.join("out"), "train").unwrap();
    assert_eq!(records, vec![shard]);
    // The prefix names files inside --out, never a path out of it.
    let out = run("../escape");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--prefix"),
        "{stderr}"
    );
    assert!(!dir.join("escape-00000-of-00001").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Flags that cannot work are refused before the weights are read (they do not exist here).
#[test]
fn predict_refuses_unusable_flags_first() {
    for (args, says) in [
        (&["--top-k", "0", "x.jpg"][..], "--top-k"),
        (&["--batch-size", "0", "x.jpg"], "--batch-size"),
        (&["--input-npy", "x.npy", "x.jpg"], "not both"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_effnet"))
            .args(["predict", "--weights", "absent.safetensors"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
}
