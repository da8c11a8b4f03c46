//! Crafting Ethernet frames for `BPF_PROG_TEST_RUN` (and for injection through
//! [`crate::netns::PacketSocket`]).
//!
//! A [`Packet`] is a plain description of a frame (public fields, one per
//! header) with chaining setters; [`Packet::build`] serialises it, filling in
//! every length, "next protocol" field and checksum that was not overridden:
//!
//! * IPv4 header checksum, TCP/UDP/ICMPv6 checksums with the pseudo-header,
//!   ICMP checksum, SCTP CRC32c (stored as Linux does, little-endian);
//! * all of them are computed over the bytes actually emitted, so overriding
//!   a length field (IHL, total length, UDP length, …) to a bogus value does
//!   not change the checksums.
//!
//! ```
//! use palisade_tests::packet::{self, ExtHeader, Packet};
//! use std::net::Ipv6Addr;
//! let syn = packet::tcp4([10, 0, 0, 1], 40000, [10, 0, 0, 2], 80, packet::SYN);
//! let frag = Packet::new()
//!     .ipv6("fd00::1".parse::<Ipv6Addr>().unwrap(), [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])
//!     .ext(ExtHeader::hop_by_hop(0))
//!     .ext(ExtHeader::fragment(0x1234, 0, true))
//!     .udp(5353, 53)
//!     .payload(b"hello")
//!     .build();
//! assert_eq!(packet::header_boundaries(&syn), vec![0, 14, 34, 54]);
//! assert_eq!(packet::header_boundaries(&frag), vec![0, 14, 54, 62, 70, 78]);
//! ```
//!
//! Setters that only make sense for one network layer (e.g. [`Packet::ihl`]
//! on an IPv6 packet) panic when used on the wrong one: these are test
//! helpers, a misuse is a bug in the test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/// TCP flag FIN.
pub const FIN: u8 = 0x01;
/// TCP flag SYN.
pub const SYN: u8 = 0x02;
/// TCP flag RST.
pub const RST: u8 = 0x04;
/// TCP flag PSH.
pub const PSH: u8 = 0x08;
/// TCP flag ACK.
pub const ACK: u8 = 0x10;
/// TCP flag URG.
pub const URG: u8 = 0x20;
/// TCP flag ECE.
pub const ECE: u8 = 0x40;
/// TCP flag CWR.
pub const CWR: u8 = 0x80;

/// Length of an untagged Ethernet header.
pub const ETH_HLEN: usize = 14;

/// EtherType values.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad (QinQ) service tag.
    pub const QINQ: u16 = 0x88a8;
    /// IPv6.
    pub const IPV6: u16 = 0x86dd;
    /// Local experimental EtherType 1 (IEEE 802).
    pub const EXPERIMENTAL: u16 = 0x88b5;
}

/// IP protocol numbers (IPv4 protocol / IPv6 next header).
pub mod proto {
    /// IPv6 Hop-by-Hop Options.
    pub const HOPOPT: u8 = 0;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// IPv4 encapsulation (IP-in-IP).
    pub const IPIP: u8 = 4;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 encapsulation.
    pub const IPV6: u8 = 41;
    /// IPv6 Routing header.
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 Fragment header.
    pub const IPV6_FRAG: u8 = 44;
    /// GRE.
    pub const GRE: u8 = 47;
    /// Encapsulating Security Payload.
    pub const ESP: u8 = 50;
    /// Authentication Header.
    pub const AH: u8 = 51;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 No Next Header.
    pub const IPV6_NONXT: u8 = 59;
    /// IPv6 Destination Options.
    pub const IPV6_OPTS: u8 = 60;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// Reserved; used as the IPv4 protocol when a packet has no L4 header
    /// and no explicit protocol.
    pub const RESERVED: u8 = 255;
}

/// ICMP (v4) types.
pub mod icmp {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable (code 3: port unreachable, 4: fragmentation needed).
    pub const DEST_UNREACH: u8 = 3;
    /// Redirect.
    pub const REDIRECT: u8 = 5;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 12;
    /// Timestamp request.
    pub const TIMESTAMP: u8 = 13;
}

/// ICMPv6 types.
pub mod icmp6 {
    /// Destination unreachable (code 4: port unreachable).
    pub const DEST_UNREACH: u8 = 1;
    /// Packet too big.
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 3;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 4;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Router solicitation.
    pub const ROUTER_SOLICIT: u8 = 133;
    /// Router advertisement.
    pub const ROUTER_ADVERT: u8 = 134;
    /// Neighbour solicitation.
    pub const NEIGHBOR_SOLICIT: u8 = 135;
    /// Neighbour advertisement.
    pub const NEIGHBOR_ADVERT: u8 = 136;
}

/// Hop-by-Hop/Destination option type used to fill options headers longer
/// than 8 bytes: RFC 4727 experimental type 0x1E, whose top bits (00) tell a
/// receiver that does not know it to skip it. Headers of 8 bytes carry one
/// PadN option only.
pub const OPT_EXPERIMENTAL: u8 = 0x1e;

/// Default source MAC of built frames.
pub const DEFAULT_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Default destination MAC of built frames.
pub const DEFAULT_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Broadcast MAC.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

// ---------------------------------------------------------------------------
// Header descriptions
// ---------------------------------------------------------------------------

/// Ethernet header (optionally with one 802.1Q tag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ethernet {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// 802.1Q TCI (priority/DEI/VLAN id); `Some` inserts a tag after the MACs.
    pub vlan_tci: Option<u16>,
    /// EtherType; `None` derives it from the network layer
    /// (IPv4/IPv6/ARP, [`ethertype::EXPERIMENTAL`] without one).
    pub ethertype: Option<u16>,
}

impl Default for Ethernet {
    fn default() -> Self {
        Self {
            dst: DEFAULT_DST_MAC,
            src: DEFAULT_SRC_MAC,
            vlan_tci: None,
            ethertype: None,
        }
    }
}

/// IPv4 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Type of service / DSCP+ECN byte.
    pub tos: u8,
    /// Time to live (default 64).
    pub ttl: u8,
    /// Protocol field; `None` derives it from the L4 header
    /// ([`proto::RESERVED`] without one).
    pub protocol: Option<u8>,
    /// Identification.
    pub id: u16,
    /// The reserved ("evil") flag bit.
    pub reserved_flag: bool,
    /// Don't Fragment.
    pub dont_fragment: bool,
    /// More Fragments.
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units (13 bits; higher bits are masked off).
    pub fragment_offset: u16,
    /// Options, emitted as given and zero-padded (EOL) to a multiple of 4.
    /// At most 40 bytes unless `ihl` is overridden.
    pub options: Vec<u8>,
    /// Overrides the IHL field (4 bits) without changing the bytes emitted.
    pub ihl: Option<u8>,
    /// Overrides the total-length field.
    pub total_len: Option<u16>,
    /// Overrides the header checksum.
    pub checksum: Option<u16>,
}

impl Ipv4 {
    /// A plain IPv4 header (TTL 64, no options, not fragmented).
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            src,
            dst,
            tos: 0,
            ttl: 64,
            protocol: None,
            id: 0,
            reserved_flag: false,
            dont_fragment: false,
            more_fragments: false,
            fragment_offset: 0,
            options: Vec::new(),
            ihl: None,
            total_len: None,
            checksum: None,
        }
    }
}

/// IPv6 extension header: the raw bytes of one header in the chain.
///
/// `bytes[0]` (the Next Header field) is filled in by the builder with the
/// `kind` of the following header (or the upper-layer protocol), unless
/// `next_header` overrides it. Everything else, including the length byte,
/// is emitted verbatim, so a header can claim a length that differs from the
/// bytes actually present ([`ExtHeader::with_len_field`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtHeader {
    /// Protocol number announcing this header in the preceding header's
    /// Next Header field (e.g. [`proto::HOPOPT`]).
    pub kind: u8,
    /// The header's bytes (at least 1), including Next Header and length.
    pub bytes: Vec<u8>,
    /// Overrides this header's Next Header field.
    pub next_header: Option<u8>,
}

