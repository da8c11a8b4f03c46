//! Connection tracking: one entry per (endpoint, connection), keyed so both
//! directions find it with a single lookup.

use aya_ebpf::helpers::bpf_jiffies64;
use policy_common::{Config, CtEntry, CtKey, Direction, ct_flags, ct_state, ct_timeout, proto};

use crate::{
    addr,
    maps::EPOCHS,
    parse::{Segment, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple},
};

/// The key of `tuple` crossing pod interface `ifindex` in `direction`.
#[inline(always)]
pub fn key_for(ifindex: u32, tuple: &Tuple, direction: Direction) -> CtKey {
    let (local, peer, local_port, peer_port) = match direction {
        Direction::Egress => (&tuple.src, &tuple.dst, tuple.sport, tuple.dport),
        Direction::Ingress => (&tuple.dst, &tuple.src, tuple.dport, tuple.sport),
    };
    let mut key = CtKey {
        ifindex,
        local_addr: [0; 16],
        peer_addr: [0; 16],
        local_port,
        peer_port,
        protocol: tuple.protocol,
        _pad: [0; 3],
    };
    addr::copy(&mut key.local_addr, local);
    addr::copy(&mut key.peer_addr, peer);
    key
}

/// The current policy epoch of an endpoint, 0 when it is gone.
#[inline(always)]
pub fn current_epoch(endpoint_id: u32) -> u32 {
    match EPOCHS.get(endpoint_id) {
        Some(epoch) => *epoch,
        None => 0,
    }
}

/// The destination port of the packet that opened the connection.
#[inline(always)]
pub fn opening_dport(key: &CtKey, origin: u8) -> u16 {
    if origin == Direction::Egress as u8 {
        key.peer_port
    } else {
        key.local_port
    }
}

/// Now, in jiffies, and the jiffies in a second.
#[derive(Clone, Copy)]
pub struct Clock {
    pub now: u64,
    pub hz: u64,
}

impl Clock {
    #[inline(always)]
    pub fn read(config: Option<&Config>) -> Self {
        let hz = match config {
            Some(config) if config.hz != 0 => config.hz,
            _ => Config::FALLBACK_HZ,
        };
        Clock {
            now: unsafe { bpf_jiffies64() },
            hz,
        }
    }

    /// Whether more than `seconds` passed since `then`.
    #[inline(always)]
    fn older_than(&self, then: u64, seconds: u64) -> bool {
        self.now.wrapping_sub(then) > seconds * self.hz
    }

    /// Like `older_than`, for the low 32 bits of a jiffies value.
    #[inline(always)]
    pub fn older_than32(&self, then: u32, seconds: u64) -> bool {
        (self.now as u32).wrapping_sub(then) > (seconds * self.hz) as u32
    }
}

#[inline(always)]
pub fn is_expired(entry: &CtEntry, protocol: u8, clock: &Clock) -> bool {
    let timeout = match protocol {
        proto::TCP => {
            if entry.state == ct_state::CLOSING {
                ct_timeout::TCP_CLOSING
            } else if entry.flags & ct_flags::SEEN_REPLY == 0 {
                ct_timeout::TCP_SYN
            } else {
                ct_timeout::TCP_ESTABLISHED
            }
        }
        proto::UDP => ct_timeout::UDP,
        _ => ct_timeout::OTHER,
    };
    clock.older_than(entry.last_seen, timeout)
}

/// A TCP segment that opens a connection: SYN without ACK.
#[inline(always)]
pub fn is_tcp_open(protocol: u8, flags: u8) -> bool {
    protocol == proto::TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// What a passing packet of an open connection does to its entry.
pub enum Update {
    /// At most the reply flag and the refresh time changed.
    Keep,
    /// FIN: the connection is closing (flow cache slots must go).
    Closing,
    /// RST, or the ACK of the last unacknowledged FIN: the connection is
    /// over; the entry goes after this packet passes.
    Remove,
}

/// Records reply, FIN and refresh time for a packet of an open connection.
/// Writes only when something changed, to keep established packets from
/// dirtying the shared entry.
///
/// A connection closed by FINs leaves conntrack as soon as both FINs are
/// acknowledged (by sequence number, so simultaneous closes and ACKs of
/// earlier data are told apart), not after a timeout: closed connections
/// would otherwise fill the LRU map, and every insert of a new connection
/// pays for walking its lists. A FIN retransmitted after that (its ACK was
/// lost beyond this hook) is judged like any packet without an entry.
#[inline(always)]
pub fn track(
    entry: &mut CtEntry,
    direction: Direction,
    protocol: u8,
    tcp_flags: u8,
    segment: impl FnOnce() -> Option<Segment>,
    clock: &Clock,
) -> Update {
    let from_origin = entry.origin == direction as u8;
    let mut update = Update::Keep;
    let mut flags = entry.flags;
    if !from_origin {
        flags |= ct_flags::SEEN_REPLY;
    }
    if protocol == proto::TCP {
        if tcp_flags & TCP_RST != 0 {
            return Update::Remove;
        }
        // This side, and the side whose FIN this packet may acknowledge.
        let (side, fin_from, other, other_fin_from, other_fin_acked) = if from_origin {
            (
                0,
                ct_flags::FIN_FROM_ORIGIN,
                1,
                ct_flags::FIN_FROM_REPLY,
                ct_flags::FIN_ACKED_REPLY,
            )
        } else {
            (
                1,
                ct_flags::FIN_FROM_REPLY,
                0,
                ct_flags::FIN_FROM_ORIGIN,
                ct_flags::FIN_ACKED_ORIGIN,
            )
        };
        let fin = tcp_flags & TCP_FIN != 0;
        let may_ack_fin = tcp_flags & TCP_ACK != 0 && flags & other_fin_from != 0;
        if fin || may_ack_fin {
            // Unreadable only if the header the parser read is gone: then
            // nothing is recorded, and the connection ends by timeout.
            let Some(segment) = segment() else {
                return Update::Closing;
            };
            if fin {
                update = Update::Closing;
                flags |= fin_from;
                entry.fin_ack[side] = segment.seq.wrapping_add(segment.payload).wrapping_add(1);
                if flags & BOTH_FINS == BOTH_FINS {
                    entry.state = ct_state::CLOSING;
                }
            }
            if may_ack_fin && segment.ack.wrapping_sub(entry.fin_ack[other]) as i32 >= 0 {
                flags |= other_fin_acked;
                if flags & BOTH_FINS_ACKED == BOTH_FINS_ACKED {
                    return Update::Remove;
                }
            }
        }
    }
    if flags != entry.flags {
        entry.flags = flags;
    }
    if clock.older_than(entry.last_seen, ct_timeout::REFRESH) {
        entry.last_seen = clock.now;
    }
    update
}

const BOTH_FINS: u8 = ct_flags::FIN_FROM_ORIGIN | ct_flags::FIN_FROM_REPLY;
const BOTH_FINS_ACKED: u8 = ct_flags::FIN_ACKED_ORIGIN | ct_flags::FIN_ACKED_REPLY;
