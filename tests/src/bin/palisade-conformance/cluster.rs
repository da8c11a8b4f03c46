//! One scenario's cluster: the node namespace (the harness's [`Topology`])
//! with the agent in it, a namespace per pod and per external host joined
//! to the node by a veth pair, servers in them, services as DNAT rules.
//!
//! Pods are registered with the agent through its API (`Endpoints.Register`,
//! what the chained CNI plugin does); externals are left unregistered, so
//! they are hosts outside the pod network routed through the node.
//!
//! Everything goes on drop, in field order: servers, the API client, the
//! agent (SIGKILL), the namespaces (with their veths and iptables rules),
//! then the agent's directories and pin directory.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use palisade_tests::agent::{Agent, AgentDirs, AgentOptions, Client, proto};
use palisade_tests::conformance::{
    Change, Endpoint, Family, NamespacedName, PodInfo, Protocol, Server,
};
use palisade_tests::netns::{GATEWAY_V4, GATEWAY_V6, Netns, TcpServer, Topology, UdpEchoServer};

use palisade_tests::conformance::scenario::External;

use crate::policy_source;
use crate::probes::Source;
use crate::services::Services;

/// Prefix of the namespaces and interfaces (one scenario at a time).
pub const PREFIX: &str = "pcf";
/// How long the agent may take to enforce a revision.
pub const ENFORCE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server.
#[allow(dead_code)] // held for its Drop
enum Listener {
    Tcp(TcpServer),
    Udp(UdpEchoServer),
}

/// The running cluster of one scenario.
pub struct Cluster {
    servers: BTreeMap<String, Vec<Listener>>,
    client: Client,
    agent: Agent,
    services: Services,
    service_routes: bool,
    /// Pod → topology name.
    pods: BTreeMap<NamespacedName, String>,
    /// External → topology name.
    externals: BTreeMap<String, String>,
    /// Container ids registered since the last [`Cluster::wait_enforced`].
    registered: Vec<(String, u64)>,
    next_dummy: u8,
    topology: Topology,
    dirs: AgentDirs,
}

fn container_id(pod: &NamespacedName) -> String {
    format!("conformance-{}-{}", pod.namespace, pod.name)
}

fn topo_name(kind: &str, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{kind}-{clean}")
}

