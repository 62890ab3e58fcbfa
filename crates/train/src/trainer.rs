//! One training run's state and its step: forward in training mode, label-smoothed (or soft)
//! cross-entropy, backward, gradients accumulated over K micro-batches and averaged, averaged
//! again over the replicas of a data-parallel run (one all-reduce), then one optimizer step at
//! the scheduled rate and the EMA update.

use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

use effnet_dist::{Communicator, Single};
use effnet_engine::loss;
use effnet_engine::norm::CrossReplica;
use effnet_engine::rng::Rng;
use effnet_model::{Mode, Network, Weights, Workspace};

use crate::ema::Ema;
use crate::optim::{self, Kind, Optimizer, CHUNK};
use crate::schedule::Schedule;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Micro-batches averaged into one optimizer step.
    pub accumulation: usize,
    pub label_smoothing: f32,
    /// Keras convention (the reference's 0.99): running ← m·running + (1 − m)·batch.
    pub bn_momentum: f32,
    pub optimizer: Kind,
    pub weight_decay: f32,
    pub schedule: Schedule,
    /// EMA decay; `None` turns EMA off.
    pub ema_decay: Option<f64>,
    /// Scale the step's (averaged) gradient down to this global L2 norm when above (0: off).
    pub grad_clip_norm: f32,
    pub seed: u64,
}

/// What one micro-batch gave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroResult {
    /// Non-finite when this micro-batch's loss was: its gradients are dropped.
    pub loss: f32,
    /// Images whose top-1 class equals the target's most probable class.
    pub correct: usize,
    /// Whether this micro-batch completed an optimizer step.
    pub stepped: bool,
    /// The step it completed was skipped: a micro-batch of it, on some replica, had a non-finite
    /// loss (as a dynamic loss scale skips a step), or its scaled gradients overflowed on the
    /// device (`overflow`), so no weight moved.
    pub skipped: bool,
    /// The skip was the device's: f16 loss scaling found the gradients non-finite, lowered its
    /// scale and took no step (the usual, early in a run).
    pub overflow: bool,
}

/// How an optimizer step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepOutcome {
    Applied,
    NonFiniteLoss,
    Overflow,
}

/// What [`Passes::update`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stepped {
    /// Seconds spent exchanging gradients.
    pub exchange_seconds: f64,
    /// False when the device found the (loss-scaled) gradients non-finite and took no step.
    pub applied: bool,
}

/// How the replicas of a data-parallel run cooperate (one process: [`Replicas::single`]).
#[derive(Clone)]
pub struct Replicas {
    pub comm: Arc<dyn Communicator>,
    /// Batch norm with the statistics of the global batch (one all-reduce per BN layer and pass).
    pub sync_bn: bool,
    /// Gradients exchanged as f16 (Horovod's fp16 compression): half the bytes, f16 rounding.
    pub fp16_gradients: bool,
}

impl Replicas {
    pub fn single() -> Replicas {
        Replicas {
            comm: Arc::new(Single),
            sync_bn: false,
            fp16_gradients: false,
        }
    }
}

/// Where a micro-batch's forward and backward passes run: the CPU engine ([`CpuPasses`], the
/// default) or a device the command adds (the GPU, with its `cuda` feature). The trainer keeps
/// the weights, optimizer and EMA on the host unless the passes hold them
/// ([`Passes::holds_state`]).
pub trait Passes {
    /// Training-mode forward of `n` NHWC images of `size`²: the logits. `weights`' running
    /// statistics and batch counters move.
    #[allow(clippy::too_many_arguments)]
    fn train_forward(
        &mut self,
        net: &Network,
        weights: &mut Weights,
        images: &[f32],
        n: usize,
        size: usize,
        mode: Mode,
        rng: &mut Rng,
        replicas: &Replicas,
    ) -> Result<Vec<f32>, String>;

