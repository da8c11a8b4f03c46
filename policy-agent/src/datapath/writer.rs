//! Applying desired map contents to the kernel, atomically and by difference.
//!
//! The verdict maps hold two generations (see `policy_common::maps`). A change
//! is written into the generation the classifier does not read, then one word
//! (`Config::generation`) switches the classifier to it, then the old
//! generation is brought up to date so it is ready for the next change. A
//! packet therefore sees the whole old state or the whole new one: a change
//! never opens a window in which traffic allowed before and after is dropped,
//! or traffic denied before and after passes. Within a generation only the
//! difference is written. After the switch, the epochs of endpoints whose
//! verdicts may have changed are bumped so their tracked connections are
//! judged again on their next packet.
//!
//! If writing fails (a full map), the generation being read is untouched:
//! enforcement stays what it was, and the error is returned.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{MapError, lpm_trie::Key};
use policy_common::{
    Addr, CIDR_GENERATION_BITS, Config, EndpointInfo, EndpointKey, PeerCidrData, PeerInfo,
    PeerIpKey, PolicyKey, PolicyValue, names,
};

use super::{Datapath, DatapathError};
use crate::compile::{Desired, PolicyEntries};

/// What one [`MapWriter::apply`] changed (counted once, not per generation).
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

/// The verdict maps' contents of one generation, keyed as in [`Desired`]
/// (policy keys with generation 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Contents {
    endpoints: BTreeMap<u32, EndpointInfo>,
    peer_ips: BTreeMap<Addr, PeerInfo>,
    peer_cidrs: BTreeMap<(u32, Addr), PeerInfo>,
    policy: PolicyEntries,
}

impl Contents {
    fn holds(&self, desired: &Desired) -> bool {
        self.endpoints == desired.endpoints
            && self.peer_ips == desired.peer_ips
            && self.peer_cidrs == desired.peer_cidrs
            && self.policy == desired.policy
    }
}

/// Writes desired contents into the classifier's maps, remembering what each
/// generation holds so that a change costs only its difference. What it does
/// not know (at start, after an error) it reads from the maps, which is how a
/// restarted agent adopts the state its predecessor left.
#[derive(Debug, Default)]
pub struct MapWriter {
    known: [Option<Contents>; 2],
    /// The generation [`MapWriter::apply_deferred`] left behind, to bring up
    /// to date with [`MapWriter::catch_up`].
    lagging: Option<u32>,
}

/// Applies `desired` with a writer that knows nothing yet (reads the maps).
pub fn apply(dp: &mut Datapath, desired: &Desired) -> Result<SyncStats, DatapathError> {
    MapWriter::new().apply(dp, desired)
}

