//! NetworkPolicy as iptables + ipset rules, laid out the way kube-router's
//! network policy controller (iptables mode, `pkg/controllers/netpol`,
//! commit 7c2c2779) writes them. A pure function of the cluster state: it
//! returns an `ipset restore` script and an `iptables-restore` script for
//! the filter table.
//!
//! Layout (one IPv4 family; see docs/benchmarks.md for the mapping):
//!
//! * `FORWARD`/`INPUT`/`OUTPUT` jump to `KUBE-ROUTER-FORWARD`/`-INPUT`/`-OUTPUT`.
//! * Those hold, per local pod, `-d <ip> -j KUBE-POD-FW-*` and
//!   `-s <ip> -j KUBE-POD-FW-*`, then `-j KUBE-NWPLCY-TAIL` and an ACCEPT of
//!   the "passed" mark 0x20000.
//! * `KUBE-POD-FW-*` (per local pod): `-j KUBE-NWPLCY-COMMON` (INVALID drop,
//!   ESTABLISHED/RELATED accept, three ICMP types), accept from the node,
//!   `KUBE-NWPLCY-DEFAULT` (marks 0x10000) for a direction no policy
//!   isolates, one jump per selecting policy (last policy first, as
//!   kube-router's `-I … 1` leaves them), then NFLOG and REJECT of what no
//!   policy marked, clear 0x10000, set 0x20000.
//! * `KUBE-NWPLCY-*` (per policy): per rule and port, a MARK rule and a
//!   RETURN-if-marked rule, both matching `KUBE-SRC-*` (the rule's peer pods)
//!   and `KUBE-DST-*` (the pods the policy selects) ipsets plus protocol and
//!   port.
//!
//! Left out, because they never match in this topology or concern other
//! traffic: the `--physdev-is-bridged` duplicates of the top-level jumps
//! (pods here are routed, not bridged, and the physdev match would load
//! br_netfilter host-wide), the node-port and service-VIP whitelist of
//! `KUBE-ROUTER-INPUT`, and the default-deny tail. ipBlock peers, named
//! ports and IPv6 are not generated (the benchmark uses none): they are an
//! error.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use anyhow::{Result, bail};
use policy_agent::model::{
    ClusterState, ObjectRef, Peer, Peers, Pod, Policy, PortRef, Ports, Protocol, Rule,
};

const FORWARD: &str = "KUBE-ROUTER-FORWARD";
const INPUT: &str = "KUBE-ROUTER-INPUT";
const OUTPUT: &str = "KUBE-ROUTER-OUTPUT";
const DEFAULT: &str = "KUBE-NWPLCY-DEFAULT";
const COMMON: &str = "KUBE-NWPLCY-COMMON";
const TAIL: &str = "KUBE-NWPLCY-TAIL";
/// kube-router's ipset options (`utils.TypeHashIP` with `timeout 0`).
const SET_OPTIONS: &str = "hash:ip family inet hashsize 1024 maxelem 65536 timeout 0";
/// Stands in for kube-router's per-sync version string in chain names.
const VERSION: &str = "1";

/// The generated scripts.
#[derive(Debug, Default)]
pub struct Ruleset {
    /// `ipset restore` input: every set with its members.
    pub ipsets: String,
    /// Names of the sets, to destroy them afterwards.
    pub set_names: Vec<String>,
    /// `iptables-restore` input for the filter table.
    pub filter: String,
    /// User-defined chains and rules in `filter`.
    pub chains: usize,
    pub rules: usize,
}

/// 16 hex digits of a stable hash (kube-router uses 16 base32 characters of
/// a SHA-256; only the shape matters here).
fn hash16(parts: &[&str]) -> String {
    let mut h = std::hash::DefaultHasher::new();
    parts.hash(&mut h);
    format!("{:016X}", h.finish())
}

fn pod_chain(pod: &ObjectRef) -> String {
    format!(
        "KUBE-POD-FW-{}",
        hash16(&[&pod.namespace, &pod.name, VERSION])
    )
}

fn policy_chain(p: &Policy) -> String {
    format!(
        "KUBE-NWPLCY-{}",
        hash16(&[&p.namespace, &p.name, VERSION, "IPv4"])
    )
}

fn comment(namespace: &str, name: &str, kind: &str) -> String {
    format!("-m comment --comment \"{namespace}/{name} {kind}\"")
}

fn ipv4(pod: &Pod) -> Option<IpAddr> {
    pod.ips.iter().copied().find(IpAddr::is_ipv4)
}

/// Pods a policy can select or name as peers: with an IPv4 address, not on
/// the host network (kube-router's `isNetPolActionable`).
fn actionable(state: &ClusterState) -> impl Iterator<Item = (&Pod, IpAddr)> {
    state
        .pods()
        .values()
        .filter(|p| !p.host_network)
        .filter_map(|p| ipv4(p).map(|ip| (&**p, ip)))
}