    /// The backward pass of the last [`Passes::train_forward`]: adds every parameter's
    /// gradient of the loss into `grads`.
    fn backward(
        &mut self,
        net: &Network,
        weights: &Weights,
        dlogits: &[f32],
        grads: &mut [f32],
    ) -> Result<(), String>;

    /// Sets the weights that the following [`Passes::eval_logits`] calls evaluate: passes on a
    /// device copy them there once, here, rather than at every batch.
    fn load_eval_weights(&mut self, _net: &Network, _weights: &Weights) -> Result<(), String> {
        Ok(())
    }

    /// Eval-mode logits of `n` NHWC images of `size`², with `weights`: those of the last
    /// [`Passes::load_eval_weights`], unchanged since ([`Evaluator`] sees to it).
    fn eval_logits(
        &mut self,
        net: &Network,
        weights: &mut Weights,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>, String>;

    /// "Precise BN" ([`Network::recompute_bn_stats`]): each of `weight_sets`' running
    /// statistics replaced by their average over `batches` of `n` NHWC images of `size`², in
    /// training mode without dropout or drop-path. Returns how many batches were used.
    fn recompute_bn_stats(
        &mut self,
        net: &Network,
        weight_sets: &mut [&mut Weights],
        batches: &mut dyn Iterator<Item = Vec<f32>>,
        n: usize,
        size: usize,
    ) -> Result<usize, String> {
        let mut ws = net.workspace(n, size, size);
        Ok(net.recompute_bn_stats(weight_sets, &mut ws, batches))
    }

    /// Drops what was planned for the previous replicas (synchronized BN's hook).
    fn replan(&mut self) {}

    /// Whether these passes keep the parameters, their gradients, the optimizer's slots and the
    /// EMA on their own device. The trainer then leaves [`Passes::backward`]'s `grads` empty,
    /// has the device take each optimizer step ([`Passes::update`]), and copies the state
    /// across only when it changes sides: [`Passes::write_state`] after a start, resume or
    /// broadcast, [`Passes::read_state`] before a checkpoint or an evaluation. The BN running
    /// statistics stay the host's: the passes read them back after every training forward.
    fn holds_state(&self) -> bool {
        false
    }

    /// Replaces the device's parameters, optimizer slots and EMA with the host's.
    fn write_state(&mut self, _state: StateRef<'_>) -> Result<(), String> {
        Err(NOT_HELD.into())
    }

    /// Copies the device's parameters, optimizer slots and EMA to the host.
    fn read_state(&mut self, _state: StateMut<'_>) -> Result<(), String> {
        Err(NOT_HELD.into())
    }

    /// One optimizer step on the device from the gradients accumulated since the last one:
    /// scaled by `grad_scale`, averaged over the replicas, clipped, applied, then the EMA (the
    /// trainer zeroes the gradients after, with [`Passes::discard_gradients`]). A device that
    /// scales the loss may find the gradients non-finite and take no step
    /// ([`Stepped::applied`]).
    fn update(&mut self, _update: &Update<'_>) -> Result<Stepped, String> {
        Err(NOT_HELD.into())
    }

    /// Zeroes the gradients accumulated on the device (after a step, or a skipped one).
    fn discard_gradients(&mut self) -> Result<(), String> {
        Err(NOT_HELD.into())
    }
}

const NOT_HELD: &str = "these passes keep no training state";

/// The training state a device can hold, as the host has it.
pub struct StateRef<'a> {
    pub params: &'a [f32],
    pub optimizer: &'a Optimizer,
    pub ema: Option<&'a Ema>,
}

/// Where the device's training state is copied back to.
pub struct StateMut<'a> {
    pub params: &'a mut [f32],
    pub optimizer: &'a mut Optimizer,
    pub ema: Option<&'a mut Ema>,
}

