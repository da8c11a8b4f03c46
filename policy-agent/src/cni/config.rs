//! Reading the request on stdin: the spec's fields (through
//! [`spec::NetConf`](super::spec::NetConf)) and Palisade's own settings.
//!
//! Palisade's fields in the plugin's entry of the conflist:
//!
//! | field | type | default | meaning |
//! |---|---|---|---|
//! | `socket` | string (absolute path) | `/run/palisade/agent.sock` | the node agent's API socket |
//! | `timeoutSeconds` | number, > 0, ≤ 600 | 10 | how long a command may take in all; ADD fails when the agent has not confirmed the pod's policy by then |

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{ErrorCode, PluginError};
use super::spec::{NetConf, PrevResult, SUPPORTED_VERSIONS, Version};
use crate::api::DEFAULT_SOCKET;

/// The plugin's executable name: `type` of its conflist entry.
pub const PLUGIN_TYPE: &str = "palisade-cni";
/// `timeoutSeconds` when the configuration does not set it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest `timeoutSeconds` (the agent waits no longer either).
pub const MAX_TIMEOUT: Duration = crate::api::server::MAX_WAIT;

/// Palisade's settings, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The agent's API socket.
    pub socket: PathBuf,
    /// The budget of one command.
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSettings {
    #[serde(default)]
    socket: Option<String>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
}

/// Why the request on stdin cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("stdin is empty: the runtime must write the network configuration to stdin")]
    Empty,
    #[error("the network configuration on stdin is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("the network configuration on stdin is not a JSON object")]
    NotObject,
    #[error("invalid network configuration: {0}")]
    Field(serde_json::Error),
    #[error("the network configuration has no cniVersion")]
    NoVersion,
    #[error(
        "cniVersion {0:?} is not supported: palisade-cni speaks {versions} (a chained plugin needs 0.3.0 or later)",
        versions = SUPPORTED_VERSIONS.join(", ")
    )]
    Unsupported(String),
    #[error("socket {0:?} is not an absolute path")]
    Socket(String),
    #[error("timeoutSeconds {0} is out of range: it must be more than 0 and at most {max}", max = MAX_TIMEOUT.as_secs())]
    Timeout(f64),
    #[error(
        "the network configuration has no prevResult: palisade-cni is a chained plugin and must \
         come after the plugin that creates the pod's interface (e.g. bridge or ptp) in a conflist"
    )]
    NoPrevResult,
    #[error("prevResult is not a valid CNI result: {0}")]
    PrevResult(serde_json::Error),
}

impl From<ConfigError> for PluginError {
    fn from(e: ConfigError) -> Self {
        let code = match &e {
            ConfigError::Empty | ConfigError::NotJson(_) | ConfigError::NotObject => {
                ErrorCode::Decoding
            }
            ConfigError::Unsupported(_) => ErrorCode::IncompatibleVersion,
            ConfigError::Field(_)
            | ConfigError::NoVersion
            | ConfigError::Socket(_)
            | ConfigError::Timeout(_)
            | ConfigError::NoPrevResult
            | ConfigError::PrevResult(_) => ErrorCode::InvalidConfig,
        };
        PluginError::new(code, e.to_string())
    }
}

/// The request on stdin, decoded but not yet checked.
#[derive(Clone, Debug)]
pub struct Request {
    /// The whole document.
    pub doc: Map<String, Value>,
    /// Its spec fields.
    pub conf: NetConf,
}

