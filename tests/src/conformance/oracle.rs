//! Test-only: an independent reading of the NetworkPolicy spec (written from
//! the API reference, not from the agent), used to cross-check the verdicts
//! that scenarios write. `None` means the spec leaves the case to the
//! implementation (traffic to the node's own address through an ipBlock).

use std::net::IpAddr;

use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::plan::PodInfo;
use super::probes::Probe;
use super::scenario::{Endpoint, KnownObject, Labels, Protocol, Verdict};
use super::state::ScenarioState;

/// The verdict the spec gives `probe` in `state`.
pub fn verdict(state: &ScenarioState<'_>, probe: &Probe) -> Option<Verdict> {
    let policies: Vec<&net::NetworkPolicy> = state
        .objects()
        .filter_map(|o| match &o.typed {
            Some(KnownObject::NetworkPolicy(np)) => Some(np),
            _ => None,
        })
        .collect();
    let o = Oracle { state, policies };
    // Destinations after DNAT: a service is its backends, which must agree.
    let targets: Vec<(Peer<'_>, u16)> = match &probe.to {
        Endpoint::Service(name) => {
            let rules = state.service_rules(name)?;
            let port = rules
                .ports
                .iter()
                .find(|p| p.port == probe.port && p.protocol == probe.protocol)?;
            port.backends
                .iter()
                .map(|b| (Peer::Pod(state.pod(&b.pod).unwrap(), b.ip), b.port))
                .collect()
        }
        to => vec![(o.peer(to, probe)?, probe.port)],
    };
    let from = o.peer(&probe.from, probe)?;
    let verdicts: Vec<Option<bool>> = targets
        .iter()
        .map(|(to, port)| o.allowed(&from, to, probe.protocol, *port))
        .collect();
    let first = *verdicts.first()?;
    if verdicts.iter().any(|v| *v != first) {
        return None;
    }
    first.map(|allowed| {
        if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    })
}

/// A rule's peers (`from`/`to`) and ports.
type Rule<'p> = (
    Option<&'p Vec<net::NetworkPolicyPeer>>,
    Option<&'p Vec<net::NetworkPolicyPort>>,
);

enum Peer<'a> {
    Pod(&'a PodInfo, IpAddr),
    Ip(IpAddr),
    Node,
}

struct Oracle<'s, 'a> {
    state: &'s ScenarioState<'a>,
    policies: Vec<&'s net::NetworkPolicy>,
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Ingress,
    Egress,
}

