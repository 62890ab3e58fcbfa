//! The benchmarks print the peers' schema (../shared/bench/README.md) plus peak memory, and the
//! profile accounts for the whole step.

mod common;
use common::effnet;

/// `effnet --threads 1 SUB` on v2_b0, batch 2 at 32 px, 2 steps, plus `extra`; its stdout.
fn bench(sub: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "--threads",
        "1",
        sub,
        "--arch",
        "efficientnetv2_b0",
        "--batch-size",
        "2",
        "--img-size",
        "32",
        "--steps",
        "2",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = effnet(&args);
    assert!(ok, "{sub} failed: {err}");
    out
}

#[test]
fn benchmarks_print_the_peers_schema_with_peak_memory() {
    for (sub, mode) in [
        ("inference_benchmark", "infer"),
        ("training_benchmark", "train"),
    ] {
        let out = bench(sub, &["--json"]);
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("a JSON line");
        let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
        assert!(v["impl"].as_str().unwrap().starts_with("effnet-"), "{v}");
        assert_eq!(v["arch"], "tf_efficientnetv2_b0");
        assert_eq!(v["mode"], mode);
        assert_eq!(
            (v["batch"].as_u64(), v["res"].as_u64()),
            (Some(2), Some(32))
        );
        let (ms, rate) = (
            v["median_ms"].as_f64().unwrap(),
            v["img_per_s"].as_f64().unwrap(),
        );
        assert!(ms > 0.0 && (rate - 2000.0 / ms).abs() <= 0.02 * rate, "{v}");
        // The parameters alone (5.9 M floats) take 22 MiB; a misread would be 0 or huge.
        let peak = v["peak_rss_mib"].as_f64().unwrap();
        assert!((22.0..4096.0).contains(&peak), "{v}");
    }
}

#[test]
fn the_profile_accounts_for_the_step() {
    let out = bench("training_benchmark", &["--profile"]);
    let shares: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.ends_with('%')))
        .map(|w| w.trim_end_matches('%').parse().unwrap())
        .collect();
    assert!(
        out.contains("conv 1x1") && out.contains("depthwise"),
        "{out}"
    );
    // Each operation against the ceilings measured at the start: threads, f32 GFLOP/s, bf16
    // GFLOP/s where the CPU has AVX512_BF16, GB/s.
    let measured = ceilings(&out);
    assert!(
        (3..=4).contains(&measured.len()) && measured[1..].iter().all(|&v| v > 0.0),
        "threads, GFLOP/s, GB/s: {out}"
    );
    assert_against(&out, measured[1]);
    // With the rest of the step (update, loss, residuals) on a line of its own, the shares
    // add up to the whole step (each rounded to 0.1 %).
    assert!(out.contains("rest of the step"), "{out}");
    let total: f64 = shares.iter().sum();
    assert!(
        (99.0..=101.0).contains(&total),
        "shares sum to {total}: {out}"
    );
    // In bf16 (where the CPU has it), the products are held against the bf16 ceiling.
    if measured.len() == 4 {
        let out = bench("training_benchmark", &["--profile", "--precision", "bf16"]);
        assert_against(&out, ceilings(&out)[2]);
    }
}

/// The numbers on the profile's ceilings line.
fn ceilings(out: &str) -> Vec<f64> {
    out.lines()
        .find(|l| l.starts_with("ceilings (measured now"))
        .unwrap_or_else(|| panic!("no ceilings: {out}"))
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The profile's `conv 1x1` line gives its rate as a share of `ceiling`.
fn assert_against(out: &str, ceiling: f64) {
    let conv = out.lines().find(|l| l.starts_with("conv 1x1 ")).unwrap();
    let fields: Vec<&str> = conv.split_whitespace().collect();
    let (rate, of_ceiling): (f64, f64) = (
        fields[fields.len() - 2].parse().unwrap(),
        fields[fields.len() - 1]
            .trim_end_matches('%')
            .parse()
            .unwrap(),
    );
    assert!(
        (of_ceiling - 100.0 * rate / ceiling).abs() <= 1.0,
        "{conv} against {ceiling} GFLOP/s: {out}"
    );
}

/// Without the NVIDIA driver, `--device cuda` fails with a message naming what is missing
/// (cudarc itself would panic); a build without the `cuda` feature says how to get one.
#[test]
fn the_cuda_device_explains_what_is_missing() {
    let ldconfig = std::process::Command::new("ldconfig").arg("-p").output();
    let has_driver =
        ldconfig.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so"));
    if has_driver {
        eprintln!(
            "skipped: this machine has an NVIDIA driver (the GPU check is tools/gpu_check.sh)"
        );
        return;
    }
    let (ok, _, err) = effnet(&["training_benchmark", "--device", "cuda", "--steps", "1"]);
    assert!(!ok, "no GPU here, yet --device cuda succeeded");
    if cfg!(feature = "cuda") {
        assert!(err.contains("libcuda"), "{err}");
        assert!(err.contains("LD_LIBRARY_PATH"), "{err}");
        let (ok, _, err) = effnet(&["selftest", "--device", "cuda"]);
        assert!(!ok && err.contains("libcuda"), "{err}");
    } else {
        assert!(err.contains("--features cuda"), "{err}");
    }
    // Inference says so before it reads any weights or images.
    let missing = if cfg!(feature = "cuda") {
        "libcuda"
    } else {
        "--features cuda"
    };
    for args in [
        &["predict", "--weights", "absent.safetensors", "x.jpg"][..],
        &[
            "eval",
            "--weights",
            "absent.safetensors",
            "--data-dir",
            "absent",
        ][..],
    ] {
        let (ok, _, err) = effnet(&[args, &["--device", "cuda"]].concat());
        assert!(!ok && err.contains(missing), "{args:?}: {err}");
    }
    let (ok, _, err) = effnet(&["training_benchmark", "--device", "tpu"]);
    assert!(!ok && err.contains("expected cpu or cuda"), "{err}");
}

#[test]
fn each_case_reports_its_own_peak_memory() {
    // Where the peak cannot be reset (not Linux), it is the process's and this does not apply.
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        return;
    }
    let (ok, out, err) = effnet(&[
        "--threads",
        "1",
        "inference_benchmark",
        "--arch",
        "efficientnetv2_b0",
        "--batch-size",
        "16,1",
        "--img-size",
        "128",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(ok, "{err}");
    let peaks: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["peak_rss_mib"].as_f64().unwrap()
        })
        .collect();
    // Batch 16's activations at 128 px take tens of MiB more than batch 1's, and the batch-1
    // case, run second, must not inherit batch 16's peak.
    assert!(
        peaks.len() == 2 && peaks[1] + 10.0 < peaks[0],
        "peaks {peaks:?}: {out}"
    );
}
