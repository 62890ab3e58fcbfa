//! `effnet train` / `train_and_eval` flags: the reference's names (kebab-case, its snake_case
//! spellings accepted) and its defaults, grouped as a user looks for them; a config file of
//! `key: value` lines (the `params.yaml` a run writes is one, so a run can be repeated).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Args, ValueEnum};
use serde::Serialize;

use effnet_data::idx;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Rmsprop,
    Sgd,
    Momentum,
    Adam,
    Adamw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LrDecay {
    Cosine,
    Exponential,
    /// The reference's `piecewise_constant_with_warmup`: ×0.1 at each of --lr-boundaries.
    #[value(alias = "piecewise_constant_with_warmup")]
    Piecewise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Augmenter {
    Autoaugment,
    Randaugment,
    None,
}

#[derive(Args, Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TrainArgs {
    // --- Model
    /// Architecture (its classifier is sized for the dataset).
    #[arg(long, default_value = "efficientnetv2_s", help_heading = "Model")]
    pub arch: String,
    /// Training resolution (the last stage's, with --n-stages).
    #[arg(
        long = "img-size",
        alias = "train_img_size",
        alias = "train-img-size",
        default_value_t = 224,
        help_heading = "Model"
    )]
    pub img_size: usize,
    /// Evaluation resolution (default: --img-size).
    #[arg(
        long = "eval-img-size",
        alias = "eval_img_size",
        help_heading = "Model"
    )]
    pub eval_img_size: Option<usize>,
    /// Dropout before the classifier (default: the architecture's).
    #[arg(long = "dropout-rate", alias = "dropout_rate", help_heading = "Model")]
    pub dropout_rate: Option<f32>,
    /// Stochastic depth of the last block, rising linearly from 0 (default: 0.2).
    #[arg(
        long = "drop-connect-rate",
        alias = "drop_connect_rate",
        help_heading = "Model"
    )]
    pub drop_connect_rate: Option<f32>,
    /// The reference's model overrides, `k=v,k2=v2`: bn_momentum, dropout_rate, drop_connect_rate.
    #[arg(long, help_heading = "Model")]
    pub mparams: Option<String>,

    // --- Data
    /// TFRecord shards (`train-*`, `validation-*`, the reference's layout), a folder with
    /// `train/` and `val/` (or `validation/`) class folders, or Fashion-MNIST's IDX files.
    #[arg(long = "data-dir", alias = "data_dir", default_value = idx::FASHION_MNIST_DIR, help_heading = "Data")]
    pub data_dir: PathBuf,
    /// Use only the first N training images (0: all).
    #[arg(
        long = "max-train-images",
        alias = "train_num_examples",
        default_value_t = 0,
        help_heading = "Data"
    )]
    pub max_train_images: usize,
    /// Evaluate on only the first N images (0: all).
    #[arg(
        long = "max-eval-images",
        alias = "eval_num_examples",
        default_value_t = 0,
        help_heading = "Data"
    )]
    pub max_eval_images: usize,
    /// Loader threads decoding and augmenting ahead of the training step (default: 1 on the
    /// CPU, whose cores the engine takes; with `--device cuda`, every core of this process's
    /// share of the machine but one).
    #[arg(long, help_heading = "Data")]
    pub workers: Option<usize>,

    // --- Schedule
    #[arg(
        long,
        alias = "max_epochs",
        alias = "max-epochs",
        alias = "num_epochs",
        alias = "num-epochs",
        default_value_t = 300,
        help_heading = "Schedule"
    )]
    pub epochs: u64,
    /// Optimizer steps per epoch (default: training images / global batch).
    #[arg(
        long = "steps-per-epoch",
        alias = "steps_per_epoch",
        help_heading = "Schedule"
    )]
    pub steps_per_epoch: Option<u64>,
    /// Images per micro-batch and process.
    #[arg(
        long = "batch-size",
        alias = "train_batch_size",
        alias = "train-batch-size",
        default_value_t = 32,
        help_heading = "Schedule"
    )]
    pub batch_size: usize,
    /// Micro-batches accumulated into one optimizer step.
    #[arg(
        long = "grad-accum-steps",
        alias = "grad_accum_steps",
        default_value_t = 1,
        help_heading = "Schedule"
    )]
    pub grad_accum_steps: usize,

    // --- Optimizer
    #[arg(long, value_enum, default_value_t = OptimizerName::Rmsprop, help_heading = "Optimizer")]
    pub optimizer: OptimizerName,
    /// Peak learning rate per 128 images of global batch (scaled by global batch / 128).
    #[arg(
        long = "lr-init",
        alias = "lr_init",
        default_value_t = 0.008,
        help_heading = "Optimizer"
    )]
    pub lr_init: f64,
    #[arg(long = "lr-decay", alias = "lr_decay", value_enum, default_value_t = LrDecay::Exponential, help_heading = "Optimizer")]
    pub lr_decay: LrDecay,
    #[arg(
        long = "lr-warmup-epochs",
        alias = "lr_warmup_epochs",
        default_value_t = 5.0,
        help_heading = "Optimizer"
    )]
    pub lr_warmup_epochs: f64,
    #[arg(
        long = "lr-decay-rate",
        alias = "lr_decay_rate",
        default_value_t = 0.97,
        help_heading = "Optimizer"
    )]
    pub lr_decay_rate: f64,
    #[arg(
        long = "lr-decay-epochs",
        alias = "lr_decay_epochs",
        default_value_t = 2.4,
        help_heading = "Optimizer"
    )]
    pub lr_decay_epochs: f64,
    /// Epochs (after warmup) where the piecewise schedule multiplies the rate by 0.1.
    #[arg(long = "lr-boundaries", value_delimiter = ',', action = ArgAction::Set, default_values_t = [30.0, 60.0, 80.0], help_heading = "Optimizer")]
    pub lr_boundaries: Vec<f64>,
    /// Keras L2 coefficient on convolution and dense kernels, SE and dense biases.
    #[arg(
        long = "weight-decay",
        alias = "weight_decay",
        default_value_t = 5e-6,
        help_heading = "Optimizer"
    )]
    pub weight_decay: f32,
    /// RMSProp ρ.
    #[arg(long, default_value_t = 0.9, help_heading = "Optimizer")]
    pub decay: f32,
    /// RMSProp and SGD momentum.
    #[arg(long, default_value_t = 0.9, help_heading = "Optimizer")]
    pub momentum: f32,
    /// SGD with Nesterov momentum (`--optimizer momentum` always is).
    #[arg(long, help_heading = "Optimizer")]
    pub nesterov: bool,
    /// Adam β₁ (the reference's 0 means Keras' default 0.9).
    #[arg(
        long = "beta-1",
        alias = "beta_1",
        default_value_t = 0.0,
        help_heading = "Optimizer"
    )]
    pub beta_1: f32,
    /// Adam β₂ (0: 0.999).
    #[arg(
        long = "beta-2",
        alias = "beta_2",
        default_value_t = 0.0,
        help_heading = "Optimizer"
    )]
    pub beta_2: f32,
    #[arg(
        long = "opt-epsilon",
        alias = "opt_epsilon",
        default_value_t = 0.001,
        help_heading = "Optimizer"
    )]
    pub opt_epsilon: f32,
    /// Clip the step's gradient to this global L2 norm (0: off).
    #[arg(
        long = "grad-clip-norm",
        alias = "grad_clip_norm",
        default_value_t = 0.0,
        help_heading = "Optimizer"
    )]
    pub grad_clip_norm: f32,

    // --- Augmentation
    /// RandAugment (16 ops, --raug-num-layers, --raug-magnitude), AutoAugment policy v0, or none.
    #[arg(long = "augmenter-name", alias = "augmenter_name", value_enum, default_value_t = Augmenter::Autoaugment, help_heading = "Augmentation")]
    pub augmenter_name: Augmenter,
    #[arg(
        long = "raug-num-layers",
        alias = "raug_num_layers",
        default_value_t = 2,
        help_heading = "Augmentation"
    )]
    pub raug_num_layers: usize,
    /// RandAugment magnitude (above 10 allowed).
    #[arg(
        long = "raug-magnitude",
        alias = "raug_magnitude",
        default_value_t = 10.0,
        help_heading = "Augmentation"
    )]
    pub raug_magnitude: f32,
    /// Translate's shift at magnitude 10, in pixels (default: RandAugment 100, AutoAugment 250;
    /// sized for ImageNet, so set it for small images).
    #[arg(
        long = "translate-const",
        alias = "translate_const",
        help_heading = "Augmentation"
    )]
    pub translate_const: Option<f32>,
    /// Half the side of cutout's square at magnitude 10, in pixels (default: RandAugment 40,
    /// AutoAugment 100).
    #[arg(
        long = "cutout-const",
        alias = "cutout_const",
        help_heading = "Augmentation"
    )]
    pub cutout_const: Option<f32>,
    /// The reference's random-resized crop (area 0.05–1, aspect 3/4–4/3, 100 attempts) before
    /// the resize; without it the whole image is resized. Flips are always on.
    #[arg(long = "random-crop", help_heading = "Augmentation")]
    pub random_crop: bool,
    /// The random crop's area as a fraction of the image, `MIN,MAX` (default: the reference's
    /// 0.05,1; crops under 0.1 are redrawn). Milder ranges such as 0.7,1 suit small images.
    #[arg(long = "crop-area-range", value_name = "MIN,MAX", value_parser = parse_area_range, help_heading = "Augmentation")]
    pub crop_area_range: Option<(f64, f64)>,
    /// Pad-and-crop translation: each training image shifted by up to ±PIXELS in x and y
    /// (uniform integers, black fill) after the resize, before the augmenter; 0 turns it off.
    /// Not in the reference; 2 suits 28-pixel images such as Fashion-MNIST.
    #[arg(
        long = "random-translate",
        value_name = "PIXELS",
        default_value_t = 0,
        help_heading = "Augmentation"
    )]
    pub random_translate: usize,
    #[arg(
        long = "mixup-alpha",
        alias = "mixup_alpha",
        default_value_t = 0.0,
        help_heading = "Augmentation"
    )]
    pub mixup_alpha: f64,
    #[arg(
        long = "cutmix-alpha",
        alias = "cutmix_alpha",
        default_value_t = 0.0,
        help_heading = "Augmentation"
    )]
    pub cutmix_alpha: f64,

    // --- Progressive training
    /// Stages of epochs/N epochs; image size, RandAugment magnitude, mixup and cutmix rise
    /// linearly from their base values to the final ones.
    #[arg(
        long = "n-stages",
        alias = "n_stages",
        default_value_t = 1,
        help_heading = "Progressive training"
    )]
    pub n_stages: usize,
    #[arg(
        long = "base-img-size",
        alias = "base_img_size",
        default_value_t = 128,
        help_heading = "Progressive training"
    )]
    pub base_img_size: usize,
    #[arg(
        long = "base-raug-magnitude",
        alias = "base_randaug_mag",
        alias = "base-randaug-mag",
        default_value_t = 5.0,
        help_heading = "Progressive training"
    )]
    pub base_raug_magnitude: f32,
    #[arg(
        long = "base-mixup",
        alias = "base_mixup",
        default_value_t = 0.0,
        help_heading = "Progressive training"
    )]
    pub base_mixup: f64,
    #[arg(
        long = "base-cutmix",
        alias = "base_cutmix",
        default_value_t = 0.0,
        help_heading = "Progressive training"
    )]
    pub base_cutmix: f64,

    // --- Regularization
    #[arg(
        long = "label-smoothing",
        alias = "label_smoothing",
        default_value_t = 0.1,
        help_heading = "Regularization"
    )]
    pub label_smoothing: f32,
    /// EMA decay of the weights and BN statistics (0: off), as min(d, (1+t)/(10+t)).
    #[arg(
        long = "moving-average-decay",
        alias = "moving_average_decay",
        default_value_t = 0.0,
        help_heading = "Regularization"
    )]
    pub moving_average_decay: f64,
    /// Keras convention: running ← m·running + (1 − m)·batch.
    #[arg(
        long = "bn-momentum",
        alias = "bn_momentum",
        default_value_t = 0.99,
        help_heading = "Regularization"
    )]
    pub bn_momentum: f32,

    // --- Evaluation
    /// No evaluation during training (the final one still chooses raw or EMA weights).
    #[arg(long = "skip-eval", alias = "skip_eval", help_heading = "Evaluation")]
    pub skip_eval: bool,
    /// With train_and_eval: evaluate every N epochs (and after the last).
    #[arg(
        long = "num-epochs-between-eval",
        alias = "num_epochs_between_eval",
        default_value_t = 1,
        help_heading = "Evaluation"
    )]
    pub num_epochs_between_eval: u64,
    /// Before the final evaluation, replace every batch norm's running statistics (raw and EMA
    /// weights) by their plain average over N batches of training images through the evaluation
    /// transform ("precise BN"; not in the reference); 0 keeps the running ones. Small maps make
    /// running statistics noisy: 200 suits Fashion-MNIST at 28 px.
    #[arg(
        long = "precise-bn-batches",
        value_name = "N",
        default_value_t = 0,
        help_heading = "Evaluation"
    )]
    pub precise_bn_batches: usize,
    /// Evaluate with the EMA weights during training (when EMA is on).
    #[arg(long = "intratrain-eval-using-ema", alias = "intratrain_eval_using_ema", action = ArgAction::Set, default_value_t = true, help_heading = "Evaluation")]
    pub intratrain_eval_using_ema: bool,
    #[arg(
        long = "eval-batch-size",
        alias = "eval_batch_size",
        default_value_t = 100,
        help_heading = "Evaluation"
    )]
    pub eval_batch_size: usize,

    // --- Precision
    /// Mixed precision: the matrix products' operands (1×1 and im2col convolutions, SE,
    /// classifier) rounded to bf16, sums in f32 — Winograd's products, weights, optimizer and batch
    /// norm stay f32 — where the CPU has AVX512_BF16; f32 elsewhere (a note at start says which).
    #[arg(long = "use-amp", alias = "use_amp", help_heading = "Precision")]
    pub use_amp: bool,
    /// Compiled, fused kernels: effnet's engine always fuses (accepted for the reference's scripts).
    #[arg(long = "use-xla", alias = "use_xla", help_heading = "Precision")]
    pub use_xla: bool,
    /// Where training runs: `cpu`, or `cuda` (the GPU of this process's local rank; a build with
    /// `--features cuda`): passes, weights, optimizer and EMA on the GPU, `--use-amp` there
    /// storing activations in bf16 (f16 with dynamic loss scaling before Ampere).
    #[arg(long, default_value = "cpu", help_heading = "Precision")]
    pub device: String,
    /// GPU math: `tf32` (tensor cores for f32, the reference's default), `f32`, `bf16` (as
    /// `--use-amp` from Ampere on), or `f16` (16-bit activations with dynamic loss scaling, as
    /// the reference's `mixed_float16`; `--use-amp` before Ampere).
    #[arg(long, default_value = "tf32", help_heading = "Precision")]
    pub math: String,

    // --- Distributed (mpirun -np N effnet train …)
    /// Batch norm over the global batch (one all-reduce per BN layer and pass).
    #[arg(long = "sync-bn", alias = "sync_bn", help_heading = "Distributed")]
    pub sync_bn: bool,
    /// Exchange gradients as f16 (half the bytes), as the reference does by default.
    #[arg(long = "hvd-fp16-compression", alias = "hvd_fp16_compression", action = ArgAction::Set, default_value_t = true, help_heading = "Distributed")]
    pub hvd_fp16_compression: bool,

    // --- Run
    /// `key: value` lines with any of these flags (snake_case or kebab-case); flags on the
    /// command line win. A run's `params.yaml` is such a file.
    #[arg(long, help_heading = "Run")]
    pub config: Option<PathBuf>,
    /// Start from pretrained weights (effnet/timm safetensors or a PyTorch .pth of --arch): every
    /// tensor but a classifier of another size is copied; their preprocessing is kept.
    #[arg(long, alias = "pretrained", help_heading = "Run")]
    pub weights: Option<PathBuf>,
    /// Checkpoints, the final model, log.json, params.yaml and the curves go here.
    #[arg(
        long = "model-dir",
        alias = "model_dir",
        default_value = "effnet-run",
        help_heading = "Run"
    )]
    pub model_dir: PathBuf,
    /// Continue from the newest checkpoint in --model-dir.
    #[arg(long, alias = "resume_checkpoint", help_heading = "Run")]
    pub resume: bool,
    /// Write a checkpoint every N epochs (and after the last).
    #[arg(
        long = "save-checkpoint-freq",
        alias = "save_checkpoint_freq",
        default_value_t = 5,
        help_heading = "Run"
    )]
    pub save_checkpoint_freq: u64,
    /// Also write one every N optimizer steps inside an epoch (0: off); resume continues there.
    #[arg(long = "checkpoint-steps", default_value_t = 0, help_heading = "Run")]
    pub checkpoint_steps: u64,
    /// Checkpoints kept (the newest ones).
    #[arg(long = "keep-last", default_value_t = 3, help_heading = "Run")]
    pub keep_last: usize,
    #[arg(long = "enable-checkpoint-saving", alias = "enable_checkpoint_saving", action = ArgAction::Set, default_value_t = true, help_heading = "Run")]
    pub enable_checkpoint_saving: bool,
    #[arg(long, default_value_t = 0, help_heading = "Run")]
    pub seed: u64,
    /// Log throughput every N optimizer steps.
    #[arg(
        long = "log-steps",
        alias = "log_steps",
        default_value_t = 100,
        help_heading = "Run"
    )]
    pub log_steps: u64,
    /// DLLogger file, relative to --model-dir.
    #[arg(
        long = "log-filename",
        alias = "log_filename",
        default_value = "log.json",
        help_heading = "Run"
    )]
    pub log_filename: PathBuf,
}

