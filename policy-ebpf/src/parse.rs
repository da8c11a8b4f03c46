//! Header parsing with direct packet access.
//!
//! The parser reads only what the verdict needs: addresses, protocol, ports,
//! TCP flags, ICMP type, fragment position, and for ICMP errors the tuple of the
//! packet they quote. Anything truncated or inconsistent is `Malformed`: the
//! caller drops it, so a header the classifier cannot read never passes.
//!
//! Headers outside the skb's linear area are copied out with
//! `bpf_skb_load_bytes`, never pulled in: pulling a cloned skb (every TCP
//! segment that carries data is a clone, the original waits for its ACK)
//! reallocates and copies its head, which costs more than the whole verdict.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use policy_common::{Addr, proto};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;

/// IPv6 extension headers walked before giving up on the packet.
pub const MAX_IPV6_EXT_HEADERS: u32 = 8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where a packet sits in a fragmented datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    None,
    /// Offset 0 with more fragments to come: carries the L4 header.
    First { id: u32 },
    /// Offset > 0: no L4 header; `last` when no more fragments follow.
    Later { id: u32, last: bool },
}

/// What an ICMP message means for connection tracking.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IcmpKind {
    NotIcmp,
    EchoRequest,
    EchoReply,
    /// Destination unreachable, time exceeded, parameter problem, packet too
    /// big: the quoted packet's tuple is in [`Packet::inner`].
    Error,
    Other,
}

/// The tuple of a packet, ports in host order. Aligned so addresses can be
/// written as whole words.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

/// What conntrack follows of a TCP segment to see a connection end.
#[derive(Clone, Copy)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    /// Bytes of data after the TCP header.
    pub payload: u32,
}

#[repr(C)]
pub struct Packet {
    pub tuple: Tuple,
    /// TCP only: where the header starts and the bytes from there to the end
    /// of the IP payload ([`tcp_segment`] reads the rest when needed).
    pub l4: u16,
    pub l4_len: u16,
    pub inner: Tuple,
    pub family: u8,
    /// TCP flags, or the ICMP type.
    pub flags_or_type: u8,
    pub icmp: IcmpKind,
    pub fragment: Fragment,
    /// `inner` holds the packet an [`IcmpKind::Error`] quotes, as it was sent.
    pub has_inner: bool,
}

pub enum Parsed {
    /// `Packet` was filled in.
    Ip,
    /// ARP, IPv6 neighbour discovery and MLD: link-local control.
    Control,
    Malformed,
    UnsupportedL3,
    Ipv6ExtChain,
}

impl Tuple {
    /// Stores IPv4 addresses in their IPv4-mapped form, a word at a time.
    #[inline(always)]
    fn set_v4(&mut self, src: [u8; 4], dst: [u8; 4]) {
        let mapped = |a: [u8; 4]| u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]);
        // SAFETY: `Tuple` is 8-aligned with `src` at 0 and `dst` at 16.
        unsafe {
            let words = (self as *mut Tuple).cast::<u64>();
            words.write(0);
            words.add(1).write(mapped(src));
            words.add(2).write(0);
            words.add(3).write(mapped(dst));
        }
    }
}

/// Reads headers at offsets the verifier can follow (constants): direct
/// packet access. Offsets that depend on packet contents go through
/// [`Loaded`], because LLVM rewrites a variable-offset bounds check into a form
/// the verifier cannot use.
trait Bytes {
    fn get<T: Copy>(&self, offset: usize) -> Option<T>;
}

struct Direct<'a>(&'a TcContext);
struct Loaded<'a>(&'a TcContext);

impl Bytes for Direct<'_> {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: usize) -> Option<T> {
        match ptr_at::<T>(self.0, offset) {
            Some(p) => Some(unsafe { p.read_unaligned() }),
            // Beyond the linear area (or beyond the packet: then this fails too).
            None => self.0.load::<T>(offset).ok(),
        }
    }
}

impl Bytes for Loaded<'_> {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: usize) -> Option<T> {
        self.0.load::<T>(offset).ok()
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn parse(ctx: &TcContext, packet: &mut Packet) -> Parsed {
    const ETHER_TYPE: usize = EthHdr::LEN - 2;
    let Some(ether_type) = Direct(ctx).get::<[u8; 2]>(ETHER_TYPE) else {
        return Parsed::Malformed;
    };
    match u16::from_be_bytes(ether_type) {
        ETH_P_IP => parse_ipv4(ctx, EthHdr::LEN, packet),
        ETH_P_IPV6 => parse_ipv6(ctx, EthHdr::LEN, packet),
        ETH_P_ARP => Parsed::Control,
        _ => Parsed::UnsupportedL3,
    }
}

/// The fields of an IPv4 header the parser uses.
struct Ipv4Fields {
    vihl: u8,
    tot_len: u16,
    id: u16,
    frags: u16,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
}

