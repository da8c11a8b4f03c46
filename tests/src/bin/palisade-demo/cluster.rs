//! The demo cluster: Kubernetes objects read from YAML, one network namespace
//! per pod (the harness's [`Topology`]) serving the pod's container ports, and
//! the classifier attached to every pod's host veth with its maps compiled
//! from the policies by the agent's own compiler and map writer.
//!
//! Everything is torn down on drop, in field order: servers, classifier
//! (links and map descriptors), namespaces (which take the veths with them),
//! then the pin directory.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use palisade_tests::netns::{GATEWAY_V4, GATEWAY_V6, Netns, TcpServer, Topology, UdpEchoServer};
use policy_agent::compile::{Desired, IdentityAllocator, LocalEndpoint, NodeScope, compile};
use policy_agent::datapath::{Datapath, writer};
use policy_agent::model::{ClusterState, Diagnostic, ObjectRef};
use policy_common::EndpointInfo;
use serde::Deserialize as _;

/// Prefix of the namespaces and interfaces the demo creates.
pub const PREFIX: &str = "demo";
/// The node every pod of the manifest must be scheduled on.
pub const NODE_NAME: &str = "demo-node";
/// Where the classifier's maps are pinned while the demo runs.
pub const PIN_DIR: &str = "/sys/fs/bpf/palisade-demo";

/// The Kubernetes objects of a manifest, in file order.
#[derive(Default)]
pub struct Manifest {
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
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    fn parse(text: &str) -> Result<Self> {
        let mut manifest = Self::default();
        for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
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
        Ok(manifest)
    }
}

/// A pod of the demo and how the classifier knows it.
#[derive(Debug)]
pub struct DemoPod {
    /// Its namespace and name in the cluster.
    pub object: ObjectRef,
    /// Its name in the [`Topology`] ("<namespace>-<name>").
    pub topo_name: String,
    /// Its host veth in the node namespace.
    pub host_ifname: String,
    /// The key of its `PALISADE_ENDPOINTS` entry and its endpoint id.
    pub endpoint: LocalEndpoint,
    /// Its IPv4 and (if any) IPv6 address.
    pub ip4: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
}

/// Removes the pin directory (and the maps pinned in it) on drop.
struct PinDir(PathBuf);

