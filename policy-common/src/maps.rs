//! Keys and values of the classifier's maps.
//!
//! Addresses are 16 bytes everywhere: IPv4 is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one set of maps serves both families.
//!
//! The maps a verdict reads (endpoints, peers, CIDRs, policy) hold two
//! **generations** of their contents, told apart by a `generation` field in
//! the key. The classifier reads only the generation named by
//! [`Config::generation`]; the agent writes a change into the other one and
//! then flips that single word, so a packet sees either the whole old state
//! or the whole new one, never a mix.

use core::mem::size_of;

/// An IPv6 address, or an IPv4 address in its IPv4-mapped form, network order.
pub type Addr = [u8; 16];

/// The prefix `::ffff:0:0/96` that IPv4-mapped addresses share.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
/// Prefix length to add to an IPv4 prefix length in [`PEER_CIDRS`](crate::names::PEER_CIDRS).
pub const V4_MAPPED_PREFIX_LEN: u32 = 96;

#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Reserved identities. Identities allocated by the agent start at
/// [`FIRST_ALLOCATED_IDENTITY`].
pub mod identity {
    /// Wildcard in a policy key: any peer.
    pub const ANY: u32 = 0;
    /// The node the pod runs on (its addresses as the agent lists them).
    pub const HOST: u32 = 1;
    /// Any address that is neither a pod nor the node.
    pub const WORLD: u32 = 2;
    pub const FIRST_ALLOCATED: u32 = 256;
}
pub use identity::FIRST_ALLOCATED as FIRST_ALLOCATED_IDENTITY;

/// IP protocol numbers the classifier distinguishes. Every other protocol is
/// looked up as [`proto::OTHER`] with port 0.
pub mod proto {
    pub const OTHER: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Number of generations the verdict maps hold.
pub const GENERATIONS: u32 = 2;

/// Key of [`ENDPOINTS`](crate::names::ENDPOINTS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// Host-side interface index of the pod's veth.
    pub ifindex: u32,
    pub generation: u32,
}

/// Value of [`ENDPOINTS`](crate::names::ENDPOINTS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Index into [`EPOCHS`](crate::names::EPOCHS): nonzero, below
    /// [`capacity::ENDPOINTS`].
    pub endpoint_id: u32,
    /// The pod's own identity, reported in flow events.
    pub identity: u32,
    pub flags: u32,
    /// The pod's IPv4 address, valid when [`EndpointInfo::HAS_IPV4`] is set.
    pub ipv4: [u8; 4],
    /// The pod's IPv6 address, valid when [`EndpointInfo::HAS_IPV6`] is set.
    pub ipv6: [u8; 16],
}

impl EndpointInfo {
    pub const INGRESS_ISOLATED: u32 = 1 << 0;
    pub const EGRESS_ISOLATED: u32 = 1 << 1;
    pub const HAS_IPV4: u32 = 1 << 2;
    pub const HAS_IPV6: u32 = 1 << 3;
    /// The endpoint has policy entries keyed by [`identity::ANY`] for ingress;
    /// without it the classifier skips that lookup.
    pub const INGRESS_ANY_PEER: u32 = 1 << 4;
    pub const EGRESS_ANY_PEER: u32 = 1 << 5;
    /// The endpoint has policy entries keyed by a CIDR identity for ingress;
    /// without it the classifier skips that lookup.
    pub const INGRESS_CIDR_PEER: u32 = 1 << 6;
    pub const EGRESS_CIDR_PEER: u32 = 1 << 7;

    /// `INGRESS_ANY_PEER` or `EGRESS_ANY_PEER` for a direction code.
    #[inline(always)]
    pub const fn any_peer_flag(direction: u8) -> u32 {
        if direction == 0 {
            Self::INGRESS_ANY_PEER
        } else {
            Self::EGRESS_ANY_PEER
        }
    }

    /// `INGRESS_CIDR_PEER` or `EGRESS_CIDR_PEER` for a direction code.
    #[inline(always)]
    pub const fn cidr_peer_flag(direction: u8) -> u32 {
        if direction == 0 {
            Self::INGRESS_CIDR_PEER
        } else {
            Self::EGRESS_CIDR_PEER
        }
    }
}