impl<'s> Oracle<'s, '_> {
    fn peer(&self, ep: &Endpoint, probe: &Probe) -> Option<Peer<'s>> {
        Some(match ep {
            Endpoint::Pod(name) => {
                let pod = self.state.pod(name)?;
                Peer::Pod(pod, pod.ip_of(probe.family)?)
            }
            Endpoint::External(name) => Peer::Ip(self.state.external(name)?.ip),
            Endpoint::Node => Peer::Node,
            Endpoint::Service(_) => return None,
        })
    }

    fn allowed(
        &self,
        from: &Peer<'_>,
        to: &Peer<'_>,
        protocol: Protocol,
        port: u16,
    ) -> Option<bool> {
        let egress = match from {
            Peer::Pod(pod, _) => {
                self.direction_allows(pod, Direction::Egress, to, protocol, port)?
            }
            _ => true,
        };
        let ingress = match (from, to) {
            // Traffic from the node to its pods is always allowed.
            (Peer::Node, _) => true,
            (_, Peer::Pod(pod, _)) => {
                self.direction_allows(pod, Direction::Ingress, from, protocol, port)?
            }
            _ => true,
        };
        Some(egress && ingress)
    }

    /// Whether the policies selecting `pod` allow traffic with `peer` in
    /// `direction`; `None` if that depends on the node's address.
    fn direction_allows(
        &self,
        pod: &PodInfo,
        direction: Direction,
        peer: &Peer<'_>,
        protocol: Protocol,
        port: u16,
    ) -> Option<bool> {
        let mut isolated = false;
        let mut unknown = false;
        for np in &self.policies {
            let ns = np.metadata.namespace.as_deref().unwrap_or_default();
            let spec = np.spec.as_ref()?;
            if ns != pod.name.namespace
                || !spec
                    .pod_selector
                    .as_ref()
                    .is_none_or(|sel| selects(sel, &pod.labels))
            {
                continue;
            }
            let types = spec.policy_types.clone().unwrap_or_else(|| {
                let mut t = vec!["Ingress".to_owned()];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push("Egress".to_owned());
                }
                t
            });
            let name = if direction == Direction::Ingress {
                "Ingress"
            } else {
                "Egress"
            };
            if !types.iter().any(|t| t == name) {
                continue;
            }
            isolated = true;
            let rules: Vec<Rule<'_>> = match direction {
                Direction::Ingress => spec
                    .ingress
                    .iter()
                    .flatten()
                    .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                    .collect(),
                Direction::Egress => spec
                    .egress
                    .iter()
                    .flatten()
                    .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                    .collect(),
            };
            // The pod whose named ports count: the destination.
            let dest_pod = match (direction, peer) {
                (Direction::Ingress, _) => Some(pod),
                (Direction::Egress, Peer::Pod(p, _)) => Some(*p),
                (Direction::Egress, _) => None,
            };
            for (peers, ports) in rules {
                let port_ok = ports.is_none_or(|ports| {
                    ports.is_empty()
                        || ports
                            .iter()
                            .any(|p| port_matches(p, dest_pod, protocol, port))
                });
                if !port_ok {
                    continue;
                }
                match peers.filter(|p| !p.is_empty()) {
                    None => return Some(true),
                    Some(peers) => {
                        for p in peers {
                            match self.peer_matches(ns, p, peer) {
                                Some(true) => return Some(true),
                                Some(false) => {}
                                None => unknown = true,
                            }
                        }
                    }
                }
            }
        }
        if !isolated {
            Some(true)
        } else if unknown {
            None
        } else {
            Some(false)
        }
    }

    fn peer_matches(
        &self,
        policy_ns: &str,
        p: &net::NetworkPolicyPeer,
        peer: &Peer<'_>,
    ) -> Option<bool> {
        if let Some(block) = &p.ip_block {
            let ip = match peer {
                Peer::Pod(_, ip) | Peer::Ip(ip) => *ip,
                Peer::Node => return None,
            };
            let inside = |cidr: &str| in_cidr(ip, cidr);
            return Some(inside(&block.cidr) && !block.except.iter().flatten().any(|e| inside(e)));
        }
        let Peer::Pod(pod, _) = peer else {
            return Some(false);
        };
        let ns_ok = match &p.namespace_selector {
            None => pod.name.namespace == policy_ns,
            Some(sel) => selects(sel, self.state.namespace_labels(&pod.name.namespace)?),
        };
        let pod_ok = p
            .pod_selector
            .as_ref()
            .is_none_or(|sel| selects(sel, &pod.labels));
        Some(ns_ok && pod_ok)
    }
}

fn port_matches(
    p: &net::NetworkPolicyPort,
    dest: Option<&PodInfo>,
    protocol: Protocol,
    port: u16,
) -> bool {
    if p.protocol.as_deref().unwrap_or("TCP") != protocol.as_str() {
        return false;
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(n)) => {
            let end = p.end_port.unwrap_or(*n);
            (*n..=end).contains(&i32::from(port))
        }
        Some(IntOrString::String(name)) => dest.is_some_and(|pod| {
            pod.servers
                .iter()
                .any(|s| s.name.as_ref() == Some(name) && s.protocol == protocol && s.port == port)
        }),
    }
}

fn selects(sel: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("unknown operator {other}"),
        }
    });
    labels_ok && exprs_ok
}

fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let (addr, len) = cidr.split_once('/').expect("CIDR");
    let net: IpAddr = addr.parse().expect("CIDR address");
    let len: u32 = len.parse().expect("CIDR length");
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}
