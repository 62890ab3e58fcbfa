//! Batch normalization over the rows of an NHWC tensor (`[rows, c]`), fused with an activation.
//!
//! Training mode normalizes with the batch's mean and biased variance; the running statistics use
//! the unbiased variance, as PyTorch and TensorFlow's fused batch norm both do. Eval mode applies
//! the running statistics as one scale and shift per channel.

use std::ops::Range;

use rayon::prelude::*;

use crate::act::{Act, Activation};
use crate::simd;
use crate::with_activation;

/// Sums per-channel statistics over every replica of a data-parallel run, in place: with it,
/// training-mode batch norm uses the statistics of the global batch (synchronized BN). Each
/// replica passes its local sums; the row count travels as the last element.
pub type ReplicaSum = dyn Fn(&mut [f64]) + Send + Sync;

/// A shared [`ReplicaSum`] that a workspace can hold (and print).
#[derive(Clone)]
pub struct CrossReplica(pub std::sync::Arc<ReplicaSum>);

impl std::fmt::Debug for CrossReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CrossReplica")
    }
}

/// `sums` (this replica's) summed over replicas when `sync` is given, in place, the row count
/// travelling with them: returns the global row count.
fn across_replicas(sums: &mut Vec<f64>, rows: usize, sync: Option<&ReplicaSum>) -> f64 {
    sums.push(rows as f64);
    if let Some(sum) = sync {
        sum(sums);
    }
    sums.pop().unwrap_or(rows as f64)
}

/// What batch norm's passes keep between calls, so a training step allocates nothing here once
/// it has grown: the row tasks' partial sums, the totals, and the folded scale and shift.
struct Scratch {
    partials: Vec<f32>,
    totals: Vec<f64>,
    folded: Folded,
    means: Vec<f32>,
}

impl Scratch {
    const fn new() -> Scratch {
        Scratch {
            partials: Vec::new(),
            totals: Vec::new(),
            folded: Folded {
                scale: Vec::new(),
                shift: Vec::new(),
                act: Act::None,
            },
            means: Vec::new(),
        }
    }
}

static SCRATCH: std::sync::Mutex<Scratch> = std::sync::Mutex::new(Scratch::new());

/// `f` with the kept [`Scratch`].
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    crate::with_kept(&SCRATCH, Scratch::new, f)
}

/// Rows per parallel task in the reductions: small enough that f32 partial sums stay accurate.
const ROWS_PER_TASK: usize = 512;

/// Channels per task in the per-channel passes: all of them when the row tasks alone keep every
/// thread busy or the tensor is small; otherwise blocks of at least 16, so that few rows of many
/// channels (the small maps late in the network: 128 rows of 1,536 channels at batch 8 and
/// 128 px) still spread over the pool. Each channel's sum runs over the same row tasks either way.
fn channel_block(rows: usize, width: usize) -> usize {
    let row_tasks = rows.div_ceil(ROWS_PER_TASK).max(1);
    let threads = rayon::current_num_threads();
    // Tasks of at least ~16K values: smaller ones cost more to schedule than they save.
    let wanted = (2 * threads).min(rows * width / 16_384);
    if threads == 1 || row_tasks >= wanted || width <= 16 {
        return width.max(1);
    }
    let blocks = wanted.div_ceil(row_tasks);
    width.div_ceil(blocks).next_multiple_of(8).clamp(16, width)
}

/// The row tasks of the per-channel reductions.
fn row_task(t: usize, rows: usize) -> Range<usize> {
    t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows)
}

