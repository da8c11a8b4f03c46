//! Typed handles on the classifier's maps.

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use policy_common::{
    Config, CtEntry, CtKey, EndpointInfo, EndpointKey, FlowSlot, FragEntry, FragKey, PeerCidrData,
    PeerInfo, PeerIpKey, PolicyKey, PolicyValue, Reason, VerdictCounter, names,
};

use super::{Datapath, DatapathError};

/// Key of the ipBlock prefix trie.
pub type PeerCidrKey = Key<PeerCidrData>;

/// The trie key for `addr/prefix_len` in generation `generation` (IPv4 given
/// as such, its length in IPv4 bits).
pub fn cidr_key(addr: std::net::IpAddr, prefix_len: u8, generation: u32) -> PeerCidrKey {
    let (len, addr) = match addr {
        std::net::IpAddr::V4(v4) => (
            u32::from(prefix_len) + policy_common::V4_MAPPED_PREFIX_LEN,
            policy_common::v4_mapped(v4.octets()),
        ),
        std::net::IpAddr::V6(v6) => (u32::from(prefix_len), v6.octets()),
    };
    Key::new(
        policy_common::CIDR_GENERATION_BITS + len,
        PeerCidrData::new(generation, addr),
    )
}

macro_rules! map_accessor {
    ($fn_name:ident, $map_name:expr, $ty:ty) => {
        pub fn $fn_name(&mut self) -> Result<$ty, DatapathError> {
            let name = $map_name;
            let map = self
                .ebpf
                .map_mut(name)
                .ok_or(DatapathError::Missing { kind: "map", name })?;
            <$ty>::try_from(map).map_err(|source| DatapathError::Map { name, source })
        }
    };
}

impl Datapath {
    map_accessor!(endpoints, names::ENDPOINTS, HashMap<&mut MapData, EndpointKey, EndpointInfo>);
    map_accessor!(epochs, names::EPOCHS, Array<&mut MapData, u32>);
    map_accessor!(config, names::CONFIG, Array<&mut MapData, Config>);
    map_accessor!(peer_ips, names::PEER_IPS, HashMap<&mut MapData, PeerIpKey, PeerInfo>);
    map_accessor!(peer_cidrs, names::PEER_CIDRS, LpmTrie<&mut MapData, PeerCidrData, PeerInfo>);
    map_accessor!(policy, names::POLICY, HashMap<&mut MapData, PolicyKey, PolicyValue>);
    map_accessor!(conntrack, names::CONNTRACK, HashMap<&mut MapData, CtKey, CtEntry>);
    map_accessor!(fragments, names::FRAGMENTS, HashMap<&mut MapData, FragKey, FragEntry>);
    map_accessor!(flow_cache, names::FLOW_CACHE, PerCpuArray<&mut MapData, FlowSlot>);
    map_accessor!(verdict_stats, names::VERDICT_STATS, PerCpuArray<&mut MapData, VerdictCounter>);
    map_accessor!(events_lost_map, names::EVENTS_LOST, PerCpuArray<&mut MapData, u64>);

    /// Packets and bytes by reason, summed over CPUs.
    pub fn verdict_totals(&mut self) -> Result<Vec<(Reason, VerdictCounter)>, DatapathError> {
        let stats = self.verdict_stats()?;
        let mut totals = Vec::with_capacity(Reason::ALL.len());
        for reason in Reason::ALL {
            let per_cpu =
                stats
                    .get(&u32::from(reason as u8), 0)
                    .map_err(|source| DatapathError::Map {
                        name: names::VERDICT_STATS,
                        source,
                    })?;
            let mut sum = VerdictCounter::default();
            for c in per_cpu.iter() {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
            }
            totals.push((reason, sum));
        }
        Ok(totals)
    }

    /// Records that conntrack entries were removed from user space: every
    /// flow cache slot filled before is no longer trusted.
    pub fn count_ct_flush(&mut self) -> Result<(), DatapathError> {
        let map_err = |source| DatapathError::Map {
            name: names::CONFIG,
            source,
        };
        let mut config = self.config()?;
        let mut current = config.get(&0, 0).map_err(map_err)?;
        current.ct_flushes = current.ct_flushes.wrapping_add(1);
        config.set(0, current, 0).map_err(map_err)
    }

    /// Flow events the kernel could not reserve room for, summed over CPUs.
    pub fn events_lost(&mut self) -> Result<u64, DatapathError> {
        let lost = self.events_lost_map()?;
        let per_cpu = lost.get(&0, 0).map_err(|source| DatapathError::Map {
            name: names::EVENTS_LOST,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }
}
