//! Turning one kind's watcher events into [`SourceUpdate`]s, without I/O.
//!
//! [`Tracker`] buffers the objects of a list (`Init` … `InitApply` …
//! `InitDone`) and sends them as one [`SourceUpdate::Replace`], then turns
//! `Apply`/`Delete` events into [`SourceUpdate::Apply`]/[`SourceUpdate::Delete`].
//! Objects are trimmed first ([`super::trim`]), and an `Apply` whose trimmed
//! object (resource version aside) equals what was last sent is not sent
//! again: pod status updates (conditions, container statuses) and metadata
//! churn (managedFields, annotations) never reach the reconciler.
//!
//! An object the client cannot decode (a [`DeserializeGuard`] holding an
//! error) is logged as a warning and never makes the reconciler forget the
//! last version it could read: an `Apply` of it sends nothing, and a
//! `Replace` carries that last version. Dropping it instead would delete a
//! NetworkPolicy from enforcement, opening what it isolates. An object never
//! decoded at all stays absent (nothing is known of its selectors); a
//! `Delete` is always passed on.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::DeserializeGuard;
use kube::runtime::watcher::Event;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::trim;
use crate::model::ObjectRef;
use crate::source::{Kind, Object, Objects, SourceUpdate};

/// A kind the Kubernetes source watches and sends to the reconciler.
pub trait Watched:
    Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// The kind, as the reconciler knows it.
    const KIND: Kind;
    /// The object reduced to what the agent uses.
    fn trim(self) -> Self;
    /// One object for [`SourceUpdate::Apply`].
    fn into_object(self) -> Object;
    /// All objects for [`SourceUpdate::Replace`].
    fn into_objects(list: Vec<Self>) -> Objects;
}

impl Watched for core::Namespace {
    const KIND: Kind = Kind::Namespace;
    fn trim(self) -> Self {
        trim::trim_namespace(self)
    }
    fn into_object(self) -> Object {
        Object::Namespace(Box::new(self))
    }
    fn into_objects(list: Vec<Self>) -> Objects {
        Objects::Namespaces(list)
    }
}

impl Watched for core::Pod {
    const KIND: Kind = Kind::Pod;
    fn trim(self) -> Self {
        trim::trim_pod(self)
    }
    fn into_object(self) -> Object {
        Object::Pod(Box::new(self))
    }
    fn into_objects(list: Vec<Self>) -> Objects {
        Objects::Pods(list)
    }
}

impl Watched for net::NetworkPolicy {
    const KIND: Kind = Kind::NetworkPolicy;
    fn trim(self) -> Self {
        trim::trim_policy(self)
    }
    fn into_object(self) -> Object {
        Object::NetworkPolicy(Box::new(self))
    }
    fn into_objects(list: Vec<Self>) -> Objects {
        Objects::NetworkPolicies(list)
    }
}

