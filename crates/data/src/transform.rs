//! The eval transform: resize, center crop, normalize, into an NHWC f32 image.

use effnet_engine::simd;

use crate::decode::{decode_rgb, decode_rgb_window, RgbImage};
use crate::resize::{footprint, resize_box, resize_window, Interpolation};

/// An image for the eval transform: decoded pixels, or a file's encoded bytes, which are decoded
/// here — only the part the crop reads, when the crop is known from the size alone (the
/// reference's center crop) and the file is a baseline JPEG.
pub enum Image {
    Pixels(RgbImage),
    Encoded(Vec<u8>),
}

/// How the square input is cut from an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Crop {
    /// timm: resize the short side to `size / crop_pct`, then take the center `size × size`.
    Fraction(f32),
    /// The TF reference: take the center square of side `size/(size+32)` of the short side,
    /// then resize it to `size × size`.
    Reference,
    /// Resize the whole image to `size × size`, ignoring its aspect ratio.
    Squash,
}

impl Crop {
    /// `pct:0.875`, `reference` or `squash`.
    pub fn parse(s: &str) -> Result<Crop, String> {
        match s {
            "reference" => Ok(Crop::Reference),
            "squash" | "none" => Ok(Crop::Squash),
            _ => {
                let pct = s.strip_prefix("pct:").unwrap_or(s);
                match pct.parse::<f32>() {
                    Ok(p) if p > 0.0 && p <= 1.0 => Ok(Crop::Fraction(p)),
                    _ => Err(format!(
                        "unknown crop {s:?}: expected pct:F (0 < F ≤ 1), reference or squash"
                    )),
                }
            }
        }
    }

    pub fn describe(self) -> String {
        match self {
            Crop::Fraction(p) => format!("pct:{p}"),
            Crop::Reference => "reference".into(),
            Crop::Squash => "squash".into(),
        }
    }
}

/// Normalization presets, as (mean, std) on 0–1 pixel values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// `imagenet` (ImageNet mean/std), `inception` (x/127.5 − 1: timm's V2 and Lite weights),
    /// `keras` (x/128 − 1), `lite` ((x − 127)/128: the TF Lite weights), or `m1,m2,m3/s1,s2,s3`.
    pub fn parse(s: &str) -> Result<Normalize, String> {
        let n = |mean: [f32; 3], std: [f32; 3]| Ok(Normalize { mean, std });
        match s {
            "imagenet" => n([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            "inception" => n([0.5; 3], [0.5; 3]),
            "keras" => n([128.0 / 255.0; 3], [128.0 / 255.0; 3]),
            "lite" => n([127.0 / 255.0; 3], [128.0 / 255.0; 3]),
            _ => {
                let bad = || {
                    format!("unknown normalization {s:?}: expected imagenet, inception, keras, lite or m1,m2,m3/s1,s2,s3")
                };
                let (m, sd) = s.split_once('/').ok_or_else(bad)?;
                let three = |t: &str| -> Result<[f32; 3], String> {
                    let v: Vec<f32> = t
                        .split(',')
                        .map(|x| x.trim().parse().map_err(|_| bad()))
                        .collect::<Result<_, _>>()?;
                    v.try_into().map_err(|_| bad())
                };
                let (mean, std) = (three(m)?, three(sd)?);
                if std.iter().any(|&v| v.is_nan() || v <= 0.0) {
                    return Err(format!(
                        "normalization {s:?}: each standard deviation must be above 0"
                    ));
                }
                n(mean, std)
            }
        }
    }

    /// `(p/255 − mean)/std` for each channel of RGB samples in [0, 255] (8-bit or f32), into
    /// `out` (the same length), as `p·scale + shift`.
    pub fn apply<T: Copy + Into<f32>>(&self, pixels: &[T], out: &mut [f32]) {
        // Eight pixels' worth of per-channel factors, so the loop runs on whole vectors.
        const LANES: usize = 24;
        let scale: [f32; LANES] = std::array::from_fn(|i| 1.0 / (255.0 * self.std[i % 3]));
        let shift: [f32; LANES] = std::array::from_fn(|i| -self.mean[i % 3] / self.std[i % 3]);
        simd::dispatch(
            #[inline(always)]
            || {
                for (o, px) in out.chunks_mut(LANES).zip(pixels.chunks(LANES)) {
                    for (((o, p), a), b) in o.iter_mut().zip(px).zip(&scale).zip(&shift) {
                        *o = (*p).into() * a + b;
                    }
                }
            },
        )
    }

    /// [`Normalize::apply`] into a new buffer.
    pub fn to_vec<T: Copy + Into<f32>>(&self, pixels: &[T]) -> Vec<f32> {
        let mut out = vec![0f32; pixels.len()];
        self.apply(pixels, &mut out);
        out
    }
}

/// The full eval transform to a `size × size` input.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    pub size: usize,
    pub interpolation: Interpolation,
    pub crop: Crop,
    pub normalize: Normalize,
}