impl ExtHeader {
    /// Options header (Hop-by-Hop or Destination) of `(len8 + 1) * 8` bytes,
    /// filled so that Linux accepts it: the last (at most 7) bytes are Pad1/
    /// PadN padding, anything before is covered by experimental options of
    /// type [`OPT_EXPERIMENTAL`] (action "skip"), because Linux rejects more
    /// than 7 consecutive padding bytes (RFC 4942).
    fn options(kind: u8, len8: u8) -> Self {
        let size = (usize::from(len8) + 1) * 8;
        let mut bytes = vec![0u8; size];
        bytes[1] = len8;
        let mut off = 2;
        while off < size {
            let rest = size - off;
            if rest == 1 {
                bytes[off] = 0; // Pad1
                break;
            }
            let n = (rest - 2).min(255);
            // PadN for the tail, an experimental option otherwise.
            bytes[off] = if rest <= 7 { 1 } else { OPT_EXPERIMENTAL };
            bytes[off + 1] = n as u8;
            off += 2 + n;
        }
        Self {
            kind,
            bytes,
            next_header: None,
        }
    }

    /// Hop-by-Hop Options header, `(len8 + 1) * 8` bytes long (see the fill rule on
    /// [`OPT_EXPERIMENTAL`]).
    pub fn hop_by_hop(len8: u8) -> Self {
        Self::options(proto::HOPOPT, len8)
    }

    /// Destination Options header, `(len8 + 1) * 8` bytes long (see the fill rule on
    /// [`OPT_EXPERIMENTAL`]).
    pub fn dest_opts(len8: u8) -> Self {
        Self::options(proto::IPV6_OPTS, len8)
    }

    /// Routing header of `(len8 + 1) * 8` bytes with the given routing type
    /// and segments left; the rest (reserved/type-specific data) is zero.
    pub fn routing(len8: u8, routing_type: u8, segments_left: u8) -> Self {
        let size = (usize::from(len8) + 1) * 8;
        let mut bytes = vec![0u8; size];
        bytes[1] = len8;
        bytes[2] = routing_type;
        bytes[3] = segments_left;
        Self {
            kind: proto::IPV6_ROUTE,
            bytes,
            next_header: None,
        }
    }

    /// Fragment header: `offset` in 8-byte units (13 bits), `more` = M flag.
    pub fn fragment(identification: u32, offset: u16, more: bool) -> Self {
        let mut bytes = vec![0u8; 8];
        let off = ((offset & 0x1fff) << 3) | u16::from(more);
        bytes[2..4].copy_from_slice(&off.to_be_bytes());
        bytes[4..8].copy_from_slice(&identification.to_be_bytes());
        Self {
            kind: proto::IPV6_FRAG,
            bytes,
            next_header: None,
        }
    }

    /// Authentication Header with `icv_len` bytes of (zero) ICV: 12 + icv_len
    /// bytes, Payload Len field = (12 + icv_len) / 4 - 2. For IPv6 the total
    /// should be a multiple of 8 (icv_len = 4, 12, 20, …).
    pub fn ah(spi: u32, seq: u32, icv_len: usize) -> Self {
        let size = 12 + icv_len;
        let mut bytes = vec![0u8; size];
        bytes[1] = u8::try_from((size / 4).saturating_sub(2)).unwrap_or(u8::MAX);
        bytes[4..8].copy_from_slice(&spi.to_be_bytes());
        bytes[8..12].copy_from_slice(&seq.to_be_bytes());
        Self {
            kind: proto::AH,
            bytes,
            next_header: None,
        }
    }

    /// Arbitrary header bytes announced as `kind`.
    pub fn raw(kind: u8, bytes: impl Into<Vec<u8>>) -> Self {
        let bytes = bytes.into();
        assert!(
            !bytes.is_empty(),
            "an extension header needs at least its next-header byte"
        );
        Self {
            kind,
            bytes,
            next_header: None,
        }
    }

    /// Overwrites the length byte (`bytes[1]`) without changing the bytes
    /// emitted, e.g. to make a header claim to run past the end of the packet.
    pub fn with_len_field(mut self, value: u8) -> Self {
        if self.bytes.len() < 2 {
            self.bytes.resize(2, 0);
        }
        self.bytes[1] = value;
        self
    }

    /// Overrides this header's Next Header field.
    pub fn with_next_header(mut self, value: u8) -> Self {
        self.next_header = Some(value);
        self
    }
}

/// IPv6 header plus extension-header chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Traffic class.
    pub traffic_class: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
    /// Hop limit (default 64).
    pub hop_limit: u8,
    /// Extension headers, in order.
    pub ext: Vec<ExtHeader>,
    /// Next Header value written in the *last* header of the chain (the fixed
    /// header when `ext` is empty). `None`: the L4 protocol, or
    /// [`proto::IPV6_NONXT`] without an L4 header.
    pub next_header: Option<u8>,
    /// Overrides the payload-length field.
    pub payload_len: Option<u16>,
}

impl Ipv6 {
    /// A plain IPv6 header (hop limit 64, no extension headers).
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self {
            src,
            dst,
            traffic_class: 0,
            flow_label: 0,
            hop_limit: 64,
            ext: Vec::new(),
            next_header: None,
            payload_len: None,
        }
    }
}

/// ARP (Ethernet/IPv4) packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arp {
    /// Operation: 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sha: [u8; 6],
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: [u8; 6],
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

/// Network layer.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum L3 {
    /// Nothing: the payload follows the Ethernet header directly.
    #[default]
    None,
    /// IPv4.
    Ipv4(Ipv4),
    /// IPv6.
    Ipv6(Ipv6),
    /// ARP.
    Arp(Arp),
}

/// TCP header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags byte ([`SYN`], [`ACK`], …).
    pub flags: u8,
    /// Window (default 65535).
    pub window: u16,
    /// Urgent pointer.
    pub urgent: u16,
    /// Options, zero-padded (EOL) to a multiple of 4.
    pub options: Vec<u8>,
    /// Overrides the data-offset field (4 bits, in 32-bit words).
    pub data_offset: Option<u8>,
    /// Overrides the checksum.
    pub checksum: Option<u16>,
}

/// UDP header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Overrides the length field.
    pub length: Option<u16>,
    /// Overrides the checksum (0 = "no checksum" over IPv4).
    pub checksum: Option<u16>,
}

/// SCTP common header (chunks go in the payload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sctp {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Verification tag.
    pub vtag: u32,
    /// Overrides the CRC32c checksum (value as stored by Linux, i.e. the
    /// field holds `checksum.to_le_bytes()`).
    pub checksum: Option<u32>,
}

/// ICMP or ICMPv6 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    /// Type.
    pub ty: u8,
    /// Code.
    pub code: u8,
    /// Rest of header (echo: identifier and sequence; errors: unused/MTU/pointer).
    pub rest: [u8; 4],
    /// Overrides the checksum.
    pub checksum: Option<u16>,
}

impl Icmp {
    /// `rest` for echo messages: identifier and sequence number.
    pub fn echo_rest(id: u16, seq: u16) -> [u8; 4] {
        let [a, b] = id.to_be_bytes();
        let [c, d] = seq.to_be_bytes();
        [a, b, c, d]
    }
}

/// Transport layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP.
    Tcp(Tcp),
    /// UDP.
    Udp(Udp),
    /// SCTP common header.
    Sctp(Sctp),
    /// ICMP (checksum without pseudo-header).
    Icmp(Icmp),
    /// ICMPv6 (checksum with the IPv6 pseudo-header).
    Icmp6(Icmp),
    /// Any protocol: raw header bytes, no checksum computed.
    Raw {
        /// Protocol number put in the IPv4 protocol / IPv6 next-header field.
        protocol: u8,
        /// Header bytes (the payload follows them).
        bytes: Vec<u8>,
    },
}

impl L4 {
    /// IP protocol number of this header.
    pub fn protocol(&self) -> u8 {
        match self {
            L4::Tcp(_) => proto::TCP,
            L4::Udp(_) => proto::UDP,
            L4::Sctp(_) => proto::SCTP,
            L4::Icmp(_) => proto::ICMP,
            L4::Icmp6(_) => proto::ICMPV6,
            L4::Raw { protocol, .. } => *protocol,
        }
    }
}

