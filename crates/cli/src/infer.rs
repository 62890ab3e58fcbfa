//! `predict` and `eval`: images through a trained network.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use effnet_data::{files, labels, npy, Crop, Image, Interpolation, Normalize, Transform};
use effnet_engine::rng::Rng;
use effnet_engine::{loss, Precision};
use effnet_model::{weights, Mode, Network, Weights, Workspace};

use crate::bench::percentile;
use crate::dllogger;

/// An image file's bytes for the eval transform, which decodes only what its crop reads.
fn read_image(path: &Path) -> Result<Image, String> {
    std::fs::read(path)
        .map(Image::Encoded)
        .map_err(|e| format!("cannot read: {e}"))
}

/// Preprocessing overrides; unset ones come from the weights' metadata, else the architecture's
/// timm defaults.
#[derive(Args, Debug, Clone)]
pub struct PreprocessArgs {
    /// Input resolution (square).
    #[arg(long = "img-size", alias = "image_size", alias = "img_size")]
    img_size: Option<usize>,
    /// Resize filter: bicubic, bilinear or nearest.
    #[arg(long)]
    interpolation: Option<String>,
    /// Crop: pct:F (timm's crop_pct), reference (the TF reference's size/(size+32)) or squash.
    #[arg(long)]
    crop: Option<String>,
    /// Normalization: imagenet, inception (x/127.5−1), keras (x/128−1), lite ((x−127)/128) or
    /// m1,m2,m3/s1,s2,s3 on 0–1 pixels.
    #[arg(long)]
    normalize: Option<String>,
}

/// The transform for `net`'s weights with the user's overrides.
pub fn transform_for(net: &Network, args: &PreprocessArgs) -> Result<Transform, String> {
    let p = &net.config.preprocess;
    let size = args.img_size.unwrap_or(p.eval_size);
    crate::check_image_size("--img-size", size)?;
    Ok(Transform {
        size,
        interpolation: Interpolation::parse(
            args.interpolation.as_deref().unwrap_or(&p.interpolation),
        )?,
        crop: Crop::parse(args.crop.as_deref().unwrap_or(&p.crop))?,
        normalize: Normalize::parse(args.normalize.as_deref().unwrap_or(&p.normalize))?,
    })
}

/// Where and how the forward passes run.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// `cpu`, or `cuda` (the GPU of this process's local rank; a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32`, or `bf16`: on the CPU the blocks' expansions on bf16 operands with f32 sums (needs
    /// AVX512_BF16; real ImageNet weights' logits within 1 % of f32's on the tested photos); on
    /// the GPU mixed precision, as `--math bf16`.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// GPU math: `tf32` (tensor cores for f32, the reference's default), `f32`, `bf16` or `f16`
    /// (16-bit activations, f32 sums).
    #[arg(long, default_value = "tf32")]
    math: String,
}

impl ComputeArgs {
    /// Checks the choice and opens the GPU, before any weights are read.
    fn open(&self) -> Result<Backend, String> {
        match crate::Device::parse(&self.device)? {
            crate::Device::Cpu => Ok(Backend::Cpu(crate::precision(&self.precision)?)),
            #[cfg(feature = "cuda")]
            crate::Device::Cuda => {
                let math = crate::cuda_cmd::math_or_precision(&self.math, &self.precision)?;
                let gpu = crate::cuda_cmd::open_gpu("cuda", Some(math))?;
                Ok(Backend::Gpu(std::rc::Rc::new(gpu)))
            }
        }
    }
}

enum Backend {
    Cpu(Precision),
    #[cfg(feature = "cuda")]
    Gpu(std::rc::Rc<effnet_cuda::device::Gpu>),
}

/// Eval-mode logits on the device the user chose.
enum Classifier {
    Cpu(Runner),
    #[cfg(feature = "cuda")]
    Gpu(effnet_cuda::classify::GpuClassifier),
}

