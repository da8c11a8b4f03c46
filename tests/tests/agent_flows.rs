//! Flows from the real agent: `policy-agent observe` (the CLI, JSON) on real
//! connections between pods in network namespaces, the Flows API's filters
//! and live following, and the flow metrics (needs root; skipped otherwise).
//!
//! Cluster: alpha/web (app=web; TCP 8080, 9000; UDP 9000), alpha/client
//! (app=client), beta/client (app=client). In alpha, `default-deny` isolates
//! every pod for ingress and `allow-client` lets app=client pods of alpha
//! reach app=web on TCP 8080.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use palisade_tests::agent::{self, Agent, AgentDirs, AgentOptions, Client, manifest, proto};
use palisade_tests::netns::{
    ProbeResult, TcpServer, Topology, UdpEchoServer, tcp_probe, udp_probe,
};
use serde_json::Value;

const NODE: &str = "agfw-node";
const WAIT: Duration = Duration::from_secs(20);

const WEB: Ipv4Addr = Ipv4Addr::new(10, 213, 1, 2);
const ALPHA_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 213, 1, 3);
const BETA_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 213, 2, 2);

/// Topology name, namespace, pod name, address, app label.
const PODS: [(&str, &str, &str, Ipv4Addr, &str); 3] = [
    ("web", "alpha", "web", WEB, "web"),
    ("aclient", "alpha", "client", ALPHA_CLIENT, "client"),
    ("bclient", "beta", "client", BETA_CLIENT, "client"),
];

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: alpha}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client, namespace: alpha}
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: client}
    ports:
    - {protocol: TCP, port: 8080}
"#;

use palisade_tests::is_root;

struct Cluster {
    _tcp: Vec<TcpServer>,
    _udp: UdpEchoServer,
    agent: Agent,
    topo: Topology,
    dirs: AgentDirs,
}

impl Cluster {
    /// `prefix` names the test's network namespaces (unique per test).
    fn start(prefix: &str) -> Self {
        let dirs = AgentDirs::new(prefix).expect("agent directories");
        let mut docs = vec![
            manifest::namespace("alpha", &[]),
            manifest::namespace("beta", &[]),
        ];
        for (_, ns, name, ip, app) in PODS {
            docs.push(manifest::pod(
                ns,
                name,
                &[("app", app)],
                NODE,
                &[IpAddr::V4(ip)],
                &[8080, 9000],
            ));
        }
        dirs.write_manifest("cluster.yaml", &manifest::documents(&docs))
            .unwrap();
        dirs.write_manifest("policies.yaml", POLICIES).unwrap();

        let mut topo = Topology::new(prefix).expect("topology");
        for (topo_name, _, _, ip, _) in PODS {
            topo.add_pod(topo_name, ip, None).expect("pod");
        }
        let web = &topo.pod("web").netns;
        let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let tcp = [8080, 9000]
            .into_iter()
            .map(|port| TcpServer::start(web, any, port).expect("tcp server"))
            .collect();
        let udp = UdpEchoServer::start(web, any, 9000).expect("udp server");
        let agent = Agent::start(&dirs, &AgentOptions::in_topology(NODE, &topo))
            .expect("starting the agent");
        let cluster = Self {
            _tcp: tcp,
            _udp: udp,
            agent,
            topo,
            dirs,
        };
        let mut client = cluster.client();
        for (topo_name, ns, name, _, _) in PODS {
            let pod = cluster.topo.pod(topo_name);
            palisade_tests::agent::register_and_wait(
                &mut client,
                ns,
                name,
                &format!("ctr-{prefix}-{topo_name}"),
                pod,
                WAIT,
            )
            .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.agent.log_tail()));
        }
        client.sync_and_wait(WAIT).expect("sync");
        cluster
    }

    fn client(&self) -> Client {
        self.agent.client().expect("API client")
    }

    fn tcp(&self, from: &str, port: u16) -> ProbeResult {
        let dst = SocketAddr::new(IpAddr::V4(WEB), port);
        tcp_probe(&self.topo.pod(from).netns, dst, Duration::from_millis(1500))
    }

    /// `policy-agent observe ARGS -o json`, one object per flow.
    fn observe_cli(&self, args: &[&str]) -> Vec<Value> {
        let output = Command::new(agent::binary().expect("policy-agent binary"))
            .arg("observe")
            .arg("--socket")
            .arg(&self.dirs.socket)
            .args(["-o", "json"])
            .args(args)
            .output()
            .expect("running policy-agent observe");
        assert!(
            output.status.success(),
            "observe {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    /// A metric's value from the agent's status (0 when absent).
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let status = self.client().status().expect("status");
        status
            .metrics
            .iter()
            .find(|m| m.name == name && m.labels == labels)
            .map_or(0.0, |m| m.value)
    }
}

