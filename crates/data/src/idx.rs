//! The IDX format of MNIST and Fashion-MNIST (`*-images-idx3-ubyte`, `*-labels-idx1-ubyte`),
//! raw or gzip-compressed.
//!
//! Layout: big-endian `u32` magic (`0x00000803` images: u8, 3 dimensions; `0x00000801` labels:
//! u8, 1 dimension), one big-endian `u32` per dimension, then the u8 data in row-major order.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Where the Debian package `dataset-fashion-mnist` installs Fashion-MNIST.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The file's bytes, gunzipped when they start with the gzip magic (whatever the name says).
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: bad gzip data: {e}", path.display()))?;
    Ok(out)
}

/// Checks the magic and the sizes against the data length; returns the dimensions and data.
fn parse(path: &Path, bytes: &[u8], magic: u32, ndim: usize) -> Result<Vec<usize>, String> {
    let what = if magic == IMAGES_MAGIC {
        "idx3 images"
    } else {
        "idx1 labels"
    };
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(format!(
            "{}: {} bytes, too short for an {what} header ({header} bytes)",
            path.display(),
            bytes.len()
        ));
    }
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let found = be(0);
    if found != magic {
        return Err(format!(
            "{}: magic number {found:#010x}, expected {magic:#010x} ({what})",
            path.display()
        ));
    }
    let dims: Vec<usize> = (0..ndim).map(|d| be(4 + 4 * d) as usize).collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("{}: dimensions {dims:?} overflow", path.display()))?;
    let data = bytes.len() - header;
    if data != expected {
        return Err(format!(
            "{}: dimensions {dims:?} need {expected} data bytes, the file has {data}",
            path.display()
        ));
    }
    Ok(dims)
}

/// Reads an idx3 image file: (count, rows, cols, pixels), pixels `count × rows × cols` u8.
pub fn read_images(path: impl AsRef<Path>) -> Result<(usize, usize, usize, Vec<u8>), String> {
    let path = path.as_ref();
    let mut bytes = read_maybe_gzip(path)?;
    let dims = parse(path, &bytes, IMAGES_MAGIC, 3)?;
    bytes.drain(..16);
    Ok((dims[0], dims[1], dims[2], bytes))
}

/// Reads an idx1 label file.
pub fn read_labels(path: impl AsRef<Path>) -> Result<Vec<u8>, String> {
    let path = path.as_ref();
    let mut bytes = read_maybe_gzip(path)?;
    parse(path, &bytes, LABELS_MAGIC, 1)?;
    bytes.drain(..8);
    Ok(bytes)
}

/// One split of Fashion-MNIST (or MNIST): `images` holds `labels.len()` images of
/// `rows × cols` u8 pixels, row-major.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    pub rows: usize,
    pub cols: usize,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl IdxDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.images[i * n..(i + 1) * n]
    }
}

/// `dir/{split}-{kind}-{idx}` with `.gz` or without, whichever exists (`.gz` first).
fn find(dir: &Path, split: &str, kind: &str) -> Result<PathBuf, String> {
    let base = dir.join(format!("{split}-{kind}"));
    let gz = base.with_file_name(format!("{split}-{kind}.gz"));
    [gz, base.clone()]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{}: no such file (nor with .gz)", base.display()))
}