impl Classifier {
    fn new(backend: Backend, net: Network, weights: Weights) -> Result<Classifier, String> {
        Ok(match backend {
            Backend::Cpu(precision) => Classifier::Cpu(Runner::new(net, weights, precision)),
            #[cfg(feature = "cuda")]
            Backend::Gpu(gpu) => Classifier::Gpu(effnet_cuda::classify::GpuClassifier::new(
                gpu, &net, &weights,
            )?),
        })
    }

    /// Whether the passes leave the CPU's cores free while they run (then the next batch is
    /// decoded meanwhile: [`pipelined`]).
    fn frees_the_cpu(&self) -> bool {
        match self {
            Classifier::Cpu(_) => false,
            #[cfg(feature = "cuda")]
            Classifier::Gpu(_) => true,
        }
    }

    /// Logits for `n` NHWC images of `size`×`size`.
    fn logits(&mut self, input: &[f32], n: usize, size: usize) -> Result<Vec<f32>, String> {
        match self {
            Classifier::Cpu(runner) => Ok(runner.logits(input, n, size)),
            #[cfg(feature = "cuda")]
            Classifier::Gpu(gpu) => gpu.logits(input, n, size),
        }
    }
}

/// Runs `prepare` on each of `items` and `consume` on the results, in order. With `overlap`,
/// item k + 1 is prepared on another thread while item k is consumed (a GPU's forward pass
/// then hides the decoding of the next batch); without, one after the other (the CPU engine
/// wants every core for its own passes). An error of `consume` stops both.
fn pipelined<T: Sync, U: Send>(
    items: &[T],
    overlap: bool,
    prepare: impl Fn(&T) -> U + Sync,
    mut consume: impl FnMut(U) -> Result<(), String>,
) -> Result<(), String> {
    if !overlap {
        return items.iter().try_for_each(|item| consume(prepare(item)));
    }
    std::thread::scope(|s| {
        let (ready, prepared) = std::sync::mpsc::sync_channel(1);
        let prepare = &prepare;
        s.spawn(move || {
            for item in items {
                // A closed channel: the consumer stopped on an error.
                if ready.send(prepare(item)).is_err() {
                    break;
                }
            }
        });
        prepared.into_iter().try_for_each(&mut consume)
    })
}

/// A batch of image files through the eval transform: their rows in `images` (or why each
/// could not be read).
struct Decoded<'a> {
    paths: &'a [PathBuf],
    rows: Vec<Result<usize, String>>,
    images: Vec<f32>,
}

fn decode<'a>(t: &Transform, paths: &'a [PathBuf]) -> Decoded<'a> {
    let mut images = Vec::new();
    let rows = t.batch(paths, |p| read_image(p), &mut images);
    Decoded {
        paths,
        rows,
        images,
    }
}

/// Runs eval-mode forward passes on the CPU, keeping one workspace per batch size seen.
struct Runner {
    net: Network,
    weights: Weights,
    precision: Precision,
    workspaces: Vec<((usize, usize), Workspace)>,
    rng: Rng,
}

impl Runner {
    fn new(net: Network, weights: Weights, precision: Precision) -> Runner {
        if precision == Precision::Bf16 {
            eprintln!(
                "precision: the blocks' expansions on bf16 operands (f32 sums), the rest f32"
            );
        }
        Runner {
            net,
            weights,
            precision,
            workspaces: Vec::new(),
            rng: Rng::new(0),
        }
    }

    /// Logits for `n` NHWC images of `size`×`size`.
    fn logits(&mut self, input: &[f32], n: usize, size: usize) -> Vec<f32> {
        let key = (n, size);
        let i = match self.workspaces.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                // The weights never change here: prepared once, shared by every workspace.
                let mut ws = self.net.inference_workspace(n, size, size);
                match self.workspaces.first() {
                    Some((_, first)) => ws.share_frozen(first),
                    None => self.net.freeze_in(&self.weights, &mut ws, self.precision),
                }
                self.workspaces.push((key, ws));
                self.workspaces.len() - 1
            }
        };
        let ws = &mut self.workspaces[i].1;
        self.net
            .forward(&mut self.weights, ws, input, Mode::Eval, &mut self.rng)
            .to_vec()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Csv,
}

