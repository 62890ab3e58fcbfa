//! Matrix products against weights fixed for many passes (inference): `y = act((x·w)·scale +
//! shift)` with the weights packed once into panels of [`NR`] output channels, the left operand
//! read in place (an NHWC tensor already is the row-major `[pixels, channels]` matrix of a 1×1
//! convolution, so nothing is packed per call), and batch norm and activation applied to each
//! tile in registers before its one store. 1×1 convolutions, Winograd's 16 transformed-domain
//! products and im2col'd k×k convolutions all run here when their weights are prepared.
//!
//! Work is split into blocks of rows (about 128 KiB of the left operand, reused from L2 for
//! every panel) and, when there are few rows, groups of panels, so small maps still use every
//! thread.

use rayon::prelude::*;

use crate::norm::Folded;
use crate::simd;

/// Output channels per panel: two AVX2 vectors.
pub const NR: usize = 16;
/// Rows per tile: 6 × 16 accumulators fill 12 of AVX2's 16 vector registers.
const MR: usize = 6;

/// Whether this CPU runs these kernels (x86-64 with AVX2 and FMA, unless `EFFNET_SIMD=baseline`);
/// elsewhere 1×1 convolutions keep the general matrix product and its weight layout.
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && simd::level() != simd::Level::Baseline
}

/// Length of the packed weights of a `k → n` 1×1 convolution.
pub fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * NR * k
}

/// Packs torch's `[n, k]` weight into panels `[n/NR][k][NR]`, the last one zero-padded.
pub fn pack(k: usize, n: usize, torch: &[f32]) -> Vec<f32> {
    pack_with(k, n, |o, p| torch[o * k + p])
}

/// Packs a row-major `[k, n]` matrix (the right operand of `x · w`) into [`pack`]'s panels.
pub fn pack_rows(k: usize, n: usize, w: &[f32]) -> Vec<f32> {
    assert!(
        w.len() >= k * n,
        "pointwise: weight holds {} < {k}×{n}",
        w.len()
    );
    pack_with(k, n, |o, p| w[p * n + o])
}

fn pack_with(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let mut panels = vec![0f32; packed_len(k, n)];
    for o in 0..n {
        let panel = &mut panels[(o / NR) * k * NR..][..k * NR];
        for p in 0..k {
            panel[p * NR + o % NR] = at(o, p);
        }
    }
    panels
}

