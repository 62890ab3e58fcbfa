//! The whole network's backward pass against finite differences of its forward pass, in
//! training mode with dropout and drop-path active (the same masks on every pass: the random
//! stream is re-seeded), on a tiny network with every block kind.

use effnet_engine::loss;
use effnet_engine::rng::Rng;
use effnet_model::family::{ArchConfig, Preprocess, StageSpec};
use effnet_model::{Act, Mode, Network, Weights};

fn tiny() -> Network {
    let stages = [
        "cn_r2_k3_s1_e1_c8_skip",
        "er_r1_k3_s2_e2_c8",
        "ds_r2_k3_s1_e1_c8_se0.25",
        "ir_r2_k5_s2_e3_c16_se0.25",
    ]
    .iter()
    .map(|s| StageSpec::parse(s).unwrap())
    .collect();
    Network::new(ArchConfig {
        name: "tiny".into(),
        stages,
        stem_size: 8,
        num_features: 16,
        width: 1.0,
        depth: 1.0,
        round_limit: 0.9,
        fix_stem_head: false,
        act: Act::Silu,
        num_classes: 5,
        dropout: 0.3,
        drop_path: 0.5,
        bn_eps: 1e-3,
        eval_size: 9,
        preprocess: Preprocess::default(),
    })
}

/// Loss of one training-mode forward pass with the masks drawn from `seed`.
fn loss_at(
    net: &Network,
    w: &mut Weights,
    x: &[f32],
    targets: &[f32],
    seed: u64,
) -> (f32, Vec<f32>, effnet_model::Workspace) {
    let mut ws = net.workspace(3, 9, 9);
    let mode = Mode::Train {
        bn_momentum: 0.1,
        stochastic: true,
    };
    let logits = net
        .forward(w, &mut ws, x, mode, &mut Rng::new(seed))
        .to_vec();
    let mut dlogits = vec![0f32; logits.len()];
    let value = loss::softmax_cross_entropy(&logits, net.classes, targets, &mut dlogits);
    (value, dlogits, ws)
}

#[test]
fn backward_matches_finite_differences_with_dropout_and_drop_path() {
    let net = tiny();
    let mut w = Weights::init(&net, 4);
    // Non-trivial BN affine parameters, so their gradients are exercised away from γ=1, β=0.
    let mut rng = Rng::new(8);
    for e in &net.layout.params {
        if matches!(
            e.kind,
            effnet_model::ParamKind::BnWeight
                | effnet_model::ParamKind::BnBias
                | effnet_model::ParamKind::ConvBias
        ) {
            for v in &mut w.params[e.range.clone()] {
                *v += 0.3 * rng.normal() as f32;
            }
        }
    }
    let x: Vec<f32> = (0..3 * 9 * 9 * 3).map(|_| rng.normal() as f32).collect();
    let mut targets = vec![0f32; 3 * net.classes];
    loss::smoothed_targets(&[1, 4, 0], net.classes, 0.1, &mut targets);

    // Find a seed whose masks drop some samples' branches but not all (so both paths count).
    let seed = 11;
    let (_, dlogits, mut ws) = loss_at(&net, &mut w.clone(), &x, &targets, seed);
    let mut grads = vec![0f32; w.params.len()];
    net.backward(&w.clone(), &mut ws, &dlogits, &mut grads);

    let mut checked = 0;
    for e in &net.layout.params {
        // The largest-gradient coordinate of each tensor: least affected by f32 round-off.
        let (i, g) = grads[e.range.clone()]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, g)| (e.range.start + i, *g))
            .unwrap();
        if g.abs() < 1e-3 {
            continue;
        }
        let h = 1e-2f32;
        let mut plus = w.clone();
        plus.params[i] += h;
        let mut minus = w.clone();
        minus.params[i] -= h;
        let up = loss_at(&net, &mut plus, &x, &targets, seed).0 as f64;
        let down = loss_at(&net, &mut minus, &x, &targets, seed).0 as f64;
        let numeric = (up - down) / (2.0 * h as f64);
        let err = (numeric - g as f64).abs() / numeric.abs().max(g.abs() as f64);
        assert!(
            err < 3e-2,
            "{}[{}]: backward {g:.6} vs finite difference {numeric:.6}",
            e.name,
            i - e.range.start
        );
        checked += 1;
    }
    assert!(
        checked > 30,
        "only {checked} tensors had a measurable gradient"
    );
}

