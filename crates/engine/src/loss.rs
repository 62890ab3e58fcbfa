//! Softmax cross-entropy against probability targets (hard labels with label smoothing, or the
//! soft targets that mixup and cutmix make).

/// Targets for hard labels: `(1 − ε)·onehot + ε/K`, which is PyTorch's `label_smoothing = ε`.
pub fn smoothed_targets(labels: &[usize], classes: usize, smoothing: f32, out: &mut [f32]) {
    let off = smoothing / classes as f32;
    for (row, &label) in out.chunks_exact_mut(classes).zip(labels) {
        row.fill(off);
        row[label] += 1.0 - smoothing;
    }
}

/// Row-wise softmax of `[n, classes]` logits.
pub fn softmax(logits: &[f32], classes: usize, probs: &mut [f32]) {
    for (z, p) in logits
        .chunks_exact(classes)
        .zip(probs.chunks_exact_mut(classes))
    {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f64;
        for (pi, zi) in p.iter_mut().zip(z) {
            *pi = (zi - max).exp();
            sum += *pi as f64;
        }
        let inv = (1.0 / sum) as f32;
        for pi in p.iter_mut() {
            *pi *= inv;
        }
    }
}

/// Mean over the batch of `−Σ_k t_k · log softmax(z)_k`; writes `d loss / d logits` to `dlogits`.
pub fn softmax_cross_entropy(
    logits: &[f32],
    classes: usize,
    targets: &[f32],
    dlogits: &mut [f32],
) -> f32 {
    let n = logits.len() / classes;
    let mut total = 0f64;
    for ((z, t), d) in logits
        .chunks_exact(classes)
        .zip(targets.chunks_exact(classes))
        .zip(dlogits.chunks_exact_mut(classes))
    {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
        let log_norm = max + sum.ln();
        let t_sum: f64 = t.iter().map(|&v| v as f64).sum();
        for ((di, &zi), &ti) in d.iter_mut().zip(z).zip(t) {
            let log_p = zi as f64 - log_norm;
            total -= ti as f64 * log_p;
            // d/dz of −Σ t·log p = p·Σt − t
            *di = ((log_p.exp() * t_sum - ti as f64) / n as f64) as f32;
        }
    }
    (total / n as f64) as f32
}
