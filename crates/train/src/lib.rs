//! Training: the reference's optimizers (Keras semantics) over the flat parameter buffer, its
//! learning-rate schedules and its exponential moving average of the weights.

pub mod checkpoint;
pub mod ema;
pub mod optim;
pub mod schedule;
pub mod stages;
pub mod trainer;
