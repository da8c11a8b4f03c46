//! `policy-agent explain` and the Prometheus endpoint, on the real agent
//! binary with the files source and pods in network namespaces (needs
//! root; skipped otherwise).
//!
//! * `explain_agrees_with_the_datapath`: for one allowed and one denied
//!   connection, the live explanation (API and CLI), the offline one (`explain
//!   --dir` on the same manifests) and a real TCP connection agree.
//! * `metrics_endpoint_follows_changes`: `run --metrics-listen` serves
//!   `GET /metrics`; the latency histograms, the map occupancy gauges and
//!   `enforced_revision` move after a policy change. (Without the flag no
//!   TCP socket is opened at all: `agent::run` binds nothing when
//!   `metrics_listen` is `None`, which every other agent test exercises.)
//!
//! Cluster: namespace `alpha`; pods alpha/web (app=web, serving TCP 8080
//! and 8081) and alpha/client (app=client); a default-deny-ingress policy
//! and one letting app=client reach app=web on TCP 8080.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use palisade_tests::agent::{self, Agent, AgentDirs, AgentOptions, Client, Code, manifest, proto};
use palisade_tests::netns::{GATEWAY_V4, GATEWAY_V6, ProbeResult, TcpServer, Topology, tcp_probe};

const NODE: &str = "agex-node";
const WAIT: Duration = Duration::from_secs(20);
const OPEN_WAIT: Duration = Duration::from_secs(2);
const DROP_WAIT: Duration = Duration::from_millis(300);

use palisade_tests::is_root;

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny
  namespace: alpha
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client
  namespace: alpha
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: client}
    ports:
    - protocol: TCP
      port: 8080
"#;

/// A second policy for web: one more CIDR prefix, one more policy entry.
const MORE_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-docs
  namespace: alpha
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - ipBlock:
        cidr: 192.0.2.0/24
"#;

/// Topology name, pod name, address, labels.
const PODS: [(&str, &str, Ipv4Addr, &str); 2] = [
    ("web", "web", Ipv4Addr::new(10, 213, 1, 2), "web"),
    ("client", "client", Ipv4Addr::new(10, 213, 1, 3), "client"),
];

struct Cluster {
    // Drop order: servers, agent, namespaces, directories.
    _servers: Vec<TcpServer>,
    agent: Agent,
    topo: Topology,
    dirs: AgentDirs,
    prefix: String,
}

impl Cluster {
    /// The cluster, its pods registered and programmed; `run_args` are
    /// given to `policy-agent run`.
    fn start(prefix: &str, run_args: impl FnOnce(&Topology) -> Vec<String>) -> Self {
        let dirs = AgentDirs::new(prefix).expect("agent directories");
        let pods: Vec<String> = PODS
            .iter()
            .map(|(_, name, ip, app)| {
                manifest::pod(
                    "alpha",
                    name,
                    &[("app", app)],
                    NODE,
                    &[IpAddr::V4(*ip)],
                    &[8080, 8081],
                )
            })
            .collect();
        dirs.write_manifest(
            "cluster.yaml",
            &manifest::documents(&[
                manifest::namespace("alpha", &[("team", "a")]),
                manifest::documents(&pods),
            ]),
        )
        .unwrap();
        dirs.write_manifest("policies.yaml", POLICIES).unwrap();

        let mut topo = Topology::new(prefix).expect("topology");
        let mut servers = Vec::new();
        for (topo_name, _, ip, _) in PODS {
            topo.add_pod(topo_name, ip, None).expect("pod");
        }
        for port in [8080, 8081] {
            servers.push(
                TcpServer::start(
                    &topo.pod("web").netns,
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    port,
                )
                .expect("server"),
            );
        }
        let extra = run_args(&topo);
        let agent = Agent::start_with_args(
            &dirs,
            &AgentOptions {
                node_name: NODE.to_owned(),
                node_ips: node_ips(),
                netns: Some(topo.node_ns().path().to_owned()),
                start_timeout: Duration::from_secs(30),
            },
            &extra,
        )
        .expect("starting the agent");
        let cluster = Self {
            _servers: servers,
            agent,
            topo,
            dirs,
            prefix: prefix.to_owned(),
        };
        for (topo_name, name, _, _) in PODS {
            cluster.register(topo_name, name);
        }
        cluster
    }

    fn client(&self) -> Client {
        self.agent.client().expect("API client")
    }

