//! 3×3 stride-1 convolutions by Winograd's F(4×4, 3×3) (Lavin & Gray, 2015).
//!
//! Each 4×4 block of outputs ("tile") comes from a 6×6 input patch: the patch is transformed
//! (Bᵀ·d·B), multiplied elementwise by the transformed filter (G·g·Gᵀ) — over channels that is
//! [`POSITIONS`] matrix products `[tiles, cin]·[cin, cout]`, one per position of the 6×6
//! transform — and transformed back (Aᵀ·m·A). That is 36 multiply-adds per tile and channel pair
//! where im2col spends 144: 4× fewer (F(2×2, 3×3), used before, saves 2.25×). Its transforms'
//! coefficients reach 8, so it rounds more than F(2×2, 3×3): on EfficientNetV2-S's 3×3 layers
//! (random data, against f64) 1.5–3e-6 of the output's RMS, at worst 9e-6 of its largest value
//! (F(2×2): 2–5e-7 and 8e-7), well inside the parity tests' tolerances.
//!
//! The work is split into blocks of consecutive tiles (over the whole batch, evenly over the
//! threads), each done by one thread from input transform to output, epilogue and residual while
//! its scratch is in cache.

use rayon::prelude::*;

use crate::conv::{ConvGeom, Epilogue};
use crate::matmul::{matmul_serial, Layout};
use crate::pointwise::{self, Projection};
use crate::simd;

/// Output pixels per tile side.
const TILE: usize = 4;
/// Input pixels per patch side (the tile plus the 3×3 kernel's reach).
const PATCH: usize = TILE + 2;
/// Positions of the transform: one matrix product each.
pub const POSITIONS: usize = PATCH * PATCH;

/// Whether [`forward`] computes this convolution: 3×3, stride 1 (SAME pads one on each side).
pub fn applies(g: &ConvGeom) -> bool {
    g.kernel == 3 && g.stride == 1
}

/// G·(a, b, c) for one column (or row) of a 3×3 filter, G = [[¼, 0, 0], [−⅙, −⅙, −⅙],
/// [−⅙, ⅙, −⅙], [1/24, 1/12, ⅙], [1/24, −1/12, ⅙], [0, 0, 1]].
#[inline(always)]
fn g_times(a: f32, b: f32, c: f32) -> [f32; PATCH] {
    const SIXTH: f32 = 1.0 / 6.0;
    let (outer, middle) = (a * (1.0 / 24.0) + c * SIXTH, b * (1.0 / 12.0));
    [
        a * 0.25,
        -(a + b + c) * SIXTH,
        -(a - b + c) * SIXTH,
        outer + middle,
        outer - middle,
        c,
    ]
}

/// Filter transform: the packed weight `[3·3·cin, cout]` (im2col layout) to
/// `u[POSITIONS][cin][cout]`, `u_ξ = (G·g·Gᵀ)_ξ`, in vectors of output channels and in
/// parallel over the transform's six rows (training transforms every filter on every step).
pub fn transform_filter(cin: usize, cout: usize, packed: &[f32], u: &mut [f32]) {
    const LANES: usize = 64;
    let plane = cin * cout;
    assert!(
        packed.len() >= 9 * plane && u.len() >= POSITIONS * plane,
        "winograd: filter size"
    );
    if plane == 0 {
        return;
    }
    u[..POSITIONS * plane]
        .par_chunks_mut(PATCH * plane)
        .enumerate()
        .for_each(|(i, row)| {
            simd::dispatch(
                #[inline(always)]
                || {
                    for ci in 0..cin {
                        for c0 in (0..cout).step_by(LANES) {
                            let n = LANES.min(cout - c0);
                            let g = |kh: usize, kw: usize| {
                                &packed[((kh * 3 + kw) * cin + ci) * cout + c0..][..n]
                            };
                            // Row i of G·g: one value per kernel column (kw).
                            let mut gg = [[0f32; LANES]; 3];
                            for (kw, out) in gg.iter_mut().enumerate() {
                                let (a, b, c) = (g(0, kw), g(1, kw), g(2, kw));
                                for l in 0..n {
                                    out[l] = g_times(a[l], b[l], c[l])[i];
                                }
                            }
                            // Times Gᵀ: positions (i, 0..6).
                            let mut planes = row.chunks_exact_mut(plane);
                            let mut out: [&mut [f32]; PATCH] = std::array::from_fn(|_| {
                                let p = planes.next().expect("six positions");
                                &mut p[ci * cout + c0..][..n]
                            });
                            for l in 0..n {
                                let v = g_times(gg[0][l], gg[1][l], gg[2][l]);
                                for (o, v) in out.iter_mut().zip(v) {
                                    o[l] = v;
                                }
                            }
                        }
                    }
                },
            )
        });
}

