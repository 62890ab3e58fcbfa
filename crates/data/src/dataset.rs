//! Labelled image datasets for training and evaluation: an image folder (one subfolder per
//! class) or ImageNet-layout TFRecord shards (`train-*`, `validation-*`, labels 1-based). Images
//! are decoded on demand, so only the index lives in memory.

use std::path::{Path, PathBuf};

use crate::decode::{decode_rgb, RgbImage};
use crate::files;
use crate::sampler::TrainGeometry;
use effnet_engine::rng::Rng;
use rayon::prelude::*;

use crate::tfrecord::{decode_example, list_shards, TfRecordReader, INDEX_SUFFIX};

/// One shard's records (byte offset, 0-based label) and the class texts it names.
#[derive(Debug, Default, PartialEq)]
struct ShardIndex {
    records: Vec<(u64, usize)>,
    texts: Vec<(usize, String)>,
}

const INDEX_HEADER: &str = "effnet-tfrecord-index 1";

impl ShardIndex {
    /// The saved index when it matches the shard (same size and modification time), otherwise a
    /// scan of the shard, saved for next time.
    fn open(shard: &Path) -> Result<ShardIndex, String> {
        let stamp = Self::stamp(shard)?;
        let saved = Self::path(shard);
        if let Some(index) = std::fs::read_to_string(&saved)
            .ok()
            .and_then(|text| Self::parse(&text, &stamp))
        {
            return Ok(index);
        }
        let index = Self::scan(shard)?;
        // A read-only dataset just means scanning again next time.
        let mut tmp = saved.clone().into_os_string();
        tmp.push(".tmp");
        if std::fs::write(&tmp, index.render(&stamp)).is_ok() {
            let _ = std::fs::rename(&tmp, &saved);
        }
        Ok(index)
    }

    fn path(shard: &Path) -> PathBuf {
        let mut name = shard.as_os_str().to_owned();
        name.push(INDEX_SUFFIX);
        PathBuf::from(name)
    }

