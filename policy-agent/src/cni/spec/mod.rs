//! The CNI protocol's data types (spec 1.1, with what chained plugins need
//! of 0.3.0–1.0.0): what arrives on stdin and what goes to stdout. Plain
//! serde types, no behaviour; the plugin's logic lives beside this module.
//!
//! Reference: <https://github.com/containernetworking/cni/blob/main/SPEC.md>.

mod config;
mod error;
mod result;
mod version;

pub use config::{NetConf, ValidAttachment};
pub use error::{ErrorResult, VersionResult};
pub use result::{Interface, IpConfig, PrevResult};
pub use version::{SUPPORTED_VERSIONS, Version};
