//! What `--data-dir` holds, opened for training: Fashion-MNIST, image folders or TFRecords, and
//! the reference's train transform over them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use effnet_data::augment::{AutoAugment, RandAugment};
use effnet_data::dataset::ImageDataset;
use effnet_data::idx;
use effnet_data::loader::{Source, Stage};
use effnet_data::sampler::{pad_and_crop, CropSampler, TrainGeometry};
use effnet_data::tfrecord;
use effnet_data::{Image, Normalize, RgbImage, Transform};
use effnet_engine::rng::Rng;

/// Fashion-MNIST images as 8-bit gray, with labels.
pub struct Split {
    images: Vec<u8>,
    labels: Vec<u8>,
    side: usize,
}

impl Split {
    fn load(dir: &Path, split: &str, limit: usize) -> Result<Split, String> {
        let data = idx::fashion_mnist(dir, split)?;
        if data.rows != data.cols {
            return Err(format!(
                "{}: {split} images are {}×{}, not square",
                dir.display(),
                data.rows,
                data.cols
            ));
        }
        let n = if limit == 0 {
            data.len()
        } else {
            limit.min(data.len())
        };
        let per = data.rows * data.cols;
        Ok(Split {
            images: data.images[..n * per].to_vec(),
            labels: data.labels[..n].to_vec(),
            side: data.rows,
        })
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}

/// A labelled dataset a run reads: Fashion-MNIST, an image folder or TFRecord shards.
pub trait Samples: Send + Sync {
    fn len(&self) -> usize;
    fn label(&self, index: usize) -> usize;
    /// Sample `index` as 8-bit RGB; the error names the file and what is wrong.
    fn rgb(&self, index: usize) -> Result<RgbImage, String>;
    /// Sample `index` for the eval transform: pixels, or encoded bytes it decodes in part.
    fn eval_image(&self, index: usize) -> Result<Image, String> {
        self.rgb(index).map(Image::Pixels)
    }
    /// Sample `index` through the train geometry (crop, flip, resize).
    fn train_image(
        &self,
        index: usize,
        geometry: &TrainGeometry,
        rng: &mut Rng,
    ) -> Result<RgbImage, String> {
        Ok(geometry.apply(&self.rgb(index)?, rng))
    }
}

impl Samples for Split {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn label(&self, index: usize) -> usize {
        self.labels[index] as usize
    }

    fn rgb(&self, index: usize) -> Result<RgbImage, String> {
        let s = self.side;
        let gray = &self.images[index * s * s..(index + 1) * s * s];
        Ok(RgbImage {
            width: s,
            height: s,
            pixels: gray.iter().flat_map(|&p| [p, p, p]).collect(),
        })
    }
}

impl Samples for ImageDataset {
    fn len(&self) -> usize {
        ImageDataset::len(self)
    }

    fn label(&self, index: usize) -> usize {
        ImageDataset::label(self, index)
    }

    fn rgb(&self, index: usize) -> Result<RgbImage, String> {
        self.image(index)
    }

    fn eval_image(&self, index: usize) -> Result<Image, String> {
        self.encoded(index).map(Image::Encoded)
    }

