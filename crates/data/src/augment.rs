//! RandAugment and AutoAugment (policy `v0`) on 8-bit RGB images, with the semantics of the
//! TensorFlow Model Garden `augment.py` that NVIDIA's EfficientNetV2 `dataloader/augment.py`
//! descends from (reference notes §2.3).
//!
//! # How each op was checked against TensorFlow's definition
//!
//! The TF sources were read through the code-search tool (NVIDIA DeepLearningExamples
//! `TensorFlow2/Classification/ConvNets/dataloader/augment.py` and tensorflow/models
//! `official/vision/ops/augment.py`, identical for these ops and for `policy_v0`; tensorflow `image_ops_impl.py` for `rgb_to_grayscale` and
//! `convert_image_dtype`; `core/kernels/image/image_ops.h` for the projective-transform kernel;
//! `core/kernels/cwise_ops.h` for the shift ops) and each op below re-derives their arithmetic,
//! in `f32` where TF computes in `float32`. The tests run every op on a real photo
//! (`orange.jpg`, `chelsea.png` from the CLI fixtures) against an independent, direct
//! computation of that definition:
//!
//! | op | TF definition followed | test |
//! |---|---|---|
//! | AutoContrast | per channel `p·s − lo·s`, `s = 255/(hi−lo)` in f32, clip, truncate; unchanged if `hi = lo` | min → 0, max → 255, f64 formula within 1 |
//! | Equalize | PIL's: `step = (n − count(max value)) // 255`, LUT `(cumsum + step//2) // step` shifted by one, clipped; unchanged if `step = 0` | direct "count below v" LUT; output CDF near-uniform |
//! | Invert | `255 − p` | every pixel |
//! | Rotate | `ImageProjectiveTransformV2`, nearest (round half away from zero), out-of-image → 128 (the wrap/unwrap trick) | ±90°, 180° as index rotations; 45° against the exact inverse map, fill 128 in the corners |
//! | Posterize | `(p >> s) << s`, `s = 8 − bits` clamped to `[0, 7]` like TF's shift kernels (so 0 bits keeps the top bit) | `p & 0xF0` at 4 bits, `p & 0x80` at 0 |
//! | Solarize | `p < t ? p : 255 − p` (t may exceed 255: no-op) | every pixel, t = 128, 0, 384 |
//! | SolarizeAdd | `p < 128 ? clip(p + a) : p` | every pixel |
//! | Color | `blend(gray, img, f)`, gray = TF `rgb_to_grayscale` (weights 0.2989/0.587/0.114 on p/255, then ×255.5, truncate) | f = 0 gives gray (f64 formula within 1), f = 1 identity |
//! | Contrast | `blend(m, img, f)` with TF's bug: `m = min(255, pixel count / 256)`, truncated | orange (512²): m = 255; chelsea: m = 132; f = 0.5 exact |
//! | Brightness | `blend(0, img, f)` | 1 identity, 0 black, 0.5 → `p >> 1` |
//! | Sharpness | `blend(smooth, img, f)`, smooth = VALID 3×3 `[[1,1,1],[1,5,1],[1,1,1]]/13`, clip, truncate, borders kept | 1 identity; 0 against the exact integer kernel sum |
//! | ShearX/Y | transform `[1, l, 0, 0, 1, 0]` / `[1, 0, 0, l, 1, 0]`, nearest, fill 128 | every pixel against the affine formula in f64 |
//! | TranslateX/Y | output `(x, y)` reads input `(x + k, y)` / `(x, y + k)`, fill 128 | shifted pixels equal, fill 128, fractional k rounds |
//! | Cutout | rows `[max(0, cy−pad), min(h, cy+pad))` × same for columns, gray 128; `cy ~ U{0..h−1}`, `cx ~ U{0..w−1}` | exactly one square, clipped at the borders |
//!
//! `blend(a, b, f)` is TF's: `f = 0` → `a`, `f = 1` → `b`, else `a + f·(b − a)` in f32, clipped to
//! [0, 255] when extrapolating, then truncated (TF's float→uint8 cast), not rounded.
//!
//! Level → argument (`_MAX_LEVEL = 10`, levels above 10 allowed) is [`level_to_arg`]; rotate,
//! shear and translate get a random sign in [`apply_op`]. Exact bit-for-bit agreement with TF is
//! not guaranteed where TF's float summation order is unknown (sharpness's convolution, the
//! grayscale sum, `cosf`/`sinf`): those can differ by one grey level on values that fall exactly
//! on a truncation boundary.

use effnet_engine::rng::Rng;
use effnet_engine::simd;

use crate::decode::RgbImage;

/// `_MAX_LEVEL` of augment.py: the level at which each op reaches its nominal maximum.
pub const MAX_LEVEL: f64 = 10.0;

/// The grey that geometric ops put where the source falls outside the image, and cutout's fill.
pub const FILL: u8 = 128;

/// SolarizeAdd's fixed threshold.
pub const SOLARIZE_ADD_THRESHOLD: i32 = 128;

/// The 16 ops, in the order of RandAugment's `available_ops` (the index drawn selects one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Cutout,
    SolarizeAdd,
}

impl Op {
    /// RandAugment's op list, in augment.py's order.
    pub const ALL: [Op; 16] = [
        Op::AutoContrast,
        Op::Equalize,
        Op::Invert,
        Op::Rotate,
        Op::Posterize,
        Op::Solarize,
        Op::Color,
        Op::Contrast,
        Op::Brightness,
        Op::Sharpness,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateX,
        Op::TranslateY,
        Op::Cutout,
        Op::SolarizeAdd,
    ];
}

/// An op's argument as augment.py's `level_to_arg` gives it. Rotate, shear and translate are
/// the magnitudes before the random sign.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    None,
    Degrees(f32),
    Shear(f32),
    Pixels(f32),
    /// Enhance factor for Color, Contrast, Brightness, Sharpness: `(level/10)·1.8 + 0.1`.
    Factor(f32),
    Bits(i32),
    Threshold(i32),
    Addition(i32),
    /// Cutout half-side.
    Pad(usize),
}

