//! Training: the reference's optimizers (Keras semantics) over the flat parameter buffer, its
//! learning-rate schedules, progressive stages and exponential moving average of the weights,
//! the training step with gradient accumulation, and checkpoints.

pub mod checkpoint;
pub mod ema;
pub mod optim;
pub mod schedule;
pub mod stages;
pub mod trainer;
