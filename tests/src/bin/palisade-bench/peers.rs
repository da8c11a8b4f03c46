//! `bench peers`: Palisade side by side with no filter and with iptables +
//! ipset enforcement in kube-router's layout, as the number of
//! NetworkPolicies selecting the server grows.
//!
//! A client and a server pod (network namespaces joined to a node namespace
//! by veths, routed there, as the CNI chain makes them: the harness's
//! [`Topology`]). For each policy count the three enforcers take turns, A B
//! C A B C…, so that drift hits all alike:
//!
//! * A: nothing in the node namespace;
//! * B: Palisade's classifier on both host veths, maps compiled from the
//!   scenario's NetworkPolicies ([`palisade`]);
//! * C: the same policies as iptables rules and ipsets in kube-router's
//!   layout ([`kuberouter`]), loaded with one `iptables-restore` for the
//!   turn and removed after it ([`iptables`]).
//!
//! Each turn checks enforcement (a port no policy allows must be blocked
//! when policies select the server), then measures new connections per
//! second, transactions per second on one connection and bulk throughput
//! ([`workload`]). Medians, ratios and the bar are in [`report`].
//!
//! Everything created is removed on the way out, also after an error or
//! Ctrl-C: the pin directory (maps, links), the iptables table and ipsets,
//! the namespaces. Leftovers of a killed run are removed at start.

mod iptables;
mod kuberouter;
mod palisade;
mod report;
mod scenario;
mod workload;

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use palisade_tests::netns::{ProbeResult, TcpServer, Topology, cleanup_prefix, tcp_probe};
use policy_common::Reason;
use serde_json::json;

use crate::Output;
use iptables::{Backend, Iptables};
use palisade::{Endpoint, FlowReading, Palisade};
use report::{Mode, Setup, Turn};

/// Prefix of the namespaces and veths.
const PREFIX: &str = "pbpeer";

#[derive(clap::Args)]
pub struct Options {
    /// NetworkPolicies selecting the server, one block of turns per value.
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 100, 1000, 10000])]
    policies: Vec<usize>,
    /// Turns of each enforcer per policy count (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per measurement of connections and of transactions.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Seconds per throughput measurement: longer, because bulk throughput
    /// swings most from second to second on a shared VM (13-21 Gbit/s between
    /// turns of the same enforcer at 3 s).
    #[arg(long, default_value_t = 5)]
    stream_seconds: u64,
    /// The iptables to compare with.
    #[arg(long, value_enum, default_value_t = Backend::Nft)]
    iptables: Backend,
    /// How the flow-event reader waits: drain on a timer, or sleep in poll().
    #[arg(long, value_enum, default_value_t = FlowReading::Batch)]
    flow_reader: FlowReading,
    #[command(flatten)]
    output: Output,
}

/// Set by SIGINT, SIGTERM and SIGHUP.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Fails once a stop was requested, so the benchmark unwinds and cleans up.
pub fn check_stop() -> Result<()> {
    if stopped() {
        bail!("interrupted");
    }
    Ok(())
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

/// CPU vulnerabilities and their mitigations, as the kernel reports them.
fn vulnerabilities() -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu/vulnerabilities") {
        let mut entries: Vec<_> = dir.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let value = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                value.trim().into(),
            );
        }
    }
    out
}

/// The running benchmark: everything it created, dropped in field order.
struct Bench {
    opts_seconds: u64,
    stream_seconds: u64,
    started: Instant,
    _iperf: workload::Spawned,
    _denied: TcpServer,
    echo: workload::EchoServer,
    palisade: Palisade,
    topo: Topology,
}

