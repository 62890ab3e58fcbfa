//! Depthwise k×k convolution (one filter per channel) with TF "SAME" padding, NHWC.
//!
//! The inner loops run along channels, contiguous in NHWC, so they vectorize; rows of the output
//! are spread over the thread pool.

use rayon::prelude::*;

use crate::shape::{same_padding, Nhwc};
use crate::simd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwGeom {
    pub input: Nhwc,
    pub kernel: usize,
    pub stride: usize,
    pub out_h: usize,
    pub out_w: usize,
    pad_top: usize,
    pad_left: usize,
}

impl DwGeom {
    pub fn new(input: Nhwc, kernel: usize, stride: usize) -> Self {
        let (out_h, pad_top) = same_padding(input.h, kernel, stride);
        let (out_w, pad_left) = same_padding(input.w, kernel, stride);
        DwGeom {
            input,
            kernel,
            stride,
            out_h,
            out_w,
            pad_top,
            pad_left,
        }
    }

    pub fn output(&self) -> Nhwc {
        Nhwc::new(self.input.n, self.out_h, self.out_w, self.input.c)
    }

    pub fn weight_len(&self) -> usize {
        self.kernel * self.kernel * self.input.c
    }

    pub fn macs(&self) -> usize {
        self.output().len() * self.kernel * self.kernel
    }

    /// The input index range along one axis touched by output `o`, as (first tap, input start, taps).
    #[inline]
    fn taps(&self, o: usize, pad: usize, size: usize) -> (usize, usize, usize) {
        let start = (o * self.stride) as isize - pad as isize;
        let first = (-start).max(0) as usize;
        let end = (start + self.kernel as isize).min(size as isize);
        let first_in = (start + first as isize) as usize;
        (first, first_in, (end - first_in as isize).max(0) as usize)
    }
}

/// Packs a PyTorch weight `[c][1][kh][kw]` into `[kh][kw][c]`.
pub fn pack_weight(g: &DwGeom, torch: &[f32], packed: &mut [f32]) {
    let (c, kk) = (g.input.c, g.kernel * g.kernel);
    for ch in 0..c {
        for t in 0..kk {
            packed[t * c + ch] = torch[ch * kk + t];
        }
    }
}

/// Adds a packed gradient `[kh][kw][c]` into PyTorch's layout `[c][1][kh][kw]`.
pub fn unpack_weight_add(g: &DwGeom, packed: &[f32], torch: &mut [f32]) {
    let (c, kk) = (g.input.c, g.kernel * g.kernel);
    for ch in 0..c {
        for t in 0..kk {
            torch[ch * kk + t] += packed[t * c + ch];
        }
    }
}

/// `y = depthwise(x, w)` with `w` packed as `[kh][kw][c]`, then `epilogue` on each output row.
///
/// On AVX2 CPUs, whole 8-channel vectors run [`row_avx2`]; it sums the same products in the same
/// order as the portable loop below, so both give the same bits.
pub fn forward(g: &DwGeom, x: &[f32], w: &[f32], y: &mut [f32], epilogue: crate::conv::Epilogue) {
    run(g, x, w, y, epilogue, None)
}

/// [`forward`], also writing each output row's sum over its pixels, channel by channel, to
/// `row_sums` (`[n · out_h, c]`): what a squeeze-excitation after it pools
/// ([`crate::se::pool_row_sums`]), taken while the row is in cache rather than read
/// again from memory.
pub fn forward_with_row_sums(
    g: &DwGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: crate::conv::Epilogue,
    row_sums: &mut [f32],
) {
    assert!(
        row_sums.len() >= g.input.n * g.out_h * g.input.c,
        "depthwise: row sums size"
    );
    run(g, x, w, y, epilogue, Some(row_sums))
}