/// About how many floats of scratch a block may use (its transformed input and products):
/// about a core's L2 cache. Larger blocks read each position's filter (up to 36 × 64 KiB on
/// EfficientNetV2-S) for more tiles; 320 Ki floats ran up to 20 % faster than 160 Ki at batch 1
/// and the same at batch 8 (`examples/conv_shapes`).
const BLOCK_FLOATS: usize = 320 * 1024;

/// Most tiles per block of [`forward`] (≥ 1, ≤ the batch's tiles).
fn max_block_tiles(g: &ConvGeom) -> usize {
    let tiles = g.input.n * g.input.h.div_ceil(TILE) * g.input.w.div_ceil(TILE);
    (BLOCK_FLOATS / (POSITIONS * (g.input.c + g.cout)).max(1)).clamp(1, tiles.max(1))
}

/// Multiply-adds of [`forward`]'s products for `g` (36 per tile, input and output channel):
/// about a quarter of the direct convolution's, the transforms aside.
pub fn product_macs(g: &ConvGeom) -> usize {
    let tiles = g.input.n * g.input.h.div_ceil(TILE) * g.input.w.div_ceil(TILE);
    tiles * POSITIONS * g.input.c * g.cout
}

/// Floats of per-thread scratch [`forward`] needs for `g` (its largest block), or
/// [`forward_projected`] with a projection to `proj_cout` channels.
pub fn scratch_len(g: &ConvGeom, proj_cout: Option<usize>) -> usize {
    let projected = proj_cout.map_or(0, |c| projection_scratch(g.cout, c));
    block_scratch(max_block_tiles(g), g.input.c, g.cout) + projected
}

/// Grows the calling thread's scratch to `len` floats now, so that passes later allocate
/// nothing (run it on every worker: `rayon::broadcast`).
pub fn reserve(len: usize) {
    SCRATCH.with_borrow_mut(|scratch| {
        SCRATCH_HIGH.grow(scratch, len);
    });
}

/// Scratch floats a projected block needs beyond [`block_scratch`]: a chunk's 3×3 output of
/// `cout` channels and its projection to `proj_cout`.
fn projection_scratch(cout: usize, proj_cout: usize) -> usize {
    PROJECT_TILES * TILE * TILE * (cout + proj_cout)
}

/// Scratch floats [`forward`] needs per block of `tiles` tiles: the transformed input and
/// products, and the transforms' own rows.
fn block_scratch(tiles: usize, cin: usize, cout: usize) -> usize {
    POSITIONS * tiles * (cin + cout) + (1 + POSITIONS) * cin + (TILE * PATCH + TILE) * cout
}

/// The transformed filter as [`forward`] takes it.
#[derive(Debug, Clone, Copy)]
pub enum Filter<'a> {
    /// `u[POSITIONS][cin][cout]`, as [`transform_filter`] writes it.
    Rows(&'a [f32]),
    /// Each position packed for the pointwise kernel ([`pack_filter`]).
    Panels(&'a [f32]),
}

/// [`transform_filter`]'s `u` packed position by position into [`pointwise::pack_rows`]'
/// panels, for inference with fixed weights where the pointwise kernel runs.
pub fn pack_filter(cin: usize, cout: usize, u: &[f32]) -> Vec<f32> {
    let mut panels = vec![0f32; POSITIONS * pointwise::packed_len(cin, cout)];
    pack_filter_into(cin, cout, u, &mut panels);
    panels
}

fn pack_filter_into(cin: usize, cout: usize, u: &[f32], panels: &mut [f32]) {
    let len = pointwise::packed_len(cin, cout);
    let planes = u[..POSITIONS * cin * cout].par_chunks_exact((cin * cout).max(1));
    planes
        .zip(panels[..POSITIONS * len].par_chunks_exact_mut(len.max(1)))
        .for_each(|(plane, out)| pointwise::pack_rows_into(cin, cout, plane, out));
}

/// Scratch floats [`plain_filter`] needs.
pub fn filter_scratch(cin: usize, cout: usize) -> usize {
    POSITIONS * (cin * cout + pointwise::packed_len(cin, cout))
}

/// The filter for [`forward`] from weights that change every step (training): the packed
/// weight `[3·3·cin, cout]` transformed, then packed into panels where the pointwise kernel runs
/// (once per call, instead of once per block by the general product); in `scratch`, of
/// [`filter_scratch`] floats.
pub fn plain_filter<'a>(
    cin: usize,
    cout: usize,
    packed: &[f32],
    scratch: &'a mut [f32],
) -> Filter<'a> {
    let (u, panels) = scratch[..filter_scratch(cin, cout)].split_at_mut(POSITIONS * cin * cout);
    transform_filter(cin, cout, packed, u);
    if pointwise::available() {
        pack_filter_into(cin, cout, u, panels);
        Filter::Panels(panels)
    } else {
        Filter::Rows(u)
    }
}

