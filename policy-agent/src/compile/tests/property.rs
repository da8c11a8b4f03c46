//! Property test: for random clusters, the compiled maps, read through the
//! classifier's own decision function, agree with a direct evaluation of the
//! NetworkPolicy spec for every (source, destination, protocol, port).
//!
//! The oracle below works on the test's own description of the cluster, not
//! on the model types: it shares no code with conversion or compilation.
//! Inputs are rendered to k8s-openapi objects and go through the real
//! conversion. Some generated entries are invalid on purpose (an `except`
//! outside its `cidr`, an `endPort` the API would reject); the oracle gives
//! them the documented meaning "this entry matches nothing".

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use policy_common::{Direction, proto};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};

use super::fixture::{NODE, NODE_IP, endpoint_verdict, endpoint_with_ip, ip};
use crate::compile::{
    CompileMemo, IdentityAllocator, LocalEndpoint, NodeScope, compile, compile_reusing,
};
use crate::model::{ClusterState, DiagnosticCode, ObjectKind, ObjectRef};

const NS_NAMES: [&str; 3] = ["a", "b", "c"];
const NAME_LABEL: &str = "kubernetes.io/metadata.name";
const PORT_NAMES: [&str; 2] = ["http", "dns"];
const V4_POOL: [&str; 9] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.0.0.0/24",
    "10.0.0.0/30",
    "10.0.0.4/30",
    "10.0.0.2/32",
    "10.0.0.5/32",
    "8.8.8.0/24",
    "192.168.0.0/16",
];
const V6_POOL: [&str; 6] = [
    "::/0",
    "fd00::/64",
    "fd00::/126",
    "fd00::4/126",
    "fd00::2/128",
    "2001:db8::/32",
];
const EXTERNAL: [&str; 7] = [
    "8.8.8.8",
    "10.0.1.5",
    "172.16.0.1",
    NODE_IP,
    "fd00::99",
    "2001:db8::1",
    "fd00:1::1",
];
const PROTOCOLS: [u8; 4] = [proto::TCP, proto::UDP, proto::SCTP, proto::ICMP];
const PORTS: [u16; 6] = [53, 80, 81, 443, 8080, 9000];

type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug)]
struct Sel {
    labels: Labels,
    exprs: Vec<(String, Op, Vec<String>)>,
}

#[derive(Clone, Debug)]
enum TPeer {
    Pod(Sel),
    Ns(Sel),
    Both(Sel, Sel),
    Block(String, Vec<String>),
}

#[derive(Clone, Debug)]
enum TPortRef {
    Num(u16),
    Name(String),
}

#[derive(Clone, Debug)]
struct TPort {
    protocol: Option<u8>,
    port: Option<TPortRef>,
    end: Option<u16>,
}

#[derive(Clone, Debug)]
struct TRule {
    peers: Option<Vec<TPeer>>,
    ports: Option<Vec<TPort>>,
}

#[derive(Clone, Debug)]
struct TPolicy {
    ns: usize,
    selector: Sel,
    types: Option<Vec<&'static str>>,
    ingress: Option<Vec<TRule>>,
    egress: Option<Vec<TRule>>,
}

#[derive(Clone, Debug)]
struct TPod {
    ns: usize,
    labels: Labels,
    v6: bool,
    ports: Vec<(String, u16, u8)>,
    local: bool,
    host_network: bool,
}

#[derive(Clone, Debug)]
struct TCluster {
    ns_labels: Vec<Option<Labels>>,
    pods: Vec<TPod>,
    policies: Vec<TPolicy>,
}

// ---------- strategies ----------

fn labels(
    keys: &'static [&'static str],
    values: &'static [&'static str],
    p: f64,
) -> impl Strategy<Value = Labels> {
    prop::collection::vec(prop::option::weighted(p, select(values)), keys.len()).prop_map(
        move |vals| {
            keys.iter()
                .zip(vals)
                .filter_map(|(k, v)| v.map(|v| ((*k).to_owned(), v.to_owned())))
                .collect()
        },
    )
}

