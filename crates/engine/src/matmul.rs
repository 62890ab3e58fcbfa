//! Matrix products for operands that change every call (training's convolutions, squeeze-
//! excitation, the classifier) and for CPUs without the pointwise kernels. The right operand is
//! packed per call into the pointwise kernel's panels; the left one is read in place when its
//! rows are contiguous and packed block by block when it is stored transposed (weight
//! gradients); the pointwise kernel (AVX2) or a portable loop runs the tiles. The packing
//! buffers are each thread's own and kept, so a product allocates nothing once they have grown.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::pointwise::{self, Then, NR};
use crate::simd;

/// How a matrix operand is stored: `Normal` is row-major `[rows, cols]`; `Transposed` means the
/// slice holds the row-major transpose (`[cols, rows]`), read with swapped strides, no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Normal,
    Transposed,
}

/// A `rows × cols` operand inside `data`: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], layout: Layout, rows: usize, cols: usize) -> Self {
        let (rs, cs) = match layout {
            Layout::Normal => (cols, 1),
            Layout::Transposed => (1, rows),
        };
        View { data, rs, cs }
    }

    /// The operand from row `i`, column `j` on.
    fn from(self, i: usize, j: usize) -> Self {
        View {
            data: &self.data[i * self.rs + j * self.cs..],
            ..self
        }
    }

    /// Whether every element of `rows × cols` lies inside `data`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// Whether the products run on bf16 operands ([`set_bf16`]).
static BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs every later product of this module on bf16 operands with f32 sums (both operands
/// rounded to bf16 as they are packed: training's mixed precision, as PyTorch's bf16 autocast
/// runs convolutions and matrix products), or in f32 again. Winograd's products against a
/// filter made per call stay f32: F(4×4, 3×3) in bf16 moved a test convolution's outputs by 8 %
/// of their largest (its transforms amplify the rounding). For the whole process: a training
/// run sets it once, before its first step. Errors where the CPU lacks AVX512_BF16.
pub fn set_bf16(on: bool) -> Result<(), String> {
    if on && !pointwise::bf16_available() {
        return Err("bf16 products need a CPU with AVX-512 and AVX512_BF16".into());
    }
    BF16.store(on, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

pub(crate) fn bf16() -> bool {
    BF16.load(std::sync::atomic::Ordering::Relaxed)
}

/// Below this many multiply-adds a product runs on the calling thread: splitting costs more.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `c[m×n] = (accumulate ? c : 0) + a[m×k] · b[k×n]`, all row-major unless marked transposed.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_layout: Layout,
    b: &[f32],
    b_layout: Layout,
    accumulate: bool,
) {
    assert!(
        c.len() >= m * n,
        "matmul: output holds {} < {m}×{n}",
        c.len()
    );
    assert!(a.len() >= m * k, "matmul: lhs holds {} < {m}×{k}", a.len());
    assert!(b.len() >= k * n, "matmul: rhs holds {} < {k}×{n}", b.len());
    if m == 0 || n == 0 {
        return;
    }
    if a_layout == Layout::Transposed && b_layout == Layout::Normal && swap_pays(m, n, k) {
        return swapped(c, m, n, k, a, b, accumulate);
    }
    let (a, b) = (View::new(a, a_layout, m, k), View::new(b, b_layout, k, n));
    let threads = rayon::current_num_threads();
    let long_reduction = k >= 2048 && k >= 4 * m.max(n);
    if threads > 1 && a_layout == Layout::Transposed && b_layout == Layout::Normal && long_reduction
    {
        return split_k(c, (m, n, k), a, b, accumulate, threads);
    }
    let parallel = threads > 1 && m * n * k >= PARALLEL_MIN_MACS;
    if parallel && m <= FEW_ROWS && n >= 64 * threads {
        return split_columns(c, (m, n, k), a, b, accumulate, threads);
    }
    // Fewer than two tiles of rows per thread: a split by rows would leave threads idle or
    // nearly so (squeeze-excitation's products at batch 8 ran 2× slower split).
    if parallel && m >= 2 * pointwise::rows_per_tile() * threads {
        return split_rows(c, (m, n, k), a, b, accumulate, threads);
    }
    // SAFETY: `c` holds the m × n output (asserted) and is borrowed mutably for the call.
    unsafe { serial(c.as_mut_ptr(), n, (m, n, k), a, b, accumulate) }
}

/// Whether `c[m×n] = aᵀ·b` (a weight gradient) runs faster as `cᵀ = bᵀ·a`, transposed back:
/// the transposed operand is the one packed, 8 × 8 at a time, so the narrower one should be;
/// the transpose back costs `m·n`. A 3×3 convolution's gradient on 24 output channels (216
/// patch values) ran 1.5–2× faster so.
fn swap_pays(m: usize, n: usize, k: usize) -> bool {
    n < m && (m - n) * k > 2 * m * n
}

/// [`swapped`]'s transposed product, kept between calls.
static SWAPPED: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// `c (+)= aᵀ·b` as `(bᵀ·a)ᵀ` (see [`swap_pays`]): `aᵀ` is stored `[k, m]`, `b` `[k, n]`.
fn swapped(c: &mut [f32], m: usize, n: usize, k: usize, a: &[f32], b: &[f32], accumulate: bool) {
    crate::with_kept(&SWAPPED, Vec::new, |buf| {
        let ct = crate::at_least(buf, n * m);
        matmul(ct, n, m, k, b, Layout::Transposed, a, Layout::Normal, false);
        add_transposed(c, m, n, ct, accumulate);
    })
}

/// `c[m×n] = (accumulate ? c : 0) + Σ over the parts of partᵀ`, `parts` holding whole
/// `[n, m]` matrices one after another, added in order (over the pool, by blocks of rows).
pub(crate) fn add_transposed(c: &mut [f32], m: usize, n: usize, parts: &[f32], accumulate: bool) {
    let len = m * n;
    if len == 0 {
        return;
    }
    c[..len]
        .par_chunks_mut(64 * n)
        .enumerate()
        .for_each(|(block, rows)| {
            for (r, row) in rows.chunks_exact_mut(n).enumerate() {
                let i = block * 64 + r;
                for (p, part) in parts.chunks_exact(len).enumerate() {
                    for (j, o) in row.iter_mut().enumerate() {
                        let v = part[j * m + i];
                        *o = if accumulate || p > 0 { *o + v } else { v };
                    }
                }
            }
        });
}

/// Outputs of at least this many bytes, written in one block of the reduction, are streamed
/// past the caches ([`Then::Stream`]). A bs8@224 step's stage-2 input gradients (25,088 × 192,
/// 19 MB) ran at 150 GFLOP/s with plain stores, each fetching the line it writes; streamed, 2×
/// faster (3.1–3.6 → 1.6 ms; temporary example, 64-byte-aligned output). Needs the output on
/// 64-byte lines: the `effnet` binary's allocator ([`crate::LineAligned`]) puts large buffers
/// there.
const STREAM_BYTES: usize = 8 << 20;

/// Products with at most this many rows split their output's columns across threads.
const FEW_ROWS: usize = 256;

/// A product with few rows and many columns (1×1 convolutions on 7×7 and 14×14 maps at batch
/// 1): each thread computes a block of whole columns on its own.
fn split_columns(
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    accumulate: bool,
    threads: usize,
) {
    // Blocks of a multiple of 16 columns (the kernels' width), one per thread.
    let per = n.div_ceil(threads).div_ceil(NR) * NR;
    let c_addr = c.as_mut_ptr() as usize;
    (0..n.div_ceil(per)).into_par_iter().for_each(|j| {
        let (j0, j1) = (j * per, ((j + 1) * per).min(n));
        // SAFETY: block j writes columns j0..j1 of the m × n output `c` (row stride n), which
        // `matmul` checked it holds; no other block writes those columns, and `c` is borrowed
        // mutably for the whole call.
        unsafe {
            let c = (c_addr as *mut f32).add(j0);
            serial(c, n, (m, j1 - j0, k), a, b.from(0, j0), accumulate)
        }
    });
}

/// Rows per task of [`split_rows`] at least, where its left operand is read in place.
const TASK_ROWS: usize = 96;

/// A product split by blocks of rows over the pool, up to four per thread (so threads slowed
/// by others still end together). The right operand is packed once per block of the reduction,
/// by every thread together, into panels that the tasks then share (a weight gradient's right
/// operand is a whole activation: packing it per task cost more than the product).
fn split_rows(
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    accumulate: bool,
    threads: usize,
) {
    let mut tasks = threads * (m / (TASK_ROWS * threads)).clamp(1, 4);
    if !in_place(a) {
        // At most one packed block of rows per task.
        tasks = tasks.max(m.div_ceil(PACKED_ROWS).div_ceil(threads) * threads);
    }
    // Whole tiles of rows per task.
    let tile = pointwise::rows_per_tile();
    let per = m.div_ceil(tasks).div_ceil(tile) * tile;
    let c_addr = c.as_mut_ptr() as usize;
    let depth = depth_for(a);
    crate::with_kept(&SHARED_PANELS, Default::default, |(panels, rounded)| {
        for k0 in (0..k).step_by(depth) {
            let kc = depth.min(k - k0);
            let panels = crate::at_least(panels, pointwise::packed_len(kc, n));
            let rounded = match bf16() {
                true => Some(crate::at_least(rounded, pointwise::packed_len_bf16(kc, n))),
                false => None,
            };
            let panels = pack_panels_parallel(kc, n, b.from(k0, 0), panels, rounded, threads);
            let a = a.from(0, k0);
            let then = match accumulate || k0 > 0 {
                true => Then::Add,
                // Written once, whole (one block of the reduction), and far larger than the
                // caches: stream it.
                false if kc == k && 4 * m * n >= STREAM_BYTES => Then::Stream,
                false => Then::Store,
            };
            (0..m.div_ceil(per)).into_par_iter().for_each(|t| {
                let rows = t * per..((t + 1) * per).min(m);
                // SAFETY: `matmul` checked that `c` holds the m × n output; this task's rows
                // are its own, and `c` is borrowed mutably for the whole call.
                PACKS.with_borrow_mut(|packs| unsafe {
                    against_panels(c_addr as *mut f32, n, rows, (kc, n), a, panels, then, packs)
                });
            });
        }
    })
}

/// Panels of [`split_rows`] (f32, and rounded to bf16 in bf16 mode), kept between calls.
#[allow(clippy::type_complexity)]
static SHARED_PANELS: std::sync::Mutex<(Vec<f32>, Vec<u32>)> =
    std::sync::Mutex::new((Vec::new(), Vec::new()));

/// [`pointwise::pack_strided_into`] for `b`'s `k × n`, groups of panels spread over the pool,
/// each group then rounded into `rounded` where given ([`pointwise::panels_to_bf16`]).
fn pack_panels_parallel<'a>(
    k: usize,
    n: usize,
    b: View,
    panels: &'a mut [f32],
    rounded: Option<&'a mut [u32]>,
    threads: usize,
) -> pointwise::Panels<'a> {
    let count = n.div_ceil(NR);
    let group = count.div_ceil(2 * threads).max(1);
    // Group g's first column and columns.
    let cols = |g: usize| {
        let j0 = g * group * NR;
        (j0, (group * NR).min(n - j0))
    };
    let groups = panels[..pointwise::packed_len(k, n)].par_chunks_mut((group * k * NR).max(1));
    match rounded {
        None => {
            groups.enumerate().for_each(|(g, out)| {
                let (j0, cols) = cols(g);
                pointwise::pack_strided_into(k, cols, b.from(0, j0).data, (b.rs, b.cs), out);
            });
            pointwise::Panels::F32(panels)
        }
        Some(rounded) => {
            let len = pointwise::packed_len_bf16(k, n);
            let rounded_groups = rounded[..len].par_chunks_mut((group * k.div_ceil(2) * NR).max(1));
            groups
                .zip(rounded_groups)
                .enumerate()
                .for_each(|(g, (out, r))| {
                    let (j0, cols) = cols(g);
                    let w = b.from(0, j0).data;
                    pointwise::pack_strided_bf16_into(k, cols, w, (b.rs, b.cs), out, r)
                });
            pointwise::Panels::Bf16(rounded)
        }
    }
}

