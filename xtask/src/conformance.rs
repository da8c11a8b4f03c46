//! `cargo xtask conformance`: builds the classifier, then runs
//! `palisade-conformance` (tests/src/bin/palisade-conformance) as root on the
//! reachability scenarios: by default `tests/scenarios` and, when present,
//! `../shared/scenarios/netpol` (relative to the workspace root). The agent
//! reads a real kube-apiserver when `cargo xtask setup` has built one, a
//! manifest directory otherwise (`--source` picks).

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{
    build_ebpf,
    util::{self, cmd},
};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// A directory of scenario files (repeat for several; default:
    /// tests/scenarios and ../shared/scenarios/netpol when present).
    #[arg(long = "scenarios", value_name = "DIR")]
    pub scenarios: Vec<PathBuf>,
    /// Where the agent reads the cluster from: `files` or `kube` (default:
    /// kube when a kube-apiserver and etcd are available, else files).
    #[arg(long, value_parser = ["files", "kube"])]
    pub source: Option<String>,
    /// Run only scenarios whose name or file name contains NAME.
    #[arg(long, value_name = "NAME")]
    pub filter: Option<String>,
}

/// The scenario directories to run.
fn scenario_dirs(opts: &Options) -> Result<Vec<PathBuf>> {
    if !opts.scenarios.is_empty() {
        // Absolute, since the runner starts in the workspace root.
        let cwd = std::env::current_dir().context("current directory")?;
        return Ok(opts.scenarios.iter().map(|d| cwd.join(d)).collect());
    }
    let dirs = default_scenario_dirs();
    if dirs.is_empty() {
        bail!("no scenario directory found: pass --scenarios DIR");
    }
    Ok(dirs)
}

/// `tests/scenarios` and `../shared/scenarios/netpol`, those that exist
/// (a missing one is said on stderr).
pub fn default_scenario_dirs() -> Vec<PathBuf> {
    let root = util::workspace_root();
    let mut dirs = Vec::new();
    for dir in [
        root.join("tests/scenarios"),
        root.join("../shared/scenarios/netpol"),
    ] {
        match dir.canonicalize() {
            Ok(dir) if dir.is_dir() => dirs.push(dir),
            _ => eprintln!("conformance: {} not found, skipped", dir.display()),
        }
    }
    dirs
}

/// The arguments of `cargo` that run the runner on `dirs`.
pub fn runner_args(source: Option<&str>, dirs: &[PathBuf], filter: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--quiet",
        "--package",
        "palisade-tests",
        "--bin",
        "palisade-conformance",
        "--",
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(source) = source {
        args.extend(["--source".to_owned(), source.to_owned()]);
    }
    for dir in dirs {
        args.push("--scenarios".into());
        args.push(dir.display().to_string());
    }
    if let Some(filter) = filter {
        args.extend(["--filter".to_owned(), filter.to_owned()]);
    }
    args
}

pub fn run(opts: &Options) -> Result<()> {
    util::require_root("cargo xtask conformance")?;
    let dirs = scenario_dirs(opts)?;
    build_ebpf::run(&build_ebpf::Options::default())?;
    let args = runner_args(opts.source.as_deref(), &dirs, opts.filter.as_deref());
    eprintln!("$ {}", cmd!(util::cargo()).args(&args));
    // Replace this process so that Ctrl-C reaches the runner, which tears
    // its namespaces and agent down; its exit status is ours.
    let err = Command::new(util::cargo())
        .args(&args)
        .current_dir(util::workspace_root())
        .exec();
    Err(err).context("cannot run cargo")
}
