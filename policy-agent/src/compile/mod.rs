//! The policy compiler: a pure function from cluster state to the desired
//! contents of the classifier's maps.
//!
//! [`compile`] takes every namespace, pod and policy of the cluster and this
//! node's endpoints, and returns [`Desired`]: what `PALISADE_ENDPOINTS`,
//! `PALISADE_PEER_IPS`, `PALISADE_PEER_CIDRS` and `PALISADE_POLICY` should
//! hold, plus the rule-id table and the diagnostics. The map writer applies
//! the difference with what the maps hold.
//!
//! # How the spec maps onto the maps
//!
//! The classifier decides a new connection with
//! [`policy_common::verdict::allowing_rule`]: it resolves the peer address to
//! a [`PeerInfo`] (exact pod/node entry, else the longest ipBlock prefix,
//! else world) and looks up (endpoint, peer identity | peer CIDR identity |
//! ANY, direction, protocol), then the port in the value. The compiler makes
//! that lookup succeed exactly when NetworkPolicy v1 allows the connection:
//!
//! * An endpoint is isolated in a direction iff a policy of its namespace
//!   selects it and declares that direction; only isolated directions get
//!   entries (the classifier allows all otherwise).
//! * Each rule of each such policy contributes, for each peer key, its ports:
//!   no peers → [`policy_common::identity::ANY`]; selector peers → the identities of the
//!   matching pods (identities are per label set, so all pods of one match
//!   alike); ipBlock → the CIDR identities of the prefixes inside the block
//!   and outside its excepts (exact: see the `peers` module).
//! * No ports → every port of TCP, UDP, SCTP and every other protocol; a
//!   protocol without port → every port of it; `port`/`endPort` → a range.
//! * A named port resolves per destination pod: for ingress on the endpoint's
//!   own container ports; for egress on each destination pod's, so egress
//!   named ports are keyed by the destination's pod identity whatever the
//!   rule's peers are, and allow nothing towards non-pod destinations.
//!
//! # Decisions where the maps cannot express the spec exactly
//!
//! * Egress named ports are resolved per identity: if pods (or addresses of
//!   pods, for ipBlock peers) of one identity disagree, the identity gets the
//!   ports all of them agree on (never more than the spec allows) and a
//!   [`DiagnosticCode::NamedPortInexact`] warning is emitted.
//! * More port ranges for one key than a map value holds: ranges are merged
//!   across rules (exact, attribution approximate: Info diagnostic); if still
//!   too many, the excess ranges are denied with an Error diagnostic.
//! * Host-network pods have the node's addresses: they get no peer entries
//!   and no identity as peers; the datapath sees them as the node (HOST) or
//!   the world.
//! * Two pods with one address: the first in (namespace, name) order keeps
//!   it; a warning names the other.
//! * A local endpoint whose Pod is unknown, or scheduled on another node, is
//!   isolated both ways with no entries (fail closed).

mod entries;
pub mod identity;
pub mod lookup;
mod peers;
mod ports;
mod reuse;
pub mod rules;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use policy_common::identity as reserved;
use policy_common::{
    Addr, Direction, EndpointInfo, PeerInfo, PolicyKey, V4_MAPPED_PREFIX_LEN, v4_mapped,
};

pub use entries::{EndpointEntries, PolicyEntries};
pub use identity::{IdentityAllocator, IdentityError, IdentityKey};
pub use reuse::CompileMemo;
pub use rules::{RuleIds, RuleRef};

use crate::model::{
    ClusterState, Diagnostic, DiagnosticCode, LabelSelector, Labels, ObjectKind, ObjectRef, Peer,
    Peers, Pod, Policy, Protocol, Rule, Severity,
};
use peers::{Group, Prefixes, addr, collect_prefixes, prefix_key};
use ports::{PortTarget, port_targets};
use reuse::{EndpointBlock, RuleUse};

/// The interface of a pod on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalEndpoint {
    /// Index of the host-side interface (the `PALISADE_ENDPOINTS` key).
    pub ifindex: u32,
    /// The endpoint's id in policy keys.
    pub endpoint_id: u32,
}