/// Reads the `train` or `t10k` split of Fashion-MNIST from `dir` (the files
/// `{split}-images-idx3-ubyte[.gz]` and `{split}-labels-idx1-ubyte[.gz]`), checking that the
/// image and label counts agree and that every label is below 10.
pub fn fashion_mnist(dir: impl AsRef<Path>, split: &str) -> Result<IdxDataset, String> {
    let dir = dir.as_ref();
    if split != "train" && split != "t10k" {
        return Err(format!(
            "{}: unknown split {split:?}, expected \"train\" or \"t10k\"",
            dir.display()
        ));
    }
    let images_path = find(dir, split, "images-idx3-ubyte")?;
    let labels_path = find(dir, split, "labels-idx1-ubyte")?;
    let (count, rows, cols, images) = read_images(&images_path)?;
    let labels = read_labels(&labels_path)?;
    if labels.len() != count {
        return Err(format!(
            "{}: {count} images but {} has {} labels",
            images_path.display(),
            labels_path.display(),
            labels.len()
        ));
    }
    let classes = FASHION_MNIST_CLASSES.len();
    if let Some(i) = labels.iter().position(|&l| l as usize >= classes) {
        return Err(format!(
            "{}: label {} of sample {i} is not below {classes}",
            labels_path.display(),
            labels[i]
        ));
    }
    Ok(IdxDataset {
        rows,
        cols,
        images,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("effnet-idx-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn synthetic_raw_and_gzip() {
        let dir = tmp("synthetic");
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let images = idx(IMAGES_MAGIC, &[2, 3, 4], &pixels);
        let labels = idx(LABELS_MAGIC, &[2], &[9, 0]);
        // gzip detected by content: the gzip file has no .gz name, the raw one has.
        std::fs::write(dir.join("t10k-images-idx3-ubyte"), gzip(&images)).unwrap();
        std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), &labels).unwrap();
        let (n, r, c, px) = read_images(dir.join("t10k-images-idx3-ubyte")).unwrap();
        assert_eq!((n, r, c, px), (2, 3, 4, pixels.clone()));
        assert_eq!(
            read_labels(dir.join("t10k-labels-idx1-ubyte.gz")).unwrap(),
            [9, 0]
        );
        let ds = fashion_mnist(&dir, "t10k").unwrap();
        assert_eq!((ds.len(), ds.rows, ds.cols), (2, 3, 4));
        assert_eq!(ds.image(1), &pixels[12..]);
        assert_eq!(ds.labels, [9, 0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_magic_and_sizes() {
        let dir = tmp("bad");
        let path = dir.join("labels");
        // An images file read as labels: wrong magic, named in the error with the file.
        std::fs::write(&path, idx(IMAGES_MAGIC, &[1, 1, 1], &[0])).unwrap();
        let e = read_labels(&path).unwrap_err();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(
            e.contains("magic number 0x00000803, expected 0x00000801"),
            "{e}"
        );
        // Gzip of the wrong thing reports the same way.
        std::fs::write(&path, gzip(&idx(0x1234, &[1], &[0]))).unwrap();
        assert!(read_labels(&path)
            .unwrap_err()
            .contains("magic number 0x00001234"));
        // Too little and too much data.
        std::fs::write(&path, idx(LABELS_MAGIC, &[3], &[0, 1])).unwrap();
        let e = read_labels(&path).unwrap_err();
        assert!(e.contains("need 3 data bytes, the file has 2"), "{e}");
        std::fs::write(&path, idx(IMAGES_MAGIC, &[1, 2, 2], &[0; 5])).unwrap();
        assert!(read_images(&path)
            .unwrap_err()
            .contains("need 4 data bytes"));
        // Truncated header, corrupt gzip, missing file.
        std::fs::write(&path, [0, 0, 8]).unwrap();
        assert!(read_images(&path).unwrap_err().contains("too short"));
        let mut gz = gzip(&idx(LABELS_MAGIC, &[4], &[1, 2, 3, 4]));
        gz.truncate(gz.len() - 6);
        std::fs::write(&path, gz).unwrap();
        assert!(read_labels(&path).unwrap_err().contains("bad gzip data"));
        assert!(read_labels(dir.join("none")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn split_checks() {
        let dir = tmp("split");
        assert!(fashion_mnist(&dir, "test")
            .unwrap_err()
            .contains("unknown split"));
        assert!(fashion_mnist(&dir, "train")
            .unwrap_err()
            .contains("train-images-idx3-ubyte: no such file"));
        std::fs::write(
            dir.join("train-images-idx3-ubyte"),
            idx(IMAGES_MAGIC, &[2, 1, 1], &[0, 0]),
        )
        .unwrap();
        std::fs::write(
            dir.join("train-labels-idx1-ubyte"),
            idx(LABELS_MAGIC, &[1], &[0]),
        )
        .unwrap();
        let e = fashion_mnist(&dir, "train").unwrap_err();
        assert!(
            e.contains("2 images but") && e.contains("has 1 labels"),
            "{e}"
        );
        std::fs::write(
            dir.join("train-labels-idx1-ubyte"),
            idx(LABELS_MAGIC, &[2], &[3, 10]),
        )
        .unwrap();
        let e = fashion_mnist(&dir, "train").unwrap_err();
        assert!(e.contains("label 10 of sample 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