impl TrainArgs {
    /// `--workers`, or its default for the device: a GPU leaves the cores to the loader (the
    /// processes of one machine sharing them).
    pub fn loader_workers(&self, local_processes: usize) -> usize {
        self.workers.unwrap_or_else(|| match self.device.as_str() {
            "cuda" => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                (cores / local_processes.max(1)).saturating_sub(1).max(1)
            }
            _ => 1,
        })
    }

    /// Refuses values no run can use, before any data is read or anything trains.
    pub fn validate(&self) -> Result<(), String> {
        for (flag, value) in [
            ("--batch-size", self.batch_size as u64),
            ("--grad-accum-steps", self.grad_accum_steps as u64),
            ("--eval-batch-size", self.eval_batch_size as u64),
            ("--workers", self.workers.unwrap_or(1) as u64),
            ("--n-stages", self.n_stages as u64),
            ("--epochs", self.epochs),
            ("--num-epochs-between-eval", self.num_epochs_between_eval),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        crate::check_image_size("--img-size", self.img_size)?;
        if let Some(size) = self.eval_img_size {
            crate::check_image_size("--eval-img-size", size)?;
        }
        let mut smallest = self.img_size;
        if self.n_stages > 1 {
            crate::check_image_size("--base-img-size", self.base_img_size)?;
            smallest = smallest.min(self.base_img_size);
        }
        if self.random_translate >= smallest {
            return Err(format!(
                "--random-translate {}: a shift of the whole {smallest}-pixel image or more \
                 leaves nothing of it",
                self.random_translate
            ));
        }
        let non_negative = |flag: &str, v: f64| match v.is_finite() && v >= 0.0 {
            true => Ok(()),
            false => Err(format!("{flag} {v}: expected a number ≥ 0")),
        };
        let fraction = |flag: &str, v: f64| match (0.0..1.0).contains(&v) {
            true => Ok(()),
            false => Err(format!(
                "{flag} {v}: expected from 0 up to, not including, 1"
            )),
        };
        non_negative("--lr-init", self.lr_init)?;
        non_negative("--lr-warmup-epochs", self.lr_warmup_epochs)?;
        non_negative("--weight-decay", self.weight_decay as f64)?;
        non_negative("--grad-clip-norm", self.grad_clip_norm as f64)?;
        non_negative("--mixup-alpha", self.mixup_alpha)?;
        non_negative("--cutmix-alpha", self.cutmix_alpha)?;
        fraction("--label-smoothing", self.label_smoothing as f64)?;
        fraction("--moving-average-decay", self.moving_average_decay)?;
        for (flag, value) in [
            ("--translate-const", self.translate_const),
            ("--cutout-const", self.cutout_const),
        ] {
            if value.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                return Err(format!("{flag} is a size in pixels: a number ≥ 0"));
            }
        }
        if self.crop_area_range.is_some() && !self.random_crop {
            return Err("--crop-area-range shapes the random crop: add --random-crop".into());
        }
        Ok(())
    }

    /// Every flag and its value, as the `PARAMETER` record and `params.yaml` hold them.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = serde_json::to_value(self).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut json {
            map.values_mut().for_each(shortest_float);
        }
        json
    }

    /// `key: value` lines that `--config` reads back.
    pub fn to_yaml(&self) -> String {
        let mut out =
            String::from("# effnet train: the flags of this run (effnet train --config FILE)\n");
        if let serde_json::Value::Object(map) = self.to_json() {
            for (k, v) in map {
                if k == "config" || v.is_null() {
                    continue;
                }
                let text = match &v {
                    serde_json::Value::Array(items) => items
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                out.push_str(&format!("{k}: {text}\n"));
            }
        }
        out
    }

    /// What must agree between the processes of a data-parallel run, as `key=value` lines.
    pub fn shared_config(&self) -> String {
        let mut json = self.to_json();
        if let serde_json::Value::Object(map) = &mut json {
            // Each process may have its own threads and output places.
            for per_process in [
                "workers",
                "config",
                "model-dir",
                "log-filename",
                "log-steps",
            ] {
                map.remove(per_process);
            }
            return map.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        }
        String::new()
    }
}

