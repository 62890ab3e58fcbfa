//! `effnet selftest --device cuda`: the GPU's passes compared with the CPU engine's, op by op,
//! and the `--device cuda` benchmarks. Built with the `cuda` feature.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

use clap::Args;

use crate::bench::BenchArgs;
use effnet_cuda::classify::GpuClassifier;
use effnet_cuda::device::{addr, linear, Gpu, Math};
use effnet_cuda::net::GpuNet;
use effnet_cuda::passes::GpuPasses;
use effnet_cuda::state::{DeviceState, Exchange};
use effnet_engine::loss;
use effnet_engine::rng::Rng;
use effnet_model::network::{ConvKind, Layer};
use effnet_model::{arch, Mode, Network, ParamKind, Weights};
use effnet_train::ema::Ema;
use effnet_train::optim::{self, Kind, Optimizer};
use effnet_train::schedule::{Decay, Schedule};
use effnet_train::trainer::{Replicas, StateMut, StateRef, TrainConfig, Trainer, Update};

#[derive(Args)]
pub struct SelftestArgs {
    /// The device to test against the CPU engine (`cuda`).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Architecture whose every layer is compared.
    #[arg(long, default_value = "efficientnetv2_s")]
    arch: String,
    #[arg(long = "batch-size", default_value_t = 4)]
    batch_size: usize,
    #[arg(long = "img-size", default_value_t = 64)]
    img_size: usize,
    /// `f32` (plain fused multiply-adds), `tf32` (tensor cores), `bf16` or `f16` (mixed
    /// precision: 16-bit activations, f32 sums; looser tolerances still).
    #[arg(long, default_value = "f32")]
    math: String,
}

/// What `--math` names `math`.
fn math_name(math: Math) -> &'static str {
    match math {
        Math::F32 => "f32",
        Math::Tf32 => "tf32",
        Math::Bf16 => "bf16",
        Math::F16 => "f16",
    }
}

pub fn parse_math(s: &str) -> Result<Math, String> {
    match s {
        "f32" => Ok(Math::F32),
        "tf32" => Ok(Math::Tf32),
        "bf16" => Ok(Math::Bf16),
        "f16" => Ok(Math::F16),
        _ => Err(format!(
            "unknown --math {s:?}: expected f32, tf32, bf16 or f16"
        )),
    }
}

/// The GPU math of `--math`, or mixed precision for `--precision bf16` (the CPU's flag for it).
pub fn math_or_precision(math: &str, precision: &str) -> Result<Math, String> {
    match precision {
        "bf16" => Ok(Math::Bf16),
        _ => parse_math(math),
    }
}

/// The GPU of this process's local rank, announced on stderr (stdout may be JSON or CSV).
/// `math` None: mixed precision as the chip has it, bf16 from compute capability 8.0 (Ampere)
/// on, f16 with loss scaling on Volta and Turing (`train --use-amp`).
pub fn open_gpu(device: &str, math: Option<Math>) -> Result<Gpu, String> {
    if device != "cuda" {
        return Err(format!("unknown --device {device:?}: expected cuda"));
    }
    let ordinal = local_rank();
    let gpu = Gpu::new(ordinal, math)?;
    eprintln!(
        "device {ordinal}: {} (compute capability {}.{}), math {:?}",
        gpu.name, gpu.capability.0, gpu.capability.1, gpu.math
    );
    Ok(gpu)
}

/// This process's index among those of its machine (Open MPI, Slurm, or torchrun's variable):
/// the GPU it takes under `mpirun -np N`, one process per GPU; 0 alone.
fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// max |a − b| / max |b|: the error relative to the reference's scale.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    // NaN anywhere fails the comparison.
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale.max(1e-12)
}

fn layer_kind(layer: &Layer, i: usize) -> &'static str {
    match layer {
        Layer::Conv(_) if i == 0 => "stem conv + bn + act",
        Layer::Conv(u) => match (u.conv, u.kernel, u.stride) {
            (ConvKind::Depthwise, _, _) => "depthwise + bn + act",
            (ConvKind::Dense, 1, 1) => "conv 1x1 + bn + act",
            _ => "conv kxk + bn + act",
        },
        Layer::Se(_) => "squeeze-excite",
    }
}

/// Rows of the report: (pass, op) → worst relative error.
#[derive(Default)]
struct Report {
    rows: BTreeMap<(String, String), f64>,
}

