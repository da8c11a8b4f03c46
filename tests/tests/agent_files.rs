//! The real agent binary with the files source, on pods in network
//! namespaces (needs root; skipped otherwise).
//!
//! The agent runs in the topology's node namespace with its own manifest
//! directory, state directory, socket and pin directory. Pods are
//! registered through its API as the CNI plugin will, and every check of
//! traffic follows a `Sync` + `WaitEnforced` (or a wait for the next
//! revision, to exercise the directory watch): no sleeps.
//!
//! Cluster: namespaces `alpha` and `beta` (and `gamma`, later); pods
//! alpha/web (app=web, TCP 8080 and 8081), alpha/client (app=client),
//! beta/client (app=client), each also serving TCP 9000; in alpha a
//! default-deny-ingress policy and one letting app=client of alpha reach
//! app=web on 8080.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use palisade_tests::agent::{Agent, AgentDirs, AgentOptions, Client, Code, manifest, proto};
use palisade_tests::netns::{ProbeResult, TcpServer, Topology, tcp_probe};

const PREFIX: &str = "agfl";
const NODE: &str = "agfl-node";
const WAIT: Duration = Duration::from_secs(20);
const OPEN_WAIT: Duration = Duration::from_secs(2);
const DROP_WAIT: Duration = Duration::from_millis(300);

const WEB: Ipv4Addr = Ipv4Addr::new(10, 212, 1, 2);
const ALPHA_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 212, 1, 3);
const BETA_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 212, 2, 2);
const STRAY: Ipv4Addr = Ipv4Addr::new(10, 212, 3, 2);

use palisade_tests::is_root;

/// Topology name, namespace, pod name, address, labels.
type PodSpec = (
    &'static str,
    &'static str,
    &'static str,
    Ipv4Addr,
    &'static [(&'static str, &'static str)],
);

const PODS: [PodSpec; 3] = [
    ("web", "alpha", "web", WEB, &[("app", "web")]),
    (
        "aclient",
        "alpha",
        "client",
        ALPHA_CLIENT,
        &[("app", "client")],
    ),
    (
        "bclient",
        "beta",
        "client",
        BETA_CLIENT,
        &[("app", "client")],
    ),
];

fn namespaces_yaml(with_gamma: bool) -> String {
    let mut docs = vec![
        manifest::namespace("alpha", &[("team", "a")]),
        manifest::namespace("beta", &[("team", "b")]),
    ];
    if with_gamma {
        docs.push(manifest::namespace("gamma", &[]));
    }
    manifest::documents(&docs)
}

fn pods_yaml(alpha_client_app: &str, with_stray: bool) -> String {
    let mut docs: Vec<String> = PODS
        .iter()
        .map(|(_, ns, name, ip, labels)| {
            let labels: Vec<(&str, &str)> = if (*ns, *name) == ("alpha", "client") {
                vec![("app", alpha_client_app)]
            } else {
                labels.to_vec()
            };
            manifest::pod(
                ns,
                name,
                &labels,
                NODE,
                &[IpAddr::V4(*ip)],
                &[8080, 8081, 9000],
            )
        })
        .collect();
    if with_stray {
        docs.push(manifest::pod(
            "gamma",
            "stray",
            &[("app", "stray")],
            NODE,
            &[IpAddr::V4(STRAY)],
            &[9000],
        ));
    }
    manifest::documents(&docs)
}

const ALPHA_POLICIES: &str = r#"
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

/// Malformed: a mapping where a list belongs, and broken indentation.
const MALFORMED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: broken
  namespace: alpha
