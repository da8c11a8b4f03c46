//! The local endpoint registry: the pods of this node whose host-side
//! interface the agent enforces on, as the CNI plugin registered them.
//!
//! Keyed by container (sandbox) id. Each endpoint gets an endpoint id, the
//! key of its policy entries and its epoch slot, stable for as long as the
//! container id is registered (and across restarts: the registry is saved
//! in the state directory). Ids are the lowest free ones, from 1 up to
//! [`capacity::ENDPOINTS`] − 1.

use std::collections::BTreeMap;
use std::net::IpAddr;

use policy_common::capacity;
use serde::{Deserialize, Serialize};

use crate::compile::LocalEndpoint;
use crate::model::ObjectRef;

/// What the CNI plugin tells about a new endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub container_id: String,
    pub namespace: String,
    pub pod_name: String,
    pub netns_path: String,
    pub host_interface: String,
    pub ips: Vec<IpAddr>,
}

/// A registered endpoint, as saved in the state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub container_id: String,
    pub namespace: String,
    pub pod_name: String,
    pub netns_path: String,
    pub host_interface: String,
    /// Index of `host_interface` when it was registered.
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub ips: Vec<IpAddr>,
    /// Registration order: when one pod has several registered containers
    /// (a sandbox re-created before the old one was deleted), the latest
    /// registration is the pod's endpoint and the others are isolated.
    pub sequence: u64,
}

impl EndpointRecord {
    /// The pod this endpoint belongs to.
    pub fn pod(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.pod_name)
    }
}

/// Why a registration or a saved registry is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("no endpoint id left ({} endpoints at most)", capacity::ENDPOINTS - 1)]
    Exhausted,
    #[error("endpoint id {0} is outside 1..{max}", max = capacity::ENDPOINTS)]
    InvalidId(u32),
    #[error("endpoint id {0} is used twice")]
    DuplicateId(u32),
    #[error("container id {0:?} is registered twice")]
    DuplicateContainer(String),
}

/// How a registration changed the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// A new container id.
    New,
    /// A known container id, nothing changed.
    Unchanged,
    /// A known container id whose interface (or pod data) changed; the
    /// record before the change is returned with it.
    Changed,
}

/// Every registered endpoint.
#[derive(Clone, Debug, Default)]
pub struct EndpointRegistry {
    by_container: BTreeMap<String, EndpointRecord>,
    next_sequence: u64,
}

