//! The demo cluster: Kubernetes objects read from YAML, one network namespace
//! per pod (the harness's [`Topology`]) serving the pod's container ports,
//! and the real agent (`policy-agent run --source files`) in the node
//! namespace, watching a directory that holds the manifest. Every pod is
//! registered through the agent's API (`Endpoints.Register`, what the chained
//! CNI plugin does), then the demo waits until the agent enforces it
//! (`Status.Sync` and `Status.WaitEnforced`).
//!
//! Everything is torn down on drop, in field order: servers, the API client,
//! the agent (SIGKILL), the namespaces (which take the veths with them), then
//! the agent's directories and pin directory (removing the pins detaches the
//! classifier's links).

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use palisade_tests::agent::{self, Agent, AgentDirs, AgentOptions, Client, proto};
use palisade_tests::netns::{GATEWAY_V4, GATEWAY_V6, Netns, TcpServer, Topology, UdpEchoServer};
use policy_agent::model::{ClusterState, ObjectRef};
use serde::Deserialize as _;

/// Prefix of the namespaces and interfaces the demo creates.
pub const PREFIX: &str = "demo";
/// The node every pod of the manifest must be scheduled on.
pub const NODE_NAME: &str = "demo-node";
/// The tag of the agent's directories: `/tmp/palisade-agent-demo-<pid>-0`
/// and `/sys/fs/bpf/palisade-agent-demo-<pid>-0`.
const DIRS_TAG: &str = "demo";
/// How long the agent may take to start, and to enforce what it was given.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The Kubernetes objects of a manifest, in file order, and its text.
#[derive(Default)]
pub struct Manifest {
    pub text: String,
    pub namespaces: Vec<core::Namespace>,
    pub pods: Vec<core::Pod>,
    pub policies: Vec<net::NetworkPolicy>,
}

impl Manifest {
    /// Reads every YAML document of `path`: Namespaces, Pods and
    /// NetworkPolicies (anything else is an error).
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(text).with_context(|| format!("in {}", path.display()))
    }

    fn parse(text: String) -> Result<Self> {
        let mut manifest = Self::default();
        for (index, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml_ng::Value::deserialize(document)
                .with_context(|| format!("YAML document {}", index + 1))?;
            if value.is_null() {
                continue;
            }
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            let what = || format!("YAML document {} ({kind})", index + 1);
            match kind {
                "Namespace" => manifest
                    .namespaces
                    .push(serde_yaml_ng::from_value(value.clone()).with_context(what)?),
                "Pod" => manifest
                    .pods
                    .push(serde_yaml_ng::from_value(value.clone()).with_context(what)?),
                "NetworkPolicy" => manifest
                    .policies
                    .push(serde_yaml_ng::from_value(value.clone()).with_context(what)?),
                _ => bail!("{}: expected a Namespace, Pod or NetworkPolicy", what()),
            }
        }
        manifest.text = text;
        Ok(manifest)
    }
}

/// A pod of the demo.
#[derive(Debug)]
pub struct DemoPod {
    /// Its namespace and name in the cluster.
    pub object: ObjectRef,
    /// Its name in the [`Topology`] ("<namespace>-<name>").
    pub topo_name: String,
    /// The container id it is registered with.
    pub container_id: String,
    /// Its IPv4 and (if any) IPv6 address.
    pub ip4: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
}

/// What the demo leaves on the system while it runs, to check that it is
/// gone afterwards.
pub struct Footprint {
    pub agent_pid: Option<u32>,
    pub paths: Vec<PathBuf>,
}

/// The running demo cluster.
pub struct Cluster {
    /// The pods, in (namespace, name) order.
    pub pods: Vec<DemoPod>,
    // Drop order matters, see the module docs. Servers stop on drop.
    _tcp_servers: Vec<TcpServer>,
    _udp_servers: Vec<UdpEchoServer>,
    client: Client,
    agent: Agent,
    topology: Topology,
    dirs: AgentDirs,
}