/// Byte ranges of each header in a frame. Produced exactly by
/// [`Packet::build_with_layout`] or, following the length fields, by
/// [`parse_layout`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Layout {
    /// Ethernet header (including a VLAN tag).
    pub eth: Range<usize>,
    /// Fixed network header (IPv4 including options, IPv6 fixed 40 bytes, ARP).
    pub l3: Option<Range<usize>>,
    /// IPv6 extension headers: (kind, range).
    pub ext: Vec<(u8, Range<usize>)>,
    /// Transport header (without payload).
    pub l4: Option<Range<usize>>,
    /// Whatever follows the last header.
    pub payload: Range<usize>,
}

impl Layout {
    /// All header ranges in order.
    pub fn headers(&self) -> Vec<Range<usize>> {
        let mut v = vec![self.eth.clone()];
        v.extend(self.l3.clone());
        v.extend(self.ext.iter().map(|(_, r)| r.clone()));
        v.extend(self.l4.clone());
        v
    }

    /// Sorted, deduplicated start and end offsets of every header.
    pub fn boundaries(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .headers()
            .into_iter()
            .flat_map(|r| [r.start, r.end])
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Lengths worth truncating a frame to: every header boundary, one byte
    /// either side of it and the middle of every header; sorted, deduplicated,
    /// strictly shorter than `frame_len`. Includes values below
    /// [`ETH_HLEN`], which `BPF_PROG_TEST_RUN` rejects for skb programs.
    pub fn truncation_points(&self, frame_len: usize) -> Vec<usize> {
        let mut v = Vec::new();
        for r in self.headers() {
            v.extend([r.start, r.start + 1, r.start + (r.end - r.start) / 2, r.end]);
            v.extend(r.end.checked_sub(1));
        }
        v.retain(|&n| n < frame_len);
        v.sort_unstable();
        v.dedup();
        v
    }
}

// ---------------------------------------------------------------------------
// Packet builder
// ---------------------------------------------------------------------------

/// A frame to build: Ethernet, optional network layer, optional transport
/// layer, payload.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Packet {
    /// Ethernet header.
    pub eth: Ethernet,
    /// Network layer.
    pub l3: L3,
    /// Transport layer.
    pub l4: Option<L4>,
    /// Bytes after the last header.
    pub payload: Vec<u8>,
}

impl Packet {
    /// An empty frame: Ethernet only, default MACs.
    pub fn new() -> Self {
        Self::default()
    }

    // --- Ethernet ---

    /// Sets the source MAC.
    pub fn eth_src(mut self, mac: [u8; 6]) -> Self {
        self.eth.src = mac;
        self
    }

    /// Sets the destination MAC.
    pub fn eth_dst(mut self, mac: [u8; 6]) -> Self {
        self.eth.dst = mac;
        self
    }

