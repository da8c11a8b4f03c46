//! The policy source the agent reads, and how the runner writes the
//! scenario's objects into it: a manifest directory ([`files`]) or a real
//! kube-apiserver ([`kube`]).

pub mod files;
pub mod kube;

use std::net::IpAddr;

use anyhow::Result;
use palisade_tests::agent::AgentSource;
use palisade_tests::conformance::{NamespacedName, SourceEdit};
use palisade_tests::netns::{Netns, TcpForwarder};

/// Where the runner writes the cluster for the agent.
pub trait PolicySource: Send + Sync {
    /// How the agent is pointed at this source.
    fn agent_source(&self) -> AgentSource<'_>;

    /// What an agent running in `node` needs to reach this source, held
    /// for as long as the agent runs.
    fn reach_from(&self, node: &Netns) -> Result<Option<TcpForwarder>>;

    /// Creates or replaces an object, or deletes one.
    fn apply(&mut self, edit: SourceEdit<'_>) -> Result<()>;

    /// A pod's network is up with `ips` (what a kubelet reports once the
    /// CNI ADD returned).
    fn pod_running(&mut self, pod: &NamespacedName, ips: &[IpAddr]) -> Result<()>;

    /// Removes everything the scenario wrote, so that the next one starts
    /// from an empty cluster.
    fn clear(&mut self) -> Result<()>;
}
