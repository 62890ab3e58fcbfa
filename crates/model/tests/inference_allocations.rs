//! An inference pass allocates nothing once its workspace is planned and frozen: every buffer
//! (activations, Winograd's and the pointwise kernels' per-thread scratch, prepared weights),
//! in f32 and in bf16 where the CPU has it is reused. What heap traffic
//! is left is rayon's own: a 32-byte job box for each worker kept awake during the pass, and at
//! times a little queue bookkeeping. This test binary holds one test, so nothing else allocates
//! while it counts.

use effnet_engine::rng::Rng;
use effnet_engine::Precision;
use effnet_model::Mode;

mod counting;

#[test]
fn an_inference_pass_allocates_nothing_after_the_first() {
    let counting::Case {
        pool,
        net,
        mut weights,
        image,
        n,
        size,
    } = counting::b0_case();
    let threads = counting::THREADS;
    let mut rng = Rng::new(0);
    for precision in [Precision::F32, Precision::Bf16] {
        if !precision.available() {
            eprintln!("{}: skipped, not on this CPU", precision.name());
            continue;
        }
        let mut ws = net.inference_workspace(n, size, size);
        pool.install(|| {
            // In the pool that runs the passes: it also grows each worker's scratch.
            net.freeze_in(&weights, &mut ws, precision);
            let mut pass = || {
                net.forward(&mut weights, &mut ws, &image, Mode::Eval, &mut rng)
                    .iter()
                    .sum::<f32>()
            };
            let first = pass();
            pass();
            let passes = 3; // the array below
            let (sums, count, largest) =
                counting::counted(|| std::array::from_fn::<_, 3, _>(|_| pass()));
            assert!(
                sums.iter().all(|&s| s == first),
                "{}: passes differ: {first} vs {sums:?}",
                precision.name()
            );
            assert!(
                count <= 2 * passes * threads && largest <= 64,
                "{}: {count} allocations in {passes} passes, the largest {largest} bytes",
                precision.name()
            );
        });
    }
}
