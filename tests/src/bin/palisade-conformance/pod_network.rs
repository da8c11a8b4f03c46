//! The pods' network, wired as a container runtime wires it: the node's
//! CNI configuration is a conflist for Debian's reference `bridge` plugin
//! with `host-local` IPAM (a private data directory), chained with
//! `palisade-cni` by `palisade-cni install`; each pod is attached by running
//! that chain (ADD in order, DEL in reverse with the cached result) inside
//! the node's network namespace.
//!
//! The bridge carries the node's addresses (the pods' gateway, from
//! [`RunConfig::node_ips`]) in the pool's IPv4 subnet and an IPv6 /48; a pod
//! asks for its scenario addresses through the `ips` capability (host-local
//! honours `runtimeConfig.ips`). host-local allocates from every range set of
//! the configuration, so IPv4-only pods are attached with the same network
//! minus its IPv6 range set (same bridge, same IPAM store): one network
//! cannot give some pods one family and others two.
//!
//! `palisade-cni`'s ADD returns once the agent enforces the pod's policy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use palisade_tests::cni::{self, Attachment, ConfList, REFERENCE_PLUGINS, Runtime};
use palisade_tests::conformance::{PodInfo, RunConfig};
use palisade_tests::netns::Netns;
use serde_json::{Value, json};

use crate::cluster::PREFIX;

/// The prefix length of the pods' IPv6 range, around the node's IPv6
/// address (the scenarios' IPv6 pods are in fd00:10:244::/48).
const IPV6_PREFIX_LEN: u8 = 48;
/// How long `palisade-cni` waits for the agent to enforce a pod's policy.
const PLUGIN_TIMEOUT_SECONDS: f64 = 30.0;

/// A pod attached to the network: what DEL needs.
pub struct Attached {
    attachment: Attachment,
    dual_stack: bool,
    /// The ADD's result, cached for DEL as a runtime does.
    result: Value,
    /// The addresses the chain gave the pod.
    pub ips: Vec<IpAddr>,
}

/// The node's CNI configuration and the runtime that runs it.
pub struct PodNetwork {
    runtime: Runtime,
    dual_stack: ConfList,
    ipv4_only: ConfList,
    /// Configuration, plugin and IPAM directories, removed on drop.
    _dir: tempfile::TempDir,
}

/// The node's address of each family, from the run's configuration.
pub fn gateways(config: &RunConfig) -> Result<(Ipv4Addr, Ipv6Addr)> {
    let v4 = config.node_ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) if config.pool.contains(*v4) => Some(*v4),
        _ => None,
    });
    let v6 = config.node_ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    match (v4, v6) {
        (Some(v4), Some(v6)) => Ok((v4, v6)),
        _ => bail!(
            "the node needs an IPv4 address in the pool {} and an IPv6 address (node_ips {:?})",
            config.pool,
            config.node_ips
        ),
    }
}

fn ipv6_subnet(gateway: Ipv6Addr) -> String {
    let mask = u128::MAX << (128 - u32::from(IPV6_PREFIX_LEN));
    let network = Ipv6Addr::from(u128::from(gateway) & mask);
    format!("{network}/{IPV6_PREFIX_LEN}")
}

