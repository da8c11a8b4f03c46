//! The policy decision for a new connection, written once and used by both the
//! classifier (with map lookups) and the agent (with its compiled maps, in
//! `explain` and in the compiler's property tests).

use crate::maps::{EndpointInfo, PeerInfo, PolicyKey, PolicyValue, identity, proto};

/// The rule allowing a new connection of an isolated endpoint, or `None`.
///
/// `protocol` is the packet's IP protocol; anything but TCP, UDP and SCTP is
/// looked up as [`proto::OTHER`] with port 0, which only rules without `ports`
/// allow. See [`PolicyKey`] for the lookup order. The CIDR and ANY lookups
/// are skipped when the endpoint's flags say it has no such entries.
#[inline(always)]
pub fn allowing_rule<'a, F>(
    lookup: F,
    endpoint: &EndpointInfo,
    direction: u8,
    generation: u8,
    peer: &PeerInfo,
    protocol: u8,
    dport: u16,
) -> Option<u32>
where
    F: Fn(&PolicyKey) -> Option<&'a PolicyValue>,
{
    let (protocol, dport) = match protocol {
        proto::TCP | proto::UDP | proto::SCTP => (protocol, dport),
        _ => (proto::OTHER, 0),
    };
    let mut key = PolicyKey::new(endpoint.endpoint_id, peer.identity, direction, protocol);
    key.generation = generation;
    if let Some(rule) = lookup(&key).and_then(|v| v.rule_for_port(dport)) {
        return Some(rule);
    }
    if peer.cidr_identity != identity::ANY
        && endpoint.flags & EndpointInfo::cidr_peer_flag(direction) != 0
    {
        key.identity = peer.cidr_identity;
        if let Some(rule) = lookup(&key).and_then(|v| v.rule_for_port(dport)) {
            return Some(rule);
        }
    }
    if endpoint.flags & EndpointInfo::any_peer_flag(direction) == 0 {
        return None;
    }
    key.identity = identity::ANY;
    lookup(&key).and_then(|v| v.rule_for_port(dport))
}
