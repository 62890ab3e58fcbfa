//! PyTorch checkpoints written by `torch.save`, read without running any of their code:
//! - the zip format (torch ≥ 1.6): `<prefix>/data.pkl`, a pickle whose tensors name their
//!   storages by persistent ids, and one stored record `<prefix>/data/<key>` per storage;
//! - the legacy format: pickles of a magic number, the protocol version and system info, then
//!   the object, then the list of storage keys, then each storage as an 8-byte element count
//!   followed by its raw elements.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;

use super::pickle::{self, Dict, Global, StorageRef, TensorRef, Value};
use super::{to_usize, ByteReader, DType, IoError, RawTensor, TensorData};

/// The legacy format's first pickle: the int 0x1950a86a20f9469cfc6c, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;

/// Keys under which a training checkpoint keeps the state dict, in order of preference.
const STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model_state_dict", "model"];

/// Reads the state dict of a `torch.save` file: a dict of tensors, or a checkpoint dict holding
/// one under `state_dict`, `model_state_dict` or `model`. Tensors come in the dict's order;
/// nested dicts of tensors are flattened with '.'-joined names.
pub fn read_pth(path: &Path) -> Result<Vec<RawTensor>, IoError> {
    let bytes = std::fs::read(path).map_err(|e| IoError::new(path, format!("cannot read: {e}")))?;
    let result = if bytes.starts_with(b"PK\x03\x04") {
        read_zip(&bytes)
    } else if bytes.first() == Some(&0x80) {
        read_legacy(&bytes)
    } else if bytes.get(257..262) == Some(b"ustar") {
        Err(
            "the tar format of torch < 0.4 is not supported; re-save the file with a newer torch"
                .into(),
        )
    } else {
        Err("not a PyTorch checkpoint: neither a zip archive nor a pickle".into())
    };
    result.map_err(|m| IoError::new(path, m))
}

fn read_zip(bytes: &[u8]) -> Result<Vec<RawTensor>, String> {
    let entries = zip_entries(bytes)?;
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut pickles = entries.iter().filter(|e| {
        e.name == "data.pkl"
            || e.name
                .strip_suffix("/data.pkl")
                .is_some_and(|prefix| !prefix.contains('/'))
    });
    let pkl = pickles
        .next()
        .ok_or("zip archive without a data.pkl record: not written by torch.save")?;
    if let Some(other) = pickles.next() {
        return Err(format!(
            "zip archive with two pickles, {:?} and {:?}",
            pkl.name, other.name
        ));
    }
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let big_endian = match by_name.get(format!("{prefix}byteorder").as_str()) {
        None => false,
        Some(e) => match entry_data(bytes, e)? {
            b"little" => false,
            b"big" => true,
            other => {
                return Err(format!(
                    "unknown byte order {:?}",
                    String::from_utf8_lossy(other)
                ))
            }
        },
    };
    let mut pos = 0;
    let root = pickle::load(entry_data(bytes, pkl)?, &mut pos, &mut storage_from_pid)
        .map_err(|e| format!("{}: {e}", pkl.name))?;
    build_tensors(&root, big_endian, |key| {
        let record = format!("{prefix}data/{key}");
        let e = by_name
            .get(record.as_str())
            .ok_or_else(|| format!("storage record {record:?} is missing"))?;
        entry_data(bytes, e)
    })
}

