//! One flow: a decoded classifier record with both ends and the deciding
//! policy named.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use policy_common::event::DecodedCodes;
use policy_common::{Addr, Direction, FlowEvent, Reason, Verdict, proto};

use super::names::{FlowNames, PodName};
use crate::compile::RuleRef;
use crate::model::ObjectRef;

/// What an address turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerKind {
    Pod(Arc<PodName>),
    /// The node the agent runs on.
    Node,
    /// Outside the cluster's pods, inside this ipBlock prefix of a policy.
    Cidr(IpNet),
    /// Outside the cluster's pods and every ipBlock.
    World,
    /// The classifier dropped the packet before reading its addresses.
    Unknown,
}

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowPeer {
    pub kind: PeerKind,
    /// `None` for [`PeerKind::Unknown`].
    pub ip: Option<IpAddr>,
    /// TCP/UDP/SCTP port; ICMP: the echo identifier.
    pub port: u16,
}

impl FlowPeer {
    pub fn pod(&self) -> Option<&PodName> {
        match &self.kind {
            PeerKind::Pod(pod) => Some(pod),
            _ => None,
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Position in the agent's stream of flows (1, 2, …).
    pub sequence: u64,
    /// When the classifier judged the packet (wall clock).
    pub time: SystemTime,
    pub verdict: Verdict,
    pub reason: Reason,
    /// The hook that judged it, as seen from the local pod.
    pub direction: Direction,
    /// IP protocol number.
    pub protocol: u8,
    /// 4 or 6; 0 when the addresses were not read.
    pub family: u8,
    pub source: FlowPeer,
    pub destination: FlowPeer,
    /// The local pod whose hook judged it; `None` if the endpoint id is not
    /// (or no longer) known.
    pub endpoint: Option<Arc<PodName>>,
    pub endpoint_id: u32,
    /// The host-side interface the packet crossed.
    pub ifindex: u32,
    /// For [`Reason::AllowedByPolicy`]: the rule.
    pub decided_by: Option<Arc<RuleRef>>,
    /// For a default-deny drop: the policies isolating the endpoint.
    pub isolated_by: Arc<[ObjectRef]>,
    pub peer_identity: u32,
    pub packet_bytes: u32,
    /// TCP flags byte, or the ICMP type.
    pub tcp_flags_or_icmp_type: u8,
    /// The revision of the names (the policies enforced) used.
    pub revision: u64,
}

impl Flow {
    /// Names `event` with `names`. `boot_time` is the wall-clock time of
    /// monotonic zero (the clock of the record's timestamp).
    pub fn enrich(
        sequence: u64,
        event: &FlowEvent,
        codes: &DecodedCodes,
        names: &FlowNames,
        boot_time: SystemTime,
    ) -> Self {
        let local_is_source = codes.direction == Direction::Egress;
        let (source, destination) = if event.family == 0 {
            let unknown = FlowPeer {
                kind: PeerKind::Unknown,
                ip: None,
                port: 0,
            };
            (unknown.clone(), unknown)
        } else {
            let peer_cidr = (event.peer_cidr_identity != 0)
                .then(|| names.cidr(event.peer_cidr_identity))
                .flatten();
            let name = |addr: &Addr, port: u16, is_peer: bool| {
                let ip = ip_of(addr);
                let kind = if let Some(pod) = names.pod_by_ip(&ip) {
                    PeerKind::Pod(pod.clone())
                } else if names.is_node(&ip) {
                    PeerKind::Node
                } else if let (true, Some(net)) = (is_peer, peer_cidr) {
                    PeerKind::Cidr(net)
                } else {
                    PeerKind::World
                };
                FlowPeer {
                    kind,
                    ip: Some(ip),
                    port,
                }
            };
            (
                name(&event.src_addr, event.src_port, !local_is_source),
                name(&event.dst_addr, event.dst_port, local_is_source),
            )
        };
        let decided_by = match codes.reason {
            Reason::AllowedByPolicy => names.rule(event.rule_id).cloned(),
            _ => None,
        };
        let isolated_by = match codes.reason {
            Reason::DeniedByPolicy | Reason::DeniedRevoked => names
                .isolating(event.endpoint_id, codes.direction)
                .cloned()
                .unwrap_or_else(|| Arc::from([])),
            _ => Arc::from([]),
        };
        Self {
            sequence,
            time: boot_time + Duration::from_nanos(event.timestamp_ns),
            verdict: codes.verdict,
            reason: codes.reason,
            direction: codes.direction,
            protocol: event.protocol,
            family: event.family,
            source,
            destination,
            endpoint: names.endpoint(event.endpoint_id).cloned(),
            endpoint_id: event.endpoint_id,
            ifindex: event.ifindex,
            decided_by,
            isolated_by,
            peer_identity: event.peer_identity,
            packet_bytes: event.packet_len,
            tcp_flags_or_icmp_type: event.tcp_flags_or_icmp_type,
            revision: names.revision,
        }
    }

    /// Whether the flow carries ports (TCP, UDP, SCTP).
    pub fn has_ports(&self) -> bool {
        matches!(self.protocol, proto::TCP | proto::UDP | proto::SCTP)
    }

    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, else the number; empty when
    /// the packet was dropped before its headers were read.
    pub fn protocol_name(&self) -> std::borrow::Cow<'static, str> {
        if self.family == 0 {
            return "".into();
        }
        protocol_name(self.protocol)
    }
}

/// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, else the number.
pub fn protocol_name(protocol: u8) -> std::borrow::Cow<'static, str> {
    match protocol {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        other => other.to_string().into(),
    }
}

/// An address as the maps store it (IPv4 mapped), as an [`IpAddr`].
pub fn ip_of(addr: &Addr) -> IpAddr {
    Ipv6Addr::from(*addr).to_canonical()
}