/// Key of [`PEER_IPS`](crate::names::PEER_IPS): one exact address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerIpKey {
    pub addr: Addr,
    pub generation: u32,
}

/// Data part of the [`PEER_CIDRS`](crate::names::PEER_CIDRS) LPM key; the
/// prefix length precedes it in the trie key and counts the generation's 32
/// bits first: `32 + 96 + n` for an IPv4 `/n`, `32 + n` for an IPv6 `/n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerCidrData {
    /// Big-endian, so the trie's first 32 bits are the generation.
    pub generation_be: [u8; 4],
    pub addr: Addr,
}

/// Prefix length the generation adds to every [`PeerCidrData`] key.
pub const CIDR_GENERATION_BITS: u32 = 32;

impl PeerCidrData {
    #[inline(always)]
    pub const fn new(generation: u32, addr: Addr) -> Self {
        Self {
            generation_be: generation.to_be_bytes(),
            addr,
        }
    }

    pub const fn generation(&self) -> u32 {
        u32::from_be_bytes(self.generation_be)
    }
}

/// Value of both peer maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Pod identity, [`identity::HOST`] or [`identity::WORLD`].
    pub identity: u32,
    /// Identity of the longest ipBlock prefix that contains the address, or
    /// [`identity::ANY`] when no prefix does. Pod entries carry it too, so an
    /// ipBlock that covers a pod's address matches with one lookup.
    pub cidr_identity: u32,
}

/// Key of [`POLICY`](crate::names::POLICY).
///
/// Lookup order for a new connection, first hit wins (NetworkPolicy has only
/// allow rules, so order only decides which rule is reported):
///
/// 1. `identity` = the peer's identity (podSelector / namespaceSelector peers);
/// 2. `identity` = the peer's cidr identity (ipBlock peers), when it has one;
/// 3. `identity` = [`identity::ANY`] (rules without peers);
///
/// each with `protocol` = the packet's TCP/UDP/SCTP number or [`proto::OTHER`].
/// The value then matches the port: `any_port_rule`, else the first range
/// containing the destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    pub generation: u8,
    pub _pad: u8,
}

impl PolicyKey {
    /// A key of generation 0 (the compiler's output is generation-less; the
    /// map writer sets the generation it writes).
    #[inline(always)]
    pub const fn new(endpoint_id: u32, identity: u32, direction: u8, protocol: u8) -> Self {
        Self {
            endpoint_id,
            identity,
            direction,
            protocol,
            generation: 0,
            _pad: 0,
        }
    }
}

/// Port ranges one policy value holds; ranges beyond it are a compile error
/// reported by the agent (the endpoint stays isolated).
pub const MAX_PORT_RANGES: usize = 16;

/// Inclusive destination port range `first..=last` and the rule that allows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRule {
    pub first: u16,
    pub last: u16,
    pub rule_id: u32,
}

/// Value of [`POLICY`](crate::names::POLICY).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// Rule allowing every port of the key's protocol, 0 when none does.
    pub any_port_rule: u32,
    /// Valid entries at the start of `ranges`.
    pub range_count: u32,
    pub ranges: [PortRule; MAX_PORT_RANGES],
}

impl PolicyValue {
    /// The rule that allows `port`, if any: the same logic the classifier runs.
    #[inline(always)]
    pub fn rule_for_port(&self, port: u16) -> Option<u32> {
        if self.any_port_rule != 0 {
            return Some(self.any_port_rule);
        }
        let count = if (self.range_count as usize) < MAX_PORT_RANGES {
            self.range_count as usize
        } else {
            MAX_PORT_RANGES
        };
        let mut i = 0;
        while i < count {
            let r = &self.ranges[i];
            if port >= r.first && port <= r.last {
                return Some(r.rule_id);
            }
            i += 1;
        }
        None
    }
}

