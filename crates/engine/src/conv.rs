//! Dense k×k convolution (groups = 1) with TF "SAME" padding, by im2col and a matrix product
//! (the forward of 3×3 stride 1 by Winograd's transform instead: `winograd.rs`), and the 1×1
//! stride-1 case as a plain matrix product over the NHWC rows.

use rayon::prelude::*;

use crate::matmul::{add_transposed, matmul, matmul_serial_add, matmul_then, Layout};
use crate::norm::Folded;
use crate::pointwise;
use crate::shape::{same_padding, Nhwc};
use crate::simd;
use crate::winograd;

/// The geometry of one dense convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub input: Nhwc,
    pub kernel: usize,
    pub stride: usize,
    pub cout: usize,
    pub out_h: usize,
    pub out_w: usize,
    pad_top: usize,
    pad_left: usize,
}

impl ConvGeom {
    pub fn new(input: Nhwc, kernel: usize, stride: usize, cout: usize) -> Self {
        let (out_h, pad_top) = same_padding(input.h, kernel, stride);
        let (out_w, pad_left) = same_padding(input.w, kernel, stride);
        ConvGeom {
            input,
            kernel,
            stride,
            cout,
            out_h,
            out_w,
            pad_top,
            pad_left,
        }
    }

    pub fn output(&self) -> Nhwc {
        Nhwc::new(self.input.n, self.out_h, self.out_w, self.cout)
    }

    /// A 1×1 stride-1 convolution needs no im2col: the input rows are the matrix.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1
    }

    /// Length of one im2col row: the reduction dimension of the product.
    pub fn patch_len(&self) -> usize {
        self.kernel * self.kernel * self.input.c
    }

    /// Scratch needed for one image's im2col matrix, or the Winograd-transformed filter of a
    /// 3×3 stride-1 forward, whichever is larger (0 for pointwise convolutions).
    pub fn col_len(&self) -> usize {
        if self.is_pointwise() {
            0
        } else {
            let im2col = self.out_h * self.out_w * self.patch_len();
            // The transformed filter and its panels, and in the backward pass (channels
            // swapped) the flipped filter it is made from (9·cin·cout).
            let (cin, cout) = (self.input.c, self.cout);
            let winograd = if winograd::applies(self) {
                9 * cin * cout
                    + winograd::filter_scratch(cin, cout).max(winograd::filter_scratch(cout, cin))
            } else {
                0
            };
            // Plain weights packed for the direct kernel.
            let panels = pointwise::packed_len(self.patch_len(), cout);
            im2col.max(winograd).max(panels)
        }
    }

    pub fn weight_len(&self) -> usize {
        self.cout * self.patch_len()
    }

    pub fn macs(&self) -> usize {
        self.output().rows() * self.patch_len() * self.cout
    }
}

/// Packs a PyTorch weight `[cout][cin][kh][kw]` into the im2col layout `[kh][kw][cin][cout]`.
pub fn pack_weight(g: &ConvGeom, torch: &[f32], packed: &mut [f32]) {
    let (k, cin, cout) = (g.kernel, g.input.c, g.cout);
    for o in 0..cout {
        for i in 0..cin {
            for t in 0..k * k {
                packed[(t * cin + i) * cout + o] = torch[(o * cin + i) * k * k + t];
            }
        }
    }
}