/// `y[m×n] = epilogue(x[m×k] · w)`, `w` packed by [`pack`]; without `folded`, the plain product.
/// Only where [`available`].
pub fn forward(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    w: &[f32],
    y: &mut [f32],
    folded: Option<&Folded>,
) {
    check(x, m, k, n, w, y);
    if let Some(f) = folded {
        assert!(
            f.scale.len() == n && f.shift.len() == n,
            "pointwise: epilogue width"
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    run(x, m, k, n, w, y, folded)
}

fn run(x: &[f32], m: usize, k: usize, n: usize, w: &[f32], y: &mut [f32], folded: Option<&Folded>) {
    let panels = n.div_ceil(NR);
    // Rows per block: ~128 KiB of activations, a whole number of tiles.
    let block_rows = ((32768 / k.max(1)) / MR * MR).clamp(MR, 516);
    let row_blocks = m.div_ceil(block_rows);
    let threads = rayon::current_num_threads();
    let groups = if threads > 1 && m * k * n >= 1 << 18 {
        (4 * threads).div_ceil(row_blocks).clamp(1, panels)
    } else {
        1
    };
    let per_group = panels.div_ceil(groups);
    let y_addr = y.as_mut_ptr() as usize;
    let task = |t: usize| {
        let (rb, g) = (t / groups, t % groups);
        let rows = rb * block_rows..((rb + 1) * block_rows).min(m);
        let panels = g * per_group..((g + 1) * per_group).min(panels);
        // SAFETY: `forward` checked the operands' sizes and the CPU; tasks own disjoint (row
        // block, panel group) ranges of `y`, which is borrowed mutably for the whole call.
        unsafe { block(x, k, n, w, y_addr as *mut f32, rows, panels, folded) }
    };
    let tasks = row_blocks * groups;
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// `y[m×n] = x[m×k] · w` on the calling thread (for callers that already split their work over
/// the pool), `w` packed by [`pack`] or [`pack_rows`]. Only where [`available`].
pub fn product_serial(x: &[f32], m: usize, k: usize, n: usize, w: &[f32], y: &mut [f32]) {
    check(x, m, k, n, w, y);
    // SAFETY: sizes and CPU checked above; `y` is borrowed mutably for the whole call.
    unsafe { block(x, k, n, w, y.as_mut_ptr(), 0..m, 0..n.div_ceil(NR), None) }
}

fn check(x: &[f32], m: usize, k: usize, n: usize, w: &[f32], y: &[f32]) {
    assert!(
        available(),
        "pointwise: kernels need x86-64 with AVX2 and FMA"
    );
    assert!(
        x.len() >= m * k,
        "pointwise: input holds {} < {m}×{k}",
        x.len()
    );
    assert!(
        y.len() >= m * n,
        "pointwise: output holds {} < {m}×{n}",
        y.len()
    );
    assert!(
        w.len() >= packed_len(k, n),
        "pointwise: weights not packed for {k}→{n}"
    );
}

/// Rows `rows` × panels `panels` of the product, tile by tile, each with the epilogue.
///
/// # Safety
/// [`check`] must have passed for `x`, `w` and the `m × n` output at `y`, with `rows` ⊆ 0..m and
/// `panels` ⊆ 0..n/NR; no other thread may touch this part of `y` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    x: &[f32],
    k: usize,
    n: usize,
    w: &[f32],
    y: *mut f32,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    folded: Option<&Folded>,
) {
    for panel in panels {
        let col0 = panel * NR;
        let cols = NR.min(n - col0);
        let wp = &w[panel * k * NR..][..k * NR];
        // The panel's scale and shift, zero past the last column.
        let epilogue = folded.map(|f| {
            let (mut scale, mut shift) = ([0f32; NR], [0f32; NR]);
            scale[..cols].copy_from_slice(&f.scale[col0..col0 + cols]);
            shift[..cols].copy_from_slice(&f.shift[col0..col0 + cols]);
            (scale, shift, f.act)
        });
        let mut r = rows.start;
        while r < rows.end {
            let tile_rows = MR.min(rows.end - r);
            // SAFETY: AVX2 and FMA checked (`available`); the tile covers rows r..r+tile_rows ≤ m
            // of `x` (row length k) and of `y` (row length n), columns col0..col0+cols ≤ n, and
            // `wp` holds k×NR: inside the operands by the caller's contract, and this caller's
            // part of `y` alone.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let xt = x.as_ptr().add(r * k);
                let yt = y.add(r * n + col0);
                let (wt, e) = (wp.as_ptr(), epilogue.as_ref());
                match tile_rows {
                    6 => tile::<6>(xt, k, wt, yt, n, cols, e),
                    5 => tile::<5>(xt, k, wt, yt, n, cols, e),
                    4 => tile::<4>(xt, k, wt, yt, n, cols, e),
                    3 => tile::<3>(xt, k, wt, yt, n, cols, e),
                    2 => tile::<2>(xt, k, wt, yt, n, cols, e),
                    _ => tile::<1>(xt, k, wt, yt, n, cols, e),
                }
            }
            r += tile_rows;
        }
    }
}

/// One `R × NR` tile: the full reduction over `k` in registers, then `act(v·scale + shift)`
/// there too when an epilogue is given, then one store of `cols` columns.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` must be readable for `R` rows of `k` at stride `k`,
/// `w` for `k × NR` values, and `y` writable for `R` rows of `cols ≤ NR` at stride `ldy`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize>(
    x: *const f32,
    k: usize,
    w: *const f32,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    epilogue: Option<&([f32; NR], [f32; NR], crate::act::Act)>,
) {
    use std::arch::x86_64::*;
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    for p in 0..k {
        let w0 = _mm256_loadu_ps(w.add(p * NR));
        let w1 = _mm256_loadu_ps(w.add(p * NR + 8));
        for r in 0..R {
            let a = _mm256_broadcast_ss(&*x.add(r * k + p));
            lo[r] = _mm256_fmadd_ps(a, w0, lo[r]);
            hi[r] = _mm256_fmadd_ps(a, w1, hi[r]);
        }
    }
    if let Some((scale, shift, act)) = epilogue {
        let (s0, s1) = (
            _mm256_loadu_ps(scale.as_ptr()),
            _mm256_loadu_ps(scale.as_ptr().add(8)),
        );
        let (b0, b1) = (
            _mm256_loadu_ps(shift.as_ptr()),
            _mm256_loadu_ps(shift.as_ptr().add(8)),
        );
        for r in 0..R {
            lo[r] = simd::act8(*act, _mm256_fmadd_ps(lo[r], s0, b0));
            hi[r] = simd::act8(*act, _mm256_fmadd_ps(hi[r], s1, b1));
        }
    }
    for r in 0..R {
        let out = y.add(r * ldy);
        if cols == NR {
            _mm256_storeu_ps(out, lo[r]);
            _mm256_storeu_ps(out.add(8), hi[r]);
        } else {
            let mut row = [0f32; NR];
            _mm256_storeu_ps(row.as_mut_ptr(), lo[r]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), hi[r]);
            std::ptr::copy_nonoverlapping(row.as_ptr(), out, cols);
        }
    }
}