/// What one optimizer step on the device needs (see [`Passes::update`]).
pub struct Update<'a> {
    /// The optimizer's kind, weight decay and `step`, already counting this update.
    pub optimizer: &'a Optimizer,
    pub lr: f32,
    /// 1 / micro-batches accumulated.
    pub grad_scale: f32,
    /// Global L2 norm to clip the averaged gradient to (0: off).
    pub clip_norm: f32,
    /// The EMA's decay for this step; `None` without EMA.
    pub ema_decay: Option<f32>,
    pub replicas: &'a Replicas,
}

/// The CPU engine's passes, over workspaces planned per (batch, resolution).
#[derive(Default)]
pub struct CpuPasses {
    workspace: Option<((usize, usize), Workspace)>,
    eval_workspace: Option<((usize, usize), Workspace)>,
}

impl Passes for CpuPasses {
    fn train_forward(
        &mut self,
        net: &Network,
        weights: &mut Weights,
        images: &[f32],
        n: usize,
        size: usize,
        mode: Mode,
        rng: &mut Rng,
        replicas: &Replicas,
    ) -> Result<Vec<f32>, String> {
        let ws = planned(&mut self.workspace, net, n, size, true);
        if replicas.sync_bn && replicas.comm.size() > 1 && ws.replica_sum.is_none() {
            let comm = replicas.comm.clone();
            ws.replica_sum = Some(CrossReplica(Arc::new(move |v: &mut [f64]| {
                // A failed collective leaves the replicas out of step; nothing can continue.
                if let Err(e) = comm.all_reduce_sum_f64(v) {
                    panic!("synchronized batch norm: {e}");
                }
            })));
        }
        Ok(net.forward(weights, ws, images, mode, rng).to_vec())
    }

    fn backward(
        &mut self,
        net: &Network,
        weights: &Weights,
        dlogits: &[f32],
        grads: &mut [f32],
    ) -> Result<(), String> {
        let (_, ws) = self
            .workspace
            .as_mut()
            .ok_or("backward before a training forward pass")?;
        net.backward(weights, ws, dlogits, grads);
        Ok(())
    }

    fn eval_logits(
        &mut self,
        net: &Network,
        weights: &mut Weights,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>, String> {
        let ws = planned(&mut self.eval_workspace, net, n, size, false);
        Ok(net
            .forward(weights, ws, images, Mode::Eval, &mut Rng::new(0))
            .to_vec())
    }

    fn replan(&mut self) {
        *self = CpuPasses::default();
    }
}

pub struct Trainer {
    pub net: Network,
    pub weights: Weights,
    pub config: TrainConfig,
    pub optimizer: Optimizer,
    pub ema: Option<Ema>,
    /// Micro-batches accumulated since the last optimizer step.
    pub pending: usize,
    pub grads: Vec<f32>,
    pub rng: Rng,
    pub replicas: Replicas,
    /// Seconds spent exchanging gradients (the all-reduce), for scaling measurements.
    pub exchange_seconds: f64,
    /// A micro-batch of the pending step had a non-finite loss.
    pending_bad: bool,
    /// Where the passes run (the CPU engine unless [`Trainer::set_passes`] says otherwise).
    passes: Box<dyn Passes>,
    /// With passes that hold the state: the device's parameters, slots or EMA are newer than
    /// the host's (a step was taken there) ...
    host_stale: bool,
    /// ... or the host's are newer than the device's (a start, resume or broadcast).
    device_stale: bool,
}

/// The workspace in `slot` for (n, size), planned anew when the shape changed (a new batch size
/// or a progressive stage's resolution).
fn planned<'a>(
    slot: &'a mut Option<((usize, usize), Workspace)>,
    net: &Network,
    n: usize,
    size: usize,
    training: bool,
) -> &'a mut Workspace {
    if slot.as_ref().map(|(k, _)| *k) != Some((n, size)) {
        let ws = if training {
            net.workspace(n, size, size)
        } else {
            net.inference_workspace(n, size, size)
        };
        *slot = Some(((n, size), ws));
    }
    &mut slot.as_mut().expect("just planned").1
}

