//! Who a rule's peers are, in identities.
//!
//! Pods are grouped by identity ([`Group`]); a selector peer matches whole
//! groups, since selectors only see pod labels and namespace labels, which
//! together are the identity's key. An ipBlock peer matches CIDR identities:
//! every ipBlock prefix (`cidr` and `except`s of all policies) has one, and
//! the classifier resolves an address to the identity of the longest prefix
//! containing it. For a block `cidr C except E*`, the prefixes `P ⊆ C` with
//! no `e ∈ E*` such that `P ⊆ e` are exactly those whose addresses (those
//! resolving to `P`) are in the block: an address in `C` resolves to a prefix
//! inside `C`, and it is in an except `e` iff its prefix is inside `e`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use policy_common::{Addr, V4_MAPPED_PREFIX_LEN, identity, v4_mapped};

use crate::model::{IpBlock, Labels, Peer, Peers, Pod};

/// The pods sharing one identity.
#[derive(Clone, Debug)]
pub struct Group<'a> {
    /// The identity number.
    pub id: u32,
    /// The pods' namespace.
    pub namespace: &'a str,
    /// The namespace's labels (with `kubernetes.io/metadata.name`).
    pub namespace_labels: &'a Labels,
    /// The pods' labels.
    pub pod_labels: &'a Labels,
    /// The pods, in (namespace, name) order.
    pub pods: Vec<&'a Pod>,
}

/// Whether a selector peer of a policy in `policy_namespace` matches the pods
/// of `group`; ipBlock peers match no group (they match addresses).
pub fn peer_matches_group(peer: &Peer, policy_namespace: &str, group: &Group<'_>) -> bool {
    match peer {
        Peer::PodSelector(pods) => {
            group.namespace == policy_namespace && pods.matches(group.pod_labels)
        }
        Peer::NamespaceSelector(namespaces) => namespaces.matches(group.namespace_labels),
        Peer::PodAndNamespaceSelector { pod, namespace } => {
            namespace.matches(group.namespace_labels) && pod.matches(group.pod_labels)
        }
        Peer::IpBlock(_) => false,
    }
}

/// Whether a rule's peers include the pod address `ip` of a pod in `group`.
pub fn peers_match_pod_address(
    peers: &Peers,
    policy_namespace: &str,
    group: &Group<'_>,
    ip: &IpAddr,
) -> bool {
    match peers {
        Peers::All => true,
        Peers::Only(list) => list.iter().any(|peer| match peer {
            Peer::IpBlock(block) => block.contains(ip),
            _ => peer_matches_group(peer, policy_namespace, group),
        }),
    }
}

/// The ipBlock prefixes of all policies and their CIDR identities.
#[derive(Clone, Debug, Default)]
pub struct Prefixes {
    ids: BTreeMap<IpNet, u32>,
    /// The prefix lengths present, longest first, per family.
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

impl Prefixes {
    /// The set from prefixes and their identities (prefixes are masked).
    pub fn new(ids: BTreeMap<IpNet, u32>) -> Self {
        let lens = |v4: bool| {
            let set: BTreeSet<u8> = ids
                .keys()
                .filter(|n| matches!(n, IpNet::V4(_)) == v4)
                .map(IpNet::prefix_len)
                .collect();
            set.into_iter().rev().collect::<Vec<u8>>()
        };
        let (v4_lens, v6_lens) = (lens(true), lens(false));
        Self {
            ids,
            v4_lens,
            v6_lens,
        }
    }

    /// Every prefix and its identity.
    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, u32)> {
        self.ids.iter().map(|(n, id)| (n, *id))
    }

    /// The CIDR identity of the longest prefix containing `ip` (same address
    /// family only), or [`identity::ANY`] when none does.
    pub fn longest_match(&self, ip: &IpAddr) -> u32 {
        let lens = match ip {
            IpAddr::V4(_) => &self.v4_lens,
            IpAddr::V6(_) => &self.v6_lens,
        };
        lens.iter()
            .filter_map(|len| IpNet::new(*ip, *len).ok())
            .find_map(|net| self.ids.get(&net.trunc()).copied())
            .unwrap_or(identity::ANY)
    }