fn run(
    g: &DwGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: crate::conv::Epilogue,
    row_sums: Option<&mut [f32]>,
) {
    let c = g.input.c;
    let (ih_len, iw_len) = (g.input.h, g.input.w);
    let in_img = ih_len * iw_len * c;
    let row_len = g.out_w * c;
    assert!(
        x.len() >= g.input.len() && w.len() >= g.weight_len() && y.len() >= g.output().len(),
        "depthwise: operand sizes"
    );
    if let Some(f) = epilogue {
        assert!(
            f.scale.len() == c && f.shift.len() == c,
            "depthwise: epilogue width"
        );
    }
    let level = simd::level();
    let row = |r: usize, out_row: &mut [f32], sums: Option<&mut [f32]>| {
        let (b, oh) = (r / g.out_h, r % g.out_h);
        let img = &x[b * in_img..][..in_img];
        match level {
            // SAFETY: AVX-512F is present (`simd::level`); as for `row_avx2` below.
            #[cfg(target_arch = "x86_64")]
            simd::Level::Avx512 if c.is_multiple_of(16) => unsafe {
                row_avx512(g, img, w, oh, out_row, epilogue)
            },
            // SAFETY: AVX2 and FMA are present (`simd::level`); `img` is one whole input image,
            // `w` holds k·k·c weights, `out_row` one output row and `epilogue` c scales and
            // shifts (asserted above), which is what `row_avx2` reads and writes.
            #[cfg(target_arch = "x86_64")]
            simd::Level::Avx512 | simd::Level::Avx2 if c.is_multiple_of(8) => unsafe {
                row_avx2(g, img, w, oh, out_row, epilogue)
            },
            _ => simd::dispatch(
                #[inline(always)]
                || {
                    row_portable(g, img, w, oh, out_row);
                    if let Some(epilogue) = epilogue {
                        epilogue.apply(out_row);
                    }
                },
            ),
        }
        if let Some(sums) = sums {
            simd::dispatch(
                #[inline(always)]
                || {
                    sums.fill(0.0);
                    for px in out_row.chunks_exact(c) {
                        for (s, v) in sums.iter_mut().zip(px) {
                            *s += v;
                        }
                    }
                },
            )
        }
    };
    let y = &mut y[..g.output().len()];
    match row_sums {
        Some(sums) => y
            .par_chunks_mut(row_len)
            .zip(sums.par_chunks_mut(c))
            .enumerate()
            .for_each(|(r, (out_row, sums))| row(r, out_row, Some(sums))),
        None => y
            .par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(r, out_row)| row(r, out_row, None)),
    }
}

/// Output row `oh` of one image, each channel's taps summed in order (no epilogue).
#[inline(always)]
fn row_portable(g: &DwGeom, img: &[f32], w: &[f32], oh: usize, out_row: &mut [f32]) {
    let c = g.input.c;
    let (kh0, ih0, nh) = g.taps(oh, g.pad_top, g.input.h);
    for ow in 0..g.out_w {
        let acc = &mut out_row[ow * c..][..c];
        acc.fill(0.0);
        let (kw0, iw0, nw) = g.taps(ow, g.pad_left, g.input.w);
        for dw in 0..nw {
            for dh in 0..nh {
                let xs = &img[((ih0 + dh) * g.input.w + iw0 + dw) * c..][..c];
                let ws = &w[((kh0 + dh) * g.kernel + kw0 + dw) * c..][..c];
                for ((a, xv), wv) in acc.iter_mut().zip(xs).zip(ws) {
                    *a += xv * wv;
                }
            }
        }
    }
}

