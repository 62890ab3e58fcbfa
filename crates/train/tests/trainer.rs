//! The training step: learning happens, gradient accumulation averages micro-batches into one
//! step, a non-finite loss never touches the weights, and EMA follows the weights.

mod common;

use common::{batch, config, tiny};
use effnet_engine::rng::Rng;
use effnet_model::Weights;
use effnet_train::optim::Kind;
use effnet_train::trainer::{smoothed, Trainer};

#[test]
fn training_learns_a_simple_task() {
    let net = tiny(0.1);
    let w = Weights::init(&net, 3);
    let mut t = Trainer::new(net, w, config(1, 0.01));
    let mut rng = Rng::new(5);
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..60 {
        let (x, y) = batch(&mut rng, 16);
        let r = t.micro_step(&x, 16, 12, &smoothed(&y, 3, 0.1)).unwrap();
        assert!(r.stepped);
        if step < 5 {
            first += r.loss / 5.0;
        }
        if step >= 55 {
            last += r.loss / 5.0;
        }
    }
    assert!(last < 0.6 * first, "loss {first} → {last}");
    let (x, y) = batch(&mut rng, 32);
    for use_ema in [false, true] {
        let mut w = t.evaluation_weights(use_ema).unwrap();
        let logits = t
            .evaluator(&mut w)
            .and_then(|mut e| e.logits(&x, 32, 12))
            .expect("CPU passes");
        let correct = logits
            .chunks(3)
            .zip(&y)
            .filter(|(z, l)| effnet_train::trainer::argmax(z) == **l)
            .count();
        assert!(correct >= 28, "ema={use_ema}: {correct}/32 correct");
    }
}

#[test]
fn accumulation_averages_micro_batches_into_one_step() {
    // Two identical micro-batches accumulated = one step on that micro-batch (no dropout, the
    // same batch statistics): the averaged gradient is the same.
    let net = tiny(0.0);
    let w = Weights::init(&net, 7);
    let mut rng = Rng::new(9);
    let (x, y) = batch(&mut rng, 8);
    let targets = smoothed(&y, 3, 0.1);
    let mut one = Trainer::new(net.clone(), w.clone(), config(1, 0.01));
    let mut two = Trainer::new(net, w.clone(), config(2, 0.01));
    assert!(one.micro_step(&x, 8, 12, &targets).unwrap().stepped);
    let r = two.micro_step(&x, 8, 12, &targets).unwrap();
    assert!(!r.stepped, "no step after the first of two micro-batches");
    assert_eq!(
        two.weights.params, w.params,
        "weights untouched until the K-th micro-batch"
    );
    assert!(two.micro_step(&x, 8, 12, &targets).unwrap().stepped);
    assert_eq!((one.step(), two.step()), (1, 1));
    let diff = one
        .weights
        .params
        .iter()
        .zip(&two.weights.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-6, "max difference {diff}");
}

#[test]
fn a_non_finite_loss_skips_the_step_and_keeps_the_weights() {
    let net = tiny(0.0);
    let w = Weights::init(&net, 2);
    let mut t = Trainer::new(net, w.clone(), config(1, 0.01));
    let mut rng = Rng::new(1);
    let (mut x, y) = batch(&mut rng, 4);
    x[17] = f32::NAN;
    let r = t.micro_step(&x, 4, 12, &smoothed(&y, 3, 0.0)).unwrap();
    assert!(!r.loss.is_finite() && r.stepped && r.skipped, "{r:?}");
    assert_eq!(
        t.weights, w,
        "parameters, running statistics and counters unchanged"
    );
    assert_eq!(t.step(), 0);
    assert!(t.grads.iter().all(|&g| g == 0.0));
}

#[test]
fn a_non_finite_micro_batch_skips_its_whole_accumulated_step() {
    let net = tiny(0.0);
    let w = Weights::init(&net, 2);
    let mut t = Trainer::new(net, w.clone(), config(2, 0.01));
    let mut rng = Rng::new(1);
    let (mut bad, y) = batch(&mut rng, 4);
    let (good, y2) = batch(&mut rng, 4);
    bad[5] = f32::INFINITY;
    let first = t.micro_step(&bad, 4, 12, &smoothed(&y, 3, 0.0)).unwrap();
    assert!(!first.stepped && !first.skipped);
    let second = t.micro_step(&good, 4, 12, &smoothed(&y2, 3, 0.0)).unwrap();
    assert!(second.loss.is_finite() && second.stepped && second.skipped);
    assert_eq!(t.weights.params, w.params, "no step taken");
    assert_eq!(t.step(), 0);
    // The next full step is a normal one.
    t.micro_step(&good, 4, 12, &smoothed(&y2, 3, 0.0)).unwrap();
    let r = t.micro_step(&good, 4, 12, &smoothed(&y2, 3, 0.0)).unwrap();
    assert!(r.stepped && !r.skipped);
    assert_eq!(t.step(), 1);
    assert_ne!(t.weights.params, w.params);
}

#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    use effnet_train::checkpoint::{self, RunState};
    let net = tiny(0.2);
    let w = Weights::init(&net, 11);
    let batches: Vec<(Vec<f32>, Vec<usize>)> = {
        let mut rng = Rng::new(21);
        (0..6).map(|_| batch(&mut rng, 8)).collect()
    };
    let run = |t: &mut Trainer, range: std::ops::Range<usize>| {
        for (x, y) in &batches[range] {
            t.micro_step(x, 8, 12, &smoothed(y, 3, 0.1)).unwrap();
        }
    };
    let mut straight = Trainer::new(net.clone(), w.clone(), config(1, 0.01));
    run(&mut straight, 0..6);

    let dir = std::env::temp_dir().join(format!("effnet-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ckpt.safetensors");
    let mut first = Trainer::new(net.clone(), w.clone(), config(1, 0.01));
    run(&mut first, 0..3);
    checkpoint::save(
        &path,
        &mut first,
        RunState {
            epoch: 0,
            batch_in_epoch: 3,
        },
    )
    .unwrap();
    drop(first);
    let mut resumed = Trainer::new(net.clone(), Weights::init(&net, 99), config(1, 0.01));
    let state = checkpoint::load(&path, &mut resumed).unwrap();
    assert_eq!(
        state,
        RunState {
            epoch: 0,
            batch_in_epoch: 3
        }
    );
    assert_eq!(resumed.step(), 3);
    run(&mut resumed, 3..6);
    assert_eq!(resumed.weights, straight.weights, "bit-exact");
    assert_eq!(resumed.optimizer, straight.optimizer);
    assert_eq!(resumed.ema, straight.ema);

    // The checkpoint also reads as plain weights (predict, eval): the state tensors are skipped.
    let (tensors, _) = effnet_model::io::read_safetensors(&path).unwrap();
    let as_weights = effnet_model::weights::from_tensors(&net, tensors).unwrap();
    assert_eq!(as_weights.params.len(), w.params.len());

    // A damaged or mismatched checkpoint is refused and the trainer is unchanged.
    let before = resumed.weights.clone();
    let bytes = std::fs::read(&path).unwrap();
    let broken = dir.join("broken.safetensors");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    assert!(checkpoint::load(&broken, &mut resumed).is_err());
    let mut other_cfg = config(1, 0.01);
    other_cfg.optimizer = Kind::Sgd {
        momentum: 0.9,
        nesterov: false,
    };
    let mut other = Trainer::new(net.clone(), w.clone(), other_cfg);
    let e = checkpoint::load(&path, &mut other).unwrap_err();
    assert!(e.contains("optimizer"), "{e}");
    assert_eq!(resumed.weights, before);
    std::fs::remove_dir_all(dir).unwrap();
}