impl PodNetwork {
    /// Writes the node's network configuration, chains `palisade-cni`
    /// (talking to the agent at `socket`) into it, and prepares a runtime
    /// in `node`.
    pub fn new(node: &Netns, socket: &Path, config: &RunConfig) -> Result<Self> {
        let (gateway4, gateway6) = gateways(config)?;
        let dir = tempfile::Builder::new()
            .prefix("palisade-conformance-cni-")
            .tempdir()
            .context("creating the CNI directories")?;
        let conf_dir = dir.path().join("net.d");
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir_all(&conf_dir)?;
        let original = json!({
            "cniVersion": "1.0.0",
            "name": format!("{PREFIX}-net"),
            "plugins": [{
                "type": "bridge",
                "bridge": format!("{PREFIX}br0"),
                "isDefaultGateway": true,
                "hairpinMode": true,
                "ipMasq": false,
                "capabilities": {"ips": true},
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.path().join("ipam"),
                    "ranges": [
                        [{"subnet": config.pool.to_string(), "gateway": gateway4}],
                        [{"subnet": ipv6_subnet(gateway6), "gateway": gateway6}],
                    ],
                },
            }],
        });
        let file = conf_dir.join("10-bridge.conflist");
        std::fs::write(&file, original.to_string())
            .with_context(|| format!("writing {}", file.display()))?;
        cni::install(&conf_dir, &bin_dir, socket, PLUGIN_TIMEOUT_SECONDS)?;
        let dual_stack = ConfList::load(&file)?;
        let types: Vec<&str> = (0..dual_stack.plugins().len())
            .map(|i| dual_stack.plugin_type(i))
            .collect();
        ensure!(
            types == ["bridge", "palisade-cni"],
            "palisade-cni install wrote the chain {types:?}"
        );
        let mut ipv4_only = dual_stack.clone();
        ipv4_only.doc["plugins"][0]["ipam"]["ranges"]
            .as_array_mut()
            .context("the installed conflist has no IPAM ranges")?
            .truncate(1);
        Ok(Self {
            runtime: Runtime {
                cni_path: vec![bin_dir, PathBuf::from(REFERENCE_PLUGINS)],
                host_netns: Some(node.path().to_owned()),
            },
            dual_stack,
            ipv4_only,
            _dir: dir,
        })
    }

    fn list(&self, dual_stack: bool) -> &ConfList {
        if dual_stack {
            &self.dual_stack
        } else {
            &self.ipv4_only
        }
    }

    /// Runs ADD of the chain for `pod`, whose network namespace is
    /// `netns`, with its scenario addresses; returns once the agent enforces
    /// its policy. On failure, DEL is run as a runtime would.
    pub fn add(&self, pod: &PodInfo, container_id: &str, netns: &Netns) -> Result<Attached> {
        let wanted: Vec<IpAddr> = [Some(IpAddr::V4(pod.ip)), pod.ip6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .collect();
        let attachment = Attachment::pod(
            container_id,
            netns.path(),
            &pod.name.namespace,
            &pod.name.name,
        )
        .with_capability("ips", json!(wanted));
        let dual_stack = pod.ip6.is_some();
        let list = self.list(dual_stack);
        let result = match self.runtime.add(list, &attachment)? {
            Ok(result) => result,
            Err(e) => {
                let _ = self.runtime.del(list, &attachment, None);
                return Err(anyhow!("CNI ADD of {}: {e}", pod.name));
            }
        };
        let attached = Attached {
            ips: result_ips(&result)?,
            attachment,
            dual_stack,
            result,
        };
        let mut got = attached.ips.clone();
        let mut want = wanted;
        got.sort();
        want.sort();
        if got != want {
            let _ = self.del(&attached);
            bail!(
                "CNI ADD of {} gave {got:?}, the scenario wants {want:?}",
                pod.name
            );
        }
        Ok(attached)
    }

    /// Runs DEL of the chain (in reverse) with the ADD's cached result.
    pub fn del(&self, attached: &Attached) -> Result<()> {
        let list = self.list(attached.dual_stack);
        self.runtime
            .del(list, &attached.attachment, Some(&attached.result))?
            .map_err(|e| anyhow!("CNI DEL of {}: {e}", attached.attachment.container_id))
    }
}

/// The addresses of a CNI result (`ips[].address`, without the prefix
/// length).
fn result_ips(result: &Value) -> Result<Vec<IpAddr>> {
    result["ips"]
        .as_array()
        .context("the CNI result has no ips")?
        .iter()
        .map(|ip| {
            let text = ip["address"].as_str().unwrap_or_default();
            let address = text.split('/').next().unwrap_or_default();
            address
                .parse()
                .with_context(|| format!("CNI result address {text:?}"))
        })
        .collect()
}