impl MapWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings the classifier to `desired`, and the generation it no longer
    /// reads too.
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        desired: &Desired,
    ) -> Result<SyncStats, DatapathError> {
        let stats = self.apply_deferred(dp, desired)?;
        self.catch_up(dp, desired)?;
        Ok(stats)
    }

    /// Brings the classifier to `desired` (stage, switch, epochs) and
    /// leaves the generation it no longer reads for [`MapWriter::catch_up`]:
    /// a change is enforced after writing its difference once, not twice.
    /// A later apply is correct whether or not the catch-up ran (staging
    /// writes whatever that generation lacks).
    pub fn apply_deferred(
        &mut self,
        dp: &mut Datapath,
        desired: &Desired,
    ) -> Result<SyncStats, DatapathError> {
        let staged = self.stage(dp, desired)?;
        let active_holds = || {
            self.known[staged.active as usize]
                .as_ref()
                .is_some_and(|c| c.holds(desired))
        };
        if staged.written == 0 && staged.removed == 0 && active_holds() {
            // Both generations already hold it: nothing to switch or re-judge.
            return Ok(SyncStats::default());
        }
        let active = staged.active;
        let stats = self.switch(dp, desired, staged)?;
        self.lagging = Some(active);
        Ok(stats)
    }

    /// Whether a generation waits for [`MapWriter::catch_up`].
    pub fn lagging(&self) -> bool {
        self.lagging.is_some()
    }

    /// Brings the generation the last [`MapWriter::apply_deferred`] left
    /// behind up to `desired` (what that apply enforced). Returns the
    /// entries written and removed.
    pub fn catch_up(
        &mut self,
        dp: &mut Datapath,
        desired: &Desired,
    ) -> Result<(usize, usize), DatapathError> {
        match self.lagging.take() {
            Some(generation) => self.sync(dp, generation, desired),
            None => Ok((0, 0)),
        }
    }

    /// Writes `desired` into the generation the classifier does not read.
    /// Nothing changes for traffic until [`MapWriter::commit`].
    pub fn stage(&mut self, dp: &mut Datapath, desired: &Desired) -> Result<Staged, DatapathError> {
        let active = dp.active_generation()?;
        let next = 1 - active;
        // What the classifier reads: known from here to the commit.
        self.contents(dp, active)?;
        let (written, removed) = self.sync(dp, next, desired)?;
        if self.lagging == Some(next) {
            self.lagging = None;
        }
        Ok(Staged {
            active,
            next,
            written,
            removed,
        })
    }

    /// Switches the classifier to the staged generation, re-judges what may
    /// have changed, and brings the other generation up to date.
    pub fn commit(
        &mut self,
        dp: &mut Datapath,
        desired: &Desired,
        staged: Staged,
    ) -> Result<SyncStats, DatapathError> {
        let active = staged.active;
        let stats = self.switch(dp, desired, staged)?;
        self.sync(dp, active, desired)?;
        Ok(stats)
    }

    /// Switches the classifier to the staged generation and re-judges what
    /// may have changed.
    fn switch(
        &mut self,
        dp: &mut Datapath,
        desired: &Desired,
        staged: Staged,
    ) -> Result<SyncStats, DatapathError> {
        let Staged {
            active,
            next,
            written,
            removed,
        } = staged;
        let before = self.contents(dp, active)?;
        let old_ids: BTreeSet<u32> = before.endpoints.values().map(|e| e.endpoint_id).collect();
        let new_ids: BTreeSet<u32> = desired.endpoints.values().map(|e| e.endpoint_id).collect();
        let touched = touched(before, desired);
        {
            // An endpoint has an epoch before the classifier can find it.
            let mut epochs = dp.epochs()?;
            for id in new_ids.difference(&old_ids) {
                if epochs.get(id, 0).map_err(map_err(names::EPOCHS))? == 0 {
                    epochs.set(*id, 1, 0).map_err(map_err(names::EPOCHS))?;
                }
            }
        }
        dp.set_active_generation(next)?;

        let mut stats = SyncStats {
            written,
            removed,
            epochs_bumped: 0,
        };
        {
            let mut epochs = dp.epochs()?;
            for id in touched {
                let epoch = epochs.get(&id, 0).map_err(map_err(names::EPOCHS))?;
                // Wrap past 0, which means "gone".
                let next_epoch = epoch.wrapping_add(1).max(1);
                epochs
                    .set(id, next_epoch, 0)
                    .map_err(map_err(names::EPOCHS))?;
                stats.epochs_bumped += 1;
            }
            // Tracked connections of a removed endpoint stop at once.
            for id in old_ids.difference(&new_ids) {
                epochs.set(*id, 0, 0).map_err(map_err(names::EPOCHS))?;
            }
        }
        Ok(stats)
    }

    /// What generation `generation` holds, read from the maps if not known.
    fn contents(&mut self, dp: &mut Datapath, generation: u32) -> Result<&Contents, DatapathError> {
        let slot = &mut self.known[generation as usize];
        if slot.is_none() {
            *slot = Some(read_generation(dp, generation)?);
        }
        Ok(slot.as_ref().expect("filled above"))
    }

    /// Makes generation `generation` hold `desired`, writing the difference.
    /// Returns (entries written, entries removed).
    fn sync(
        &mut self,
        dp: &mut Datapath,
        generation: u32,
        desired: &Desired,
    ) -> Result<(usize, usize), DatapathError> {
        self.contents(dp, generation)?;
        // Unknown until the writes below all succeed; brought up to date in
        // place as they do.
        let mut current = self.known[generation as usize].take().expect("read above");
        let counts = write_difference(dp, generation, &mut current, desired)?;
        self.known[generation as usize] = Some(current);
        Ok(counts)
    }
}

/// A change written into the generation the classifier does not read yet.
#[derive(Debug)]
pub struct Staged {
    active: u32,
    next: u32,
    written: usize,
    removed: usize,
}

