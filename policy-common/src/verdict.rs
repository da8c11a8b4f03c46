//! The policy decision for a new connection, written once and used by both the
//! classifier (with map lookups) and the agent (with its compiled maps, in
//! `explain` and in the compiler's property tests).

use crate::maps::{PeerInfo, PolicyKey, PolicyValue, identity, proto};

/// The rule allowing a new connection of an isolated endpoint, or `None`.
///
/// `protocol` is the packet's IP protocol; anything but TCP, UDP and SCTP is
/// looked up as [`proto::OTHER`] with port 0, which only rules without `ports`
/// allow. See [`PolicyKey`] for the lookup order.
#[inline(always)]
pub fn allowing_rule<'a, F>(
    lookup: F,
    endpoint_id: u32,
    direction: u8,
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
    let mut key = PolicyKey::new(endpoint_id, peer.identity, direction, protocol);
    if let Some(rule) = lookup(&key).and_then(|v| v.rule_for_port(dport)) {
        return Some(rule);
    }
    if peer.cidr_identity != identity::ANY {
        key.identity = peer.cidr_identity;
        if let Some(rule) = lookup(&key).and_then(|v| v.rule_for_port(dport)) {
            return Some(rule);
        }
    }
    key.identity = identity::ANY;
    lookup(&key).and_then(|v| v.rule_for_port(dport))
}
