//! Decode-and-crop against the full decode (zune-jpeg through `image`) cut to the same
//! rectangle, on real photos in every supported layout; fallbacks; damaged files.

use std::path::{Path, PathBuf};

use effnet_data::decode::crop;
use effnet_data::jpeg::{decode_crop, read_header};
use effnet_data::sampler::TrainGeometry;
use effnet_data::{decode_rgb, decode_rgb_window, RgbImage};
use effnet_engine::rng::Rng;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg")
}

fn cli_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cli/tests/fixtures")
        .join(name)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The baseline files: (path, what they exercise).
fn baseline_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = [
        "cat_444.jpg",
        "cat_422.jpg",
        "cat_420.jpg",
        "cup_420_q95.jpg",
        "cup_gray.jpg",
        "fruit_420_restart7.jpg",
        "fruit_444_restart_row.jpg",
        "fruit_gray_restart3.jpg",
        "tiny_420.jpg",
    ]
    .iter()
    .map(|f| fixtures().join(f))
    .collect();
    files.push(cli_fixture("photos/orange.jpg"));
    files.push(cli_fixture("formats/rgb.jpg"));
    files.push(cli_fixture("formats/gray.jpg"));
    files
}

/// Per-channel largest absolute difference.
fn max_diff(a: &RgbImage, b: &RgbImage) -> [u8; 3] {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let mut m = [0u8; 3];
    for (pa, pb) in a.pixels.chunks_exact(3).zip(b.pixels.chunks_exact(3)) {
        for c in 0..3 {
            m[c] = m[c].max(pa[c].abs_diff(pb[c]));
        }
    }
    m
}

/// Rectangles of a `w × h` image: the whole, the four corners' single pixels, full rows and
/// columns at the edges, and random ones of every size.
fn rectangles(w: usize, h: usize, rng: &mut Rng) -> Vec<(usize, usize, usize, usize)> {
    let mut r = vec![
        (0, 0, w, h),
        (0, 0, 1, 1),
        (w - 1, 0, 1, 1),
        (0, h - 1, 1, 1),
        (w - 1, h - 1, 1, 1),
        (0, h - 1, w, 1),
        (w - 1, 0, 1, h),
        (w / 2, h / 2, w - w / 2, h - h / 2),
    ];
    for _ in 0..150 {
        let cw = 1 + rng.below(w);
        let ch = 1 + rng.below(h);
        r.push((rng.below(w - cw + 1), rng.below(h - ch + 1), cw, ch));
    }
    r
}

#[test]
fn crops_match_the_full_decode_cut_out() {
    let mut rng = Rng::new(4);
    for path in baseline_files() {
        let bytes = read(&path);
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let header = read_header(&bytes).unwrap_or_else(|| panic!("{name}: not on the fast path"));
        let full = decode_rgb(bytes.clone()).unwrap();
        assert_eq!(
            (header.width, header.height),
            (full.width, full.height),
            "{name}"
        );
        let mut worst = [0u8; 3];
        for rect in rectangles(full.width, full.height, &mut rng) {
            let got = decode_crop(&bytes, &header, rect)
                .unwrap_or_else(|e| panic!("{name} {rect:?}: {e}"));
            let want = crop(&full, rect).unwrap().image;
            let d = max_diff(&got, &want);
            for c in 0..3 {
                worst[c] = worst[c].max(d[c]);
            }
            // Identical: the arithmetic is zune-jpeg's (IDCT, upsampling, color constants).
            assert_eq!(d, [0; 3], "{name} {rect:?}: max diff per channel");
        }
        println!(
            "{name}: {}×{}, max abs diff per channel {worst:?}",
            full.width, full.height
        );
    }
}