/// What is local to the node the agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeScope {
    /// This node's name (pods' `spec.nodeName`).
    pub node_name: String,
    /// This node's addresses: peers with these addresses are [`policy_common::identity::HOST`].
    pub node_ips: Vec<IpAddr>,
    /// The pods of this node that have a registered interface. Only these get
    /// endpoint and policy entries; every other pod is only a peer.
    pub endpoints: BTreeMap<ObjectRef, LocalEndpoint>,
}

/// The desired contents of the classifier's maps, and what the compiler found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// `PALISADE_ENDPOINTS`, by host-side interface index. Epochs are 0: the
    /// map writer manages them.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// `PALISADE_PEER_IPS`: pod and node addresses (IPv4 as IPv4-mapped).
    pub peer_ips: BTreeMap<Addr, PeerInfo>,
    /// `PALISADE_PEER_CIDRS`, by (prefix length in the 128-bit space, masked
    /// address): every ipBlock prefix of every policy.
    pub peer_cidrs: BTreeMap<(u32, Addr), PeerInfo>,
    /// `PALISADE_POLICY`, by endpoint.
    pub policy: PolicyEntries,
    /// What each rule id in `policy` stands for (every rule of every policy;
    /// shared between compiles while the policies' rules are the same).
    pub rules: Arc<BTreeMap<u32, RuleRef>>,
    /// Conversion and compilation problems, conversion ones first.
    pub diagnostics: Vec<Diagnostic>,
}

/// Compiles the cluster state into the desired map contents for `node`.
///
/// Identities are taken from `ids` (allocating new ones in key order, so the
/// result is deterministic for a given allocator state); identities no pod or
/// policy uses any more are freed at the end.
pub fn compile(state: &ClusterState, node: &NodeScope, ids: &mut IdentityAllocator) -> Desired {
    compile_reusing(state, node, ids, &mut CompileMemo::default())
}