/// Output row `oh` of one image, pixel by pixel, 32 channels at a time (a tail of 8 at a time):
/// each channel's sum stays in a register over the taps and the epilogue runs there before the
/// one store, while the loads walk the channels contiguously as the portable loop's do. Products
/// are added as separate multiplies and adds, in the portable loop's order.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `img` must hold the whole input image, `w` `k·k·c` weights,
/// `out` the `out_w · c` output row, `epilogue` (if any) `c` scales and shifts, with `c % 8 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(
    g: &DwGeom,
    img: &[f32],
    w: &[f32],
    oh: usize,
    out: &mut [f32],
    epilogue: crate::conv::Epilogue,
) {
    let (c, iw_len) = (g.input.c, g.input.w);
    let (kh0, ih0, nh) = g.taps(oh, g.pad_top, g.input.h);
    let wide = c / 32 * 32;
    // The input row the next output row adds to its window, into L2 while this row computes
    // (rows go to the threads in runs, so the next row is most likely this thread's): the
    // expansion's output is cold by now. Batch 8, inputs cold, toggled ×30: stage 4's layer
    // 1.08–1.19 → 0.99–1.06 ms, stage 5's 2.15–2.25 → 2.09–2.11 ms, stage 6's 3–5 % less;
    // batch 1 unchanged.
    let next = ih0 + nh + g.stride - 1;
    if next < g.input.h {
        simd::prefetch_l2(&img[next * iw_len * c..][..iw_len * c]);
    }
    for ow in 0..g.out_w {
        let (kw0, iw0, nw) = g.taps(ow, g.pad_left, iw_len);
        let taps = Taps {
            x: img.as_ptr().add((ih0 * iw_len + iw0) * c),
            w: w.as_ptr().add((kh0 * g.kernel + kw0) * c),
            nh,
            nw,
            x_row: iw_len * c,
            w_row: g.kernel * c,
            c,
        };
        let y = out.as_mut_ptr().add(ow * c);
        for cb in (0..wide).step_by(32) {
            channels::<std::arch::x86_64::__m256, 4>(&taps, cb, y, epilogue);
        }
        for cb in (wide..c).step_by(8) {
            channels::<std::arch::x86_64::__m256, 1>(&taps, cb, y, epilogue);
        }
    }
}

/// [`row_avx2`] with AVX-512, `c % 16 == 0`: the same sums in the same order, but a block of 32
/// channels (a tail of 16) at a time across the whole row, so that the block's weights and the
/// window's input rows stay in L1 while the pixels move along (all channels of one pixel at a
/// time read k·k·c weights and inputs per pixel: 34 KB each at 960 channels, L1's size).
/// 3×3 and 5×5 stride 1 go column by column ([`rolling`]), the others pixel by pixel.
///
/// # Safety
/// As [`row_avx2`], with AVX-512F and `c % 16 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn row_avx512(
    g: &DwGeom,
    img: &[f32],
    w: &[f32],
    oh: usize,
    out: &mut [f32],
    epilogue: crate::conv::Epilogue,
) {
    let (c, iw_len) = (g.input.c, g.input.w);
    let (kh0, ih0, nh) = g.taps(oh, g.pad_top, g.input.h);
    let wide = c / 32 * 32;
    // As `row_avx2`: the next output row's new input row into L2.
    let next = ih0 + nh + g.stride - 1;
    if next < g.input.h {
        simd::prefetch_l2(&img[next * iw_len * c..][..iw_len * c]);
    }
    let y = out.as_mut_ptr();
    let filter = Filter {
        w: w.as_ptr(),
        flip: false,
    };
    if by_columns::<std::arch::x86_64::__m512, 2>(g, img, filter, oh, out, epilogue) {
        return;
    }
    let pixel = |ow: usize| {
        let (kw0, iw0, nw) = g.taps(ow, g.pad_left, iw_len);
        Taps {
            x: img.as_ptr().add((ih0 * iw_len + iw0) * c),
            w: w.as_ptr().add((kh0 * g.kernel + kw0) * c),
            nh,
            nw,
            x_row: iw_len * c,
            w_row: g.kernel * c,
            c,
        }
    };
    // Output columns whose 3×3 window lies wholly inside the image (its rows too): those run
    // four at a time with the window's weights held in registers.
    let full = |ow: usize| {
        let (kw0, _, nw) = g.taps(ow, g.pad_left, iw_len);
        g.kernel == 3 && kh0 == 0 && nh == 3 && kw0 == 0 && nw == 3
    };
    let first = (0..g.out_w).find(|&ow| full(ow)).unwrap_or(g.out_w);
    let end = (first..g.out_w).find(|&ow| !full(ow)).unwrap_or(g.out_w);
    let fours = first..first + (end - first) / 4 * 4;
    for cb in (0..wide).step_by(32) {
        block512::<2>(
            g.out_w,
            &pixel,
            fours.clone(),
            g.stride * c,
            cb,
            y,
            c,
            epilogue,
        );
    }
    if wide < c {
        block512::<1>(g.out_w, &pixel, fours, g.stride * c, wide, y, c, epilogue);
    }
}