/// A dense convolution's weight as [`forward`] takes it.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    /// PyTorch's layout `[cout, cin]` for a pointwise convolution, [`pack_weight`]'s otherwise:
    /// what a training step has (its weights change every step).
    Plain(&'a [f32]),
    /// [`prepare`]'s layout, made once for weights that stay fixed (inference).
    Prepared(&'a [f32]),
    /// [`prepare_bf16`]'s bf16 panels (inference in bf16).
    Bf16(&'a [u32]),
}

/// The weight (PyTorch's layout) in the layout [`forward`] reads fastest, for many passes with
/// fixed weights. Where the [`pointwise`] kernel runs, every product's right operand packed into
/// its panels: the 1×1 weight, each of Winograd's transformed filters, or the im2col filter
/// that [`pointwise::conv`] reads.
/// Elsewhere `[cin, cout]` for a 1×1 convolution (the product streams rows of the weight instead
/// of gathering columns), Winograd's transformed filter, or [`pack_weight`]'s layout.
pub fn prepare(g: &ConvGeom, torch: &[f32]) -> Vec<f32> {
    let (cin, cout) = (g.input.c, g.cout);
    let panels = pointwise::available();
    if g.is_pointwise() && panels {
        return pointwise::pack(cin, cout, torch);
    }
    if g.is_pointwise() {
        let mut out = vec![0f32; cin * cout];
        for (o, row) in torch[..cout * cin].chunks_exact(cin).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * cout + o] = v;
            }
        }
        return out;
    }
    let mut packed = vec![0f32; g.weight_len()];
    pack_weight(g, torch, &mut packed);
    if runs_winograd(g) {
        let mut u = vec![0f32; winograd::POSITIONS * cin * cout];
        winograd::transform_filter(cin, cout, &packed, &mut u);
        if panels {
            return winograd::pack_filter(cin, cout, &u);
        }
        return u;
    }
    if panels {
        return pointwise::pack_rows(g.patch_len(), cout, &packed);
    }
    packed
}

/// Whether `g` has a bf16 pass ([`prepare_bf16`]): a 1×1 convolution, or one the direct kernel
/// runs on an even number of input channels (a pixel's channels in pairs), where the CPU has
/// AVX512_BF16. Winograd's transforms stay f32 (their coefficients amplify bf16's rounding).
pub fn runs_bf16(g: &ConvGeom) -> bool {
    pointwise::bf16_available() && (g.is_pointwise() || (direct(g) && g.input.c.is_multiple_of(2)))
}

/// PyTorch's weight for `g` packed for a bf16 pass (where [`runs_bf16`]): the 1×1 weight, or the
/// direct kernel's im2col filter, in bf16 panels.
pub fn prepare_bf16(g: &ConvGeom, torch: &[f32]) -> Vec<u32> {
    assert!(runs_bf16(g), "conv: no bf16 pass for {g:?}");
    if g.is_pointwise() {
        return pointwise::pack_bf16(g.input.c, g.cout, torch);
    }
    let mut packed = vec![0f32; g.weight_len()];
    pack_weight(g, torch, &mut packed);
    // As training's plain weights are packed per call in bf16 mode (`forward`): from the rows.
    let (k, n) = (g.patch_len(), g.cout);
    let mut out = vec![0u32; pointwise::packed_len_bf16(k, n)];
    pointwise::pack_rows_bf16_into(k, n, &packed, &mut out);
    out
}

/// Adds a gradient in the packed layout to one in PyTorch's layout (the inverse of [`pack_weight`]).
pub fn unpack_weight_add(g: &ConvGeom, packed: &[f32], torch: &mut [f32]) {
    let (k, cin, cout) = (g.kernel, g.input.c, g.cout);
    for o in 0..cout {
        for i in 0..cin {
            for t in 0..k * k {
                torch[(o * cin + i) * k * k + t] += packed[(t * cin + i) * cout + o];
            }
        }
    }
}

/// Fills `col` (`[out_h·out_w, k·k·cin]`) with the zero-padded patches of one image; output
/// rows are spread over the thread pool.
fn im2col(g: &ConvGeom, image: &[f32], col: &mut [f32]) {
    let row = g.out_w * g.patch_len();
    col[..g.out_h * row]
        .par_chunks_mut(row.max(1))
        .enumerate()
        .for_each(|(oh, out_row)| {
            im2col_pixels(g, image, oh * g.out_w..(oh + 1) * g.out_w, out_row)
        });
}