#[test]
fn unsupported_files_fall_back_to_the_full_decode_exactly() {
    let mut rng = Rng::new(5);
    for path in [
        fixtures().join("cat_420_progressive.jpg"),
        cli_fixture("formats/exif_rotated.jpg"),
        cli_fixture("formats/cmyk.jpg"),
        cli_fixture("formats/progressive.jpg"),
        cli_fixture("photos/chelsea.png"),
    ] {
        let bytes = read(&path);
        assert!(read_header(&bytes).is_none(), "{}", path.display());
        let full = decode_rgb(bytes.clone()).unwrap();
        for rect in rectangles(full.width, full.height, &mut rng)
            .into_iter()
            .take(20)
        {
            let (size, window) = decode_rgb_window(bytes.clone(), |w, h| ((w, h), rect)).unwrap();
            // The size given to `pick` is the upright one (EXIF orientation applied).
            assert_eq!(size, (full.width, full.height), "{}", path.display());
            assert_eq!(window, crop(&full, rect).unwrap(), "{}", path.display());
        }
    }
}

#[test]
fn damaged_jpegs_give_errors_not_panics() {
    let bytes = read(&fixtures().join("fruit_420_restart7.jpg"));
    let header = read_header(&bytes).unwrap();
    let (w, h) = (header.width, header.height);
    // Cut in the middle of the scan: a crop of the bottom rows needs data that is not there.
    let cut = &bytes[..bytes.len() / 2];
    let cut_header = read_header(cut).unwrap();
    let e = decode_crop(cut, &cut_header, (0, h - 8, w, 8)).unwrap_err();
    assert!(e.contains("ends early"), "{e}");
    // The top rows are intact.
    let full = decode_rgb(bytes.clone()).unwrap();
    let top = decode_crop(cut, &cut_header, (0, 0, w, 16)).unwrap();
    assert_eq!(top, crop(&full, (0, 0, w, 16)).unwrap().image);
    // Through the window decoder, the full decoder has the last word on damaged data.
    match decode_rgb_window(cut.to_vec(), |_, _| ((), (0, h - 8, w, 8))) {
        Ok((_, window)) => assert_eq!((window.image.width, window.image.height), (w, 8)),
        Err(e) => assert!(!e.is_empty()),
    }
    // The committed truncated file, and bytes flipped all over the scan of every fixture.
    let truncated = read(&cli_fixture("formats/truncated.jpg"));
    if let Some(t) = read_header(&truncated) {
        assert!(decode_crop(&truncated, &t, (0, 0, t.width, t.height)).is_err());
    }
    let e = decode_rgb_window(truncated, |w, h| ((), (0, 0, w, h))).unwrap_err();
    assert!(e.contains("decode"), "{e}");
    let mut rng = Rng::new(6);
    for path in baseline_files() {
        let bytes = read(&path);
        for _ in 0..40 {
            let mut bad = bytes.clone();
            for _ in 0..1 + rng.below(4) {
                let at = bytes.len() / 4 + rng.below(bytes.len() * 3 / 4);
                bad[at] = rng.below(256) as u8;
            }
            if let Some(hd) = read_header(&bad) {
                let rect = rectangles(hd.width, hd.height, &mut rng)[8];
                let _ = decode_crop(&bad, &hd, rect);
            }
            let _ = decode_rgb_window(bad, |w, h| ((), (0, 0, w, h)));
        }
    }
    // A rectangle outside the image is an error, on both paths.
    assert!(decode_crop(&bytes, &header, (w - 3, 0, 4, 1)).is_err());
    assert!(decode_rgb_window(bytes, |w, h| ((), (0, 0, w + 1, h))).is_err());
}

#[test]
fn train_transform_from_the_encoded_file_equals_decoding_it_whole() {
    for (path, size) in [
        (cli_fixture("photos/orange.jpg"), 224),
        (fixtures().join("fruit_420_restart7.jpg"), 96),
        (fixtures().join("cup_gray.jpg"), 64),
        (fixtures().join("cat_420_progressive.jpg"), 64),
        (cli_fixture("formats/exif_rotated.jpg"), 32),
    ] {
        let bytes = read(&path);
        let full = decode_rgb(bytes.clone()).unwrap();
        let g = TrainGeometry::new(size);
        for seed in 0..60 {
            let (mut a, mut b) = (Rng::new(seed), Rng::new(seed));
            let whole = g.apply(&full, &mut a);
            let cropped = g.apply_encoded(bytes.clone(), &mut b).unwrap();
            assert_eq!(whole, cropped, "{} seed {seed}", path.display());
            // The same random draws were taken, in the same number.
            assert_eq!(a.next_u64(), b.next_u64(), "{} seed {seed}", path.display());
        }
    }
}

