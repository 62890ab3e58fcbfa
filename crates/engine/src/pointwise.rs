//! Matrix products against weights fixed for many passes (inference): `y = act((x·w)·scale +
//! shift)` with the weights packed once into panels of [`NR`] output channels, the left operand
//! read in place (an NHWC tensor already is the row-major `[pixels, channels]` matrix of a 1×1
//! convolution, so nothing is packed per call), and batch norm and activation applied to each
//! tile in registers before its one store. 1×1 convolutions, Winograd's transformed-domain
//! products and other k×k convolutions (read straight from their image, [`conv`])
//! all run here when their weights are prepared.
//!
//! Work is split into blocks of rows (about 128 KiB of the left operand, reused from L2 for
//! every panel) and, when there are few rows, ranges of panels, so small maps still use every
//! thread; within a block, tiles sweep groups of panels (about 128 KiB of weights) so that
//! each writes its rows' outputs side by side.

use rayon::prelude::*;

use crate::norm::Folded;
use crate::simd;

/// Output channels per panel: two AVX2 vectors.
pub const NR: usize = 16;
/// Rows per tile: 6 × 16 accumulators fill 12 of AVX2's 16 vector registers.
pub(crate) const MR: usize = 6;
/// Columns of a wide tile: a whole panel and a last one of at most eight columns together (the
/// 24-channel convolutions of EfficientNetV2's first stages), in three vectors.
const WIDE: usize = NR + 8;
/// Rows per wide tile: 3 × 3 accumulators, three weight vectors and the broadcast.
const WIDE_MR: usize = 3;
/// Rows per tile with AVX-512: 8 × 2 accumulators (two panels, one vector each) in 16 of its
/// 32 vector registers. 12 rows ran slower (LLVM spilled accumulators to the stack): V2-S's 1×1
/// products at 8 rows 10–40 % faster in `matmul_shapes`.
pub(crate) const MR512: usize = 8;
/// Columns of a tile's epilogue: two panels (AVX-512), or a wide tile (AVX2).
const TILE_COLS: usize = 2 * NR;

/// Whether tiles run on AVX-512: two panels side by side, sixteen lanes a vector.
#[inline]
fn avx512() -> bool {
    cfg!(target_arch = "x86_64") && simd::level() == simd::Level::Avx512
}

/// Rows per tile of whole panels on this CPU.
pub(crate) fn rows_per_tile() -> usize {
    if avx512() {
        MR512
    } else {
        MR
    }
}

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
    let mut panels = vec![0f32; packed_len(k, n)];
    pack_strided_into(k, n, torch, (1, k), &mut panels);
    panels
}

/// Packs a row-major `[k, n]` matrix (the right operand of `x · w`) into [`pack`]'s panels.
pub fn pack_rows(k: usize, n: usize, w: &[f32]) -> Vec<f32> {
    let mut panels = vec![0f32; packed_len(k, n)];
    pack_rows_into(k, n, w, &mut panels);
    panels
}

/// [`pack_rows`] into `panels` ([`packed_len`] long), for callers that pack on every call.
pub fn pack_rows_into(k: usize, n: usize, w: &[f32], panels: &mut [f32]) {
    pack_strided_into(k, n, w, (n, 1), panels)
}

/// [`pack_rows_into`] in bf16: a row-major `[k, n]` matrix into [`pack_bf16`]'s panels (`out`,
/// [`packed_len_bf16`] long). Only where [`bf16_available`].
pub(crate) fn pack_rows_bf16_into(k: usize, n: usize, w: &[f32], out: &mut [u32]) {
    // Rows of `w` are rounded straight into the panels: no f32 scratch.
    pack_strided_bf16_into(k, n, w, (n, 1), &mut [], out)
}

/// Panel `o / NR`, row `p`, lane `o % NR` ← `w[p·rs + o·cs]` (the `k × n` matrix that `w` holds
/// with row stride `rs` and column stride `cs`); the last panel's lanes past `n` ← 0.
pub(crate) fn pack_strided_into(
    k: usize,
    n: usize,
    w: &[f32],
    (rs, cs): (usize, usize),
    panels: &mut [f32],
) {
    assert!(
        panels.len() >= packed_len(k, n),
        "pointwise: panels too short"
    );
    if k == 0 || n == 0 {
        return;
    }
    assert!(
        (k - 1) * rs + (n - 1) * cs < w.len(),
        "pointwise: weight holds {} < {k}×{n}",
        w.len()
    );
    for (j, panel) in panels[..packed_len(k, n)]
        .chunks_exact_mut(k * NR)
        .enumerate()
    {
        let (o0, cols) = (j * NR, NR.min(n - j * NR));
        if cs == 1 && cols == NR {
            // Rows of the panel are pieces of rows of `w` (of a length known here: two moves).
            for (p, lanes) in panel.chunks_exact_mut(NR).enumerate() {
                lanes.copy_from_slice(&w[p * rs + o0..][..NR]);
            }
        } else if cs == 1 {
            for (p, lanes) in panel.chunks_exact_mut(NR).enumerate() {
                lanes[..cols].copy_from_slice(&w[p * rs + o0..][..cols]);
                lanes[cols..].fill(0.0);
            }
        } else if rs == 1 && cols == NR {
            // Stored transposed: the panel's 16 columns are 16 rows of `w`.
            simd::transpose(&w[o0 * cs..], cs, NR, k, panel, NR);
        } else {
            // Column by column: each reads `w` along its rows when it is stored transposed.
            for lane in 0..NR {
                let o = o0 + lane;
                for (p, lanes) in panel.chunks_exact_mut(NR).enumerate() {
                    lanes[lane] = if lane < cols { w[p * rs + o * cs] } else { 0.0 };
                }
            }
        }
    }
}

/// Whether this CPU runs [`Panels::Bf16`] products (AVX-512 with AVX512_BF16, unless
/// `EFFNET_SIMD` caps the kernels below AVX-512).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512() && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A product's right operand, packed for this module's kernels.
#[derive(Debug, Clone, Copy)]
pub enum Panels<'a> {
    /// [`pack`]'s f32 panels.
    F32(&'a [f32]),
    /// [`pack_bf16`]'s: bf16 values, two reduction steps to a 32-bit slot. The left operand is
    /// rounded to bf16 as the product reads it, and the sums are f32.
    Bf16(&'a [u32]),
}

impl Panels<'_> {
    /// Whether these are long enough for a `k → n` product.
    pub fn holds(&self, k: usize, n: usize) -> bool {
        match self {
            Panels::F32(w) => w.len() >= packed_len(k, n),
            Panels::Bf16(w) => w.len() >= packed_len_bf16(k, n),
        }
    }
}