/// [`compile`], reusing what the previous compile with `memo` (and `ids`)
/// computed for endpoints whose inputs did not change: the same result,
/// in time proportional to the change for most changes.
pub fn compile_reusing(
    state: &ClusterState,
    node: &NodeScope,
    ids: &mut IdentityAllocator,
    memo: &mut CompileMemo,
) -> Desired {
    let mut diagnostics: Vec<Diagnostic> = state.diagnostics().cloned().collect();

    // 1. Identities: one per (namespace labels, pod labels) of a pod that can
    //    be a peer or is a local endpoint, one per ipBlock prefix.
    let namespace_labels: BTreeMap<&str, Labels> = state
        .pods()
        .values()
        .map(|p| p.namespace.as_str())
        .collect::<BTreeSet<&str>>()
        .into_iter()
        .map(|ns| (ns, state.namespace_labels(ns)))
        .collect();
    let pod_key = |pod: &Pod| IdentityKey::Labels {
        namespace: namespace_labels
            .get(pod.namespace.as_str())
            .cloned()
            .unwrap_or_else(|| state.namespace_labels(&pod.namespace)),
        pod: pod.labels.clone(),
        named_ports: named_port_signature(pod),
    };
    let local_pods: Vec<(&ObjectRef, &LocalEndpoint, Option<&Pod>)> = node
        .endpoints
        .iter()
        .map(|(r, ep)| {
            let pod = state
                .pod(r)
                .filter(|p| p.node_name.as_deref() == Some(&node.node_name));
            (r, ep, pod)
        })
        .collect();
    let prefix_set = collect_prefixes(state.policies().values().flat_map(ip_blocks));

    // A pod's number from the last compile is used when its key is still
    // the same (compared in place: no key built); other pods' keys are
    // built and looked up once, and new keys numbered in key order
    // (deterministic for a given allocator state).
    let key_matches = |key: &IdentityKey, pod: &Pod| match key {
        IdentityKey::Labels {
            namespace,
            pod: labels,
            named_ports,
        } => {
            *labels == pod.labels
                && namespace_labels.get(pod.namespace.as_str()) == Some(namespace)
                && signature_matches(named_ports, pod)
        }
        IdentityKey::Cidr(_) => false,
    };
    let peer_refs: Vec<(&ObjectRef, &Arc<Pod>)> =
        state.pods().iter().filter(|(_, p)| is_peer(p)).collect();
    let relabelled: BTreeSet<&str> = memo.relabelled_namespaces(&namespace_labels);
    let mut last_compile = memo.pod_identities();
    let mut peer_numbers: Vec<Option<u32>> = Vec::with_capacity(peer_refs.len());
    let mut built: Vec<(usize, IdentityKey)> = Vec::new();
    for (i, (pod_ref, pod)) in peer_refs.iter().enumerate() {
        let hint = last_compile
            .unchanged(pod_ref, pod)
            .filter(|_| !relabelled.contains(pod.namespace.as_str()))
            .or_else(|| {
                ids.remembered(pod_ref)
                    .filter(|id| ids.key(*id).is_some_and(|k| key_matches(k, pod)))
            });
        if hint.is_some() {
            peer_numbers.push(hint);
        } else {
            let key = pod_key(pod);
            peer_numbers.push(ids.get(&key));
            built.push((i, key));
        }
    }
    let local_keys: Vec<IdentityKey> = local_pods
        .iter()
        .filter_map(|(_, _, pod)| pod.map(pod_key))
        .collect();
    let cidr_keys: Vec<IdentityKey> = prefix_set.iter().copied().map(IdentityKey::Cidr).collect();
    let missing: BTreeSet<&IdentityKey> = built
        .iter()
        .filter(|(i, _)| peer_numbers[*i].is_none())
        .map(|(_, k)| k)
        .chain(
            local_keys
                .iter()
                .chain(&cidr_keys)
                .filter(|k| ids.get(k).is_none()),
        )
        .collect();
    let mut exhausted = 0usize;
    for key in missing {
        if ids.allocate(key).is_err() {
            exhausted += 1;
        }
    }
    for (i, key) in &built {
        if peer_numbers[*i].is_none() {
            peer_numbers[*i] = ids.get(key);
        }
        if let Some(id) = peer_numbers[*i] {
            ids.remember(peer_refs[*i].0, id);
        }
    }
    memo.keep_pod_identities(
        peer_refs
            .iter()
            .zip(&peer_numbers)
            .filter_map(|((_, pod), id)| id.map(|id| (Arc::clone(pod), id))),
        &namespace_labels,
    );
    if ids.remembered_pods() > peer_refs.len() + 1024 {
        ids.forget_pods(|pod| state.pod(pod).is_some_and(is_peer));
    }
    let mut used: BTreeSet<u32> = peer_numbers.iter().flatten().copied().collect();
    used.extend(
        local_keys
            .iter()
            .chain(&cidr_keys)
            .filter_map(|k| ids.get(k)),
    );
    if exhausted > 0 {
        diagnostics.push(Diagnostic {
            object: ObjectKind::Pod,
            namespace: String::new(),
            name: String::new(),
            rule: None,
            severity: Severity::Error,
            code: DiagnosticCode::IdentityExhausted,
            message: format!(
                "{exhausted} label sets or prefixes got no identity: their pods are seen as \
                 the world, their endpoints are isolated"
            ),
        });
    }

    // The identity of every peer pod, in pod order.
    let peer_ids: Vec<(&Pod, u32)> = peer_refs
        .iter()
        .zip(&peer_numbers)
        .filter_map(|((_, pod), id)| id.map(|id| (&***pod, id)))
        .collect();
    let mut groups: BTreeMap<u32, Group<'_>> = BTreeMap::new();
    for &(pod, id) in &peer_ids {
        groups
            .entry(id)
            .or_insert_with(|| Group {
                id,
                namespace: &pod.namespace,
                namespace_labels: &namespace_labels[pod.namespace.as_str()],
                pod_labels: &pod.labels,
                pods: Vec::new(),
            })
            .pods
            .push(pod);
    }
    let prefixes = Prefixes::new(
        prefix_set
            .iter()
            .filter_map(|p| ids.get(&IdentityKey::Cidr(*p)).map(|id| (*p, id)))
            .collect(),
    );

    let mut out = Desired::default();

    // 2. Peer maps.
    for (net, id) in prefixes.iter() {
        out.peer_cidrs.insert(
            prefix_key(net),
            PeerInfo {
                identity: reserved::WORLD,
                cidr_identity: id,
            },
        );
    }
    if prefixes.needs_v4_catch_all() {
        out.peer_cidrs.insert(
            (V4_MAPPED_PREFIX_LEN, v4_mapped([0; 4])),
            PeerInfo {
                identity: reserved::WORLD,
                cidr_identity: reserved::ANY,
            },
        );
    }
    // Who has each address (None: the node); named only for a diagnostic.
    let mut owners: BTreeMap<Addr, Option<&Pod>> = BTreeMap::new();
    for ip in &node.node_ips {
        let a = addr(ip);
        out.peer_ips.entry(a).or_insert_with(|| {
            owners.insert(a, None);
            PeerInfo {
                identity: reserved::HOST,
                cidr_identity: prefixes.longest_match(ip),
            }
        });
    }
    for &(pod, id) in &peer_ids {
        for ip in &pod.ips {
            let a = addr(ip);
            if let Some(owner) = owners.get(&a) {
                let owner = match owner {
                    None => "this node".to_owned(),
                    Some(p) => format!("pod {}/{}", p.namespace, p.name),
                };
                diagnostics.push(Diagnostic::pod(
                    &pod.namespace,
                    &pod.name,
                    Severity::Warning,
                    DiagnosticCode::DuplicatePodIp,
                    format!(
                        "address {ip} also belongs to {owner}; traffic from it is seen as theirs"
                    ),
                ));
                continue;
            }
            owners.insert(a, Some(pod));
            out.peer_ips.insert(
                a,
                PeerInfo {
                    identity: id,
                    cidr_identity: prefixes.longest_match(ip),
                },
            );
        }
    }

    // 3. Endpoints and policy entries.
    let (rule_ids, rule_map) = memo.rule_ids(state.policies());
    let mut by_namespace: BTreeMap<&str, Vec<&Group<'_>>> = BTreeMap::new();
    for group in groups.values() {
        by_namespace.entry(group.namespace).or_default().push(group);
    }
    let ctx = Context {
        state,
        groups: &groups,
        by_namespace: &by_namespace,
        namespaces_matching: RefCell::new(HashMap::new()),
        prefixes: &prefixes,
    };
    let mut plans: BTreeMap<(ObjectRef, Direction, usize), Arc<RulePlan>> = BTreeMap::new();
    let mut blocks: BTreeMap<u32, Arc<EndpointBlock>> = BTreeMap::new();
    for (pod_ref, ep, pod) in local_pods {
        if out.endpoints.contains_key(&ep.ifindex) {
            diagnostics.push(Diagnostic::pod(
                &pod_ref.namespace,
                &pod_ref.name,
                Severity::Error,
                DiagnosticCode::DuplicateEndpoint,
                format!(
                    "interface {} is registered for another pod too; ignored",
                    ep.ifindex
                ),
            ));
            continue;
        }
        let isolated_unknown = EndpointInfo {
            endpoint_id: ep.endpoint_id,
            identity: reserved::ANY,
            flags: EndpointInfo::INGRESS_ISOLATED | EndpointInfo::EGRESS_ISOLATED,
            ..EndpointInfo::default()
        };
        let Some(pod) = pod else {
            let why = match state.pod(pod_ref) {
                None => "its Pod is unknown".to_owned(),
                Some(p) => format!(
                    "its Pod is scheduled on {:?}, not on this node {:?}",
                    p.node_name, node.node_name
                ),
            };
            diagnostics.push(Diagnostic::pod(
                &pod_ref.namespace,
                &pod_ref.name,
                Severity::Warning,
                DiagnosticCode::EndpointWithoutPod,
                format!(
                    "interface {}: {why}; isolated both ways until it is known",
                    ep.ifindex
                ),
            ));
            out.endpoints.insert(ep.ifindex, isolated_unknown);
            continue;
        };
        let Some(own_identity) = ids.get(&pod_key(pod)) else {
            out.endpoints.insert(ep.ifindex, isolated_unknown);
            continue;
        };
        let selecting: Vec<&Policy> = state
            .policies_in(&pod.namespace)
            .filter(|p| p.selects(pod))
            .collect();
        let mut info = EndpointInfo {
            endpoint_id: ep.endpoint_id,
            identity: own_identity,
            ..EndpointInfo::default()
        };
        if selecting.iter().any(|p| p.isolates_ingress) {
            info.flags |= EndpointInfo::INGRESS_ISOLATED;
        }
        if selecting.iter().any(|p| p.isolates_egress) {
            info.flags |= EndpointInfo::EGRESS_ISOLATED;
        }
        if let Some(v4) = pod.ips.iter().find_map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }) {
            info.flags |= EndpointInfo::HAS_IPV4;
            info.ipv4 = v4.octets();
        }
        if let Some(v6) = pod.ips.iter().find_map(|ip| match ip.to_canonical() {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }) {
            info.flags |= EndpointInfo::HAS_IPV6;
            info.ipv6 = v6.octets();
        }

        let mut uses: Vec<RuleUse> = Vec::new();
        for policy in selecting {
            let policy_ref = policy.object_ref();
            for direction in [Direction::Ingress, Direction::Egress] {
                if !policy.isolates(direction) {
                    continue;
                }
                for (index, rule) in policy.rules(direction).iter().enumerate() {
                    let Some(rule_id) = rule_ids.id(&policy_ref, direction, index) else {
                        continue;
                    };
                    let plan = plans
                        .entry((policy_ref.clone(), direction, index))
                        .or_insert_with_key(|key| {
                            let fresh = ctx.plan(policy, direction, index, rule, &mut diagnostics);
                            memo.plan(key, fresh)
                        });
                    uses.push(RuleUse {
                        rule_id,
                        direction,
                        plan: plan.clone(),
                    });
                }
            }
        }
        let block = match memo.block(ep.endpoint_id, pod_ref, pod, &uses) {
            Some(same) => same,
            None => Arc::new(EndpointBlock::build(
                ep.endpoint_id,
                pod_ref,
                pod,
                uses,
                ids,
            )),
        };
        info.flags |= block.peer_flags;
        out.endpoints.insert(ep.ifindex, info);
        blocks.insert(ep.endpoint_id, block);
    }
    for (&endpoint_id, block) in &blocks {
        out.policy.set_endpoint(endpoint_id, block.entries.clone());
        diagnostics.extend(block.diagnostics.iter().cloned());
    }
    memo.keep(plans, blocks);

    out.rules = rule_map;
    ids.retain_ids(&used);
    out.diagnostics = diagnostics;
    out
}

