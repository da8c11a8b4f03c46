//! The scenario file as written: plain serde types, unknown fields rejected
//! (a typo is an error, not a silently ignored key). [`super::validate`]
//! turns them into a [`super::Scenario`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use super::scenario::{Labels, PortRef, Protocol, Verdict};

/// A scenario file as written (before validation).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// `name`.
    pub name: String,
    /// `about`.
    pub about: String,
    /// `cluster`.
    pub cluster: ClusterSpec,
    /// `steps`.
    pub steps: Vec<StepSpec>,
}

/// `cluster:` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// `namespaces`.
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    /// `pods`.
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// `externals`.
    #[serde(default)]
    pub externals: Vec<ExternalSpec>,
    /// `services`.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

/// A namespace as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// `name`.
    pub name: String,
    /// `labels` (optional).
    #[serde(default)]
    pub labels: Labels,
}

/// A pod as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// `name`.
    pub name: String,
    /// `namespace`.
    pub namespace: String,
    /// `labels` (optional).
    #[serde(default)]
    pub labels: Labels,
    /// `ip` (optional).
    pub ip: Option<Ipv4Addr>,
    /// `ip6` (optional).
    pub ip6: Option<Ipv6Addr>,
    /// `ports` (optional).
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

/// A server port as written (`protocol` defaults to TCP, as in Kubernetes).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// `port`.
    pub port: u16,
    /// `protocol`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `name` (optional).
    pub name: Option<String>,
}

/// An external host as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalSpec {
    /// `name`.
    pub name: String,
    /// `ip`.
    pub ip: IpAddr,
    /// `ports`.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

/// A service as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// `name`.
    pub name: String,
    /// `namespace`.
    pub namespace: String,
    /// `clusterIP`.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: IpAddr,
    /// `selector`.
    #[serde(default)]
    pub selector: Labels,
    /// `ports`.
    pub ports: Vec<ServicePortSpec>,
}

/// A service port as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePortSpec {
    /// `port`.
    pub port: u16,
    /// `targetPort` (defaults to `port`).
    #[serde(rename = "targetPort")]
    pub target_port: Option<PortRef>,
    /// `protocol` (defaults to TCP).
    #[serde(default)]
    pub protocol: Protocol,
    /// `name` (optional).
    pub name: Option<String>,
}

/// A step as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// `about`.
    pub about: String,
    /// `apply` (optional): Kubernetes objects, verbatim.
    #[serde(default)]
    pub apply: Vec<serde_yaml_ng::Value>,
    /// `delete` (optional).
    #[serde(default)]
    pub delete: Vec<DeleteSpec>,
    /// `expect`.
    #[serde(default)]
    pub expect: Vec<ExpectSpec>,
}

/// A `delete` entry as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteSpec {
    /// `kind`.
    pub kind: String,
    /// `namespace` (absent for cluster-scoped kinds).
    pub namespace: Option<String>,
    /// `name`.
    pub name: String,
}

/// An `expect` entry as written: a table (`protocol`, `port`, `matrix`) or a
/// single probe (`from`, `to`, `protocol`, `port`, `verdict`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    /// `protocol`.
    pub protocol: Protocol,
    /// `port`.
    pub port: PortRef,
    /// `matrix` (tables).
    pub matrix: Option<String>,
    /// `from` (single probes).
    pub from: Option<String>,
    /// `to` (single probes).
    pub to: Option<String>,
    /// `verdict` (single probes).
    pub verdict: Option<Verdict>,
}