    /// The CIDR identities whose addresses are all in `block` (see the
    /// module documentation).
    pub fn in_block<'a>(&'a self, block: &'a IpBlock) -> impl Iterator<Item = u32> + 'a {
        self.ids
            .iter()
            .filter(move |(p, _)| {
                block.cidr().contains(*p) && !block.except().iter().any(|e| e.contains(*p))
            })
            .map(|(_, id)| *id)
    }

    /// Whether an IPv6 prefix covers the IPv4-mapped region where the
    /// datapath keeps IPv4 addresses. Then IPv4 addresses would match it in
    /// the LPM trie, so the trie needs a catch-all IPv4 entry
    /// (`0.0.0.0/0` with no CIDR identity) unless a policy has `0.0.0.0/0`.
    pub fn needs_v4_catch_all(&self) -> bool {
        let mapped = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0));
        let v6_covers = self
            .ids
            .keys()
            .any(|n| matches!(n, IpNet::V6(_)) && n.prefix_len() < 96 && n.contains(&mapped));
        let v4_all = self
            .ids
            .keys()
            .any(|n| matches!(n, IpNet::V4(_)) && n.prefix_len() == 0);
        v6_covers && !v4_all
    }
}

/// The 16-byte form of an address used in every map: IPv6 as is, IPv4
/// IPv4-mapped.
pub fn addr(ip: &IpAddr) -> Addr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The `PEER_CIDRS` key of a prefix: its length in the 128-bit space and its
/// masked address.
pub fn prefix_key(net: &IpNet) -> (u32, Addr) {
    let net = net.trunc();
    match net {
        IpNet::V4(_) => (
            u32::from(net.prefix_len()) + V4_MAPPED_PREFIX_LEN,
            addr(&net.network()),
        ),
        IpNet::V6(_) => (u32::from(net.prefix_len()), addr(&net.network())),
    }
}

/// Every prefix of every ipBlock of `blocks`, masked.
pub fn collect_prefixes<'a>(blocks: impl IntoIterator<Item = &'a IpBlock>) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for block in blocks {
        out.insert(block.cidr().trunc());
        out.extend(block.except().iter().map(IpNet::trunc));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn longest_match_is_family_aware() {
        let p = Prefixes::new(BTreeMap::from([
            (net("10.0.0.0/8"), 300),
            (net("10.1.0.0/16"), 301),
            (net("::/0"), 302),
        ]));
        assert_eq!(p.longest_match(&ip("10.1.2.3")), 301);
        assert_eq!(p.longest_match(&ip("10.2.2.3")), 300);
        assert_eq!(p.longest_match(&ip("11.0.0.1")), identity::ANY);
        assert_eq!(p.longest_match(&ip("fd00::1")), 302);
        assert!(p.needs_v4_catch_all());
    }

    #[test]
    fn in_block_excludes_excepts() {
        let p = Prefixes::new(BTreeMap::from([
            (net("10.0.0.0/8"), 300),
            (net("10.1.0.0/16"), 301),
            (net("10.1.2.0/24"), 302),
            (net("192.168.0.0/16"), 303),
        ]));
        let block = IpBlock::new(net("10.0.0.0/8"), vec![net("10.1.0.0/16")]).expect("block");
        assert_eq!(p.in_block(&block).collect::<Vec<_>>(), vec![300]);
        let block = IpBlock::new(net("10.1.0.0/16"), vec![]).expect("block");
        assert_eq!(p.in_block(&block).collect::<Vec<_>>(), vec![301, 302]);
    }

    #[test]
    fn prefix_keys_use_the_128_bit_space() {
        let (len, a) = prefix_key(&net("10.1.0.0/16"));
        assert_eq!(len, 112);
        assert_eq!(a, v4_mapped([10, 1, 0, 0]));
        let (len, a) = prefix_key(&net("fd00::/8"));
        assert_eq!(len, 8);
        assert_eq!(a[0], 0xfd);
    }
}