fn read_legacy(bytes: &[u8]) -> Result<Vec<RawTensor>, String> {
    let mut pos = 0;
    let mut no_ids = |_: Value| Err("unexpected persistent id".to_string());
    let magic = pickle::load(bytes, &mut pos, &mut no_ids)
        .map_err(|e| format!("not a PyTorch checkpoint: {e}"))?;
    if !matches!(&magic, Value::BigInt(m) if **m == LEGACY_MAGIC) {
        return Err("not a PyTorch checkpoint: a pickle without torch's magic number".into());
    }
    match pickle::load(bytes, &mut pos, &mut no_ids)? {
        Value::Int(LEGACY_PROTOCOL) => {}
        v => return Err(format!("unsupported legacy protocol version {v:?}")),
    }
    let big_endian = match pickle::load(bytes, &mut pos, &mut no_ids)? {
        Value::Dict(d) => matches!(d.borrow().get("little_endian"), Some(Value::Bool(false))),
        v => return Err(format!("system info is a {}, not a dict", v.kind())),
    };

    // The storages' element types are known only from the persistent ids in the object.
    let mut dtypes: HashMap<String, DType> = HashMap::new();
    let root = pickle::load(bytes, &mut pos, &mut |pid| {
        let v = storage_from_pid(pid)?;
        if let Value::Storage(s) = &v {
            let dtype = *dtypes.entry(s.key.clone()).or_insert(s.dtype);
            if dtype != s.dtype {
                return Err(format!(
                    "storage {:?} used as both {} and {}",
                    s.key,
                    dtype.name(),
                    s.dtype.name()
                ));
            }
        }
        Ok(v)
    })?;

    let keys = pickle::load(bytes, &mut pos, &mut no_ids)?;
    let keys = keys
        .items()
        .ok_or_else(|| format!("storage keys are a {}, not a list", keys.kind()))?;
    let mut r = ByteReader::new(bytes, pos);
    let mut storages: HashMap<String, &[u8]> = HashMap::with_capacity(keys.len());
    for key in &keys {
        let key = key.as_str().ok_or("a storage key is not a string")?;
        let dtype = dtypes
            .get(key)
            .ok_or_else(|| format!("storage {key:?} is stored but no tensor uses it"))?;
        let count = r.array::<8>()?;
        let count = if big_endian {
            u64::from_be_bytes(count)
        } else {
            u64::from_le_bytes(count)
        };
        let nbytes = to_usize(count, "storage size")?
            .checked_mul(dtype.size())
            .ok_or_else(|| format!("storage {key:?}: {count} elements is too many"))?;
        let data = r
            .take(nbytes)
            .map_err(|e| format!("storage {key:?}: {e} (truncated file?)"))?;
        storages.insert(key.to_string(), data);
    }
    build_tensors(&root, big_endian, |key| {
        storages
            .get(key)
            .copied()
            .ok_or_else(|| format!("storage {key:?} is not in the file"))
    })
}

/// A persistent id `('storage', storage_type, key, location, numel[, view_metadata])` as a
/// storage reference; the legacy format's optional view metadata is `(view_key, offset, size)`.
fn storage_from_pid(pid: Value) -> Result<Value, String> {
    let items = pid
        .items()
        .ok_or_else(|| format!("persistent id is a {}, not a tuple", pid.kind()))?;
    match items.as_slice() {
        [tag, ty, key, _location, _numel, view @ ..]
            if tag.as_str() == Some("storage") && view.len() <= 1 =>
        {
            let Value::Global(Global::Storage(dtype)) = ty else {
                return Err(format!(
                    "storage type is a {}, not a torch storage class",
                    ty.kind()
                ));
            };
            let key = key
                .as_str()
                .ok_or("storage key is not a string")?
                .to_string();
            let elem_offset = match view.first() {
                None | Some(Value::None) => 0,
                Some(view) => match view.items().as_deref() {
                    Some([_view_key, Value::Int(offset), _size]) => usize::try_from(*offset)
                        .map_err(|_| format!("storage view offset {offset} is negative"))?,
                    _ => return Err("malformed storage view".into()),
                },
            };
            Ok(Value::Storage(Rc::new(StorageRef {
                key,
                dtype: *dtype,
                elem_offset,
            })))
        }
        [tag, ..] if tag.as_str() == Some("module") => Err(
            "the file holds a pickled nn.Module rather than a state dict; save model.state_dict()"
                .into(),
        ),
        _ => Err("unsupported persistent id".into()),
    }
}

