//! VERSION: the versions the plugin speaks.

use crate::cni::config::{ConfigError, Request};
use crate::cni::error::PluginError;
use crate::cni::spec::{SUPPORTED_VERSIONS, Version, VersionResult};

/// The answer to VERSION for the request on stdin: its `cniVersion` echoed
/// (the newest when stdin is empty or has none). Only stdin that is not a
/// JSON object is an error.
pub fn version(request: Result<&Request, &ConfigError>) -> Result<VersionResult, PluginError> {
    let asked = match request {
        Ok(r) => r.conf.cni_version.clone().filter(|v| !v.is_empty()),
        Err(ConfigError::Empty) => None,
        Err(e) => {
            return Err(PluginError::new(
                crate::cni::error::ErrorCode::Decoding,
                e.to_string(),
            ));
        }
    };
    Ok(VersionResult {
        cni_version: asked.unwrap_or_else(|| Version::LATEST.to_string()),
        supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
    })
}
