//! The trainer's passes on the GPU (`effnet train --device cuda`), holding the training state
//! on the device ([`Passes::holds_state`]): parameters, gradients, optimizer slots and EMA stay
//! there, and a micro-batch moves only its images, its logits, d loss/d logits and the BN
//! running statistics (a few values per channel; the host keeps those, as it must to undo a
//! non-finite step). Each (batch, resolution) runs its forward and backward passes directly
//! once (cuDNN settles its algorithms, kernels load), then captures them as CUDA graphs and
//! replays those; the optimizer step follows on the device, with gradients averaged over NCCL
//! between processes (`mpirun -np N`, one GPU each). With f16 activations the loss is scaled
//! dynamically ([`LossScale`]).

use std::rc::Rc;
use std::sync::Arc;

use effnet_dist::Communicator;
use effnet_engine::rng::Rng;
use effnet_model::{Mode, Network, Weights};
use effnet_train::trainer::{Passes, Replicas, StateMut, StateRef, Stepped, Update};

use crate::classify::GpuClassifier;
use crate::device::{Gpu, Math, Result};
use crate::net::{GpuNet, GpuWorkspace};
use crate::replay::Replay;
use crate::state::{DeviceState, Exchange};

/// f16 mixed precision's dynamic loss scale, as Keras' `LossScaleOptimizer` (the reference's
/// `mixed_float16` policy): d loss/d logits is multiplied by the scale so that small gradients
/// stay above f16's smallest values, the parameter gradients are divided by it before the
/// step, and a step whose gradients overflowed is skipped and the scale halved; after 2000
/// steps in a row without overflow it doubles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    pub scale: f32,
    good_steps: u32,
}

impl LossScale {
    /// Keras' starting scale, 2¹⁵.
    pub const INITIAL: f32 = 32768.0;
    const GROWTH_STEPS: u32 = 2000;

    pub fn new(scale: f32) -> LossScale {
        LossScale {
            scale,
            good_steps: 0,
        }
    }

    /// After a step: applied or overflowed.
    fn after(&mut self, applied: bool) {
        if applied {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_STEPS {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            // Never below 1: a gradient that overflows unscaled is the loss's own problem.
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
        }
    }
}

/// A training workspace and the passes captured on it.
struct Planned {
    key: (usize, usize),
    ws: GpuWorkspace,
    /// The mode the passes were captured in (BN momentum is in the forward's arguments).
    mode: Option<Mode>,
    forward: Replay,
    backward: Replay,
    /// With synchronized BN, the replicas that agree on the graphs. Every replica plans the
    /// same (batch, resolution) sequence (full, equal batches), so their graphs stay in step.
    sync: Option<Arc<dyn Communicator>>,
}

pub struct GpuPasses {
    /// Shared with the caller (the self-test runs its own checks on the same device).
    gpu: Rc<Gpu>,
    /// The trained network: parameters and gradients on the device.
    net: GpuNet,
    state: Option<DeviceState>,
    /// How gradients reach the other replicas (kept across state writes).
    exchange: Exchange,
    /// Evaluation runs on the weights the trainer loads (raw or EMA), kept apart from `net`.
    eval: Option<GpuClassifier>,
    train: Option<Planned>,
    /// With f16 activations: the dynamic loss scale (f32 and bf16 need none).
    loss_scale: Option<LossScale>,
}

impl GpuPasses {
    pub fn new(gpu: Rc<Gpu>, net: &Network, weights: &Weights) -> Result<GpuPasses> {
        let net = GpuNet::new(&gpu, net, weights)?;
        let loss_scale = (gpu.math == Math::F16).then(|| LossScale::new(LossScale::INITIAL));
        Ok(GpuPasses {
            gpu,
            net,
            state: None,
            exchange: Exchange::default(),
            eval: None,
            train: None,
            loss_scale,
        })
    }