    fn register(&self, topo_name: &str, name: &str) {
        let pod = self.topo.pod(topo_name);
        let container = format!("ctr-{}-{topo_name}", self.prefix);
        let mut client = self.client();
        palisade_tests::agent::register_and_wait(
            &mut client,
            "alpha",
            name,
            &container.clone(),
            pod,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.agent.log_tail()));
    }

    fn sync(&self) -> u64 {
        self.client()
            .sync_and_wait(WAIT)
            .unwrap_or_else(|e| panic!("sync: {e}\n{}", self.agent.log_tail()))
    }

    /// Whether a TCP connection from `from` to web:`port` opens (the
    /// server's greeting arrives) or is dropped; panics on anything else.
    fn connects(&self, from: &str, port: u16, expect_open: bool) -> bool {
        let dst = SocketAddr::new(IpAddr::V4(self.topo.pod("web").ip4), port);
        let wait = if expect_open { OPEN_WAIT } else { DROP_WAIT };
        match tcp_probe(&self.topo.pod(from).netns, dst, wait) {
            ProbeResult::Open => true,
            ProbeResult::TimedOut => false,
            other => panic!("{from} -> web:{port}: {other}\n{}", self.agent.log_tail()),
        }
    }
}

fn node_ips() -> Vec<IpAddr> {
    vec![IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)]
}

