//! Tensor files in and out: safetensors (read and write) and PyTorch checkpoints (`torch.save`,
//! read only, both the zip format of torch ≥ 1.6 and the legacy one). Nothing here executes
//! code from a file: PyTorch pickles go through a restricted pickle machine that knows only the
//! few globals a state dict needs.
//!
//! Every element type a file can hold is widened on reading: floating point to `f32`, integers
//! and booleans to `i64`.

mod pickle;
mod pth;
mod safetensors;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use pth::read_pth;
pub use safetensors::{read_safetensors, write_safetensors};

/// One tensor as stored in a file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// A tensor's elements in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A failure to read or write a tensor file; the message names the tensor where one is involved.
#[derive(Debug)]
pub struct IoError {
    pub path: PathBuf,
    pub message: String,
}

impl IoError {
    fn new(path: &Path, message: impl Into<String>) -> Self {
        IoError {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for IoError {}

/// Reads by extension: .safetensors, or .pth/.pt/.bin (PyTorch); metadata empty for pth.
pub fn read_tensors(path: &Path) -> Result<(Vec<RawTensor>, BTreeMap<String, String>), IoError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("safetensors") => read_safetensors(path),
        Some("pth" | "pt" | "bin") => Ok((read_pth(path)?, BTreeMap::new())),
        _ => Err(IoError::new(
            path,
            "unknown tensor file extension (expected .safetensors, .pth, .pt or .bin)",
        )),
    }
}

/// Element types found in tensor files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U32,
    U16,
    U8,
    Bool,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The safetensors spelling, also used in messages.
    fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U32 => "U32",
            DType::U16 => "U16",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// Decodes whole elements (`bytes.len()` is a multiple of the element size).
    fn decode(self, bytes: &[u8], big_endian: bool) -> TensorData {
        match self {
            DType::F64 => TensorData::F32(
                words(bytes, big_endian)
                    .map(|w| f64::from_le_bytes(w) as f32)
                    .collect(),
            ),
            DType::F32 => {
                TensorData::F32(words(bytes, big_endian).map(f32::from_le_bytes).collect())
            }
            DType::F16 => TensorData::F32(
                words(bytes, big_endian)
                    .map(|w| f16_to_f32(u16::from_le_bytes(w)))
                    .collect(),
            ),
            DType::BF16 => TensorData::F32(
                words(bytes, big_endian)
                    .map(|w| f32::from_bits(u32::from(u16::from_le_bytes(w)) << 16))
                    .collect(),
            ),
            DType::I64 => {
                TensorData::I64(words(bytes, big_endian).map(i64::from_le_bytes).collect())
            }
            DType::I32 => TensorData::I64(
                words(bytes, big_endian)
                    .map(|w| i64::from(i32::from_le_bytes(w)))
                    .collect(),
            ),
            DType::I16 => TensorData::I64(
                words(bytes, big_endian)
                    .map(|w| i64::from(i16::from_le_bytes(w)))
                    .collect(),
            ),
            DType::U32 => TensorData::I64(
                words(bytes, big_endian)
                    .map(|w| i64::from(u32::from_le_bytes(w)))
                    .collect(),
            ),
            DType::U16 => TensorData::I64(
                words(bytes, big_endian)
                    .map(|w| i64::from(u16::from_le_bytes(w)))
                    .collect(),
            ),
            DType::I8 => TensorData::I64(bytes.iter().map(|&b| i64::from(b as i8)).collect()),
            DType::U8 => TensorData::I64(bytes.iter().map(|&b| i64::from(b)).collect()),
            DType::Bool => TensorData::I64(bytes.iter().map(|&b| i64::from(b != 0)).collect()),
        }
    }
}

/// The elements of `bytes` as little-endian words (byte-swapped first for big-endian files).
fn words<const N: usize>(bytes: &[u8], big_endian: bool) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(move |c| {
        let mut w = [0u8; N];
        w.copy_from_slice(c);
        if big_endian {
            w.reverse();
        }
        w
    })
}

/// IEEE half to single precision, exact (subnormals, infinities and NaN payloads included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    match exp {
        0 => {
            // Subnormal (or zero): man × 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            if sign != 0 {
                -v
            } else {
                v
            }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// Little-endian reads from a byte slice that fail with a message instead of panicking.