/// Length of [`pack_bf16`]'s panels for a `k → n` 1×1 convolution.
pub fn packed_len_bf16(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * NR * k.div_ceil(2)
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits; NaN stays NaN.
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Packs torch's `[n, k]` weight into bf16 panels `[n/NR][k/2][NR]` of 32-bit slots: slot
/// (panel `j`, pair `q`, lane `l`) holds output `j·NR + l`'s weights of steps `2q` (low half) and
/// `2q + 1` (high half), the last panel's lanes past `n` and a last odd step's partner zero:
/// [`pack`]'s panels through [`panels_to_bf16`]. Only where [`bf16_available`].
pub fn pack_bf16(k: usize, n: usize, torch: &[f32]) -> Vec<u32> {
    let mut panels = vec![0u32; packed_len_bf16(k, n)];
    panels_to_bf16(k, n, &pack(k, n, torch), &mut panels);
    panels
}

/// [`pack`]'s f32 panels of a `k → n` product (`panels`, [`packed_len`]) rounded into
/// [`pack_bf16`]'s layout (`out`, [`packed_len_bf16`]): the same values as packing the matrix
/// with [`pack_bf16`], for products whose right operand changes every call (training in bf16).
/// Only where [`bf16_available`].
pub fn panels_to_bf16(k: usize, n: usize, panels: &[f32], out: &mut [u32]) {
    assert!(bf16_available(), "pointwise: bf16 panels need AVX512_BF16");
    assert!(
        panels.len() >= packed_len(k, n) && out.len() >= packed_len_bf16(k, n),
        "pointwise: panels too short for {k}→{n}"
    );
    let pairs = k.div_ceil(2);
    if pairs == 0 {
        return;
    }
    let count = n.div_ceil(NR);
    for (src, dst) in panels[..count * k * NR]
        .chunks_exact(k * NR)
        .zip(out.chunks_exact_mut(pairs * NR))
    {
        // SAFETY: AVX-512F and AVX512_BF16 asserted; `src` holds k rows of NR values and
        // `dst` `pairs` rows of NR slots, which is what `panel_to_bf16` reads and writes.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            panel_to_bf16(k, src.as_ptr(), NR, NR, dst)
        }
    }
}

/// [`pack_strided_into`] and [`panels_to_bf16`] in one: `w`'s `k × n` matrix (strides `rs`,
/// `cs`) into bf16 panels `out`. Rows of `w` (`cs == 1`, a product's right operand as training
/// stores it) are rounded straight from `w`; otherwise through f32 panels in `scratch`
/// ([`packed_len`]). Only where [`bf16_available`].
pub(crate) fn pack_strided_bf16_into(
    k: usize,
    n: usize,
    w: &[f32],
    (rs, cs): (usize, usize),
    scratch: &mut [f32],
    out: &mut [u32],
) {
    if cs != 1 {
        pack_strided_into(k, n, w, (rs, cs), scratch);
        return panels_to_bf16(k, n, scratch, out);
    }
    assert!(bf16_available(), "pointwise: bf16 panels need AVX512_BF16");
    assert!(
        out.len() >= packed_len_bf16(k, n),
        "pointwise: panels too short for {k}→{n}"
    );
    let pairs = k.div_ceil(2);
    if pairs == 0 || n == 0 {
        return;
    }
    assert!(
        (k - 1) * rs + n <= w.len(),
        "pointwise: weight holds {} < {k}×{n}",
        w.len()
    );
    for (j, dst) in out
        .chunks_exact_mut(pairs * NR)
        .take(n.div_ceil(NR))
        .enumerate()
    {
        let o0 = j * NR;
        // SAFETY: AVX-512F and AVX512_BF16 asserted; the panel reads k rows of
        // min(NR, n − o0) values from column o0, `rs` apart, inside `w` (asserted), and writes
        // `pairs` rows of NR slots of `dst`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            panel_to_bf16(k, w.as_ptr().add(o0), rs, NR.min(n - o0), dst)
        }
    }
}

/// One panel in bf16: rows `2q` and `2q + 1` (zero past `k`) of `src` (`k` rows `rs` apart,
/// `cols` values each, zero past them) into slots row `q` of `dst`.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512_BF16; `src` must be readable for `cols ≤ NR` values at
/// each `r·rs`, `r < k`; `dst` must hold `k.div_ceil(2)·NR` slots.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn panel_to_bf16(k: usize, src: *const f32, rs: usize, cols: usize, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    // Lanes past `cols` neither read (a masked load does not touch them) nor kept.
    let lanes: __mmask16 = if cols >= NR { !0 } else { (1 << cols) - 1 };
    for (q, slots) in dst.chunks_exact_mut(NR).enumerate() {
        let lo = _mm512_maskz_loadu_ps(lanes, src.add(2 * q * rs));
        let hi = match 2 * q + 1 < k {
            true => _mm512_maskz_loadu_ps(lanes, src.add((2 * q + 1) * rs)),
            false => _mm512_setzero_ps(),
        };
        // Each row rounded to 16 bf16, widened to 32-bit lanes, the odd row in the high halves.
        let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(lo));
        let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(hi));
        let pairs = _mm512_or_si512(
            _mm512_cvtepu16_epi32(lo),
            _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
        );
        _mm512_storeu_si512(slots.as_mut_ptr() as *mut __m512i, pairs);
    }
}

thread_local! {
    /// Each thread's rows of a bf16 product's left operand, rounded (kept between calls).
    static BF16_ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// High-water mark of every worker's [`BF16_ROWS`].
static BF16_ROWS_HIGH: crate::HighWater = crate::HighWater::new();

/// Grows this thread's [`BF16_ROWS`] to the high-water mark ([`crate::spread_worker_buffers`]).
pub(crate) fn reach_high_water() {
    BF16_ROWS.with_borrow_mut(|rows| BF16_ROWS_HIGH.reach(rows));
}

/// Rows `rows` of `x` (`k` values each, `pixel` apart) rounded to bf16 into `out`, pairs of
/// steps to a slot as [`pack_bf16`] pairs them, `k.div_ceil(2)` slots a row.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512_BF16; `x` must hold every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_to_bf16(
    x: &[f32],
    pixel: usize,
    k: usize,
    rows: std::ops::Range<usize>,
    out: &mut [u32],
) {
    use std::arch::x86_64::*;
    let pairs = k.div_ceil(2);
    if pairs == 0 {
        return;
    }
    for (row, dst) in rows.zip(out.chunks_exact_mut(pairs)) {
        let src = &x[row * pixel..][..k];
        let mut c = 0;
        while c + 32 <= k {
            let lo = _mm512_loadu_ps(src.as_ptr().add(c));
            let hi = _mm512_loadu_ps(src.as_ptr().add(c + 16));
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(c / 2) as *mut __m512i, both);
            c += 32;
        }
        for (q, slot) in dst.iter_mut().enumerate().skip(c / 2) {
            let step = |p: usize| if p < k { to_bf16(src[p]) as u32 } else { 0 };
            *slot = step(2 * q) | step(2 * q + 1) << 16;
        }
    }
}

/// `y[m×n] = epilogue(x[m×k] · w) + skip`, `w` packed by [`pack`]; without `folded`, the plain
/// product; `skip` (a residual, `m×n` like `y`) is added to each tile after the epilogue, in
/// registers. Only where [`available`].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    w: &[f32],
    y: &mut [f32],
    folded: Option<&Folded>,
    skip: Option<&[f32]>,
) {
    forward_panels(x, m, k, n, Panels::F32(w), y, folded, skip)
}

