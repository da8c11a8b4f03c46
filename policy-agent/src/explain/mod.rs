//! Why a connection is allowed or denied: "which policy dropped my packet?"
//! answered before the packet is sent.
//!
//! The verdict comes from the compiler's output read the way the classifier
//! reads its maps ([`Desired::decide`]), so it is what enforcement does. The
//! reasons come from evaluating each rule of each selecting policy on the
//! model (selectors, ipBlocks, ports). Both are reported; should they ever
//! disagree, the explanation says so instead of hiding it.

mod query;
mod render;
mod rules;

use std::net::IpAddr;

use policy_common::{Direction, identity};
use thiserror::Error;

pub use query::{PartyError, QueryError, parse_protocol, parse_query};
pub use rules::RuleVerdict;

use crate::compile::{
    Desired, IdentityAllocator, LocalEndpoint, NodeScope, RuleRef, compile, lookup::Decision,
};
use crate::model::{ClusterState, ObjectRef, Pod, Protocol};

/// One end of the connection to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    Pod(ObjectRef),
    /// The node the pod runs on.
    Node,
    Address(IpAddr),
}

/// A connection: `from` opens it to `to` on `port`/`protocol`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub from: Party,
    pub to: Party,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("no pod {0} in the cluster state")]
    UnknownPod(ObjectRef),
    #[error("pod {0} has no address yet")]
    NoAddress(ObjectRef),
    #[error("the node's address is not known (give it with --node-ip)")]
    NoNodeAddress,
}

/// One selecting policy and how each of its rules for the direction fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub policy: ObjectRef,
    pub rules: Vec<RuleVerdict>,
}

/// The verdict of one side: the source pod's egress or the destination pod's ingress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    pub direction: Direction,
    /// The pod enforcing this side; `None` when that party is not a pod
    /// (nothing is enforced there).
    pub pod: Option<ObjectRef>,
    /// What the classifier decides, read from the compiled maps.
    pub decision: Option<Decision>,
    /// For [`Decision::Allowed`]: the rule the maps name.
    pub rule: Option<RuleRef>,
    /// Policies selecting the pod for this direction (they isolate it).
    pub policies: Vec<PolicyVerdict>,
    /// Set when the model's evaluation and the maps disagree.
    pub disagreement: Option<String>,
}

impl Side {
    pub fn allows(&self) -> bool {
        self.decision.is_none_or(Decision::allows)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub query: Query,
    pub egress: Side,
    pub ingress: Side,
}

impl Explanation {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// A party's pod (if it is one) and the address the datapath sees.
struct Resolved<'a> {
    pod: Option<&'a Pod>,
    addr: IpAddr,
    is_node: bool,
}

fn resolve<'a>(
    state: &'a ClusterState,
    node_ips: &[IpAddr],
    party: &Party,
) -> Result<Resolved<'a>, ExplainError> {
    match party {
        Party::Pod(r) => {
            let pod = state
                .pod(r)
                .ok_or_else(|| ExplainError::UnknownPod(r.clone()))?;
            let addr = pod
                .ips
                .iter()
                .find(|ip| ip.is_ipv4())
                .or_else(|| pod.ips.first())
                .copied()
                .ok_or_else(|| ExplainError::NoAddress(r.clone()))?;
            Ok(Resolved {
                pod: Some(pod),
                addr,
                is_node: false,
            })
        }
        Party::Node => {
            let addr = *node_ips.first().ok_or(ExplainError::NoNodeAddress)?;
            Ok(Resolved {
                pod: None,
                addr,
                is_node: true,
            })
        }
        // A pod's address is that pod (as the classifier's peer map has it),
        // with that address: explaining the addresses of a flow log line
        // gives the verdict of that connection, IPv6 ipBlocks included.
        Party::Address(ip) => Ok(Resolved {
            pod: state
                .pods()
                .values()
                .find(|pod| !pod.host_network && pod.ips.contains(ip))
                .map(|pod| &**pod),
            addr: *ip,
            is_node: node_ips.contains(ip),
        }),
    }
}