/// The key of an object in [`SourceUpdate::Delete`]: namespace and name; a
/// namespace (cluster-scoped) has an empty `namespace` and its own name as
/// `name`.
pub fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A hash of what the reconciler would see of a trimmed object, resource
/// version aside (it changes on every write, also on writes of fields the
/// trimming drops). Only compared within one process. `None` (never equal to
/// anything) if the object cannot be serialized, which k8s-openapi types can.
fn fingerprint<K: Watched>(object: &K) -> Option<u64> {
    let mut object = object.clone();
    object.meta_mut().resource_version = None;
    let bytes = serde_json::to_vec(&object).ok()?;
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

/// The last decodable version of an object the reconciler has, and its fingerprint.
#[derive(Debug)]
struct Sent<K> {
    print: Option<u64>,
    object: K,
}

/// Per-kind translation of watcher events (see the module docs).
#[derive(Debug)]
pub struct Tracker<K> {
    /// Objects of the list in progress (between `Init` and `InitDone`).
    listing: Option<Vec<K>>,
    /// What the list in progress sent of each object.
    listing_sent: HashMap<ObjectRef, Sent<K>>,
    /// What the reconciler has of each object: the last decodable version.
    sent: HashMap<ObjectRef, Sent<K>>,
    /// Objects that could not be decoded since the last warning summary.
    malformed: u64,
}

impl<K> Default for Tracker<K> {
    fn default() -> Self {
        Self {
            listing: None,
            listing_sent: HashMap::new(),
            sent: HashMap::new(),
            malformed: 0,
        }
    }
}

impl<K: Watched> Tracker<K> {
    /// A tracker that has sent nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many objects could not be decoded so far.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// How many objects the reconciler currently has from this tracker.
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    /// Whether the reconciler has no object from this tracker.
    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    fn decode(&mut self, guard: DeserializeGuard<K>) -> Result<K, ObjectRef> {
        match guard.0 {
            Ok(object) => Ok(object.trim()),
            Err(invalid) => {
                self.malformed += 1;
                let key = object_ref(&invalid.metadata);
                tracing::warn!(
                    kind = ?K::KIND,
                    object = %key,
                    error = %invalid.error,
                    "cannot decode object from the API server; treating it as absent"
                );
                Err(key)
            }
        }
    }

    /// The update to send for `event`, if any.
    pub fn handle(&mut self, event: Event<DeserializeGuard<K>>) -> Option<SourceUpdate> {
        match event {
            Event::Init => {
                self.listing = Some(Vec::new());
                self.listing_sent.clear();
                None
            }
            Event::InitApply(guard) => {
                let object = match self.decode(guard) {
                    Ok(object) => object,
                    // Keep the last version read, if any.
                    Err(key) => match self.sent.get(&key) {
                        Some(last) => last.object.clone(),
                        None => return None,
                    },
                };
                let key = object_ref(object.meta());
                let print = fingerprint(&object);
                self.listing_sent.insert(
                    key,
                    Sent {
                        print,
                        object: object.clone(),
                    },
                );
                self.listing.get_or_insert_with(Vec::new).push(object);
                None
            }
            Event::InitDone => {
                let objects = self.listing.take().unwrap_or_default();
                self.sent = std::mem::take(&mut self.listing_sent);
                tracing::info!(kind = ?K::KIND, objects = objects.len(), "listed");
                Some(SourceUpdate::Replace(K::into_objects(objects)))
            }
            Event::Apply(guard) => match self.decode(guard) {
                Ok(object) => {
                    let key = object_ref(object.meta());
                    let print = fingerprint(&object);
                    if print.is_some() && self.sent.get(&key).map(|s| s.print) == Some(print) {
                        tracing::trace!(kind = ?K::KIND, object = %key, "unchanged after trimming");
                        return None;
                    }
                    self.sent.insert(
                        key,
                        Sent {
                            print,
                            object: object.clone(),
                        },
                    );
                    Some(SourceUpdate::Apply(object.into_object()))
                }
                Err(key) => {
                    if self.sent.contains_key(&key) {
                        tracing::warn!(
                            kind = ?K::KIND,
                            object = %key,
                            "keeping the last version of the object that could be read"
                        );
                    }
                    None
                }
            },
            Event::Delete(guard) => {
                let key = object_ref(guard.meta());
                if guard.0.is_err() {
                    tracing::debug!(kind = ?K::KIND, object = %key, "deleted object was malformed");
                }
                self.sent.remove(&key);
                Some(SourceUpdate::Delete(K::KIND, key))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodStatus};
    use kube::core::error_boundary::InvalidObject;
    use serde_json::json;

    use super::*;

    fn pod(name: &str, rv: &str, app: &str, ip: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(rv.into()),
                labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
                managed_fields: Some(vec![Default::default()]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_owned),
                ..PodStatus::default()
            }),
        }
    }

    fn ok<K>(k: K) -> DeserializeGuard<K> {
        DeserializeGuard(Ok(k))
    }

    fn bad<K>(namespace: &str, name: &str) -> DeserializeGuard<K> {
        DeserializeGuard(Err(InvalidObject {
            error: "invalid type: string \"x\", expected a sequence".into(),
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
        }))
    }

    fn pods_of(update: Option<SourceUpdate>) -> Vec<Pod> {
        match update {
            Some(SourceUpdate::Replace(Objects::Pods(pods))) => pods,
            other => panic!("expected a Replace of pods, got {other:?}"),
        }
    }

    fn applied_pod(update: Option<SourceUpdate>) -> Pod {
        match update {
            Some(SourceUpdate::Apply(Object::Pod(pod))) => *pod,
            other => panic!("expected an Apply of a pod, got {other:?}"),
        }
    }

    #[test]
    fn list_is_buffered_until_init_done() {
        let mut t = Tracker::<Pod>::new();
        assert!(t.handle(Event::Init).is_none());
        assert!(
            t.handle(Event::InitApply(ok(pod("a", "1", "web", Some("10.0.0.1")))))
                .is_none()
        );
        assert!(
            t.handle(Event::InitApply(ok(pod("b", "2", "db", None))))
                .is_none()
        );
        let pods = pods_of(t.handle(Event::InitDone));
        assert_eq!(pods.len(), 2);
        assert!(
            pods.iter().all(|p| p.metadata.managed_fields.is_none()),
            "trimmed"
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn empty_list_is_an_empty_replace() {
        let mut t = Tracker::<Namespace>::new();
        t.handle(Event::Init);
        match t.handle(Event::InitDone) {
            Some(SourceUpdate::Replace(Objects::Namespaces(list))) => assert!(list.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn relist_replaces_with_the_fresh_list_only() {
        let mut t = Tracker::<Pod>::new();
        t.handle(Event::Init);
        t.handle(Event::InitApply(ok(pod("a", "1", "web", None))));
        t.handle(Event::InitApply(ok(pod("b", "2", "web", None))));
        pods_of(t.handle(Event::InitDone));
        t.handle(Event::Apply(ok(pod("c", "3", "web", None))));

        // The watch restarts: the fresh list has only b (relabelled) and d.
        t.handle(Event::Init);
        t.handle(Event::InitApply(ok(pod("b", "5", "db", None))));
        t.handle(Event::InitApply(ok(pod("d", "6", "web", None))));
        let pods = pods_of(t.handle(Event::InitDone));
        let names: Vec<_> = pods
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!(pods[0].metadata.labels.as_ref().unwrap()["app"], "db");
        assert_eq!(t.len(), 2);

        // After the re-list, an unchanged b is not sent again; a is new again.
        assert!(
            t.handle(Event::Apply(ok(pod("b", "7", "db", None))))
                .is_none()
        );
        applied_pod(t.handle(Event::Apply(ok(pod("a", "8", "web", None)))));
    }

    #[test]
    fn apply_sends_changes_only() {
        let mut t = Tracker::<Pod>::new();
        t.handle(Event::Init);
        t.handle(Event::InitApply(ok(pod("a", "1", "web", None))));
        t.handle(Event::InitDone);

        // Same content, new resource version and managedFields: nothing.
        assert!(
            t.handle(Event::Apply(ok(pod("a", "2", "web", None))))
                .is_none()
        );
        // Status change the agent does not use: nothing.
        let mut with_conditions = pod("a", "3", "web", None);
        with_conditions.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        assert!(t.handle(Event::Apply(ok(with_conditions))).is_none());
        // Address assigned: sent, trimmed, with its resource version.
        let sent = applied_pod(t.handle(Event::Apply(ok(pod("a", "4", "web", Some("10.0.0.9"))))));
        assert_eq!(sent.status.unwrap().pod_ip.as_deref(), Some("10.0.0.9"));
        assert_eq!(sent.metadata.resource_version.as_deref(), Some("4"));
        assert!(sent.metadata.managed_fields.is_none());
        // Relabelled: sent.
        applied_pod(t.handle(Event::Apply(ok(pod("a", "5", "db", Some("10.0.0.9"))))));
    }

    #[test]
    fn delete_is_sent_with_the_object_ref() {
        let mut t = Tracker::<Pod>::new();
        t.handle(Event::Init);
        t.handle(Event::InitApply(ok(pod("a", "1", "web", None))));
        t.handle(Event::InitDone);
        match t.handle(Event::Delete(ok(pod("a", "2", "web", None)))) {
            Some(SourceUpdate::Delete(Kind::Pod, r)) => assert_eq!(r, ObjectRef::new("ns", "a")),
            other => panic!("{other:?}"),
        }
        assert!(t.is_empty());
        // A recreated pod with the same content is sent again.
        applied_pod(t.handle(Event::Apply(ok(pod("a", "3", "web", None)))));
    }

    #[test]
    fn namespace_delete_has_empty_namespace() {
        let mut t = Tracker::<Namespace>::new();
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match t.handle(Event::Delete(ok(ns))) {
            Some(SourceUpdate::Delete(Kind::Namespace, r)) => {
                assert_eq!(r, ObjectRef::new("", "shop"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_objects_keep_their_last_version_and_do_not_stop_anything() {
        let mut t = Tracker::<Pod>::new();
        t.handle(Event::Init);
        t.handle(Event::InitApply(ok(pod("a", "1", "web", None))));
        t.handle(Event::InitApply(bad("ns", "broken")));
        t.handle(Event::InitApply(ok(pod("b", "1", "web", None))));
        assert_eq!(pods_of(t.handle(Event::InitDone)).len(), 2);
        assert_eq!(t.malformed(), 1);

        // A malformed version of a known object: the last good one stays.
        assert!(t.handle(Event::Apply(bad("ns", "a"))).is_none());
        // And a re-list that cannot decode it still carries it.
        t.handle(Event::Init);
        t.handle(Event::InitApply(bad("ns", "a")));
        let relisted = pods_of(t.handle(Event::InitDone));
        assert_eq!(relisted.len(), 1, "{relisted:?}");
        // A malformed object never sent: nothing.
        assert!(t.handle(Event::Apply(bad("ns", "broken"))).is_none());
        // Deleting a malformed object still says so.
        assert!(matches!(
            t.handle(Event::Delete(bad("ns", "broken"))),
            Some(SourceUpdate::Delete(Kind::Pod, _))
        ));
        // Later events are handled as usual.
        applied_pod(t.handle(Event::Apply(ok(pod("a", "9", "api", None)))));
        assert_eq!(t.malformed(), 4);
    }

    #[test]
    fn guard_catches_a_malformed_pod_from_json() {
        // The shape DeserializeGuard produces for a pod whose spec is broken:
        // the watch decodes it instead of failing the whole stream.
        let guard: DeserializeGuard<Pod> = serde_json::from_value(json!({
            "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "3"},
            "spec": {"containers": "not-a-list"}
        }))
        .unwrap();
        let mut t = Tracker::<Pod>::new();
        t.handle(Event::Init);
        t.handle(Event::InitApply(guard));
        assert!(pods_of(t.handle(Event::InitDone)).is_empty());
        assert_eq!(t.malformed(), 1);
    }
}