/// Endpoints whose verdicts may differ between `before` and `desired`: all of
/// them when peers changed, else those whose entries or flags changed.
fn touched(before: &Contents, desired: &Desired) -> BTreeSet<u32> {
    let peers_changed =
        before.peer_ips != desired.peer_ips || before.peer_cidrs != desired.peer_cidrs;
    if peers_changed {
        return desired.endpoints.values().map(|e| e.endpoint_id).collect();
    }
    let mut touched = BTreeSet::new();
    let (policy_writes, policy_removes) = diff_policy(&before.policy, &desired.policy);
    touched.extend(policy_writes.iter().map(|(k, _)| k.endpoint_id));
    touched.extend(policy_removes.iter().map(|k| k.endpoint_id));
    let (endpoint_writes, _) = diff(&before.endpoints, &desired.endpoints);
    touched.extend(endpoint_writes.iter().map(|(_, e)| e.endpoint_id));
    touched
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The entries of `desired` to write and the keys of `current` to remove
/// (one pass over both, in key order).
fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    use std::cmp::Ordering;
    let mut writes = Vec::new();
    let mut removes = Vec::new();
    let mut c = current.iter().peekable();
    let mut d = desired.iter().peekable();
    loop {
        let order = match (c.peek(), d.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ck, _)), Some((dk, _))) => ck.cmp(dk),
        };
        match order {
            Ordering::Less => {
                if let Some((k, _)) = c.next() {
                    removes.push(k.clone());
                }
            }
            Ordering::Greater => {
                if let Some((k, v)) = d.next() {
                    writes.push((k.clone(), v.clone()));
                }
            }
            Ordering::Equal => {
                if let (Some((_, cv)), Some((k, dv))) = (c.next(), d.next())
                    && cv != dv
                {
                    writes.push((k.clone(), dv.clone()));
                }
            }
        }
    }
    (writes, removes)
}

/// [`diff`] of the policy map, endpoint by endpoint: an endpoint whose block
/// is the one already written (the same allocation) costs nothing.
fn diff_policy(
    current: &PolicyEntries,
    desired: &PolicyEntries,
) -> (Vec<(PolicyKey, PolicyValue)>, Vec<PolicyKey>) {
    let empty = Default::default();
    let (current, desired) = (current.endpoints(), desired.endpoints());
    let ids: BTreeSet<u32> = current.keys().chain(desired.keys()).copied().collect();
    let mut writes = Vec::new();
    let mut removes = Vec::new();
    for id in ids {
        let (c, d) = (current.get(&id), desired.get(&id));
        if let (Some(c), Some(d)) = (c, d)
            && std::sync::Arc::ptr_eq(c, d)
        {
            continue;
        }
        let (w, r) = diff(c.map_or(&empty, |c| &**c), d.map_or(&empty, |d| &**d));
        writes.extend(w);
        removes.extend(r);
    }
    (writes, removes)
}

fn cidr_trie_key(generation: u32, prefix_len: u32, addr: Addr) -> Key<PeerCidrData> {
    Key::new(
        CIDR_GENERATION_BITS + prefix_len,
        PeerCidrData::new(generation, addr),
    )
}