/// `sums` per-channel sums over row ranges, in parallel over row tasks and channel blocks.
/// `f(rows, channels, partial)` adds its rows' contribution for `channels` into `partial`
/// (`sums × channels.len()`, sum by sum, zeroed first); the row tasks' partials (kept in
/// `partials`) are then added up in f64, task by task in order, into `totals`: `sums × width`
/// values, sum by sum. Mark `f` `#[inline(always)]`: it then compiles inside
/// `simd::dispatch`'s vector features (without, an activation's derivative ran scalar: batch
/// norm's backward took 9× longer).
fn par_row_sums(
    (rows, width, sums): (usize, usize, usize),
    f: impl Fn(Range<usize>, Range<usize>, &mut [f32]) + Sync,
    partials: &mut Vec<f32>,
    totals: &mut Vec<f64>,
) {
    let tasks = rows.div_ceil(ROWS_PER_TASK).max(1);
    let block = channel_block(rows, width);
    let blocks = width.div_ceil(block);
    // Task (block j, row task t) owns piece j·tasks + t, sized for a whole block.
    let piece = sums * block;
    if partials.len() < blocks * tasks * piece {
        partials.resize(blocks * tasks * piece, 0.0);
    }
    let channels = |j: usize| j * block..((j + 1) * block).min(width);
    partials[..blocks * tasks * piece]
        .par_chunks_mut(piece.max(1))
        .enumerate()
        .for_each(|(i, part)| {
            let (j, t) = (i / tasks, i % tasks);
            let part = &mut part[..sums * channels(j).len()];
            part.fill(0.0);
            simd::dispatch(
                #[inline(always)]
                || f(row_task(t, rows), channels(j), part),
            );
        });
    totals.clear();
    totals.resize(sums * width, 0.0);
    for j in 0..blocks {
        let ch = channels(j);
        for t in 0..tasks {
            let part = &partials[(j * tasks + t) * piece..][..sums * ch.len()];
            for (k, values) in part.chunks_exact(ch.len().max(1)).enumerate() {
                for (total, v) in totals[k * width + ch.start..].iter_mut().zip(values) {
                    *total += *v as f64;
                }
            }
        }
    }
}

/// Rows per task in elementwise passes over `[rows, c]` tensors: about 16K values.
fn elementwise_rows(c: usize) -> usize {
    (16_384 / c.max(1)).clamp(1, ROWS_PER_TASK)
}

/// Applies `f(row_chunk_in, row_chunk_out)` over matching row chunks of two `[rows, c]` tensors.
fn par_rows(x: &[f32], y: &mut [f32], c: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    let chunk = elementwise_rows(c) * c;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            simd::dispatch(
                #[inline(always)]
                || f(xc, yc),
            )
        });
}

/// Training-mode forward: `y = act(γ·(x − mean)/sqrt(var + eps) + β)` with the batch statistics,
/// which are written to `mean`, `var` (biased) and `invstd` for the backward pass. With `sync`,
/// the statistics are those of every replica's rows together. Returns the rows they span.
#[allow(clippy::too_many_arguments)]
pub fn train_forward(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    act: Act,
    mean: &mut [f32],
    var: &mut [f32],
    invstd: &mut [f32],
    y: &mut [f32],
    sync: Option<&ReplicaSum>,
) -> usize {
    let local_rows = x.len() / c;
    with_scratch(|scratch| {
        let Scratch {
            partials,
            totals,
            folded,
            ..
        } = scratch;
        // One pass sums each channel's deviations from its first value and their squares
        // (the shifted-data variance: without a shift near the mean, a large mean would cancel
        // the variance away). Cross-replica sums need one shift for every replica, so they
        // take two passes (mean, then squared deviations from it), as do the squares again when
        // some channel's first value lay far from its mean.
        let shifted = sync.is_none() && local_rows > 0;
        let mut total = local_rows as f64;
        let mut again = !shifted;
        if shifted {
            let first = &x[..c];
            par_row_sums(
                (local_rows, c, 2),
                #[inline(always)]
                |r, ch, acc| {
                    let (s1, s2) = acc.split_at_mut(ch.len());
                    let k = &first[ch.clone()];
                    for row in x[r.start * c..r.end * c].chunks_exact(c) {
                        let it = s1.iter_mut().zip(s2.iter_mut());
                        for ((a, b), (v, k)) in it.zip(row[ch.clone()].iter().zip(k)) {
                            let d = v - k;
                            *a += d;
                            *b += d * d;
                        }
                    }
                },
                partials,
                totals,
            );
            for ch in 0..c {
                let (d, sq) = (totals[ch] / total, totals[c + ch] / total);
                let v = (sq - d * d).max(0.0);
                // Past 8 standard deviations between shift and mean, the subtraction loses
                // more than 6 of f32's bits.
                again |= d * d > 64.0 * v;
                mean[ch] = (first[ch] as f64 + d) as f32;
                var[ch] = v as f32;
            }
        } else {
            par_row_sums(
                (local_rows, c, 1),
                #[inline(always)]
                |r, ch, acc| {
                    for row in x[r.start * c..r.end * c].chunks_exact(c) {
                        for (a, v) in acc.iter_mut().zip(&row[ch.clone()]) {
                            *a += v;
                        }
                    }
                },
                partials,
                totals,
            );
            total = across_replicas(totals, local_rows, sync);
            for (m, s) in mean.iter_mut().zip(totals.iter()) {
                *m = (s / total) as f32;
            }
        }
        if again {
            let mean_ro: &[f32] = mean;
            par_row_sums(
                (local_rows, c, 1),
                #[inline(always)]
                |r, ch, acc| {
                    for row in x[r.start * c..r.end * c].chunks_exact(c) {
                        for ((a, v), m) in acc
                            .iter_mut()
                            .zip(&row[ch.clone()])
                            .zip(&mean_ro[ch.clone()])
                        {
                            let d = v - m;
                            *a += d * d;
                        }
                    }
                },
                partials,
                totals,
            );
            across_replicas(totals, local_rows, sync);
            for (v, s) in var.iter_mut().zip(totals.iter()) {
                *v = (s / total) as f32;
            }
        }
        for ch in 0..c {
            invstd[ch] = 1.0 / (var[ch] + eps).sqrt();
        }
        folded.set_stats(gamma, beta, mean, invstd, act);
        folded.apply_copy(x, c, y);
        total as usize
    })
}

