//! `inference_benchmark` and `training_benchmark`: synthetic input, random weights, timed steps.
//! With `--json`, one line per case in the peers' schema (../shared/bench/README.md).

use std::time::Instant;

use clap::Args;
use effnet_engine::rng::Rng;
use effnet_engine::{loss, Precision};
use effnet_model::{arch, Mode, Network, Weights};
use rayon::prelude::*;

#[derive(Args)]
pub struct BenchArgs {
    /// Architecture (`efficientnetv2_s`, `efficientnet_b0`, `efficientnet_lite0`, …; timm's
    /// `tf_` prefix accepted).
    #[arg(long, default_value = "efficientnetv2_s")]
    pub(crate) arch: String,
    /// Batch sizes, comma separated.
    #[arg(
        long = "batch-size",
        alias = "batch_size",
        value_delimiter = ',',
        default_value = "8"
    )]
    pub(crate) batch_sizes: Vec<usize>,
    /// Square input resolution.
    #[arg(long = "img-size", alias = "img_size", default_value_t = 224)]
    pub(crate) img_size: usize,
    /// Untimed steps before measuring.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: usize,
    /// Timed steps per batch size.
    #[arg(long, default_value_t = 10)]
    pub(crate) steps: usize,
    /// Print one JSON object per case instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Print time per operation kind after each case.
    #[arg(long)]
    pub(crate) profile: bool,
    /// `cpu`, or `cuda` (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// GPU math: `tf32` (tensor cores for f32, the reference's default), `f32`, `bf16` (mixed
    /// precision; also what `--precision bf16` gives on the GPU) or `f16` (mixed precision for
    /// Volta and Turing).
    #[arg(long, default_value = "tf32")]
    pub(crate) math: String,
    /// CPU: `f32`, or `bf16` (needs AVX512_BF16): inference's expansions on bf16 operands,
    /// training's every product (as `train --use-amp`); sums in f32.
    #[arg(long, default_value = "f32")]
    pub(crate) precision: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Inference,
    Training,
}

