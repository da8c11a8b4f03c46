//! The read-only API over TCP with TLS (`policy-agent run --flows-listen`),
//! on the real agent binary with the files source and pods in network
//! namespaces (needs root; skipped otherwise). Certificates are made by
//! rcgen: a CA, a server certificate for 127.0.0.1, a client certificate,
//! and a second ("rogue") CA with its own client certificate.
//!
//! * `mtls_listener_serves_flows_to_trusted_clients_only`: with
//!   `--tls-client-ca`, a client with the CA and a client certificate
//!   observes a real denied connection (API and `observe --server`), may
//!   ask Status and Explain, is refused Sync and Endpoints; clients without
//!   a certificate, with the rogue CA's certificate, not trusting the
//!   server, or speaking plain text are refused.
//! * `off_by_default_tls_without_client_ca_and_bad_files`: without the flag
//!   nothing listens on TCP in the node's namespace; with it and no client
//!   CA, a client without a certificate observes; unreadable or invalid PEM
//!   stops `run` with one line.
//!
//! Cluster: namespace `alpha`; pods alpha/web (app=web, serving TCP 8080)
//! and alpha/client; a default-deny-ingress policy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use palisade_tests::agent::{self, Agent, AgentDirs, AgentOptions, Client, Code, manifest, proto};
use palisade_tests::netns::{ProbeResult, TcpServer, Topology, tcp_probe};
use policy_agent::api::tls;

const NODE: &str = "agtls-node";
const WAIT: Duration = Duration::from_secs(20);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 214, 1, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 214, 1, 3);

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: alpha}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

use palisade_tests::is_root;

/// The PEM files of the test's certificates.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_ca: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

