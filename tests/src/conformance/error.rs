//! Errors: why a scenario file could not be loaded, and where in it.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use super::scenario::{Endpoint, NamespacedName, ObjectKey, PortRef, Protocol};

/// Why scenarios could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading a file or the directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not YAML of the scenario layout (the message names the
    /// field, line and column).
    #[error("{}: {source}", path.display())]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_yaml_ng::Error,
    },
    /// The file parses but breaks the format's rules.
    #[error("{}: invalid scenario:\n{errors}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        errors: ScenarioErrors,
    },
    /// Two files define scenarios of the same name.
    #[error("{}: scenario name {name:?} is already used by {}", second.display(), first.display())]
    DuplicateName {
        /// The name.
        name: String,
        /// The file read first.
        first: PathBuf,
        /// The file read second.
        second: PathBuf,
    },
    /// A directory without any `*.yaml` or `*.yml` file.
    #[error("{}: no scenario files (*.yaml, *.yml)", dir.display())]
    NoScenarios {
        /// The directory.
        dir: PathBuf,
    },
    /// Several files failed (each error on its own line).
    #[error("{}", join(.0))]
    Files(Vec<LoadError>),
}

fn join(errors: &[LoadError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where in a scenario a problem is, as a YAML path (indices from 0, as in
/// the parser's messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// The scenario as a whole (`name`, `steps`).
    Scenario,
    /// `cluster.namespaces[i]`.
    Namespace(usize),
    /// `cluster.pods[i]`.
    Pod(usize),
    /// `cluster.externals[i]`.
    External(usize),
    /// `cluster.services[i]`.
    Service(usize),
    /// `steps[step]`.
    Step(usize),
    /// `steps[step].apply[index]`.
    Apply { step: usize, index: usize },
    /// `steps[step].delete[index]`.
    Delete { step: usize, index: usize },
    /// `steps[step].expect[index]`.
    Expect { step: usize, index: usize },
    /// Line `line` (from 1) of the matrix of `steps[step].expect[index]`.
    Matrix {
        step: usize,
        index: usize,
        line: usize,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Scenario => f.write_str("scenario"),
            Self::Namespace(i) => write!(f, "cluster.namespaces[{i}]"),
            Self::Pod(i) => write!(f, "cluster.pods[{i}]"),
            Self::External(i) => write!(f, "cluster.externals[{i}]"),
            Self::Service(i) => write!(f, "cluster.services[{i}]"),
            Self::Step(s) => write!(f, "steps[{s}]"),
            Self::Apply { step, index } => write!(f, "steps[{step}].apply[{index}]"),
            Self::Delete { step, index } => write!(f, "steps[{step}].delete[{index}]"),
            Self::Expect { step, index } => write!(f, "steps[{step}].expect[{index}]"),
            Self::Matrix { step, index, line } => {
                write!(f, "steps[{step}].expect[{index}].matrix line {line}")
            }
        }
    }
}

/// What is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A name that breaks its syntax rule.
    #[error("invalid {what} {name:?}: {rule}")]
    InvalidName {
        what: &'static str,
        name: String,
        rule: &'static str,
    },
    /// A label key or value that Kubernetes would reject.
    #[error("invalid label {key:?}={value:?}: {reason}")]
    InvalidLabel {
        key: String,
        value: String,
        reason: &'static str,
    },
    /// Two things of the same kind with the same name.
    #[error("duplicate {what} {name}")]
    Duplicate { what: &'static str, name: String },
    /// `kubernetes.io/metadata.name` set to something else than the name.
    #[error(
        "label kubernetes.io/metadata.name={value:?} contradicts the namespace name {namespace:?}"
    )]
    MetadataNameLabel { namespace: String, value: String },
    /// A namespace that does not exist (yet, or any more).
    #[error("namespace {0:?} does not exist at this point")]
    UnknownNamespace(String),
    /// An address used twice.
    #[error("IP {ip} of {second} is already used by {first}")]
    IpCollision {
        ip: IpAddr,
        first: String,
        second: String,
    },
    /// An address no pod, host or service can have.
    #[error("IP {ip} is not usable: {reason}")]
    UnusableIp { ip: IpAddr, reason: &'static str },
    /// An IP of the wrong family where the other one is required.
    #[error("{0} is not an {1} address")]
    WrongFamily(IpAddr, &'static str),
    /// Port 0.
    #[error("port 0 is not a valid port")]
    PortZero,
    /// Two servers on the same port and protocol.
    #[error("port {protocol} {port} is listed twice")]
    DuplicatePort { port: u16, protocol: Protocol },
    /// No steps at all.
    #[error("a scenario needs at least one step")]
    NoSteps,
    /// A step without expectations.
    #[error("a step needs at least one expect entry")]
    NoExpectations,
    /// An applied object that is not a Kubernetes object.
    #[error("not a Kubernetes object: {0}")]
    ObjectShape(String),
    /// A known kind with the wrong apiVersion.
    #[error("{kind} has apiVersion {found:?}, expected {expected:?}")]
    WrongApiVersion {
        kind: String,
        found: String,
        expected: &'static str,
    },
    /// A known kind that k8s-openapi cannot read.
    #[error("invalid {kind}: {error}")]
    BadObject { kind: String, error: String },
    /// A namespaced known kind without `metadata.namespace`.
    #[error("{0} needs metadata.namespace")]
    MissingNamespace(String),
    /// An apply of an existing pod that changes more than labels.
    #[error("pod {pod} already exists: {what} cannot change (only labels can)")]
    ImmutablePod {
        pod: NamespacedName,
        what: &'static str,
    },
    /// A new pod without containers.
    #[error("new pod {0} needs spec.containers")]
    NoContainers(NamespacedName),
    /// A container port Kubernetes would reject.
    #[error("pod {pod}: {reason}")]
    BadContainerPort { pod: NamespacedName, reason: String },
    /// A delete of something that does not exist.
    #[error("cannot delete {0}: it does not exist at this point")]
    NothingToDelete(ObjectKey),
    /// A delete entry that names a namespace for a cluster-scoped kind.
    #[error("{0} is cluster-scoped: remove `namespace`")]
    ClusterScoped(String),
    /// An expect entry that is neither a table nor a single probe.
    #[error("{0}")]
    ExpectShape(&'static str),
    /// A matrix without a header row, columns or rows.
    #[error("{0}")]
    MatrixShape(&'static str),
    /// A row or column that is not `ns/pod`, `ext:NAME`, `svc:ns/name` or `node`.
    #[error("{0:?} is not a cell name (expected ns/pod, ext:NAME, svc:ns/name or node)")]
    BadEndpoint(String),
    /// A service as a source.
    #[error("{0} cannot be a source: services are destinations only")]
    ServiceAsSource(Endpoint),
    /// The same row or column twice.
    #[error("{what} {name} appears twice")]
    DuplicateEndpoint { what: &'static str, name: Endpoint },
    /// A row whose cell count differs from the header's column count.
    #[error("row {row} has {found} cells, the header has {expected} columns")]
    WrongCellCount {
        row: String,
        expected: usize,
        found: usize,
    },
    /// A cell other than `.` and `X`.
    #[error("row {row}, column {column}: cell {cell:?} is neither `.` nor `X`")]
    BadCell {
        row: String,
        column: String,
        cell: String,
    },
    /// `X` on the diagonal.
    #[error("{0} to itself is never probed: write `.` on the diagonal")]
    SelfCell(Endpoint),
    /// A single probe from an endpoint to itself.
    #[error("a probe from {0} to itself is never run")]
    SelfProbe(Endpoint),
    /// An endpoint that does not exist at this step.
    #[error("{0} does not exist at this step")]
    NoSuchEndpoint(Endpoint),
    /// A destination without a server on the probed port.
    #[error("{endpoint} has no {protocol} server on port {port}")]
    NoServer {
        endpoint: Endpoint,
        protocol: Protocol,
        port: u16,
    },
    /// A destination without a port of that name and protocol.
    #[error("{endpoint} has no {protocol} port named {name:?}")]
    NoNamedPort {
        endpoint: Endpoint,
        protocol: Protocol,
        name: String,
    },
    /// A named port towards the node.
    #[error("the node has no named ports: use a port number")]
    NodeNamedPort,
    /// A service without a matching service port.
    #[error("{service} has no {protocol} service port {port}")]
    NoServicePort {
        service: Endpoint,
        protocol: Protocol,
        port: PortRef,
    },
    /// A service probed while it selects no (usable) pod.
    #[error("{0} has no backend pod at this step")]
    NoBackends(Endpoint),
    /// Source and destination share no address family.
    #[error("{from} and {to} have no address family in common")]
    NoCommonFamily { from: Endpoint, to: Endpoint },
    /// The same probe expected both ways.
    #[error("{probe} is expected both allowed and denied in this step")]
    ConflictingExpectations { probe: String },
    /// The pool has no address left.
    #[error("the IP pool {0} has no free address left")]
    PoolExhausted(String),
}

/// A problem and where it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {problem}")]
pub struct ScenarioError {
    /// Where.
    pub at: Location,
    /// What.
    pub problem: Problem,
}

impl ScenarioError {
    /// `problem` at `at`.
    pub fn new(at: Location, problem: Problem) -> Self {
        Self { at, problem }
    }
}

/// Every problem found in one scenario (one per line when displayed).
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct ScenarioErrors(pub Vec<ScenarioError>);

impl ScenarioErrors {
    /// Records `problem` at `at`.
    pub fn push(&mut self, at: Location, problem: Problem) {
        self.0.push(ScenarioError::new(at, problem));
    }

    /// `Ok(value)` when nothing was recorded.
    pub fn into_result<T>(self, value: T) -> Result<T, Self> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }

    /// The problems, without their locations (for tests and matching).
    pub fn problems(&self) -> Vec<&Problem> {
        self.0.iter().map(|e| &e.problem).collect()
    }
}

impl From<ScenarioError> for ScenarioErrors {
    fn from(error: ScenarioError) -> Self {
        Self(vec![error])
    }
}

impl fmt::Display for ScenarioErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  {error}")?;
        }
        Ok(())
    }
}
