//! The cluster both enforcers are given: namespace `bench` with the client
//! and server pods (on this node) and `N - 1` other pods (on another node,
//! peers only), and `N` NetworkPolicies that all select the server. Policy
//! `allow-00000` lets the client reach the benchmark ports; policy `allow-i`
//! (i ≥ 1) lets pod `peer-i` reach TCP `9000 + i % 1000`. Every pod has its
//! own labels, so every pod is its own identity.
//!
//! The objects are real Kubernetes API objects (k8s-openapi), converted by
//! the agent's own model code; Palisade's compiler and the iptables
//! generator both read the resulting [`ClusterState`].

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use policy_agent::model::{ClusterState, ObjectRef};
use serde_json::json;

/// Namespace of every object.
pub const NAMESPACE: &str = "bench";
/// The node the client and server run on.
pub const NODE_NAME: &str = "bench-node";
/// The client pod's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 10);
/// The server pod's address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 20);
/// Port of the request/response server (connections and transactions).
pub const ECHO_PORT: u16 = 8080;
/// Port of the iperf3 server (bulk throughput).
pub const IPERF_PORT: u16 = 5201;
/// A port on the server that no policy allows the client: the enforcement
/// check expects it blocked whenever a policy selects the server.
pub const DENIED_PORT: u16 = 8081;

/// Most policies this scenario can hold (peer addresses are 10.211.0.0/16).
pub const MAX_POLICIES: usize = 65_000;

pub fn client_ref() -> ObjectRef {
    ObjectRef::new(NAMESPACE, "client")
}

pub fn server_ref() -> ObjectRef {
    ObjectRef::new(NAMESPACE, "server")
}

fn peer_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 211, 0, 0)) + i as u32)
}

fn pod(name: &str, app: &str, ip: Ipv4Addr, node: &str) -> Result<core::Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"namespace": NAMESPACE, "name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "bench"}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    }))?)
}

fn policy(index: usize, from_app: &str, ports: &[u16]) -> Result<net::NetworkPolicy> {
    let ports: Vec<_> = ports
        .iter()
        .map(|p| json!({"protocol": "TCP", "port": p}))
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"namespace": NAMESPACE, "name": format!("allow-{index:05}")},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": from_app}}}],
                "ports": ports,
            }],
        },
    }))?)
}

/// The cluster with `policies` NetworkPolicies selecting the server.
pub fn build(policies: usize) -> Result<ClusterState> {
    if policies > MAX_POLICIES {
        bail!("at most {MAX_POLICIES} policies");
    }
    let namespaces: Vec<core::Namespace> = vec![serde_json::from_value(
        json!({"metadata": {"name": NAMESPACE}}),
    )?];
    let mut pods = vec![
        pod("client", "client", CLIENT_IP, NODE_NAME)?,
        pod("server", "server", SERVER_IP, NODE_NAME)?,
    ];
    let mut wire = Vec::with_capacity(policies);
    for i in 0..policies {
        if i == 0 {
            wire.push(policy(0, "client", &[ECHO_PORT, IPERF_PORT])?);
        } else {
            let app = format!("peer-{i:05}");
            pods.push(pod(&app, &app, peer_ip(i), "other-node")?);
            wire.push(policy(i, &app, &[9000 + (i % 1000) as u16])?);
        }
    }
    let (state, rejected) = ClusterState::from_k8s(&namespaces, &pods, &wire);
    if let Some(d) = rejected.first().or(state.diagnostics().next()) {
        bail!("the scenario's objects do not convert cleanly: {d}");
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_selects_the_server() {
        let state = build(50).expect("builds");
        assert_eq!(state.policies().len(), 50);
        assert_eq!(state.pods().len(), 51);
        let server = state.pod(&server_ref()).expect("server");
        assert!(state.policies().values().all(|p| p.selects(server)));
    }
}