impl Pki {
    fn generate(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair,
        };
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let new_ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let leaf = |ca: &CertifiedIssuer<'_, KeyPair>,
                    names: Vec<String>,
                    usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let ca = new_ca("palisade-test-ca");
        let rogue = new_ca("palisade-rogue-ca");
        let (server_cert, server_key) = leaf(
            &ca,
            vec!["127.0.0.1".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            &ca,
            vec!["observer".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (rogue_cert, rogue_key) = leaf(
            &rogue,
            vec!["observer".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Self {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server-key.pem", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client-key.pem", client_key),
            rogue_ca: write("rogue-ca.pem", rogue.pem()),
            rogue_cert: write("rogue.pem", rogue_cert),
            rogue_key: write("rogue-key.pem", rogue_key),
        }
    }
}

struct Cluster {
    // Drop order: server, agent, namespaces, directories.
    _server: TcpServer,
    agent: Agent,
    topo: Topology,
    dirs: AgentDirs,
    pki: Pki,
    prefix: String,
}

impl Cluster {
    fn parts(prefix: &str) -> (AgentDirs, Topology, TcpServer, Pki) {
        let dirs = AgentDirs::new(prefix).expect("agent directories");
        let pki = Pki::generate(&dirs.root);
        let pods = [("web", WEB), ("client", CLIENT)].map(|(name, ip)| {
            manifest::pod(
                "alpha",
                name,
                &[("app", name)],
                NODE,
                &[IpAddr::V4(ip)],
                &[8080],
            )
        });
        dirs.write_manifest(
            "cluster.yaml",
            &manifest::documents(&[
                manifest::namespace("alpha", &[]),
                manifest::documents(&pods),
            ]),
        )
        .unwrap();
        dirs.write_manifest("policies.yaml", POLICIES).unwrap();
        let mut topo = Topology::new(prefix).expect("topology");
        topo.add_pod("web", WEB, None).expect("pod");
        topo.add_pod("client", CLIENT, None).expect("pod");
        let server = TcpServer::start(
            &topo.pod("web").netns,
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            8080,
        )
        .expect("server");
        (dirs, topo, server, pki)
    }

    /// The cluster, its pods registered and programmed; `run_args` are
    /// given to `policy-agent run`.
    fn start(prefix: &str, run_args: impl FnOnce(&Topology, &Pki) -> Vec<String>) -> Self {
        let (dirs, topo, server, pki) = Self::parts(prefix);
        let extra = run_args(&topo, &pki);
        let agent = start_agent(&dirs, &topo, &extra).expect("starting the agent");
        let cluster = Self {
            _server: server,
            agent,
            topo,
            dirs,
            pki,
            prefix: prefix.to_owned(),
        };
        cluster.register_all();
        cluster
    }

    fn register_all(&self) {
        let mut client = self.agent.client().expect("API client");
        for name in ["web", "client"] {
            let pod = self.topo.pod(name);
            palisade_tests::agent::register_and_wait(
                &mut client,
                "alpha",
                name,
                &format!("ctr-{}-{name}", self.prefix),
                pod,
                WAIT,
            )
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.agent.log_tail()));
        }
        client.sync_and_wait(WAIT).expect("sync");
    }

    /// A denied connection client -> web:8080.
    fn denied_connection(&self) {
        let dst = SocketAddr::new(IpAddr::V4(WEB), 8080);
        assert_eq!(
            tcp_probe(
                &self.topo.pod("client").netns,
                dst,
                Duration::from_millis(800)
            ),
            ProbeResult::TimedOut
        );
    }
}

fn start_agent(dirs: &AgentDirs, topo: &Topology, extra: &[String]) -> anyhow::Result<Agent> {
    Agent::start_with_args(dirs, &AgentOptions::in_topology(NODE, topo), extra)
}

/// A free TCP port on 127.0.0.1 in the node's namespace.
fn free_port(topo: &Topology) -> SocketAddr {
    let port = topo.node_ns().run(|| {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    });
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

fn path_arg(flag: &str, path: &Path) -> [String; 2] {
    [flag.to_owned(), path.display().to_string()]
}

fn tls_args(addr: SocketAddr, pki: &Pki, client_ca: bool) -> Vec<String> {
    let mut args = vec!["--flows-listen".to_owned(), addr.to_string()];
    args.extend(path_arg("--tls-cert", &pki.server_cert));
    args.extend(path_arg("--tls-key", &pki.server_key));
    if client_ca {
        args.extend(path_arg("--tls-client-ca", &pki.ca));
    }
    args
}

/// `Observe` with `--last 1000` over TLS from the node's namespace: the
/// flows, or the error (connecting or calling).
fn observe_tls(
    cluster: &Cluster,
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Vec<proto::Flow>, String> {
    let config = tls::client_config(ca, identity).map_err(|e| e.to_string())?;
    cluster.topo.node_ns().run(|| {
        let mut client =
            Client::connect_tls(&format!("https://{addr}"), config).map_err(|e| e.to_string())?;
        let mut flows = Vec::new();
        client
            .observe(
                proto::ObserveRequest {
                    last: 1000,
                    follow: false,
                    filter: None,
                },
                Some(Duration::from_secs(10)),
                |item| {
                    if let Some(proto::observe_response::Item::Flow(flow)) = item.item {
                        flows.push(flow);
                    }
                    true
                },
            )
            .map_err(|e| e.to_string())?;
        Ok(flows)
    })
}

fn is_denied_client_to_web(flow: &proto::Flow) -> bool {
    let name = |p: &Option<proto::FlowPeer>| {
        p.as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_default()
    };
    name(&flow.source) == "alpha/client"
        && name(&flow.destination) == "alpha/web"
        && flow.destination_port == 8080
        && flow.verdict == "denied"
        && flow.direction == "ingress"
}

/// TCP sockets listening in the calling thread's network namespace
/// (`/proc/thread-self/net/tcp{,6}`), as local "ADDR:PORT" in hex.
fn listening() -> Vec<String> {
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|file| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // st 0A: LISTEN.
                    (fields.get(3) == Some(&"0A")).then(|| fields[1].to_owned())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn mtls_listener_serves_flows_to_trusted_clients_only() {
    if !is_root() {
        return;
    }
    let mut addr = None;
    let cluster = Cluster::start("agtm", |topo, pki| {
        let listen = free_port(topo);
        addr = Some(listen);
        tls_args(listen, pki, true)
    });
    let addr = addr.unwrap();
    let pki = &cluster.pki;
    cluster.denied_connection();

    // Exactly one TCP listener in the node's namespace: ours.
    let listeners = cluster.topo.node_ns().run(listening);
    assert_eq!(
        listeners,
        vec![format!("0100007F:{:04X}", addr.port())],
        "{listeners:?}"
    );

    // A trusted client with its certificate sees the denied connection.
    let identity = Some((pki.client_cert.as_path(), pki.client_key.as_path()));
    let flows = observe_tls(&cluster, addr, &pki.ca, identity)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.agent.log_tail()));
    assert!(
        flows.iter().any(is_denied_client_to_web),
        "no denied client -> web:8080 in {flows:#?}"
    );

    // Status and Explain are served; Sync and Endpoints are not.
    let config = tls::client_config(&pki.ca, identity).unwrap();
    cluster.topo.node_ns().run(|| {
        let mut client = Client::connect_tls(&addr.to_string(), config).expect("TLS client");
        let status = client.status().expect("status");
        assert_eq!(status.node_name, NODE);
        assert!(status.ready);
        let explained = client
            .explain(proto::ExplainRequest {
                from: "alpha/client".into(),
                to: "alpha/web".into(),
                protocol: "TCP".into(),
                port: 8080,
            })
            .expect("explain");
        assert!(!explained.allowed, "{}", explained.text);
        let err = client.sync().expect_err("Sync over TCP");
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
        let err = client.list().expect_err("Endpoints over TCP");
        assert_eq!(err.code(), Some(Code::Unimplemented), "{err}");
        let err = client.unregister("ctr-agtm-web").expect_err("Unregister");
        assert_eq!(err.code(), Some(Code::Unimplemented), "{err}");
    });
    // Still registered: nothing above changed the agent.
    assert_eq!(cluster.agent.client().unwrap().list().unwrap().len(), 2);

    // The CLI: observe --server, JSON lines.
    let binary = agent::binary().expect("policy-agent binary");
    let mut args: Vec<String> = vec![binary.display().to_string(), "observe".into()];
    args.extend(["--server".to_owned(), format!("https://{addr}")]);
    args.extend(path_arg("--tls-ca", &pki.ca));
    args.extend(path_arg("--tls-cert", &pki.client_cert));
    args.extend(path_arg("--tls-key", &pki.client_key));
    args.extend(["--last", "1000", "-o", "json", "--verdict", "denied"].map(String::from));
    let out = cluster
        .topo
        .node_ns()
        .exec(&args)
        .expect("observe --server");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(r#""name":"client""#) && l.contains(r#""destination_port":8080"#)),
        "{stdout}"
    );
    // And explain --server.
    let mut explain: Vec<String> = vec![binary.display().to_string(), "explain".into()];
    explain.extend(["--server".to_owned(), addr.to_string()]);
    explain.extend(path_arg("--tls-ca", &pki.ca));
    explain.extend(path_arg("--tls-cert", &pki.client_cert));
    explain.extend(path_arg("--tls-key", &pki.client_key));
    explain.extend(
        [
            "--from",
            "alpha/client",
            "--to",
            "alpha/web",
            "--port",
            "8080",
        ]
        .map(String::from),
    );
    let out = cluster
        .topo
        .node_ns()
        .exec(&explain)
        .expect("explain --server");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Refused: no client certificate; one from another CA; a client that
    // does not trust the server's CA.
    let refused = [
        ("no client certificate", pki.ca.as_path(), None),
        (
            "a rogue client certificate",
            pki.ca.as_path(),
            Some((pki.rogue_cert.as_path(), pki.rogue_key.as_path())),
        ),
        (
            "a client trusting another CA",
            pki.rogue_ca.as_path(),
            identity,
        ),
    ];
    for (what, ca, identity) in refused {
        let result = observe_tls(&cluster, addr, ca, identity);
        assert!(
            result.is_err(),
            "{what}: served {:?}",
            result.map(|f| f.len())
        );
        eprintln!("{what}: refused: {}", result.unwrap_err());
    }
    // A CLI without a client certificate fails with one line.
    let mut args: Vec<String> = vec![binary.display().to_string(), "observe".into()];
    args.extend(["--server".to_owned(), format!("https://{addr}")]);
    args.extend(path_arg("--tls-ca", &pki.ca));
    let out = cluster
        .topo
        .node_ns()
        .exec(&args)
        .expect("observe --server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // Plain-text gRPC: refused.
    let plain = cluster.topo.node_ns().run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let mut flows = proto::flows_client::FlowsClient::new(channel);
            flows
                .observe(proto::ObserveRequest {
                    last: 10,
                    follow: false,
                    filter: None,
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    });
    assert!(plain.is_err(), "plain text gRPC was served");
    eprintln!("plain text: refused: {}", plain.unwrap_err());
    // And `--server http://` is refused by the client itself.
    let err = tls::client_config(&pki.ca, None)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            Client::connect_tls(&format!("http://{addr}"), config)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .unwrap_err();
    assert!(err.contains("https://"), "{err}");
}

#[test]
fn off_by_default_tls_without_client_ca_and_bad_files() {
    if !is_root() {
        return;
    }
    // Without the flag: no TCP listener at all in the node's namespace.
    let mut cluster = Cluster::start("agto", |_, _| Vec::new());
    let addr = free_port(&cluster.topo);
    assert_eq!(cluster.topo.node_ns().run(listening), Vec::<String>::new());
    cluster.denied_connection();

    // With it, and no client CA: TLS only, any client trusting the CA.
    cluster.agent.kill9().unwrap();
    let args = tls_args(addr, &cluster.pki, false);
    cluster.agent = start_agent(&cluster.dirs, &cluster.topo, &args).expect("restarting");
    // The endpoints come back from the state directory.
    cluster
        .agent
        .client()
        .unwrap()
        .sync_and_wait(WAIT)
        .expect("sync");
    cluster.denied_connection();
    let flows = observe_tls(&cluster, addr, &cluster.pki.ca, None)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.agent.log_tail()));
    assert!(
        flows.iter().any(is_denied_client_to_web),
        "no denied client -> web:8080 in {flows:#?}"
    );
    assert!(
        cluster.agent.log_tail().contains("without --tls-client-ca"),
        "{}",
        cluster.agent.log_tail()
    );
    // Nothing plain on the port: the first bytes back are not HTTP/2.
    cluster.topo.node_ns().run(|| {
        use std::io::{Read as _, Write as _};
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .unwrap();
        let mut reply = [0_u8; 9];
        let n = stream.read(&mut reply).unwrap_or(0);
        // An HTTP/2 server answers with a SETTINGS frame (type 4).
        assert!(n < 9 || reply[3] != 4, "an HTTP/2 answer: {reply:?}");
    });

    // Bad files stop `run` before anything starts, with one line.
    let pki = &cluster.pki;
    let binary = agent::binary().unwrap();
    let missing = cluster.dirs.root.join("missing.pem");
    let not_pem = cluster.dirs.manifests.join("cluster.yaml");
    for (cert, key, client_ca, expect) in [
        (&missing, &pki.server_key, None, "missing.pem"),
        (&not_pem, &pki.server_key, None, "no PEM CERTIFICATE"),
        (
            &pki.server_cert,
            &pki.server_cert,
            None,
            "no PEM private key",
        ),
        (&pki.server_cert, &pki.client_key, None, "TLS configuration"),
        (
            &pki.server_cert,
            &pki.server_key,
            Some(&not_pem),
            "client CA",
        ),
    ] {
        let mut command = Command::new(&binary);
        command
            .args(["run", "--source", "files", "--node", NODE, "--dir"])
            .arg(&cluster.dirs.manifests)
            .args(["--flows-listen", "127.0.0.1:0", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--socket")
            .arg(cluster.dirs.root.join("never.sock"));
        if let Some(ca) = client_ca {
            command.arg("--tls-client-ca").arg(ca);
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expect), "{expect}: {stderr}");
    }
    // --flows-listen alone is a usage error.
    let out = Command::new(&binary)
        .args(["run", "--flows-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
}