/// The tensors of the state dict in `root`, with their data from `storage(key)`.
fn build_tensors<'a>(
    root: &Value,
    big_endian: bool,
    storage: impl Fn(&str) -> Result<&'a [u8], String>,
) -> Result<Vec<RawTensor>, String> {
    let tensors = state_dict_tensors(root)?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            let bytes = storage(&t.storage.key).map_err(|m| format!("tensor {name:?}: {m}"))?;
            materialize(name, &t, bytes, big_endian)
        })
        .collect()
}

/// Finds the dict of tensors and lists it in order, nested dicts flattened with '.'.
fn state_dict_tensors(root: &Value) -> Result<Vec<(String, Rc<TensorRef>)>, String> {
    let Value::Dict(mut dict) = root.clone() else {
        return Err(format!(
            "the file holds a {}, not a dict of tensors",
            root.kind()
        ));
    };
    // A checkpoint may wrap it more than once ({"model": {"state_dict": ...}}); a few levels
    // are plenty and keep a self-referencing pickle from looping.
    for _ in 0..4 {
        let inner = {
            let d = dict.borrow();
            STATE_DICT_KEYS.iter().find_map(|k| match d.get(k) {
                Some(Value::Dict(inner)) => Some(inner.clone()),
                _ => None,
            })
        };
        match inner {
            Some(inner) => dict = inner,
            None => break,
        }
    }
    let mut out = Vec::new();
    flatten(&dict.borrow(), "", 0, &mut out)?;
    let mut seen = HashSet::with_capacity(out.len());
    if let Some((name, _)) = out.iter().find(|(name, _)| !seen.insert(name.as_str())) {
        return Err(format!("tensor {name:?} appears twice"));
    }
    Ok(out)
}

fn flatten(
    dict: &Dict,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, Rc<TensorRef>)>,
) -> Result<(), String> {
    if depth > 16 {
        return Err(format!("dicts nested too deeply at {prefix:?}"));
    }
    for (key, value) in &dict.entries {
        let key = key
            .as_str()
            .ok_or_else(|| format!("a state dict key under {prefix:?} is a {}", key.kind()))?;
        let name = format!("{prefix}{key}");
        match value {
            Value::Tensor(t) => out.push((name, t.clone())),
            Value::Dict(inner) => flatten(&inner.borrow(), &format!("{name}."), depth + 1, out)?,
            v => {
                return Err(format!(
                    "state dict entry {name:?} is a {}, not a tensor",
                    v.kind()
                ))
            }
        }
    }
    Ok(())
}

/// Copies a tensor's elements out of its storage, in row-major order, widened.
fn materialize(
    name: String,
    t: &TensorRef,
    storage: &[u8],
    big_endian: bool,
) -> Result<RawTensor, String> {
    let dtype = t.storage.dtype;
    let key = &t.storage.key;
    let size = dtype.size();
    let fail = |m: String| format!("tensor {name:?}: {m}");
    if !storage.len().is_multiple_of(size) {
        return Err(fail(format!(
            "storage {key:?} has {} bytes, not whole {} elements",
            storage.len(),
            dtype.name()
        )));
    }
    let storage_len = storage.len() / size;
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let base = t.storage.elem_offset.checked_add(t.offset);
    // One past the furthest element the view touches.
    let span = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(1usize, |acc, (&n, &s)| {
            n.saturating_sub(1)
                .checked_mul(s)
                .and_then(|x| acc.checked_add(x))
        });
    let (Some(numel), Some(base), Some(span)) = (numel, base, span) else {
        return Err(fail(format!(
            "size {:?} with stride {:?} overflows",
            t.shape, t.stride
        )));
    };
    if numel == 0 {
        let data = if dtype.is_float() {
            TensorData::F32(Vec::new())
        } else {
            TensorData::I64(Vec::new())
        };
        return Ok(RawTensor {
            name,
            shape: t.shape.clone(),
            data,
        });
    }
    let end = base.checked_add(span).filter(|&end| end <= storage_len).ok_or_else(|| {
        fail(format!(
            "view at offset {base} with size {:?} and stride {:?} leaves storage {key:?} of {storage_len} elements",
            t.shape, t.stride
        ))
    })?;
    let data = dtype.decode(&storage[base * size..end * size], big_endian);
    let data = if is_row_major(&t.shape, &t.stride) {
        data
    } else {
        match data {
            TensorData::F32(v) => TensorData::F32(gather(&v, &t.shape, &t.stride)),
            TensorData::I64(v) => TensorData::I64(gather(&v, &t.shape, &t.stride)),
        }
    };
    Ok(RawTensor {
        name,
        shape: t.shape.clone(),
        data,
    })
}