/// `c[m×n] = a[m×k] · b[k×n]` on the calling thread alone (for callers that already split
/// their work over the pool).
pub fn matmul_serial(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_layout: Layout,
) {
    matmul_serial_add(c, (m, n, k), a, Layout::Normal, b, b_layout, false)
}

/// `c[m×n] (+)= a[m×k] · b[k×n]` on the calling thread alone, either operand stored transposed
/// (a weight gradient's `dyᵀ·x` over a block of pixels, by callers that split their work over
/// the pool).
pub(crate) fn matmul_serial_add(
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    a_layout: Layout,
    b: &[f32],
    b_layout: Layout,
    accumulate: bool,
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul_serial: operands too small"
    );
    let (a, b) = (View::new(a, a_layout, m, k), View::new(b, b_layout, k, n));
    // SAFETY: `c` holds the m × n output (asserted) and is borrowed mutably for the call.
    unsafe { serial(c.as_mut_ptr(), n, (m, n, k), a, b, accumulate) }
}

/// Outputs up to this size stay in the cores' caches between the product and its epilogue.
const SMALL_OUTPUT_BYTES: usize = 1 << 20;

/// `c = a·b` (`a` row-major) in blocks of rows spread over the thread pool, each block handed
/// to `epilogue` right after it is computed, while it is still in cache.
#[allow(clippy::too_many_arguments)]
pub fn matmul_then(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_layout: Layout,
    epilogue: &(dyn Fn(&mut [f32]) + Sync),
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul_then: operands too small"
    );
    // Output blocks of about 128 KiB (at least 96 rows, so repacking `b` per block stays cheap).
    let rows = (32768 / n.max(1)).clamp(96, 512);
    let threads = rayon::current_num_threads();
    let small = m * n * std::mem::size_of::<f32>() <= SMALL_OUTPUT_BYTES;
    if small || m.div_ceil(rows) < 2 * threads {
        // Too few row blocks to keep every thread busy (small images, batch 1): one product
        // split over the pool, then the epilogue over row blocks (the output is small).
        matmul(c, m, n, k, a, Layout::Normal, b, b_layout, false);
        let per = m.div_ceil(threads).max(1) * n;
        c[..m * n].par_chunks_mut(per).for_each(epilogue);
        return;
    }
    let (a, b) = (
        View::new(a, Layout::Normal, m, k),
        View::new(b, b_layout, k, n),
    );
    c[..m * n]
        .par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(i, cb)| {
            let r = cb.len() / n;
            // SAFETY: `cb` is this block's own `r × n` part of the output.
            unsafe { serial(cb.as_mut_ptr(), n, (r, n, k), a.from(i * rows, 0), b, false) };
            epilogue(cb);
        });
}

