//! Optimizers over the flat parameter buffer, with Keras' update rules (the TF2 reference's).
//!
//! Weight decay as the reference applies it: Keras `l2(wd)` adds `wd·Σw²` to the loss, so its
//! gradient `2·wd·w` joins the gradient of convolution kernels (not depthwise ones), the SE
//! convolutions' biases and the classifier's weight and bias; never batch norm. AdamW instead
//! decays the same tensors directly by `lr·wd·w` (decoupled).

use effnet_engine::simd;
use effnet_model::{Layout, ParamKind};
use rayon::prelude::*;

/// Which tensors the reference's L2 term covers.
pub fn decays(kind: ParamKind) -> bool {
    matches!(
        kind,
        ParamKind::ConvWeight | ParamKind::ConvBias | ParamKind::DenseWeight | ParamKind::DenseBias
    )
}

/// A 0/1 mask over the flat buffer: 1 where weight decay applies.
pub fn decay_mask(layout: &Layout) -> Vec<f32> {
    let mut mask = vec![0f32; layout.param_len];
    for e in layout.params.iter().filter(|e| decays(e.kind)) {
        mask[e.range.clone()].fill(1.0);
    }
    mask
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Keras RMSprop (not centered): `ms ← ρ·ms + (1−ρ)·g²`, `mom ← μ·mom + lr·g/√(ms + ε)`,
    /// `w ← w − mom`; ε inside the square root (TF's `ApplyRMSProp`), slots start at zero
    /// (Keras; TF1's `RMSPropOptimizer` started `ms` at one).
    RmsProp {
        rho: f32,
        momentum: f32,
        epsilon: f32,
    },
    /// Keras SGD: `v ← μ·v − lr·g`, `w ← w + v` (Nesterov: `w ← w + μ·v − lr·g`).
    Sgd { momentum: f32, nesterov: bool },
    /// Adam with bias correction, ε outside the square root (Keras).
    Adam {
        beta1: f32,
        beta2: f32,
        epsilon: f32,
    },
    /// Adam plus decoupled weight decay `w ← w − lr·wd·w` on the decayed tensors.
    AdamW {
        beta1: f32,
        beta2: f32,
        epsilon: f32,
    },
}

/// An optimizer and its slots, one value per parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    pub kind: Kind,
    pub weight_decay: f32,
    /// Steps taken (Keras' `iterations`).
    pub step: u64,
    pub slot_a: Vec<f32>,
    pub slot_b: Vec<f32>,
    mask: Vec<f32>,
}

impl Optimizer {
    pub fn new(kind: Kind, weight_decay: f32, layout: &Layout) -> Optimizer {
        let n = layout.param_len;
        let two_slots = matches!(
            kind,
            Kind::RmsProp { .. } | Kind::Adam { .. } | Kind::AdamW { .. }
        );
        Optimizer {
            kind,
            weight_decay,
            step: 0,
            slot_a: vec![0.0; n],
            slot_b: vec![0.0; if two_slots { n } else { 0 }],
            mask: decay_mask(layout),
        }
    }