/// Whether strides are those of a dense row-major layout (size-1 dimensions can have any).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// The elements of a strided view of `src` (which starts at the view's first element), in
/// row-major order. The caller has checked every index lies inside `src`.
fn gather<T: Copy>(src: &[T], shape: &[usize], stride: &[usize]) -> Vec<T> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel);
    let mut index = vec![0usize; shape.len()];
    let mut at = 0usize;
    for _ in 0..numel {
        out.push(src[at]);
        // Odometer step: bump the last dimension, carrying into earlier ones.
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            at += stride[d];
            if index[d] < shape[d] {
                break;
            }
            at -= stride[d] * shape[d];
            index[d] = 0;
        }
    }
    out
}

/// One entry of a zip central directory.
struct ZipEntry {
    name: String,
    flags: u16,
    method: u16,
    compressed_size: u64,
    size: u64,
    header_offset: u64,
}

/// The central directory of a zip archive, zip64 records and extra fields included.
fn zip_entries(b: &[u8]) -> Result<Vec<ZipEntry>, String> {
    let corrupt = |e: String| format!("corrupt zip archive: {e}");
    // The end record is the last thing in the file, followed only by a comment of ≤ 64 KiB.
    let first = b.len().saturating_sub(22 + 0xffff);
    let eocd = (first..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| b[i..].starts_with(b"PK\x05\x06"))
        .ok_or("zip archive without an end-of-central-directory record (truncated file?)")?;
    let mut r = ByteReader::new(b, eocd + 10);
    let count16 = r.u16().map_err(corrupt)?;
    let size32 = r.u32().map_err(corrupt)?;
    let offset32 = r.u32().map_err(corrupt)?;
    let (mut count, mut cd_offset) = (u64::from(count16), u64::from(offset32));
    if count16 == 0xffff || size32 == 0xffff_ffff || offset32 == 0xffff_ffff {
        // Zip64: a locator right before the end record points at the zip64 end record.
        let locator = eocd
            .checked_sub(20)
            .filter(|&l| b[l..].starts_with(b"PK\x06\x07"))
            .ok_or("zip64 archive without its zip64 end-of-central-directory locator")?;
        let record = to_usize(
            ByteReader::new(b, locator + 8).u64()?,
            "zip64 record offset",
        )?;
        if !b
            .get(record..)
            .is_some_and(|s| s.starts_with(b"PK\x06\x06"))
        {
            return Err(
                "zip64 end-of-central-directory record not found where its locator points".into(),
            );
        }
        let mut r = ByteReader::new(b, record + 32);
        count = r.u64().map_err(corrupt)?;
        r.u64().map_err(corrupt)?; // directory size
        cd_offset = r.u64().map_err(corrupt)?;
    }

    let mut r = ByteReader::new(b, to_usize(cd_offset, "central directory offset")?);
    let mut entries = Vec::with_capacity(count.min(1 << 16) as usize);
    for i in 0..count {
        let entry = zip_entry(&mut r)
            .map_err(|e| format!("corrupt zip central directory entry {i}: {e}"))?;
        entries.push(entry);
    }
    Ok(entries)
}

