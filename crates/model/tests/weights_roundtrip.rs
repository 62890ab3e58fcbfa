//! Weights in and out: timm's state dict → effnet → safetensors → effnet is bit-exact, and every
//! kind of mismatch is refused with the tensor named.

use effnet_model::io::{read_safetensors, write_safetensors, RawTensor, TensorData};
use effnet_model::{arch, weights, Network, Weights};

mod common;
use common::fixture;

fn small_net() -> Network {
    let mut config = arch("efficientnet_lite0").unwrap();
    config.num_classes = 7;
    Network::new(config)
}

#[test]
fn timm_state_dict_round_trip_is_bit_exact() {
    // The parity fixture is a real timm state dict (with num_batches_tracked) of a small network.
    let (tensors, _) = read_safetensors(&fixture("parity/weights.safetensors")).unwrap();
    let net = parity_net();
    let w = weights::from_tensors(&net, tensors.clone()).unwrap();
    let out = weights::to_tensors(&net, &w);
    let mut a = tensors;
    let mut b = out.clone();
    a.sort_by(|x, y| x.name.cmp(&y.name));
    b.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(a, b, "timm → effnet → timm changed a tensor");

    let dir = tempdir();
    let path = dir.join("w.safetensors");
    weights::save(&net, &w, &path).unwrap();
    let (back, meta) = read_safetensors(&path).unwrap();
    assert_eq!(back, out, "safetensors round trip, in timm's order");
    assert_eq!(meta["effnet.arch"], "parity");
    assert!(meta["effnet.preprocess"].contains("\"crop\":\"pct:0.875\""));
    assert_eq!(weights::from_tensors(&net, back).unwrap(), w);
}

fn parity_net() -> Network {
    Network::new(common::config_from(&fixture("parity")).0)
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "effnet-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn err(net: &Network, tensors: Vec<RawTensor>) -> String {
    weights::from_tensors(net, tensors).unwrap_err()
}

#[test]
fn mismatches_are_refused_with_the_tensor_named() {
    let net = small_net();
    let good = weights::to_tensors(&net, &Weights::init(&net, 3));

    let mut missing = good.clone();
    missing.retain(|t| t.name != "blocks.2.1.conv_dw.weight");
    let e = err(&net, missing);
    assert!(
        e.contains("missing") && e.contains("blocks.2.1.conv_dw.weight"),
        "{e}"
    );

    let mut extra = good.clone();
    extra.push(RawTensor {
        name: "head.fc.weight".into(),
        shape: vec![2],
        data: TensorData::F32(vec![0.0; 2]),
    });
    let e = err(&net, extra);
    assert!(
        e.contains("does not have") && e.contains("head.fc.weight"),
        "{e}"
    );

    let mut shaped = good.clone();
    let t = shaped
        .iter_mut()
        .find(|t| t.name == "classifier.weight")
        .unwrap();
    t.shape = vec![1280, 7];
    let e = err(&net, shaped);
    assert!(
        e.contains("classifier.weight") && e.contains("[1280, 7]") && e.contains("[7, 1280]"),
        "{e}"
    );

    let mut nan = good.clone();
    if let TensorData::F32(v) = &mut nan
        .iter_mut()
        .find(|t| t.name == "bn1.running_var")
        .unwrap()
        .data
    {
        v[3] = f32::NAN;
    }
    let e = err(&net, nan);
    assert!(
        e.contains("bn1.running_var") && e.contains("non-finite"),
        "{e}"
    );

    // The network's own weights load back unchanged, and a different architecture is refused.
    assert_eq!(
        weights::from_tensors(&net, good.clone()).unwrap(),
        Weights::init(&net, 3)
    );
    let mut other = arch("efficientnet_b0").unwrap();
    other.num_classes = 7;
    assert!(weights::from_tensors(&Network::new(other), good).is_err());
}

#[test]
fn load_reads_the_architecture_from_metadata() {
    let net = small_net();
    let w = Weights::init(&net, 9);
    let path = tempdir().join("lite.safetensors");
    weights::save(&net, &w, &path).unwrap();
    let (net2, w2) = weights::load(&path, None).unwrap();
    assert_eq!(net2.config.name, "efficientnet_lite0");
    assert_eq!(net2.classes, 7);
    assert_eq!(w2, w);
    // Without metadata, the architecture must be given.
    let plain = tempdir().join("plain.safetensors");
    write_safetensors(&plain, &weights::to_tensors(&net, &w), &Default::default()).unwrap();
    assert!(weights::load(&plain, None).unwrap_err().contains("--arch"));
    assert_eq!(
        weights::load(&plain, Some("efficientnet_lite0")).unwrap().1,
        w
    );
}

#[test]
fn init_is_seeded_and_follows_the_reference() {
    let net = Network::new(arch("efficientnetv2_s").unwrap());
    let a = Weights::init(&net, 1);
    assert_eq!(a, Weights::init(&net, 1));
    assert_ne!(a.params, Weights::init(&net, 2).params);
    let get = |name: &str| &a.params[net.layout.find_param(name).unwrap().range.clone()];
    // conv_pwl of stage 5: [256, 960, 1, 1], fan_out = 256 → std √(2/256) (before truncation).
    let w = get("blocks.5.0.conv_pwl.weight");
    let std = (w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    assert!(
        (std / (2.0f64 / 256.0).sqrt() - 1.0).abs() < 0.02,
        "std {std}"
    );
    let bound = 2.0 * (2.0f64 / 256.0).sqrt() / 0.87962566;
    assert!(
        w.iter().all(|v| (*v as f64).abs() <= bound + 1e-6),
        "truncated at 2σ"
    );
    // Depthwise 3×3: fan_out = 9.
    let dw = get("blocks.5.0.conv_dw.weight");
    let std = (dw.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dw.len() as f64).sqrt();
    assert!(
        (std / (2.0f64 / 9.0).sqrt() - 1.0).abs() < 0.05,
        "depthwise std {std}"
    );
    let fc = get("classifier.weight");
    assert!(fc.iter().all(|v| v.abs() <= 1.0 / 1000f32.sqrt()));
    assert!(
        get("bn1.weight").iter().all(|&v| v == 1.0) && get("bn1.bias").iter().all(|&v| v == 0.0)
    );
    assert!(get("blocks.3.0.se.conv_reduce.bias")
        .iter()
        .all(|&v| v == 0.0));
}
