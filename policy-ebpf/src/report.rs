//! Verdict counters and flow events.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use policy_common::{FlowEvent, Reason};

use crate::{
    addr,
    maps::{EVENTS_LOST, FLOW_EVENTS, VERDICT_STATS},
    parse::Tuple,
};

#[inline(always)]
pub fn count(reason: Reason, len: u32) {
    if let Some(counter) = VERDICT_STATS.get_ptr_mut(reason as u32) {
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += u64::from(len);
    }
}

/// What an event says beyond the packet itself.
pub struct EventInfo {
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub direction: u8,
    pub family: u8,
    pub flags_or_type: u8,
    pub len: u32,
    pub peer_identity: u32,
    pub peer_cidr_identity: u32,
    pub rule_id: u32,
    pub reason: Reason,
}

/// Writes a flow event, built in `slot` and copied into the ring buffer with
/// one helper call; when the ring buffer is full, counts it as lost.
/// `tuple` is `None` for packets dropped before their headers were read.
#[inline(always)]
pub fn emit(slot: &mut FlowEvent, tuple: Option<&Tuple>, info: &EventInfo) {
    let ev = slot;
    ev.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    match tuple {
        Some(tuple) => {
            addr::copy(&mut ev.src_addr, &tuple.src);
            addr::copy(&mut ev.dst_addr, &tuple.dst);
            ev.src_port = tuple.sport;
            ev.dst_port = tuple.dport;
            ev.protocol = tuple.protocol;
        }
        None => {
            addr::zero(&mut ev.src_addr);
            addr::zero(&mut ev.dst_addr);
            ev.src_port = 0;
            ev.dst_port = 0;
            ev.protocol = 0;
        }
    }
    ev.endpoint_id = info.endpoint_id;
    ev.peer_identity = info.peer_identity;
    ev.peer_cidr_identity = info.peer_cidr_identity;
    ev.rule_id = info.rule_id;
    ev.ifindex = info.ifindex;
    ev.packet_len = info.len;
    ev.direction = info.direction;
    ev.verdict = info.reason.verdict() as u8;
    ev.reason = info.reason as u8;
    ev.family = info.family;
    ev.tcp_flags_or_icmp_type = info.flags_or_type;
    ev._pad = [0; 3];
    if FLOW_EVENTS.output::<FlowEvent>(&*ev, 0).is_err()
        && let Some(lost) = EVENTS_LOST.get_ptr_mut(0)
    {
        unsafe { *lost += 1 };
    }
}
