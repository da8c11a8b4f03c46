//! The cluster as the compiler sees it: namespaces, pods and policies, plus
//! the problems their conversion found.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;

use super::convert::{self, Converted};
use super::diagnostic::{Diagnostic, ObjectKind};
use super::error::ConvertError;
use super::objects::{NAMESPACE_NAME_LABEL, Namespace, ObjectRef, Pod};
use super::policy::Policy;
use super::selector::Labels;

/// Every namespace, pod and policy of the cluster, keyed for deterministic
/// iteration. Objects are added either converted ([`ClusterState::insert_pod`]
/// and friends) or straight from the API types ([`ClusterState::apply_pod`]
/// and friends, which keep the conversion's diagnostics with the object).
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    namespaces: BTreeMap<String, Namespace>,
    /// Shared: a pod that did not change keeps its allocation, which is how
    /// the compiler and the flow names recognise it without comparing.
    pods: BTreeMap<ObjectRef, Arc<Pod>>,
    policies: BTreeMap<ObjectRef, Policy>,
    diagnostics: BTreeMap<(ObjectKind, ObjectRef), Vec<Diagnostic>>,
}

impl ClusterState {
    /// An empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the state from full lists of API objects. Objects without a name
    /// or namespace are left out; their diagnostics are returned.
    pub fn from_k8s<'a>(
        namespaces: impl IntoIterator<Item = &'a core::Namespace>,
        pods: impl IntoIterator<Item = &'a core::Pod>,
        policies: impl IntoIterator<Item = &'a net::NetworkPolicy>,
    ) -> (Self, Vec<Diagnostic>) {
        let mut state = Self::new();
        let mut rejected = Vec::new();
        for ns in namespaces {
            if let Err(e) = state.apply_namespace(ns) {
                rejected.push(convert::rejected(ObjectKind::Namespace, &ns.metadata, &e));
            }
        }
        for pod in pods {
            if let Err(e) = state.apply_pod(pod) {
                rejected.push(convert::rejected(ObjectKind::Pod, &pod.metadata, &e));
            }
        }
        for policy in policies {
            if let Err(e) = state.apply_policy(policy) {
                rejected.push(convert::rejected(
                    ObjectKind::NetworkPolicy,
                    &policy.metadata,
                    &e,
                ));
            }
        }
        (state, rejected)
    }

    /// Adds or replaces a namespace.
    pub fn insert_namespace(&mut self, namespace: Namespace) {
        self.namespaces.insert(namespace.name.clone(), namespace);
    }

    /// Adds or replaces a pod, with the diagnostics of its conversion.
    pub fn insert_pod(&mut self, pod: Pod, diagnostics: Vec<Diagnostic>) {
        let key = pod.object_ref();
        self.set_diagnostics(ObjectKind::Pod, key.clone(), diagnostics);
        match self.pods.get(&key) {
            // A resync or an update of fields the model does not keep.
            Some(known) if **known == pod => {}
            _ => {
                self.pods.insert(key, Arc::new(pod));
            }
        }
    }

    /// Adds or replaces a policy, with the diagnostics of its conversion.
    pub fn insert_policy(&mut self, policy: Policy, diagnostics: Vec<Diagnostic>) {
        let key = policy.object_ref();
        self.set_diagnostics(ObjectKind::NetworkPolicy, key.clone(), diagnostics);
        self.policies.insert(key, policy);
    }

    /// Converts and adds or replaces a namespace.
    pub fn apply_namespace(&mut self, wire: &core::Namespace) -> Result<(), ConvertError> {
        self.insert_namespace(convert::namespace_from_k8s(wire)?);
        Ok(())
    }

    /// Converts and adds or replaces a pod.
    pub fn apply_pod(&mut self, wire: &core::Pod) -> Result<(), ConvertError> {
        let Converted { value, diagnostics } = convert::pod_from_k8s(wire)?;
        self.insert_pod(value, diagnostics);
        Ok(())
    }

    /// Converts and adds or replaces a policy.
    pub fn apply_policy(&mut self, wire: &net::NetworkPolicy) -> Result<(), ConvertError> {
        let Converted { value, diagnostics } = convert::policy_from_k8s(wire)?;
        self.insert_policy(value, diagnostics);
        Ok(())
    }

    /// Removes a namespace (its pods and policies stay until removed).
    pub fn remove_namespace(&mut self, name: &str) -> Option<Namespace> {
        self.namespaces.remove(name)
    }

    /// Removes a pod.
    pub fn remove_pod(&mut self, key: &ObjectRef) -> Option<Arc<Pod>> {
        self.diagnostics.remove(&(ObjectKind::Pod, key.clone()));
        self.pods.remove(key)
    }

    /// Removes a policy.
    pub fn remove_policy(&mut self, key: &ObjectRef) -> Option<Policy> {
        self.diagnostics
            .remove(&(ObjectKind::NetworkPolicy, key.clone()));
        self.policies.remove(key)
    }

    fn set_diagnostics(&mut self, kind: ObjectKind, key: ObjectRef, diagnostics: Vec<Diagnostic>) {
        if diagnostics.is_empty() {
            self.diagnostics.remove(&(kind, key));
        } else {
            self.diagnostics.insert((kind, key), diagnostics);
        }
    }

    /// The namespaces, by name.
    pub fn namespaces(&self) -> &BTreeMap<String, Namespace> {
        &self.namespaces
    }

    /// The pods, by namespace and name.
    pub fn pods(&self) -> &BTreeMap<ObjectRef, Arc<Pod>> {
        &self.pods
    }

    /// The policies, by namespace and name.
    pub fn policies(&self) -> &BTreeMap<ObjectRef, Policy> {
        &self.policies
    }

    /// One pod.
    pub fn pod(&self, key: &ObjectRef) -> Option<&Pod> {
        self.pods.get(key).map(|p| &**p)
    }

    /// The pods of one namespace.
    pub fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        let start = ObjectRef::new(namespace, "");
        self.pods
            .range(start..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, p)| &**p)
    }

    /// The policies of one namespace.
    pub fn policies_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Policy> + 'a {
        let start = ObjectRef::new(namespace, "");
        self.policies
            .range(start..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, p)| p)
    }

    /// The labels namespace selectors see for `namespace`: its labels, always
    /// with `kubernetes.io/metadata.name` = its name (also when the Namespace
    /// object is not known yet).
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        let mut labels = self
            .namespaces
            .get(namespace)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned());
        labels
    }

    /// The diagnostics of all stored objects' conversions, in object order.
    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.values().flatten()
    }

    /// The diagnostics of one stored object's conversion.
    pub fn diagnostics_of(&self, kind: ObjectKind, key: &ObjectRef) -> &[Diagnostic] {
        self.diagnostics
            .get(&(kind, key.clone()))
            .map_or(&[], Vec::as_slice)
    }
}
