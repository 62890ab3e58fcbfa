//! Images in: decoding JPEG and PNG (EXIF orientation honoured), resizing, cropping and
//! normalizing into the NHWC f32 tensors the engine takes; class names; `.npy` tensors; finding
//! image files.

pub mod decode;
pub mod files;
pub mod labels;
pub mod npy;
pub mod resize;
pub mod transform;

pub use decode::{load_rgb, RgbImage};
pub use resize::Interpolation;
pub use transform::{Crop, Normalize, Transform};
