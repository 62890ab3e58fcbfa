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
        .find(|t| t.name == "classifier.bias")
        .map(|t| t.shape.iter().product())
}

/// Fills a network's weights from a timm state dict. Every parameter and running statistic must
/// be present with timm's shape and finite values; `num_batches_tracked` may be absent (0);
/// tensors the network does not have are an error.
pub fn from_tensors(net: &Network, tensors: Vec<RawTensor>) -> Result<Weights, String> {
    let layout = &net.layout;
    let mut by_name: HashMap<String, RawTensor> = HashMap::with_capacity(tensors.len());
    for t in tensors {
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

/// Reads weights for `arch` (or, when `None`, for the architecture named in the file's metadata).
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
    if let Some(n) = classes_in(&tensors) {
        config.num_classes = n;
    }
    let net = Network::new(config);
    let weights = from_tensors(&net, tensors).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((net, weights))
}