/// Output row `oh` of a 3×3 or 5×5 stride-1 convolution of `img` through `filter` column by
/// column ([`rolling`]), `L`'s lanes at a time (`V3` registers of them for 3×3, one for 5×5,
/// whose 25 weight vectors fill the registers already); false, doing nothing, for other kernels
/// and strides. The backward's input gradient runs it too, on `dy` and the rotated filter. (AVX2 keeps
/// its pixel-by-pixel forward: on its 16 registers this ran no faster, 0.69–0.71 against
/// 0.63–0.69 ms on 8×14×14×960, though its backward gains.)
///
/// # Safety
/// `L`'s instructions present (the caller's target features), `c % L::N == 0`; `img` holds one
/// whole map of `g`'s input shape, `filter` `k·k·c` weights, `out` one output row, `epilogue`
/// (if any) `c` scales and shifts.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn by_columns<L: Lanes, const V3: usize>(
    g: &DwGeom,
    img: &[f32],
    filter: Filter,
    oh: usize,
    out: &mut [f32],
    epilogue: crate::conv::Epilogue,
) -> bool {
    let (c, row) = (g.input.c, g.input.w * g.input.c);
    let (img, y) = (img.as_ptr(), out.as_mut_ptr());
    match (g.stride, g.kernel) {
        (1, 3) => {
            let rows = window_rows::<3>(img, g.input.h, row, oh);
            let wide = c / (V3 * L::N) * (V3 * L::N);
            for cb in (0..wide).step_by(V3 * L::N) {
                rolling::<L, 3, V3>(rows, filter, c, g.input.w, cb, y, epilogue);
            }
            for cb in (wide..c).step_by(L::N) {
                rolling::<L, 3, 1>(rows, filter, c, g.input.w, cb, y, epilogue);
            }
            true
        }
        (1, 5) => {
            let rows = window_rows::<5>(img, g.input.h, row, oh);
            for cb in (0..c).step_by(L::N) {
                rolling::<L, 5, 1>(rows, filter, c, g.input.w, cb, y, epilogue);
            }
            true
        }
        _ => false,
    }
}

/// A K×K filter packed `[kh][kw][c]`, read as it is or rotated by 180° (`flip`: the stride-1
/// input gradient is the forward pass of the output gradient through the rotated filter).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Filter {
    w: *const f32,
    flip: bool,
}

/// The K input rows (`row` values apart from `img` on) of output row `oh`'s stride-1 SAME
/// window, `None` outside the image's `h` rows.
#[cfg(target_arch = "x86_64")]
fn window_rows<const K: usize>(
    img: *const f32,
    h: usize,
    row: usize,
    oh: usize,
) -> [Option<*const f32>; K] {
    std::array::from_fn(|dh| {
        (oh + dh)
            .checked_sub(K / 2)
            .filter(|&ih| ih < h)
            .map(|ih| img.wrapping_add(ih * row))
    })
}

/// Channels `cb..cb + N·V` of one output row of a K×K stride-1 convolution (odd K, SAME),
/// `width` pixels (`c` apart from `y` on), from the K input rows of its window (`None` outside
/// the image). The input is walked column by column: each column's K vectors are loaded once
/// and meet the filter's K columns, adding to the K output pixels they reach, so a pixel's sum
/// is complete K/2 columns after its own. Each pixel still sums its taps in the portable loop's
/// order (columns, then rows, from zero), so the results are the same bits.
///
/// # Safety
/// `L`'s instructions present (the caller's target features); each row in `rows` holds
/// `width · c` values, the filter `K·K·c`, `y` the output row, `cb + N·V <= c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rolling<L: Lanes, const K: usize, const V: usize>(
    rows: [Option<*const f32>; K],
    filter: Filter,
    c: usize,
    width: usize,
    cb: usize,
    y: *mut f32,
    epilogue: crate::conv::Epilogue,
) {
    let zero = [L::zero(); V];
    // w[dh][dw]: the weight that input row dh, column dw of a window meets.
    let mut w = [[zero; K]; K];
    for (dh, row) in w.iter_mut().enumerate() {
        for (dw, lanes) in row.iter_mut().enumerate() {
            let t = match filter.flip {
                false => dh * K + dw,
                true => K * K - 1 - (dh * K + dw),
            };
            for (v, l) in lanes.iter_mut().enumerate() {
                *l = L::load(filter.w.add(t * c + cb + L::N * v));
            }
        }
    }
    let half = K / 2;
    // sums[i]: pixel j − K/2 + i, which meets input column j through the window's column
    // K − 1 − i; sums[0] is complete after column j.
    let mut sums = [zero; K];
    for j in 0..width {
        for (dh, row) in rows.iter().enumerate() {
            let Some(row) = row else { continue };
            let xp = row.add(j * c + cb);
            for v in 0..V {
                let x = L::load(xp.add(L::N * v));
                for (i, s) in sums.iter_mut().enumerate() {
                    s[v] = s[v].add(x.mul(w[dh][K - 1 - i][v]));
                }
            }
        }
        if j >= half {
            store_lanes(sums[0], cb, y.add((j - half) * c), epilogue);
        }
        for i in 1..K {
            sums[i - 1] = sums[i];
        }
        sums[K - 1] = zero;
    }
    // The last pixels, whose windows reach past the last column.
    for (i, s) in sums.iter().take(half).enumerate() {
        if let Some(pixel) = (width + i).checked_sub(half) {
            store_lanes(*s, cb, y.add(pixel * c), epilogue);
        }
    }
}

