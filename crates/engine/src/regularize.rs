//! Dropout (per element) and drop-path / stochastic depth (per sample), both "inverted": kept
//! values are scaled by 1/keep so the expectation is unchanged and eval needs no rescaling.

use crate::rng::Rng;

/// Fills `mask` with `0` (dropped, probability `rate`) or `1/(1 − rate)` (kept).
pub fn dropout_mask(rng: &mut Rng, rate: f32, mask: &mut [f32]) {
    let keep = 1.0 - rate as f64;
    let scale = if keep > 0.0 { (1.0 / keep) as f32 } else { 0.0 };
    for m in mask.iter_mut() {
        *m = if rng.bernoulli(keep) { scale } else { 0.0 };
    }
}

/// `y = x · mask` elementwise (forward and backward of dropout alike).
pub fn apply_mask(x: &[f32], mask: &[f32], y: &mut [f32]) {
    for ((o, v), m) in y.iter_mut().zip(x).zip(mask) {
        *o = v * m;
    }
}

/// Per-sample mask for drop-path: one value per image, `0` or `1/(1 − rate)` (timm's `drop_path`).
pub fn drop_path_mask(rng: &mut Rng, rate: f32, mask: &mut [f32]) {
    dropout_mask(rng, rate, mask)
}

/// `out += x · mask[image]` for the residual branch of a block; `x` is `[n, per_image]`.
pub fn add_scaled_per_image(x: &[f32], mask: &[f32], out: &mut [f32]) {
    let per_image = x.len() / mask.len().max(1);
    for ((o, v), m) in out
        .chunks_exact_mut(per_image)
        .zip(x.chunks_exact(per_image))
        .zip(mask)
    {
        for (a, b) in o.iter_mut().zip(v) {
            *a += b * m;
        }
    }
}
