//! ClusterIP services, DNAT'ed as kube-proxy would: iptables (or ip6tables)
//! `nat` rules in the node namespace, PREROUTING for pods and externals,
//! OUTPUT for the node itself. One chain per service, flushed and refilled
//! on every change; the node namespace (and its rules) go with the topology.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use palisade_tests::conformance::{NamespacedName, ServiceRules};
use palisade_tests::netns::Netns;

/// The services currently programmed.
#[derive(Default)]
pub struct Services {
    /// Service → (chain, ip6tables or not).
    chains: BTreeMap<NamespacedName, (String, bool)>,
    next: usize,
}

fn table(netns: &Netns, v6: bool, args: &[&str]) -> Result<()> {
    let prog = if v6 { "ip6tables" } else { "iptables" };
    let mut full = vec![prog, "-w", "-t", "nat"];
    full.extend_from_slice(args);
    let out = netns.exec(&full)?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            full.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Services {
    /// Creates or replaces `rules`.
    pub fn set(&mut self, netns: &Netns, rules: &ServiceRules) -> Result<()> {
        let v6 = rules.cluster_ip.is_ipv6();
        let chain = match self.chains.get(&rules.service) {
            Some((chain, _)) => {
                table(netns, v6, &["-F", chain])?;
                chain.clone()
            }
            None => {
                let chain = format!("PALISADE-SVC-{}", self.next);
                self.next += 1;
                table(netns, v6, &["-N", &chain])?;
                for hook in ["PREROUTING", "OUTPUT"] {
                    table(netns, v6, &["-A", hook, "-j", &chain])?;
                }
                self.chains
                    .insert(rules.service.clone(), (chain.clone(), v6));
                chain
            }
        };
        let cluster_ip = rules.cluster_ip.to_string();
        for port in &rules.ports {
            let proto = port.protocol.as_str().to_ascii_lowercase();
            let dport = port.port.to_string();
            let n = port.backends.len();
            for (i, backend) in port.backends.iter().enumerate() {
                let to = if v6 {
                    format!("[{}]:{}", backend.ip, backend.port)
                } else {
                    format!("{}:{}", backend.ip, backend.port)
                };
                let mut args = vec![
                    "-A",
                    &chain,
                    "-d",
                    &cluster_ip,
                    "-p",
                    &proto,
                    "--dport",
                    &dport,
                ];
                // kube-proxy's iptables mode: each backend with probability
                // 1/(remaining backends), the last one unconditionally.
                let remaining = (n - i).to_string();
                if i + 1 < n {
                    args.extend(["-m", "statistic", "--mode", "nth", "--every"]);
                    args.push(&remaining);
                    args.extend(["--packet", "0"]);
                }
                args.extend(["-j", "DNAT", "--to-destination", &to]);
                table(netns, v6, &args)
                    .with_context(|| format!("service {} port {}", rules.service, port.port))?;
            }
        }
        Ok(())
    }

    /// Removes a service's rules.
    pub fn remove(&mut self, netns: &Netns, service: &NamespacedName) -> Result<()> {
        if let Some((chain, v6)) = self.chains.remove(service) {
            table(netns, v6, &["-F", &chain])?;
        }
        Ok(())
    }
}
