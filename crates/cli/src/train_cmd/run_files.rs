//! What a run writes in `--model-dir` (rank 0 alone): params.yaml, the DLLogger log,
//! checkpoints (every N epochs, every N steps, the newest `--keep-last` kept), the training
//! curves and the final model with its labels.

use std::path::{Path, PathBuf};
use std::time::Instant;

use effnet_model::{weights, Network, Weights};
use effnet_train::checkpoint::{self, RunState};
use effnet_train::trainer::Trainer;

use super::args::TrainArgs;
use crate::dllogger;
use crate::plot::{self, Chart, Series};

pub struct RunFiles {
    dir: PathBuf,
    /// Only rank 0 writes; on the other ranks every method does nothing.
    root: bool,
    log: PathBuf,
    keep_last: usize,
    saving: bool,
}

/// A checkpoint's file name: `checkpoint-epoch0003.safetensors` after 3 epochs, or
/// `checkpoint-epoch0003-batch000120.safetensors` 120 batches into the 4th.
fn checkpoint_name(at: RunState) -> String {
    match at.batch_in_epoch {
        0 => format!("checkpoint-epoch{:04}.safetensors", at.epoch),
        b => format!("checkpoint-epoch{:04}-batch{b:06}.safetensors", at.epoch),
    }
}

/// The position a checkpoint name stands for.
fn checkpoint_position(name: &str) -> Option<(u64, u64)> {
    let rest = name
        .strip_prefix("checkpoint-epoch")?
        .strip_suffix(".safetensors")?;
    match rest.split_once("-batch") {
        Some((e, b)) => Some((e.parse().ok()?, b.parse().ok()?)),
        None => Some((rest.parse().ok()?, 0)),
    }
}

/// The checkpoints in `dir`, oldest first.
fn checkpoints(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut found: Vec<((u64, u64), PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let at = checkpoint_position(p.file_name()?.to_str()?)?;
            Some((at, p))
        })
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

impl RunFiles {
    /// Creates the model directory and writes `params.yaml` (rank 0).
    pub fn new(args: &TrainArgs, root: bool) -> Result<RunFiles, String> {
        let dir = args.model_dir.clone();
        if root {
            if dir.exists() && !dir.is_dir() {
                return Err(format!(
                    "--model-dir {}: a file, not a folder",
                    dir.display()
                ));
            }
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let params = dir.join("params.yaml");
            std::fs::write(&params, args.to_yaml())
                .map_err(|e| format!("{}: {e}", params.display()))?;
        }
        Ok(RunFiles {
            log: dir.join(&args.log_filename),
            dir,
            root,
            keep_last: args.keep_last.max(1),
            saving: args.enable_checkpoint_saving,
        })
    }

    /// One DLLogger record (stdout and the log file).
    pub fn log(
        &self,
        start: Instant,
        step: serde_json::Value,
        data: serde_json::Value,
    ) -> Result<(), String> {
        if !self.root {
            return Ok(());
        }
        dllogger::log(Some(&self.log), start, step, data)
    }

    /// The run's checkpoints, newest first.
    pub fn checkpoints_newest_first(&self) -> Result<Vec<PathBuf>, String> {
        if !self.dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut found = checkpoints(&self.dir)?;
        found.reverse();
        Ok(found)
    }

    /// Writes a checkpoint atomically and deletes all but the newest `--keep-last`.
    pub fn save_checkpoint(&self, t: &mut Trainer, at: RunState) -> Result<(), String> {
        if !self.root || !self.saving {
            return Ok(());
        }
        checkpoint::save(&self.dir.join(checkpoint_name(at)), t, at)?;
        let found = checkpoints(&self.dir)?;
        let excess = found.len().saturating_sub(self.keep_last);
        for p in &found[..excess] {
            std::fs::remove_file(p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(())
    }

    pub fn write_curves(&self, curves: &Curves) -> Result<(), String> {
        if !self.root {
            return Ok(());
        }
        plot::write_charts(&curves.charts(), 2, &self.dir.join("curves")).map(|_| ())
    }

    /// `model.safetensors` (with which weights and their accuracy in its metadata) and
    /// `labels.txt`; returns the model's path.
    pub fn write_model(
        &self,
        net: &Network,
        w: &Weights,
        source: &str,
        top1: f64,
        names: &[String],
    ) -> Result<PathBuf, String> {
        let path = self.dir.join("model.safetensors");
        if let Some(i) = w.params.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "the {source} weights hold a non-finite value (parameter {i}): training diverged;                  {} is not written (try a lower --lr-init or --grad-clip-norm)",
                path.display()
            ));
        }
        let mut meta = weights::metadata(net);
        meta.insert("effnet.weights_source".into(), source.into());
        meta.insert("effnet.eval_accuracy_top_1".into(), format!("{top1:.4}"));
        effnet_model::io::write_safetensors(&path, &weights::to_tensors(net, w), &meta)
            .map_err(|e| e.to_string())?;
        let labels = self.dir.join("labels.txt");
        std::fs::write(&labels, names.join("\n") + "\n")
            .map_err(|e| format!("{}: {e}", labels.display()))?;
        Ok(path)
    }
}