/// [`forward`] with weights packed either way.
#[allow(clippy::too_many_arguments)]
pub fn forward_panels(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    w: Panels,
    y: &mut [f32],
    folded: Option<&Folded>,
    skip: Option<&[f32]>,
) {
    check(x, m, k, n, w, y);
    if let Some(s) = skip {
        assert!(
            s.len() >= m * n,
            "pointwise: residual holds {} < {m}×{n}",
            s.len()
        );
    }
    if let Some(f) = folded {
        assert!(
            f.scale.len() == n && f.shift.len() == n,
            "pointwise: epilogue width"
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    // Rows per block: ~128 KiB of activations, a whole number of tiles; few rows (batch 1's
    // 7×7 maps) in one block, so that each thread streams its panels' weights once (a
    // 1536 → 256 projection's 1.5 MB were read in four blocks of 16, 16, 16 and 1 rows).
    let block_rows = if m <= 64 { m } else { block_rows(k) };
    let row_blocks = m.div_ceil(block_rows);
    let threads = rayon::current_num_threads();
    // Split over the threads for enough work, or for a large weight however few the rows:
    // squeeze-excitation's products at batch 1 (one row, 256–400 KiB of weights each) wait on
    // memory, and two cores stream the weights faster than one (15–20 % less SE time).
    let split = threads > 1 && (m * k * n >= 1 << 18 || k * n >= 1 << 16);
    // Work units: one panel over one row block, row block by row block. Many row blocks make a
    // task each; fewer are cut into four tasks per thread of (nearly) equal unit counts, a task
    // possibly ending in one row block and going on in the next, so the threads end together
    // (3 row blocks × 16 panels made 9 tasks of 5–6 panels before: one thread did 5 of them).
    let units = row_blocks * panels;
    let tasks = match split {
        false => 1,
        true if row_blocks >= 4 * threads => row_blocks,
        true => (4 * threads).min(units),
    };
    let y_addr = y.as_mut_ptr() as usize;
    let task = |t: usize| {
        let (mut unit, last) = (t * units / tasks, (t + 1) * units / tasks);
        while unit < last {
            let rb = unit / panels;
            let end = last.min((rb + 1) * panels);
            let rows = rb * block_rows..((rb + 1) * block_rows).min(m);
            let these = unit - rb * panels..end - rb * panels;
            // SAFETY: `forward` checked the operands' sizes and the CPU; tasks own disjoint
            // ranges of units, (row block, panel) parts of `y`, which is borrowed mutably for
            // the whole call.
            unsafe {
                let skip = skip.map(|s| s.as_ptr());
                let operands = Operands {
                    x,
                    pixel: k,
                    k,
                    n,
                    w,
                    bypass: false,
                };
                block(&operands, y_addr as *mut f32, n, rows, these, folded, skip)
            }
            unit = end;
        }
    };
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        task(0);
    }
}

/// Rows per block of [`forward`]: ~128 KiB of activations, a whole number of tiles.
fn block_rows(k: usize) -> usize {
    let tile = rows_per_tile();
    ((32768 / k.max(1)) / tile * tile).clamp(tile, 516 / tile * tile)
}

/// The rounded rows that a [`Panels::Bf16`] [`forward`] on `k` input channels keeps, in slots.
pub fn bf16_rows_len(k: usize) -> usize {
    block_rows(k) * k.div_ceil(2)
}

/// Grows the calling thread's kept buffers for later calls: [`conv_projected`]'s row to
/// `projected_row` floats, a bf16 [`forward`]'s rounded rows to `bf16_rows` slots
/// ([`bf16_rows_len`]). `Network::freeze` runs it on every worker, so that inference passes
/// allocate nothing.
pub fn reserve(projected_row: usize, bf16_rows: usize) {
    ROW.with_borrow_mut(|row| crate::at_least(row, projected_row).len());
    BF16_ROWS.with_borrow_mut(|rows| BF16_ROWS_HIGH.grow(rows, bf16_rows).len());
}

/// What [`product_serial`] does with each tile of the product.
#[derive(Clone, Copy)]
pub enum Then<'a> {
    /// `y = x · w`.
    Store,
    /// `y = x · w`, whole 64-byte lines of `y` written past the caches (AVX-512): for outputs
    /// far larger than the caches, which a plain store would first fetch line by line.
    Stream,
    /// `y += x · w`.
    Add,
    /// `y = epilogue(x · w)`: batch norm and activation folded, as [`forward`] applies them.
    Fold(&'a Folded),
}

/// `y[m×n] = x[m×k] · w` on the calling thread (for callers that already split their work over
/// the pool), `w` packed by [`pack`] or [`pack_rows`], then what `then` says. Only where
/// [`available`].
pub fn product_serial(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    w: &[f32],
    y: &mut [f32],
    then: Then,
) {
    assert!(
        y.len() >= m * n,
        "pointwise: output holds {} < {m}×{n}",
        y.len()
    );
    // SAFETY: `y` holds the m × n output (asserted) and is borrowed mutably for the whole call.
    unsafe { product_at(x, k, m, k, n, Panels::F32(w), y.as_mut_ptr(), n, then) }
}

/// [`product_serial`] for operands inside larger matrices: row `r` of `x` starts at
/// `x[r·pixel]`, of the output at `y + r·ldy` (the general matrix product's blocks).
///
/// # Safety
/// `y` must be valid for reads and writes at `r·ldy + j` for every `r < m`, `j < n`, and no
/// other thread may touch those elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_at(
    x: &[f32],
    pixel: usize,
    m: usize,
    k: usize,
    n: usize,
    w: Panels,
    y: *mut f32,
    ldy: usize,
    then: Then,
) {
    check_operands(x, pixel, m, k, n, w);
    assert!(ldy >= n, "pointwise: output rows overlap");
    // To add, each tile adds what `y` holds as a residual read through the same pointer it
    // stores through (a tile reads its rows before it stores them; tiles are disjoint).
    let (skip, folded) = match then {
        Then::Store | Then::Stream => (None, None),
        Then::Add => (Some(y as *const f32), None),
        Then::Fold(f) => {
            assert!(
                f.scale.len() == n && f.shift.len() == n,
                "pointwise: epilogue width"
            );
            (None, Some(f))
        }
    };
    let bypass = matches!(then, Then::Stream);
    let operands = Operands {
        x,
        pixel,
        k,
        n,
        w,
        bypass,
    };
    // SAFETY: sizes and CPU checked above; the output's elements are the caller's alone, and
    // `skip`, when given, is `y` itself, read only where the same tile then writes.
    unsafe { block(&operands, y, ldy, 0..m, 0..n.div_ceil(NR), folded, skip) }
    // Non-temporal stores are weakly ordered: the fence puts them before whatever this thread
    // does next (telling the pool its task is done), so the next reader sees them.
    #[cfg(target_arch = "x86_64")]
    if bypass {
        // SAFETY: SSE is part of x86-64.
        unsafe { std::arch::x86_64::_mm_sfence() }
    }
}

fn check(x: &[f32], m: usize, k: usize, n: usize, w: Panels, y: &[f32]) {
    check_operands(x, k, m, k, n, w);
    assert!(
        y.len() >= m * n,
        "pointwise: output holds {} < {m}×{n}",
        y.len()
    );
}

/// The CPU, and `m` rows of `k` values `pixel` apart in `x`, and the packed `k → n` weights.
fn check_operands(x: &[f32], pixel: usize, m: usize, k: usize, n: usize, w: Panels) {
    assert!(
        available(),
        "pointwise: kernels need x86-64 with AVX2 and FMA"
    );
    let reach = if m == 0 { 0 } else { (m - 1) * pixel + k };
    assert!(
        x.len() >= reach,
        "pointwise: input holds {} < {m} rows of {k}, {pixel} apart",
        x.len()
    );
    if let Panels::Bf16(_) = w {
        assert!(
            bf16_available(),
            "pointwise: bf16 products need AVX512_BF16"
        );
    }
    assert!(w.holds(k, n), "pointwise: weights not packed for {k}→{n}");
}