impl Cluster {
    /// The node namespace and the agent, no pods yet.
    pub fn start(node_name: &str) -> Result<Self> {
        let dirs = AgentDirs::new("conformance")?;
        let topology = Topology::new(PREFIX).context("creating the node namespace")?;
        let agent = Agent::start(
            &dirs,
            &AgentOptions {
                node_name: node_name.to_owned(),
                node_ips: vec![IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)],
                netns: Some(topology.node_ns().path().to_owned()),
                start_timeout: Duration::from_secs(30),
            },
        )
        .context("starting the agent")?;
        let client = agent.client()?;
        Ok(Self {
            servers: BTreeMap::new(),
            client,
            agent,
            services: Services::default(),
            service_routes: false,
            pods: BTreeMap::new(),
            externals: BTreeMap::new(),
            registered: Vec::new(),
            next_dummy: 1,
            topology,
            dirs,
        })
    }

    /// The last lines of the agent's log.
    pub fn agent_log(&self) -> String {
        self.agent.log_tail()
    }

    fn node(&self) -> &Netns {
        self.topology.node_ns()
    }

    /// Carries out one change.
    pub fn apply(&mut self, change: &Change) -> Result<()> {
        match change {
            Change::AddPod { pod, .. } => {
                self.add_pod(pod)?;
            }
            Change::RemovePod { pod, .. } => {
                // The source forgets it first (below), then the endpoint goes.
                if let Some(edit) = change.source_edit() {
                    policy_source::apply(&self.dirs, edit)?;
                }
                return self.remove_pod(pod);
            }
            Change::AddExternal(external) => return self.add_external(external),
            Change::AddNodeServer(server) => {
                let node = self.topology.node_ns();
                let listener = start_server(node, server)?;
                self.servers
                    .entry("node".into())
                    .or_default()
                    .extend(listener);
            }
            Change::SetService(rules) => {
                self.route_service(rules.cluster_ip)?;
                let node = self.topology.node_ns();
                self.services.set(node, rules)?;
            }
            Change::RemoveService(name) => {
                let node = self.topology.node_ns();
                self.services.remove(node, name)?;
            }
            _ => {}
        }
        if let Some(edit) = change.source_edit() {
            policy_source::apply(&self.dirs, edit)?;
        }
        if let Change::AddPod { pod, .. } = change {
            self.register(pod)?;
        }
        Ok(())
    }

    fn add_pod(&mut self, pod: &PodInfo) -> Result<()> {
        let name = topo_name("p", &format!("{}-{}", pod.name.namespace, pod.name.name));
        let netns_pod = self
            .topology
            .add_pod(&name, pod.ip, pod.ip6)
            .with_context(|| format!("creating pod {}", pod.name))?;
        let mut listeners = Vec::new();
        for server in &pod.servers {
            listeners.extend(
                start_server(&netns_pod.netns, server)
                    .with_context(|| format!("in pod {}", pod.name))?,
            );
        }
        self.servers.insert(name.clone(), listeners);
        self.pods.insert(pod.name.clone(), name);
        Ok(())
    }

    fn register(&mut self, pod: &PodInfo) -> Result<()> {
        let name = &self.pods[&pod.name];
        let topo = self.topology.pod(name);
        let ips = [Some(IpAddr::V4(pod.ip)), pod.ip6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .map(|ip| ip.to_string())
            .collect();
        let done = self
            .client
            .register(proto::RegisterRequest {
                namespace: pod.name.namespace.clone(),
                pod_name: pod.name.name.clone(),
                container_id: container_id(&pod.name),
                netns_path: topo.netns.path().display().to_string(),
                host_interface: topo.host_ifname.clone(),
                ips,
            })
            .map_err(|e| anyhow!("registering {}: {e}\n{}", pod.name, self.agent.log_tail()))?;
        self.registered
            .push((container_id(&pod.name), done.revision));
        Ok(())
    }

    fn remove_pod(&mut self, pod: &NamespacedName) -> Result<()> {
        let name = self
            .pods
            .remove(pod)
            .ok_or_else(|| anyhow!("no pod {pod}"))?;
        self.registered.retain(|(id, _)| *id != container_id(pod));
        self.client
            .unregister(&container_id(pod))
            .map_err(|e| anyhow!("unregistering {pod}: {e}"))?;
        self.servers.remove(&name);
        self.topology.remove_pod(&name)
    }

    fn add_external(&mut self, external: &External) -> Result<()> {
        let name = topo_name("e", &external.name);
        // The harness wants an IPv4 address on every namespace: an IPv6
        // host gets a placeholder from 198.18.0.0/15 (benchmarking range).
        let (ip4, ip6) = match external.ip {
            IpAddr::V4(v4) => (v4, None),
            IpAddr::V6(v6) => {
                self.next_dummy += 1;
                (Ipv4Addr::new(198, 18, 0, self.next_dummy), Some(v6))
            }
        };
        let host = self
            .topology
            .add_pod(&name, ip4, ip6)
            .with_context(|| format!("creating external {}", external.name))?;
        let mut listeners = Vec::new();
        for server in &external.servers {
            listeners.extend(start_server(&host.netns, server)?);
        }
        self.servers.insert(name.clone(), listeners);
        self.externals.insert(external.name.clone(), name);
        Ok(())
    }

    /// Cluster IPs are routed to an interface of the node, so that the
    /// node's own connections find a route before OUTPUT's DNAT.
    fn route_service(&mut self, ip: IpAddr) -> Result<()> {
        let dummy = format!("{PREFIX}svc");
        if !self.service_routes {
            // A veth pair inside the node (no `dummy` module everywhere).
            let peer = format!("{PREFIX}svcp");
            let node = self.node();
            node.ip(["link", "add", &dummy, "type", "veth", "peer", "name", &peer])?;
            node.ip(["link", "set", &peer, "up"])?;
            node.ip(["link", "set", &dummy, "up"])?;
            self.service_routes = true;
        }
        let prefix = if ip.is_ipv6() { "128" } else { "32" };
        let family = if ip.is_ipv6() { "-6" } else { "-4" };
        self.node().ip([
            family,
            "route",
            "replace",
            &format!("{ip}/{prefix}"),
            "dev",
            &dummy,
        ])?;
        Ok(())
    }

    /// Has the agent read the source and waits until it enforces it (and
    /// every endpoint registered since the last call).
    pub fn wait_enforced(&mut self) -> Result<()> {
        for (id, revision) in std::mem::take(&mut self.registered) {
            self.client
                .wait_enforced(Some(&id), revision, ENFORCE_TIMEOUT)
                .map_err(|e| anyhow!("waiting for {id}: {e}\n{}", self.agent.log_tail()))?;
        }
        self.client
            .sync_and_wait(ENFORCE_TIMEOUT)
            .map_err(|e| anyhow!("sync: {e}\n{}", self.agent.log_tail()))?;
        Ok(())
    }

    /// The address `endpoint` uses for connections of `family` (the node:
    /// its address on the pods' link); `None` for services and for a family
    /// the endpoint lacks.
    pub fn address(&self, endpoint: &Endpoint, family: Family) -> Option<IpAddr> {
        let topo = match endpoint {
            Endpoint::Node => {
                return Some(match family {
                    Family::V4 => IpAddr::V4(GATEWAY_V4),
                    Family::V6 => IpAddr::V6(GATEWAY_V6),
                });
            }
            Endpoint::Pod(pod) => self.pods.get(pod)?,
            Endpoint::External(name) => self.externals.get(name)?,
            Endpoint::Service(_) => return None,
        };
        let pod = self.topology.get_pod(topo)?;
        match family {
            Family::V4 => Some(IpAddr::V4(pod.ip4)),
            Family::V6 => pod.ip6.map(IpAddr::V6),
        }
    }

    /// The agent's API.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Where probes from `endpoint` start.
    pub fn source(&self, endpoint: &Endpoint) -> Option<Source<'_>> {
        let topo = match endpoint {
            Endpoint::Node => {
                return Some(Source {
                    netns: self.node(),
                    ifindex: 0,
                });
            }
            Endpoint::Pod(pod) => self.pods.get(pod)?,
            Endpoint::External(name) => self.externals.get(name)?,
            Endpoint::Service(_) => return None,
        };
        let pod = self.topology.get_pod(topo)?;
        Some(Source {
            netns: &pod.netns,
            ifindex: pod.ifindex,
        })
    }
}

/// Starts `server` on every address of `netns` (`::` takes IPv4 too);
/// SCTP servers are not started (no SCTP probes run).
fn start_server(netns: &Netns, server: &Server) -> Result<Option<Listener>> {
    let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let what = || format!("serving {} {}", server.protocol, server.port);
    Ok(match server.protocol {
        Protocol::Tcp => Some(Listener::Tcp(
            TcpServer::start(netns, any, server.port).with_context(what)?,
        )),
        Protocol::Udp => Some(Listener::Udp(
            UdpEchoServer::start(netns, any, server.port).with_context(what)?,
        )),
        Protocol::Sctp => None,
    })
}
