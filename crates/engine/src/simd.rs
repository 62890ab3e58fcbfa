//! Runtime CPU feature dispatch, so one binary uses AVX-512 or AVX2 where the CPU has them and
//! still runs on any x86-64 (or other) CPU.
//!
//! A kernel's inner loops are written as plain, vectorizable Rust inside a closure; `dispatch`
//! runs the closure inside a function compiled for the best instruction set available, and the
//! closure inlines into it (a callee without extra features may inline into one that has them),
//! so LLVM vectorizes the loops for that instruction set.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// The instruction set the kernels use on this CPU (`EFFNET_SIMD=baseline|avx2` caps it).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("EFFNET_SIMD").unwrap_or_default();
        detect().min_by_cap(&cap)
    })
}

impl Level {
    fn min_by_cap(self, cap: &str) -> Level {
        match cap {
            "baseline" => Level::Baseline,
            "avx2" if self == Level::Avx512 => Level::Avx2,
            _ => self,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2+fma",
            Level::Avx512 => "avx512",
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("fma")
    {
        Level::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Baseline
}

/// Runs `f` compiled for the best available instruction set. Mark the closure
/// `#[inline(always)]`: a closure left out of line is compiled once, for the baseline.
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: `level()` returned these only after the CPU reported the features.
            Level::Avx512 => return unsafe { run_avx512(f) },
            Level::Avx2 => return unsafe { run_avx2(f) },
            Level::Baseline => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `dst[c·ld + r] = src[r·ls + c]` for `r < rows`, `c < cols`: a `rows × cols` block (rows `ls`
/// apart) transposed. Eight by eight in registers where AVX runs (one value at a time, packing a
/// weight gradient's transposed operand took 40 % of its time), the edges one by one.
pub fn transpose(src: &[f32], ls: usize, rows: usize, cols: usize, dst: &mut [f32], ld: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        (rows - 1) * ls + cols <= src.len() && (cols - 1) * ld + rows <= dst.len(),
        "transpose: {rows}×{cols} reaches past its operands"
    );
    assert!(ls >= cols && ld >= rows, "transpose: rows overlap");
    let (mut whole_rows, mut whole_cols) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if level() != Level::Baseline {
        (whole_rows, whole_cols) = (rows / 8 * 8, cols / 8 * 8);
        for c in (0..whole_cols).step_by(8) {
            for r in (0..whole_rows).step_by(8) {
                // SAFETY: AVX present (every level above the baseline has it); the block reads
                // rows r..r+8, values c..c+8 of `src` and writes rows c..c+8, values r..r+8 of
                // `dst`, inside both (asserted above).
                unsafe {
                    transpose8(
                        src.as_ptr().add(r * ls + c),
                        ls,
                        dst.as_mut_ptr().add(c * ld + r),
                        ld,
                    )
                }
            }
        }
    }
    for r in 0..rows {
        let first_col = if r < whole_rows { whole_cols } else { 0 };
        for c in first_col..cols {
            dst[c * ld + r] = src[r * ls + c];
        }
    }
}

/// The 8 × 8 block at `src` (rows `ls` apart) transposed into `dst` (rows `ld` apart).
///
/// # Safety
/// The CPU must have AVX; `src` must be readable for 8 values at each `i·ls`, `dst` writable
/// for 8 at each `i·ld`, `i < 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8(src: *const f32, ls: usize, dst: *mut f32, ld: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ls)));
    // Pairs of rows interleaved, then quads of values per 128-bit lane, then the lanes joined.
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(x, y)
        } else {
            _mm256_unpackhi_ps(x, y)
        }
    });
    // s[j] (j < 4) holds columns j and j + 4 of rows 0–3, s[4 + j] those of rows 4–7.
    let s: [__m256; 8] = std::array::from_fn(|j| {
        let (base, col) = (j / 4 * 4, j % 4);
        let (x, y) = (t[base + col / 2], t[base + 2 + col / 2]);
        if col % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(x, y)
        } else {
            _mm256_shuffle_ps::<0xEE>(x, y)
        }
    });
    for col in 0..4 {
        let (lo, hi) = (s[col], s[4 + col]);
        _mm256_storeu_ps(dst.add(col * ld), _mm256_permute2f128_ps::<0x20>(lo, hi));
        _mm256_storeu_ps(
            dst.add((col + 4) * ld),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        );
    }
}