/// The pods a rule's peers select (kube-router's `evalPodPeer`).
fn peer_ips(state: &ClusterState, policy: &Policy, peers: &[Peer]) -> Result<BTreeSet<IpAddr>> {
    let mut ips = BTreeSet::new();
    for peer in peers {
        for (pod, ip) in actionable(state) {
            let ns_labels = || state.namespace_labels(&pod.namespace);
            let matches = match peer {
                Peer::PodSelector(s) => pod.namespace == policy.namespace && s.matches(&pod.labels),
                Peer::NamespaceSelector(n) => n.matches(&ns_labels()),
                Peer::PodAndNamespaceSelector {
                    pod: s,
                    namespace: n,
                } => n.matches(&ns_labels()) && s.matches(&pod.labels),
                Peer::IpBlock(_) => bail!(
                    "policy {}: ipBlock peers are not generated",
                    policy.object_ref()
                ),
            };
            if matches {
                ips.insert(ip);
            }
        }
    }
    Ok(ips)
}

/// `-p proto --dport a[:b]` per port of a rule; one empty match for all ports.
fn port_matches(policy: &Policy, ports: &Ports) -> Result<Vec<String>> {
    let Ports::Only(ports) = ports else {
        return Ok(vec![String::new()]);
    };
    let mut out = Vec::new();
    for port in ports {
        let proto = match port.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        };
        out.push(match (&port.port, port.end_port) {
            (None, _) => format!(" -p {proto}"),
            (Some(PortRef::Number(p)), None) => format!(" -p {proto} --dport {p}"),
            (Some(PortRef::Number(p)), Some(end)) => format!(" -p {proto} --dport {p}:{end}"),
            (Some(PortRef::Named(name)), _) => bail!(
                "policy {}: named port {name} is not generated",
                policy.object_ref()
            ),
        });
    }
    Ok(out)
}

#[derive(Default)]
struct Builder {
    out: Ruleset,
    chain_lines: String,
    rule_lines: String,
}

impl Builder {
    fn chain(&mut self, name: &str) {
        let _ = writeln!(self.chain_lines, ":{name} - [0:0]");
        self.out.chains += 1;
    }

    fn rule(&mut self, chain: &str, spec: &str) {
        let _ = writeln!(self.rule_lines, "-A {chain} {spec}");
        self.out.rules += 1;
    }

    fn set(&mut self, name: &str, members: &BTreeSet<IpAddr>) {
        let _ = writeln!(self.out.ipsets, "create {name} {SET_OPTIONS}");
        for ip in members {
            let _ = writeln!(self.out.ipsets, "add {name} {ip} timeout 0");
        }
        self.out.set_names.push(name.to_owned());
    }

    /// kube-router's `appendRuleToPolicyChain`: MARK, then RETURN if marked.
    fn policy_rule(
        &mut self,
        chain: &str,
        cmt: &str,
        src: Option<&str>,
        dst: Option<&str>,
        port: &str,
    ) {
        let mut spec = cmt.to_owned();
        if let Some(src) = src {
            let _ = write!(spec, " -m set --match-set {src} src");
        }
        if let Some(dst) = dst {
            let _ = write!(spec, " -m set --match-set {dst} dst");
        }
        spec.push_str(port);
        self.rule(
            chain,
            &format!("{spec} -j MARK --set-xmark 0x10000/0x10000"),
        );
        self.rule(
            chain,
            &format!("{spec} -m mark --mark 0x10000/0x10000 -j RETURN"),
        );
    }

    /// One direction of a policy (`processIngressRules` / `processEgressRules`):
    /// `own` is the set of the pods it selects, matched as destination for
    /// ingress and as source for egress.
    fn direction(
        &mut self,
        state: &ClusterState,
        p: &Policy,
        ingress: bool,
        own: &str,
    ) -> Result<()> {
        let chain = policy_chain(p);
        let (rules, word): (&[Rule], &str) = if ingress {
            (&p.ingress, "ingress")
        } else {
            (&p.egress, "egress")
        };
        for (index, rule) in rules.iter().enumerate() {
            let ports = port_matches(p, &rule.ports)?;
            match &rule.peers {
                Peers::All => {
                    let cmt = comment(&p.namespace, &p.name, &format!("{word} any"));
                    for port in &ports {
                        let (src, dst) = if ingress {
                            (None, Some(own))
                        } else {
                            (Some(own), None)
                        };
                        self.policy_rule(&chain, &cmt, src, dst, port);
                    }
                }
                Peers::Only(peers) => {
                    let ips = peer_ips(state, p, peers)?;
                    if ips.is_empty() {
                        continue;
                    }
                    let (prefix, tag) = if ingress {
                        ("SRC", "ingressrule")
                    } else {
                        ("DST", "egressrule")
                    };
                    let set = format!(
                        "KUBE-{prefix}-{}",
                        hash16(&[
                            &p.namespace,
                            &p.name,
                            tag,
                            &index.to_string(),
                            "IPv4",
                            "pod"
                        ])
                    );
                    self.set(&set, &ips);
                    let cmt = comment(&p.namespace, &p.name, &format!("{word} pods"));
                    for port in &ports {
                        let (src, dst) = if ingress {
                            (set.as_str(), own)
                        } else {
                            (own, set.as_str())
                        };
                        self.policy_rule(&chain, &cmt, Some(src), Some(dst), port);
                    }
                }
            }
        }
        Ok(())
    }

