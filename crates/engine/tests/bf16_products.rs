//! The general matrix product in bf16 mode (`matmul::set_bf16`, training's mixed precision)
//! against an f64 product of the operands rounded to bf16, on every path of the product. In a
//! binary of its own: the mode is the whole process's.

use effnet_engine::matmul::{self, Layout};
use effnet_engine::pointwise;
use effnet_engine::rng::Rng;

fn round(v: f32) -> f64 {
    f32::from_bits((pointwise::to_bf16(v) as u32) << 16) as f64
}

#[test]
fn bf16_products_equal_the_rounded_operands_product() {
    if matmul::set_bf16(true).is_err() {
        eprintln!("skipped: no AVX512_BF16 on this CPU");
        return;
    }
    let mut rng = Rng::new(5);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    // (m, n, k): serial with several reduction blocks, rows split, columns split, the
    // reduction split, swapped, odd sizes; each in every layout of both operands.
    for &(m, n, k) in &[
        (5, 7, 3),
        (13, 33, 4100),
        (700, 40, 300),
        (40, 900, 200),
        (30, 20, 9000),
        (300, 24, 2000),
    ] {
        for a_layout in [Layout::Normal, Layout::Transposed] {
            for b_layout in [Layout::Normal, Layout::Transposed] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                let at = |i: usize, p: usize| match a_layout {
                    Layout::Normal => a[i * k + p],
                    Layout::Transposed => a[p * m + i],
                };
                let bt = |p: usize, j: usize| match b_layout {
                    Layout::Normal => b[p * n + j],
                    Layout::Transposed => b[j * k + p],
                };
                let (mut rounded, mut exact) = (vec![0f64; m * n], vec![0f64; m * n]);
                for i in 0..m {
                    for j in 0..n {
                        for p in 0..k {
                            rounded[i * n + j] += round(at(i, p)) * round(bt(p, j));
                            exact[i * n + j] += at(i, p) as f64 * bt(p, j) as f64;
                        }
                    }
                }
                let mut c = vec![1f32; m * n];
                pool.install(|| matmul::matmul(&mut c, m, n, k, &a, a_layout, &b, b_layout, true));
                let scale = exact.iter().fold(1e-9f64, |s, v| s.max(v.abs()));
                let worst = |want: &[f64]| {
                    c.iter()
                        .zip(want)
                        .map(|(&c, w)| (c as f64 - 1.0 - w).abs())
                        .fold(0.0, f64::max)
                        / scale
                };
                let case = (m, n, k, a_layout, b_layout);
                assert!(worst(&rounded) < 1e-5, "{case:?}: {}", worst(&rounded));
                // Rounding shows against the f32 product, within bf16's precision.
                let off = worst(&exact);
                assert!(off > 1e-6 && off < 2e-2, "{case:?}: {off}");
            }
        }
    }
    matmul::set_bf16(false).unwrap();
}