/// Where tile `t` of the batch lies: (image, tile row, tile column).
fn tile_at(t: usize, th: usize, tw: usize) -> (usize, usize, usize) {
    (t / (th * tw), t / tw % th, t % tw)
}

/// `y = conv(x) + skip` for a 3×3 stride-1 SAME convolution (see [`applies`]) with the
/// transformed filter `u`; the epilogue runs on each tile's output pixels before the residual
/// `skip` (laid out like `y`) is added.
pub fn forward(
    g: &ConvGeom,
    x: &[f32],
    u: Filter,
    y: &mut [f32],
    epilogue: Epilogue,
    skip: Option<&[f32]>,
) {
    run(g, x, u, y, epilogue, Sink::Image(skip));
}

/// `y = p(epilogue(conv(x)))`: [`forward`] followed by the 1×1 convolution `p`, a few tiles at a
/// time, so the 3×3 convolution's output (4× the block's channels) is never written to memory
/// and read back. The same arithmetic as the two layers one after the other, bit for bit. Only
/// where [`pointwise::available`].
pub fn forward_projected(
    g: &ConvGeom,
    x: &[f32],
    u: Filter,
    epilogue: Epilogue,
    p: &Projection,
    y: &mut [f32],
) {
    assert!(
        pointwise::available(),
        "winograd: the projection needs the pointwise kernels"
    );
    assert!(
        p.w.holds(g.cout, p.cout),
        "winograd: projection weights not packed"
    );
    run(g, x, u, y, epilogue, Sink::Projected(p));
}

/// Where [`run`]'s output goes: the image (plus a residual), or through a projection.
#[derive(Clone, Copy)]
enum Sink<'a> {
    Image(Option<&'a [f32]>),
    Projected(&'a Projection<'a>),
}

/// Tiles per step of a projected block: 192 pixels of the 3×3 output (144 KiB at 192
/// channels) stay in L2 between the output transform and the projection.
const PROJECT_TILES: usize = 12;