fn pod_of(flow: &Value, end: &str) -> String {
    let peer = &flow[end];
    match peer["kind"].as_str() {
        Some("pod") => format!(
            "{}/{}",
            peer["namespace"].as_str().unwrap_or(""),
            peer["name"].as_str().unwrap_or("")
        ),
        other => other.unwrap_or("?").to_owned(),
    }
}

fn is(flow: &Value, src: &str, dst: &str, port: u64, verdict: &str, direction: &str) -> bool {
    pod_of(flow, "source") == src
        && pod_of(flow, "destination") == dst
        && flow["destination_port"].as_u64() == Some(port)
        && flow["verdict"] == verdict
        && flow["direction"] == direction
}

fn policies(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[test]
fn observe_explains_real_connections() {
    if !is_root() {
        return;
    }
    let cluster = Cluster::start("agfw");

    assert_eq!(cluster.tcp("aclient", 8080), ProbeResult::Open);
    assert_eq!(cluster.tcp("bclient", 8080), ProbeResult::TimedOut);
    assert_eq!(cluster.tcp("aclient", 9000), ProbeResult::TimedOut);

    let flows = cluster.observe_cli(&["--last", "1000"]);
    let context = || {
        flows
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Allowed: named with the policy and rule that allowed it.
    let allowed = flows
        .iter()
        .find(|f| is(f, "alpha/client", "alpha/web", 8080, "allowed", "ingress"))
        .unwrap_or_else(|| panic!("no allowed flow client -> web:8080 in\n{}", context()));
    assert_eq!(allowed["reason"], "allowed_by_policy");
    assert_eq!(allowed["protocol"], "TCP");
    assert_eq!(allowed["decided_by"]["namespace"], "alpha");
    assert_eq!(allowed["decided_by"]["name"], "allow-client");
    assert_eq!(allowed["decided_by"]["direction"], "ingress");
    assert_eq!(allowed["decided_by"]["rule_index"], 0);
    assert_eq!(allowed["endpoint"]["name"], "web");
    assert_eq!(allowed["source"]["labels"]["app"], "client");
    assert_eq!(allowed["source"]["ip"], ALPHA_CLIENT.to_string());
    // The client's own egress is not isolated: that side says so.
    assert!(
        flows.iter().any(
            |f| is(f, "alpha/client", "alpha/web", 8080, "allowed", "egress")
                && f["reason"] == "allowed_not_isolated"
        ),
        "{}",
        context()
    );

    // Denied by default deny: the isolating policies are named.
    let isolating: BTreeSet<String> = ["alpha/allow-client", "alpha/default-deny"]
        .map(String::from)
        .into();
    for (src, port) in [("beta/client", 8080), ("alpha/client", 9000)] {
        let denied = flows
            .iter()
            .find(|f| is(f, src, "alpha/web", port, "denied", "ingress"))
            .unwrap_or_else(|| panic!("no denied flow {src} -> web:{port} in\n{}", context()));
        assert_eq!(denied["reason"], "denied_by_policy");
        assert!(denied["decided_by"].is_null());
        assert_eq!(policies(&denied["isolated_by"]), isolating, "{denied}");
    }

    // Filters keep exactly the flows they name.
    let check = |args: &[&str], keep: &dyn Fn(&Value) -> bool| {
        let filtered = cluster.observe_cli(&[&["--last", "1000"], args].concat());
        assert!(!filtered.is_empty(), "{args:?} kept nothing");
        let expected: Vec<&Value> = flows.iter().filter(|f| keep(f)).collect();
        assert_eq!(
            filtered.iter().collect::<Vec<_>>(),
            expected,
            "filter {args:?}"
        );
    };
    check(&["--verdict", "denied"], &|f| f["verdict"] == "denied");
    check(&["--direction", "egress"], &|f| f["direction"] == "egress");
    check(&["--pod", "beta/client"], &|f| {
        pod_of(f, "source") == "beta/client" || pod_of(f, "destination") == "beta/client"
    });
    check(&["--namespace", "beta", "--verdict", "allowed"], &|f| {
        (f["source"]["namespace"] == "beta" || f["destination"]["namespace"] == "beta")
            && f["verdict"] == "allowed"
    });
    check(&["--port", "9000"], &|f| {
        f["source_port"] == 9000 || f["destination_port"] == 9000
    });
    check(&["--policy", "alpha/default-deny"], &|f| {
        policies(&f["isolated_by"]).contains("alpha/default-deny")
    });
    check(
        &["--policy", "allow-client", "--verdict", "allowed"],
        &|f| f["decided_by"]["name"] == "allow-client",
    );
    check(
        &["-l", "app=client,app notin (web)", "--protocol", "tcp"],
        &|f| f["protocol"] == "TCP",
    );
    // `--last N` keeps the newest N, oldest first.
    let last2 = cluster.observe_cli(&["--last", "2"]);
    assert_eq!(
        last2.iter().collect::<Vec<_>>(),
        flows[flows.len() - 2..].iter().collect::<Vec<_>>()
    );
    // The text form: a header, then one line per flow naming both pods,
    // the verdict and what decided.
    let text = Command::new(agent::binary().unwrap())
        .args(["observe", "--socket"])
        .arg(&cluster.dirs.socket)
        .args(["--last", "1000", "--pod", "web"])
        .output()
        .unwrap();
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("TIME"), "{text}");
    assert_eq!(
        lines.len(),
        1 + flows
            .iter()
            .filter(|f| pod_of(f, "destination") == "alpha/web")
            .count(),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.contains("alpha/client:")
            && l.contains("-> alpha/web:8080")
            && l.contains("ALLOWED")
            && l.contains("by alpha/allow-client ingress[0]")),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.contains("beta/client:")
            && l.contains("-> alpha/web:8080")
            && l.contains("DENIED")
            && l.contains("isolated by alpha/allow-client, alpha/default-deny")),
        "{text}"
    );
    // A bad filter is a clear error.
    let bad = Command::new(agent::binary().unwrap())
        .args(["observe", "--socket"])
        .arg(&cluster.dirs.socket)
        .args(["-l", "app in (web"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unbalanced parentheses"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn follow_streams_new_flows_and_metrics_count_them() {
    if !is_root() {
        return;
    }
    let cluster = Cluster::start("agfx");
    let denied_udp = r#"verdict="denied",direction="ingress",protocol="UDP""#;
    let blocked_udp = r#"protocol="UDP",port="9000""#;
    let allowed_udp = r#"verdict="allowed",direction="egress",protocol="UDP""#;
    let before = (
        cluster.metric("palisade_agent_flows_total", denied_udp),
        cluster.metric("palisade_agent_blocked_connections_total", blocked_udp),
        cluster.metric("palisade_agent_flows_total", allowed_udp),
    );

    // A follower that only wants beta/client's denied flows.
    let socket = cluster.dirs.socket.clone();
    let follower = std::thread::spawn(move || {
        let mut client = Client::connect(&socket).expect("client");
        let mut got = Vec::new();
        let request = proto::ObserveRequest {
            last: 0,
            follow: true,
            filter: Some(proto::FlowFilter {
                pod: vec!["beta/client".into()],
                verdict: "denied".into(),
                ..Default::default()
            }),
        };
        client
            .observe(request, Some(Duration::from_secs(15)), |item| {
                if let Some(proto::observe_response::Item::Flow(flow)) = item.item {
                    got.push(flow);
                }
                got.len() < 3
            })
            .expect("observe");
        got
    });
    // Let the follower subscribe before traffic starts (the stream begins
    // when the call returns; nothing here can tell when the server side did).
    std::thread::sleep(Duration::from_millis(300));

    // Exactly three UDP datagrams, each dropped once at web's ingress, and
    // allowed at the client's (not isolated) egress.
    for _ in 0..3 {
        let dst = SocketAddr::new(IpAddr::V4(WEB), 9000);
        let result = udp_probe(
            &cluster.topo.pod("bclient").netns,
            dst,
            Duration::from_millis(200),
        );
        assert_eq!(result, ProbeResult::TimedOut);
    }
    // And traffic the follower must not see.
    assert_eq!(cluster.tcp("aclient", 8080), ProbeResult::Open);

    let got = follower.join().expect("follower");
    assert_eq!(got.len(), 3, "{got:?}");
    for flow in &got {
        assert_eq!(flow.protocol, "UDP");
        assert_eq!(flow.verdict, "denied");
        assert_eq!(flow.destination_port, 9000);
        assert_eq!(flow.source.as_ref().unwrap().name, "client");
        assert_eq!(flow.source.as_ref().unwrap().namespace, "beta");
    }

    // Counted exactly once each.
    let after = (
        cluster.metric("palisade_agent_flows_total", denied_udp),
        cluster.metric("palisade_agent_blocked_connections_total", blocked_udp),
        cluster.metric("palisade_agent_flows_total", allowed_udp),
    );
    assert_eq!(after.0 - before.0, 3.0, "denied UDP flows");
    assert_eq!(after.1 - before.1, 3.0, "blocked UDP connections to 9000");
    assert_eq!(after.2 - before.2, 3.0, "allowed UDP flows at the egress");
    assert_eq!(
        cluster.metric("palisade_agent_flow_events_lost_total", r#"at="kernel""#),
        0.0
    );
}
