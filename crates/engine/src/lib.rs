//! CPU kernels for EfficientNet, forward and backward, over NHWC `f32` activations.
//!
//! Every kernel works on plain slices: the caller (the model crate) owns the memory, plans it
//! once per (batch, resolution) and reuses it, so a training step allocates nothing here.
//! Weights arrive in PyTorch's layout (the flat parameter buffer mirrors timm's state dict);
//! kernels that want another layout take a packed copy made by the caller.

pub mod act;
pub mod conv;
pub mod depthwise;
pub mod linear;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod regularize;
pub mod rng;
pub mod se;
pub mod shape;
pub mod simd;

pub use act::Act;
pub use shape::{same_padding, Nhwc};
