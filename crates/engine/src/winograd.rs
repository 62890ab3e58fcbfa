//! 3×3 stride-1 convolutions by Winograd's F(2×2, 3×3) (Lavin & Gray, 2015).
//!
//! Each 2×2 block of outputs ("tile") comes from a 4×4 input patch: the patch is transformed
//! (Bᵀ·d·B), multiplied elementwise by the transformed filter (G·g·Gᵀ) — over channels that is
//! 16 matrix products `[tiles, cin]·[cin, cout]`, one per position of the 4×4 transform — and
//! transformed back (Aᵀ·m·A). That is 16 multiply-adds per tile, channel pair where im2col
//! spends 36 (2.25× fewer), and the transformed input is 4× the image where im2col's is 9×.
//!
//! The work is split into blocks of whole tile rows of one image, each done by one thread from
//! input transform to output (plus the epilogue) while its scratch is in cache.

use rayon::prelude::*;

use crate::conv::{ConvGeom, Epilogue};
use crate::matmul::{matmul_serial, Layout};
use crate::pointwise;
use crate::simd;

/// Whether [`forward`] computes this convolution: 3×3, stride 1 (SAME pads one on each side).
pub fn applies(g: &ConvGeom) -> bool {
    g.kernel == 3 && g.stride == 1
}

/// Filter transform: the packed weight `[3·3·cin, cout]` (im2col layout) to `u[16][cin][cout]`,
/// `u_ξ = (G·g·Gᵀ)_ξ` with G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
pub fn transform_filter(cin: usize, cout: usize, packed: &[f32], u: &mut [f32]) {
    let plane = cin * cout;
    let at = |t: usize, ci: usize| &packed[(t * cin + ci) * cout..][..cout];
    for ci in 0..cin {
        for co in 0..cout {
            let g = |kh: usize, kw: usize| at(kh * 3 + kw, ci)[co];
            // G·g: 4×3, column by column (kw).
            let column = |kw: usize| {
                let (a, b, c) = (g(0, kw), g(1, kw), g(2, kw));
                [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
            };
            let cols = [column(0), column(1), column(2)];
            let gg: [[f32; 3]; 4] = std::array::from_fn(|i| [cols[0][i], cols[1][i], cols[2][i]]);
            // (G·g)·Gᵀ: 4×4.
            for (i, row) in gg.iter().enumerate() {
                let (a, b, c) = (row[0], row[1], row[2]);
                let out = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (j, v) in out.into_iter().enumerate() {
                    u[(i * 4 + j) * plane + ci * cout + co] = v;
                }
            }
        }
    }
}

/// Tile rows per block of [`forward`]: about 16K output floats per position (in cache), ≥ 1 row.
fn block_rows(g: &ConvGeom) -> usize {
    let (th, tw) = (g.input.h.div_ceil(2), g.input.w.div_ceil(2));
    (16_384 / (tw * g.cout).max(1)).clamp(1, th)
}

/// Floats of per-thread scratch [`forward`] needs for `g` (a whole block).
pub fn scratch_len(g: &ConvGeom) -> usize {
    block_scratch(block_rows(g) * g.input.w.div_ceil(2), g.input.c, g.cout)
}

/// Grows the calling thread's scratch to `len` floats now, so that passes later allocate
/// nothing (run it on every worker: `rayon::broadcast`).
pub fn reserve(len: usize) {
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
    });
}

/// Scratch floats [`forward`] needs per block of `tiles` tiles: the transformed input and
/// products, and the transforms' own rows.
fn block_scratch(tiles: usize, cin: usize, cout: usize) -> usize {
    16 * tiles * (cin + cout) + 17 * cin + 10 * cout
}

