//! The real Fashion-MNIST from the Debian package `dataset-fashion-mnist`. This test fails,
//! rather than skips, when the package is missing: CI installs it.

use std::path::Path;

use effnet_data::idx::{fashion_mnist, IdxDataset, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR};

fn load(split: &str) -> IdxDataset {
    assert!(
        Path::new(FASHION_MNIST_DIR).is_dir(),
        "{FASHION_MNIST_DIR} is missing: install the Debian package with \
         `apt-get install -y dataset-fashion-mnist`"
    );
    fashion_mnist(FASHION_MNIST_DIR, split).unwrap_or_else(|e| panic!("{e}"))
}

fn check(ds: &IdxDataset, count: usize, first_labels: &[u8]) {
    assert_eq!((ds.len(), ds.rows, ds.cols), (count, 28, 28));
    assert_eq!(ds.images.len(), count * 28 * 28);
    let mut per_class = [0usize; 10];
    for &l in &ds.labels {
        per_class[l as usize] += 1;
    }
    // Fashion-MNIST is balanced: every class has a tenth of each split.
    assert_eq!(per_class, [count / 10; 10]);
    assert_eq!(&ds.labels[..first_labels.len()], first_labels);
    // Mean pixel of Fashion-MNIST is about 0.286 × 255 ≈ 73 in both splits.
    let mean = ds.images.iter().map(|&p| p as f64).sum::<f64>() / ds.images.len() as f64;
    assert!((70.0..76.0).contains(&mean), "mean pixel {mean}");
    // Images have a black background: the corner pixels are almost always 0.
    let dark_corners = (0..ds.len()).filter(|&i| ds.image(i)[0] == 0).count();
    assert!(dark_corners > count * 9 / 10, "{dark_corners} dark corners");
}

#[test]
fn fashion_mnist_t10k() {
    let ds = load("t10k");
    // The first test images: ankle boot, pullover, trouser, trouser, shirt.
    check(&ds, 10_000, &[9, 2, 1, 1, 6]);
    assert_eq!(FASHION_MNIST_CLASSES[9], "Ankle boot");
}

#[test]
fn fashion_mnist_train() {
    let ds = load("train");
    // The first training images: ankle boot, T-shirt/top, T-shirt/top, dress, T-shirt/top.
    check(&ds, 60_000, &[9, 0, 0, 3, 0]);
}