/// [`forward`] or [`forward_projected`], as `sink` says.
fn run(g: &ConvGeom, x: &[f32], u: Filter, y: &mut [f32], epilogue: Epilogue, sink: Sink) {
    let (n, h, w, cin, cout) = (g.input.n, g.input.h, g.input.w, g.input.c, g.cout);
    let (out_c, skip) = match sink {
        Sink::Image(skip) => (cout, skip),
        Sink::Projected(p) => (p.cout, p.skip),
    };
    assert!(x.len() >= n * h * w * cin, "winograd: input size");
    assert!(y.len() >= n * h * w * out_c, "winograd: output size");
    if let Some(s) = skip {
        assert!(s.len() >= n * h * w * out_c, "winograd: residual size");
    }
    let (th, tw) = (h.div_ceil(TILE), w.div_ceil(TILE));
    let total = n * th * tw;
    if total == 0 || cout == 0 {
        return;
    }
    // Blocks of at most `max_block_tiles`, as many as a multiple of the threads so that they
    // end together, and as even as whole tiles allow.
    let threads = rayon::current_num_threads().max(1);
    let blocks = total.div_ceil(max_block_tiles(g)).div_ceil(threads) * threads;
    let per_block = total.div_ceil(blocks.min(total));
    let y_addr = y.as_mut_ptr() as usize;
    (0..total.div_ceil(per_block))
        .into_par_iter()
        .for_each(|blk| {
            let first = blk * per_block;
            let tiles = first..(first + per_block).min(total);
            // No parallel loop runs inside a block, so its thread cannot start another block
            // meanwhile: the borrow of the scratch is this block's alone.
            SCRATCH.with_borrow_mut(|scratch| {
                let projected = match sink {
                    Sink::Image(_) => 0,
                    Sink::Projected(p) => projection_scratch(cout, p.cout),
                };
                let need = block_scratch(tiles.len(), cin, cout) + projected;
                SCRATCH_HIGH.grow(scratch, need);
                let (v, rest) = scratch[..need].split_at_mut(POSITIONS * tiles.len() * cin);
                let (m, rest) = rest.split_at_mut(POSITIONS * tiles.len() * cout);
                let (zero, rest) = rest.split_at_mut(cin);
                let (e_in, rest) = rest.split_at_mut(POSITIONS * cin);
                let (e_out, rest) = rest.split_at_mut(TILE * PATCH * cout);
                let (px, rest) = rest.split_at_mut(TILE * cout);
                // Other calls used this scratch for other things.
                zero.fill(0.0);
                let shape = Shape { h, w, th, tw };
                simd::dispatch(
                    #[inline(always)]
                    || input_transform(x, shape, cin, tiles.clone(), v, zero, e_in),
                );
                let count = tiles.len();
                for xi in 0..POSITIONS {
                    let out = &mut m[xi * count * cout..][..count * cout];
                    let vx = &v[xi * count * cin..][..count * cin];
                    match u {
                        Filter::Rows(u) => {
                            let ux = &u[xi * cin * cout..][..cin * cout];
                            matmul_serial(out, count, cout, cin, vx, ux, Layout::Normal)
                        }
                        Filter::Panels(u) => {
                            let len = pointwise::packed_len(cin, cout);
                            let ux = &u[xi * len..][..len];
                            pointwise::product_serial(
                                vx,
                                count,
                                cin,
                                cout,
                                ux,
                                out,
                                pointwise::Then::Store,
                            )
                        }
                    }
                }
                let y = y_addr as *mut f32;
                let p = match sink {
                    Sink::Image(skip) => {
                        let out = Output {
                            y,
                            epilogue,
                            skip,
                            tile_major: false,
                        };
                        // SAFETY: `y` holds the batch's n·h·w·cout outputs (asserted above) and
                        // stays borrowed mutably for this whole call; a tile's output pixels are
                        // its own, and the blocks' tile ranges are disjoint, so no other thread
                        // writes what this one does.
                        simd::dispatch(
                            #[inline(always)]
                            || unsafe {
                                output_transform(m, shape, cout, &tiles, &tiles, &out, e_out, px)
                            },
                        );
                        return;
                    }
                    Sink::Projected(p) => p,
                };
                // A few tiles at a time: their 3×3 output, tile-major, into `z` (in L2); the
                // projection of those rows into `o`; then to their pixels with the residual.
                let (z, o) = rest.split_at_mut(PROJECT_TILES * TILE * TILE * cout);
                let mut first = tiles.start;
                while first < tiles.end {
                    let chunk = first..tiles.end.min(first + PROJECT_TILES);
                    let rows = chunk.len() * TILE * TILE;
                    let out = Output {
                        y: z.as_mut_ptr(),
                        epilogue,
                        skip: None,
                        tile_major: true,
                    };
                    // SAFETY: `z` holds PROJECT_TILES tiles' TILE·TILE pixels of cout channels,
                    // the most a chunk writes tile-major.
                    simd::dispatch(
                        #[inline(always)]
                        || unsafe {
                            output_transform(m, shape, cout, &tiles, &chunk, &out, e_out, px)
                        },
                    );
                    // Rows of pixels past the image's edge hold whatever `z` held: projected
                    // like the others, then left out.
                    let o = &mut o[..rows * p.cout];
                    p.run_serial(&z[..rows * cout], rows, cout, o);
                    // SAFETY: `y` holds the batch's n·h·w·p.cout outputs (asserted above), these
                    // tiles' pixels this block's alone, as for the image above.
                    unsafe { scatter(o, shape, p.cout, chunk.clone(), y, p.skip) };
                    first = chunk.end;
                }
            });
        });
}

