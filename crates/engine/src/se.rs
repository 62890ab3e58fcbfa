//! Squeeze-and-excitation: `y = x · sigmoid(W₂·act(W₁·mean_hw(x) + b₁) + b₂)` per image and channel.
//! Weights are PyTorch's 1×1 convolutions: `w1 [cr, c]`, `w2 [c, cr]`.

use rayon::prelude::*;

use crate::act::{sigmoid, Act};
use crate::matmul::{matmul, Layout};
use crate::pool::images_per_task;
use crate::{pointwise, simd};

/// Shapes of one squeeze-excitation: `n` images of `hw` pixels and `c` channels, reduced to `cr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeGeom {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub cr: usize,
    pub act: Act,
}

/// [`backward`]'s per-image gradients, kept between calls.
struct Grads {
    pre_gate: Vec<f32>,
    pre_act: Vec<f32>,
    pooled: Vec<f32>,
}

impl Grads {
    const fn new() -> Grads {
        Grads {
            pre_gate: Vec::new(),
            pre_act: Vec::new(),
            pooled: Vec::new(),
        }
    }
}

static GRADS: std::sync::Mutex<Grads> = std::sync::Mutex::new(Grads::new());

/// What the forward pass keeps for the backward pass (small: per image, not per pixel).
#[derive(Debug, Clone)]
pub struct SeSaved {
    pooled: Vec<f32>,
    pre_act: Vec<f32>,
    hidden: Vec<f32>,
    gate: Vec<f32>,
}

impl SeSaved {
    /// The last [`forward`]'s (or [`excite`]'s) gate, `[n, c]`.
    pub fn gate(&self) -> &[f32] {
        &self.gate
    }

    pub fn new(g: &SeGeom) -> Self {
        SeSaved {
            pooled: vec![0.0; g.n * g.c],
            pre_act: vec![0.0; g.n * g.cr],
            hidden: vec![0.0; g.n * g.cr],
            gate: vec![0.0; g.n * g.c],
        }
    }
}

/// The two 1×1 convolutions' weights as [`forward`] reads them.
#[derive(Debug, Clone, Copy)]
pub enum SeWeights<'a> {
    /// PyTorch's `w1 [cr, c]` and `w2 [c, cr]`, read in place (training, where they change every
    /// step, and passes on weights not frozen).
    Plain { w1: &'a [f32], w2: &'a [f32] },
    /// Packed once by [`prepare`] for the pointwise kernel (inference: no per-call packing or
    /// allocation, as the general matrix product has for more than one image).
    Prepared { w1: &'a [f32], w2: &'a [f32] },
}

/// `w1` and `w2` packed for [`SeWeights::Prepared`], where the pointwise kernel runs (`None`
/// elsewhere: keep [`SeWeights::Plain`]).
pub fn prepare(g: &SeGeom, w1: &[f32], w2: &[f32]) -> Option<(Vec<f32>, Vec<f32>)> {
    pointwise::available().then(|| {
        (
            pointwise::pack(g.c, g.cr, w1),
            pointwise::pack(g.cr, g.c, w2),
        )
    })
}

