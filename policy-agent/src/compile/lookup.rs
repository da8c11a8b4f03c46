//! Reading compiled map contents the way the classifier reads the maps: for
//! `explain`, and for tests that check the compiler against the spec.

use std::net::IpAddr;

use policy_common::{
    Addr, Direction, EndpointInfo, PeerInfo, identity, v4_mapped, verdict::allowing_rule,
};

use super::Desired;

/// What one endpoint's classifier decides for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The endpoint is not isolated in this direction.
    NotIsolated,
    /// A connection into the pod from its own node.
    FromNode,
    /// Allowed by the rule with this id.
    Allowed(u32),
    Denied,
}

impl Decision {
    pub fn allows(self) -> bool {
        !matches!(self, Decision::Denied)
    }
}

/// The map form of an address (IPv4 and IPv4-mapped IPv6 as IPv4-mapped).
pub fn map_addr(ip: &IpAddr) -> Addr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn prefix_contains(net: &Addr, len: u32, addr: &Addr) -> bool {
    let len = len.min(128) as usize;
    let (bytes, bits) = (len / 8, len % 8);
    if net[..bytes] != addr[..bytes] {
        return false;
    }
    bits == 0 || {
        let mask = 0xffu8 << (8 - bits);
        net[bytes] & mask == addr[bytes] & mask
    }
}

impl Desired {
    /// The peer's identities: its exact entry, else the longest prefix
    /// containing it, else the world.
    pub fn peer_info(&self, ip: &IpAddr) -> PeerInfo {
        let a = map_addr(ip);
        if let Some(info) = self.peer_ips.get(&a) {
            return *info;
        }
        self.peer_cidrs
            .iter()
            .filter(|((len, net), _)| prefix_contains(net, *len, &a))
            .max_by_key(|((len, _), _)| *len)
            .map_or(
                PeerInfo {
                    identity: identity::WORLD,
                    cidr_identity: identity::ANY,
                },
                |(_, info)| *info,
            )
    }

    /// The local endpoint with address `ip`.
    pub fn endpoint_with_ip(&self, ip: &IpAddr) -> Option<&EndpointInfo> {
        self.endpoints.values().find(|e| match ip.to_canonical() {
            IpAddr::V4(v4) => e.flags & EndpointInfo::HAS_IPV4 != 0 && e.ipv4 == v4.octets(),
            IpAddr::V6(v6) => e.flags & EndpointInfo::HAS_IPV6 != 0 && e.ipv6 == v6.octets(),
        })
    }

    /// What `endpoint`'s classifier decides for a new connection in
    /// `direction` with `peer` to `port`: the classifier's logic
    /// ([`allowing_rule`] and the isolation and node checks) over these contents.
    pub fn decide(
        &self,
        endpoint: &EndpointInfo,
        direction: Direction,
        peer: &PeerInfo,
        protocol: u8,
        port: u16,
    ) -> Decision {
        let isolated = match direction {
            Direction::Ingress if peer.identity == identity::HOST => return Decision::FromNode,
            Direction::Ingress => EndpointInfo::INGRESS_ISOLATED,
            Direction::Egress => EndpointInfo::EGRESS_ISOLATED,
        };
        if endpoint.flags & isolated == 0 {
            return Decision::NotIsolated;
        }
        match allowing_rule(
            |k| self.policy.get(k),
            endpoint,
            direction as u8,
            0,
            peer,
            protocol,
            port,
        ) {
            Some(rule) => Decision::Allowed(rule),
            None => Decision::Denied,
        }
    }
}