impl Trainer {
    pub fn new(net: Network, weights: Weights, config: TrainConfig) -> Trainer {
        let optimizer = Optimizer::new(config.optimizer, config.weight_decay, &net.layout);
        let ema = config.ema_decay.map(|d| Ema::new(&weights, d));
        let grads = vec![0f32; weights.params.len()];
        let rng = Rng::new(config.seed);
        Trainer {
            net,
            weights,
            config,
            optimizer,
            ema,
            pending: 0,
            grads,
            rng,
            replicas: Replicas::single(),
            exchange_seconds: 0.0,
            pending_bad: false,
            passes: Box::new(CpuPasses::default()),
            host_stale: false,
            device_stale: false,
        }
    }

    /// Runs the forward and backward passes on `passes` from here on (between optimizer steps,
    /// with the host's state current). Passes that hold the training state get it now, and the
    /// host's gradient buffer is dropped: the device accumulates the gradients.
    pub fn set_passes(&mut self, passes: Box<dyn Passes>) -> Result<(), String> {
        self.sync_host()?;
        self.passes = passes;
        self.grads = if self.passes.holds_state() {
            Vec::new()
        } else {
            vec![0f32; self.weights.params.len()]
        };
        self.device_stale = self.passes.holds_state();
        self.discard_pending()
    }

    /// Brings the device's newer parameters, optimizer slots and EMA to the host (a no-op when
    /// the host's are current). Whatever reads the host's state calls it first.
    pub fn sync_host(&mut self) -> Result<(), String> {
        if self.host_stale {
            self.passes.read_state(StateMut {
                params: &mut self.weights.params,
                optimizer: &mut self.optimizer,
                ema: self.ema.as_mut(),
            })?;
            self.host_stale = false;
        }
        Ok(())
    }

    /// Marks the host's state (`weights.params`, `optimizer`, `ema`) as newer than the
    /// device's: it is written there before the next pass. A resume and a broadcast call it;
    /// so must anything else that changes those fields while passes hold the state.
    pub fn host_state_changed(&mut self) {
        self.host_stale = false;
        self.device_stale = self.passes.holds_state();
    }

    fn sync_device(&mut self) -> Result<(), String> {
        if self.device_stale {
            self.passes.write_state(StateRef {
                params: &self.weights.params,
                optimizer: &self.optimizer,
                ema: self.ema.as_ref(),
            })?;
            self.device_stale = false;
        }
        Ok(())
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.optimizer.step
    }

    /// Joins a data-parallel run: every collective call from here on spans `replicas`.
    pub fn set_replicas(&mut self, replicas: Replicas) {
        self.replicas = replicas;
        self.passes.replan();
    }

