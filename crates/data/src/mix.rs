//! Mixup and CutMix on a batch, with the reference's semantics (`dataloader/dataset.py`):
//!
//! - Each example is paired with the batch reversed (`x[::-1]`); when both are on, the first
//!   half (`n / 2` examples) gets mixup and the rest cutmix, each half paired with itself reversed.
//! - Mixup: per example λ ~ Beta(α, α), λ := max(λ, 1 − λ); image and target are
//!   λ·own + (1 − λ)·partner.
//! - CutMix: per example a box centered uniformly (integer center), of side
//!   `trunc(sqrt(1 − a)·w) × trunc(sqrt(1 − a)·h)` with a ~ Beta(α, α) (the box spans
//!   `center ± side / 2`, integer halves, clipped to the image); inside it the pixels are the
//!   partner's. The target weights the partner by the box's area fraction.
//!   The reference computes that fraction over the **whole batch's** masks (one weight for every
//!   example); [`CutmixWeight::PerExample`], our default, uses each example's own box, which is
//!   the fraction of its pixels that actually came from the partner.
//! - α = 0 turns a method off.
//!
//! Label smoothing, (1 − ε)·onehot + ε/K, is applied to the targets before mixing. Both are affine
//! with weights summing to one, so this equals smoothing after mixing (the reference smooths in
//! the loss).

use effnet_engine::rng::Rng;

/// How CutMix weighs the partner's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CutmixWeight {
    /// Each example's own box area fraction.
    #[default]
    PerExample,
    /// The reference: the mean box area fraction over the cutmix examples of the batch.
    WholeBatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MixConfig {
    /// Mixup's Beta(α, α); 0 turns it off.
    pub mixup_alpha: f64,
    /// CutMix's Beta(α, α); 0 turns it off.
    pub cutmix_alpha: f64,
    /// ε of label smoothing; 0 for one-hot targets.
    pub label_smoothing: f32,
    pub cutmix_weight: CutmixWeight,
}

impl MixConfig {
    pub fn is_on(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0
    }
}

/// `[n, classes]` targets (1 − ε)·onehot + ε/K.
pub fn smoothed_targets(labels: &[usize], classes: usize, eps: f32) -> Result<Vec<f32>, String> {
    if !(0.0..1.0).contains(&eps) {
        return Err(format!("label smoothing {eps} is not in [0, 1)"));
    }
    let mut t = vec![eps / classes as f32; labels.len() * classes];
    for (row, &l) in t.chunks_exact_mut(classes.max(1)).zip(labels) {
        if l >= classes {
            return Err(format!("label {l} is out of range for {classes} classes"));
        }
        row[l] += 1.0 - eps;
    }
    Ok(t)
}

/// λ ~ Beta(α, α) folded to [0.5, 1].
fn mixup_lambda(alpha: f64, rng: &mut Rng) -> f32 {
    let l = rng.beta(alpha, alpha);
    // Both gammas underflow to 0 only for tiny α: treat as "no mixing".
    let l = if l.is_finite() { l } else { 1.0 };
    l.max(1.0 - l) as f32
}

/// The reference's CutMix box `(x1, y1, x2, y2)`, half-open, in a `w × h` image.
fn cutmix_box(alpha: f64, w: usize, h: usize, rng: &mut Rng) -> (usize, usize, usize, usize) {
    let rx = rng.below(w) as i64;
    let ry = rng.below(h) as i64;
    let area = rng.beta(alpha, alpha);
    let area = if area.is_finite() { area } else { 0.0 };
    let ratio = (1.0 - area).max(0.0).sqrt();
    let half_w = (ratio * w as f64) as i64 / 2;
    let half_h = (ratio * h as f64) as i64 / 2;
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    (
        clip(rx - half_w, w),
        clip(ry - half_h, h),
        clip(rx + half_w, w),
        clip(ry + half_h, h),
    )
}

