//! The train transform's geometry, as the reference's `preprocess_for_train`: a random crop drawn
//! like TF's `sample_distorted_bounding_box`, a random horizontal flip, and a bilinear resize of
//! the crop to the stage's `size × size` (aspect ratio not preserved).
//!
//! The crop sampler follows TF's semantics (not its random stream): per attempt, an aspect ratio
//! uniform in the range, then a height uniform over the integers that keep the area in range
//! (rounded as TF rounds, `lrintf`), the width from the aspect ratio, then an offset uniform in
//! `[0, dim − side)` (TF's quirk: a crop narrower than the image never touches its right or
//! bottom edge). After `max_attempts` failures it falls back to the whole image.
//!
//! `min_object_covered`: the reference passes the whole-image box, so the fraction of that box a
//! crop covers is exactly the crop's area fraction. We keep TF's check literally, so with the
//! reference's `min_object_covered = 0.1` and `area_range = [0.05, 1]`, a draw with area fraction
//! in `[0.05, 0.1)` is rejected and costs an attempt: the effective area range is `[0.1, 1]`.
//!
//! The resize is `resize_box`'s antialiased bilinear; the reference's `tf.compat.v1.image.resize`
//! is TF's legacy bilinear (no antialiasing, no half-pixel centers), which aliases when it shrinks.

use effnet_engine::rng::Rng;
use effnet_engine::simd;

use crate::decode::{decode_rgb_window, RgbImage, Window};
use crate::resize::{footprint, resize_window, Interpolation};

/// `sample_distorted_bounding_box`'s parameters, relative to the image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropSampler {
    /// Crop area as a fraction of the image area, `[min, max]`.
    pub area_range: (f64, f64),
    /// Crop width / height, `[min, max]`.
    pub aspect_range: (f64, f64),
    /// Least fraction of the whole-image box the crop must cover (see the module notes).
    pub min_object_covered: f64,
    pub max_attempts: usize,
}

impl Default for CropSampler {
    /// The reference's values.
    fn default() -> Self {
        CropSampler {
            area_range: (0.05, 1.0),
            aspect_range: (0.75, 1.33),
            min_object_covered: 0.1,
            max_attempts: 100,
        }
    }
}

/// Round half to even, as C's `lrintf` in the default rounding mode.
fn lrint(v: f64) -> i64 {
    v.round_ties_even() as i64
}

impl CropSampler {
    /// A crop `(x, y, width, height)` of a `w × h` image, or `None` when every attempt failed.
    pub fn try_sample(
        &self,
        w: usize,
        h: usize,
        rng: &mut Rng,
    ) -> Option<(usize, usize, usize, usize)> {
        let (amin, amax) = self.area_range;
        let (rmin, rmax) = self.aspect_range;
        if w == 0 || h == 0 || amax <= 0.0 || amin > amax || rmin <= 0.0 || rmin > rmax {
            return None;
        }
        for _ in 0..self.max_attempts {
            let aspect = rng.uniform_in(rmin, rmax);
            if let Some(crop) = self.random_crop(w, h, aspect, rng) {
                let covered = (crop.2 * crop.3) as f64 / (w * h) as f64;
                if covered >= self.min_object_covered {
                    return Some(crop);
                }
            }
        }
        None
    }