struct ByteReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    fn new(bytes: &'a [u8], pos: usize) -> Self {
        ByteReader { bytes, pos }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "unexpected end of data: {n} bytes needed at offset {} of {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }
}

/// A u64 from a file as a usize, for lengths and offsets.
fn to_usize(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit in memory"))
}

/// Writes `path` atomically: into a temporary file in the same directory, synced, then renamed
/// over the target, so a reader never sees a half-written file and a failure leaves an existing
/// target as it was.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), IoError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .ok_or_else(|| IoError::new(path, "path has no file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| {
            IoError::new(
                path,
                format!("cannot create temporary file {}: {e}", tmp.display()),
            )
        })?;
    let result = (|| {
        let mut w = BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // Best effort: the temporary file is ours and useless now.
        let _ = fs::remove_file(&tmp);
        return Err(IoError::new(path, format!("cannot write: {e}")));
    }
    // Make the rename itself durable; not all platforms can open a directory, so best effort.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn decode_big_endian_and_widen() {
        assert_eq!(
            DType::I16.decode(&[0xff, 0xfe, 0x00, 0x01], true),
            TensorData::I64(vec![-2, 1])
        );
        assert_eq!(
            DType::I16.decode(&[0xfe, 0xff, 0x01, 0x00], false),
            TensorData::I64(vec![-2, 1])
        );
        assert_eq!(
            DType::F32.decode(&1.5f32.to_be_bytes(), true),
            TensorData::F32(vec![1.5])
        );
        assert_eq!(
            DType::Bool.decode(&[0, 1, 1], false),
            TensorData::I64(vec![0, 1, 1])
        );
        assert_eq!(DType::U8.decode(&[255], false), TensorData::I64(vec![255]));
        assert_eq!(DType::I8.decode(&[255], false), TensorData::I64(vec![-1]));
        assert_eq!(
            DType::BF16.decode(&[0x80, 0x3f], false),
            TensorData::F32(vec![1.0])
        );
    }

    /// Every fixture written by tools/make_io_fixtures.py reads back exactly as torch saw it.
    #[test]
    fn fixtures_match_what_torch_wrote() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/io");
        let expected = fs::read_to_string(dir.join("expected.json")).expect("read expected.json");
        let expected: serde_json::Value =
            serde_json::from_str(&expected).expect("parse expected.json");
        let files = expected.as_object().expect("an object of files");
        assert_eq!(files.len(), 4);
        for (file, want) in files {
            let (tensors, metadata) =
                read_tensors(&dir.join(file)).unwrap_or_else(|e| panic!("{e}"));
            let want_meta: BTreeMap<String, String> = want["metadata"]
                .as_object()
                .expect("metadata")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_string()))
                .collect();
            assert_eq!(metadata, want_meta, "{file}");
            let want = want["tensors"].as_array().expect("tensors");
            let names: Vec<_> = tensors.iter().map(|t| t.name.as_str()).collect();
            let want_names: Vec<_> = want
                .iter()
                .map(|t| t["name"].as_str().expect("name"))
                .collect();
            assert_eq!(names, want_names, "{file}");
            for (t, w) in tensors.iter().zip(want) {
                let shape: Vec<usize> = w["shape"]
                    .as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_u64().expect("dim") as usize)
                    .collect();
                assert_eq!(t.shape, shape, "{file}: {}", t.name);
                let values = w["values"].as_array().expect("values");
                match (&t.data, w["kind"].as_str()) {
                    (TensorData::F32(got), Some("f32")) => {
                        // Bit equality: -0.0, subnormals and float64 → float32 rounding included.
                        let want: Vec<u32> = values
                            .iter()
                            .map(|v| (v.as_f64().expect("float") as f32).to_bits())
                            .collect();
                        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{file}: {}", t.name);
                    }
                    (TensorData::I64(got), Some("i64")) => {
                        let want: Vec<i64> =
                            values.iter().map(|v| v.as_i64().expect("int")).collect();
                        assert_eq!(got, &want, "{file}: {}", t.name);
                    }
                    (data, kind) => panic!("{file}: {}: got {data:?}, want kind {kind:?}", t.name),
                }
            }
        }
    }

    #[test]
    fn read_tensors_rejects_unknown_extension() {
        let err = read_tensors(Path::new("weights.npz")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("weights.npz: unknown tensor file extension"),
            "{err}"
        );
    }
}
