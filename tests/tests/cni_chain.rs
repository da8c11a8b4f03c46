//! The chained CNI plugin in real chains (needs root; skipped otherwise).
//!
//! The test acts as a container runtime (`palisade_tests::cni::Runtime`):
//! it creates a network namespace per pod and runs the reference `bridge`
//! (or `ptp`) plugin with `host-local` IPAM from /usr/lib/cni, then
//! `palisade-cni` with the previous result, through the CNI protocol
//! (environment variables and stdin), inside the node's network namespace,
//! exactly as a runtime runs a conflist. The conflist itself is the one
//! `palisade-cni install` wrote into the node's configuration directory.
//! The real agent (`policy-agent run --source files`) runs in the node's
//! namespace with its own manifests, socket, pin and state directories.
//!
//! Cluster (files source): namespace `alpha`; pods `locked` (app=locked,
//! isolated both ways by the deny-all policy `lock-down`), `open`
//! (app=open, no policy) and `client` (app=client), each serving TCP 8080.
//!
//! Also here: the error cases, each with its CNI error code. The
//! manifests' server-side dry run is in `deploy_manifests.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};
use palisade_tests::agent::{self, Agent, AgentDirs, AgentOptions, Client, manifest, proto};
use palisade_tests::cni::{self, Attachment, CniError, ConfList, REFERENCE_PLUGINS, Runtime};
use palisade_tests::netns::{Netns, ProbeResult, TcpServer, cleanup_prefix, tcp_probe};
use policy_common::names;
use serde_json::{Value, json};

const PORT: u16 = 8080;
/// How long an allowed connection may take.
const OPEN_WAIT: Duration = Duration::from_secs(2);
/// How long a dropped connection is given to get through anyway.
const DROP_WAIT: Duration = Duration::from_millis(500);
/// The plugin's timeoutSeconds in the installed conflist.
const PLUGIN_TIMEOUT_SECS: f64 = 10.0;

use palisade_tests::is_root;

const LOCK_DOWN: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: lock-down
  namespace: alpha
spec:
  podSelector:
    matchLabels: {app: locked}
  policyTypes: [Ingress, Egress]
"#;

/// The pods of the cluster: (name, app label, last octet of the address).
const PODS: [(&str, &str, u8); 5] = [
    ("locked", "locked", 10),
    ("open", "open", 11),
    ("client", "client", 12),
    ("stale", "client", 13),
    ("late", "client", 14),
];

fn pod_ip(subnet: [u8; 3], octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(subnet[0], subnet[1], subnet[2], octet)
}

/// The interface plugin of a test network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bridge,
    Ptp,
}

