//! Data in: decoding JPEG and PNG (EXIF orientation honoured), resizing, cropping and
//! normalizing into the NHWC f32 tensors the engine takes; class names; `.npy` tensors; finding
//! image files; TFRecord and IDX readers; the train transform, RandAugment/AutoAugment and
//! Mixup/CutMix; the multi-worker loader.

pub mod augment;
pub mod dataset;
pub mod decode;
pub mod files;
pub mod idx;
pub mod jpeg;
pub mod labels;
pub mod loader;
pub mod mix;
pub mod npy;
pub mod resize;
pub mod sampler;
pub mod tfrecord;
pub mod transform;

pub use decode::{decode_rgb, decode_rgb_window, load_rgb, RgbImage, Window};
pub use resize::Interpolation;
pub use transform::{Crop, Image, Normalize, Transform};
