//! TFRecord files in the ImageNet layout of the reference (TF-slim / `imagenet_to_gcs.py`):
//! record framing with masked CRC-32C, a minimal `tf.train.Example` codec for the features the
//! reference parses, shard naming (`train-00000-of-01024`) and writing shards from image files.
//!
//! Framing of one record: `u64 length (LE) | u32 masked_crc32c(length bytes) | data |
//! u32 masked_crc32c(data)`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------
// CRC-32C

/// Reflected Castagnoli polynomial (0x1EDC6F41 bit-reversed).
const CASTAGNOLI: u32 = 0x82F6_3B78;

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CASTAGNOLI
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32C (Castagnoli) of `data`, as TensorFlow's `crc32c::Value`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TensorFlow's masked CRC: a CRC stored next to the data it covers is rotated and offset so
/// that a CRC of data that itself contains CRCs stays well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    // TF's `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

// ---------------------------------------------------------------------------------------------
// Reading and writing records

/// Streams the records of one TFRecord file, checking both CRCs of each. After the first error
/// (corrupt or truncated record) the iterator ends: the framing cannot be resynchronized.
pub struct TfRecordReader {
    path: PathBuf,
    reader: BufReader<File>,
    file_len: u64,
    /// Byte offset of the next record.
    offset: u64,
    done: bool,
}