/// The transformed filter as [`forward`] takes it.
#[derive(Debug, Clone, Copy)]
pub enum Filter<'a> {
    /// `u[16][cin][cout]`, as [`transform_filter`] writes it.
    Rows(&'a [f32]),
    /// Each of the 16 positions packed for the pointwise kernel ([`pack_filter`]).
    Panels(&'a [f32]),
}

/// [`transform_filter`]'s `u` packed position by position into [`pointwise::pack_rows`]'
/// panels, for inference with fixed weights where the pointwise kernel runs.
pub fn pack_filter(cin: usize, cout: usize, u: &[f32]) -> Vec<f32> {
    u[..16 * cin * cout]
        .chunks_exact((cin * cout).max(1))
        .flat_map(|plane| pointwise::pack_rows(cin, cout, plane))
        .collect()
}

/// y = conv(x) for a 3×3 stride-1 SAME convolution (see [`applies`]) with the transformed
/// filter `u`; the epilogue runs on each block's output rows.
pub fn forward(g: &ConvGeom, x: &[f32], u: Filter, y: &mut [f32], epilogue: Epilogue) {
    let (n, h, w, cin, cout) = (g.input.n, g.input.h, g.input.w, g.input.c, g.cout);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let rows_per_block = block_rows(g);
    let img_out = h * w * cout;
    let img_in = h * w * cin;
    // Block r of an image: output pixel rows 2·r0 .. min(2·r1, h), contiguous.
    let block_len = 2 * rows_per_block * w * cout;
    y[..n * img_out]
        .par_chunks_mut(img_out)
        .enumerate()
        .for_each(|(b, img)| {
            img.par_chunks_mut(block_len.max(1))
                .enumerate()
                .for_each(|(r, out)| {
                    let r0 = r * rows_per_block;
                    let r1 = (r0 + rows_per_block).min(th);
                    let tiles = (r1 - r0) * tw;
                    // No parallel loop runs inside a block, so its thread cannot start another
                    // block meanwhile: the borrow of the scratch is this block's alone.
                    SCRATCH.with_borrow_mut(|scratch| {
                        let need = block_scratch(tiles, cin, cout);
                        if scratch.len() < need {
                            scratch.resize(need, 0.0);
                        }
                        let (v, rest) = scratch[..need].split_at_mut(16 * tiles * cin);
                        let (m, rest) = rest.split_at_mut(16 * tiles * cout);
                        let (zero, rest) = rest.split_at_mut(cin);
                        let (e_in, rest) = rest.split_at_mut(16 * cin);
                        let (e_out, px) = rest.split_at_mut(8 * cout);
                        // Other calls used this scratch for other things.
                        zero.fill(0.0);
                        let image = &x[b * img_in..][..img_in];
                        simd::dispatch(
                            #[inline(always)]
                            || input_transform(image, h, w, cin, r0, r1, tw, v, zero, e_in),
                        );
                        for xi in 0..16 {
                            let out = &mut m[xi * tiles * cout..][..tiles * cout];
                            let vx = &v[xi * tiles * cin..][..tiles * cin];
                            match u {
                                Filter::Rows(u) => {
                                    let ux = &u[xi * cin * cout..][..cin * cout];
                                    matmul_serial(out, tiles, cout, cin, vx, ux, Layout::Normal)
                                }
                                Filter::Panels(u) => {
                                    let len = pointwise::packed_len(cin, cout);
                                    let ux = &u[xi * len..][..len];
                                    pointwise::product_serial(vx, tiles, cin, cout, ux, out)
                                }
                            }
                        }
                        simd::dispatch(
                            #[inline(always)]
                            || output_transform(m, h, w, cout, r0, r1, tw, out, e_out, px),
                        );
                    });
                    if let Some(e) = epilogue {
                        e.apply(out);
                    }
                });
        });
}

thread_local! {
    /// Each thread's block scratch for [`forward`], kept between calls for the life of the thread:
    /// allocated (and zeroed) once at its largest (a few MiB) instead of on every call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `v[16][tiles][cin]` for tile rows r0..r1: each tile's 4×4 patch (rows 2·ty − 1 .. 2·ty + 2,
/// zero outside the image) transformed as Bᵀ·d·B, Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0],
/// [0, −1, 1, 0], [0, 1, 0, −1]]; channels innermost, so every step is a vector operation.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn input_transform(
    image: &[f32],
    h: usize,
    w: usize,
    c: usize,
    r0: usize,
    r1: usize,
    tw: usize,
    v: &mut [f32],
    zero: &[f32],
    e: &mut [f32],
) {
    let tiles = (r1 - r0) * tw;
    // Bᵀ's rows applied to four channel vectors: the same combination along either axis.
    fn bt(a: &[f32], b: &[f32], cc: &[f32], d: &[f32], out: [&mut [f32]; 4]) {
        let [o0, o1, o2, o3] = out;
        for k in 0..a.len() {
            let (d0, d1, d2, d3) = (a[k], b[k], cc[k], d[k]);
            o0[k] = d0 - d2;
            o1[k] = d1 + d2;
            o2[k] = d2 - d1;
            o3[k] = d1 - d3;
        }
    }
    // `zero`: c zeros (outside the image); `e`: Bᵀ·d, row-major 4×4 of channel vectors.
    let mut chunks = v[..16 * tiles * c].chunks_exact_mut(tiles * c);
    let mut planes: [&mut [f32]; 16] =
        std::array::from_fn(|_| chunks.next().expect("v holds 16 planes"));
    for ty in r0..r1 {
        for tx in 0..tw {
            let px = |i: usize, j: usize| -> &[f32] {
                let (iy, ix) = ((2 * ty + i) as isize - 1, (2 * tx + j) as isize - 1);
                if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                    zero
                } else {
                    &image[(iy as usize * w + ix as usize) * c..][..c]
                }
            };
            // Along the rows (i), one column (j) at a time.
            for j in 0..4 {
                let (e0, rest) = e.split_at_mut(4 * c);
                let (e1, rest) = rest.split_at_mut(4 * c);
                let (e2, e3) = rest.split_at_mut(4 * c);
                let out = [
                    &mut e0[j * c..][..c],
                    &mut e1[j * c..][..c],
                    &mut e2[j * c..][..c],
                    &mut e3[j * c..][..c],
                ];
                bt(px(0, j), px(1, j), px(2, j), px(3, j), out);
            }
            // Along the columns (j), into v's 16 planes.
            let at = (ty - r0) * tw + tx;
            for i in 0..4 {
                let row = &e[i * 4 * c..][..4 * c];
                let (a, rest) = row.split_at(c);
                let (b, rest) = rest.split_at(c);
                let (cc, d) = rest.split_at(c);
                let [p0, p1, p2, p3] = &mut planes[i * 4..i * 4 + 4] else {
                    unreachable!("four planes")
                };
                let out = [
                    &mut p0[at * c..][..c],
                    &mut p1[at * c..][..c],
                    &mut p2[at * c..][..c],
                    &mut p3[at * c..][..c],
                ];
                bt(a, b, cc, d, out);
            }
        }
    }
}