/// Mixes a batch of NHWC images `[n, h, w, c]` in place and returns its `[n, classes]` soft
/// targets (just the smoothed one-hot ones when both α are 0). Draws, in order: the mixup λs,
/// then each cutmix box (center x, center y, area).
pub fn mix_batch(
    images: &mut [f32],
    (n, h, w, c): (usize, usize, usize, usize),
    labels: &[usize],
    classes: usize,
    cfg: &MixConfig,
    rng: &mut Rng,
) -> Result<Vec<f32>, String> {
    if images.len() != n * h * w * c || labels.len() != n {
        return Err(format!(
            "a batch of {} values and {} labels does not match [{n}, {h}, {w}, {c}]",
            images.len(),
            labels.len()
        ));
    }
    for a in [cfg.mixup_alpha, cfg.cutmix_alpha] {
        if !(a.is_finite() && a >= 0.0) {
            return Err(format!("mixing α {a} must be finite and ≥ 0"));
        }
    }
    let mut targets = smoothed_targets(labels, classes, cfg.label_smoothing)?;
    let (mixup, cutmix) = (cfg.mixup_alpha > 0.0, cfg.cutmix_alpha > 0.0);
    if n == 0 || !(mixup || cutmix) {
        return Ok(targets);
    }
    let split = match (mixup, cutmix) {
        (true, true) => n / 2,
        (true, false) => n,
        _ => 0,
    };
    let original = images.to_vec();
    let own = targets.clone();
    let img_len = h * w * c;
    let image = |i: usize| &original[i * img_len..(i + 1) * img_len];
    // Own weight per example: λ for mixup, the kept fraction for cutmix.
    let mut weights = vec![1f32; n];

    // Mixup on [0, split), partner reversed within that range.
    for i in 0..split {
        let l = mixup_lambda(cfg.mixup_alpha, rng);
        weights[i] = l;
        let p = split - 1 - i;
        let (a, b) = (image(i), image(p));
        for ((o, x), y) in images[i * img_len..(i + 1) * img_len]
            .iter_mut()
            .zip(a)
            .zip(b)
        {
            *o = l * x + (1.0 - l) * y;
        }
    }

    // CutMix on [split, n), partner reversed within that range.
    let pixels = (h * w) as f32;
    for i in split..n {
        let (x1, y1, x2, y2) = cutmix_box(cfg.cutmix_alpha, w, h, rng);
        let p = split + (n - 1 - i);
        let b = image(p);
        for y in y1..y2 {
            let row = (y * w + x1) * c..(y * w + x2) * c;
            images[i * img_len..][row.clone()].copy_from_slice(&b[row]);
        }
        weights[i] = 1.0 - ((x2 - x1) * (y2 - y1)) as f32 / pixels;
    }
    if cfg.cutmix_weight == CutmixWeight::WholeBatch && split < n {
        let mean = weights[split..].iter().sum::<f32>() / (n - split) as f32;
        weights[split..].fill(mean);
    }

    let partner = |i: usize| {
        if i < split {
            split - 1 - i
        } else {
            split + (n - 1 - i)
        }
    };
    for i in 0..n {
        let (l, p) = (weights[i], partner(i));
        let row = &mut targets[i * classes..(i + 1) * classes];
        for ((t, a), b) in row
            .iter_mut()
            .zip(&own[i * classes..(i + 1) * classes])
            .zip(&own[p * classes..(p + 1) * classes])
        {
            *t = l * a + (1.0 - l) * b;
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = 10;

    /// `n` images of `h × w × 3` with random values, and labels 0..n (all distinct).
    fn batch(n: usize, h: usize, w: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let images = (0..n * h * w * 3)
            .map(|_| rng.uniform_in(0.0, 255.0) as f32)
            .collect();
        (images, (0..n).collect())
    }

    /// Images whose every value is `100 · (i + 1)`, so each pixel says where it came from.
    fn constant_batch(n: usize, h: usize, w: usize) -> Vec<f32> {
        (0..n)
            .flat_map(|i| std::iter::repeat_n(100.0 * (i + 1) as f32, h * w * 3))
            .collect()
    }

    fn row(t: &[f32], i: usize) -> &[f32] {
        &t[i * K..(i + 1) * K]
    }

    #[test]
    fn mixup_blends_with_the_reversed_batch() {
        let (n, h, w) = (8, 5, 6);
        let (x, labels) = batch(n, h, w, 1);
        let mut mixed = x.clone();
        let cfg = MixConfig {
            mixup_alpha: 0.2,
            ..Default::default()
        };
        let t = mix_batch(&mut mixed, (n, h, w, 3), &labels, K, &cfg, &mut Rng::new(5)).unwrap();
        let len = h * w * 3;
        for i in 0..n {
            let p = n - 1 - i;
            let l = row(&t, i)[labels[i]];
            assert!((0.5..=1.0).contains(&l), "λ {l}");
            assert_eq!(row(&t, i)[labels[p]], 1.0 - l);
            for j in 0..len {
                assert_eq!(
                    mixed[i * len + j],
                    l * x[i * len + j] + (1.0 - l) * x[p * len + j]
                );
            }
        }
        // λ ≥ 1/2 over many draws too.
        let mut rng = Rng::new(9);
        assert!((0..10_000).all(|_| (0.5..=1.0).contains(&mixup_lambda(0.2, &mut rng))));
    }

    #[test]
    fn targets_are_distributions() {
        let (n, h, w) = (7, 4, 4);
        for (mixup_alpha, cutmix_alpha) in [(0.0, 0.0), (0.8, 0.0), (0.0, 1.0), (0.2, 0.5)] {
            for cutmix_weight in [CutmixWeight::PerExample, CutmixWeight::WholeBatch] {
                let (mut x, _) = batch(n, h, w, 2);
                let labels = [3, 1, 4, 1, 5, 9, 2];
                let cfg = MixConfig {
                    mixup_alpha,
                    cutmix_alpha,
                    label_smoothing: 0.1,
                    cutmix_weight,
                };
                let t =
                    mix_batch(&mut x, (n, h, w, 3), &labels, K, &cfg, &mut Rng::new(3)).unwrap();
                for i in 0..n {
                    let s: f32 = row(&t, i).iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "row {i} sums to {s}");
                    assert!(row(&t, i).iter().all(|&v| v >= 0.01 - 1e-6));
                }
            }
        }
    }

    #[test]
    fn cutmix_pastes_a_box_and_weighs_its_area() {
        let (n, h, w) = (6, 12, 16);
        let labels: Vec<usize> = (0..n).collect();
        let cfg = MixConfig {
            cutmix_alpha: 1.0,
            ..Default::default()
        };
        let mut rng = Rng::new(4);
        let mut partial = 0;
        for _ in 0..50 {
            let mut x = constant_batch(n, h, w);
            let t = mix_batch(&mut x, (n, h, w, 3), &labels, K, &cfg, &mut rng).unwrap();
            let len = h * w * 3;
            for i in 0..n {
                let (own, partner) = (100.0 * (i + 1) as f32, 100.0 * (n - i) as f32);
                let img = &x[i * len..(i + 1) * len];
                assert!(img.iter().all(|&v| v == own || v == partner));
                // The partner's pixels form one axis-aligned box.
                let from_partner = |px: usize| img[px * 3] != own;
                let (mut x1, mut y1, mut x2, mut y2, mut count) = (w, h, 0, 0, 0);
                for y in 0..h {
                    for xx in 0..w {
                        if from_partner(y * w + xx) {
                            (x1, y1, x2, y2) =
                                (x1.min(xx), y1.min(y), x2.max(xx + 1), y2.max(y + 1));
                            count += 1;
                        }
                    }
                }
                if count > 0 {
                    assert_eq!(count, (x2 - x1) * (y2 - y1), "not a box");
                }
                let kept = 1.0 - count as f32 / (h * w) as f32;
                if i != n - 1 - i {
                    assert!((row(&t, i)[i] - kept).abs() < 1e-6);
                    assert!((row(&t, i)[n - 1 - i] - (1.0 - kept)).abs() < 1e-6);
                }
                partial += (count > 0 && kept > 0.0) as usize;
            }
        }
        assert!(partial > 100, "only {partial} partial boxes");
    }

    #[test]
    fn whole_batch_weight_is_the_mean_kept_fraction() {
        let (n, h, w) = (4, 10, 10);
        let labels: Vec<usize> = (0..n).collect();
        let mut x = constant_batch(n, h, w);
        let cfg = MixConfig {
            cutmix_alpha: 1.0,
            cutmix_weight: CutmixWeight::WholeBatch,
            ..Default::default()
        };
        let t = mix_batch(&mut x, (n, h, w, 3), &labels, K, &cfg, &mut Rng::new(8)).unwrap();
        let len = h * w * 3;
        let kept: Vec<f32> = (0..n)
            .map(|i| {
                let own = 100.0 * (i + 1) as f32;
                x[i * len..(i + 1) * len]
                    .iter()
                    .filter(|&&v| v == own)
                    .count() as f32
                    / len as f32
            })
            .collect();
        let mean = kept.iter().sum::<f32>() / n as f32;
        for i in 0..n {
            assert!((row(&t, i)[i] - mean).abs() < 1e-6);
        }
    }

    #[test]
    fn both_on_splits_the_batch() {
        let (n, h, w) = (8, 6, 6);
        let labels: Vec<usize> = (0..n).collect();
        let mut x = constant_batch(n, h, w);
        let cfg = MixConfig {
            mixup_alpha: 0.5,
            cutmix_alpha: 0.5,
            ..Default::default()
        };
        let t = mix_batch(&mut x, (n, h, w, 3), &labels, K, &cfg, &mut Rng::new(6)).unwrap();
        let len = h * w * 3;
        let value = |i: usize| 100.0 * (i + 1) as f32;
        for i in 0..n / 2 {
            // Mixup, paired within the first half.
            let p = n / 2 - 1 - i;
            let l = row(&t, i)[i];
            assert_eq!(row(&t, i)[p], 1.0 - l);
            let expect = l * value(i) + (1.0 - l) * value(p);
            assert!(x[i * len..(i + 1) * len].iter().all(|&v| v == expect));
        }
        for i in n / 2..n {
            // CutMix, paired within the second half.
            let p = n / 2 + (n - 1 - i);
            assert!(x[i * len..(i + 1) * len]
                .iter()
                .all(|&v| v == value(i) || v == value(p)));
            let s = row(&t, i)[i] + row(&t, i)[p];
            assert!((s - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn alpha_zero_is_off_and_smoothing_commutes() {
        let (n, h, w) = (4, 3, 3);
        let (x, labels) = batch(n, h, w, 7);
        let mut y = x.clone();
        let off = MixConfig {
            label_smoothing: 0.1,
            ..Default::default()
        };
        let t = mix_batch(&mut y, (n, h, w, 3), &labels, K, &off, &mut Rng::new(1)).unwrap();
        assert_eq!(x, y);
        assert_eq!(t, smoothed_targets(&labels, K, 0.1).unwrap());

        let on = MixConfig {
            mixup_alpha: 0.4,
            ..Default::default()
        };
        let smooth = MixConfig {
            label_smoothing: 0.1,
            ..on
        };
        let plain = mix_batch(
            &mut x.clone(),
            (n, h, w, 3),
            &labels,
            K,
            &on,
            &mut Rng::new(2),
        )
        .unwrap();
        let smoothed = mix_batch(
            &mut x.clone(),
            (n, h, w, 3),
            &labels,
            K,
            &smooth,
            &mut Rng::new(2),
        )
        .unwrap();
        for (a, b) in plain.iter().zip(&smoothed) {
            assert!((0.9 * a + 0.01 - b).abs() < 1e-6);
        }
    }

    #[test]
    fn same_seed_same_mix_and_bad_input_is_an_error() {
        let (n, h, w) = (6, 8, 8);
        let (x, labels) = batch(n, h, w, 3);
        let cfg = MixConfig {
            mixup_alpha: 0.2,
            cutmix_alpha: 1.0,
            label_smoothing: 0.1,
            cutmix_weight: CutmixWeight::PerExample,
        };
        let run = |seed| {
            let mut y = x.clone();
            let t = mix_batch(&mut y, (n, h, w, 3), &labels, K, &cfg, &mut Rng::new(seed)).unwrap();
            (y, t)
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let mut y = x.clone();
        assert!(mix_batch(
            &mut y,
            (n, h, w, 3),
            &[0, 1, 2, 3, 4, 10],
            K,
            &cfg,
            &mut Rng::new(1)
        )
        .is_err());
        assert!(mix_batch(&mut y, (n + 1, h, w, 3), &labels, K, &cfg, &mut Rng::new(1)).is_err());
        let bad = MixConfig {
            mixup_alpha: -1.0,
            ..cfg
        };
        assert!(mix_batch(&mut y, (n, h, w, 3), &labels, K, &bad, &mut Rng::new(1)).is_err());
    }
}