/// augment.py's level → argument mapping. Arithmetic is in f64 as in Python; `int(...)` truncates.
pub fn level_to_arg(op: Op, level: f32, translate_const: f32, cutout_const: f32) -> Arg {
    let frac = f64::from(level) / MAX_LEVEL;
    // Python's int(): truncation toward zero (`as` also saturates instead of overflowing).
    let int_of = |mult: f64| (frac * mult) as i32;
    match op {
        Op::AutoContrast | Op::Equalize | Op::Invert => Arg::None,
        Op::Rotate => Arg::Degrees((frac * 30.0) as f32),
        Op::ShearX | Op::ShearY => Arg::Shear((frac * 0.3) as f32),
        Op::TranslateX | Op::TranslateY => Arg::Pixels((frac * f64::from(translate_const)) as f32),
        Op::Color | Op::Contrast | Op::Brightness | Op::Sharpness => {
            Arg::Factor((frac * 1.8 + 0.1) as f32)
        }
        Op::Posterize => Arg::Bits(int_of(4.0)),
        Op::Solarize => Arg::Threshold(int_of(256.0)),
        Op::SolarizeAdd => Arg::Addition(int_of(110.0)),
        Op::Cutout => Arg::Pad(int_of(f64::from(cutout_const)).max(0) as usize),
    }
}

/// `_randomly_negate_tensor`: keeps the sign with probability ½.
fn random_sign(v: f32, rng: &mut Rng) -> f32 {
    if rng.bernoulli(0.5) {
        -v
    } else {
        v
    }
}

/// Applies `op` at `level` (always: the caller decides whether to). Draws the sign of rotate,
/// shear and translate, and cutout's center, from `rng`.
pub fn apply_op(
    img: &mut RgbImage,
    op: Op,
    level: f32,
    translate_const: f32,
    cutout_const: f32,
    rng: &mut Rng,
) {
    match (op, level_to_arg(op, level, translate_const, cutout_const)) {
        (Op::AutoContrast, _) => autocontrast(img),
        (Op::Equalize, _) => equalize(img),
        (Op::Invert, _) => invert(img),
        (Op::Rotate, Arg::Degrees(d)) => rotate(img, random_sign(d, rng)),
        (Op::Posterize, Arg::Bits(b)) => posterize(img, b),
        (Op::Solarize, Arg::Threshold(t)) => solarize(img, t),
        (Op::Color, Arg::Factor(f)) => color(img, f),
        (Op::Contrast, Arg::Factor(f)) => contrast(img, f),
        (Op::Brightness, Arg::Factor(f)) => brightness(img, f),
        (Op::Sharpness, Arg::Factor(f)) => sharpness(img, f),
        (Op::ShearX, Arg::Shear(s)) => shear_x(img, random_sign(s, rng)),
        (Op::ShearY, Arg::Shear(s)) => shear_y(img, random_sign(s, rng)),
        (Op::TranslateX, Arg::Pixels(p)) => translate_x(img, random_sign(p, rng)),
        (Op::TranslateY, Arg::Pixels(p)) => translate_y(img, random_sign(p, rng)),
        (Op::Cutout, Arg::Pad(p)) => cutout(img, p, rng),
        (Op::SolarizeAdd, Arg::Addition(a)) => solarize_add(img, a, SOLARIZE_ADD_THRESHOLD),
        // level_to_arg pairs every op with its own argument kind.
        _ => unreachable!("level_to_arg returned a mismatched argument"),
    }
}

/// RandAugment as augment.py: per layer one of the 16 ops or, with probability 1/17, nothing
/// (the `switch_case` default). The op's drawn probability is unused there, so the op is always
/// applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandAugment {
    pub num_layers: usize,
    pub magnitude: f32,
    pub translate_const: f32,
    pub cutout_const: f32,
}

impl Default for RandAugment {
    /// augment.py's defaults: N = 2, M = 10, translate 100 px, cutout 40 px.
    fn default() -> Self {
        RandAugment {
            num_layers: 2,
            magnitude: 10.0,
            translate_const: 100.0,
            cutout_const: 40.0,
        }
    }
}

impl RandAugment {
    /// One layer's draw: `U{0..16}`, where 16 (`None`) is the identity.
    pub fn choose_op(rng: &mut Rng) -> Option<Op> {
        Op::ALL.get(rng.below(Op::ALL.len() + 1)).copied()
    }

    pub fn apply(&self, img: &mut RgbImage, rng: &mut Rng) {
        for _ in 0..self.num_layers {
            if let Some(op) = Self::choose_op(rng) {
                apply_op(
                    img,
                    op,
                    self.magnitude,
                    self.translate_const,
                    self.cutout_const,
                    rng,
                );
            }
        }
    }
}

/// augment.py's `policy_v0` (the AutoAugment paper's ImageNet policy): 25 sub-policies of two
/// `(op, probability, level)` steps.
pub const POLICY_V0: [[(Op, f64, u8); 2]; 25] = [
    [(Op::Equalize, 0.8, 1), (Op::ShearY, 0.8, 4)],
    [(Op::Color, 0.4, 9), (Op::Equalize, 0.6, 3)],
    [(Op::Color, 0.4, 1), (Op::Rotate, 0.6, 8)],
    [(Op::Solarize, 0.8, 3), (Op::Equalize, 0.4, 7)],
    [(Op::Solarize, 0.4, 2), (Op::Solarize, 0.6, 2)],
    [(Op::Color, 0.2, 0), (Op::Equalize, 0.8, 8)],
    [(Op::Equalize, 0.4, 8), (Op::SolarizeAdd, 0.8, 3)],
    [(Op::ShearX, 0.2, 9), (Op::Rotate, 0.6, 8)],
    [(Op::Color, 0.6, 1), (Op::Equalize, 1.0, 2)],
    [(Op::Invert, 0.4, 9), (Op::Rotate, 0.6, 0)],
    [(Op::Equalize, 1.0, 9), (Op::ShearY, 0.6, 3)],
    [(Op::Color, 0.4, 7), (Op::Equalize, 0.6, 0)],
    [(Op::Posterize, 0.4, 6), (Op::AutoContrast, 0.4, 7)],
    [(Op::Solarize, 0.6, 8), (Op::Color, 0.6, 9)],
    [(Op::Solarize, 0.2, 4), (Op::Rotate, 0.8, 9)],
    [(Op::Rotate, 1.0, 7), (Op::TranslateY, 0.8, 9)],
    [(Op::ShearX, 0.0, 0), (Op::Solarize, 0.8, 4)],
    [(Op::ShearY, 0.8, 0), (Op::Color, 0.6, 4)],
    [(Op::Color, 1.0, 0), (Op::Rotate, 0.6, 2)],
    [(Op::Equalize, 0.8, 4), (Op::Equalize, 0.0, 8)],
    [(Op::Equalize, 1.0, 4), (Op::AutoContrast, 0.6, 2)],
    [(Op::ShearY, 0.4, 7), (Op::SolarizeAdd, 0.6, 7)],
    [(Op::Posterize, 0.8, 2), (Op::Solarize, 0.6, 10)],
    [(Op::Solarize, 0.6, 8), (Op::Equalize, 0.6, 1)],
    [(Op::Color, 0.8, 6), (Op::Rotate, 0.4, 5)],
];