fn selector(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Sel> {
    let expr = (
        select(keys),
        select(vec![Op::In, Op::NotIn, Op::Exists, Op::DoesNotExist]),
        subsequence(values, 1..=2),
    )
        .prop_map(|(k, op, vals)| {
            let vals = match op {
                Op::In | Op::NotIn => vals.into_iter().map(str::to_owned).collect(),
                Op::Exists | Op::DoesNotExist => Vec::new(),
            };
            (k.to_owned(), op, vals)
        });
    (
        labels(keys, values, 0.3),
        prop::collection::vec(expr, 0..=2),
    )
        .prop_map(|(labels, exprs)| Sel { labels, exprs })
}

fn pod_selector() -> impl Strategy<Value = Sel> {
    selector(&["app", "tier"], &["x", "y", "z"])
}

fn ns_selector() -> impl Strategy<Value = Sel> {
    selector(&["env", "team", NAME_LABEL], &["x", "y", "a", "b"])
}

fn block() -> impl Strategy<Value = TPeer> {
    let family = prop_oneof![Just(&V4_POOL[..]), Just(&V6_POOL[..])];
    family.prop_flat_map(|pool| {
        (
            select(pool),
            subsequence(pool, 0..=2),
            prop::bool::weighted(0.15),
        )
            .prop_map(|(cidr, excepts, keep_invalid)| {
                let c: IpNet = cidr.parse().expect("pool cidr");
                let excepts = excepts
                    .into_iter()
                    .filter(|e| {
                        keep_invalid || {
                            let e: IpNet = e.parse().expect("pool cidr");
                            c.contains(&e) && e.prefix_len() > c.prefix_len()
                        }
                    })
                    .map(str::to_owned)
                    .collect();
                TPeer::Block(cidr.to_owned(), excepts)
            })
    })
}

fn peer() -> impl Strategy<Value = TPeer> {
    prop_oneof![
        pod_selector().prop_map(TPeer::Pod),
        ns_selector().prop_map(TPeer::Ns),
        (pod_selector(), ns_selector()).prop_map(|(p, n)| TPeer::Both(p, n)),
        block(),
    ]
}

fn port() -> impl Strategy<Value = TPort> {
    (
        prop::option::weighted(0.6, select(vec![proto::TCP, proto::UDP, proto::SCTP])),
        prop_oneof![
            1 => Just(None),
            2 => select(vec![53u16, 80, 443, 8080]).prop_map(|p| Some(TPortRef::Num(p))),
            1 => select(&PORT_NAMES[..]).prop_map(|n| Some(TPortRef::Name(n.to_owned()))),
        ],
        prop::option::weighted(0.25, select(vec![50u16, 80, 443, 9000])),
    )
        .prop_map(|(protocol, port, end)| TPort {
            protocol,
            port,
            end,
        })
}

fn rule() -> impl Strategy<Value = TRule> {
    (
        prop::option::weighted(0.8, prop::collection::vec(peer(), 0..=3)),
        prop::option::weighted(0.7, prop::collection::vec(port(), 0..=3)),
    )
        .prop_map(|(peers, ports)| TRule { peers, ports })
}

fn policy() -> impl Strategy<Value = TPolicy> {
    (
        0..NS_NAMES.len(),
        pod_selector(),
        select(vec![
            None,
            Some(vec![]),
            Some(vec!["Ingress"]),
            Some(vec!["Egress"]),
            Some(vec!["Ingress", "Egress"]),
        ]),
        prop::option::of(prop::collection::vec(rule(), 0..=2)),
        prop::option::of(prop::collection::vec(rule(), 0..=2)),
    )
        .prop_map(|(ns, selector, types, ingress, egress)| TPolicy {
            ns,
            selector,
            types,
            ingress,
            egress,
        })
}

fn pod() -> impl Strategy<Value = TPod> {
    (
        0..NS_NAMES.len(),
        labels(&["app", "tier"], &["x", "y", "z"], 0.6),
        prop::bool::weighted(0.3),
        prop::collection::vec(
            (
                select(&PORT_NAMES[..]),
                select(vec![53u16, 80, 8080]),
                select(vec![proto::TCP, proto::UDP]),
            ),
            0..=2,
        ),
        prop::bool::weighted(0.6),
        prop::bool::weighted(0.08),
    )
        .prop_map(|(ns, labels, v6, ports, local, host_network)| TPod {
            ns,
            labels,
            v6,
            ports: ports
                .into_iter()
                .map(|(n, p, pr)| (n.to_owned(), p, pr))
                .collect(),
            local: local && !host_network,
            host_network,
        })
}

fn cluster() -> impl Strategy<Value = TCluster> {
    (
        prop::collection::vec(
            prop::option::weighted(0.85, labels(&["env", "team"], &["x", "y"], 0.6)),
            3,
        ),
        prop::collection::vec(pod(), 1..=8),
        prop::collection::vec(policy(), 1..=5),
    )
        .prop_map(|(ns_labels, pods, policies)| TCluster {
            ns_labels,
            pods,
            policies,
        })
}

// ---------- rendering to API objects ----------

fn pod_name(i: usize) -> String {
    format!("p{i}")
}

fn policy_name(i: usize) -> String {
    format!("pol{i}")
}

fn pod_ips(i: usize, pod: &TPod) -> Vec<IpAddr> {
    if pod.host_network {
        return vec![ip(NODE_IP)];
    }
    let mut ips = vec![ip(&format!("10.0.0.{}", i + 1))];
    if pod.v6 {
        ips.push(ip(&format!("fd00::{}", i + 1)));
    }
    ips
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        _ => "TCP",
    }
}