/// Steps ahead (panel rows of 64 bytes) at which the products' reductions prefetch their
/// weights into L1: the hardware's prefetchers do not keep a large weight's stream ahead (each
/// step reads a new line). Batch 1's 1×1 products with cold weights ran 2–4 % faster so (49 ×
/// 1536 → 256: 0.44–0.47 → 0.42–0.45 ms, toggled in one process), batch 8's the same; 16 and
/// 64 steps no better. The direct convolution's small weights stay in cache and do without.
const STREAM_AHEAD: usize = 32;

/// Weights of the panels that [`block`] sweeps together, tile by tile (see there).
const GROUP_BYTES: usize = 128 * 1024;
/// At most this many panels in a group (the epilogues sit on the stack).
const GROUP_PANELS: usize = 16;

/// The operands of a product: row `r` of the left one is `x[r·pixel..][..k]`, the right one is
/// `w`, packed `k → n`.
struct Operands<'a> {
    x: &'a [f32],
    pixel: usize,
    k: usize,
    n: usize,
    w: Panels<'a>,
    /// Whether the output's whole lines bypass the caches ([`Then::Stream`]).
    bypass: bool,
}

/// Rows `rows` × panels `panels` of the product, tile by tile, each with the epilogue; output
/// row `r` at `y + r·ldy`.
///
/// Panels are taken in groups of about [`GROUP_BYTES`] of weights (which stay in L2), and each
/// tile of rows runs over the whole group before the next: its output row pieces are then
/// written side by side rather than one 64-byte piece per row and panel across the whole row
/// block. Expansions (k = 128–256, n = 512–1536, a 1.5–10 MB output) ran 15–30 % faster so;
/// projections (one panel per group at k ≥ 1536) are unchanged.
///
/// # Safety
/// [`check_operands`] must have passed for `o` and every row of `rows`, with `panels` ⊆
/// 0..n/NR; `y` must be writable at `r·ldy + j` for `r` in `rows`, `j < n` (`ldy ≥ n`), and
/// `skip`, if any, readable there (it may be `y` itself); no other thread may touch this part
/// of `y` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    o: &Operands,
    y: *mut f32,
    ldy: usize,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    folded: Option<&Folded>,
    skip: Option<*const f32>,
) {
    let Operands {
        x,
        pixel,
        k,
        n,
        w,
        bypass,
    } = *o;
    match w {
        Panels::F32(w) => {
            let left = Left {
                x: x.as_ptr(),
                pixel,
                depth: k,
                in_cache: false,
                bf16: false,
            };
            sweep(
                &left,
                x,
                w.as_ptr(),
                n,
                y,
                ldy,
                rows,
                panels,
                folded,
                skip,
                bypass,
            )
        }
        Panels::Bf16(w) => BF16_ROWS.with_borrow_mut(|scratch| {
            // A block of rows rounded at a time, then read from cache by every panel.
            let pairs = k.div_ceil(2);
            let chunk = block_rows(k);
            let scratch = BF16_ROWS_HIGH.grow(scratch, chunk.min(rows.len()) * pairs);
            for start in rows.clone().step_by(chunk) {
                let part = start..rows.end.min(start + chunk);
                // SAFETY: AVX512_BF16 checked (`check_operands`); the caller's rows of `x`.
                #[cfg(target_arch = "x86_64")]
                rows_to_bf16(x, pixel, k, part.clone(), scratch);
                let left = Left {
                    // Row r at `x + r·pixel`, for r in `part` (wrapping: only those are read).
                    x: (scratch.as_ptr() as *const f32).wrapping_sub(part.start * pairs),
                    pixel: pairs,
                    depth: pairs,
                    in_cache: true,
                    bf16: true,
                };
                let w = w.as_ptr() as *const f32;
                sweep(
                    &left,
                    x,
                    w,
                    n,
                    y,
                    ldy,
                    part,
                    panels.clone(),
                    folded,
                    skip,
                    bypass,
                )
            }
        }),
    }
}

/// The left operand as [`sweep`]'s tiles read it: row `r` at `x + r·pixel`, `depth` steps (of
/// one f32, or of a bf16 pair).
struct Left {
    x: *const f32,
    pixel: usize,
    depth: usize,
    /// Whether the rows are in cache already (no prefetching them).
    in_cache: bool,
    bf16: bool,
}

/// [`block`]'s tiles: `w` is the panels' start, each `left.depth × NR` values; `x` the f32 rows
/// (`left.pixel` apart where they are what the tiles read) for prefetching.
///
/// # Safety
/// As [`block`], `left` holding the rows `rows` and `w` the panels of that product.
#[allow(clippy::too_many_arguments)]
unsafe fn sweep(
    left: &Left,
    x: &[f32],
    w: *const f32,
    n: usize,
    y: *mut f32,
    ldy: usize,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    folded: Option<&Folded>,
    skip: Option<*const f32>,
    bypass: bool,
) {
    let (depth, pixel) = (left.depth, left.pixel);
    // Panels per tile (a span), rows per tile.
    let (span, per) = (if avx512() { 2 } else { 1 }, rows_per_tile());
    // As few tiles as whole ones need, evened out (49 rows as 7 × 7, not 6 × 8 + 1): a one-row
    // tile waits on its accumulators' latency and costs half a full one.
    let per = rows.len().div_ceil(rows.len().div_ceil(per).max(1)).max(1);
    let group = (GROUP_BYTES / (4 * depth * NR).max(1)).clamp(span, GROUP_PANELS) / span * span;
    let mut first = panels.start;
    while first < panels.end {
        let last = panels.end.min(first + group);
        // The group's spans: first panel, columns.
        let spans = (first..last).step_by(span).map(|p| {
            let col0 = p * NR;
            (p, (NR * span.min(last - p)).min(n - col0))
        });
        let mut epilogues = [None; GROUP_PANELS];
        for (e, (p, cols)) in epilogues.iter_mut().zip(spans.clone()) {
            *e = panel_epilogue(folded, p * NR, cols);
        }
        let mut r = rows.start;
        while r < rows.end {
            let count = per.min(rows.end - r);
            // The first group reads the rows from memory (a large map's rows are not in any
            // cache yet); fetching the next tile's into L2 meanwhile hides that latency:
            // stage 2's projection (25088 × 192 → 48) at batch 8 ran 10–18 % faster so, the
            // later groups find the rows in L2 anyway.
            #[cfg(target_arch = "x86_64")]
            if first == panels.start && !left.in_cache {
                let next = r + count..rows.end.min(r + count + per);
                if pixel == depth {
                    simd::prefetch_l2(&x[next.start * depth..next.end * depth]);
                } else {
                    for row in next {
                        simd::prefetch_l2(&x[row * pixel..][..depth]);
                    }
                }
            }
            for (e, (panel, cols)) in epilogues.iter().zip(spans.clone()) {
                let col0 = panel * NR;
                // SAFETY: AVX2 and FMA checked (`available`), AVX512_BF16 for bf16 panels
                // (`check_operands`); rows r..r+count ⊆ `rows` of the left operand and of `y`
                // (`ldy` apart), columns col0..col0+cols ≤ n, and the span's panels hold
                // depth×NR values each: inside the operands by the caller's contract, and this
                // caller's part of `y` alone.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let tile = Tile {
                        x: left.x.wrapping_add(r * pixel),
                        pixel,
                        taps: &[0],
                        depth,
                        w: w.add(panel * depth * NR),
                        tap_stride: depth * NR,
                        panel_stride: depth * NR,
                        prefetch_ahead: true,
                        bf16: left.bf16,
                        bypass,
                        y: y.add(r * ldy + col0),
                        skip: skip.map(|s| s.add(r * ldy + col0)),
                        ldy,
                        cols,
                        epilogue: e.as_ref(),
                    };
                    tile_of(count, &tile);
                }
            }
            r += count;
        }
        first = last;
    }
}