/// An f32 flag widened to f64 prints as 0.8999999761581421; write it as the 0.9 that was typed.
fn shortest_float(v: &mut serde_json::Value) {
    if let Some(x) = v.as_f64().filter(|_| v.is_f64()) {
        let narrow = x as f32;
        if narrow as f64 == x {
            if let Ok(short) = narrow.to_string().parse::<f64>() {
                *v = short.into();
            }
        }
    }
}

/// Parses `key: value` lines (`#` comments, blank lines) into command-line flags: `true` turns a
/// switch on, `false` leaves it off; lists are comma-separated. A key is a flag's name in
/// kebab-case or snake_case (`longs`), or one of the reference's names (an alias).
pub fn config_flags(
    path: &Path,
    text: &str,
    longs: &[&str],
    aliases: &[&str],
    switches: &[&str],
) -> Result<Vec<OsString>, String> {
    let mut flags = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(':').ok_or_else(|| {
            format!(
                "{}:{}: expected `key: value`, found {line:?}",
                path.display(),
                n + 1
            )
        })?;
        let kebab = key.trim().replace('_', "-");
        let key = if longs.contains(&kebab.as_str()) {
            kebab.as_str()
        } else {
            key.trim()
        };
        if !longs.contains(&key) && !aliases.contains(&key) {
            return Err(format!(
                "{}:{}: unknown key {key:?} (the keys are train's flags: effnet train --help)",
                path.display(),
                n + 1
            ));
        }
        let mut value = value.trim().to_string();
        if value.starts_with('"') {
            value = serde_json::from_str(&value)
                .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        }
        if value == "null" || value.is_empty() {
            continue;
        }
        if switches.contains(&key) {
            match value.as_str() {
                "true" => flags.push(format!("--{key}").into()),
                "false" => {}
                v => {
                    return Err(format!(
                        "{}:{}: {key} is a switch: true or false, not {v:?}",
                        path.display(),
                        n + 1
                    ))
                }
            }
        } else {
            flags.push(format!("--{key}").into());
            flags.push(value.into());
        }
    }
    Ok(flags)
}

