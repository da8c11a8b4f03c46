//! Stable numeric codes. Never renumber: pinned maps and stored flow logs carry them.

/// Which way a packet crosses the pod boundary, seen from the pod.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Towards the pod: host-side veth egress.
    Ingress = 0,
    /// Out of the pod: host-side veth ingress.
    Egress = 1,
}

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allowed = 1,
    Denied = 2,
}

/// Why a packet was passed or dropped.
///
/// Codes below [`Reason::FIRST_DROP`] pass the packet, codes from it on drop it.
/// The value indexes the per-CPU verdict counters, so it stays below
/// [`Reason::COUNT`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A policy rule of the isolated endpoint allowed the new connection.
    AllowedByPolicy = 1,
    /// The endpoint is not isolated in this direction.
    AllowedNotIsolated = 2,
    /// A connection from the pod's own node into the pod (kubelet probes).
    AllowedFromNode = 3,
    /// A packet of a tracked connection, either way.
    AllowedEstablished = 4,
    /// An ICMP error about a tracked connection.
    AllowedRelated = 5,
    /// ARP and IPv6 neighbour discovery.
    AllowedControl = 6,
    /// A non-first fragment of a datagram whose first fragment was allowed.
    AllowedFragment = 7,
    /// A packet that starts no connection (TCP without SYN, ICMP echo reply)
    /// and has no tracked state, passed because policy allows its direction.
    AllowedStateless = 8,

    /// The endpoint is isolated and no rule allows the connection.
    DeniedByPolicy = 16,
    /// A tracked connection the endpoint's current policy no longer allows.
    DeniedRevoked = 17,
    /// A packet leaving a pod with a source address that is not the pod's.
    DroppedSpoofedSource = 18,
    /// A header is truncated or inconsistent (bad IHL, length shorter than header).
    DroppedMalformed = 19,
    /// A non-first fragment whose first fragment was not seen or not allowed.
    DroppedFragmentUnknown = 20,
    /// The interface carries the classifier but has no endpoint entry (fail closed).
    DroppedUnknownEndpoint = 21,
    /// An EtherType other than IPv4, IPv6 and ARP.
    DroppedUnsupportedL3 = 22,
    /// An IPv6 extension header chain longer than the classifier walks.
    DroppedIpv6ExtChain = 23,
}

impl Reason {
    pub const FIRST_DROP: u8 = 16;
    /// Size of the verdict counter array.
    pub const COUNT: u32 = 32;

    #[inline(always)]
    pub const fn verdict(self) -> Verdict {
        if (self as u8) < Self::FIRST_DROP {
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }

    pub const ALL: [Reason; 16] = [
        Reason::AllowedByPolicy,
        Reason::AllowedNotIsolated,
        Reason::AllowedFromNode,
        Reason::AllowedEstablished,
        Reason::AllowedRelated,
        Reason::AllowedControl,
        Reason::AllowedFragment,
        Reason::AllowedStateless,
        Reason::DeniedByPolicy,
        Reason::DeniedRevoked,
        Reason::DroppedSpoofedSource,
        Reason::DroppedMalformed,
        Reason::DroppedFragmentUnknown,
        Reason::DroppedUnknownEndpoint,
        Reason::DroppedUnsupportedL3,
        Reason::DroppedIpv6ExtChain,
    ];

    /// Short snake_case name, used in logs, metrics labels and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::AllowedByPolicy => "allowed_by_policy",
            Reason::AllowedNotIsolated => "allowed_not_isolated",
            Reason::AllowedFromNode => "allowed_from_node",
            Reason::AllowedEstablished => "allowed_established",
            Reason::AllowedRelated => "allowed_related",
            Reason::AllowedControl => "allowed_control",
            Reason::AllowedFragment => "allowed_fragment",
            Reason::AllowedStateless => "allowed_stateless",
            Reason::DeniedByPolicy => "denied_by_policy",
            Reason::DeniedRevoked => "denied_revoked",
            Reason::DroppedSpoofedSource => "dropped_spoofed_source",
            Reason::DroppedMalformed => "dropped_malformed",
            Reason::DroppedFragmentUnknown => "dropped_fragment_unknown",
            Reason::DroppedUnknownEndpoint => "dropped_unknown_endpoint",
            Reason::DroppedUnsupportedL3 => "dropped_unsupported_l3",
            Reason::DroppedIpv6ExtChain => "dropped_ipv6_ext_chain",
        }
    }
}

/// A code read from the kernel that this build does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownCode {
    pub kind: &'static str,
    pub value: u8,
}

impl core::fmt::Display for UnknownCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "unknown {} code {}", self.kind, self.value)
    }
}

impl TryFrom<u8> for Direction {
    type Error = UnknownCode;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Direction::Ingress),
            1 => Ok(Direction::Egress),
            value => Err(UnknownCode {
                kind: "direction",
                value,
            }),
        }
    }
}

impl TryFrom<u8> for Verdict {
    type Error = UnknownCode;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Verdict::Allowed),
            2 => Ok(Verdict::Denied),
            value => Err(UnknownCode {
                kind: "verdict",
                value,
            }),
        }
    }
}

impl TryFrom<u8> for Reason {
    type Error = UnknownCode;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Ok(match value {
            1 => Reason::AllowedByPolicy,
            2 => Reason::AllowedNotIsolated,
            3 => Reason::AllowedFromNode,
            4 => Reason::AllowedEstablished,
            5 => Reason::AllowedRelated,
            6 => Reason::AllowedControl,
            7 => Reason::AllowedFragment,
            8 => Reason::AllowedStateless,
            16 => Reason::DeniedByPolicy,
            17 => Reason::DeniedRevoked,
            18 => Reason::DroppedSpoofedSource,
            19 => Reason::DroppedMalformed,
            20 => Reason::DroppedFragmentUnknown,
            21 => Reason::DroppedUnknownEndpoint,
            22 => Reason::DroppedUnsupportedL3,
            23 => Reason::DroppedIpv6ExtChain,
            value => {
                return Err(UnknownCode {
                    kind: "reason",
                    value,
                });
            }
        })
    }
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "ALLOWED",
            Verdict::Denied => "DENIED",
        }
    }
}
