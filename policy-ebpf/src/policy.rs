//! Peer identity resolution and the verdict for a new connection.

use aya_ebpf::maps::lpm_trie::Key;
use policy_common::{
    Addr, CIDR_GENERATION_BITS, Direction, EndpointInfo, PeerCidrData, PeerInfo, PeerIpKey, Reason,
    identity, verdict::allowing_rule,
};

use crate::{
    addr::{self, LpmKey},
    maps::{PEER_CIDRS, PEER_IPS, POLICY},
};

/// Pods and the node by exact address, then ipBlock prefixes, else the world.
#[inline(always)]
pub fn resolve_peer(addr: &Addr, generation: u32) -> PeerInfo {
    let mut exact = PeerIpKey {
        addr: [0; 16],
        generation,
    };
    addr::copy(&mut exact.addr, addr);
    if let Some(info) = unsafe { PEER_IPS.get(&exact) } {
        return *info;
    }
    let mut key = LpmKey {
        prefix_len: CIDR_GENERATION_BITS + 128,
        data: PeerCidrData::new(generation, [0; 16]),
    };
    addr::copy(&mut key.data.addr, addr);
    // SAFETY: LpmKey has the layout of aya's packed Key<PeerCidrData> (alignment 1).
    let key = unsafe { &*(&key as *const LpmKey).cast::<Key<PeerCidrData>>() };
    let cidr_identity = match PEER_CIDRS.get(key) {
        Some(info) => info.cidr_identity,
        None => identity::ANY,
    };
    PeerInfo {
        identity: identity::WORLD,
        cidr_identity,
    }
}

pub struct Judgement {
    pub reason: Reason,
    pub rule_id: u32,
}

/// Decides a connection opened in `direction` with `peer`, to `dport`.
#[inline(always)]
pub fn judge(
    ep: &EndpointInfo,
    direction: Direction,
    generation: u32,
    peer: &PeerInfo,
    protocol: u8,
    dport: u16,
) -> Judgement {
    let isolated = match direction {
        Direction::Ingress => {
            if peer.identity == identity::HOST {
                return Judgement {
                    reason: Reason::AllowedFromNode,
                    rule_id: 0,
                };
            }
            EndpointInfo::INGRESS_ISOLATED
        }
        Direction::Egress => EndpointInfo::EGRESS_ISOLATED,
    };
    if ep.flags & isolated == 0 {
        return Judgement {
            reason: Reason::AllowedNotIsolated,
            rule_id: 0,
        };
    }
    let lookup = |key: &_| unsafe { POLICY.get(key) };
    match allowing_rule(
        lookup,
        ep,
        direction as u8,
        generation as u8,
        peer,
        protocol,
        dport,
    ) {
        Some(rule_id) => Judgement {
            reason: Reason::AllowedByPolicy,
            rule_id,
        },
        None => Judgement {
            reason: Reason::DeniedByPolicy,
            rule_id: 0,
        },
    }
}