impl Report {
    fn add(&mut self, pass: &str, op: &str, err: f64) {
        let e = self
            .rows
            .entry((pass.to_string(), op.to_string()))
            .or_insert(0.0);
        // NaN stays visible: it wins over any number.
        if err.is_nan() || err > *e {
            *e = err;
        }
    }
}

/// Random BN statistics and affine parameters, so that folding and normalization are tested
/// away from the identity that a fresh initialization gives.
fn perturb_batch_norm(net: &Network, w: &mut Weights, rng: &mut Rng) {
    for e in &net.layout.params {
        match e.kind {
            ParamKind::BnWeight => w.params[e.range.clone()]
                .iter_mut()
                .for_each(|v| *v = rng.uniform_in(0.5, 1.5) as f32),
            ParamKind::BnBias => w.params[e.range.clone()]
                .iter_mut()
                .for_each(|v| *v = 0.1 * rng.normal() as f32),
            _ => {}
        }
    }
    for e in &net.layout.buffers {
        match e.kind {
            ParamKind::RunningMean => w.buffers[e.range.clone()]
                .iter_mut()
                .for_each(|v| *v = 0.1 * rng.normal() as f32),
            ParamKind::RunningVar => w.buffers[e.range.clone()]
                .iter_mut()
                .for_each(|v| *v = rng.uniform_in(0.5, 1.5) as f32),
            _ => {}
        }
    }
}

