//! `palisade-demo`, run by `cargo xtask demo` (as root): Palisade on a small
//! cluster of pods in network namespaces.
//!
//! Builds the cluster of a Kubernetes manifest (default: the shop
//! microservices of `tests/demo/shop.yaml`), runs the real agent on it
//! (`policy-agent run --source files` in the node namespace, the manifest in
//! its watched directory), registers every pod through the agent's API as the
//! CNI plugin does and waits until the agent enforces them, then drives rounds
//! of allowed and denied connections while printing the agent's flows
//! (`Flows.Observe`, as `policy-agent observe --follow` prints them), until
//! Ctrl-C or `--duration`. Exits non-zero if a connection's fate differs from
//! what the policies call for, so it doubles as a smoke test. Everything it
//! creates is removed on the way out (also on Ctrl-C, errors and panics).

mod cluster;
mod follow;
mod traffic;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Parser;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use palisade_tests::agent::{self, proto};

use cluster::{Cluster, Footprint, Manifest};
use follow::Follower;

#[derive(Parser, Debug)]
#[command(
    name = "palisade-demo",
    about = "Palisade on a cluster of pods in network namespaces: the agent enforcing their \
             NetworkPolicies, real connections, the agent's flows (run as root)"
)]
struct Cli {
    /// Stop after SECS seconds (a started round finishes; at least one round
    /// runs). Default: run until Ctrl-C.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Start a round of connections every SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    interval: f64,
    /// Namespaces, Pods (with status.podIPs) and NetworkPolicies to run.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_MANIFEST)]
    manifest: PathBuf,
}

/// The shop microservices (tests/demo/shop.yaml).
const DEFAULT_MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/demo/shop.yaml");

/// Set by SIGINT, SIGTERM and SIGHUP; the main loop checks it.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(signal, &action) }.with_context(|| format!("installing {signal}"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("palisade-demo: some connections did not get the expected verdict");
            ExitCode::from(1)
        }
        Err(err) if STOP.load(Ordering::Relaxed) => {
            eprintln!("palisade-demo: interrupted: {err:#}");
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("palisade-demo: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Probe outcomes so far.
#[derive(Default)]
struct Tally {
    rounds: u32,
    probes: u32,
    unexpected: u32,
}

/// How long a connection's flows may take to come through the agent (they
/// are in its ring buffer when the probe returns; this bounds a lost one).
const FLOW_WAIT: Duration = Duration::from_secs(2);

/// Runs the demo; `Ok(false)` if a probe's outcome was not the expected one.
fn run(cli: &Cli) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("must run as root (it loads BPF programs and creates network namespaces)");
    }
    install_signal_handlers()?;
    let interval = Duration::try_from_secs_f64(cli.interval).context("--interval")?;
    let duration = cli
        .duration
        .map(Duration::try_from_secs_f64)
        .transpose()
        .context("--duration")?;

    let manifest = Manifest::read(&cli.manifest)?;
    println!("manifest: {}", cli.manifest.display());
    let mut cluster = Cluster::start(&manifest, &cli.manifest)?;
    traffic::check(&cluster)?;
    let mut follower = Follower::start(cluster.socket())?;
    print_hint(&cluster)?;
    println!(
        "\ndriving {} connections every {interval:?}, {}; the agent's flows:\n",
        traffic::PROBES.len(),
        match duration {
            Some(d) => format!("for {d:?}"),
            None => "until Ctrl-C".to_owned(),
        }
    );

    println!("{}", policy_agent::observe::header());
    // What the agent saw before the traffic (e.g. a pod's packet between its
    // registration, which attaches the classifier, and the compile that
    // programs it: dropped_unknown_endpoint, fail closed).
    catch_up(&mut cluster, &mut follower)?;
    let started = Instant::now();
    let deadline = duration.map(|d| started + d);
    let stopping = || STOP.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d);
    let mut tally = Tally::default();
    while !STOP.load(Ordering::Relaxed) {
        let round_start = Instant::now();
        tally.rounds += 1;
        println!("--- round {} ---", tally.rounds);
        for probe in traffic::PROBES {
            if STOP.load(Ordering::Relaxed) {
                break;
            }
            let seen = traffic::run(&cluster, probe)?;
            // Its flows, up to the verdict at the destination pod.
            let flowed = follower.print_until(Instant::now() + FLOW_WAIT, |flow| {
                follow::is_ingress_to(flow, seen.dst)
            })?;
            let ok = seen.matches(probe.expect);
            tally.probes += 1;
            tally.unexpected += u32::from(!ok);
            println!(
                "    {} {:<46} expected {:<7}  observed {seen}",
                if ok { "ok  " } else { "FAIL" },
                probe.describe(),
                probe.expect.to_string(),
            );
            if !flowed {
                println!("         (no flow from the agent within {FLOW_WAIT:?})");
            }
        }
        let next = round_start + interval;
        while !stopping() && Instant::now() < next {
            let slice = (Instant::now() + Duration::from_millis(100)).min(next);
            follower.print_until(slice, |_| false)?;
        }
        if stopping() {
            break;
        }
    }
    if STOP.load(Ordering::Relaxed) {
        println!("\ninterrupted");
    }
    catch_up(&mut cluster, &mut follower)?;

    summary(&mut cluster, &follower, &tally, started.elapsed())?;
    let footprint = cluster.footprint();
    println!(
        "tearing down: servers, agent (pid {}), network namespaces, {}",
        footprint.agent_pid.unwrap_or(0),
        footprint
            .paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(cluster);
    follower.finish();
    check_teardown(&footprint)?;
    Ok(tally.unexpected == 0)
}

