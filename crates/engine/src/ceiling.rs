//! This machine's ceilings, measured in a fraction of a second over the thread pool: f32
//! multiply-add throughput and memory read bandwidth, the yardsticks that `--profile` holds each
//! operation against.

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

use crate::simd::{self, Level};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ceilings {
    /// f32 multiply-adds (2 flops each) per second over every pool thread, in GFLOP/s.
    pub gflops: f64,
    /// Bytes read per second from a buffer larger than the last-level cache, in GB/s.
    pub read_gb_per_s: f64,
}

/// Both ceilings, best of three tries each (about 0.2 s).
pub fn measure() -> Ceilings {
    Ceilings {
        gflops: multiply_add_gflops(),
        read_gb_per_s: read_gb_per_s(),
    }
}

/// Independent multiply-add chains per thread: 96 lanes are 12 AVX registers, enough to cover
/// the latency of two FMA units.
const LANES: usize = 96;

fn multiply_add_gflops() -> f64 {
    const ITERATIONS: usize = 5_000_000;
    let threads = rayon::current_num_threads();
    let flops = (threads * ITERATIONS * LANES * 2) as f64;
    (0..3)
        .map(|_| {
            let t = Instant::now();
            black_box(rayon::broadcast(|_| chains(ITERATIONS)));
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// `a ← a·x + y` on every lane, `iterations` times: fused where the CPU has FMA (what the
/// kernels use), a multiply and an add otherwise.
fn chains(iterations: usize) -> f32 {
    let (x, y) = (black_box(0.999_999f32), black_box(1e-7f32));
    let fused = simd::level() != Level::Baseline;
    simd::dispatch(
        #[inline(always)]
        || {
            let mut acc = [1f32; LANES];
            if fused {
                for _ in 0..iterations {
                    for a in acc.iter_mut() {
                        *a = a.mul_add(x, y);
                    }
                }
            } else {
                for _ in 0..iterations {
                    for a in acc.iter_mut() {
                        *a = *a * x + y;
                    }
                }
            }
            acc.iter().sum()
        },
    )
}

fn read_gb_per_s() -> f64 {
    // 48 MiB: beyond the last-level cache of most CPUs, so the reads come from memory.
    let buffer = vec![1f32; 12 << 20];
    let bytes = (buffer.len() * std::mem::size_of::<f32>()) as f64;
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let total: f32 = buffer.par_chunks(1 << 16).map(sum).sum();
            black_box(total);
            bytes / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// A sum in 32 lanes, so it vectorizes (a plain float sum is one sequential chain).
fn sum(values: &[f32]) -> f32 {
    simd::dispatch(
        #[inline(always)]
        || {
            let mut lanes = [0f32; 32];
            let mut blocks = values.chunks_exact(32);
            for block in &mut blocks {
                for (l, v) in lanes.iter_mut().zip(block) {
                    *l += v;
                }
            }
            lanes.iter().sum::<f32>() + blocks.remainder().iter().sum::<f32>()
        },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lane_sum_adds_everything() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(super::sum(&v), 499_500.0);
        assert_eq!(super::sum(&v[..7]), 21.0);
    }

    #[test]
    fn the_chains_compute_what_they_claim() {
        // a ← 0.999999·a + 1e-7 from 1, three times, on every lane.
        let mut a = 1f32;
        for _ in 0..3 {
            a = a * 0.999_999 + 1e-7;
        }
        let got = super::chains(3) / super::LANES as f32;
        assert!((got - a).abs() < 1e-6, "{got} vs {a}");
    }
}