/// `out[n × cols] = a[n × k] · wᵀ`, `w` PyTorch's `[cols, k]` or packed by [`prepare`].
fn dense(a: &[f32], n: usize, k: usize, cols: usize, w: &[f32], prepared: bool, out: &mut [f32]) {
    if prepared {
        pointwise::forward(a, n, k, cols, w, out, None, None);
    } else {
        matmul(
            out,
            n,
            cols,
            k,
            a,
            Layout::Normal,
            w,
            Layout::Transposed,
            false,
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub fn forward(
    g: &SeGeom,
    x: &[f32],
    weights: SeWeights,
    b1: &[f32],
    b2: &[f32],
    saved: &mut SeSaved,
    y: &mut [f32],
) {
    pool(g, x, saved);
    excite(g, weights, b1, b2, saved);
    scale(g, x, &saved.gate, y);
}

/// [`forward`]'s pooling: each image's mean over its pixels, into `saved`. Then [`excite`].
pub fn pool(g: &SeGeom, x: &[f32], saved: &mut SeSaved) {
    crate::pool::global_avg_forward(x, g.n, g.hw, g.c, &mut saved.pooled);
}

/// [`pool`] from sums taken row by row (`row_sums[n · rows_per_image, c]`, as
/// [`crate::depthwise::forward_with_row_sums`] writes them): only those rows are added up, not
/// the whole map read again. Then [`excite`].
pub fn pool_row_sums(g: &SeGeom, row_sums: &[f32], rows_per_image: usize, saved: &mut SeSaved) {
    let (n, c) = (g.n, g.c);
    assert!(
        row_sums.len() >= n * rows_per_image * c,
        "se: row sums size"
    );
    let inv = 1.0 / g.hw as f32;
    crate::pool::scaled_sums(row_sums, n, rows_per_image, c, inv, &mut saved.pooled);
}

/// [`forward`]'s middle, once `saved` holds the pooled means: the two products and their
/// activations, the gate (`saved.gate()`, `[n, c]`) last.
pub fn excite(g: &SeGeom, weights: SeWeights, b1: &[f32], b2: &[f32], saved: &mut SeSaved) {
    let (n, c, cr) = (g.n, g.c, g.cr);
    let (w1, w2, prepared) = match weights {
        SeWeights::Plain { w1, w2 } => (w1, w2, false),
        SeWeights::Prepared { w1, w2 } => (w1, w2, true),
    };
    dense(&saved.pooled, n, c, cr, w1, prepared, &mut saved.pre_act);
    // The activations inside `dispatch`: compiled for AVX2+FMA, e^x's multiply-adds are
    // instructions, not calls.
    let (pre_act, hidden) = (&mut saved.pre_act, &mut saved.hidden);
    simd::dispatch(
        #[inline(always)]
        || {
            for (row_pre, row_hidden) in pre_act
                .chunks_exact_mut(cr)
                .zip(hidden.chunks_exact_mut(cr))
            {
                for ((p, h), b) in row_pre.iter_mut().zip(row_hidden.iter_mut()).zip(b1) {
                    *p += b;
                    *h = g.act.apply(*p);
                }
            }
        },
    );
    dense(&saved.hidden, n, cr, c, w2, prepared, &mut saved.gate);
    let gate = &mut saved.gate;
    simd::dispatch(
        #[inline(always)]
        || {
            for row in gate.chunks_exact_mut(c) {
                for (v, b) in row.iter_mut().zip(b2) {
                    *v = sigmoid(*v + b);
                }
            }
        },
    );
}

/// `y = x · gate` (`gate[n, c]`, each image's channels).
pub fn scale(g: &SeGeom, x: &[f32], gate: &[f32], y: &mut [f32]) {
    let (n, hw, c) = (g.n, g.hw, g.c);
    assert!(
        gate.len() >= n * c && x.len() >= n * hw * c && y.len() >= n * hw * c,
        "se: scale sizes"
    );
    // Each image's rows in parts (one per thread with fewer images than threads).
    let rows = hw.div_ceil(crate::pool::parts_per_image(n, hw, c)).max(1);
    y[..n * hw * c]
        .par_chunks_mut(hw * c)
        .zip(x.par_chunks(hw * c))
        .enumerate()
        .with_min_len(images_per_task(hw * c))
        .for_each(|(b, (yi, xi))| {
            let gi = &gate[b * c..][..c];
            let parts = yi.par_chunks_mut(rows * c).zip(xi.par_chunks(rows * c));
            parts.for_each(|(yi, xi)| {
                simd::dispatch(
                    #[inline(always)]
                    || {
                        for (yr, xr) in yi.chunks_exact_mut(c).zip(xi.chunks_exact(c)) {
                            for ((o, v), s) in yr.iter_mut().zip(xr).zip(gi) {
                                *o = v * s;
                            }
                        }
                    },
                )
            })
        });
}

/// Backward of [`forward`]: `dx` is overwritten; weight and bias gradients are accumulated into.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &SeGeom,
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    saved: &SeSaved,
    dy: &[f32],
    dx: &mut [f32],
    dw1: &mut [f32],
    db1: &mut [f32],
    dw2: &mut [f32],
    db2: &mut [f32],
) {
    let (n, hw, c, cr) = (g.n, g.hw, g.c, g.cr);
    // d(pre-sigmoid) = Σ_hw dy·x · gate·(1 − gate)
    crate::with_kept(&GRADS, Grads::new, |grads| {
        let Grads {
            pre_gate,
            pre_act,
            pooled,
        } = grads;
        let d_pre_gate = crate::at_least(pre_gate, n * c);
        d_pre_gate.fill(0.0);
        d_pre_gate
            .par_chunks_mut(c)
            .enumerate()
            .with_min_len(images_per_task(hw * c))
            .for_each(|(b, acc)| {
                simd::dispatch(
                    #[inline(always)]
                    || {
                        for (xr, gr) in x[b * hw * c..][..hw * c]
                            .chunks_exact(c)
                            .zip(dy[b * hw * c..][..hw * c].chunks_exact(c))
                        {
                            for ((a, xv), gv) in acc.iter_mut().zip(xr).zip(gr) {
                                *a += xv * gv;
                            }
                        }
                        for (a, s) in acc.iter_mut().zip(&saved.gate[b * c..][..c]) {
                            *a *= s * (1.0 - s);
                        }
                    },
                )
            });
        matmul(
            dw2,
            c,
            cr,
            n,
            d_pre_gate,
            Layout::Transposed,
            &saved.hidden,
            Layout::Normal,
            true,
        );
        let d_pre_act = crate::at_least(pre_act, n * cr);
        matmul(
            d_pre_act,
            n,
            cr,
            c,
            d_pre_gate,
            Layout::Normal,
            w2,
            Layout::Normal,
            false,
        );
        simd::dispatch(
            #[inline(always)]
            || {
                for (d, p) in d_pre_act.iter_mut().zip(&saved.pre_act) {
                    *d *= g.act.derivative(*p);
                }
            },
        );
        for b in 0..n {
            for (acc, d) in db2.iter_mut().zip(&d_pre_gate[b * c..][..c]) {
                *acc += d;
            }
            for (acc, d) in db1.iter_mut().zip(&d_pre_act[b * cr..][..cr]) {
                *acc += d;
            }
        }
        matmul(
            dw1,
            cr,
            c,
            n,
            d_pre_act,
            Layout::Transposed,
            &saved.pooled,
            Layout::Normal,
            true,
        );
        let d_pooled = crate::at_least(pooled, n * c);
        matmul(
            d_pooled,
            n,
            c,
            cr,
            d_pre_act,
            Layout::Normal,
            w1,
            Layout::Normal,
            false,
        );
        let inv_hw = 1.0 / hw as f32;
        let gate = &saved.gate;
        dx.par_chunks_mut(hw * c)
            .zip(dy.par_chunks(hw * c))
            .enumerate()
            .with_min_len(images_per_task(hw * c))
            .for_each(|(b, (dxi, dyi))| {
                let gi = &gate[b * c..][..c];
                let pi = &d_pooled[b * c..][..c];
                simd::dispatch(
                    #[inline(always)]
                    || {
                        for (dr, gr) in dxi.chunks_exact_mut(c).zip(dyi.chunks_exact(c)) {
                            for (((o, gv), s), p) in dr.iter_mut().zip(gr).zip(gi).zip(pi) {
                                *o = gv * s + p * inv_hw;
                            }
                        }
                    },
                )
            });
    })
}