/// Partials of [`split_k`], kept between calls: a weight gradient per layer and step would
/// otherwise allocate (and page-fault in) fresh zeroed memory each time.
static SPLIT_K_PARTIALS: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// `aᵀ·b` with a long reduction and a small output (weight gradients: Σ over every pixel):
/// the reduction is split across threads. The first slice goes straight into `c`, the others
/// into partials (overwritten, so never zeroed) that are then added to it.
fn split_k(
    c: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    accumulate: bool,
    threads: usize,
) {
    let per = k.div_ceil(threads);
    let len = m * n;
    // Reduction steps k0..k1 of both operands into `out`.
    let slice = |t: usize, out: &mut [f32], accumulate: bool| {
        let (k0, k1) = (t * per, ((t + 1) * per).min(k));
        let kp = k1.saturating_sub(k0);
        let (a, b) = (a.from(0, k0.min(k)), b.from(k0.min(k), 0));
        // SAFETY: `out` is this slice's own m × n output.
        unsafe { serial(out.as_mut_ptr(), n, (m, n, kp), a, b, accumulate) }
    };
    crate::with_kept(&SPLIT_K_PARTIALS, Vec::new, |partials| {
        let partials = crate::at_least(partials, (threads - 1) * len);
        let out = &mut c[..len];
        rayon::join(
            || slice(0, out, accumulate),
            || {
                partials
                    .par_chunks_mut(len)
                    .enumerate()
                    .for_each(|(t, part)| slice(t + 1, part, false));
            },
        );
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
            for part in partials.chunks_exact(len) {
                let p = &part[i * CHUNK..i * CHUNK + o.len()];
                for (o, p) in o.iter_mut().zip(p) {
                    *o += p;
                }
            }
        });
    })
}

/// Reduction steps per block when the left operand is read in place: every 1×1 convolution's
/// whole reduction in one, as the inference kernel runs it (a tile's rows and the panel it
/// meets stay in L1/L2 by themselves).
const DEPTH_IN_PLACE: usize = 2048;
/// When the left operand is stored transposed, it is packed [`PACKED_ROWS`] rows × this many
/// steps at a time (96 KiB, kept in L2 while every panel meets it).
const DEPTH_PACKED: usize = 256;
const PACKED_ROWS: usize = 96;

/// Whether the kernels read `a`'s rows where they are (contiguous rows).
fn in_place(a: View) -> bool {
    a.cs == 1
}

