//! `train`: the reference's recipe on ImageNet-layout TFRecords, image folders, or Fashion-MNIST
//! (the Debian package `dataset-fashion-mnist`, the main job's demo).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};

use effnet_data::augment::RandAugment;
use effnet_data::dataset::ImageDataset;
use effnet_data::idx;
use effnet_data::loader::{Loader, LoaderConfig, Source, Stage};
use effnet_data::mix::{mix_batch, MixConfig};
use effnet_data::resize::Interpolation;
use effnet_data::sampler::TrainGeometry;
use effnet_data::tfrecord;
use effnet_data::{Crop, Normalize, RgbImage, Transform};
use effnet_engine::rng::Rng;
use effnet_model::{arch, weights, Network, Weights};
use effnet_train::checkpoint::{self, RunState};
use effnet_train::optim::Kind;
use effnet_train::schedule::{Decay, Schedule};
use effnet_train::stages::{plan, Ramp};
use effnet_train::trainer::{argmax, smoothed, TrainConfig, Trainer};

use crate::dllogger;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerName {
    Rmsprop,
    Sgd,
    Momentum,
    Adam,
    Adamw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LrDecay {
    Cosine,
    Exponential,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    // --- Model
    /// Architecture (its classifier is sized for the dataset).
    #[arg(long, default_value = "efficientnetv2_b0", help_heading = "Model")]
    arch: String,
    /// Training and evaluation resolution (the last stage's, with --n-stages).
    #[arg(
        long = "img-size",
        alias = "train_img_size",
        default_value_t = 32,
        help_heading = "Model"
    )]
    img_size: usize,

    // --- Data
    /// TFRecord shards (`train-*`, `validation-*`, the reference's layout), a folder with
    /// `train/` and `val/` (or `validation/`) class folders, or Fashion-MNIST's IDX files.
    #[arg(long = "data-dir", alias = "data_dir", default_value = idx::FASHION_MNIST_DIR, help_heading = "Data")]
    data_dir: PathBuf,
    /// Use only the first N training images (0: all 60000).
    #[arg(long = "max-train-images", default_value_t = 0, help_heading = "Data")]
    max_train_images: usize,
    /// Evaluate on only the first N test images (0: all 10000).
    #[arg(long = "max-eval-images", default_value_t = 0, help_heading = "Data")]
    max_eval_images: usize,

    // --- Schedule
    #[arg(
        long,
        alias = "num_epochs",
        default_value_t = 1,
        help_heading = "Schedule"
    )]
    epochs: u64,
    #[arg(
        long = "batch-size",
        alias = "train_batch_size",
        default_value_t = 64,
        help_heading = "Schedule"
    )]
    batch_size: usize,
    /// Micro-batches accumulated into one optimizer step.
    #[arg(
        long = "grad-accum-steps",
        alias = "grad_accum_steps",
        default_value_t = 1,
        help_heading = "Schedule"
    )]
    grad_accum_steps: usize,

    // --- Optimizer
    #[arg(long, value_enum, default_value_t = OptimizerName::Rmsprop, help_heading = "Optimizer")]
    optimizer: OptimizerName,
    /// Peak learning rate per 128 images of global batch (the reference scales it by batch/128).
    #[arg(
        long = "lr-init",
        alias = "lr_init",
        default_value_t = 0.005,
        help_heading = "Optimizer"
    )]
    lr_init: f64,
    #[arg(long = "lr-decay", alias = "lr_decay", value_enum, default_value_t = LrDecay::Cosine, help_heading = "Optimizer")]
    lr_decay: LrDecay,
    #[arg(
        long = "lr-warmup-epochs",
        alias = "lr_warmup_epochs",
        default_value_t = 0.2,
        help_heading = "Optimizer"
    )]
    lr_warmup_epochs: f64,
    #[arg(
        long = "lr-decay-rate",
        alias = "lr_decay_rate",
        default_value_t = 0.97,
        help_heading = "Optimizer"
    )]
    lr_decay_rate: f64,
    #[arg(
        long = "lr-decay-epochs",
        alias = "lr_decay_epochs",
        default_value_t = 2.4,
        help_heading = "Optimizer"
    )]
    lr_decay_epochs: f64,
    /// Keras L2 coefficient on convolution and dense kernels (the reference's 5e-6).
    #[arg(
        long = "weight-decay",
        alias = "weight_decay",
        default_value_t = 5e-6,
        help_heading = "Optimizer"
    )]
    weight_decay: f32,
    /// RMSProp ρ.
    #[arg(long, default_value_t = 0.9, help_heading = "Optimizer")]
    decay: f32,
    #[arg(long, default_value_t = 0.9, help_heading = "Optimizer")]
    momentum: f32,
    #[arg(
        long = "opt-epsilon",
        alias = "opt_epsilon",
        default_value_t = 0.001,
        help_heading = "Optimizer"
    )]
    opt_epsilon: f32,

    // --- Augmentation
    /// The reference's random-resized crop (area 0.05–1, aspect 3/4–4/3) before the resize;
    /// without it, the whole image is resized. Horizontal flips are always on.
    #[arg(long = "random-crop", help_heading = "Augmentation")]
    random_crop: bool,
    /// RandAugment magnitude (the reference's 16 ops, 2 layers); 0 turns it off.
    #[arg(
        long = "raug-magnitude",
        alias = "raug_magnitude",
        default_value_t = 0.0,
        help_heading = "Augmentation"
    )]
    raug_magnitude: f32,
    #[arg(
        long = "mixup-alpha",
        alias = "mixup_alpha",
        default_value_t = 0.0,
        help_heading = "Augmentation"
    )]
    mixup_alpha: f64,
    #[arg(
        long = "cutmix-alpha",
        alias = "cutmix_alpha",
        default_value_t = 0.0,
        help_heading = "Augmentation"
    )]
    cutmix_alpha: f64,
    /// Progressive training: stages of epochs/N epochs, image size rising from --base-img-size to
    /// --img-size and RandAugment magnitude, mixup and cutmix from their base values to the final ones.
    #[arg(
        long = "n-stages",
        alias = "n_stages",
        default_value_t = 1,
        help_heading = "Augmentation"
    )]
    n_stages: usize,
    #[arg(
        long = "base-img-size",
        alias = "base_img_size",
        help_heading = "Augmentation"
    )]
    base_img_size: Option<usize>,
    #[arg(
        long = "base-raug-magnitude",
        alias = "base_randaug_mag",
        default_value_t = 5.0,
        help_heading = "Augmentation"
    )]
    base_raug_magnitude: f32,
    #[arg(
        long = "base-mixup",
        alias = "base_mixup",
        default_value_t = 0.0,
        help_heading = "Augmentation"
    )]
    base_mixup: f64,
    #[arg(
        long = "base-cutmix",
        alias = "base_cutmix",
        default_value_t = 0.0,
        help_heading = "Augmentation"
    )]
    base_cutmix: f64,
    /// Loader worker threads (decoding and augmenting ahead of the training step).
    #[arg(long, default_value_t = 1, help_heading = "Augmentation")]
    workers: usize,

    // --- Regularization
    #[arg(
        long = "label-smoothing",
        alias = "label_smoothing",
        default_value_t = 0.1,
        help_heading = "Regularization"
    )]
    label_smoothing: f32,
    /// EMA decay of the weights (0: off).
    #[arg(
        long = "moving-average-decay",
        alias = "moving_average_decay",
        default_value_t = 0.999,
        help_heading = "Regularization"
    )]
    moving_average_decay: f64,
    /// Keras convention: running ← m·running + (1 − m)·batch.
    #[arg(
        long = "bn-momentum",
        alias = "bn_momentum",
        default_value_t = 0.99,
        help_heading = "Regularization"
    )]
    bn_momentum: f32,

    // --- Run
    /// Start from pretrained weights (effnet/timm safetensors or a PyTorch .pth of --arch): every
    /// tensor but a classifier of another size is copied; their preprocessing is kept.
    #[arg(long, alias = "pretrained", help_heading = "Run")]
    weights: Option<PathBuf>,
    /// Where checkpoints, the final model and the log go.
    #[arg(
        long = "model-dir",
        alias = "model_dir",
        default_value = "effnet-run",
        help_heading = "Run"
    )]
    model_dir: PathBuf,
    /// Continue from the newest checkpoint in --model-dir.
    #[arg(long, help_heading = "Run")]
    resume: bool,
    /// Checkpoints kept (the newest ones).
    #[arg(long = "keep-last", default_value_t = 3, help_heading = "Run")]
    keep_last: usize,
    #[arg(long, default_value_t = 0, help_heading = "Run")]
    seed: u64,
    /// Print a progress line every N optimizer steps.
    #[arg(
        long = "log-steps",
        alias = "log_steps",
        default_value_t = 20,
        help_heading = "Run"
    )]
    log_steps: u64,
}