/// How to watch the agent from another terminal.
fn print_hint(cluster: &Cluster) -> Result<()> {
    let binary = agent::binary()?;
    let socket = cluster.socket().display();
    println!("\nfrom another terminal (as root), the same flows, and why a connection is denied:");
    println!("  {} observe --socket {socket} --follow", binary.display());
    println!(
        "  {} explain --socket {socket} --from shop/front-end --to shop/catalogue-db --port 3306",
        binary.display()
    );
    Ok(())
}

/// Prints the flows the agent has counted and the stream not yet delivered
/// (within [`FLOW_WAIT`]).
fn catch_up(cluster: &mut Cluster, follower: &mut Follower) -> Result<()> {
    let deadline = Instant::now() + FLOW_WAIT;
    loop {
        let counted = sum(&cluster.metrics()?, "palisade_agent_flows_total", |_| true);
        if follower.printed >= counted || Instant::now() >= deadline {
            return Ok(());
        }
        let slice = (Instant::now() + Duration::from_millis(50)).min(deadline);
        follower.print_until(slice, |_| false)?;
    }
}

/// The value of label `key` in a Prometheus label set (`a="x",b="y"`).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// The sum of counter `name` over the label sets `keep` accepts.
fn sum(metrics: &[proto::Metric], name: &str, keep: impl Fn(&str) -> bool) -> u64 {
    metrics
        .iter()
        .filter(|m| m.name == name && keep(&m.labels))
        .map(|m| m.value.max(0.0).round() as u64)
        .sum()
}

fn summary(
    cluster: &mut Cluster,
    follower: &Follower,
    tally: &Tally,
    elapsed: Duration,
) -> Result<()> {
    println!(
        "\nsummary after {:.1}s: {} round{}, {} connections, {} as expected, {} not",
        elapsed.as_secs_f64(),
        tally.rounds,
        if tally.rounds == 1 { "" } else { "s" },
        tally.probes,
        tally.probes - tally.unexpected,
        tally.unexpected
    );
    let metrics = cluster.metrics()?;
    let flows = |key: &str, value: &str| {
        sum(&metrics, "palisade_agent_flows_total", |l| {
            label(l, key) == Some(value)
        })
    };
    // A connection gets a verdict at each pod it leaves or enters.
    println!(
        "  the agent's palisade_agent_flows_total: {} allowed, {} denied ({} at a pod's egress, \
         {} at its ingress)",
        flows("verdict", "allowed"),
        flows("verdict", "denied"),
        flows("direction", "egress"),
        flows("direction", "ingress"),
    );
    let mut blocked: Vec<(String, u64)> = metrics
        .iter()
        .filter(|m| m.name == "palisade_agent_blocked_connections_total" && m.value > 0.0)
        .map(|m| {
            let protocol = label(&m.labels, "protocol").unwrap_or("?");
            let port = label(&m.labels, "port").unwrap_or("?");
            let what = match port {
                "none" => format!("{protocol} (no port)"),
                port => format!("{protocol}/{port}"),
            };
            (what, m.value.round() as u64)
        })
        .collect();
    // By port number.
    blocked.sort_by_key(|(what, _)| {
        let (protocol, port) = what.split_once('/').unwrap_or((what, ""));
        (protocol.to_owned(), port.parse::<u32>().unwrap_or(u32::MAX))
    });
    println!(
        "  palisade_agent_blocked_connections_total: {}",
        if blocked.is_empty() {
            "none".to_owned()
        } else {
            blocked
                .iter()
                .map(|(what, n)| format!("{what} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let lost = |at: &str| {
        sum(&metrics, "palisade_agent_flow_events_lost_total", |l| {
            label(l, "at") == Some(at)
        })
    };
    println!(
        "  palisade_agent_flow_events_lost_total: {} in the kernel, {} by observers; \
         {} flows printed here",
        lost("kernel"),
        lost("observer"),
        follower.printed
    );
    Ok(())
}

/// Fails if anything the demo created is still there.
fn check_teardown(footprint: &Footprint) -> Result<()> {
    let prefix = format!("{}-", cluster::PREFIX);
    let mut left: Vec<String> = palisade_tests::netns::list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns {n}"))
        .collect();
    if let Some(pid) = footprint.agent_pid
        && std::path::Path::new(&format!("/proc/{pid}")).exists()
    {
        left.push(format!("agent process {pid}"));
    }
    for path in &footprint.paths {
        if path.exists() {
            left.push(path.display().to_string());
        }
    }
    if !left.is_empty() {
        anyhow::bail!("left behind: {}", left.join(", "));
    }
    println!("teardown complete: nothing left behind");
    Ok(())
}