/// The adjoint of [`im2col`]: each input pixel gathers the patch entries that read it, so input
/// rows are independent and spread over the thread pool. Overwrites `image`.
fn col2im(g: &ConvGeom, col: &[f32], image: &mut [f32]) {
    let (k, cin, s) = (g.kernel, g.input.c, g.stride);
    let patch = g.patch_len();
    // Output positions o with o·s + tap − pad = i, as (tap, o) pairs.
    let taps = |i: usize, pad: usize, out: usize| {
        (0..k).filter_map(move |t| {
            let num = (i + pad) as isize - t as isize;
            (num >= 0 && num % s as isize == 0 && ((num / s as isize) as usize) < out)
                .then(|| (t, (num / s as isize) as usize))
        })
    };
    image
        .par_chunks_mut(g.input.w * cin)
        .enumerate()
        .for_each(|(ih, in_row)| {
            simd::dispatch(
                #[inline(always)]
                || {
                    in_row.fill(0.0);
                    for (iw, px) in in_row.chunks_exact_mut(cin).enumerate() {
                        for (kh, oh) in taps(ih, g.pad_top, g.out_h) {
                            for (kw, ow) in taps(iw, g.pad_left, g.out_w) {
                                let src = &col[(oh * g.out_w + ow) * patch + (kh * k + kw) * cin..]
                                    [..cin];
                                for (d, v) in px.iter_mut().zip(src) {
                                    *d += v;
                                }
                            }
                        }
                    }
                },
            )
        });
}

/// Input channels below which Winograd's transforms cost more than its fewer products save, so
/// a prepared 3×3 convolution runs direct instead (measured on EfficientNetV2-S's shapes:
/// `examples/conv_shapes`).
const WINOGRAD_MIN_CIN: usize = 32;

/// Whether a k×k convolution with prepared weights runs [`pointwise::conv`], straight from its
/// image: where that kernel runs, unless Winograd applies and pays. (A 1×1 stride-2 convolution
/// gathers its pixels by im2col instead, as do kernels over 7×7 and strides past the kernel.)
fn direct(g: &ConvGeom) -> bool {
    (2..=7).contains(&g.kernel)
        && g.stride <= g.kernel
        && pointwise::available()
        && (!winograd::applies(g) || g.input.c < WINOGRAD_MIN_CIN)
}

/// Whether [`forward`] computes `g` by Winograd's transform (else directly or through im2col):
/// 3×3 stride 1, unless the direct kernel runs it ([`direct`]), with prepared weights or not.
pub fn runs_winograd(g: &ConvGeom) -> bool {
    winograd::applies(g) && !direct(g)
}

/// Whether [`forward`] runs `g` with plain weights (training's, which change every step) on the
/// direct kernel, their panels packed per call: where Winograd would run otherwise, where
/// im2col's product is f32 or short, and in bf16 mode wherever the kernel has bf16 panels
/// ([`runs_bf16`]). Training at batch 8 (2 threads): the stem 5.1–6.6 → 1.7 ms, 112² 24 → 24 by
/// Winograd 6.1–7.5 → 4.5 ms; a 432-step reduction (56² 48 → 256, stride 2) ran faster as
/// im2col's bf16 product (3.6–4.0 ms) than direct in f32 (4.4–4.5 ms), and direct in bf16
/// faster still (2.7–3.0 ms).
fn plain_direct(g: &ConvGeom) -> bool {
    let bf16 = crate::matmul::bf16();
    direct(g) && (winograd::applies(g) || !bf16 || g.patch_len() < 256 || runs_bf16(g))
}

