use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
use serde::de::DeserializeOwned;

use super::*;

const CLUSTER: &str = r#"
- {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {name: shop}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: outside, labels: {name: outside}}}
- apiVersion: v1
  kind: Pod
  metadata: {name: front-end, namespace: shop, labels: {name: front-end}}
  spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 8079, name: front}]}]}
  status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: catalogue, namespace: shop, labels: {name: catalogue}}
  spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80, name: http}]}]}
  status: {podIP: 10.244.1.11, podIPs: [{ip: 10.244.1.11}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: outside, labels: {app: client}}
  spec: {nodeName: n2, containers: [{name: c}]}
  status: {podIP: 10.244.3.10, podIPs: [{ip: 10.244.3.10}]}
"#;

const POLICIES: &str = r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: default-deny-ingress, namespace: shop}
  spec: {podSelector: {}, policyTypes: [Ingress]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: catalogue-access, namespace: shop}
  spec:
    podSelector: {matchLabels: {name: catalogue}}
    policyTypes: [Ingress]
    ingress:
      - from: [{podSelector: {matchLabels: {name: front-end}}}]
        ports: [{port: http, protocol: TCP}]
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: egress-to-web, namespace: outside}
  spec:
    podSelector: {}
    policyTypes: [Egress]
    egress:
      - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.11/32]}}]
"#;

fn objects<T: DeserializeOwned>(yaml: &str, kind: &str) -> Vec<T> {
    let all: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_str(yaml).unwrap();
    all.into_iter()
        .filter(|o| o["kind"].as_str() == Some(kind))
        .map(|o| serde_yaml_ng::from_value(o).unwrap())
        .collect()
}

fn state() -> ClusterState {
    let namespaces: Vec<core::Namespace> = objects(CLUSTER, "Namespace");
    let pods: Vec<core::Pod> = objects(CLUSTER, "Pod");
    let policies: Vec<net::NetworkPolicy> = objects(POLICIES, "NetworkPolicy");
    let (state, rejected) = ClusterState::from_k8s(&namespaces, &pods, &policies);
    assert!(rejected.is_empty(), "{rejected:?}");
    state
}

fn pod(ns: &str, name: &str) -> Party {
    Party::Pod(ObjectRef::new(ns, name))
}

fn query(from: Party, to: Party, port: u16) -> Query {
    Query {
        from,
        to,
        protocol: Protocol::Tcp,
        port,
    }
}

const NODE_IP: &str = "192.168.0.1";

fn run(q: Query) -> Explanation {
    let node_ips = [NODE_IP.parse().unwrap()];
    let e = explain(&state(), &node_ips, &q).unwrap();
    assert!(
        e.egress.disagreement.is_none() && e.ingress.disagreement.is_none(),
        "{e}"
    );
    e
}

#[test]
fn allowed_names_the_rule_and_the_named_port() {
    let e = run(query(
        pod("shop", "front-end"),
        pod("shop", "catalogue"),
        80,
    ));
    assert!(e.allowed(), "{e}");
    assert_eq!(e.egress.decision, Some(Decision::NotIsolated));
    let rule = e.ingress.rule.as_ref().expect("a rule allows it");
    assert_eq!((rule.policy.as_str(), rule.index), ("catalogue-access", 0));
    let text = e.to_string();
    assert!(
        text.contains("allowed by shop/catalogue-access ingress rule[0]"),
        "{text}"
    );
    assert!(text.contains("http/TCP (named) allows 80/TCP"), "{text}");
}

#[test]
fn denied_names_the_isolating_policies_and_why_each_rule_missed() {
    let e = run(query(
        pod("outside", "client"),
        pod("shop", "catalogue"),
        80,
    ));
    assert!(!e.allowed(), "{e}");
    assert_eq!(e.ingress.decision, Some(Decision::Denied));
    let names: Vec<&str> = e
        .ingress
        .policies
        .iter()
        .map(|p| p.policy.name.as_str())
        .collect();
    assert_eq!(names, ["catalogue-access", "default-deny-ingress"]);
    let text = e.to_string();
    assert!(
        text.contains(
            "podSelector {name=front-end} selects pods of namespace shop only, not outside"
        ),
        "{text}"
    );
    assert!(text.contains("no ingress rules: allows nothing"), "{text}");
    // The client's own egress (ipBlock with except) denies it too, and says why.
    assert_eq!(e.egress.decision, Some(Decision::Denied));
    assert!(text.contains("except 10.244.1.11/32 removes it"), "{text}");
}

#[test]
fn wrong_port_and_node_and_outside_addresses() {
    let e = run(query(
        pod("shop", "front-end"),
        pod("shop", "catalogue"),
        8080,
    ));
    assert!(!e.allowed());
    assert!(
        e.to_string()
            .contains("8080/TCP is not in [http/TCP (named)]"),
        "{e}"
    );
    let e = run(query(Party::Node, pod("shop", "catalogue"), 22));
    assert!(e.allowed(), "{e}");
    assert_eq!(e.ingress.decision, Some(Decision::FromNode));
    let e = run(query(
        Party::Address("203.0.113.9".parse().unwrap()),
        pod("shop", "front-end"),
        8079,
    ));
    assert!(!e.allowed(), "{e}");
    assert!(e.to_string().contains("not a pod, nothing enforced"), "{e}");
}

#[test]
fn pod_addresses_explain_as_their_pods() {
    let ip = |s: &str| Party::Address(s.parse().unwrap());
    for (from, to, port) in [
        (
            ("shop", "front-end", "10.244.1.10"),
            ("shop", "catalogue", "10.244.1.11"),
            80,
        ),
        (
            ("outside", "client", "10.244.3.10"),
            ("shop", "catalogue", "10.244.1.11"),
            80,
        ),
        (
            ("outside", "client", "10.244.3.10"),
            ("shop", "front-end", "10.244.1.10"),
            8079,
        ),
    ] {
        let by_name = run(query(pod(from.0, from.1), pod(to.0, to.1), port));
        let by_ip = run(query(ip(from.2), ip(to.2), port));
        assert_eq!(by_ip.allowed(), by_name.allowed(), "{by_ip}");
        assert_eq!(by_ip.egress.pod, by_name.egress.pod, "{by_ip}");
        assert_eq!(by_ip.ingress.pod, by_name.ingress.pod, "{by_ip}");
        assert_eq!(by_ip.ingress.rule, by_name.ingress.rule, "{by_ip}");
    }
}

#[test]
fn unknown_pods_are_errors() {
    let err = explain(
        &state(),
        &[],
        &query(pod("shop", "nope"), pod("shop", "catalogue"), 80),
    );
    assert_eq!(
        err.unwrap_err(),
        ExplainError::UnknownPod(ObjectRef::new("shop", "nope"))
    );
}

#[test]
#[ignore = "prints an example; run with --ignored --nocapture"]
fn print_example() {
    println!(
        "{}",
        run(query(
            pod("outside", "client"),
            pod("shop", "catalogue"),
            80
        ))
    );
    println!(
        "{}",
        run(query(
            pod("shop", "front-end"),
            pod("shop", "catalogue"),
            80
        ))
    );
}