/// Key of [`CONNTRACK`](crate::names::CONNTRACK): one entry per connection
/// per pod interface, oriented from the pod, so both directions find it with
/// one lookup. The local address is part of the key: a packet leaving the pod
/// with another source address can never match a tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Host-side interface of the pod.
    pub ifindex: u32,
    pub local_addr: Addr,
    pub peer_addr: Addr,
    /// For ICMP echo: the identifier on the side that sent the request, 0 on the other.
    pub local_port: u16,
    pub peer_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The key as the words it is made of (it is 4-aligned, 44 bytes).
    #[inline(always)]
    pub fn words(&self) -> &[u32; 11] {
        // SAFETY: `CtKey` is `repr(C)`, 4-aligned, 44 bytes without hidden padding.
        unsafe { &*(self as *const Self).cast::<[u32; 11]>() }
    }

    /// This key's slot in the flow cache and its version array: a
    /// multiplicative hash of every word, keeping the top bits (which every
    /// input bit reaches).
    #[inline(always)]
    pub fn cache_index(&self) -> u32 {
        let words = self.words();
        let mut h = 0u32;
        let mut i = 0;
        while i < words.len() {
            h = (h ^ words[i]).wrapping_mul(0x9e37_79b1);
            i += 1;
        }
        h >> (32 - flow_cache::SLOT_BITS)
    }
}

/// Value of [`CONNTRACK`](crate::names::CONNTRACK).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_jiffies64` at the last refresh; refreshed at most once a second.
    pub last_seen: u64,
    /// Rule that allowed the connection (0 when not isolated or from the node).
    pub rule_id: u32,
    /// [`EPOCHS`](crate::names::EPOCHS) of the endpoint at the last verdict; a
    /// mismatch makes the next packet judge the connection again.
    pub epoch: u32,
    pub endpoint_id: u32,
    pub peer_identity: u32,
    /// [`Direction`](crate::Direction) of the packet that opened the connection.
    pub origin: u8,
    pub state: u8,
    pub flags: u8,
    /// [`Reason`](crate::Reason) of the verdict that opened or last re-judged it.
    pub reason: u8,
    /// For the origin side (0) and the reply side (1), once it sent FIN: the
    /// acknowledgment number that covers that FIN. When both FINs are
    /// acknowledged the entry is removed.
    pub fin_ack: [u32; 2],
    pub _pad: u32,
}

pub mod ct_state {
    /// Open and passing.
    pub const OPEN: u8 = 1;
    /// Both sides sent FIN; the entry goes once both FINs are acknowledged.
    pub const CLOSING: u8 = 2;
    /// Re-judged under a newer policy and denied: every packet drops until the
    /// next policy change allows it again or a new SYN is judged.
    pub const REVOKED: u8 = 3;
}

pub mod ct_flags {
    pub const SEEN_REPLY: u8 = 1 << 0;
    pub const FIN_FROM_ORIGIN: u8 = 1 << 1;
    pub const FIN_FROM_REPLY: u8 = 1 << 2;
    pub const FIN_ACKED_ORIGIN: u8 = 1 << 3;
    pub const FIN_ACKED_REPLY: u8 = 1 << 4;
}

/// Connection lifetimes without traffic, in seconds. The classifier keeps
/// time in jiffies (`bpf_jiffies64`, which the verifier inlines into one load,
/// where a clock helper call costs tens of nanoseconds); [`Config::hz`]
/// converts.
pub mod ct_timeout {
    pub const TCP_SYN: u64 = 60;
    pub const TCP_ESTABLISHED: u64 = 6 * 3600;
    pub const TCP_CLOSING: u64 = 10;
    pub const UDP: u64 = 120;
    pub const OTHER: u64 = 60;
    /// Refresh `last_seen` only when it is older than this, to keep
    /// established packets from writing shared memory every time.
    pub const REFRESH: u64 = 1;
}

/// The per-CPU flow cache in front of conntrack (see `policy-ebpf`'s
/// `flow_cache`): direct-mapped, indexed by [`CtKey::cache_index`].
pub mod flow_cache {
    pub const SLOT_BITS: u32 = 12;
    pub const SLOTS: u32 = 1 << SLOT_BITS;
}