    /// One update of `params` with `grads` (the loss's gradient, without the L2 term) at `lr`.
    pub fn apply(&mut self, params: &mut [f32], grads: &[f32], lr: f32) {
        assert_eq!(params.len(), grads.len());
        assert_eq!(params.len(), self.slot_a.len());
        self.step += 1;
        // Keras L2: d(wd·w²)/dw = 2·wd·w, added to the gradient (not for AdamW).
        let l2 = if matches!(self.kind, Kind::AdamW { .. }) {
            0.0
        } else {
            2.0 * self.weight_decay
        };
        let decoupled = match self.kind {
            Kind::AdamW { .. } => lr * self.weight_decay,
            _ => 0.0,
        };
        // Elementwise, so chunks on the thread pool give the same bits as one loop. SGD has no
        // second slot: its chunks are empty.
        let chunks = params.len().div_ceil(CHUNK);
        let mut slot_b: Vec<&mut [f32]> = self.slot_b.chunks_mut(CHUNK).collect();
        slot_b.resize_with(chunks, Default::default);
        let kind = self.kind;
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.mask.par_chunks(CHUNK))
            .zip(self.slot_a.par_chunks_mut(CHUNK))
            .zip(slot_b)
            .for_each(|((((w, g), m), a), b)| {
                simd::dispatch(
                    #[inline(always)]
                    || {
                        // (gradient with the L2 term, weight, decay mask) for each parameter.
                        let terms = w
                            .iter_mut()
                            .zip(g)
                            .zip(m)
                            .map(|((w, g), m)| (g + l2 * m * *w, w, *m));
                        match kind {
                            Kind::RmsProp {
                                rho,
                                momentum,
                                epsilon,
                            } => {
                                for ((g, w, _), (ms, mom)) in
                                    terms.zip(a.iter_mut().zip(b.iter_mut()))
                                {
                                    *ms = rho * *ms + (1.0 - rho) * g * g;
                                    *mom = momentum * *mom + lr * g / (*ms + epsilon).sqrt();
                                    *w -= *mom;
                                }
                            }
                            Kind::Sgd { momentum, nesterov } => {
                                for ((g, w, _), v) in terms.zip(a.iter_mut()) {
                                    *v = momentum * *v - lr * g;
                                    *w += if nesterov { momentum * *v - lr * g } else { *v };
                                }
                            }
                            Kind::Adam {
                                beta1,
                                beta2,
                                epsilon,
                            }
                            | Kind::AdamW {
                                beta1,
                                beta2,
                                epsilon,
                            } => {
                                let lr_t = adam_step_size(lr, beta1, beta2, self.step);
                                for ((g, w, d), (m, v)) in terms.zip(a.iter_mut().zip(b.iter_mut()))
                                {
                                    *m = beta1 * *m + (1.0 - beta1) * g;
                                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                                    *w -= decoupled * d * *w + lr_t * *m / (v.sqrt() + epsilon);
                                }
                            }
                        }
                    },
                )
            });
    }
}

/// Adam's step size at step `t` (counting from 1), the bias correction folded in as Keras does:
/// `lr·√(1 − β2^t)/(1 − β1^t)`. The GPU's update takes it from here too.
pub fn adam_step_size(lr: f32, beta1: f32, beta2: f32, t: u64) -> f32 {
    let t = t.min(i32::MAX as u64) as i32;
    lr * (1.0 - beta2.powi(t)).sqrt() / (1.0 - beta1.powi(t))
}

/// Elements per parallel task of an update: large enough to amortize the task, small enough
/// to spread a small model over the threads.
pub(crate) const CHUNK: usize = 1 << 15;

