//! Test fixtures: a small cluster, compiled, and read back the way the
//! classifier reads its maps.

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_common::verdict::allowing_rule;
use policy_common::{Direction, EndpointInfo, PeerInfo};

pub use crate::compile::lookup::map_addr;
use crate::compile::{Desired, IdentityAllocator, LocalEndpoint, NodeScope, compile};
use crate::model::{ClusterState, DiagnosticCode, Labels, NamedPort, Namespace, Pod, Protocol};

/// This node's name and address in fixtures.
pub const NODE: &str = "node-a";
pub const NODE_IP: &str = "192.168.0.1";

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// The classifier's peer resolution over the compiled contents.
pub fn resolve_peer(desired: &Desired, ip: &IpAddr) -> PeerInfo {
    desired.peer_info(ip)
}

/// The local endpoint with address `ip`, read from the endpoints map.
pub fn endpoint_with_ip<'a>(desired: &'a Desired, ip: &IpAddr) -> Option<&'a EndpointInfo> {
    desired.endpoint_with_ip(ip)
}

/// The verdict of one endpoint for one direction: `None` when it is not
/// isolated, else the allowing rule (if any).
pub fn endpoint_verdict(
    desired: &Desired,
    endpoint: &EndpointInfo,
    direction: Direction,
    peer: &IpAddr,
    protocol: u8,
    port: u16,
) -> Option<Option<u32>> {
    let flag = match direction {
        Direction::Ingress => EndpointInfo::INGRESS_ISOLATED,
        Direction::Egress => EndpointInfo::EGRESS_ISOLATED,
    };
    if endpoint.flags & flag == 0 {
        return None;
    }
    // No node exemption here: the spec oracle judges a node peer as an address.
    Some(allowing_rule(
        |k| desired.policy.get(k),
        endpoint,
        direction as u8,
        0,
        &resolve_peer(desired, peer),
        protocol,
        port,
    ))
}

/// Whether the egress side (at `src`, if local) and the ingress side (at
/// `dst`, if local) both let a new connection through.
pub fn map_allows(desired: &Desired, src: &IpAddr, dst: &IpAddr, protocol: u8, port: u16) -> bool {
    let egress = endpoint_with_ip(desired, src)
        .and_then(|e| endpoint_verdict(desired, e, Direction::Egress, dst, protocol, port))
        .is_none_or(|rule| rule.is_some());
    let ingress = endpoint_with_ip(desired, dst)
        .and_then(|e| endpoint_verdict(desired, e, Direction::Ingress, src, protocol, port))
        .is_none_or(|rule| rule.is_some());
    egress && ingress
}

/// A cluster under construction.
pub struct Fixture {
    pub state: ClusterState,
    pub node: NodeScope,
    pub ids: IdentityAllocator,
    next_ifindex: u32,
}

impl Fixture {
    pub fn new() -> Self {
        Self {
            state: ClusterState::new(),
            node: NodeScope {
                node_name: NODE.to_owned(),
                node_ips: vec![ip(NODE_IP)],
                endpoints: Default::default(),
            },
            ids: IdentityAllocator::new(),
            next_ifindex: 10,
        }
    }

    pub fn namespace(&mut self, name: &str, pairs: &[(&str, &str)]) -> &mut Self {
        self.state
            .insert_namespace(Namespace::new(name, labels(pairs)));
        self
    }

    /// A pod on this node with a registered interface.
    pub fn pod(&mut self, ns: &str, name: &str, pairs: &[(&str, &str)], ips: &[&str]) -> &mut Self {
        self.pod_with_ports(ns, name, pairs, ips, &[])
    }

    pub fn pod_with_ports(
        &mut self,
        ns: &str,
        name: &str,
        pairs: &[(&str, &str)],
        ips: &[&str],
        ports: &[(&str, u16, Protocol)],
    ) -> &mut Self {
        let pod = make_pod(ns, name, pairs, ips, ports, Some(NODE));
        self.add_local(pod)
    }

