//! Data-parallel training over MPI, proven equal to one process. `two_ranks_train_as_one_process`
//! starts `mpirun -np 2` on this test binary's `rank_worker`, which checks on each rank:
//! - with synchronized BN (dropout and drop-path off), N steps of 2 ranks × batch b give the
//!   weights and BN statistics of 1 process × batch 2b;
//! - without it, the all-reduced gradient is the mean of the two halves' gradients;
//! - the weights are identical on both ranks after every step;
//! - f16 gradient exchange stays within f16 rounding of the f32 one.
#![cfg(feature = "mpi")]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{batch, config, tiny};
use effnet_dist::Communicator;
use effnet_engine::rng::Rng;
use effnet_model::Weights;
use effnet_train::optim::Kind;
use effnet_train::schedule::Decay;
use effnet_train::trainer::{smoothed, Replicas, TrainConfig, Trainer};

/// mpirun as root needs these (CI runs as root), and in a container, no single-copy transport.
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Containers forbid the ptrace-based shared-memory copy Open MPI tries first.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

#[test]
fn two_ranks_train_as_one_process() {
    let exe = std::env::current_exe().unwrap();
    let mut child = mpirun(2)
        .arg(exe)
        .args([
            "rank_worker",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EFFNET_RANK_WORKER", "1")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun is missing: apt-get install -y openmpi-bin libopenmpi-dev (.ci/run does)");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            child.kill().unwrap();
            panic!("mpirun -np 2 did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for rank in 0..2 {
        assert!(
            text.contains(&format!("rank {rank} of 2: all checks passed")),
            "{text}"
        );
    }
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// Rows `rank·b..(rank+1)·b` of an NHWC batch of 12×12 images.
fn rows(x: &[f32], rank: usize, b: usize) -> &[f32] {
    let per = 12 * 12 * 3;
    &x[rank * b * per..(rank + 1) * b * per]
}

/// Every rank holds rank 0's parameters exactly (and its BN statistics, with `statistics`: they
/// are the same only when BN is synchronized).
fn same_on_every_rank(comm: &dyn Communicator, w: &Weights, statistics: bool) -> bool {
    let buffers = if statistics { &w.buffers[..] } else { &[] };
    let mut mine: Vec<f32> = w.params.iter().chain(buffers).copied().collect();
    let theirs = mine.clone();
    comm.broadcast_f32(&mut mine, 0).unwrap();
    mine.iter()
        .zip(&theirs)
        .all(|(a, b)| a.to_bits() == b.to_bits())
}

/// Plain SGD with rate 1 and no decay: a step moves the weights by exactly −gradient.
fn sgd_one() -> TrainConfig {
    let mut c = config(1, 1.0);
    c.optimizer = Kind::Sgd {
        momentum: 0.0,
        nesterov: false,
    };
    c.weight_decay = 0.0;
    c.schedule.decay = Decay::Piecewise {
        boundaries: vec![],
        factors: vec![1.0],
    };
    c.ema_decay = None;
    c
}

#[test]
#[ignore = "runs on each rank under mpirun, started by two_ranks_train_as_one_process"]
fn rank_worker() {
    assert!(
        std::env::var("EFFNET_RANK_WORKER").is_ok(),
        "started by two_ranks_train_as_one_process under mpirun"
    );
    let comm = effnet_dist::from_environment().unwrap();
    let (rank, b) = (comm.rank(), 4);
    assert_eq!(comm.size(), 2);
    let replicas = |sync_bn, fp16_gradients| Replicas {
        comm: comm.clone(),
        sync_bn,
        fp16_gradients,
    };
    let net = tiny(0.0);
    let w0 = Weights::init(&net, 5);
    let mut rng = Rng::new(77);
    let batches: Vec<_> = (0..4).map(|_| batch(&mut rng, 2 * b)).collect();

    // 1. Synchronized BN: 2 ranks × 4 images = 1 process × 8 images, step by step.
    let mut one = Trainer::new(tiny(0.0), w0.clone(), config(1, 0.02));
    let mut two = Trainer::new(tiny(0.0), w0.clone(), config(1, 0.02));
    two.set_replicas(replicas(true, false));
    for (x, y) in &batches {
        one.micro_step(x, 2 * b, 12, &smoothed(y, 3, 0.1)).unwrap();
        let mine = &y[rank * b..(rank + 1) * b];
        let r = two
            .micro_step(rows(x, rank, b), b, 12, &smoothed(mine, 3, 0.1))
            .unwrap();
        assert!(r.stepped && !r.skipped);
        assert!(
            same_on_every_rank(comm.as_ref(), &two.weights, true),
            "ranks diverged"
        );
        let (p, s) = (
            max_rel(&two.weights.params, &one.weights.params),
            max_rel(&two.weights.buffers, &one.weights.buffers),
        );
        assert!(p < 1e-5 && s < 1e-5, "weights {p:e}, BN statistics {s:e}");
    }
    assert_eq!(two.weights.tracked, one.weights.tracked);
    let ema = |t: &Trainer| t.ema.as_ref().unwrap().params.clone();
    assert!(max_rel(&ema(&two), &ema(&one)) < 1e-5, "EMA");

    // 2. Without synchronized BN: the step's gradient is the mean of each half's gradient.
    let (x, y) = &batches[0];
    let mut dist = Trainer::new(tiny(0.0), w0.clone(), sgd_one());
    dist.set_replicas(replicas(false, false));
    let mine = &y[rank * b..(rank + 1) * b];
    dist.micro_step(rows(x, rank, b), b, 12, &smoothed(mine, 3, 0.0))
        .unwrap();
    let mut mean = vec![0f32; w0.params.len()];
    for half in 0..2 {
        let mut t = Trainer::new(tiny(0.0), w0.clone(), sgd_one());
        let labels = &y[half * b..(half + 1) * b];
        t.micro_step(rows(x, half, b), b, 12, &smoothed(labels, 3, 0.0))
            .unwrap();
        for ((m, after), before) in mean.iter_mut().zip(&t.weights.params).zip(&w0.params) {
            *m += 0.5 * (before - after);
        }
    }
    let step: Vec<f32> = w0
        .params
        .iter()
        .zip(&dist.weights.params)
        .map(|(a, b)| a - b)
        .collect();
    let e = max_rel(&step, &mean);
    assert!(e < 1e-4, "all-reduced gradient vs mean of halves: {e:e}");
    assert!(same_on_every_rank(comm.as_ref(), &dist.weights, false));

    // 3. f16 exchange: the same step within half-precision rounding.
    let mut half = Trainer::new(tiny(0.0), w0.clone(), sgd_one());
    half.set_replicas(replicas(false, true));
    half.micro_step(rows(x, rank, b), b, 12, &smoothed(mine, 3, 0.0))
        .unwrap();
    let step16: Vec<f32> = w0
        .params
        .iter()
        .zip(&half.weights.params)
        .map(|(a, b)| a - b)
        .collect();
    let e16 = max_rel(&step16, &mean);
    assert!(e16 < 2e-3 && e16 > 0.0, "f16 exchange: {e16:e}");
    assert!(same_on_every_rank(comm.as_ref(), &half.weights, false));

    // 4. A resumed run's state reaches every rank: rank 1 starts from other weights.
    let mut resumed = Trainer::new(
        tiny(0.0),
        Weights::init(&net, 5 + rank as u64),
        config(1, 0.02),
    );
    resumed.set_replicas(replicas(false, false));
    if rank == 0 {
        resumed.optimizer.step = 7;
    }
    resumed.broadcast_state().unwrap();
    assert_eq!(resumed.step(), 7);
    assert_eq!(resumed.weights.params, w0.params);
    println!("rank {rank} of 2: all checks passed");
}