spec:
  podSelector: {}
  ingress: [ {from: - nope
"#;

/// Selects every pod of beta for ingress, from an invalid CIDR only.
const INVALID_CIDR: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: bad-cidr
  namespace: beta
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock:
        cidr: 10.0.0.0/33
"#;

struct Cluster {
    // Drop order: servers, agent, namespaces, directories.
    _servers: Vec<TcpServer>,
    agent: Agent,
    topo: Topology,
    dirs: AgentDirs,
}

impl Cluster {
    fn start(prefix: &str) -> Self {
        let dirs = AgentDirs::new(prefix).expect("agent directories");
        dirs.write_manifest("namespaces.yaml", &namespaces_yaml(false))
            .unwrap();
        dirs.write_manifest("pods.yaml", &pods_yaml("client", false))
            .unwrap();
        dirs.write_manifest("policies.yaml", ALPHA_POLICIES)
            .unwrap();

        let mut topo = Topology::new(prefix).expect("topology");
        let mut servers = Vec::new();
        for (topo_name, _, _, ip, _) in PODS {
            topo.add_pod(topo_name, ip, None).expect("pod");
        }
        topo.add_pod("stray", STRAY, None).expect("pod");
        for pod in topo.pods() {
            for port in [8080, 8081, 9000] {
                servers.push(
                    TcpServer::start(&pod.netns, IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
                        .expect("server"),
                );
            }
        }
        let agent = Agent::start(&dirs, &AgentOptions::in_topology(NODE, &topo))
            .expect("starting the agent");
        Self {
            _servers: servers,
            agent,
            topo,
            dirs,
        }
    }

    fn client(&self) -> Client {
        self.agent.client().expect("API client")
    }

    /// Registers the topology pod `topo_name` as `namespace/name`, then
    /// waits until its endpoint is programmed.
    fn register(&self, topo_name: &str, namespace: &str, name: &str) -> proto::Endpoint {
        let pod = self.topo.pod(topo_name);
        let mut client = self.client();
        let done = palisade_tests::agent::register_and_wait(
            &mut client,
            namespace,
            name,
            &container(topo_name),
            pod,
            WAIT,
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.agent.log_tail()));
        let endpoint = done.endpoint.expect("endpoint");
        assert_eq!(endpoint.ifindex, pod.host_ifindex);
        endpoint
    }

    /// Sync, then wait until the node enforces what the files say.
    fn sync(&self) -> u64 {
        self.client()
            .sync_and_wait(WAIT)
            .unwrap_or_else(|e| panic!("sync: {e}\n{}", self.agent.log_tail()))
    }

    fn status(&self) -> proto::AgentStatus {
        self.client().status().expect("status")
    }

    /// Checks that a TCP connection from `from` to `to`:`port` is allowed
    /// (`open`) or dropped.
    fn expect(&self, from: &str, to: &str, port: u16, open: bool) -> Result<(), String> {
        let dst = SocketAddr::new(IpAddr::V4(self.topo.pod(to).ip4), port);
        let netns = &self.topo.pod(from).netns;
        let result = tcp_probe(netns, dst, if open { OPEN_WAIT } else { DROP_WAIT });
        let ok = if open {
            result == ProbeResult::Open
        } else {
            result == ProbeResult::TimedOut
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{from} -> {to}:{port}: expected {}, got {result}",
                if open { "open" } else { "dropped" }
            ))
        }
    }

    /// Every expectation, all reported at once.
    fn expect_all(&self, what: &str, cases: &[(&str, &str, u16, bool)]) {
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|(from, to, port, open)| self.expect(from, to, *port, *open).err())
            .collect();
        assert!(
            failures.is_empty(),
            "{what}:\n  {}\n{}",
            failures.join("\n  "),
            self.agent.log_tail()
        );
    }
}

fn container(topo_name: &str) -> String {
    format!("ctr-{PREFIX}-{topo_name}")
}

fn diagnostic<'a>(
    status: &'a proto::AgentStatus,
    code: &str,
    name_contains: &str,
) -> Option<&'a proto::Diagnostic> {
    status
        .diagnostics
        .as_ref()?
        .items
        .iter()
        .find(|d| d.code == code && d.name.contains(name_contains))
}