/// `g` on the direct kernel ([`pointwise::conv`]) image by image, `w` in its panels.
fn direct_forward(
    g: &ConvGeom,
    x: &[f32],
    w: pointwise::Panels,
    y: &mut [f32],
    epilogue: Epilogue,
    skip: Option<&[f32]>,
) {
    let d = direct_shape(g);
    let (in_img, out_img) = (
        g.input.h * g.input.w * g.input.c,
        g.out_h * g.out_w * g.cout,
    );
    for b in 0..g.input.n {
        let y = &mut y[b * out_img..][..out_img];
        let skip = skip.map(|s| &s[b * out_img..][..out_img]);
        pointwise::conv(&d, &x[b * in_img..][..in_img], w, y, epilogue, skip);
    }
}

/// A k×k convolution's shape for [`pointwise::conv`], one image.
fn direct_shape(g: &ConvGeom) -> pointwise::Direct {
    pointwise::Direct {
        height: g.input.h,
        width: g.input.w,
        cin: g.input.c,
        kernel: g.kernel,
        stride: g.stride,
        pad_top: g.pad_top,
        pad_left: g.pad_left,
        out_h: g.out_h,
        out_w: g.out_w,
        cout: g.cout,
    }
}

/// Whether [`forward_projected`] runs `g` (a k×k convolution with prepared weights): where
/// its kernel runs straight from the image or by Winograd's transform, on the pointwise kernels.
pub fn projects(g: &ConvGeom) -> bool {
    pointwise::available() && !g.is_pointwise() && (direct(g) || winograd::applies(g))
}

/// `y = p(epilogue(conv(x, w)))` with weights from [`prepare`], where [`projects`]: the 1×1
/// convolution `p` (a block's projection) runs on `g`'s output piece by piece while it is in
/// cache, so that output is never stored. The same arithmetic as [`forward`] and then `p`.
pub fn forward_projected(
    g: &ConvGeom,
    x: &[f32],
    w: pointwise::Panels,
    epilogue: Epilogue,
    p: &pointwise::Projection,
    y: &mut [f32],
) {
    assert!(projects(g), "conv: no projected pass for {g:?}");
    if !direct(g) {
        let pointwise::Panels::F32(w) = w else {
            panic!("conv: Winograd's filter is f32")
        };
        let u = winograd::Filter::Panels(w);
        return winograd::forward_projected(g, x, u, epilogue, p, y);
    }
    let d = direct_shape(g);
    let (in_img, out_img) = (
        g.input.h * g.input.w * g.input.c,
        g.out_h * g.out_w * p.cout,
    );
    assert!(x.len() >= g.input.n * in_img, "conv: input size");
    assert!(y.len() >= g.input.n * out_img, "conv: output size");
    for b in 0..g.input.n {
        let projection = pointwise::Projection {
            skip: p.skip.map(|s| &s[b * out_img..][..out_img]),
            ..*p
        };
        let (x, y) = (&x[b * in_img..][..in_img], &mut y[b * out_img..][..out_img]);
        pointwise::conv_projected(&d, x, w, epilogue, &projection, y);
    }
}

/// Eval-mode batch norm and activation, applied to a kernel's output right after it is
/// produced, while it is in cache (or in registers).
pub type Epilogue<'a> = Option<&'a Folded>;

