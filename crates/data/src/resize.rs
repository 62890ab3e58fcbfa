//! Separable image resampling with antialiasing, as PIL's `Image.resize` (which torchvision's
//! transforms use): when shrinking, the filter widens by the scale factor so every source pixel
//! contributes. Works in f32 (PIL rounds to 8 bits between its two passes; we do not).

use effnet_engine::simd;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Nearest,
    Bilinear,
    /// Keys' cubic with a = −0.5, as PIL.
    Bicubic,
}

impl Interpolation {
    pub fn parse(s: &str) -> Result<Interpolation, String> {
        match s {
            "nearest" => Ok(Interpolation::Nearest),
            "bilinear" => Ok(Interpolation::Bilinear),
            "bicubic" => Ok(Interpolation::Bicubic),
            _ => Err(format!(
                "unknown interpolation {s:?}: expected nearest, bilinear or bicubic"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Interpolation::Nearest => "nearest",
            Interpolation::Bilinear => "bilinear",
            Interpolation::Bicubic => "bicubic",
        }
    }

    fn support(self) -> f64 {
        match self {
            Interpolation::Nearest => 0.5,
            Interpolation::Bilinear => 1.0,
            Interpolation::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Interpolation::Nearest => unreachable!("nearest picks one pixel"),
            Interpolation::Bilinear => (1.0 - x).max(0.0),
            Interpolation::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// For each output position along one axis: the first source index and the normalized weights.
fn taps(
    interp: Interpolation,
    in_start: f64,
    in_len: f64,
    in_size: usize,
    out_size: usize,
) -> Vec<(usize, Vec<f32>)> {
    let scale = in_len / out_size as f64;
    (0..out_size)
        .map(|o| {
            let center = in_start + (o as f64 + 0.5) * scale;
            if interp == Interpolation::Nearest {
                let i = (center.floor() as usize).min(in_size - 1);
                return (i, vec![1.0]);
            }
            let filter_scale = scale.max(1.0);
            let support = interp.support() * filter_scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(in_size);
            let w: Vec<f64> = (lo..hi)
                .map(|i| interp.weight((i as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = w.iter().sum();
            (lo, w.iter().map(|v| (v / total) as f32).collect())
        })
        .collect()
}

/// Resamples the box `[x0, x0 + box_w) × [y0, y0 + box_h)` of an `[h, w, c]` image (8-bit or
/// f32 samples) to `[out_h, out_w, c]` f32 (PIL's `resize(size, box=...)`).
#[allow(clippy::too_many_arguments)]
pub fn resize_box<T: Copy + Into<f32> + Sync>(
    src: &[T],
    (w, h, c): (usize, usize, usize),
    region: (f64, f64, f64, f64),
    out_size: (usize, usize),
    interp: Interpolation,
) -> Vec<f32> {
    resize_window(src, (w, h, c), (0, 0), (w, h), region, out_size, interp)
}

/// The source pixels `(x, y, width, height)` that [`resize_box`] reads to resample `region` of
/// a `full_w × full_h` image to `out_w × out_h`: the box widened by the filter's reach (PIL
/// reads pixels outside the box, up to the image's edges).
pub fn footprint(
    (full_w, full_h): (usize, usize),
    (x0, y0, box_w, box_h): (f64, f64, f64, f64),
    (out_w, out_h): (usize, usize),
    interp: Interpolation,
) -> (usize, usize, usize, usize) {
    let span = |t: Vec<(usize, Vec<f32>)>| {
        t.iter().fold((usize::MAX, 0), |(lo, hi), (s, k)| {
            (lo.min(*s), hi.max(s + k.len()))
        })
    };
    let (xl, xh) = span(taps(interp, x0, box_w, full_w, out_w));
    let (yl, yh) = span(taps(interp, y0, box_h, full_h, out_h));
    (xl, yl, xh.saturating_sub(xl), yh.saturating_sub(yl))
}

/// [`resize_box`] of a `full_w × full_h` image of which only the `w × h` window at `origin`
/// is in `src`; the window must cover the [`footprint`]. The result equals resizing the whole
/// image bit for bit (the filter taps are computed in whole-image coordinates).
#[allow(clippy::too_many_arguments)]
pub fn resize_window<T: Copy + Into<f32> + Sync>(
    src: &[T],
    (w, h, c): (usize, usize, usize),
    (ox, oy): (usize, usize),
    (full_w, full_h): (usize, usize),
    (x0, y0, box_w, box_h): (f64, f64, f64, f64),
    (out_w, out_h): (usize, usize),
    interp: Interpolation,
) -> Vec<f32> {
    let shift = |t: Vec<(usize, Vec<f32>)>, origin: usize, len: usize| -> Vec<(usize, Vec<f32>)> {
        t.into_iter()
            .map(|(s, k)| {
                assert!(
                    s >= origin && s + k.len() <= origin + len,
                    "the window does not cover the resize's footprint"
                );
                (s - origin, k)
            })
            .collect()
    };
    let xt = shift(taps(interp, x0, box_w, full_w, out_w), ox, w);
    let yt = shift(taps(interp, y0, box_h, full_h, out_h), oy, h);
    // Rows the vertical pass needs.
    let (row_lo, row_hi) = yt
        .iter()
        .fold((h, 0), |(lo, hi), (s, k)| (lo.min(*s), hi.max(s + k.len())));
    let mut tmp = vec![0f32; (row_hi - row_lo) * out_w * c];
    tmp.par_chunks_mut(out_w * c)
        .enumerate()
        .for_each(|(r, out_row)| {
            simd::dispatch(
                #[inline(always)]
                || horizontal(&src[(row_lo + r) * w * c..][..w * c], &xt, c, out_row),
            )
        });
    let mut out = vec![0f32; out_h * out_w * c];
    out.par_chunks_mut(out_w * c)
        .zip(&yt)
        .for_each(|(out_row, (start, k))| {
            simd::dispatch(
                #[inline(always)]
                || {
                    for (j, wt) in k.iter().enumerate() {
                        let row = &tmp[(start + j - row_lo) * out_w * c..][..out_w * c];
                        for (o, v) in out_row.iter_mut().zip(row) {
                            *o += wt * v;
                        }
                    }
                },
            )
        });
    out
}

/// One row of the horizontal pass: output pixel `o` sums the source pixels its taps cover.
#[inline(always)]
fn horizontal<T: Copy + Into<f32>>(
    row: &[T],
    xt: &[(usize, Vec<f32>)],
    c: usize,
    out_row: &mut [f32],
) {
    if c == 3 {
        // RGB, the common case: three accumulators in registers.
        for (o, (start, k)) in out_row.chunks_exact_mut(3).zip(xt) {
            let mut acc = [0f32; 3];
            for (px, wt) in row[start * 3..(start + k.len()) * 3].chunks_exact(3).zip(k) {
                acc[0] += wt * px[0].into();
                acc[1] += wt * px[1].into();
                acc[2] += wt * px[2].into();
            }
            o.copy_from_slice(&acc);
        }
        return;
    }
    for (o, (start, k)) in out_row.chunks_exact_mut(c).zip(xt) {
        o.fill(0.0);
        for (j, wt) in k.iter().enumerate() {
            for (ch, v) in o.iter_mut().enumerate() {
                *v += wt * row[(start + j) * c + ch].into();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant_and_weights_sum_to_one() {
        let src = vec![7.0f32; 13 * 9 * 3];
        for interp in [
            Interpolation::Nearest,
            Interpolation::Bilinear,
            Interpolation::Bicubic,
        ] {
            for (ow, oh) in [(4, 5), (20, 30), (13, 9)] {
                let out = resize_box(&src, (13, 9, 3), (0.0, 0.0, 13.0, 9.0), (ow, oh), interp);
                assert!(
                    out.iter().all(|v| (v - 7.0).abs() < 1e-4),
                    "{interp:?} {ow}x{oh}"
                );
            }
        }
    }

    #[test]
    fn identity_size_is_exact_and_halving_averages() {
        let src: Vec<f32> = (0..8 * 6).map(|i| i as f32).collect();
        for interp in [
            Interpolation::Nearest,
            Interpolation::Bilinear,
            Interpolation::Bicubic,
        ] {
            let out = resize_box(&src, (8, 6, 1), (0.0, 0.0, 8.0, 6.0), (8, 6), interp);
            assert_eq!(out, src, "{interp:?}");
        }
        // Bilinear 2× down with antialiasing: each output averages a 4-wide triangle (1,3,3,1)/8.
        let row: Vec<f32> = vec![0.0, 8.0, 0.0, 8.0, 0.0, 8.0, 0.0, 8.0];
        let out = resize_box(
            &row,
            (8, 1, 1),
            (0.0, 0.0, 8.0, 1.0),
            (4, 1),
            Interpolation::Bilinear,
        );
        // Interior outputs: (1·8 + 3·0 + 3·8 + 1·0)/8 = 4.
        assert!(
            (out[1] - 4.0).abs() < 1e-5 && (out[2] - 4.0).abs() < 1e-5,
            "{out:?}"
        );
    }
}