/// A tile's whole reduction into `acc` (`R` rows of `V` vectors: the panel's first `8·V`
/// columns): `depth` steps from each tap. A function of its own, not inlined: inside
/// [`tile`], LLVM spilled the accumulators to the stack on every step. Steps go two at a time
/// (the loop's bookkeeping then costs half as much; at 72 steps per tap, a 3×3 convolution on
/// 24 channels, the kernel ran 10–15 % faster so).
///
/// # Safety
/// As [`tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn reduce<const R: usize, const V: usize>(
    t: &Tile,
    acc: &mut [[std::arch::x86_64::__m256; V]; R],
) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let (mut a, next) = (*acc, t.panel_stride);
    for (i, &tap) in t.taps.iter().enumerate() {
        let (x, w) = (t.x.add(tap), t.w.add(i * t.tap_stride));
        let mut p = 0;
        if t.prefetch_ahead {
            while p + 2 <= t.depth {
                // The two panel rows 32 steps on (a prefetch only hints, and never faults, so
                // past the panel's end it costs nothing).
                let ahead = w.wrapping_add((p + STREAM_AHEAD) * NR);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(NR) as *const i8);
                step(x, t.pixel, p, w, next, &mut a);
                step(x, t.pixel, p + 1, w, next, &mut a);
                p += 2;
            }
        }
        while p + 2 <= t.depth {
            step(x, t.pixel, p, w, next, &mut a);
            step(x, t.pixel, p + 1, w, next, &mut a);
            p += 2;
        }
        if p < t.depth {
            step(x, t.pixel, p, w, next, &mut a);
        }
    }
    *acc = a;
}

/// Step `p` of [`reduce`]: row `r`'s value `p` (at `x + r·pixel + p`) times the panel's row `p`,
/// into row `r` of `acc`; vector 2, in a wide tile, is the next panel's (`next` values on).
///
/// # Safety
/// As [`tile`], for one tap and `p < depth`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn step<const R: usize, const V: usize>(
    x: *const f32,
    pixel: usize,
    p: usize,
    w: *const f32,
    next: usize,
    acc: &mut [[std::arch::x86_64::__m256; V]; R],
) {
    use std::arch::x86_64::*;
    let mut wv = [_mm256_setzero_ps(); V];
    for (v, lanes) in wv.iter_mut().enumerate() {
        *lanes = _mm256_loadu_ps(w.add(v / 2 * next + p * NR + v % 2 * 8));
    }
    for (r, row) in acc.iter_mut().enumerate() {
        let b = _mm256_broadcast_ss(&*x.add(r * pixel + p));
        for (sum, lanes) in row.iter_mut().zip(&wv) {
            *sum = _mm256_fmadd_ps(b, *lanes, *sum);
        }
    }
}

/// A tile's scale and shift, zero past the last of its `cols` columns, and the activation.
type PanelEpilogue = ([f32; TILE_COLS], [f32; TILE_COLS], crate::act::Act);

fn panel_epilogue(folded: Option<&Folded>, col0: usize, cols: usize) -> Option<PanelEpilogue> {
    folded.map(|f| {
        let (mut scale, mut shift) = ([0f32; TILE_COLS], [0f32; TILE_COLS]);
        scale[..cols].copy_from_slice(&f.scale[col0..col0 + cols]);
        shift[..cols].copy_from_slice(&f.shift[col0..col0 + cols]);
        (scale, shift, f.act)
    })
}

/// One tile's operands: row `r` of the left operand starts at `x + r·pixel`; the reduction runs
/// over `taps` (offsets from those starts), `depth` values each — one tap of `k` values for a
/// matrix product, one tap of up to `k·cin` values per kernel row for a convolution read
/// straight from its image — against `depth × NR` weights per tap, tap `i`'s from
/// `w + i·tap_stride` (the next panel's, for a tile wider than one, `panel_stride` further on);
/// `cols` columns are stored at `y`, rows `ldy` apart, after adding the residual laid out like
/// them at `skip`.
#[derive(Clone, Copy)]
struct Tile<'a> {
    x: *const f32,
    pixel: usize,
    taps: &'a [usize],
    depth: usize,
    w: *const f32,
    tap_stride: usize,
    panel_stride: usize,
    /// Whether the reduction prefetches the panel's rows ahead of itself (`STREAM_AHEAD`).
    prefetch_ahead: bool,
    /// Whether a step is a pair of bf16 values in each operand ([`Panels::Bf16`]; AVX-512 only).
    bf16: bool,
    /// Whether whole, line-aligned output vectors bypass the caches ([`Then::Stream`]; AVX-512
    /// only).
    bypass: bool,
    y: *mut f32,
    skip: Option<*const f32>,
    ldy: usize,
    cols: usize,
    epilogue: Option<&'a PanelEpilogue>,
}

/// [`tile`] for `rows` rows (1..=MR, or 1..=WIDE_MR for a wide tile), on one vector of
/// columns when the panel has no more than eight, on three for a wide tile; with AVX-512,
/// [`tile512`] for 1..=MR512 rows on one or two panels.
///
/// # Safety
/// As [`tile`] with `R = rows`.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn tile_of(rows: usize, t: &Tile) {
    if avx512() {
        match (t.cols <= NR, t.bf16) {
            (true, false) => tile512_rows::<1, false>(rows, t),
            (false, false) => tile512_rows::<2, false>(rows, t),
            (true, true) => tile512_rows::<1, true>(rows, t),
            (false, true) => tile512_rows::<2, true>(rows, t),
        }
    } else if t.cols <= 8 {
        tile_rows::<1>(rows, t)
    } else if t.cols <= NR {
        tile_rows::<2>(rows, t)
    } else {
        match rows {
            3.. => tile::<3, 3>(t),
            2 => tile::<2, 3>(t),
            _ => tile::<1, 3>(t),
        }
    }
}

/// Rows per tile of `cols` columns.
fn tile_rows_for(cols: usize) -> usize {
    if !avx512() && cols > NR {
        WIDE_MR
    } else {
        rows_per_tile()
    }
}

/// [`tile`] of `V` vectors for `rows` (1..=MR) rows.
///
/// # Safety
/// As [`tile`] with `R = rows`.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn tile_rows<const V: usize>(rows: usize, t: &Tile) {
    match rows {
        6 => tile::<6, V>(t),
        5 => tile::<5, V>(t),
        4 => tile::<4, V>(t),
        3 => tile::<3, V>(t),
        2 => tile::<2, V>(t),
        _ => tile::<1, V>(t),
    }
}

/// `rows` consecutive rows from `first`'s, [`MR`] at a time: row `r` reads from `x + r·pixel`
/// and writes to `y + r·ldy`.
///
/// # Safety
/// As [`tile`], for every row of the strip.
#[cfg(target_arch = "x86_64")]
unsafe fn strip(first: Tile, rows: usize) {
    let (mut r, per) = (0, tile_rows_for(first.cols));
    while r < rows {
        let count = per.min(rows - r);
        let tile = Tile {
            x: first.x.add(r * first.pixel),
            y: first.y.add(r * first.ldy),
            skip: first.skip.map(|s| s.add(r * first.ldy)),
            ..first
        };
        tile_of(count, &tile);
        r += count;
    }
}