pub fn selftest(args: &SelftestArgs) -> Result<(), String> {
    let math = parse_math(&args.math)?;
    let gpu = Rc::new(open_gpu(&args.device, Some(math))?);
    let net = Network::new(arch(&args.arch)?);
    let (n, s) = (args.batch_size, args.img_size);
    if n < 2 || s < 8 {
        return Err(
            "--batch-size must be at least 2 (batch statistics) and --img-size at least 8".into(),
        );
    }
    println!(
        "{} on {n} × {s}×{s} random images: every layer, the loss and every gradient",
        net.config.name
    );
    let mut rng = Rng::new(11);
    let mut cpu_w = Weights::init(&net, 7);
    perturb_batch_norm(&net, &mut cpu_w, &mut rng);
    let mut gpu_net = GpuNet::new(&gpu, &net, &cpu_w)?;
    let input: Vec<f32> = (0..n * s * s * 3).map(|_| rng.normal() as f32).collect();
    let mut ws = net.workspace(n, s, s);
    let mut gws = gpu_net.workspace(&gpu, n, s, s, true)?;
    let mut report = Report::default();
    let compare_layers = |report: &mut Report,
                          pass: &str,
                          ws: &effnet_model::Workspace,
                          gws: &effnet_cuda::net::GpuWorkspace|
     -> Result<(), String> {
        for (i, layer) in net.layers.iter().enumerate() {
            let got = gws.layer_output(&gpu, i)?;
            report.add(
                pass,
                layer_kind(layer, i),
                rel_err(&got, ws.layer_output(i)),
            );
        }
        Ok(())
    };

    // Eval: running statistics folded into the convolutions' outputs.
    let cpu_logits = net
        .forward(&mut cpu_w, &mut ws, &input, Mode::Eval, &mut Rng::new(3))
        .to_vec();
    gpu_net.write_input(&gpu, &mut gws, &input)?;
    gpu_net.forward(&gpu, &mut gws, Mode::Eval, &mut Rng::new(3))?;
    compare_layers(&mut report, "eval forward", &ws, &gws)?;
    let logits = gpu_net.logits(&gpu, &gws)?;
    report.add(
        "eval forward",
        "pool + classifier (logits)",
        rel_err(&logits, &cpu_logits),
    );

    // Training: batch statistics, running-statistic updates, drop-path and dropout masks drawn
    // from the same generator on both sides.
    let mode = Mode::Train {
        bn_momentum: 0.1,
        stochastic: true,
    };
    let cpu_logits = net
        .forward(&mut cpu_w, &mut ws, &input, mode, &mut Rng::new(5))
        .to_vec();
    gpu_net.forward(&gpu, &mut gws, mode, &mut Rng::new(5))?;
    compare_layers(&mut report, "train forward", &ws, &gws)?;
    let logits = gpu_net.logits(&gpu, &gws)?;
    report.add(
        "train forward",
        "pool + dropout + classifier (logits)",
        rel_err(&logits, &cpu_logits),
    );
    let gpu_w = gpu_net.weights(&gpu)?;
    report.add(
        "train forward",
        "running statistics",
        rel_err(&gpu_w.buffers, &cpu_w.buffers),
    );
    let counters_match = gpu_w.tracked == cpu_w.tracked;
    report.add(
        "train forward",
        "batch counters (exact)",
        if counters_match { 0.0 } else { f64::INFINITY },
    );

    // Loss and backward.
    let labels: Vec<usize> = (0..n).map(|_| rng.below(net.classes)).collect();
    let mut targets = vec![0f32; n * net.classes];
    loss::smoothed_targets(&labels, net.classes, 0.1, &mut targets);
    let mut dlogits = vec![0f32; n * net.classes];
    let cpu_loss = loss::softmax_cross_entropy(&cpu_logits, net.classes, &targets, &mut dlogits);
    let mut cpu_grads = vec![0f32; cpu_w.params.len()];
    net.backward(&cpu_w, &mut ws, &dlogits, &mut cpu_grads);
    gpu_net.zero_grads(&gpu)?;
    let gpu_loss = gpu_net.loss(&gpu, &mut gws, &targets)?;
    // f16 activation gradients would underflow unscaled: training scales the loss, so here.
    let grad_scale = if math == Math::F16 { 1024.0 } else { 1.0 };
    if grad_scale != 1.0 {
        let scaled: Vec<f32> = dlogits.iter().map(|d| d * grad_scale).collect();
        gpu_net.write_dlogits(&gpu, &mut gws, &scaled)?;
    }
    gpu_net.backward(&gpu, &mut gws)?;
    report.add(
        "backward",
        "softmax cross-entropy (loss)",
        rel_err(&[gpu_loss], &[cpu_loss]),
    );
    let grads: Vec<f32> = gpu_net
        .grads(&gpu)?
        .iter()
        .map(|g| g / grad_scale)
        .collect();
    for e in &net.layout.params {
        let op = format!("gradient of {:?}", e.kind);
        report.add(
            "backward",
            &op,
            rel_err(&grads[e.range.clone()], &cpu_grads[e.range.clone()]),
        );
    }

    // `predict`, `eval` and a training run's evaluations: the eval pass run directly, then
    // captured as a CUDA graph and replayed, then replayed on new weights, computes the CPU's
    // logits each time.
    let mut classifier = GpuClassifier::new(gpu.clone(), &net, &cpu_w)?;
    let cpu_logits = net
        .forward(&mut cpu_w, &mut ws, &input, Mode::Eval, &mut Rng::new(3))
        .to_vec();
    let mut worst = 0f64;
    for _ in 0..3 {
        worst = worst.max(rel_err(&classifier.logits(&input, n, s)?, &cpu_logits));
    }
    report.add("cuda graph", "eval pass: direct, captured, replayed", worst);
    let mut other = Weights::init(&net, 8);
    perturb_batch_norm(&net, &mut other, &mut rng);
    classifier.set_weights(&other)?;
    let cpu_logits = net
        .forward(&mut other, &mut ws, &input, Mode::Eval, &mut Rng::new(3))
        .to_vec();
    report.add(
        "cuda graph",
        "eval pass replayed on new weights",
        rel_err(&classifier.logits(&input, n, s)?, &cpu_logits),
    );
    drop(classifier);

    compare_updates(&gpu, &net, &mut gpu_net, &cpu_w, &mut report)?;
    drop((gws, gpu_net));
    compare_training(&gpu, &net, &cpu_w, n, s, &mut report)?;
    // The training passes' graphs (captured at the second micro-batch) and the eval pass's.
    report.add(
        "cuda graph",
        "every pass captured (exact)",
        if gpu.capture_failures.get() == 0 {
            0.0
        } else {
            f64::INFINITY
        },
    );

    // Tolerances: f32 differs from the CPU only by summation order (cuDNN's and cuBLAS's
    // algorithms); TF32 rounds products' inputs to 10 mantissa bits.
    // bf16 stores every activation with 8 significant bits (relative rounding 2⁻⁹), compounding
    // over the layers; the CPU side stays f32. f16 keeps 11 (2⁻¹²) and rounds products' inputs
    // as TF32 does, then stores: between the two.
    let (tol_fwd, tol_bwd) = match math {
        Math::F32 => (1e-3, 1e-2),
        Math::Tf32 => (3e-2, 1e-1),
        Math::F16 => (5e-2, 1.5e-1),
        Math::Bf16 => (8e-2, 2.5e-1),
    };
    println!(
        "{:<14} {:<40} {:>12} {:>10} {:>6}",
        "pass", "op", "max rel err", "tolerance", ""
    );
    let mut failed = 0;
    for ((pass, op), err) in &report.rows {
        let tol = if pass == "backward" { tol_bwd } else { tol_fwd };
        let ok = *err <= tol;
        failed += usize::from(!ok);
        println!(
            "{pass:<14} {op:<40} {err:>12.2e} {tol:>10.0e} {:>6}",
            if ok { "ok" } else { "FAIL" }
        );
    }
    if failed > 0 {
        return Err(format!(
            "{failed} of {} comparisons failed",
            report.rows.len()
        ));
    }
    println!("all {} comparisons within tolerance", report.rows.len());
    Ok(())
}

