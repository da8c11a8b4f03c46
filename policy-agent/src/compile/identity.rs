//! Numeric identities for label sets and ipBlock prefixes.
//!
//! Policy map entries are keyed by identity, not by address: every distinct
//! (namespace labels, pod labels) set gets one number, and so does every
//! distinct ipBlock prefix. A number stays with its key for as long as the
//! key is in use, can be carried across agent restarts by seeding the
//! allocator with the previous assignments, and is freed (and may be reused)
//! once no pod or policy uses its key.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use ipnet::IpNet;
use policy_common::FIRST_ALLOCATED_IDENTITY;
use serde::{Deserialize, Serialize};

use crate::model::{Labels, ObjectRef};

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKey {
    /// Pods with these labels in a namespace with these labels. Namespace
    /// labels include `kubernetes.io/metadata.name`, so pods of different
    /// namespaces never share an identity.
    Labels {
        /// The namespace's labels.
        namespace: Labels,
        /// The pods' labels.
        pod: Labels,
        /// The pods' named container ports as (name, IP protocol, port),
        /// sorted. Named ports resolve per destination pod, and policy
        /// entries are per identity: pods that share labels but not the
        /// numbers behind their port names must not share an identity.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        named_ports: Vec<(String, u8, u16)>,
    },
    /// Addresses whose longest matching ipBlock prefix is this one (masked).
    Cidr(IpNet),
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn labels(f: &mut fmt::Formatter<'_>, labels: &Labels) -> fmt::Result {
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}={v}")?;
            }
            Ok(())
        }
        match self {
            IdentityKey::Cidr(net) => write!(f, "cidr:{net}"),
            IdentityKey::Labels {
                namespace,
                pod,
                named_ports,
            } => {
                f.write_str("ns:{")?;
                labels(f, namespace)?;
                f.write_str("} pod:{")?;
                labels(f, pod)?;
                f.write_str("}")?;
                if !named_ports.is_empty() {
                    f.write_str(" ports:{")?;
                    for (i, (name, protocol, port)) in named_ports.iter().enumerate() {
                        let sep = if i > 0 { "," } else { "" };
                        write!(f, "{sep}{name}/{protocol}={port}")?;
                    }
                    f.write_str("}")?;
                }
                Ok(())
            }
        }
    }
}

/// Why the allocator cannot be seeded or cannot allocate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A seeded number is below [`FIRST_ALLOCATED_IDENTITY`].
    #[error("identity {0} is reserved (allocated identities start at {FIRST_ALLOCATED_IDENTITY})")]
    Reserved(u32),
    /// A number seeded twice.
    #[error("identity {0} is assigned twice")]
    DuplicateId(u32),
    /// A key seeded twice.
    #[error("key {0} is assigned two identities")]
    DuplicateKey(IdentityKey),
    /// Every number is taken.
    #[error("no identity number left")]
    Exhausted,
}

