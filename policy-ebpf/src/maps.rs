//! The classifier's maps. All are pinned by name under the agent's pin
//! directory so enforcement survives agent restarts.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use policy_common::{
    Config, CtEntry, CtKey, EndpointInfo, EndpointKey, FlowSlot, FragEntry, FragKey, GENERATIONS,
    PeerCidrData, PeerInfo, PeerIpKey, PolicyKey, PolicyValue, Reason, VerdictCounter, capacity,
    flow_cache,
};

/// Hash maps that are written rarely and can be large allocate on update.
const BPF_F_NO_PREALLOC: u32 = 1;

/// (host-side ifindex, generation) -> endpoint.
#[map(name = "PALISADE_ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> =
    HashMap::pinned(capacity::ENDPOINTS * GENERATIONS, 0);

/// Endpoint id -> policy epoch. The agent bumps an endpoint's epoch whenever
/// a verdict of it may change; 0 means the endpoint is gone. An array, so an
/// established packet checks it without a hash lookup.
#[map(name = "PALISADE_EPOCHS")]
pub static EPOCHS: Array<u32> = Array::pinned(capacity::ENDPOINTS, 0);

/// Settings the agent writes at load time (the kernel's HZ).
#[map(name = "PALISADE_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Exact addresses of pods and of the node.
#[map(name = "PALISADE_PEER_IPS")]
pub static PEER_IPS: HashMap<PeerIpKey, PeerInfo> = HashMap::pinned(capacity::PEER_IPS, 0);

/// ipBlock prefixes, longest match (LPM tries are always allocated on update).
#[map(name = "PALISADE_PEER_CIDRS")]
pub static PEER_CIDRS: LpmTrie<PeerCidrData, PeerInfo> = LpmTrie::pinned(capacity::PEER_CIDRS, 0);

#[map(name = "PALISADE_POLICY")]
pub static POLICY: HashMap<PolicyKey, PolicyValue> =
    HashMap::pinned(capacity::POLICY, BPF_F_NO_PREALLOC);

#[map(name = "PALISADE_CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// Established flows, per CPU, in front of [`CONNTRACK`] (see `flow_cache`).
/// Not pinned: a new object starts with an empty cache.
#[map(name = "PALISADE_FLOW_CACHE")]
pub static FLOW_CACHE: PerCpuArray<FlowSlot> = PerCpuArray::with_max_entries(flow_cache::SLOTS, 0);

/// One version per flow cache index, shared by all CPUs: bumped whenever a
/// conntrack entry of that index is created, closed or removed. Pinned, so
/// that while a restarted agent swaps its programs into the links one hook
/// at a time, old and new programs see each other's bumps.
#[map(name = "PALISADE_FLOW_VERSIONS")]
pub static FLOW_VERSIONS: Array<u32> = Array::pinned(flow_cache::SLOTS, 0);

#[map(name = "PALISADE_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

#[map(name = "PALISADE_FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(capacity::FLOW_EVENTS_BYTES, 0);

/// Packets and bytes by [`Reason`].
#[map(name = "PALISADE_VERDICT_STATS")]
pub static VERDICT_STATS: PerCpuArray<VerdictCounter> = PerCpuArray::pinned(Reason::COUNT, 0);

/// Flow events the ring buffer had no room for.
#[map(name = "PALISADE_EVENTS_LOST")]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Per-CPU scratch space for the parsed packet and the flow event being
/// written: the BPF stack (512 bytes) is too small to hold them beside the map
/// keys. A classifier run never nests on one CPU, so one slot per CPU suffices.
#[map(name = "PALISADE_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct Scratch {
    pub packet: crate::parse::Packet,
    pub event: policy_common::FlowEvent,
}
