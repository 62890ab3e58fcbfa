//! `mpirun -np 2 effnet train …` on loopback, as users launch it: two ranks train with one
//! writer, ranks started with different configurations are refused on both, and a rank that dies
//! takes the run down within 60 s instead of hanging it. (That two ranks compute what one process
//! computes is crates/train/tests/distributed.rs.)
#![cfg(feature = "mpi")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// mpirun as root needs these (CI runs as root), and in a container, no single-copy transport.
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.arg("--oversubscribe")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Containers forbid the ptrace-based shared-memory copy Open MPI tries first.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

const EFFNET: &str = env!("CARGO_BIN_EXE_effnet");

/// A small training run on Fashion-MNIST (installed by .ci/run) into `dir`.
fn train_args(dir: &std::path::Path, batch: &str, images: &str) -> Vec<String> {
    [
        EFFNET,
        "--threads",
        "1",
        "train",
        "--arch",
        "efficientnet_lite0",
        "--img-size",
        "32",
        "--max-train-images",
        images,
        "--max-eval-images",
        "64",
        "--batch-size",
        batch,
        "--epochs",
        "1",
        "--augmenter-name",
        "none",
        "--log-steps",
        "2",
        "--model-dir",
        dir.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// The child's output (read while it runs, so a full pipe never blocks it); killed past `limit`.
fn wait(child: Child, limit: Duration) -> Output {
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid]).status();
            panic!("mpirun still running after {limit:?}");
        }
    }
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn two_ranks_train_and_rank_0_alone_writes() {
    let dir = std::env::temp_dir().join(format!("effnet-mpi-{}", std::process::id()));
    let child = mpirun()
        .args(["-np", "2"])
        .args(train_args(&dir, "8", "128"))
        .args(["--sync-bn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun is missing: apt-get install -y openmpi-bin libopenmpi-dev (.ci/run does)");
    let out = wait(child, Duration::from_secs(300));
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("rank 0 of 2") && all.contains("rank 1 of 2"),
        "{all}"
    );
    assert!(
        all.contains("batch 8 × 1 accumulated × 2 processes"),
        "{all}"
    );
    // 128 images / (2 ranks × 8) = 8 steps; one writer: a single configuration record.
    let log = std::fs::read_to_string(dir.join("log.json")).unwrap();
    let configs = log.lines().filter(|l| l.contains("\"batch-size\"")).count();
    assert_eq!(configs, 1, "{log}");
    assert_eq!(
        all.matches("predictions on the first test images").count(),
        1
    );
    assert!(dir.join("model.safetensors").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ranks_started_differently_are_refused_on_every_rank() {
    let dir = std::env::temp_dir().join(format!("effnet-mpi-mismatch-{}", std::process::id()));
    let child = mpirun()
        .args(["-np", "1"])
        .args(train_args(&dir, "4", "64"))
        .arg(":")
        .args(["-np", "1"])
        .args(train_args(&dir, "8", "64"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait(child, Duration::from_secs(120));
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    let message = "ranks disagree on their configuration: batch-size: rank 0 has 4, rank 1 has 8";
    assert_eq!(all.matches(message).count(), 2, "both ranks say it: {all}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_rank_that_dies_ends_the_run_within_60_seconds() {
    let dir = std::env::temp_dir().join(format!("effnet-mpi-dead-{}", std::process::id()));
    let mut child = mpirun()
        .args(["-np", "2"])
        .args(train_args(&dir, "8", "20000"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Each rank names its pid when it starts; kill rank 1 once both are training.
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut victim = None;
    let started = Instant::now();
    while victim.is_none() && started.elapsed() < Duration::from_secs(120) {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.strip_prefix("effnet: rank 1 of 2 (local rank 1, pid ") {
            victim = rest.split(')').next().map(|p| p.to_string());
        }
    }
    let pid = victim.expect("rank 1 announced its pid");
    std::thread::sleep(Duration::from_secs(3));
    let killed = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(killed.success());
    let t = Instant::now();
    // Keep draining stderr so mpirun never blocks on a full pipe.
    let drain =
        std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let out = wait(child, Duration::from_secs(60));
    let said = drain.join().unwrap();
    assert!(!out.status.success(), "{said}");
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(
        said.contains("signal 9") || said.contains("Killed") || said.contains("exited"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