/// The command line with `--config FILE`'s flags placed before the user's own (later flags win).
pub fn with_config_file(
    args: Vec<OsString>,
    command: &clap::Command,
) -> Result<Vec<OsString>, String> {
    let Some(pos) = args
        .iter()
        .position(|a| a == "--config" || a.to_string_lossy().starts_with("--config="))
    else {
        return Ok(args);
    };
    let path = match args[pos].to_string_lossy().strip_prefix("--config=") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(args.get(pos + 1).ok_or("--config needs a file")?),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Switches are the flags that take no value.
    let train = command.find_subcommand("train").ok_or("no train command")?;
    let switches: Vec<&str> = train
        .get_arguments()
        .filter(|a| matches!(a.get_action(), ArgAction::SetTrue))
        .filter_map(|a| a.get_long())
        .collect();
    let longs: Vec<&str> = train.get_arguments().filter_map(|a| a.get_long()).collect();
    let aliases: Vec<&str> = train
        .get_arguments()
        .flat_map(|a| a.get_all_aliases().unwrap_or_default())
        .collect();
    let file_flags = config_flags(&path, &text, &longs, &aliases, &switches)?;
    // Insert after the subcommand name: `effnet [global flags] train <file flags> <user flags>`.
    let sub = args
        .iter()
        .position(|a| a == "train" || a == "train_and_eval" || a == "train-and-eval")
        .ok_or("--config belongs to train or train_and_eval")?;
    let mut out = args[..=sub].to_vec();
    out.extend(file_flags);
    out.extend_from_slice(&args[sub + 1..]);
    Ok(out)
}

/// `MIN,MAX` with 0 < MIN ≤ MAX ≤ 1.
fn parse_area_range(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("{s:?}: expected MIN,MAX with 0 < MIN ≤ MAX ≤ 1, such as 0.7,1");
    let (min, max) = s.split_once(',').ok_or_else(bad)?;
    let min: f64 = min.trim().parse().map_err(|_| bad())?;
    let max: f64 = max.trim().parse().map_err(|_| bad())?;
    if 0.0 < min && min <= max && max <= 1.0 {
        Ok((min, max))
    } else {
        Err(bad())
    }
}