/// Fashion-MNIST images as 8-bit gray, with labels.
struct Split {
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
trait Samples: Send + Sync {
    fn len(&self) -> usize;
    fn label(&self, index: usize) -> usize;
    /// Sample `index` as 8-bit RGB; the error names the file and what is wrong.
    fn rgb(&self, index: usize) -> Result<RgbImage, String>;
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
}

/// What `--data-dir` holds, opened: training and evaluation samples, class names, and how
/// images are normalized and cropped for evaluation.
struct Data {
    train: Arc<dyn Samples>,
    eval: Arc<dyn Samples>,
    names: Vec<String>,
    /// `inception` for Fashion-MNIST (x/127.5 − 1), `imagenet` for photos.
    normalize: &'static str,
    /// `squash` for Fashion-MNIST's whole small images, the reference's crop for photos.
    eval_crop: &'static str,
    description: String,
}

impl Data {
    /// ImageNet-layout TFRecords (`train-*`, `validation-*`), an image folder with `train/` and
    /// `val/` (or `validation/`) class folders, or Fashion-MNIST's IDX files.
    fn open(dir: &Path, max_train: usize, max_eval: usize) -> Result<Data, String> {
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

/// The reference's train transform: the random-resized crop (with `--random-crop`) or the
/// whole image, flip, resize to the stage's size, RandAugment at the stage's magnitude, then
/// normalization.
struct TrainSource {
    data: Arc<dyn Samples>,
    random_crop: bool,
    normalize: Normalize,
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
        let img = self.data.rgb(index)?;
        let mut geometry = TrainGeometry::new(stage.size);
        if !self.random_crop {
            // The whole image: the sampler's area range pinned to 1.
            geometry.sampler.area_range = (1.0, 1.0);
            geometry.sampler.aspect_range = (1.0, 1.0);
        }
        let mut out = geometry.apply(&img, rng);
        if stage.magnitude > 0.0 {
            RandAugment {
                magnitude: stage.magnitude,
                ..RandAugment::default()
            }
            .apply(&mut out, rng);
        }
        let Normalize { mean, std } = self.normalize;
        let x = out
            .pixels
            .chunks_exact(3)
            .flat_map(|p| (0..3).map(move |c| (p[c] as f32 / 255.0 - mean[c]) / std[c]))
            .collect();
        Ok((x, self.data.label(index)))
    }
}

fn checkpoint_name(epoch: u64) -> String {
    format!("checkpoint-epoch{epoch:04}.safetensors")
}

/// The checkpoints in `dir`, oldest first.
fn checkpoints(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("checkpoint-epoch") && name.ends_with(".safetensors")
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Images `indices` through the eval transform as an NHWC batch, with their labels; samples
/// that cannot be read are left out and reported.
fn eval_batch(
    data: &dyn Samples,
    indices: &[usize],
    transform: &Transform,
) -> (Vec<f32>, Vec<usize>) {
    let mut x = Vec::new();
    let rows = transform.batch(indices, |&i| data.rgb(i), &mut x);
    let mut labels = Vec::new();
    for (r, &i) in rows.into_iter().zip(indices) {
        match r {
            Ok(_) => labels.push(data.label(i)),
            Err(e) => eprintln!("effnet: skipped evaluation sample {i}: {e}"),
        }
    }
    (x, labels)
}

/// (top-1 accuracy, mean loss) of `weights` on the evaluation samples.
fn evaluate(
    t: &mut Trainer,
    weights: &mut Weights,
    data: &dyn Samples,
    transform: &Transform,
    batch: usize,
) -> (f64, f64) {
    let classes = t.net.classes;
    let (mut correct, mut loss, mut seen) = (0usize, 0f64, 0usize);
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch) {
        let (x, labels) = eval_batch(data, chunk, transform);
        if labels.is_empty() {
            continue;
        }
        let logits = t.eval_logits(weights, &x, labels.len(), transform.size);
        let mut d = vec![0f32; logits.len()];
        loss += effnet_engine::loss::softmax_cross_entropy(
            &logits,
            classes,
            &smoothed(&labels, classes, 0.0),
            &mut d,
        ) as f64
            * labels.len() as f64;
        correct += logits
            .chunks_exact(classes)
            .zip(&labels)
            .filter(|(z, l)| argmax(z) == **l)
            .count();
        seen += labels.len();
    }
    (
        correct as f64 / seen.max(1) as f64,
        loss / seen.max(1) as f64,
    )
}

pub fn train(args: &TrainArgs) -> Result<(), String> {
    let start = Instant::now();
    if args.batch_size == 0 || args.img_size < 8 || args.epochs == 0 {
        return Err(
            "--batch-size and --epochs must be at least 1 and --img-size at least 8".into(),
        );
    }
    let data = Data::open(&args.data_dir, args.max_train_images, args.max_eval_images)?;
    let mut config = arch(&args.arch)?;
    config.num_classes = data.names.len();
    config.preprocess.eval_size = args.img_size;
    config.preprocess.train_size = args.img_size;
    config.preprocess.normalize = data.normalize.into();
    config.preprocess.crop = data.eval_crop.into();
    config.preprocess.interpolation = "bilinear".into();
    let pretrained = match &args.weights {
        Some(path) => {
            let (net, w) = weights::load(path, Some(&args.arch))?;
            // The pretrained features expect their own normalization.
            config.preprocess.normalize = net.config.preprocess.normalize.clone();
            Some((net, w))
        }
        None => None,
    };
    let eval_transform = Transform {
        size: args.img_size,
        interpolation: Interpolation::Bilinear,
        crop: Crop::parse(data.eval_crop)?,
        normalize: Normalize::parse(&config.preprocess.normalize)?,
    };
    let net = Network::new(config);
    let mut weights = Weights::init(&net, args.seed);
    if let (Some((from_net, from)), Some(path)) = (&pretrained, &args.weights) {
        let fresh = weights::transfer(from_net, from, &net, &mut weights);
        println!(
            "started from {} ({} of {} tensors; fresh: {})",
            path.display(),
            net.layout.params.len() + net.layout.buffers.len() - fresh.len(),
            net.layout.params.len() + net.layout.buffers.len(),
            if fresh.is_empty() {
                "none".to_string()
            } else {
                fresh.join(", ")
            }
        );
    }

    let steps_per_epoch = (data.train.len() / (args.batch_size * args.grad_accum_steps)) as u64;
    if steps_per_epoch == 0 {
        return Err(format!(
            "{} training images make no full step of {}×{}",
            data.train.len(),
            args.batch_size,
            args.grad_accum_steps
        ));
    }
    let global_batch = args.batch_size * args.grad_accum_steps;
    let peak = Schedule::scaled_peak(args.lr_init, global_batch);
    let epoch_steps = |e: f64| (e * steps_per_epoch as f64).round() as u64;
    let schedule = Schedule {
        peak,
        warmup_steps: epoch_steps(args.lr_warmup_epochs),
        total_steps: steps_per_epoch * args.epochs,
        decay: match args.lr_decay {
            LrDecay::Cosine => Decay::Cosine,
            LrDecay::Exponential => Decay::Exponential {
                rate: args.lr_decay_rate,
                every: epoch_steps(args.lr_decay_epochs).max(1),
            },
        },
    };
    let optimizer = match args.optimizer {
        OptimizerName::Rmsprop => Kind::RmsProp {
            rho: args.decay,
            momentum: args.momentum,
            epsilon: args.opt_epsilon,
        },
        OptimizerName::Sgd => Kind::Sgd {
            momentum: 0.0,
            nesterov: false,
        },
        OptimizerName::Momentum => Kind::Sgd {
            momentum: args.momentum,
            nesterov: true,
        },
        OptimizerName::Adam => Kind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: args.opt_epsilon,
        },
        OptimizerName::Adamw => Kind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: args.opt_epsilon,
        },
    };
    let train_config = TrainConfig {
        accumulation: args.grad_accum_steps.max(1),
        label_smoothing: args.label_smoothing,
        bn_momentum: args.bn_momentum,
        optimizer,
        weight_decay: args.weight_decay,
        schedule,
        ema_decay: (args.moving_average_decay > 0.0).then_some(args.moving_average_decay),
        seed: args.seed,
    };
    let mut t = Trainer::new(net, weights, train_config);
    std::fs::create_dir_all(&args.model_dir)
        .map_err(|e| format!("{}: {e}", args.model_dir.display()))?;
    let log = args.model_dir.join("log.json");
    let mut first_epoch = 0;
    if args.resume {
        if let Some(path) = checkpoints(&args.model_dir)?.pop() {
            let state = checkpoint::load(&path, &mut t)?;
            first_epoch = state.epoch;
            println!(
                "resumed from {} (epoch {}, step {})",
                path.display(),
                state.epoch,
                t.step()
            );
        }
    }
    println!(
        "training {} ({} parameters) on {} at {}×{}, batch {} × {} accumulated, {} epochs of {} steps, peak lr {:.5}",
        t.net.config.name,
        t.net.layout.trainable_count(),
        data.description,
        args.img_size,
        args.img_size,
        args.batch_size,
        args.grad_accum_steps,
        args.epochs,
        steps_per_epoch,
        peak
    );
    let classes = t.net.classes;
    let micro_per_epoch = steps_per_epoch as usize * args.grad_accum_steps;
    let source = TrainSource {
        data: data.train.clone(),
        random_crop: args.random_crop,
        normalize: eval_transform.normalize,
    };
    let ramp = Ramp {
        img_size: (args.base_img_size.unwrap_or(args.img_size), args.img_size),
        magnitude: (
            if args.n_stages > 1 {
                args.base_raug_magnitude
            } else {
                args.raug_magnitude
            },
            args.raug_magnitude,
        ),
        mixup: (args.base_mixup, args.mixup_alpha),
        cutmix: (args.base_cutmix, args.cutmix_alpha),
    };
    let stages = plan(args.n_stages, args.epochs, ramp);
    let stage_of = |epoch: u64| {
        stages
            .iter()
            .find(|s| epoch < s.end_epoch)
            .copied()
            .unwrap_or(stages[stages.len() - 1])
    };
    let first = stage_of(first_epoch);
    let stage = Stage {
        size: first.img_size,
        magnitude: first.magnitude,
    };
    let loader = Loader::new(
        Arc::new(source),
        LoaderConfig::train(args.batch_size, args.workers.max(1), args.seed),
        stage,
    )?;
    for epoch in first_epoch..args.epochs {
        let st = stage_of(epoch);
        if st.first_epoch == epoch && args.n_stages > 1 {
            println!(
                "stage {}/{}: epochs {}–{}, image {}×{}, RandAugment magnitude {:.2}, mixup {:.2}, cutmix {:.2}",
                stages.iter().position(|s| *s == st).unwrap_or(0) + 1,
                stages.len(),
                st.first_epoch + 1,
                st.end_epoch,
                st.img_size,
                st.img_size,
                st.magnitude,
                st.mixup,
                st.cutmix
            );
        }
        // The loader switches image size and augmentation strength between epochs, no restart.
        loader.set_stage(Stage {
            size: st.img_size,
            magnitude: st.magnitude,
        })?;
        let mix = MixConfig {
            mixup_alpha: st.mixup,
            cutmix_alpha: st.cutmix,
            label_smoothing: args.label_smoothing,
            ..MixConfig::default()
        };
        // Batches depend on (seed, epoch) only: a resumed run sees the same data.
        let (mut seen, mut correct, mut loss_sum) = (0usize, 0usize, 0f64);
        let t_epoch = Instant::now();
        let mut window = (0usize, Instant::now());
        let mut mix_rng = Rng::new(args.seed).fork(2_000_000 + epoch);
        for (m, batch) in loader.epoch(epoch).enumerate().take(micro_per_epoch) {
            let n = batch.len();
            if n == 0 {
                continue;
            }
            let mut x = batch.images;
            let targets = if mix.is_on() {
                mix_batch(
                    &mut x,
                    (n, batch.size, batch.size, 3),
                    &batch.labels,
                    classes,
                    &mix,
                    &mut mix_rng,
                )?
            } else {
                smoothed(&batch.labels, classes, args.label_smoothing)
            };
            let r = match t.micro_step(&x, n, batch.size, &targets) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("effnet: {e}");
                    continue;
                }
            };
            seen += n;
            correct += r.correct;
            loss_sum += r.loss as f64 * n as f64;
            window.0 += n;
            if r.stepped && t.step().is_multiple_of(args.log_steps.max(1)) {
                let ips = window.0 as f64 / window.1.elapsed().as_secs_f64();
                let done = (m + 1) as f64 / micro_per_epoch as f64;
                let eta = t_epoch.elapsed().as_secs_f64() * (1.0 - done) / done;
                println!(
                    "epoch {}/{} step {:>5}  loss {:.4}  acc {:.3}  lr {:.5}  {:.0} img/s  epoch ETA {:.0}s",
                    epoch + 1,
                    args.epochs,
                    t.step(),
                    loss_sum / seen as f64,
                    correct as f64 / seen as f64,
                    t.config.schedule.at(t.step()),
                    ips,
                    eta
                );
                window = (0, Instant::now());
            }
        }
        let train_secs = t_epoch.elapsed().as_secs_f64();
        let mut raw = t.evaluation_weights(false);
        let (acc, eval_loss) = evaluate(&mut t, &mut raw, data.eval.as_ref(), &eval_transform, 128);
        let mut record = serde_json::json!({
            "epoch": epoch + 1,
            "training_loss": loss_sum / seen.max(1) as f64,
            "training_accuracy_top_1": correct as f64 / seen.max(1) as f64,
            "avg_exp_per_second_training": seen as f64 / train_secs,
            "eval_loss": eval_loss,
            "eval_accuracy_top_1": acc,
        });
        if t.ema.is_some() {
            let mut ema = t.evaluation_weights(true);
            let (ema_acc, ema_loss) =
                evaluate(&mut t, &mut ema, data.eval.as_ref(), &eval_transform, 128);
            record["eval_accuracy_top_1_ema"] = ema_acc.into();
            record["eval_loss_ema"] = ema_loss.into();
        }
        println!("epoch {} done: {record}", epoch + 1);
        dllogger::log(Some(&log), start, serde_json::json!([epoch + 1]), record)?;
        let path = args.model_dir.join(checkpoint_name(epoch + 1));
        checkpoint::save(
            &path,
            &t,
            RunState {
                epoch: epoch + 1,
                batch_in_epoch: 0,
            },
        )?;
        prune_checkpoints(&args.model_dir, args.keep_last)?;
    }
    // The final model: the better of the raw and the EMA weights on the evaluation split.
    let mut raw = t.evaluation_weights(false);
    let (raw_acc, _) = evaluate(&mut t, &mut raw, data.eval.as_ref(), &eval_transform, 128);
    let (best, source, best_acc) = if t.ema.is_some() {
        let mut ema = t.evaluation_weights(true);
        let (ema_acc, _) = evaluate(&mut t, &mut ema, data.eval.as_ref(), &eval_transform, 128);
        if ema_acc > raw_acc {
            (ema, "ema", ema_acc)
        } else {
            (raw, "raw", raw_acc)
        }
    } else {
        (raw, "raw", raw_acc)
    };
    let model_path = args.model_dir.join("model.safetensors");
    let mut meta = weights::metadata(&t.net);
    meta.insert("effnet.weights_source".into(), source.into());
    meta.insert(
        "effnet.eval_accuracy_top_1".into(),
        format!("{best_acc:.4}"),
    );
    effnet_model::io::write_safetensors(&model_path, &weights::to_tensors(&t.net, &best), &meta)
        .map_err(|e| e.to_string())?;
    let labels_path = args.model_dir.join("labels.txt");
    std::fs::write(&labels_path, data.names.join("\n") + "\n")
        .map_err(|e| format!("{}: {e}", labels_path.display()))?;
    println!(
        "wrote {} ({} weights, top-1 {:.2}% on {} test images) and {}",
        model_path.display(),
        source,
        100.0 * best_acc,
        data.eval.len(),
        labels_path.display()
    );
    // A few predictions, as a user would check them.
    let mut best = best;
    let sample: Vec<usize> = (0..8.min(data.eval.len())).collect();
    let (x, labels) = eval_batch(data.eval.as_ref(), &sample, &eval_transform);
    let logits = t.eval_logits(&mut best, &x, labels.len(), args.img_size);
    println!("predictions on the first test images:");
    for (i, (z, &truth)) in logits.chunks_exact(classes).zip(&labels).enumerate() {
        let p = argmax(z);
        println!(
            "  test image {i}: {:<12} (true: {}){}",
            data.names[p],
            data.names[truth],
            if p == truth { "" } else { "  ✗" }
        );
    }
    Ok(())
}

/// Deletes all but the newest `keep` checkpoints.
fn prune_checkpoints(dir: &Path, keep: usize) -> Result<(), String> {
    let found = checkpoints(dir)?;
    let excess = found.len().saturating_sub(keep.max(1));
    for p in &found[..excess] {
        std::fs::remove_file(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
