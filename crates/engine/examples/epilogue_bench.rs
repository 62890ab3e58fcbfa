//! ns per element of the eval-mode batch norm + activation epilogue (`Folded::apply`) on a
//! 196 × 960 block (an expansion output at 14×14): `cargo run --release -p effnet-engine
//! --example epilogue_bench`.

use effnet_engine::norm::Folded;
use effnet_engine::Act;
use std::time::Instant;

fn main() {
    let (rows, c) = (196, 960);
    let x0: Vec<f32> = (0..rows * c)
        .map(|i| (i % 97) as f32 / 20.0 - 2.4)
        .collect();
    let mut x = x0.clone();
    for act in [Act::None, Act::Relu6, Act::Silu] {
        let folded = Folded {
            scale: (0..c).map(|i| 0.9 + (i % 7) as f32 * 0.01).collect(),
            shift: (0..c).map(|i| (i % 5) as f32 * 0.01 - 0.02).collect(),
            act,
        };
        // Each pass on fresh inputs (repeated passes would drift towards denormals), timed
        // alone; the best of 250.
        let mut best = f64::MAX;
        for _ in 0..250 {
            x.copy_from_slice(&x0);
            let t = Instant::now();
            folded.apply(&mut x);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{:>6}: {:.3} ns/element",
            act.name(),
            best * 1e9 / (rows * c) as f64
        );
    }
}