/// AutoAugment with policy `v0`: one sub-policy chosen uniformly, each of its steps applied
/// with its probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoAugment {
    pub translate_const: f32,
    pub cutout_const: f32,
}

impl Default for AutoAugment {
    /// augment.py's AutoAugment defaults: translate 250 px, cutout 100 px.
    fn default() -> Self {
        AutoAugment {
            translate_const: 250.0,
            cutout_const: 100.0,
        }
    }
}

impl AutoAugment {
    pub fn apply(&self, img: &mut RgbImage, rng: &mut Rng) {
        let sub_policy = &POLICY_V0[rng.below(POLICY_V0.len())];
        for &(op, prob, level) in sub_policy {
            // TF applies when floor(U + prob) is 1, i.e. with probability prob.
            if rng.bernoulli(prob) {
                apply_op(
                    img,
                    op,
                    f32::from(level),
                    self.translate_const,
                    self.cutout_const,
                    rng,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pixel ops.

/// TF's `blend(image1 = a, image2 = b, factor)`: interpolation truncates; extrapolation clips
/// first. The float→uint8 cast truncates, it does not round.
#[inline]
fn blend_px(a: u8, b: u8, factor: f32) -> u8 {
    if factor == 0.0 {
        return a;
    }
    if factor == 1.0 {
        return b;
    }
    let (a, b) = (f32::from(a), f32::from(b));
    let temp = a + factor * (b - a);
    // `as u8` truncates and saturates; the clip is explicit for the extrapolation case.
    temp.clamp(0.0, 255.0) as u8
}

/// Blend against a constant degenerate value, as a lookup table over the 256 inputs.
fn blend_constant(img: &mut RgbImage, degenerate: u8, factor: f32) {
    let mut lut = [0u8; 256];
    for (p, v) in lut.iter_mut().enumerate() {
        *v = blend_px(degenerate, p as u8, factor);
    }
    apply_lut(img, &lut);
}

fn apply_lut(img: &mut RgbImage, lut: &[u8; 256]) {
    for p in &mut img.pixels {
        *p = lut[usize::from(*p)];
    }
}

/// `255 − p`.
pub fn invert(img: &mut RgbImage) {
    for p in &mut img.pixels {
        *p = 255 - *p;
    }
}

/// Keeps the top `bits` bits. The shift `8 − bits` is clamped to [0, 7] as TF's shift kernels
/// do, so `bits ≤ 0` keeps the top bit and `bits ≥ 8` is the identity.
pub fn posterize(img: &mut RgbImage, bits: i32) {
    let shift = (8 - i64::from(bits)).clamp(0, 7) as u32;
    let mask = (0xFFu8 >> shift) << shift;
    for p in &mut img.pixels {
        *p &= mask;
    }
}

/// `p < threshold ? p : 255 − p`. A threshold above 255 leaves the image unchanged.
pub fn solarize(img: &mut RgbImage, threshold: i32) {
    for p in &mut img.pixels {
        if i32::from(*p) >= threshold {
            *p = 255 - *p;
        }
    }
}

/// `p < threshold ? clip(p + addition, 0, 255) : p`.
pub fn solarize_add(img: &mut RgbImage, addition: i32, threshold: i32) {
    for p in &mut img.pixels {
        let v = i32::from(*p);
        if v < threshold {
            *p = (v.saturating_add(addition)).clamp(0, 255) as u8;
        }
    }
}

/// Per channel: stretches [lo, hi] to [0, 255] (f32 `p·s + (−lo·s)`, clip, truncate); a
/// constant channel is left as is.
pub fn autocontrast(img: &mut RgbImage) {
    for c in 0..3 {
        let (mut lo, mut hi) = (u8::MAX, u8::MIN);
        for px in img.pixels.chunks_exact(3) {
            lo = lo.min(px[c]);
            hi = hi.max(px[c]);
        }
        if hi <= lo {
            continue;
        }
        let (lo, hi) = (f32::from(lo), f32::from(hi));
        let scale = 255.0 / (hi - lo);
        let offset = -lo * scale;
        let mut lut = [0u8; 256];
        for (p, v) in lut.iter_mut().enumerate() {
            *v = (p as f32 * scale + offset).clamp(0.0, 255.0) as u8;
        }
        for px in img.pixels.chunks_exact_mut(3) {
            px[c] = lut[usize::from(px[c])];
        }
    }
}

/// PIL's equalize as TF reimplements it, per channel: `step = (n − count(largest value)) // 255`;
/// the LUT maps `v` to `(count(< v) + step // 2) // step`, clipped; `step = 0` leaves the channel.
pub fn equalize(img: &mut RgbImage) {
    for c in 0..3 {
        let mut hist = [0u64; 256];
        for px in img.pixels.chunks_exact(3) {
            hist[usize::from(px[c])] += 1;
        }
        let total: u64 = hist.iter().sum();
        let last = hist.iter().rev().find(|&&n| n != 0).copied().unwrap_or(0);
        let step = (total - last) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut below = 0u64;
        for (v, slot) in lut.iter_mut().enumerate() {
            *slot = ((below + step / 2) / step).min(255) as u8;
            below += hist[v];
        }
        for px in img.pixels.chunks_exact_mut(3) {
            px[c] = lut[usize::from(px[c])];
        }
    }
}

/// TF's `rgb_to_grayscale` on uint8: `p/255` (f32), weights 0.2989/0.587/0.114, sum, `×255.5`,
/// truncate (`convert_image_dtype`).
#[inline]
fn tf_gray(r: u8, g: u8, b: u8) -> u8 {
    let inv = (1.0f64 / 255.0) as f32;
    let (r, g, b) = (f32::from(r) * inv, f32::from(g) * inv, f32::from(b) * inv);
    let sum = r * 0.2989 + g * 0.587 + b * 0.114;
    (sum * 255.5) as u8
}

/// `blend(grayscale(img), img, factor)`: 0 gives the grayscale image, 1 the image.
pub fn color(img: &mut RgbImage, factor: f32) {
    for px in img.pixels.chunks_exact_mut(3) {
        let gray = tf_gray(px[0], px[1], px[2]);
        for v in px {
            *v = blend_px(gray, *v, factor);
        }
    }
}

/// TF's contrast, bug included: the "mean" it blends towards is the grayscale histogram's sum
/// over 256, i.e. `min(255, pixel count / 256)` truncated, not the mean intensity.
pub fn contrast(img: &mut RgbImage, factor: f32) {
    let count = (img.width * img.height) as f32;
    let degenerate = (count / 256.0).clamp(0.0, 255.0) as u8;
    blend_constant(img, degenerate, factor);
}

/// `blend(black, img, factor)`.
pub fn brightness(img: &mut RgbImage, factor: f32) {
    blend_constant(img, 0, factor);
}

/// `blend(smooth(img), img, factor)`, smooth = the 3×3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13 over
/// the interior (VALID), clipped and truncated; the one-pixel border keeps the original.
pub fn sharpness(img: &mut RgbImage, factor: f32) {
    let (w, h) = (img.width, img.height);
    if w < 3 || h < 3 || factor == 1.0 {
        // No interior: the degenerate image is the image itself, and so is the blend.
        return;
    }
    let src = img.pixels.clone();
    let (k1, k5) = (1.0f32 / 13.0, 5.0f32 / 13.0);
    let stride = w * 3;
    for y in 1..h - 1 {
        let rows = [
            &src[(y - 1) * stride..y * stride],
            &src[y * stride..(y + 1) * stride],
            &src[(y + 1) * stride..(y + 2) * stride],
        ];
        let out = &mut img.pixels[y * stride..(y + 1) * stride];
        for i in 3..stride - 3 {
            // Row-major accumulation, the order a direct convolution uses.
            let mut acc = 0.0f32;
            for (ky, row) in rows.iter().enumerate() {
                for kx in 0..3 {
                    let k = if ky == 1 && kx == 1 { k5 } else { k1 };
                    acc += f32::from(row[i + kx * 3 - 3]) * k;
                }
            }
            let smooth = acc.clamp(0.0, 255.0) as u8;
            out[i] = blend_px(smooth, rows[1][i], factor);
        }
    }
}

/// Nearest-neighbour resampling as TF's projective-transform kernel with constant fill: output
/// `(x, y)` reads input `(round(t0·x + t1·y + t2), round(t3·x + t4·y + t5))` (f32, rounding half
/// away from zero); outside the image it gets [`FILL`], which is what augment.py's wrap/unwrap
/// produces.
fn resample(img: &mut RgbImage, t: [f32; 6]) {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return;
    }
    let (wf, hf) = (w as f32, h as f32);
    let mut out = vec![FILL; img.pixels.len()];
    simd::dispatch(
        #[inline(always)]
        || {
            for (y, row) in out.chunks_exact_mut(w * 3).enumerate() {
                let fy = y as f32;
                for (x, px) in row.chunks_exact_mut(3).enumerate() {
                    let fx = x as f32;
                    let ix = round_half_away(t[0] * fx + t[1] * fy + t[2]);
                    let iy = round_half_away(t[3] * fx + t[4] * fy + t[5]);
                    // Written so NaN fails the test and fills.
                    if ix >= 0.0 && ix < wf && iy >= 0.0 && iy < hf {
                        let s = (iy as usize * w + ix as usize) * 3;
                        px.copy_from_slice(&img.pixels[s..s + 3]);
                    }
                }
            }
        },
    );
    img.pixels = out;
}

/// `x.round()` (half away from zero) from `trunc`, which compiles to one instruction where
/// `round` is a library call; `x − trunc(x)` is exact.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// Rotation about the image center by `degrees` (TF's `rotate`: positive turns the content
/// counter-clockwise on screen), nearest, fill 128.
pub fn rotate(img: &mut RgbImage, degrees: f32) {
    let radians = degrees * (std::f64::consts::PI / 180.0) as f32;
    let (cos, sin) = (radians.cos(), radians.sin());
    let (w1, h1) = (img.width as f32 - 1.0, img.height as f32 - 1.0);
    let x_offset = (w1 - (cos * w1 - sin * h1)) / 2.0;
    let y_offset = (h1 - (sin * w1 + cos * h1)) / 2.0;
    resample(img, [cos, -sin, x_offset, sin, cos, y_offset]);
}

/// Output `(x, y)` reads input `(x + level·y, y)`; fill 128.
pub fn shear_x(img: &mut RgbImage, level: f32) {
    resample(img, [1.0, level, 0.0, 0.0, 1.0, 0.0]);
}

/// Output `(x, y)` reads input `(x, level·x + y)`; fill 128.
pub fn shear_y(img: &mut RgbImage, level: f32) {
    resample(img, [1.0, 0.0, 0.0, level, 1.0, 0.0]);
}

/// Output `(x, y)` reads input `(x + pixels, y)` (positive moves the content left); fill 128.
pub fn translate_x(img: &mut RgbImage, pixels: f32) {
    resample(img, [1.0, 0.0, pixels, 0.0, 1.0, 0.0]);
}

/// Output `(x, y)` reads input `(x, y + pixels)` (positive moves the content up); fill 128.
pub fn translate_y(img: &mut RgbImage, pixels: f32) {
    resample(img, [1.0, 0.0, 0.0, 0.0, 1.0, pixels]);
}

/// Cutout with the center drawn as augment.py does: row `U{0..h−1}` first, then column.
pub fn cutout(img: &mut RgbImage, pad: usize, rng: &mut Rng) {
    let cy = rng.below(img.height);
    let cx = rng.below(img.width);
    cutout_at(img, cy, cx, pad);
}

/// Fills rows `[cy − pad, cy + pad)` × columns `[cx − pad, cx + pad)`, clipped to the image,
/// with grey 128.
pub fn cutout_at(img: &mut RgbImage, cy: usize, cx: usize, pad: usize) {
    let (w, h) = (img.width, img.height);
    let (y0, y1) = (cy.saturating_sub(pad), cy.saturating_add(pad).min(h));
    let (x0, x1) = (cx.saturating_sub(pad), cx.saturating_add(pad).min(w));
    if x0 >= x1 {
        return;
    }
    for y in y0..y1 {
        img.pixels[(y * w + x0) * 3..(y * w + x1) * 3].fill(FILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::load_rgb;
    use std::path::Path;

    #[test]
    fn rounding_half_away_matches_round() {
        for i in -200_000..200_000 {
            let x = i as f32 * 0.0125; // exact halves included
            assert_eq!(round_half_away(x), x.round(), "{x}");
        }
        for x in [0.49999997f32, -0.49999997, 8_388_607.5, -2.5, f32::MAX] {
            assert_eq!(round_half_away(x), x.round(), "{x}");
        }
    }

    fn photo(name: &str) -> RgbImage {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../cli/tests/fixtures/photos")
            .join(name);
        load_rgb(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn orange() -> RgbImage {
        photo("orange.jpg")
    }

    fn chelsea() -> RgbImage {
        photo("chelsea.png")
    }

    fn px(img: &RgbImage, x: usize, y: usize) -> [u8; 3] {
        let i = (y * img.width + x) * 3;
        [img.pixels[i], img.pixels[i + 1], img.pixels[i + 2]]
    }

    /// Every pixel of `out` against `expected(x, y)`, where `None` means "either value is fine"
    /// (a source coordinate on a rounding tie).
    fn check_map(
        out: &RgbImage,
        src: &RgbImage,
        mut source: impl FnMut(f64, f64) -> (f64, f64),
    ) -> usize {
        let mut checked = 0;
        for y in 0..out.height {
            for x in 0..out.width {
                let (sx, sy) = source(x as f64, y as f64);
                let near_tie = |v: f64| (v - v.floor() - 0.5).abs() < 1e-3;
                if near_tie(sx) || near_tie(sy) {
                    continue;
                }
                let (rx, ry) = (sx.round(), sy.round());
                let inside =
                    rx >= 0.0 && ry >= 0.0 && rx < src.width as f64 && ry < src.height as f64;
                let want = if inside {
                    px(src, rx as usize, ry as usize)
                } else {
                    [FILL; 3]
                };
                assert_eq!(px(out, x, y), want, "pixel ({x}, {y}) from ({sx}, {sy})");
                checked += 1;
            }
        }
        checked
    }

    #[test]
    fn invert_is_255_minus_p() {
        let src = orange();
        let mut img = src.clone();
        invert(&mut img);
        for (o, s) in img.pixels.iter().zip(&src.pixels) {
            assert_eq!(*o, 255 - *s);
        }
    }

    #[test]
    fn posterize_keeps_the_top_bits() {
        let src = orange();
        for (bits, mask) in [
            (4, 0xF0u8),
            (2, 0xC0),
            (6, 0xFC),
            (1, 0x80),
            (0, 0x80),
            (8, 0xFF),
        ] {
            let mut img = src.clone();
            posterize(&mut img, bits);
            for (o, s) in img.pixels.iter().zip(&src.pixels) {
                assert_eq!(*o, *s & mask, "bits {bits}");
            }
        }
        let mut img = src.clone();
        posterize(&mut img, 9);
        assert_eq!(img, src);
    }

    #[test]
    fn solarize_inverts_at_and_above_the_threshold() {
        let src = orange();
        for t in [128, 0, 200] {
            let mut img = src.clone();
            solarize(&mut img, t);
            for (o, s) in img.pixels.iter().zip(&src.pixels) {
                let want = if i32::from(*s) < t { *s } else { 255 - *s };
                assert_eq!(*o, want, "threshold {t}");
            }
        }
        // M = 15 gives 384: nothing reaches it.
        let mut img = src.clone();
        solarize(&mut img, 384);
        assert_eq!(img, src);
    }

    #[test]
    fn solarize_add_adds_below_128_and_clips() {
        let src = orange();
        for a in [55, 110, 165, -30] {
            let mut img = src.clone();
            solarize_add(&mut img, a, 128);
            for (o, s) in img.pixels.iter().zip(&src.pixels) {
                let want = if *s < 128 {
                    (i32::from(*s) + a).clamp(0, 255) as u8
                } else {
                    *s
                };
                assert_eq!(*o, want, "addition {a}");
            }
        }
    }

    #[test]
    fn autocontrast_stretches_each_channel_to_0_255() {
        for src in [orange(), chelsea()] {
            let mut img = src.clone();
            autocontrast(&mut img);
            for c in 0..3 {
                fn channel(im: &RgbImage, c: usize) -> impl Iterator<Item = u8> + '_ {
                    im.pixels.iter().skip(c).step_by(3).copied()
                }
                let ch = |im| channel(im, c);
                let (lo, hi) = (ch(&src).min().unwrap(), ch(&src).max().unwrap());
                assert!(hi > lo, "the photo's channel {c} is not constant");
                assert_eq!(ch(&img).min(), Some(0), "channel {c}");
                assert_eq!(ch(&img).max(), Some(255), "channel {c}");
                for (o, s) in ch(&img).zip(ch(&src)) {
                    let exact = (f64::from(s) - f64::from(lo)) * 255.0 / f64::from(hi - lo);
                    assert!((f64::from(o) - exact.floor()).abs() <= 1.0, "{s} → {o}");
                }
            }
        }
    }

    /// PIL's equalize written directly: the LUT from counts of smaller values.
    fn equalize_reference(src: &RgbImage) -> RgbImage {
        let mut out = src.clone();
        for c in 0..3 {
            let values: Vec<u8> = src.pixels.iter().skip(c).step_by(3).copied().collect();
            let n = values.len() as u64;
            let max = *values.iter().max().unwrap();
            let at_max = values.iter().filter(|&&v| v == max).count() as u64;
            let step = (n - at_max) / 255;
            if step == 0 {
                continue;
            }
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let lut: Vec<u8> = (0..=255u8)
                .map(|v| {
                    let below = sorted.partition_point(|&s| s < v) as u64;
                    ((below + step / 2) / step).min(255) as u8
                })
                .collect();
            for p in out.pixels.iter_mut().skip(c).step_by(3) {
                *p = lut[usize::from(*p)];
            }
        }
        out
    }

    #[test]
    fn equalize_matches_the_direct_lut_and_flattens_the_histogram() {
        for src in [orange(), chelsea()] {
            let mut img = src.clone();
            equalize(&mut img);
            assert_eq!(img, equalize_reference(&src));
            for c in 0..3 {
                let mut hist = [0usize; 256];
                for p in img.pixels.iter().skip(c).step_by(3) {
                    hist[usize::from(*p)] += 1;
                }
                let n = (img.width * img.height) as f64;
                let biggest_bin = *hist.iter().max().unwrap() as f64 / n;
                // The output CDF follows the diagonal up to the one-bin jumps it cannot split.
                let mut cdf = 0.0;
                for (v, &count) in hist.iter().enumerate() {
                    cdf += count as f64 / n;
                    let uniform = (v + 1) as f64 / 256.0;
                    assert!(
                        (cdf - uniform).abs() <= biggest_bin + 0.02,
                        "channel {c} value {v}: CDF {cdf} vs {uniform}"
                    );
                }
            }
        }
    }

    #[test]
    fn rotate_by_quarter_turns_is_an_index_rotation() {
        let src = orange();
        let n = src.width;
        assert_eq!(src.height, n, "orange.jpg is square");
        let mut img = src.clone();
        rotate(&mut img, 0.0);
        assert_eq!(img, src);
        // Output (x, y, n) → the input pixel it must equal.
        type Source = fn(usize, usize, usize) -> (usize, usize);
        let cases: [(f32, Source); 3] = [
            // Output (x, y) takes input (n−1−y, x): the top-right corner goes to the top left.
            (90.0, |x, y, n| (n - 1 - y, x)),
            (-90.0, |x, y, n| (y, n - 1 - x)),
            (180.0, |x, y, n| (n - 1 - x, n - 1 - y)),
        ];
        for (deg, from) in cases {
            let mut img = src.clone();
            rotate(&mut img, deg);
            for y in 0..n {
                for x in 0..n {
                    let (sx, sy) = from(x, y, n);
                    assert_eq!(px(&img, x, y), px(&src, sx, sy), "{deg}° at ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn rotate_45_follows_the_inverse_map_and_fills_the_corners() {
        let src = orange();
        let mut img = src.clone();
        rotate(&mut img, 45.0);
        let (c, s) = (45f64.to_radians().cos(), 45f64.to_radians().sin());
        let (cx, cy) = ((src.width - 1) as f64 / 2.0, (src.height - 1) as f64 / 2.0);
        let checked = check_map(&img, &src, |x, y| {
            (
                c * (x - cx) - s * (y - cy) + cx,
                s * (x - cx) + c * (y - cy) + cy,
            )
        });
        assert!(checked > src.width * src.height * 99 / 100);
        for (x, y) in [(0, 0), (511, 0), (0, 511), (511, 511), (40, 40)] {
            assert_eq!(px(&img, x, y), [FILL; 3], "corner ({x}, {y})");
        }
    }

    #[test]
    fn translate_shifts_the_pixels_and_fills_with_128() {
        let src = chelsea();
        let (w, h) = (src.width, src.height);
        for k in [37i64, -50, 150, 0] {
            let mut img = src.clone();
            translate_x(&mut img, k as f32);
            for y in 0..h {
                for x in 0..w {
                    let sx = x as i64 + k;
                    let want = if (0..w as i64).contains(&sx) {
                        px(&src, sx as usize, y)
                    } else {
                        [FILL; 3]
                    };
                    assert_eq!(px(&img, x, y), want, "x by {k} at ({x}, {y})");
                }
            }
            let mut img = src.clone();
            translate_y(&mut img, k as f32);
            for y in 0..h {
                for x in 0..w {
                    let sy = y as i64 + k;
                    let want = if (0..h as i64).contains(&sy) {
                        px(&src, x, sy as usize)
                    } else {
                        [FILL; 3]
                    };
                    assert_eq!(px(&img, x, y), want, "y by {k} at ({x}, {y})");
                }
            }
        }
        // A fractional shift (e.g. M = 8.333 · 100 / 10) rounds to the nearest pixel.
        let mut a = src.clone();
        translate_x(&mut a, 83.3333);
        let mut b = src.clone();
        translate_x(&mut b, 83.0);
        assert_eq!(a, b);
    }

    #[test]
    fn shear_follows_the_affine_formula() {
        let src = orange();
        for level in [0.3f32, -0.3, 0.45, -0.15] {
            let l = f64::from(level);
            let mut img = src.clone();
            shear_x(&mut img, level);
            let n = check_map(&img, &src, |x, y| (x + l * y, y));
            assert!(n > src.width * src.height * 9 / 10);
            let mut img = src.clone();
            shear_y(&mut img, level);
            let n = check_map(&img, &src, |x, y| (x, l * x + y));
            assert!(n > src.width * src.height * 9 / 10);
        }
        // The fill region is where it should be: shear_x(0.3) reads past the right edge at the
        // bottom right.
        let mut img = src.clone();
        shear_x(&mut img, 0.3);
        assert_eq!(px(&img, 511, 511), [FILL; 3]);
        assert_eq!(px(&img, 0, 0), px(&src, 0, 0));
    }

    #[test]
    fn brightness_scales_towards_black() {
        let src = orange();
        let mut img = src.clone();
        brightness(&mut img, 1.0);
        assert_eq!(img, src);
        let mut img = src.clone();
        brightness(&mut img, 0.0);
        assert!(img.pixels.iter().all(|&p| p == 0));
        let mut img = src.clone();
        brightness(&mut img, 0.5);
        for (o, s) in img.pixels.iter().zip(&src.pixels) {
            assert_eq!(*o, *s >> 1);
        }
        let mut img = src.clone();
        brightness(&mut img, 2.8);
        for (o, s) in img.pixels.iter().zip(&src.pixels) {
            let exact = (f64::from(*s) * 2.8).min(255.0);
            assert!((f64::from(*o) - exact.floor()).abs() <= 1.0);
        }
    }

    #[test]
    fn color_0_is_tf_grayscale_and_1_is_identity() {
        let src = chelsea();
        let mut img = src.clone();
        color(&mut img, 1.0);
        assert_eq!(img, src);
        let mut img = src.clone();
        color(&mut img, 0.0);
        let mut off_by_one = 0;
        for (o, s) in img.pixels.chunks_exact(3).zip(src.pixels.chunks_exact(3)) {
            assert!(o[0] == o[1] && o[1] == o[2], "gray pixels");
            let (r, g, b) = (f64::from(s[0]), f64::from(s[1]), f64::from(s[2]));
            let want = ((0.2989 * r + 0.587 * g + 0.114 * b) / 255.0 * 255.5).floor();
            let d = (f64::from(o[0]) - want).abs();
            assert!(d <= 1.0, "{s:?} → {o:?}, want {want}");
            off_by_one += usize::from(d > 0.0);
        }
        assert!(
            off_by_one * 100 < src.width * src.height,
            "{off_by_one} rounding misses"
        );
        // Halfway: truncated interpolation between the gray and the pixel.
        let mut img = src.clone();
        color(&mut img, 0.5);
        for (o, s) in img.pixels.chunks_exact(3).zip(src.pixels.chunks_exact(3)) {
            let g = f32::from(tf_gray(s[0], s[1], s[2]));
            for k in 0..3 {
                assert_eq!(o[k], (g + 0.5 * (f32::from(s[k]) - g)) as u8);
            }
        }
    }

    #[test]
    fn contrast_blends_towards_pixel_count_over_256() {
        // orange.jpg is 512×512: 262144 / 256 = 1024, clipped to 255 (TF's bug).
        let src = orange();
        let mut img = src.clone();
        contrast(&mut img, 0.0);
        assert!(img.pixels.iter().all(|&p| p == 255));
        let mut img = src.clone();
        contrast(&mut img, 1.0);
        assert_eq!(img, src);
        // chelsea.png is 226×150: 33900 / 256 = 132.4 → 132, not its mean intensity.
        let src = chelsea();
        let mut img = src.clone();
        contrast(&mut img, 0.0);
        assert!(img.pixels.iter().all(|&p| p == 132));
        let mut img = src.clone();
        contrast(&mut img, 0.5);
        for (o, s) in img.pixels.iter().zip(&src.pixels) {
            // Exact in binary: 132 + (p − 132)/2, truncated toward zero.
            let want = (132.0 + 0.5 * (f64::from(*s) - 132.0)).trunc() as u8;
            assert_eq!(*o, want);
        }
    }

    #[test]
    fn sharpness_1_is_identity_and_0_is_the_smoothing_kernel() {
        let src = chelsea();
        let mut img = src.clone();
        sharpness(&mut img, 1.0);
        assert_eq!(img, src);
        let mut img = src.clone();
        sharpness(&mut img, 0.0);
        let (w, h) = (src.width, src.height);
        let mut ties = 0;
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let got = img.pixels[(y * w + x) * 3 + c];
                    let orig = src.pixels[(y * w + x) * 3 + c];
                    if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
                        assert_eq!(got, orig, "border ({x}, {y})");
                        continue;
                    }
                    let mut s = 4 * u32::from(orig);
                    for dy in 0..3 {
                        for dx in 0..3 {
                            s += u32::from(src.pixels[((y + dy - 1) * w + x + dx - 1) * 3 + c]);
                        }
                    }
                    // Exact quotient; a multiple of 13 may come out one lower in float.
                    let want = s / 13;
                    if s % 13 == 0 && u32::from(got) + 1 == want {
                        ties += 1;
                    } else {
                        assert_eq!(u32::from(got), want, "({x}, {y}) channel {c}, sum {s}");
                    }
                }
            }
        }
        assert!(ties * 20 < w * h * 3, "{ties} float ties");
    }

    /// `out` is `src` with exactly the rectangle `rows × cols` (half-open) grey and nothing else
    /// changed.
    fn check_one_square(
        out: &RgbImage,
        src: &RgbImage,
        rows: (usize, usize),
        cols: (usize, usize),
    ) {
        for y in 0..src.height {
            for x in 0..src.width {
                let inside = (rows.0..rows.1).contains(&y) && (cols.0..cols.1).contains(&x);
                let want = if inside { [FILL; 3] } else { px(src, x, y) };
                assert_eq!(px(out, x, y), want, "({x}, {y})");
            }
        }
    }

    #[test]
    fn cutout_fills_one_clipped_grey_square() {
        let src = orange();
        // Interior: a full (2·pad)² square.
        let mut img = src.clone();
        cutout_at(&mut img, 200, 300, 40);
        check_one_square(&img, &src, (160, 240), (260, 340));
        // Near the top-left corner: clipped to the image.
        let mut img = src.clone();
        cutout_at(&mut img, 10, 5, 20);
        check_one_square(&img, &src, (0, 30), (0, 25));
        // Bottom-right.
        let mut img = src.clone();
        cutout_at(&mut img, 511, 500, 60);
        check_one_square(&img, &src, (451, 512), (440, 512));
        // The random version draws the row, then the column.
        for seed in 0..5 {
            let mut rng = Rng::new(seed);
            let mut img = src.clone();
            cutout(&mut img, 20, &mut rng);
            let mut again = Rng::new(seed);
            let (cy, cx) = (again.below(512), again.below(512));
            let rows = (cy.saturating_sub(20), (cy + 20).min(512));
            let cols = (cx.saturating_sub(20), (cx + 20).min(512));
            check_one_square(&img, &src, rows, cols);
        }
    }

    #[test]
    fn level_mapping_matches_the_notes_table() {
        let arg = |op, m| level_to_arg(op, m, 100.0, 40.0);
        let close = |a: Arg, b: f32| match a {
            Arg::Degrees(v) | Arg::Shear(v) | Arg::Pixels(v) | Arg::Factor(v) => {
                assert!((v - b).abs() < 1e-3, "{a:?} vs {b}")
            }
            _ => panic!("{a:?} is not a float argument"),
        };
        // (M, rotate°, shear, translate px, enhance factor, posterize bits, solarize threshold,
        //  solarize-add, cutout pad)
        type Row = (f32, f32, f32, f32, f32, i32, i32, i32, usize);
        let table: [Row; 5] = [
            (5.0, 15.0, 0.15, 50.0, 1.0, 2, 128, 55, 20),
            (8.333_333, 25.0, 0.25, 83.333, 1.6, 3, 213, 91, 33),
            (10.0, 30.0, 0.3, 100.0, 1.9, 4, 256, 110, 40),
            (11.666_667, 35.0, 0.35, 116.667, 2.2, 4, 298, 128, 46),
            (15.0, 45.0, 0.45, 150.0, 2.8, 6, 384, 165, 60),
        ];
        for (m, rot, shear, tr, f, bits, thr, add, pad) in table {
            close(arg(Op::Rotate, m), rot);
            close(arg(Op::ShearX, m), shear);
            close(arg(Op::ShearY, m), shear);
            close(arg(Op::TranslateX, m), tr);
            close(arg(Op::TranslateY, m), tr);
            for op in [Op::Color, Op::Contrast, Op::Brightness, Op::Sharpness] {
                close(arg(op, m), f);
            }
            assert_eq!(arg(Op::Posterize, m), Arg::Bits(bits), "M {m}");
            assert_eq!(arg(Op::Solarize, m), Arg::Threshold(thr), "M {m}");
            assert_eq!(arg(Op::SolarizeAdd, m), Arg::Addition(add), "M {m}");
            assert_eq!(arg(Op::Cutout, m), Arg::Pad(pad), "M {m}");
            for op in [Op::AutoContrast, Op::Equalize, Op::Invert] {
                assert_eq!(arg(op, m), Arg::None);
            }
        }
        // M = 5 is exactly the identity factor, as in Python's (0.5·1.8 + 0.1).
        assert_eq!(arg(Op::Color, 5.0), Arg::Factor(1.0));
        // AutoAugment's constants: translate 250 px and cutout 100 px at level 10.
        assert_eq!(
            level_to_arg(Op::TranslateX, 10.0, 250.0, 100.0),
            Arg::Pixels(250.0)
        );
        assert_eq!(level_to_arg(Op::Cutout, 10.0, 250.0, 100.0), Arg::Pad(100));
        // Python int(0.2·4) = 0: policy v0's ("Posterize", 0.8, 2) keeps one bit.
        assert_eq!(level_to_arg(Op::Posterize, 2.0, 250.0, 100.0), Arg::Bits(0));
    }

    #[test]
    fn randaugment_is_deterministic_per_seed() {
        let src = chelsea();
        let aug = RandAugment {
            num_layers: 2,
            magnitude: 15.0,
            ..RandAugment::default()
        };
        let run = |seed| {
            let mut img = src.clone();
            aug.apply(&mut img, &mut Rng::new(seed));
            img
        };
        let mut distinct = std::collections::HashSet::new();
        for seed in 0..12 {
            let a = run(seed);
            assert_eq!(a, run(seed), "seed {seed}");
            assert_eq!((a.width, a.height), (src.width, src.height));
            distinct.insert(a.pixels);
        }
        assert!(
            distinct.len() > 6,
            "only {} distinct outputs",
            distinct.len()
        );
    }

    #[test]
    fn randaugment_draws_identity_one_time_in_17() {
        let mut rng = Rng::new(7);
        let draws = 170_000;
        let mut counts = [0usize; 17];
        for _ in 0..draws {
            let k = RandAugment::choose_op(&mut rng)
                .map_or(16, |op| Op::ALL.iter().position(|&o| o == op).unwrap());
            counts[k] += 1;
        }
        // Each of the 17 outcomes ≈ 10000 (σ ≈ 97).
        for (k, &n) in counts.iter().enumerate() {
            assert!((9_500..10_500).contains(&n), "outcome {k}: {n}");
        }
        // And apply() really leaves the image alone on that draw: one layer, seeds whose first
        // draw is the identity.
        let src = chelsea();
        let aug = RandAugment {
            num_layers: 1,
            ..RandAugment::default()
        };
        let mut seen = 0;
        for seed in 0..200 {
            if RandAugment::choose_op(&mut Rng::new(seed)).is_none() {
                let mut img = src.clone();
                aug.apply(&mut img, &mut Rng::new(seed));
                assert_eq!(img, src, "seed {seed}");
                seen += 1;
            }
        }
        assert!(seen > 0);
    }

    #[test]
    fn every_op_keeps_the_shape_of_tiny_and_empty_images() {
        let mut rng = Rng::new(5);
        for (w, h) in [(0, 0), (1, 1), (2, 5), (7, 3)] {
            let src = RgbImage {
                width: w,
                height: h,
                pixels: (0..w * h * 3).map(|i| (i * 37 % 256) as u8).collect(),
            };
            for op in Op::ALL {
                let mut img = src.clone();
                apply_op(&mut img, op, 10.0, 100.0, 40.0, &mut rng);
                assert_eq!((img.width, img.height, img.pixels.len()), (w, h, w * h * 3));
            }
        }
    }

    #[test]
    fn autoaugment_applies_one_sub_policy_with_its_probabilities() {
        assert_eq!(POLICY_V0.len(), 25);
        for sub in &POLICY_V0 {
            for &(_, p, level) in sub {
                assert!((0.0..=1.0).contains(&p) && f64::from(level) <= MAX_LEVEL);
            }
        }
        let src = chelsea();
        let aug = AutoAugment::default();
        // Replaying the draws by hand gives the same image.
        for seed in 0..25 {
            let mut img = src.clone();
            aug.apply(&mut img, &mut Rng::new(seed));
            let mut rng = Rng::new(seed);
            let mut want = src.clone();
            for &(op, p, level) in &POLICY_V0[rng.below(25)] {
                if rng.bernoulli(p) {
                    apply_op(&mut want, op, f32::from(level), 250.0, 100.0, &mut rng);
                }
            }
            assert_eq!(img, want, "seed {seed}");
        }
        // Probability 0 never fires: sub-policy 16 is ShearX @0.0 then Solarize @0.8 (level 4,
        // threshold 102), so the result is either the image or its solarization.
        let mut solarized = src.clone();
        solarize(&mut solarized, 102);
        let mut rng = Rng::new(1);
        for _ in 0..50 {
            let mut img = src.clone();
            for &(op, p, level) in &POLICY_V0[16] {
                if rng.bernoulli(p) {
                    apply_op(&mut img, op, f32::from(level), 250.0, 100.0, &mut rng);
                }
            }
            assert!(img == src || img == solarized);
        }
    }
}