/// The block's output rows from `m[16][tiles][cout]`: Aᵀ·m·A per tile, Aᵀ = [[1, 1, 1, 0],
/// [0, 1, −1, −1]], writing only the pixels inside the image.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_transform(
    m: &[f32],
    h: usize,
    w: usize,
    c: usize,
    r0: usize,
    r1: usize,
    tw: usize,
    out: &mut [f32],
    e: &mut [f32],
    px: &mut [f32],
) {
    let tiles = (r1 - r0) * tw;
    // Aᵀ's rows applied to four channel vectors.
    fn at2(a: &[f32], b: &[f32], cc: &[f32], d: &[f32], o0: &mut [f32], o1: &mut [f32]) {
        for k in 0..a.len() {
            o0[k] = a[k] + b[k] + cc[k];
            o1[k] = b[k] - cc[k] - d[k];
        }
    }
    let plane = |xi: usize, t: usize| &m[(xi * tiles + t) * c..][..c];
    // `e`: Aᵀ·m, 2 rows × 4 columns of channel vectors; `px`: one output row's two pixels.
    for ty in r0..r1 {
        for tx in 0..tw {
            let t = (ty - r0) * tw + tx;
            for j in 0..4 {
                let (e0, e1) = e.split_at_mut(4 * c);
                at2(
                    plane(j, t),
                    plane(4 + j, t),
                    plane(8 + j, t),
                    plane(12 + j, t),
                    &mut e0[j * c..][..c],
                    &mut e1[j * c..][..c],
                );
            }
            for i in 0..2 {
                let oy = 2 * ty + i;
                if oy >= h {
                    continue;
                }
                let row = &e[i * 4 * c..][..4 * c];
                let (a, rest) = row.split_at(c);
                let (b, rest) = rest.split_at(c);
                let (cc, d) = rest.split_at(c);
                let (p0, p1) = px.split_at_mut(c);
                at2(a, b, cc, d, p0, p1);
                for jo in 0..2 {
                    let ox = 2 * tx + jo;
                    if ox < w {
                        out[((oy - 2 * r0) * w + ox) * c..][..c]
                            .copy_from_slice(&px[jo * c..][..c]);
                    }
                }
            }
        }
    }
}