/// The shape of a k×k convolution that [`conv`] runs straight from its image: `height × width`
/// pixels of `cin` channels, read as if zero-padded by `pad_top` rows above and `pad_left`
/// columns before (SAME padding), and by whatever the last window reaches after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct {
    pub height: usize,
    pub width: usize,
    pub cin: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub cout: usize,
}

impl Direct {
    /// The kernel offsets `lo..hi` of output index `o` whose input index (`o·stride − pad` on)
    /// lies inside `0..size`.
    fn inside(&self, o: usize, pad: usize, size: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - pad as isize;
        let hi = (size as isize - start).clamp(0, self.kernel as isize) as usize;
        ((-start).max(0) as usize, hi)
    }
}

/// `y[out_h·out_w × cout] = epilogue(conv(image, w))` for one image, `w` packed by
/// [`pack_rows`] from the `[k·k·cin, cout]` im2col filter (rows in `(kh, kw, cin)` order): each
/// tile of neighbouring output pixels reads the image in place, one tap per kernel row (its
/// k pixels' channels lie side by side, in the filter's (kw, cin) order), so nothing is copied.
/// Where a window reaches into the padding, its tap leaves out the kernel rows and columns
/// there (with their weights): at the image's edges, tiles of one pixel. `skip`, a residual
/// laid out like `y`, is added after the epilogue. Output rows are spread over the pool. Only
/// where [`available`]. With bf16 panels (those panels through [`panels_to_bf16`]; an even
/// `cin`) the image is first rounded to bf16, a pixel's channels in pairs, and the sums are f32.
pub fn conv(
    d: &Direct,
    image: &[f32],
    w: Panels,
    y: &mut [f32],
    folded: Option<&Folded>,
    skip: Option<&[f32]>,
) {
    check_direct(d, image, w, folded);
    let (pixels, n) = (d.out_h * d.out_w, d.cout);
    assert!(y.len() >= pixels * n, "pointwise: output size");
    if let Some(s) = skip {
        assert!(s.len() >= pixels * n, "pointwise: residual size");
    }
    with_direct_operands(d, image, w, |ops| {
        y[..pixels * n]
            .par_chunks_mut(d.out_w * n)
            .enumerate()
            .for_each(|(oh, out_row)| {
                let skip_row = skip.map(|r| &r[oh * d.out_w * n..][..d.out_w * n]);
                direct_row(d, ops, folded, oh, out_row, skip_row);
            })
    });
}

/// [`direct_row`]'s operands in 32-bit slots: the image and the panels, as f32 values or as
/// pairs of bf16 (`bf16`: `cin / 2` slots a pixel).
#[derive(Clone, Copy)]
struct DirectOperands<'a> {
    image: &'a [f32],
    w: &'a [f32],
    bf16: bool,
}

/// [`conv`]'s image rounded to bf16 pairs, kept between calls.
static DIRECT_BF16: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// `f` on `image` and `w` as [`direct_row`] reads them: as they are for f32 panels; for bf16
/// ones, with the image rounded (pixels spread over the pool).
fn with_direct_operands<R>(
    d: &Direct,
    image: &[f32],
    w: Panels,
    f: impl FnOnce(DirectOperands) -> R,
) -> R {
    let w = match w {
        Panels::F32(w) => {
            let ops = DirectOperands {
                image,
                w,
                bf16: false,
            };
            return f(ops);
        }
        Panels::Bf16(w) => w,
    };
    // SAFETY (both casts): u32 and f32 have one size and alignment and every bit pattern is an
    // f32; the kernels move a slot's bits as they are.
    let w = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) };
    let (pixels, slots) = (d.height * d.width, d.cin / 2);
    crate::with_kept(&DIRECT_BF16, Vec::new, |kept| {
        let rounded = crate::at_least(kept, pixels * slots);
        const PIXELS: usize = 1024;
        rounded
            .par_chunks_mut((PIXELS * slots).max(1))
            .enumerate()
            .for_each(|(i, out)| {
                let first = i * PIXELS;
                // SAFETY: AVX-512F and AVX512_BF16 checked (`check_direct`); pixels
                // first..first + out.len() / slots of `image` (`cin` values each, inside it:
                // checked) into `out`, `cin / 2` slots each.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    rows_to_bf16(image, d.cin, d.cin, first..first + out.len() / slots, out)
                }
            });
        // SAFETY: as above.
        let image =
            unsafe { std::slice::from_raw_parts(rounded.as_ptr() as *const f32, rounded.len()) };
        f(DirectOperands {
            image,
            w,
            bf16: true,
        })
    })
}

/// A 1×1 convolution run on another convolution's output while it is in cache (a block's
/// projection): `y = epilogue(z · w) + skip` for each piece `z` of that output.
#[derive(Clone, Copy)]
pub struct Projection<'a> {
    /// Its weights, packed by [`pack`] (or [`pack_bf16`]) from the first convolution's output
    /// channels to `cout`.
    pub w: Panels<'a>,
    pub cout: usize,
    pub epilogue: Option<&'a Folded>,
    /// Its residual, laid out like its output.
    pub skip: Option<&'a [f32]>,
}

impl Projection<'_> {
    /// `out[rows × cout] = epilogue(z[rows × k] · w)` on the calling thread (the residual is
    /// the caller's, which knows where the rows go).
    pub fn run_serial(&self, z: &[f32], rows: usize, k: usize, out: &mut [f32]) {
        let then = match self.epilogue {
            Some(f) => Then::Fold(f),
            None => Then::Store,
        };
        let n = self.cout;
        assert!(
            out.len() >= rows * n,
            "pointwise: output holds {} < {rows}×{n}",
            out.len()
        );
        // SAFETY: `out` holds the rows × n output (asserted), borrowed mutably for the call.
        unsafe { product_at(z, k, rows, k, n, self.w, out.as_mut_ptr(), n, then) }
    }
}

thread_local! {
    /// Each thread's output row of [`conv_projected`], kept between calls (grown once).
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`conv`] followed by the 1×1 convolution `p`, output row by output row: the k×k output
/// (`cout` channels) stays in a row of scratch and only `p`'s (`p.cout`) is written to `y`. The
/// same arithmetic as the two one after the other, bit for bit. Only where [`available`].
pub fn conv_projected(
    d: &Direct,
    image: &[f32],
    w: Panels,
    folded: Option<&Folded>,
    p: &Projection,
    y: &mut [f32],
) {
    check_direct(d, image, w, folded);
    let (pixels, n, out) = (d.out_h * d.out_w, d.cout, p.cout);
    assert!(y.len() >= pixels * out, "pointwise: output size");
    if let Some(s) = p.skip {
        assert!(s.len() >= pixels * out, "pointwise: residual size");
    }
    with_direct_operands(d, image, w, |ops| {
        y[..pixels * out]
            .par_chunks_mut(d.out_w * out)
            .enumerate()
            .for_each(|(oh, out_row)| {
                // No parallel loop runs inside, so this thread's row is this task's alone.
                ROW.with_borrow_mut(|row| {
                    if row.len() < d.out_w * n {
                        row.resize(d.out_w * n, 0.0);
                    }
                    let row = &mut row[..d.out_w * n];
                    direct_row(d, ops, folded, oh, row, None);
                    p.run_serial(row, d.out_w, n, out_row);
                });
                if let Some(s) = p.skip {
                    let s = &s[oh * d.out_w * out..][..d.out_w * out];
                    for (v, r) in out_row.iter_mut().zip(s) {
                        *v += r;
                    }
                }
            })
    });
}

