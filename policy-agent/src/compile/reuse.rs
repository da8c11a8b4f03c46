//! What one compile hands to the next, so that a change recomputes only the
//! endpoints it touches.
//!
//! An endpoint's policy entries are a function of the rules that apply to it
//! (each rule's id, direction and [`RulePlan`]) and, for ingress named ports,
//! of its own container ports. Every compile still plans every rule that
//! applies to a local endpoint (cheap: a few selector matches); a plan equal
//! to the previous compile's keeps the previous allocation, so "same inputs"
//! is a comparison of pointers, and an endpoint whose inputs are all the same
//! keeps its previous block: entries, diagnostics and peer flags. The result
//! is identical to compiling from nothing (a property test checks it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use policy_common::{Direction, EndpointInfo, PolicyKey, PolicyValue};

use super::entries::EndpointEntries;
use super::identity::{IdentityAllocator, IdentityKey};
use super::ports::{Fit, ValueBuilder};
use super::rules::{RuleIds, RuleRef};
use super::{Grant, RulePlan};
use crate::model::{
    Diagnostic, DiagnosticCode, Labels, NamedPort, ObjectRef, Pod, Policy, Severity,
};
use policy_common::identity as reserved;

/// A rule's coordinates: policy, direction, index.
pub(super) type RuleCoordinates = (ObjectRef, Direction, usize);

/// The previous compile's plans and endpoint blocks. Start with
/// `CompileMemo::default()` and pass the same one to every
/// [`compile_reusing`](super::compile_reusing) of one allocator.
#[derive(Debug, Default)]
pub struct CompileMemo {
    plans: BTreeMap<RuleCoordinates, Arc<RulePlan>>,
    blocks: BTreeMap<u32, Arc<EndpointBlock>>,
    /// Every peer pod of the last compile (the state's allocation) and its
    /// identity, in pod order: a pod still in the same allocation, in a
    /// namespace with the same labels, has the same identity key.
    pod_identities: Vec<(Arc<Pod>, u32)>,
    /// The namespace labels of the last compile.
    namespace_labels: BTreeMap<String, Labels>,
    rule_ids: Option<AssignedRuleIds>,
}

/// Rule ids and the shape they were assigned for: (policy, ingress rules,
/// egress rules), on which ids depend alone.
#[derive(Debug)]
struct AssignedRuleIds {
    shape: Vec<(ObjectRef, usize, usize)>,
    ids: Arc<RuleIds>,
    map: Arc<BTreeMap<u32, RuleRef>>,
}

/// Walks the last compile's pods alongside the current ones (both in pod
/// order).
pub(super) struct LastCompilePods<'m> {
    rest: std::iter::Peekable<std::slice::Iter<'m, (Arc<Pod>, u32)>>,
}

impl LastCompilePods<'_> {
    /// The identity `pod` had at the last compile if it is the same
    /// allocation; call in pod order.
    pub(super) fn unchanged(&mut self, pod_ref: &ObjectRef, pod: &Arc<Pod>) -> Option<u32> {
        while let Some((last, id)) = self.rest.peek() {
            if Arc::ptr_eq(last, pod) {
                self.rest.next();
                return Some(*id);
            }
            let order = (last.namespace.as_str(), last.name.as_str())
                .cmp(&(pod_ref.namespace.as_str(), pod_ref.name.as_str()));
            if order == std::cmp::Ordering::Less {
                self.rest.next();
            } else {
                // Changed (same name, other allocation) or new.
                return None;
            }
        }
        None
    }
}

/// One rule applied to an endpoint.
#[derive(Clone, Debug)]
pub(super) struct RuleUse {
    pub rule_id: u32,
    pub direction: Direction,
    pub plan: Arc<RulePlan>,
}

impl PartialEq for RuleUse {
    fn eq(&self, other: &Self) -> bool {
        self.rule_id == other.rule_id
            && self.direction == other.direction
            && Arc::ptr_eq(&self.plan, &other.plan)
    }
}

/// An endpoint's share of the policy map and what it was made from.
#[derive(Debug)]
pub(super) struct EndpointBlock {
    uses: Vec<RuleUse>,
    owner: ObjectRef,
    named_ports: Vec<NamedPort>,
    pub entries: Arc<EndpointEntries>,
    /// Port ranges merged or left out, for this endpoint's keys.
    pub diagnostics: Vec<Diagnostic>,
    /// [`EndpointInfo`]'s ANY and CIDR peer flags its entries call for.
    pub peer_flags: u32,
}

impl CompileMemo {
    /// `fresh`, or the previous compile's allocation of an equal plan.
    pub(super) fn plan(&self, rule: &RuleCoordinates, fresh: RulePlan) -> Arc<RulePlan> {
        match self.plans.get(rule) {
            Some(previous) if **previous == fresh => previous.clone(),
            _ => Arc::new(fresh),
        }
    }

    /// The previous block of `endpoint_id` if it was made from the same
    /// inputs.
    pub(super) fn block(
        &self,
        endpoint_id: u32,
        owner: &ObjectRef,
        pod: &Pod,
        uses: &[RuleUse],
    ) -> Option<Arc<EndpointBlock>> {
        self.blocks
            .get(&endpoint_id)
            .filter(|b| b.uses == uses && b.owner == *owner && b.named_ports == pod.named_ports)
            .cloned()
    }

