//! Global average pooling over the pixels of each image.

use rayon::prelude::*;

use crate::simd;

/// Images per parallel task in per-image loops over `len` values each: small feature maps are
/// grouped so a task's work outweighs its scheduling.
pub fn images_per_task(len: usize) -> usize {
    (16_384 / len.max(1)).max(1)
}

/// `out[b, c] = mean over hw of x[b, hw, c]`.
pub fn global_avg_forward(x: &[f32], n: usize, hw: usize, c: usize, out: &mut [f32]) {
    scaled_sums(x, n, hw, c, 1.0 / hw as f32, out)
}

/// `out[b, c] = scale · Σ over rows of x[b, rows, c]`, each channel summed over the rows in
/// order: [`global_avg_forward`], or a mean over pixels from rows already summed.
pub fn scaled_sums(x: &[f32], n: usize, rows: usize, c: usize, scale: f32, out: &mut [f32]) {
    // Each image's channels in `parts` blocks of whole vectors.
    let width = c
        .div_ceil(parts_per_image(n, rows, c))
        .next_multiple_of(16)
        .min(c)
        .max(1);
    out[..n * c]
        .par_chunks_mut(c)
        .enumerate()
        .with_min_len(images_per_task(rows * c))
        .for_each(|(b, o)| {
            o.par_chunks_mut(width).enumerate().for_each(|(j, o)| {
                simd::dispatch(
                    #[inline(always)]
                    || {
                        o.fill(0.0);
                        for row in x[b * rows * c..][..rows * c].chunks_exact(c) {
                            for (a, v) in o.iter_mut().zip(&row[j * width..]) {
                                *a += v;
                            }
                        }
                        for a in o.iter_mut() {
                            *a *= scale;
                        }
                    },
                )
            })
        });
}

/// Tasks per image of a per-image pass over `[n, hw, c]`: one, or with fewer images than
/// threads (batch 1) and enough values, one per thread (batch 1's squeeze-excitation pooling
/// and scaling ran on one thread). The pooling splits channels, so each is still summed over
/// the pixels in order: the same sums.
pub fn parts_per_image(n: usize, hw: usize, c: usize) -> usize {
    let threads = rayon::current_num_threads();
    if n >= threads || hw * c < 2 * 16_384 {
        1
    } else {
        threads
    }
}

/// `dx[b, hw, c] = dy[b, c] / hw`.
pub fn global_avg_backward(dy: &[f32], n: usize, hw: usize, c: usize, dx: &mut [f32]) {
    let inv = 1.0 / hw as f32;
    dx[..n * hw * c]
        .par_chunks_mut(hw * c)
        .enumerate()
        .with_min_len(images_per_task(hw * c))
        .for_each(|(b, d)| {
            let g = &dy[b * c..][..c];
            simd::dispatch(
                #[inline(always)]
                || {
                    for row in d.chunks_exact_mut(c) {
                        for (o, v) in row.iter_mut().zip(g) {
                            *o = v * inv;
                        }
                    }
                },
            )
        });
}
