//! The safetensors format: an 8-byte little-endian header length, a JSON header mapping each
//! tensor name to its dtype, shape and byte range in the data section (plus an optional
//! `__metadata__` string map), then the raw little-endian data.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;

use super::{to_usize, write_atomic, DType, IoError, RawTensor, TensorData};

/// Headers beyond this are refused as corrupt (the reference implementation's limit too).
const MAX_HEADER: u64 = 100 << 20;
const METADATA_KEY: &str = "__metadata__";

/// Reads every tensor, in the order of their data, and the `__metadata__` map (empty if absent).
pub fn read_safetensors(
    path: &Path,
) -> Result<(Vec<RawTensor>, BTreeMap<String, String>), IoError> {
    let bytes = std::fs::read(path).map_err(|e| IoError::new(path, format!("cannot read: {e}")))?;
    parse(&bytes).map_err(|m| IoError::new(path, m))
}

/// One header entry, validated against the data section.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

fn parse(bytes: &[u8]) -> Result<(Vec<RawTensor>, BTreeMap<String, String>), String> {
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(format!(
            "not a safetensors file: {} bytes, shorter than the header length",
            bytes.len()
        ));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > rest.len() as u64 {
        return Err(format!(
            "header length {header_len} exceeds the {} bytes that follow it (truncated, or not a safetensors file)",
            rest.len()
        ));
    }
    if header_len > MAX_HEADER {
        return Err(format!(
            "header length {header_len} exceeds the {MAX_HEADER}-byte limit"
        ));
    }
    let (header, data) = rest.split_at(header_len as usize);
    let header: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let header = header.as_object().ok_or("header is not a JSON object")?;

    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == METADATA_KEY {
            let map = info
                .as_object()
                .ok_or("__metadata__ is not a JSON object")?;
            for (k, v) in map {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("__metadata__ value of {k:?} is not a string"))?;
                metadata.insert(k.clone(), v.to_string());
            }
        } else {
            entries.push(
                parse_entry(name, info, data.len()).map_err(|m| format!("tensor {name:?}: {m}"))?,
            );
        }
    }

    // File order is data order; empty tensors may share an offset, so ties go by end then name.
    entries.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut last: Option<&Entry> = None;
    for e in entries.iter().filter(|e| e.end > e.begin) {
        if let Some(prev) = last.filter(|p| e.begin < p.end) {
            return Err(format!(
                "tensor {:?}: data_offsets [{}, {}] overlap those of tensor {:?} [{}, {}]",
                e.name, e.begin, e.end, prev.name, prev.begin, prev.end
            ));
        }
        last = Some(e);
    }

    let tensors = entries
        .into_iter()
        .map(|e| RawTensor {
            data: e.dtype.decode(&data[e.begin..e.end], false),
            name: e.name,
            shape: e.shape,
        })
        .collect();
    Ok((tensors, metadata))
}

