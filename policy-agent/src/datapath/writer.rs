//! Applying desired map contents to the kernel: only the difference is written.
//!
//! Order: additions and changes first (policy entries, then peers, then
//! endpoints), removals last (endpoints, peers, policy entries), then the
//! epochs of endpoints whose verdicts may have changed are bumped so their
//! tracked connections are judged again on their next packet.
//!
//! Each map update is atomic, but a batch is not: between two updates of one
//! batch the classifier sees a mix of old and new entries. The order above
//! makes that mix never allow more than old ∪ new per key; making whole
//! batches atomic is a later step (generation-tagged keys, see
//! docs/architecture.md).

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use policy_common::{Addr, EndpointInfo, PeerInfo, PeerIpKey, PolicyKey, PolicyValue, names};

use super::{Datapath, DatapathError};
use crate::compile::Desired;

/// What one [`apply`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
    pub epochs_bumped: usize,
}

impl SyncStats {
    pub fn is_noop(&self) -> bool {
        self.written == 0 && self.removed == 0
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The entries of `current` to write and the keys to remove to reach `desired`.
fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let writes = desired
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let removes = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    (writes, removes)
}

/// Brings the classifier's maps to `desired`, reading what they hold now (so
/// it also adopts the state a previous agent left in pinned maps).
pub fn apply(dp: &mut Datapath, desired: &Desired) -> Result<SyncStats, DatapathError> {
    let mut stats = SyncStats::default();

    let current_policy: BTreeMap<PolicyKey, PolicyValue> = dp
        .policy()?
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(names::POLICY))?;
    let current_peers: BTreeMap<Addr, PeerInfo> = dp
        .peer_ips()?
        .iter()
        .map(|r| r.map(|(k, v)| (k.addr, v)))
        .collect::<Result<_, _>>()
        .map_err(map_err(names::PEER_IPS))?;
    let current_cidrs: BTreeMap<(u32, Addr), PeerInfo> = dp
        .peer_cidrs()?
        .iter()
        .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
        .collect::<Result<_, _>>()
        .map_err(map_err(names::PEER_CIDRS))?;
    let current_endpoints: BTreeMap<u32, EndpointInfo> = dp
        .endpoints()?
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(names::ENDPOINTS))?;

    let (policy_writes, policy_removes) = diff(&current_policy, &desired.policy);
    let (peer_writes, peer_removes) = diff(&current_peers, &desired.peer_ips);
    let (cidr_writes, cidr_removes) = diff(&current_cidrs, &desired.peer_cidrs);
    let (endpoint_writes, endpoint_removes) = diff(&current_endpoints, &desired.endpoints);

    // Endpoints whose verdicts may change: every endpoint when peers changed,
    // else those whose own entries or flags changed.
    let peers_changed = !peer_writes.is_empty()
        || !peer_removes.is_empty()
        || !cidr_writes.is_empty()
        || !cidr_removes.is_empty();
    let mut touched: BTreeSet<u32> = policy_writes
        .iter()
        .map(|(k, _)| k.endpoint_id)
        .chain(policy_removes.iter().map(|k| k.endpoint_id))
        .chain(endpoint_writes.iter().map(|(_, e)| e.endpoint_id))
        .collect();
    if peers_changed {
        touched.extend(desired.endpoints.values().map(|e| e.endpoint_id));
    }

    {
        let mut policy = dp.policy()?;
        for (k, v) in &policy_writes {
            policy.insert(k, v, 0).map_err(map_err(names::POLICY))?;
        }
    }
    {
        let mut cidrs = dp.peer_cidrs()?;
        for ((len, addr), v) in &cidr_writes {
            cidrs
                .insert(&aya::maps::lpm_trie::Key::new(*len, *addr), v, 0)
                .map_err(map_err(names::PEER_CIDRS))?;
        }
    }
    {
        let mut peers = dp.peer_ips()?;
        for (addr, v) in &peer_writes {
            peers
                .insert(PeerIpKey { addr: *addr }, v, 0)
                .map_err(map_err(names::PEER_IPS))?;
        }
    }
    {
        // A new endpoint gets its epoch before it can be found.
        let mut epochs = dp.epochs()?;
        for (_, e) in &endpoint_writes {
            if epochs
                .get(&e.endpoint_id, 0)
                .map_err(map_err(names::EPOCHS))?
                == 0
            {
                epochs
                    .set(e.endpoint_id, 1, 0)
                    .map_err(map_err(names::EPOCHS))?;
            }
        }
    }
    {
        let mut endpoints = dp.endpoints()?;
        for (ifindex, e) in &endpoint_writes {
            endpoints
                .insert(ifindex, e, 0)
                .map_err(map_err(names::ENDPOINTS))?;
        }
        for ifindex in &endpoint_removes {
            endpoints
                .remove(ifindex)
                .map_err(map_err(names::ENDPOINTS))?;
        }
    }
    {
        let mut epochs = dp.epochs()?;
        for ifindex in &endpoint_removes {
            let id = current_endpoints[ifindex].endpoint_id;
            if !desired.endpoints.values().any(|e| e.endpoint_id == id) {
                // Epoch 0: tracked connections of a removed endpoint stop at once.
                epochs.set(id, 0, 0).map_err(map_err(names::EPOCHS))?;
                touched.remove(&id);
            }
        }
    }
    {
        let mut peers = dp.peer_ips()?;
        for addr in &peer_removes {
            peers
                .remove(&PeerIpKey { addr: *addr })
                .map_err(map_err(names::PEER_IPS))?;
        }
    }
    {
        let mut cidrs = dp.peer_cidrs()?;
        for (len, addr) in &cidr_removes {
            cidrs
                .remove(&aya::maps::lpm_trie::Key::new(*len, *addr))
                .map_err(map_err(names::PEER_CIDRS))?;
        }
    }
    {
        let mut policy = dp.policy()?;
        for k in &policy_removes {
            policy.remove(k).map_err(map_err(names::POLICY))?;
        }
    }
    {
        let mut epochs = dp.epochs()?;
        for id in &touched {
            let epoch = epochs.get(id, 0).map_err(map_err(names::EPOCHS))?;
            // Wrap past 0, which means "gone".
            let next = epoch.wrapping_add(1).max(1);
            epochs.set(*id, next, 0).map_err(map_err(names::EPOCHS))?;
            stats.epochs_bumped += 1;
        }
    }

    stats.written =
        policy_writes.len() + peer_writes.len() + cidr_writes.len() + endpoint_writes.len();
    stats.removed =
        policy_removes.len() + peer_removes.len() + cidr_removes.len() + endpoint_removes.len();
    Ok(stats)
}