impl EndpointRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding saved records (checked: ids in range and unique).
    pub fn from_records(records: Vec<EndpointRecord>) -> Result<Self, RegistryError> {
        let mut this = Self::new();
        let mut ids = std::collections::BTreeSet::new();
        for record in records {
            if record.endpoint_id == 0 || record.endpoint_id >= capacity::ENDPOINTS {
                return Err(RegistryError::InvalidId(record.endpoint_id));
            }
            if !ids.insert(record.endpoint_id) {
                return Err(RegistryError::DuplicateId(record.endpoint_id));
            }
            if this.by_container.contains_key(&record.container_id) {
                return Err(RegistryError::DuplicateContainer(record.container_id));
            }
            this.next_sequence = this.next_sequence.max(record.sequence + 1);
            this.by_container
                .insert(record.container_id.clone(), record);
        }
        Ok(this)
    }

    /// The records, by container id.
    pub fn records(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.by_container.values()
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.by_container.len()
    }

    /// No endpoint registered.
    pub fn is_empty(&self) -> bool {
        self.by_container.is_empty()
    }

    /// One endpoint.
    pub fn get(&self, container_id: &str) -> Option<&EndpointRecord> {
        self.by_container.get(container_id)
    }

    /// Registers `spec` on interface `ifindex`: a new container id gets the
    /// lowest free endpoint id, a known one keeps its id. Returns the record
    /// and, for a known container id whose data changed, the old record.
    pub fn register(
        &mut self,
        spec: EndpointSpec,
        ifindex: u32,
    ) -> Result<(EndpointRecord, Registration, Option<EndpointRecord>), RegistryError> {
        let old = self.by_container.get(&spec.container_id).cloned();
        let (endpoint_id, sequence) = match &old {
            Some(old) => (old.endpoint_id, old.sequence),
            None => (self.free_id()?, self.take_sequence()),
        };
        let record = EndpointRecord {
            container_id: spec.container_id,
            namespace: spec.namespace,
            pod_name: spec.pod_name,
            netns_path: spec.netns_path,
            host_interface: spec.host_interface,
            ifindex,
            endpoint_id,
            ips: spec.ips,
            sequence,
        };
        let registration = match &old {
            None => Registration::New,
            Some(old) if *old == record => Registration::Unchanged,
            Some(_) => Registration::Changed,
        };
        self.by_container
            .insert(record.container_id.clone(), record.clone());
        let old = old.filter(|_| registration == Registration::Changed);
        Ok((record, registration, old))
    }

    /// Removes an endpoint.
    pub fn remove(&mut self, container_id: &str) -> Option<EndpointRecord> {
        self.by_container.remove(container_id)
    }

    /// The endpoints the compiler programs: per pod, its latest registration.
    pub fn local_endpoints(&self) -> BTreeMap<ObjectRef, LocalEndpoint> {
        let mut latest: BTreeMap<ObjectRef, &EndpointRecord> = BTreeMap::new();
        for record in self.by_container.values() {
            let entry = latest.entry(record.pod()).or_insert(record);
            if record.sequence > entry.sequence {
                *entry = record;
            }
        }
        latest
            .into_iter()
            .map(|(pod, r)| {
                (
                    pod,
                    LocalEndpoint {
                        ifindex: r.ifindex,
                        endpoint_id: r.endpoint_id,
                    },
                )
            })
            .collect()
    }

    fn free_id(&self) -> Result<u32, RegistryError> {
        let used: std::collections::BTreeSet<u32> =
            self.by_container.values().map(|r| r.endpoint_id).collect();
        (1..capacity::ENDPOINTS)
            .find(|id| !used.contains(id))
            .ok_or(RegistryError::Exhausted)
    }

    fn take_sequence(&mut self) -> u64 {
        let s = self.next_sequence;
        self.next_sequence += 1;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(container: &str, pod: &str, interface: &str) -> EndpointSpec {
        EndpointSpec {
            container_id: container.into(),
            namespace: "ns".into(),
            pod_name: pod.into(),
            netns_path: format!("/run/netns/{container}"),
            host_interface: interface.into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        }
    }

    #[test]
    fn ids_are_stable_per_container_and_reused_when_freed() {
        let mut reg = EndpointRegistry::new();
        let (a, how, _) = reg.register(spec("a", "pa", "v1"), 11).unwrap();
        assert_eq!((a.endpoint_id, how), (1, Registration::New));
        let (b, _, _) = reg.register(spec("b", "pb", "v2"), 12).unwrap();
        assert_eq!(b.endpoint_id, 2);
        // A retried ADD.
        let (a2, how, old) = reg.register(spec("a", "pa", "v1"), 11).unwrap();
        assert_eq!(
            (a2.endpoint_id, how, old),
            (1, Registration::Unchanged, None)
        );
        // The same container on a new interface keeps its id.
        let (a3, how, old) = reg.register(spec("a", "pa", "v9"), 19).unwrap();
        assert_eq!((a3.endpoint_id, how), (1, Registration::Changed));
        assert_eq!(old.unwrap().ifindex, 11);
        reg.remove("a").unwrap();
        let (c, _, _) = reg.register(spec("c", "pc", "v3"), 13).unwrap();
        assert_eq!(c.endpoint_id, 1);
    }

    #[test]
    fn latest_registration_of_a_pod_wins() {
        let mut reg = EndpointRegistry::new();
        reg.register(spec("old", "p", "v1"), 11).unwrap();
        reg.register(spec("new", "p", "v2"), 12).unwrap();
        let local = reg.local_endpoints();
        assert_eq!(local.len(), 1);
        assert_eq!(local[&ObjectRef::new("ns", "p")].ifindex, 12);
    }

    #[test]
    fn saved_records_round_trip_and_are_checked() {
        let mut reg = EndpointRegistry::new();
        reg.register(spec("a", "pa", "v1"), 11).unwrap();
        reg.register(spec("b", "pb", "v2"), 12).unwrap();
        let records: Vec<EndpointRecord> = reg.records().cloned().collect();
        let mut again = EndpointRegistry::from_records(records.clone()).unwrap();
        let (c, _, _) = again.register(spec("c", "pc", "v3"), 13).unwrap();
        assert_eq!(c.endpoint_id, 3);
        assert!(c.sequence > records.iter().map(|r| r.sequence).max().unwrap());

        let mut dup = records.clone();
        dup[1].endpoint_id = dup[0].endpoint_id;
        assert_eq!(
            EndpointRegistry::from_records(dup).unwrap_err(),
            RegistryError::DuplicateId(1)
        );
        let mut bad = records;
        bad[0].endpoint_id = 0;
        assert_eq!(
            EndpointRegistry::from_records(bad).unwrap_err(),
            RegistryError::InvalidId(0)
        );
    }
}