    /// One attempt at a fixed aspect ratio (TF's `GenerateRandomCrop`).
    fn random_crop(
        &self,
        w: usize,
        h: usize,
        aspect: f64,
        rng: &mut Rng,
    ) -> Option<(usize, usize, usize, usize)> {
        let (wi, hi) = (w as i64, h as i64);
        let min_area = self.area_range.0 * (w * h) as f64;
        let max_area = self.area_range.1 * (w * h) as f64;
        let mut height = lrint((min_area / aspect).sqrt());
        let mut max_height = lrint((max_area / aspect).sqrt());
        if lrint(max_height as f64 * aspect) > wi {
            // The tallest height whose rounded width still fits.
            max_height = ((wi as f64 + 0.5 - 1e-7) / aspect) as i64;
            if lrint(max_height as f64 * aspect) > wi {
                max_height -= 1;
            }
        }
        max_height = max_height.min(hi);
        height = height.min(max_height);
        if height < max_height {
            height += rng.below((max_height - height + 1) as usize) as i64;
        }
        let mut width = lrint(height as f64 * aspect);
        let mut area = (width * height) as f64;
        // Nudge once each way for rounding, as TF does, before giving up.
        if area < min_area {
            height += 1;
            width = lrint(height as f64 * aspect);
            area = (width * height) as f64;
        }
        if area > max_area {
            height -= 1;
            width = lrint(height as f64 * aspect);
            area = (width * height) as f64;
        }
        if area < min_area
            || area > max_area
            || width > wi
            || height > hi
            || width <= 0
            || height <= 0
        {
            return None;
        }
        let (width, height) = (width as usize, height as usize);
        let y = if height < h { rng.below(h - height) } else { 0 };
        let x = if width < w { rng.below(w - width) } else { 0 };
        Some((x, y, width, height))
    }

    /// A crop `(x, y, width, height)`, the whole image when no attempt succeeded.
    pub fn sample(&self, w: usize, h: usize, rng: &mut Rng) -> (usize, usize, usize, usize) {
        self.try_sample(w, h, rng).unwrap_or((0, 0, w, h))
    }
}

/// The reference's crop `(x, y, width, height)` of a `w × h` image.
pub fn sample_crop(w: usize, h: usize, rng: &mut Rng) -> (usize, usize, usize, usize) {
    CropSampler::default().sample(w, h, rng)
}

/// One draw of the train geometry: the crop and whether to mirror it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeometryDraw {
    pub crop: (usize, usize, usize, usize),
    pub flip: bool,
}

/// The train transform's geometry at one stage's image size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainGeometry {
    pub size: usize,
    pub sampler: CropSampler,
    /// Probability of a horizontal flip (the reference: 0.5).
    pub flip_prob: f64,
}

impl TrainGeometry {
    /// The reference's sampler and flip at `size × size`.
    pub fn new(size: usize) -> Self {
        TrainGeometry {
            size,
            sampler: CropSampler::default(),
            flip_prob: 0.5,
        }
    }

    /// Draws the crop, then the flip, in that order (as the reference).
    pub fn draw(&self, w: usize, h: usize, rng: &mut Rng) -> GeometryDraw {
        let crop = self.sampler.sample(w, h, rng);
        let flip = rng.bernoulli(self.flip_prob);
        GeometryDraw { crop, flip }
    }

    /// The cropped, flipped, resized image as `[size, size, 3]` floats in [0, 255].
    pub fn render(&self, img: &RgbImage, draw: GeometryDraw) -> Vec<f32> {
        self.render_part(img, (0, 0), (img.width, img.height), draw)
    }

    /// The source pixels `(x, y, width, height)` that rendering `draw` on a `w × h` image
    /// reads: the crop and the resize filter's reach around it.
    pub fn footprint(
        &self,
        draw: GeometryDraw,
        w: usize,
        h: usize,
    ) -> (usize, usize, usize, usize) {
        let (x, y, cw, ch) = draw.crop;
        footprint(
            (w, h),
            (x as f64, y as f64, cw as f64, ch as f64),
            (self.size, self.size),
            Interpolation::Bilinear,
        )
    }

    /// [`render`](Self::render) from a window of the image that covers the draw's
    /// [`footprint`](Self::footprint); equal to rendering from the whole image.
    pub fn render_window(&self, window: &Window, draw: GeometryDraw) -> Vec<f32> {
        self.render_part(
            &window.image,
            (window.x, window.y),
            (window.full_width, window.full_height),
            draw,
        )
    }

