//! What the flow pipeline needs to name an event: pods by address, the
//! node's addresses, local endpoints by id, rules by id, ipBlock identities
//! by id and the policies isolating each local endpoint. The reconciler
//! builds one after every successful apply, from the state it programmed,
//! so a flow is named after the policies that were enforced.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use policy_common::Direction;

use crate::compile::{Desired, IdentityAllocator, IdentityKey, LocalEndpoint, RuleRef};
use crate::model::{ClusterState, ObjectRef, Pod};

/// A pod as flows name it: the model's pod, shared with the cluster state.
pub type PodName = Pod;

/// See the module docs.
#[derive(Debug, Default)]
pub struct FlowNames {
    /// The revision these names were programmed at.
    pub revision: u64,
    pods_by_ip: HashMap<IpAddr, Arc<PodName>>,
    node_ips: HashSet<IpAddr>,
    endpoints: HashMap<u32, Arc<PodName>>,
    rules: HashMap<u32, Arc<RuleRef>>,
    cidrs: HashMap<u32, IpNet>,
    isolating: HashMap<(u32, Direction), Arc<[ObjectRef]>>,
}

impl FlowNames {
    /// Names for the state `state` compiled into `desired` for the local
    /// `endpoints`. Pods are shared with the state; rules equal to ones in
    /// `previous` are shared with it rather than copied.
    pub fn build(
        previous: Option<&FlowNames>,
        revision: u64,
        state: &ClusterState,
        node_ips: &[IpAddr],
        endpoints: &BTreeMap<ObjectRef, LocalEndpoint>,
        desired: &Desired,
        ids: &IdentityAllocator,
    ) -> Self {
        let mut pods_by_ip = HashMap::with_capacity(state.pods().len());
        let mut local = HashMap::with_capacity(endpoints.len());
        for (key, pod) in state.pods() {
            let local_endpoint = endpoints.get(key);
            if pod.host_network || (pod.ips.is_empty() && local_endpoint.is_none()) {
                continue;
            }
            let name = pod.clone();
            for ip in &pod.ips {
                pods_by_ip.insert(*ip, name.clone());
            }
            if let Some(endpoint) = local_endpoint {
                local.insert(endpoint.endpoint_id, name);
            }
        }
        let mut isolating = HashMap::new();
        for (key, endpoint) in endpoints {
            let Some(pod) = state.pod(key) else { continue };
            for direction in [Direction::Ingress, Direction::Egress] {
                let policies: Arc<[ObjectRef]> = state
                    .policies_in(&pod.namespace)
                    .filter(|p| p.selects(pod) && p.isolates(direction))
                    .map(|p| p.object_ref())
                    .collect();
                isolating.insert((endpoint.endpoint_id, direction), policies);
            }
        }
        let cidrs = ids
            .assignments()
            .filter_map(|(id, key)| match key {
                IdentityKey::Cidr(net) => Some((id, *net)),
                IdentityKey::Labels { .. } => None,
            })
            .collect();
        Self {
            revision,
            pods_by_ip,
            node_ips: node_ips.iter().copied().collect(),
            endpoints: local,
            rules: desired
                .rules
                .iter()
                .map(|(id, rule)| {
                    let known = previous
                        .and_then(|p| p.rules.get(id))
                        .filter(|known| ***known == *rule);
                    (
                        *id,
                        known.cloned().unwrap_or_else(|| Arc::new(rule.clone())),
                    )
                })
                .collect(),
            cidrs,
            isolating,
        }
    }

    pub fn pod_by_ip(&self, ip: &IpAddr) -> Option<&Arc<PodName>> {
        self.pods_by_ip.get(ip)
    }

    pub fn is_node(&self, ip: &IpAddr) -> bool {
        self.node_ips.contains(ip)
    }

    pub fn endpoint(&self, endpoint_id: u32) -> Option<&Arc<PodName>> {
        self.endpoints.get(&endpoint_id)
    }

    pub fn rule(&self, rule_id: u32) -> Option<&Arc<RuleRef>> {
        self.rules.get(&rule_id)
    }

    /// The ipBlock prefix an identity stands for.
    pub fn cidr(&self, identity: u32) -> Option<IpNet> {
        self.cidrs.get(&identity).copied()
    }

    /// The policies that isolate the endpoint in `direction`.
    pub fn isolating(&self, endpoint_id: u32, direction: Direction) -> Option<&Arc<[ObjectRef]>> {
        self.isolating.get(&(endpoint_id, direction))
    }
}