    /// One micro-batch of `n` NHWC images with soft `targets` (`[n, classes]`; see
    /// [`smoothed`]). A non-finite loss restores the running statistics, drops this micro-batch's
    /// gradients and makes the step it belongs to a skipped one (on every replica).
    pub fn micro_step(
        &mut self,
        images: &[f32],
        n: usize,
        size: usize,
        targets: &[f32],
    ) -> Result<MicroResult, String> {
        let classes = self.net.classes;
        let mode = Mode::Train {
            bn_momentum: 1.0 - self.config.bn_momentum,
            stochastic: true,
        };
        // Dropout and drop-path masks: a stream per (step, micro-batch), so a run is reproducible.
        let mut rng = self
            .rng
            .fork(self.optimizer.step * 1_000 + self.pending as u64);
        self.sync_device()?;
        // The forward pass moves the BN running statistics; keep them to undo a bad step (they
        // are small: two values per channel).
        let (buffers, tracked) = (self.weights.buffers.clone(), self.weights.tracked.clone());
        let logits = self.passes.train_forward(
            &self.net,
            &mut self.weights,
            images,
            n,
            size,
            mode,
            &mut rng,
            &self.replicas,
        )?;
        let mut dlogits = vec![0f32; logits.len()];
        let value = loss::softmax_cross_entropy(&logits, classes, targets, &mut dlogits);
        if value.is_finite() {
            self.passes
                .backward(&self.net, &self.weights, &dlogits, &mut self.grads)?;
        } else {
            self.weights.buffers = buffers;
            self.weights.tracked = tracked;
            self.pending_bad = true;
            if self.replicas.sync_bn && self.replicas.comm.size() > 1 {
                // Synchronized BN's backward is collective: take part, with no gradient.
                dlogits.fill(0.0);
                // (Passes holding the state accumulate zeros: the step is discarded anyway.)
                let mut discard = vec![0f32; self.grads.len()];
                self.passes
                    .backward(&self.net, &self.weights, &dlogits, &mut discard)?;
            }
        }
        let correct = logits
            .chunks_exact(classes)
            .zip(targets.chunks_exact(classes))
            .filter(|(z, t)| argmax(z) == argmax(t))
            .count();
        self.pending += 1;
        let stepped = self.pending == self.config.accumulation.max(1);
        let outcome = match stepped {
            true => self.apply_step()?,
            false => StepOutcome::Applied,
        };
        Ok(MicroResult {
            loss: value,
            correct,
            stepped,
            skipped: outcome != StepOutcome::Applied,
            overflow: outcome == StepOutcome::Overflow,
        })
    }