    /// The rule ids of `policies`, the last compile's when their rules are
    /// the same.
    pub(super) fn rule_ids(
        &mut self,
        policies: &BTreeMap<ObjectRef, Policy>,
    ) -> (Arc<RuleIds>, Arc<BTreeMap<u32, RuleRef>>) {
        if let Some(known) = &self.rule_ids
            && known.shape.len() == policies.len()
            && known
                .shape
                .iter()
                .zip(policies)
                .all(|((r, i, e), (key, p))| {
                    r == key && *i == p.ingress.len() && *e == p.egress.len()
                })
        {
            return (known.ids.clone(), known.map.clone());
        }
        let ids = RuleIds::assign(policies.values());
        let map = Arc::new(ids.map().clone());
        let ids = Arc::new(ids);
        let shape = policies
            .iter()
            .map(|(key, p)| (key.clone(), p.ingress.len(), p.egress.len()))
            .collect();
        self.rule_ids = Some(AssignedRuleIds {
            shape,
            ids: ids.clone(),
            map: map.clone(),
        });
        (ids, map)
    }

    /// The last compile's pods, to walk in pod order.
    pub(super) fn pod_identities(&self) -> LastCompilePods<'_> {
        LastCompilePods {
            rest: self.pod_identities.iter().peekable(),
        }
    }

    /// Namespaces whose labels are not those of the last compile.
    pub(super) fn relabelled_namespaces<'n>(
        &self,
        current: &BTreeMap<&'n str, Labels>,
    ) -> BTreeSet<&'n str> {
        current
            .iter()
            .filter(|(name, labels)| self.namespace_labels.get(**name) != Some(*labels))
            .map(|(name, _)| *name)
            .collect()
    }

    /// Keeps this compile's pod identities and namespace labels.
    pub(super) fn keep_pod_identities(
        &mut self,
        pods: impl Iterator<Item = (Arc<Pod>, u32)>,
        namespace_labels: &BTreeMap<&str, Labels>,
    ) {
        self.pod_identities = pods.collect();
        let unchanged = self.namespace_labels.len() == namespace_labels.len()
            && self
                .namespace_labels
                .iter()
                .zip(namespace_labels)
                .all(|((a, la), (b, lb))| a == b && la == lb);
        if !unchanged {
            self.namespace_labels = namespace_labels
                .iter()
                .map(|(name, labels)| ((*name).to_owned(), labels.clone()))
                .collect();
        }
    }

    /// Keeps this compile's plans and blocks for the next one.
    pub(super) fn keep(
        &mut self,
        plans: BTreeMap<RuleCoordinates, Arc<RulePlan>>,
        blocks: BTreeMap<u32, Arc<EndpointBlock>>,
    ) {
        self.plans = plans;
        self.blocks = blocks;
    }
}

impl EndpointBlock {
    /// The entries of `uses` for the endpoint of `pod`.
    pub(super) fn build(
        endpoint_id: u32,
        owner: &ObjectRef,
        pod: &Pod,
        uses: Vec<RuleUse>,
        ids: &IdentityAllocator,
    ) -> Self {
        let mut grants: Vec<(PolicyKey, Grant)> = Vec::new();
        for u in &uses {
            u.plan
                .emit(&mut grants, endpoint_id, u.direction, u.rule_id, pod);
        }
        // Sorted once, then each key's value built from its run.
        grants.sort_unstable_by_key(|(key, _)| *key);
        let mut entries: Vec<(PolicyKey, PolicyValue)> = Vec::new();
        let mut diagnostics = Vec::new();
        let mut builder = ValueBuilder::default();
        for (i, (key, grant)) in grants.iter().enumerate() {
            match *grant {
                Grant::AnyPort(rule) => builder.allow_any(rule),
                Grant::Range(first, last, rule) => builder.allow_range(first, last, rule),
            }
            if grants.get(i + 1).is_some_and(|(next, _)| next == key) {
                continue;
            }
            let (value, fit) = std::mem::take(&mut builder).build();
            if let Some(d) = fit_diagnostic(owner, key, fit) {
                diagnostics.push(d);
            }
            entries.push((*key, value));
        }
        let peer_flags = entries
            .iter()
            .fold(0, |flags, (key, _)| flags | peer_flag(key, ids));
        Self {
            uses,
            owner: owner.clone(),
            named_ports: pod.named_ports.clone(),
            // Sorted and unique: built in bulk.
            entries: Arc::new(entries.into_iter().collect()),
            diagnostics,
            peer_flags,
        }
    }
}

/// The ANY or CIDR peer flag a key calls for, so the classifier skips
/// lookups that cannot hit.
fn peer_flag(key: &PolicyKey, ids: &IdentityAllocator) -> u32 {
    if key.identity == reserved::ANY {
        EndpointInfo::any_peer_flag(key.direction)
    } else if matches!(ids.key(key.identity), Some(IdentityKey::Cidr(_))) {
        EndpointInfo::cidr_peer_flag(key.direction)
    } else {
        0
    }
}

/// What to report when a key's port ranges did not fit its value as they are.
fn fit_diagnostic(owner: &ObjectRef, key: &PolicyKey, fit: Fit) -> Option<Diagnostic> {
    let what = || {
        format!(
            "{} to/from identity {} protocol {}",
            Direction::try_from(key.direction).map_or("?", |d| d.as_str()),
            key.identity,
            key.protocol
        )
    };
    match fit {
        Fit::Exact => None,
        Fit::Coalesced => Some(Diagnostic::pod(
            &owner.namespace,
            &owner.name,
            Severity::Info,
            DiagnosticCode::PortRangesCoalesced,
            format!(
                "{}: port ranges of several rules merged to fit; flows may name a neighbouring rule",
                what()
            ),
        )),
        Fit::Overflow(left_out) => Some(Diagnostic::pod(
            &owner.namespace,
            &owner.name,
            Severity::Error,
            DiagnosticCode::PortRangesOverflow,
            format!(
                "{}: more than {} port ranges; these allowed ranges are DENIED: {}",
                what(),
                policy_common::MAX_PORT_RANGES,
                left_out
                    .iter()
                    .map(|(f, l)| format!("{f}-{l}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
