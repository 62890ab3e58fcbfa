//! One training run's state and its step: forward in training mode, label-smoothed (or soft)
//! cross-entropy, backward, gradients accumulated over K micro-batches and averaged, then one
//! optimizer step at the scheduled rate and the EMA update.

use effnet_engine::loss;
use effnet_engine::rng::Rng;
use effnet_model::{Mode, Network, Weights, Workspace};

use crate::ema::Ema;
use crate::optim::{Kind, Optimizer};
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
    pub seed: u64,
}

/// What one micro-batch gave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroResult {
    pub loss: f32,
    /// Images whose top-1 class equals the target's most probable class.
    pub correct: usize,
    /// Whether this micro-batch completed an optimizer step.
    pub stepped: bool,
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
    workspace: Option<((usize, usize), Workspace)>,
    eval_workspace: Option<((usize, usize), Workspace)>,
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
            workspace: None,
            eval_workspace: None,
        }
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.optimizer.step
    }

    /// One micro-batch of `n` NHWC images with soft `targets` (`[n, classes]`; see
    /// [`smoothed`]). A non-finite loss leaves the weights (running statistics included) and the
    /// accumulated gradients untouched and returns an error.
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
        // The forward pass moves the BN running statistics; keep them to undo a bad step (they
        // are small: two values per channel).
        let (buffers, tracked) = (self.weights.buffers.clone(), self.weights.tracked.clone());
        let ws = planned(&mut self.workspace, &self.net, n, size, true);
        let logits = self
            .net
            .forward(&mut self.weights, ws, images, mode, &mut rng)
            .to_vec();
        let mut dlogits = vec![0f32; logits.len()];
        let value = loss::softmax_cross_entropy(&logits, classes, targets, &mut dlogits);
        if !value.is_finite() {
            self.weights.buffers = buffers;
            self.weights.tracked = tracked;
            return Err(format!(
                "non-finite loss ({value}) at step {}: step skipped",
                self.optimizer.step
            ));
        }
        self.net
            .backward(&self.weights, ws, &dlogits, &mut self.grads);
        let correct = logits
            .chunks_exact(classes)
            .zip(targets.chunks_exact(classes))
            .filter(|(z, t)| argmax(z) == argmax(t))
            .count();
        self.pending += 1;
        let stepped = self.pending == self.config.accumulation.max(1);
        if stepped {
            self.apply_step();
        }
        Ok(MicroResult {
            loss: value,
            correct,
            stepped,
        })
    }

    /// Averages the accumulated gradients and takes one optimizer step.
    fn apply_step(&mut self) {
        let scale = 1.0 / self.pending as f32;
        self.grads.iter_mut().for_each(|g| *g *= scale);
        let lr = self.config.schedule.at(self.optimizer.step) as f32;
        self.optimizer
            .apply(&mut self.weights.params, &self.grads, lr);
        if let Some(ema) = &mut self.ema {
            ema.update(&self.weights, self.optimizer.step);
        }
        self.grads.fill(0.0);
        self.pending = 0;
    }

    /// The weights to evaluate: the EMA's when `use_ema` and EMA is on, else the raw ones.
    pub fn evaluation_weights(&self, use_ema: bool) -> Weights {
        match (&self.ema, use_ema) {
            (Some(ema), true) => ema.weights(&self.weights),
            _ => self.weights.clone(),
        }
    }

    /// Eval-mode logits of `n` NHWC images with `weights` (from [`Trainer::evaluation_weights`]).
    pub fn eval_logits(
        &mut self,
        weights: &mut Weights,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Vec<f32> {
        let ws = planned(&mut self.eval_workspace, &self.net, n, size, false);
        self.net
            .forward(weights, ws, images, Mode::Eval, &mut Rng::new(0))
            .to_vec()
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