    /// Sets an explicit EtherType (overriding the derived one).
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.eth.ethertype = Some(ethertype);
        self
    }

    /// Inserts an 802.1Q tag with this TCI.
    pub fn vlan(mut self, tci: u16) -> Self {
        self.eth.vlan_tci = Some(tci);
        self
    }

    // --- Network layer ---

    /// Makes this an IPv4 packet.
    pub fn ipv4(mut self, src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>) -> Self {
        self.l3 = L3::Ipv4(Ipv4::new(src.into(), dst.into()));
        self
    }

    /// Makes this an IPv6 packet.
    pub fn ipv6(mut self, src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>) -> Self {
        self.l3 = L3::Ipv6(Ipv6::new(src.into(), dst.into()));
        self
    }

    /// IPv4 or IPv6 depending on the addresses. Panics if the families differ.
    pub fn ip(self, src: IpAddr, dst: IpAddr) -> Self {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.ipv4(s, d),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.ipv6(s, d),
            _ => panic!("Packet::ip: address families differ ({src} / {dst})"),
        }
    }

    /// Makes this an ARP packet.
    pub fn arp(mut self, arp: Arp) -> Self {
        self.l3 = L3::Arp(arp);
        self
    }

    fn v4(&mut self, what: &str) -> &mut Ipv4 {
        match &mut self.l3 {
            L3::Ipv4(h) => h,
            _ => panic!("Packet::{what} needs an IPv4 packet: call .ipv4() first"),
        }
    }

    fn v6(&mut self, what: &str) -> &mut Ipv6 {
        match &mut self.l3 {
            L3::Ipv6(h) => h,
            _ => panic!("Packet::{what} needs an IPv6 packet: call .ipv6() first"),
        }
    }

    /// Sets the IPv4 TTL or the IPv6 hop limit.
    pub fn ttl(mut self, ttl: u8) -> Self {
        match &mut self.l3 {
            L3::Ipv4(h) => h.ttl = ttl,
            L3::Ipv6(h) => h.hop_limit = ttl,
            _ => panic!("Packet::ttl needs an IP packet"),
        }
        self
    }

    /// Sets the IPv4 TOS / IPv6 traffic class.
    pub fn tos(mut self, tos: u8) -> Self {
        match &mut self.l3 {
            L3::Ipv4(h) => h.tos = tos,
            L3::Ipv6(h) => h.traffic_class = tos,
            _ => panic!("Packet::tos needs an IP packet"),
        }
        self
    }

    /// Sets the IPv4 protocol field, or the IPv6 Next Header of the last
    /// header of the chain, to an arbitrary value (independent of the L4).
    pub fn protocol(mut self, protocol: u8) -> Self {
        match &mut self.l3 {
            L3::Ipv4(h) => h.protocol = Some(protocol),
            L3::Ipv6(h) => h.next_header = Some(protocol),
            _ => panic!("Packet::protocol needs an IP packet"),
        }
        self
    }

    /// Same as [`Packet::protocol`] (IPv6 naming).
    pub fn next_header(self, next_header: u8) -> Self {
        self.protocol(next_header)
    }

    /// IPv4 options (zero-padded to a multiple of 4; IHL grows).
    pub fn ipv4_options(mut self, options: impl Into<Vec<u8>>) -> Self {
        self.v4("ipv4_options").options = options.into();
        self
    }

    /// IPv4 identification.
    pub fn ip_id(mut self, id: u16) -> Self {
        self.v4("ip_id").id = id;
        self
    }

    /// IPv4 fragmentation: offset in 8-byte units and the MF flag.
    pub fn fragment(mut self, offset8: u16, more_fragments: bool) -> Self {
        let h = self.v4("fragment");
        h.fragment_offset = offset8;
        h.more_fragments = more_fragments;
        self
    }

    /// IPv4 Don't Fragment flag.
    pub fn dont_fragment(mut self, df: bool) -> Self {
        self.v4("dont_fragment").dont_fragment = df;
        self
    }

    /// Overrides the IPv4 IHL field (bytes emitted are unchanged).
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.v4("ihl").ihl = Some(ihl);
        self
    }

    /// Overrides the IPv4 total-length field.
    pub fn total_len(mut self, total_len: u16) -> Self {
        self.v4("total_len").total_len = Some(total_len);
        self
    }

    /// Overrides the IPv4 header checksum.
    pub fn ip_checksum(mut self, checksum: u16) -> Self {
        self.v4("ip_checksum").checksum = Some(checksum);
        self
    }

    /// Appends an IPv6 extension header.
    pub fn ext(mut self, header: ExtHeader) -> Self {
        self.v6("ext").ext.push(header);
        self
    }

    /// Appends several IPv6 extension headers.
    pub fn exts(mut self, headers: impl IntoIterator<Item = ExtHeader>) -> Self {
        self.v6("exts").ext.extend(headers);
        self
    }

    /// Overrides the IPv6 payload-length field.
    pub fn payload_len(mut self, len: u16) -> Self {
        self.v6("payload_len").payload_len = Some(len);
        self
    }

    // --- Transport layer ---

    /// TCP header (seq 0, ack 0, window 65535).
    pub fn tcp(mut self, sport: u16, dport: u16, flags: u8) -> Self {
        self.l4 = Some(L4::Tcp(Tcp {
            sport,
            dport,
            seq: 0,
            ack: 0,
            flags,
            window: 65535,
            urgent: 0,
            options: Vec::new(),
            data_offset: None,
            checksum: None,
        }));
        self
    }

    fn tcp_mut(&mut self, what: &str) -> &mut Tcp {
        match &mut self.l4 {
            Some(L4::Tcp(t)) => t,
            _ => panic!("Packet::{what} needs a TCP header: call .tcp() first"),
        }
    }

    /// TCP sequence and acknowledgement numbers.
    pub fn tcp_seq(mut self, seq: u32, ack: u32) -> Self {
        let t = self.tcp_mut("tcp_seq");
        t.seq = seq;
        t.ack = ack;
        self
    }

    /// TCP window.
    pub fn tcp_window(mut self, window: u16) -> Self {
        self.tcp_mut("tcp_window").window = window;
        self
    }

    /// TCP options (zero-padded to a multiple of 4; data offset grows).
    pub fn tcp_options(mut self, options: impl Into<Vec<u8>>) -> Self {
        self.tcp_mut("tcp_options").options = options.into();
        self
    }

    /// Overrides the TCP data-offset field (bytes emitted are unchanged).
    pub fn tcp_data_offset(mut self, words: u8) -> Self {
        self.tcp_mut("tcp_data_offset").data_offset = Some(words);
        self
    }

    /// UDP header.
    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = Some(L4::Udp(Udp {
            sport,
            dport,
            length: None,
            checksum: None,
        }));
        self
    }

    /// Overrides the UDP length field.
    pub fn udp_len(mut self, len: u16) -> Self {
        match &mut self.l4 {
            Some(L4::Udp(u)) => u.length = Some(len),
            _ => panic!("Packet::udp_len needs a UDP header: call .udp() first"),
        }
        self
    }

    /// SCTP common header.
    pub fn sctp(mut self, sport: u16, dport: u16, vtag: u32) -> Self {
        self.l4 = Some(L4::Sctp(Sctp {
            sport,
            dport,
            vtag,
            checksum: None,
        }));
        self
    }

    /// ICMP (v4) header.
    pub fn icmp(mut self, ty: u8, code: u8, rest: [u8; 4]) -> Self {
        self.l4 = Some(L4::Icmp(Icmp {
            ty,
            code,
            rest,
            checksum: None,
        }));
        self
    }

    /// ICMPv6 header.
    pub fn icmp6(mut self, ty: u8, code: u8, rest: [u8; 4]) -> Self {
        self.l4 = Some(L4::Icmp6(Icmp {
            ty,
            code,
            rest,
            checksum: None,
        }));
        self
    }

    /// Echo request/reply, ICMP or ICMPv6 depending on the network layer
    /// (call after `.ipv4()`/`.ipv6()`).
    pub fn icmp_echo(self, id: u16, seq: u16, request: bool) -> Self {
        let rest = Icmp::echo_rest(id, seq);
        match self.l3 {
            L3::Ipv4(_) => {
                let ty = if request {
                    icmp::ECHO_REQUEST
                } else {
                    icmp::ECHO_REPLY
                };
                self.icmp(ty, 0, rest)
            }
            L3::Ipv6(_) => {
                let ty = if request {
                    icmp6::ECHO_REQUEST
                } else {
                    icmp6::ECHO_REPLY
                };
                self.icmp6(ty, 0, rest)
            }
            _ => panic!("Packet::icmp_echo needs an IP packet: call .ipv4()/.ipv6() first"),
        }
    }

    /// Raw transport header for any protocol number (no checksum computed).
    pub fn raw_l4(mut self, protocol: u8, bytes: impl Into<Vec<u8>>) -> Self {
        self.l4 = Some(L4::Raw {
            protocol,
            bytes: bytes.into(),
        });
        self
    }

    /// Overrides the TCP/UDP/ICMP/ICMPv6 checksum (SCTP: the CRC32c value).
    pub fn l4_checksum(mut self, checksum: u16) -> Self {
        match &mut self.l4 {
            Some(L4::Tcp(t)) => t.checksum = Some(checksum),
            Some(L4::Udp(u)) => u.checksum = Some(checksum),
            Some(L4::Icmp(i) | L4::Icmp6(i)) => i.checksum = Some(checksum),
            Some(L4::Sctp(s)) => s.checksum = Some(u32::from(checksum)),
            _ => panic!("Packet::l4_checksum needs a TCP/UDP/SCTP/ICMP header"),
        }
        self
    }

    /// Bytes after the last header.
    pub fn payload(mut self, payload: impl AsRef<[u8]>) -> Self {
        self.payload = payload.as_ref().to_vec();
        self
    }

    // --- Building ---

    /// Serialises the frame.
    pub fn build(&self) -> Vec<u8> {
        self.build_with_layout().0
    }

    /// Serialises the frame and reports where each header was put (exactly,
    /// regardless of what the length fields claim).
    pub fn build_with_layout(&self) -> (Vec<u8>, Layout) {
        // Transport header (checksum zero for now).
        let l4_proto = self.l4.as_ref().map(L4::protocol);
        let l4_hdr = self.l4.as_ref().map(l4_header_bytes).unwrap_or_default();
        let mut l4 = l4_hdr.clone();
        l4.extend_from_slice(&self.payload);

        // Network layer.
        let mut out = Vec::with_capacity(64 + l4.len());
        let eth_type = self.eth.ethertype.unwrap_or(match &self.l3 {
            L3::None => ethertype::EXPERIMENTAL,
            L3::Ipv4(_) => ethertype::IPV4,
            L3::Ipv6(_) => ethertype::IPV6,
            L3::Arp(_) => ethertype::ARP,
        });
        out.extend_from_slice(&self.eth.dst);
        out.extend_from_slice(&self.eth.src);
        if let Some(tci) = self.eth.vlan_tci {
            out.extend_from_slice(&ethertype::VLAN.to_be_bytes());
            out.extend_from_slice(&tci.to_be_bytes());
        }
        out.extend_from_slice(&eth_type.to_be_bytes());
        let mut layout = Layout {
            eth: 0..out.len(),
            ..Layout::default()
        };

        match &self.l3 {
            L3::None => {}
            L3::Arp(a) => {
                let start = out.len();
                out.extend_from_slice(&arp_bytes(a));
                layout.l3 = Some(start..out.len());
            }
            L3::Ipv4(h) => {
                let protocol = h.protocol.or(l4_proto).unwrap_or(proto::RESERVED);
                finish_l4(&mut l4, self.l4.as_ref(), |len, p| {
                    pseudo_sum_v4(h.src, h.dst, p, len)
                });
                let start = out.len();
                out.extend_from_slice(&ipv4_header_bytes(h, protocol, l4.len()));
                layout.l3 = Some(start..out.len());
            }
            L3::Ipv6(h) => {
                let upper = h.next_header.or(l4_proto).unwrap_or(proto::IPV6_NONXT);
                finish_l4(&mut l4, self.l4.as_ref(), |len, p| {
                    pseudo_sum_v6(h.src, h.dst, p, len)
                });
                let ext_len: usize = h.ext.iter().map(|e| e.bytes.len()).sum();
                let start = out.len();
                let first_nh = h.ext.first().map_or(upper, |e| e.kind);
                let payload_len = h.payload_len.unwrap_or((ext_len + l4.len()) as u16);
                let vtf = (6u32 << 28)
                    | (u32::from(h.traffic_class) << 20)
                    | (h.flow_label & 0x000f_ffff);
                out.extend_from_slice(&vtf.to_be_bytes());
                out.extend_from_slice(&payload_len.to_be_bytes());
                out.push(first_nh);
                out.push(h.hop_limit);
                out.extend_from_slice(&h.src.octets());
                out.extend_from_slice(&h.dst.octets());
                layout.l3 = Some(start..out.len());
                for (i, e) in h.ext.iter().enumerate() {
                    let nh = e
                        .next_header
                        .unwrap_or_else(|| h.ext.get(i + 1).map_or(upper, |n| n.kind));
                    let s = out.len();
                    out.extend_from_slice(&e.bytes);
                    out[s] = nh;
                    layout.ext.push((e.kind, s..out.len()));
                }
            }
        }

        let l4_start = out.len();
        out.extend_from_slice(&l4);
        if self.l4.is_some() {
            layout.l4 = Some(l4_start..l4_start + l4_hdr.len());
        }
        layout.payload = l4_start + l4_hdr.len()..out.len();
        (out, layout)
    }
}

