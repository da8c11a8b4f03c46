//! One scenario's cluster: the node namespace (the harness's [`Topology`])
//! with the agent in it, pods attached through the real CNI chain
//! ([`PodNetwork`]: bridge + host-local, then `palisade-cni`), external
//! hosts joined to the node by a veth pair each (outside the pod network,
//! routed by the node, never registered with the agent), servers, services
//! as DNAT rules, and the policy source the agent reads.
//!
//! Teardown ([`Cluster::tear_down`], again on [`Drop`]): every pod is
//! detached through the chain (DEL, the agent still running), then the
//! source is cleared (the API server's objects of the scenario), then on
//! drop the fields go in order: servers, pod namespaces, the API client,
//! the agent (SIGKILL), its path to the API server, services, the CNI
//! directories (configuration, IPAM store), the node namespace (bridge,
//! externals, iptables rules), the agent's directories and pin directory.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use palisade_tests::agent::{Agent, AgentDirs, AgentOptions, Client};
use palisade_tests::conformance::scenario::External;
use palisade_tests::conformance::{
    Change, Endpoint, Family, NamespacedName, PodInfo, Protocol, RunConfig, Server, SourceEdit,
    SourceObject,
};
use palisade_tests::netns::{Netns, TcpForwarder, TcpServer, Topology, UdpEchoServer};

use crate::pod_network::{self, Attached, PodNetwork};
use crate::policy_source::PolicySource;
use crate::probes::{NodeAddresses, Source};
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

/// A pod: its network namespace and its attachment.
struct Pod {
    netns: Netns,
    attached: Attached,
}

/// Makes the policy source of a cluster, given the agent's directories.
pub type SourceFor<'a> = dyn Fn(&AgentDirs) -> Box<dyn PolicySource> + 'a;

/// The running cluster of one scenario.
pub struct Cluster {
    servers: BTreeMap<String, Vec<Listener>>,
    pods: BTreeMap<NamespacedName, Pod>,
    client: Client,
    agent: Agent,
    /// How the agent reaches its source (kube: the API server).
    _source_path: Option<TcpForwarder>,
    source: Box<dyn PolicySource>,
    services: Services,
    service_routes: bool,
    /// External → topology name.
    externals: BTreeMap<String, String>,
    next_dummy: u8,
    next_container: u32,
    node_addresses: NodeAddresses,
    network: PodNetwork,
    topology: Topology,
    /// Held for its Drop: the agent's directories and pins go last.
    _dirs: AgentDirs,
}