/// Two optimizer steps of every kind on the device (the second clipped), slots and EMA
/// included, against the CPU's [`Optimizer`] and [`Ema`] from the same state and gradients.
fn compare_updates(
    gpu: &Gpu,
    net: &Network,
    gpu_net: &mut GpuNet,
    w: &Weights,
    report: &mut Report,
) -> Result<(), String> {
    let kinds = [
        Kind::RmsProp {
            rho: 0.9,
            momentum: 0.9,
            epsilon: 1e-3,
        },
        Kind::Sgd {
            momentum: 0.9,
            nesterov: true,
        },
        Kind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-7,
        },
        Kind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-7,
        },
    ];
    let mut rng = Rng::new(17);
    let grads: Vec<Vec<f32>> = (0..2)
        .map(|_| {
            (0..w.params.len())
                .map(|_| 0.01 * rng.normal() as f32)
                .collect()
        })
        .collect();
    for kind in kinds {
        let mut opt = Optimizer::new(kind, 1e-5, &net.layout);
        let mut ema = Ema::new(w, 0.999);
        let mut params = w.params.clone();
        let mut refused_wrongly = false;
        let mut state = DeviceState::new(
            gpu,
            gpu_net,
            StateRef {
                params: &params,
                optimizer: &opt,
                ema: Some(&ema),
            },
        )?;
        gpu.write(&w.buffers, &mut gpu_net.buffers)?;
        let mut exchange = 0.0;
        for (i, g) in grads.iter().enumerate() {
            let (lr, clip) = (0.01, if i == 1 { 0.5 } else { 0.0 });
            gpu.write(g, &mut gpu_net.grads)?;
            let mut g = g.clone();
            if clip > 0.0 {
                optim::clip_global_norm(&mut g, clip);
            }
            opt.apply(&mut params, &g, lr);
            let current = Weights {
                params: params.clone(),
                ..w.clone()
            };
            ema.update(&current, opt.step);
            let stepped = state.update(
                gpu,
                gpu_net,
                &Update {
                    optimizer: &opt,
                    lr,
                    grad_scale: 1.0,
                    clip_norm: clip,
                    ema_decay: Some(ema.decay_at(opt.step) as f32),
                    replicas: &Replicas::single(),
                },
                &mut Exchange::default(),
                true,
            )?;
            exchange += stepped.exchange_seconds;
            refused_wrongly |= !stepped.applied;
        }
        // Loss scaling's overflow: a gradient holding inf is refused, and nothing moves.
        let mut overflowed = grads[0].clone();
        let middle = overflowed.len() / 2;
        overflowed[middle] = f32::INFINITY;
        gpu.write(&overflowed, &mut gpu_net.grads)?;
        let stepped = state.update(
            gpu,
            gpu_net,
            &Update {
                optimizer: &opt,
                lr: 0.01,
                grad_scale: 1.0,
                clip_norm: 0.0,
                ema_decay: Some(0.5),
                replicas: &Replicas::single(),
            },
            &mut Exchange::default(),
            true,
        )?;
        if stepped.applied || refused_wrongly {
            exchange = f64::INFINITY;
        }
        let mut got_params = vec![0f32; params.len()];
        let mut got_opt = Optimizer::new(kind, 1e-5, &net.layout);
        let mut got_ema = Ema::new(w, 0.999);
        state.read(
            gpu,
            gpu_net,
            StateMut {
                params: &mut got_params,
                optimizer: &mut got_opt,
                ema: Some(&mut got_ema),
            },
        )?;
        let name = format!("{kind:?}");
        let name = name.split_whitespace().next().unwrap_or("");
        let worst = [
            rel_err(&got_params, &params),
            rel_err(&got_opt.slot_a, &opt.slot_a),
            rel_err(&got_opt.slot_b, &opt.slot_b),
            rel_err(&got_ema.params, &ema.params),
            rel_err(&got_ema.buffers, &ema.buffers),
            exchange, // one process: nothing exchanged (inf: a step refused or taken wrongly)
        ]
        .into_iter()
        .fold(0f64, |m, e| if e.is_nan() || e > m { e } else { m });
        report.add(
            "optimizer",
            &format!("{name} steps, slots, EMA, overflow"),
            worst,
        );
    }
    Ok(())
}

