//! The per-packet path.
//!
//! Fast path: a packet of an established flow costs array lookups only (flow
//! cache slot and version, epoch, counter); on a cache miss, a tracked
//! connection whose endpoint's policy has not changed costs one hash lookup
//! (conntrack) more, and fills the cache. Everything else takes the slow
//! path: endpoint, anti-spoofing, fragments, related ICMP, re-judging,
//! policy, then one exit that counts, reports and returns the action.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use policy_common::{
    Addr, CtEntry, CtKey, Direction, EndpointInfo, EndpointKey, FlowEvent, FragEntry, FragKey,
    PeerInfo, Reason, Verdict, ct_state, identity, proto,
};

use crate::{
    addr,
    conntrack::{
        Clock, Update, current_epoch, is_expired, is_tcp_open, key_for, opening_dport, track,
    },
    flow_cache::{self, Probe},
    maps::{CONFIG, CONNTRACK, ENDPOINTS, FRAGMENTS, SCRATCH, Scratch},
    parse::{Fragment, IcmpKind, Packet, Parsed, Segment, Tuple, parse, tcp_segment},
    policy::{judge, resolve_peer},
    report::{EventInfo, count, emit},
};

/// Pass, letting the next TCX program or the stack have the packet.
pub const PASS: i32 = TC_ACT_UNSPEC;
pub const DROP: i32 = TC_ACT_SHOT;

struct Outcome {
    reason: Reason,
    rule_id: u32,
    peer: PeerInfo,
    /// A new-connection verdict: goes to the flow log. Drops always do.
    report: bool,
}

impl Outcome {
    #[inline(always)]
    const fn dropped(reason: Reason) -> Self {
        Outcome {
            reason,
            rule_id: 0,
            peer: PeerInfo {
                identity: 0,
                cidr_identity: 0,
            },
            report: true,
        }
    }

    #[inline(always)]
    const fn quiet(reason: Reason, rule_id: u32, peer_identity: u32) -> Self {
        Outcome {
            reason,
            rule_id,
            peer: PeerInfo {
                identity: peer_identity,
                cidr_identity: 0,
            },
            report: false,
        }
    }
}

#[inline(always)]
pub fn classify(ctx: &TcContext, direction: Direction) -> i32 {
    let len = ctx.len();
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return DROP;
    };
    let Scratch { packet, event } = unsafe { &mut *scratch };
    let parsed = parse(ctx, packet);

    let config = CONFIG.get(0);
    let clock = Clock::read(config);
    let generation = match config {
        Some(config) => config.generation,
        None => 0,
    };
    let mut tracked = None;
    if let Parsed::Ip = parsed
        && !matches!(packet.fragment, Fragment::Later { .. })
        && packet.icmp != IcmpKind::Error
        && !is_tcp_open(packet.tuple.protocol, packet.flags_or_type)
    {
        let key = key_for(ifindex, &packet.tuple, direction);
        // SYN-ACKs, FINs and RSTs neither use the cache nor fill it: they
        // skip the version read too (cold for a young flow).
        let probe = if flow_cache::bypasses(key.protocol, packet.flags_or_type) {
            None
        } else {
            Some(Probe::new(&key, config))
        };
        if let Some(probe) = &probe
            && probe.hit(&key, direction, &clock)
        {
            count(Reason::AllowedEstablished, len);
            return PASS;
        }
        if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
            let entry = unsafe { &mut *entry };
            if !is_expired(entry, key.protocol, &clock) {
                if entry.epoch == current_epoch(entry.endpoint_id)
                    && entry.state != ct_state::REVOKED
                {
                    let flags = packet.flags_or_type;
                    let vouched = flow_cache::may_vouch_for(entry);
                    match track(
                        entry,
                        direction,
                        key.protocol,
                        flags,
                        || tcp_segment(ctx, packet),
                        &clock,
                    ) {
                        Update::Keep => {
                            if let Some(probe) = &probe {
                                probe.fill(&key, entry, direction, &clock);
                            }
                        }
                        update => apply_closing(&key, update, vouched),
                    }
                    count(Reason::AllowedEstablished, len);
                    return PASS;
                }
                tracked = Some((key, entry));
            }
        }
    }

    let endpoint_key = EndpointKey {
        ifindex,
        generation,
    };
    let Some(ep) = (unsafe { ENDPOINTS.get(&endpoint_key) }) else {
        return drop_unparsed(
            event,
            ifindex,
            0,
            direction,
            len,
            Reason::DroppedUnknownEndpoint,
        );
    };
    let unparsed = match parsed {
        Parsed::Ip => None,
        Parsed::Control => {
            count(Reason::AllowedControl, len);
            return PASS;
        }
        Parsed::Malformed => Some(Reason::DroppedMalformed),
        Parsed::UnsupportedL3 => Some(Reason::DroppedUnsupportedL3),
        Parsed::Ipv6ExtChain => Some(Reason::DroppedIpv6ExtChain),
    };
    if let Some(reason) = unparsed {
        return drop_unparsed(event, ifindex, ep.endpoint_id, direction, len, reason);
    }
    let outcome = match tracked {
        Some((key, entry)) => rejudge(
            ep,
            direction,
            generation,
            &key,
            entry,
            packet.flags_or_type,
            || tcp_segment(ctx, packet),
            &clock,
        ),
        None => decide(ifindex, ep, direction, generation, packet, &clock),
    };
    let tuple = &packet.tuple;
    let allowed = outcome.reason.verdict() == Verdict::Allowed;
    if allowed && let Fragment::First { id } = packet.fragment {
        let key = frag_key(ep.endpoint_id, id, tuple, direction);
        let entry = FragEntry {
            src_port: tuple.sport,
            dst_port: tuple.dport,
            rule_id: outcome.rule_id,
        };
        let _ = FRAGMENTS.insert(&key, &entry, 0);
    }
    count(outcome.reason, len);
    if outcome.report || !allowed {
        let info = EventInfo {
            ifindex,
            endpoint_id: ep.endpoint_id,
            direction: direction as u8,
            family: packet.family,
            flags_or_type: packet.flags_or_type,
            len,
            peer_identity: outcome.peer.identity,
            peer_cidr_identity: outcome.peer.cidr_identity,
            rule_id: outcome.rule_id,
            reason: outcome.reason,
        };
        emit(event, Some(tuple), &info);
    }
    if allowed { PASS } else { DROP }
}