thread_local! {
    /// Each thread's block scratch for [`forward`], kept between calls for the life of the thread:
    /// allocated (and zeroed) once at its largest (a few MiB) instead of on every call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`SCRATCH`]'s high-water mark over every worker.
static SCRATCH_HIGH: crate::HighWater = crate::HighWater::new();

/// Grows this thread's [`SCRATCH`] to the high-water mark (see
/// [`crate::spread_worker_buffers`]).
pub(crate) fn reach_high_water() {
    SCRATCH.with_borrow_mut(|scratch| SCRATCH_HIGH.reach(scratch));
}

/// An image's size in pixels and in tiles.
#[derive(Clone, Copy)]
struct Shape {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

/// Bᵀ·(d0 … d5) on channel vectors, Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0],
/// [0, 4, −4, −1, 1, 0], [0, −2, −1, 2, 1, 0], [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]]:
/// the same combination along either axis of a patch.
#[inline(always)]
fn bt(d: [&[f32]; PATCH], out: [&mut [f32]; PATCH]) {
    // All cut to one length, so that the loop runs without bounds checks, in vectors.
    let n = out[0].len();
    let [o0, o1, o2, o3, o4, o5] = out.map(|o| &mut o[..n]);
    let [d0, d1, d2, d3, d4, d5] = d.map(|r| &r[..n]);
    for k in 0..n {
        let (d0, d1, d2, d3, d4, d5) = (d0[k], d1[k], d2[k], d3[k], d4[k], d5[k]);
        o0[k] = 4.0 * d0 - 5.0 * d2 + d4;
        o1[k] = (d3 + d4) - 4.0 * (d1 + d2);
        o2[k] = (d4 - d3) + 4.0 * (d1 - d2);
        o3[k] = (d4 - d2) + 2.0 * (d3 - d1);
        o4[k] = (d4 - d2) - 2.0 * (d3 - d1);
        o5[k] = 4.0 * d1 - 5.0 * d3 + d5;
    }
}

/// Six `c`-long rows of `e` starting at row `first`, `stride` rows apart, as [`bt`]'s or
/// [`at`]'s outputs.
fn rows_mut(e: &mut [f32], c: usize, first: usize, stride: usize) -> [&mut [f32]; PATCH] {
    let mut rows = e.chunks_exact_mut(c.max(1)).skip(first).step_by(stride);
    std::array::from_fn(|_| rows.next().expect("six rows"))
}

/// `v[POSITIONS][tiles][c]` for the batch's tiles `tiles`: each tile's 6×6 patch (rows
/// 4·ty − 1 .. 4·ty + 5, zero outside the image) transformed as Bᵀ·d·B; channels innermost, so
/// every step is a vector operation.
#[inline(always)]
fn input_transform(
    x: &[f32],
    s: Shape,
    c: usize,
    tiles: std::ops::Range<usize>,
    v: &mut [f32],
    zero: &[f32],
    e: &mut [f32],
) {
    let count = tiles.len();
    for (slot, t) in tiles.enumerate() {
        let (b, ty, tx) = tile_at(t, s.th, s.tw);
        let image = &x[b * s.h * s.w * c..][..s.h * s.w * c];
        let px = |i: usize, j: usize| -> &[f32] {
            let (iy, ix) = ((TILE * ty + i) as isize - 1, (TILE * tx + j) as isize - 1);
            if iy < 0 || iy >= s.h as isize || ix < 0 || ix >= s.w as isize {
                zero
            } else {
                &image[(iy as usize * s.w + ix as usize) * c..][..c]
            }
        };
        // `e`: Bᵀ·d, row-major 6×6 of channel vectors. Along the rows (i), one column (j) at
        // a time.
        for j in 0..PATCH {
            bt(std::array::from_fn(|i| px(i, j)), rows_mut(e, c, j, PATCH));
        }
        // Along the columns (j), into v's planes: position (i, j) of this tile.
        for i in 0..PATCH {
            let (row, _) = e[i * PATCH * c..].split_at(PATCH * c);
            let d: [&[f32]; PATCH] = std::array::from_fn(|j| &row[j * c..][..c]);
            let out = rows_mut(v, c, i * PATCH * count + slot, count);
            bt(d, out);
        }
    }
}

/// Aᵀ·(m0 … m5) on channel vectors, Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0],
/// [0, 1, 1, 4, 4, 0], [0, 1, −1, 8, −8, 1]].
#[inline(always)]
fn at(m: [&[f32]; PATCH], out: [&mut [f32]; TILE]) {
    let n = out[0].len();
    let [o0, o1, o2, o3] = out.map(|o| &mut o[..n]);
    let [m0, m1, m2, m3, m4, m5] = m.map(|r| &r[..n]);
    for k in 0..n {
        let (m0, m1, m2, m3, m4, m5) = (m0[k], m1[k], m2[k], m3[k], m4[k], m5[k]);
        let (sum12, diff12) = (m1 + m2, m1 - m2);
        let (sum34, diff34) = (m3 + m4, m3 - m4);
        o0[k] = m0 + sum12 + sum34;
        o1[k] = diff12 + 2.0 * diff34;
        o2[k] = sum12 + 4.0 * sum34;
        o3[k] = diff12 + 8.0 * diff34 + m5;
    }
}

/// Where [`output_transform`] writes, and what it applies on the way.
struct Output<'a> {
    y: *mut f32,
    epilogue: Epilogue<'a>,
    skip: Option<&'a [f32]>,
    /// Whether `y` holds the tiles' pixels tile by tile (TILE·TILE rows each, row-major in the
    /// tile), rather than the batch's image.
    tile_major: bool,
}

/// The output pixels of the batch's tiles `tiles` (some of a block's, `block`) from
/// `m[POSITIONS][block][c]`: Aᵀ·m·A per tile, then the epilogue and the residual, writing only
/// the pixels inside the image.
///
/// # Safety
/// `out.y` must be writable for the batch's n·h·w·c outputs (or, tile-major, for `tiles`'
/// TILE·TILE·c each), and no other thread may touch the pixels of these tiles meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_transform(
    m: &[f32],
    s: Shape,
    c: usize,
    block: &std::ops::Range<usize>,
    tiles: &std::ops::Range<usize>,
    out: &Output,
    e: &mut [f32],
    px: &mut [f32],
) {
    let count = block.len();
    let plane = |xi: usize, t: usize| &m[(xi * count + t - block.start) * c..][..c];
    for (slot, t) in tiles.clone().enumerate() {
        let (b, ty, tx) = tile_at(t, s.th, s.tw);
        // `e`: Aᵀ·m, 4 rows × 6 columns of channel vectors.
        for j in 0..PATCH {
            let mut rows = e.chunks_exact_mut(c.max(1)).skip(j).step_by(PATCH);
            at(
                std::array::from_fn(|i| plane(i * PATCH + j, t)),
                std::array::from_fn(|_| rows.next().expect("four rows")),
            );
        }
        // Row by row: the row's four pixels into `px`, epilogue, residual, store.
        let cols = TILE.min(s.w - TILE * tx);
        for i in 0..TILE.min(s.h - TILE * ty) {
            let row = &e[i * PATCH * c..][..PATCH * c];
            let mut pixels = px.chunks_exact_mut(c.max(1));
            at(
                std::array::from_fn(|j| &row[j * c..][..c]),
                std::array::from_fn(|_| pixels.next().expect("four pixels")),
            );
            let first = ((b * s.h + TILE * ty + i) * s.w + TILE * tx) * c;
            let to = match out.tile_major {
                true => (slot * TILE + i) * TILE * c,
                false => first,
            };
            let px = &mut px[..cols * c];
            if let Some(e) = out.epilogue {
                e.apply(px);
            }
            if let Some(skip) = out.skip {
                for (p, r) in px.iter_mut().zip(&skip[first..first + cols * c]) {
                    *p += r;
                }
            }
            // SAFETY: by the caller's contract; `to + cols·c` stays inside this row of the
            // image (or of the tile), since the tile's columns past the image were cut (`cols`).
            std::ptr::copy_nonoverlapping(px.as_ptr(), out.y.add(to), cols * c);
        }
    }
}