/// The reference's training recipe in small (RMSProp, label smoothing 0.1, BN momentum 0.99,
/// L2 1e-5, warm-up then cosine over `total_steps`, EMA 0.9999), for the GPU's trainer checks.
fn recipe(total_steps: u64) -> TrainConfig {
    TrainConfig {
        accumulation: 1,
        label_smoothing: 0.1,
        bn_momentum: 0.99,
        optimizer: Kind::RmsProp {
            rho: 0.9,
            momentum: 0.9,
            epsilon: 1e-3,
        },
        weight_decay: 1e-5,
        schedule: Schedule {
            peak: 0.01,
            warmup_steps: 1,
            total_steps,
            decay: Decay::Cosine,
        },
        ema_decay: Some(0.9999),
        grad_clip_norm: 0.0,
        seed: 1,
    }
}

/// Four micro-batches (two accumulated steps, RMSProp, clipping, EMA) through the trainer on
/// the GPU's passes — state held on the device, passes replayed from CUDA graphs after the
/// first — against the same on the CPU engine: losses, then weights, slots and EMA.
fn compare_training(
    gpu: &Rc<Gpu>,
    net: &Network,
    w: &Weights,
    n: usize,
    s: usize,
    report: &mut Report,
) -> Result<(), String> {
    let config = TrainConfig {
        accumulation: 2,
        // Clipping to a norm of 1 would hide a wrong loss-scale division (both sides clip to
        // the same gradient): f16 trains unclipped here (compare_updates tests clipping).
        grad_clip_norm: if gpu.math == Math::F16 { 0.0 } else { 1.0 },
        ema_decay: Some(0.999),
        seed: 3,
        ..recipe(10)
    };
    let mut cpu = Trainer::new(net.clone(), w.clone(), config.clone());
    let mut dev = Trainer::new(net.clone(), w.clone(), config);
    let mut passes = GpuPasses::new(gpu.clone(), net, w)?;
    // A random network's first f16 step at the usual 2¹⁵ may overflow and be skipped, which
    // the CPU would not do; 2¹⁰ keeps both in step while still scaling.
    passes.set_loss_scale(1024.0);
    dev.set_passes(Box::new(passes))?;
    let mut rng = Rng::new(23);
    let mut losses = (vec![], vec![]);
    let mut skips = 0;
    for _ in 0..4 {
        let x: Vec<f32> = (0..n * s * s * 3).map(|_| rng.normal() as f32).collect();
        let labels: Vec<usize> = (0..n).map(|_| rng.below(net.classes)).collect();
        let t = effnet_train::trainer::smoothed(&labels, net.classes, 0.1);
        let r = dev.micro_step(&x, n, s, &t)?;
        skips += usize::from(r.skipped);
        losses.0.push(r.loss);
        losses.1.push(cpu.micro_step(&x, n, s, &t)?.loss);
    }
    report.add(
        "trainer",
        "micro-batch losses",
        rel_err(&losses.0, &losses.1),
    );
    report.add(
        "trainer",
        "no step skipped (exact)",
        if skips == 0 { 0.0 } else { f64::INFINITY },
    );
    let (mut got, mut want) = (dev.evaluation_weights(true)?, cpu.evaluation_weights(true)?);
    report.add(
        "trainer",
        "EMA weights after 2 steps",
        rel_err(&got.params, &want.params),
    );
    // An evaluation through the trainer: the EMA weights loaded onto the GPU once.
    let x: Vec<f32> = (0..n * s * s * 3).map(|_| rng.normal() as f32).collect();
    let got_logits = dev.evaluator(&mut got)?.logits(&x, n, s)?;
    let want_logits = cpu.evaluator(&mut want)?.logits(&x, n, s)?;
    report.add(
        "trainer",
        "evaluation of the EMA weights (logits)",
        rel_err(&got_logits, &want_logits),
    );
    // Precise BN of the raw and EMA weights over two batches.
    let batches: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..n * s * s * 3).map(|_| rng.normal() as f32).collect())
        .collect();
    let mut on_gpu = [dev.evaluation_weights(false)?, got];
    let mut on_cpu = [cpu.evaluation_weights(false)?, want];
    let mut gpu_sets: Vec<&mut Weights> = on_gpu.iter_mut().collect();
    dev.recompute_bn_stats(&mut gpu_sets, &mut batches.clone().into_iter(), n, s)?;
    let mut cpu_sets: Vec<&mut Weights> = on_cpu.iter_mut().collect();
    cpu.recompute_bn_stats(&mut cpu_sets, &mut batches.into_iter(), n, s)?;
    for (name, g, c) in [
        ("raw", &on_gpu[0], &on_cpu[0]),
        ("EMA", &on_gpu[1], &on_cpu[1]),
    ] {
        report.add(
            "trainer",
            &format!("precise BN statistics, {name} weights"),
            rel_err(&g.buffers, &c.buffers),
        );
        report.add(
            "trainer",
            &format!("precise BN batch counters, {name} (exact)"),
            if g.tracked == c.tracked {
                0.0
            } else {
                f64::INFINITY
            },
        );
    }
    report.add(
        "trainer",
        "running statistics",
        rel_err(&dev.weights.buffers, &cpu.weights.buffers),
    );
    report.add(
        "trainer",
        "weights after 2 steps",
        rel_err(&dev.weights.params, &cpu.weights.params),
    );
    report.add(
        "trainer",
        "optimizer slots",
        rel_err(&dev.optimizer.slot_b, &cpu.optimizer.slot_b),
    );
    Ok(())
}