/// `y = conv(x, w)`, then `epilogue` over blocks of output rows, then `+ skip` (a residual laid
/// out like `y`); `col` is scratch of [`ConvGeom::col_len`]. With prepared weights on AVX2 the
/// pointwise kernels add the residual to each tile in registers; elsewhere it is a pass of its
/// own.
pub fn forward(
    g: &ConvGeom,
    x: &[f32],
    weight: Weight,
    y: &mut [f32],
    col: &mut [f32],
    epilogue: Epilogue,
    skip: Option<&[f32]>,
) {
    // Pointwise: [rows, cin] · [cin, cout], the torch weight [cout, cin] read transposed unless
    // prepared. Otherwise, per image: im2col [pixels, k·k·cin] · packed [k·k·cin, cout].
    let (w, k, w_layout) = match (g.is_pointwise(), weight) {
        (true, Weight::Plain(w)) => (w, g.input.c, Layout::Transposed),
        (true, Weight::Prepared(w)) => (w, g.input.c, Layout::Normal),
        (true, Weight::Bf16(w)) => {
            let (rows, k) = (g.output().rows(), g.input.c);
            let w = pointwise::Panels::Bf16(w);
            return pointwise::forward_panels(x, rows, k, g.cout, w, y, epilogue, skip);
        }
        (false, Weight::Plain(w) | Weight::Prepared(w)) => (w, g.patch_len(), Layout::Normal),
        (false, Weight::Bf16(w)) => {
            assert!(runs_bf16(g), "conv: no bf16 pass for {g:?}");
            let w = pointwise::Panels::Bf16(w);
            return direct_forward(g, x, w, y, epilogue, skip);
        }
    };
    // Prepared weights are the pointwise kernel's panels where that kernel runs.
    let panels = matches!(weight, Weight::Prepared(_)) && pointwise::available();
    let product = |y: &mut [f32], rows: usize, a: &[f32], skip: Option<&[f32]>| {
        match epilogue {
            _ if panels => return pointwise::forward(a, rows, k, g.cout, w, y, epilogue, skip),
            Some(e) => matmul_then(y, rows, g.cout, k, a, w, w_layout, &|rows| e.apply(rows)),
            None => matmul(y, rows, g.cout, k, a, Layout::Normal, w, w_layout, false),
        }
        if let Some(s) = skip {
            add_residual(y, s);
        }
    };
    let out_len = g.output().len();
    if let Some(s) = skip {
        assert!(
            s.len() >= out_len,
            "conv: residual holds {} < {out_len}",
            s.len()
        );
    }
    if g.is_pointwise() {
        product(y, g.output().rows(), x, skip);
        return;
    }
    let in_img = g.input.h * g.input.w * g.input.c;
    let out_px = g.out_h * g.out_w;
    if panels && direct(g) {
        return direct_forward(g, x, pointwise::Panels::F32(w), y, epilogue, skip);
    }
    if matches!(weight, Weight::Plain(_)) && plain_direct(g) {
        let (k, n) = (g.patch_len(), g.cout);
        if crate::matmul::bf16() && runs_bf16(g) {
            // SAFETY: u32 and f32 have one size and alignment and every bit pattern is valid in
            // both; `col` is borrowed mutably for the cast's whole life.
            let slots =
                unsafe { std::slice::from_raw_parts_mut(col.as_mut_ptr() as *mut u32, col.len()) };
            let packed = &mut slots[..pointwise::packed_len_bf16(k, n)];
            pointwise::pack_rows_bf16_into(k, n, w, packed);
            return direct_forward(g, x, pointwise::Panels::Bf16(packed), y, epilogue, skip);
        }
        let packed = &mut col[..pointwise::packed_len(k, n)];
        pointwise::pack_rows_into(k, n, w, packed);
        return direct_forward(g, x, pointwise::Panels::F32(packed), y, epilogue, skip);
    }
    if runs_winograd(g) {
        let u = match weight {
            Weight::Prepared(u) if panels => winograd::Filter::Panels(u),
            Weight::Prepared(u) => winograd::Filter::Rows(u),
            Weight::Plain(w) => winograd::plain_filter(g.input.c, g.cout, w, col),
            Weight::Bf16(_) => unreachable!("refused above"),
        };
        winograd::forward(g, x, u, y, epilogue, skip);
        return;
    }
    let out_img = out_px * g.cout;
    for b in 0..g.input.n {
        im2col(g, &x[b * in_img..][..in_img], col);
        let skip = skip.map(|s| &s[b * out_img..][..out_img]);
        product(&mut y[b * out_img..][..out_img], out_px, col, skip);
    }
}