fn pad4(mut v: Vec<u8>) -> Vec<u8> {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

fn l4_header_bytes(l4: &L4) -> Vec<u8> {
    match l4 {
        L4::Tcp(t) => {
            let options = pad4(t.options.clone());
            let mut b = Vec::with_capacity(20 + options.len());
            b.extend_from_slice(&t.sport.to_be_bytes());
            b.extend_from_slice(&t.dport.to_be_bytes());
            b.extend_from_slice(&t.seq.to_be_bytes());
            b.extend_from_slice(&t.ack.to_be_bytes());
            let doff = t.data_offset.unwrap_or(((20 + options.len()) / 4) as u8);
            b.push((doff & 0x0f) << 4);
            b.push(t.flags);
            b.extend_from_slice(&t.window.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&t.urgent.to_be_bytes());
            b.extend_from_slice(&options);
            b
        }
        L4::Udp(u) => {
            let mut b = Vec::with_capacity(8);
            b.extend_from_slice(&u.sport.to_be_bytes());
            b.extend_from_slice(&u.dport.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0]); // length, checksum: later
            b
        }
        L4::Sctp(s) => {
            let mut b = Vec::with_capacity(12);
            b.extend_from_slice(&s.sport.to_be_bytes());
            b.extend_from_slice(&s.dport.to_be_bytes());
            b.extend_from_slice(&s.vtag.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0]);
            b
        }
        L4::Icmp(i) | L4::Icmp6(i) => {
            let mut b = vec![i.ty, i.code, 0, 0];
            b.extend_from_slice(&i.rest);
            b
        }
        L4::Raw { bytes, .. } => bytes.clone(),
    }
}

/// Fills in lengths and checksums of the L4 segment (header + payload).
/// `pseudo(len, protocol)` gives the (unfolded) pseudo-header sum.
fn finish_l4(seg: &mut [u8], l4: Option<&L4>, pseudo: impl Fn(usize, u8) -> u32) {
    let len = seg.len();
    match l4 {
        Some(L4::Tcp(t)) => {
            let c = t
                .checksum
                .unwrap_or_else(|| fold(sum16(seg, pseudo(len, proto::TCP))));
            seg[16..18].copy_from_slice(&c.to_be_bytes());
        }
        Some(L4::Udp(u)) => {
            seg[4..6].copy_from_slice(&u.length.unwrap_or(len as u16).to_be_bytes());
            let c = u.checksum.unwrap_or_else(|| {
                let c = fold(sum16(seg, pseudo(len, proto::UDP)));
                if c == 0 { 0xffff } else { c }
            });
            seg[6..8].copy_from_slice(&c.to_be_bytes());
        }
        Some(L4::Sctp(s)) => {
            let c = s.checksum.unwrap_or_else(|| crc32c(seg));
            seg[8..12].copy_from_slice(&c.to_le_bytes());
        }
        Some(L4::Icmp(i)) => {
            let c = i.checksum.unwrap_or_else(|| checksum(seg));
            seg[2..4].copy_from_slice(&c.to_be_bytes());
        }
        Some(L4::Icmp6(i)) => {
            let c = i
                .checksum
                .unwrap_or_else(|| fold(sum16(seg, pseudo(len, proto::ICMPV6))));
            seg[2..4].copy_from_slice(&c.to_be_bytes());
        }
        Some(L4::Raw { .. }) | None => {}
    }
}

fn ipv4_header_bytes(h: &Ipv4, protocol: u8, l4_len: usize) -> Vec<u8> {
    let options = pad4(h.options.clone());
    assert!(
        options.len() <= 40 || h.ihl.is_some(),
        "IPv4 options longer than 40 bytes cannot be described by IHL; set .ihl() explicitly"
    );
    let hlen = 20 + options.len();
    let ihl = h.ihl.unwrap_or((hlen / 4) as u8) & 0x0f;
    let total = h.total_len.unwrap_or((hlen + l4_len) as u16);
    let flags_frag = (u16::from(h.reserved_flag) << 15)
        | (u16::from(h.dont_fragment) << 14)
        | (u16::from(h.more_fragments) << 13)
        | (h.fragment_offset & 0x1fff);
    let mut b = Vec::with_capacity(hlen);
    b.push(0x40 | ihl);
    b.push(h.tos);
    b.extend_from_slice(&total.to_be_bytes());
    b.extend_from_slice(&h.id.to_be_bytes());
    b.extend_from_slice(&flags_frag.to_be_bytes());
    b.push(h.ttl);
    b.push(protocol);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&h.src.octets());
    b.extend_from_slice(&h.dst.octets());
    b.extend_from_slice(&options);
    let c = h.checksum.unwrap_or_else(|| checksum(&b));
    b[10..12].copy_from_slice(&c.to_be_bytes());
    b
}

fn arp_bytes(a: &Arp) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    b[2..4].copy_from_slice(&ethertype::IPV4.to_be_bytes());
    b[4] = 6;
    b[5] = 4;
    b[6..8].copy_from_slice(&a.op.to_be_bytes());
    b[8..14].copy_from_slice(&a.sha);
    b[14..18].copy_from_slice(&a.spa.octets());
    b[18..24].copy_from_slice(&a.tha);
    b[24..28].copy_from_slice(&a.tpa.octets());
    b
}

// ---------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------

/// Unfolded 16-bit one's-complement sum of `data` (big-endian words, odd
/// byte padded with zero) added to `init`.
pub fn sum16(data: &[u8], init: u32) -> u32 {
    let mut sum = u64::from(init);
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff_ffff {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// Folds a sum to 16 bits and complements it.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

/// Unfolded sum of the IPv4 pseudo-header.
pub fn pseudo_sum_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = protocol;
    p[10..12].copy_from_slice(&(len as u16).to_be_bytes());
    sum16(&p, 0)
}

/// Unfolded sum of the IPv6 pseudo-header.
pub fn pseudo_sum_v6(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, len: usize) -> u32 {
    let mut p = [0u8; 40];
    p[0..16].copy_from_slice(&src.octets());
    p[16..32].copy_from_slice(&dst.octets());
    p[32..36].copy_from_slice(&(len as u32).to_be_bytes());
    p[39] = protocol;
    sum16(&p, 0)
}

/// CRC32c (Castagnoli), as used by SCTP.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82f6_3b78 & mask);
        }
    }
    !crc
}

// ---------------------------------------------------------------------------
// Convenience constructors
// ---------------------------------------------------------------------------

/// IPv4 TCP segment (seq 0, ack 0) with the given flags.
pub fn tcp4(
    src: impl Into<Ipv4Addr>,
    sport: u16,
    dst: impl Into<Ipv4Addr>,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    Packet::new()
        .ipv4(src, dst)
        .tcp(sport, dport, flags)
        .build()
}

/// IPv4 UDP datagram without payload.
pub fn udp4(src: impl Into<Ipv4Addr>, sport: u16, dst: impl Into<Ipv4Addr>, dport: u16) -> Vec<u8> {
    Packet::new().ipv4(src, dst).udp(sport, dport).build()
}

/// IPv4 SCTP common header (vtag 0, no chunks).
pub fn sctp4(
    src: impl Into<Ipv4Addr>,
    sport: u16,
    dst: impl Into<Ipv4Addr>,
    dport: u16,
) -> Vec<u8> {
    Packet::new().ipv4(src, dst).sctp(sport, dport, 0).build()
}

/// ICMP echo request (`request`) or reply.
pub fn icmp4_echo(
    src: impl Into<Ipv4Addr>,
    dst: impl Into<Ipv4Addr>,
    id: u16,
    seq: u16,
    request: bool,
) -> Vec<u8> {
    Packet::new()
        .ipv4(src, dst)
        .icmp_echo(id, seq, request)
        .build()
}

/// IPv6 TCP segment (seq 0, ack 0) with the given flags.
pub fn tcp6(
    src: impl Into<Ipv6Addr>,
    sport: u16,
    dst: impl Into<Ipv6Addr>,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    Packet::new()
        .ipv6(src, dst)
        .tcp(sport, dport, flags)
        .build()
}

/// IPv6 UDP datagram without payload.
pub fn udp6(src: impl Into<Ipv6Addr>, sport: u16, dst: impl Into<Ipv6Addr>, dport: u16) -> Vec<u8> {
    Packet::new().ipv6(src, dst).udp(sport, dport).build()
}

