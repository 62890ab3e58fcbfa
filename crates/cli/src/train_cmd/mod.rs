//! `train` and `train_and_eval`: the reference's recipe on ImageNet-layout TFRecords, image
//! folders, or Fashion-MNIST (the Debian package `dataset-fashion-mnist`, the main job's demo),
//! in one process or many (`mpirun -np N effnet train …`: rank 0 logs and writes checkpoints).

mod args;
mod data;
mod run_files;

use std::sync::Arc;
use std::time::Instant;

use effnet_data::loader::{Loader, LoaderConfig, Stage};
use effnet_data::mix::{mix_batch, MixConfig};
use effnet_data::resize::Interpolation;
use effnet_data::sampler::CropSampler;
use effnet_data::{Crop, Normalize, Transform};
use effnet_dist::Communicator;
use effnet_engine::rng::Rng;
use effnet_model::{arch, weights, Network, Weights};
use effnet_train::checkpoint::{self, RunState};
use effnet_train::optim::Kind;
use effnet_train::schedule::{Decay, Schedule};
use effnet_train::stages::{plan, Ramp};
use effnet_train::trainer::{argmax, smoothed, Replicas, TrainConfig, Trainer};

pub use args::{with_config_file, TrainArgs};
use args::{Augmenter, LrDecay, OptimizerName};
use data::{eval_batch, Augment, Data, OpPixels, Samples, TrainSource};
use run_files::{Curves, RunFiles};

use crate::progress::Progress;

/// `train` evaluates once, at the end; `train_and_eval` also every --num-epochs-between-eval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    TrainAndEval,
}

/// What an evaluation measured, summed over the ranks' shares.
#[derive(Debug, Clone, Copy, Default)]
struct EvalResult {
    top1: f64,
    top5: f64,
    loss: f64,
    images: usize,
    seconds: f64,
}