/// [`conv`]'s checks of its shape, image, weights (and, for bf16 panels, the CPU and an even
/// `cin`) and epilogue.
fn check_direct(d: &Direct, image: &[f32], w: Panels, folded: Option<&Folded>) {
    assert!(
        available(),
        "pointwise: kernels need x86-64 with AVX2 and FMA"
    );
    let (k, s, cin, n) = (d.kernel, d.stride, d.cin, d.cout);
    assert!(k <= 7, "pointwise: kernels up to 7×7");
    assert!(
        d.pad_top < k
            && d.pad_left < k
            && d.out_h > 0
            && d.out_w > 0
            && (d.out_h - 1) * s < d.height + d.pad_top
            && (d.out_w - 1) * s < d.width + d.pad_left,
        "pointwise: every window must overlap the image"
    );
    assert!(
        image.len() >= d.height * d.width * cin,
        "pointwise: image size"
    );
    assert!(w.holds(k * k * cin, n), "pointwise: weights not packed");
    if let Panels::Bf16(_) = w {
        assert!(
            bf16_available(),
            "pointwise: bf16 products need AVX512_BF16"
        );
        assert!(
            cin.is_multiple_of(2),
            "pointwise: bf16 pairs need an even cin"
        );
    }
    if let Some(f) = folded {
        assert!(
            f.scale.len() == n && f.shift.len() == n,
            "pointwise: epilogue width"
        );
    }
}

/// Output row `oh` of [`conv`] into `out_row` (`out_w × cout`), plus `skip_row`, laid out like
/// it. The caller has run [`check_direct`].
fn direct_row(
    d: &Direct,
    ops: DirectOperands,
    folded: Option<&Folded>,
    oh: usize,
    out_row: &mut [f32],
    skip_row: Option<&[f32]>,
) {
    let (image, w) = (ops.image, ops.w);
    // A pixel's channels in slots (pairs of them in bf16).
    let cin = if ops.bf16 { d.cin / 2 } else { d.cin };
    let (k, s, n) = (d.kernel, d.stride, d.cout);
    let (depth, row_len) = (k * k * cin, d.width * cin);
    assert!(out_row.len() >= d.out_w * n, "pointwise: output row size");
    if let Some(r) = skip_row {
        assert!(r.len() >= d.out_w * n, "pointwise: residual row size");
    }
    // Output columns whose windows lie wholly inside the image's columns (none where the image
    // is narrower than the kernel).
    let first_inner = d.pad_left.div_ceil(s).min(d.out_w);
    let end_inner = (d.width + d.pad_left)
        .checked_sub(k)
        .map_or(0, |room| room / s + 1)
        .min(d.out_w)
        .max(first_inner);
    let (kh0, kh1) = d.inside(oh, d.pad_top, d.height);
    // Tap i reads kernel row kh0 + i, image row ih0 + i.
    let ih0 = oh * s + kh0 - d.pad_top;
    let mut taps = [0usize; 7];
    for (i, tap) in taps[..kh1 - kh0].iter_mut().enumerate() {
        *tap = i * row_len;
    }
    let taps = &taps[..kh1 - kh0];
    let rows = &image[ih0 * row_len..];
    // The image rows that the next two output rows add to their windows: they come from
    // memory, and fetching them into L2 meanwhile hides that latency (one row ahead left 48 →
    // 192 at stride 2 slower than reading a padded copy).
    #[cfg(target_arch = "x86_64")]
    {
        let new = (oh * s + k).saturating_sub(d.pad_top).min(d.height);
        let end = ((oh + 2) * s + k).saturating_sub(d.pad_top).min(d.height);
        simd::prefetch_l2(&image[new * row_len..end * row_len]);
    }
    for (col0, cols) in column_parts(n) {
        let wp = &w[col0 * depth..][..cols.div_ceil(NR) * depth * NR];
        let e = panel_epilogue(folded, col0, cols);
        // The tile of output pixels from `ow` on, reading kernel columns kw0..kw1.
        let mut tile_at = |ow: usize, (kw0, kw1): (usize, usize)| Tile {
            x: rows[(ow * s + kw0 - d.pad_left) * cin..].as_ptr(),
            pixel: s * cin,
            taps,
            depth: (kw1 - kw0) * cin,
            w: wp[(kh0 * k + kw0) * cin * NR..].as_ptr(),
            tap_stride: k * cin * NR,
            panel_stride: depth * NR,
            prefetch_ahead: false,
            bf16: ops.bf16,
            bypass: false,
            y: out_row[ow * n + col0..].as_mut_ptr(),
            skip: skip_row.map(|r| r[ow * n + col0..].as_ptr()),
            ldy: n,
            cols,
            epilogue: e.as_ref(),
        };
        // SAFETY: AVX2 and FMA checked (`check_direct`). Output pixel ow's tap i, kernel column
        // kw0 + j, channel c reads image pixel (ih0 + i, ow·s − pad_left + kw0 + j): inside the
        // image (checked size), as `inside` keeps to rows and columns there and the inner
        // pixels' windows lie inside by `first_inner`/`end_inner`; its weights lie in `wp`
        // (kernel rows kh0 + i < k, columns < k, and for a wide tile the next panel, inside `wp`
        // by its length); the tiles write columns col0..col0 + cols of `out_row` (pixel by pixel
        // or in a strip of inner pixels), the caller's alone, and read the same of `skip_row`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let full = (0, k);
            if first_inner < end_inner {
                strip(tile_at(first_inner, full), end_inner - first_inner);
            }
            for ow in (0..first_inner).chain(end_inner..d.out_w) {
                tile_of(1, &tile_at(ow, d.inside(ow, d.pad_left, d.width)));
            }
        }
    }
}

/// The columns that [`conv`]'s tiles take, `(first, count)`: with AVX-512 two panels at a time;
/// else whole panels, except that a last panel of at most eight columns joins the one before
/// it in a wide tile. Alone it ran at half a full panel's rate (one vector per broadcast); a
/// 24-channel 3×3 convolution took as long as a 32-channel one.
fn column_parts(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = if avx512() { 2 * NR } else { NR };
    let spans = n.div_ceil(step);
    let wide = step == NR && spans >= 2 && (1..=8).contains(&(n % NR));
    let parts = spans - usize::from(wide);
    (0..parts).map(move |j| {
        let col0 = j * step;
        let cols = if wide && j + 1 == parts {
            n - col0
        } else {
            step.min(n - col0)
        };
        (col0, cols)
    })
}