#[derive(Args)]
pub struct PredictArgs {
    /// Image files, folders (searched recursively for .jpg/.jpeg/.png) or glob patterns.
    inputs: Vec<String>,
    /// Weights: effnet or timm `.safetensors`, or a PyTorch `.pth` state dict.
    #[arg(long)]
    weights: PathBuf,
    /// Architecture (default: from the weights' metadata).
    #[arg(long)]
    arch: Option<String>,
    #[arg(long = "batch-size", alias = "batch_size", default_value_t = 8)]
    batch_size: usize,
    /// Classes shown per image.
    #[arg(long = "top-k", default_value_t = 5)]
    top_k: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Class names, one per line (default: the 1000 ImageNet classes).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// A preprocessed NCHW float32 tensor (PyTorch's layout) instead of image files.
    #[arg(long = "input-npy")]
    input_npy: Option<PathBuf>,
    /// Write the raw logits of every image read, `[N, classes]` float32.
    #[arg(long = "logits-out")]
    logits_out: Option<PathBuf>,
    #[command(flatten)]
    compute: ComputeArgs,
    #[command(flatten)]
    preprocess: PreprocessArgs,
}

/// The class names: `file`, else the `labels.txt` beside `weights` (as `effnet train` writes
/// them) when it names as many classes, else the ImageNet classes for 1000, else numbers.
fn class_names(net: &Network, file: Option<&Path>, weights: &Path) -> Result<Vec<String>, String> {
    let beside = weights.with_file_name("labels.txt");
    let names = match file {
        Some(f) => labels::from_file(f)?,
        None => match labels::from_file(&beside) {
            Ok(names) if names.len() == net.classes => {
                eprintln!("labels: {}", beside.display());
                names
            }
            _ if net.classes == 1000 => labels::imagenet(),
            _ => (0..net.classes).map(|i| format!("class {i}")).collect(),
        },
    };
    if names.len() != net.classes {
        return Err(format!(
            "{} class names for a network with {} classes",
            names.len(),
            net.classes
        ));
    }
    Ok(names)
}

/// How a batch of `[n, classes]` logits scores against its labels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchScores {
    pub top1: usize,
    pub top5: usize,
    /// Cross-entropy summed over the batch.
    pub loss_sum: f64,
}

/// Top-1 and top-5 hits and the summed cross-entropy of a batch: `eval`'s figures, and the
/// training run's evaluation.
pub fn batch_scores(logits: &[f32], labels: &[usize], classes: usize) -> BatchScores {
    let mut targets = vec![0f32; labels.len() * classes];
    loss::smoothed_targets(labels, classes, 0.0, &mut targets);
    let mut dl = vec![0f32; logits.len()];
    let loss_sum = loss::softmax_cross_entropy(logits, classes, &targets, &mut dl) as f64
        * labels.len() as f64;
    let (mut top1, mut top5) = (0, 0);
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let top = top_k(row, 5);
        top1 += (top[0].0 == label) as usize;
        top5 += top.iter().any(|(c, _)| *c == label) as usize;
    }
    BatchScores {
        top1,
        top5,
        loss_sum,
    }
}

/// (class, probability) of the `k` most probable classes.
fn top_k(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut probs = vec![0f32; logits.len()];
    loss::softmax(logits, logits.len(), &mut probs);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    order.into_iter().take(k).map(|c| (c, probs[c])).collect()
}

fn print_prediction(format: Format, name: &str, top: &[(usize, f32)], names: &[String]) {
    match format {
        Format::Text => {
            println!("{name}");
            for (c, p) in top {
                println!("  {p:.4}  {} ({c})", names[*c]);
            }
        }
        Format::Json => {
            let top: Vec<_> = top
                .iter()
                .map(|(c, p)| serde_json::json!({"class": c, "label": names[*c], "prob": p}))
                .collect();
            println!("{}", serde_json::json!({"file": name, "top": top}));
        }
        Format::Csv => {
            for (rank, (c, p)) in top.iter().enumerate() {
                let label = names[*c].replace('"', "\"\"");
                println!(
                    "\"{}\",{},{c},\"{label}\",{p:.6}",
                    name.replace('"', "\"\""),
                    rank + 1
                );
            }
        }
    }
}