/// Asks for every cache line of `data` to be brought into L2 (a hint: no fault, no wait), for
/// kernels that will read it soon and would otherwise wait on memory then.
#[cfg(target_arch = "x86_64")]
pub fn prefetch_l2(data: &[f32]) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    for line in data.chunks(16) {
        // SAFETY: a prefetch only hints the cache about an address inside `data`; it reads
        // nothing into the program and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr() as *const i8) };
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
// 1.5·2²³: added to a float of magnitude below 2²², it rounds it to an integer held in the
// low mantissa bits.
const ROUND: f32 = 12_582_912.0;

// 2^f on [−½, ½], a degree-5 polynomial fitted for relative error (7.5e−8), highest power
// first for Horner's rule.
const EXP2_POLY: [f32; 6] = [
    1.327_647_1e-3,
    9.675_542e-3,
    5.550_713e-2,
    2.402_212e-1,
    6.931_469_4e-1,
    1.000_000_1,
];

/// 1 + e^−x = 1 + 2^t with t = −x·log₂e, in pure arithmetic so that loops using it vectorize:
/// the denominator of the sigmoid and of SiLU. Call it inside [`dispatch`]: compiled there for
/// AVX2+FMA, a multiply-add is one instruction; anywhere else on x86-64 it is a libm `fmaf` call
/// per operation (exact, but slow and not vectorized). t is reduced in one step (its own
/// rounding costs ≤ 6e−8·|x| of e^−x, which only matters where the sigmoid is ~0 or ~1), 2^f by
/// a polynomial, and 1 + p·2ⁿ in one multiply-add: with the division, 15 vector operations
/// per SiLU where e^x with a two-part reduction and separate steps took 21.
#[inline(always)]
pub fn one_plus_exp_neg(x: f32) -> f32 {
    // 2^±126 keeps 2ⁿ a normal float; past it the sigmoid is 0 or 1 to f32 precision anyway.
    let t = (x * -LOG2E).clamp(-126.0, 126.0);
    let big = t + ROUND;
    let n = big - ROUND;
    let f = t - n;
    let p = EXP2_POLY[1..]
        .iter()
        .fold(EXP2_POLY[0], |p, &c| p.mul_add(f, c));
    // 2ⁿ from the bits of `n + ROUND` (n sits in the low mantissa bits), integer arithmetic
    // that vectorizes where a saturating `as i32` cast would not.
    let scale = f32::from_bits(big.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
    p.mul_add(scale, 1.0)
}

/// SiLU, x·σ(x) = x / (1 + e^−x) (see [`one_plus_exp_neg`]): relative error below 6e−7 for
/// |x| < 10, absolute error below 2e−6 anywhere.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / one_plus_exp_neg(x)
}

/// The logistic sigmoid 1 / (1 + e^−x) (see [`one_plus_exp_neg`]): absolute error below 2e−7.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / one_plus_exp_neg(x)
}

/// [`silu`] on eight lanes, the same operations in the same order.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let t = _mm256_mul_ps(x, _mm256_set1_ps(-LOG2E));
    let t = _mm256_min_ps(
        _mm256_max_ps(t, _mm256_set1_ps(-126.0)),
        _mm256_set1_ps(126.0),
    );
    let round = _mm256_set1_ps(ROUND);
    let big = _mm256_add_ps(t, round);
    let n = _mm256_sub_ps(big, round);
    let f = _mm256_sub_ps(t, n);
    let mut p = _mm256_set1_ps(EXP2_POLY[0]);
    for &c in &EXP2_POLY[1..] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
    }
    let bits = _mm256_sub_epi32(
        _mm256_castps_si256(big),
        _mm256_set1_epi32((ROUND.to_bits() - 127) as i32),
    );
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits));
    _mm256_div_ps(x, _mm256_fmadd_ps(p, scale, _mm256_set1_ps(1.0)))
}

/// [`Act::apply`](crate::act::Act::apply) on eight lanes (SiLU through [`silu8`]).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn act8(
    act: crate::act::Act,
    x: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    match act {
        crate::act::Act::None => x,
        crate::act::Act::Silu => silu8(x),
        // Operands in this order, `f32::clamp`'s semantics: NaN and −0 pass through.
        crate::act::Act::Relu6 => {
            _mm256_min_ps(_mm256_set1_ps(6.0), _mm256_max_ps(_mm256_setzero_ps(), x))
        }
    }
}

/// [`silu`] on sixteen lanes, the same operations in the same order as [`silu8`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn silu16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let t = _mm512_mul_ps(x, _mm512_set1_ps(-LOG2E));
    let t = _mm512_min_ps(
        _mm512_max_ps(t, _mm512_set1_ps(-126.0)),
        _mm512_set1_ps(126.0),
    );
    let round = _mm512_set1_ps(ROUND);
    let big = _mm512_add_ps(t, round);
    let n = _mm512_sub_ps(big, round);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[0]);
    for &c in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    let bits = _mm512_sub_epi32(
        _mm512_castps_si512(big),
        _mm512_set1_epi32((ROUND.to_bits() - 127) as i32),
    );
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits));
    _mm512_div_ps(x, _mm512_fmadd_ps(p, scale, _mm512_set1_ps(1.0)))
}