impl Ipv4Fields {
    /// Read in place when the linear area holds the header (only these
    /// fields are loaded), else from a copy.
    #[inline(always)]
    fn read(ctx: &TcContext, off: usize) -> Option<Self> {
        match ptr_at::<Ipv4Hdr>(ctx, off) {
            Some(ip) => Some(Self::of(unsafe { &*ip })),
            None => ctx.load::<Ipv4Hdr>(off).ok().map(|ip| Self::of(&ip)),
        }
    }

    #[inline(always)]
    fn of(ip: &Ipv4Hdr) -> Self {
        Ipv4Fields {
            vihl: ip.vihl,
            tot_len: u16::from_be_bytes(ip.tot_len),
            id: u16::from_be_bytes(ip.id),
            frags: u16::from_be_bytes(ip.frags),
            proto: ip.proto,
            src: ip.src_addr,
            dst: ip.dst_addr,
        }
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, off: usize, packet: &mut Packet) -> Parsed {
    let Some(ip) = Ipv4Fields::read(ctx, off) else {
        return Parsed::Malformed;
    };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let total_len = ip.tot_len as usize;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || total_len < ihl {
        return Parsed::Malformed;
    }
    let frags = ip.frags;
    let more = frags & 0x2000 != 0;
    let offset = frags & 0x1fff;
    let id = u32::from(ip.id);
    packet.fragment = if offset != 0 {
        Fragment::Later { id, last: !more }
    } else if more {
        Fragment::First { id }
    } else {
        Fragment::None
    };
    packet.family = 4;
    packet.tuple.set_v4(ip.src, ip.dst);
    packet.tuple.protocol = ip.proto;
    let l4_len = (total_len - ihl) as u32;
    if ihl == Ipv4Hdr::LEN {
        finish_l4(
            ctx,
            &Direct(ctx),
            EthHdr::LEN + Ipv4Hdr::LEN,
            l4_len,
            packet,
        )
    } else {
        finish_l4(ctx, &Loaded(ctx), off + ihl, l4_len, packet)
    }
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, off: usize, packet: &mut Packet) -> Parsed {
    // Version, flow label, payload length, next header, hop limit; then the
    // addresses, read straight into the tuple.
    let Some(fixed) = Direct(ctx).get::<[u8; 8]>(off) else {
        return Parsed::Malformed;
    };
    if fixed[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let (Some(src), Some(dst)) = (
        Direct(ctx).get::<Addr>(off + 8),
        Direct(ctx).get::<Addr>(off + 24),
    ) else {
        return Parsed::Malformed;
    };
    let mut next = fixed[6];
    let mut l4 = off + Ipv6Hdr::LEN;
    packet.fragment = Fragment::None;
    packet.family = 6;
    packet.tuple.src = src;
    packet.tuple.dst = dst;

    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some([nh, len]) = Loaded(ctx).get::<[u8; 2]>(l4) else {
                    return Parsed::Malformed;
                };
                next = nh;
                l4 += (len as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let Some([nh, len]) = Loaded(ctx).get::<[u8; 2]>(l4) else {
                    return Parsed::Malformed;
                };
                next = nh;
                l4 += (len as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(hdr) = Loaded(ctx).get::<[u8; 8]>(l4) else {
                    return Parsed::Malformed;
                };
                next = hdr[0];
                let offset_flags = u16::from_be_bytes([hdr[2], hdr[3]]);
                let id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                let more = offset_flags & 1 != 0;
                packet.fragment = if offset_flags >> 3 != 0 {
                    Fragment::Later { id, last: !more }
                } else if more {
                    Fragment::First { id }
                } else {
                    Fragment::None
                };
                l4 += 8;
                if let Fragment::Later { .. } = packet.fragment {
                    break;
                }
            }
            _ => break,
        }
        if l4 > ctx.len() as usize {
            return Parsed::Malformed;
        }
        // Bounds the offset for the verifier; no sane chain is this long.
        if l4 > 1024 {
            return Parsed::Ipv6ExtChain;
        }
        walked += 1;
    }
    if walked == MAX_IPV6_EXT_HEADERS
        && matches!(
            next,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
        )
    {
        return Parsed::Ipv6ExtChain;
    }
    packet.tuple.protocol = next;
    let payload_len = u32::from(u16::from_be_bytes([fixed[4], fixed[5]]));
    let l4_len = payload_len.saturating_sub((l4 - off - Ipv6Hdr::LEN) as u32);
    if walked == 0 {
        finish_l4(
            ctx,
            &Direct(ctx),
            EthHdr::LEN + Ipv6Hdr::LEN,
            l4_len,
            packet,
        )
    } else {
        finish_l4(ctx, &Loaded(ctx), l4, l4_len, packet)
    }
}

/// Reads ports, flags and ICMP details at `l4`, where `l4_len` bytes of the
/// IP payload start.
#[inline(always)]
fn finish_l4(
    ctx: &TcContext,
    bytes: &impl Bytes,
    l4: usize,
    l4_len: u32,
    packet: &mut Packet,
) -> Parsed {
    packet.tuple.sport = 0;
    packet.tuple.dport = 0;
    packet.flags_or_type = 0;
    packet.icmp = IcmpKind::NotIcmp;
    packet.has_inner = false;
    if let Fragment::Later { .. } = packet.fragment {
        // No L4 header: ports come from the first fragment's state.
        return Parsed::Ip;
    }
    match packet.tuple.protocol {
        proto::TCP => {
            // The fixed header: ports, and flags at byte 13.
            let Some(hdr) = bytes.get::<[u8; 20]>(l4) else {
                return Parsed::Malformed;
            };
            packet.tuple.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            packet.tuple.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
            packet.flags_or_type = hdr[13];
            packet.l4 = l4 as u16;
            packet.l4_len = l4_len as u16;
        }
        proto::UDP => {
            let Some(hdr) = bytes.get::<[u8; 8]>(l4) else {
                return Parsed::Malformed;
            };
            packet.tuple.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            packet.tuple.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
        }
        proto::SCTP => {
            // The common header: ports, verification tag, checksum.
            let Some(hdr) = bytes.get::<[u8; 12]>(l4) else {
                return Parsed::Malformed;
            };
            packet.tuple.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            packet.tuple.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
        }
        proto::ICMP | proto::ICMPV6 => {
            let Some(hdr) = bytes.get::<[u8; 8]>(l4) else {
                return Parsed::Malformed;
            };
            let Some(kind) = icmp_kind(packet.tuple.protocol, hdr[0]) else {
                return Parsed::Control;
            };
            packet.flags_or_type = hdr[0];
            let echo_id = u16::from_be_bytes([hdr[4], hdr[5]]);
            match kind {
                IcmpKind::EchoRequest => packet.tuple.sport = echo_id,
                IcmpKind::EchoReply => packet.tuple.dport = echo_id,
                IcmpKind::Error => {
                    packet.has_inner = quoted_tuple(ctx, packet.family, l4 + 8, &mut packet.inner)
                }
                _ => {}
            }
            packet.icmp = kind;
        }
        _ => {}
    }
    Parsed::Ip
}

/// Sequence and acknowledgment numbers and payload length of the TCP segment
/// `packet` was parsed from. Read only when conntrack needs them (a FIN, or
/// an ACK while a FIN is unacknowledged), to keep them off the path of every
/// other segment.
#[inline(always)]
pub fn tcp_segment(ctx: &TcContext, packet: &Packet) -> Option<Segment> {
    let b = Loaded(ctx).get::<[u8; 9]>(usize::from(packet.l4) + 4)?;
    let header_len = u16::from(b[8] >> 4) * 4;
    Some(Segment {
        seq: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        ack: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        payload: u32::from(packet.l4_len.saturating_sub(header_len)),
    })
}

/// `None` for link-local control messages, which always pass.
#[inline(always)]
fn icmp_kind(protocol: u8, icmp_type: u8) -> Option<IcmpKind> {
    let kind = if protocol == proto::ICMP {
        match icmp_type {
            8 => IcmpKind::EchoRequest,
            0 => IcmpKind::EchoReply,
            3 | 11 | 12 => IcmpKind::Error,
            _ => IcmpKind::Other,
        }
    } else {
        match icmp_type {
            128 => IcmpKind::EchoRequest,
            129 => IcmpKind::EchoReply,
            1..=4 => IcmpKind::Error,
            // MLD (130-132, 143) and neighbour discovery (133-137).
            130..=137 | 143 => return None,
            _ => IcmpKind::Other,
        }
    };
    Some(kind)
}

/// The tuple of the packet an ICMP error quotes: its IP header (no IPv6
/// extension headers) and the first 8 bytes of its transport header.
#[inline(always)]
fn quoted_tuple(ctx: &TcContext, family: u8, off: usize, tuple: &mut Tuple) -> bool {
    let bytes = Loaded(ctx);
    let l4 = if family == 4 {
        let Some(ip) = bytes.get::<Ipv4Hdr>(off) else {
            return false;
        };
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < Ipv4Hdr::LEN {
            return false;
        }
        tuple.set_v4(ip.src_addr, ip.dst_addr);
        tuple.protocol = ip.proto;
        off + ihl
    } else {
        let Some(ip) = bytes.get::<Ipv6Hdr>(off) else {
            return false;
        };
        tuple.src = ip.src_addr;
        tuple.dst = ip.dst_addr;
        tuple.protocol = ip.next_hdr;
        off + Ipv6Hdr::LEN
    };
    let Some(hdr) = bytes.get::<[u8; 8]>(l4) else {
        return false;
    };
    tuple.sport = 0;
    tuple.dport = 0;
    match tuple.protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            tuple.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
            tuple.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
        }
        proto::ICMP | proto::ICMPV6 => {
            // Only an echo request opens a tracked ICMP flow.
            let request = if tuple.protocol == proto::ICMP {
                8
            } else {
                128
            };
            if hdr[0] != request {
                return false;
            }
            tuple.sport = u16::from_be_bytes([hdr[4], hdr[5]]);
        }
        _ => {}
    }
    true
}