#[test]
fn files_source_end_to_end() {
    if !is_root() {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start(PREFIX);
    eprintln!(
        "agent_files: cluster up after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let before = cluster.status();
    assert_eq!(before.source, "files");
    assert!(before.endpoints.is_empty());

    for (topo_name, ns, name, _, _) in PODS {
        let endpoint = cluster.register(topo_name, ns, name);
        assert!(endpoint.endpoint_id > 0);
    }
    let status = cluster.status();
    assert!(status.ready, "{status:?}");
    assert_eq!(status.endpoints.len(), 3);
    let web = status
        .endpoints
        .iter()
        .find(|e| e.pod_name == "web")
        .unwrap();
    assert!(web.pod_known && web.ingress_isolated && !web.egress_isolated);
    assert!(web.enforced_revision > 0);

    cluster.expect_all(
        "initial policies",
        &[
            ("aclient", "web", 8080, true),
            ("aclient", "web", 8081, false),
            ("bclient", "web", 8080, false),
            ("web", "bclient", 9000, true),
            ("web", "aclient", 9000, false),
            ("bclient", "aclient", 9000, false),
        ],
    );

    // An endpoint whose Pod object is unknown is isolated both ways...
    cluster.register("stray", "gamma", "stray");
    let stray = cluster
        .status()
        .endpoints
        .into_iter()
        .find(|e| e.pod_name == "stray")
        .unwrap();
    assert!(!stray.pod_known);
    cluster.expect_all(
        "unknown pod isolated",
        &[
            ("bclient", "stray", 9000, false),
            ("stray", "bclient", 9000, false),
        ],
    );
    // ... until its Pod (and Namespace) appear.
    cluster
        .dirs
        .write_manifest("namespaces.yaml", &namespaces_yaml(true))
        .unwrap();
    cluster
        .dirs
        .write_manifest("pods.yaml", &pods_yaml("client", true))
        .unwrap();
    cluster.sync();
    cluster.expect_all(
        "known pod not isolated",
        &[
            ("bclient", "stray", 9000, true),
            ("stray", "bclient", 9000, true),
        ],
    );

    // Relabel alpha/client: no longer allowed to reach web. Waits for the
    // next revision without Sync: the inotify watch must see it.
    let revision = cluster.status().revision;
    cluster
        .dirs
        .write_manifest("pods.yaml", &pods_yaml("other", true))
        .unwrap();
    let enforced = cluster
        .client()
        .wait_enforced(None, revision + 1, WAIT)
        .unwrap_or_else(|e| panic!("waiting for the relabel: {e}\n{}", cluster.agent.log_tail()));
    assert!(enforced > revision);
    cluster.expect_all(
        "alpha/client relabelled",
        &[
            ("aclient", "web", 8080, false),
            ("bclient", "web", 8080, false),
        ],
    );
    cluster
        .dirs
        .write_manifest("pods.yaml", &pods_yaml("client", true))
        .unwrap();
    cluster.sync();

    // A malformed file is reported; everything else stays enforced.
    cluster
        .dirs
        .write_manifest("broken.yaml", MALFORMED)
        .unwrap();
    cluster.sync();
    let status = cluster.status();
    let broken = diagnostic(&status, "unparseable", "broken.yaml")
        .unwrap_or_else(|| panic!("no diagnostic for broken.yaml: {status:#?}"));
    assert_eq!(broken.severity, "error");
    assert_eq!(broken.object_kind, "File");
    assert!(status.metrics.iter().any(|m| {
        m.name == "palisade_agent_diagnostics_total"
            && m.labels.contains("kind=\"File\"")
            && m.labels.contains("code=\"unparseable\"")
            && m.value >= 1.0
    }));
    cluster.expect_all(
        "with a malformed file",
        &[
            ("aclient", "web", 8080, true),
            ("aclient", "web", 8081, false),
            ("bclient", "web", 8080, false),
        ],
    );

    // An invalid CIDR: the policy's pods are isolated, nothing allowed.
    cluster
        .dirs
        .write_manifest("beta.yaml", INVALID_CIDR)
        .unwrap();
    cluster.sync();
    let status = cluster.status();
    let bad = diagnostic(&status, "invalid_cidr", "bad-cidr")
        .unwrap_or_else(|| panic!("no invalid_cidr diagnostic: {status:#?}"));
    assert_eq!(
        (bad.object_kind.as_str(), bad.namespace.as_str()),
        ("NetworkPolicy", "beta")
    );
    let beta = status
        .endpoints
        .iter()
        .find(|e| e.namespace == "beta")
        .unwrap();
    assert!(beta.ingress_isolated);
    cluster.expect_all(
        "invalid CIDR isolates",
        &[
            ("web", "bclient", 9000, false),
            ("stray", "bclient", 9000, false),
            ("aclient", "web", 8080, true),
        ],
    );

    // The alpha policies deleted: alpha open again.
    cluster.dirs.remove_manifest("policies.yaml").unwrap();
    cluster.dirs.remove_manifest("broken.yaml").unwrap();
    cluster.sync();
    let status = cluster.status();
    assert!(diagnostic(&status, "unparseable", "broken.yaml").is_none());
    cluster.expect_all(
        "alpha policies deleted",
        &[
            ("aclient", "web", 8081, true),
            ("bclient", "web", 8080, true),
            ("web", "aclient", 9000, true),
            ("web", "bclient", 9000, false),
        ],
    );

    // Unregistered: detached (nothing filters its traffic any more), its
    // state gone from the status.
    let done = cluster
        .client()
        .unregister(&container("bclient"))
        .expect("unregister");
    assert!(done.found);
    cluster
        .client()
        .wait_enforced(None, done.revision, WAIT)
        .expect("wait after unregister");
    assert!(
        !cluster
            .status()
            .endpoints
            .iter()
            .any(|e| e.container_id == container("bclient"))
    );
    cluster.expect_all("unregistered", &[("web", "bclient", 9000, true)]);
    let again = cluster
        .client()
        .unregister(&container("bclient"))
        .expect("unregister again");
    assert!(!again.found, "a repeated DEL is not an error");

    eprintln!("agent_files: {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn api_errors_are_clear() {
    if !is_root() {
        return;
    }
    // Nobody listening.
    let dirs = AgentDirs::new("agfn").expect("dirs");
    let err = Client::connect(&dirs.socket).err().expect("no agent");
    assert!(err.to_string().contains("cannot reach the agent"), "{err}");

    let cluster = Cluster::start("agfe");
    let mut client = cluster.client();
    // An interface that does not exist (in the agent's namespace).
    let err = client
        .register(proto::RegisterRequest {
            namespace: "alpha".into(),
            pod_name: "web".into(),
            container_id: "ctr-missing".into(),
            netns_path: String::new(),
            host_interface: "nosuchif0".into(),
            ips: vec![],
        })
        .expect_err("unknown interface");
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    // A missing field.
    let err = client
        .register(proto::RegisterRequest::default())
        .expect_err("empty request");
    assert!(err.to_string().contains("invalid request"), "{err}");
    // Waiting for an endpoint that is not registered.
    let err = client
        .wait_enforced(Some("ctr-nobody"), 1, Duration::from_secs(1))
        .expect_err("unknown endpoint");
    assert!(err.to_string().contains("not registered"), "{err}");
    // A revision far ahead times out with a reason.
    let err = client
        .wait_enforced(None, 1_000_000, Duration::from_millis(200))
        .expect_err("future revision");
    assert!(err.to_string().contains("not reached yet"), "{err}");
}