/// Reduction steps per block for a left operand `a`.
fn depth_for(a: View) -> usize {
    if in_place(a) {
        DEPTH_IN_PLACE
    } else {
        DEPTH_PACKED
    }
}

/// Each thread's packing buffers, kept between calls (grown, never shrunk).
#[derive(Default)]
struct Packs {
    /// The right operand's block, in the pointwise kernel's panels.
    panels: Vec<f32>,
    /// Those panels rounded to bf16 (in bf16 mode).
    rounded: Vec<u32>,
    /// The left operand's block, row-major.
    rows: Vec<f32>,
}

thread_local! {
    static PACKS: RefCell<Packs> = RefCell::new(Packs::default());
}

/// High-water marks of [`Packs`]' two buffers over every worker.
static PANELS_HIGH: crate::HighWater = crate::HighWater::new();
static ROUNDED_HIGH: crate::HighWater = crate::HighWater::new();
static ROWS_HIGH: crate::HighWater = crate::HighWater::new();

/// Grows this thread's [`Packs`] to the high-water marks (see [`crate::spread_worker_buffers`]).
pub(crate) fn reach_high_water() {
    PACKS.with_borrow_mut(|packs| {
        PANELS_HIGH.reach(&mut packs.panels);
        ROUNDED_HIGH.reach(&mut packs.rounded);
        ROWS_HIGH.reach(&mut packs.rows);
    });
}

/// `c = (accumulate ? c : 0) + a·b` for `(m, n, k)` on the calling thread, output row `i` at
/// `c + i·ldc`. The reduction goes block by block: the right operand's block is packed into
/// panels, then [`against_panels`]; every block after the first adds to what the ones before
/// left in `c`.
///
/// # Safety
/// `c` must be valid for reads and writes at `i·ldc + j` for `i < m`, `j < n` (`ldc ≥ n`), and
/// no other thread may touch those elements during the call.
unsafe fn serial(
    c: *mut f32,
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    accumulate: bool,
) {
    assert!(
        a.holds(m, k) && b.holds(k, n) && ldc >= n,
        "matmul: operand strides reach past the data"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i's n values are the caller's (the contract above).
                unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0) };
            }
        }
        return;
    }
    let depth = depth_for(a);
    PACKS.with_borrow_mut(|packs| {
        let mut panels = std::mem::take(&mut packs.panels);
        let mut rounded = std::mem::take(&mut packs.rounded);
        for k0 in (0..k).step_by(depth) {
            let kc = depth.min(k - k0);
            let block = PANELS_HIGH.grow(&mut panels, pointwise::packed_len(kc, n));
            let (w, strides) = (b.from(k0, 0).data, (b.rs, b.cs));
            let block = match bf16() {
                true => {
                    let out = ROUNDED_HIGH.grow(&mut rounded, pointwise::packed_len_bf16(kc, n));
                    pointwise::pack_strided_bf16_into(kc, n, w, strides, block, out);
                    pointwise::Panels::Bf16(out)
                }
                false => {
                    pointwise::pack_strided_into(kc, n, w, strides, block);
                    pointwise::Panels::F32(block)
                }
            };
            let then = match accumulate || k0 > 0 {
                true => Then::Add,
                false => Then::Store,
            };
            // SAFETY: the caller's contract, for all m rows.
            unsafe { against_panels(c, ldc, 0..m, (kc, n), a.from(0, k0), block, then, packs) };
        }
        packs.panels = panels;
        packs.rounded = rounded;
    });
}

/// Rows `rows` of `c (+)= a · panels` for one block of the reduction (`kc` steps, `n` columns):
/// `a`'s rows read in place, or packed [`PACKED_ROWS`] at a time into `packs.rows`.
///
/// # Safety
/// As [`serial`], for the rows `rows` of the output; `a` must hold those rows' `kc` values
/// (checked) and `panels` the packed `kc × n` block.
#[allow(clippy::too_many_arguments)]
unsafe fn against_panels(
    c: *mut f32,
    ldc: usize,
    rows: std::ops::Range<usize>,
    (kc, n): (usize, usize),
    a: View,
    panels: pointwise::Panels,
    then: Then,
    packs: &mut Packs,
) {
    assert!(a.holds(rows.end, kc), "matmul: rows reach past the data");
    let add = matches!(then, Then::Add);
    let step = if in_place(a) { rows.len() } else { PACKED_ROWS };
    for r0 in rows.clone().step_by(step.max(1)) {
        let count = step.min(rows.end - r0);
        let a = a.from(r0, 0);
        let (x, pixel) = if in_place(a) {
            (a.data, a.rs)
        } else {
            let out = ROWS_HIGH.grow(&mut packs.rows, count * kc);
            pack_rows(a, count, kc, out);
            (&*out, kc)
        };
        // SAFETY: rows r0..r0+count of the output are the caller's (the contract).
        let y = unsafe { c.add(r0 * ldc) };
        match panels {
            _ if pointwise::available() => {
                // SAFETY: as above; the kernel checks `x` and `panels` again.
                unsafe { pointwise::product_at(x, pixel, count, kc, n, panels, y, ldc, then) }
            }
            // SAFETY: as above.
            pointwise::Panels::F32(panels) => unsafe {
                portable(x, pixel, (count, kc, n), panels, y, ldc, add)
            },
            pointwise::Panels::Bf16(_) => unreachable!("bf16 panels only where AVX-512 runs"),
        }
    }
}