/// IPv6 SCTP common header (vtag 0, no chunks).
pub fn sctp6(
    src: impl Into<Ipv6Addr>,
    sport: u16,
    dst: impl Into<Ipv6Addr>,
    dport: u16,
) -> Vec<u8> {
    Packet::new().ipv6(src, dst).sctp(sport, dport, 0).build()
}

/// ICMPv6 echo request (`request`) or reply.
pub fn icmp6_echo(
    src: impl Into<Ipv6Addr>,
    dst: impl Into<Ipv6Addr>,
    id: u16,
    seq: u16,
    request: bool,
) -> Vec<u8> {
    Packet::new()
        .ipv6(src, dst)
        .icmp_echo(id, seq, request)
        .build()
}

/// ICMP error (e.g. type 3 code 3, port unreachable) from `outer_src` to
/// `outer_dst`, quoting `inner` (an IP packet without Ethernet header, see
/// [`l3`]); rest-of-header is zero.
pub fn icmp4_error(
    outer_src: impl Into<Ipv4Addr>,
    outer_dst: impl Into<Ipv4Addr>,
    ty: u8,
    code: u8,
    inner: &[u8],
) -> Vec<u8> {
    Packet::new()
        .ipv4(outer_src, outer_dst)
        .icmp(ty, code, [0; 4])
        .payload(inner)
        .build()
}

/// ICMPv6 error (e.g. type 1 code 4, port unreachable) quoting `inner`;
/// rest-of-header is zero.
pub fn icmp6_error(
    outer_src: impl Into<Ipv6Addr>,
    outer_dst: impl Into<Ipv6Addr>,
    ty: u8,
    code: u8,
    inner: &[u8],
) -> Vec<u8> {
    Packet::new()
        .ipv6(outer_src, outer_dst)
        .icmp6(ty, code, [0; 4])
        .payload(inner)
        .build()
}

/// Broadcast ARP request "who has `target_ip`, tell `sender_ip`".
pub fn arp_request(
    sender_mac: [u8; 6],
    sender_ip: impl Into<Ipv4Addr>,
    target_ip: impl Into<Ipv4Addr>,
) -> Vec<u8> {
    Packet::new()
        .eth_src(sender_mac)
        .eth_dst(BROADCAST_MAC)
        .arp(Arp {
            op: 1,
            sha: sender_mac,
            spa: sender_ip.into(),
            tha: [0; 6],
            tpa: target_ip.into(),
        })
        .build()
}

/// Unicast ARP reply "`sender_ip` is at `sender_mac`" to the target.
pub fn arp_reply(
    sender_mac: [u8; 6],
    sender_ip: impl Into<Ipv4Addr>,
    target_mac: [u8; 6],
    target_ip: impl Into<Ipv4Addr>,
) -> Vec<u8> {
    Packet::new()
        .eth_src(sender_mac)
        .eth_dst(target_mac)
        .arp(Arp {
            op: 2,
            sha: sender_mac,
            spa: sender_ip.into(),
            tha: target_mac,
            tpa: target_ip.into(),
        })
        .build()
}

