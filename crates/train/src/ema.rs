//! Exponential moving average of all weights, BN running statistics included, with the
//! reference's dynamic decay `min(d, (1 + t)/(10 + t))` (t = optimizer steps taken), updated after
//! every optimizer step.

use effnet_engine::simd;
use effnet_model::Weights;
use rayon::prelude::*;

use crate::optim::CHUNK;

#[derive(Debug, Clone, PartialEq)]
pub struct Ema {
    pub decay: f64,
    pub params: Vec<f32>,
    pub buffers: Vec<f32>,
}

impl Ema {
    /// Starts as a copy of the weights.
    pub fn new(weights: &Weights, decay: f64) -> Ema {
        Ema {
            decay,
            params: weights.params.clone(),
            buffers: weights.buffers.clone(),
        }
    }

    pub fn decay_at(&self, step: u64) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// `shadow ← d·shadow + (1 − d)·w` after optimizer step `step`.
    pub fn update(&mut self, weights: &Weights, step: u64) {
        let d = self.decay_at(step) as f32;
        let average = |shadow: &mut [f32], current: &[f32]| {
            // Elementwise: the chunks give the same bits as one loop.
            shadow
                .par_chunks_mut(CHUNK)
                .zip(current.par_chunks(CHUNK))
                .for_each(|(s, w)| {
                    simd::dispatch(
                        #[inline(always)]
                        || {
                            for (s, w) in s.iter_mut().zip(w) {
                                *s = d * *s + (1.0 - d) * w;
                            }
                        },
                    )
                });
        };
        average(&mut self.params, &weights.params);
        average(&mut self.buffers, &weights.buffers);
    }

    /// The averaged weights, for evaluation or export.
    pub fn weights(&self, like: &Weights) -> Weights {
        Weights {
            params: self.params.clone(),
            buffers: self.buffers.clone(),
            tracked: like.tracked.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_decay_and_update() {
        let w0 = Weights {
            params: vec![1.0, 2.0],
            buffers: vec![3.0],
            tracked: vec![0],
        };
        let mut ema = Ema::new(&w0, 0.9999);
        assert!((ema.decay_at(0) - 0.1).abs() < 1e-12);
        assert!((ema.decay_at(90) - 91.0 / 100.0).abs() < 1e-12);
        assert_eq!(ema.decay_at(10_000_000), 0.9999);
        let w1 = Weights {
            params: vec![0.0, 0.0],
            buffers: vec![0.0],
            tracked: vec![1],
        };
        ema.update(&w1, 0); // d = 0.1: shadow = 0.1·old
        assert!((ema.params[0] - 0.1).abs() < 1e-7 && (ema.buffers[0] - 0.3).abs() < 1e-6);
        assert_eq!(ema.weights(&w1).tracked, vec![1]);
    }
}
