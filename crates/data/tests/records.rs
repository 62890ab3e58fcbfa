//! TFRecord shards written from a labelled folder of real photos, read back byte for byte;
//! corrupt and truncated shards give errors naming the file and the record's offset.

use std::path::{Path, PathBuf};

use effnet_data::files::labelled_folder;
use effnet_data::tfrecord::{
    decode_example, list_shards, read_examples, write_shards, Example, TfRecordReader,
};

const PHOTOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../cli/tests/fixtures/photos");

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("effnet-records-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `root/{cat,drink,fruit}/...`: the fixture photos, one of them twice so that a class has two
/// samples.
fn labelled_photos(root: &Path) -> Vec<(String, PathBuf)> {
    let layout = [
        ("cat", "chelsea.png"),
        ("drink", "coffee.png"),
        ("fruit", "orange.jpg"),
        ("fruit", "orange.jpg"),
    ];
    let mut out = Vec::new();
    for (i, (class, photo)) in layout.iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join(format!("{i}-{photo}"));
        std::fs::copy(Path::new(PHOTOS).join(photo), &dest)
            .unwrap_or_else(|e| panic!("{PHOTOS}/{photo}: {e}"));
        out.push((class.to_string(), dest));
    }
    out
}

/// Writes the photos as 2 shards; returns the shard folder and the photos.
fn write_photo_shards(name: &str) -> (PathBuf, PathBuf, Vec<(String, PathBuf)>) {
    let base = tmp(name);
    let photos = labelled_photos(&base.join("images"));
    let folder = labelled_folder(&base.join("images")).unwrap();
    assert_eq!(folder.classes, ["cat", "drink", "fruit"]);
    let out = base.join("records");
    let counts = write_shards(&folder.samples, &folder.classes, &out, "train", 2).unwrap();
    assert_eq!(counts, [2, 2], "round-robin over 2 shards");
    (base, out, photos)
}

#[test]
fn shards_of_real_photos_read_back() {
    let (base, out, photos) = write_photo_shards("roundtrip");
    let shards = list_shards(&out, "train").unwrap();
    let names: Vec<_> = shards
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["train-00000-of-00002", "train-00001-of-00002"]);
    assert!(list_shards(&out, "validation").is_err());

    // Round-robin: sample i is record i / 2 of shard i % 2.
    let read: Vec<Vec<Example>> = shards.iter().map(|s| read_examples(s).unwrap()).collect();
    let classes = ["cat", "drink", "fruit"];
    for (i, (class, path)) in photos.iter().enumerate() {
        let ex = &read[i % 2][i / 2];
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(ex.image, bytes, "{}: bytes differ", path.display());
        let index = classes.iter().position(|c| c == class).unwrap();
        assert_eq!(ex.label, index as i64 + 1, "1-based label of {class}");
        assert_eq!(ex.text.as_deref(), Some(class.as_str()));
    }
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn flipped_byte_names_file_and_offset() {
    let (base, out, _) = write_photo_shards("flip");
    let shard = out.join("train-00001-of-00002");
    let mut bytes = std::fs::read(&shard).unwrap();
    // Record 0 of shard 1 is coffee.png; flip a byte inside record 1's data.
    let first_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let second = 12 + first_len + 4;
    bytes[second + 12 + 100] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();

    let mut reader = TfRecordReader::open(&shard).unwrap();
    let first = reader.next().unwrap().unwrap();
    assert!(decode_example(&first).is_ok());
    let e = reader.next().unwrap().unwrap_err();
    assert!(e.contains(&shard.display().to_string()), "{e}");
    assert!(
        e.contains(&format!("byte offset {second}")) && e.contains("data CRC mismatch"),
        "{e}"
    );
    assert!(reader.next().is_none(), "reading stops after an error");
    let e = read_examples(&shard).unwrap_err();
    assert!(e.contains(&format!("byte offset {second}")), "{e}");

    // A flipped length byte is caught by the length CRC.
    bytes[second + 12 + 100] ^= 0x40;
    bytes[second + 1] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    let e = read_examples(&shard).unwrap_err();
    assert!(
        e.contains(&format!("byte offset {second}")) && e.contains("length CRC mismatch"),
        "{e}"
    );
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn truncated_shard_is_an_error() {
    let (base, out, _) = write_photo_shards("truncated");
    let shard = out.join("train-00000-of-00002");
    let bytes = std::fs::read(&shard).unwrap();
    let first_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let second = 12 + first_len + 4;
    // Cut inside the second record's data, then inside its header.
    for cut in [bytes.len() - 10, second + 5] {
        std::fs::write(&shard, &bytes[..cut]).unwrap();
        let e = read_examples(&shard).unwrap_err();
        assert!(e.contains(&shard.display().to_string()), "{e}");
        assert!(
            e.contains(&format!("byte offset {second}")) && e.contains("truncated"),
            "cut at {cut}: {e}"
        );
    }
    // Cut exactly between records: a valid, shorter file.
    std::fs::write(&shard, &bytes[..second]).unwrap();
    assert_eq!(read_examples(&shard).unwrap().len(), 1);
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn write_shards_rejects_bad_input() {
    let base = tmp("bad");
    let not_image = base.join("notes.jpg");
    std::fs::write(&not_image, b"plain text").unwrap();
    let samples = vec![(not_image.clone(), 0)];
    let e = write_shards(&samples, &[], &base.join("out"), "train", 1).unwrap_err();
    assert!(
        e.contains("notes.jpg") && e.contains("neither a JPEG nor a PNG"),
        "{e}"
    );
    assert!(
        list_shards(&base.join("out"), "train").is_err(),
        "no shard left behind"
    );
    let e = write_shards(&samples, &[], &base.join("out"), "train", 2).unwrap_err();
    assert!(e.contains("cannot fill 2 shards"), "{e}");
    let missing = vec![(base.join("missing.png"), 0)];
    let e = write_shards(&missing, &[], &base.join("out"), "train", 1).unwrap_err();
    assert!(e.contains("missing.png"), "{e}");
    std::fs::remove_dir_all(&base).unwrap();
}
