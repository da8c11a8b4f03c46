//! How far one watch has read, so that `Sync` can tell when the source has
//! caught up with the API server ([`Progress::has_caught_up`]).
//!
//! The API's `Sync` lists each watched kind with a consistent read (from
//! etcd, not the watch cache): a [`Snapshot`] of what the API server holds
//! at the list's resource version `R`, object by object. A watch has caught
//! up with it when either
//! - it has delivered an event at or after `R` (events come in order, so
//!   every change up to `R` was delivered before it), or
//! - the objects it has delivered are exactly the snapshot's, each at the
//!   same resource version: nothing changed since, so no event is due (the
//!   case of an idle kind, where the first test would wait forever).
//!
//! Resource versions are opaque by contract; the first test compares them
//! as numbers, which every etcd-backed API server makes them (etcd
//! revisions). When one does not parse, only the second test is made.

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::{ObjectList, PartialObjectMeta};
use kube::runtime::watcher::Event;

use super::track::object_ref;
use crate::model::ObjectRef;

/// Every object of a kind at one resource version, from a consistent list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The list's resource version, when it is a number.
    pub resource_version: Option<u64>,
    /// Each object's resource version.
    pub objects: HashMap<ObjectRef, String>,
}

impl Snapshot {
    /// The snapshot a metadata-only list gives.
    pub fn from_list<K: Clone>(list: &ObjectList<PartialObjectMeta<K>>) -> Self {
        Self {
            resource_version: number(list.metadata.resource_version.as_deref()),
            objects: list.items.iter().map(|o| versioned(&o.metadata)).collect(),
        }
    }
}

fn number(resource_version: Option<&str>) -> Option<u64> {
    resource_version?.parse().ok()
}

fn versioned(meta: &ObjectMeta) -> (ObjectRef, String) {
    (
        object_ref(meta),
        meta.resource_version.clone().unwrap_or_default(),
    )
}

/// What one watch has delivered (see the module docs).
#[derive(Debug, Default)]
pub struct Progress {
    /// Each object delivered and not deleted since, at its resource version.
    seen: HashMap<ObjectRef, String>,
    /// The objects of a list in progress (`Init` to `InitDone`).
    listing: Option<HashMap<ObjectRef, String>>,
    /// The newest resource version delivered, as a number.
    newest: Option<u64>,
}

impl Progress {
    /// Takes `event` into account; call it for every event, before its
    /// update is sent.
    pub fn observe<K: Resource>(&mut self, event: &Event<K>) {
        match event {
            Event::Init => self.listing = Some(HashMap::new()),
            Event::InitApply(object) => {
                self.note(object.meta());
                let (key, version) = versioned(object.meta());
                self.listing
                    .get_or_insert_with(HashMap::new)
                    .insert(key, version);
            }
            Event::InitDone => self.seen = self.listing.take().unwrap_or_default(),
            Event::Apply(object) => {
                self.note(object.meta());
                let (key, version) = versioned(object.meta());
                self.seen.insert(key, version);
            }
            Event::Delete(object) => {
                self.note(object.meta());
                self.seen.remove(&object_ref(object.meta()));
            }
        }
    }

    fn note(&mut self, meta: &ObjectMeta) {
        if let Some(version) = number(meta.resource_version.as_deref()) {
            self.newest = self.newest.max(Some(version));
        }
    }

    /// Whether everything up to `snapshot` has been delivered.
    pub fn has_caught_up(&self, snapshot: &Snapshot) -> bool {
        let past = matches!(
            (self.newest, snapshot.resource_version),
            (Some(newest), Some(target)) if newest >= target
        );
        past || (self.listing.is_none() && self.seen == snapshot.objects)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;

    fn pod(name: &str, rv: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn snapshot(rv: Option<u64>, objects: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            resource_version: rv,
            objects: objects
                .iter()
                .map(|(name, rv)| (ObjectRef::new("ns", *name), (*rv).to_owned()))
                .collect(),
        }
    }

    fn listed(objects: &[Pod]) -> Progress {
        let mut progress = Progress::default();
        progress.observe::<Pod>(&Event::Init);
        for object in objects {
            progress.observe(&Event::InitApply(object.clone()));
        }
        progress.observe::<Pod>(&Event::InitDone);
        progress
    }

    #[test]
    fn an_idle_kind_has_caught_up_when_it_holds_what_the_list_holds() {
        let progress = listed(&[pod("a", "10"), pod("b", "12")]);
        // The list read at 20: nothing changed since 12, no event will come.
        assert!(progress.has_caught_up(&snapshot(Some(20), &[("a", "10"), ("b", "12")])));
        // An object the watch has not delivered yet, or an older version.
        assert!(!progress.has_caught_up(&snapshot(
            Some(21),
            &[("a", "10"), ("b", "12"), ("c", "21")]
        )));
        assert!(!progress.has_caught_up(&snapshot(Some(21), &[("a", "10"), ("b", "21")])));
        // A deletion not delivered yet.
        assert!(!progress.has_caught_up(&snapshot(Some(21), &[("a", "10")])));
    }

    #[test]
    fn an_event_at_or_after_the_list_means_caught_up() {
        let mut progress = listed(&[pod("a", "10")]);
        let target = snapshot(Some(30), &[("a", "10"), ("b", "30")]);
        assert!(!progress.has_caught_up(&target));
        progress.observe(&Event::Apply(pod("b", "30")));
        assert!(progress.has_caught_up(&target));
        // Later events (another object changed meanwhile) keep it so.
        progress.observe(&Event::Apply(pod("c", "31")));
        assert!(progress.has_caught_up(&target));
        // A deletion carries the deletion's resource version.
        let mut progress = listed(&[pod("a", "10"), pod("b", "11")]);
        let target = snapshot(Some(40), &[("a", "10")]);
        assert!(!progress.has_caught_up(&target));
        progress.observe(&Event::Delete(pod("b", "40")));
        assert!(progress.has_caught_up(&target));
    }

    #[test]
    fn a_relist_in_progress_is_not_a_complete_view() {
        let mut progress = listed(&[pod("a", "10")]);
        progress.observe::<Pod>(&Event::Init);
        // Until InitDone the watch's objects are those of the old list plus
        // part of the new one: equality is not trusted...
        assert!(!progress.has_caught_up(&snapshot(None, &[("a", "10")])));
        progress.observe(&Event::InitApply(pod("a", "10")));
        assert!(!progress.has_caught_up(&snapshot(None, &[("a", "10")])));
        progress.observe::<Pod>(&Event::InitDone);
        assert!(progress.has_caught_up(&snapshot(None, &[("a", "10")])));
        // ...while a resource version already delivered still counts.
        progress.observe::<Pod>(&Event::Init);
        assert!(progress.has_caught_up(&snapshot(Some(10), &[("b", "9")])));
    }

    #[test]
    fn opaque_resource_versions_only_compare_equal() {
        let progress = listed(&[pod("a", "x7")]);
        assert!(progress.has_caught_up(&snapshot(None, &[("a", "x7")])));
        assert!(!progress.has_caught_up(&snapshot(None, &[("a", "x8")])));
        assert!(!progress.has_caught_up(&snapshot(Some(1), &[])));
    }
}
