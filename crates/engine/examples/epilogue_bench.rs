//! ns per element of the eval-mode batch norm + activation epilogue (`Folded::apply`) on a
//! 196 × 960 block (an expansion output at 14×14): `cargo run --release -p effnet-engine
//! --example epilogue_bench`.

use effnet_engine::norm::Folded;
use effnet_engine::Act;
use std::time::Instant;

fn main() {
    let (rows, c) = (196, 960);
    let mut x: Vec<f32> = (0..rows * c)
        .map(|i| (i % 97) as f32 / 20.0 - 2.4)
        .collect();
    for act in [Act::None, Act::Relu6, Act::Silu] {
        let folded = Folded {
            scale: (0..c).map(|i| 0.9 + (i % 7) as f32 * 0.01).collect(),
            shift: (0..c).map(|i| (i % 5) as f32 * 0.01 - 0.02).collect(),
            act,
        };
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..50 {
                folded.apply(&mut x);
                // Keep values in range: apply the inverse-ish shift back.
                for v in x.iter_mut().step_by(97) {
                    *v = v.clamp(-3.0, 3.0);
                }
            }
            best = best.min(t.elapsed().as_secs_f64() / 50.0);
        }
        println!(
            "{:>6}: {:.3} ns/element",
            act.name(),
            best * 1e9 / (rows * c) as f64
        );
    }
}