/// Whether a pod can be a peer: it has addresses of its own.
fn is_peer(pod: &Pod) -> bool {
    !pod.host_network && !pod.ips.is_empty()
}

/// Every ipBlock of a policy's rules.
fn ip_blocks(policy: &Policy) -> impl Iterator<Item = &crate::model::IpBlock> {
    policy
        .ingress
        .iter()
        .chain(&policy.egress)
        .flat_map(|rule: &Rule| match &rule.peers {
            Peers::All => [].iter(),
            Peers::Only(list) => list.iter(),
        })
        .filter_map(|peer| match peer {
            Peer::IpBlock(block) => Some(block),
            _ => None,
        })
}

/// What the compiler knows while planning rules.
struct Context<'s, 'g> {
    state: &'s ClusterState,
    groups: &'g BTreeMap<u32, Group<'s>>,
    /// The groups of each namespace (that has pods).
    by_namespace: &'g BTreeMap<&'s str, Vec<&'g Group<'s>>>,
    /// Namespace selectors already evaluated: the namespaces they match.
    namespaces_matching: RefCell<HashMap<&'g LabelSelector, Rc<Vec<&'s str>>>>,
    prefixes: &'g Prefixes,
}

/// One rule's entries, independent of the endpoint except for ingress named
/// ports (which resolve on the endpoint itself).
#[derive(Debug, PartialEq, Eq)]
struct RulePlan {
    /// Peer keys for ports that do not depend on the destination pod.
    keys: BTreeSet<u32>,
    targets: Vec<PortTarget>,
    /// Egress named ports: (protocol, name) → pod identity → port numbers.
    egress_named: BTreeMap<(Protocol, String), BTreeMap<u32, BTreeSet<u16>>>,
}