/// Top-1, top-5 and loss of `weights` on the evaluation samples; each rank takes every
/// `size`-th sample and the sums are all-reduced, so every rank gets the whole set's figures.
fn evaluate(
    t: &mut Trainer,
    weights: &mut Weights,
    data: &dyn Samples,
    transform: &Transform,
    batch: usize,
) -> Result<EvalResult, String> {
    let comm = t.replicas.comm.clone();
    let started = Instant::now();
    let classes = t.net.classes;
    let mut sums = [0f64; 4]; // top-1, top-5, loss, images
    let indices: Vec<usize> = (comm.rank()..data.len()).step_by(comm.size()).collect();
    let mut evaluator = t.evaluator(weights)?;
    for chunk in indices.chunks(batch.max(1)) {
        let (x, labels) = eval_batch(data, chunk, transform);
        if labels.is_empty() {
            continue;
        }
        let logits = evaluator.logits(&x, labels.len(), transform.size)?;
        let scores = crate::infer::batch_scores(&logits, &labels, classes);
        sums[0] += scores.top1 as f64;
        sums[1] += scores.top5 as f64;
        sums[2] += scores.loss_sum;
        sums[3] += labels.len() as f64;
    }
    if comm.size() > 1 {
        comm.all_reduce_sum_f64(&mut sums)?;
    }
    let n = sums[3].max(1.0);
    Ok(EvalResult {
        top1: sums[0] / n,
        top5: sums[1] / n,
        loss: sums[2] / n,
        images: sums[3] as usize,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// [`Network::recompute_bn_stats`] for `weight_sets` over `batches` batches of `batch` training
/// images spread evenly over the set, through the evaluation transform (every rank uses the same
/// images, so replicas stay equal), on the trainer's device.
fn precise_bn(
    t: &mut Trainer,
    weight_sets: &mut [&mut Weights],
    data: &dyn Samples,
    transform: &Transform,
    batch: usize,
    batches: usize,
) -> Result<usize, String> {
    let step = (data.len() / (batch * batches).max(1)).max(1);
    let mut inputs = (0..batches).filter_map(|b| {
        let indices: Vec<usize> = (0..batch)
            .map(|i| ((b * batch + i) * step) % data.len())
            .collect();
        let (x, labels) = eval_batch(data, &indices, transform);
        // A batch with unreadable samples is left out (they were reported).
        (labels.len() == batch).then_some(x)
    });
    // Loaded one batch at a time as the passes consume them.
    t.recompute_bn_stats(weight_sets, &mut inputs, batch, transform.size)
}

/// The reference's `--mparams k=v,…` overrides, applied to (bn_momentum, dropout, drop_connect).
fn model_overrides(args: &TrainArgs) -> Result<(f32, Option<f32>, Option<f32>), String> {
    let (mut bn, mut dropout, mut drop_connect) =
        (args.bn_momentum, args.dropout_rate, args.drop_connect_rate);
    for pair in args
        .mparams
        .iter()
        .flat_map(|m| m.split(','))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("--mparams: expected k=v, found {pair:?}"))?;
        let v: f32 = v
            .trim()
            .parse()
            .map_err(|_| format!("--mparams: {k} needs a number, found {v:?}"))?;
        match k.trim() {
            "bn_momentum" => bn = v,
            "dropout_rate" => dropout = Some(v),
            "drop_connect_rate" => drop_connect = Some(v),
            "survival_prob" => drop_connect = Some(1.0 - v),
            other => {
                return Err(format!(
                    "--mparams: {other} is not one of bn_momentum, dropout_rate, drop_connect_rate, survival_prob"
                ))
            }
        }
    }
    // Here rather than in TrainArgs::validate: --mparams may set it too.
    if !(0.0..=1.0).contains(&bn) {
        return Err(format!("--bn-momentum {bn}: expected from 0 to 1"));
    }
    for (name, rate) in [("dropout", dropout), ("drop-connect", drop_connect)] {
        if rate.is_some_and(|r| !(0.0..1.0).contains(&r)) {
            return Err(format!(
                "the {name} rate {}: expected from 0 up to, not including, 1",
                rate.unwrap_or_default()
            ));
        }
    }
    Ok((bn, dropout, drop_connect))
}

fn optimizer(args: &TrainArgs) -> Kind {
    // The reference's β defaults of 0 stand for Keras' own (0.9, 0.999).
    let or = |v: f32, default: f32| if v > 0.0 { v } else { default };
    let (beta1, beta2) = (or(args.beta_1, 0.9), or(args.beta_2, 0.999));
    match args.optimizer {
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
            nesterov: args.nesterov || args.optimizer == OptimizerName::Momentum,
        },
        OptimizerName::Adam => Kind::Adam {
            beta1,
            beta2,
            epsilon: args.opt_epsilon,
        },
        OptimizerName::Adamw => Kind::AdamW {
            beta1,
            beta2,
            epsilon: args.opt_epsilon,
        },
    }
}

fn schedule(args: &TrainArgs, steps_per_epoch: u64, global_batch: usize) -> Schedule {
    let epoch_steps = |e: f64| (e * steps_per_epoch as f64).round() as u64;
    Schedule {
        peak: Schedule::scaled_peak(args.lr_init, global_batch),
        warmup_steps: epoch_steps(args.lr_warmup_epochs),
        total_steps: steps_per_epoch * args.epochs,
        decay: match args.lr_decay {
            LrDecay::Cosine => Decay::Cosine,
            LrDecay::Exponential => Decay::Exponential {
                rate: args.lr_decay_rate,
                every: epoch_steps(args.lr_decay_epochs).max(1),
            },
            LrDecay::Piecewise => Decay::Piecewise {
                boundaries: args.lr_boundaries.iter().map(|&e| epoch_steps(e)).collect(),
                factors: (0..=args.lr_boundaries.len())
                    .map(|k| 0.1f64.powi(k as i32))
                    .collect(),
            },
        },
    }
}

