//! Eval-mode logits on the GPU: `predict` and `eval --device cuda`, and the evaluations of a
//! training run on the GPU. Each (batch, resolution) gets its own workspace and its pass becomes
//! a CUDA graph after its first run; new weights are copied into the same device buffers, so the
//! graphs stay valid and a whole evaluation uploads its weights once.

use std::rc::Rc;

use effnet_model::{Mode, Network, Weights};

use crate::device::{Gpu, Result};
use crate::net::{GpuNet, GpuWorkspace};
use crate::replay::Replay;

/// Workspaces kept: a run sees a full batch and a last, shorter one per resolution; a
/// workspace of V2-S at batch 128 and 384 px takes a few GB, so older ones are dropped.
const KEPT_PLANS: usize = 4;

struct Plan {
    key: (usize, usize),
    ws: GpuWorkspace,
    pass: Replay,
}

pub struct GpuClassifier {
    gpu: Rc<Gpu>,
    net: GpuNet,
    /// Most recently used last.
    plans: Vec<Plan>,
}

impl GpuClassifier {
    pub fn new(gpu: Rc<Gpu>, net: &Network, weights: &Weights) -> Result<GpuClassifier> {
        let net = GpuNet::for_inference(&gpu, net, weights)?;
        Ok(GpuClassifier {
            gpu,
            net,
            plans: Vec::new(),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Replaces the parameters and running statistics (the network's layout stays).
    pub fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        let layout = &self.net.net.layout;
        if weights.params.len() != layout.param_len || weights.buffers.len() != layout.buffer_len {
            return Err(format!(
                "weights of {} parameters and {} statistics for a network of {} and {}",
                weights.params.len(),
                weights.buffers.len(),
                layout.param_len,
                layout.buffer_len
            ));
        }
        self.gpu.write(&weights.params, &mut self.net.params)?;
        self.gpu.write(&weights.buffers, &mut self.net.buffers)
    }

    /// Eval-mode logits `[n, classes]` of `n` NHWC images of `size`².
    pub fn logits(&mut self, images: &[f32], n: usize, size: usize) -> Result<Vec<f32>> {
        let gpu = &self.gpu;
        let i = match self.plans.iter().position(|p| p.key == (n, size)) {
            Some(i) => i,
            None => {
                if self.plans.len() == KEPT_PLANS {
                    self.plans.remove(0); // its device memory goes before the new plan's
                }
                self.plans.push(Plan {
                    key: (n, size),
                    ws: self.net.workspace(gpu, n, size, size, false)?,
                    pass: Replay::default(),
                });
                self.plans.len() - 1
            }
        };
        let mut plan = self.plans.remove(i);
        let result = (|| {
            self.net.write_input(gpu, &mut plan.ws, images)?;
            // Eval masks are all ones, as the workspace starts: nothing is uploaded here.
            self.net.draw_masks(
                gpu,
                &mut plan.ws,
                Mode::Eval,
                &mut effnet_engine::rng::Rng::new(0),
            )?;
            let (net, ws) = (&self.net, &mut plan.ws);
            plan.pass
                .run(gpu, None, || net.forward_launches(gpu, ws, Mode::Eval))?;
            self.net.logits(gpu, &plan.ws)
        })();
        self.plans.push(plan);
        result
    }
}