/// `y += skip` (a block's shortcut), spread over the pool.
pub fn add_residual(y: &mut [f32], skip: &[f32]) {
    let skip = &skip[..y.len()];
    y.par_chunks_mut(16_384)
        .zip(skip.par_chunks(16_384))
        .for_each(|(y, s)| {
            for (o, v) in y.iter_mut().zip(s) {
                *o += v;
            }
        });
}

/// Gradients of [`forward`]: `dw` (same layout as `w`) is accumulated into; `dx`, when wanted,
/// is overwritten. `col` and `dcol` are scratch of [`ConvGeom::col_len`] each.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    col: &mut [f32],
    dcol: &mut [f32],
) {
    let out = g.output();
    let (cin, cout) = (g.input.c, g.cout);
    if g.is_pointwise() {
        let rows = out.rows();
        // dw[cout, cin] += dyᵀ · x
        matmul(
            dw,
            cout,
            cin,
            rows,
            dy,
            Layout::Transposed,
            x,
            Layout::Normal,
            true,
        );
        if let Some(dx) = dx {
            // dx[rows, cin] = dy · w[cout, cin]
            matmul(
                dx,
                rows,
                cin,
                cout,
                dy,
                Layout::Normal,
                w,
                Layout::Normal,
                false,
            );
        }
        return;
    }
    let in_img = g.input.h * g.input.w * cin;
    let out_px = g.out_h * g.out_w;
    let patch = g.patch_len();
    let mut dx = dx;
    if winograd::applies(g) {
        if let Some(dx) = dx.take() {
            // The input gradient of a 3×3 stride-1 SAME convolution is itself one: dy convolved
            // with the filter turned 180° and its channels swapped, [3·3·cout, cin].
            let (flipped, scratch) = dcol.split_at_mut(9 * cin * cout);
            for t in 0..9 {
                for co in 0..cout {
                    for ci in 0..cin {
                        flipped[(t * cout + co) * cin + ci] = w[((8 - t) * cin + ci) * cout + co];
                    }
                }
            }
            let g_t = ConvGeom::new(Nhwc::new(g.input.n, g.out_h, g.out_w, cout), 3, 1, cin);
            forward(&g_t, dy, Weight::Plain(flipped), dx, scratch, None, None);
        }
        if winograd::weight_grad(g, x, dy, col, dw) {
            return;
        }
    }
    // With an input gradient and fewer images than threads: image by image, each product over
    // the pool.
    let dx = match dx {
        Some(dx) if g.input.n < rayon::current_num_threads() => dx,
        dx => return grads_by_patches(g, x, w, dy, dx, dw),
    };
    for b in 0..g.input.n {
        let dy_img = &dy[b * out_px * cout..][..out_px * cout];
        im2col(g, &x[b * in_img..][..in_img], col);
        // dw[patch, cout] += colᵀ · dy
        matmul(
            dw,
            patch,
            cout,
            out_px,
            col,
            Layout::Transposed,
            dy_img,
            Layout::Normal,
            true,
        );
        // dcol[out_px, patch] = dy · wᵀ
        matmul(
            dcol,
            out_px,
            patch,
            cout,
            dy_img,
            Layout::Normal,
            w,
            Layout::Transposed,
            false,
        );
        col2im(g, dcol, &mut dx[b * in_img..][..in_img]);
    }
}

/// Floats of one block of patches in [`grads_by_patches`]: 512 KiB, which stays in a core's
/// L2 with its packed copy while the products read it.
const PATCH_BLOCK_FLOATS: usize = 128 * 1024;

thread_local! {
    /// Each thread's block of patches (and of their gradients) for [`grads_by_patches`], kept
    /// between calls.
    static PATCHES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`PATCHES`]' high-water mark over every worker.
static PATCHES_HIGH: crate::HighWater = crate::HighWater::new();

/// Grows this thread's [`PATCHES`] to the high-water mark ([`crate::spread_worker_buffers`]).
pub(crate) fn reach_high_water() {
    PATCHES.with_borrow_mut(|patches| PATCHES_HIGH.reach(patches));
}

