//! Time per call and GFLOP/s (direct-convolution multiply-adds × 2) of `conv::forward` on the
//! 3×3 convolutions of EfficientNetV2-S at 224 px, with training's weights and with prepared ones:
//! `cargo run --release -p effnet-engine --example conv_shapes [THREADS] [BATCH]`.

use effnet_engine::conv::{forward, prepare, ConvGeom, Weight};
use effnet_engine::Nhwc;
use std::time::Instant;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|t| t.parse().ok())
            .unwrap_or(default)
    };
    let (threads, n) = (arg(1, 1), arg(2, 1));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    // (size, cin, cout, stride): stem, stage 1, stage 2 (first and later), stage 3 (first, later).
    let shapes = [
        (224, 3, 24, 2),
        (112, 24, 24, 1),
        (112, 24, 96, 2),
        (56, 48, 192, 1),
        (56, 48, 256, 2),
        (28, 64, 256, 1),
    ];
    println!("batch {n}, {threads} threads");
    println!(
        "{:>5} {:>5} {:>5} {:>3} {:>9} {:>9} {:>9} {:>9}",
        "size", "cin", "cout", "s", "ms", "GFLOP/s", "prep ms", "GFLOP/s"
    );
    for (size, cin, cout, stride) in shapes {
        let g = ConvGeom::new(Nhwc::new(n, size, size, cin), 3, stride, cout);
        let x: Vec<f32> = (0..g.input.len()).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..g.weight_len()).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0f32; g.output().len()];
        let mut col = vec![0f32; g.col_len()];
        let flops = 2.0 * g.macs() as f64;
        let reps = ((1e9 / flops) as usize).clamp(3, 500);
        let torch: Vec<f32> = (0..g.weight_len()).map(|i| (i % 5) as f32 * 0.1).collect();
        let prepared = prepare(&g, &torch);
        let mut time = |weight: Weight| {
            forward(&g, &x, weight, &mut y, &mut col, None, None);
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                for _ in 0..reps {
                    forward(&g, &x, weight, &mut y, &mut col, None, None);
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            best
        };
        let plain = time(Weight::Plain(&w));
        let prep = time(Weight::Prepared(&prepared));
        println!(
            "{size:>5} {cin:>5} {cout:>5} {stride:>3} {:>9.3} {:>9.1} {:>9.3} {:>9.1}",
            plain * 1e3,
            flops / plain / 1e9,
            prep * 1e3,
            flops / prep / 1e9
        );
    }
}