    /// Starts the loss scale at `scale` (f16 only; the self-test starts lower so that its
    /// random network's first step does not overflow).
    pub fn set_loss_scale(&mut self, scale: f32) {
        if let Some(ls) = &mut self.loss_scale {
            *ls = LossScale::new(scale);
        }
    }
}

impl Passes for GpuPasses {
    fn train_forward(
        &mut self,
        _net: &Network,
        weights: &mut Weights,
        images: &[f32],
        n: usize,
        size: usize,
        mode: Mode,
        rng: &mut Rng,
        replicas: &Replicas,
    ) -> Result<Vec<f32>> {
        if self.state.is_none() {
            return Err("the trainer has not written its state to the GPU".into());
        }
        let gpu = &self.gpu;
        if self.train.as_ref().map(|p| p.key) != Some((n, size)) {
            self.train = None; // free the old buffers first
            self.train = Some(Planned {
                key: (n, size),
                ws: self.net.workspace(gpu, n, size, size, true)?,
                mode: None,
                forward: Replay::default(),
                backward: Replay::default(),
                sync: None,
            });
        }
        let planned = self.train.as_mut().expect("planned above");
        if replicas.comm.size() > 1 {
            // Collective at the first pass: every replica chooses the route together.
            let nccl = self.exchange.connect(gpu, replicas.comm.as_ref())?;
            if replicas.sync_bn && !planned.ws.is_synchronized() {
                let nccl = nccl.ok_or(
                    "synchronized batch norm on GPUs needs NCCL on every process (see the note \
                     above), or train without --sync_bn",
                )?;
                planned.ws.synchronize_batch_norm(nccl)?;
                planned.sync = Some(replicas.comm.clone());
            }
        }
        gpu.write(&weights.buffers, &mut self.net.buffers)?;
        self.net.tracked.clone_from(&weights.tracked);
        self.net.write_input(gpu, &mut planned.ws, images)?;
        self.net.draw_masks(gpu, &mut planned.ws, mode, rng)?;
        if planned.mode != Some(mode) {
            planned.mode = Some(mode);
            planned.forward = Replay::default();
            planned.backward = Replay::default();
        }
        let (net, ws) = (&self.net, &mut planned.ws);
        planned.forward.run(gpu, planned.sync.as_deref(), || {
            net.forward_launches(gpu, ws, mode)
        })?;
        self.net.count_batches(mode);
        let logits = self.net.logits(gpu, &planned.ws)?;
        weights.buffers = gpu.read(&self.net.buffers, weights.buffers.len())?;
        weights.tracked.clone_from(&self.net.tracked);
        Ok(logits)
    }

    fn backward(
        &mut self,
        _net: &Network,
        _weights: &Weights,
        dlogits: &[f32],
        _grads: &mut [f32],
    ) -> Result<()> {
        let planned = self
            .train
            .as_mut()
            .ok_or("backward before a training forward pass")?;
        let gpu = &self.gpu;
        match self.loss_scale {
            Some(ls) => {
                let scaled: Vec<f32> = dlogits.iter().map(|d| d * ls.scale).collect();
                self.net.write_dlogits(gpu, &mut planned.ws, &scaled)?;
            }
            None => self.net.write_dlogits(gpu, &mut planned.ws, dlogits)?,
        }
        let (net, ws) = (&self.net, &mut planned.ws);
        planned
            .backward
            .run(gpu, planned.sync.as_deref(), || net.backward(gpu, ws))
    }

    fn load_eval_weights(&mut self, net: &Network, weights: &Weights) -> Result<()> {
        match &mut self.eval {
            Some(eval) => eval.set_weights(weights),
            None => {
                self.eval = Some(GpuClassifier::new(self.gpu.clone(), net, weights)?);
                Ok(())
            }
        }
    }