    /// Averages the accumulated gradients over micro-batches and replicas and takes one
    /// optimizer step, unless a micro-batch's loss was non-finite or the device's gradients
    /// overflowed.
    fn apply_step(&mut self) -> Result<StepOutcome, String> {
        let comm = self.replicas.comm.clone();
        let mut bad = [self.pending_bad as u8 as f64];
        if comm.size() > 1 {
            comm.all_reduce_sum_f64(&mut bad)?;
        }
        if bad[0] > 0.0 {
            self.discard_pending()?;
            return Ok(StepOutcome::NonFiniteLoss);
        }
        let scale = 1.0 / self.config.accumulation.max(1) as f32;
        let lr = self.config.schedule.at(self.optimizer.step) as f32;
        if self.passes.holds_state() {
            self.optimizer.step += 1;
            let step = self.optimizer.step;
            self.host_stale = true;
            let stepped = self.passes.update(&Update {
                optimizer: &self.optimizer,
                lr,
                grad_scale: scale,
                clip_norm: self.config.grad_clip_norm,
                ema_decay: self.ema.as_ref().map(|e| e.decay_at(step) as f32),
                replicas: &self.replicas,
            })?;
            self.exchange_seconds += stepped.exchange_seconds;
            self.discard_pending()?;
            if !stepped.applied {
                // Not a step: the schedule and the EMA's warm-up do not advance.
                self.optimizer.step -= 1;
                return Ok(StepOutcome::Overflow);
            }
            return Ok(StepOutcome::Applied);
        }
        if scale != 1.0 {
            self.grads
                .par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|g| *g *= scale));
        }
        if comm.size() > 1 {
            let t = Instant::now();
            if self.replicas.fp16_gradients {
                comm.all_reduce_mean_f16(&mut self.grads)?;
            } else {
                comm.all_reduce_mean_f32(&mut self.grads)?;
            }
            self.exchange_seconds += t.elapsed().as_secs_f64();
        }
        if self.config.grad_clip_norm > 0.0 {
            optim::clip_global_norm(&mut self.grads, self.config.grad_clip_norm);
        }
        self.optimizer
            .apply(&mut self.weights.params, &self.grads, lr);
        if let Some(ema) = &mut self.ema {
            ema.update(&self.weights, self.optimizer.step);
        }
        self.discard_pending()?;
        Ok(StepOutcome::Applied)
    }

    /// Makes every replica start from rank 0's state: weights, running statistics, optimizer
    /// slots and step, EMA (after a fresh start or a resume on rank 0).
    pub fn broadcast_state(&mut self) -> Result<(), String> {
        let comm = self.replicas.comm.clone();
        if comm.size() == 1 {
            return Ok(());
        }
        self.sync_host()?;
        comm.broadcast_f32(&mut self.weights.params, 0)?;
        comm.broadcast_f32(&mut self.weights.buffers, 0)?;
        comm.broadcast_f32(&mut self.optimizer.slot_a, 0)?;
        comm.broadcast_f32(&mut self.optimizer.slot_b, 0)?;
        if let Some(ema) = &mut self.ema {
            comm.broadcast_f32(&mut ema.params, 0)?;
            comm.broadcast_f32(&mut ema.buffers, 0)?;
        }
        let mut counters: Vec<u8> = self
            .weights
            .tracked
            .iter()
            .chain([&(self.optimizer.step as i64)])
            .flat_map(|v| v.to_le_bytes())
            .collect();
        comm.broadcast_bytes(&mut counters, 0)?;
        let values: Vec<i64> = counters
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let (step, tracked) = values.split_last().ok_or("empty state broadcast")?;
        self.weights.tracked = tracked.to_vec();
        self.optimizer.step = *step as u64;
        self.host_state_changed();
        self.discard_pending()
    }

    /// Drops the micro-batches accumulated since the last optimizer step: their gradients
    /// (zeroed over the pool: one thread's memset per step was a few percent of a small
    /// model's step; on the device when it holds them), their count and their non-finite flag.
    pub(crate) fn discard_pending(&mut self) -> Result<(), String> {
        if self.passes.holds_state() {
            self.passes.discard_gradients()?;
        }
        self.grads.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
        self.pending = 0;
        self.pending_bad = false;
        Ok(())
    }

    /// The weights to evaluate: the EMA's when `use_ema` and EMA is on, else the raw ones
    /// (brought from the device first when it holds them).
    pub fn evaluation_weights(&mut self, use_ema: bool) -> Result<Weights, String> {
        self.sync_host()?;
        Ok(match (&self.ema, use_ema) {
            (Some(ema), true) => ema.weights(&self.weights),
            _ => self.weights.clone(),
        })
    }

    /// [`Passes::recompute_bn_stats`] where the passes run.
    pub fn recompute_bn_stats(
        &mut self,
        weight_sets: &mut [&mut Weights],
        batches: &mut dyn Iterator<Item = Vec<f32>>,
        n: usize,
        size: usize,
    ) -> Result<usize, String> {
        self.passes
            .recompute_bn_stats(&self.net, weight_sets, batches, n, size)
    }

    /// Evaluation passes with `weights` (from [`Trainer::evaluation_weights`]), borrowed and so
    /// unchanged while the evaluator lives: passes on a device copy them there once.
    pub fn evaluator<'a>(&'a mut self, weights: &'a mut Weights) -> Result<Evaluator<'a>, String> {
        self.passes.load_eval_weights(&self.net, weights)?;
        Ok(Evaluator {
            trainer: self,
            weights,
        })
    }
}

/// Eval-mode passes of one set of weights ([`Trainer::evaluator`]).
pub struct Evaluator<'a> {
    trainer: &'a mut Trainer,
    weights: &'a mut Weights,
}

impl Evaluator<'_> {
    /// Eval-mode logits of `n` NHWC images of `size`².
    pub fn logits(&mut self, images: &[f32], n: usize, size: usize) -> Result<Vec<f32>, String> {
        let t = &mut *self.trainer;
        t.passes.eval_logits(&t.net, self.weights, images, n, size)
    }
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Label-smoothed one-hot targets for hard labels.
pub fn smoothed(labels: &[usize], classes: usize, smoothing: f32) -> Vec<f32> {
    let mut t = vec![0f32; labels.len() * classes];
    loss::smoothed_targets(labels, classes, smoothing, &mut t);
    t
}