    fn render_part(
        &self,
        img: &RgbImage,
        origin: (usize, usize),
        full: (usize, usize),
        draw: GeometryDraw,
    ) -> Vec<f32> {
        let s = self.size;
        let (x, y, cw, ch) = draw.crop;
        let mut out = resize_window(
            &img.pixels,
            (img.width, img.height, 3),
            origin,
            full,
            (x as f64, y as f64, cw as f64, ch as f64),
            (s, s),
            Interpolation::Bilinear,
        );
        if draw.flip {
            // The resize is mirror-symmetric, so flipping its output equals resizing the
            // flipped crop (the reference's order), on s² rather than crop-sized pixels.
            for row in out.chunks_exact_mut(s * 3) {
                for i in 0..s / 2 {
                    for c in 0..3 {
                        row.swap(i * 3 + c, (s - 1 - i) * 3 + c);
                    }
                }
            }
        }
        out
    }

    /// Draw and render: `[size, size, 3]` floats in [0, 255] (the input when no augmenter runs).
    pub fn apply_f32(&self, img: &RgbImage, rng: &mut Rng) -> Vec<f32> {
        let draw = self.draw(img.width, img.height, rng);
        self.render(img, draw)
    }

    /// Draw and render as 8-bit, ready for the augmenter (the reference clips to [0, 255] and
    /// casts to uint8, which truncates, before augmenting).
    pub fn apply(&self, img: &RgbImage, rng: &mut Rng) -> RgbImage {
        to_u8(&self.apply_f32(img, rng), self.size, self.size)
    }

    /// [`apply`](Self::apply) to an encoded image, decoding only what the draw reads (the
    /// reference's decode-and-crop): the draw comes from the header's size, with the same
    /// random draws as `apply` on the decoded image.
    pub fn apply_encoded(&self, bytes: Vec<u8>, rng: &mut Rng) -> Result<RgbImage, String> {
        let (draw, window) = decode_rgb_window(bytes, |w, h| {
            let draw = self.draw(w, h, rng);
            (draw, self.footprint(draw, w, h))
        })?;
        Ok(to_u8(
            &self.render_window(&window, draw),
            self.size,
            self.size,
        ))
    }
}

/// `[h, w, 3]` floats to 8-bit: clipped to [0, 255] and truncated, as TF's `cast`.
pub fn to_u8(pixels: &[f32], width: usize, height: usize) -> RgbImage {
    RgbImage {
        width,
        height,
        pixels: simd::dispatch(
            #[inline(always)]
            || pixels.iter().map(|&v| truncate_to_u8(v)).collect(),
        ),
    }
}

/// `v` clipped to [0, 255] and truncated, as the reference's cast to uint8: floor, then the
/// integer read from the low mantissa bits of `t + 2²³` (vectorizes; a float-to-int cast with
/// Rust's saturation does not).
#[inline(always)]
fn truncate_to_u8(v: f32) -> u8 {
    const TWO_POW_23: f32 = 8_388_608.0;
    (v.clamp(0.0, 255.0).floor() + TWO_POW_23).to_bits() as u8
}

/// The reference's train geometry at `size × size`, as 8-bit (see [`TrainGeometry::apply`]).
pub fn train_image(img: &RgbImage, size: usize, rng: &mut Rng) -> RgbImage {
    TrainGeometry::new(size).apply(img, rng)
}

/// Pad-and-crop translation (the CIFAR/Fashion-MNIST staple, torchvision's `RandomCrop(size,
/// padding)`; not in the reference): the image padded by `pad` black pixels on every side and
/// cropped back to its size at an offset uniform in `[0, 2·pad]` each way, i.e. the content shifted
/// by `dx, dy` uniform in `[−pad, pad]` (x drawn first). It moves without zooming, which small
/// images need: a random-resized crop of a 28-pixel image rescales it.
pub fn pad_and_crop(img: &mut RgbImage, pad: usize, rng: &mut Rng) {
    if pad == 0 {
        return;
    }
    let dx = rng.below(2 * pad + 1) as i64 - pad as i64;
    let dy = rng.below(2 * pad + 1) as i64 - pad as i64;
    shift(img, dx, dy);
}