    /// Decodes only the part the crop reads (decode-and-crop for baseline JPEGs).
    fn train_image(
        &self,
        index: usize,
        geometry: &TrainGeometry,
        rng: &mut Rng,
    ) -> Result<RgbImage, String> {
        ImageDataset::train_image(self, index, geometry, rng)
    }
}

/// What `--data-dir` holds, opened: training and evaluation samples, class names, and how
/// images are normalized and cropped for evaluation.
pub struct Data {
    pub train: Arc<dyn Samples>,
    pub eval: Arc<dyn Samples>,
    pub names: Vec<String>,
    /// `inception` for Fashion-MNIST (x/127.5 − 1), `imagenet` for photos.
    pub normalize: &'static str,
    /// `squash` for Fashion-MNIST's whole small images, the reference's crop for photos.
    pub eval_crop: &'static str,
    pub description: String,
}

impl Data {
    /// ImageNet-layout TFRecords (`train-*`, `validation-*`), an image folder with `train/` and
    /// `val/` (or `validation/`) class folders, or Fashion-MNIST's IDX files.
    pub fn open(dir: &Path, max_train: usize, max_eval: usize) -> Result<Data, String> {
        // TFRecord shards are named as the reference's `train-00000-of-01024`; other `train*`
        // files (Fashion-MNIST's `train-images-idx3-ubyte.gz`) are not shards.
        let shard_named = |p: &PathBuf| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let parts: Vec<&str> = name.split('-').collect();
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            parts.len() == 4
                && parts[0] == "train"
                && digits(parts[1])
                && parts[2] == "of"
                && digits(parts[3])
        };
        if tfrecord::list_shards(dir, "train").is_ok_and(|shards| shards.iter().all(shard_named)) {
            let mut train = ImageDataset::tfrecords(dir, "train")?;
            let mut eval = ImageDataset::tfrecords(dir, "validation")?;
            train.truncate(max_train);
            eval.truncate(max_eval);
            return Ok(Data::images(
                train,
                eval,
                format!("TFRecords in {}", dir.display()),
            ));
        }
        if dir.join("train").is_dir() {
            let val = ["val", "validation"]
                .iter()
                .map(|v| dir.join(v))
                .find(|p| p.is_dir())
                .ok_or_else(|| {
                    format!(
                        "{}: a train/ folder but no val/ or validation/ folder",
                        dir.display()
                    )
                })?;
            let mut train = ImageDataset::folder(&dir.join("train"))?;
            let mut eval = ImageDataset::folder(&val)?;
            // Folder names are the classes: val/'s sorted order may not be train/'s.
            eval.relabel_by(&train.names)?;
            train.truncate(max_train);
            eval.truncate(max_eval);
            return Ok(Data::images(
                train,
                eval,
                format!("image folders in {}", dir.display()),
            ));
        }
        let train = Split::load(dir, "train", max_train)?;
        let eval = Split::load(dir, "t10k", max_eval)?;
        Ok(Data {
            description: format!("Fashion-MNIST: {} training images", train.len()),
            train: Arc::new(train),
            eval: Arc::new(eval),
            names: idx::FASHION_MNIST_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            normalize: "inception",
            eval_crop: "squash",
        })
    }

    fn images(train: ImageDataset, eval: ImageDataset, what: String) -> Data {
        let names = if train.classes >= eval.classes {
            train.names.clone()
        } else {
            eval.names.clone()
        };
        Data {
            description: format!(
                "{what}: {} training images, {} classes",
                train.len(),
                names.len()
            ),
            train: Arc::new(train),
            eval: Arc::new(eval),
            names,
            normalize: "imagenet",
            eval_crop: "reference",
        }
    }
}

/// The augmentation after the crop and flip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Augment {
    None,
    /// RandAugment with this many layers, at the stage's magnitude.
    Rand {
        layers: usize,
        geometry: OpPixels,
    },
    /// AutoAugment policy v0.
    Auto {
        geometry: OpPixels,
    },
}

/// Translate's and cutout's full-magnitude sizes in pixels (`None`: the augmenter's default,
/// sized for ImageNet resolutions).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OpPixels {
    pub translate_const: Option<f32>,
    pub cutout_const: Option<f32>,
}

impl OpPixels {
    /// (translate, cutout) in pixels, each unset one taken from the augmenter's `defaults`.
    fn or(self, defaults: (f32, f32)) -> (f32, f32) {
        (
            self.translate_const.unwrap_or(defaults.0),
            self.cutout_const.unwrap_or(defaults.1),
        )
    }
}

/// The reference's train transform: the random-resized crop (with `--random-crop`) or the
/// whole image, flip, resize to the stage's size, RandAugment at the stage's magnitude or
/// AutoAugment, then normalization.
pub struct TrainSource {
    pub data: Arc<dyn Samples>,
    /// The random crop's sampler; `None`: the whole image.
    pub crop: Option<CropSampler>,
    /// Pad-and-crop's largest shift in pixels (0: none).
    pub translate: usize,
    pub augment: Augment,
    pub normalize: Normalize,
}

