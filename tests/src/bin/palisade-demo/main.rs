//! `palisade-demo`, run by `cargo xtask demo` (as root): Palisade on a small
//! cluster of pods in network namespaces.
//!
//! Builds the cluster of a Kubernetes manifest (default: the shop
//! microservices of `tests/demo/shop.yaml`), compiles its NetworkPolicies
//! into the classifier's maps, attaches the classifier to every pod's veth,
//! then drives rounds of allowed and denied connections while streaming the
//! flow log, until Ctrl-C or `--duration`. Exits non-zero if a connection's
//! fate differs from what the policies call for, so it doubles as a smoke
//! test. Everything it creates is removed on the way out (also on Ctrl-C,
//! errors and panics).

mod cluster;
mod flows;
mod traffic;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Parser;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use policy_agent::datapath::{Datapath, FlowReader};
use policy_common::Reason;

use cluster::{Cluster, Manifest};
use flows::FlowLog;

#[derive(Parser, Debug)]
#[command(
    name = "palisade-demo",
    about = "Palisade on a cluster of pods in network namespaces: policies compiled into the \
             classifier, real connections, the flow log (run as root)"
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
    let mut cluster = Cluster::start(&manifest)?;
    traffic::check(&cluster)?;
    let mut flows = FlowLog::new(FlowReader::take(&mut cluster.datapath)?, &cluster);
    println!(
        "\ndriving {} connections every {interval:?}, {}; flow log:\n",
        traffic::PROBES.len(),
        match duration {
            Some(d) => format!("for {d:?}"),
            None => "until Ctrl-C".to_owned(),
        }
    );

    println!("{}", flows::header());
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
            // The probe's own events are in the ring buffer by now.
            flows.drain();
            let ok = seen.matches(probe.expect);
            tally.probes += 1;
            tally.unexpected += u32::from(!ok);
            println!(
                "    {} {:<46} expected {:<7}  observed {seen}",
                if ok { "ok  " } else { "FAIL" },
                probe.describe(),
                probe.expect.to_string(),
            );
        }
        let next = round_start + interval;
        while !stopping() && Instant::now() < next {
            flows.wait(Duration::from_millis(50));
        }
        if stopping() {
            break;
        }
    }
    flows.drain();
    if STOP.load(Ordering::Relaxed) {
        println!("\ninterrupted");
    }

    summary(&mut cluster.datapath, &flows, &tally, started.elapsed())?;
    println!(
        "tearing down: servers, classifier, network namespaces, {}",
        cluster::PIN_DIR
    );
    drop(flows);
    drop(cluster);
    check_teardown()?;
    Ok(tally.unexpected == 0)
}

fn summary(dp: &mut Datapath, flows: &FlowLog, tally: &Tally, elapsed: Duration) -> Result<()> {
    println!(
        "\nsummary after {:.1}s: {} round{}, {} connections, {} as expected, {} not",
        elapsed.as_secs_f64(),
        tally.rounds,
        if tally.rounds == 1 { "" } else { "s" },
        tally.probes,
        tally.probes - tally.unexpected,
        tally.unexpected
    );
    let totals = dp.verdict_totals()?;
    let packets = |wanted: &[Reason]| -> u64 {
        totals
            .iter()
            .filter(|(r, _)| wanted.contains(r))
            .map(|(_, c)| c.packets)
            .sum()
    };
    // A connection gets one verdict at each endpoint it crosses (egress at its
    // source pod, ingress at its destination pod).
    println!(
        "  connection verdicts (one per pod a connection leaves or enters): {} allowed, {} denied",
        packets(&[
            Reason::AllowedByPolicy,
            Reason::AllowedNotIsolated,
            Reason::AllowedFromNode
        ]),
        packets(&[Reason::DeniedByPolicy])
    );
    let counters: Vec<String> = totals
        .iter()
        .filter(|(_, c)| c.packets > 0)
        .map(|(r, c)| format!("{} {}", r.as_str(), c.packets))
        .collect();
    println!("  packets by reason: {}", counters.join(", "));
    println!(
        "  flow events: {} printed, {} lost",
        flows.printed,
        dp.events_lost()?
    );
    Ok(())
}

/// Says whether anything the demo created is still there.
fn check_teardown() -> Result<()> {
    let prefix = format!("{}-", cluster::PREFIX);
    let mut left: Vec<String> = palisade_tests::netns::list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns {n}"))
        .collect();
    if std::path::Path::new(cluster::PIN_DIR).exists() {
        left.push(cluster::PIN_DIR.to_owned());
    }
    if left.is_empty() {
        println!("teardown complete: nothing left behind");
    } else {
        eprintln!("palisade-demo: left behind: {}", left.join(", "));
    }
    Ok(())
}