/// A packet no fast-path entry explains.
#[inline(always)]
fn decide(
    ifindex: u32,
    ep: &EndpointInfo,
    direction: Direction,
    generation: u32,
    packet: &mut Packet,
    clock: &Clock,
) -> Outcome {
    if direction == Direction::Egress && !owns_source(ep, packet) {
        return Outcome::dropped(Reason::DroppedSpoofedSource);
    }
    if let Fragment::Later { id, last } = packet.fragment {
        return later_fragment(ep, direction, &mut packet.tuple, id, last);
    }
    if packet.icmp == IcmpKind::Error && packet.has_inner {
        // The quoted packet travelled the other way.
        let key = key_for(ifindex, &packet.inner, reverse(direction));
        if let Some(entry) = unsafe { CONNTRACK.get(&key) }
            && entry.state != ct_state::REVOKED
            && !is_expired(entry, key.protocol, clock)
        {
            return Outcome::quiet(Reason::AllowedRelated, entry.rule_id, entry.peer_identity);
        }
    }

    // A new connection, or a packet that no tracked connection explains.
    let tuple = &packet.tuple;
    let protocol = tuple.protocol;
    let opens_tcp = is_tcp_open(protocol, packet.flags_or_type);
    let peer = resolve_peer(peer_addr(tuple, direction), generation);
    let judgement = judge(ep, direction, generation, &peer, protocol, tuple.dport);
    let opens = match protocol {
        proto::TCP => opens_tcp,
        proto::ICMP | proto::ICMPV6 => packet.icmp == IcmpKind::EchoRequest,
        _ => true,
    };
    if judgement.reason.verdict() == Verdict::Allowed {
        if !opens {
            return Outcome::quiet(Reason::AllowedStateless, judgement.rule_id, peer.identity);
        }
        let entry = CtEntry {
            last_seen: clock.now,
            rule_id: judgement.rule_id,
            epoch: current_epoch(ep.endpoint_id),
            endpoint_id: ep.endpoint_id,
            peer_identity: peer.identity,
            origin: direction as u8,
            state: ct_state::OPEN,
            flags: 0,
            reason: judgement.reason as u8,
            fin_ack: [0; 2],
            _pad: 0,
        };
        let key = key_for(ifindex, tuple, direction);
        let _ = CONNTRACK.insert(&key, &entry, 0);
        if opens_tcp {
            // A SYN may have replaced an entry other CPUs have cached.
            flow_cache::invalidate(&key);
        }
    }
    Outcome {
        reason: judgement.reason,
        rule_id: judgement.rule_id,
        peer,
        report: true,
    }
}