/// Eval-mode batch norm folded into one scale and shift per channel, with its activation,
/// applied in place: the epilogue of the kernel that produced the rows, while they are in cache.
#[derive(Debug, Clone)]
pub struct Folded {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub act: Act,
}

impl Folded {
    /// `γ·(x − mean)·invstd + β` as `x·scale + shift`.
    pub fn from_stats(
        gamma: &[f32],
        beta: &[f32],
        mean: &[f32],
        invstd: &[f32],
        act: Act,
    ) -> Folded {
        let mut folded = Folded {
            scale: Vec::new(),
            shift: Vec::new(),
            act,
        };
        folded.set_stats(gamma, beta, mean, invstd, act);
        folded
    }

    /// [`Folded::from_stats`] into this one's buffers (training's per-step statistics: no
    /// allocation once they have grown).
    fn set_stats(&mut self, gamma: &[f32], beta: &[f32], mean: &[f32], invstd: &[f32], act: Act) {
        self.scale.clear();
        self.scale
            .extend(gamma.iter().zip(invstd).map(|(g, s)| g * s));
        self.shift.clear();
        self.shift.extend(
            beta.iter()
                .zip(mean)
                .zip(&self.scale)
                .map(|((b, m), s)| b - m * s),
        );
        self.act = act;
    }

    /// `γ·(x − mean)/sqrt(var + eps) + β` as `x·scale + shift`.
    pub fn from_running(
        gamma: &[f32],
        beta: &[f32],
        mean: &[f32],
        var: &[f32],
        eps: f32,
        act: Act,
    ) -> Folded {
        let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        Folded::from_stats(gamma, beta, mean, &invstd, act)
    }

    /// `y = act(x·scale + shift)` over `[rows, c]` tensors, as a separate pass (one read of `x`,
    /// one write of `y`: copying first and applying in place cost a pass over each chunk more).
    fn apply_copy(&self, x: &[f32], c: usize, y: &mut [f32]) {
        with_activation!(self.act, A => par_rows(
            x,
            y,
            c,
            #[inline(always)]
            |xc, yc| self.apply_from::<A>(xc, yc)
        ))
    }

    /// `rows = act(rows·scale + shift)`, rows of `scale.len()` channels.
    pub fn apply(&self, rows: &mut [f32]) {
        with_activation!(self.act, A => self.apply_with::<A>(rows))
    }

    fn apply_with<A: Activation>(&self, rows: &mut [f32]) {
        simd::dispatch(
            #[inline(always)]
            || {
                for row in rows.chunks_exact_mut(self.scale.len()) {
                    for ((v, s), b) in row.iter_mut().zip(&self.scale).zip(&self.shift) {
                        *v = A::apply(*v * s + b);
                    }
                }
            },
        )
    }

    /// [`Folded::apply_with`] from `x` into `y` (rows of `scale.len()` channels); the caller
    /// dispatches (`par_rows` compiles this inside the vector features).
    #[inline(always)]
    fn apply_from<A: Activation>(&self, x: &[f32], y: &mut [f32]) {
        let c = self.scale.len();
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let it = yr.iter_mut().zip(xr).zip(&self.scale).zip(&self.shift);
            for (((o, v), s), b) in it {
                *o = A::apply(v * s + b);
            }
        }
    }
}

/// Eval-mode forward from running statistics, as a separate pass (the model fuses [`Folded`]
/// into the convolutions instead).
#[allow(clippy::too_many_arguments)]
pub fn eval_forward(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    act: Act,
    y: &mut [f32],
) {
    Folded::from_running(gamma, beta, running_mean, running_var, eps, act).apply_copy(x, c, y);
}