/// `policy-agent explain ARGS`: exit code, stdout, stderr.
fn explain_cli(args: &[String]) -> (i32, String, String) {
    let out = Command::new(agent::binary().expect("policy-agent binary"))
        .arg("explain")
        .args(args)
        .output()
        .expect("running policy-agent explain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn explain_agrees_with_the_datapath() {
    if !is_root() {
        return;
    }
    let cluster = Cluster::start("agex", |_| Vec::new());
    let socket = cluster.dirs.socket.display().to_string();
    let dir = cluster.dirs.manifests.display().to_string();
    let offline_args: Vec<String> = node_ips()
        .iter()
        .flat_map(|ip| ["--node-ip".to_owned(), ip.to_string()])
        .chain(["--dir".to_owned(), dir.clone()])
        .collect();

    for (port, allowed) in [(8080_u16, true), (8081, false)] {
        let what = format!("alpha/client -> alpha/web {port}/TCP");
        let query = strings(&[
            "--from",
            "alpha/client",
            "--to",
            "alpha/web",
            "--port",
            &port.to_string(),
        ]);

        // The API.
        let api = cluster
            .client()
            .explain(proto::ExplainRequest {
                from: "alpha/client".into(),
                to: "alpha/web".into(),
                protocol: String::new(),
                port: u32::from(port),
            })
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", cluster.agent.log_tail()));
        assert_eq!(api.allowed, allowed, "{what}:\n{}", api.text);
        assert!(api.revision > 0);

        // The CLI, live: text then JSON.
        let live_args = [query.clone(), strings(&["--socket", &socket])].concat();
        let (code, live_text, err) = explain_cli(&live_args);
        assert_eq!(
            code,
            if allowed { 0 } else { 1 },
            "{what}: {live_text}{err}"
        );
        assert_eq!(live_text, api.text, "{what}");
        let (code, live_json, err) = explain_cli(&[live_args, strings(&["-o", "json"])].concat());
        assert_eq!(code, if allowed { 0 } else { 1 }, "{what}: {err}");
        let mut live: serde_json::Value = serde_json::from_str(&live_json).unwrap();

        // The CLI, offline on the same manifests: same explanation (the
        // revision aside: offline has none).
        let offline_args = [query.clone(), offline_args.clone()].concat();
        let (code, offline_text, err) = explain_cli(&offline_args);
        assert_eq!(
            code,
            if allowed { 0 } else { 1 },
            "{what}: {offline_text}{err}"
        );
        assert_eq!(offline_text, live_text, "{what}: offline and live disagree");
        let (_, offline_json, _) = explain_cli(&[offline_args, strings(&["-o", "json"])].concat());
        let offline: serde_json::Value = serde_json::from_str(&offline_json).unwrap();
        assert_eq!(offline["revision"], 0);
        live["revision"] = 0.into();
        assert_eq!(live, offline, "{what}: JSON differs");

        // A real connection.
        assert_eq!(
            cluster.connects("client", port, allowed),
            allowed,
            "{what}: the datapath disagrees with:\n{live_text}"
        );

        if allowed {
            assert!(
                live_text.contains("allowed by alpha/allow-client ingress rule[0]"),
                "{live_text}"
            );
        } else {
            assert!(live_text.contains("DENIED"), "{live_text}");
            assert!(
                live_text.contains("8081/TCP is not in [8080/TCP]"),
                "{live_text}"
            );
        }
        eprintln!("{live_text}");
    }

    // Errors: unknown pod, bad party, no agent: exit 2, one clear line.
    let (code, _, err) = explain_cli(&strings(&[
        "--from",
        "alpha/nobody",
        "--to",
        "alpha/web",
        "--port",
        "80",
        "--socket",
        &socket,
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("not found") && err.contains("alpha/nobody"),
        "{err}"
    );
    let err = cluster
        .client()
        .explain(proto::ExplainRequest {
            from: "web".into(),
            to: "alpha/web".into(),
            protocol: "TCP".into(),
            port: 80,
        })
        .expect_err("bad party");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let missing = cluster
        .dirs
        .root
        .join("no-agent.sock")
        .display()
        .to_string();
    let (code, _, err) = explain_cli(&strings(&[
        "--from",
        "alpha/client",
        "--to",
        "alpha/web",
        "--port",
        "80",
        "--socket",
        &missing,
    ]));
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the agent"), "{err}");
}

/// `GET path` on `addr` from inside the node's namespace: status line and body.
fn http_get(cluster: &Cluster, addr: SocketAddr, path: &str) -> (String, String) {
    let response = cluster.topo.node_ns().run(|| {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    });
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The value of the sample `name{labels}` (labels as written, without braces).
fn sample(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, l) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        (n == name && l == labels).then(|| value.parse().ok())?
    })
}

#[test]
fn metrics_endpoint_follows_changes() {
    if !is_root() {
        return;
    }
    let mut addr = None;
    let cluster = Cluster::start("agmx", |topo| {
        // A free port of the node's namespace, where the agent runs.
        let port = topo.node_ns().run(|| {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        });
        let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        addr = Some(listen);
        vec!["--metrics-listen".to_owned(), listen.to_string()]
    });
    let addr = addr.unwrap();

    let (status, other) = http_get(&cluster, addr, "/");
    assert!(status.contains(" 404 "), "{status}: {other}");

    let (status, before) = http_get(&cluster, addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    assert!(before.trim_end().ends_with("# EOF"), "{before}");
    let get = |body: &str, name: &str, labels: &str| {
        sample(body, name, labels).unwrap_or_else(|| panic!("no {name}{{{labels}}} in:\n{body}"))
    };
    let enforced = cluster.client().status().unwrap().enforced_revision;
    assert_eq!(
        get(&before, "palisade_agent_enforced_revision", ""),
        enforced as f64
    );
    let compiles = get(&before, "palisade_agent_compile_duration_seconds_count", "");
    let applies = get(&before, "palisade_agent_apply_duration_seconds_count", "");
    assert!(compiles >= 1.0 && applies >= 1.0, "{before}");
    for (map, capacity) in [
        ("endpoints", 8192.0),
        ("peer_ips", 262_144.0),
        ("peer_cidrs", 65_536.0),
        ("policy", 262_144.0),
    ] {
        let labels = format!("map=\"{map}\"");
        assert_eq!(
            get(&before, "palisade_agent_map_capacity", &labels),
            capacity
        );
    }
    let entries = |body: &str, map: &str| {
        get(
            body,
            "palisade_agent_map_entries",
            &format!("map=\"{map}\""),
        )
    };
    // Two endpoints, in both generations.
    assert_eq!(entries(&before, "endpoints"), 4.0, "{before}");
    assert!(entries(&before, "policy") >= 2.0, "{before}");

    // A policy change: one more CIDR prefix, more policy entries (a rule
    // without ports writes every protocol).
    cluster
        .dirs
        .write_manifest("more.yaml", MORE_POLICY)
        .unwrap();
    let revision = cluster.sync();
    let (_, after) = http_get(&cluster, addr, "/metrics");
    assert!(
        get(&after, "palisade_agent_enforced_revision", "") >= revision as f64,
        "{after}"
    );
    assert!(get(&after, "palisade_agent_enforced_revision", "") > enforced as f64);
    assert!(get(&after, "palisade_agent_compile_duration_seconds_count", "") > compiles);
    assert!(get(&after, "palisade_agent_apply_duration_seconds_count", "") > applies);
    assert!(get(&after, "palisade_agent_apply_duration_seconds_sum", "") > 0.0);
    assert!(
        entries(&after, "peer_cidrs") > entries(&before, "peer_cidrs"),
        "{before}\n{after}"
    );
    assert!(
        entries(&after, "policy") > entries(&before, "policy"),
        "{before}\n{after}"
    );
    assert_eq!(entries(&after, "endpoints"), 4.0);
}