/// `rows × depth` values of `a` into `out`, row-major.
fn pack_rows(a: View, rows: usize, depth: usize, out: &mut [f32]) {
    assert!(
        a.holds(rows, depth) && out.len() >= rows * depth,
        "matmul: packing reaches past the data"
    );
    if a.rs != 1 {
        for (i, row) in out.chunks_exact_mut(depth).take(rows).enumerate() {
            for (p, v) in row.iter_mut().enumerate() {
                *v = a.data[i * a.rs + p * a.cs];
            }
        }
        return;
    }
    // Stored transposed: each reduction step's values for these rows lie side by side.
    simd::transpose(a.data, a.cs, depth, rows, out, depth);
}

/// The pointwise kernel's product in plain Rust (CPUs without AVX2 and FMA): `y = (add ? y :
/// 0) + x · w` for `(m, k, n)`, row `r` of `x` at `x[r·pixel..]`, of `y` at `y + r·ldy`, `w`
/// in panels. Each panel meets every row while it is in cache; sixteen lanes per row vectorize.
///
/// # Safety
/// As [`serial`] for the output; `x` must hold the rows (checked).
unsafe fn portable(
    x: &[f32],
    pixel: usize,
    (m, k, n): (usize, usize, usize),
    w: &[f32],
    y: *mut f32,
    ldy: usize,
    add: bool,
) {
    assert!(
        x.len() >= (m - 1) * pixel + k,
        "matmul: rows reach past the data"
    );
    for (j, panel) in w[..pointwise::packed_len(k, n)]
        .chunks_exact(k * NR)
        .enumerate()
    {
        let cols = NR.min(n - j * NR);
        for r in 0..m {
            let mut acc = [0f32; NR];
            for (&v, lanes) in x[r * pixel..][..k].iter().zip(panel.chunks_exact(NR)) {
                for (sum, &w) in acc.iter_mut().zip(lanes) {
                    *sum += v * w;
                }
            }
            // SAFETY: row r's columns j·NR.. j·NR+cols are the caller's (the contract).
            let out = unsafe { std::slice::from_raw_parts_mut(y.add(r * ldy + j * NR), cols) };
            for (o, sum) in out.iter_mut().zip(acc) {
                *o = if add { *o + sum } else { sum };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(accumulate ? 1 : 0) + a·b` in f64, `a` and `b` read through their layouts.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        a_layout: Layout,
        b: &[f32],
        b_layout: Layout,
        accumulate: bool,
    ) -> Vec<f64> {
        let (a, b) = (View::new(a, a_layout, m, k), View::new(b, b_layout, k, n));
        (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let dot: f64 = (0..k)
                    .map(|l| {
                        a.data[i * a.rs + l * a.cs] as f64 * b.data[l * b.rs + j * b.cs] as f64
                    })
                    .sum();
                dot + if accumulate { 1.0 } else { 0.0 }
            })
            .collect()
    }

    fn values(len: usize, mul: usize, modulus: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) / modulus as f32)
            .collect()
    }

    /// Every layout pair, overwriting and accumulating, on shapes that reach each path: serial
    /// with several reduction blocks, rows split with the shared panels (a transposed left
    /// operand packed in blocks of 96 rows, 8 × 8 at a time with ragged edges), columns
    /// split; in a pool of three threads and on one.
    #[test]
    fn every_path_equals_the_plain_product() {
        let shapes = [(7, 5, 3), (45, 37, 600), (301, 70, 530), (40, 600, 300)];
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            for (m, n, k) in shapes {
                let (a, b) = (values(m * k, 37, 101), values(k * n, 53, 97));
                for a_layout in [Layout::Normal, Layout::Transposed] {
                    for b_layout in [Layout::Normal, Layout::Transposed] {
                        for accumulate in [false, true] {
                            let want = reference(m, n, k, &a, a_layout, &b, b_layout, accumulate);
                            let mut c = vec![1.0f32; m * n];
                            pool.install(|| {
                                matmul(&mut c, m, n, k, &a, a_layout, &b, b_layout, accumulate)
                            });
                            for (e, (got, want)) in c.iter().zip(&want).enumerate() {
                                assert!(
                                    (*got as f64 - want).abs() < 1e-3,
                                    "{threads} threads, {m}×{n}×{k} {a_layout:?} {b_layout:?} \
                                     {accumulate} ({}, {}): {got} vs {want}",
                                    e / n,
                                    e % n
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The plain-Rust tiles (CPUs without AVX2) against the reference, adding and storing, with
    /// rows apart by more than their length and a last panel of 5 columns.
    #[test]
    fn the_portable_tiles_equal_the_plain_product() {
        let (m, n, k, pixel, ldc) = (9, 21, 13, 17, 25);
        let x = values((m - 1) * pixel + k, 37, 101);
        let w = values(k * n, 53, 97);
        let mut panels = vec![0f32; pointwise::packed_len(k, n)];
        pointwise::pack_rows_into(k, n, &w, &mut panels);
        for add in [false, true] {
            let mut c = vec![1.0f32; m * ldc];
            // SAFETY: `c` holds m rows of ldc ≥ n values.
            unsafe { portable(&x, pixel, (m, k, n), &panels, c.as_mut_ptr(), ldc, add) };
            for i in 0..m {
                for j in 0..ldc {
                    let want = match j < n {
                        true => {
                            (0..k)
                                .map(|l| x[i * pixel + l] as f64 * w[l * n + j] as f64)
                                .sum::<f64>()
                                + if add { 1.0 } else { 0.0 }
                        }
                        false => 1.0,
                    };
                    let got = c[i * ldc + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{add} ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The column-split path (few rows, many columns) against an f64 product, for both layouts
    /// of b, overwriting and accumulating, with a last block narrower than the others.
    #[test]
    fn column_split_equals_the_plain_product() {
        let (m, n, k) = (49, 1000, 300);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool");
        for layout in [Layout::Normal, Layout::Transposed] {
            let bt = |l: usize, j: usize| match layout {
                Layout::Normal => b[l * n + j],
                Layout::Transposed => b[j * k + l],
            };
            pool.install(|| {
                for accumulate in [false, true] {
                    let mut c = vec![1.0f32; m * n];
                    matmul(&mut c, m, n, k, &a, Layout::Normal, &b, layout, accumulate);
                    for (e, got) in c.iter().enumerate() {
                        let (i, j) = (e / n, e % n);
                        let want: f64 = (0..k)
                            .map(|l| a[i * k + l] as f64 * bt(l, j) as f64)
                            .sum::<f64>()
                            + if accumulate { 1.0 } else { 0.0 };
                        assert!(
                            (*got as f64 - want).abs() < 1e-3,
                            "{layout:?} {accumulate} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            });
        }
    }

    /// The split-reduction path (weight gradients) against a plain f64 sum: overwrite and
    /// accumulate, slices of unequal length, and called twice so the reused partials hold
    /// stale values from the first call.
    #[test]
    fn split_reduction_equals_the_plain_product() {
        let (m, n, k) = (5, 7, 3001);
        let a_t: Vec<f32> = (0..k * m)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k)
                    .map(|l| a_t[l * m + i] as f64 * b[l * n + j] as f64)
                    .sum()
            })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool");
        pool.install(|| {
            for accumulate in [false, true, false] {
                let mut c = vec![1.0f32; m * n];
                matmul(
                    &mut c,
                    m,
                    n,
                    k,
                    &a_t,
                    Layout::Transposed,
                    &b,
                    Layout::Normal,
                    accumulate,
                );
                for (e, (got, w)) in c.iter().zip(&want).enumerate() {
                    let w = w + if accumulate { 1.0 } else { 0.0 };
                    assert!(
                        (*got as f64 - w).abs() < 1e-3,
                        "{e}: {got} vs {w} ({accumulate})"
                    );
                }
            }
        });
    }
}