fn zip_entry(r: &mut ByteReader) -> Result<ZipEntry, String> {
    if &r.array::<4>()? != b"PK\x01\x02" {
        return Err("bad signature".into());
    }
    r.take(4)?; // versions
    let flags = r.u16()?;
    let method = r.u16()?;
    r.take(8)?; // time, date, crc
    let mut compressed_size = u64::from(r.u32()?);
    let mut size = u64::from(r.u32()?);
    let name_len = r.u16()?;
    let extra_len = r.u16()?;
    let comment_len = r.u16()?;
    r.take(8)?; // disk, attributes
    let mut header_offset = u64::from(r.u32()?);
    let name = String::from_utf8_lossy(r.take(name_len.into())?).into_owned();
    let mut extra = ByteReader::new(r.take(extra_len.into())?, 0);
    r.take(comment_len.into())?;
    // The zip64 extra field holds, in this order, each 32-bit field that is saturated.
    while extra.pos + 4 <= extra.bytes.len() {
        let id = extra.u16()?;
        let len = extra.u16()?;
        let mut field = ByteReader::new(extra.take(len.into())?, 0);
        if id == 1 {
            for value in [&mut size, &mut compressed_size, &mut header_offset] {
                if *value == 0xffff_ffff {
                    *value = field.u64()?;
                }
            }
        }
    }
    Ok(ZipEntry {
        name,
        flags,
        method,
        compressed_size,
        size,
        header_offset,
    })
}