/// Sets up what `--use-amp` asks for (bf16 matrix products where the CPU has AVX512_BF16) and,
/// on the root rank (`say`), says what it and `--use-xla` do here.
fn apply_precision(args: &TrainArgs, say: bool) {
    if args.use_amp && args.device == "cuda" {
        if say {
            eprintln!(
                "effnet: --use-amp: on the GPU, activations and their gradients are stored in \
                 bf16 (f16 with dynamic loss scaling before Ampere) and convolutions run on \
                 tensor cores with f32 sums; weights, optimizer, EMA and batch-norm statistics \
                 stay f32"
            );
        }
    } else if args.use_amp {
        let note = match effnet_engine::matmul::set_bf16(true) {
            Ok(()) => "the CPU engine's matrix products (1×1 and im2col convolutions, SE, \
                       classifier) take bf16 operands with f32 sums; Winograd's 3×3 products, \
                       weights, optimizer, batch norm and activations stay f32"
                .to_string(),
            Err(e) => format!("{e}: this run computes in f32"),
        };
        if say {
            eprintln!("effnet: --use-amp: {note}");
        }
    }
    if say && args.use_xla {
        eprintln!("effnet: --use-xla: effnet's kernels are always fused; nothing changes");
    }
}

pub fn train(args: &TrainArgs, mode: Mode) -> Result<(), String> {
    let comm = effnet_dist::from_environment()?;
    if comm.size() == 1 {
        return run(args, mode, comm);
    }
    // Every rank gets the same verdict here. Each says it, and they leave together: mpirun ends
    // the other processes as soon as one exits non-zero, which could silence a slower rank.
    if let Err(e) = comm.check_same(&args.shared_config()) {
        eprintln!("effnet: {e}");
        let _ = comm.barrier();
        std::process::exit(1);
    }
    // One write, so that the ranks' lines never interleave.
    let hello = format!(
        "effnet: rank {} of {} (local rank {}, pid {}): {}\n",
        comm.rank(),
        comm.size(),
        comm.local_rank(),
        std::process::id(),
        comm.describe()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), hello.as_bytes());
    let result = run(args, mode, comm.clone());
    if let Err(e) = &result {
        // Alone in failing, this rank must take the others down, not leave them waiting.
        eprintln!("effnet: rank {}: {e}", comm.rank());
        comm.abort(1);
    }
    result
}