/// Writes what differs between `current` (what generation `generation`
/// holds) and `desired`, updating `current` map by map as writes succeed.
fn write_difference(
    dp: &mut Datapath,
    generation: u32,
    current: &mut Contents,
    desired: &Desired,
) -> Result<(usize, usize), DatapathError> {
    let (policy_writes, policy_removes) = diff_policy(&current.policy, &desired.policy);
    let (peer_writes, peer_removes) = diff(&current.peer_ips, &desired.peer_ips);
    let (cidr_writes, cidr_removes) = diff(&current.peer_cidrs, &desired.peer_cidrs);
    let (endpoint_writes, endpoint_removes) = diff(&current.endpoints, &desired.endpoints);
    let generation_u8 = generation as u8;
    let policy_key = |k: &PolicyKey| PolicyKey {
        generation: generation_u8,
        ..*k
    };
    {
        let mut policy = dp.policy()?;
        for (k, v) in &policy_writes {
            policy
                .insert(policy_key(k), v, 0)
                .map_err(map_err(names::POLICY))?;
        }
        for k in &policy_removes {
            policy
                .remove(&policy_key(k))
                .map_err(map_err(names::POLICY))?;
        }
    }
    // Shares the desired blocks: the next diff skips them by pointer.
    current.policy = desired.policy.clone();
    {
        let mut cidrs = dp.peer_cidrs()?;
        for ((len, addr), v) in &cidr_writes {
            cidrs
                .insert(&cidr_trie_key(generation, *len, *addr), v, 0)
                .map_err(map_err(names::PEER_CIDRS))?;
        }
        for (len, addr) in &cidr_removes {
            cidrs
                .remove(&cidr_trie_key(generation, *len, *addr))
                .map_err(map_err(names::PEER_CIDRS))?;
        }
    }
    update(&mut current.peer_cidrs, &cidr_writes, &cidr_removes);
    {
        let mut peers = dp.peer_ips()?;
        for (addr, v) in &peer_writes {
            peers
                .insert(
                    PeerIpKey {
                        addr: *addr,
                        generation,
                    },
                    v,
                    0,
                )
                .map_err(map_err(names::PEER_IPS))?;
        }
        for addr in &peer_removes {
            peers
                .remove(&PeerIpKey {
                    addr: *addr,
                    generation,
                })
                .map_err(map_err(names::PEER_IPS))?;
        }
    }
    update(&mut current.peer_ips, &peer_writes, &peer_removes);
    {
        let mut endpoints = dp.endpoints()?;
        for (ifindex, e) in &endpoint_writes {
            let key = EndpointKey {
                ifindex: *ifindex,
                generation,
            };
            endpoints
                .insert(key, e, 0)
                .map_err(map_err(names::ENDPOINTS))?;
        }
        for ifindex in &endpoint_removes {
            let key = EndpointKey {
                ifindex: *ifindex,
                generation,
            };
            endpoints.remove(&key).map_err(map_err(names::ENDPOINTS))?;
        }
    }
    update(&mut current.endpoints, &endpoint_writes, &endpoint_removes);
    let written =
        policy_writes.len() + peer_writes.len() + cidr_writes.len() + endpoint_writes.len();
    let removed =
        policy_removes.len() + peer_removes.len() + cidr_removes.len() + endpoint_removes.len();
    Ok((written, removed))
}

/// Applies written entries and removed keys to a known map.
fn update<K: Ord + Clone, V: Clone>(map: &mut BTreeMap<K, V>, writes: &[(K, V)], removes: &[K]) {
    for (k, v) in writes {
        map.insert(k.clone(), v.clone());
    }
    for k in removes {
        map.remove(k);
    }
}

/// Reads what generation `generation` of the verdict maps holds.
fn read_generation(dp: &mut Datapath, generation: u32) -> Result<Contents, DatapathError> {
    let mut contents = Contents::default();
    let mut policy = Vec::new();
    for entry in dp.policy()?.iter() {
        let (k, v) = entry.map_err(map_err(names::POLICY))?;
        if u32::from(k.generation) == generation {
            policy.push((PolicyKey { generation: 0, ..k }, v));
        }
    }
    contents.policy = policy.into_iter().collect();
    for entry in dp.peer_ips()?.iter() {
        let (k, v) = entry.map_err(map_err(names::PEER_IPS))?;
        if k.generation == generation {
            contents.peer_ips.insert(k.addr, v);
        }
    }
    for entry in dp.peer_cidrs()?.iter() {
        let (k, v) = entry.map_err(map_err(names::PEER_CIDRS))?;
        let data = k.data();
        if data.generation() == generation {
            let len = k.prefix_len() - CIDR_GENERATION_BITS;
            contents.peer_cidrs.insert((len, data.addr), v);
        }
    }
    for entry in dp.endpoints()?.iter() {
        let (k, v) = entry.map_err(map_err(names::ENDPOINTS))?;
        if k.generation == generation {
            contents.endpoints.insert(k.ifindex, v);
        }
    }
    Ok(contents)
}

impl Datapath {
    /// The generation of the verdict maps the classifier reads.
    pub fn active_generation(&mut self) -> Result<u32, DatapathError> {
        let config = self.config()?.get(&0, 0).map_err(map_err(names::CONFIG))?;
        Ok(config.generation & 1)
    }

    /// Switches the classifier to generation `generation` (one word written).
    pub fn set_active_generation(&mut self, generation: u32) -> Result<(), DatapathError> {
        let mut config = self.config()?;
        let current = config.get(&0, 0).map_err(map_err(names::CONFIG))?;
        config
            .set(
                0,
                Config {
                    generation,
                    ..current
                },
                0,
            )
            .map_err(map_err(names::CONFIG))
    }
}