/// The projection's output `o` (tile-major: TILE·TILE rows per tile of `tiles`) to those tiles'
/// pixels inside the image at `y` (`c` channels), plus the residual `skip` laid out like `y`.
///
/// # Safety
/// `y` must be writable for the batch's n·h·w·c outputs, and no other thread may touch the
/// pixels of these tiles meanwhile.
unsafe fn scatter(
    o: &[f32],
    s: Shape,
    c: usize,
    tiles: std::ops::Range<usize>,
    y: *mut f32,
    skip: Option<&[f32]>,
) {
    for (slot, t) in tiles.enumerate() {
        let (b, ty, tx) = tile_at(t, s.th, s.tw);
        let cols = TILE.min(s.w - TILE * tx);
        for i in 0..TILE.min(s.h - TILE * ty) {
            let src = &o[(slot * TILE + i) * TILE * c..][..cols * c];
            let first = ((b * s.h + TILE * ty + i) * s.w + TILE * tx) * c;
            // SAFETY: by the caller's contract; the row's `cols` pixels lie inside the image.
            let dst = std::slice::from_raw_parts_mut(y.add(first), cols * c);
            match skip {
                Some(r) => {
                    for ((d, v), r) in dst.iter_mut().zip(src).zip(&r[first..][..cols * c]) {
                        *d = v + r;
                    }
                }
                None => dst.copy_from_slice(src),
            }
        }
    }
}

/// G's entries: `G[i][a]` weighs filter row (or column) `a` into transform position `i`.
const G: [[f32; 3]; PATCH] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// A·(d0 … d3) on channel vectors, A = (Aᵀ)ᵀ: the adjoint of [`at`], which carries an output
/// gradient into the transformed domain.
#[inline(always)]
fn a_times(d: [&[f32]; TILE], out: [&mut [f32]; PATCH]) {
    let n = out[0].len();
    let [o0, o1, o2, o3, o4, o5] = out.map(|o| &mut o[..n]);
    let [d0, d1, d2, d3] = d.map(|r| &r[..n]);
    for k in 0..n {
        let (d0, d1, d2, d3) = (d0[k], d1[k], d2[k], d3[k]);
        let (even, odd) = (d0 + d2, d1 + d3);
        let (even4, odd4) = (d0 + 4.0 * d2, d1 + 4.0 * d3);
        o0[k] = d0;
        o1[k] = even + odd;
        o2[k] = even - odd;
        o3[k] = even4 + 2.0 * odd4;
        o4[k] = even4 - 2.0 * odd4;
        o5[k] = d3;
    }
}