fn run(args: &TrainArgs, mode: Mode, comm: Arc<dyn Communicator>) -> Result<(), String> {
    let start = Instant::now();
    let (rank, world) = (comm.rank(), comm.size());
    let root = rank == 0;
    args.validate()?;
    apply_precision(args, root);
    let (bn_momentum, dropout, drop_connect) = model_overrides(args)?;
    let data = Data::open(&args.data_dir, args.max_train_images, args.max_eval_images)?;
    if data.names.len() < 2 {
        return Err(format!(
            "{}: a single class ({}): a classifier needs at least two",
            args.data_dir.display(),
            data.names.join("")
        ));
    }
    let eval_size = args.eval_img_size.unwrap_or(args.img_size);
    let mut config = arch(&args.arch)?;
    config.num_classes = data.names.len();
    config.preprocess.eval_size = eval_size;
    config.preprocess.train_size = args.img_size;
    config.preprocess.normalize = data.normalize.into();
    config.preprocess.crop = data.eval_crop.into();
    config.preprocess.interpolation = "bilinear".into();
    if let Some(d) = dropout {
        config.dropout = d;
    }
    if let Some(d) = drop_connect {
        config.drop_path = d;
    }
    let pretrained = match &args.weights {
        Some(path) => {
            let (net, w) = weights::load(path, Some(&args.arch))?;
            // The pretrained features expect their own normalization.
            config.preprocess.normalize = net.config.preprocess.normalize.clone();
            Some((path, net, w))
        }
        None => None,
    };
    let eval_transform = Transform {
        size: eval_size,
        interpolation: Interpolation::Bilinear,
        crop: Crop::parse(data.eval_crop)?,
        normalize: Normalize::parse(&config.preprocess.normalize)?,
    };
    let net = Network::new(config);
    let mut weights = Weights::init(&net, args.seed);
    if let Some((path, from_net, from)) = &pretrained {
        let fresh = weights::transfer(from_net, from, &net, &mut weights);
        if root {
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
    }

    let accum = args.grad_accum_steps;
    let global_batch = args.batch_size * accum * world;
    let available = (data.train.len() / world / (args.batch_size * accum)) as u64;
    let steps_per_epoch = args.steps_per_epoch.unwrap_or(available);
    if steps_per_epoch == 0 || steps_per_epoch > available {
        let asked = match args.steps_per_epoch {
            Some(n) => format!("--steps-per-epoch {n} does not fit"),
            None => "not one step".into(),
        };
        return Err(format!(
            "{} training images make {available} steps of {global_batch} images ({world} × {} × \
             {accum} accumulated): {asked}",
            data.train.len(),
            args.batch_size
        ));
    }
    let sched = schedule(args, steps_per_epoch, global_batch);
    let peak = sched.peak;
    let train_config = TrainConfig {
        accumulation: accum,
        label_smoothing: args.label_smoothing,
        bn_momentum,
        optimizer: optimizer(args),
        weight_decay: args.weight_decay,
        schedule: sched,
        ema_decay: (args.moving_average_decay > 0.0).then_some(args.moving_average_decay),
        grad_clip_norm: args.grad_clip_norm,
        seed: args.seed,
    };
    let mut t = Trainer::new(net, weights, train_config);
    t.set_replicas(Replicas {
        comm: comm.clone(),
        sync_bn: args.sync_bn,
        fp16_gradients: args.hvd_fp16_compression,
    });
    match crate::Device::parse(&args.device)? {
        crate::Device::Cpu => {}
        #[cfg(feature = "cuda")]
        crate::Device::Cuda => {
            // --use-amp on the GPU: 16-bit activations (bf16, or f16 with loss scaling before
            // Ampere), f32 sums and state (cuda::device::Math).
            let math = match args.use_amp {
                true => None,
                false => Some(crate::cuda_cmd::parse_math(&args.math)?),
            };
            let gpu = crate::cuda_cmd::open_gpu("cuda", math)?;
            let passes =
                effnet_cuda::passes::GpuPasses::new(std::rc::Rc::new(gpu), &t.net, &t.weights)?;
            t.set_passes(Box::new(passes))?;
        }
    }
    let files = RunFiles::new(args, root)?;
    files.log(start, "PARAMETER".into(), args.to_json())?;

    // Resume on rank 0, then every rank starts from rank 0's state.
    let mut position = RunState {
        epoch: 0,
        batch_in_epoch: 0,
    };
    if args.resume && root {
        // The newest checkpoint that loads: a damaged one (a disk error, a copy cut short) is
        // reported and the one before it taken; if none loads, the newest's error stands.
        let found = files.checkpoints_newest_first()?;
        let mut first_error = None;
        for path in &found {
            match checkpoint::load(path, &mut t) {
                Ok(at) => {
                    position = at;
                    println!(
                        "resumed from {} (epoch {}, batch {}, step {})",
                        path.display(),
                        position.epoch,
                        position.batch_in_epoch,
                        t.step()
                    );
                    first_error = None;
                    break;
                }
                Err(e) => {
                    eprintln!("effnet: cannot resume from it: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if found.is_empty() {
            println!(
                "--resume: no checkpoint in {}; training starts afresh",
                args.model_dir.display()
            );
        }
    }
    if world > 1 {
        let mut bytes: Vec<u8> = [position.epoch, position.batch_in_epoch]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        comm.broadcast_bytes(&mut bytes, 0)?;
        let word =
            |k: usize| u64::from_le_bytes(bytes[8 * k..8 * k + 8].try_into().unwrap_or([0; 8]));
        position = RunState {
            epoch: word(0),
            batch_in_epoch: word(1),
        };
    }
    t.broadcast_state()?;
    if root {
        println!(
            "training {} ({} parameters) on {} at {}×{}, batch {} × {accum} accumulated × {world} \
             processes, {} epochs of {steps_per_epoch} steps, peak lr {peak:.5}",
            t.net.config.name,
            t.net.layout.trainable_count(),
            data.description,
            args.img_size,
            args.img_size,
            args.batch_size,
            args.epochs,
        );
    }

    let classes = t.net.classes;
    let micro_per_epoch = steps_per_epoch as usize * accum;
    let geometry = OpPixels {
        translate_const: args.translate_const,
        cutout_const: args.cutout_const,
    };
    let augment = match args.augmenter_name {
        Augmenter::Randaugment => Augment::Rand {
            layers: args.raug_num_layers,
            geometry,
        },
        Augmenter::Autoaugment => Augment::Auto { geometry },
        Augmenter::None => Augment::None,
    };
    let source = TrainSource {
        data: data.train.clone(),
        crop: args.random_crop.then(|| CropSampler {
            area_range: args
                .crop_area_range
                .unwrap_or(CropSampler::default().area_range),
            ..CropSampler::default()
        }),
        translate: args.random_translate,
        augment,
        normalize: eval_transform.normalize,
    };
    let ramp = Ramp {
        img_size: (
            if args.n_stages > 1 {
                args.base_img_size
            } else {
                args.img_size
            },
            args.img_size,
        ),
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
    let first = stage_of(position.epoch);
    // The processes sharing this machine's cores (Open MPI's or torchrun's count; 1 alone).
    let local_processes = ["OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1);
    let workers = args.loader_workers(local_processes);
    let loader = Loader::new(
        Arc::new(source),
        LoaderConfig {
            rank,
            world,
            ..LoaderConfig::train(args.batch_size, workers, args.seed)
        },
        Stage {
            size: first.img_size,
            magnitude: first.magnitude,
        },
    )?;
    let mut curves = Curves::default();
    let mut last_train = (0f64, 0f64);
    let mut throughput_samples = Vec::new();
    for epoch in position.epoch..args.epochs {
        let st = stage_of(epoch);
        if root && st.first_epoch == epoch && args.n_stages > 1 {
            // The magnitude only where RandAugment runs (AutoAugment and none have none).
            let magnitude = match augment {
                Augment::Rand { .. } => format!(", RandAugment magnitude {:.2}", st.magnitude),
                Augment::Auto { .. } | Augment::None => String::new(),
            };
            println!(
                "stage {}/{}: epochs {}–{}, image {}×{}{magnitude}, mixup {:.2}, cutmix {:.2}",
                stages.iter().position(|s| *s == st).unwrap_or(0) + 1,
                stages.len(),
                st.first_epoch + 1,
                st.end_epoch,
                st.img_size,
                st.img_size,
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
        let first_batch = if epoch == position.epoch {
            position.batch_in_epoch as usize * accum
        } else {
            0
        };
        let mut progress = Progress::new(micro_per_epoch, first_batch, root);
        let label = format!("epoch {}/{}", epoch + 1, args.epochs);
        // Sums of (images, correct, loss·images) over this epoch's micro-batches.
        let mut sums = [0f64; 3];
        let t_epoch = Instant::now();
        let mut window = (0usize, Instant::now(), t.exchange_seconds);
        // The logging window's (images, correct, loss·images), for the curves.
        let mut window_sums = [0f64; 3];
        for (m, batch) in loader
            .epoch_from(epoch, first_batch)
            .enumerate()
            .map(|(k, b)| (first_batch + k, b))
            .take(micro_per_epoch - first_batch.min(micro_per_epoch))
        {
            let n = batch.len();
            // Batches depend on (seed, epoch, batch) only: a resumed run sees the same data.
            let mut mix_rng = Rng::new(args.seed).fork(2_000_000 + epoch).fork(m as u64);
            let mut x = batch.images;
            let targets = if mix.is_on() && n > 0 {
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
            if n == 0 {
                // Every image of this batch failed to load; the step still counts on every rank.
                return Err(format!(
                    "batch {m} of epoch {} has no readable image ({} skipped so far; last: {})",
                    epoch + 1,
                    loader.skipped(),
                    loader.last_error().unwrap_or_default()
                ));
            }
            let r = t.micro_step(&x, n, batch.size, &targets)?;
            if !r.loss.is_finite() {
                progress.clear();
                eprintln!(
                    "effnet: non-finite loss at step {} (batch {m} of epoch {}): the step is skipped",
                    t.step() + 1,
                    epoch + 1
                );
            }
            // (An f16 overflow's skip is the GPU's to report, with its new loss scale.)
            if r.skipped && !r.overflow && root {
                eprintln!("effnet: step skipped: a micro-batch had a non-finite loss");
            }
            if r.loss.is_finite() {
                for s in [&mut sums, &mut window_sums] {
                    s[0] += n as f64;
                    s[1] += r.correct as f64;
                    s[2] += r.loss as f64 * n as f64;
                }
            }
            window.0 += n;
            let step = t.step();
            let status = format!(
                "loss {:.4} acc {:.3}",
                sums[2] / sums[0].max(1.0),
                sums[1] / sums[0].max(1.0)
            );
            progress.update(m + 1, sums[0] as usize * world, &label, &status);
            // A skipped step did not advance `step`: nothing new to save or log.
            let advanced = r.stepped && !r.skipped;
            if advanced && args.checkpoint_steps > 0 && step.is_multiple_of(args.checkpoint_steps) {
                let here = RunState {
                    epoch,
                    batch_in_epoch: ((m + 1) / accum) as u64,
                };
                if (m + 1) < micro_per_epoch {
                    progress.clear();
                    files.save_checkpoint(&mut t, here)?;
                }
            }
            if advanced && step.is_multiple_of(args.log_steps.max(1)) {
                let secs = window.1.elapsed().as_secs_f64();
                let ips = (window.0 * world) as f64 / secs;
                let exchange = t.exchange_seconds - window.2;
                throughput_samples.push(ips);
                let lr = t.config.schedule.at(step);
                let seen = window_sums[0].max(1.0);
                curves.step(step, lr, ips, window_sums[2] / seen, window_sums[1] / seen);
                window_sums = [0.0; 3];
                if root {
                    progress.clear();
                    if !progress.is_drawn() {
                        let done = (m + 1) as f64 / micro_per_epoch as f64;
                        let eta = t_epoch.elapsed().as_secs_f64() * (1.0 - done) / done;
                        println!(
                            "{label} step {step:>5}  {status}  lr {lr:.5}  {ips:.0} img/s  \
                             all-reduce {:.0} ms/step  epoch ETA {}",
                            1e3 * exchange / args.log_steps.max(1) as f64,
                            crate::progress::clock(eta)
                        );
                    }
                    files.log(
                        start,
                        "PARAMETER".into(),
                        serde_json::json!({
                            "TimeHistory": format!("{secs:.3} seconds"),
                            "examples/second": ips,
                            "steps": [step - args.log_steps.max(1).min(step), step],
                            "learning_rate": lr,
                            "allreduce_seconds": exchange,
                        }),
                    )?;
                }
                window = (0, Instant::now(), t.exchange_seconds);
            }
        }
        progress.clear();
        let train_secs = t_epoch.elapsed().as_secs_f64();
        if world > 1 {
            comm.all_reduce_sum_f64(&mut sums)?;
        }
        let (train_loss, train_acc) = (sums[2] / sums[0].max(1.0), sums[1] / sums[0].max(1.0));
        last_train = (train_loss, train_acc);
        let mut record = serde_json::json!({
            "epoch": epoch + 1,
            "training_loss": train_loss,
            "training_accuracy_top_1": train_acc,
            "avg_exp_per_second_training": sums[0] / train_secs,
            "avg_exp_per_second_training_per_GPU": sums[0] / train_secs / world as f64,
            "learning_rate": t.config.schedule.at(t.step()),
        });
        let last = epoch + 1 == args.epochs;
        let due = (epoch + 1) % args.num_epochs_between_eval == 0 || last;
        let mut eval = None;
        if mode == Mode::TrainAndEval && !args.skip_eval && due {
            let use_ema = args.intratrain_eval_using_ema && t.ema.is_some();
            let mut w = t.evaluation_weights(use_ema)?;
            let r = evaluate(
                &mut t,
                &mut w,
                data.eval.as_ref(),
                &eval_transform,
                args.eval_batch_size,
            )?;
            record["eval_loss"] = r.loss.into();
            record["eval_accuracy_top_1"] = r.top1.into();
            record["eval_accuracy_top_5"] = r.top5.into();
            record["eval_weights"] = if use_ema { "ema" } else { "raw" }.into();
            eval = Some(r);
        }
        curves.epoch(
            t.step(),
            train_loss,
            train_acc,
            eval.map(|r| (r.loss, r.top1)),
        );
        if root {
            println!("epoch {} done: {record}", epoch + 1);
            files.log(start, serde_json::json!([epoch + 1]), record)?;
            files.write_curves(&curves)?;
            if (epoch + 1) % args.save_checkpoint_freq.max(1) == 0 || last {
                files.save_checkpoint(
                    &mut t,
                    RunState {
                        epoch: epoch + 1,
                        batch_in_epoch: 0,
                    },
                )?;
            }
        }
        if loader.skipped() > 0 && root {
            eprintln!(
                "effnet: {} training samples skipped so far (last: {})",
                loader.skipped(),
                loader.last_error().unwrap_or_default()
            );
        }
    }

    // The final model: the better of the raw and the EMA weights on the evaluation split.
    let batch = args.eval_batch_size;
    let mut raw = t.evaluation_weights(false)?;
    let mut ema = match t.ema.is_some() {
        true => Some(t.evaluation_weights(true)?),
        false => None,
    };
    let n = args.precise_bn_batches;
    if n > 0 && data.train.len() > 0 {
        let mut sets: Vec<&mut Weights> = std::iter::once(&mut raw).chain(ema.as_mut()).collect();
        let batch_size = args.batch_size;
        let used = precise_bn(
            &mut t,
            &mut sets,
            data.train.as_ref(),
            &eval_transform,
            batch_size,
            n,
        )?;
        if root {
            let which = if ema.is_some() { "raw and EMA" } else { "raw" };
            println!(
                "batch-norm statistics of the {which} weights averaged over {used} batches of {batch_size} training images"
            );
        }
    }
    let raw_result = evaluate(&mut t, &mut raw, data.eval.as_ref(), &eval_transform, batch)?;
    let mut finals = vec![("eval using original weights", raw_result)];
    let (mut best, mut source, mut best_result) = (raw, "raw", raw_result);
    if let Some(mut ema) = ema {
        let r = evaluate(&mut t, &mut ema, data.eval.as_ref(), &eval_transform, batch)?;
        finals.push(("eval using EMA weights", r));
        if r.top1 > raw_result.top1 {
            (best, source, best_result) = (ema, "ema", r);
        }
    }
    if !root {
        return Ok(());
    }
    // Keep the first 10% of throughput samples out, as the reference's TimeHistory does.
    let kept = &throughput_samples[throughput_samples.len() / 10..];
    let avg_train = match kept.len() {
        0 => 0.0, // (an empty f64 sum is −0.0)
        len => kept.iter().sum::<f64>() / len as f64,
    };
    for (comment, r) in &finals {
        files.log(
            start,
            serde_json::json!([]),
            serde_json::json!({
                "comment": comment,
                "eval_loss": r.loss,
                "eval_accuracy_top_1": r.top1,
                "eval_accuracy_top_5": r.top5,
                "training_loss": last_train.0,
                "training_accuracy_top_1": last_train.1,
                "avg_exp_per_second_training": avg_train,
                "avg_exp_per_second_training_per_GPU": avg_train / world as f64,
                "avg_exp_per_second_eval": r.images as f64 / r.seconds.max(1e-9),
                "avg_time_per_exp_eval": 1e3 * r.seconds / r.images.max(1) as f64,
            }),
        )?;
    }
    let model_path = files.write_model(&t.net, &best, source, best_result.top1, &data.names)?;
    println!(
        "wrote {} ({source} weights, top-1 {:.2}% on {} test images), labels.txt, params.yaml, {} and curves.png/.svg in {}",
        model_path.display(),
        100.0 * best_result.top1,
        best_result.images,
        args.log_filename.display(),
        args.model_dir.display()
    );
    // A few predictions, as a user would check them.
    let sample: Vec<usize> = (0..8.min(data.eval.len())).collect();
    let (x, labels) = eval_batch(data.eval.as_ref(), &sample, &eval_transform);
    let logits = t
        .evaluator(&mut best)?
        .logits(&x, labels.len(), eval_size)?;
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
