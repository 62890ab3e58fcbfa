//! Learning-rate schedules, stepped per optimizer step: linear warmup from 0 (as the reference's
//! `WarmupDecaySchedule`: `peak · step / warmup_steps`, so step 0 has rate 0), then cosine,
//! exponential (staircase) or piecewise-constant decay. The base rate scales with the global
//! batch as the reference does: `lr_init · global_batch / 128`.

#[derive(Debug, Clone, PartialEq)]
pub enum Decay {
    /// Half a cosine from the peak to 0 over the steps after warmup.
    Cosine,
    /// `peak · rate^floor(steps_after_warmup / every)`.
    Exponential { rate: f64, every: u64 },
    /// `peak · factors[k]` from `boundaries[k-1]` (steps after warmup) on; `factors[0]` before.
    Piecewise {
        boundaries: Vec<u64>,
        factors: Vec<f64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The reference's peak: `lr_init · global_batch / 128`.
    pub fn scaled_peak(lr_init: f64, global_batch: usize) -> f64 {
        lr_init * global_batch as f64 / 128.0
    }

    /// The learning rate for optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps as f64;
        }
        let after = step - self.warmup_steps;
        match &self.decay {
            Decay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = (after as f64 / span as f64).min(1.0);
                0.5 * self.peak * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Decay::Exponential { rate, every } => {
                self.peak * rate.powi((after / (*every).max(1)) as i32)
            }
            Decay::Piecewise {
                boundaries,
                factors,
            } => {
                let k = boundaries.iter().filter(|&&b| after >= b).count();
                self.peak * factors.get(k).or(factors.last()).copied().unwrap_or(1.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule {
            peak: 0.4,
            warmup_steps: 4,
            total_steps: 14,
            decay: Decay::Cosine,
        };
        assert!(s.at(0) == 0.0 && (s.at(1) - 0.1).abs() < 1e-12 && (s.at(3) - 0.3).abs() < 1e-12);
        assert!((s.at(4) - 0.4).abs() < 1e-12);
        assert!((s.at(9) - 0.2).abs() < 1e-12, "half way: {}", s.at(9));
        assert!(s.at(14).abs() < 1e-12 && s.at(100).abs() < 1e-12);
        assert_eq!(Schedule::scaled_peak(0.005, 256), 0.01);
    }

    #[test]
    fn exponential_staircase_and_piecewise() {
        let e = Schedule {
            peak: 1.0,
            warmup_steps: 0,
            total_steps: 100,
            decay: Decay::Exponential {
                rate: 0.97,
                every: 24,
            },
        };
        assert_eq!(e.at(23), 1.0);
        assert!((e.at(24) - 0.97).abs() < 1e-12 && (e.at(50) - 0.97f64.powi(2)).abs() < 1e-12);
        let p = Schedule {
            peak: 2.0,
            warmup_steps: 2,
            total_steps: 100,
            decay: Decay::Piecewise {
                boundaries: vec![10, 20],
                factors: vec![1.0, 0.1, 0.01],
            },
        };
        assert_eq!(p.at(2), 2.0);
        assert!((p.at(12) - 0.2).abs() < 1e-12 && (p.at(30) - 0.02).abs() < 1e-12);
    }
}