    fn policy(&mut self, state: &ClusterState, p: &Policy) -> Result<()> {
        self.chain(&policy_chain(p));
        let selected: BTreeSet<IpAddr> = actionable(state)
            .filter(|(pod, _)| p.selects(pod))
            .map(|(_, ip)| ip)
            .collect();
        for (ingress, prefix) in [(true, "DST"), (false, "SRC")] {
            let isolates = if ingress {
                p.isolates_ingress
            } else {
                p.isolates_egress
            };
            if !isolates {
                continue;
            }
            let own = format!("KUBE-{prefix}-{}", hash16(&[&p.namespace, &p.name, "IPv4"]));
            self.set(&own, &selected);
            self.direction(state, p, ingress, &own)?;
        }
        Ok(())
    }

    /// `syncPodFirewallChains` for one local pod, in the order its `-I … 1`
    /// inserts and appends leave the chain.
    fn pod_chain(&mut self, state: &ClusterState, object: &ObjectRef, pod: &Pod, ip: IpAddr) {
        let chain = pod_chain(object);
        self.chain(&chain);
        let selecting: Vec<&Policy> = state
            .policies()
            .values()
            .filter(|p| p.selects(pod))
            .collect();
        let ingress = selecting.iter().any(|p| p.isolates_ingress);
        let egress = selecting.iter().any(|p| p.isolates_egress);
        let (ns, name) = (&object.namespace, &object.name);
        self.rule(
            &chain,
            &format!("-m comment --comment \"common netpol rules\" -j {COMMON}"),
        );
        self.rule(
            &chain,
            &format!("-m comment --comment \"from local node\" -m addrtype --src-type LOCAL -d {ip} -j ACCEPT"),
        );
        if !egress {
            self.rule(
                &chain,
                &format!("-s {ip} -m comment --comment \"default egress\" -j {DEFAULT}"),
            );
        }
        if !ingress {
            self.rule(
                &chain,
                &format!("-d {ip} -m comment --comment \"default ingress\" -j {DEFAULT}"),
            );
        }
        for p in selecting.iter().rev() {
            let addr = match (p.isolates_ingress, p.isolates_egress) {
                (true, true) => String::new(),
                (true, false) => format!("-d {ip} "),
                _ => format!("-s {ip} "),
            };
            let cmt = comment(&p.namespace, &p.name, "policy");
            self.rule(&chain, &format!("{addr}{cmt} -j {}", policy_chain(p)));
        }
        let unmarked = "-m mark ! --mark 0x10000/0x10000";
        self.rule(
            &chain,
            &format!(
                "{} {unmarked} -m limit --limit 10/minute --limit-burst 10 -j NFLOG --nflog-group 100",
                comment(ns, name, "log-drop")
            ),
        );
        self.rule(
            &chain,
            &format!("{} {unmarked} -j REJECT", comment(ns, name, "reject")),
        );
        self.rule(&chain, "-j MARK --set-mark 0/0x10000");
        self.rule(
            &chain,
            "-m comment --comment \"set netpol-ok mark\" -j MARK --set-mark 0x20000/0x20000",
        );
        // interceptPodInboundTraffic, then interceptPodOutboundTraffic.
        let cin = comment(ns, name, "in");
        let cout = comment(ns, name, "out");
        self.rule(FORWARD, &format!("{cin} -d {ip} -j {chain}"));
        self.rule(OUTPUT, &format!("{cin} -d {ip} -j {chain}"));
        for top in [INPUT, FORWARD, OUTPUT] {
            self.rule(top, &format!("{cout} -s {ip} -j {chain}"));
        }
    }
}

