//! Namespaces and pods as the compiler sees them.

use std::fmt;
use std::net::IpAddr;

use super::policy::Protocol;
use super::selector::Labels;

/// The label Kubernetes puts on every namespace, holding its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespaced object's coordinates.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The namespace.
    pub namespace: String,
    /// The name within it.
    pub name: String,
}

impl ObjectRef {
    /// A reference to `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A namespace: its name and labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// The namespace's name.
    pub name: String,
    /// Its labels, always including [`NAMESPACE_NAME_LABEL`] = name when built
    /// by [`Namespace::new`] or the conversion from the API type.
    pub labels: Labels,
}

impl Namespace {
    /// A namespace with `labels` plus the [`NAMESPACE_NAME_LABEL`] label that
    /// the API server sets on every namespace (overriding any other value, as
    /// the API server does).
    pub fn new(name: impl Into<String>, mut labels: Labels) -> Self {
        let name = name.into();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.clone());
        Self { name, labels }
    }
}

/// A container port with a name, which NetworkPolicy rules can refer to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    /// The port's name (an IANA_SVC_NAME).
    pub name: String,
    /// The container port number.
    pub port: u16,
    /// The port's protocol (TCP when the container spec omits it).
    pub protocol: Protocol,
}

/// A pod: what policy selection and peer resolution need of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's labels.
    pub labels: Labels,
    /// The node it is scheduled on, once scheduled.
    pub node_name: Option<String>,
    /// Its addresses (IPv4-mapped IPv6 addresses are stored as IPv4). Empty
    /// until the pod has addresses, and for pods that have terminated.
    pub ips: Vec<IpAddr>,
    /// The named ports of all its containers (including init/sidecar containers).
    pub named_ports: Vec<NamedPort>,
    /// Whether it uses the node's network namespace. Such pods have the node's
    /// addresses and are seen by the datapath as the node, not as pods.
    pub host_network: bool,
}

impl Pod {
    /// This pod's coordinates.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// The numbers of its container ports named `name` with `protocol`.
    pub fn resolve_named_port<'a>(
        &'a self,
        name: &'a str,
        protocol: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.named_ports
            .iter()
            .filter(move |p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}
