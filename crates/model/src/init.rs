//! Initialization as the reference does it: convolution kernels from a truncated normal with
//! standard deviation sqrt(2/fan_out)/0.87962566 (Keras' `VarianceScaling(2.0, 'fan_out',
//! 'truncated_normal')`), dense weights uniform in ±1/sqrt(out), biases 0, BN γ = 1, β = 0,
//! running mean 0 and variance 1. Seeded: the same seed gives the same weights.

use effnet_engine::rng::Rng;

use crate::layout::ParamKind;
use crate::network::{Network, Weights};

/// The standard deviation of a unit truncated normal cut at ±2: dividing by it restores the
/// intended variance.
const TRUNCATED_NORMAL_STD: f64 = 0.879_625_66;

impl Weights {
    pub fn init(net: &Network, seed: u64) -> Weights {
        let layout = &net.layout;
        let root = Rng::new(seed);
        let mut params = vec![0f32; layout.param_len];
        for (i, e) in layout.params.iter().enumerate() {
            // One stream per tensor: a tensor's values do not depend on the tensors before it.
            let mut rng = root.fork(i as u64);
            let values = &mut params[e.range.clone()];
            match e.kind {
                ParamKind::ConvWeight | ParamKind::DepthwiseWeight => {
                    // [out, in/groups, kh, kw]; depthwise has groups = out, so fan_out = kh·kw.
                    let (out, kh, kw) = (e.shape[0], e.shape[2], e.shape[3]);
                    let fan_out = if e.kind == ParamKind::DepthwiseWeight {
                        kh * kw
                    } else {
                        kh * kw * out
                    };
                    let std = (2.0 / fan_out as f64).sqrt() / TRUNCATED_NORMAL_STD;
                    values
                        .iter_mut()
                        .for_each(|v| *v = (rng.truncated_normal() * std) as f32);
                }
                ParamKind::DenseWeight => {
                    let limit = 1.0 / (e.shape[0] as f64).sqrt();
                    values
                        .iter_mut()
                        .for_each(|v| *v = rng.uniform_in(-limit, limit) as f32);
                }
                ParamKind::BnWeight | ParamKind::RunningVar => values.fill(1.0),
                ParamKind::ConvBias
                | ParamKind::BnBias
                | ParamKind::DenseBias
                | ParamKind::RunningMean => values.fill(0.0),
            }
        }
        let mut buffers = vec![0f32; layout.buffer_len];
        for e in &layout.buffers {
            let value = if e.kind == ParamKind::RunningVar {
                1.0
            } else {
                0.0
            };
            buffers[e.range.clone()].fill(value);
        }
        Weights {
            params,
            buffers,
            tracked: vec![0; layout.tracked.len()],
        }
    }
}
