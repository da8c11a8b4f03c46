//! The plugin's errors: a CNI error code, a message a person can act on,
//! and details. Every failure of every command ends as one
//! [`PluginError`], printed as the spec's error object.

use std::fmt;

use super::spec::{ErrorResult, Version};

/// The error codes the plugin returns: the spec's well-known ones (below
/// 100) and its own (100 and up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1: the configuration's `cniVersion` is not one the plugin speaks,
    /// or the command does not exist in it (CHECK before 0.4.0, STATUS and
    /// GC before 1.1.0).
    IncompatibleVersion,
    /// 4: a required environment variable (CNI_COMMAND, CNI_CONTAINERID,
    /// CNI_NETNS, CNI_IFNAME, CNI_ARGS' K8S_POD_NAMESPACE/K8S_POD_NAME) is
    /// missing or invalid.
    InvalidEnvironment,
    /// 5: stdin could not be read.
    Io,
    /// 6: stdin is not a JSON object.
    Decoding,
    /// 7: the configuration is invalid: a field of the wrong type or out
    /// of range, `cniVersion` missing, `prevResult` missing or malformed.
    InvalidConfig,
    /// 11: the agent is unreachable, unavailable or did not confirm in
    /// time; retrying later may succeed.
    TryAgainLater,
    /// 50 (STATUS): the agent is unreachable or not ready: ADD would fail.
    NotAvailable,
    /// 51 (STATUS): the agent failed to program its last change: existing
    /// pods may miss rules that allow traffic.
    LimitedConnectivity,
    /// 100: CNI_NETNS does not exist or is not a network namespace.
    NetnsNotFound,
    /// 101: the pod's interface (CNI_IFNAME) is not in `prevResult` or in
    /// the netns, or is not a veth.
    PodInterface,
    /// 102: none of `prevResult`'s host interfaces is the peer of the
    /// pod's veth.
    HostInterface,
    /// 103: the agent refused the endpoint (bad request, no such interface
    /// in its namespace, no endpoint id left, attaching failed).
    AgentRefused,
    /// 104: the agent could not program the endpoint's policy (e.g. a map
    /// is full), or the endpoint was removed while ADD waited.
    NotEnforced,
    /// 105 (CHECK): the endpoint is not registered with the agent.
    NotRegistered,
    /// 106 (CHECK): the registered endpoint does not match `prevResult` or
    /// is not enforced.
    EndpointMismatch,
    /// 107 (DEL, GC): the agent failed to remove an endpoint.
    CleanupFailed,
}

impl ErrorCode {
    /// The number on the wire.
    pub fn number(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decoding => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::NotAvailable => 50,
            ErrorCode::LimitedConnectivity => 51,
            ErrorCode::NetnsNotFound => 100,
            ErrorCode::PodInterface => 101,
            ErrorCode::HostInterface => 102,
            ErrorCode::AgentRefused => 103,
            ErrorCode::NotEnforced => 104,
            ErrorCode::NotRegistered => 105,
            ErrorCode::EndpointMismatch => 106,
            ErrorCode::CleanupFailed => 107,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// A failed command: what the runtime receives.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct PluginError {
    pub code: ErrorCode,
    /// One sentence: what went wrong.
    pub msg: String,
    /// The cause and what to do about it.
    pub details: String,
}

impl PluginError {
    /// An error without details.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's error object, for protocol version `version` (the
    /// request's when it is known and supported, else the newest).
    pub fn to_result(&self, version: Option<Version>) -> ErrorResult {
        ErrorResult {
            cni_version: version
                .filter(|v| v.is_supported())
                .unwrap_or(Version::LATEST)
                .to_string(),
            code: self.code.number(),
            msg: self.msg.clone(),
            details: self.details.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_the_specs() {
        assert_eq!(ErrorCode::IncompatibleVersion.number(), 1);
        assert_eq!(ErrorCode::InvalidEnvironment.number(), 4);
        assert_eq!(ErrorCode::Decoding.number(), 6);
        assert_eq!(ErrorCode::InvalidConfig.number(), 7);
        assert_eq!(ErrorCode::TryAgainLater.number(), 11);
        assert_eq!(ErrorCode::NotAvailable.number(), 50);
        assert_eq!(ErrorCode::LimitedConnectivity.number(), 51);
        assert!(ErrorCode::NetnsNotFound.number() >= 100);
    }

    #[test]
    fn error_object_version() {
        let e = PluginError::new(ErrorCode::Decoding, "bad").details("why");
        assert_eq!(e.to_result(Version::parse("0.4.0")).cni_version, "0.4.0");
        // An unsupported request version is not echoed.
        assert_eq!(e.to_result(Version::parse("9.0.0")).cni_version, "1.1.0");
        assert_eq!(e.to_result(None).code, 6);
        assert_eq!(e.to_result(None).details, "why");
    }
}