#[test]
fn rendering_from_the_footprint_window_is_bit_identical() {
    let full = decode_rgb(read(&cli_fixture("photos/orange.jpg"))).unwrap();
    let mut rng = Rng::new(9);
    for size in [24, 96, 224, 600] {
        let g = TrainGeometry::new(size);
        for _ in 0..40 {
            let draw = g.draw(full.width, full.height, &mut rng);
            let window = crop(&full, g.footprint(draw, full.width, full.height)).unwrap();
            assert_eq!(g.render_window(&window, draw), g.render(&full, draw));
        }
    }
}

#[test]
fn restart_intervals_outside_the_crop_are_not_read() {
    // One restart interval per MCU row (8 pixel rows at 4:4:4). Fill the first interval's
    // entropy-coded bytes with stuffed 0xFF (all-ones bits: never a valid Huffman code).
    let bytes = read(&fixtures().join("fruit_444_restart_row.jpg"));
    let sos = bytes.windows(2).position(|m| m == [0xFF, 0xDA]).unwrap();
    let scan = sos + 2 + (usize::from(bytes[sos + 2]) << 8 | usize::from(bytes[sos + 3]));
    let rst0 = scan
        + bytes[scan..]
            .windows(2)
            .position(|m| m == [0xFF, 0xD0])
            .unwrap();
    let mut damaged = bytes.clone();
    for (i, b) in damaged[scan..rst0].iter_mut().enumerate() {
        *b = if i % 2 == 0 { 0xFF } else { 0x00 };
    }
    let header = read_header(&damaged).unwrap();
    let full = decode_rgb(bytes).unwrap();
    let (w, h) = (full.width, full.height);
    // Below the first MCU row: decoded from the intact intervals only.
    for rect in [(0, 8, w, h - 8), (100, 40, 50, 60), (w - 1, h - 1, 1, 1)] {
        let got = decode_crop(&damaged, &header, rect).unwrap();
        assert_eq!(got, crop(&full, rect).unwrap().image, "{rect:?}");
    }
    // A crop that needs the first row reads the damage and says so.
    let e = decode_crop(&damaged, &header, (0, 0, 4, 4)).unwrap_err();
    assert!(e.contains("Huffman"), "{e}");
}

/// The eval transform from the encoded file (the reference's center crop: only its footprint
/// is decoded) equals the transform of the whole decoded image, bit for bit; other crops and
/// fallback files take the whole image.
#[test]
fn eval_transform_from_the_encoded_file_equals_decoding_it_whole() {
    use effnet_data::{Crop, Image, Interpolation, Normalize, Transform};
    let mut files = baseline_files();
    files.push(fixtures().join("cat_420_progressive.jpg"));
    for path in files {
        let bytes = read(&path);
        let whole = decode_rgb(bytes.clone()).unwrap();
        for (size, interpolation, crop) in [
            (224, Interpolation::Bicubic, Crop::Reference),
            (33, Interpolation::Bilinear, Crop::Reference),
            (17, Interpolation::Nearest, Crop::Reference),
            (40, Interpolation::Bicubic, Crop::Fraction(0.875)),
        ] {
            let t = Transform {
                size,
                interpolation,
                crop,
                normalize: Normalize::parse("imagenet").unwrap(),
            };
            let mut want = vec![0f32; size * size * 3];
            t.apply(&whole, &mut want);
            let mut got = vec![0f32; size * size * 3];
            t.apply_image(Image::Encoded(bytes.clone()), &mut got)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                got == want,
                "{} at {size} ({crop:?}): the encoded path differs",
                path.display()
            );
        }
    }
    // A damaged file is an error, as decoding it whole would be.
    let t = Transform {
        size: 32,
        interpolation: Interpolation::Bilinear,
        crop: Crop::Reference,
        normalize: Normalize::parse("imagenet").unwrap(),
    };
    let mut out = vec![0f32; 32 * 32 * 3];
    let err = t
        .apply_image(
            Image::Encoded(b"\xff\xd8\xff\xe0 not a jpeg".to_vec()),
            &mut out,
        )
        .expect_err("garbage must not transform");
    assert!(!err.is_empty());
}