impl TfRecordReader {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, String> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file_len = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        Ok(Self {
            path,
            reader: BufReader::with_capacity(1 << 20, file),
            file_len,
            offset: 0,
            done: false,
        })
    }

    /// A reader positioned at `offset`, a record boundary found by an earlier pass (see
    /// [`TfRecordReader::offset`]): random access to one record.
    pub fn open_at(path: impl AsRef<Path>, offset: u64) -> Result<Self, String> {
        let mut r = Self::open(path)?;
        r.reader
            .seek(SeekFrom::Start(offset))
            .map_err(|e| format!("{}: {e}", r.path.display()))?;
        r.offset = offset;
        Ok(r)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Byte offset in the file of the record the next call to `next` reads.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn error(&self, what: impl std::fmt::Display) -> String {
        format!(
            "{}: record at byte offset {}: {what}",
            self.path.display(),
            self.offset
        )
    }

    fn read_record(&mut self) -> Result<Option<Vec<u8>>, String> {
        let mut header = [0u8; 12];
        let got = read_full(&mut self.reader, &mut header)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if got == 0 {
            return Ok(None);
        }
        if got < header.len() {
            return Err(self.error(format!(
                "truncated: {got} of the 12 header bytes, the file ends at byte {}",
                self.file_len
            )));
        }
        let len_bytes: [u8; 8] = header[..8].try_into().expect("8 bytes");
        let stored = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
        let computed = masked_crc32c(&len_bytes);
        if stored != computed {
            return Err(self.error(format!(
                "length CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let len = u64::from_le_bytes(len_bytes);
        // The length CRC matched, so a length past the end of the file means a truncated file;
        // checking before allocating keeps a cut file from asking for absurd memory.
        let end = self.offset.saturating_add(16).saturating_add(len);
        if end > self.file_len {
            return Err(self.error(format!(
                "truncated: the record needs {len} data bytes plus its CRC (to byte {end}), \
                 the file ends at byte {}",
                self.file_len
            )));
        }
        let len = usize::try_from(len).map_err(|_| self.error("record too large"))?;
        let mut data = vec![0u8; len];
        let mut crc = [0u8; 4];
        let got_data = read_full(&mut self.reader, &mut data).map_err(|e| self.error(e))?;
        let got_crc = read_full(&mut self.reader, &mut crc).map_err(|e| self.error(e))?;
        if got_data < len || got_crc < crc.len() {
            return Err(self.error("truncated: the file shrank while being read"));
        }
        let stored = u32::from_le_bytes(crc);
        let computed = masked_crc32c(&data);
        if stored != computed {
            return Err(self.error(format!(
                "data CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        self.offset = end;
        Ok(Some(data))
    }
}

impl Iterator for TfRecordReader {
    type Item = Result<Vec<u8>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read_record() {
            Ok(Some(data)) => Some(Ok(data)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Decodes every record of a TFRecord file as a `tf.train.Example`; an error names the file
/// and the record's byte offset.
pub fn read_examples(path: impl AsRef<Path>) -> Result<Vec<Example>, String> {
    let mut reader = TfRecordReader::open(path)?;
    let mut out = Vec::new();
    loop {
        let offset = reader.offset();
        match reader.next() {
            None => return Ok(out),
            Some(record) => {
                let example = decode_example(&record?).map_err(|e| {
                    format!(
                        "{}: record at byte offset {offset}: {e}",
                        reader.path().display()
                    )
                })?;
                out.push(example);
            }
        }
    }
}

/// Writes a TFRecord file atomically: records go to a hidden temporary file in the same folder,
/// renamed to `path` by `finish`. Dropped without `finish`, it removes the temporary file.
pub struct TfRecordWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    records: usize,
}

impl TfRecordWriter {
    pub fn create(path: impl AsRef<Path>) -> Result<Self, String> {
        let path = path.as_ref().to_path_buf();
        let name = path
            .file_name()
            .ok_or_else(|| format!("{}: not a file name", path.display()))?;
        // Same folder, so that the rename is atomic (no cross-device move).
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        Ok(Self {
            path,
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            records: 0,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), String> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| format!("{}: writer already finished", self.path.display()))?;
        let len = (data.len() as u64).to_le_bytes();
        out.write_all(&len)
            .and_then(|_| out.write_all(&masked_crc32c(&len).to_le_bytes()))
            .and_then(|_| out.write_all(data))
            .and_then(|_| out.write_all(&masked_crc32c(data).to_le_bytes()))
            .map_err(|e| format!("{}: {e}", self.tmp.display()))?;
        self.records += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place; returns the number of records.
    pub fn finish(mut self) -> Result<usize, String> {
        let out = self
            .out
            .take()
            .ok_or_else(|| format!("{}: writer already finished", self.path.display()))?;
        let result = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .map_err(|e| format!("{}: {e}", self.tmp.display()))
            .and_then(|_| {
                std::fs::rename(&self.tmp, &self.path).map_err(|e| {
                    format!(
                        "{}: cannot rename {} into place: {e}",
                        self.path.display(),
                        self.tmp.display()
                    )
                })
            });
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result.map(|_| self.records)
    }
}

impl Drop for TfRecordWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tf.train.Example

/// One ImageNet-layout example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Encoded image bytes (`image/encoded`), JPEG or PNG as stored.
    pub image: Vec<u8>,
    /// `image/class/label`: 1-based in the ImageNet layout (the reference subtracts 1).
    pub label: i64,
    /// `image/class/text`, when known.
    pub text: Option<String>,
}

pub const KEY_ENCODED: &str = "image/encoded";
pub const KEY_FORMAT: &str = "image/format";
pub const KEY_LABEL: &str = "image/class/label";
pub const KEY_TEXT: &str = "image/class/text";

/// `image/format` value from the image's magic bytes, or `None` when neither JPEG nor PNG.
pub fn image_format(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("jpeg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else {
        None
    }
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, ((field as u64) << 3) | WIRE_LEN as u64);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Features.feature` map entry: key (field 1), `Feature` (field 2).
fn put_feature(features: &mut Vec<u8>, key: &str, feature: &[u8]) {
    let mut entry = Vec::with_capacity(key.len() + feature.len() + 8);
    put_len_field(&mut entry, 1, key.as_bytes());
    put_len_field(&mut entry, 2, feature);
    put_len_field(features, 1, &entry);
}

fn bytes_feature(value: &[u8]) -> Vec<u8> {
    let mut list = Vec::with_capacity(value.len() + 8);
    put_len_field(&mut list, 1, value);
    let mut feature = Vec::with_capacity(list.len() + 8);
    put_len_field(&mut feature, 1, &list); // Feature.bytes_list
    feature
}

fn int64_feature(value: i64) -> Vec<u8> {
    let mut packed = Vec::new();
    put_varint(&mut packed, value as u64); // int64: two's complement as u64
    let mut list = Vec::new();
    put_len_field(&mut list, 1, &packed); // packed repeated, as TF writes it
    let mut feature = Vec::new();
    put_len_field(&mut feature, 3, &list); // Feature.int64_list
    feature
}

/// Serializes a `tf.train.Example` with `image/encoded`, `image/class/label`, `image/format`
/// (when the bytes are JPEG or PNG) and `image/class/text` (when known).
pub fn encode_example(example: &Example) -> Vec<u8> {
    let mut features = Vec::with_capacity(example.image.len() + 128);
    put_feature(&mut features, KEY_ENCODED, &bytes_feature(&example.image));
    if let Some(format) = image_format(&example.image) {
        put_feature(&mut features, KEY_FORMAT, &bytes_feature(format.as_bytes()));
    }
    put_feature(&mut features, KEY_LABEL, &int64_feature(example.label));
    if let Some(text) = &example.text {
        put_feature(&mut features, KEY_TEXT, &bytes_feature(text.as_bytes()));
    }
    let mut out = Vec::with_capacity(features.len() + 8);
    put_len_field(&mut out, 1, &features); // Example.features
    out
}

/// A protobuf reader over one message's bytes; every read is bounds-checked.
struct Wire<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Wire<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(format!("varint overflows 64 bits at byte {}", self.pos - 1));
            }
            v |= ((b & 0x7F) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "field of {n} bytes at byte {} runs past the end ({} bytes)",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// Next field's (number, wire type).
    fn tag(&mut self) -> Result<(u64, u8), String> {
        let at = self.pos;
        let tag = self.varint()?;
        let field = tag >> 3;
        let wire = (tag & 7) as u8;
        if field == 0 {
            return Err(format!("field number 0 at byte {at}"));
        }
        if !matches!(wire, WIRE_VARINT | WIRE_FIXED64 | WIRE_LEN | WIRE_FIXED32) {
            return Err(format!("unsupported wire type {wire} at byte {at}"));
        }
        Ok((field, wire))
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| format!("length {n} too large"))?;
        self.take(n)
    }

    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            WIRE_VARINT => self.varint().map(|_| ()),
            WIRE_FIXED64 => self.take(8).map(|_| ()),
            WIRE_LEN => self.len_delimited().map(|_| ()),
            WIRE_FIXED32 => self.take(4).map(|_| ()),
            _ => Err(format!("unsupported wire type {wire}")),
        }
    }
}

/// The `kind` oneof of a `tf.train.Feature`.
#[derive(Debug, Default)]
enum FeatureValue<'a> {
    #[default]
    Empty,
    Bytes(Vec<&'a [u8]>),
    Floats,
    Int64(Vec<i64>),
}

impl FeatureValue<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Bytes(_) => "bytes_list",
            Self::Floats => "float_list",
            Self::Int64(_) => "int64_list",
        }
    }
}

fn parse_feature(buf: &[u8]) -> Result<FeatureValue<'_>, String> {
    let mut w = Wire::new(buf);
    let mut value = FeatureValue::Empty;
    while !w.at_end() {
        let (field, wire) = w.tag()?;
        // Members of a oneof: the last one present wins, as in protobuf parsing.
        match (field, wire) {
            (1, WIRE_LEN) => {
                let mut list = Wire::new(w.len_delimited()?);
                let mut values = Vec::new();
                while !list.at_end() {
                    match list.tag()? {
                        (1, WIRE_LEN) => values.push(list.len_delimited()?),
                        (_, wire) => list.skip(wire)?,
                    }
                }
                value = FeatureValue::Bytes(values);
            }
            (2, WIRE_LEN) => {
                let mut list = Wire::new(w.len_delimited()?);
                while !list.at_end() {
                    let (_, wire) = list.tag()?;
                    list.skip(wire)?;
                }
                value = FeatureValue::Floats;
            }
            (3, WIRE_LEN) => {
                let mut list = Wire::new(w.len_delimited()?);
                let mut values = Vec::new();
                while !list.at_end() {
                    match list.tag()? {
                        // Packed (what TF writes) and unpacked encodings are both valid.
                        (1, WIRE_LEN) => {
                            let mut packed = Wire::new(list.len_delimited()?);
                            while !packed.at_end() {
                                values.push(packed.varint()? as i64);
                            }
                        }
                        (1, WIRE_VARINT) => values.push(list.varint()? as i64),
                        (_, wire) => list.skip(wire)?,
                    }
                }
                value = FeatureValue::Int64(values);
            }
            (1..=3, wire) => {
                return Err(format!(
                    "Feature field {field} has wire type {wire}, expected 2"
                ))
            }
            (_, wire) => w.skip(wire)?,
        }
    }
    Ok(value)
}

/// Parses a serialized `tf.train.Example`, keeping `image/encoded`, `image/class/label` and
/// `image/class/text` and skipping every other field and feature. The two first are required,
/// with exactly one value each, as the reference's `FixedLenFeature([], ...)`.
pub fn decode_example(bytes: &[u8]) -> Result<Example, String> {
    let mut image = None;
    let mut label = None;
    let mut text = None;
    let mut w = Wire::new(bytes);
    while !w.at_end() {
        match w.tag()? {
            (1, WIRE_LEN) => {
                let mut features = Wire::new(w.len_delimited()?);
                while !features.at_end() {
                    match features.tag()? {
                        (1, WIRE_LEN) => {
                            let (key, feature) = parse_map_entry(features.len_delimited()?)?;
                            match key {
                                KEY_ENCODED => image = Some(feature),
                                KEY_LABEL => label = Some(feature),
                                KEY_TEXT => text = Some(feature),
                                _ => {}
                            }
                        }
                        (_, wire) => features.skip(wire)?,
                    }
                }
            }
            (_, wire) => w.skip(wire)?,
        }
    }
    let image = match image {
        Some(FeatureValue::Bytes(v)) if v.len() == 1 => v[0].to_vec(),
        Some(FeatureValue::Bytes(v)) => {
            return Err(format!("{KEY_ENCODED} has {} values, expected 1", v.len()))
        }
        Some(other) => {
            return Err(format!(
                "{KEY_ENCODED} is a {}, expected a bytes_list",
                other.kind()
            ))
        }
        None => return Err(format!("no {KEY_ENCODED} feature")),
    };
    let label = match label {
        Some(FeatureValue::Int64(v)) if v.len() == 1 => v[0],
        Some(FeatureValue::Int64(v)) => {
            return Err(format!("{KEY_LABEL} has {} values, expected 1", v.len()))
        }
        Some(other) => {
            return Err(format!(
                "{KEY_LABEL} is a {}, expected an int64_list",
                other.kind()
            ))
        }
        None => return Err(format!("no {KEY_LABEL} feature")),
    };
    let text = match text {
        None | Some(FeatureValue::Empty) => None,
        Some(FeatureValue::Bytes(v)) if v.is_empty() => None,
        Some(FeatureValue::Bytes(v)) if v.len() == 1 => Some(
            String::from_utf8(v[0].to_vec())
                .map_err(|_| format!("{KEY_TEXT} is not valid UTF-8"))?,
        ),
        Some(FeatureValue::Bytes(v)) => {
            return Err(format!("{KEY_TEXT} has {} values, expected 1", v.len()))
        }
        Some(other) => {
            return Err(format!(
                "{KEY_TEXT} is a {}, expected a bytes_list",
                other.kind()
            ))
        }
    };
    Ok(Example { image, label, text })
}

/// One `Features.feature` map entry: (key, value). Missing parts take protobuf defaults.
fn parse_map_entry(buf: &[u8]) -> Result<(&str, FeatureValue<'_>), String> {
    let mut w = Wire::new(buf);
    let mut key: &[u8] = b"";
    let mut feature = FeatureValue::Empty;
    while !w.at_end() {
        match w.tag()? {
            (1, WIRE_LEN) => key = w.len_delimited()?,
            (2, WIRE_LEN) => feature = parse_feature(w.len_delimited()?)?,
            (_, wire) => w.skip(wire)?,
        }
    }
    let key = std::str::from_utf8(key).map_err(|_| "feature key is not valid UTF-8".to_string())?;
    Ok((key, feature))
}

// ---------------------------------------------------------------------------------------------
// Shards

/// `{prefix}-{index:05}-of-{count:05}`, e.g. `train-00000-of-01024`.
pub fn shard_name(prefix: &str, index: usize, count: usize) -> String {
    format!("{prefix}-{index:05}-of-{count:05}")
}

/// The files of `dir` whose names start with `split` (the reference's `{data_dir}/train*` and
/// `{data_dir}/validation*` patterns), sorted. No match is an error.
/// The suffix of the record index effnet keeps beside a shard (see `ImageDataset::tfrecords`);
/// such files (and their temporary `.tmp` versions) are not shards.
pub const INDEX_SUFFIX: &str = ".effnet-index";

pub fn list_shards(dir: &Path, split: &str) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut shards = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let index = name.ends_with(INDEX_SUFFIX) || name.ends_with(&format!("{INDEX_SUFFIX}.tmp"));
        if name.starts_with(split) && !index && path.is_file() {
            shards.push(path);
        }
    }
    if shards.is_empty() {
        return Err(format!("{}: no {split}* files", dir.display()));
    }
    shards.sort();
    Ok(shards)
}

/// Writes `samples` (image path, 0-based class index) as `shards` TFRecord files
/// `out_dir/{prefix}-{i:05}-of-{shards:05}` in the ImageNet layout: the file's bytes as they
/// are (no re-encoding), label = index + 1, `classes[index]` as `image/class/text` when
/// `classes` has it (pass `&[]` to write no text). Sample `i` goes to shard `i % shards`, so
/// that class-sorted input spreads every class over every shard. Returns the records per shard.
/// Shards are written in parallel, each atomically: after an error, the shards that finished
/// stay and the failing one leaves no file.
pub fn write_shards(
    samples: &[(PathBuf, usize)],
    classes: &[String],
    out_dir: &Path,
    prefix: &str,
    shards: usize,
) -> Result<Vec<usize>, String> {
    if shards == 0 {
        return Err(format!("{}: 0 shards requested", out_dir.display()));
    }
    if samples.len() < shards {
        return Err(format!(
            "{}: {} samples cannot fill {shards} shards (a shard would be empty)",
            out_dir.display(),
            samples.len()
        ));
    }
    if out_dir.exists() && !out_dir.is_dir() {
        return Err(format!("{}: a file, not a folder", out_dir.display()));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    (0..shards)
        .into_par_iter()
        .map(|shard| {
            let path = out_dir.join(shard_name(prefix, shard, shards));
            let mut writer = TfRecordWriter::create(&path)?;
            for (file, index) in samples.iter().skip(shard).step_by(shards) {
                let image = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
                if image_format(&image).is_none() {
                    return Err(format!("{}: neither a JPEG nor a PNG file", file.display()));
                }
                let label = i64::try_from(*index)
                    .ok()
                    .and_then(|i| i.checked_add(1))
                    .ok_or_else(|| format!("{}: label {index} too large", file.display()))?;
                let example = Example {
                    image,
                    label,
                    text: classes.get(*index).cloned(),
                };
                writer.write(&encode_example(&example))?;
            }
            writer.finish()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use effnet_engine::rng::Rng;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("effnet-tfrecord-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 zero bytes.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn masked_crc_known_values() {
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        // The same mask frames Snappy streams: this value is the one Go's snappy framing
        // writer stores for this payload.
        assert_eq!(
            masked_crc32c(b"hello frp hello frp hello frp hello frp"),
            0x8fa5_ee8f
        );
    }

    #[test]
    fn records_roundtrip() {
        let dir = tmp("roundtrip");
        let path = dir.join("r.tfrecord");
        let records: Vec<Vec<u8>> = vec![vec![], b"hello".to_vec(), vec![7u8; 100_000]];
        let mut w = TfRecordWriter::create(&path).unwrap();
        for r in &records {
            w.write(r).unwrap();
        }
        assert!(!path.exists(), "the file appears only on finish");
        assert_eq!(w.finish().unwrap(), 3);
        let back: Vec<Vec<u8>> = TfRecordReader::open(&path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, records);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let dir = tmp("dropped");
        let mut w = TfRecordWriter::create(dir.join("x")).unwrap();
        w.write(b"abc").unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn example_roundtrip() {
        let jpeg = [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3];
        for (label, text) in [(1, Some("tench".to_string())), (-5, None), (1000, None)] {
            let ex = Example {
                image: jpeg.to_vec(),
                label,
                text,
            };
            assert_eq!(decode_example(&encode_example(&ex)).unwrap(), ex);
        }
    }

    /// A TF-style Example with extra features of every kind and unknown fields of every wire
    /// type, built by hand.
    #[test]
    fn decode_skips_unknown_fields_and_features() {
        let mut features = Vec::new();
        // float_list feature (packed floats) and an unpacked int64_list feature.
        let mut floats = Vec::new();
        put_len_field(&mut floats, 1, &[0, 0, 128, 63, 0, 0, 0, 64]);
        let mut f = Vec::new();
        put_len_field(&mut f, 2, &floats);
        put_feature(&mut features, "image/object/bbox/xmin", &f);
        let mut label = Vec::new();
        put_varint(&mut label, 1 << 3); // field 1, varint: unpacked int64
        put_varint(&mut label, 42);
        let mut f = Vec::new();
        put_len_field(&mut f, 3, &label);
        put_feature(&mut features, KEY_LABEL, &f);
        put_feature(&mut features, KEY_ENCODED, &bytes_feature(b"img"));
        put_feature(&mut features, KEY_FORMAT, &bytes_feature(b"jpeg"));
        put_feature(&mut features, "image/height", &int64_feature(375));
        // Unknown fields of wire types 0, 1, 5 and 2 in Features.
        put_varint(&mut features, 7 << 3); // wire type 0
        put_varint(&mut features, 300);
        put_varint(&mut features, (8 << 3) | 1);
        features.extend_from_slice(&[1; 8]);
        put_varint(&mut features, (9 << 3) | 5);
        features.extend_from_slice(&[2; 4]);
        put_len_field(&mut features, 10, b"junk");
        let mut ex = Vec::new();
        put_len_field(&mut ex, 1, &features);
        put_varint(&mut ex, (3 << 3) | 5);
        ex.extend_from_slice(&[9; 4]);
        let got = decode_example(&ex).unwrap();
        assert_eq!(
            got,
            Example {
                image: b"img".to_vec(),
                label: 42,
                text: None
            }
        );
    }

    /// An ImageNet-style Example serialized by `protoc --encode=tensorflow.Example` from TF's
    /// `example.proto`/`feature.proto` messages, with the bbox, filename and height features of
    /// the TF-slim layout that the decoder must skip.
    #[test]
    fn decode_protoc_encoded_example() {
        let hex = concat!(
            "0a97020a160a0c696d6167652f68656967687412061a040a02f7020a260a16696d6167652f6f626a6563742f62626f78",
            "2f786d696e120c120a0a08cdcccc3d0000003f0a1b0a11696d6167652f636c6173732f6c6162656c12061a040a02c103",
            "0a210a0d696d6167652f656e636f64656412100a0e0a0cffd8ffe04a464946646174610a180a0c696d6167652f666f72",
            "6d617412080a060a044a5045470a2a0a10696d6167652f636c6173732f7465787412160a140a1274656e63682c205469",
            "6e63612074696e63610a230a18696d6167652f6f626a6563742f636c6173732f6c6162656c12071a050a03c103030a2a",
            "0a0e696d6167652f66696c656e616d6512180a160a146e30313434303736345f31303032362e4a504547",
        );
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let ex = decode_example(&bytes).unwrap();
        assert_eq!(ex.image, b"\xff\xd8\xff\xe0JFIFdata");
        assert_eq!(ex.label, 449);
        assert_eq!(ex.text.as_deref(), Some("tench, Tinca tinca"));
    }

    #[test]
    fn decode_rejects_missing_or_mistyped_features() {
        let mut features = Vec::new();
        put_feature(&mut features, KEY_ENCODED, &bytes_feature(b"img"));
        let mut ex = Vec::new();
        put_len_field(&mut ex, 1, &features);
        let e = decode_example(&ex).unwrap_err();
        assert!(e.contains("no image/class/label"), "{e}");

        put_feature(&mut features, KEY_LABEL, &bytes_feature(b"7"));
        let mut ex = Vec::new();
        put_len_field(&mut ex, 1, &features);
        let e = decode_example(&ex).unwrap_err();
        assert!(e.contains("expected an int64_list"), "{e}");

        // Wire type 3 (start group) is rejected.
        let e = decode_example(&[(1 << 3) | 3]).unwrap_err();
        assert!(e.contains("wire type 3"), "{e}");
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        let ex = Example {
            image: vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n', 5, 6],
            label: 3,
            text: Some("x".into()),
        };
        let good = encode_example(&ex);
        // Every truncation of a valid example fails cleanly (none parses to the original).
        for n in 0..good.len() {
            if let Ok(got) = decode_example(&good[..n]) {
                assert_ne!(got, ex, "prefix of {n} bytes");
            }
        }
        let mut rng = Rng::new(7);
        for _ in 0..20_000 {
            let n = rng.below(64);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            let _ = decode_example(&bytes);
            // Single-byte corruptions of a valid example.
            let mut bad = good.clone();
            let i = rng.below(bad.len());
            bad[i] = rng.next_u64() as u8;
            let _ = decode_example(&bad);
        }
    }

    #[test]
    fn shard_names() {
        assert_eq!(shard_name("train", 0, 1024), "train-00000-of-01024");
        assert_eq!(
            shard_name("validation", 127, 128),
            "validation-00127-of-00128"
        );
    }

    #[test]
    fn list_shards_by_split() {
        let dir = tmp("list");
        for name in [
            "validation-00001-of-00002",
            "train-00001-of-00002",
            "train-00000-of-00002",
            "validation-00000-of-00002",
            "other",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let names = |split| -> Vec<String> {
            list_shards(&dir, split)
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names("train"),
            ["train-00000-of-00002", "train-00001-of-00002"]
        );
        assert_eq!(
            names("validation"),
            ["validation-00000-of-00002", "validation-00001-of-00002"]
        );
        let e = list_shards(&dir, "test").unwrap_err();
        assert!(e.contains("no test* files"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
