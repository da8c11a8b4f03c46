//! The scenario model: the file as written ([`ScenarioFile`], plain serde) and
//! the validated [`Scenario`] the rest of the runner works on, plus the
//! loaders for one file and for a directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::{Deserialize, Deserializer};

use super::error::{LoadError, ScenarioErrors};
use super::spec::ScenarioFile;
use super::validate;

/// Kubernetes labels (and label selectors written as `matchLabels` maps).
pub type Labels = BTreeMap<String, String>;

/// A transport protocol, written `TCP`, `UDP` or `SCTP`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP: a probe connects and reads the server's reply.
    #[default]
    Tcp,
    /// UDP: a probe sends a datagram that must be echoed.
    Udp,
    /// SCTP: like TCP; reported as skipped where the kernel has no SCTP sockets.
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn from_k8s(text: &str) -> Option<Self> {
        match text {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a probe must observe: `.`/`allow` (answered) or `X`/`deny` (no answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The connection must succeed.
    Allow,
    /// The connection must be blocked.
    Deny,
}

impl Verdict {
    /// The matrix symbol: `.` or `X`.
    pub fn symbol(self) -> char {
        match self {
            Self::Allow => '.',
            Self::Deny => 'X',
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// A port as written: a number, or a (container, service or external) port name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortRef {
    /// A port number.
    Number(u16),
    /// A port name, resolved against the destination.
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for PortRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535) or a port name")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRef, E> {
                u16::try_from(v)
                    .map(PortRef::Number)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortRef, E> {
                u16::try_from(v)
                    .map(PortRef::Number)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortRef, E> {
                Ok(PortRef::Name(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A namespaced object's name, written `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    /// The namespace.
    pub namespace: String,
    /// The name within it.
    pub name: String,
}

impl NamespacedName {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One end of a probe, as named in matrices and single probes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// `ns/pod`: a pod.
    Pod(NamespacedName),
    /// `ext:NAME`: a host outside the cluster.
    External(String),
    /// `svc:ns/name`: a ClusterIP service (destination only), probed on a
    /// service port.
    Service(NamespacedName),
    /// `node`: the node itself.
    Node,
}

impl Endpoint {
    /// Parses a cell name; `None` when it has none of the four forms.
    pub fn parse(text: &str) -> Option<Self> {
        fn namespaced(text: &str) -> Option<NamespacedName> {
            let (namespace, name) = text.split_once('/')?;
            let ok = |s: &str| !s.is_empty() && !s.contains(['/', ':']);
            (ok(namespace) && ok(name)).then(|| NamespacedName::new(namespace, name))
        }
        if text == "node" {
            Some(Self::Node)
        } else if let Some(rest) = text.strip_prefix("ext:") {
            (!rest.is_empty() && !rest.contains(['/', ':'])).then(|| Self::External(rest.into()))
        } else if let Some(rest) = text.strip_prefix("svc:") {
            namespaced(rest).map(Self::Service)
        } else {
            namespaced(text).map(Self::Pod)
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod(pod) => write!(f, "{pod}"),
            Self::External(name) => write!(f, "ext:{name}"),
            Self::Service(svc) => write!(f, "svc:{svc}"),
            Self::Node => f.write_str("node"),
        }
    }
}

/// A server the runner starts (in a pod, an external host or the node).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Server {
    /// The port it listens on.
    pub port: u16,
    /// TCP (replies), UDP (echoes) or SCTP.
    pub protocol: Protocol,
    /// Its port name, if any (`spec.containers[].ports[].name`).
    pub name: Option<String>,
}

/// The identity of an object of the policy source: kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// `kind`, e.g. `NetworkPolicy`.
    pub kind: String,
    /// `metadata.namespace`; `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// The key of the Namespace `name`.
    pub fn namespace(name: &str) -> Self {
        Self {
            kind: "Namespace".into(),
            namespace: None,
            name: name.into(),
        }
    }

    /// The key of the Pod `pod`.
    pub fn pod(pod: &NamespacedName) -> Self {
        Self {
            kind: "Pod".into(),
            namespace: Some(pod.namespace.clone()),
            name: pod.name.clone(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// An object the runner knows the meaning of, typed with k8s-openapi.
#[derive(Clone, Debug, PartialEq)]
pub enum KnownObject {
    /// `v1` Namespace.
    Namespace(core::Namespace),
    /// `v1` Pod (boxed: it is much larger than the others).
    Pod(Box<core::Pod>),
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy(net::NetworkPolicy),
}

/// A Kubernetes object for the policy source: verbatim, and typed when its
/// kind is known.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceObject {
    /// Kind, namespace and name.
    pub key: ObjectKey,
    /// The object as YAML (for Namespaces and Pods the runner writes, the
    /// complete object: labels, IPs, node name).
    pub value: serde_yaml_ng::Value,
    /// The typed object for `Namespace`, `Pod` and `NetworkPolicy`.
    pub typed: Option<KnownObject>,
}

/// A validated scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Unique, kebab-case.
    pub name: String,
    /// What it checks.
    pub about: String,
    /// The file it was read from (empty for [`parse_str`]).
    pub path: PathBuf,
    /// The starting cluster.
    pub cluster: Cluster,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// The cluster of a scenario before its first step.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Namespaces, labels including `kubernetes.io/metadata.name`.
    pub namespaces: Vec<NamespaceDef>,
    /// Pods, in file order.
    pub pods: Vec<PodDef>,
    /// Hosts outside the cluster.
    pub externals: Vec<External>,
    /// ClusterIP services.
    pub services: Vec<Service>,
}

/// A namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceDef {
    /// Its name.
    pub name: String,
    /// Its labels, `kubernetes.io/metadata.name` included.
    pub labels: Labels,
}

/// A pod of the `cluster` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDef {
    /// Namespace and name.
    pub name: NamespacedName,
    /// Labels.
    pub labels: Labels,
    /// Its IPv4 address; allocated by the runner when absent.
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 address: the pod is dual-stack when present.
    pub ip6: Option<Ipv6Addr>,
    /// The servers the runner starts in it.
    pub servers: Vec<Server>,
}

/// A host outside the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    /// `NAME` of `ext:NAME`.
    pub name: String,
    /// Its address (IPv4 or IPv6).
    pub ip: IpAddr,
    /// The servers the runner starts on it.
    pub servers: Vec<Server>,
}

/// A ClusterIP service, DNAT'ed as kube-proxy would.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Namespace and name.
    pub name: NamespacedName,
    /// `clusterIP`.
    pub cluster_ip: IpAddr,
    /// Pods of the service's namespace with all these labels are its
    /// backends (an empty selector selects nothing, as in Kubernetes).
    pub selector: Labels,
    /// Its ports.
    pub ports: Vec<ServicePort>,
}

/// A port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The service port (what probes connect to).
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// The backend port: a number, or a container port name resolved per pod
    /// (defaults to `port`).
    pub target_port: PortRef,
    /// The service port's name, if any (a matrix may name it).
    pub name: Option<String>,
}

/// One step: changes, then expectations.
#[derive(Clone, Debug)]
pub struct Step {
    /// What it changes.
    pub about: String,
    /// Objects created or replaced, in order.
    pub apply: Vec<SourceObject>,
    /// Objects removed (before the applies).
    pub delete: Vec<ObjectKey>,
    /// Tables and single probes.
    pub expect: Vec<Expectation>,
}

/// An `expect` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expectation {
    /// A matrix.
    Table(Table),
    /// `{from, to, protocol, port, verdict}`.
    Single(SingleProbe),
}

/// A parsed `matrix`: rows are sources, columns destinations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// The protocol of every cell.
    pub protocol: Protocol,
    /// The port of every cell (a name resolves per destination).
    pub port: PortRef,
    /// Destinations.
    pub columns: Vec<Endpoint>,
    /// Sources and their cells (one per column).
    pub rows: Vec<(Endpoint, Vec<Verdict>)>,
}

