//! What the executor is given: the [`Change`]s to carry out and the probes
//! of each step ([`StepPlan`]), for a [`RunConfig`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::ipam::IpPool;
use super::probes::{Check, Family, Probe};
use super::scenario::{
    External, Labels, NamespacedName, ObjectKey, Protocol, Server, SourceObject,
};

/// What the runner may choose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    /// Where pods without an IP get one.
    pub pool: IpPool,
    /// `spec.nodeName` of the Pod objects given to the source.
    pub node_name: String,
    /// Whether the node takes part in IPv6 probes (to and from dual-stack
    /// pods). When false, node probes are IPv4 only.
    pub node_ipv6: bool,
    /// The node's addresses on the pod network (the pods' gateway): never
    /// given to a pod; a scenario that gives one to a pod does not plan.
    pub node_ips: Vec<IpAddr>,
}

impl Default for RunConfig {
    /// The default pool; the node is its first address, 10.244.0.1, and
    /// fd00:10:244::1.
    fn default() -> Self {
        Self {
            pool: IpPool::default(),
            node_name: "conformance-node".into(),
            node_ipv6: true,
            node_ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1)),
            ],
        }
    }
}

/// A pod as the network sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace and name.
    pub name: NamespacedName,
    /// Current labels.
    pub labels: Labels,
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// IPv6 address of a dual-stack pod.
    pub ip6: Option<Ipv6Addr>,
    /// Servers to run in it.
    pub servers: Vec<Server>,
}

impl PodInfo {
    /// Its address of `family`, if it has one.
    pub fn ip_of(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => Some(IpAddr::V4(self.ip)),
            Family::V6 => self.ip6.map(IpAddr::V6),
        }
    }
}

/// One backend of a service port: DNAT `clusterIP:port` to `ip:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The pod.
    pub pod: NamespacedName,
    /// Its address in the cluster IP's family.
    pub ip: IpAddr,
    /// The resolved target port.
    pub port: u16,
}

/// The DNAT rules of one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRules {
    /// The service port.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// The backends, by pod name; none means nothing answers.
    pub backends: Vec<Backend>,
}

/// Everything kube-proxy would program for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRules {
    /// The service.
    pub service: NamespacedName,
    /// Its cluster IP.
    pub cluster_ip: IpAddr,
    /// One entry per service port.
    pub ports: Vec<ServicePortRules>,
}

/// One thing for the executor to do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Tell the source about a new namespace.
    AddNamespace {
        name: String,
        labels: Labels,
        object: SourceObject,
    },
    /// A namespace's labels changed: upsert `object` in the source.
    RelabelNamespace {
        name: String,
        labels: Labels,
        object: SourceObject,
    },
    /// A namespace is gone (its contents were removed by earlier changes):
    /// delete `key` from the source.
    RemoveNamespace { name: String, key: ObjectKey },
    /// Create the pod (network namespace, address, servers), then upsert
    /// `object` (with IPs and node name) in the source.
    AddPod { pod: PodInfo, object: SourceObject },
    /// A pod's labels changed (IP and servers stay): upsert `object`.
    RelabelPod {
        pod: NamespacedName,
        labels: Labels,
        object: SourceObject,
    },
    /// Delete `key` from the source, then remove the pod.
    RemovePod { pod: NamespacedName, key: ObjectKey },
    /// Create an external host with its servers.
    AddExternal(External),
    /// Start a server in the node's network namespace.
    AddNodeServer(Server),
    /// Create or replace a service's DNAT rules.
    SetService(ServiceRules),
    /// Remove a service's DNAT rules.
    RemoveService(NamespacedName),
    /// Create or replace an object (a NetworkPolicy, or any other kind) in
    /// the source.
    Apply(SourceObject),
    /// Delete an object (not a Namespace or Pod) from the source.
    Delete(ObjectKey),
}

/// What a [`Change`] asks of the policy source.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SourceEdit<'a> {
    /// Create or replace.
    Upsert(&'a SourceObject),
    /// Delete.
    Delete(&'a ObjectKey),
}

impl Change {
    /// The edit of the policy source this change implies, if any.
    pub fn source_edit(&self) -> Option<SourceEdit<'_>> {
        match self {
            Self::AddNamespace { object, .. }
            | Self::RelabelNamespace { object, .. }
            | Self::AddPod { object, .. }
            | Self::RelabelPod { object, .. }
            | Self::Apply(object) => Some(SourceEdit::Upsert(object)),
            Self::RemoveNamespace { key, .. } | Self::RemovePod { key, .. } | Self::Delete(key) => {
                Some(SourceEdit::Delete(key))
            }
            Self::AddExternal(_)
            | Self::AddNodeServer(_)
            | Self::SetService(_)
            | Self::RemoveService(_) => None,
        }
    }
}

/// One step, planned.
#[derive(Clone, Debug)]
pub struct StepPlan {
    /// Its number, from 1.
    pub number: usize,
    /// Its `about`.
    pub about: String,
    /// What to do before probing, in order.
    pub changes: Vec<Change>,
    /// What to probe once the agent reports the state enforced (each probe
    /// once: cells and single probes that mean the same probe share it).
    pub probes: Vec<Probe>,
    /// How the probes map back to the step's `expect` entries, in order.
    pub checks: Vec<Check>,
}

/// A whole scenario, planned.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Build the starting cluster.
    pub setup: Vec<Change>,
    /// The steps.
    pub steps: Vec<StepPlan>,
}
