//! GFLOP/s of `matmul` on the shapes of EfficientNetV2-S at 224 px (rows = pixels × batch,
//! k = patch or input channels, n = output channels), then of a training step's three products
//! per 1×1 convolution at 128 px (forward on torch's weight, weight gradient, input gradient):
//! `cargo run --release -p effnet-engine --example matmul_shapes [THREADS] [BATCH] [bf16]`
//! (`bf16`: the training products on bf16 operands, as `train --use-amp` runs them).

use effnet_engine::matmul::{matmul, matmul_then, Layout};
use effnet_engine::norm::Folded;
use effnet_engine::{pointwise, Act};
use std::time::Instant;

fn main() {
    // Positional argument `i`, 1 when absent or not a number.
    let arg = |i: usize| -> usize {
        std::env::args()
            .nth(i)
            .and_then(|t| t.parse().ok())
            .unwrap_or(1)
    };
    let (threads, batch) = (arg(1), arg(2));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    if std::env::args().nth(3).as_deref() == Some("bf16") {
        effnet_engine::matmul::set_bf16(true).expect("AVX512_BF16");
    }
    // (rows, k, n, weight layout): the stem and stage 0-2 k×k convolutions (packed weights),
    // then the 1×1 convolutions that carry most multiply-adds: stage 2's and 3's projections,
    // stage 5's and 6's expansions and projections, the head (prepared weights, `[cin, cout]`),
    // and one with torch weights read transposed (training).
    let shapes = [
        (12544, 27, 24, Layout::Normal),
        (12544, 216, 24, Layout::Normal),
        (3136, 216, 96, Layout::Normal),
        (3136, 432, 192, Layout::Normal),
        (784, 576, 256, Layout::Normal),
        (3136, 192, 48, Layout::Normal),
        (784, 256, 64, Layout::Normal),
        (196, 160, 960, Layout::Normal),
        (196, 960, 160, Layout::Normal),
        (49, 256, 1536, Layout::Normal),
        (49, 1536, 256, Layout::Normal),
        (49, 256, 1280, Layout::Normal),
        (49, 1536, 256, Layout::Transposed),
    ]
    .map(|(rows, k, n, layout)| (rows * batch, k, n, layout));
    // `then`: the same product through `matmul_then` with an empty epilogue (row blocks, one
    // serial product each: unprepared eval passes); `packed`: effnet's kernel on weights packed
    // once, as prepared inference runs every product; `+silu`: with batch norm and SiLU fused.
    println!(
        "{:>6} {:>5} {:>5}  {:>9} {:>9} {:>9} {:>9}",
        "rows", "k", "n", "GFLOP/s", "then", "packed", "+silu"
    );
    for (m, k, n, layout) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let flops = 2.0 * (m * n * k) as f64;
        let reps = ((2e9 / flops) as usize).clamp(3, 2000);
        let rate = |run: &dyn Fn(&mut [f32])| {
            let mut c = vec![0f32; m * n];
            run(&mut c);
            let t = Instant::now();
            for _ in 0..reps {
                run(&mut c);
            }
            flops / (t.elapsed().as_secs_f64() / reps as f64) / 1e9
        };
        let plain = rate(&|c| matmul(c, m, n, k, &a, Layout::Normal, &b, layout, false));
        let then = rate(&|c| matmul_then(c, m, n, k, &a, &b, layout, &|_| {}));
        let panels = pointwise::pack(k, n, &b);
        let packed = rate(&|c| pointwise::forward(&a, m, k, n, &panels, c, None, None));
        let silu = Folded {
            scale: vec![0.9; n],
            shift: vec![0.1; n],
            act: Act::Silu,
        };
        let fused = rate(&|c| pointwise::forward(&a, m, k, n, &panels, c, Some(&silu), None));
        println!("{m:>6} {k:>5} {n:>5}  {plain:>9.1} {then:>9.1} {packed:>9.1} {fused:>9.1}");
    }
    training(batch);
}

/// A training step's products for V2-S's 1×1 convolutions at 128 px, in the pool as the
/// network runs them: `y = x·wᵀ` (torch's `[cout, cin]` weight), `dw += dyᵀ·x`, `dx = dy·w`.
fn training(batch: usize) {
    // (pixels per image, cin, cout): stages 1–5's projections and expansions, and the head.
    let shapes = [
        (1024, 96, 48),
        (256, 192, 64),
        (256, 256, 64),
        (64, 64, 256),
        (64, 256, 128),
        (64, 128, 512),
        (64, 512, 128),
        (64, 128, 768),
        (64, 768, 160),
        (64, 160, 960),
        (64, 960, 160),
        (16, 160, 960),
        (16, 960, 256),
        (16, 256, 1536),
        (16, 1536, 256),
        (16, 256, 1280),
    ];
    println!(
        "\ntraining at 128 px, GFLOP/s\n{:>6} {:>5} {:>5}  {:>9} {:>9} {:>9}",
        "rows", "cin", "cout", "forward", "dW", "dx"
    );
    for (pixels, cin, cout) in shapes {
        let m = pixels * batch;
        let x: Vec<f32> = (0..m * cin).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..cin * cout).map(|i| (i % 5) as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..m * cout).map(|i| (i % 3) as f32 * 0.1).collect();
        let flops = 2.0 * (m * cin * cout) as f64;
        let reps = ((2e9 / flops) as usize).clamp(3, 2000);
        let rate = |len: usize, run: &(dyn Fn(&mut [f32]) + Sync)| {
            let mut c = vec![0f32; len];
            // Inside the pool, as the network's passes run (a loop started outside it pays a
            // wake-up per call).
            rayon::scope(|_| {
                run(&mut c);
                let t = Instant::now();
                for _ in 0..reps {
                    run(&mut c);
                }
                flops / (t.elapsed().as_secs_f64() / reps as f64) / 1e9
            })
        };
        let (normal, t) = (Layout::Normal, Layout::Transposed);
        let forward = rate(m * cout, &|y| {
            matmul(y, m, cout, cin, &x, normal, &w, t, false)
        });
        let dw = rate(cin * cout, &|g| {
            matmul(g, cout, cin, m, &dy, t, &x, normal, true)
        });
        let dx = rate(m * cin, &|g| {
            matmul(g, m, cin, cout, &dy, normal, &w, normal, false)
        });
        println!("{m:>6} {cin:>5} {cout:>5}  {forward:>9.1} {dw:>9.1} {dx:>9.1}");
    }
}
