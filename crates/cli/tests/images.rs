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