impl Request {
    /// Decodes stdin: a JSON object whose spec fields have their types.
    pub fn decode(stdin: &[u8]) -> Result<Self, ConfigError> {
        if stdin.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::Empty);
        }
        let value: Value = serde_json::from_slice(stdin).map_err(ConfigError::NotJson)?;
        let Value::Object(doc) = value else {
            return Err(ConfigError::NotObject);
        };
        let conf = NetConf::deserialize(&Value::Object(doc.clone())).map_err(ConfigError::Field)?;
        Ok(Self { doc, conf })
    }

    /// The `cniVersion`, if it is a well-formed version (supported or not).
    pub fn version_hint(&self) -> Option<Version> {
        self.conf.cni_version.as_deref().and_then(Version::parse)
    }

    /// The `cniVersion`, which must be one the plugin speaks.
    pub fn version(&self) -> Result<Version, ConfigError> {
        let text = self
            .conf
            .cni_version
            .as_deref()
            .filter(|v| !v.is_empty())
            .ok_or(ConfigError::NoVersion)?;
        Version::parse(text)
            .filter(|v| v.is_supported())
            .ok_or_else(|| ConfigError::Unsupported(text.to_owned()))
    }

    /// Palisade's settings, with their defaults.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let raw = RawSettings::deserialize(&Value::Object(self.doc.clone()))
            .map_err(ConfigError::Field)?;
        let mut settings = Settings::default();
        if let Some(socket) = raw.socket {
            if !socket.starts_with('/') {
                return Err(ConfigError::Socket(socket));
            }
            settings.socket = PathBuf::from(socket);
        }
        if let Some(secs) = raw.timeout_seconds {
            settings.timeout = Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero() && *d <= MAX_TIMEOUT)
                .ok_or(ConfigError::Timeout(secs))?;
        }
        Ok(settings)
    }

    /// The raw `prevResult` (required).
    pub fn prev_result_json(&self) -> Result<&Value, ConfigError> {
        self.conf
            .prev_result
            .as_ref()
            .ok_or(ConfigError::NoPrevResult)
    }

    /// `prevResult`, typed (required).
    pub fn prev_result(&self) -> Result<PrevResult, ConfigError> {
        PrevResult::deserialize(self.prev_result_json()?).map_err(ConfigError::PrevResult)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(e: ConfigError) -> u32 {
        PluginError::from(e).code.number()
    }

    #[test]
    fn defaults_and_settings() {
        let r =
            Request::decode(br#"{"cniVersion":"1.0.0","name":"n","type":"palisade-cni"}"#).unwrap();
        assert_eq!(r.version().unwrap(), Version::new(1, 0, 0));
        assert_eq!(r.settings().unwrap(), Settings::default());
        let r = Request::decode(
            br#"{"cniVersion":"0.4.0","socket":"/tmp/a.sock","timeoutSeconds":2.5}"#,
        )
        .unwrap();
        let s = r.settings().unwrap();
        assert_eq!(s.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(s.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn each_problem_has_its_code() {
        assert_eq!(code(Request::decode(b"").unwrap_err()), 6);
        assert_eq!(code(Request::decode(b"{\"cniVersion\":").unwrap_err()), 6);
        assert_eq!(code(Request::decode(b"[1,2]").unwrap_err()), 6);
        assert_eq!(
            code(Request::decode(br#"{"cniVersion":1}"#).unwrap_err()),
            7
        );
        assert_eq!(
            code(
                Request::decode(br#"{"prevResult":"x"}"#)
                    .map(|r| r.prev_result())
                    .unwrap()
                    .unwrap_err()
            ),
            7
        );
        let r = Request::decode(br#"{"name":"n"}"#).unwrap();
        assert_eq!(code(r.version().unwrap_err()), 7);
        assert_eq!(code(r.prev_result().unwrap_err()), 7);
        for v in ["0.2.0", "2.0.0", "latest"] {
            let r = Request::decode(format!(r#"{{"cniVersion":"{v}"}}"#).as_bytes()).unwrap();
            assert_eq!(code(r.version().unwrap_err()), 1, "{v}");
        }
        for bad in [
            r#"{"socket":"relative.sock"}"#,
            r#"{"socket":7}"#,
            r#"{"timeoutSeconds":0}"#,
            r#"{"timeoutSeconds":-1}"#,
            r#"{"timeoutSeconds":601}"#,
            r#"{"timeoutSeconds":"10"}"#,
        ] {
            let r = Request::decode(bad.as_bytes()).unwrap();
            assert_eq!(code(r.settings().unwrap_err()), 7, "{bad}");
        }
    }

    #[test]
    fn messages_say_what_to_do() {
        let r = Request::decode(br#"{"cniVersion":"1.0.0"}"#).unwrap();
        let msg = r.prev_result().unwrap_err().to_string();
        assert!(msg.contains("chained plugin"), "{msg}");
        let r = Request::decode(br#"{"cniVersion":"0.2.0"}"#).unwrap();
        let msg = r.version().unwrap_err().to_string();
        assert!(msg.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"), "{msg}");
    }
}
