//! Labelled image datasets for training and evaluation: an image folder (one subfolder per
//! class) or ImageNet-layout TFRecord shards (`train-*`, `validation-*`, labels 1-based). Images
//! are decoded on demand, so only the index lives in memory.

use std::path::{Path, PathBuf};

use crate::decode::{decode_rgb, load_rgb, RgbImage};
use crate::files;
use crate::tfrecord::{decode_example, list_shards, TfRecordReader};

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
    /// its Example), keeping only where it starts and its label.
    pub fn tfrecords(dir: &Path, split: &str) -> Result<ImageDataset, String> {
        let shards = list_shards(dir, split)?;
        let mut items = Vec::new();
        let mut texts: Vec<Option<String>> = Vec::new();
        for (s, path) in shards.iter().enumerate() {
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
                if texts.len() <= label {
                    texts.resize(label + 1, None);
                }
                if texts[label].is_none() {
                    texts[label] = example.text;
                }
                items.push((Location::Record { shard: s, offset }, label));
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
        match &self.items[index].0 {
            Location::File(p) => load_rgb(p).map_err(|e| format!("{}: {e}", p.display())),
            Location::Record { shard, offset } => {
                let path = &self.shards[*shard];
                let record = TfRecordReader::open_at(path, *offset)?
                    .next()
                    .ok_or_else(|| format!("{}: no record at byte {offset}", path.display()))??;
                let example = decode_example(&record)
                    .map_err(|e| format!("{}: record at byte {offset}: {e}", path.display()))?;
                decode_rgb(example.image)
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
        // A damaged shard names the file and the record.
        let shard = crate::tfrecord::list_shards(&shards, "train").unwrap()[0].clone();
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