impl Bench {
    fn start(opts: &Options) -> Result<Self> {
        let started = Instant::now();
        if palisade::remove_stale_pins()? {
            println!("removed {} left by an earlier run", palisade::PIN_DIR);
        }
        let stale = cleanup_prefix(PREFIX)?;
        if !stale.is_empty() {
            println!(
                "removed namespaces left by an earlier run: {}",
                stale.join(", ")
            );
        }
        let mut topo = Topology::new(PREFIX).context("creating the node namespace")?;
        let mut endpoints = Vec::new();
        for (object, ip) in [
            (scenario::client_ref(), scenario::CLIENT_IP),
            (scenario::server_ref(), scenario::SERVER_IP),
        ] {
            let pod = topo.add_pod(&object.name, ip, None)?;
            endpoints.push(Endpoint {
                host_ifname: pod.host_ifname.clone(),
                local: policy_agent::compile::LocalEndpoint {
                    ifindex: pod.host_ifindex,
                    endpoint_id: endpoints.len() as u32 + 1,
                },
                object,
            });
        }
        let client = &topo.pod("client").netns;
        client.set_sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        let server = &topo.pod("server").netns;
        let echo = workload::EchoServer::start(server, scenario::ECHO_PORT, 2)?;
        let unspecified = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        let denied = TcpServer::start(server, unspecified, scenario::DENIED_PORT)?;
        let iperf = workload::iperf3_server(server, scenario::IPERF_PORT)?;
        println!(
            "topology: namespaces {PREFIX}-node, {PREFIX}-client ({}), {PREFIX}-server ({}); \
             host veths {}",
            scenario::CLIENT_IP,
            scenario::SERVER_IP,
            endpoints
                .iter()
                .map(|e| e.host_ifname.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let palisade = Palisade::load(endpoints, opts.flow_reader)?;
        Ok(Self {
            opts_seconds: opts.seconds,
            stream_seconds: opts.stream_seconds,
            started,
            _iperf: iperf,
            _denied: denied,
            echo,
            palisade,
            topo,
        })
    }

    fn progress(&self, what: &str) {
        println!("[{:>4}s] {what}", self.started.elapsed().as_secs());
    }

    fn dst(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(scenario::SERVER_IP, port)
    }

    /// The port no policy allows must be blocked exactly when a policy
    /// selects the server and something enforces.
    fn check_enforcement(&self, mode: Mode, policies: usize) -> Result<()> {
        let client = &self.topo.pod("client").netns;
        let expect_open = mode == Mode::None || policies == 0;
        let dst = std::net::SocketAddr::V4(Self::dst(scenario::DENIED_PORT));
        let result = tcp_probe(
            client,
            dst,
            Duration::from_millis(if expect_open { 2000 } else { 300 }),
        );
        let open = result == ProbeResult::Open;
        if open != expect_open {
            bail!(
                "{} with {policies} policies: client -> server:{} gave {result}, expected {}",
                mode.name(),
                scenario::DENIED_PORT,
                if expect_open { "open" } else { "blocked" }
            );
        }
        Ok(())
    }

    /// One turn's three measurements, after a short warm-up.
    fn measure(&self, mode: Mode, policies: usize) -> Result<Turn> {
        self.check_enforcement(mode, policies)?;
        let client = &self.topo.pod("client").netns;
        let echo = Self::dst(scenario::ECHO_PORT);
        let warm = workload::crr(client, echo, Duration::from_millis(300))?;
        if warm.ops == 0 || warm.errors > 0 {
            bail!(
                "{} with {policies} policies: warm-up made {} connections, {} failed",
                mode.name(),
                warm.ops,
                warm.errors
            );
        }
        let d = Duration::from_secs(self.opts_seconds);
        let crr = workload::crr(client, echo, d)?;
        let rr = workload::rr(client, echo, d)?;
        let stream =
            workload::stream(client, Self::dst(scenario::IPERF_PORT), self.stream_seconds)?;
        Ok(Turn {
            policies,
            mode,
            crr,
            rr,
            stream,
        })
    }

    /// Every turn for one policy count.
    fn policy_count(&mut self, opts: &Options, n: usize, turns: &mut Vec<Turn>) -> Result<Setup> {
        let mut setup = Setup {
            policies: n,
            ..Setup::default()
        };
        let state = scenario::build(n)?;
        let programmed = self.palisade.program(&state, scenario::NODE_NAME)?;
        setup.compile = programmed.compile;
        setup.map_write = programmed.write;
        setup.policy_keys = programmed.policy_keys;
        setup.peer_ips = programmed.peer_ips;
        self.progress(&format!(
            "{n} policies: palisade compiled in {:.2}s, {} entries written in {:.2}s ({} policy keys, {} peer addresses)",
            programmed.compile.as_secs_f64(),
            programmed.written,
            programmed.write.as_secs_f64(),
            programmed.policy_keys,
            programmed.peer_ips
        ));
        let start = Instant::now();
        let ruleset =
            kuberouter::generate(&state, &[scenario::client_ref(), scenario::server_ref()])?;
        setup.generate = start.elapsed();
        setup.chains = ruleset.chains;
        setup.rules = ruleset.rules;
        setup.ipsets = ruleset.set_names.len();
        let mut ipt = Iptables::new(self.topo.node_ns(), opts.iptables);
        self.progress(&format!(
            "{n} policies: iptables ruleset {} chains, {} rules, {} ipsets",
            ruleset.chains, ruleset.rules, setup.ipsets,
        ));
        let (events0, lost0) = self.palisade.events()?;
        for run in 1..=opts.runs {
            for mode in Mode::ALL {
                check_stop()?;
                let turn = match mode {
                    Mode::None => self.measure(mode, n)?,
                    Mode::Palisade => {
                        self.palisade.clear_conntrack()?;
                        let before = self.palisade.packets(Reason::AllowedByPolicy)?;
                        self.palisade.attach(self.topo.node_ns())?;
                        let turn = self.measure(mode, n);
                        self.palisade.detach()?;
                        let turn = turn?;
                        let judged = self.palisade.packets(Reason::AllowedByPolicy)? - before;
                        if n > 0 && judged < turn.crr.ops {
                            bail!(
                                "palisade allowed {judged} connections by policy, fewer than the {} made",
                                turn.crr.ops
                            );
                        }
                        turn
                    }
                    Mode::Iptables => {
                        let sets = ipt.load_sets(&ruleset)?;
                        setup.ipset_loads.push(sets);
                        let load = ipt.load_rules(&ruleset)?;
                        setup.iptables_loads.push(load);
                        let turn = self.measure(mode, n);
                        setup.conntrack_peak = setup
                            .conntrack_peak
                            .max(iptables::conntrack_count(self.topo.node_ns()));
                        ipt.unload_rules()?;
                        ipt.destroy_sets()?;
                        iptables::flush_conntrack(self.topo.node_ns())?;
                        let turn = turn?;
                        self.progress(&format!(
                            "  ipset restore took {:.2}s, iptables-restore {:.2}s",
                            sets.as_secs_f64(),
                            load.as_secs_f64()
                        ));
                        turn
                    }
                };
                self.progress(&format!(
                    "{n} policies, run {run}/{}: {:<9} {:>8.0} conn/s  {:>8.0} trans/s  {:>6.1} Gbit/s{}",
                    opts.runs,
                    mode.name(),
                    turn.crr.rate(),
                    turn.rr.rate(),
                    turn.stream.rate() / 1e9,
                    if turn.crr.errors + turn.rr.errors > 0 {
                        format!("  ({} errors)", turn.crr.errors + turn.rr.errors)
                    } else {
                        String::new()
                    }
                ));
                turns.push(turn);
            }
        }
        let (events, lost) = self.palisade.events()?;
        setup.flow_events = events - events0;
        setup.events_lost = lost - lost0;
        Ok(setup)
    }
}

pub fn run(opts: &Options) -> Result<()> {
    install_signal_handlers()?;
    let wall = Instant::now();
    let machine = crate::machine();
    let vulns = vulnerabilities();
    println!(
        "machine: {} ({} vCPU), kernel {}",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["kernel"].as_str().unwrap_or("?")
    );
    let background = workload::background_busy(Duration::from_secs(1));
    println!(
        "background load before start: {:.1}% of the CPUs busy",
        background * 100.0
    );
    println!(
        "plan: policies {:?}, {} turns of each enforcer per count (A B C order), {} s per measurement \
         ({} s for throughput), each connection on one CPU, iptables backend {}, flow-event reader {}",
        opts.policies,
        opts.runs,
        opts.seconds,
        opts.stream_seconds,
        opts.iptables.name(),
        opts.flow_reader.name()
    );
    for &n in &opts.policies {
        if n > scenario::MAX_POLICIES {
            bail!("at most {} policies", scenario::MAX_POLICIES);
        }
    }

    let mut turns = Vec::new();
    let mut setups = Vec::new();
    let (mut accepted, mut off_cpu) = (0, 0);
    let outcome = (|| -> Result<()> {
        let mut bench = Bench::start(opts)?;
        for &n in &opts.policies {
            setups.push(bench.policy_count(opts, n, &mut turns)?);
        }
        let placement = bench.echo.placement();
        accepted = placement.accepted.load(Ordering::Relaxed);
        off_cpu = placement.off_cpu.load(Ordering::Relaxed);
        bench.progress(&format!(
            "connections accepted: {accepted}, handled off the CPU that opened them: {off_cpu}"
        ));
        bench.progress("tearing down");
        Ok(())
    })();
    // Whatever was built has been dropped, i.e. removed, by now.
    let left = cleanup_prefix(PREFIX)?;
    if !left.is_empty() || std::path::Path::new(palisade::PIN_DIR).exists() {
        bail!(
            "teardown left {left:?} or {} behind (removed now)",
            palisade::PIN_DIR
        );
    }
    println!("teardown complete: namespaces, links, maps, iptables table and ipsets removed");
    outcome?;

    let mut summaries = Vec::new();
    for &n in &opts.policies {
        for mode in Mode::ALL {
            summaries.push(report::summarize(&turns, n, mode));
        }
    }
    println!();
    println!(
        "medians of {} runs; CPU us/conn: whole machine / this process (client and server threads, flow-event reader)",
        opts.runs
    );
    report::print_table(&summaries);
    println!();
    let rows = report::ratios(&summaries, &opts.policies);
    report::print_ratios(&rows);
    println!();
    let bar = report::bar(&rows);
    let wall = wall.elapsed();
    println!("wall time: {:.0}s", wall.as_secs_f64());
    opts.output.write(&json!({
        "bench": "peers",
        "machine": machine,
        "vulnerabilities": vulns,
        "background_busy_fraction": background,
        "options": {
            "policies": opts.policies, "runs": opts.runs, "seconds": opts.seconds,
            "stream_seconds": opts.stream_seconds,
            "crr_clients_per_cpu": 1, "iptables": opts.iptables.name(),
            "flow_reader": opts.flow_reader.name(),
            "message_bytes": workload::MSG,
        },
        "setup": setups.iter().map(report::setup_json).collect::<Vec<_>>(),
        "results": summaries.iter().map(report::summary_json).collect::<Vec<_>>(),
        "ratios": report::ratios_json(&rows),
        "bar": bar,
        "connections_accepted": accepted,
        "connections_off_cpu": off_cpu,
        "turns": turns.iter().map(report::turn_json).collect::<Vec<_>>(),
        "wall_seconds": wall.as_secs_f64(),
    }))
}