/// `name` with what network namespace names do not take replaced.
fn clean(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Cluster {
    /// The node namespace with its pod network, and the agent reading the
    /// source `source` makes; no pods yet.
    pub fn start(config: &RunConfig, source: &SourceFor<'_>) -> Result<Self> {
        let (v4, v6) = pod_network::gateways(config)?;
        let dirs = AgentDirs::new("conformance")?;
        let source = source(&dirs);
        let topology = Topology::new(PREFIX).context("creating the node namespace")?;
        let network = PodNetwork::new(topology.node_ns(), &dirs.socket, config)
            .context("setting up the CNI network")?;
        let source_path = source.reach_from(topology.node_ns())?;
        let agent = Agent::start_detached_with(
            &dirs,
            &AgentOptions {
                node_name: config.node_name.clone(),
                node_ips: config.node_ips.clone(),
                netns: Some(topology.node_ns().path().to_owned()),
                start_timeout: Duration::from_secs(30),
            },
            source.agent_source(),
        )
        .context("starting the agent")?;
        let client = agent.client()?;
        Ok(Self {
            servers: BTreeMap::new(),
            pods: BTreeMap::new(),
            client,
            agent,
            _source_path: source_path,
            source,
            services: Services::default(),
            service_routes: false,
            externals: BTreeMap::new(),
            next_dummy: 1,
            next_container: 0,
            node_addresses: NodeAddresses { v4, v6 },
            network,
            topology,
            _dirs: dirs,
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
            Change::AddPod { pod, object } => self.add_pod(pod, object),
            Change::RemovePod { pod, key } => {
                // As a kubelet sees it: the Pod goes, then its sandbox.
                self.source.apply(SourceEdit::Delete(key))?;
                self.remove_pod(pod)
            }
            Change::AddExternal(external) => self.add_external(external),
            Change::AddNodeServer(server) => {
                let listener = start_server(self.node(), server)?;
                self.servers
                    .entry("node".into())
                    .or_default()
                    .extend(listener);
                Ok(())
            }
            Change::SetService(rules) => {
                self.route_service(rules.cluster_ip)?;
                let node = self.topology.node_ns();
                self.services.set(node, rules)
            }
            Change::RemoveService(name) => {
                let node = self.topology.node_ns();
                self.services.remove(node, name)
            }
            other => match other.source_edit() {
                Some(edit) => self.source.apply(edit),
                None => Ok(()),
            },
        }
    }

    /// A pod as a kubelet starts one: the Pod object exists, the sandbox
    /// (a network namespace with the pod's servers) is created, the CNI
    /// chain attaches it (and returns once its policy is enforced), then
    /// its status gets the addresses.
    fn add_pod(&mut self, pod: &PodInfo, object: &SourceObject) -> Result<()> {
        self.source.apply(SourceEdit::Upsert(object))?;
        let name = format!(
            "{PREFIX}-p-{}-{}",
            clean(&pod.name.namespace),
            clean(&pod.name.name)
        );
        let netns = Netns::create(&name).with_context(|| format!("creating pod {}", pod.name))?;
        netns.setup_basics()?;
        let mut listeners = Vec::new();
        for server in &pod.servers {
            listeners.extend(
                start_server(&netns, server).with_context(|| format!("in pod {}", pod.name))?,
            );
        }
        self.next_container += 1;
        let container_id = format!(
            "{PREFIX}{:04}-{}-{}",
            self.next_container,
            clean(&pod.name.namespace),
            clean(&pod.name.name)
        );
        let attached = self
            .network
            .add(pod, &container_id, &netns)
            .map_err(|e| anyhow!("{e:#}\n{}", self.agent.log_tail()))?;
        let ips = attached.ips.clone();
        self.servers.insert(pod.name.to_string(), listeners);
        self.pods.insert(pod.name.clone(), Pod { netns, attached });
        self.source.pod_running(&pod.name, &ips)
    }

    fn remove_pod(&mut self, name: &NamespacedName) -> Result<()> {
        let pod = self
            .pods
            .remove(name)
            .ok_or_else(|| anyhow!("no pod {name}"))?;
        self.servers.remove(&name.to_string());
        self.network.del(&pod.attached)
        // The namespace goes with `pod`.
    }

    fn add_external(&mut self, external: &External) -> Result<()> {
        let name = format!("e-{}", clean(&external.name));
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

    /// Has the agent take in everything written to its source (files: a
    /// re-scan; kube: catch up with the API server) and waits until it
    /// enforces it.
    pub fn wait_enforced(&mut self) -> Result<()> {
        self.client
            .sync_and_wait(ENFORCE_TIMEOUT)
            .map_err(|e| anyhow!("sync: {e}\n{}", self.agent.log_tail()))?;
        Ok(())
    }

    /// The node's addresses on the pod network.
    pub fn node_addresses(&self) -> NodeAddresses {
        self.node_addresses
    }

    /// The address `endpoint` uses for connections of `family`; `None`
    /// for services and for a family the endpoint lacks.
    pub fn address(&self, endpoint: &Endpoint, family: Family) -> Option<IpAddr> {
        match endpoint {
            Endpoint::Node => Some(self.node_addresses.of(family)),
            Endpoint::Pod(name) => {
                let ips = &self.pods.get(name)?.attached.ips;
                ips.iter().copied().find(|ip| Family::of(*ip) == family)
            }
            Endpoint::External(name) => {
                let host = self.topology.get_pod(self.externals.get(name)?)?;
                match family {
                    Family::V4 => Some(IpAddr::V4(host.ip4)),
                    Family::V6 => host.ip6.map(IpAddr::V6),
                }
            }
            Endpoint::Service(_) => None,
        }
    }

    /// The agent's API.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Where probes from `endpoint` start.
    pub fn source(&self, endpoint: &Endpoint) -> Option<Source<'_>> {
        let netns = match endpoint {
            Endpoint::Node => self.node(),
            Endpoint::Pod(name) => &self.pods.get(name)?.netns,
            Endpoint::External(name) => &self.topology.get_pod(self.externals.get(name)?)?.netns,
            Endpoint::Service(_) => return None,
        };
        Some(Source { netns })
    }

    /// Detaches every pod through the chain (the agent still running) and
    /// clears the source; returns what went wrong. The rest goes on drop.
    pub fn tear_down(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, pod) in std::mem::take(&mut self.pods).into_iter().rev() {
            if let Err(e) = self.network.del(&pod.attached) {
                problems.push(format!("pod {name}: {e:#}"));
            }
        }
        if let Err(e) = self.source.clear() {
            problems.push(format!("clearing the policy source: {e:#}"));
        }
        problems
    }
}

impl Drop for Cluster {
    /// Tears down what [`Cluster::tear_down`] has not (after an early
    /// return or a panic).
    fn drop(&mut self) {
        for problem in self.tear_down() {
            eprintln!("teardown: {problem}");
        }
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
