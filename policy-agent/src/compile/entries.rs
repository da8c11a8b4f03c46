//! The desired contents of `PALISADE_POLICY`, held per endpoint.
//!
//! Every policy key starts with its endpoint id, so the map is a run of
//! per-endpoint blocks. Each block is shared ([`Arc`]) between the compiles
//! that did not change it, the map writer's record of what each generation
//! holds and the reconciler's last applied state: one copy in memory, and a
//! writer that skips an unchanged endpoint by comparing two pointers instead
//! of its entries.

use std::collections::BTreeMap;
use std::sync::Arc;

use policy_common::{PolicyKey, PolicyValue};

/// One endpoint's policy entries (all with its endpoint id).
pub type EndpointEntries = BTreeMap<PolicyKey, PolicyValue>;

/// `PALISADE_POLICY`, by endpoint id; no endpoint has an empty block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntries {
    by_endpoint: BTreeMap<u32, Arc<EndpointEntries>>,
}

impl PolicyEntries {
    /// The value of `key`.
    pub fn get(&self, key: &PolicyKey) -> Option<&PolicyValue> {
        self.by_endpoint.get(&key.endpoint_id)?.get(key)
    }

    /// Entries over all endpoints.
    pub fn len(&self) -> usize {
        self.by_endpoint.values().map(|e| e.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }

    /// Every entry in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&PolicyKey, &PolicyValue)> {
        self.by_endpoint.values().flat_map(|e| e.iter())
    }

    /// Every key in order.
    pub fn keys(&self) -> impl Iterator<Item = &PolicyKey> {
        self.iter().map(|(k, _)| k)
    }

    /// The block of each endpoint that has entries, by endpoint id.
    pub fn endpoints(&self) -> &BTreeMap<u32, Arc<EndpointEntries>> {
        &self.by_endpoint
    }

    /// Adds or replaces one entry (its endpoint's block is copied if shared).
    pub fn insert(&mut self, key: PolicyKey, value: PolicyValue) {
        let block = self.by_endpoint.entry(key.endpoint_id).or_default();
        Arc::make_mut(block).insert(key, value);
    }

    /// Sets the block of `endpoint_id` (removed when empty). Every key of
    /// `entries` must carry `endpoint_id`.
    pub fn set_endpoint(&mut self, endpoint_id: u32, entries: Arc<EndpointEntries>) {
        debug_assert!(entries.keys().all(|k| k.endpoint_id == endpoint_id));
        if entries.is_empty() {
            self.by_endpoint.remove(&endpoint_id);
        } else {
            self.by_endpoint.insert(endpoint_id, entries);
        }
    }
}

impl FromIterator<(PolicyKey, PolicyValue)> for PolicyEntries {
    fn from_iter<I: IntoIterator<Item = (PolicyKey, PolicyValue)>>(iter: I) -> Self {
        let mut blocks: BTreeMap<u32, EndpointEntries> = BTreeMap::new();
        for (key, value) in iter {
            blocks
                .entry(key.endpoint_id)
                .or_default()
                .insert(key, value);
        }
        Self {
            by_endpoint: blocks
                .into_iter()
                .map(|(id, entries)| (id, Arc::new(entries)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(rule: u32) -> PolicyValue {
        PolicyValue {
            any_port_rule: rule,
            ..PolicyValue::default()
        }
    }

    #[test]
    fn entries_read_back_by_key_and_in_key_order_across_endpoints() {
        let keys = [
            PolicyKey::new(9, 1, 0, 6),
            PolicyKey::new(2, 7, 1, 17),
            PolicyKey::new(2, 3, 0, 6),
        ];
        let entries: PolicyEntries = keys.iter().map(|k| (*k, value(k.identity))).collect();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries.get(&keys[1]), Some(&value(7)));
        assert_eq!(entries.get(&PolicyKey::new(2, 1, 0, 6)), None);
        assert_eq!(entries.get(&PolicyKey::new(5, 1, 0, 6)), None);
        let mut sorted = keys.to_vec();
        sorted.sort();
        assert_eq!(entries.keys().copied().collect::<Vec<_>>(), sorted);
        assert_eq!(
            entries.endpoints().keys().copied().collect::<Vec<_>>(),
            [2, 9]
        );
    }

    #[test]
    fn an_empty_block_is_no_block() {
        let mut entries: PolicyEntries = [(PolicyKey::new(4, 1, 0, 6), value(1))]
            .into_iter()
            .collect();
        entries.set_endpoint(4, Arc::default());
        assert!(entries.is_empty());
        assert_eq!(entries, PolicyEntries::default());
    }
}