/// Scales `grads` down to a global L2 norm of `max_norm` where it is larger (TF's
/// `clip_by_global_norm` over the flat buffer); returns the norm before clipping. Over the pool,
/// the chunks' sums of squares added in order, so the result does not depend on the threads.
pub fn clip_global_norm(grads: &mut [f32], max_norm: f32) -> f64 {
    let squares: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
        .collect();
    let norm = squares.iter().sum::<f64>().sqrt();
    if norm > max_norm as f64 {
        let k = (max_norm as f64 / norm) as f32;
        grads
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= k));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use effnet_model::{arch, Network};

    fn layout() -> Layout {
        let mut c = arch("efficientnet_lite0").unwrap();
        c.num_classes = 2;
        Network::new(c).layout
    }

    #[test]
    fn decay_covers_kernels_and_dense_but_not_bn_or_depthwise() {
        let l = layout();
        let mask = decay_mask(&l);
        let get = |name: &str| mask[l.find_param(name).unwrap().range.clone()][0];
        assert_eq!(get("conv_stem.weight"), 1.0);
        assert_eq!(get("blocks.1.0.conv_pw.weight"), 1.0);
        assert_eq!(get("blocks.1.0.conv_dw.weight"), 0.0);
        assert_eq!(get("bn1.weight"), 0.0);
        assert_eq!(get("blocks.1.0.bn2.bias"), 0.0);
        assert_eq!(get("classifier.weight"), 1.0);
        assert_eq!(get("classifier.bias"), 1.0);
    }

    /// The global norm over many chunks, the scale past the limit, nothing below it.
    #[test]
    fn clipping_scales_to_the_global_norm() {
        let grads: Vec<f32> = (0..3 * CHUNK + 7)
            .map(|i| ((i % 11) as f32 - 5.0) * 0.01)
            .collect();
        let l2 = |v: &[f32]| v.iter().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt();
        let norm = l2(&grads);
        let mut under = grads.clone();
        assert!((clip_global_norm(&mut under, (2.0 * norm) as f32) - norm).abs() < 1e-9 * norm);
        assert_eq!(under, grads);
        let mut over = grads.clone();
        clip_global_norm(&mut over, (norm / 4.0) as f32);
        let clipped = l2(&over);
        assert!(
            (clipped - norm / 4.0).abs() < 1e-5 * norm,
            "{clipped} vs {}",
            norm / 4.0
        );
        for (c, g) in over.iter().zip(&grads) {
            assert!((c * 4.0 - g).abs() <= 1e-6, "{c} · 4 vs {g}");
        }
    }

    /// The update rules written out in f64 for one scalar, three steps.
    #[test]
    fn updates_follow_keras() {
        let l = layout();
        let i = l.find_param("classifier.weight").unwrap().range.start; // decayed
        let j = l.find_param("bn1.weight").unwrap().range.start; // not decayed
        let (lr, wd) = (0.1f64, 0.01f64);
        let grads = [0.5f64, -1.0, 2.0];
        let cases = [
            Kind::RmsProp {
                rho: 0.9,
                momentum: 0.9,
                epsilon: 1e-3,
            },
            Kind::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            Kind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            Kind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-7,
            },
            Kind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-7,
            },
        ];
        for kind in cases {
            let mut opt = Optimizer::new(kind, wd as f32, &l);
            let mut params = vec![0f32; l.param_len];
            params[i] = 1.0;
            params[j] = 1.0;
            for (idx, decayed) in [(i, true), (j, false)] {
                let (mut w, mut a, mut b) = (1.0f64, 0.0f64, 0.0f64);
                for (t, g0) in grads.iter().enumerate() {
                    let d = if decayed { 1.0 } else { 0.0 };
                    let g = match kind {
                        Kind::AdamW { .. } => *g0,
                        _ => g0 + 2.0 * wd * d * w,
                    };
                    match kind {
                        Kind::RmsProp { .. } => {
                            a = 0.9 * a + 0.1 * g * g;
                            b = 0.9 * b + lr * g / (a + 1e-3).sqrt();
                            w -= b;
                        }
                        Kind::Sgd { nesterov, .. } => {
                            a = 0.9 * a - lr * g;
                            w += if nesterov { 0.9 * a - lr * g } else { a };
                        }
                        Kind::Adam { .. } | Kind::AdamW { .. } => {
                            let t = (t + 1) as i32;
                            a = 0.9 * a + 0.1 * g;
                            b = 0.999 * b + 0.001 * g * g;
                            let lr_t =
                                lr * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
                            let decay = if matches!(kind, Kind::AdamW { .. }) {
                                lr * wd * d * w
                            } else {
                                0.0
                            };
                            w -= decay + lr_t * a / (b.sqrt() + 1e-7);
                        }
                    }
                }
                // Run the optimizer on the same gradient sequence (both entries at once).
                if idx == i {
                    for g0 in grads {
                        let mut g = vec![0f32; l.param_len];
                        g[i] = g0 as f32;
                        g[j] = g0 as f32;
                        opt.apply(&mut params, &g, lr as f32);
                    }
                }
                assert!(
                    (params[idx] as f64 - w).abs() < 1e-5,
                    "{kind:?} decayed={decayed}: {} vs {w}",
                    params[idx]
                );
            }
            assert_eq!(opt.step, 3);
        }
    }
}