/// A tracked connection judged under an older epoch, or revoked. It is judged
/// again as it was opened; a denied one stays revoked (both directions drop)
/// until a later change allows it or a new SYN is judged.
#[inline(always)]
fn rejudge(
    ep: &EndpointInfo,
    direction: Direction,
    generation: u32,
    key: &CtKey,
    entry: &mut CtEntry,
    tcp_flags: u8,
    segment: impl FnOnce() -> Option<Segment>,
    clock: &Clock,
) -> Outcome {
    let epoch = current_epoch(ep.endpoint_id);
    if entry.epoch != epoch {
        let origin = if entry.origin == Direction::Egress as u8 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let peer = resolve_peer(&key.peer_addr, generation);
        let judgement = judge(
            ep,
            origin,
            generation,
            &peer,
            key.protocol,
            opening_dport(key, entry.origin),
        );
        entry.epoch = epoch;
        entry.endpoint_id = ep.endpoint_id;
        entry.peer_identity = peer.identity;
        entry.rule_id = judgement.rule_id;
        entry.reason = judgement.reason as u8;
        if judgement.reason.verdict() == Verdict::Denied {
            entry.state = ct_state::REVOKED;
        } else if entry.state == ct_state::REVOKED {
            entry.state = ct_state::OPEN;
        }
    }
    if entry.state == ct_state::REVOKED {
        let mut outcome = Outcome::dropped(Reason::DeniedRevoked);
        outcome.peer.identity = entry.peer_identity;
        return outcome;
    }
    let vouched = flow_cache::may_vouch_for(entry);
    let update = track(entry, direction, key.protocol, tcp_flags, segment, clock);
    apply_closing(key, update, vouched);
    Outcome::quiet(
        Reason::AllowedEstablished,
        entry.rule_id,
        entry.peer_identity,
    )
}

/// Ends a connection on RST or when both FINs are acknowledged, and makes
/// its cached slots stale when the entry stops being one the cache may stand
/// in for (`vouched`: it was until this packet). After its first FIN no slot
/// can be filled from it, so a second FIN or the removal bumps nothing.
#[inline(always)]
fn apply_closing(key: &CtKey, update: Update, vouched: bool) {
    match update {
        Update::Keep => return,
        Update::Closing => {}
        Update::Remove => {
            let _ = CONNTRACK.remove(key);
        }
    }
    if vouched {
        flow_cache::invalidate(key);
    }
}

/// A fragment without transport header: it follows its first fragment.
#[inline(always)]
fn later_fragment(
    ep: &EndpointInfo,
    direction: Direction,
    tuple: &mut Tuple,
    id: u32,
    last: bool,
) -> Outcome {
    let key = frag_key(ep.endpoint_id, id, tuple, direction);
    match unsafe { FRAGMENTS.get(&key) } {
        Some(first) => {
            tuple.sport = first.src_port;
            tuple.dport = first.dst_port;
            let outcome = Outcome::quiet(Reason::AllowedFragment, first.rule_id, identity::ANY);
            if last {
                let _ = FRAGMENTS.remove(&key);
            }
            outcome
        }
        None => Outcome::dropped(Reason::DroppedFragmentUnknown),
    }
}

#[inline(always)]
fn frag_key(endpoint_id: u32, id: u32, tuple: &Tuple, direction: Direction) -> FragKey {
    let mut key = FragKey {
        endpoint_id,
        id,
        src: [0; 16],
        dst: [0; 16],
        protocol: tuple.protocol,
        direction: direction as u8,
        _pad: [0; 2],
    };
    addr::copy(&mut key.src, &tuple.src);
    addr::copy(&mut key.dst, &tuple.dst);
    key
}

/// Reports a packet dropped before its headers could be read.
#[inline(always)]
fn drop_unparsed(
    event: &mut FlowEvent,
    ifindex: u32,
    endpoint_id: u32,
    direction: Direction,
    len: u32,
    reason: Reason,
) -> i32 {
    count(reason, len);
    let info = EventInfo {
        ifindex,
        endpoint_id,
        direction: direction as u8,
        family: 0,
        flags_or_type: 0,
        len,
        peer_identity: 0,
        peer_cidr_identity: 0,
        rule_id: 0,
        reason,
    };
    emit(event, None, &info);
    DROP
}

#[inline(always)]
fn owns_source(ep: &EndpointInfo, packet: &Packet) -> bool {
    let src = &packet.tuple.src;
    if packet.family == 4 {
        ep.flags & EndpointInfo::HAS_IPV4 != 0
            && u32::from_ne_bytes([src[12], src[13], src[14], src[15]])
                == u32::from_ne_bytes(ep.ipv4)
    } else {
        ep.flags & EndpointInfo::HAS_IPV6 != 0 && addr::eq(src, &ep.ipv6)
    }
}

#[inline(always)]
fn peer_addr(tuple: &Tuple, direction: Direction) -> &Addr {
    match direction {
        Direction::Egress => &tuple.dst,
        Direction::Ingress => &tuple.src,
    }
}

#[inline(always)]
fn reverse(direction: Direction) -> Direction {
    match direction {
        Direction::Egress => Direction::Ingress,
        Direction::Ingress => Direction::Egress,
    }
}
