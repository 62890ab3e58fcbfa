//! A tiny network and labelled batches for the training tests.
#![allow(dead_code)]

use effnet_engine::rng::Rng;
use effnet_model::family::{ArchConfig, Preprocess, StageSpec};
use effnet_model::{Act, Network};
use effnet_train::optim::Kind;
use effnet_train::schedule::{Decay, Schedule};
use effnet_train::trainer::TrainConfig;

pub fn tiny(dropout: f32) -> Network {
    let stages = ["cn_r1_k3_s1_e1_c8_skip", "ir_r2_k3_s2_e3_c16_se0.25"]
        .iter()
        .map(|s| StageSpec::parse(s).unwrap())
        .collect();
    Network::new(ArchConfig {
        name: "tiny".into(),
        stages,
        stem_size: 8,
        num_features: 32,
        width: 1.0,
        depth: 1.0,
        round_limit: 0.9,
        fix_stem_head: false,
        act: Act::Silu,
        num_classes: 3,
        dropout,
        drop_path: dropout,
        bn_eps: 1e-3,
        eval_size: 12,
        preprocess: Preprocess::default(),
    })
}

pub fn config(accumulation: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        accumulation,
        label_smoothing: 0.1,
        bn_momentum: 0.9,
        optimizer: Kind::RmsProp {
            rho: 0.9,
            momentum: 0.9,
            epsilon: 1e-3,
        },
        weight_decay: 5e-6,
        schedule: Schedule {
            peak: lr,
            warmup_steps: 0,
            total_steps: 1000,
            decay: Decay::Cosine,
        },
        ema_decay: Some(0.99),
        grad_clip_norm: 0.0,
        seed: 1,
    }
}

/// Three classes told apart by which color channel is bright.
pub fn batch(rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<usize>) {
    let labels: Vec<usize> = (0..n).map(|_| rng.below(3)).collect();
    let mut x = vec![0f32; n * 12 * 12 * 3];
    for (b, &l) in labels.iter().enumerate() {
        for p in 0..144 {
            for c in 0..3 {
                x[(b * 144 + p) * 3 + c] =
                    0.3 * rng.normal() as f32 + if c == l { 1.0 } else { -0.5 };
            }
        }
    }
    (x, labels)
}