fn wire_selector(sel: &Sel) -> meta::LabelSelector {
    meta::LabelSelector {
        match_labels: (!sel.labels.is_empty()).then(|| sel.labels.clone()),
        match_expressions: (!sel.exprs.is_empty()).then(|| {
            sel.exprs
                .iter()
                .map(|(key, op, values)| meta::LabelSelectorRequirement {
                    key: key.clone(),
                    operator: format!("{op:?}"),
                    values: (!values.is_empty()).then(|| values.clone()),
                })
                .collect()
        }),
    }
}

fn wire_peer(peer: &TPeer) -> net::NetworkPolicyPeer {
    match peer {
        TPeer::Pod(s) => net::NetworkPolicyPeer {
            pod_selector: Some(wire_selector(s)),
            ..Default::default()
        },
        TPeer::Ns(s) => net::NetworkPolicyPeer {
            namespace_selector: Some(wire_selector(s)),
            ..Default::default()
        },
        TPeer::Both(p, n) => net::NetworkPolicyPeer {
            pod_selector: Some(wire_selector(p)),
            namespace_selector: Some(wire_selector(n)),
            ..Default::default()
        },
        TPeer::Block(cidr, except) => net::NetworkPolicyPeer {
            ip_block: Some(net::IPBlock {
                cidr: cidr.clone(),
                except: (!except.is_empty()).then(|| except.clone()),
            }),
            ..Default::default()
        },
    }
}

fn wire_port(port: &TPort) -> net::NetworkPolicyPort {
    net::NetworkPolicyPort {
        protocol: port.protocol.map(|p| proto_name(p).to_owned()),
        port: port.port.as_ref().map(|p| match p {
            TPortRef::Num(n) => IntOrString::Int(i32::from(*n)),
            TPortRef::Name(s) => IntOrString::String(s.clone()),
        }),
        end_port: port.end.map(i32::from),
    }
}

