//! `palisade-conformance`: runs reachability scenarios (see
//! `shared/scenarios/FORMAT.md`) against the real agent and classifier in
//! network namespaces, pods attached through the real CNI chain, and
//! prints the report. The agent reads a manifest directory (`--source
//! files`) or a real kube-apiserver (`--source kube`, one for the whole
//! run; the default when `cargo xtask setup` has built one). Needs root.
//! Usually run by `cargo xtask conformance`.

mod cluster;
mod explain_check;
mod pod_network;
mod policy_source;
mod probes;
mod services;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use palisade_tests::conformance::{
    Change, Plan, Report, RunConfig, Scenario, ScenarioResult, load_file, scenario_paths,
    server_support,
};
use palisade_tests::kube::{etcd_binary, kube_apiserver_binary};

use crate::cluster::{Cluster, SourceFor};
use crate::policy_source::files::ManifestDir;
use crate::policy_source::kube::KubeApi;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SourceKind {
    /// A manifest directory the agent watches.
    Files,
    /// A real kube-apiserver (built by `cargo xtask setup`).
    Kube,
}

#[derive(Parser, Debug)]
#[command(about = "Run Palisade reachability scenarios in network namespaces")]
struct Args {
    /// A directory of scenario files (repeat for several).
    #[arg(long = "scenarios", required = true)]
    scenarios: Vec<PathBuf>,
    /// Where the agent reads the cluster from (default: kube when a
    /// kube-apiserver and etcd are available, else files).
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// Run only scenarios whose name or file name contains this.
    #[arg(long)]
    filter: Option<String>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Ctrl-C and SIGTERM only set a flag: the run stops at the next step and
/// every cluster is torn down by its `Drop`.
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Every scenario file of `dirs`, loaded one by one: a bad file is a failed
/// result, not the end of the run.
fn load(dirs: &[PathBuf], filter: Option<&str>) -> (Vec<Scenario>, Vec<ScenarioResult>) {
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for dir in dirs {
        let paths = match scenario_paths(dir) {
            Ok(paths) => paths,
            Err(e) => {
                bad.push(ScenarioResult::failed(
                    dir.display().to_string(),
                    dir,
                    e.to_string(),
                ));
                continue;
            }
        };
        for path in paths {
            let file = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            match load_file(&path) {
                Ok(s) => {
                    if filter.is_none_or(|f| s.name.contains(f) || file.contains(f)) {
                        good.push(s);
                    }
                }
                Err(e) if filter.is_none_or(|f| file.contains(f)) => {
                    bad.push(ScenarioResult::failed(file, &path, e.to_string()));
                }
                Err(_) => {}
            }
        }
    }
    (good, bad)
}

/// The default source: kube when its binaries are there; else files, and
/// why.
fn default_source() -> (SourceKind, Option<String>) {
    match (kube_apiserver_binary(), etcd_binary()) {
        (Ok(_), Ok(_)) => (SourceKind::Kube, None),
        (Err(e), _) | (_, Err(e)) => (SourceKind::Files, Some(format!("{e:#}"))),
    }
}

/// Carries out `changes` in order, stopping at the first error or when
/// interrupted.
fn apply_all(cluster: &mut Cluster, changes: &[Change]) -> Result<()> {
    for change in changes {
        if interrupted() {
            anyhow::bail!("interrupted");
        }
        cluster.apply(change)?;
    }
    Ok(())
}

/// The setup and the steps of `plan` on `cluster`, recorded in `result`;
/// stops at the first error.
fn run_plan(
    cluster: &mut Cluster,
    plan: &Plan,
    result: &mut ScenarioResult,
    explained: &mut explain_check::Tally,
) {
    let setup = apply_all(cluster, &plan.setup);
    if let Err(e) = setup.and_then(|()| cluster.wait_enforced()) {
        result.record_error(format!("setup: {e:#}"));
        return;
    }
    for step in &plan.steps {
        let changed = apply_all(cluster, &step.changes);
        if let Err(e) = changed.and_then(|()| cluster.wait_enforced()) {
            result.record_error(format!("step {}: {e:#}", step.number));
            return;
        }
        let node = cluster.node_addresses();
        let observed = probes::run_all(&step.probes, node, |ep| cluster.source(ep));
        let (tally, problems) = explain_check::check(cluster, &step.probes, &observed);
        explained.add(tally);
        for problem in problems {
            result.record_error(format!("step {}: {problem}", step.number));
        }
        result.record_step(step, observed);
    }
}

fn run_scenario(
    scenario: &Scenario,
    config: &RunConfig,
    source: &SourceFor<'_>,
    explained: &mut explain_check::Tally,
) -> ScenarioResult {
    let mut result = ScenarioResult::new(scenario);
    let plan = match scenario.plan(config) {
        Ok(plan) => plan,
        Err(e) => return ScenarioResult::failed(&scenario.name, &scenario.path, e.to_string()),
    };
    let mut cluster = match Cluster::start(config, source) {
        Ok(c) => c,
        Err(e) => {
            result.record_error(format!("starting the cluster: {e:#}"));
            return result;
        }
    };
    run_plan(&mut cluster, &plan, &mut result, explained);
    if std::env::var_os("PALISADE_CONFORMANCE_LOG").is_some() {
        eprintln!(
            "--- agent log of {}:\n{}",
            scenario.name,
            cluster.agent_log()
        );
    }
    for problem in cluster.tear_down() {
        result.record_error(format!("teardown: {problem}"));
    }
    result
}

fn run(args: &Args) -> Result<bool> {
    let started = Instant::now();
    let (scenarios, failed_loads) = load(&args.scenarios, args.filter.as_deref());
    let config = RunConfig::default();
    let (source, why) = match args.source {
        Some(source) => (source, None),
        None => default_source(),
    };
    let kube = match source {
        SourceKind::Files => {
            match why {
                Some(why) => eprintln!("source: files, as there is no kube-apiserver: {why}"),
                None => eprintln!("source: files (a manifest directory per scenario)"),
            }
            None
        }
        SourceKind::Kube if scenarios.is_empty() => None,
        SourceKind::Kube => {
            let api = KubeApi::start(&config.node_name, &config.node_ips)?;
            eprintln!(
                "source: kube (kube-apiserver {} at {}, ready after {:.1}s; endPort {})",
                api.version(),
                api.url(),
                started.elapsed().as_secs_f64(),
                if api.support().end_port {
                    "kept"
                } else {
                    "dropped: scenarios using it are skipped"
                }
            );
            Some(api)
        }
    };
    let mut report = Report::default();
    let mut explained = explain_check::Tally::default();
    for result in failed_loads {
        report.push(result);
    }
    for scenario in &scenarios {
        if interrupted() {
            break;
        }
        let t = Instant::now();
        let result = match &kube {
            None => run_scenario(
                scenario,
                &config,
                &|dirs| Box::new(ManifestDir::new(dirs.manifests.clone())),
                &mut explained,
            ),
            Some(api) => match server_support::unsupported_by(scenario, api.support()) {
                Some(reason) => ScenarioResult::skipped(scenario, reason),
                None => run_scenario(
                    scenario,
                    &config,
                    &|_| Box::new(api.scenario()),
                    &mut explained,
                ),
            },
        };
        eprintln!(
            "{}: {:?} in {:.1}s",
            scenario.name,
            result.status(),
            t.elapsed().as_secs_f64()
        );
        report.push(result);
    }
    eprintln!(
        "explain: {} cells agree with the expected verdict, {} do not, {} not asked (service destinations, skipped probes)",
        explained.agreed, explained.disagreed, explained.not_asked
    );
    print!("{}", report.render());
    eprintln!("wall time {:.1}s", started.elapsed().as_secs_f64());
    if interrupted() {
        eprintln!("interrupted: the remaining scenarios were not run");
        return Ok(false);
    }
    Ok(report.success())
}

fn main() -> ExitCode {
    install_signal_handlers();
    let args = Args::parse();
    if let Some(missing) = args.scenarios.iter().find(|d| !Path::new(d).is_dir()) {
        eprintln!("error: {} is not a directory", missing.display());
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