impl<'s, 'g> Context<'s, 'g> {
    /// The namespaces (with pods) whose labels `selector` matches.
    fn namespaces(&self, selector: &'g LabelSelector) -> Rc<Vec<&'s str>> {
        if let Some(found) = self.namespaces_matching.borrow().get(selector) {
            return found.clone();
        }
        let found: Rc<Vec<&'s str>> = Rc::new(
            self.by_namespace
                .iter()
                .filter(|(_, groups)| {
                    groups
                        .first()
                        .is_some_and(|g| selector.matches(g.namespace_labels))
                })
                .map(|(ns, _)| *ns)
                .collect(),
        );
        self.namespaces_matching
            .borrow_mut()
            .insert(selector, found.clone());
        found
    }

    /// The identities of the groups a selector peer of a policy in
    /// `policy_namespace` matches (as [`peers::peer_matches_group`] decides, by
    /// namespace first).
    fn matching_groups(&self, peer: &'g Peer, policy_namespace: &str, out: &mut BTreeSet<u32>) {
        let groups_of = |ns: &str| self.by_namespace.get(ns).into_iter().flatten();
        match peer {
            Peer::PodSelector(pods) => out.extend(
                groups_of(policy_namespace)
                    .filter(|g| pods.matches(g.pod_labels))
                    .map(|g| g.id),
            ),
            Peer::NamespaceSelector(namespaces) => {
                for ns in self.namespaces(namespaces).iter() {
                    out.extend(groups_of(ns).map(|g| g.id));
                }
            }
            Peer::PodAndNamespaceSelector { pod, namespace } => {
                for ns in self.namespaces(namespace).iter() {
                    out.extend(
                        groups_of(ns)
                            .filter(|g| pod.matches(g.pod_labels))
                            .map(|g| g.id),
                    );
                }
            }
            Peer::IpBlock(_) => {}
        }
    }

