//! Trainable parameter counts equal timm's `tf_*` models (1000 classes), which pins every
//! channel, SE width and depth rounding rule of the family tables.

use effnet_model::{arch, arch_names, Network};

fn count(name: &str) -> usize {
    Network::new(arch(name).unwrap()).layout.trainable_count()
}

#[test]
fn parameter_counts_equal_timm() {
    let expected = [
        ("efficientnetv2_s", 21_458_488),
        ("efficientnetv2_m", 54_139_356),
        ("efficientnetv2_l", 118_515_272),
        ("efficientnetv2_xl", 208_119_808),
        ("efficientnetv2_b0", 7_139_704),
        ("efficientnetv2_b3", 14_358_406),
        ("efficientnet_b0", 5_288_548),
        ("efficientnet_b7", 66_347_960),
        ("efficientnet_lite0", 4_652_008),
        ("efficientnet_lite4", 13_006_568),
        // The rest of the family, as timm 1.0.31 counts them.
        ("efficientnetv2_b1", 8_141_052),
        ("efficientnetv2_b2", 10_096_086),
        ("efficientnet_b1", 7_794_184),
        ("efficientnet_b2", 9_109_994),
        ("efficientnet_b3", 12_233_232),
        ("efficientnet_b4", 19_341_616),
        ("efficientnet_b5", 30_389_784),
        ("efficientnet_b6", 43_040_704),
        ("efficientnet_lite1", 5_416_680),
        ("efficientnet_lite2", 6_092_072),
        ("efficientnet_lite3", 8_197_096),
    ];
    for (name, n) in expected {
        assert_eq!(count(name), n, "{name}");
    }
}

#[test]
fn every_arch_builds_and_names_are_unique() {
    for name in arch_names() {
        let net = Network::new(arch(name).unwrap());
        let mut names: Vec<_> = net.layout.params.iter().map(|e| e.name.clone()).collect();
        names.extend(net.layout.buffers.iter().map(|e| e.name.clone()));
        let total = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), total, "{name} has duplicate tensor names");
    }
    assert!(
        arch("tf_efficientnetv2_s").is_ok(),
        "timm's tf_ prefix is accepted"
    );
    assert!(arch("resnet50").unwrap_err().contains("efficientnetv2_s"));
}

#[test]
fn v2_s_state_dict_names_match_timm() {
    // The reference list of timm's tf_efficientnetv2_s keys (without num_batches_tracked).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/timm_tf_efficientnetv2_s_keys.txt"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let expected: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.starts_with("res ") && !l.trim().is_empty())
        .map(|l| {
            let (name, shape) = l.split_once(' ').unwrap();
            (name.to_string(), shape.replace(' ', ""))
        })
        .collect();
    let net = Network::new(arch("efficientnetv2_s").unwrap());
    let ours: Vec<(String, String)> = net
        .layout
        .order
        .iter()
        .filter_map(|k| match *k {
            effnet_model::layout::StateKey::Param(i) => Some(&net.layout.params[i]),
            effnet_model::layout::StateKey::Buffer(i) => Some(&net.layout.buffers[i]),
            effnet_model::layout::StateKey::Tracked(_) => None,
        })
        .map(|e| {
            let dims: Vec<String> = e.shape.iter().map(|d| d.to_string()).collect();
            let shape = if dims.len() == 1 {
                format!("({},)", dims[0])
            } else {
                format!("({})", dims.join(","))
            };
            (e.name.clone(), shape)
        })
        .collect();
    assert_eq!(ours.len(), expected.len());
    for (a, b) in ours.iter().zip(&expected) {
        assert_eq!(a, b);
    }
}