impl Transform {
    pub fn describe(&self) -> String {
        let f = |v: [f32; 3]| {
            v.iter()
                .map(|x| format!("{x:.4}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "{}×{}, {}, crop {}, mean {} std {}",
            self.size,
            self.size,
            self.interpolation.name(),
            self.crop.describe(),
            f(self.normalize.mean),
            f(self.normalize.std)
        )
    }

    /// Loads and transforms `items` in parallel into `batch` (`[n, size, size, 3]`, replacing its
    /// contents); returns, per item in order, `Ok(its row in batch)` or why it could not be loaded.
    pub fn batch<T: Sync>(
        &self,
        items: &[T],
        load: impl Fn(&T) -> Result<Image, String> + Sync,
        batch: &mut Vec<f32>,
    ) -> Vec<Result<usize, String>> {
        use rayon::prelude::*;
        let per = self.size * self.size * 3;
        let images: Vec<Result<Vec<f32>, String>> = items
            .par_iter()
            .map(|item| {
                let mut out = vec![0f32; per];
                self.apply_image(load(item)?, &mut out)?;
                Ok(out)
            })
            .collect();
        batch.clear();
        let mut rows = 0;
        images
            .into_iter()
            .map(|r| {
                r.map(|v| {
                    batch.extend_from_slice(&v);
                    rows += 1;
                    rows - 1
                })
            })
            .collect()
    }

    /// [`Transform::apply`] to decoded pixels or encoded bytes. With the reference's crop, a
    /// baseline JPEG is decoded only over the resize's footprint in the crop (bit-identical to
    /// decoding it whole); other crops need the whole image anyway.
    pub fn apply_image(&self, img: Image, out: &mut [f32]) -> Result<(), String> {
        let bytes = match img {
            Image::Pixels(p) => {
                self.apply(&p, out);
                return Ok(());
            }
            Image::Encoded(bytes) => bytes,
        };
        if self.crop != Crop::Reference {
            self.apply(&decode_rgb(bytes)?, out);
            return Ok(());
        }
        let (s, interp) = (self.size, self.interpolation);
        let (area, window) = decode_rgb_window(bytes, |w, h| {
            let area = reference_crop(s, w, h);
            (area, footprint((w, h), area, (s, s), interp))
        })?;
        let img = &window.image;
        let pixels = resize_window(
            &img.pixels,
            (img.width, img.height, 3),
            (window.x, window.y),
            (window.full_width, window.full_height),
            area,
            (s, s),
            interp,
        );
        self.normalize.apply(&pixels, out);
        Ok(())
    }

    /// Writes the image as a normalized `[size, size, 3]` tensor into `out`.
    pub fn apply(&self, img: &RgbImage, out: &mut [f32]) {
        let s = self.size;
        let (w, h) = (img.width, img.height);
        let src = &img.pixels;
        let pixels = match self.crop {
            Crop::Squash => resize_box(
                src,
                (w, h, 3),
                (0.0, 0.0, w as f64, h as f64),
                (s, s),
                self.interpolation,
            ),
            Crop::Reference => resize_box(
                src,
                (w, h, 3),
                reference_crop(s, w, h),
                (s, s),
                self.interpolation,
            ),
            Crop::Fraction(pct) => {
                // torchvision: Resize(int(size / crop_pct)) on the short side, then CenterCrop(size).
                let scale_size = (s as f64 / pct as f64).floor() as usize;
                let (rw, rh) = if w <= h {
                    (
                        scale_size,
                        (scale_size as f64 * h as f64 / w as f64) as usize,
                    )
                } else {
                    (
                        (scale_size as f64 * w as f64 / h as f64) as usize,
                        scale_size,
                    )
                };
                let resized = resize_box(
                    src,
                    (w, h, 3),
                    (0.0, 0.0, w as f64, h as f64),
                    (rw, rh),
                    self.interpolation,
                );
                let top = ((rh as f64 - s as f64) / 2.0).round().max(0.0) as usize;
                let left = ((rw as f64 - s as f64) / 2.0).round().max(0.0) as usize;
                let mut cropped = vec![0f32; s * s * 3];
                for (y, row) in cropped.chunks_exact_mut(s * 3).enumerate() {
                    if top + y < rh {
                        let from = ((top + y) * rw + left) * 3;
                        let n = (s * 3).min((rw - left) * 3);
                        row[..n].copy_from_slice(&resized[from..from + n]);
                    }
                }
                cropped
            }
        };
        self.normalize.apply(&pixels, out);
    }
}

/// The reference's eval crop of a `w × h` image for `size`: the center square of side
/// int(size/(size+32) · short side), offset ((dim − crop) + 1) // 2, as (x, y, width, height).
fn reference_crop(size: usize, w: usize, h: usize) -> (f64, f64, f64, f64) {
    let crop = ((size as f64 / (size as f64 + 32.0)) * w.min(h) as f64) as usize;
    let crop = crop.max(1);
    let (top, left) = ((h - crop).div_ceil(2), (w - crop).div_ceil(2));
    (left as f64, top as f64, crop as f64, crop as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_presets() {
        assert_eq!(Crop::parse("pct:0.875").unwrap(), Crop::Fraction(0.875));
        assert_eq!(Crop::parse("reference").unwrap(), Crop::Reference);
        assert!(Crop::parse("pct:1.5").is_err());
        let lite = Normalize::parse("lite").unwrap();
        assert!(((255.0 / 255.0 - lite.mean[0]) / lite.std[0] - 128.0 / 128.0).abs() < 1e-6);
        let custom = Normalize::parse("0.1,0.2,0.3/1,2,3").unwrap();
        assert_eq!(custom.std, [1.0, 2.0, 3.0]);
        assert!(Normalize::parse("0.1,0.2/1,2,3").is_err());
        assert!(Normalize::parse("0,0,0/1,0,1").is_err());
    }

    #[test]
    fn crops_the_center_of_the_short_side() {
        // A 20×10 image, left half black and right half white, with a red column at the center.
        let (w, h) = (20, 10);
        let mut pixels = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 10..w {
                pixels[(y * w + x) * 3..][..3].copy_from_slice(&[255, 255, 255]);
            }
        }
        let img = RgbImage {
            width: w,
            height: h,
            pixels,
        };
        let t = Transform {
            size: 10,
            interpolation: Interpolation::Nearest,
            crop: Crop::Fraction(1.0),
            normalize: Normalize::parse("0,0,0/1,1,1").unwrap(),
        };
        let mut out = vec![0f32; 10 * 10 * 3];
        t.apply(&img, &mut out);
        // The center crop covers x = 5..15: black on the left half, white on the right.
        assert_eq!(out[0], 0.0);
        assert_eq!(out[9 * 3], 1.0);
        assert_eq!(out[(9 * 10 + 4) * 3], 0.0);
        assert_eq!(out[(9 * 10 + 5) * 3], 1.0);
    }
}