/// Explains `query` against `state`; `node_ips` are the node's addresses
/// (peers with them are the node).
pub fn explain(
    state: &ClusterState,
    node_ips: &[IpAddr],
    query: &Query,
) -> Result<Explanation, ExplainError> {
    let from = resolve(state, node_ips, &query.from)?;
    let to = resolve(state, node_ips, &query.to)?;
    let egress = side(state, node_ips, Direction::Egress, &from, &to, query);
    let ingress = side(state, node_ips, Direction::Ingress, &to, &from, query);
    Ok(Explanation {
        query: query.clone(),
        egress,
        ingress,
    })
}

/// The side enforced at `local` against `peer`.
fn side(
    state: &ClusterState,
    node_ips: &[IpAddr],
    direction: Direction,
    local: &Resolved<'_>,
    peer: &Resolved<'_>,
    query: &Query,
) -> Side {
    let Some(pod) = local.pod else {
        return Side {
            direction,
            pod: None,
            decision: None,
            rule: None,
            policies: Vec::new(),
            disagreement: None,
        };
    };
    // The destination pod resolves named ports.
    let destination = if direction == Direction::Ingress {
        Some(pod)
    } else {
        peer.pod
    };
    let policies: Vec<PolicyVerdict> = state
        .policies_in(&pod.namespace)
        .filter(|p| p.selects(pod) && p.isolates(direction))
        .map(|p| PolicyVerdict {
            policy: p.object_ref(),
            rules: p
                .rules(direction)
                .iter()
                .enumerate()
                .map(|(index, rule)| {
                    rules::evaluate(
                        state,
                        p,
                        index,
                        rule,
                        peer.pod,
                        &peer.addr,
                        destination,
                        query,
                    )
                })
                .collect(),
        })
        .collect();

    let desired = compile_for(state, node_ips, pod);
    let decision = desired.endpoints.get(&EXPLAIN_IFINDEX).map(|endpoint| {
        let mut info = desired.peer_info(&peer.addr);
        if peer.is_node {
            info.identity = identity::HOST;
        }
        desired.decide(
            endpoint,
            direction,
            &info,
            query.protocol.number(),
            query.port,
        )
    });
    let rule = match decision {
        Some(Decision::Allowed(id)) => desired.rules.get(&id).cloned(),
        _ => None,
    };
    let model_allows = (direction == Direction::Ingress && peer.is_node)
        || policies.is_empty()
        || policies.iter().any(|p| p.rules.iter().any(|r| r.matches));
    let disagreement = match decision {
        Some(d) if d.allows() != model_allows => Some(format!(
            "the compiled maps {} but the rules {}: please report this",
            if d.allows() { "allow" } else { "deny" },
            if model_allows { "allow" } else { "deny" },
        )),
        _ => None,
    };
    Side {
        direction,
        pod: Some(pod.object_ref()),
        decision,
        rule,
        policies,
        disagreement,
    }
}

const EXPLAIN_IFINDEX: u32 = 1;

/// Compiles the state with `pod` as the one local endpoint, on its node.
fn compile_for(state: &ClusterState, node_ips: &[IpAddr], pod: &Pod) -> Desired {
    let endpoint = LocalEndpoint {
        ifindex: EXPLAIN_IFINDEX,
        endpoint_id: 1,
    };
    let mut scope = NodeScope {
        node_name: pod.node_name.clone().unwrap_or_default(),
        node_ips: node_ips.to_vec(),
        endpoints: [(pod.object_ref(), endpoint)].into_iter().collect(),
    };
    if pod.node_name.is_some() {
        return compile(state, &scope, &mut IdentityAllocator::new());
    }
    // An unscheduled pod: place it on a node of its own to see its policy.
    let mut placed = state.clone();
    let mut copy = pod.clone();
    copy.node_name = Some("explain".to_owned());
    scope.node_name = "explain".to_owned();
    let diagnostics = Vec::new();
    placed.insert_pod(copy, diagnostics);
    compile(&placed, &scope, &mut IdentityAllocator::new())
}

#[cfg(test)]
mod tests;