#[test]
fn stochastic_masks_change_training_outputs_and_eval_is_deterministic() {
    let net = tiny();
    let mut w = Weights::init(&net, 1);
    let x: Vec<f32> = (0..3 * 9 * 9 * 3)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let mut ws = net.workspace(3, 9, 9);
    let train = Mode::Train {
        bn_momentum: 0.1,
        stochastic: true,
    };
    let a = net
        .forward(&mut w, &mut ws, &x, train, &mut Rng::new(1))
        .to_vec();
    let b = net
        .forward(&mut w, &mut ws, &x, train, &mut Rng::new(2))
        .to_vec();
    let a2 = net
        .forward(&mut w, &mut ws, &x, train, &mut Rng::new(1))
        .to_vec();
    assert_ne!(a, b, "different masks give different outputs");
    assert_eq!(a, a2, "the same seed gives the same outputs");
    let e1 = net
        .forward(&mut w, &mut ws, &x, Mode::Eval, &mut Rng::new(1))
        .to_vec();
    let e2 = net
        .forward(&mut w, &mut ws, &x, Mode::Eval, &mut Rng::new(2))
        .to_vec();
    assert_eq!(e1, e2, "eval mode draws nothing");
    // Training-mode passes moved the running statistics and counted the batches.
    assert!(w.tracked.iter().all(|&t| t == 3));
    assert!(w.buffers.iter().any(|&v| v != 0.0 && v != 1.0));
}

#[test]
fn inference_workspace_gives_the_same_logits_with_less_memory() {
    let net = tiny();
    let mut w = Weights::init(&net, 5);
    let x: Vec<f32> = (0..3 * 9 * 9 * 3)
        .map(|i| ((i * 13 % 29) as f32 / 10.0) - 1.4)
        .collect();
    let mut train_ws = net.workspace(3, 9, 9);
    let mut infer_ws = net.inference_workspace(3, 9, 9);
    let a = net
        .forward(&mut w, &mut train_ws, &x, Mode::Eval, &mut Rng::new(0))
        .to_vec();
    let b = net
        .forward(&mut w, &mut infer_ws, &x, Mode::Eval, &mut Rng::new(0))
        .to_vec();
    // Not bit for bit: an inference workspace's squeeze-excitations pool from the depthwise
    // layer's row sums (the same sums, added in another order).
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * scale, "{a:?} vs {b:?}");
    assert!(
        infer_ws.bytes() * 10 < train_ws.bytes() * 6,
        "{} vs {}",
        infer_ws.bytes(),
        train_ws.bytes()
    );
}

#[test]
#[should_panic(expected = "inference_workspace")]
fn training_on_an_inference_workspace_is_refused() {
    let net = tiny();
    let mut w = Weights::init(&net, 5);
    let mut ws = net.inference_workspace(3, 9, 9);
    let x = vec![0f32; 3 * 9 * 9 * 3];
    let mode = Mode::Train {
        bn_momentum: 0.1,
        stochastic: false,
    };
    net.forward(&mut w, &mut ws, &x, mode, &mut Rng::new(0));
}

fn close(a: &[f32], b: &[f32]) -> bool {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale)
}

#[test]
fn frozen_weights_give_the_same_logits_until_the_weights_change() {
    let net = tiny();
    let mut w = Weights::init(&net, 5);
    let x: Vec<f32> = (0..3 * 9 * 9 * 3)
        .map(|i| ((i * 13 % 29) as f32 / 10.0) - 1.4)
        .collect();
    let eval = |w: &mut Weights, ws: &mut effnet_model::Workspace| {
        net.forward(w, ws, &x, Mode::Eval, &mut Rng::new(0))
            .to_vec()
    };
    let mut plain_ws = net.inference_workspace(3, 9, 9);
    let mut ws = net.inference_workspace(3, 9, 9);
    net.freeze(&w, &mut ws);
    let before = eval(&mut w, &mut plain_ws);
    assert!(close(&eval(&mut w, &mut ws), &before));
    // Running statistics changed in place are not seen until frozen again: the pass really
    // reads the prepared (folded) copies.
    for v in w.buffers.iter_mut() {
        *v = *v * 1.5 + 0.1;
    }
    let after = eval(&mut w, &mut plain_ws);
    assert!(!close(&after, &before));
    assert!(close(&eval(&mut w, &mut ws), &before));
    net.freeze(&w, &mut ws);
    assert!(close(&eval(&mut w, &mut ws), &after));
    // Another batch size shares the prepared weights (not the live ones, changed again here):
    // batch 1 of the same images gives the first image's frozen logits.
    for v in w.buffers.iter_mut() {
        *v = *v * 0.5 + 0.3;
    }
    let mut one = net.inference_workspace(1, 9, 9);
    one.share_frozen(&ws);
    let image = &x[..9 * 9 * 3];
    let first = net
        .forward(&mut w, &mut one, image, Mode::Eval, &mut Rng::new(0))
        .to_vec();
    assert!(close(&first, &after[..first.len()]));
    let mut live = net.inference_workspace(1, 9, 9);
    let live = net.forward(&mut w, &mut live, image, Mode::Eval, &mut Rng::new(0));
    assert!(!close(live, &first));
    // A training-mode pass (weights and statistics move) drops the prepared copies.
    let mut train_ws = net.workspace(3, 9, 9);
    net.freeze(&w, &mut train_ws);
    let mode = Mode::Train {
        bn_momentum: 0.5,
        stochastic: false,
    };
    net.forward(&mut w, &mut train_ws, &x, mode, &mut Rng::new(0));
    let moved = eval(&mut w, &mut plain_ws);
    assert!(!close(&moved, &after));
    assert!(close(&eval(&mut w, &mut train_ws), &moved));
}