/// A point of the curves at an optimizer step: the logging window's figures, or an epoch's.
#[derive(Debug, Clone, Copy)]
struct Point {
    step: f64,
    loss: f64,
    top1: f64,
    /// Learning rate and images/s (logging windows), or evaluation loss and top-1 (epochs).
    extra: Option<(f64, f64)>,
}

/// The training curves: every logging window and every epoch, against the optimizer step.
#[derive(Debug, Default)]
pub struct Curves {
    windows: Vec<Point>,
    epochs: Vec<Point>,
}

impl Curves {
    pub fn step(&mut self, step: u64, lr: f64, images_per_second: f64, loss: f64, top1: f64) {
        self.windows.push(Point {
            step: step as f64,
            loss,
            top1,
            extra: Some((lr, images_per_second)),
        });
    }

    /// An epoch's mean training loss and top-1, and its evaluation (loss, top-1) if any.
    pub fn epoch(&mut self, step: u64, loss: f64, top1: f64, eval: Option<(f64, f64)>) {
        self.epochs.push(Point {
            step: step as f64,
            loss,
            top1,
            extra: eval,
        });
    }

    fn charts(&self) -> Vec<Chart> {
        let series = |name: &str, points: &[Point], f: &dyn Fn(&Point) -> Option<f64>| Series {
            name: name.into(),
            points: points
                .iter()
                .filter_map(|p| Some((p.step, f(p)?)))
                .collect(),
        };
        let chart = |title: &str, y: &str, series: Vec<Series>| Chart {
            title: title.into(),
            x_label: "step".into(),
            y_label: y.into(),
            series,
        };
        let (w, e) = (&self.windows, &self.epochs);
        vec![
            chart(
                "loss",
                "cross-entropy",
                vec![
                    series("training", w, &|p| Some(p.loss)),
                    series("training (epoch)", e, &|p| Some(p.loss)),
                    series("evaluation", e, &|p| p.extra.map(|v| v.0)),
                ],
            ),
            chart(
                "top-1 accuracy",
                "top-1",
                vec![
                    series("training", w, &|p| Some(p.top1)),
                    series("training (epoch)", e, &|p| Some(p.top1)),
                    series("evaluation", e, &|p| p.extra.map(|v| v.1)),
                ],
            ),
            chart(
                "learning rate",
                "lr",
                vec![series("lr", w, &|p| p.extra.map(|v| v.0))],
            ),
            chart(
                "throughput",
                "images/s",
                vec![series("training", w, &|p| p.extra.map(|v| v.1))],
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_sort_by_position_not_by_text() {
        let names = [
            checkpoint_name(RunState {
                epoch: 1,
                batch_in_epoch: 0,
            }),
            checkpoint_name(RunState {
                epoch: 1,
                batch_in_epoch: 40,
            }),
            checkpoint_name(RunState {
                epoch: 2,
                batch_in_epoch: 0,
            }),
        ];
        let at: Vec<_> = names
            .iter()
            .map(|n| checkpoint_position(n).unwrap())
            .collect();
        assert_eq!(at, [(1, 0), (1, 40), (2, 0)]);
        // As text, the mid-epoch name sorts before the end of epoch 1, which is older.
        assert!(names[1] < names[0]);
        assert_eq!(checkpoint_position("model.safetensors"), None);
        assert_eq!(checkpoint_position("checkpoint-epochxx.safetensors"), None);
    }
}