/// The frame without its Ethernet header (and VLAN tags): the L3 packet, e.g.
/// to quote inside an ICMP error. Returns an empty slice for short frames.
pub fn l3(frame: &[u8]) -> &[u8] {
    let mut off = 12;
    while off + 4 <= frame.len() {
        let et = u16::from_be_bytes([frame[off], frame[off + 1]]);
        if et == ethertype::VLAN || et == ethertype::QINQ {
            off += 4;
        } else {
            break;
        }
    }
    frame.get(off + 2..).unwrap_or(&[])
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// Finds the headers of a frame by following its length fields (Ethernet
/// with VLAN tags, IPv4, IPv6 + Hop-by-Hop/Routing/Fragment/Destination/AH
/// extension headers, ARP, TCP/UDP/SCTP/ICMP/ICMPv6). No L4 header is reported
/// for non-first fragments. Best effort for malformed frames: a range that
/// would run past the end of the frame is clipped and parsing stops.
pub fn parse_layout(frame: &[u8]) -> Layout {
    let n = frame.len();
    let clip = |r: Range<usize>| r.start.min(n)..r.end.min(n);
    let mut layout = Layout::default();

    let mut off = 12;
    let mut et = None;
    while off + 2 <= n {
        let t = u16::from_be_bytes([frame[off], frame[off + 1]]);
        if (t == ethertype::VLAN || t == ethertype::QINQ) && off + 6 <= n {
            off += 4;
        } else {
            et = Some(t);
            break;
        }
    }
    layout.eth = clip(0..off + 2);
    layout.payload = layout.eth.end..n;
    let Some(et) = et else { return layout };
    let l3_start = off + 2;

    let fits = |r: &Range<usize>| r.end <= n;
    let (mut l4_start, l4_proto, first_fragment) = match et {
        ethertype::ARP => {
            let r = l3_start..l3_start + 28;
            layout.payload = r.end.min(n)..n;
            layout.l3 = Some(clip(r));
            return layout;
        }
        ethertype::IPV4 => {
            if l3_start >= n {
                return layout;
            }
            let ihl = usize::from(frame[l3_start] & 0x0f) * 4;
            let r = l3_start..l3_start + ihl.max(20);
            layout.l3 = Some(clip(r.clone()));
            layout.payload = r.end.min(n)..n;
            if !fits(&r) {
                return layout;
            }
            let frag = u16::from_be_bytes([frame[l3_start + 6], frame[l3_start + 7]]) & 0x1fff;
            (r.end, frame[l3_start + 9], frag == 0)
        }
        ethertype::IPV6 => {
            let r = l3_start..l3_start + 40;
            layout.l3 = Some(clip(r.clone()));
            layout.payload = r.end.min(n)..n;
            if !fits(&r) {
                return layout;
            }
            let mut nh = frame[l3_start + 6];
            let mut off = r.end;
            let mut first_fragment = true;
            for _ in 0..64 {
                let len = match nh {
                    proto::HOPOPT | proto::IPV6_ROUTE | proto::IPV6_OPTS => {
                        frame.get(off + 1).map(|&l| (usize::from(l) + 1) * 8)
                    }
                    proto::IPV6_FRAG => Some(8),
                    proto::AH => frame.get(off + 1).map(|&l| (usize::from(l) + 2) * 4),
                    _ => break,
                };
                let r = off..off + len.unwrap_or(2);
                layout.ext.push((nh, clip(r.clone())));
                layout.payload = r.end.min(n)..n;
                if !fits(&r) {
                    return layout;
                }
                if nh == proto::IPV6_FRAG {
                    let fo = u16::from_be_bytes([frame[off + 2], frame[off + 3]]) >> 3;
                    first_fragment = fo == 0;
                }
                nh = frame[off];
                off = r.end;
            }
            (off, nh, first_fragment)
        }
        _ => return layout,
    };

    if !first_fragment {
        return layout;
    }
    let l4_len = match l4_proto {
        proto::TCP => match frame.get(l4_start + 12) {
            Some(&b) => usize::from(b >> 4).max(5) * 4,
            None => 20,
        },
        proto::UDP | proto::ICMP | proto::ICMPV6 => 8,
        proto::SCTP => 12,
        _ => return layout,
    };
    let r = l4_start..l4_start + l4_len;
    layout.l4 = Some(clip(r.clone()));
    l4_start = r.end.min(n);
    layout.payload = l4_start..n;
    layout
}

/// Start and end offsets of every header of `frame` (see [`parse_layout`]),
/// sorted: e.g. `[0, 14, 34, 54]` for a TCP/IPv4 SYN.
pub fn header_boundaries(frame: &[u8]) -> Vec<usize> {
    parse_layout(frame).boundaries()
}

/// Lengths worth truncating `frame` to (see [`Layout::truncation_points`]).
pub fn truncation_points(frame: &[u8]) -> Vec<usize> {
    parse_layout(frame).truncation_points(frame.len())
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const A4: [u8; 4] = [10, 0, 0, 1];
    const B4: [u8; 4] = [10, 0, 0, 2];

    fn a6() -> Ipv6Addr {
        "fd00::1".parse().unwrap()
    }
    fn b6() -> Ipv6Addr {
        "fd00::2".parse().unwrap()
    }

    /// Verifies the L4 checksum of a well-formed (non-fragmented) frame by
    /// recomputation.
    fn l4_sum_ok(frame: &[u8]) -> bool {
        let lay = parse_layout(frame);
        let l3r = lay.l3.clone().unwrap();
        let l4r = lay.l4.clone().unwrap();
        let seg = &frame[l4r.start..];
        let (pseudo, proto) = match u16::from_be_bytes([frame[12], frame[13]]) {
            ethertype::IPV4 => {
                let h = &frame[l3r.clone()];
                let p = h[9];
                let s = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
                let d = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
                (pseudo_sum_v4(s, d, p, seg.len()), p)
            }
            ethertype::IPV6 => {
                let h = &frame[l3r.clone()];
                let s = Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).unwrap());
                let d = Ipv6Addr::from(<[u8; 16]>::try_from(&h[24..40]).unwrap());
                let p = lay.ext.last().map_or(h[6], |(_, r)| frame[r.start]);
                (pseudo_sum_v6(s, d, p, seg.len()), p)
            }
            _ => unreachable!(),
        };
        match proto {
            proto::ICMP => checksum(seg) == 0,
            proto::SCTP => {
                let mut s = seg.to_vec();
                let stored = u32::from_le_bytes(s[8..12].try_into().unwrap());
                s[8..12].fill(0);
                crc32c(&s) == stored
            }
            _ => fold(sum16(seg, pseudo)) == 0,
        }
    }

    #[test]
    fn checksum_known_values() {
        // RFC 1071 example bytes.
        assert_eq!(
            sum16(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            0x2ddf0
        );
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        // The classic Wikipedia IPv4 header example (checksum 0xb861).
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
        // Odd length.
        assert_eq!(checksum(&[0xff]), 0x00ff);
        // CRC32c check value.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn ipv4_header_matches_reference() {
        // Rebuild the Wikipedia example header through the builder.
        let p = Packet::new()
            .ipv4([192, 168, 0, 1], [192, 168, 0, 199])
            .dont_fragment(true)
            .protocol(proto::UDP)
            .payload(vec![0u8; 0x73 - 20]);
        let f = p.build();
        assert_eq!(
            &f[14..34],
            &[
                0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
                0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7
            ]
        );
    }

    #[test]
    fn tcp4_syn_layout_and_checksums() {
        let f = tcp4(A4, 40000, B4, 80, SYN);
        assert_eq!(f.len(), 54);
        assert_eq!(&f[0..6], &DEFAULT_DST_MAC);
        assert_eq!(&f[6..12], &DEFAULT_SRC_MAC);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14], 0x45);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 40);
        assert_eq!(f[22], 64);
        assert_eq!(f[23], proto::TCP);
        assert_eq!(&f[26..30], &A4);
        assert_eq!(&f[30..34], &B4);
        assert_eq!(fold(sum16(&f[14..34], 0)), 0, "IPv4 header sums to 0xffff");
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 40000);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 80);
        assert_eq!(f[46], 0x50);
        assert_eq!(f[47], SYN);
        assert!(l4_sum_ok(&f));
        // Known value, summed by hand: pseudo-header (10.0.0.1, 10.0.0.2,
        // proto 6, length 20) + header words (40000, 80, 0x5002, 0xffff).
        assert_eq!(&f[50..52], &0xff4fu16.to_be_bytes());
        assert_eq!(header_boundaries(&f), vec![0, 14, 34, 54]);
    }

    #[test]
    fn udp_icmp_sctp_checksums() {
        let frames = [
            Packet::new()
                .ipv4(A4, B4)
                .udp(1, 2)
                .payload(b"hello!!")
                .build(),
            Packet::new()
                .ipv6(a6(), b6())
                .udp(1, 2)
                .payload(b"odd")
                .build(),
            Packet::new()
                .ipv4(A4, B4)
                .tcp(1, 2, ACK | PSH)
                .tcp_seq(7, 9)
                .payload(b"xyz")
                .build(),
            Packet::new()
                .ipv6(a6(), b6())
                .tcp(1, 2, SYN)
                .tcp_options([2, 4, 5, 0xb4])
                .build(),
            icmp4_echo(A4, B4, 0x1234, 7, true),
            icmp6_echo(a6(), b6(), 0x1234, 7, false),
            sctp4(A4, 1, B4, 2),
            Packet::new()
                .ipv6(a6(), b6())
                .sctp(5, 6, 0xdead_beef)
                .payload([1, 0, 0, 4])
                .build(),
        ];
        for f in &frames {
            assert!(l4_sum_ok(f), "bad L4 checksum in {f:02x?}");
        }
        // ICMP echo fields.
        let e = &frames[4];
        assert_eq!(&e[34..42], &[8, 0, e[36], e[37], 0x12, 0x34, 0, 7]);
        let e6 = &frames[5];
        assert_eq!(e6[54], icmp6::ECHO_REPLY);
        // UDP length field.
        assert_eq!(u16::from_be_bytes([frames[0][38], frames[0][39]]), 15);
        // A UDP checksum that computes to 0 is sent as 0xffff: never 0.
        for f in &frames[..2] {
            assert_ne!(u16::from_be_bytes([f[f.len() - 3], f[f.len() - 2]]), 0);
        }
    }

    #[test]
    fn ipv4_options_fragments_and_overrides() {
        let f = Packet::new()
            .ipv4(A4, B4)
            .ipv4_options([148, 4, 0, 0, 1]) // router alert + NOP, padded to 8
            .ip_id(0xabcd)
            .fragment(185, true)
            .protocol(proto::UDP)
            .payload([0u8; 16])
            .build();
        assert_eq!(f[14], 0x47);
        assert_eq!(&f[34..42], &[148, 4, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&f[18..20], &[0xab, 0xcd]);
        assert_eq!(u16::from_be_bytes([f[20], f[21]]), 0x2000 | 185);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 28 + 16);
        assert_eq!(fold(sum16(&f[14..42], 0)), 0);
        // Non-first fragment: no L4 header reported.
        assert_eq!(header_boundaries(&f), vec![0, 14, 42]);

        let df = Packet::new()
            .ipv4(A4, B4)
            .dont_fragment(true)
            .udp(1, 2)
            .build();
        assert_eq!(df[20], 0x40);

        let bogus = Packet::new()
            .ipv4(A4, B4)
            .ihl(3)
            .total_len(9999)
            .udp(1, 2)
            .build();
        assert_eq!(bogus[14], 0x43);
        assert_eq!(&bogus[16..18], &9999u16.to_be_bytes());
        assert_eq!(
            fold(sum16(&bogus[14..34], 0)),
            0,
            "checksum covers the bogus fields"
        );
        assert!(l4_sum_ok(
            &Packet::new().ipv4(A4, B4).total_len(9999).udp(1, 2).build()
        ));
        assert_eq!(bogus.len(), 42);

        let badsum = Packet::new()
            .ipv4(A4, B4)
            .ip_checksum(0x1234)
            .udp(1, 2)
            .build();
        assert_eq!(&badsum[24..26], &[0x12, 0x34]);
    }

    #[test]
    fn ipv6_extension_chain() {
        let (f, lay) = Packet::new()
            .ipv6(a6(), b6())
            .ext(ExtHeader::hop_by_hop(0))
            .ext(ExtHeader::routing(2, 4, 0))
            .ext(ExtHeader::dest_opts(1))
            .ext(ExtHeader::fragment(0x01020304, 0, false))
            .ext(ExtHeader::ah(7, 8, 12))
            .tcp(1000, 443, SYN)
            .payload(b"data")
            .build_with_layout();
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[14] >> 4, 6);
        let ext_len = 8 + 24 + 16 + 8 + 24;
        assert_eq!(
            u16::from_be_bytes([f[18], f[19]]) as usize,
            ext_len + 20 + 4
        );
        assert_eq!(f[20], proto::HOPOPT);
        assert_eq!(f[21], 64);
        // Chain: HBH -> Routing -> DestOpts -> Frag -> AH -> TCP.
        let kinds: Vec<u8> = lay.ext.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                proto::HOPOPT,
                proto::IPV6_ROUTE,
                proto::IPV6_OPTS,
                proto::IPV6_FRAG,
                proto::AH
            ]
        );
        let nhs: Vec<u8> = lay.ext.iter().map(|(_, r)| f[r.start]).collect();
        assert_eq!(
            nhs,
            [
                proto::IPV6_ROUTE,
                proto::IPV6_OPTS,
                proto::IPV6_FRAG,
                proto::AH,
                proto::TCP
            ]
        );
        // Length fields.
        let r = &lay.ext[1].1;
        assert_eq!((f[r.start + 1], f[r.start + 2], f[r.start + 3]), (2, 4, 0));
        assert_eq!(f[lay.ext[2].1.start + 1], 1);
        let fr = &lay.ext[3].1;
        assert_eq!(&f[fr.start + 2..fr.end], &[0, 0, 1, 2, 3, 4]);
        assert_eq!(f[lay.ext[4].1.start + 1], 4); // AH: 24 bytes / 4 - 2
        // PadN in the options headers.
        assert_eq!(&f[lay.ext[0].1.clone()][2..4], &[1, 4]);
        assert_eq!(&f[lay.ext[2].1.clone()][2..4], &[OPT_EXPERIMENTAL, 12]);
        // Longer headers: experimental options, then at most 7 padding bytes.
        for len8 in [1u8, 2, 31, 32, 100, 255] {
            let h = ExtHeader::dest_opts(len8).bytes;
            assert_eq!(h.len(), (usize::from(len8) + 1) * 8);
            let (mut off, mut pad) = (2, 0);
            while off < h.len() {
                let (ty, step) = if h[off] == 0 {
                    (0, 1)
                } else {
                    (h[off], 2 + usize::from(h[off + 1]))
                };
                pad = if ty <= 1 { pad + step } else { 0 };
                assert!(pad <= 7, "len8 {len8}: {pad} padding bytes");
                off += step;
            }
            assert_eq!(off, h.len(), "len8 {len8}: options exactly fill the header");
        }
        assert!(l4_sum_ok(&f));
        // The parser agrees with the builder.
        assert_eq!(parse_layout(&f), lay);
        assert_eq!(
            lay.boundaries(),
            vec![0, 14, 54, 62, 86, 102, 110, 134, 154]
        );
        assert_eq!(lay.payload, 154..158);
    }

    #[test]
    fn ipv6_fragment_and_bogus_chains() {
        let f = Packet::new()
            .ipv6(a6(), b6())
            .ext(ExtHeader::fragment(9, 100, true))
            .protocol(proto::UDP)
            .payload([0u8; 8])
            .build();
        let fr = 54..62;
        assert_eq!(f[fr.start], proto::UDP);
        assert_eq!(u16::from_be_bytes([f[56], f[57]]), (100 << 3) | 1);
        assert_eq!(
            header_boundaries(&f),
            vec![0, 14, 54, 62],
            "non-first fragment: no L4"
        );

        // A long chain of options headers.
        let chain = Packet::new()
            .ipv6(a6(), b6())
            .exts((0..10).map(|i| {
                if i % 2 == 0 {
                    ExtHeader::hop_by_hop(0)
                } else {
                    ExtHeader::dest_opts(0)
                }
            }))
            .udp(1, 2)
            .build();
        assert_eq!(parse_layout(&chain).ext.len(), 10);
        assert!(l4_sum_ok(&chain));

        // A header claiming to run past the end of the packet.
        let past = Packet::new()
            .ipv6(a6(), b6())
            .ext(ExtHeader::dest_opts(0).with_len_field(200))
            .udp(1, 2)
            .build();
        let lay = parse_layout(&past);
        assert_eq!(lay.ext, vec![(proto::IPV6_OPTS, 54..past.len())]);
        assert_eq!(lay.l4, None);

        // Arbitrary next header and a self-loop via overrides.
        let nh = Packet::new()
            .ipv6(a6(), b6())
            .next_header(253)
            .payload([1, 2, 3])
            .build();
        assert_eq!(nh[20], 253);
        let lp = Packet::new()
            .ipv6(a6(), b6())
            .ext(ExtHeader::dest_opts(0).with_next_header(proto::IPV6_OPTS))
            .udp(1, 2)
            .build();
        assert_eq!(lp[54], proto::IPV6_OPTS);
        let nonxt = Packet::new().ipv6(a6(), b6()).build();
        assert_eq!(nonxt[20], proto::IPV6_NONXT);
        assert_eq!(nonxt.len(), 54);
    }

    #[test]
    fn icmp_errors_quote_inner_packets() {
        let inner = udp4(B4, 53, A4, 40000);
        let e = icmp4_error([10, 0, 0, 254], A4, icmp::DEST_UNREACH, 3, l3(&inner));
        assert_eq!(l3(&inner).len(), 28);
        assert_eq!(&e[34..36], &[3, 3]);
        assert_eq!(&e[42..], l3(&inner));
        assert!(l4_sum_ok(&e));

        let inner6 = tcp6(b6(), 80, a6(), 40000, SYN | ACK);
        let e6 = icmp6_error(b6(), a6(), icmp6::DEST_UNREACH, 4, l3(&inner6));
        assert_eq!(&e6[54..56], &[1, 4]);
        assert_eq!(&e6[62..], l3(&inner6));
        assert!(l4_sum_ok(&e6));
        assert_eq!(header_boundaries(&e6), vec![0, 14, 54, 62]);
    }

    #[test]
    fn arp_vlan_and_raw_ethertype() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        let a = arp_request(mac, [10, 0, 0, 1], [10, 0, 0, 2]);
        assert_eq!(a.len(), 42);
        assert_eq!(&a[0..6], &BROADCAST_MAC);
        assert_eq!(&a[12..14], &[0x08, 0x06]);
        assert_eq!(&a[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&a[22..28], &mac);
        assert_eq!(&a[28..32], &[10, 0, 0, 1]);
        assert_eq!(&a[32..38], &[0; 6]);
        assert_eq!(&a[38..42], &[10, 0, 0, 2]);
        assert_eq!(header_boundaries(&a), vec![0, 14, 42]);
        let r = arp_reply(mac, [10, 0, 0, 1], [2; 6], [10, 0, 0, 2]);
        assert_eq!(&r[20..22], &[0, 2]);

        let raw = Packet::new().ethertype(0x88cc).payload([1, 2, 3]).build();
        assert_eq!(
            raw,
            [
                &DEFAULT_DST_MAC[..],
                &DEFAULT_SRC_MAC,
                &[0x88, 0xcc, 1, 2, 3]
            ]
            .concat()
        );
        assert_eq!(header_boundaries(&raw), vec![0, 14]);

        let v = Packet::new().vlan(100).ipv4(A4, B4).udp(1, 2).build();
        assert_eq!(&v[12..18], &[0x81, 0x00, 0x00, 100, 0x08, 0x00]);
        assert_eq!(header_boundaries(&v), vec![0, 18, 38, 46]);
        assert_eq!(l3(&v).len(), 28);

        let other = Packet::new()
            .ipv4(A4, B4)
            .raw_l4(proto::GRE, [0, 0, 0x08, 0])
            .payload([9])
            .build();
        assert_eq!(other[23], proto::GRE);
        assert_eq!(&other[34..], &[0, 0, 8, 0, 9]);
    }

    #[test]
    fn truncation_points_cover_headers() {
        let f = tcp4(A4, 1, B4, 2, SYN);
        assert_eq!(
            truncation_points(&f),
            vec![0, 1, 7, 13, 14, 15, 24, 33, 34, 35, 44, 53]
        );
        for n in truncation_points(&f) {
            // Parsing any truncation never panics.
            let _ = parse_layout(&f[..n]);
        }
        let f6 = Packet::new()
            .ipv6(a6(), b6())
            .ext(ExtHeader::hop_by_hop(3))
            .udp(1, 2)
            .build();
        for n in 0..f6.len() {
            let lay = parse_layout(&f6[..n]);
            assert!(lay.boundaries().iter().all(|&b| b <= n));
        }
    }

    #[test]
    fn ip_generic_and_addr_types() {
        let a: IpAddr = Ipv4Addr::from(A4).into();
        let b: IpAddr = Ipv4Addr::from(B4).into();
        assert_eq!(Packet::new().ip(a, b).udp(1, 2).build(), udp4(A4, 1, B4, 2));
        let x: [u8; 16] = a6().octets();
        assert_eq!(
            tcp6(x, 1, b6(), 2, RST),
            tcp6(a6(), 1, b6().octets(), 2, RST)
        );
    }
}
