//! `bench control-plane`: the real `policy-agent run --source files` on a
//! generated cluster, with its maps really loaded in the kernel.
//!
//! The cluster (default: 10,000 pods in 500 namespaces, 2,000
//! NetworkPolicies, 110 pods on this node, kubelet's default maximum) is
//! written as YAML into a fresh manifest directory: one file per pod (as a
//! controller or `kubectl apply` would update them one by one), one file of
//! namespaces, one file of policies per namespace. Pods carry app, tier and
//! version labels and named container ports; every namespace has a default
//! deny both ways, a rule admitting its web tier from the namespaces of its
//! team, one admitting the api and db tiers from the web tier on a port range,
//! one admitting the monitoring namespace on a named port, and egress within
//! the namespace, to DNS and to ipBlocks with excepts.
//!
//! The agent runs in a network namespace of its own, where the node's 110
//! pods are veth interfaces (both ends in that namespace) registered through the agent's API as the CNI
//! plugin would (no pod network namespaces are needed: nothing here sends
//! packets, the classifier is attached and its maps are programmed).
//!
//! Figures:
//!
//! * **cold sync**: from starting the agent process (empty pin directory,
//!   empty state) until every endpoint is enforced, which includes loading
//!   the classifier, reading and converting every manifest, registering the
//!   110 endpoints, compiling and programming the maps; with the agent's own
//!   "maps programmed" time of its first full apply;
//! * **change**: a label of one pod rewritten in its file (a temporary file
//!   renamed over it, as editors and `kubectl`-like writers do), measured from
//!   before the write until `WaitEnforced` reports the revision that includes
//!   it: the source noticing the file, parsing, the reconciler's debounce,
//!   compiling and writing the maps; p50/p99/max over the changes;
//! * **peak RSS**: the agent's VmHWM at the end.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use palisade_tests::agent::{Agent, AgentDirs, AgentOptions, manifest, proto};
use palisade_tests::netns::{Netns, cleanup_prefix};
use serde_json::json;

use crate::Output;

const PREFIX: &str = "pbcp";
const NODE: &str = "pbcp-node";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
const TIERS: [&str; 5] = ["web", "api", "db", "cache", "worker"];
const WAIT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub struct Options {
    /// Pods in the cluster.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Pods on this node (registered endpoints).
    #[arg(long, default_value_t = 110)]
    local_pods: usize,
    /// Namespaces.
    #[arg(long, default_value_t = 500)]
    namespaces: usize,
    /// NetworkPolicies (spread over the namespaces, four kinds in turn).
    #[arg(long, default_value_t = 2_000)]
    policies: usize,
    /// Label changes to time.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    #[command(flatten)]
    output: Output,
}

/// The generated cluster.
struct Cluster {
    /// (namespace, name, labels, address) of every pod.
    pods: Vec<PodSpec>,
    /// Indices of the pods on this node.
    local: Vec<usize>,
}

#[derive(Clone)]
struct PodSpec {
    namespace: String,
    name: String,
    labels: Vec<(String, String)>,
    ip: Ipv4Addr,
    local: bool,
}

fn namespace_name(n: usize) -> String {
    format!("ns-{n:03}")
}

fn pod_ip(i: usize) -> Ipv4Addr {
    // 10.64.0.1 upwards, 250 per /24.
    let (hi, lo) = (i / 250, i % 250 + 1);
    Ipv4Addr::new(10, 64 + (hi / 256) as u8, (hi % 256) as u8, lo as u8)
}

impl Cluster {
    fn generate(opts: &Options) -> Result<Self> {
        if opts.namespaces == 0 || opts.pods < opts.namespaces || opts.local_pods > opts.pods {
            bail!("need 1 <= namespaces <= pods and local pods <= pods");
        }
        let per_ns = opts.pods.div_ceil(opts.namespaces);
        // Spread the local pods evenly over the cluster.
        let stride = (opts.pods / opts.local_pods.max(1)).max(1);
        let mut pods = Vec::with_capacity(opts.pods);
        let mut local = Vec::new();
        for i in 0..opts.pods {
            let n = (i / per_ns).min(opts.namespaces - 1);
            let k = i % per_ns;
            let tier = TIERS[(k / 4) % TIERS.len()];
            let app = format!("{tier}-{}", k / 20);
            let is_local = i % stride == 0 && local.len() < opts.local_pods;
            if is_local {
                local.push(i);
            }
            pods.push(PodSpec {
                namespace: namespace_name(n),
                name: format!("{app}-{i}"),
                labels: vec![
                    ("app".into(), app),
                    ("tier".into(), tier.into()),
                    (
                        "version".into(),
                        if i % 2 == 0 { "v1" } else { "v2" }.into(),
                    ),
                ],
                ip: pod_ip(i),
                local: is_local,
            });
        }
        Ok(Self { pods, local })
    }

