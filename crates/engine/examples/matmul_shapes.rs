//! GFLOP/s of `matmul` on the shapes of EfficientNetV2-S at 224 px, batch 1 (rows = pixels,
//! k = patch or input channels, n = output channels):
//! `cargo run --release -p effnet-engine --example matmul_shapes [THREADS]`.

use effnet_engine::matmul::{matmul, Layout};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    // (rows, k, n, weight layout): the stem and stage 0-2 k×k convolutions (packed weights,
    // `Normal`), then 1×1 convolutions (torch weights, `Transposed`).
    let shapes = [
        (12544, 27, 24, Layout::Normal),
        (12544, 216, 24, Layout::Normal),
        (3136, 216, 96, Layout::Normal),
        (3136, 96, 48, Layout::Transposed),
        (3136, 432, 192, Layout::Normal),
        (784, 192, 64, Layout::Transposed),
        (784, 576, 256, Layout::Normal),
        (196, 64, 256, Layout::Transposed),
        (196, 256, 128, Layout::Transposed),
        (196, 768, 160, Layout::Transposed),
        (49, 1536, 256, Layout::Transposed),
        (49, 256, 1280, Layout::Transposed),
    ];
    println!("{:>6} {:>5} {:>5}  {:>9}", "rows", "k", "n", "GFLOP/s");
    for (m, k, n, layout) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let reps = ((2e9 / flops) as usize).clamp(3, 2000);
        let run = |c: &mut [f32]| matmul(c, m, n, k, &a, Layout::Normal, &b, layout, false);
        run(&mut c);
        let t = Instant::now();
        for _ in 0..reps {
            run(&mut c);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{m:>6} {k:>5} {n:>5}  {:>9.1}", flops / s / 1e9);
    }
}