/// Training (forward, loss, backward, SGD momentum) or inference steps timed on the GPU, in
/// the peers' schema with `--json`.
pub fn bench(args: &BenchArgs, training: bool) -> Result<(), String> {
    // `--precision bf16` asks for mixed precision, as on the CPU.
    let math = math_or_precision(&args.math, &args.precision)?;
    let gpu = Rc::new(open_gpu("cuda", Some(math))?);
    let net = Network::new(arch(&args.arch)?);
    let weights = Weights::init(&net, 0);
    let mut g = GpuNet::new(&gpu, &net, &weights)?;
    let len = weights.params.len();
    let velocity = gpu.zeros::<f32>(len)?;
    let ones = gpu.upload(&vec![1f32; len])?;
    let mut rng = Rng::new(1);
    let mode_name = if training { "train" } else { "infer" };
    for &n in &args.batch_sizes {
        let s = args.img_size;
        let mut ws = g.workspace(&gpu, n, s, s, training)?;
        let input: Vec<f32> = (0..n * s * s * 3).map(|_| rng.normal() as f32).collect();
        let labels: Vec<usize> = (0..n).map(|_| rng.below(net.classes)).collect();
        let mut targets = vec![0f32; n * net.classes];
        loss::smoothed_targets(&labels, net.classes, 0.0, &mut targets);
        // The input and targets stay on the device, as the peer's do.
        g.write_input(&gpu, &mut ws, &input)?;
        g.write_targets(&gpu, &mut ws, &targets)?;
        let mode = if training {
            Mode::Train {
                bn_momentum: 0.1,
                stochastic: true,
            }
        } else {
            Mode::Eval
        };
        // The device work of one step: the forward pass (and for training: cross-entropy,
        // backward, SGD with momentum 0.9), on the masks drawn before it.
        let device_step =
            |g: &GpuNet, ws: &mut effnet_cuda::net::GpuWorkspace| -> Result<(), String> {
                g.forward_launches(&gpu, ws, mode)?;
                if !training {
                    return Ok(());
                }
                g.zero_grads(&gpu)?;
                g.loss_launches(&gpu, ws)?;
                g.backward(&gpu, ws)?;
                let st = &gpu.stream;
                gpu.launch(
                    "sgd_update",
                    linear(len),
                    &[
                        &addr(&g.params, st, 0),
                        &addr(&g.grads, st, 0),
                        &addr(&ones, st, 0),
                        &addr(&velocity, st, 0),
                        &(len as i64),
                        &0.01f32,
                        &0.9f32,
                        &0i32,
                        &0f32,
                    ],
                )
            };
        // One step run directly settles cuDNN's algorithms and loads the kernels; then the
        // step is captured as a CUDA graph and replayed (or run directly if capture fails).
        g.draw_masks(&gpu, &mut ws, mode, &mut rng)?;
        device_step(&g, &mut ws)?;
        gpu.sync()?;
        let graph = match gpu.capture(|| device_step(&g, &mut ws)) {
            Ok(graph) => Some(graph),
            Err(e) => {
                eprintln!("effnet: no CUDA graph ({e}); running the step directly");
                None
            }
        };
        let mut times = Vec::new();
        for step in 0..args.warmup + args.steps {
            let t = Instant::now();
            g.draw_masks(&gpu, &mut ws, mode, &mut rng)?;
            match &graph {
                Some(graph) => graph
                    .launch()
                    .map_err(|e| format!("replaying the graph: {e:?}"))?,
                None => device_step(&g, &mut ws)?,
            }
            g.count_batches(mode);
            gpu.sync()?;
            if step >= args.warmup {
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let suffix = if graph.is_some() { "-graph" } else { "" };
        print_case(args, &gpu, &net, mode_name, suffix, n, &mut times);
        if training {
            drop((graph, ws)); // the trainer plans its own workspace
            let mut times = trainer_step_times(&gpu, &net, &weights, args, n, &input, &labels)?;
            print_case(args, &gpu, &net, mode_name, "-trainer", n, &mut times);
        }
    }
    Ok(())
}

/// One benchmark case's median, as a peers' JSON line or a sentence.
fn print_case(
    args: &BenchArgs,
    gpu: &Gpu,
    net: &Network,
    mode_name: &str,
    suffix: &str,
    n: usize,
    times: &mut [f64],
) {
    times.sort_by(f64::total_cmp);
    let median = crate::bench::percentile(times, 50.0);
    let img_s = n as f64 * 1000.0 / median;
    let s = args.img_size;
    let math = math_name(gpu.math);
    if args.json {
        let line = serde_json::json!({
            "impl": format!("effnet-{}-cuda-{math}{suffix}", env!("CARGO_PKG_VERSION")),
            "arch": format!("tf_{}", net.config.name),
            "mode": mode_name,
            "batch": n,
            "res": s,
            "median_ms": (median * 100.0).round() / 100.0,
            "img_per_s": (img_s * 100.0).round() / 100.0,
            "device": gpu.name,
        });
        println!("{line}");
    } else {
        let how = match suffix {
            "-trainer" => " through the trainer: RMSProp, EMA, the loss on the host",
            "-graph" => " as one CUDA graph",
            _ => "",
        };
        println!(
            "{} {mode_name} batch {n} at {s}×{s} ({math}){how}: {img_s:.1} img/s, median {median:.2} ms",
            net.config.name,
        );
    }
}

/// Milliseconds of each timed micro-batch of `effnet train --device cuda`'s own step (the
/// reference's recipe: RMSProp, label smoothing, EMA; images uploaded, the loss on the host,
/// forward and backward replayed as graphs, the update on the device), beside the one-graph
/// step above that matches the PyTorch peer's.
fn trainer_step_times(
    gpu: &Rc<Gpu>,
    net: &Network,
    weights: &Weights,
    args: &BenchArgs,
    n: usize,
    input: &[f32],
    labels: &[usize],
) -> Result<Vec<f64>, String> {
    let config = recipe(1_000_000);
    let mut t = Trainer::new(net.clone(), weights.clone(), config);
    t.set_passes(Box::new(GpuPasses::new(gpu.clone(), net, weights)?))?;
    let targets = effnet_train::trainer::smoothed(labels, net.classes, 0.1);
    let s = args.img_size;
    let mut times = Vec::new();
    // Two more warm-up steps than asked: the first runs directly, the second is captured.
    for step in 0..args.warmup + 2 + args.steps {
        let started = Instant::now();
        t.micro_step(input, n, s, &targets)?;
        if step >= args.warmup + 2 {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(times)
}