/// A node: its network namespace, the agent running in it, and the CNI
/// directories with the node's configuration chained by `palisade-cni
/// install`.
struct Node {
    // Drop order: the agent, then the namespace (and every interface in
    // it), then the directories.
    agent: Option<Agent>,
    runtime: Runtime,
    list: ConfList,
    netns: Netns,
    prefix: String,
    subnet: [u8; 3],
    dirs: AgentDirs,
    conf_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Node {
    /// Starts node `prefix` with an interface plugin of `kind` on
    /// `subnet`.0/24 and the agent (whose socket the plugin uses).
    fn start(prefix: &str, kind: Kind, subnet: [u8; 3]) -> Self {
        cleanup_prefix(prefix).expect("removing leftovers");
        let netns = Netns::create(&format!("{prefix}-node")).expect("node namespace");
        netns.setup_basics().expect("node namespace basics");
        netns.set_sysctl("net.ipv4.ip_forward", "1").unwrap();

        let dirs = AgentDirs::new(prefix).expect("agent directories");
        let node_name = format!("{prefix}-node");
        let mut docs = vec![manifest::namespace("alpha", &[("team", "a")])];
        for (name, app, octet) in PODS {
            docs.push(manifest::pod(
                "alpha",
                name,
                &[("app", app)],
                &node_name,
                &[IpAddr::V4(pod_ip(subnet, octet))],
                &[PORT],
            ));
        }
        dirs.write_manifest("cluster.yaml", &manifest::documents(&docs))
            .unwrap();
        dirs.write_manifest("policies.yaml", LOCK_DOWN).unwrap();
        let gateway = pod_ip(subnet, 1);
        let agent = Agent::start(
            &dirs,
            &AgentOptions {
                node_name,
                node_ips: vec![IpAddr::V4(gateway)],
                netns: Some(netns.path().to_owned()),
                start_timeout: Duration::from_secs(30),
            },
        )
        .expect("starting the agent");

        let tmp = tempfile::tempdir().expect("temporary directory");
        let conf_dir = tmp.path().join("net.d");
        let bin_dir = tmp.path().join("bin");
        std::fs::create_dir_all(&conf_dir).unwrap();
        let ipam = json!({
            "type": "host-local",
            "dataDir": tmp.path().join("ipam"),
            "ranges": [[{
                "subnet": format!("{}/24", pod_ip(subnet, 0)),
                "gateway": gateway,
            }]],
        });
        // The node's network configuration before Palisade: a conflist for
        // bridge, a single-plugin .conf for ptp (install converts it).
        let (file, config) = match kind {
            Kind::Bridge => (
                "10-bridge.conflist",
                json!({"cniVersion": "1.0.0", "name": format!("{prefix}-net"), "plugins": [{
                    "type": "bridge", "bridge": format!("{prefix}br0"), "isGateway": true,
                    "ipMasq": false, "ipam": ipam,
                }]}),
            ),
            Kind::Ptp => (
                "10-ptp.conf",
                json!({"cniVersion": "1.0.0", "name": format!("{prefix}-net"), "type": "ptp",
                       "ipMasq": false, "ipam": ipam}),
            ),
        };
        std::fs::write(conf_dir.join(file), config.to_string()).unwrap();
        install(&conf_dir, &bin_dir, &dirs.socket);
        let conflist = conf_dir.join(Path::new(file).with_extension("conflist"));
        let list = ConfList::load(&conflist).expect("the installed conflist");
        let types: Vec<&str> = (0..list.plugins().len())
            .map(|i| list.plugin_type(i))
            .collect();
        let first = if kind == Kind::Bridge {
            "bridge"
        } else {
            "ptp"
        };
        assert_eq!(types, [first, "palisade-cni"], "{:?}", list.doc);

        Self {
            agent: Some(agent),
            runtime: Runtime {
                cni_path: vec![bin_dir, PathBuf::from(REFERENCE_PLUGINS)],
                host_netns: Some(netns.path().to_owned()),
            },
            list,
            netns,
            prefix: prefix.to_owned(),
            subnet,
            dirs,
            conf_dir,
            _tmp: tmp,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the agent is running")
    }

    fn client(&self) -> Client {
        self.agent().client().expect("API client")
    }

    fn endpoint(&self, container_id: &str) -> Option<proto::Endpoint> {
        self.client()
            .list()
            .expect("Endpoints.List")
            .into_iter()
            .find(|e| e.container_id == container_id)
    }

    /// A pod namespace with a server on [`PORT`], not yet attached.
    fn pod(&self, name: &str) -> Pod {
        let octet = PODS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, o)| *o)
            .expect("a pod of the cluster");
        let ip = pod_ip(self.subnet, octet);
        let netns = Netns::create(&format!("{}-{name}", self.prefix)).expect("pod namespace");
        netns.setup_basics().expect("pod namespace basics");
        let server =
            TcpServer::start(&netns, IpAddr::V6(Ipv6Addr::UNSPECIFIED), PORT).expect("server");
        let attachment = Attachment::pod(
            &format!("{}-{name}-0123456789abcdef", self.prefix),
            netns.path(),
            "alpha",
            name,
        )
        .with_arg("IP", &ip.to_string());
        Pod {
            attachment,
            ip,
            _server: server,
            netns,
            result: None,
        }
    }