/// [`act8`] on sixteen lanes.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn act16(
    act: crate::act::Act,
    x: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    match act {
        crate::act::Act::None => x,
        crate::act::Act::Silu => silu16(x),
        // As `act8`: `f32::clamp`'s semantics.
        crate::act::Act::Relu6 => {
            _mm512_min_ps(_mm512_set1_ps(6.0), _mm512_max_ps(_mm512_setzero_ps(), x))
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every shape around the 8 × 8 blocks (edges, rows wider than the block) against the
    /// definition; values outside the block stay untouched.
    #[test]
    fn transpose_moves_every_value_and_nothing_else() {
        for (rows, cols) in [(1, 1), (8, 8), (13, 21), (16, 3), (5, 24), (17, 9)] {
            let (ls, ld) = (cols + 3, rows + 2);
            let src: Vec<f32> = (0..rows * ls).map(|i| i as f32).collect();
            let mut dst = vec![-1f32; cols * ld];
            super::transpose(&src, ls, rows, cols, &mut dst, ld);
            for c in 0..cols {
                for r in 0..ld {
                    let want = if r < rows { src[r * ls + c] } else { -1.0 };
                    assert_eq!(dst[c * ld + r], want, "{rows}×{cols} at ({c}, {r})");
                }
            }
        }
    }

    #[test]
    fn fast_sigmoid_is_accurate() {
        let mut worst = 0f64;
        let mut x = -90.0f32;
        while x < 90.0 {
            let exact = 1.0 / (1.0 + (-x as f64).exp());
            worst = worst.max((super::sigmoid(x) as f64 - exact).abs());
            x += 0.00731;
        }
        assert!(worst < 2e-7, "worst absolute error {worst:e}");
        assert_eq!(super::sigmoid(200.0), 1.0);
        assert!(super::sigmoid(-200.0) < 1e-37);
    }

    #[test]
    fn fast_silu_is_accurate() {
        let (mut worst_rel, mut worst_abs) = (0f64, 0f64);
        let mut x = -90.0f32;
        while x < 90.0 {
            let exact = x as f64 / (1.0 + (-x as f64).exp());
            let err = (super::silu(x) as f64 - exact).abs();
            worst_abs = worst_abs.max(err);
            if x.abs() < 10.0 {
                worst_rel = worst_rel.max(err / exact.abs().max(1e-30));
            }
            x += 0.00731;
        }
        assert!(worst_rel < 6e-7, "worst relative error {worst_rel:e}");
        assert!(worst_abs < 2e-6, "worst absolute error {worst_abs:e}");
        assert_eq!(super::silu(200.0), 200.0);
        assert!(super::silu(-200.0).abs() < 1e-30);
        assert!(super::silu(f32::NAN).is_nan());
    }

    /// The eight- and sixteen-lane activations compute exactly what the scalar ones compute in
    /// `dispatch`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_activations_equal_the_scalar_ones() {
        use crate::act::Act;
        use std::arch::x86_64::*;
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        let xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.047).collect();
        for act in [Act::None, Act::Silu, Act::Relu6] {
            for chunk in xs.chunks_exact(8) {
                let mut lanes = [0f32; 8];
                // SAFETY: AVX2 and FMA detected above; a load and a store of eight floats.
                unsafe {
                    let v = _mm256_loadu_ps(chunk.as_ptr());
                    _mm256_storeu_ps(lanes.as_mut_ptr(), super::act8(act, v));
                }
                for (i, &x) in chunk.iter().enumerate() {
                    let a = super::dispatch(
                        #[inline(always)]
                        || act.apply(x),
                    );
                    assert_eq!(lanes[i].to_bits(), a.to_bits(), "{act:?}({x})");
                }
            }
        }
        if is_x86_feature_detected!("avx512f") {
            for act in [Act::None, Act::Silu, Act::Relu6] {
                for chunk in xs.chunks_exact(16) {
                    let (mut wide, mut narrow) = ([0f32; 16], [0f32; 16]);
                    // SAFETY: AVX-512F, AVX2 and FMA detected; loads and stores of 16 floats.
                    unsafe {
                        let v = _mm512_loadu_ps(chunk.as_ptr());
                        _mm512_storeu_ps(wide.as_mut_ptr(), super::act16(act, v));
                        for half in 0..2 {
                            let v = _mm256_loadu_ps(chunk.as_ptr().add(8 * half));
                            _mm256_storeu_ps(
                                narrow.as_mut_ptr().add(8 * half),
                                super::act8(act, v),
                            );
                        }
                    }
                    for (w, n) in wide.iter().zip(narrow) {
                        assert_eq!(w.to_bits(), n.to_bits(), "{act:?}");
                    }
                }
            }
        }
        // ReLU6 clamps as `f32::clamp` does: NaN and −0 pass through.
        let odd = [f32::NAN, -0.0, 0.0, 7.0, -1.0, 6.0, 3.5, f32::INFINITY];
        let mut out = [0f32; 8];
        // SAFETY: AVX2 and FMA detected above; a load and a store of eight floats.
        unsafe {
            let v = super::act8(Act::Relu6, _mm256_loadu_ps(odd.as_ptr()));
            _mm256_storeu_ps(out.as_mut_ptr(), v);
        }
        for (x, y) in odd.iter().zip(out) {
            assert_eq!(y.to_bits(), Act::Relu6.apply(*x).to_bits(), "relu6({x})");
        }
    }

    #[test]
    fn dispatch_runs_the_closure() {
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert_eq!(
            super::dispatch(
                #[inline(always)]
                || v.iter().sum::<f32>()
            ),
            4950.0
        );
    }
}
