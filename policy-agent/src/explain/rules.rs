//! One rule against one connection, with the reason it matches or not.

use std::{fmt::Write as _, net::IpAddr};

use crate::model::{
    ClusterState, LabelSelector, Labels, Peer, Peers, Pod, Policy, PolicyPort, PortRef, Ports, Rule,
};

use super::Query;

/// How one rule of a policy fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleVerdict {
    /// Index in the policy's `ingress` or `egress` list.
    pub index: usize,
    pub matches: bool,
    /// Why the peer part matched or not.
    pub peers: String,
    /// Why the ports part matched or not.
    pub ports: String,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn evaluate(
    state: &ClusterState,
    policy: &Policy,
    index: usize,
    rule: &Rule,
    peer_pod: Option<&Pod>,
    peer_addr: &IpAddr,
    destination: Option<&Pod>,
    query: &Query,
) -> RuleVerdict {
    let (peers_match, peers) = match &rule.peers {
        Peers::All => (true, "any peer (no from/to)".to_owned()),
        Peers::Only(list) => {
            let results: Vec<(bool, String)> = list
                .iter()
                .map(|p| peer_matches(state, policy, p, peer_pod, peer_addr))
                .collect();
            let matched = results.iter().position(|(m, _)| *m);
            let text = match matched {
                Some(i) => results[i].1.clone(),
                None => results
                    .iter()
                    .map(|(_, why)| why.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            };
            (matched.is_some(), text)
        }
    };
    let (ports_match, ports) = match &rule.ports {
        Ports::All => (true, "every port and protocol (no ports)".to_owned()),
        Ports::Only(list) => {
            let matched = list.iter().find(|p| port_matches(p, destination, query));
            match matched {
                Some(p) => (
                    true,
                    format!(
                        "{} allows {}/{}",
                        describe_port(p),
                        query.port,
                        query.protocol
                    ),
                ),
                None => (
                    false,
                    format!(
                        "{}/{} is not in [{}]",
                        query.port,
                        query.protocol,
                        list.iter()
                            .map(describe_port)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            }
        }
    };
    RuleVerdict {
        index,
        matches: peers_match && ports_match,
        peers,
        ports,
    }
}

fn labels(labels: &Labels) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        let _ = write!(out, "{}{k}={v}", if i == 0 { "" } else { "," });
    }
    out.push('}');
    out
}

fn selector(s: &LabelSelector) -> String {
    if s.is_empty() {
        return "{} (everything)".to_owned();
    }
    let mut parts: Vec<String> = s
        .match_labels()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.extend(s.match_expressions().iter().map(|r| format!("{r:?}")));
    format!("{{{}}}", parts.join(","))
}

fn peer_matches(
    state: &ClusterState,
    policy: &Policy,
    peer: &Peer,
    peer_pod: Option<&Pod>,
    addr: &IpAddr,
) -> (bool, String) {
    let not_a_pod = |what: &str| (false, format!("{what}: {addr} is not a pod"));
    match peer {
        Peer::PodSelector(sel) => match peer_pod {
            None => not_a_pod("podSelector"),
            Some(pod) if pod.namespace != policy.namespace => (
                false,
                format!(
                    "podSelector {} selects pods of namespace {} only, not {}",
                    selector(sel),
                    policy.namespace,
                    pod.namespace
                ),
            ),
            Some(pod) => (
                sel.matches(&pod.labels),
                format!(
                    "podSelector {} {} {}",
                    selector(sel),
                    if sel.matches(&pod.labels) {
                        "matches"
                    } else {
                        "does not match"
                    },
                    labels(&pod.labels)
                ),
            ),
        },
        Peer::NamespaceSelector(sel) => match peer_pod {
            None => not_a_pod("namespaceSelector"),
            Some(pod) => {
                let ns = state.namespace_labels(&pod.namespace);
                (
                    sel.matches(&ns),
                    format!(
                        "namespaceSelector {} {} namespace {} {}",
                        selector(sel),
                        if sel.matches(&ns) {
                            "matches"
                        } else {
                            "does not match"
                        },
                        pod.namespace,
                        labels(&ns)
                    ),
                )
            }
        },
        Peer::PodAndNamespaceSelector {
            pod: pod_sel,
            namespace: ns_sel,
        } => match peer_pod {
            None => not_a_pod("podSelector+namespaceSelector"),
            Some(pod) => {
                let ns = state.namespace_labels(&pod.namespace);
                let (ns_ok, pod_ok) = (ns_sel.matches(&ns), pod_sel.matches(&pod.labels));
                let why = match (ns_ok, pod_ok) {
                    (true, true) => "match".to_owned(),
                    (false, _) => {
                        format!("namespace {} {} does not match", pod.namespace, labels(&ns))
                    }
                    (true, false) => format!("pod labels {} do not match", labels(&pod.labels)),
                };
                (
                    ns_ok && pod_ok,
                    format!(
                        "namespaceSelector {} AND podSelector {}: {why}",
                        selector(ns_sel),
                        selector(pod_sel)
                    ),
                )
            }
        },
        Peer::IpBlock(block) => {
            let excepted = block.except().iter().find(|e| e.contains(addr));
            if !block.cidr().contains(addr) {
                (
                    false,
                    format!("ipBlock {} does not contain {addr}", block.cidr()),
                )
            } else if let Some(e) = excepted {
                (
                    false,
                    format!(
                        "ipBlock {} contains {addr} but except {e} removes it",
                        block.cidr()
                    ),
                )
            } else {
                (true, format!("ipBlock {} contains {addr}", block.cidr()))
            }
        }
    }
}

fn port_matches(port: &PolicyPort, destination: Option<&Pod>, query: &Query) -> bool {
    if port.protocol != query.protocol {
        return false;
    }
    match &port.port {
        None => true,
        Some(PortRef::Number(first)) => {
            (*first..=port.end_port.unwrap_or(*first)).contains(&query.port)
        }
        Some(PortRef::Named(name)) => destination.is_some_and(|pod| {
            pod.resolve_named_port(name, port.protocol)
                .any(|p| p == query.port)
        }),
    }
}

fn describe_port(port: &PolicyPort) -> String {
    match (&port.port, port.end_port) {
        (None, _) => format!("every {} port", port.protocol),
        (Some(PortRef::Number(p)), None) => format!("{p}/{}", port.protocol),
        (Some(PortRef::Number(p)), Some(end)) => format!("{p}-{end}/{}", port.protocol),
        (Some(PortRef::Named(name)), _) => format!("{name}/{} (named)", port.protocol),
    }
}