    /// ADD of the whole conflist; panics on an error. Returns how long the
    /// chain took.
    fn add(&self, pod: &mut Pod) -> Duration {
        let started = Instant::now();
        let result = self
            .runtime
            .add(&self.list, &pod.attachment)
            .expect("running the chain")
            .unwrap_or_else(|e| panic!("ADD failed: {e}\n{}", self.agent_log()));
        pod.result = Some(result);
        started.elapsed()
    }

    /// DEL of the whole conflist with the ADD's result.
    fn del(&self, pod: &Pod) -> Result<(), Box<CniError>> {
        self.runtime
            .del(&self.list, &pod.attachment, pod.result.as_ref())
            .expect("running the chain")
    }

    /// The conflist with `cniVersion` 1.1.0 for Palisade's STATUS and GC
    /// (the reference plugins stop at 1.0.0, so a runtime would not send
    /// them for this list; the plugin is asked directly).
    fn list_v1_1(&self) -> ConfList {
        let mut doc = self.list.doc.clone();
        doc["cniVersion"] = json!("1.1.0");
        ConfList { doc }
    }

    fn agent_log(&self) -> String {
        agent::log_tail(&self.dirs.log, 40)
    }

    /// The programs attached with TCX to `interface` of the node (ingress,
    /// egress), as the kernel reports them.
    fn tcx_programs(&self, interface: &str) -> (Vec<String>, Vec<String>) {
        let interface = interface.to_owned();
        self.netns.run(move || {
            let names = |hook| {
                SchedClassifier::query_tcx(&interface, hook)
                    .map(|(_, programs)| {
                        programs
                            .iter()
                            .filter_map(|p| p.name_as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            (names(TcAttachType::Ingress), names(TcAttachType::Egress))
        })
    }

    /// Asserts the classifier is (or is not) attached to `interface`.
    fn assert_classifier(&self, interface: &str, attached: bool) {
        // The kernel keeps 15 characters of a program's name.
        let short = |name: &str| name.chars().take(15).collect::<String>();
        let (ingress, egress) = self.tcx_programs(interface);
        assert_eq!(
            ingress.contains(&short(names::PROG_FROM_POD)),
            attached,
            "{interface} ingress programs: {ingress:?}"
        );
        assert_eq!(
            egress.contains(&short(names::PROG_TO_POD)),
            attached,
            "{interface} egress programs: {egress:?}"
        );
    }
}

/// A pod: its namespace, its server, its attachment and ADD result.
struct Pod {
    attachment: Attachment,
    ip: Ipv4Addr,
    result: Option<Value>,
    _server: TcpServer,
    netns: Netns,
}

impl Pod {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), PORT)
    }

    fn container_id(&self) -> &str {
        &self.attachment.container_id
    }

    /// The host side of the pod's veth in a result: the host interface
    /// whose name the plugin of `kind` gives it.
    fn host_veth(&self) -> String {
        let result = self.result.as_ref().expect("added");
        let hosts: Vec<&str> = result["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
            .filter_map(|i| i["name"].as_str())
            .filter(|n| n.starts_with("veth"))
            .collect();
        assert_eq!(hosts.len(), 1, "{result}");
        hosts[0].to_owned()
    }
}

/// `palisade-cni install` as the init container runs it; twice, the second
/// time changing nothing.
fn install(conf_dir: &Path, bin_dir: &Path, socket: &Path) {
    let run = || {
        cni::install(conf_dir, bin_dir, socket, PLUGIN_TIMEOUT_SECS)
            .unwrap_or_else(|e| panic!("{e:#}"))
    };
    let first = run();
    assert!(first.contains("chained palisade-cni last"), "{first}");
    assert!(first.contains("saved the original"), "{first}");
    let second = run();
    assert!(
        second.contains("already ends with palisade-cni"),
        "{second}"
    );
    assert!(second.contains("is up to date"), "{second}");
}

fn expect_open(from: &Netns, to: SocketAddr, what: &str) {
    let r = tcp_probe(from, to, OPEN_WAIT);
    assert_eq!(r, ProbeResult::Open, "{what}: expected open, got {r}");
}

fn expect_dropped(from: &Netns, to: SocketAddr, what: &str) {
    let r = tcp_probe(from, to, DROP_WAIT);
    assert_eq!(
        r,
        ProbeResult::TimedOut,
        "{what}: expected dropped, got {r}"
    );
}

fn expect_error(result: Result<(), Box<CniError>>, code: u64, text: &str) -> Box<CniError> {
    let e = result.expect_err("the command should have failed");
    assert_eq!(e.code, code, "{e}");
    let full = format!("{}; {}", e.msg, e.details);
    assert!(full.contains(text), "{text:?} not in: {full}");
    e
}

#[test]
fn bridge_chain_enforces_before_add_returns() {
    if !is_root() {
        return;
    }
    let node = Node::start("cnb", Kind::Bridge, [10, 217, 1]);
    let list = &node.list;
    let runtime = &node.runtime;

    // client: the whole chain.
    let mut client = node.pod("client");
    let took = node.add(&mut client);
    eprintln!("ADD of client (bridge + palisade-cni) took {took:?}");
    let endpoint = node
        .endpoint(client.container_id())
        .expect("client registered");
    assert_eq!(endpoint.host_interface, client.host_veth());
    assert_eq!(endpoint.ips, [client.ip.to_string()]);
    assert!(
        endpoint.enforced_revision > 0 && endpoint.pod_known,
        "{endpoint:?}"
    );
    assert_eq!(
        endpoint.netns_path,
        client.netns.path().display().to_string()
    );
    node.assert_classifier(&client.host_veth(), true);
    // The bridge itself carries no classifier.
    node.assert_classifier("cnbbr0", false);

    // locked: bridge first, reachable while nothing enforces; then
    // palisade-cni, after which the deny-all policy holds at once.
    let mut locked = node.pod("locked");
    let bridge = runtime
        .add_step(list, 0, &locked.attachment, None)
        .unwrap()
        .expect("bridge ADD");
    expect_open(
        &client.netns,
        locked.addr(),
        "client -> locked before palisade-cni",
    );
    let started = Instant::now();
    let result = runtime
        .add_step(list, 1, &locked.attachment, Some(&bridge))
        .unwrap()
        .unwrap_or_else(|e| panic!("palisade-cni ADD: {e}\n{}", node.agent_log()));
    let took = started.elapsed();
    // Nothing in between: the first connection after ADD returns.
    expect_dropped(
        &client.netns,
        locked.addr(),
        "client -> locked right after ADD",
    );
    eprintln!("palisade-cni ADD of locked took {took:?}");
    assert!(took < Duration::from_secs(5), "ADD took {took:?}");
    // prevResult passed on unchanged (same cniVersion: the list's).
    assert_eq!(result, bridge);
    locked.result = Some(result);
    expect_dropped(
        &locked.netns,
        client.addr(),
        "locked -> client (egress deny)",
    );
    expect_open(
        &node.netns,
        locked.addr(),
        "node -> locked (kubelet probes)",
    );
    let endpoint = node
        .endpoint(locked.container_id())
        .expect("locked registered");
    assert!(endpoint.pod_known && endpoint.ingress_isolated && endpoint.egress_isolated);
    assert_eq!(endpoint.host_interface, locked.host_veth());
    node.assert_classifier(&locked.host_veth(), true);

    // open: reachable the moment ADD returns, and can reach out.
    let mut open = node.pod("open");
    node.add(&mut open);
    expect_open(&client.netns, open.addr(), "client -> open right after ADD");
    expect_open(&open.netns, client.addr(), "open -> client");

    // CHECK of the whole chain.
    runtime
        .check(list, &locked.attachment, locked.result.as_ref().unwrap())
        .unwrap()
        .expect("CHECK of locked");

    // STATUS: the agent is ready.
    let v11 = node.list_v1_1();
    runtime.status_step(&v11, 1).unwrap().expect("STATUS");

    // GC: an endpoint whose container the runtime no longer knows goes.
    let mut stale = node.pod("stale");
    node.add(&mut stale);
    assert!(node.endpoint(stale.container_id()).is_some());
    runtime
        .gc_step(
            &v11,
            1,
            &[&client.attachment, &locked.attachment, &open.attachment],
        )
        .unwrap()
        .expect("GC");
    assert!(
        node.endpoint(stale.container_id()).is_none(),
        "stale endpoint kept"
    );
    for pod in [&client, &locked, &open] {
        assert!(
            node.endpoint(pod.container_id()).is_some(),
            "GC removed a valid endpoint"
        );
    }
    node.del(&stale).expect("DEL of a pod GC already removed");

    // DEL: palisade-cni first (as a runtime does, in reverse), the
    // interface still exists: the classifier is detached from it.
    let veth = locked.host_veth();
    runtime
        .step(list, 1, "DEL", &locked.attachment, locked.result.as_ref())
        .unwrap()
        .into_result()
        .expect("palisade-cni DEL");
    assert!(node.endpoint(locked.container_id()).is_none());
    node.assert_classifier(&veth, false);
    expect_open(&client.netns, locked.addr(), "client -> locked after DEL");
    let e = runtime
        .check(list, &locked.attachment, locked.result.as_ref().unwrap())
        .unwrap();
    expect_error(e, 105, "has no endpoint");
    runtime
        .step(list, 0, "DEL", &locked.attachment, locked.result.as_ref())
        .unwrap()
        .into_result()
        .expect("bridge DEL");
    // DEL again, and DEL once the netns is gone: both succeed.
    node.del(&locked).expect("second DEL");
    drop(locked);
    node.del(&client).expect("DEL of client");
    assert!(node.endpoint(client.container_id()).is_none());
    let client_netns = client.attachment.netns.clone();
    let client_attachment = client.attachment.clone();
    drop(client);
    assert!(!client_netns.exists());
    runtime
        .del(list, &client_attachment, None)
        .unwrap()
        .expect("DEL without netns and without prevResult");

    // The agent stops: DEL still succeeds; STATUS says not available; a
    // new pod's ADD fails and says why; the runtime's DEL after it works.
    let mut node = node;
    node.agent.take().expect("agent").kill9().unwrap();
    node.del(&open).expect("DEL with the agent down");
    let e = node.runtime.status_step(&v11, 1).unwrap();
    expect_error(e, 50, node.dirs.socket.to_str().unwrap());
    let late = node.pod("late");
    let started = Instant::now();
    let e = node
        .runtime
        .add(&node.list, &late.attachment)
        .unwrap()
        .map(drop);
    let e = expect_error(e, 11, "not reachable");
    assert_eq!(e.plugin, "palisade-cni");
    assert!(
        e.details.contains(node.dirs.socket.to_str().unwrap()),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    node.runtime
        .del(&node.list, &late.attachment, None)
        .unwrap()
        .expect("DEL after a failed ADD");
}

#[test]
fn ptp_chain_enforces_before_add_returns() {
    if !is_root() {
        return;
    }
    let node = Node::start("cnp", Kind::Ptp, [10, 217, 2]);
    // install turned the .conf into a conflist and kept the original.
    assert!(!node.conf_dir.join("10-ptp.conf").exists());
    assert!(node.conf_dir.join("10-ptp.conf.palisade-backup").exists());

    let mut client = node.pod("client");
    node.add(&mut client);
    let mut locked = node.pod("locked");
    let took = node.add(&mut locked);
    eprintln!("ADD of locked (ptp + palisade-cni) took {took:?}");
    expect_dropped(
        &client.netns,
        locked.addr(),
        "client -> locked right after ADD",
    );
    let mut open = node.pod("open");
    node.add(&mut open);
    expect_open(&client.netns, open.addr(), "client -> open right after ADD");
    expect_dropped(&locked.netns, open.addr(), "locked -> open (egress deny)");

    for pod in [&client, &locked, &open] {
        // ptp has one host interface: the veth.
        let interfaces = pod.result.as_ref().unwrap()["interfaces"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(interfaces.len(), 2, "{interfaces:?}");
        let endpoint = node.endpoint(pod.container_id()).expect("registered");
        assert_eq!(endpoint.host_interface, pod.host_veth());
        node.assert_classifier(&pod.host_veth(), true);
        node.runtime
            .check(&node.list, &pod.attachment, pod.result.as_ref().unwrap())
            .unwrap()
            .expect("CHECK");
    }
    let v11 = node.list_v1_1();
    node.runtime.status_step(&v11, 1).unwrap().expect("STATUS");
    node.runtime
        .gc_step(
            &v11,
            1,
            &[&client.attachment, &locked.attachment, &open.attachment],
        )
        .unwrap()
        .expect("GC with every endpoint valid");
    for pod in [&client, &locked, &open] {
        node.del(pod).expect("DEL");
        assert!(node.endpoint(pod.container_id()).is_none());
        node.del(pod).expect("DEL again");
    }
    assert!(node.client().list().unwrap().is_empty());
}

/// The error cases, each with its code and a message that says what to do.
#[test]
fn errors_are_cni_errors() {
    if !is_root() {
        return;
    }
    let node = Node::start("cne", Kind::Bridge, [10, 217, 3]);
    let runtime = &node.runtime;
    let list = &node.list;
    let mut pod = node.pod("client");
    let bridge = runtime
        .add_step(list, 0, &pod.attachment, None)
        .unwrap()
        .expect("bridge ADD");
    let request = |prev: Option<&Value>| list.request(1, prev);
    let run = |env: Vec<(String, String)>, stdin: &[u8]| {
        runtime
            .exec("palisade-cni", &env, stdin)
            .unwrap()
            .into_result()
            .map(drop)
    };
    let add_env = pod.attachment.env("ADD");
    let without = |name: &str| -> Vec<(String, String)> {
        add_env.iter().filter(|(k, _)| k != name).cloned().collect()
    };
    let with = |name: &str, value: &str| -> Vec<(String, String)> {
        let mut env = without(name);
        env.push((name.to_owned(), value.to_owned()));
        env
    };
    let good = request(Some(&bridge)).to_string();

    // VERSION.
    let version = runtime
        .exec(
            "palisade-cni",
            &[("CNI_COMMAND".into(), "VERSION".into())],
            br#"{"cniVersion":"1.0.0"}"#,
        )
        .unwrap()
        .into_result()
        .expect("VERSION");
    assert_eq!(version["cniVersion"], "1.0.0");
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            version["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!(v)),
            "{version}"
        );
    }

    // Decoding and configuration.
    expect_error(
        run(add_env.clone(), b"{\"cniVersion\": \"1.0.0\", "),
        6,
        "not JSON",
    );
    expect_error(run(add_env.clone(), b""), 6, "stdin is empty");
    let e = expect_error(
        run(add_env.clone(), request(None).to_string().as_bytes()),
        7,
        "no prevResult",
    );
    assert!(e.msg.contains("chained plugin"), "{e}");
    let mut old = request(Some(&bridge));
    old["cniVersion"] = json!("0.2.0");
    expect_error(
        run(add_env.clone(), old.to_string().as_bytes()),
        1,
        "\"0.2.0\" is not supported",
    );
    let mut future = request(Some(&bridge));
    future["cniVersion"] = json!("2.0.0");
    let e = expect_error(
        run(add_env.clone(), future.to_string().as_bytes()),
        1,
        "not supported",
    );
    assert_eq!(
        e.cni_version, "1.1.0",
        "an unsupported version is not echoed"
    );
    let mut bad_timeout = request(Some(&bridge));
    bad_timeout["timeoutSeconds"] = json!(0);
    expect_error(
        run(add_env.clone(), bad_timeout.to_string().as_bytes()),
        7,
        "timeoutSeconds",
    );

    // Environment.
    expect_error(
        run(without("CNI_NETNS"), good.as_bytes()),
        4,
        "CNI_NETNS is not set",
    );
    expect_error(
        run(without("CNI_CONTAINERID"), good.as_bytes()),
        4,
        "CNI_CONTAINERID",
    );
    expect_error(
        run(without("CNI_COMMAND"), good.as_bytes()),
        4,
        "CNI_COMMAND is not set",
    );
    expect_error(
        run(with("CNI_ARGS", "IgnoreUnknown=1"), good.as_bytes()),
        4,
        "K8S_POD_NAMESPACE",
    );
    expect_error(
        run(
            with("CNI_NETNS", "/run/netns/cne-no-such-pod"),
            good.as_bytes(),
        ),
        100,
        "does not exist",
    );
    expect_error(
        run(with("CNI_IFNAME", "net1"), good.as_bytes()),
        101,
        "no interface net1",
    );
    // A prevResult whose host interface is not the pod's veth peer.
    let mut wrong = bridge.clone();
    wrong["interfaces"] = json!([
        {"name": "cnebr0"},
        {"name": "eth0", "sandbox": pod.netns.path()},
    ]);
    expect_error(
        run(
            add_env.clone(),
            request(Some(&wrong)).to_string().as_bytes(),
        ),
        102,
        "is the veth peer of eth0",
    );

    // Commands and versions.
    let mut check_old = request(Some(&bridge));
    check_old["cniVersion"] = json!("0.3.1");
    expect_error(
        run(
            pod.attachment.env("CHECK"),
            check_old.to_string().as_bytes(),
        ),
        1,
        "CHECK is not part of CNI 0.3.1",
    );
    expect_error(
        runtime.status_step(list, 1).unwrap(),
        1,
        "STATUS is not part of CNI 1.0.0",
    );

    // The agent does not answer: a socket that accepts and stays silent.
    let silent_path = node.dirs.root.join("silent.sock");
    let silent = UnixListener::bind(&silent_path).unwrap();
    let mut slow = request(Some(&bridge));
    slow["socket"] = json!(silent_path);
    slow["timeoutSeconds"] = json!(1);
    let started = Instant::now();
    let e = expect_error(
        run(add_env.clone(), slow.to_string().as_bytes()),
        11,
        "did not answer in time",
    );
    assert!(e.details.contains("silent.sock"), "{e}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    drop(silent);

    // The agent's socket does not exist.
    let mut absent = request(Some(&bridge));
    absent["socket"] = json!("/run/palisade-test-nothing-here/agent.sock");
    let e = expect_error(
        run(add_env.clone(), absent.to_string().as_bytes()),
        11,
        "not reachable",
    );
    assert!(e.details.contains("no such socket"), "{e}");
    run(pod.attachment.env("DEL"), absent.to_string().as_bytes()).expect("DEL with no agent");

    // And, after all that, the real thing works, and CHECK of an endpoint
    // the agent never had fails.
    let result = runtime
        .add_step(list, 1, &pod.attachment, Some(&bridge))
        .unwrap()
        .expect("ADD");
    pod.result = Some(result);
    node.del(&pod).expect("DEL");
    let e = runtime
        .step(list, 1, "CHECK", &pod.attachment, Some(&bridge))
        .unwrap()
        .into_result()
        .map(drop);
    // The veth went with the bridge DEL: the pod's interface is missing.
    expect_error(e, 101, "no interface eth0");
}