fn parse_entry(name: &str, info: &serde_json::Value, data_len: usize) -> Result<Entry, String> {
    let info = info
        .as_object()
        .ok_or("header entry is not a JSON object")?;
    let dtype = info
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or("no dtype string")?;
    let dtype = dtype_from_name(dtype).ok_or_else(|| format!("unsupported dtype {dtype}"))?;
    let shape = info
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or("no shape array")?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| "shape holds a non-integer".to_string())
                .and_then(|d| to_usize(d, "dimension"))
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let offsets = info
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .ok_or("no data_offsets pair")?;
    let offset = |i: usize| {
        offsets[i]
            .as_u64()
            .ok_or("data_offsets hold a non-integer".to_string())
    };
    let (begin, end) = (offset(0)?, offset(1)?);
    if begin > end || end > data_len as u64 {
        return Err(format!(
            "data_offsets [{begin}, {end}] lie outside the {data_len}-byte data section"
        ));
    }
    let (begin, end) = (begin as usize, end as usize);
    let nbytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    if end - begin != nbytes {
        return Err(format!(
            "data_offsets [{begin}, {end}] span {} bytes but {} {shape:?} needs {nbytes}",
            end - begin,
            dtype.name()
        ));
    }
    Ok(Entry {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

fn dtype_from_name(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "I8" => DType::I8,
        "U32" => DType::U32,
        "U16" => DType::U16,
        "U8" => DType::U8,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

/// Writes `tensors` (F32 or I64) in the given order with `metadata`, atomically: the target is
/// replaced only once the whole file is on disk.
pub fn write_safetensors(
    path: &Path,
    tensors: &[RawTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<(), IoError> {
    let header = header_bytes(tensors, metadata).map_err(|m| IoError::new(path, m))?;
    write_atomic(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        // Encode in chunks: one write per element would be slow even through the buffer.
        let mut buf = Vec::with_capacity(1 << 16);
        for t in tensors {
            match &t.data {
                TensorData::F32(v) => {
                    for chunk in v.chunks(1 << 14) {
                        buf.clear();
                        chunk
                            .iter()
                            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                        w.write_all(&buf)?;
                    }
                }
                TensorData::I64(v) => {
                    for chunk in v.chunks(1 << 13) {
                        buf.clear();
                        chunk
                            .iter()
                            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                        w.write_all(&buf)?;
                    }
                }
            }
        }
        Ok(())
    })
}

/// The JSON header, tensors in the given order, padded with spaces to a multiple of 8 bytes so
/// that the data section stays aligned.
fn header_bytes(
    tensors: &[RawTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut parts = Vec::with_capacity(tensors.len() + 1);
    if !metadata.is_empty() {
        let map: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().into()))
            .collect();
        parts.push(format!(
            "{}:{}",
            quote(METADATA_KEY),
            serde_json::Value::Object(map)
        ));
    }
    let mut names = HashSet::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        if t.name == METADATA_KEY {
            return Err(format!("tensor name {METADATA_KEY:?} is reserved"));
        }
        if !names.insert(t.name.as_str()) {
            return Err(format!("tensor {:?} appears twice", t.name));
        }
        let (dtype, len, size) = match &t.data {
            TensorData::F32(v) => ("F32", v.len(), 4),
            TensorData::I64(v) => ("I64", v.len(), 8),
        };
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if numel != Some(len) {
            return Err(format!(
                "tensor {:?}: shape {:?} does not match its {len} elements",
                t.name, t.shape
            ));
        }
        let end = offset + len * size;
        parts.push(format!(
            "{}:{{\"dtype\":\"{dtype}\",\"shape\":{},\"data_offsets\":[{offset},{end}]}}",
            quote(&t.name),
            serde_json::Value::from(t.shape.clone())
        ));
        offset = end;
    }
    let mut header = format!("{{{}}}", parts.join(",")).into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh, empty directory for one test.
    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("effnet-io-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test directory");
        dir
    }

    fn sample() -> (Vec<RawTensor>, BTreeMap<String, String>) {
        let tensors = vec![
            RawTensor {
                name: "w".into(),
                shape: vec![2, 2],
                data: TensorData::F32(vec![1.0, -2.5, 0.0, 3.25]),
            },
            RawTensor {
                name: "empty".into(),
                shape: vec![0],
                data: TensorData::F32(vec![]),
            },
            RawTensor {
                name: "a.n".into(),
                shape: vec![],
                data: TensorData::I64(vec![-7]),
            },
        ];
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        (tensors, metadata)
    }

    #[test]
    fn round_trip_and_exact_bytes() {
        let dir = test_dir("round-trip");
        let path = dir.join("t.safetensors");
        let (tensors, metadata) = sample();
        write_safetensors(&path, &tensors, &metadata).expect("write");
        assert_eq!(read_safetensors(&path).expect("read"), (tensors, metadata));

        let bytes = std::fs::read(&path).expect("read bytes");
        let header = concat!(
            r#"{"__metadata__":{"format":"pt"},"#,
            r#""w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"#,
            r#""empty":{"dtype":"F32","shape":[0],"data_offsets":[16,16]},"#,
            r#""a.n":{"dtype":"I64","shape":[],"data_offsets":[16,24]}}"#,
        );
        let padded = header.len().next_multiple_of(8);
        assert_eq!(
            u64::from_le_bytes(bytes[..8].try_into().unwrap()),
            padded as u64
        );
        assert_eq!(&bytes[8..8 + header.len()], header.as_bytes());
        assert!(bytes[8 + header.len()..8 + padded]
            .iter()
            .all(|&b| b == b' '));
        let data = &bytes[8 + padded..];
        assert_eq!(data.len(), 24);
        assert_eq!(&data[..4], &1.0f32.to_le_bytes());
        assert_eq!(&data[16..], &(-7i64).to_le_bytes());
        // Only the target remains: the temporary file was renamed.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_rejects_bad_input_and_keeps_the_target() {
        let dir = test_dir("bad-write");
        let path = dir.join("t.safetensors");
        std::fs::write(&path, b"old").unwrap();
        let (mut tensors, metadata) = sample();
        tensors[0].shape = vec![3];
        let err = write_safetensors(&path, &tensors, &metadata).unwrap_err();
        assert!(
            err.message
                .contains("tensor \"w\": shape [3] does not match its 4 elements"),
            "{err}"
        );
        tensors[0].shape = vec![4];
        tensors[1].name = "w".into();
        let err = write_safetensors(&path, &tensors, &metadata).unwrap_err();
        assert!(err.message.contains("\"w\" appears twice"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");

        // A failure after the temporary file exists (renaming over a directory) removes it.
        let target = dir.join("dir.safetensors");
        std::fs::create_dir(&target).unwrap();
        let (tensors, metadata) = sample();
        let err = write_safetensors(&target, &tensors, &metadata).unwrap_err();
        assert!(err.message.starts_with("cannot write"), "{err}");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["dir.safetensors", "t.safetensors"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file with the given header JSON and `data_len` zero bytes of data.
    fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    #[test]
    fn truncated_file_is_an_error_naming_the_file() {
        let dir = test_dir("truncated");
        let path = dir.join("t.safetensors");
        let (tensors, metadata) = sample();
        write_safetensors(&path, &tensors, &metadata).unwrap();
        let bytes = std::fs::read(&path).unwrap();

        // Cut inside the data: the last tensor's range leaves the file.
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = read_safetensors(&path).unwrap_err();
        assert_eq!(err.path, path);
        assert!(
            err.to_string()
                .starts_with(&format!("{}: tensor \"a.n\"", path.display())),
            "{err}"
        );
        assert!(
            err.message.contains("outside the 21-byte data section"),
            "{err}"
        );

        // Cut inside the header, and inside the length itself.
        std::fs::write(&path, &bytes[..20]).unwrap();
        let err = read_safetensors(&path).unwrap_err();
        assert!(
            err.message.contains("exceeds the 12 bytes that follow it"),
            "{err}"
        );
        std::fs::write(&path, &bytes[..5]).unwrap();
        assert!(read_safetensors(&path)
            .unwrap_err()
            .message
            .contains("shorter than the header length"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_offsets_name_the_tensor() {
        let check = |header: &str, data_len: usize, want: &str| {
            let err = parse(&file_with_header(header, data_len)).unwrap_err();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        };
        check(
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            8,
            "tensor \"x\": data_offsets [0, 4] span 4 bytes but F32 [2] needs 8",
        );
        check(
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            8,
            "tensor \"x\": data_offsets [8, 0] lie outside",
        );
        check(
            r#"{"x":{"dtype":"I8","shape":[2],"data_offsets":[7,9]}}"#,
            8,
            "tensor \"x\": data_offsets [7, 9] lie outside the 8-byte",
        );
        check(
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "tensor \"y\": data_offsets [4, 8] overlap those of tensor \"x\" [0, 8]",
        );
        check(
            r#"{"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#,
            8,
            "tensor \"x\": unsupported dtype C64",
        );
        check(
            r#"{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            8,
            "tensor \"x\": shape holds a non-integer",
        );
        check(
            r#"{"__metadata__":{"k":1}}"#,
            0,
            "__metadata__ value of \"k\" is not a string",
        );
        check(r#"[1, 2]"#, 0, "header is not a JSON object");
    }

    #[test]
    fn reads_in_data_order_with_widening() {
        let header = concat!(
            r#"{"b":{"dtype":"F16","shape":[1],"data_offsets":[4,6]},"#,
            r#""a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},"#,
            r#""c":{"dtype":"BOOL","shape":[0],"data_offsets":[6,6]}}"#
        );
        let mut bytes = file_with_header(header, 0);
        bytes.extend_from_slice(&(-5i32).to_le_bytes());
        bytes.extend_from_slice(&0x3c00u16.to_le_bytes());
        let (tensors, metadata) = parse(&bytes).unwrap();
        assert!(metadata.is_empty());
        let names: Vec<_> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(tensors[0].data, TensorData::I64(vec![-5]));
        assert_eq!(tensors[1].data, TensorData::F32(vec![1.0]));
        assert_eq!(tensors[2].data, TensorData::I64(vec![]));
    }
}