impl Cluster {
    /// Builds the cluster of `manifest` (read from `path`), starts the agent
    /// on it, registers every pod and waits until the agent enforces the
    /// policies for all of them; prints what it does.
    pub fn start(manifest: &Manifest, path: &Path) -> Result<Self> {
        let (state, rejected) =
            ClusterState::from_k8s(&manifest.namespaces, &manifest.pods, &manifest.policies);
        if !rejected.is_empty() {
            println!("objects the agent will leave out:");
            for d in &rejected {
                println!("  {d}");
            }
        }
        println!(
            "cluster: {} namespaces, {} pods, {} NetworkPolicies on node {NODE_NAME}",
            state.namespaces().len(),
            state.pods().len(),
            state.policies().len()
        );

        // Before anything is created: a first build takes a while.
        let binary = agent::binary()?;
        remove_stale_dirs();
        // Locals drop in reverse order on an early return: whatever was
        // built so far is torn down like a finished cluster.
        let dirs = AgentDirs::new(DIRS_TAG)?;
        let file_name = path
            .file_name()
            .map_or_else(|| "cluster.yaml".into(), |n| n.to_string_lossy());
        dirs.write_manifest(&file_name, &manifest.text)?;

        let mut topology = Topology::new(PREFIX).context("creating the node namespace")?;
        let mut pods = Vec::new();
        for (object, pod) in state.pods() {
            if pod.node_name.as_deref() != Some(NODE_NAME) {
                bail!("pod {object} is not scheduled on {NODE_NAME} (spec.nodeName)");
            }
            let ip4 = pod
                .ips
                .iter()
                .find_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .ok_or_else(|| anyhow!("pod {object} has no IPv4 address in status.podIPs"))?;
            let ip6 = pod.ips.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            });
            let topo_name = format!("{}-{}", object.namespace, object.name);
            topology.add_pod(&topo_name, ip4, ip6)?;
            pods.push(DemoPod {
                object: object.clone(),
                container_id: format!("demo-{}-{}", object.namespace, object.name),
                topo_name,
                ip4,
                ip6,
            });
        }
        println!(
            "network namespaces: {PREFIX}-node (the node) and {} pods, veths {PREFIX}0..{PREFIX}{}",
            pods.len(),
            pods.len().saturating_sub(1)
        );

        let (mut tcp_servers, mut udp_servers) = (Vec::new(), Vec::new());
        for wire in &manifest.pods {
            let object = ObjectRef::new(
                wire.metadata.namespace.clone().unwrap_or_default(),
                wire.metadata.name.clone().unwrap_or_default(),
            );
            let Some(pod) = pods.iter().find(|p| p.object == object) else {
                continue;
            };
            let netns = &topology.pod(&pod.topo_name).netns;
            // `::` takes IPv4 too.
            let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
            for (protocol, port) in container_ports(wire) {
                let what = || format!("serving {protocol} {port} in pod {object}");
                if protocol == "UDP" {
                    udp_servers.push(UdpEchoServer::start(netns, any, port).with_context(what)?);
                } else {
                    tcp_servers.push(TcpServer::start(netns, any, port).with_context(what)?);
                }
            }
        }
        println!(
            "servers: {} TCP, {} UDP (every container port of every pod)",
            tcp_servers.len(),
            udp_servers.len()
        );

        let agent = Agent::start_detached(
            &dirs,
            &AgentOptions {
                node_name: NODE_NAME.to_owned(),
                node_ips: vec![IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)],
                netns: Some(topology.node_ns().path().to_owned()),
                start_timeout: AGENT_TIMEOUT,
            },
        )
        .context("starting the agent")?;
        println!(
            "agent: {} run --source files --node {NODE_NAME} (pid {}, in {PREFIX}-node)",
            binary.display(),
            agent.pid().unwrap_or(0)
        );
        println!("  watching {}", dirs.manifests.join(&*file_name).display());
        println!("  API      {}", dirs.socket.display());
        println!("  maps     {}", dirs.pin_dir.display());
        println!("  log      {}", dirs.log.display());
        let client = agent.client()?;
        let mut cluster = Self {
            pods,
            _tcp_servers: tcp_servers,
            _udp_servers: udp_servers,
            client,
            agent,
            topology,
            dirs,
        };
        cluster.register_all()?;
        Ok(cluster)
    }

    /// Registers every pod as the CNI plugin does (register, then wait until
    /// the agent enforces that endpoint), waits until the agent enforces
    /// everything its source holds, and prints the endpoints as the agent
    /// reports them.
    fn register_all(&mut self) -> Result<()> {
        for pod in &self.pods {
            let topo = self.topology.pod(&pod.topo_name);
            let ips = [Some(IpAddr::V4(pod.ip4)), pod.ip6.map(IpAddr::V6)]
                .into_iter()
                .flatten()
                .map(|ip| ip.to_string())
                .collect();
            let done = self
                .client
                .register(proto::RegisterRequest {
                    namespace: pod.object.namespace.clone(),
                    pod_name: pod.object.name.clone(),
                    container_id: pod.container_id.clone(),
                    netns_path: topo.netns.path().display().to_string(),
                    host_interface: topo.host_ifname.clone(),
                    ips,
                })
                .map_err(|e| anyhow!("registering {}: {e}\n{}", pod.object, self.log()))?;
            self.client
                .wait_enforced(Some(&pod.container_id), done.revision, AGENT_TIMEOUT)
                .map_err(|e| anyhow!("waiting for {}: {e}\n{}", pod.object, self.log()))?;
        }
        let revision = self
            .client
            .sync_and_wait(AGENT_TIMEOUT)
            .map_err(|e| anyhow!("waiting for the agent: {e}\n{}", self.log()))?;

        let status = self.client.status().map_err(|e| anyhow!("status: {e}"))?;
        println!(
            "registered {} pods through the agent's API (Endpoints.Register, as the CNI plugin \
             does); policies enforced at revision {revision}",
            self.pods.len()
        );
        for d in &status.diagnostics.unwrap_or_default().items {
            let rule = if d.rule.is_empty() {
                String::new()
            } else {
                format!(" {}", d.rule)
            };
            println!(
                "  {} {} {}/{}{rule}: {}",
                d.severity, d.object_kind, d.namespace, d.name, d.message
            );
        }
        let mut endpoints = status.endpoints;
        endpoints.sort_by(|a, b| (&a.namespace, &a.pod_name).cmp(&(&b.namespace, &b.pod_name)));
        for e in &endpoints {
            let isolated: Vec<&str> = [
                (e.ingress_isolated, "ingress"),
                (e.egress_isolated, "egress"),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
            println!(
                "  {:<18} {:<31} {:<6} endpoint {}  isolated: {}{}",
                format!("{}/{}", e.namespace, e.pod_name),
                e.ips.join(" "),
                e.host_interface,
                e.endpoint_id,
                if isolated.is_empty() {
                    "no".to_owned()
                } else {
                    isolated.join(", ")
                },
                if e.pod_known {
                    ""
                } else {
                    " (pod unknown to the agent)"
                }
            );
        }
        Ok(())
    }

    fn log(&self) -> String {
        self.agent.log_tail()
    }

    /// The agent's API socket.
    pub fn socket(&self) -> &Path {
        &self.dirs.socket
    }

    /// The agent's metrics (`Status.Get`).
    pub fn metrics(&mut self) -> Result<Vec<proto::Metric>> {
        let status = self
            .client
            .status()
            .map_err(|e| anyhow!("agent status: {e}\n{}", self.agent.log_tail()))?;
        Ok(status.metrics)
    }

    /// What must be gone once the cluster is dropped.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            agent_pid: self.agent.pid(),
            paths: vec![self.dirs.root.clone(), self.dirs.pin_dir.clone()],
        }
    }

    /// The demo pod `ns/name`.
    pub fn pod(&self, name: &str) -> Option<&DemoPod> {
        self.pods.iter().find(|p| p.object.to_string() == name)
    }

    /// The network namespace of a demo pod.
    pub fn netns(&self, pod: &DemoPod) -> &Netns {
        &self.topology.pod(&pod.topo_name).netns
    }

    /// The node namespace.
    pub fn node_ns(&self) -> &Netns {
        self.topology.node_ns()
    }
}