/// Channels `cb..cb + 16V` of a whole output row (`out_w` pixels, `c` apart from `y` on):
/// the pixels `fours` (a multiple of four, full 3×3 windows `step` input values apart)
/// through [`window3`], the others one by one.
///
/// # Safety
/// As [`row_avx512`]; `pixel(ow)` describes output pixel `ow`'s taps.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block512<const V: usize>(
    out_w: usize,
    pixel: &impl Fn(usize) -> Taps,
    fours: std::ops::Range<usize>,
    step: usize,
    cb: usize,
    y: *mut f32,
    c: usize,
    epilogue: crate::conv::Epilogue,
) {
    let mut ow = 0;
    while ow < out_w {
        if ow == fours.start && !fours.is_empty() {
            window3::<V>(
                &pixel(ow),
                step,
                fours.len() / 4,
                cb,
                y.add(ow * c),
                epilogue,
            );
            ow = fours.end;
        } else {
            channels::<std::arch::x86_64::__m512, V>(&pixel(ow), cb, y.add(ow * c), epilogue);
            ow += 1;
        }
    }
}

/// [`channels`] for `4·quads` consecutive output pixels with full 3×3 windows (`taps` the
/// first one's, the next ones `step` input values on, outputs `taps.c` apart): the window's
/// weights loaded into registers once, four pixels' sums side by side (four independent
/// chains hide the adds' latency), each in [`channels`]'s order, so the same results.
///
/// # Safety
/// As [`channels`], for every one of the pixels.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn window3<const V: usize>(
    taps: &Taps,
    step: usize,
    quads: usize,
    cb: usize,
    y: *mut f32,
    epilogue: crate::conv::Epilogue,
) {
    use std::arch::x86_64::*;
    let mut w = [[_mm512_setzero_ps(); V]; 9];
    // Tap t is column t / 3, row t % 3: the portable loop's order.
    for (t, lanes) in w.iter_mut().enumerate() {
        let wp = taps.w.add((t % 3) * taps.w_row + (t / 3) * taps.c + cb);
        for (v, l) in lanes.iter_mut().enumerate() {
            *l = _mm512_loadu_ps(wp.add(16 * v));
        }
    }
    for q in 0..quads {
        let mut acc = [[_mm512_setzero_ps(); V]; 4];
        for (t, lanes) in w.iter().enumerate() {
            let tap = (t % 3) * taps.x_row + (t / 3) * taps.c + cb;
            for (p, sums) in acc.iter_mut().enumerate() {
                let xp = taps.x.add((4 * q + p) * step + tap);
                for (v, a) in sums.iter_mut().enumerate() {
                    *a =
                        _mm512_add_ps(*a, _mm512_mul_ps(_mm512_loadu_ps(xp.add(16 * v)), lanes[v]));
                }
            }
        }
        for (p, sums) in acc.into_iter().enumerate() {
            store_lanes(sums, cb, y.add((4 * q + p) * taps.c), epilogue);
        }
    }
}