    fn plan(
        &self,
        policy: &Policy,
        direction: Direction,
        index: usize,
        rule: &'g Rule,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> RulePlan {
        let mut keys = BTreeSet::new();
        match &rule.peers {
            Peers::All => {
                keys.insert(reserved::ANY);
            }
            Peers::Only(list) => {
                for peer in list {
                    match peer {
                        Peer::IpBlock(block) => keys.extend(self.prefixes.in_block(block)),
                        _ => self.matching_groups(peer, &policy.namespace, &mut keys),
                    }
                }
            }
        }
        let targets = port_targets(&rule.ports);
        let mut egress_named = BTreeMap::new();
        for target in &targets {
            let PortTarget::Named { protocol, name } = target else {
                continue;
            };
            let report = |severity, code, message: String| {
                Diagnostic::policy(
                    &policy.namespace,
                    &policy.name,
                    Some((direction, index)),
                    severity,
                    code,
                    message,
                )
            };
            match direction {
                Direction::Ingress => {
                    let found = self
                        .state
                        .pods_in(&policy.namespace)
                        .filter(|p| policy.selects(p))
                        .any(|p| p.resolve_named_port(name, *protocol).next().is_some());
                    if !found {
                        diagnostics.push(report(
                            Severity::Warning,
                            DiagnosticCode::NamedPortNotFound,
                            format!(
                                "no pod selected by the policy has a {protocol} port named {name:?}; \
                                 this port entry allows nothing"
                            ),
                        ));
                    }
                }
                Direction::Egress => {
                    let (resolved, found, inexact) =
                        self.resolve_egress_named(policy, rule, name, *protocol);
                    if !found {
                        diagnostics.push(report(
                            Severity::Warning,
                            DiagnosticCode::NamedPortNotFound,
                            format!(
                                "no destination pod of this rule has a {protocol} port named \
                                 {name:?}; this port entry allows nothing"
                            ),
                        ));
                    }
                    if !inexact.is_empty() {
                        diagnostics.push(report(
                            Severity::Warning,
                            DiagnosticCode::NamedPortInexact,
                            format!(
                                "{protocol} port {name:?} differs between pods (or addresses) of \
                                 identities {inexact:?}; only the port numbers they all agree on \
                                 are allowed to them"
                            ),
                        ));
                    }
                    egress_named.insert((*protocol, name.clone()), resolved);
                }
            }
        }
        RulePlan {
            keys,
            targets,
            egress_named,
        }
    }

