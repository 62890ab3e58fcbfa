//! Passes that hold the training state on their device (the GPU's way): the trainer must hand
//! the state over and back at the right moments, so that a run gives the same bits as with the
//! host holding it — through accumulation, a skipped step, clipping, a checkpoint and a resume.
//! The "device" here is a second copy in host memory, updated by the CPU's own rules.

mod common;

use common::{batch, config, tiny};
use effnet_engine::rng::Rng;
use effnet_model::{Mode, Network, Weights};
use effnet_train::checkpoint::{self, RunState};
use effnet_train::ema::Ema;
use effnet_train::optim::{self, Optimizer};
use effnet_train::trainer::{
    smoothed, CpuPasses, Passes, Replicas, StateMut, StateRef, Stepped, Trainer, Update,
};

/// The CPU passes over a state of their own, which the trainer never sees directly.
struct Held {
    cpu: CpuPasses,
    /// The device's parameters (None until the trainer writes them).
    params: Option<Vec<f32>>,
    grads: Vec<f32>,
    /// The running statistics the last training forward left (on the device as on the host).
    buffers: Vec<f32>,
    optimizer: Option<Optimizer>,
    ema: Option<Ema>,
    /// The weights evaluations read, copied in once per evaluation as a GPU does.
    eval_weights: Option<Weights>,
    /// Updates refused as a loss-scaling device refuses overflowing gradients.
    refuse: usize,
}

impl Held {
    fn new() -> Held {
        Held {
            cpu: CpuPasses::default(),
            params: None,
            grads: Vec::new(),
            buffers: Vec::new(),
            optimizer: None,
            ema: None,
            eval_weights: None,
            refuse: 0,
        }
    }

    /// The host's weights with the device's parameters in them.
    fn device_weights(&self, host: &Weights) -> Result<Weights, String> {
        Ok(Weights {
            params: self.params.clone().ok_or("no state written")?,
            ..host.clone()
        })
    }
}

impl Passes for Held {
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
        let mut w = self.device_weights(weights)?;
        let logits = self
            .cpu
            .train_forward(net, &mut w, images, n, size, mode, rng, replicas)?;
        // The running statistics stay the host's.
        self.buffers.clone_from(&w.buffers);
        weights.buffers = w.buffers;
        weights.tracked = w.tracked;
        Ok(logits)
    }

    fn backward(
        &mut self,
        net: &Network,
        weights: &Weights,
        dlogits: &[f32],
        grads: &mut [f32],
    ) -> Result<(), String> {
        assert!(grads.is_empty(), "the host keeps no gradients");
        let w = self.device_weights(weights)?;
        self.cpu.backward(net, &w, dlogits, &mut self.grads)
    }

    fn load_eval_weights(&mut self, _net: &Network, weights: &Weights) -> Result<(), String> {
        self.eval_weights = Some(weights.clone());
        Ok(())
    }

    /// Evaluates the copy loaded, not `weights`, as a device does.
    fn eval_logits(
        &mut self,
        net: &Network,
        _weights: &mut Weights,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>, String> {
        let w = self
            .eval_weights
            .as_mut()
            .ok_or("no evaluation weights loaded")?;
        self.cpu.eval_logits(net, w, images, n, size)
    }

    fn holds_state(&self) -> bool {
        true
    }

    fn write_state(&mut self, state: StateRef<'_>) -> Result<(), String> {
        self.params = Some(state.params.to_vec());
        self.grads = vec![0.0; state.params.len()];
        self.optimizer = Some(state.optimizer.clone());
        self.ema = state.ema.cloned();
        Ok(())
    }

    fn read_state(&mut self, state: StateMut<'_>) -> Result<(), String> {
        state
            .params
            .copy_from_slice(self.params.as_ref().ok_or("no state")?);
        let opt = self.optimizer.as_ref().ok_or("no state")?;
        state.optimizer.slot_a.clone_from(&opt.slot_a);
        state.optimizer.slot_b.clone_from(&opt.slot_b);
        if let (Some(host), Some(dev)) = (state.ema, &self.ema) {
            host.params.clone_from(&dev.params);
            host.buffers.clone_from(&dev.buffers);
        }
        Ok(())
    }

    fn update(&mut self, u: &Update<'_>) -> Result<Stepped, String> {
        if self.refuse > 0 {
            self.refuse -= 1;
            return Ok(Stepped {
                exchange_seconds: 0.0,
                applied: false,
            });
        }
        let params = self.params.as_mut().ok_or("no state")?;
        let opt = self.optimizer.as_mut().ok_or("no state")?;
        self.grads.iter_mut().for_each(|g| *g *= u.grad_scale);
        if u.clip_norm > 0.0 {
            optim::clip_global_norm(&mut self.grads, u.clip_norm);
        }
        opt.step = u.optimizer.step - 1; // apply counts this step
        opt.apply(params, &self.grads, u.lr);
        if let Some(ema) = &mut self.ema {
            assert_eq!(u.ema_decay, Some(ema.decay_at(u.optimizer.step) as f32));
            let current = Weights {
                params: params.clone(),
                buffers: self.buffers.clone(),
                tracked: vec![],
            };
            ema.update(&current, u.optimizer.step);
        }
        Ok(Stepped {
            exchange_seconds: 0.0,
            applied: true,
        })
    }

    fn discard_gradients(&mut self) -> Result<(), String> {
        self.grads.fill(0.0);
        Ok(())
    }
}