fn wire_policy(i: usize, p: &TPolicy) -> net::NetworkPolicy {
    let peers = |r: &TRule| r.peers.as_ref().map(|v| v.iter().map(wire_peer).collect());
    let ports = |r: &TRule| r.ports.as_ref().map(|v| v.iter().map(wire_port).collect());
    net::NetworkPolicy {
        metadata: meta::ObjectMeta {
            name: Some(policy_name(i)),
            namespace: Some(NS_NAMES[p.ns].to_owned()),
            ..Default::default()
        },
        spec: Some(net::NetworkPolicySpec {
            pod_selector: Some(wire_selector(&p.selector)),
            policy_types: p
                .types
                .as_ref()
                .map(|t| t.iter().map(|s| (*s).to_owned()).collect()),
            ingress: p.ingress.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|r| net::NetworkPolicyIngressRule {
                        from: peers(r),
                        ports: ports(r),
                    })
                    .collect()
            }),
            egress: p.egress.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|r| net::NetworkPolicyEgressRule {
                        to: peers(r),
                        ports: ports(r),
                    })
                    .collect()
            }),
        }),
    }
}

fn wire_pod(i: usize, pod: &TPod) -> core::Pod {
    let container = core::Container {
        name: "c".to_owned(),
        ports: Some(
            pod.ports
                .iter()
                .map(|(name, number, p)| core::ContainerPort {
                    name: Some(name.clone()),
                    container_port: i32::from(*number),
                    protocol: Some(proto_name(*p).to_owned()),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    };
    core::Pod {
        metadata: meta::ObjectMeta {
            name: Some(pod_name(i)),
            namespace: Some(NS_NAMES[pod.ns].to_owned()),
            labels: Some(pod.labels.clone()),
            ..Default::default()
        },
        spec: Some(core::PodSpec {
            containers: vec![container],
            node_name: Some(if pod.local { NODE } else { "node-b" }.to_owned()),
            host_network: Some(pod.host_network),
            ..Default::default()
        }),
        status: Some(core::PodStatus {
            phase: Some("Running".to_owned()),
            pod_ips: Some(
                pod_ips(i, pod)
                    .iter()
                    .map(|ip| core::PodIP { ip: ip.to_string() })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

fn wire_namespace(i: usize, labels: &Labels) -> core::Namespace {
    core::Namespace {
        metadata: meta::ObjectMeta {
            name: Some(NS_NAMES[i].to_owned()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    }
}

// ---------- the oracle: the spec, evaluated directly ----------

/// A connection end: a pod (by index) or an address that is no pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Pod(usize),
    External,
}

/// One new connection, seen from a local pod: the remote end and its
/// address, the destination end, protocol and destination port.
#[derive(Clone, Copy, Debug)]
struct Probe<'a> {
    other: End,
    other_addr: &'a IpAddr,
    dst: End,
    protocol: u8,
    dport: u16,
}

struct Oracle<'a> {
    c: &'a TCluster,
}

impl Oracle<'_> {
    fn sel_matches(sel: &Sel, labels: &Labels) -> bool {
        sel.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && sel.exprs.iter().all(|(k, op, values)| {
                let v = labels.get(k);
                match op {
                    Op::In => v.is_some_and(|v| values.contains(v)),
                    Op::NotIn => v.is_none_or(|v| !values.contains(v)),
                    Op::Exists => v.is_some(),
                    Op::DoesNotExist => v.is_none(),
                }
            })
    }

    fn ns_labels(&self, ns: usize) -> Labels {
        let mut l = self.c.ns_labels[ns].clone().unwrap_or_default();
        l.insert(NAME_LABEL.to_owned(), NS_NAMES[ns].to_owned());
        l
    }

    /// `(ingress, egress)` isolation the policy declares.
    fn types(p: &TPolicy) -> (bool, bool) {
        match &p.types {
            Some(t) if !t.is_empty() => (t.contains(&"Ingress"), t.contains(&"Egress")),
            _ => (true, p.egress.as_ref().is_some_and(|e| !e.is_empty())),
        }
    }

    fn selects(&self, p: &TPolicy, pod: usize) -> bool {
        let pod = &self.c.pods[pod];
        pod.ns == p.ns && Self::sel_matches(&p.selector, &pod.labels)
    }

    fn declares(p: &TPolicy, d: Direction) -> bool {
        let (i, e) = Self::types(p);
        match d {
            Direction::Ingress => i,
            Direction::Egress => e,
        }
    }

    fn rules(p: &TPolicy, d: Direction) -> &[TRule] {
        let rules = match d {
            Direction::Ingress => &p.ingress,
            Direction::Egress => &p.egress,
        };
        rules.as_deref().unwrap_or_default()
    }

    fn peer_matches(&self, p: &TPolicy, peer: &TPeer, other: End, addr: &IpAddr) -> bool {
        let pod = match other {
            End::Pod(i) if !self.c.pods[i].host_network => Some(&self.c.pods[i]),
            _ => None,
        };
        match peer {
            TPeer::Pod(s) => pod.is_some_and(|o| o.ns == p.ns && Self::sel_matches(s, &o.labels)),
            TPeer::Ns(s) => pod.is_some_and(|o| Self::sel_matches(s, &self.ns_labels(o.ns))),
            TPeer::Both(ps, ns) => pod.is_some_and(|o| {
                Self::sel_matches(ns, &self.ns_labels(o.ns)) && Self::sel_matches(ps, &o.labels)
            }),
            TPeer::Block(cidr, except) => {
                let c: IpNet = cidr.parse().expect("pool cidr");
                let excepts: Vec<IpNet> = except.iter().map(|e| e.parse().expect("pool")).collect();
                // An except that is not a strict subset makes the peer invalid:
                // it matches nothing.
                let valid = excepts
                    .iter()
                    .all(|e| c.contains(e) && e.prefix_len() > c.prefix_len());
                valid && c.contains(addr) && !excepts.iter().any(|e| e.contains(addr))
            }
        }
    }

    fn port_matches(&self, port: &TPort, dst: End, protocol: u8, dport: u16) -> bool {
        let valid = match (&port.port, port.end) {
            (_, None) => true,
            (Some(TPortRef::Num(p)), Some(e)) => e >= *p,
            _ => false,
        };
        let entry_protocol = port.protocol.unwrap_or(proto::TCP);
        valid
            && entry_protocol == protocol
            && match &port.port {
                None => true,
                Some(TPortRef::Num(p)) => *p <= dport && dport <= port.end.unwrap_or(*p),
                Some(TPortRef::Name(name)) => match dst {
                    End::Pod(i) if !self.c.pods[i].host_network => self.c.pods[i]
                        .ports
                        .iter()
                        .any(|(n, num, pr)| n == name && *pr == protocol && *num == dport),
                    _ => false,
                },
            }
    }

    fn rule_allows(&self, p: &TPolicy, rule: &TRule, probe: &Probe<'_>) -> bool {
        let Probe {
            other,
            other_addr,
            dst,
            protocol,
            dport,
        } = *probe;
        let peers_ok = match &rule.peers {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => list
                .iter()
                .any(|peer| self.peer_matches(p, peer, other, other_addr)),
        };
        let ports_ok = match &rule.ports {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => list
                .iter()
                .any(|port| self.port_matches(port, dst, protocol, dport)),
        };
        peers_ok && ports_ok
    }

    /// Whether `pod` allows the connection in direction `d`.
    fn side_allows(&self, pod: usize, d: Direction, probe: &Probe<'_>) -> bool {
        let applying: Vec<&TPolicy> = self
            .c
            .policies
            .iter()
            .filter(|p| self.selects(p, pod) && Self::declares(p, d))
            .collect();
        if applying.is_empty() {
            return true;
        }
        applying.iter().any(|p| {
            Self::rules(p, d)
                .iter()
                .any(|r| self.rule_allows(p, r, probe))
        })
    }
}

fn end_of(c: &TCluster, addr: &IpAddr) -> End {
    c.pods
        .iter()
        .enumerate()
        .find(|(i, p)| !p.host_network && pod_ips(*i, p).contains(addr))
        .map_or(End::External, |(i, _)| End::Pod(i))
}

/// Whether the compiler may resolve a named port towards `pod` less than
/// exactly (and says so): when its identity (same namespace, same labels) has
/// other pods, which may declare other ports or sit elsewhere relative to an
/// ipBlock, or dual-stack pods, whose addresses an ipBlock may split.
fn named_port_ambiguous(c: &TCluster, pod: usize) -> bool {
    let me = &c.pods[pod];
    let group: Vec<&TPod> = c
        .pods
        .iter()
        .filter(|o| !o.host_network && o.ns == me.ns && o.labels == me.labels)
        .collect();
    group.len() > 1 || group.iter().any(|o| o.v6)
}

/// The cluster state and node scope of `c` (its local pods registered).
fn state_of(c: &TCluster) -> Result<(ClusterState, NodeScope), TestCaseError> {
    let (state, rejected) = ClusterState::from_k8s(
        c.ns_labels
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| wire_namespace(i, l)))
            .collect::<Vec<_>>()
            .iter(),
        c.pods
            .iter()
            .enumerate()
            .map(|(i, p)| wire_pod(i, p))
            .collect::<Vec<_>>()
            .iter(),
        c.policies
            .iter()
            .enumerate()
            .map(|(i, p)| wire_policy(i, p))
            .collect::<Vec<_>>()
            .iter(),
    );
    prop_assert!(rejected.is_empty());
    let mut node = NodeScope {
        node_name: NODE.to_owned(),
        node_ips: vec![ip(NODE_IP)],
        endpoints: BTreeMap::new(),
    };
    for (i, p) in c.pods.iter().enumerate().filter(|(_, p)| p.local) {
        let n = u32::try_from(i).expect("small");
        node.endpoints.insert(
            ObjectRef::new(NS_NAMES[p.ns], pod_name(i)),
            LocalEndpoint {
                ifindex: 100 + n,
                endpoint_id: 500 + n,
            },
        );
    }
    Ok((state, node))
}

/// Compiling a sequence of clusters with one memo gives, at every step,
/// exactly what compiling that cluster from nothing (same allocator state)
/// gives: entries, endpoint flags, rule ids and diagnostics.
/// The state is updated in place from step to step, as the reconciler's is,
/// so that unchanged pods keep their allocation.
fn check_reuse(steps: &[TCluster]) -> Result<(), TestCaseError> {
    let mut ids = IdentityAllocator::new();
    let mut memo = CompileMemo::default();
    let mut state = ClusterState::new();
    for (n, c) in steps.iter().enumerate() {
        let (next, node) = state_of(c)?;
        update_in_place(&mut state, &next);
        let mut fresh_ids = ids.clone();
        let fresh = compile(&state, &node, &mut fresh_ids);
        let reused = compile_reusing(&state, &node, &mut ids, &mut memo);
        prop_assert_eq!(&reused, &fresh, "step {}", n);
    }
    Ok(())
}

/// Makes `state` hold what `next` holds, object by object.
fn update_in_place(state: &mut ClusterState, next: &ClusterState) {
    let gone: Vec<ObjectRef> = state
        .pods()
        .keys()
        .filter(|k| next.pod(k).is_none())
        .cloned()
        .collect();
    for key in gone {
        state.remove_pod(&key);
    }
    for (key, pod) in next.pods() {
        let diagnostics = next.diagnostics_of(ObjectKind::Pod, key).to_vec();
        state.insert_pod((**pod).clone(), diagnostics);
    }
    let gone: Vec<String> = state
        .namespaces()
        .keys()
        .filter(|n| !next.namespaces().contains_key(*n))
        .cloned()
        .collect();
    for name in gone {
        state.remove_namespace(&name);
    }
    for namespace in next.namespaces().values() {
        state.insert_namespace(namespace.clone());
    }
    let gone: Vec<ObjectRef> = state.policies().keys().cloned().collect();
    for key in gone {
        state.remove_policy(&key);
    }
    for policy in next.policies().values() {
        let diagnostics = next
            .diagnostics_of(ObjectKind::NetworkPolicy, &policy.object_ref())
            .to_vec();
        state.insert_policy(policy.clone(), diagnostics);
    }
}

fn check(c: &TCluster) -> Result<(), TestCaseError> {
    let (state, node) = state_of(c)?;
    let mut ids = IdentityAllocator::new();
    let desired = compile(&state, &node, &mut ids);
    let has = |code| desired.diagnostics.iter().any(|d| d.code == code);
    let inexact = has(DiagnosticCode::NamedPortInexact);
    let overflow = has(DiagnosticCode::PortRangesOverflow);
    let coalesced = has(DiagnosticCode::PortRangesCoalesced);
    let oracle = Oracle { c };

    let mut addrs: Vec<IpAddr> = c
        .pods
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.host_network)
        .flat_map(|(i, p)| pod_ips(i, p))
        .collect();
    addrs.extend(EXTERNAL.iter().map(|s| ip(s)));

    for src_addr in &addrs {
        for dst_addr in &addrs {
            if src_addr == dst_addr || src_addr.is_ipv4() != dst_addr.is_ipv4() {
                continue;
            }
            let (src, dst) = (end_of(c, src_addr), end_of(c, dst_addr));
            if src == dst {
                continue;
            }
            let sides = [
                (Direction::Egress, src, src_addr, dst, dst_addr),
                (Direction::Ingress, dst, dst_addr, src, src_addr),
            ];
            for (d, local, local_addr, other, other_addr) in sides {
                let End::Pod(local_pod) = local else { continue };
                if !c.pods[local_pod].local {
                    continue;
                }
                let endpoint = endpoint_with_ip(&desired, local_addr);
                prop_assert!(endpoint.is_some(), "no endpoint for {local_addr}");
                let Some(endpoint) = endpoint else { continue };
                for protocol in PROTOCOLS {
                    for dport in PORTS {
                        let dport = if protocol == proto::ICMP { 0 } else { dport };
                        let probe = Probe {
                            other,
                            other_addr,
                            dst,
                            protocol,
                            dport,
                        };
                        let expected = oracle.side_allows(local_pod, d, &probe);
                        let verdict =
                            endpoint_verdict(&desired, endpoint, d, other_addr, protocol, dport);
                        let got = verdict.is_none_or(|r| r.is_some());
                        let excused = !got
                            && expected
                            && (overflow
                                || (inexact
                                    && d == Direction::Egress
                                    && matches!(dst, End::Pod(p) if named_port_ambiguous(c, p))));
                        prop_assert!(
                            got == expected || excused,
                            "{d:?} at pod {local_pod} ({local_addr}) with {other_addr}: proto {protocol} \
                             port {dport}: maps say {got}, spec says {expected}\ndiagnostics: {:#?}",
                            desired.diagnostics
                        );
                        // The reported rule allows this connection by itself.
                        if let Some(Some(rule_id)) = verdict {
                            if coalesced {
                                continue;
                            }
                            let rule = desired.rules.get(&rule_id);
                            prop_assert!(rule.is_some(), "unknown rule id {rule_id}");
                            let Some(rule) = rule else { continue };
                            prop_assert_eq!(rule.direction, d);
                            let index: usize = rule.policy[3..].parse().expect("policy name");
                            let p = &c.policies[index];
                            prop_assert!(oracle.selects(p, local_pod) && Oracle::declares(p, d));
                            let r = &Oracle::rules(p, d)[rule.index];
                            prop_assert!(
                                oracle.rule_allows(p, r, &probe),
                                "rule {rule:?} does not allow it"
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// 192 cases (a second or so), or `PROPTEST_CASES` for a longer run.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(192);
    ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn compiled_maps_agree_with_the_spec(c in cluster()) {
        check(&c)?;
    }

    /// Steps that change a little (one cluster's pods under the other's
    /// policies, and back) and a lot (the other cluster).
    #[test]
    fn compiling_with_reuse_equals_compiling_from_nothing(a in cluster(), b in cluster()) {
        let mixed = TCluster { policies: b.policies.clone(), ..a.clone() };
        let relabelled = TCluster { ns_labels: b.ns_labels.clone(), ..a.clone() };
        check_reuse(&[a.clone(), a.clone(), mixed, a.clone(), relabelled, b, a])?;
    }
}