/// [`grads_by_patches`]' per-thread weight gradients, kept between calls.
static PATCH_PARTIALS: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());

/// im2col's gradients without writing the batch's patches out: `dw[patch, cout] += colᵀ·dy`
/// and, when `dx` is given (overwritten), `dx = col2im(dy·wᵀ)`. Each thread takes one run of
/// consecutive output pixels (whole images when `dx` is given, so that each thread adds into
/// its own images' gradient) and gathers their patches a block at a time into cache, where the
/// products read them at once; its weight gradient is its own `[cout, patch]` sum, and those are
/// added up in order, so the result does not depend on scheduling. Patches of a whole image
/// (10.8 MB at 112² on 24 channels) went to memory and back before: EfficientNetV2-S's 112²
/// 24 → 24 weight gradient at batch 8 took 6.1–6.4 ms so, 4.8 ms this way.
fn grads_by_patches(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) {
    let (cout, patch) = (g.cout, g.patch_len());
    let (pixels, per_image) = (g.output().rows(), g.out_h * g.out_w);
    let in_img = g.input.h * g.input.w * g.input.c;
    let len = cout * patch;
    if let Some(dx) = dx.as_deref() {
        assert!(
            dx.len() >= g.input.len(),
            "conv backward: input gradient size"
        );
    }
    if pixels == 0 || len == 0 {
        if let Some(dx) = dx {
            dx[..g.input.len()].fill(0.0);
        }
        return;
    }
    let block = (PATCH_BLOCK_FLOATS / patch).max(8);
    let threads = rayon::current_num_threads().max(1);
    // Each part's pixels: a whole number of images where it adds into their gradient.
    let (parts, per) = match dx {
        Some(_) => {
            let images = g.input.n.div_ceil(threads.min(g.input.n));
            (g.input.n.div_ceil(images), images * per_image)
        }
        None => {
            let parts = threads.clamp(1, pixels.div_ceil(block));
            (parts, pixels.div_ceil(parts))
        }
    };
    let part = |p: usize, sum: &mut [f32], dx: Option<&mut [f32]>| {
        let run = (p * per).min(pixels)..((p + 1) * per).min(pixels);
        let first_image = run.start / per_image;
        let with_dx = dx.is_some();
        PATCHES.with_borrow_mut(|scratch| {
            let rows = block.min(run.len());
            let scratch = PATCHES_HIGH.grow(scratch, (1 + with_dx as usize) * rows * patch);
            let (col, dcol) = scratch.split_at_mut(rows * patch);
            let mut dx = dx;
            if let Some(dx) = dx.as_deref_mut() {
                dx.fill(0.0);
            }
            for (i, first) in run.clone().step_by(block).enumerate() {
                let count = block.min(run.end - first);
                let (col, dy) = (
                    &mut col[..count * patch],
                    &dy[first * cout..][..count * cout],
                );
                im2col_pixels(g, x, first..first + count, col);
                // sum[cout, patch] (+)= dyᵀ · col over these pixels.
                let shape = (cout, patch, count);
                matmul_serial_add(
                    sum,
                    shape,
                    dy,
                    Layout::Transposed,
                    col,
                    Layout::Normal,
                    i > 0,
                );
                if let Some(dx) = dx.as_deref_mut() {
                    // Their patches' gradient dy · wᵀ, added back to the pixels they read.
                    let dcol = &mut dcol[..count * patch];
                    let shape = (count, patch, cout);
                    matmul_serial_add(
                        dcol,
                        shape,
                        dy,
                        Layout::Normal,
                        w,
                        Layout::Transposed,
                        false,
                    );
                    col2im_pixels_add(g, dcol, first..first + count, first_image, dx);
                }
            }
            if run.is_empty() {
                sum.fill(0.0);
            }
        });
    };
    crate::with_kept(&PATCH_PARTIALS, Vec::new, |partials| {
        let partials = crate::at_least(partials, parts * len);
        match dx {
            Some(dx) => partials
                .par_chunks_mut(len)
                .zip(dx[..g.input.len()].par_chunks_mut(per / per_image * in_img))
                .enumerate()
                .for_each(|(p, (sum, dx))| part(p, sum, Some(dx))),
            None => partials
                .par_chunks_mut(len)
                .enumerate()
                .for_each(|(p, sum)| part(p, sum, None)),
        }
        add_transposed(dw, patch, cout, partials, true);
    })
}

