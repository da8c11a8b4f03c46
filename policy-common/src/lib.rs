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
}
