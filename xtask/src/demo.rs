//! `cargo xtask demo`: builds the classifier and the agent, then runs
//! `palisade-demo` (tests/src/bin/palisade-demo): the shop microservices in
//! network namespaces, the agent (`policy-agent run`) enforcing their
//! NetworkPolicies, allowed and denied connections and the agent's flows,
//! until Ctrl-C or `--duration`.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{
    build_ebpf,
    util::{self, cmd},
};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Arguments for palisade-demo, after `--` (e.g. `-- --duration 15`;
    /// `-- --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    util::require_root("cargo xtask demo")?;
    build_ebpf::run(&build_ebpf::Options::default())?;
    // The demo runs this binary (it builds it too, quietly: this shows the
    // progress of a first build).
    cmd!(
        util::cargo(),
        "build",
        "--package",
        "policy-agent",
        "--bin",
        "policy-agent"
    )
    .current_dir(util::workspace_root())
    .run()?;
    let mut args: Vec<String> = [
        "run",
        "--quiet",
        "--package",
        "palisade-tests",
        "--bin",
        "palisade-demo",
        "--",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(opts.args.iter().cloned());
    eprintln!("$ {}", cmd!(util::cargo()).args(&args));
    // Replace this process (as `cargo run` replaces itself with the demo), so
    // that Ctrl-C reaches the demo alone: it tears its cluster down and prints
    // its summary before the shell prompt comes back, and its exit status is
    // ours.
    let err = Command::new(util::cargo())
        .args(&args)
        .current_dir(util::workspace_root())
        .exec();
    Err(err).context("cannot run cargo")
}