/// One register of f32 lanes as the column-by-column kernels use it: AVX2's eight, AVX-512's
/// sixteen. Its methods compile into the calling kernel's vector features (each kernel is a
/// `#[target_feature]` function that inlines them).
#[cfg(target_arch = "x86_64")]
trait Lanes: Copy {
    const N: usize;
    /// # Safety
    /// The CPU must have this register's instructions (as for every method).
    unsafe fn zero() -> Self;
    /// # Safety
    /// `p` must be readable for `N` values.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` must be writable for `N` values.
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, other: Self) -> Self;
    unsafe fn mul(self, other: Self) -> Self;
    unsafe fn act(self, act: crate::act::Act) -> Self;
}

/// [`Lanes`] for a register type from its intrinsics (the two impls differ in nothing else).
macro_rules! impl_lanes {
    ($ty:ty, $n:literal, $zero:ident, $load:ident, $store:ident, $add:ident, $mul:ident, $act:path) => {
        #[cfg(target_arch = "x86_64")]
        impl Lanes for $ty {
            const N: usize = $n;
            #[inline(always)]
            unsafe fn zero() -> Self {
                std::arch::x86_64::$zero()
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                std::arch::x86_64::$load(p)
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                std::arch::x86_64::$store(p, self)
            }
            #[inline(always)]
            unsafe fn add(self, other: Self) -> Self {
                std::arch::x86_64::$add(self, other)
            }
            #[inline(always)]
            unsafe fn mul(self, other: Self) -> Self {
                std::arch::x86_64::$mul(self, other)
            }
            #[inline(always)]
            unsafe fn act(self, act: crate::act::Act) -> Self {
                $act(act, self)
            }
        }
    };
}

impl_lanes!(
    std::arch::x86_64::__m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_add_ps,
    _mm256_mul_ps,
    simd::act8
);
impl_lanes!(
    std::arch::x86_64::__m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_add_ps,
    _mm512_mul_ps,
    simd::act16
);

/// One output pixel's channels `cb..cb + N·V` from their sums: the epilogue (a multiply and an
/// add, as the portable pass applies it, then the activation), then the store.
///
/// # Safety
/// As the kernel that calls it: `y` is the output pixel, `epilogue` (if any) holds its scales
/// and shifts, `cb + N·V` within its channels.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_lanes<L: Lanes, const V: usize>(
    mut acc: [L; V],
    cb: usize,
    y: *mut f32,
    epilogue: crate::conv::Epilogue,
) {
    for (v, a) in acc.iter_mut().enumerate() {
        let at = cb + L::N * v;
        if let Some(f) = epilogue {
            let (scale, shift) = (
                L::load(f.scale.as_ptr().add(at)),
                L::load(f.shift.as_ptr().add(at)),
            );
            *a = a.mul(scale).add(shift).act(f.act);
        }
        a.store(y.add(at));
    }
}

/// One output pixel's taps: the first input pixel and weight inside the window, the window's
/// rows and columns inside the image, and the strides between rows (columns are `c` apart).
#[cfg(target_arch = "x86_64")]
struct Taps {
    x: *const f32,
    w: *const f32,
    nh: usize,
    nw: usize,
    x_row: usize,
    w_row: usize,
    c: usize,
}

/// Channels `cb..cb + N·V` of one output pixel: the sum over its taps, the epilogue, the store.
///
/// # Safety
/// As [`row_avx2`] or [`row_avx512`] (`L`'s instructions), whose pixel `taps` describes and
/// whose output pixel starts at `y`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn channels<L: Lanes, const V: usize>(
    taps: &Taps,
    cb: usize,
    y: *mut f32,
    epilogue: crate::conv::Epilogue,
) {
    let mut acc = [L::zero(); V];
    for dw in 0..taps.nw {
        let (xr, wr) = (taps.x.add(dw * taps.c + cb), taps.w.add(dw * taps.c + cb));
        for dh in 0..taps.nh {
            let (xp, wp) = (xr.add(dh * taps.x_row), wr.add(dh * taps.w_row));
            for (v, a) in acc.iter_mut().enumerate() {
                let at = L::N * v;
                *a = a.add(L::load(xp.add(at)).mul(L::load(wp.add(at))));
            }
        }
    }
    store_lanes(acc, cb, y, epilogue);
}