/// Removes the agent directories of earlier demos that were killed before
/// they could clean up (their process is gone). Their namespaces go with
/// [`Topology::new`].
fn remove_stale_dirs() {
    let prefix = format!("palisade-agent-{DIRS_TAG}-");
    for base in [std::env::temp_dir(), PathBuf::from("/sys/fs/bpf")] {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || demo_running(pid) {
                continue;
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => println!("removed {} left by an earlier run", entry.path().display()),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => eprintln!("palisade-demo: removing {}: {e}", entry.path().display()),
            }
        }
    }
}

/// Whether process `pid` is a running palisade-demo (not a zombie, not a
/// process that got its pid since).
fn demo_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) state ...`; comm may hold spaces and parentheses.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].trim_start().chars().next();
    comm == "palisade-demo" && !matches!(state, Some('Z' | 'X' | 'x'))
}

/// (protocol, port) of every container port of a pod, TCP and UDP only.
fn container_ports(pod: &core::Pod) -> Vec<(String, u16)> {
    let mut ports: Vec<(String, u16)> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
            let port = u16::try_from(p.container_port).ok()?;
            matches!(protocol.as_str(), "TCP" | "UDP").then_some((protocol, port))
        })
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

/// The socket address of `pod` for a probe to `port`.
pub fn target(pod: &DemoPod, ipv6: bool, port: u16) -> Result<SocketAddr> {
    let ip = if ipv6 {
        IpAddr::V6(
            pod.ip6
                .ok_or_else(|| anyhow!("pod {} has no IPv6 address", pod.object))?,
        )
    } else {
        IpAddr::V4(pod.ip4)
    };
    Ok(SocketAddr::new(ip, port))
}
