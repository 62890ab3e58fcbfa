//! Two real MPI ranks: `two_ranks` starts this test binary under `mpirun -np 2`, running only
//! the ignored `worker` test, which checks every collective on its rank and panics on a
//! mismatch.
#![cfg(feature = "mpi")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const OK_LINE: &str = "effnet-dist worker ok: rank";

#[test]
fn two_ranks() {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = match Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe"])
        .arg(&exe)
        .args(["worker", "--exact", "--ignored", "--nocapture"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        // Containers usually forbid the cross-memory attach (ptrace) that Open MPI's shared
        // memory transport uses for large messages; without this MPI_Init fails there.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run mpirun ({e}); install Open MPI (apt-get install openmpi-bin \
             libopenmpi-dev) to test the `mpi` feature"
        ),
    };
    // Read both pipes on threads so that a chatty mpirun cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mpirun") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mpirun -np 2 did not finish within 120 s (a collective hung?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    eprintln!("mpirun took {:.1} s", start.elapsed().as_secs_f64());
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(status.success(), "mpirun failed: {status}\n{report}");
    for rank in 0..2 {
        assert!(
            stdout.contains(&format!("{OK_LINE} {rank} of 2")),
            "rank {rank} did not report success\n{report}"
        );
    }
}

/// Runs on each rank under mpirun; not on its own.
#[test]
#[ignore]
fn worker() {
    let start = Instant::now();
    let comm = effnet_dist::from_environment().expect("MPI communicator");
    let init_s = start.elapsed().as_secs_f64();
    let (rank, size) = (comm.rank(), comm.size());
    assert_eq!(size, 2, "{}", comm.describe());
    assert!(rank < 2);
    assert!(comm.local_rank() < 2, "both ranks run on this machine");
    assert!(comm.describe().starts_with("MPI ("), "{}", comm.describe());

    // Broadcast f32 from rank 1: everyone ends with rank 1's values.
    let mut f: Vec<f32> = (0..100).map(|i| (i * (rank + 1)) as f32 + 0.5).collect();
    comm.broadcast_f32(&mut f, 1).expect("broadcast_f32");
    let want: Vec<f32> = (0..100).map(|i| (i * 2) as f32 + 0.5).collect();
    assert_eq!(f, want, "rank {rank}: broadcast_f32");

    // Broadcast bytes: lengths differ before the call.
    let mut b = if rank == 0 {
        b"from rank zero".to_vec()
    } else {
        vec![9; 3]
    };
    comm.broadcast_bytes(&mut b, 0).expect("broadcast_bytes");
    assert_eq!(b, b"from rank zero", "rank {rank}: broadcast_bytes");
    assert!(
        comm.broadcast_bytes(&mut b, 2).is_err(),
        "root 2 of 2 must be refused"
    );

    // Sums with rank-dependent values, exact in floating point.
    let mut s32: Vec<f32> = (0..1000).map(|i| (i + rank * 1000) as f32).collect();
    comm.all_reduce_sum_f32(&mut s32).expect("sum f32");
    let want32: Vec<f32> = (0..1000).map(|i| (2 * i + 1000) as f32).collect();
    assert_eq!(s32, want32, "rank {rank}: all_reduce_sum_f32");
    let mut s64 = vec![0.25 * (rank + 1) as f64, -(rank as f64), 1e15];
    comm.all_reduce_sum_f64(&mut s64).expect("sum f64");
    assert_eq!(
        s64,
        vec![0.75, -1.0, 2e15],
        "rank {rank}: all_reduce_sum_f64"
    );
    let mut m32 = vec![rank as f32 * 4.0];
    comm.all_reduce_mean_f32(&mut m32).expect("mean f32");
    assert_eq!(m32, vec![2.0], "rank {rank}: all_reduce_mean_f32");

    // Gather bytes of different lengths, in rank order.
    let mine = vec![b'a' + rank as u8; 3 + 5 * rank];
    let all = comm.all_gather_bytes(&mine).expect("all_gather_bytes");
    assert_eq!(
        all,
        vec![b"aaa".to_vec(), vec![b'b'; 8]],
        "rank {rank}: all_gather_bytes"
    );
    assert_eq!(
        comm.all_gather_bytes(&[]).expect("empty gather"),
        vec![vec![]; 2]
    );

    // f16 mean on a length not divisible by the size, against the f32 mean.
    let n = 10_001;
    let value = |r: usize, i: usize| ((i * 37 + r * 11) % 1000) as f32 / 250.0 - 2.0;
    let mut h: Vec<f32> = (0..n).map(|i| value(rank, i)).collect();
    comm.all_reduce_mean_f16(&mut h).expect("mean f16");
    for (i, got) in h.iter().enumerate() {
        let want = (value(0, i) + value(1, i)) / 2.0;
        // Inputs ≤ 2 in magnitude, sums ≤ 4: f16 rounding errors stay below 2⁻⁹.
        assert!(
            (got - want).abs() <= 1.0 / 512.0,
            "rank {rank}: f16 mean [{i}] {got} vs {want}"
        );
    }
    // The compressed result must be the same on both ranks, bit for bit.
    let bits: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
    let both = comm.all_gather_bytes(&bits).expect("gather f16 result");
    assert_eq!(
        both[0], both[1],
        "rank {rank}: f16 means differ between ranks"
    );

    // check_same: Ok when equal, the same Err on both ranks when not.
    comm.check_same("model=b0\nbatch_size=4")
        .expect("same configuration");
    let batch = if rank == 0 { 4 } else { 8 };
    let err = comm
        .check_same(&format!("model=b0\nbatch_size={batch}"))
        .expect_err("configurations differ");
    assert_eq!(
        err, "ranks disagree on their configuration: batch_size: rank 0 has 4, rank 1 has 8",
        "rank {rank}"
    );
    let errs = comm
        .all_gather_bytes(err.as_bytes())
        .expect("gather errors");
    assert_eq!(errs[0], errs[1], "rank {rank}: check_same errors differ");

    comm.barrier().expect("barrier");
    println!(
        "{OK_LINE} {rank} of {size} ({}; local rank {}; init {init_s:.2} s)",
        comm.describe(),
        comm.local_rank()
    );
}