/// Gradients of [`forward`]: `dx` is overwritten, `dw` (packed) accumulated into.
/// `scratch` holds one packed weight gradient per image (`n · weight_len`).
pub fn backward(
    g: &DwGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    scratch: &mut [f32],
) {
    let c = g.input.c;
    let (ih_len, iw_len) = (g.input.h, g.input.w);
    let in_img = ih_len * iw_len * c;
    let out_img = g.out_h * g.out_w * c;
    let wl = g.weight_len();
    assert!(
        x.len() >= g.input.len()
            && dx.len() >= g.input.len()
            && dy.len() >= g.output().len()
            && w.len() >= wl
            && dw.len() >= wl
            && scratch.len() >= g.input.n * wl,
        "depthwise backward: operand sizes"
    );
    #[cfg(target_arch = "x86_64")]
    let columns = match simd::level() {
        _ if !matches!(g.kernel, 3 | 5) || g.stride != 1 => None,
        simd::Level::Avx512 if c.is_multiple_of(16) => Some(simd::Level::Avx512),
        simd::Level::Avx512 | simd::Level::Avx2 if c.is_multiple_of(8) => Some(simd::Level::Avx2),
        _ => None,
    };
    // One image per task: its dx region and its weight-gradient partial are private to it.
    dx.par_chunks_mut(in_img)
        .zip(scratch[..g.input.n * wl].par_chunks_mut(wl))
        .enumerate()
        .for_each(|(b, (dx_img, dw_part))| {
            #[cfg(target_arch = "x86_64")]
            if let Some(level) = columns {
                let img = &x[b * in_img..][..in_img];
                let dy_img = &dy[b * out_img..][..out_img];
                // SAFETY: the level's instructions are present (`simd::level`) and `c` a
                // multiple of its lanes; the map is 3×3 or 5×5 stride 1; `img`, `dy_img` and
                // `dx_img` are one whole image each (the output of a stride-1 SAME convolution
                // has the input's size), `w` and `dw_part` k·k·c values (asserted above).
                unsafe {
                    match level {
                        simd::Level::Avx512 => backward_avx512(g, img, w, dy_img, dx_img, dw_part),
                        _ => backward_avx2(g, img, w, dy_img, dx_img, dw_part),
                    }
                };
                return;
            }
            simd::dispatch(
                #[inline(always)]
                || {
                    dx_img.fill(0.0);
                    dw_part.fill(0.0);
                    let img = &x[b * in_img..][..in_img];
                    let dy_img = &dy[b * out_img..][..out_img];
                    for oh in 0..g.out_h {
                        let (kh0, ih0, nh) = g.taps(oh, g.pad_top, ih_len);
                        for ow in 0..g.out_w {
                            let (kw0, iw0, nw) = g.taps(ow, g.pad_left, iw_len);
                            let go = &dy_img[(oh * g.out_w + ow) * c..][..c];
                            for dh in 0..nh {
                                for dwi in 0..nw {
                                    let off = ((ih0 + dh) * iw_len + iw0 + dwi) * c;
                                    let t = ((kh0 + dh) * g.kernel + kw0 + dwi) * c;
                                    let xs = &img[off..][..c];
                                    let ws = &w[t..][..c];
                                    let gw = &mut dw_part[t..][..c];
                                    for ((gwv, xv), gov) in gw.iter_mut().zip(xs).zip(go) {
                                        *gwv += gov * xv;
                                    }
                                    let gx = &mut dx_img[off..][..c];
                                    for ((gxv, gov), wv) in gx.iter_mut().zip(go).zip(ws) {
                                        *gxv += gov * wv;
                                    }
                                }
                            }
                        }
                    }
                },
            )
        });
    for part in scratch[..g.input.n * wl].chunks(wl) {
        for (d, p) in dw.iter_mut().zip(part) {
            *d += p;
        }
    }
}

