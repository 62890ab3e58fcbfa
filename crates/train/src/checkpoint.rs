//! Checkpoints: one safetensors file holding the model under timm's names (so `predict`, `eval`
//! and timm read it as weights), the optimizer's slots, the EMA and the run's position, written
//! atomically (temporary file, fsync, rename). Resuming restores all of it, so training N steps,
//! stopping and resuming for N more equals training 2N steps.

use std::collections::BTreeMap;
use std::path::Path;

use effnet_model::io::{self, RawTensor, TensorData};
use effnet_model::weights;

use crate::trainer::Trainer;

/// Tensors under this prefix are training state, not model weights (weight readers skip them).
pub const STATE_PREFIX: &str = weights::TRAINING_STATE_PREFIX;

/// Where a run is: what the loader and the schedule need to continue exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunState {
    pub epoch: u64,
    /// Batches already taken in `epoch`.
    pub batch_in_epoch: u64,
}

fn flat(name: &str, v: &[f32]) -> RawTensor {
    RawTensor {
        name: format!("{STATE_PREFIX}{name}"),
        shape: vec![v.len()],
        data: TensorData::F32(v.to_vec()),
    }
}

/// Writes `t`'s state (brought from the device first when the passes hold it).
pub fn save(path: &Path, t: &mut Trainer, run: RunState) -> Result<(), String> {
    if t.pending != 0 {
        return Err(
            "a checkpoint is taken between optimizer steps, not inside an accumulation".into(),
        );
    }
    t.sync_host()?;
    let mut tensors = weights::to_tensors(&t.net, &t.weights);
    tensors.push(flat("optimizer.slot_a", &t.optimizer.slot_a));
    tensors.push(flat("optimizer.slot_b", &t.optimizer.slot_b));
    if let Some(ema) = &t.ema {
        tensors.push(flat("ema.params", &ema.params));
        tensors.push(flat("ema.buffers", &ema.buffers));
    }
    let mut meta: BTreeMap<String, String> = weights::metadata(&t.net);
    meta.insert(
        "effnet.checkpoint.step".into(),
        t.optimizer.step.to_string(),
    );
    meta.insert("effnet.checkpoint.epoch".into(), run.epoch.to_string());
    meta.insert(
        "effnet.checkpoint.batch_in_epoch".into(),
        run.batch_in_epoch.to_string(),
    );
    meta.insert(
        "effnet.checkpoint.optimizer".into(),
        format!("{:?}", t.optimizer.kind),
    );
    meta.insert("effnet.checkpoint.seed".into(), t.config.seed.to_string());
    io::write_safetensors(path, &tensors, &meta).map_err(|e| e.to_string())
}

/// Restores a checkpoint into `t` (built with the same architecture and configuration). On any
/// mismatch the trainer is left as it was and the error names what differs.
pub fn load(path: &Path, t: &mut Trainer) -> Result<RunState, String> {
    let (tensors, meta) = io::read_safetensors(path).map_err(|e| e.to_string())?;
    let bad = |m: String| format!("{}: {m}", path.display());
    let get = |k: &str| -> Result<u64, String> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("not a checkpoint: no {k}")))
    };
    let (step, epoch, batch) = (
        get("effnet.checkpoint.step")?,
        get("effnet.checkpoint.epoch")?,
        get("effnet.checkpoint.batch_in_epoch")?,
    );
    let named = |k: &str| meta.get(k).map_or("none named", String::as_str);
    if meta.get("effnet.arch") != Some(&t.net.config.name) {
        return Err(bad(format!(
            "written for the architecture {} (--arch), this run is {}",
            named("effnet.arch"),
            t.net.config.name
        )));
    }
    let optimizer = format!("{:?}", t.optimizer.kind);
    if meta.get("effnet.checkpoint.optimizer") != Some(&optimizer) {
        return Err(bad(format!(
            "optimizer {} in the file, {optimizer} in this run",
            named("effnet.checkpoint.optimizer")
        )));
    }
    let (state, model): (Vec<RawTensor>, Vec<RawTensor>) = tensors
        .into_iter()
        .partition(|x| x.name.starts_with(STATE_PREFIX));
    let w = weights::from_tensors(&t.net, model).map_err(bad)?;
    let mut slots: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for x in state {
        let TensorData::F32(v) = x.data else {
            return Err(bad(format!("tensor {:?} is not f32", x.name)));
        };
        slots.insert(x.name[STATE_PREFIX.len()..].to_string(), v);
    }
    let mut take = |name: &str, len: usize| -> Result<Vec<f32>, String> {
        let v = slots
            .remove(name)
            .ok_or_else(|| bad(format!("missing {STATE_PREFIX}{name}")))?;
        if v.len() != len {
            return Err(bad(format!(
                "{STATE_PREFIX}{name} holds {} values, this run needs {len}",
                v.len()
            )));
        }
        Ok(v)
    };
    let slot_a = take("optimizer.slot_a", t.optimizer.slot_a.len())?;
    let slot_b = take("optimizer.slot_b", t.optimizer.slot_b.len())?;
    let ema = match &t.ema {
        Some(e) => Some((
            take("ema.params", e.params.len())?,
            take("ema.buffers", e.buffers.len())?,
        )),
        None => None,
    };
    // Everything checked: now change the trainer.
    t.weights = w;
    t.optimizer.slot_a = slot_a;
    t.optimizer.slot_b = slot_b;
    t.optimizer.step = step;
    if let (Some(e), Some((p, b))) = (&mut t.ema, ema) {
        e.params = p;
        e.buffers = b;
    }
    t.host_state_changed();
    t.discard_pending()?;
    Ok(RunState {
        epoch,
        batch_in_epoch: batch,
    })
}