    /// What identifies a version of the shard: its size and modification time.
    fn stamp(shard: &Path) -> Result<String, String> {
        let meta = std::fs::metadata(shard).map_err(|e| format!("{}: {e}", shard.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(format!("{} {mtime}", meta.len()))
    }

    fn scan(path: &Path) -> Result<ShardIndex, String> {
        let mut index = ShardIndex::default();
        let mut reader = TfRecordReader::open(path)?;
        loop {
            let offset = reader.offset();
            let Some(record) = reader.next() else { break };
            let example = decode_example(&record?)
                .map_err(|e| format!("{}: record at byte {offset}: {e}", path.display()))?;
            let label = usize::try_from(example.label - 1).map_err(|_| {
                format!(
                    "{}: record at byte {offset}: label {} (labels are 1-based)",
                    path.display(),
                    example.label
                )
            })?;
            if let Some(text) = example.text {
                if !index.texts.iter().any(|(l, _)| *l == label) {
                    index.texts.push((label, text.replace('\n', " ")));
                }
            }
            index.records.push((offset, label));
        }
        Ok(index)
    }

    /// `header`, `stamp`, then `r offset label` and `t label text` lines.
    fn render(&self, stamp: &str) -> String {
        let mut out = format!("{INDEX_HEADER}\n{stamp}\n");
        for (offset, label) in &self.records {
            out.push_str(&format!("r {offset} {label}\n"));
        }
        for (label, text) in &self.texts {
            out.push_str(&format!("t {label} {text}\n"));
        }
        out
    }

    /// The index in `text` if it is one, for this `stamp`, and whole.
    fn parse(text: &str, stamp: &str) -> Option<ShardIndex> {
        let mut lines = text.lines();
        if lines.next()? != INDEX_HEADER || lines.next()? != stamp || !text.ends_with('\n') {
            return None;
        }
        let mut index = ShardIndex::default();
        for line in lines {
            match line.split_once(' ')? {
                ("r", rest) => {
                    let (offset, label) = rest.split_once(' ')?;
                    index
                        .records
                        .push((offset.parse().ok()?, label.parse().ok()?));
                }
                ("t", rest) => {
                    let (label, name) = rest.split_once(' ')?;
                    index.texts.push((label.parse().ok()?, name.to_string()));
                }
                _ => return None,
            }
        }
        Some(index)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Location {
    File(PathBuf),
    /// A record of `shards[shard]` starting at byte `offset`.
    Record {
        shard: usize,
        offset: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    shards: Vec<PathBuf>,
    items: Vec<(Location, usize)>,
    /// Number of classes: the folder count, or (numbered folders, TFRecords) the largest label + 1.
    pub classes: usize,
    /// A name per class: the folder's, the records' `image/class/text`, else `class N`.
    pub names: Vec<String>,
}

impl ImageDataset {
    /// `dir/<class>/**/*.{jpg,jpeg,png}` (see [`files::labelled_folder`]).
    pub fn folder(dir: &Path) -> Result<ImageDataset, String> {
        let f = files::labelled_folder(dir)?;
        let classes = f
            .samples
            .iter()
            .map(|(_, l)| l + 1)
            .max()
            .unwrap_or(0)
            .max(f.classes.len());
        let mut names: Vec<String> = (0..classes).map(|i| format!("class {i}")).collect();
        for (i, name) in f.classes.iter().enumerate() {
            // Numbered folders name the class index itself.
            let at = name
                .parse::<usize>()
                .ok()
                .filter(|&n| n < classes)
                .unwrap_or(i);
            names[at] = name.clone();
        }
        let items = f
            .samples
            .into_iter()
            .map(|(p, l)| (Location::File(p), l))
            .collect();
        Ok(ImageDataset {
            shards: Vec::new(),
            items,
            classes,
            names,
        })
    }

    /// The `{split}*` shards of `dir`. Indexing reads every record once (checking its CRCs and
    /// its Example), keeping only where it starts and its label; shards are read in parallel, and
    /// each shard's index is kept beside it (`<shard>.effnet-index`, best effort) so that the
    /// next run reads that instead of the records.
    pub fn tfrecords(dir: &Path, split: &str) -> Result<ImageDataset, String> {
        let shards = list_shards(dir, split)?;
        let indexes: Vec<ShardIndex> = shards
            .par_iter()
            .map(|path| ShardIndex::open(path))
            .collect::<Result<_, _>>()?;
        let mut items = Vec::new();
        let mut texts: Vec<Option<String>> = Vec::new();
        for (s, index) in indexes.into_iter().enumerate() {
            for (offset, label) in index.records {
                items.push((Location::Record { shard: s, offset }, label));
            }
            for (label, text) in index.texts {
                if texts.len() <= label {
                    texts.resize(label + 1, None);
                }
                texts[label].get_or_insert(text);
            }
        }
        let classes = items.iter().map(|(_, l)| l + 1).max().unwrap_or(0);
        let names = (0..classes)
            .map(|i| {
                texts
                    .get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| format!("class {i}"))
            })
            .collect();
        Ok(ImageDataset {
            shards,
            items,
            classes,
            names,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Labels by `names`, another split's classes (training's), so that a class keeps its
    /// index when this split lacks some: every class here must be among them.
    pub fn relabel_by(&mut self, names: &[String]) -> Result<(), String> {
        let index: Vec<Option<usize>> = self
            .names
            .iter()
            .map(|n| names.iter().position(|m| m == n))
            .collect();
        for (location, label) in &mut self.items {
            *label = index[*label].ok_or_else(|| {
                let at = match location {
                    Location::File(p) => p.display().to_string(),
                    Location::Record { shard, offset } => {
                        format!("{} at byte {offset}", self.shards[*shard].display())
                    }
                };
                format!(
                    "{at}: class {:?} is not among the training classes",
                    self.names[*label]
                )
            })?;
        }
        self.names = names.to_vec();
        self.classes = names.len();
        Ok(())
    }

    /// Keeps the first `n` samples (all when `n` is 0).
    pub fn truncate(&mut self, n: usize) {
        if n > 0 {
            self.items.truncate(n);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn label(&self, index: usize) -> usize {
        self.items[index].1
    }

    /// Decodes sample `index`; the error names the file (and record) and what is wrong.
    pub fn image(&self, index: usize) -> Result<RgbImage, String> {
        self.decode_with(index, decode_rgb)
    }

    /// Sample `index` through the train geometry, decoding only what its crop reads
    /// ([`TrainGeometry::apply_encoded`]); the error names the file (and record).
    pub fn train_image(
        &self,
        index: usize,
        geometry: &TrainGeometry,
        rng: &mut Rng,
    ) -> Result<RgbImage, String> {
        self.decode_with(index, |bytes| geometry.apply_encoded(bytes, rng))
    }

    /// Sample `index`'s encoded bytes (the file, or the record's image), for a transform that
    /// decodes only what it needs.
    pub fn encoded(&self, index: usize) -> Result<Vec<u8>, String> {
        self.decode_with(index, Ok)
    }

    /// `decode` of sample `index`'s encoded bytes, its error prefixed with where they are.
    fn decode_with<T>(
        &self,
        index: usize,
        decode: impl FnOnce(Vec<u8>) -> Result<T, String>,
    ) -> Result<T, String> {
        match &self.items[index].0 {
            Location::File(p) => std::fs::read(p)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(decode)
                .map_err(|e| format!("{}: {e}", p.display())),
            Location::Record { shard, offset } => {
                let path = &self.shards[*shard];
                let record = TfRecordReader::open_at(path, *offset)?
                    .next()
                    .ok_or_else(|| format!("{}: no record at byte {offset}", path.display()))??;
                let example = decode_example(&record)
                    .map_err(|e| format!("{}: record at byte {offset}: {e}", path.display()))?;
                decode(example.image)
                    .map_err(|e| format!("{}: record at byte {offset}: {e}", path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A labelled folder of the committed real photos, and the same as TFRecord shards.
    #[test]
    fn folders_and_shards_give_the_same_samples() {
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/tests/fixtures/photos");
        let dir = std::env::temp_dir().join(format!("effnet-dataset-{}", std::process::id()));
        let folder = dir.join("images");
        for (class, file) in [
            ("cat", "chelsea.png"),
            ("drink", "coffee.png"),
            ("fruit", "orange.jpg"),
            ("fruit", "chelsea.png"),
        ] {
            std::fs::create_dir_all(folder.join(class)).unwrap();
            std::fs::copy(photos.join(file), folder.join(class).join(file)).unwrap();
        }
        let from_folder = ImageDataset::folder(&folder).unwrap();
        assert_eq!((from_folder.len(), from_folder.classes), (4, 3));
        assert_eq!(from_folder.names, vec!["cat", "drink", "fruit"]);
        // A split with fewer classes keeps the training split's indices.
        let names: Vec<String> = ["bird", "cat", "drink", "fruit"].map(String::from).to_vec();
        let mut relabelled = from_folder.clone();
        relabelled.relabel_by(&names).unwrap();
        let labels: Vec<usize> = (0..4).map(|i| relabelled.label(i)).collect();
        assert_eq!(labels, vec![1, 2, 3, 3]);
        assert_eq!(relabelled.names, names);
        let e = from_folder.clone().relabel_by(&names[..3]).unwrap_err();
        assert!(e.contains("\"fruit\" is not among"), "{e}");
        let f = files::labelled_folder(&folder).unwrap();
        let shards = dir.join("shards");
        crate::tfrecord::write_shards(&f.samples, &f.classes, &shards, "train", 2).unwrap();
        let from_shards = ImageDataset::tfrecords(&shards, "train").unwrap();
        assert_eq!((from_shards.len(), from_shards.classes), (4, 3));
        assert_eq!(
            from_shards.names, from_folder.names,
            "from image/class/text"
        );
        // Every shard sample equals one folder sample, pixels and label.
        for i in 0..from_shards.len() {
            let img = from_shards.image(i).unwrap();
            let found = (0..from_folder.len()).any(|j| {
                from_folder.label(j) == from_shards.label(i) && from_folder.image(j).unwrap() == img
            });
            assert!(found, "shard sample {i}");
        }
        // The second opening reads the indexes kept beside the shards, not the records: an
        // index edited by hand shows through; a damaged one is ignored and rebuilt.
        let shard = crate::tfrecord::list_shards(&shards, "train").unwrap()[0].clone();
        assert_eq!(
            crate::tfrecord::list_shards(&shards, "train")
                .unwrap()
                .len(),
            2
        );
        let saved = ShardIndex::path(&shard);
        let text = std::fs::read_to_string(&saved).unwrap();
        assert_eq!(
            ImageDataset::tfrecords(&shards, "train").unwrap(),
            from_shards
        );
        let first_record = text.lines().nth(2).unwrap().to_string();
        let relabelled = first_record.rsplit_once(' ').unwrap().0.to_string() + " 7";
        std::fs::write(&saved, text.replacen(&first_record, &relabelled, 1)).unwrap();
        let edited = ImageDataset::tfrecords(&shards, "train").unwrap();
        assert_eq!(
            (edited.classes, edited.label(0)),
            (8, 7),
            "read from the index"
        );
        std::fs::write(&saved, &text[..text.len() / 2]).unwrap();
        assert_eq!(
            ImageDataset::tfrecords(&shards, "train").unwrap(),
            from_shards
        );
        assert_eq!(std::fs::read_to_string(&saved).unwrap(), text, "rebuilt");
        // A damaged shard names the file and the record.
        let mut bytes = std::fs::read(&shard).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&shard, bytes).unwrap();
        let e = ImageDataset::tfrecords(&shards, "train").unwrap_err();
        assert!(
            e.contains("train-00000-of-00002") && e.contains("CRC"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