/// The adjoint of [`im2col_pixels`], added: each patch entry of `dcol` (the batch's output
/// pixels `pixels`) into the input pixel it was gathered from, in `dx`, the gradient of the
/// images from `first_image` on.
fn col2im_pixels_add(
    g: &ConvGeom,
    dcol: &[f32],
    pixels: std::ops::Range<usize>,
    first_image: usize,
    dx: &mut [f32],
) {
    let (k, cin, s) = (g.kernel, g.input.c, g.stride);
    let (h, w) = (g.input.h as isize, g.input.w as isize);
    let (patch, per_image) = (g.patch_len(), g.out_h * g.out_w);
    let in_img = g.input.h * g.input.w * cin;
    simd::dispatch(
        #[inline(always)]
        || {
            for (q, row) in pixels.zip(dcol.chunks_exact(patch)) {
                let (b, at) = (q / per_image - first_image, q % per_image);
                let (oh, ow) = (at / g.out_w, at % g.out_w);
                let image = &mut dx[b * in_img..][..in_img];
                for kh in 0..k {
                    let ih = (oh * s + kh) as isize - g.pad_top as isize;
                    if ih < 0 || ih >= h {
                        continue;
                    }
                    for kw in 0..k {
                        let iw = (ow * s + kw) as isize - g.pad_left as isize;
                        if iw < 0 || iw >= w {
                            continue;
                        }
                        let dst = &mut image[((ih * w + iw) as usize) * cin..][..cin];
                        let src = &row[(kh * k + kw) * cin..][..cin];
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        },
    )
}

/// [`im2col`] for the batch's output pixels `pixels` (numbered image by image, row by row)
/// into `col` (`[pixels.len(), k·k·cin]`), on the calling thread.
fn im2col_pixels(g: &ConvGeom, x: &[f32], pixels: std::ops::Range<usize>, col: &mut [f32]) {
    let (k, cin, s) = (g.kernel, g.input.c, g.stride);
    let (h, w) = (g.input.h as isize, g.input.w as isize);
    let (patch, per_image) = (g.patch_len(), g.out_h * g.out_w);
    let in_img = g.input.h * g.input.w * cin;
    for (q, row) in pixels.zip(col.chunks_exact_mut(patch)) {
        let (b, at) = (q / per_image, q % per_image);
        let (oh, ow) = (at / g.out_w, at % g.out_w);
        let image = &x[b * in_img..][..in_img];
        for kh in 0..k {
            let ih = (oh * s + kh) as isize - g.pad_top as isize;
            // The kernel row's k pixels lie side by side in the image: one copy where all are
            // inside it.
            let iw0 = (ow * s) as isize - g.pad_left as isize;
            let dst = &mut row[kh * k * cin..][..k * cin];
            if ih >= 0 && ih < h && iw0 >= 0 && iw0 + k as isize <= w {
                let src = ((ih * w + iw0) as usize) * cin;
                dst.copy_from_slice(&image[src..src + k * cin]);
                continue;
            }
            for (kw, dst) in dst.chunks_exact_mut(cin).enumerate() {
                let iw = iw0 + kw as isize;
                if ih < 0 || ih >= h || iw < 0 || iw >= w {
                    dst.fill(0.0);
                } else {
                    let src = ((ih * w + iw) as usize) * cin;
                    dst.copy_from_slice(&image[src..src + cin]);
                }
            }
        }
    }
}