pub fn predict(args: &PredictArgs) -> Result<(), String> {
    if args.batch_size == 0 || args.top_k == 0 {
        return Err("--batch-size and --top-k must be at least 1".into());
    }
    if args.input_npy.is_some() && !args.inputs.is_empty() {
        return Err("give image files or --input-npy, not both".into());
    }
    if let Some(out) = &args.logits_out {
        crate::check_output_folder("--logits-out", out)?;
    }
    let backend = args.compute.open()?;
    let (net, w) = weights::load(&args.weights, args.arch.as_deref())?;
    let names = class_names(&net, args.labels.as_deref(), &args.weights)?;
    let k = args.top_k.min(net.classes);
    let batch_size = args.batch_size;
    let classes = net.classes;
    let transform = transform_for(&net, &args.preprocess)?;
    let mut classifier = Classifier::new(backend, net, w)?;
    let mut all_logits = Vec::new();
    if args.format == Format::Csv {
        println!("file,rank,class,label,prob");
    }
    if let Some(npy_path) = &args.input_npy {
        let (shape, values) = npy::read_f32(npy_path)?;
        let [n, 3, h, wd] = shape[..] else {
            return Err(format!(
                "{}: expected an [N, 3, H, W] tensor, found {shape:?}",
                npy_path.display()
            ));
        };
        if h != wd {
            return Err(format!(
                "{}: images must be square, found {h}×{wd}",
                npy_path.display()
            ));
        }
        if n == 0 {
            return Err(format!(
                "{}: the tensor holds no images",
                npy_path.display()
            ));
        }
        crate::check_image_size(&format!("{}: image side", npy_path.display()), h)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "{}: value {i} is not finite ({})",
                npy_path.display(),
                values[i]
            ));
        }
        for start in (0..n).step_by(batch_size) {
            let m = batch_size.min(n - start);
            let mut nhwc = vec![0f32; m * h * wd * 3];
            for b in 0..m {
                for c in 0..3 {
                    for i in 0..h * wd {
                        nhwc[(b * h * wd + i) * 3 + c] = values[((start + b) * 3 + c) * h * wd + i];
                    }
                }
            }
            let logits = classifier.logits(&nhwc, m, h)?;
            for (b, row) in logits.chunks_exact(classes).enumerate() {
                print_prediction(
                    args.format,
                    &format!("{}[{}]", npy_path.display(), start + b),
                    &top_k(row, k),
                    &names,
                );
            }
            all_logits.extend(logits);
        }
    } else {
        let paths = files::collect_images(&args.inputs)?;
        if paths.is_empty() && args.inputs.is_empty() {
            return Err("no images given".into());
        }
        if paths.is_empty() {
            return Err(format!(
                "no .jpg, .jpeg or .png images in {}",
                args.inputs.join(", ")
            ));
        }
        let t = transform;
        eprintln!("preprocess: {}", t.describe());
        let mut failed = 0;
        let chunks: Vec<&[PathBuf]> = paths.chunks(batch_size).collect();
        let overlap = classifier.frees_the_cpu();
        pipelined(
            &chunks,
            overlap,
            |chunk| decode(&t, chunk),
            |batch| {
                let n = batch.rows.iter().filter(|r| r.is_ok()).count();
                let logits = if n > 0 {
                    classifier.logits(&batch.images, n, t.size)?
                } else {
                    Vec::new()
                };
                for (path, row) in batch.paths.iter().zip(batch.rows) {
                    match row {
                        Ok(r) => {
                            let l = &logits[r * classes..][..classes];
                            print_prediction(
                                args.format,
                                &path.display().to_string(),
                                &top_k(l, k),
                                &names,
                            );
                        }
                        Err(reason) => {
                            eprintln!("effnet: {}: {reason}", path.display());
                            failed += 1;
                        }
                    }
                }
                if args.logits_out.is_some() {
                    all_logits.extend(logits);
                }
                Ok(())
            },
        )?;
        if let Some(out) = &args.logits_out {
            npy::write_f32(out, &[all_logits.len() / classes, classes], &all_logits)?;
        }
        if failed > 0 {
            return Err(format!(
                "{failed} of {} images could not be read (listed above)",
                paths.len()
            ));
        }
        return Ok(());
    }
    if let Some(out) = &args.logits_out {
        npy::write_f32(out, &[all_logits.len() / classes, classes], &all_logits)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// A labelled folder: one subfolder of images per class (sorted names give the class
    /// indices, or the names themselves when they are all numbers).
    #[arg(long = "data-dir", alias = "data_dir")]
    data_dir: PathBuf,
    #[arg(long)]
    weights: PathBuf,
    #[arg(long)]
    arch: Option<String>,
    #[arg(
        long = "batch-size",
        alias = "eval_batch_size",
        alias = "batch_size",
        default_value_t = 8
    )]
    batch_size: usize,
    /// Also append the DLLogger lines to this file.
    #[arg(long = "log-file", alias = "log_filename")]
    log_file: Option<PathBuf>,
    #[command(flatten)]
    compute: ComputeArgs,
    #[command(flatten)]
    preprocess: PreprocessArgs,
}

