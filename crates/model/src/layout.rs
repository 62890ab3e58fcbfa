//! Where every tensor lives: one flat buffer of trainable parameters (PyTorch's layouts, timm's
//! names), one of batch-norm running statistics, and the batch counters, in state-dict order.

use std::ops::Range;

/// What a tensor is, for initialization and for the optimizer's weight-decay rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A dense convolution kernel `[out, in, kh, kw]` (1×1 included, SE convolutions too).
    ConvWeight,
    /// A depthwise kernel `[c, 1, kh, kw]`.
    DepthwiseWeight,
    /// The bias of a squeeze-excitation convolution.
    ConvBias,
    BnWeight,
    BnBias,
    /// The classifier `[classes, features]`.
    DenseWeight,
    DenseBias,
    /// Batch-norm running statistics (buffers, not trained).
    RunningMean,
    RunningVar,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    pub kind: ParamKind,
}

/// An entry of the state dict, in timm's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKey {
    Param(usize),
    /// Running mean or variance: index into [`Layout::buffers`].
    Buffer(usize),
    /// `num_batches_tracked` of one batch norm: index into [`Layout::tracked`].
    Tracked(usize),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    pub params: Vec<TensorEntry>,
    pub buffers: Vec<TensorEntry>,
    /// Names of the `num_batches_tracked` counters, one per batch norm.
    pub tracked: Vec<String>,
    pub order: Vec<StateKey>,
    pub param_len: usize,
    pub buffer_len: usize,
}

/// The ranges of one batch norm's tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct BnRanges {
    pub gamma: Range<usize>,
    pub beta: Range<usize>,
    pub mean: Range<usize>,
    pub var: Range<usize>,
    pub tracked: usize,
}

impl Layout {
    pub fn param(&mut self, name: String, shape: &[usize], kind: ParamKind) -> Range<usize> {
        let len: usize = shape.iter().product();
        let range = self.param_len..self.param_len + len;
        self.param_len += len;
        self.order.push(StateKey::Param(self.params.len()));
        self.params.push(TensorEntry {
            name,
            shape: shape.to_vec(),
            range: range.clone(),
            kind,
        });
        range
    }

    fn buffer(&mut self, name: String, len: usize, kind: ParamKind) -> Range<usize> {
        let range = self.buffer_len..self.buffer_len + len;
        self.buffer_len += len;
        self.order.push(StateKey::Buffer(self.buffers.len()));
        self.buffers.push(TensorEntry {
            name,
            shape: vec![len],
            range: range.clone(),
            kind,
        });
        range
    }

    /// Registers a batch norm over `c` channels under `prefix` (e.g. `blocks.0.0.bn1`).
    pub fn batch_norm(&mut self, prefix: &str, c: usize) -> BnRanges {
        let gamma = self.param(format!("{prefix}.weight"), &[c], ParamKind::BnWeight);
        let beta = self.param(format!("{prefix}.bias"), &[c], ParamKind::BnBias);
        let mean = self.buffer(format!("{prefix}.running_mean"), c, ParamKind::RunningMean);
        let var = self.buffer(format!("{prefix}.running_var"), c, ParamKind::RunningVar);
        self.order.push(StateKey::Tracked(self.tracked.len()));
        self.tracked.push(format!("{prefix}.num_batches_tracked"));
        BnRanges {
            gamma,
            beta,
            mean,
            var,
            tracked: self.tracked.len() - 1,
        }
    }

    /// The number of trainable values (what timm counts as parameters).
    pub fn trainable_count(&self) -> usize {
        self.param_len
    }

    pub fn find_param(&self, name: &str) -> Option<&TensorEntry> {
        self.params.iter().find(|e| e.name == name)
    }
}