/// Accumulates into `dw` (the packed `[3·3·cin, cout]` layout) the weight gradient of a 3×3
/// stride-1 SAME convolution (see [`applies`]) by Winograd's transform: per position ξ,
/// dU_ξ = Σ over tiles of V_ξᵀ·dM_ξ (V the input's transform as in [`forward`], dM = A·dy·Aᵀ
/// the output gradient's), then dg = Gᵀ·dU·G — 4× fewer multiply-adds than im2col's
/// `colᵀ·dy`. The output channels are split over the threads, each summing all tiles in order,
/// so the result does not depend on scheduling. `du` is scratch of [`POSITIONS`]·cin·cout
/// floats. Returns false, doing nothing, where the pointwise kernel does not run, the map is
/// under 16 pixels on a side, or the output channels do not split into 16-channel panels evenly
/// over the threads.
pub fn weight_grad(g: &ConvGeom, x: &[f32], dy: &[f32], du: &mut [f32], dw: &mut [f32]) -> bool {
    let (n, h, w, cin, cout) = (g.input.n, g.input.h, g.input.w, g.input.c, g.cout);
    // Small maps waste much of their 4×4 tiles and run the transforms for few products: at
    // 7×7 (EfficientNetV2-B0 at 28 px) im2col was 4–15 % faster per training step.
    let small = h.min(w) < 16;
    // One part of the output channels per thread, each a whole number of panels; otherwise
    // (24 channels, say) im2col's parallel product serves better than a serial one here.
    let threads = rayon::current_num_threads().max(1);
    let split = cout.is_multiple_of(pointwise::NR * threads);
    if !applies(g) || !pointwise::available() || small || cin == 0 || !split {
        return false;
    }
    assert!(x.len() >= n * h * w * cin, "winograd: input size");
    assert!(
        dy.len() >= n * h * w * cout,
        "winograd: output gradient size"
    );
    assert!(dw.len() >= 9 * cin * cout, "winograd: weight gradient size");
    let (th, tw) = (h.div_ceil(TILE), w.div_ceil(TILE));
    let total = n * th * tw;
    let width = cout / threads;
    let block = (BLOCK_FLOATS / (POSITIONS * (cin + width))).clamp(1, total.max(1));
    let shape = Shape { h, w, th, tw };
    du[..POSITIONS * cin * cout]
        .par_chunks_mut(POSITIONS * cin * width)
        .enumerate()
        .for_each(|(part, du)| {
            du.fill(0.0);
            let channels = part * width..(part + 1) * width;
            SCRATCH.with_borrow_mut(|scratch| {
                let need = POSITIONS * block * (2 * cin + width)
                    + POSITIONS * cin
                    + cin.max(width)
                    + (TILE * PATCH + POSITIONS) * width;
                SCRATCH_HIGH.grow(scratch, need);
                let (vt, rest) = scratch[..need].split_at_mut(POSITIONS * block * cin);
                let (dm, rest) = rest.split_at_mut(POSITIONS * block * width);
                let (v, rest) = rest.split_at_mut(POSITIONS * block * cin);
                let (e_in, rest) = rest.split_at_mut(POSITIONS * cin);
                let (zero, rest) = rest.split_at_mut(cin.max(width));
                let (e_dy, m1) = rest.split_at_mut(TILE * PATCH * width);
                zero.fill(0.0);
                for first in (0..total).step_by(block) {
                    let count = block.min(total - first);
                    simd::dispatch(
                        #[inline(always)]
                        || {
                            // The input's transform as the forward's, v[ξ][slot][ci], then
                            // turned to vt[ξ][ci][slot] (the product's rows are its channels;
                            // stored one value at a time, vt took 30 % of this function's time).
                            let tiles = first..first + count;
                            input_transform(x, shape, cin, tiles, v, &zero[..cin], e_in);
                            for (v, vt) in v
                                .chunks_exact(count * cin)
                                .zip(vt.chunks_exact_mut(count * cin))
                            {
                                simd::transpose(v, cin, count, cin, vt, count);
                            }
                            for slot in 0..count {
                                let t = first + slot;
                                // The output gradient's, in the pointwise kernel's panels:
                                // dm[ξ][panel][slot][16].
                                grad_transform(
                                    dy,
                                    shape,
                                    cout,
                                    &channels,
                                    t,
                                    &zero[..width],
                                    e_dy,
                                    m1,
                                );
                                for (xi, m) in m1.chunks_exact(width).enumerate() {
                                    for (panel, lanes) in m.chunks_exact(pointwise::NR).enumerate()
                                    {
                                        let at = ((xi * (width / pointwise::NR) + panel) * count
                                            + slot)
                                            * pointwise::NR;
                                        dm[at..at + pointwise::NR].copy_from_slice(lanes);
                                    }
                                }
                            }
                        },
                    );
                    for xi in 0..POSITIONS {
                        let a = &vt[xi * cin * count..][..cin * count];
                        let b = &dm[xi * width * count..][..width * count];
                        let out = &mut du[xi * cin * width..][..cin * width];
                        pointwise::product_serial(
                            a,
                            cin,
                            count,
                            width,
                            b,
                            out,
                            pointwise::Then::Add,
                        );
                    }
                }
            });
        });
    simd::dispatch(
        #[inline(always)]
        || filter_grad(&du[..POSITIONS * cin * cout], cin, cout, width, dw),
    );
    true
}