    fn eval_logits(
        &mut self,
        _net: &Network,
        _weights: &mut Weights,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>> {
        self.eval
            .as_mut()
            .ok_or("no evaluation weights loaded on the GPU")?
            .logits(images, n, size)
    }

    /// One network per weight set (a copy of its parameters each) and one training workspace:
    /// each batch is uploaded once and runs through every set, directly (each pass has its own
    /// momentum); the statistics come back at the end.
    fn recompute_bn_stats(
        &mut self,
        net: &Network,
        weight_sets: &mut [&mut Weights],
        batches: &mut dyn Iterator<Item = Vec<f32>>,
        n: usize,
        size: usize,
    ) -> Result<usize> {
        if weight_sets.is_empty() {
            return Ok(0);
        }
        self.train = None; // the training plan's device memory first
        let gpu = &self.gpu;
        let mut nets = weight_sets
            .iter()
            .map(|w| GpuNet::for_inference(gpu, net, w))
            .collect::<Result<Vec<_>>>()?;
        let mut ws = nets[0].workspace(gpu, n, size, size, true)?;
        let mut used = 0;
        for x in batches {
            // Momentum 1/(t + 1), as the CPU engine: the first batch replaces, each later one
            // joins the average.
            let mode = Mode::Train {
                bn_momentum: 1.0 / (used + 1) as f32,
                stochastic: false,
            };
            nets[0].write_input(gpu, &mut ws, &x)?;
            for g in &mut nets {
                g.forward(gpu, &mut ws, mode, &mut Rng::new(0))?;
            }
            used += 1;
        }
        for (w, g) in weight_sets.iter_mut().zip(nets) {
            w.buffers = gpu.read(&g.buffers, net.layout.buffer_len)?;
            w.tracked = g.tracked;
        }
        Ok(used)
    }

    /// New replicas: the training plan, its graphs and the gradient route go (chosen again,
    /// together, at the next pass).
    fn replan(&mut self) {
        self.train = None;
        self.exchange = Exchange::default();
    }

    fn holds_state(&self) -> bool {
        true
    }

    fn write_state(&mut self, state: StateRef<'_>) -> Result<()> {
        self.state = None;
        self.state = Some(DeviceState::new(&self.gpu, &mut self.net, state)?);
        Ok(())
    }

    fn read_state(&mut self, state: StateMut<'_>) -> Result<()> {
        self.state
            .as_ref()
            .ok_or("no training state on the GPU")?
            .read(&self.gpu, &self.net, state)
    }

    fn update(&mut self, update: &Update<'_>) -> Result<Stepped> {
        let state = self.state.as_mut().ok_or("no training state on the GPU")?;
        let Some(ls) = &mut self.loss_scale else {
            return state.update(&self.gpu, &mut self.net, update, &mut self.exchange, false);
        };
        let unscaled = Update {
            grad_scale: update.grad_scale / ls.scale,
            ..*update
        };
        let stepped = state.update(
            &self.gpu,
            &mut self.net,
            &unscaled,
            &mut self.exchange,
            true,
        )?;
        ls.after(stepped.applied);
        if !stepped.applied && update.replicas.comm.rank() == 0 {
            eprintln!(
                "effnet: f16 gradients overflowed: step skipped, loss scale now {}",
                ls.scale
            );
        }
        Ok(stepped)
    }

    fn discard_gradients(&mut self) -> Result<()> {
        self.net.zero_grads(&self.gpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_scale_halves_on_overflow_and_doubles_after_2000_good_steps() {
        let mut ls = LossScale::new(LossScale::INITIAL);
        ls.after(false);
        assert_eq!(ls.scale, 16384.0);
        for _ in 0..1999 {
            ls.after(true);
        }
        assert_eq!(ls.scale, 16384.0, "not yet");
        ls.after(true);
        assert_eq!(ls.scale, 32768.0);
        // An overflow restarts the count.
        for _ in 0..1000 {
            ls.after(true);
        }
        ls.after(false);
        for _ in 0..1999 {
            ls.after(true);
        }
        assert_eq!(ls.scale, 16384.0);
        let mut low = LossScale::new(1.0);
        low.after(false);
        assert_eq!(low.scale, 1.0, "never below 1");
    }
}
