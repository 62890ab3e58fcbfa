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
    /// bf16 multiply-adds (AVX512_BF16's pair products, f32 sums) per second over every pool
    /// thread, in GFLOP/s, where the CPU has them: the yardstick of bf16 products.
    pub bf16_gflops: Option<f64>,
}

/// Every ceiling, best of three tries each (about 0.3 s).
pub fn measure() -> Ceilings {
    Ceilings {
        gflops: multiply_add_gflops(),
        read_gb_per_s: read_gb_per_s(),
        bf16_gflops: crate::pointwise::bf16_available().then(bf16_gflops),
    }
}

/// Independent `vdpbf16ps` chains per thread, as many as [`LANES_AVX512`]'s f32 ones.
const BF16_CHAINS: usize = LANES_AVX512 / 16;

fn bf16_gflops() -> f64 {
    const ITERATIONS: usize = 5_000_000;
    let threads = rayon::current_num_threads();
    // Each instruction: 16 lanes × 2 multiply-adds × 2 flops.
    let flops = (threads * ITERATIONS * BF16_CHAINS * 64) as f64;
    (0..3)
        .map(|_| {
            let t = Instant::now();
            // SAFETY: only called where `bf16_available` said the CPU has AVX512_BF16.
            #[cfg(target_arch = "x86_64")]
            black_box(rayon::broadcast(|_| unsafe { bf16_chains(ITERATIONS) }));
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// `acc ← acc + a·b` pair products on [`BF16_CHAINS`] vectors, `iterations` times.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_chains(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    // bf16 pairs of small values (1/256 and 1/512), so the sums stay finite.
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(black_box(0x3b80_3b00)));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(black_box(0x3b80_3b00)));
    let mut acc = [_mm512_setzero_ps(); BF16_CHAINS];
    for _ in 0..iterations {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, b);
        }
    }
    acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

/// Independent multiply-add chains per thread: 12 vector registers' worth, enough to cover the
/// latency of two FMA units (96 lanes with AVX2, 192 with AVX-512; more would spill).
const LANES: usize = 96;
const LANES_AVX512: usize = 192;

fn multiply_add_gflops() -> f64 {
    const ITERATIONS: usize = 5_000_000;
    let threads = rayon::current_num_threads();
    let lanes = if simd::level() == Level::Avx512 {
        LANES_AVX512
    } else {
        LANES
    };
    let flops = (threads * ITERATIONS * lanes * 2) as f64;
    (0..3)
        .map(|_| {
            let t = Instant::now();
            black_box(rayon::broadcast(|_| match lanes {
                LANES_AVX512 => chains::<LANES_AVX512>(ITERATIONS),
                _ => chains::<LANES>(ITERATIONS),
            }));
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// `a ← a·x + y` on every lane, `iterations` times: fused where the CPU has FMA (what the
/// kernels use), a multiply and an add otherwise.
fn chains<const N: usize>(iterations: usize) -> f32 {
    let (x, y) = (black_box(0.999_999f32), black_box(1e-7f32));
    let fused = simd::level() != Level::Baseline;
    simd::dispatch(
        #[inline(always)]
        || {
            let mut acc = [1f32; N];
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
    // Four times the last-level cache (at least 48 MiB, at most 1 GiB), so the reads come
    // from memory.
    let bytes = (4 * last_level_cache_bytes().unwrap_or(0)).clamp(48 << 20, 1 << 30);
    let buffer = vec![1f32; bytes / std::mem::size_of::<f32>()];
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

/// The largest cache's size that Linux reports for CPU 0.
fn last_level_cache_bytes() -> Option<usize> {
    (0..8)
        .filter_map(|i| {
            let path = format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size");
            let text = std::fs::read_to_string(path).ok()?;
            let text = text.trim();
            let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
            let scale = match unit {
                "K" => 1 << 10,
                "M" => 1 << 20,
                _ => return None,
            };
            Some(number.parse::<usize>().ok()? * scale)
        })
        .max()
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
        let got = super::chains::<{ super::LANES }>(3) / super::LANES as f32;
        assert!((got - a).abs() < 1e-6, "{got} vs {a}");
    }

    #[test]
    fn the_bf16_chains_compute_what_they_claim() {
        if !crate::pointwise::bf16_available() {
            eprintln!("skipped: no AVX512_BF16 on this CPU");
            return;
        }
        // Each step adds 2⁻⁹·2⁻⁹ + 2⁻⁸·2⁻⁸ on every lane of every chain.
        #[cfg(target_arch = "x86_64")]
        {
            let per_lane = 3.0 * (2f32.powi(-18) + 2f32.powi(-16));
            // SAFETY: AVX512_BF16 checked above.
            let got = unsafe { super::bf16_chains(3) };
            assert_eq!(got, per_lane * (16 * super::BF16_CHAINS) as f32);
        }
    }
}