    /// Egress named port: for each pod identity, the port numbers allowed to
    /// every address of every pod of it (the rule's peers must include the
    /// address, and the pod must have the named port). Also says whether any
    /// destination has the port at all, and which identities disagree.
    fn resolve_egress_named(
        &self,
        policy: &Policy,
        rule: &Rule,
        name: &str,
        protocol: Protocol,
    ) -> (BTreeMap<u32, BTreeSet<u16>>, bool, Vec<u32>) {
        let mut resolved = BTreeMap::new();
        let mut found = false;
        let mut inexact = Vec::new();
        for group in self.groups.values() {
            // Named ports are part of the identity: all pods of a group
            // have the same, and a group without this one adds nothing.
            if group
                .pods
                .first()
                .is_none_or(|p| p.resolve_named_port(name, protocol).next().is_none())
            {
                continue;
            }
            let mut common: Option<BTreeSet<u16>> = None;
            let mut any = BTreeSet::new();
            for pod in &group.pods {
                let ports: BTreeSet<u16> = pod.resolve_named_port(name, protocol).collect();
                for ip in &pod.ips {
                    let allowed = if peers::peers_match_pod_address(
                        &rule.peers,
                        &policy.namespace,
                        group,
                        ip,
                    ) {
                        ports.clone()
                    } else {
                        BTreeSet::new()
                    };
                    any.extend(allowed.iter().copied());
                    common = Some(match common {
                        None => allowed,
                        Some(c) => c.intersection(&allowed).copied().collect(),
                    });
                }
            }
            let common = common.unwrap_or_default();
            found |= !any.is_empty();
            if common != any {
                inexact.push(group.id);
            }
            if !common.is_empty() {
                resolved.insert(group.id, common);
            }
        }
        (resolved, found, inexact)
    }
}

/// What one rule gives one policy key.
#[derive(Clone, Copy, Debug)]
enum Grant {
    /// Every port, by this rule.
    AnyPort(u32),
    /// Ports first..=last, by this rule.
    Range(u16, u16, u32),
}

impl RulePlan {
    /// Adds this rule's entries for one endpoint.
    fn emit(
        &self,
        grants: &mut Vec<(PolicyKey, Grant)>,
        endpoint_id: u32,
        direction: Direction,
        rule_id: u32,
        endpoint: &Pod,
    ) {
        let d = direction as u8;
        let key = |peer: u32, protocol: u8| PolicyKey::new(endpoint_id, peer, d, protocol);
        let mut add = |peer: u32, protocol: u8, port: Option<(u16, u16)>| {
            let grant = match port {
                None => Grant::AnyPort(rule_id),
                Some((first, last)) => Grant::Range(first, last, rule_id),
            };
            grants.push((key(peer, protocol), grant));
        };
        for target in &self.targets {
            match target {
                PortTarget::AnyPort(protocol) => {
                    for &peer in &self.keys {
                        add(peer, *protocol, None);
                    }
                }
                PortTarget::Range {
                    protocol,
                    first,
                    last,
                } => {
                    for &peer in &self.keys {
                        add(peer, protocol.number(), Some((*first, *last)));
                    }
                }
                PortTarget::Named { protocol, name } => match direction {
                    Direction::Ingress => {
                        let numbers: BTreeSet<u16> =
                            endpoint.resolve_named_port(name, *protocol).collect();
                        for &peer in &self.keys {
                            for &n in &numbers {
                                add(peer, protocol.number(), Some((n, n)));
                            }
                        }
                    }
                    Direction::Egress => {
                        let Some(by_identity) = self.egress_named.get(&(*protocol, name.clone()))
                        else {
                            continue;
                        };
                        for (&peer, numbers) in by_identity {
                            for &n in numbers {
                                add(peer, protocol.number(), Some((n, n)));
                            }
                        }
                    }
                },
            }
        }
    }
}

/// Whether `signature` (sorted, without duplicates) is the set of `pod`'s
/// named ports, compared without building it.
fn signature_matches(signature: &[(String, u8, u16)], pod: &Pod) -> bool {
    let in_signature = |name: &str, protocol: u8, port: u16| {
        signature
            .binary_search_by(|(n, pr, po)| (n.as_str(), *pr, *po).cmp(&(name, protocol, port)))
            .is_ok()
    };
    pod.named_ports
        .iter()
        .all(|p| in_signature(&p.name, p.protocol.number(), p.port))
        && signature.iter().all(|(name, protocol, port)| {
            pod.named_ports
                .iter()
                .any(|p| p.name == *name && p.protocol.number() == *protocol && p.port == *port)
        })
}

/// A pod's named container ports, as its identity key holds them.
fn named_port_signature(pod: &Pod) -> Vec<(String, u8, u16)> {
    let mut ports: Vec<(String, u8, u16)> = pod
        .named_ports
        .iter()
        .map(|p| (p.name.clone(), p.protocol.number(), p.port))
        .collect();
    ports.sort();
    ports.dedup();
    ports
}