/// One image's gradients of a K×K stride-1 depthwise convolution (K = 3 or 5): `dx`
/// (overwritten) is the forward pass of `dy` through the filter rotated by 180° ([`rolling`]);
/// `dw` (overwritten) sums, per tap, `dy` times the input it met ([`filter_grad`]). `L`'s
/// lanes at a time, `V3` registers of them for 3×3 (as [`by_columns`]).
///
/// # Safety
/// `L`'s instructions must be present; `g` is K×K stride 1 with `c % L::N == 0`; `x`, `dy` and
/// `dx` hold one image each, `w` and `dw` `K·K·c` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn backward_by_columns<L: Lanes, const V3: usize>(
    g: &DwGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let (h, c) = (g.input.h, g.input.c);
    let filter = Filter {
        w: w.as_ptr(),
        flip: true,
    };
    // dy has the input's shape (stride 1, SAME), so its rows go through the forward's kernel.
    for (i, dx_row) in dx.chunks_exact_mut(g.input.w * c).take(h).enumerate() {
        by_columns::<L, V3>(g, dy, filter, i, dx_row, None);
    }
    // 3×3's channels in blocks of V3 registers, then one at a time.
    let wide = c / (V3 * L::N) * (V3 * L::N);
    if g.kernel == 3 {
        for cb in (0..wide).step_by(V3 * L::N) {
            filter_grad::<L, 3, V3>(g, x, dy, cb, dw);
        }
        for cb in (wide..c).step_by(L::N) {
            filter_grad::<L, 3, 1>(g, x, dy, cb, dw);
        }
    } else {
        for cb in (0..c).step_by(L::N) {
            filter_grad::<L, 5, 1>(g, x, dy, cb, dw);
        }
    }
}

/// [`backward_by_columns`] on AVX-512.
///
/// # Safety
/// As there, with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn backward_avx512(
    g: &DwGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    backward_by_columns::<std::arch::x86_64::__m512, 2>(g, x, w, dy, dx, dw)
}

/// [`backward_by_columns`] on AVX2.
///
/// # Safety
/// As there, with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(
    g: &DwGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    backward_by_columns::<std::arch::x86_64::__m256, 1>(g, x, w, dy, dx, dw)
}

/// Channels `cb..cb + N·V` of a K×K stride-1 filter's gradient over one image, written to `dw`
/// (`[kh][kw][c]`): each tap's sum stays in a register while the output pixels go by, row by
/// row (each tap's terms in the order of the portable loop; taps outside the image add nothing).
///
/// # Safety
/// As [`backward_by_columns`], with `cb + N·V <= c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn filter_grad<L: Lanes, const K: usize, const V: usize>(
    g: &DwGeom,
    x: &[f32],
    dy: &[f32],
    cb: usize,
    dw: &mut [f32],
) {
    let (h, width, c) = (g.input.h, g.input.w, g.input.c);
    let half = K / 2;
    let zero = [L::zero(); V];
    let mut acc = [[zero; K]; K];
    for oh in 0..h {
        let dyr = dy.as_ptr().add(oh * width * c + cb);
        for (dh, sums) in acc.iter_mut().enumerate() {
            let Some(ih) = (oh + dh).checked_sub(half).filter(|&ih| ih < h) else {
                continue;
            };
            let xr = x.as_ptr().add(ih * width * c + cb);
            for ow in 0..width {
                let inside = ow >= half && ow + half < width;
                let d: [L; V] = std::array::from_fn(|v| L::load(dyr.add(ow * c + L::N * v)));
                for (dwi, sum) in sums.iter_mut().enumerate() {
                    // Window column dwi of pixel ow is input column ow + dwi − K/2.
                    let Some(col) = (ow + dwi)
                        .checked_sub(half)
                        .filter(|&col| inside || col < width)
                    else {
                        continue;
                    };
                    let xp = xr.add(col * c);
                    for v in 0..V {
                        let xv = L::load(xp.add(L::N * v));
                        sum[v] = sum[v].add(d[v].mul(xv));
                    }
                }
            }
        }
    }
    for (dh, row) in acc.iter().enumerate() {
        for (dwi, lanes) in row.iter().enumerate() {
            for (v, l) in lanes.iter().enumerate() {
                l.store(dw.as_mut_ptr().add((dh * K + dwi) * c + cb + L::N * v));
            }
        }
    }
}