/// A slot of the flow cache: `key` was an open conntrack entry judged under
/// `epoch`, at jiffies `checked_at`, when the slot's version was `version`.
/// It vouches for packets of the directions in `passes` (bit
/// `1 << direction`): both once the connection has seen a reply, else only
/// the opening direction (a reply must reach conntrack to be recorded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    pub key: CtKey,
    pub endpoint_id: u32,
    pub epoch: u32,
    /// Low 32 bits of the jiffies when conntrack last passed the flow.
    pub checked_at: u32,
    /// The slot's entry of the version array when it was filled. 16 bits
    /// suffice: a slot lives at most a second.
    pub version: u16,
    /// Low 16 bits of [`Config::ct_flushes`] when it was filled.
    pub ct_flushes: u16,
    pub passes: u8,
    pub _pad: [u8; 3],
}

/// Value of [`CONFIG`](crate::names::CONFIG), an array of one element written
/// by the agent when it loads the classifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Jiffies per second of the running kernel (its `CONFIG_HZ`), measured
    /// by the agent. 0 until written: the classifier then assumes
    /// [`Config::FALLBACK_HZ`], the highest common value, so lifetimes can
    /// only come out longer, never shorter.
    pub hz: u64,
    /// The generation of the verdict maps the classifier reads (0 or 1).
    pub generation: u32,
    /// Conntrack flushes done from user space (an unregistered endpoint's
    /// entries removed). Every flow cache slot remembers the value it was
    /// filled under, so a flush invalidates them all.
    pub ct_flushes: u32,
}

impl Config {
    pub const FALLBACK_HZ: u64 = 1000;
}

/// Key of [`FRAGMENTS`](crate::names::FRAGMENTS): one datagram being fragmented.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub endpoint_id: u32,
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub src: Addr,
    pub dst: Addr,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Value of [`FRAGMENTS`](crate::names::FRAGMENTS): written only when the first
/// fragment was allowed, so later fragments inherit its verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    pub src_port: u16,
    pub dst_port: u16,
    pub rule_id: u32,
}

/// Value of [`VERDICT_STATS`](crate::names::VERDICT_STATS), a per-CPU array
/// indexed by [`Reason`](crate::Reason).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// Map capacities, shared so the agent can report occupancy against them.
pub mod capacity {
    /// Endpoints per node; endpoint ids are below it.
    pub const ENDPOINTS: u32 = 4096;
    pub const PEER_IPS: u32 = 262_144;
    pub const PEER_CIDRS: u32 = 65_536;
    pub const POLICY: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8192;
    /// Bytes; a power of two and a multiple of the page size.
    pub const FLOW_EVENTS_BYTES: u32 = 8 << 20;
}

const _: () = {
    assert!(size_of::<EndpointInfo>() == 32);
    assert!(size_of::<EndpointKey>() == 8);
    assert!(size_of::<PeerIpKey>() == 20);
    assert!(size_of::<PeerCidrData>() == 20);
    assert!(size_of::<PeerInfo>() == 8);
    assert!(size_of::<PolicyKey>() == 12);
    assert!(size_of::<PortRule>() == 8);
    assert!(size_of::<PolicyValue>() == 8 + 8 * MAX_PORT_RANGES);
    assert!(size_of::<CtKey>() == 44);
    assert!(size_of::<CtEntry>() == 40);
    assert!(size_of::<FragKey>() == 44);
    assert!(size_of::<FragEntry>() == 8);
    assert!(size_of::<VerdictCounter>() == 16);
    assert!(size_of::<Config>() == 16);
    assert!(size_of::<FlowSlot>() == 64);
};

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: all are #[repr(C)], Copy, made only of integers and byte arrays,
    // with every padding byte an explicit field, so any bit pattern is valid.
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for PeerIpKey {}
    unsafe impl aya::Pod for PeerCidrData {}
    unsafe impl aya::Pod for PeerInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for VerdictCounter {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FlowSlot {}
    unsafe impl aya::Pod for crate::FlowEvent {}
}