/// A single expected probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SingleProbe {
    /// Source.
    pub from: Endpoint,
    /// Destination.
    pub to: Endpoint,
    /// Protocol.
    pub protocol: Protocol,
    /// Port (a name resolves against the destination).
    pub port: PortRef,
    /// What must happen.
    pub verdict: Verdict,
}

// ---------------------------------------------------------------------------
// Loading.

/// Parses and validates one scenario from text; `path` only names it.
pub fn parse_str(text: &str, path: &Path) -> Result<Scenario, LoadError> {
    let file: ScenarioFile = serde_yaml_ng::from_str(text).map_err(|source| LoadError::Yaml {
        path: path.to_owned(),
        source,
    })?;
    validate::validate(file, path).map_err(|errors: ScenarioErrors| LoadError::Invalid {
        path: path.to_owned(),
        errors,
    })
}

/// Reads, parses and validates one scenario file.
pub fn load_file(path: &Path) -> Result<Scenario, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_str(&text, path)
}

/// The scenario files of `dir`: every `*.yaml` and `*.yml` file (not
/// subdirectories, not dotfiles), sorted by file name. An executor that
/// wants to run the good files of a directory with bad ones among them
/// loads these one by one with [`load_file`].
pub fn scenario_paths(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        let is_file = entry.file_type().map_err(io)?.is_file()
            || entry.path().metadata().is_ok_and(|m| m.is_file());
        if is_yaml && is_file && !name.starts_with('.') {
            paths.push(entry.path());
        }
    }
    paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(paths)
}

/// Loads every scenario of `dir` ([`scenario_paths`]) and validates each.
/// Every bad file is reported ([`LoadError::Files`] when more than one), as
/// are two files with the same scenario name and a directory without
/// scenario files.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>, LoadError> {
    let paths = scenario_paths(dir)?;
    if paths.is_empty() {
        return Err(LoadError::NoScenarios {
            dir: dir.to_owned(),
        });
    }

    let mut scenarios: Vec<Scenario> = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match load_file(&path) {
            Ok(scenario) => {
                if let Some(first) = scenarios.iter().find(|s| s.name == scenario.name) {
                    errors.push(LoadError::DuplicateName {
                        name: scenario.name.clone(),
                        first: first.path.clone(),
                        second: path,
                    });
                } else {
                    scenarios.push(scenario);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(scenarios),
        1 => Err(errors.remove(0)),
        _ => Err(LoadError::Files(errors)),
    }
}