impl Source for TrainSource {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn load(
        &self,
        index: usize,
        stage: &Stage,
        rng: &mut Rng,
    ) -> Result<(Vec<f32>, usize), String> {
        let mut geometry = TrainGeometry::new(stage.size);
        geometry.sampler = self.crop.unwrap_or(CropSampler {
            // The whole image: the sampler's area range pinned to 1.
            area_range: (1.0, 1.0),
            aspect_range: (1.0, 1.0),
            ..geometry.sampler
        });
        let mut out = self.data.train_image(index, &geometry, rng)?;
        pad_and_crop(&mut out, self.translate, rng);
        match self.augment {
            Augment::Rand { layers, geometry } if stage.magnitude > 0.0 && layers > 0 => {
                let d = RandAugment::default();
                let (translate_const, cutout_const) =
                    geometry.or((d.translate_const, d.cutout_const));
                RandAugment {
                    num_layers: layers,
                    magnitude: stage.magnitude,
                    translate_const,
                    cutout_const,
                }
                .apply(&mut out, rng)
            }
            Augment::Auto { geometry } => {
                let d = AutoAugment::default();
                let (translate_const, cutout_const) =
                    geometry.or((d.translate_const, d.cutout_const));
                AutoAugment {
                    translate_const,
                    cutout_const,
                }
                .apply(&mut out, rng)
            }
            _ => {}
        }
        Ok((self.normalize.to_vec(&out.pixels), self.data.label(index)))
    }
}

/// Images `indices` through the eval transform as an NHWC batch, with their labels; samples
/// that cannot be read are left out and reported.
pub fn eval_batch(
    data: &dyn Samples,
    indices: &[usize],
    transform: &Transform,
) -> (Vec<f32>, Vec<usize>) {
    let mut x = Vec::new();
    let rows = transform.batch(indices, |&i| data.eval_image(i), &mut x);
    let mut labels = Vec::new();
    for (r, &i) in rows.into_iter().zip(indices) {
        match r {
            Ok(_) => labels.push(data.label(i)),
            Err(e) => eprintln!("effnet: skipped evaluation sample {i}: {e}"),
        }
    }
    (x, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 28×28 picture with detail everywhere, so every geometric op changes it.
    struct Gradient;

    impl Samples for Gradient {
        fn len(&self) -> usize {
            1
        }
        fn label(&self, _: usize) -> usize {
            0
        }
        fn rgb(&self, _: usize) -> Result<RgbImage, String> {
            let pixels = (0..28 * 28 * 3).map(|i| (i * 37 % 251) as u8).collect();
            Ok(RgbImage {
                width: 28,
                height: 28,
                pixels,
            })
        }
    }

    /// Twenty draws of `augment` at magnitude 10 from the same seed.
    fn draws(augment: Augment) -> Vec<Vec<f32>> {
        let source = TrainSource {
            data: Arc::new(Gradient),
            crop: None,
            translate: 0,
            augment,
            normalize: Normalize::parse("inception").unwrap(),
        };
        let stage = Stage {
            size: 28,
            magnitude: 10.0,
        };
        let mut rng = Rng::new(3);
        (0..20)
            .map(|_| source.load(0, &stage, &mut rng).unwrap().0)
            .collect()
    }

    #[test]
    fn translate_and_cutout_sizes_reach_randaugment_and_autoaugment() {
        let rand = |geometry| Augment::Rand {
            layers: 2,
            geometry,
        };
        let auto = |geometry| Augment::Auto { geometry };
        let small = OpPixels {
            translate_const: Some(3.0),
            cutout_const: Some(4.0),
        };
        // (augmenter, its defaults spelled out: augment.py's 100/40 and 250/100 px)
        for (augment, (translate, cutout)) in [
            (&rand as &dyn Fn(OpPixels) -> Augment, (100.0, 40.0)),
            (&auto, (250.0, 100.0)),
        ] {
            let defaults = draws(augment(OpPixels::default()));
            let explicit = draws(augment(OpPixels {
                translate_const: Some(translate),
                cutout_const: Some(cutout),
            }));
            assert_eq!(defaults, explicit, "unset means the augmenter's default");
            assert_ne!(
                defaults,
                draws(augment(small)),
                "the sizes change what translate and cutout do"
            );
        }
    }
}