pub fn eval(args: &EvalArgs) -> Result<(), String> {
    if args.batch_size == 0 {
        return Err("--batch-size must be at least 1".into());
    }
    if let Some(log) = &args.log_file {
        crate::check_output_folder("--log-file", log)?;
    }
    let start = Instant::now();
    let backend = args.compute.open()?;
    let folder = files::labelled_folder(&args.data_dir)?;
    let (net, w) = weights::load(&args.weights, args.arch.as_deref())?;
    let numbered = folder.classes.iter().all(|c| c.parse::<usize>().is_ok());
    if !numbered && folder.classes.len() != net.classes {
        eprintln!(
            "effnet: warning: {} class folders for a network of {} classes: the i-th folder in \
             sorted order is scored as class i (name folders by class index to choose)",
            folder.classes.len(),
            net.classes
        );
    }
    if let Some(&(ref p, label)) = folder.samples.iter().find(|(_, l)| *l >= net.classes) {
        return Err(format!(
            "{}: class {label} but the network has {} classes",
            p.display(),
            net.classes
        ));
    }
    let t = transform_for(&net, &args.preprocess)?;
    eprintln!("preprocess: {}", t.describe());
    let classes = net.classes;
    let mut classifier = Classifier::new(backend, net, w)?;
    let (mut seen, mut top1, mut top5, mut loss_sum, mut failed) =
        (0usize, 0usize, 0usize, 0f64, 0usize);
    let mut batch_ms = Vec::new();
    let (paths, all_labels): (Vec<PathBuf>, Vec<usize>) = folder.samples.iter().cloned().unzip();
    let chunks: Vec<(&[PathBuf], &[usize])> = paths
        .chunks(args.batch_size)
        .zip(all_labels.chunks(args.batch_size))
        .collect();
    let overlap = classifier.frees_the_cpu();
    // A batch's time is the wall time from the previous result to its own: decoding and
    // forward pass one after the other on the CPU, overlapped on a GPU.
    let mut last = Instant::now();
    pipelined(
        &chunks,
        overlap,
        |(paths, labels)| (decode(&t, paths), *labels),
        |(batch, labels)| {
            let labels: Vec<usize> = labels
                .iter()
                .zip(&batch.rows)
                .filter(|(_, r)| r.is_ok())
                .map(|(l, _)| *l)
                .collect();
            for (path, r) in batch.paths.iter().zip(&batch.rows) {
                if let Err(reason) = r {
                    eprintln!("effnet: {}: {reason}", path.display());
                    failed += 1;
                }
            }
            if labels.is_empty() {
                return Ok(());
            }
            let logits = classifier.logits(&batch.images, labels.len(), t.size)?;
            let now = Instant::now();
            batch_ms.push((now - last).as_secs_f64() * 1000.0);
            last = now;
            let scores = batch_scores(&logits, &labels, classes);
            top1 += scores.top1;
            top5 += scores.top5;
            loss_sum += scores.loss_sum;
            seen += labels.len();
            Ok(())
        },
    )?;
    if seen == 0 {
        return Err(format!(
            "{}: no image could be read",
            args.data_dir.display()
        ));
    }
    // Throughput as the reference measures it: the first batch (warm-up) left out when possible.
    let timed: &[f64] = if batch_ms.len() > 1 {
        &batch_ms[1..]
    } else {
        &batch_ms
    };
    let timed_images = if batch_ms.len() > 1 {
        seen - seen.min(args.batch_size)
    } else {
        seen
    };
    let images_per_s = timed_images.max(1) as f64 * 1000.0 / timed.iter().sum::<f64>();
    let mut sorted = batch_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let data = serde_json::json!({
        "eval_loss": loss_sum / seen as f64,
        "eval_accuracy_top_1": top1 as f64 / seen as f64,
        "eval_accuracy_top_5": top5 as f64 / seen as f64,
        "eval_images": seen,
        "eval_images_unreadable": failed,
        "avg_exp_per_second_eval": images_per_s,
        "avg_time_per_exp_eval": 1000.0 / images_per_s,
        "latency_mean_ms": batch_ms.iter().sum::<f64>() / batch_ms.len() as f64,
        "latency_p50_ms": percentile(&sorted, 50.0),
        "latency_p90_ms": percentile(&sorted, 90.0),
        "latency_p95_ms": percentile(&sorted, 95.0),
        "latency_p99_ms": percentile(&sorted, 99.0),
    });
    println!("{:<26} {:>12}", "metric", "value");
    for (k, v) in data.as_object().expect("an object") {
        println!(
            "{k:<26} {:>12}",
            v.as_f64().map_or(v.to_string(), |x| format!("{x:.4}"))
        );
    }
    println!(
        "(latency: per batch of {}, wall time between results — decode then forward, or both \
         at once on a GPU — true percentiles by nearest rank)",
        args.batch_size
    );
    dllogger::log(args.log_file.as_deref(), start, serde_json::json!([]), data)?;
    if failed > 0 {
        return Err(format!(
            "{failed} of {} images could not be read (listed above)",
            folder.samples.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pipelined;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn pipelined_keeps_the_order_overlaps_and_stops_at_an_error() {
        let items: Vec<usize> = (0..50).collect();
        for overlap in [false, true] {
            let mut got = Vec::new();
            pipelined(
                &items,
                overlap,
                |i| i * 2,
                |v| {
                    got.push(v);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(got, (0..50).map(|i| i * 2).collect::<Vec<_>>());
            // An error ends the run soon: at most the item in the channel and the one being
            // prepared beyond the failing one.
            let prepared = AtomicUsize::new(0);
            let result = pipelined(
                &items,
                overlap,
                |i| {
                    prepared.fetch_add(1, Ordering::SeqCst);
                    *i
                },
                |v| {
                    if v == 3 {
                        Err(format!("item {v}"))
                    } else {
                        Ok(())
                    }
                },
            );
            assert_eq!(result, Err("item 3".to_string()));
            let prepared = prepared.load(Ordering::SeqCst);
            assert!(
                (4..=6).contains(&prepared),
                "overlap={overlap}: {prepared} prepared"
            );
        }
        // With overlap the preparing happens on another thread.
        let main = std::thread::current().id();
        let mut ids = Vec::new();
        pipelined(
            &[1, 2, 3],
            true,
            |_| std::thread::current().id(),
            |id| {
                ids.push(id);
                Ok(())
            },
        )
        .unwrap();
        assert!(ids.len() == 3 && ids.iter().all(|&id| id != main));
    }
}
