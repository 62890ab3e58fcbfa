//! The EfficientNet family: configurations as data, the network built from them, its parameters
//! in one flat buffer (timm's names and layouts), initialization, forward and backward passes,
//! and weight files in and out.

pub mod family;
pub mod init;
pub mod io;
pub mod layout;
pub mod network;
pub mod weights;

pub use effnet_engine::Act;
pub use family::{arch, arch_names, ArchConfig};
pub use layout::{Layout, ParamKind};
pub use network::{Mode, Network, Weights, Workspace};