    fn pod_yaml(pod: &PodSpec) -> String {
        let labels: Vec<(&str, &str)> = pod
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let node = if pod.local { NODE } else { "other-node" };
        let mut text = manifest::pod(
            &pod.namespace,
            &pod.name,
            &labels,
            node,
            &[IpAddr::V4(pod.ip)],
            &[],
        );
        // Named container ports, spliced into the container.
        text = text.replace(
            "    image: test\n",
            "    image: test\n    ports:\n    - {name: http, containerPort: 8080, protocol: TCP}\n    - {name: metrics, containerPort: 9090, protocol: TCP}\n",
        );
        text
    }

    fn pod_file(pod: &PodSpec) -> String {
        format!("pod-{}-{}.yaml", pod.namespace, pod.name)
    }

    fn namespaces_yaml(opts: &Options) -> String {
        let mut docs = Vec::new();
        for n in 0..opts.namespaces {
            let team = format!("t{}", n % 20);
            let mut labels = vec![("team", team.as_str())];
            if n == 0 {
                labels.push(("purpose", "monitoring"));
            }
            if n == 1 {
                labels.push(("purpose", "dns"));
            }
            docs.push(manifest::namespace(&namespace_name(n), &labels));
        }
        manifest::documents(&docs)
    }

    /// Policy `p` of namespace `n`: the four kinds in turn.
    fn policy_yaml(n: usize, p: usize) -> String {
        let ns = namespace_name(n);
        let head = |name: &str| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}-{p}\n  namespace: {ns}\nspec:\n"
            )
        };
        match p % 4 {
            0 => head("default-deny") + "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
            1 => {
                head("allow-web")
                    + &format!(
                        "  podSelector: {{matchLabels: {{tier: web}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{team: t{}}}}}\n    ports:\n    - {{port: 8080}}\n    - {{port: http}}\n  - from:\n    - ipBlock: {{cidr: 192.168.0.0/16, except: [192.168.{}.0/24]}}\n    ports:\n    - {{port: 443}}\n",
                        n % 20,
                        n % 256
                    )
            }
            2 => {
                head("allow-api")
                    + "  podSelector:\n    matchExpressions:\n    - {key: tier, operator: In, values: [api, db]}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {tier: web}}\n    ports:\n    - {port: 9000, endPort: 9100}\n  - from:\n    - namespaceSelector: {matchLabels: {purpose: monitoring}}\n      podSelector: {matchLabels: {tier: worker}}\n    ports:\n    - {port: metrics}\n"
            }
            _ => {
                head("allow-egress")
                    + &format!(
                        "  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - podSelector: {{}}\n  - to:\n    - namespaceSelector: {{matchLabels: {{purpose: dns}}}}\n    ports:\n    - {{port: 53, protocol: UDP}}\n    - {{port: 53, protocol: TCP}}\n  - to:\n    - ipBlock: {{cidr: 10.0.0.0/8, except: [10.{}.0.0/16]}}\n    - ipBlock: {{cidr: 0.0.0.0/0, except: [10.0.0.0/8, 172.16.0.0/12]}}\n    ports:\n    - {{port: 443}}\n",
                        64 + n % 8
                    )
            }
        }
    }

    fn write(&self, opts: &Options, dirs: &AgentDirs) -> Result<()> {
        dirs.write_manifest("namespaces.yaml", &Self::namespaces_yaml(opts))?;
        // Policies: as many as asked, spread round-robin over the namespaces.
        let mut by_ns: Vec<Vec<String>> = vec![Vec::new(); opts.namespaces];
        for p in 0..opts.policies {
            let n = p % opts.namespaces;
            let index = p / opts.namespaces;
            by_ns[n].push(Self::policy_yaml(n, index));
        }
        for (n, docs) in by_ns.iter().enumerate() {
            if !docs.is_empty() {
                dirs.write_manifest(
                    &format!("policies-{}.yaml", namespace_name(n)),
                    &manifest::documents(docs),
                )?;
            }
        }
        for pod in &self.pods {
            dirs.write_manifest(&Self::pod_file(pod), &Self::pod_yaml(pod))?;
        }
        Ok(())
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// One "maps programmed" line of the agent's log.
#[derive(Clone, Copy, Debug, Default)]
struct Programmed {
    written: u64,
    elapsed_ms: u64,
    compile_ms: u64,
}

/// The agent's own timings of its applies ("maps programmed ...").
fn programmed(log: &Path) -> Vec<Programmed> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("maps programmed"))
        .map(|l| {
            // Without the terminal colour codes.
            let mut plain = String::with_capacity(l.len());
            let mut chars = l.chars();
            while let Some(c) = chars.next() {
                if c == '\x1b' {
                    for c in chars.by_ref() {
                        if c == 'm' {
                            break;
                        }
                    }
                } else {
                    plain.push(c);
                }
            }
            let field = |name: &str| -> u64 {
                plain
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            Programmed {
                written: field("written"),
                elapsed_ms: field("elapsed_ms"),
                compile_ms: field("compile_ms"),
            }
        })
        .collect()
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

fn create_interfaces(node: &Netns, count: usize) -> Result<()> {
    let mut batch = String::new();
    for i in 0..count {
        // The kernel here has no dummy driver: a veth pair, both ends in
        // the node namespace; the first end stands for a pod's host veth.
        let _ = writeln!(
            batch,
            "link add {PREFIX}{i} type veth peer name {PREFIX}{i}p"
        );
        let _ = writeln!(batch, "link set {PREFIX}{i} up");
        let _ = writeln!(batch, "link set {PREFIX}{i}p up");
    }
    let file = std::env::temp_dir().join(format!("{PREFIX}-links-{}.batch", std::process::id()));
    std::fs::write(&file, batch)?;
    let result = node.ip(["-batch".as_ref(), file.as_os_str()]);
    let _ = std::fs::remove_file(&file);
    result.map(drop)
}

fn container(i: usize) -> String {
    format!("ctr-{PREFIX}-{i}")
}

pub fn run(opts: &Options) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench control-plane needs root (BPF maps, network namespaces)");
    }
    // Info-level agent logs: per-file debug lines would be part of the figures.
    if std::env::var_os("PALISADE_AGENT_LOG").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe { std::env::set_var("PALISADE_AGENT_LOG", "info") };
    }
    let agent_bin = palisade_tests::agent::binary()?;
    println!("agent: {}", agent_bin.display());
    let stale = cleanup_prefix(PREFIX)?;
    if !stale.is_empty() {
        println!("removed namespaces of an earlier run: {}", stale.join(", "));
    }

    let cluster = Cluster::generate(opts)?;
    let dirs = AgentDirs::new(PREFIX)?;
    let t = Instant::now();
    cluster.write(opts, &dirs)?;
    println!(
        "cluster: {} pods ({} on this node), {} namespaces, {} policies; {} files written in {:.1}s to {}",
        cluster.pods.len(),
        cluster.local.len(),
        opts.namespaces,
        opts.policies,
        std::fs::read_dir(&dirs.manifests)?.count(),
        t.elapsed().as_secs_f64(),
        dirs.manifests.display()
    );

    let node = Netns::create(NODE)?;
    node.setup_basics()?;
    create_interfaces(&node, cluster.local.len())?;

    let options = AgentOptions {
        node_name: NODE.to_owned(),
        node_ips: vec![IpAddr::V4(NODE_IP)],
        netns: Some(node.path().to_owned()),
        start_timeout: WAIT,
    };

    // ----- cold sync ------------------------------------------------------
    let started = Instant::now();
    let agent = Agent::start(&dirs, &options)?;
    let api_up = started.elapsed();
    let mut client = agent.client()?;
    let mut revision = 0;
    for (slot, &i) in cluster.local.iter().enumerate() {
        let pod = &cluster.pods[i];
        let done = client
            .register(proto::RegisterRequest {
                namespace: pod.namespace.clone(),
                pod_name: pod.name.clone(),
                container_id: container(i),
                netns_path: String::new(),
                host_interface: format!("{PREFIX}{slot}"),
                ips: vec![pod.ip.to_string()],
            })
            .with_context(|| format!("registering {}\n{}", pod.name, agent.log_tail()))?;
        revision = revision.max(done.revision);
    }
    let registered = started.elapsed();
    client
        .wait_enforced(None, revision, WAIT)
        .with_context(|| format!("cold sync\n{}", agent.log_tail()))?;
    let cold = started.elapsed();
    let status = client.status()?;
    if !status.ready || status.endpoints.len() != cluster.local.len() {
        bail!(
            "not ready after the cold sync: ready {}, {} endpoints\n{}",
            status.ready,
            status.endpoints.len(),
            agent.log_tail()
        );
    }
    let unknown = status.endpoints.iter().filter(|e| !e.pod_known).count();
    if unknown > 0 {
        bail!("{unknown} endpoints without their Pod after the cold sync");
    }
    let log = dirs.root.join("agent.log");
    let cold_applies = programmed(&log);
    let first_apply = cold_applies
        .iter()
        .copied()
        .max_by_key(|p| p.written)
        .unwrap_or_default();
    println!(
        "cold sync: {:.0} ms (API up {:.0} ms, endpoints registered {:.0} ms; {} applies, \
         the largest {} entries in {} ms)",
        ms(cold),
        ms(api_up),
        ms(registered),
        cold_applies.len(),
        first_apply.written,
        first_apply.elapsed_ms
    );

    // ----- label changes ----------------------------------------------------
    // Pods in the namespaces of local endpoints (their peers), in turn.
    let local_namespaces: std::collections::BTreeSet<&str> = cluster
        .local
        .iter()
        .map(|&i| cluster.pods[i].namespace.as_str())
        .collect();
    let candidates: Vec<usize> = (0..cluster.pods.len())
        .filter(|&i| {
            !cluster.pods[i].local && local_namespaces.contains(cluster.pods[i].namespace.as_str())
        })
        .collect();
    if candidates.is_empty() {
        bail!("no pod to relabel");
    }
    let mut pods = cluster.pods.clone();
    let mut samples = Vec::with_capacity(opts.changes);
    for c in 0..opts.changes {
        let i = candidates[(c * 7919) % candidates.len()];
        let pod = &mut pods[i];
        if c % 2 == 0 {
            pod.labels[2].1 = format!("v{}", c + 3);
        } else {
            // Move it to another tier: other rules match it now.
            let tier = &mut pod.labels[1].1;
            *tier = if tier == "web" { "api" } else { "web" }.to_owned();
        }
        let text = Cluster::pod_yaml(pod);
        let file = Cluster::pod_file(pod);
        let before = client.status()?.revision;
        let t = Instant::now();
        dirs.write_manifest(&file, &text)?;
        let enforced = client
            .wait_enforced(None, before + 1, WAIT)
            .with_context(|| format!("change {c}\n{}", agent.log_tail()))?;
        samples.push(ms(t.elapsed()));
        if enforced < before + 1 {
            bail!("change {c}: enforced {enforced} < {}", before + 1);
        }
    }
    let status = client.status()?;
    if !status.last_error.is_empty() {
        bail!("the agent reports an error: {}", status.last_error);
    }
    let pid = agent.pid().context("agent pid")?;
    let hwm_kib = status_kib(pid, "VmHWM")?;
    let rss_now_mb = status_kib(pid, "VmRSS")? as f64 / 1024.0;
    // ----- cold sync from a restart with empty maps -------------------------
    // The agent stops; its map pins are removed (its links stay pinned), so
    // the next agent starts with the 110 endpoints known from its state
    // directory and empty maps: from spawn to ready is loading, reading the
    // files, compiling and programming everything from cold.
    drop(client);
    let mut agent = agent;
    agent.terminate()?;
    for entry in std::fs::read_dir(&dirs.pin_dir)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::remove_file(&path)?;
        }
    }
    let restarted = Instant::now();
    let agent = Agent::start(&dirs, &options)?;
    let mut client = agent.client()?;
    let restart_ready = loop {
        let status = client.status()?;
        if status.ready {
            break restarted.elapsed();
        }
        if restarted.elapsed() > WAIT {
            bail!("not ready after a restart\n{}", agent.log_tail());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let status = client.status()?;
    let enforced = status
        .endpoints
        .iter()
        .filter(|e| e.enforced_revision > 0 && e.pod_known)
        .count();
    if enforced != cluster.local.len() {
        bail!(
            "after the restart {enforced} of {} endpoints enforced\n{}",
            cluster.local.len(),
            agent.log_tail()
        );
    }
    let restart_apply = programmed(&log).last().copied().unwrap_or_default();
    let restart_hwm_kib = status_kib(agent.pid().context("agent pid")?, "VmHWM")?;
    println!(
        "cold sync after a restart with empty maps: {:.0} ms (the apply: {} entries written in {} ms, compile {} ms)",
        ms(restart_ready),
        restart_apply.written,
        restart_apply.elapsed_ms,
        restart_apply.compile_ms
    );

    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN),
    );
    let change_applies: Vec<Programmed> = programmed(&log)
        .into_iter()
        .skip(cold_applies.len())
        .collect();
    let agent_apply_ms = median(change_applies.iter().map(|p| p.elapsed_ms).collect());
    let agent_compile_ms = median(change_applies.iter().map(|p| p.compile_ms).collect());
    // The higher of the two agents' peaks (changes; restart from cold).
    let rss_mb = hwm_kib.max(restart_hwm_kib) as f64 / 1024.0;

    let bars = [
        (
            "cold sync",
            format!("{:.0} ms", ms(restart_ready)),
            "< 1000 ms",
            ms(restart_ready) < 1000.0,
        ),
        ("start + 110 regs", format!("{:.0} ms", ms(cold)), "", true),
        ("change p50", format!("{p50:.1} ms"), "", true),
        ("change p99", format!("{p99:.1} ms"), "< 50 ms", p99 < 50.0),
        ("change max", format!("{max:.1} ms"), "", true),
        (
            "peak RSS (VmHWM)",
            format!("{rss_mb:.0} MB"),
            "< 200 MB",
            rss_mb < 200.0,
        ),
    ];
    println!();
    println!("{:<18} {:>12} {:>12}", "figure", "value", "bar");
    for (name, value, bar, ok) in &bars {
        let verdict = if bar.is_empty() {
            ""
        } else if *ok {
            "ok"
        } else {
            "MISSED"
        };
        println!("{name:<18} {value:>12} {bar:>12}  {verdict}");
    }
    println!(
        "({} changes; in the agent per change, median: compile {agent_compile_ms} ms, \
         compile + save + map writes {agent_apply_ms} ms; RSS now {rss_now_mb:.0} MB)",
        samples.len(),
    );

    opts.output.write(&json!({
        "benchmark": "control-plane",
        "machine": crate::machine(),
        "cluster": {
            "pods": cluster.pods.len(),
            "local_pods": cluster.local.len(),
            "namespaces": opts.namespaces,
            "policies": opts.policies,
        },
        "cold_sync_ms": ms(restart_ready),
        "cold_sync_restart_apply": {
            "entries_written": restart_apply.written,
            "apply_ms": restart_apply.elapsed_ms,
            "compile_ms": restart_apply.compile_ms,
        },
        "cold_start_with_registrations_ms": ms(cold),
        "cold_start_with_registrations_breakdown_ms": {
            "api_up": ms(api_up),
            "endpoints_registered": ms(registered),
            "applies": cold_applies.len(),
            "largest_apply_entries": first_apply.written,
            "largest_apply_ms": first_apply.elapsed_ms,
        },
        "agent_per_change_median_ms": {
            "compile": agent_compile_ms,
            "compile_save_write": agent_apply_ms,
        },
        "change_ms": { "p50": p50, "p99": p99, "max": max, "samples": samples },
        "peak_rss_mb": rss_mb,
        "rss_at_end_mb": rss_now_mb,
        "bars": {
            "cold_sync_ms": 1000, "change_p99_ms": 50, "peak_rss_mb": 200,
            "met": bars.iter().all(|b| b.3),
        },
    }))?;
    drop(client);
    drop(agent);
    drop(dirs);
    drop(node);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