/// One `R × 8V` tile of [`Tile`] (`V` = 2: a whole panel; 3: a wide tile): the full reduction
/// in registers, then `act(v·scale + shift)` there too when an epilogue is given, then the
/// residual, then one store of `cols ≤ 8V` columns.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` must be readable at `r·pixel + tap + p` for `r < R`, each
/// tap and `p < depth`, `w` for `depth × NR` values from each tap's start (and `panel_stride` on
/// for `V` = 3), and `y` writable (`skip`, if any, readable) for `R` rows of `cols ≤ 8V` at
/// stride `ldy`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize, const V: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    reduce::<R, V>(t, &mut acc);
    if let Some((scale, shift, act)) = t.epilogue {
        for v in 0..V {
            let s = _mm256_loadu_ps(scale.as_ptr().add(8 * v));
            let b = _mm256_loadu_ps(shift.as_ptr().add(8 * v));
            for row in acc.iter_mut() {
                row[v] = simd::act8(*act, _mm256_fmadd_ps(row[v], s, b));
            }
        }
    }
    let width = 8 * V;
    if let Some(skip) = t.skip {
        for (r, row) in acc.iter_mut().enumerate() {
            let mut lanes = [0f32; WIDE];
            let mut src = skip.add(r * t.ldy);
            if t.cols < width {
                std::ptr::copy_nonoverlapping(src, lanes.as_mut_ptr(), t.cols);
                src = lanes.as_ptr();
            }
            for (v, sum) in row.iter_mut().enumerate() {
                *sum = _mm256_add_ps(*sum, _mm256_loadu_ps(src.add(8 * v)));
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let out = t.y.add(r * t.ldy);
        if t.cols == width {
            for (v, sum) in row.iter().enumerate() {
                _mm256_storeu_ps(out.add(8 * v), *sum);
            }
        } else {
            let mut lanes = [0f32; WIDE];
            for (v, sum) in row.iter().enumerate() {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * v), *sum);
            }
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), out, t.cols);
        }
    }
}

/// [`tile512`] of `V` panels for `rows` (1..=MR512) rows.
///
/// # Safety
/// As [`tile512`] with `R = rows`.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn tile512_rows<const V: usize, const BF16: bool>(rows: usize, t: &Tile) {
    const { assert!(MR512 == 8) };
    match rows {
        8.. => tile512::<8, V, BF16>(t),
        7 => tile512::<7, V, BF16>(t),
        6 => tile512::<6, V, BF16>(t),
        5 => tile512::<5, V, BF16>(t),
        4 => tile512::<4, V, BF16>(t),
        3 => tile512::<3, V, BF16>(t),
        2 => tile512::<2, V, BF16>(t),
        _ => tile512::<1, V, BF16>(t),
    }
}

/// [`tile`] with AVX-512: `R` rows × `V` panels (one sixteen-lane vector each). In f32 the
/// same operations in the same order for each output value as [`tile`], so the same results
/// bit for bit; with `BF16`, steps of bf16 pairs ([`Panels::Bf16`]). Columns past `cols` are
/// masked off rather than copied through a buffer.
///
/// # Safety
/// The CPU must have AVX-512F (and AVX512_BF16 with `BF16`); otherwise as [`tile`], with `w`
/// (and `panel_stride` on, for `V` = 2) holding `depth × NR` slots from each tap's start, and
/// `cols ≤ 16·V`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile512<const R: usize, const V: usize, const BF16: bool>(t: &Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    if BF16 {
        reduce_bf16::<R, V>(t, &mut acc);
    } else {
        reduce512::<R, V>(t, &mut acc);
    }
    if let Some((scale, shift, act)) = t.epilogue {
        for v in 0..V {
            let s = _mm512_loadu_ps(scale.as_ptr().add(NR * v));
            let b = _mm512_loadu_ps(shift.as_ptr().add(NR * v));
            for row in acc.iter_mut() {
                row[v] = simd::act16(*act, _mm512_fmadd_ps(row[v], s, b));
            }
        }
    }
    // Lanes of each vector inside the tile's columns.
    let mut masks = [0 as __mmask16; V];
    for (v, mask) in masks.iter_mut().enumerate() {
        let lanes = t.cols.saturating_sub(NR * v).min(NR);
        *mask = ((1u32 << lanes) - 1) as __mmask16;
    }
    if let Some(skip) = t.skip {
        for (r, row) in acc.iter_mut().enumerate() {
            let src = skip.add(r * t.ldy);
            for (v, sum) in row.iter_mut().enumerate() {
                let lanes = _mm512_maskz_loadu_ps(masks[v], src.add(NR * v));
                *sum = _mm512_add_ps(*sum, lanes);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let out = t.y.add(r * t.ldy);
        for (v, sum) in row.iter().enumerate() {
            let at = out.add(NR * v);
            if t.bypass && masks[v] == !0 && (at as usize).is_multiple_of(64) {
                _mm512_stream_ps(at, *sum);
            } else {
                _mm512_mask_storeu_ps(at, masks[v], *sum);
            }
        }
    }
}

/// An AVX-512 tile's whole reduction ([`reduce`]'s loop, vector `v` being panel `v`'s row,
/// `panel_stride` slots apart): `$name` compiled for `$features`, each step's broadcast `$b`
/// of the left operand's slot and panel row `$w` added into `$sum` by `$op`.
macro_rules! reduce_avx512 {
    ($(#[$doc:meta])* $name:ident, $features:literal, |$b:ident, $w:ident, $sum:ident| $op:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As [`tile512`].
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline(never)]
        unsafe fn $name<const R: usize, const V: usize>(
            t: &Tile,
            acc: &mut [[std::arch::x86_64::__m512; V]; R],
        ) {
            use std::arch::x86_64::*;
            let (mut a, next) = (*acc, t.panel_stride);
            let step = |x: *const f32, p: usize, w: *const f32, a: &mut [[__m512; V]; R]| {
                let mut wv = [_mm512_setzero_ps(); V];
                for (v, lanes) in wv.iter_mut().enumerate() {
                    *lanes = _mm512_loadu_ps(w.add(v * next + p * NR));
                }
                for (r, row) in a.iter_mut().enumerate() {
                    // A slot's bits, whatever they hold (an f32, or a pair of bf16).
                    let $b = _mm512_set1_ps(*x.add(r * t.pixel + p));
                    for ($sum, $w) in row.iter_mut().zip(&wv) {
                        let $w = *$w;
                        *$sum = $op;
                    }
                }
            };
            for (i, &tap) in t.taps.iter().enumerate() {
                let (x, w) = (t.x.add(tap), t.w.add(i * t.tap_stride));
                let mut p = 0;
                if t.prefetch_ahead {
                    while p + 2 <= t.depth {
                        // As `reduce`: each panel's two rows 32 steps on (a hint, never a fault).
                        for v in 0..V {
                            let ahead = w.wrapping_add(v * next + (p + STREAM_AHEAD) * NR);
                            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(NR) as *const i8);
                        }
                        step(x, p, w, &mut a);
                        step(x, p + 1, w, &mut a);
                        p += 2;
                    }
                }
                while p + 2 <= t.depth {
                    step(x, p, w, &mut a);
                    step(x, p + 1, w, &mut a);
                    p += 2;
                }
                if p < t.depth {
                    step(x, p, w, &mut a);
                }
            }
            *acc = a;
        }
    };
}

reduce_avx512!(
    /// [`reduce`] with AVX-512, in f32.
    reduce512, "avx512f,avx2,fma", |b, w, sum| _mm512_fmadd_ps(b, w, *sum)
);

reduce_avx512!(
    /// [`reduce`] with AVX-512 on bf16 pairs: each step adds both products of a pair.
    reduce_bf16, "avx512f,avx512bf16,avx2,fma",
    |b, w, sum| _mm512_dpbf16_ps(*sum, std::mem::transmute::<__m512, __m512bh>(b), std::mem::transmute::<__m512, __m512bh>(w))
);
