//! Why part of an API object could not be converted.

use super::diagnostic::DiagnosticCode;
use super::selector::SelectorError;

/// A conversion error: the part of the object it concerns is left out (or, for
/// policy-wide problems, the policy allows nothing).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// `metadata.name` is absent or empty.
    #[error("object has no metadata.name")]
    MissingName,
    /// `metadata.namespace` is absent or empty on a namespaced object.
    #[error("object has no metadata.namespace")]
    MissingNamespace,
    /// A label selector is invalid.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// `policyTypes` holds something else than `Ingress` or `Egress`.
    #[error("unknown policyType {0:?} (expected \"Ingress\" or \"Egress\")")]
    UnknownPolicyType(String),
    /// A peer with none of `podSelector`, `namespaceSelector` and `ipBlock`.
    #[error("peer sets none of podSelector, namespaceSelector and ipBlock")]
    EmptyPeer,
    /// A peer with an `ipBlock` and a selector.
    #[error("peer sets ipBlock together with podSelector or namespaceSelector")]
    IpBlockWithSelector,
    /// A CIDR that does not parse.
    #[error("invalid CIDR {value:?}: {reason}")]
    InvalidCidr {
        /// The text as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An IPv6 CIDR inside `::ffff:0:0/96`: write IPv4-mapped blocks as IPv4.
    #[error("IPv4-mapped IPv6 CIDR {0:?} is not supported; write it as an IPv4 CIDR")]
    Ipv4MappedCidr(String),
    /// An `except` entry that is not a strict subset of the block's `cidr`
    /// (outside it, equal to it, or of the other address family).
    #[error("except {except:?} is not a strict subset of cidr {cidr:?}")]
    ExceptNotInCidr {
        /// The except entry.
        except: String,
        /// The block's cidr.
        cidr: String,
    },
    /// A protocol other than TCP, UDP and SCTP.
    #[error("unknown protocol {0:?} (expected TCP, UDP or SCTP)")]
    UnknownProtocol(String),
    /// A numeric port outside 1..=65535.
    #[error("port {0} is outside 1-65535")]
    InvalidPortNumber(i64),
    /// A port name that is not a valid IANA_SVC_NAME.
    #[error("invalid port name {0:?} (1-15 lower-case letters, digits and '-', with a letter)")]
    InvalidPortName(String),
    /// `endPort` without `port`.
    #[error("endPort {0} requires a numeric port")]
    EndPortWithoutPort(i64),
    /// `endPort` with a named port.
    #[error("endPort {end_port} cannot be used with named port {name:?}")]
    EndPortWithNamedPort {
        /// The named port.
        name: String,
        /// The end port.
        end_port: i64,
    },
    /// `endPort` smaller than `port`.
    #[error("endPort {end_port} is smaller than port {port}")]
    EndPortBeforePort {
        /// The start of the range.
        port: u16,
        /// The end of the range.
        end_port: i64,
    },
    /// A pod address that does not parse.
    #[error("invalid pod IP {0:?}")]
    InvalidPodIp(String),
    /// A container port that cannot be used.
    #[error("container port {name:?}: {reason}")]
    InvalidContainerPort {
        /// The port's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConvertError {
    /// The diagnostic code this error is reported under.
    pub const fn code(&self) -> DiagnosticCode {
        match self {
            ConvertError::MissingName | ConvertError::MissingNamespace => {
                DiagnosticCode::MissingMetadata
            }
            ConvertError::Selector(_) => DiagnosticCode::InvalidSelector,
            ConvertError::UnknownPolicyType(_) => DiagnosticCode::UnknownPolicyType,
            ConvertError::EmptyPeer | ConvertError::IpBlockWithSelector => {
                DiagnosticCode::InvalidPeer
            }
            ConvertError::InvalidCidr { .. } | ConvertError::Ipv4MappedCidr(_) => {
                DiagnosticCode::InvalidCidr
            }
            ConvertError::ExceptNotInCidr { .. } => DiagnosticCode::ExceptNotInCidr,
            ConvertError::UnknownProtocol(_) => DiagnosticCode::UnknownProtocol,
            ConvertError::InvalidPortNumber(_) | ConvertError::InvalidPortName(_) => {
                DiagnosticCode::InvalidPort
            }
            ConvertError::EndPortWithoutPort(_)
            | ConvertError::EndPortWithNamedPort { .. }
            | ConvertError::EndPortBeforePort { .. } => DiagnosticCode::InvalidEndPort,
            ConvertError::InvalidPodIp(_) => DiagnosticCode::InvalidPodIp,
            ConvertError::InvalidContainerPort { .. } => DiagnosticCode::InvalidContainerPort,
        }
    }
}
