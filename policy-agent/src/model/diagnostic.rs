//! Problems found while converting or compiling, reported instead of failing.
//!
//! Nothing the cluster sends is fatal: a bad object, rule or peer is left out
//! in the direction that allows less, and a [`Diagnostic`] says so. Another
//! part of the agent turns diagnostics into logs, Events and metrics.

use std::fmt;

use policy_common::Direction;

/// How bad a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Worth knowing; enforcement is exactly what the spec says.
    Info,
    /// Enforcement is exact but the object probably does not do what its
    /// author meant (e.g. a named port no pod has), or enforcement allows less
    /// than the spec for a reason outside the policy (conflicting pod data).
    Warning,
    /// The object (or part of it) is invalid or cannot be enforced exactly;
    /// the affected part allows nothing.
    Error,
}

impl Severity {
    /// Lower-case name for logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// The kind of object a diagnostic is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// A `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
    /// A Pod.
    Pod,
    /// A Namespace (its `namespace` field is empty, `name` is the namespace).
    Namespace,
}

impl ObjectKind {
    /// The Kubernetes kind name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::Pod => "Pod",
            ObjectKind::Namespace => "Namespace",
        }
    }
}

/// A stable, machine-readable name for what went wrong (metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiagnosticCode {
    /// The object lacks its name or namespace.
    MissingMetadata,
    /// A label selector is invalid (unknown operator, missing or extra values).
    InvalidSelector,
    /// `policyTypes` holds a value other than `Ingress` and `Egress`.
    UnknownPolicyType,
    /// Rules of a direction the policy does not declare in `policyTypes`.
    IgnoredRules,
    /// A peer sets none of its fields, or an ipBlock together with a selector.
    InvalidPeer,
    /// An ipBlock `cidr` or `except` is unparseable or not allowed.
    InvalidCidr,
    /// An ipBlock `except` is not strictly inside its `cidr`.
    ExceptNotInCidr,
    /// A CIDR with host bits set (they are ignored).
    CidrHostBits,
    /// A protocol other than TCP, UDP and SCTP.
    UnknownProtocol,
    /// A port number outside 1..=65535, or an invalid port name.
    InvalidPort,
    /// An `endPort` that is not allowed where it is.
    InvalidEndPort,
    /// A pod address that does not parse.
    InvalidPodIp,
    /// A pod's container port that cannot be used (bad number or protocol).
    InvalidContainerPort,
    /// A named port that none of the pods it could refer to has.
    NamedPortNotFound,
    /// A named port that resolves differently on pods sharing one identity:
    /// the compiler allows only what all of them agree on.
    NamedPortInexact,
    /// Two pods claim the same address.
    DuplicatePodIp,
    /// A local interface whose pod is unknown or on another node: isolated.
    EndpointWithoutPod,
    /// Two local endpoints claim the same interface index.
    DuplicateEndpoint,
    /// Port ranges of one key were merged across rules to fit one map value:
    /// enforcement is exact, but a flow may be attributed to a rule that
    /// allows a neighbouring range of the same peer instead of its own.
    PortRangesCoalesced,
    /// More port ranges than one map value holds: some allowed ports are denied.
    PortRangesOverflow,
    /// The identity space is exhausted.
    IdentityExhausted,
}

impl DiagnosticCode {
    /// snake_case name, stable for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DiagnosticCode::MissingMetadata => "missing_metadata",
            DiagnosticCode::InvalidSelector => "invalid_selector",
            DiagnosticCode::UnknownPolicyType => "unknown_policy_type",
            DiagnosticCode::IgnoredRules => "ignored_rules",
            DiagnosticCode::InvalidPeer => "invalid_peer",
            DiagnosticCode::InvalidCidr => "invalid_cidr",
            DiagnosticCode::ExceptNotInCidr => "except_not_in_cidr",
            DiagnosticCode::CidrHostBits => "cidr_host_bits",
            DiagnosticCode::UnknownProtocol => "unknown_protocol",
            DiagnosticCode::InvalidPort => "invalid_port",
            DiagnosticCode::InvalidEndPort => "invalid_end_port",
            DiagnosticCode::InvalidPodIp => "invalid_pod_ip",
            DiagnosticCode::InvalidContainerPort => "invalid_container_port",
            DiagnosticCode::NamedPortNotFound => "named_port_not_found",
            DiagnosticCode::NamedPortInexact => "named_port_inexact",
            DiagnosticCode::DuplicatePodIp => "duplicate_pod_ip",
            DiagnosticCode::EndpointWithoutPod => "endpoint_without_pod",
            DiagnosticCode::DuplicateEndpoint => "duplicate_endpoint",
            DiagnosticCode::PortRangesCoalesced => "port_ranges_coalesced",
            DiagnosticCode::PortRangesOverflow => "port_ranges_overflow",
            DiagnosticCode::IdentityExhausted => "identity_exhausted",
        }
    }
}

/// One problem, attributed to an object and, for policies, to a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    /// The kind of object concerned.
    pub object: ObjectKind,
    /// The object's namespace (empty for namespaces).
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// For policies: the direction and index (in the object's list) of the
    /// rule concerned, if it is about one rule.
    pub rule: Option<(Direction, usize)>,
    /// How bad it is.
    pub severity: Severity,
    /// What kind of problem it is.
    pub code: DiagnosticCode,
    /// A human-readable explanation, including what the agent did about it.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic about a NetworkPolicy.
    pub fn policy(
        namespace: impl Into<String>,
        name: impl Into<String>,
        rule: Option<(Direction, usize)>,
        severity: Severity,
        code: DiagnosticCode,
        message: impl Into<String>,
    ) -> Self {
        Self {
            object: ObjectKind::NetworkPolicy,
            namespace: namespace.into(),
            name: name.into(),
            rule,
            severity,
            code,
            message: message.into(),
        }
    }

    /// A diagnostic about a Pod.
    pub fn pod(
        namespace: impl Into<String>,
        name: impl Into<String>,
        severity: Severity,
        code: DiagnosticCode,
        message: impl Into<String>,
    ) -> Self {
        Self {
            object: ObjectKind::Pod,
            namespace: namespace.into(),
            name: name.into(),
            rule: None,
            severity,
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ", self.severity.as_str(), self.object.as_str())?;
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        write!(f, "{}", self.name)?;
        if let Some((direction, index)) = self.rule {
            write!(f, " {} rule {}", direction.as_str(), index)?;
        }
        write!(f, ": {} ({})", self.message, self.code.as_str())
    }
}
