//! A training step (train-mode forward, loss, backward) allocates nothing once its workspace
//! and each thread's kernel buffers have grown: activations, saved statistics, packing
//! buffers and partial sums are all kept, in f32 and with bf16 products. What heap traffic is left is rayon's own: a job box
//! for each worker kept awake. This test binary holds one test, so nothing else allocates
//! while it counts.

use effnet_engine::loss;
use effnet_engine::rng::Rng;
use effnet_model::Mode;

mod counting;

#[test]
fn a_training_step_allocates_nothing_after_the_first() {
    // V2-B0 at 64 px, batch 2, on two threads: every kind of layer forward and backward, and
    // the general product's paths (serial, rows split with shared panels, columns split,
    // reduction split). Before the products had their own kernels, ~1,500 allocations a step.
    let counting::Case {
        pool,
        net,
        mut weights,
        image,
        n,
        size,
    } = counting::b0_case();
    let threads = counting::THREADS;
    let mut ws = net.workspace(n, size, size);
    let mut targets = vec![0f32; n * net.classes];
    loss::smoothed_targets(&[3, 7], net.classes, 0.1, &mut targets);
    let mut dlogits = vec![0f32; n * net.classes];
    let mut grads = vec![0f32; weights.params.len()];
    let mut rng = Rng::new(0);
    let mode = Mode::Train {
        bn_momentum: 0.1,
        stochastic: true,
    };
    // f32, then mixed precision (bf16 products) where the CPU has it: the mode is the
    // process's, and this binary's only test sets it.
    for bf16 in [false, true] {
        if effnet_engine::matmul::set_bf16(bf16).is_err() {
            eprintln!("bf16: skipped, not on this CPU");
            continue;
        }
        pool.install(|| {
            let mut step = || {
                let logits = net.forward(&mut weights, &mut ws, &image, mode, &mut rng);
                loss::softmax_cross_entropy(logits, net.classes, &targets, &mut dlogits);
                grads.fill(0.0);
                net.backward(&weights, &mut ws, &dlogits, &mut grads);
                grads.iter().map(|g| g.abs()).sum::<f32>()
            };
            step();
            step();
            let steps = 3; // the array below
            let (sums, count, largest) =
                counting::counted(|| std::array::from_fn::<_, 3, _>(|_| step()));
            assert!(sums.iter().all(|s| s.is_finite() && *s > 0.0), "{sums:?}");
            assert!(
                count <= 2 * steps * threads && largest <= 64,
                "bf16 {bf16}: {count} allocations in {steps} steps, the largest {largest} bytes"
            );
        });
    }
    effnet_engine::matmul::set_bf16(false).unwrap();
}