impl PinDir {
    /// Takes `path`, removing what a killed earlier run left there so that
    /// the classifier starts with fresh maps and counters.
    fn claim(path: &Path) -> Result<Self> {
        match std::fs::remove_dir_all(path) {
            Ok(()) => println!("removed {} left by an earlier run", path.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        Ok(Self(path.to_owned()))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("palisade-demo: removing {}: {e}", self.0.display()),
        }
    }
}

/// The running demo cluster.
pub struct Cluster {
    /// What the compiler was given.
    pub state: ClusterState,
    /// The pods, in (namespace, name) order.
    pub pods: Vec<DemoPod>,
    /// What the compiler produced (and the map writer wrote).
    pub desired: Desired,
    // Drop order matters, see the module docs. Servers stop on drop.
    _tcp_servers: Vec<TcpServer>,
    _udp_servers: Vec<UdpEchoServer>,
    /// The classifier, attached to every pod's host veth.
    pub datapath: Datapath,
    topology: Topology,
    _pin_dir: PinDir,
}

impl Cluster {
    /// Builds the cluster of `manifest`, loads the classifier, writes its maps
    /// and attaches it; prints what it does.
    pub fn start(manifest: &Manifest) -> Result<Self> {
        let (state, rejected) =
            ClusterState::from_k8s(&manifest.namespaces, &manifest.pods, &manifest.policies);
        print_diagnostics("objects left out", &rejected);
        println!(
            "cluster: {} namespaces, {} pods, {} NetworkPolicies on node {NODE_NAME}",
            state.namespaces().len(),
            state.pods().len(),
            state.policies().len()
        );

        // Locals drop in reverse order on an early return: whatever was
        // built so far is torn down like a finished cluster.
        let pin_dir = PinDir::claim(Path::new(PIN_DIR))?;
        let mut topology = Topology::new(PREFIX).context("creating the node namespace")?;
        let mut pods = Vec::new();
        for (index, (object, pod)) in state.pods().iter().enumerate() {
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
            let added = topology.add_pod(&topo_name, ip4, ip6)?;
            pods.push(DemoPod {
                object: object.clone(),
                topo_name,
                host_ifname: added.host_ifname.clone(),
                endpoint: LocalEndpoint {
                    ifindex: added.host_ifindex,
                    endpoint_id: u32::try_from(index + 1)?,
                },
                ip4,
                ip6,
            });
        }
        println!(
            "network namespaces: {}-node (the node) and {} pods, veths {}0..{}{}",
            PREFIX,
            pods.len(),
            PREFIX,
            PREFIX,
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

        let mut datapath = Datapath::load(Path::new(PIN_DIR)).context("loading the classifier")?;
        let scope = NodeScope {
            node_name: NODE_NAME.to_owned(),
            node_ips: vec![IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)],
            endpoints: pods
                .iter()
                .map(|p| (p.object.clone(), p.endpoint))
                .collect(),
        };
        let desired = compile(&state, &scope, &mut IdentityAllocator::new());
        print_diagnostics("compiler diagnostics", &desired.diagnostics);
        // Maps first, then attach: an attached interface without its
        // endpoint entry drops everything (fail closed).
        let stats = writer::apply(&mut datapath, &desired).context("writing the maps")?;
        println!(
            "classifier loaded, maps pinned in {PIN_DIR}: {} entries written \
             ({} endpoints, {} peer addresses, {} policy keys, {} rules)",
            stats.written,
            desired.endpoints.len(),
            desired.peer_ips.len(),
            desired.policy.len(),
            desired.rules.len()
        );
        topology
            .node_ns()
            .run(|| {
                pods.iter().try_for_each(|p| {
                    datapath
                        .attach(&p.host_ifname)
                        .with_context(|| format!("attaching to {}", p.host_ifname))
                })
            })
            .context("in the node namespace")?;
        for pod in &pods {
            print_pod(pod, &desired);
        }

        Ok(Self {
            state,
            pods,
            desired,
            _tcp_servers: tcp_servers,
            _udp_servers: udp_servers,
            datapath,
            topology,
            _pin_dir: pin_dir,
        })
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

fn print_diagnostics(what: &str, diagnostics: &[Diagnostic]) {
    if diagnostics.is_empty() {
        return;
    }
    println!("{what}:");
    for d in diagnostics {
        println!("  {d}");
    }
}

fn print_pod(pod: &DemoPod, desired: &Desired) {
    let flags = desired
        .endpoints
        .get(&pod.endpoint.ifindex)
        .map_or(0, |e| e.flags);
    let isolated: Vec<&str> = [
        (EndpointInfo::INGRESS_ISOLATED, "ingress"),
        (EndpointInfo::EGRESS_ISOLATED, "egress"),
    ]
    .into_iter()
    .filter(|(flag, _)| flags & flag != 0)
    .map(|(_, name)| name)
    .collect();
    let addresses = match pod.ip6 {
        Some(ip6) => format!("{} {ip6}", pod.ip4),
        None => pod.ip4.to_string(),
    };
    println!(
        "  {:<18} {:<31} {:<6} endpoint {}  isolated: {}",
        pod.object.to_string(),
        addresses,
        pod.host_ifname,
        pod.endpoint.endpoint_id,
        if isolated.is_empty() {
            "no".to_owned()
        } else {
            isolated.join(", ")
        }
    );
}

/// Names for addresses: pods as `ns/name`, the node's gateway addresses as
/// `node`.
pub fn address_names(cluster: &Cluster) -> BTreeMap<IpAddr, String> {
    let mut names: BTreeMap<IpAddr, String> = BTreeMap::new();
    for pod in cluster.state.pods().values() {
        for ip in &pod.ips {
            names.insert(*ip, pod.object_ref().to_string());
        }
    }
    names.insert(IpAddr::V4(GATEWAY_V4), "node".to_owned());
    names.insert(IpAddr::V6(GATEWAY_V6), "node".to_owned());
    names
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
