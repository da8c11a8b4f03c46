//! The two small result objects: the error (spec section 5, "Error") and
//! the VERSION answer.

use serde::{Deserialize, Serialize};

/// The error object a plugin prints on stdout when it fails.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ErrorResult {
    /// The protocol version in use.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// 1–99 well-known (see [`crate::cni::error::ErrorCode`]), 100+ the
    /// plugin's own.
    pub code: u32,
    /// A short message characterising the error.
    pub msg: String,
    /// A longer description.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// The answer to VERSION.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct VersionResult {
    /// The `cniVersion` of the request.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Every version the plugin speaks.
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_wire_format() {
        let e = ErrorResult {
            cni_version: "1.1.0".into(),
            code: 7,
            msg: "Invalid Configuration".into(),
            details: String::new(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"cniVersion":"1.1.0","code":7,"msg":"Invalid Configuration"}"#
        );
    }
}
