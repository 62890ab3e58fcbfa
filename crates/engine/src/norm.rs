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

/// `local` with the row count appended, summed over replicas when `sync` is given: the global
/// sums and the global row count.
fn across_replicas(mut local: Vec<f64>, rows: usize, sync: Option<&ReplicaSum>) -> (Vec<f64>, f64) {
    local.push(rows as f64);
    if let Some(sum) = sync {
        sum(&mut local);
    }
    let total = local.pop().unwrap_or(rows as f64);
    (local, total)
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
/// (`sums × channels.len()`, sum by sum); the row tasks' partials are combined in f64. Returns
/// `sums × width` values, sum by sum. Mark `f` `#[inline(always)]`: it then compiles inside
/// `simd::dispatch`'s vector features (without, an activation's derivative ran scalar: batch
/// norm's backward took 9× longer).
fn par_row_sums(
    rows: usize,
    width: usize,
    sums: usize,
    f: impl Fn(Range<usize>, Range<usize>, &mut [f32]) + Sync,
) -> Vec<f64> {
    let tasks = rows.div_ceil(ROWS_PER_TASK).max(1);
    let block = channel_block(rows, width);
    let blocks: Vec<Vec<f64>> = (0..width.div_ceil(block))
        .into_par_iter()
        .map(|j| {
            let channels = j * block..((j + 1) * block).min(width);
            let len = sums * channels.len();
            let partials = (0..tasks).into_par_iter().map(|t| {
                let mut partial = vec![0f32; len];
                simd::dispatch(
                    #[inline(always)]
                    || f(row_task(t, rows), channels.clone(), &mut partial),
                );
                partial
            });
            sum_partials(partials, len)
        })
        .collect();
    let mut totals = vec![0f64; sums * width];
    for (j, part) in blocks.iter().enumerate() {
        let w = part.len() / sums.max(1);
        for k in 0..sums {
            totals[k * width + j * block..][..w].copy_from_slice(&part[k * w..][..w]);
        }
    }
    totals
}

/// Adds up f32 partial sums from parallel tasks in f64.
fn sum_partials(partials: impl ParallelIterator<Item = Vec<f32>>, width: usize) -> Vec<f64> {
    partials
        .fold(
            || vec![0f64; width],
            |mut total, part| {
                total
                    .iter_mut()
                    .zip(&part)
                    .for_each(|(t, p)| *t += *p as f64);
                total
            },
        )
        .reduce(
            || vec![0f64; width],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
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
    let sums = par_row_sums(
        local_rows,
        c,
        1,
        #[inline(always)]
        |r, ch, acc| {
            for row in x[r.start * c..r.end * c].chunks_exact(c) {
                for (a, v) in acc.iter_mut().zip(&row[ch.clone()]) {
                    *a += v;
                }
            }
        },
    );
    let (sums, total) = across_replicas(sums, local_rows, sync);
    for (m, s) in mean.iter_mut().zip(&sums) {
        *m = (s / total) as f32;
    }
    let mean_ro: &[f32] = mean;
    // Two passes (mean, then squared deviations) keep the variance accurate for large means.
    let sq = par_row_sums(
        local_rows,
        c,
        1,
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
    );
    let (sq, _) = across_replicas(sq, local_rows, sync);
    for ch in 0..c {
        let v = (sq[ch] / total) as f32;
        var[ch] = v;
        invstd[ch] = 1.0 / (v + eps).sqrt();
    }
    Folded::from_stats(gamma, beta, mean, invstd, act).apply_copy(x, c, y);
    total as usize
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
        let scale: Vec<f32> = gamma.iter().zip(invstd).map(|(g, s)| g * s).collect();
        let shift = beta
            .iter()
            .zip(mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Folded { scale, shift, act }
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

    /// `y = act(x·scale + shift)` over `[rows, c]` tensors, as a separate pass.
    fn apply_copy(&self, x: &[f32], c: usize, y: &mut [f32]) {
        par_rows(x, y, c, |xc, yc| {
            yc.copy_from_slice(xc);
            self.apply(yc);
        });
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
    let Folded { scale, shift, .. } = Folded::from_stats(gamma, beta, mean, invstd, Act::None);
    // Pass 1: dz = dy·act'(z) with z = x·scale + shift, stored in dx (the activation's
    // derivative is the costly part: computed once), and per channel Σdz and Σdz·x̂, over row
    // tasks and channel blocks.
    let dz_addr = dx.as_mut_ptr() as usize;
    let local = par_row_sums(
        rows,
        c,
        2,
        #[inline(always)]
        |r, ch, acc| {
            let width = ch.len();
            let (sd, sx) = acc.split_at_mut(width);
            let (scale, shift) = (&scale[ch.clone()], &shift[ch.clone()]);
            let (mean, invstd) = (&mean[ch.clone()], &invstd[ch.clone()]);
            for r in r {
                let (xr, gr) = (&x[r * c..][ch.clone()], &dy[r * c..][ch.clone()]);
                // SAFETY: `dx` holds rows·c values (asserted above) and is borrowed mutably for this
                // whole call; this task alone writes row r's channels `ch` (row tasks and channel
                // blocks partition rows × channels), and pass 2 starts after every task has ended.
                let dzr = unsafe {
                    let first = (dz_addr as *mut f32).add(r * c + ch.start);
                    std::slice::from_raw_parts_mut(first, width)
                };
                for (((o, xv), g), (s, b)) in
                    dzr.iter_mut().zip(xr).zip(gr).zip(scale.iter().zip(shift))
                {
                    *o = g * A::derivative(xv * s + b);
                }
                for ((((dz, xv), (m, is)), sd), sx) in dzr
                    .iter()
                    .zip(xr)
                    .zip(mean.iter().zip(invstd))
                    .zip(sd.iter_mut())
                    .zip(sx.iter_mut())
                {
                    *sd += dz;
                    *sx += dz * (xv - m) * is;
                }
            }
        },
    );
    for ch in 0..c {
        dbeta[ch] += local[ch] as f32;
        dgamma[ch] += local[c + ch] as f32;
    }
    let (sums, total) = across_replicas(local, rows, sync);
    let inv_rows = 1.0 / total;
    let mean_dz: Vec<f32> = sums[..c].iter().map(|s| (s * inv_rows) as f32).collect();
    let mean_dzx: Vec<f32> = sums[c..].iter().map(|s| (s * inv_rows) as f32).collect();
    // Pass 2: dx = scale·(dz − mean(dz) − x̂·mean(dz·x̂)), in place over dz.
    let chunk = elementwise_rows(c) * c;
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(dxc, xc)| {
            simd::dispatch(
                #[inline(always)]
                || {
                    for (dr, xr) in dxc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                        let it = dr
                            .iter_mut()
                            .zip(xr)
                            .zip(scale.iter().zip(mean.iter().zip(invstd)));
                        for (((o, xv), (s, (m, is))), (md, mx)) in
                            it.zip(mean_dz.iter().zip(&mean_dzx))
                        {
                            *o = s * (*o - md - (xv - m) * is * mx);
                        }
                    }
                },
            )
        });
}
