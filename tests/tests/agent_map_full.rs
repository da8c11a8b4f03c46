//! A full map is an explicit error, never a silent fail-open (needs root;
//! skipped otherwise).
//!
//! The real agent (files source) enforces a policy between two pods in
//! network namespaces. Then a NetworkPolicy with more ipBlock prefixes than
//! `PALISADE_PEER_CIDRS` holds (65,536 entries for both generations) is
//! added: the map fills while the writer stages the new generation. The
//! agent must say so (status `last_error` and `failed_revision`,
//! `palisade_agent_apply_errors_total{reason="map_full"}`, `WaitEnforced`
//! for that revision failing with FAILED_PRECONDITION) while the classifier
//! keeps enforcing the previous revision (probes unchanged); once the policy
//! is removed, the next apply succeeds and the error clears.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use palisade_tests::agent::{Agent, AgentDirs, AgentOptions, Code, manifest, proto};
use palisade_tests::netns::{ProbeResult, TcpServer, Topology, tcp_probe};

const PREFIX: &str = "agmf";
const NODE: &str = "agmf-node";
const WAIT: Duration = Duration::from_secs(60);
const A: Ipv4Addr = Ipv4Addr::new(10, 214, 1, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 214, 1, 3);
const OPEN_WAIT: Duration = Duration::from_secs(2);
const DROP_WAIT: Duration = Duration::from_millis(300);
/// More prefixes than PALISADE_PEER_CIDRS holds.
const PREFIXES: usize = 70_000;

use palisade_tests::is_root;

fn cluster_yaml() -> String {
    manifest::documents(&[
        manifest::namespace("app", &[]),
        manifest::pod(
            "app",
            "a",
            &[("role", "client")],
            NODE,
            &[IpAddr::V4(A)],
            &[],
        ),
        manifest::pod(
            "app",
            "b",
            &[("role", "server")],
            NODE,
            &[IpAddr::V4(B)],
            &[8080, 8081],
        ),
    ])
}

/// `b` takes TCP 8080 from `a`, nothing else.
const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: b-ingress
  namespace: app
spec:
  podSelector:
    matchLabels: {role: server}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {role: client}
    ports:
    - protocol: TCP
      port: 8080
"#;

/// A policy selecting no pod whose ipBlocks name [`PREFIXES`] distinct /32s:
/// every prefix of every policy gets a CIDR identity and a trie entry.
fn huge_policy() -> String {
    let mut text = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: huge\n  namespace: app\nspec:\n  podSelector:\n    matchLabels: {role: nobody}\n  ingress:\n  - from:\n",
    );
    for i in 0..PREFIXES {
        let _ = writeln!(
            text,
            "    - ipBlock: {{cidr: 172.{}.{}.{}/32}}",
            16 + (i >> 16),
            (i >> 8) & 255,
            i & 255
        );
    }
    text
}

fn probe(topo: &Topology, port: u16, open: bool) -> Result<(), String> {
    let result = tcp_probe(
        &topo.pod("a").netns,
        SocketAddr::new(IpAddr::V4(B), port),
        if open { OPEN_WAIT } else { DROP_WAIT },
    );
    let expected = if open {
        ProbeResult::Open
    } else {
        ProbeResult::TimedOut
    };
    if result == expected {
        Ok(())
    } else {
        Err(format!("a -> b:{port}: expected {expected}, got {result}"))
    }
}

fn check_enforcement(topo: &Topology, agent: &Agent, what: &str) {
    for (port, open) in [(8080, true), (8081, false)] {
        if let Err(e) = probe(topo, port, open) {
            panic!("{what}: {e}\n{}", agent.log_tail());
        }
    }
}

fn map_full_errors(status: &proto::AgentStatus) -> f64 {
    status
        .metrics
        .iter()
        .filter(|m| m.name == "palisade_agent_apply_errors_total" && m.labels.contains("map_full"))
        .map(|m| m.value)
        .sum()
}

#[test]
fn a_full_map_is_reported_and_the_previous_enforcement_stays() {
    if !is_root() {
        return;
    }
    let dirs = AgentDirs::new(PREFIX).expect("agent directories");
    dirs.write_manifest("cluster.yaml", &cluster_yaml())
        .unwrap();
    dirs.write_manifest("policy.yaml", POLICY).unwrap();
    let mut topo = Topology::new(PREFIX).expect("topology");
    topo.add_pod("a", A, None).expect("pod a");
    topo.add_pod("b", B, None).expect("pod b");
    let _servers: Vec<TcpServer> = [8080, 8081]
        .into_iter()
        .map(|port| {
            TcpServer::start(
                &topo.pod("b").netns,
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                port,
            )
            .expect("server")
        })
        .collect();
    let agent = Agent::start(&dirs, &AgentOptions::in_topology(NODE, &topo)).expect("agent");
    let mut client = agent.client().expect("client");
    for name in ["a", "b"] {
        let pod = topo.pod(name);
        palisade_tests::agent::register_and_wait(
            &mut client,
            "app",
            name,
            &format!("ctr-{PREFIX}-{name}"),
            pod,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_tail()));
    }
    check_enforcement(&topo, &agent, "before");
    let good = client.status().expect("status");
    assert!(good.last_error.is_empty(), "{good:?}");
    assert_eq!(map_full_errors(&good), 0.0);

    // The map fills while the next generation is staged.
    dirs.write_manifest("huge.yaml", &huge_policy()).unwrap();
    let revision = client.sync().expect("sync");
    let err = client
        .wait_enforced(None, revision, WAIT)
        .expect_err("a revision that overflows a map cannot be enforced");
    assert_eq!(
        err.code(),
        Some(Code::FailedPrecondition),
        "{err}\n{}",
        agent.log_tail()
    );
    let status = client.status().expect("status");
    assert!(
        status.last_error.contains("map is full"),
        "last_error: {:?}\n{}",
        status.last_error,
        agent.log_tail()
    );
    assert_eq!(status.failed_revision, revision);
    assert!(status.enforced_revision < revision);
    assert!(
        map_full_errors(&status) >= 1.0,
        "no apply_errors{{reason=\"map_full\"}}: {:?}",
        status.metrics
    );
    // Not a silent fail-open, nor a fail-closed: what was enforced stays.
    check_enforcement(&topo, &agent, "with a full map");

    // Removed: the next apply succeeds and the error clears.
    dirs.remove_manifest("huge.yaml").unwrap();
    let enforced = client
        .sync_and_wait(WAIT)
        .unwrap_or_else(|e| panic!("after removing the huge policy: {e}\n{}", agent.log_tail()));
    assert!(enforced > revision);
    let status = client.status().expect("status");
    assert!(status.last_error.is_empty(), "{:?}", status.last_error);
    check_enforcement(&topo, &agent, "after recovery");
}