/// Hands out identity numbers, from [`FIRST_ALLOCATED_IDENTITY`] on.
///
/// A freed number goes to a free list and is handed out again (lowest first)
/// before new numbers, so the space stays dense.
#[derive(Clone, Debug)]
pub struct IdentityAllocator {
    /// Hashed: a lookup costs one hash and one comparison, not a dozen
    /// comparisons of label sets.
    by_key: HashMap<IdentityKey, u32>,
    by_id: BTreeMap<u32, IdentityKey>,
    free: BTreeSet<u32>,
    next: u32,
    /// Counts changes of the assignments (to know when to save them).
    changes: u64,
    /// The number each pod had at the last compile: a hint the compiler
    /// checks against the pod's current key before using it, so that it
    /// need not build and hash every pod's key on every compile.
    pods: HashMap<ObjectRef, u32>,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityAllocator {
    /// An allocator with nothing assigned.
    pub fn new() -> Self {
        Self {
            by_key: HashMap::new(),
            by_id: BTreeMap::new(),
            free: BTreeSet::new(),
            next: FIRST_ALLOCATED_IDENTITY,
            changes: 0,
            pods: HashMap::new(),
        }
    }

    /// An allocator that keeps earlier assignments (e.g. saved by a previous
    /// agent run). New numbers are handed out above the highest seeded one.
    pub fn from_assignments(
        assignments: impl IntoIterator<Item = (u32, IdentityKey)>,
    ) -> Result<Self, IdentityError> {
        let mut this = Self::new();
        for (id, key) in assignments {
            if id < FIRST_ALLOCATED_IDENTITY {
                return Err(IdentityError::Reserved(id));
            }
            if this.by_id.contains_key(&id) {
                return Err(IdentityError::DuplicateId(id));
            }
            if this.by_key.contains_key(&key) {
                return Err(IdentityError::DuplicateKey(key));
            }
            this.by_id.insert(id, key.clone());
            this.by_key.insert(key, id);
        }
        this.next = match this.by_id.last_key_value() {
            Some((&max, _)) => max.saturating_add(1),
            None => FIRST_ALLOCATED_IDENTITY,
        };
        Ok(this)
    }

    /// The number of `key`, if it has one.
    pub fn get(&self, key: &IdentityKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The key of number `id`, if it is assigned.
    pub fn key(&self, id: u32) -> Option<&IdentityKey> {
        self.by_id.get(&id)
    }

    /// The number of `key`, assigning one if it has none.
    pub fn allocate(&mut self, key: &IdentityKey) -> Result<u32, IdentityError> {
        if let Some(id) = self.get(key) {
            return Ok(id);
        }
        let id = match self.free.pop_first() {
            Some(id) => id,
            None => {
                // u32::MAX is never handed out, so `next` can always move on.
                if self.next == u32::MAX {
                    return Err(IdentityError::Exhausted);
                }
                let id = self.next;
                self.next += 1;
                id
            }
        };
        self.by_key.insert(key.clone(), id);
        self.by_id.insert(id, key.clone());
        self.changes += 1;
        Ok(id)
    }

    /// Frees the number of every key not in `used`; returns the freed numbers.
    pub fn retain(&mut self, used: &BTreeSet<IdentityKey>) -> Vec<u32> {
        let unused: Vec<(IdentityKey, u32)> = self
            .by_id
            .iter()
            .filter(|(_, k)| !used.contains(*k))
            .map(|(id, k)| (k.clone(), *id))
            .collect();
        let mut freed = Vec::with_capacity(unused.len());
        for (key, id) in unused {
            self.by_key.remove(&key);
            self.by_id.remove(&id);
            self.free.insert(id);
            freed.push(id);
        }
        freed.sort_unstable();
        self.changes += freed.len() as u64;
        freed
    }

    /// Frees every number not in `used`; returns the freed numbers.
    pub fn retain_ids(&mut self, used: &BTreeSet<u32>) -> Vec<u32> {
        let unused: Vec<u32> = self
            .by_id
            .keys()
            .filter(|id| !used.contains(*id))
            .copied()
            .collect();
        for &id in &unused {
            if let Some(key) = self.by_id.remove(&id) {
                self.by_key.remove(&key);
            }
            self.free.insert(id);
        }
        self.changes += unused.len() as u64;
        unused
    }

    /// The number `pod` had at the last compile (to be checked: see
    /// [`IdentityAllocator::remember`]).
    pub fn remembered(&self, pod: &ObjectRef) -> Option<u32> {
        self.pods.get(pod).copied()
    }

    /// Remembers the number of `pod`'s key, as a hint for the next compile.
    pub fn remember(&mut self, pod: &ObjectRef, id: u32) {
        match self.pods.get_mut(pod) {
            Some(slot) => *slot = id,
            None => {
                self.pods.insert(pod.clone(), id);
            }
        }
    }

    /// Forgets the hints of pods `keep` says are gone.
    pub fn forget_pods(&mut self, keep: impl Fn(&ObjectRef) -> bool) {
        self.pods.retain(|pod, _| keep(pod));
    }

    /// How many pods have a hint.
    pub fn remembered_pods(&self) -> usize {
        self.pods.len()
    }

    /// How many times the assignments changed since this allocator was
    /// made: equal counts mean equal assignments.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Every assignment, by number: what to save to keep numbers across
    /// restarts.
    pub fn assignments(&self) -> impl Iterator<Item = (u32, &IdentityKey)> {
        self.by_id.iter().map(|(id, key)| (*id, key))
    }

    /// How many numbers are assigned.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether nothing is assigned.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(app: &str) -> IdentityKey {
        IdentityKey::Labels {
            namespace: Labels::from([("kubernetes.io/metadata.name".into(), "ns".into())]),
            pod: Labels::from([("app".into(), app.into())]),
            named_ports: Vec::new(),
        }
    }

    #[test]
    fn allocates_from_first_and_keeps_numbers() -> Result<(), IdentityError> {
        let mut ids = IdentityAllocator::new();
        let a = ids.allocate(&key("a"))?;
        let b = ids.allocate(&key("b"))?;
        assert_eq!(
            (a, b),
            (FIRST_ALLOCATED_IDENTITY, FIRST_ALLOCATED_IDENTITY + 1)
        );
        assert_eq!(ids.allocate(&key("a"))?, a);
        let freed = ids.retain(&BTreeSet::from([key("b")]));
        assert_eq!(freed, vec![a]);
        assert_eq!(ids.get(&key("a")), None);
        assert_eq!(ids.get(&key("b")), Some(b));
        // The freed number is reused before a new one.
        assert_eq!(ids.allocate(&key("c"))?, a);
        assert_eq!(ids.allocate(&key("d"))?, b + 1);
        Ok(())
    }

    #[test]
    fn seeding_keeps_numbers_and_checks_them() -> Result<(), IdentityError> {
        let cidr = IdentityKey::Cidr("10.0.0.0/8".parse().expect("cidr"));
        let mut ids = IdentityAllocator::from_assignments([(300, key("a")), (260, cidr.clone())])?;
        assert_eq!(ids.get(&key("a")), Some(300));
        assert_eq!(ids.get(&cidr), Some(260));
        assert_eq!(ids.allocate(&key("b"))?, 301);
        let saved: Vec<(u32, IdentityKey)> =
            ids.assignments().map(|(id, k)| (id, k.clone())).collect();
        let again = IdentityAllocator::from_assignments(saved)?;
        assert_eq!(again.get(&key("b")), Some(301));

        assert_eq!(
            IdentityAllocator::from_assignments([(5, key("a"))]).err(),
            Some(IdentityError::Reserved(5))
        );
        assert_eq!(
            IdentityAllocator::from_assignments([(300, key("a")), (300, key("b"))]).err(),
            Some(IdentityError::DuplicateId(300))
        );
        assert!(matches!(
            IdentityAllocator::from_assignments([(300, key("a")), (301, key("a"))]),
            Err(IdentityError::DuplicateKey(_))
        ));
        Ok(())
    }

    #[test]
    fn keys_serialize_for_saving() -> Result<(), serde_json::Error> {
        let cidr = IdentityKey::Cidr("fd00::/64".parse().expect("cidr"));
        let text = serde_json::to_string(&[(256, &cidr), (257, &key("a"))])?;
        let back: Vec<(u32, IdentityKey)> = serde_json::from_str(&text)?;
        assert_eq!(back, vec![(256, cidr.clone()), (257, key("a"))]);
        assert_eq!(cidr.to_string(), "cidr:fd00::/64");
        Ok(())
    }
}