/// The bytes of a stored zip entry.
fn entry_data<'a>(b: &'a [u8], e: &ZipEntry) -> Result<&'a [u8], String> {
    if e.flags & 1 != 0 {
        return Err(format!("zip record {:?} is encrypted", e.name));
    }
    if e.method != 0 {
        let how = if e.method == 8 {
            "deflate"
        } else {
            "an unknown method"
        };
        return Err(format!(
            "zip record {:?} is compressed ({how}, method {}); only stored records, as torch.save writes them, \
             can be read: re-save the file with torch.save",
            e.name, e.method
        ));
    }
    if e.compressed_size != e.size {
        return Err(format!(
            "zip record {:?}: stored with two different sizes",
            e.name
        ));
    }
    let fail = |m: String| format!("zip record {:?}: {m}", e.name);
    let mut r = ByteReader::new(b, to_usize(e.header_offset, "record offset").map_err(fail)?);
    if &r.array::<4>().map_err(fail)? != b"PK\x03\x04" {
        return Err(fail("bad local header signature".into()));
    }
    r.take(22).map_err(fail)?;
    let skip = usize::from(r.u16().map_err(fail)?) + usize::from(r.u16().map_err(fail)?);
    r.take(skip).map_err(fail)?;
    r.take(to_usize(e.size, "record size").map_err(fail)?)
        .map_err(|m| fail(format!("data {m} (truncated file?)")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/io")
            .join(name)
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("effnet-io-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).expect("write temp file");
        path
    }

    /// A zip archive of stored records, laid out as torch writes it; with `zip64` every size
    /// and offset goes through zip64 extra fields and end records.
    fn make_zip(records: &[(String, Vec<u8>)], zip64: bool, method: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in records {
            let offset = out.len() as u64;
            let len = data.len() as u64;
            let (extra, size32, offset32) = if zip64 {
                let mut extra = vec![1, 0, 24, 0];
                for v in [len, len, offset] {
                    extra.extend_from_slice(&v.to_le_bytes());
                }
                (extra, 0xffff_ffffu32, 0xffff_ffffu32)
            } else {
                (Vec::new(), len as u32, offset as u32)
            };
            out.extend_from_slice(b"PK\x03\x04\x2d\x00\x00\x00");
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&size32.to_le_bytes());
            out.extend_from_slice(&size32.to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&extra);
            out.extend_from_slice(data);

            central.extend_from_slice(b"PK\x01\x02\x2d\x00\x2d\x00\x00\x00");
            central.extend_from_slice(&method.to_le_bytes());
            central.extend_from_slice(&[0; 8]);
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 10]); // comment length, disk, attributes
            central.extend_from_slice(&offset32.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            central.extend_from_slice(&extra);
        }
        let cd_offset = out.len() as u64;
        let n = records.len() as u64;
        out.extend_from_slice(&central);
        if zip64 {
            let record = out.len() as u64;
            out.extend_from_slice(b"PK\x06\x06");
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[0x2d, 0, 0x2d, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            for v in [n, n, central.len() as u64, cd_offset] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(b"PK\x06\x07\x00\x00\x00\x00");
            out.extend_from_slice(&record.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x00\x00");
        } else {
            out.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00");
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&(central.len() as u32).to_le_bytes());
            out.extend_from_slice(&(cd_offset as u32).to_le_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        out
    }

    /// The records of a fixture archive.
    fn records(name: &str) -> Vec<(String, Vec<u8>)> {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let entries = zip_entries(&bytes).unwrap();
        entries
            .iter()
            .map(|e| (e.name.clone(), entry_data(&bytes, e).unwrap().to_vec()))
            .collect()
    }

    #[test]
    fn zip64_archive_reads_like_the_original() {
        let original = read_pth(&fixture("small.pth")).unwrap();
        let recs = records("small.pth");
        assert!(recs.iter().any(|(n, _)| n == "small/data.pkl"));
        for zip64 in [false, true] {
            let path = temp_file(&format!("zip64-{zip64}.pth"), &make_zip(&recs, zip64, 0));
            assert_eq!(read_pth(&path).unwrap(), original, "zip64 = {zip64}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn compressed_and_broken_archives_are_errors() {
        let recs = records("small.pth");
        let path = temp_file("deflated.pth", &make_zip(&recs, false, 8));
        let err = read_pth(&path).unwrap_err();
        assert!(err.message.starts_with("zip record \"small/"), "{err}");
        assert!(
            err.message.contains("is compressed (deflate, method 8)"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();

        let missing: Vec<_> = recs
            .iter()
            .filter(|(n, _)| n != "small/data/1")
            .cloned()
            .collect();
        let path = temp_file("missing.pth", &make_zip(&missing, false, 0));
        let err = read_pth(&path).unwrap_err();
        assert_eq!(
            err.message,
            "tensor \"fc.weight\": storage record \"small/data/1\" is missing"
        );
        std::fs::remove_file(&path).unwrap();

        let bytes = std::fs::read(fixture("small.pth")).unwrap();
        let path = temp_file("cut.pth", &bytes[..bytes.len() - 30]);
        assert!(read_pth(&path)
            .unwrap_err()
            .message
            .contains("without an end-of-central-directory record"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn truncated_legacy_file_names_the_storage() {
        let bytes = std::fs::read(fixture("small_legacy.pth")).unwrap();
        let path = temp_file("cut_legacy.pth", &bytes[..bytes.len() - 4]);
        let err = read_pth(&path).unwrap_err();
        assert!(
            err.message.starts_with("storage \"") && err.message.contains("truncated file?"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();

        let path = temp_file("not_torch.pth", b"\x80\x02K\x01.");
        assert!(read_pth(&path)
            .unwrap_err()
            .message
            .contains("without torch's magic number"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn forbidden_global_in_a_checkpoint_is_rejected() {
        // A legacy header followed by an object pickle that calls os.system.
        let mut bytes = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.\x80\x02}.".to_vec();
        let object_at = bytes.len();
        bytes.extend_from_slice(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R.");
        let path = temp_file("evil.pth", &bytes);
        let err = read_pth(&path).unwrap_err();
        assert!(
            err.message.contains("global os.system is not allowed"),
            "{err}"
        );
        assert!(
            err.message
                .contains(&format!("pickle byte {}", object_at + 2)),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn strided_views() {
        assert!(is_row_major(&[2, 3], &[3, 1]));
        assert!(is_row_major(&[2, 1, 3], &[3, 99, 1]));
        assert!(!is_row_major(&[3, 3], &[1, 3]));
        let src: Vec<i32> = (0..12).collect();
        assert_eq!(
            gather(&src, &[4, 3], &[1, 4]),
            [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
        );
        assert_eq!(gather(&src, &[2, 2], &[6, 2]), [0, 2, 6, 8]);
        assert_eq!(gather(&src, &[], &[]), [0]);
        // A broadcast (stride 0) dimension repeats elements.
        assert_eq!(gather(&src, &[2, 3], &[0, 1]), [0, 1, 2, 0, 1, 2]);
    }
}