/// Moves the running statistics towards the batch's: `r ← (1 − m)·r + m·batch`, with the
/// unbiased variance (`var · rows/(rows − 1)`).
pub fn update_running_stats(
    running_mean: &mut [f32],
    running_var: &mut [f32],
    mean: &[f32],
    var: &[f32],
    rows: usize,
    momentum: f32,
) {
    let bessel = if rows > 1 {
        rows as f32 / (rows - 1) as f32
    } else {
        1.0
    };
    for (r, m) in running_mean.iter_mut().zip(mean) {
        *r = (1.0 - momentum) * *r + momentum * m;
    }
    for (r, v) in running_var.iter_mut().zip(var) {
        *r = (1.0 - momentum) * *r + momentum * v * bessel;
    }
}

/// Backward of [`train_forward`]: `dx` is overwritten; `dgamma` and `dbeta` are accumulated into
/// (this replica's share: the gradient all-reduce combines them). With `sync`, as the forward's,
/// the mean gradient terms span every replica's rows.
#[allow(clippy::too_many_arguments)]
pub fn train_backward(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    invstd: &[f32],
    act: Act,
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    sync: Option<&ReplicaSum>,
) {
    with_activation!(act, A => train_backward_rows::<A>(x, c, gamma, beta, mean, invstd, dy, dx, dgamma, dbeta, sync))
}

#[allow(clippy::too_many_arguments)]
fn train_backward_rows<A: Activation>(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    invstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    sync: Option<&ReplicaSum>,
) {
    assert!(
        dx.len() == x.len() && dy.len() == x.len(),
        "batch norm backward: x, dy and dx differ in length"
    );
    let rows = x.len() / c;
    with_scratch(|scratch| {
        let Scratch {
            partials,
            totals,
            folded,
            means,
        } = scratch;
        folded.set_stats(gamma, beta, mean, invstd, Act::None);
        let (scale, shift) = (&folded.scale[..], &folded.shift[..]);
        // Pass 1: per channel Σdz and Σdz·x̂, with dz = dy·act'(z) and z = x·scale + shift,
        // over row tasks and channel blocks. dz is not stored: pass 2 computes it again, which
        // costs less than writing and reading it back (these passes wait on memory).
        par_row_sums(
            (rows, c, 2),
            #[inline(always)]
            |r, ch, acc| {
                let (sd, sx) = acc.split_at_mut(ch.len());
                let (scale, shift) = (&scale[ch.clone()], &shift[ch.clone()]);
                let (mean, invstd) = (&mean[ch.clone()], &invstd[ch.clone()]);
                for r in r {
                    let (xr, gr) = (&x[r * c..][ch.clone()], &dy[r * c..][ch.clone()]);
                    for ((((xv, g), (s, b)), (m, is)), (sd, sx)) in xr
                        .iter()
                        .zip(gr)
                        .zip(scale.iter().zip(shift))
                        .zip(mean.iter().zip(invstd))
                        .zip(sd.iter_mut().zip(sx.iter_mut()))
                    {
                        let dz = g * A::derivative(xv * s + b);
                        *sd += dz;
                        *sx += dz * (xv - m) * is;
                    }
                }
            },
            partials,
            totals,
        );
        for ch in 0..c {
            dbeta[ch] += totals[ch] as f32;
            dgamma[ch] += totals[c + ch] as f32;
        }
        let total = across_replicas(totals, rows, sync);
        let inv_rows = 1.0 / total;
        means.clear();
        means.extend(totals[..2 * c].iter().map(|s| (s * inv_rows) as f32));
        let (mean_dz, mean_dzx) = means.split_at(c);
        // Pass 2: dx = scale·(dz − mean(dz) − x̂·mean(dz·x̂)).
        let chunk = elementwise_rows(c) * c;
        dx.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
            .for_each(|(dxc, (xc, dyc))| {
                simd::dispatch(
                    #[inline(always)]
                    || {
                        let rows = dxc
                            .chunks_exact_mut(c)
                            .zip(xc.chunks_exact(c).zip(dyc.chunks_exact(c)));
                        for (dr, (xr, gr)) in rows {
                            let it = dr
                                .iter_mut()
                                .zip(xr.iter().zip(gr))
                                .zip(scale.iter().zip(shift))
                                .zip(mean.iter().zip(invstd));
                            for ((((o, (xv, g)), (s, b)), (m, is)), (md, mx)) in
                                it.zip(mean_dz.iter().zip(mean_dzx))
                            {
                                let dz = g * A::derivative(xv * s + b);
                                *o = s * (dz - md - (xv - m) * is * mx);
                            }
                        }
                    },
                )
            });
    })
}
