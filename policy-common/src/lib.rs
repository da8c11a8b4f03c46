//! Types shared by the kernel classifier (`policy-ebpf`) and the user-space agent.
//!
//! Every type here crosses the kernel/user boundary as raw bytes, so each one is
//! `#[repr(C)]`, has its padding spelled out as named fields, and has its size
//! checked at compile time. Codes (direction, verdict, reason) are stable numbers:
//! they are stored in pinned maps and flow logs, so a number is never reused.
#![no_std]

pub mod codes;
pub mod event;
pub mod maps;
pub mod verdict;

pub use codes::{Direction, Reason, Verdict};
pub use event::FlowEvent;
pub use maps::*;

/// Where the agent pins its maps; they outlive the agent so enforcement goes on
/// while it restarts.
pub const PIN_DIR: &str = "/sys/fs/bpf/palisade";

/// Names of the programs and maps in the eBPF object.
pub mod names {
    pub const PROG_FROM_POD: &str = "palisade_from_pod";
    pub const PROG_TO_POD: &str = "palisade_to_pod";
    pub const PROG_NOOP: &str = "palisade_noop";
    pub const PROG_JIFFIES: &str = "palisade_jiffies";

    pub const ENDPOINTS: &str = "PALISADE_ENDPOINTS";
    pub const EPOCHS: &str = "PALISADE_EPOCHS";
    pub const PEER_IPS: &str = "PALISADE_PEER_IPS";
    pub const PEER_CIDRS: &str = "PALISADE_PEER_CIDRS";
    pub const POLICY: &str = "PALISADE_POLICY";
    pub const CONNTRACK: &str = "PALISADE_CONNTRACK";
    pub const FRAGMENTS: &str = "PALISADE_FRAGMENTS";
    pub const FLOW_EVENTS: &str = "PALISADE_FLOW_EVENTS";
    pub const VERDICT_STATS: &str = "PALISADE_VERDICT_STATS";
    pub const EVENTS_LOST: &str = "PALISADE_EVENTS_LOST";
    pub const CONFIG: &str = "PALISADE_CONFIG";
    /// Not pinned: each loaded object has its own cache (of [`FlowSlot`](crate::FlowSlot)s).
    pub const FLOW_CACHE: &str = "PALISADE_FLOW_CACHE";
    pub const FLOW_VERSIONS: &str = "PALISADE_FLOW_VERSIONS";
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;
    use crate::event::DecodeError;

    #[test]
    fn codes_round_trip_and_unknown_ones_are_rejected() {
        for reason in Reason::ALL {
            assert_eq!(Reason::try_from(reason as u8), Ok(reason));
            let expected = if (reason as u8) < Reason::FIRST_DROP {
                Verdict::Allowed
            } else {
                Verdict::Denied
            };
            assert_eq!(reason.verdict(), expected);
            assert!((reason as u32) < Reason::COUNT);
        }
        for value in 0..=u8::MAX {
            let known = Reason::ALL.iter().any(|r| *r as u8 == value);
            assert_eq!(Reason::try_from(value).is_ok(), known, "reason {value}");
        }
        assert_eq!(Direction::try_from(1), Ok(Direction::Egress));
        assert!(Direction::try_from(2).is_err());
        assert_eq!(Verdict::try_from(2), Ok(Verdict::Denied));
        assert!(Verdict::try_from(0).is_err());
    }

    fn event_bytes(event: &FlowEvent) -> [u8; size_of::<FlowEvent>()] {
        // SAFETY: FlowEvent is plain data without hidden padding.
        unsafe { core::mem::transmute_copy(event) }
    }

    #[test]
    fn flow_events_are_length_and_code_checked() {
        let event = FlowEvent {
            direction: Direction::Ingress as u8,
            verdict: Verdict::Denied as u8,
            reason: Reason::DeniedByPolicy as u8,
            dst_port: 80,
            ..Default::default()
        };
        let bytes = event_bytes(&event);
        let (decoded, codes) = FlowEvent::decode(&bytes).unwrap();
        assert_eq!(decoded, event);
        assert_eq!(codes.reason, Reason::DeniedByPolicy);

        assert_eq!(
            FlowEvent::decode(&bytes[..79]),
            Err(DecodeError::Length { got: 79 })
        );
        let unknown = FlowEvent {
            reason: 99,
            ..event
        };
        assert!(matches!(
            FlowEvent::decode(&event_bytes(&unknown)),
            Err(DecodeError::Code(_))
        ));
        let contradiction = FlowEvent {
            verdict: Verdict::Allowed as u8,
            ..event
        };
        assert!(matches!(
            FlowEvent::decode(&event_bytes(&contradiction)),
            Err(DecodeError::Inconsistent { .. })
        ));
    }

    #[test]
    fn port_rules_match_inclusive_ranges() {
        let mut value = PolicyValue {
            range_count: 2,
            ..Default::default()
        };
        value.ranges[0] = PortRule {
            first: 80,
            last: 80,
            rule_id: 1,
        };
        value.ranges[1] = PortRule {
            first: 8000,
            last: 8100,
            rule_id: 2,
        };
        assert_eq!(value.rule_for_port(80), Some(1));
        assert_eq!(value.rule_for_port(8000), Some(2));
        assert_eq!(value.rule_for_port(8100), Some(2));
        assert_eq!(value.rule_for_port(8101), None);
        assert_eq!(value.rule_for_port(79), None);
        // A count beyond the array never reads past it.
        value.range_count = u32::MAX;
        assert_eq!(value.rule_for_port(81), None);
        // Any port wins over ranges.
        value.any_port_rule = 7;
        assert_eq!(value.rule_for_port(1), Some(7));
    }
}
