//! Dropout (per element) and drop-path / stochastic depth (per sample), both "inverted": kept
//! values are scaled by 1/keep so the expectation is unchanged and eval needs no rescaling.

use rayon::prelude::*;

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

/// A block's output under drop-path, in place over the pool: `branch = branch · mask[image] +
/// shortcut` (both `[n, per_image]`).
pub fn drop_path_residual(branch: &mut [f32], shortcut: &[f32], mask: &[f32]) {
    let per_image = (branch.len() / mask.len().max(1)).max(1);
    branch
        .par_chunks_exact_mut(per_image)
        .zip(shortcut.par_chunks_exact(per_image))
        .zip(mask)
        .for_each(|((o, s), &m)| o.iter_mut().zip(s).for_each(|(v, s)| *v = *v * m + s));
}

/// The branch's gradient under drop-path, over the pool: `out = dy · mask[image]` (`[n,
/// per_image]`; a kept image's is copied as it is).
pub fn drop_path_backward(dy: &[f32], mask: &[f32], out: &mut [f32]) {
    let per_image = (dy.len() / mask.len().max(1)).max(1);
    out.par_chunks_exact_mut(per_image)
        .zip(dy.par_chunks_exact(per_image))
        .zip(mask)
        .for_each(|((o, g), &m)| match m == 1.0 {
            true => o.copy_from_slice(g),
            false => o.iter_mut().zip(g).for_each(|(o, g)| *o = g * m),
        });
}