    pub fn add_local(&mut self, pod: Pod) -> &mut Self {
        let ifindex = self.next_ifindex;
        self.next_ifindex += 1;
        self.node.endpoints.insert(
            pod.object_ref(),
            LocalEndpoint {
                ifindex,
                endpoint_id: ifindex + 1000,
            },
        );
        self.state.insert_pod(pod, Vec::new());
        self
    }

    /// A pod on another node: only a peer here.
    pub fn remote_pod(
        &mut self,
        ns: &str,
        name: &str,
        pairs: &[(&str, &str)],
        ips: &[&str],
    ) -> &mut Self {
        self.state.insert_pod(
            make_pod(ns, name, pairs, ips, &[], Some("node-b")),
            Vec::new(),
        );
        self
    }

    pub fn policy(&mut self, yaml: &str) -> &mut Self {
        let wire: NetworkPolicy = serde_yaml_ng::from_str(yaml).expect("test policy YAML");
        self.state
            .apply_policy(&wire)
            .expect("policy has name and namespace");
        self
    }

    pub fn compile(&mut self) -> Compiled {
        Compiled {
            desired: compile(&self.state, &self.node, &mut self.ids),
        }
    }
}

pub fn make_pod(
    ns: &str,
    name: &str,
    pairs: &[(&str, &str)],
    ips: &[&str],
    ports: &[(&str, u16, Protocol)],
    node: Option<&str>,
) -> Pod {
    Pod {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        labels: labels(pairs),
        node_name: node.map(str::to_owned),
        ips: ips.iter().map(|s| ip(s)).collect(),
        named_ports: ports
            .iter()
            .map(|(n, port, protocol)| NamedPort {
                name: (*n).to_owned(),
                port: *port,
                protocol: *protocol,
            })
            .collect(),
        host_network: false,
    }
}

/// A compile result with questions to ask it.
pub struct Compiled {
    pub desired: Desired,
}

pub const TCP: u8 = policy_common::proto::TCP;
pub const UDP: u8 = policy_common::proto::UDP;
pub const SCTP: u8 = policy_common::proto::SCTP;
pub const ICMP: u8 = policy_common::proto::ICMP;

impl Compiled {
    /// Whether a new connection from `src` to `dst` passes both ends.
    pub fn allows(&self, src: &str, dst: &str, protocol: u8, port: u16) -> bool {
        map_allows(&self.desired, &ip(src), &ip(dst), protocol, port)
    }

    /// Whether the egress side alone (at `src`, a local endpoint) allows it.
    pub fn egress(&self, src: &str, dst: &str, protocol: u8, port: u16) -> bool {
        let e = self.endpoint(src);
        endpoint_verdict(
            &self.desired,
            e,
            Direction::Egress,
            &ip(dst),
            protocol,
            port,
        )
        .is_none_or(|rule| rule.is_some())
    }

    pub fn tcp(&self, src: &str, dst: &str, port: u16) -> bool {
        self.allows(src, dst, TCP, port)
    }

    pub fn endpoint(&self, pod_ip: &str) -> &EndpointInfo {
        endpoint_with_ip(&self.desired, &ip(pod_ip)).expect("endpoint with that address")
    }

    pub fn isolated(&self, pod_ip: &str) -> (bool, bool) {
        let e = self.endpoint(pod_ip);
        (
            e.flags & EndpointInfo::INGRESS_ISOLATED != 0,
            e.flags & EndpointInfo::EGRESS_ISOLATED != 0,
        )
    }

    pub fn has(&self, code: DiagnosticCode) -> bool {
        self.desired.diagnostics.iter().any(|d| d.code == code)
    }

    pub fn count(&self, code: DiagnosticCode) -> usize {
        self.desired
            .diagnostics
            .iter()
            .filter(|d| d.code == code)
            .count()
    }
}
