//! Stage-wise progressive training as the reference does it: `n` stages of `epochs / n` epochs
//! (the last takes the remainder); stage k trains at image size `int(base + (final − base)·(k+1)/n)`
//! and RandAugment magnitude, mixup and cutmix `linspace(base, final, n)[k]`. The optimizer and
//! its schedule continue across stages.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StagePlan {
    pub first_epoch: u64,
    /// One past the stage's last epoch.
    pub end_epoch: u64,
    pub img_size: usize,
    pub magnitude: f32,
    pub mixup: f64,
    pub cutmix: f64,
}

/// (base, final) of each scheduled quantity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    pub img_size: (usize, usize),
    pub magnitude: (f32, f32),
    pub mixup: (f64, f64),
    pub cutmix: (f64, f64),
}

fn linspace(lo: f64, hi: f64, n: usize, k: usize) -> f64 {
    if n <= 1 {
        hi
    } else {
        lo + (hi - lo) * k as f64 / (n - 1) as f64
    }
}

pub fn plan(n_stages: usize, epochs: u64, ramp: Ramp) -> Vec<StagePlan> {
    let n = n_stages.clamp(1, epochs.max(1) as usize);
    let per = epochs / n as u64;
    (0..n)
        .map(|k| {
            let (b, f) = (ramp.img_size.0 as f64, ramp.img_size.1 as f64);
            StagePlan {
                first_epoch: k as u64 * per,
                end_epoch: if k + 1 == n {
                    epochs
                } else {
                    (k as u64 + 1) * per
                },
                img_size: (b + (f - b) * (k + 1) as f64 / n as f64) as usize,
                magnitude: linspace(ramp.magnitude.0 as f64, ramp.magnitude.1 as f64, n, k) as f32,
                mixup: linspace(ramp.mixup.0, ramp.mixup.1, n, k),
                cutmix: linspace(ramp.cutmix.0, ramp.cutmix.1, n, k),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_v2_s_recipe() {
        let ramp = Ramp {
            img_size: (128, 300),
            magnitude: (5.0, 15.0),
            mixup: (0.0, 0.0),
            cutmix: (0.0, 0.0),
        };
        let p = plan(4, 350, ramp);
        let sizes: Vec<usize> = p.iter().map(|s| s.img_size).collect();
        assert_eq!(sizes, vec![171, 214, 257, 300]);
        let epochs: Vec<(u64, u64)> = p.iter().map(|s| (s.first_epoch, s.end_epoch)).collect();
        assert_eq!(epochs, vec![(0, 87), (87, 174), (174, 261), (261, 350)]);
        let mags: Vec<f32> = p.iter().map(|s| s.magnitude).collect();
        assert!((mags[1] - 8.333_333).abs() < 1e-4 && mags[0] == 5.0 && mags[3] == 15.0);
        // One stage: the final values throughout.
        let one = plan(
            1,
            10,
            Ramp {
                mixup: (0.0, 0.2),
                ..ramp
            },
        );
        assert_eq!(
            (
                one[0].img_size,
                one[0].magnitude,
                one[0].mixup,
                one[0].end_epoch
            ),
            (300, 15.0, 0.2, 10)
        );
    }
}