/// A·dy·Aᵀ for tile `t`'s 4×4 output gradient (zero past the image), channels `channels`, into
/// `out[POSITIONS][width]`; `e` holds A·dy (6 rows × 4 columns of channel vectors).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_transform(
    dy: &[f32],
    s: Shape,
    cout: usize,
    channels: &std::ops::Range<usize>,
    t: usize,
    zero: &[f32],
    e: &mut [f32],
    out: &mut [f32],
) {
    let width = channels.len();
    let (b, ty, tx) = tile_at(t, s.th, s.tw);
    let px = |k: usize, l: usize| -> &[f32] {
        let (oy, ox) = (TILE * ty + k, TILE * tx + l);
        if oy >= s.h || ox >= s.w {
            zero
        } else {
            &dy[((b * s.h + oy) * s.w + ox) * cout + channels.start..][..width]
        }
    };
    // Along the rows (k), one column (l) at a time: e[i][l].
    for l in 0..TILE {
        let mut rows = e.chunks_exact_mut(width).skip(l).step_by(TILE);
        a_times(
            std::array::from_fn(|k| px(k, l)),
            std::array::from_fn(|_| rows.next().expect("six rows")),
        );
    }
    // Along the columns (l): position (i, j).
    for i in 0..PATCH {
        let row = &e[i * TILE * width..][..TILE * width];
        a_times(
            std::array::from_fn(|l| &row[l * width..][..width]),
            rows_mut(out, width, i * PATCH, 1),
        );
    }
}

/// dg = Gᵀ·dU·G per input channel and output channel, added into `dw` (`[3·3·cin, cout]`);
/// `du` holds, part by part (`width` output channels each), `[POSITIONS][cin][width]`.
#[inline(always)]
fn filter_grad(du: &[f32], cin: usize, cout: usize, width: usize, dw: &mut [f32]) {
    const LANES: usize = 64;
    for (part, du) in du.chunks_exact(POSITIONS * cin * width).enumerate() {
        for ci in 0..cin {
            for c0 in (0..width).step_by(LANES) {
                let lanes = LANES.min(width - c0);
                let u = |xi: usize| &du[(xi * cin + ci) * width + c0..][..lanes];
                // h[i][b] = Σ_j dU[i][j]·G[j][b]
                let mut h = [[[0f32; LANES]; 3]; PATCH];
                for (i, hi) in h.iter_mut().enumerate() {
                    for (j, gj) in G.iter().enumerate() {
                        let uij = u(i * PATCH + j);
                        for (hib, &coef) in hi.iter_mut().zip(gj) {
                            if coef != 0.0 {
                                for (o, v) in hib[..lanes].iter_mut().zip(uij) {
                                    *o += coef * v;
                                }
                            }
                        }
                    }
                }
                // dg[a][b] = Σ_i G[i][a]·h[i][b]
                for a in 0..3 {
                    for bb in 0..3 {
                        let first = ((a * 3 + bb) * cin + ci) * cout + part * width + c0;
                        let row = &mut dw[first..][..lanes];
                        for (gi, hi) in G.iter().zip(&h) {
                            let coef = gi[a];
                            if coef != 0.0 {
                                for (o, v) in row.iter_mut().zip(&hi[bb][..lanes]) {
                                    *o += coef * v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
