//! A parallel, deterministic batch loader.
//!
//! - **Order.** Each epoch permutes all `len` indices (Fisher–Yates, with an rng derived from
//!   `(seed, epoch)`), or keeps them in order when `shuffle` is off.
//! - **Sharding.** Every rank computes the same permutation (the seed is shared) and cuts it into
//!   global batches of `world × batch_size` positions; rank `r` takes the `r`-th slice of each, so
//!   that a step of `world` ranks sees exactly the batch one process with `world × batch_size`
//!   would see. Every rank gets `len / world` positions (a last partial global batch is split
//!   evenly); the last `len % world` positions are **dropped** (different samples each epoch when
//!   shuffling), so every rank has the same number of samples and steps. Shards are disjoint.
//! - **Batches.** A shard is cut into batches of `batch_size`; with `drop_remainder` the last short
//!   batch is dropped, otherwise it is yielded short.
//! - **Determinism.** Sample `index` is transformed with an rng derived from `(seed, epoch, index)`
//!   alone. Worker `k` of `W` builds batches `k, k + W, …` and sends them on its own bounded
//!   channel; the consumer reads the channels round robin, so batches come in sequence order and
//!   are identical for any worker count.
//! - **Back-pressure.** Each worker's channel holds `ceil(prefetch / W)` batches; a worker blocks
//!   when its channel is full, so at most about `prefetch + W` batches exist ahead of the consumer.
//! - **Stages.** [`Loader::set_stage`] changes the image size / augment strength; each epoch
//!   snapshots the stage when it starts, so a change applies from the next epoch.
//! - **Failures.** A sample whose `load` fails (corrupt image) or returns the wrong number of
//!   values is skipped and counted ([`Loader::skipped`]), never a panic. Its slot is refilled with
//!   the next positions of the shard's epoch order (wrapping around; each refill load has its own
//!   rng stream), at most `batch_size` refill loads per batch; when those run out too, the batch
//!   is yielded short (possibly empty), so every rank still sees the same number of steps.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use effnet_engine::rng::Rng;

/// The per-sample transform parameters of a progressive-learning stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    /// Side of the square images the source must produce.
    pub size: usize,
    /// Augmentation strength (RandAugment's magnitude; 0 for none).
    pub magnitude: f32,
}

/// A dataset whose samples are loaded and transformed on demand, from any thread.
pub trait Source: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `index` as a `[stage.size, stage.size, 3]` image and its label, transformed (crop,
    /// augment) with `rng` only, so that the result depends on `(index, stage, rng)` alone.
    fn load(&self, index: usize, stage: &Stage, rng: &mut Rng)
        -> Result<(Vec<f32>, usize), String>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Per-rank batch size.
    pub batch_size: usize,
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Batches buffered ahead of the consumer, over all workers.
    pub prefetch: usize,
    pub seed: u64,
    /// Reshuffle every epoch (training) or keep the index order (evaluation).
    pub shuffle: bool,
    /// Drop the last short batch (training).
    pub drop_remainder: bool,
    pub rank: usize,
    pub world: usize,
}

impl LoaderConfig {
    /// Training defaults for one process: shuffled, full batches only.
    pub fn train(batch_size: usize, workers: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            workers,
            prefetch: 2 * workers.max(1),
            seed,
            shuffle: true,
            drop_remainder: true,
            rank: 0,
            world: 1,
        }
    }
}

/// One batch: `images` is `[n, size, size, 3]` with `n = labels.len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    /// The dataset index of each image.
    pub indices: Vec<usize>,
    pub size: usize,
    /// The batch's position in its epoch.
    pub step: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

#[derive(Debug, Default)]
struct Failures {
    count: AtomicUsize,
    last: Mutex<Option<String>>,
}

pub struct Loader<S: Source + 'static> {
    source: Arc<S>,
    config: LoaderConfig,
    stage: Mutex<Stage>,
    failures: Arc<Failures>,
}

/// The label of the shuffle's stream, apart from every sample's (`index < len ≤ usize::MAX`).
const SHUFFLE_STREAM: u64 = u64::MAX;