#[test]
#[should_panic(expected = "frozen with other weights")]
fn a_workspace_frozen_with_other_weights_is_refused() {
    let net = tiny();
    let (w, mut other) = (Weights::init(&net, 5), Weights::init(&net, 6));
    let mut ws = net.inference_workspace(3, 9, 9);
    net.freeze(&w, &mut ws);
    net.forward(
        &mut other,
        &mut ws,
        &vec![0f32; 3 * 9 * 9 * 3],
        Mode::Eval,
        &mut Rng::new(0),
    );
}

/// Precise BN: after two batches, every running statistic is the average of what each batch
/// alone records, for every weight set given, and the parameters are unchanged.
#[test]
fn recomputed_bn_stats_average_the_batches() {
    let net = tiny();
    let w0 = Weights::init(&net, 4);
    let mut rng = Rng::new(9);
    let batches: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..3 * 9 * 9 * 3).map(|_| rng.normal() as f32).collect())
        .collect();
    let mut ws = net.workspace(3, 9, 9);
    let alone: Vec<Vec<f32>> = batches
        .iter()
        .map(|x| {
            let mut w = w0.clone();
            net.recompute_bn_stats(&mut [&mut w], &mut ws, [&x[..]]);
            w.buffers
        })
        .collect();
    // Two weight sets through the same batches: each ends as if it had been alone.
    let (mut w, mut twin) = (w0.clone(), w0.clone());
    let batch_refs = batches.iter().map(|x| &x[..]);
    let used = net.recompute_bn_stats(&mut [&mut w, &mut twin], &mut ws, batch_refs);
    assert_eq!(used, 2);
    assert_eq!(w.buffers, twin.buffers);
    assert_eq!(w.params, w0.params);
    assert_ne!(alone[0], alone[1]);
    assert_ne!(w.buffers, w0.buffers);
    for ((got, a), b) in w.buffers.iter().zip(&alone[0]).zip(&alone[1]) {
        let want = 0.5 * (a + b);
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
}

/// With frozen weights, a fused-MBConv block's k×k convolution (by Winograd's transform, or
/// direct at stride 2) and its 1×1 projection run as one pass that never stores the k×k output;
/// the logits match the layer-by-layer pass on the live weights. EfficientNetV2-B0 at 48 px:
/// stages 2 and 3 have such blocks, with 32 and 48 input channels and stride 2 first.
#[test]
fn fused_mbconv_blocks_run_as_one_pass_with_the_same_logits() {
    if !effnet_engine::pointwise::available() {
        eprintln!("skipped: no AVX2+FMA on this CPU");
        return;
    }
    let mut config = effnet_model::arch("efficientnetv2_b0").expect("known");
    config.num_classes = 10;
    let net = Network::new(config);
    let mut w = Weights::init(&net, 3);
    // Running statistics away from 0 and 1, so that the folded batch norms matter.
    for (i, v) in w.buffers.iter_mut().enumerate() {
        *v = 0.5 + (i % 7) as f32 * 0.1;
    }
    let (n, size) = (2, 48);
    let x: Vec<f32> = (0..n * size * size * 3)
        .map(|i| ((i * 13 % 29) as f32 / 10.0) - 1.4)
        .collect();
    let mut plain_ws = net.inference_workspace(n, size, size);
    let mut ws = net.inference_workspace(n, size, size);
    net.freeze(&w, &mut ws);
    ws.profile = Some(Default::default());
    let want = net
        .forward(&mut w, &mut plain_ws, &x, Mode::Eval, &mut Rng::new(0))
        .to_vec();
    let got = net.forward(&mut w, &mut ws, &x, Mode::Eval, &mut Rng::new(0));
    assert!(close(got, &want), "{got:?} vs {want:?}");
    let ops = &ws.profile.as_ref().expect("set").entries;
    for fused in ["conv 3x3 winograd + 1x1", "conv kxk + 1x1"] {
        assert!(
            ops.iter().any(|e| e.0 == fused),
            "no {fused} pass ran: {ops:?}"
        );
    }
}