/// The value at percentile `p` of ascending `sorted` by nearest rank (a true percentile, not the
/// TF reference's "mean of the fastest p %").
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn run(args: &BenchArgs, kind: Kind) -> Result<(), String> {
    if args.steps == 0 || args.batch_sizes.contains(&0) {
        return Err("--steps and --batch-size must be at least 1".into());
    }
    crate::check_image_size("--img-size", args.img_size)?;
    match crate::Device::parse(&args.device)? {
        crate::Device::Cpu => {}
        #[cfg(feature = "cuda")]
        crate::Device::Cuda => return crate::cuda_cmd::bench(args, kind == Kind::Training),
    }
    let config = arch(&args.arch)?;
    let precision = crate::precision(&args.precision)?;
    if kind == Kind::Training {
        // Mixed precision, as `train --use-amp` runs it.
        effnet_engine::matmul::set_bf16(precision == Precision::Bf16)?;
    }
    let net = Network::new(config);
    let mut weights = Weights::init(&net, 0);
    let threads = rayon::current_num_threads();
    let ceilings = args.profile.then(|| {
        let c = effnet_engine::ceiling::measure();
        let bf16 = c
            .bf16_gflops
            .map_or(String::new(), |g| format!(", {g:.1} GFLOP/s bf16 pair products"));
        println!(
            "ceilings (measured now, {threads} threads): {:.1} GFLOP/s f32 multiply-add{bf16}, {:.1} GB/s memory read",
            c.gflops, c.read_gb_per_s,
        );
        // In bf16, the products are held against bf16's ceiling (f32 ones then show how far
        // bf16 could take them).
        match (precision, c.bf16_gflops) {
            (Precision::Bf16, Some(g)) => effnet_engine::ceiling::Ceilings { gflops: g, ..c },
            _ => c,
        }
    });
    let mode_name = if kind == Kind::Inference {
        "infer"
    } else {
        "train"
    };
    if !args.json {
        println!(
            "{} {} at {}×{}, {}, {} threads, {:.2} GMACs/image",
            net.config.name,
            mode_name,
            args.img_size,
            args.img_size,
            precision.name(),
            threads,
            net.macs(args.img_size, args.img_size) as f64 / 1e9
        );
        println!(
            "{:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
            "batch", "img/s", "mean ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "peak RSS MiB"
        );
    }
    let mut rng = Rng::new(1);
    let mut velocity = vec![0f32; weights.params.len()];
    // Zero: the backward pass adds into it (`sgd_momentum` zeroes it again for the next step).
    let mut grads = vec![0f32; weights.params.len()];
    for &n in &args.batch_sizes {
        // Each case's own peak memory, not the largest so far (nor the ceiling probe's buffer).
        reset_peak_rss();
        let s = args.img_size;
        let mut ws = match kind {
            Kind::Inference => {
                // As a deployment runs: weights fixed and prepared once (`predict` does this).
                let mut ws = net.inference_workspace(n, s, s);
                net.freeze_in(&weights, &mut ws, precision);
                ws
            }
            Kind::Training => net.workspace(n, s, s),
        };
        let input: Vec<f32> = (0..n * s * s * 3).map(|_| rng.normal() as f32).collect();
        let labels: Vec<usize> = (0..n).map(|_| rng.below(net.classes)).collect();
        let mut targets = vec![0f32; n * net.classes];
        loss::smoothed_targets(&labels, net.classes, 0.0, &mut targets);
        let mut dlogits = vec![0f32; n * net.classes];
        let mut times = Vec::with_capacity(args.steps);
        for step in 0..args.warmup + args.steps {
            if args.profile && step == args.warmup {
                ws.profile = Some(Default::default());
            }
            let t = Instant::now();
            match kind {
                Kind::Inference => {
                    net.forward(&mut weights, &mut ws, &input, Mode::Eval, &mut rng);
                }
                Kind::Training => {
                    // The peers' step: train-mode forward, cross-entropy, backward, SGD momentum 0.9.
                    let mode = Mode::Train {
                        bn_momentum: 0.1,
                        stochastic: true,
                    };
                    let logits = net.forward(&mut weights, &mut ws, &input, mode, &mut rng);
                    loss::softmax_cross_entropy(logits, net.classes, &targets, &mut dlogits);
                    net.backward(&weights, &mut ws, &dlogits, &mut grads);
                    sgd_momentum(&mut weights.params, &mut velocity, &mut grads);
                }
            }
            if step >= args.warmup {
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        if let (Some(profile), Some(ceilings)) = (&ws.profile, &ceilings) {
            print_profile(profile, &times, ceilings);
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = percentile(&sorted, 50.0);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let peak = peak_rss_mib();
        if args.json {
            let line = serde_json::json!({
                "impl": format!("effnet-{}-{}", env!("CARGO_PKG_VERSION"), match precision {
                    Precision::F32 => "fp32",
                    Precision::Bf16 => "bf16",
                }),
                "arch": format!("tf_{}", net.config.name),
                "mode": mode_name,
                "batch": n,
                "res": s,
                "median_ms": (median * 100.0).round() / 100.0,
                "img_per_s": (n as f64 * 1000.0 / median * 100.0).round() / 100.0,
                "threads": threads,
                "peak_rss_mib": peak,
            });
            println!("{line}");
        } else {
            println!(
                "{:>6} {:>10.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>12}",
                n,
                n as f64 * 1000.0 / median,
                mean,
                median,
                percentile(&sorted, 90.0),
                percentile(&sorted, 95.0),
                percentile(&sorted, 99.0),
                peak.map_or("?".into(), |m| format!("{m:.0}"))
            );
        }
    }
    Ok(())
}

/// The peers' update, SGD with momentum 0.9 at lr 0.01 (PyTorch's form: `v ← 0.9·v + g`,
/// `w ← w − 0.01·v`), over the pool as the trainer's optimizer runs; each gradient is zeroed as
/// it is read, so the next backward pass can add into it without a pass of its own.
fn sgd_momentum(params: &mut [f32], velocity: &mut [f32], grads: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    params
        .par_chunks_mut(CHUNK)
        .zip(velocity.par_chunks_mut(CHUNK))
        .zip(grads.par_chunks_mut(CHUNK))
        .for_each(|((w, v), g)| {
            effnet_engine::simd::dispatch(
                #[inline(always)]
                || {
                    for ((w, v), g) in w.iter_mut().zip(v.iter_mut()).zip(g.iter_mut()) {
                        *v = 0.9 * *v + *g;
                        *w -= 0.01 * *v;
                        *g = 0.0;
                    }
                },
            )
        });
}

/// Starts the peak resident memory afresh (Linux resets `VmHWM` on this write; elsewhere the
/// peak stays the process's).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory (Linux `VmHWM`) since the last [`reset_peak_rss`], in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kib / 1024.0).round())
}

/// Time per operation kind, its share of the step, and its rate against the machine's ceiling:
/// GFLOP/s for convolutions (the multiply-adds they run: Winograd's transformed products, the
/// direct sum's elsewhere), GB/s of f32 input read for the rest.
fn print_profile(
    profile: &effnet_model::network::Profile,
    times: &[f64],
    ceilings: &effnet_engine::ceiling::Ceilings,
) {
    let steps = times.len() as f64;
    let step_ms = times.iter().sum::<f64>() / steps;
    println!(
        "{:<26} {:>9} {:>7} {:>12} {:>11}",
        "operation", "ms/step", "share", "GFLOP/s|GB/s", "of ceiling"
    );
    let mut entries = profile.entries.clone();
    entries.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut profiled_ms = 0.0;
    for (op, secs, work) in entries {
        let ms = secs * 1000.0 / steps;
        profiled_ms += ms;
        let (rate, ceiling) = if op.starts_with("conv") || op.starts_with("depthwise") {
            (2.0 * work as f64 / secs / 1e9, ceilings.gflops)
        } else {
            (4.0 * work as f64 / secs / 1e9, ceilings.read_gb_per_s)
        };
        println!(
            "{op:<26} {ms:>9.2} {:>6.1}% {rate:>12.1} {:>10.0}%",
            100.0 * ms / step_ms,
            100.0 * rate / ceiling
        );
    }
    // What no operation above counts: the head, the loss, residual and drop-path passes, and
    // in training the update.
    let rest = step_ms - profiled_ms;
    println!(
        "{:<26} {rest:>9.2} {:>6.1}%",
        "rest of the step",
        100.0 * rest / step_ms
    );
}
