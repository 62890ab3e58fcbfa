//! CPU kernels for EfficientNet, forward and backward, over NHWC `f32` activations.
//!
//! Every kernel works on plain slices: the caller (the model crate) owns the memory, plans it
//! once per (batch, resolution) and reuses it, so a training step allocates nothing here.
//! Weights arrive in PyTorch's layout (the flat parameter buffer mirrors timm's state dict);
//! kernels that want another layout take a packed copy made by the caller.

pub mod act;
pub mod ceiling;
pub mod conv;
pub mod depthwise;
pub mod linear;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod pointwise;
pub mod pool;
pub mod regularize;
pub mod rng;
pub mod se;
pub mod shape;
pub mod simd;
pub mod winograd;

pub use act::Act;

/// Runs `f` on a worker of the thread pool (in place when already on one). A parallel loop
/// started from a thread outside the pool wakes a worker and puts the caller to sleep, about as
/// long as a small layer's work; started on a worker it splits onto the others directly. Wrap
/// whole passes, and never code that waits on another thread which may need the pool (the data
/// loader's threads use it): with every worker waiting, nothing would run.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
pub use shape::{same_padding, Nhwc};