/// The ruleset enforcing every policy of `state` for the pods in `local`
/// (the pods on this node; kube-router builds chains for every one of them).
pub fn generate(state: &ClusterState, local: &[ObjectRef]) -> Result<Ruleset> {
    let mut b = Builder::default();
    for chain in [INPUT, FORWARD, OUTPUT, DEFAULT, COMMON, TAIL] {
        b.chain(chain);
    }
    b.rule(
        DEFAULT,
        "-j MARK -m comment --comment \"rule to mark traffic matching a network policy\" --set-xmark 0x10000/0x10000",
    );
    b.rule(
        COMMON,
        "-m comment --comment \"rule to drop invalid state for pod\" -m conntrack --ctstate INVALID -j DROP",
    );
    b.rule(
        COMMON,
        "-m comment --comment \"rule for stateful firewall for pod\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    );
    for (ty, what) in [
        ("echo-request", "echo requests"),
        (
            "destination-unreachable",
            "destination unreachable messages",
        ),
        ("time-exceeded", "time exceeded messages"),
    ] {
        b.rule(
            COMMON,
            &format!(
                "-m comment --comment \"allow icmp {what}\" -p icmp --icmp-type {ty} -j ACCEPT"
            ),
        );
    }
    b.rule(
        TAIL,
        "-m comment --comment \"accept netpol-ok\" -m mark --mark 0x20000/0x20000 -j ACCEPT",
    );
    for p in state.policies().values() {
        b.policy(state, p)?;
    }
    for object in local {
        let Some(pod) = state.pod(object) else {
            bail!("local pod {object} is not in the cluster state");
        };
        let Some(ip) = ipv4(pod) else {
            bail!("local pod {object} has no IPv4 address");
        };
        b.pod_chain(state, object, pod, ip);
    }
    for top in [INPUT, FORWARD, OUTPUT] {
        b.rule(
            top,
            &format!(
                "-m comment --comment \"rule to explicitly handle traffic for network policies ACCEPT/REJECT decision\" -j {TAIL}"
            ),
        );
        b.rule(
            top,
            "-m comment --comment \"rule to explicitly ACCEPT traffic that comply to network policies\" -m mark --mark 0x20000/0x20000 -j ACCEPT",
        );
    }
    let Builder {
        mut out,
        chain_lines,
        rule_lines,
    } = b;
    let mut filter =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    filter.push_str(&chain_lines);
    for (base, chain) in [("INPUT", INPUT), ("FORWARD", FORWARD), ("OUTPUT", OUTPUT)] {
        let _ = writeln!(
            filter,
            "-A {base} -m comment --comment \"kube-router netpol\" -j {chain}"
        );
        out.rules += 1;
    }
    filter.push_str(&rule_lines);
    filter.push_str("COMMIT\n");
    out.filter = filter;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::scenario;

    fn lines<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.contains(needle)).collect()
    }

    #[test]
    fn one_chain_two_rules_and_two_sets_per_policy() {
        let state = scenario::build(3).expect("scenario");
        let r =
            generate(&state, &[scenario::client_ref(), scenario::server_ref()]).expect("generates");
        // 6 fixed chains, 3 policy chains, 2 pod chains.
        assert_eq!(r.chains, 11);
        // A destination set (the server) and a source set per policy.
        assert_eq!(r.set_names.len(), 6);
        assert_eq!(
            lines(&r.filter, "-j MARK --set-xmark 0x10000/0x10000").len(),
            4
        );
        assert_eq!(lines(&r.filter, "src -m set --match-set").len(), 8);
        assert!(
            r.ipsets
                .contains(&format!("add {} 10.210.0.10 timeout 0", r.set_names[1]))
        );
        assert!(r.filter.contains("--dport 8080"));
        assert!(r.filter.contains("--dport 9001"));
    }

    #[test]
    fn server_chain_runs_common_first_then_every_policy() {
        let state = scenario::build(3).expect("scenario");
        let r = generate(&state, &[scenario::server_ref()]).expect("generates");
        let server = pod_chain(&scenario::server_ref());
        let rules = lines(&r.filter, &format!("-A {server} "));
        assert!(rules[0].ends_with(&format!("-j {COMMON}")));
        assert!(rules[1].contains("--src-type LOCAL"));
        // Isolated for ingress: the default chain only for egress.
        assert!(rules[2].contains("default egress"));
        let jumps: Vec<_> = rules
            .iter()
            .filter(|l| l.contains("-j KUBE-NWPLCY-"))
            .skip(2)
            .collect();
        assert_eq!(jumps.len(), 3);
        assert!(jumps[0].contains("bench/allow-00002 policy"));
        assert!(
            jumps
                .iter()
                .all(|l| l.starts_with(&format!("-A {server} -d 10.210.0.20 ")))
        );
        assert!(
            rules
                .last()
                .expect("rules")
                .contains("--set-mark 0x20000/0x20000")
        );
        let common = lines(&r.filter, &format!("-A {COMMON} "));
        assert!(common[1].contains("--ctstate RELATED,ESTABLISHED -j ACCEPT"));
    }

    #[test]
    fn no_policy_means_default_chains_only() {
        let state = scenario::build(0).expect("scenario");
        let r = generate(&state, &[scenario::server_ref()]).expect("generates");
        assert!(r.set_names.is_empty());
        assert_eq!(lines(&r.filter, "\"default ").len(), 2);
    }
}