/// Moves the content `dx` pixels right and `dy` down; uncovered pixels are black.
pub fn shift(img: &mut RgbImage, dx: i64, dy: i64) {
    let (w, h) = (img.width as i64, img.height as i64);
    let mut out = vec![0u8; img.pixels.len()];
    // Columns that stay inside: destination x in [x0, x1).
    let (x0, x1) = (dx.clamp(0, w), (w + dx).clamp(0, w));
    for y in 0..h {
        let sy = y - dy;
        if !(0..h).contains(&sy) || x0 >= x1 {
            continue;
        }
        let dst = ((y * w + x0) * 3) as usize..((y * w + x1) * 3) as usize;
        let src = ((sy * w + x0 - dx) * 3) as usize..((sy * w + x1 - dx) * 3) as usize;
        out[dst].copy_from_slice(&img.pixels[src]);
    }
    img.pixels = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn truncation_to_u8_matches_a_clipped_cast() {
        let values: Vec<f32> = (-4000..70000).map(|i| i as f32 * 0.00371 - 2.0).collect();
        let img = to_u8(&values, values.len() / 3, 1);
        for (v, got) in values.iter().zip(&img.pixels) {
            assert_eq!(*got, v.clamp(0.0, 255.0) as u8, "{v}");
        }
    }

    #[test]
    fn crops_stay_in_range() {
        let s = CropSampler::default();
        let mut rng = Rng::new(1);
        let (w, h) = (640, 480);
        let (mut fallbacks, mut min_frac, mut max_frac) = (0, 1.0f64, 0.0f64);
        let n = 20_000;
        for _ in 0..n {
            match s.try_sample(w, h, &mut rng) {
                None => fallbacks += 1,
                Some((x, y, cw, ch)) => {
                    assert!(x + cw <= w && y + ch <= h && cw > 0 && ch > 0);
                    let frac = (cw * ch) as f64 / (w * h) as f64;
                    // min_object_covered = 0.1 on the whole-image box lifts the floor to 0.1.
                    assert!((0.1..=1.0).contains(&frac), "area fraction {frac}");
                    let aspect = cw as f64 / ch as f64;
                    // Rounding the width to whole pixels moves the aspect by < 1/height.
                    let tol = 1.0 / ch as f64;
                    assert!(
                        aspect >= 0.75 - tol && aspect <= 1.33 + tol,
                        "aspect {aspect} ({cw}×{ch})"
                    );
                    // TF's offsets exclude the far edge unless the crop spans the image.
                    assert!(cw == w || x + cw < w);
                    assert!(ch == h || y + ch < h);
                    min_frac = min_frac.min(frac);
                    max_frac = max_frac.max(frac);
                }
            }
        }
        // Most attempts succeed on an ordinary photo, and the draws span the range.
        assert!(fallbacks < n / 100, "{fallbacks} fallbacks");
        assert!(min_frac < 0.12 && max_frac > 0.9, "{min_frac}..{max_frac}");
    }

    #[test]
    fn falls_back_to_the_whole_image_when_no_crop_fits() {
        // A 1000×10 strip: an aspect-limited crop is at most ~13×10, 1.3% of the area.
        let mut rng = Rng::new(2);
        for _ in 0..100 {
            assert_eq!(sample_crop(1000, 10, &mut rng), (0, 0, 1000, 10));
            assert_eq!(sample_crop(10, 1000, &mut rng), (0, 0, 10, 1000));
        }
        assert_eq!(sample_crop(1, 1, &mut rng), (0, 0, 1, 1));
    }

    #[test]
    fn same_seed_same_crops() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let g = TrainGeometry::new(64);
        for _ in 0..200 {
            assert_eq!(g.draw(500, 375, &mut a), g.draw(500, 375, &mut b));
        }
        let draws: Vec<_> = (0..20).map(|_| g.draw(500, 375, &mut a)).collect();
        assert!(draws.windows(2).any(|d| d[0] != d[1]));
    }

    fn mirror(img: &RgbImage) -> RgbImage {
        let mut out = img.clone();
        for (dst, src) in out
            .pixels
            .chunks_exact_mut(img.width * 3)
            .zip(img.pixels.chunks_exact(img.width * 3))
        {
            for x in 0..img.width {
                dst[x * 3..x * 3 + 3].copy_from_slice(&src[(img.width - 1 - x) * 3..][..3]);
            }
        }
        out
    }

    #[test]
    fn shift_moves_every_pixel_and_blackens_the_rest() {
        let w = 7usize;
        let h = 5usize;
        let src = RgbImage {
            width: w,
            height: h,
            pixels: (0..w * h * 3).map(|i| (i % 251) as u8 + 1).collect(),
        };
        for (dx, dy) in [(0i64, 0i64), (2, -1), (-3, 4), (7, 0), (-1, -5), (1, 1)] {
            let mut img = src.clone();
            shift(&mut img, dx, dy);
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let (sx, sy) = (x - dx, y - dy);
                    for c in 0..3 {
                        let want = if (0..w as i64).contains(&sx) && (0..h as i64).contains(&sy) {
                            src.pixels[((sy * w as i64 + sx) * 3 + c) as usize]
                        } else {
                            0
                        };
                        let got = img.pixels[((y * w as i64 + x) * 3 + c) as usize];
                        assert_eq!(got, want, "shift ({dx}, {dy}) at ({x}, {y}) channel {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn pad_and_crop_draws_every_offset_within_the_pad() {
        let mut rng = Rng::new(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..400 {
            // One lit pixel in the middle of a 9×9 image: where it lands is the offset.
            let mut img = RgbImage {
                width: 9,
                height: 9,
                pixels: vec![0; 9 * 9 * 3],
            };
            img.pixels[(4 * 9 + 4) * 3] = 255;
            pad_and_crop(&mut img, 2, &mut rng);
            let at = img.pixels.iter().position(|&v| v == 255).unwrap() / 3;
            let (dx, dy) = (at as i64 % 9 - 4, at as i64 / 9 - 4);
            assert!(dx.abs() <= 2 && dy.abs() <= 2, "offset ({dx}, {dy})");
            seen.insert((dx, dy));
        }
        assert_eq!(seen.len(), 25, "all 5×5 offsets drawn: {seen:?}");
    }

    #[test]
    fn flip_mirrors_the_crop_of_a_real_photo() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/tests/fixtures/photos/orange.jpg");
        let img = load_photo(&path);
        let g = TrainGeometry::new(96);
        let mut rng = Rng::new(11);
        let mut flips = 0;
        let n = 400;
        for _ in 0..n {
            flips += g.draw(img.width, img.height, &mut rng).flip as usize;
        }
        assert!((150..250).contains(&flips), "{flips} flips of {n}");

        // A flipped render equals the unflipped render of the mirrored photo's mirrored crop.
        let (x, y, cw, ch) = sample_crop(img.width, img.height, &mut rng);
        let flipped = g.render(
            &img,
            GeometryDraw {
                crop: (x, y, cw, ch),
                flip: true,
            },
        );
        let plain = g.render(
            &img,
            GeometryDraw {
                crop: (x, y, cw, ch),
                flip: false,
            },
        );
        let mirrored = g.render(
            &mirror(&img),
            GeometryDraw {
                crop: (img.width - x - cw, y, cw, ch),
                flip: false,
            },
        );
        let max_diff = flipped
            .iter()
            .zip(&mirrored)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-2, "max diff {max_diff}");
        assert_ne!(flipped, plain, "the photo is not left-right symmetric");
        assert!(flipped.iter().all(|v| (0.0..=255.0).contains(v)));

        let out = train_image(&img, 96, &mut Rng::new(3));
        assert_eq!(
            (out.width, out.height, out.pixels.len()),
            (96, 96, 96 * 96 * 3)
        );
        assert_eq!(out, train_image(&img, 96, &mut Rng::new(3)));
    }

    fn load_photo(path: &Path) -> RgbImage {
        crate::decode::load_rgb(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn cast_truncates_and_clips() {
        let img = to_u8(&[-3.0, 0.9, 254.99, 300.0, 12.5, 7.0], 2, 1);
        assert_eq!(img.pixels, vec![0, 0, 254, 255, 12, 7]);
    }
}
