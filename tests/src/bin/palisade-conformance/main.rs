//! `palisade-conformance`: runs reachability scenarios (see
//! `shared/scenarios/FORMAT.md`) against the real agent and classifier in
//! network namespaces, and prints the report. Needs root. Usually run by
//! `cargo xtask conformance`.

mod cluster;
mod explain_check;
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
    Report, RunConfig, Scenario, ScenarioResult, load_file, scenario_paths,
};

use crate::cluster::Cluster;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SourceKind {
    /// A manifest directory the agent watches.
    Files,
    /// A real kube-apiserver (not supported by this runner yet).
    Kube,
}

#[derive(Parser, Debug)]
#[command(about = "Run Palisade reachability scenarios in network namespaces")]
struct Args {
    /// A directory of scenario files (repeat for several).
    #[arg(long = "scenarios", required = true)]
    scenarios: Vec<PathBuf>,
    /// Where the agent reads the cluster from.
    #[arg(long, value_enum, default_value = "files")]
    source: SourceKind,
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

fn run_scenario(
    scenario: &Scenario,
    config: &RunConfig,
    explained: &mut explain_check::Tally,
) -> ScenarioResult {
    let mut result = ScenarioResult::new(scenario);
    let plan = match scenario.plan(config) {
        Ok(plan) => plan,
        Err(e) => return ScenarioResult::failed(&scenario.name, &scenario.path, e.to_string()),
    };
    let mut cluster = match Cluster::start(&config.node_name) {
        Ok(c) => c,
        Err(e) => {
            result.record_error(format!("starting the cluster: {e:#}"));
            return result;
        }
    };
    let setup = plan
        .setup
        .iter()
        .try_for_each(|change| cluster.apply(change));
    if let Err(e) = setup.and_then(|()| cluster.wait_enforced()) {
        result.record_error(format!("setup: {e:#}"));
        return result;
    }
    for step in &plan.steps {
        if interrupted() {
            result.record_error("interrupted");
            return result;
        }
        let changed = step
            .changes
            .iter()
            .try_for_each(|change| cluster.apply(change));
        if let Err(e) = changed.and_then(|()| cluster.wait_enforced()) {
            result.record_error(format!("step {}: {e:#}", step.number));
            return result;
        }
        let observed = probes::run_all(&step.probes, |ep| cluster.source(ep));
        let (tally, problems) = explain_check::check(&mut cluster, &step.probes, &observed);
        explained.add(tally);
        for problem in problems {
            result.record_error(format!("step {}: {problem}", step.number));
        }
        result.record_step(step, observed);
    }
    if std::env::var_os("PALISADE_CONFORMANCE_LOG").is_some() {
        eprintln!(
            "--- agent log of {}:\n{}",
            scenario.name,
            cluster.agent_log()
        );
    }
    result
}

fn run(args: &Args) -> Result<bool> {
    if args.source == SourceKind::Kube {
        anyhow::bail!("--source kube is not supported by this runner yet; use --source files");
    }
    let started = Instant::now();
    let (scenarios, failed_loads) = load(&args.scenarios, args.filter.as_deref());
    let config = RunConfig::default();
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
        let result = run_scenario(scenario, &config, &mut explained);
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