impl<S: Source + 'static> Loader<S> {
    pub fn new(source: Arc<S>, config: LoaderConfig, stage: Stage) -> Result<Self, String> {
        if config.batch_size == 0 {
            return Err("the batch size must be at least 1".into());
        }
        if config.world == 0 || config.rank >= config.world {
            return Err(format!(
                "rank {} is not in a world of {}",
                config.rank, config.world
            ));
        }
        if stage.size == 0 {
            return Err("the image size must be at least 1".into());
        }
        Ok(Loader {
            source,
            config,
            stage: Mutex::new(stage),
            failures: Arc::default(),
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// The stage the next epoch will use.
    pub fn stage(&self) -> Stage {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the stage for epochs started from now on (a running epoch keeps its own).
    pub fn set_stage(&self, stage: Stage) -> Result<(), String> {
        if stage.size == 0 {
            return Err("the image size must be at least 1".into());
        }
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = stage;
        Ok(())
    }

    /// Samples per rank and epoch.
    pub fn shard_len(&self) -> usize {
        self.source.len() / self.config.world
    }

    /// Batches per rank and epoch (the same on every rank).
    pub fn steps_per_epoch(&self) -> usize {
        let (n, b) = (self.shard_len(), self.config.batch_size);
        if self.config.drop_remainder {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Failed sample loads since the loader was created (a corrupt image counts once per epoch).
    pub fn skipped(&self) -> usize {
        self.failures.count.load(Ordering::Relaxed)
    }

    /// The latest failure's message, with its index.
    pub fn last_error(&self) -> Option<String> {
        self.failures
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// This rank's dataset indices for `epoch`, in order.
    pub fn shard(&self, epoch: u64) -> Vec<usize> {
        let n = self.source.len();
        let mut order: Vec<usize> = (0..n).collect();
        if self.config.shuffle {
            let mut rng = Rng::new(self.config.seed).fork(epoch).fork(SHUFFLE_STREAM);
            for i in (1..n).rev() {
                order.swap(i, rng.below(i + 1));
            }
        }
        let (per, b) = (self.shard_len(), self.config.batch_size);
        let (rank, world) = (self.config.rank, self.config.world);
        let full = per / b;
        let mut shard = Vec::with_capacity(per);
        for k in 0..full {
            let start = (k * world + rank) * b;
            shard.extend_from_slice(&order[start..start + b]);
        }
        let (rest, base) = (per - full * b, full * world * b);
        shard.extend_from_slice(&order[base + rank * rest..base + (rank + 1) * rest]);
        shard
    }

    /// Starts loading `epoch` and returns its batches in order. Dropping the iterator early stops
    /// the workers.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// [`Loader::epoch`] from batch `first` on (a run resumed inside an epoch): the same batches
    /// as the whole epoch's from there, and the ones before are never loaded.
    pub fn epoch_from(&self, epoch: u64, first: usize) -> Epoch {
        let steps = self.steps_per_epoch();
        let first = first.min(steps);
        let workers = self.config.workers.clamp(1, (steps - first).max(1));
        let capacity = self.config.prefetch.div_ceil(workers).max(1);
        let plan = Arc::new(Plan {
            order: self.shard(epoch),
            stage: self.stage(),
            rng: Rng::new(self.config.seed).fork(epoch),
            batch_size: self.config.batch_size,
            steps,
        });
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        if steps > first {
            for k in 0..workers {
                let (tx, rx) = sync_channel(capacity);
                let (source, plan, failures) = (
                    Arc::clone(&self.source),
                    Arc::clone(&plan),
                    Arc::clone(&self.failures),
                );
                handles.push(Some(std::thread::spawn(move || {
                    work(&*source, &plan, &failures, first + k, workers, tx)
                })));
                receivers.push(rx);
            }
        }
        Epoch {
            receivers,
            handles,
            first,
            next: first,
            steps,
        }
    }
}

/// What an epoch's workers share.
struct Plan {
    order: Vec<usize>,
    stage: Stage,
    rng: Rng,
    batch_size: usize,
    steps: usize,
}

fn work<S: Source>(
    source: &S,
    plan: &Plan,
    failures: &Failures,
    first_step: usize,
    workers: usize,
    tx: SyncSender<Batch>,
) {
    for step in (first_step..plan.steps).step_by(workers) {
        // The receiver is gone when the epoch was dropped: stop quietly.
        if tx.send(build(source, plan, failures, step)).is_err() {
            return;
        }
    }
}

fn build<S: Source>(source: &S, plan: &Plan, failures: &Failures, step: usize) -> Batch {
    let (order, b, s) = (&plan.order, plan.batch_size, plan.stage.size);
    let start = step * b;
    let end = (start + b).min(order.len());
    let mut batch = Batch {
        images: Vec::with_capacity((end - start) * s * s * 3),
        labels: Vec::with_capacity(end - start),
        indices: Vec::with_capacity(end - start),
        size: s,
        step,
    };
    let mut load = |index: usize, stream: u64| {
        let mut rng = plan.rng.fork(index as u64);
        if stream > 0 {
            rng = rng.fork(stream);
        }
        let result = source
            .load(index, &plan.stage, &mut rng)
            .and_then(|(img, label)| {
                if img.len() == s * s * 3 {
                    Ok((img, label))
                } else {
                    Err(format!("{} values, expected {s}×{s}×3", img.len()))
                }
            });
        match result {
            Ok((img, label)) => {
                batch.images.extend_from_slice(&img);
                batch.labels.push(label);
                batch.indices.push(index);
                true
            }
            Err(e) => {
                failures.count.fetch_add(1, Ordering::Relaxed);
                *failures.last.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("sample {index}: {e}"));
                false
            }
        }
    };
    let missing = order[start..end]
        .iter()
        .filter(|&&index| !load(index, 0))
        .count();
    // Refill from the following positions of the epoch order, each with a fresh stream.
    let mut filled = 0;
    for k in 0..b.min(order.len()) {
        if filled == missing {
            break;
        }
        let index = order[(end + k) % order.len()];
        filled += load(index, 1 + k as u64) as usize;
    }
    batch
}

/// An epoch's batches, in order.
pub struct Epoch {
    receivers: Vec<Receiver<Batch>>,
    handles: Vec<Option<JoinHandle<()>>>,
    /// The batch the workers started at.
    first: usize,
    next: usize,
    steps: usize,
}

impl Epoch {
    pub fn steps(&self) -> usize {
        self.steps
    }
}

impl Iterator for Epoch {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.steps {
            return None;
        }
        let k = (self.next - self.first) % self.receivers.len();
        match self.receivers[k].recv() {
            Ok(batch) => {
                self.next += 1;
                Some(batch)
            }
            Err(_) => {
                // The worker ended before its batch: it panicked (a bug in the source).
                self.next = self.steps;
                if let Some(Err(panic)) = self.handles[k].take().map(|h| h.join()) {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.steps - self.next;
        (left, Some(left))
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Closing the channels makes blocked workers return; then wait for them.
        self.receivers.clear();
        for h in self.handles.iter_mut().filter_map(Option::take) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    /// `n` samples; sample `i` is `[i, u, u, …]` with `u` its rng's first draw, label `i % 10`.
    /// Indices in `bad` fail.
    struct Synthetic {
        n: usize,
        bad: HashSet<usize>,
        loads: AtomicUsize,
        jitter: bool,
    }

    impl Synthetic {
        fn new(n: usize) -> Self {
            Synthetic {
                n,
                bad: HashSet::new(),
                loads: AtomicUsize::new(0),
                jitter: false,
            }
        }
    }

    impl Source for Synthetic {
        fn len(&self) -> usize {
            self.n
        }

        fn load(
            &self,
            index: usize,
            stage: &Stage,
            rng: &mut Rng,
        ) -> Result<(Vec<f32>, usize), String> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            if self.jitter {
                // Uneven work, so workers finish out of order.
                std::thread::sleep(Duration::from_micros((index % 7) as u64 * 200));
            }
            if self.bad.contains(&index) {
                return Err("corrupt JPEG".into());
            }
            let mut img = vec![rng.uniform() as f32 + stage.magnitude; stage.size * stage.size * 3];
            img[0] = index as f32;
            Ok((img, index % 10))
        }
    }

    const STAGE: Stage = Stage {
        size: 2,
        magnitude: 0.0,
    };

    fn loader(source: Synthetic, config: LoaderConfig) -> Loader<Synthetic> {
        Loader::new(Arc::new(source), config, STAGE).unwrap()
    }

    #[test]
    fn same_batches_whatever_the_worker_count() {
        let run = |workers| {
            let mut src = Synthetic::new(50);
            src.jitter = true;
            let l = loader(src, LoaderConfig::train(4, workers, 7));
            (0..2).flat_map(|e| l.epoch(e)).collect::<Vec<_>>()
        };
        let one = run(1);
        assert_eq!(one.len(), 2 * 12);
        assert!(one.iter().all(|b| b.len() == 4 && b.images.len() == 4 * 12));
        assert_eq!(one, run(2));
        assert_eq!(one, run(4));
        // Labels and images belong to their indices.
        for b in &one {
            for (j, &i) in b.indices.iter().enumerate() {
                assert_eq!(b.labels[j], i % 10);
                assert_eq!(b.images[j * 12], i as f32);
            }
        }
    }

    #[test]
    fn reshuffles_every_epoch_reproducibly() {
        let l = loader(Synthetic::new(40), LoaderConfig::train(8, 2, 3));
        let order = |l: &Loader<Synthetic>, e| -> Vec<usize> {
            l.epoch(e).flat_map(|b| b.indices).collect()
        };
        let (e0, e1) = (order(&l, 0), order(&l, 1));
        assert_ne!(e0, e1);
        let mut sorted = e0.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..40).collect::<Vec<_>>());
        // Same (seed, epoch): same order and same sample draws, even from a new loader.
        let again = loader(Synthetic::new(40), LoaderConfig::train(8, 3, 3));
        assert_eq!(e1, order(&again, 1));
        assert_eq!(
            l.epoch(1).collect::<Vec<_>>(),
            again.epoch(1).collect::<Vec<_>>()
        );
        assert_ne!(
            e0,
            order(&loader(Synthetic::new(40), LoaderConfig::train(8, 2, 4)), 0)
        );
        // No shuffle: index order, last short batch kept.
        let eval = LoaderConfig {
            shuffle: false,
            drop_remainder: false,
            ..LoaderConfig::train(16, 2, 3)
        };
        let l = loader(Synthetic::new(40), eval);
        let batches: Vec<_> = l.epoch(0).collect();
        assert_eq!(
            batches.iter().map(Batch::len).collect::<Vec<_>>(),
            [16, 16, 8]
        );
        assert_eq!(
            batches
                .iter()
                .flat_map(|b| b.indices.clone())
                .collect::<Vec<_>>(),
            (0..40).collect::<Vec<_>>()
        );
    }

    #[test]
    fn shards_are_disjoint_with_equal_steps() {
        let (n, world) = (103, 4);
        for drop_remainder in [true, false] {
            let mut seen = HashSet::new();
            let mut steps = Vec::new();
            for rank in 0..world {
                let config = LoaderConfig {
                    rank,
                    world,
                    drop_remainder,
                    ..LoaderConfig::train(4, 2, 9)
                };
                let l = loader(Synthetic::new(n), config);
                assert_eq!(l.shard(0).len(), 25);
                let batches: Vec<_> = l.epoch(0).collect();
                steps.push(batches.len());
                assert_eq!(batches.len(), l.steps_per_epoch());
                for i in batches.into_iter().flat_map(|b| b.indices) {
                    assert!(seen.insert(i), "index {i} on two ranks");
                }
            }
            assert!(steps.iter().all(|&s| s == steps[0]));
            if drop_remainder {
                assert_eq!((steps[0], seen.len()), (6, 96));
            } else {
                // 25 = 6·4 + 1: the short last batch; together the shards cover all but 103 % 4.
                assert_eq!((steps[0], seen.len()), (7, 100));
            }
        }
        assert!(Loader::new(
            Arc::new(Synthetic::new(4)),
            LoaderConfig {
                rank: 2,
                world: 2,
                ..LoaderConfig::train(1, 1, 0)
            },
            STAGE
        )
        .is_err());
    }

    #[test]
    fn a_step_of_all_ranks_is_the_batch_of_one_process() {
        let (n, world, b) = (50, 2, 4);
        let one = loader(Synthetic::new(n), LoaderConfig::train(world * b, 1, 3));
        let ranks: Vec<_> = (0..world)
            .map(|rank| {
                let config = LoaderConfig {
                    rank,
                    world,
                    ..LoaderConfig::train(b, 1, 3)
                };
                loader(Synthetic::new(n), config)
                    .epoch(1)
                    .collect::<Vec<_>>()
            })
            .collect();
        let whole: Vec<_> = one.epoch(1).collect();
        assert_eq!(whole.len(), 6);
        for (k, batch) in whole.iter().enumerate() {
            let joined: Vec<usize> = ranks.iter().flat_map(|r| r[k].indices.clone()).collect();
            assert_eq!(joined, batch.indices, "step {k}");
            let images: Vec<f32> = ranks.iter().flat_map(|r| r[k].images.clone()).collect();
            assert_eq!(images, batch.images, "same augmentation on any rank");
        }
    }

    #[test]
    fn an_epoch_resumed_inside_gives_the_remaining_batches() {
        let l = loader(Synthetic::new(40), LoaderConfig::train(4, 3, 5));
        let whole: Vec<_> = l.epoch(2).collect();
        let before = l.source.loads.load(Ordering::SeqCst);
        let rest: Vec<_> = l.epoch_from(2, 7).collect();
        assert_eq!(rest, whole[7..].to_vec());
        assert_eq!(
            l.source.loads.load(Ordering::SeqCst) - before,
            3 * 4,
            "only those loaded"
        );
        assert_eq!(l.epoch_from(2, 99).count(), 0);
    }

    #[test]
    fn workers_block_on_a_full_queue() {
        let config = LoaderConfig {
            prefetch: 2,
            ..LoaderConfig::train(2, 1, 1)
        };
        let l = loader(Synthetic::new(1000), config);
        let mut epoch = l.epoch(0);
        std::thread::sleep(Duration::from_millis(200));
        // Two batches queued and one held by the blocked worker.
        let loads = l.source.loads.load(Ordering::SeqCst);
        assert!(loads <= 3 * 2, "{loads} samples loaded ahead");
        assert!(epoch.next().is_some());
        drop(epoch);
        assert!(l.source.loads.load(Ordering::SeqCst) < 20);
        assert_eq!(l.epoch(1).count(), 500);
    }

    #[test]
    fn failed_samples_are_skipped_counted_and_refilled() {
        let mut src = Synthetic::new(60);
        src.bad = [3, 17, 18, 42].into_iter().collect();
        let l = loader(src, LoaderConfig::train(6, 3, 5));
        let batches: Vec<_> = l.epoch(0).collect();
        assert_eq!(batches.len(), 10);
        for b in &batches {
            assert_eq!(b.len(), 6);
            assert_eq!(b.images.len(), 6 * 12);
            assert!(b.indices.iter().all(|i| ![3, 17, 18, 42].contains(i)));
        }
        // A refill may land on a corrupt index too: each failed load counts.
        assert!(l.skipped() >= 4);
        assert!(l.last_error().unwrap().contains("corrupt JPEG"));
        let mut all = loader(Synthetic::new(8), LoaderConfig::train(4, 2, 5));
        Arc::get_mut(&mut all.source).unwrap().bad = (0..8).collect();
        let batches: Vec<_> = all.epoch(0).collect();
        // Nothing loads: the steps still come, empty.
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.is_empty() && b.images.is_empty()));
        assert_eq!(all.skipped(), 2 * (4 + 4));
    }

    #[test]
    fn stage_changes_apply_from_the_next_epoch() {
        let l = loader(Synthetic::new(24), LoaderConfig::train(4, 2, 2));
        let mut epoch = l.epoch(0);
        let first = epoch.next().unwrap();
        l.set_stage(Stage {
            size: 3,
            magnitude: 10.0,
        })
        .unwrap();
        assert!(epoch.all(|b| b.size == 2 && b.images.len() == 4 * 12));
        assert_eq!(first.size, 2);
        for b in l.epoch(1) {
            assert_eq!((b.size, b.images.len()), (3, 4 * 27));
            assert!(b.images[1] >= 10.0);
        }
        assert!(l
            .set_stage(Stage {
                size: 0,
                magnitude: 0.0
            })
            .is_err());
    }
}