#[test]
fn a_device_holding_the_state_trains_bit_for_bit_as_the_host() {
    let net = tiny(0.2);
    let w = Weights::init(&net, 4);
    let mut cfg = config(2, 0.02);
    cfg.grad_clip_norm = 0.5;
    let batches: Vec<(Vec<f32>, Vec<usize>)> = {
        let mut rng = Rng::new(8);
        (0..12)
            .map(|i| {
                let (mut x, y) = batch(&mut rng, 6);
                if i == 5 {
                    x[3] = f32::NAN; // step 3 (micro-batches 4 and 5) is skipped
                }
                (x, y)
            })
            .collect()
    };
    let run = |t: &mut Trainer, range: std::ops::Range<usize>| -> Vec<(u32, bool)> {
        batches[range]
            .iter()
            .map(|(x, y)| {
                let r = t.micro_step(x, 6, 12, &smoothed(y, 3, 0.1)).unwrap();
                (r.loss.to_bits(), r.skipped)
            })
            .collect()
    };
    let mut host = Trainer::new(net.clone(), w.clone(), cfg.clone());
    let host_results = run(&mut host, 0..12);
    assert!(host_results.iter().any(|r| r.1), "one step skipped");

    let dir = std::env::temp_dir().join(format!("effnet-held-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ckpt.safetensors");
    let mut device = Trainer::new(net.clone(), w.clone(), cfg.clone());
    device.set_passes(Box::new(Held::new())).unwrap();
    assert!(device.grads.is_empty());
    let mut results = run(&mut device, 0..8);
    assert_eq!(device.weights.params, w.params, "the host's copy waits");
    let at = RunState {
        epoch: 0,
        batch_in_epoch: 4,
    };
    checkpoint::save(&path, &mut device, at).unwrap();
    // The evaluation weights are the device's, read back once (the checkpoint did it).
    let ema_weights = device.evaluation_weights(true).unwrap();
    drop(device);

    let mut resumed = Trainer::new(net.clone(), Weights::init(&net, 77), cfg);
    resumed.set_passes(Box::new(Held::new())).unwrap();
    assert_eq!(checkpoint::load(&path, &mut resumed).unwrap(), at);
    results.extend(run(&mut resumed, 8..12));
    assert_eq!(
        results, host_results,
        "the same losses, the same step skipped"
    );
    resumed.sync_host().unwrap();
    assert_eq!(resumed.weights, host.weights, "bit-exact");
    assert_eq!(resumed.optimizer, host.optimizer);
    assert_eq!(resumed.ema, host.ema);
    assert_eq!(resumed.step(), 5);

    // Evaluations, raw then EMA weights, each loaded onto the "device" once.
    let (x, _) = &batches[0];
    for use_ema in [false, true] {
        let mut on_device = resumed.evaluation_weights(use_ema).unwrap();
        let mut on_host = host.evaluation_weights(use_ema).unwrap();
        let mut device_eval = resumed.evaluator(&mut on_device).unwrap();
        let mut host_eval = host.evaluator(&mut on_host).unwrap();
        for _ in 0..2 {
            assert_eq!(
                device_eval.logits(x, 6, 12).unwrap(),
                host_eval.logits(x, 6, 12).unwrap(),
                "use_ema={use_ema}"
            );
        }
    }

    let mut straight = Trainer::new(net.clone(), w, config(2, 0.02));
    straight.config.grad_clip_norm = 0.5;
    run(&mut straight, 0..8);
    assert_eq!(ema_weights.params, straight.ema.as_ref().unwrap().params);
    std::fs::remove_dir_all(dir).unwrap();
}

/// An update the device refuses (f16 loss scaling's overflow) is a skipped step: not counted,
/// no weight moved, so the run goes on as if that micro-batch had not been trained on.
#[test]
fn a_step_the_device_refuses_is_skipped_and_not_counted() {
    let net = tiny(0.2);
    let w = Weights::init(&net, 4);
    let mut rng = Rng::new(8);
    let batches: Vec<(Vec<f32>, Vec<usize>)> = (0..3).map(|_| batch(&mut rng, 6)).collect();
    let mut device = Trainer::new(net.clone(), w.clone(), config(1, 0.02));
    let mut held = Held::new();
    held.refuse = 1;
    device.set_passes(Box::new(held)).unwrap();
    let results: Vec<_> = batches
        .iter()
        .map(|(x, y)| device.micro_step(x, 6, 12, &smoothed(y, 3, 0.1)).unwrap())
        .collect();
    assert!(
        results[0].skipped && results[0].overflow,
        "{:?}",
        results[0]
    );
    assert!(results[1..].iter().all(|r| !r.skipped && !r.overflow));
    assert_eq!(device.step(), 2);
    // The same parameters, slots and EMA as a run that never saw the first batch.
    let mut host = Trainer::new(net.clone(), w, config(1, 0.02));
    for (x, y) in &batches[1..] {
        host.micro_step(x, 6, 12, &smoothed(y, 3, 0.1)).unwrap();
    }
    device.sync_host().unwrap();
    assert_eq!(device.weights.params, host.weights.params);
    assert_eq!(device.optimizer, host.optimizer);
    assert_eq!(
        device.ema.as_ref().map(|e| &e.params),
        host.ema.as_ref().map(|e| &e.params)
    );
}
