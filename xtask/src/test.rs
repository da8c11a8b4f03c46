//! `cargo xtask test`: builds the classifier, then runs the workspace's tests
//! (which load it into the running kernel, hence root), then, for a full run
//! (no cargo arguments), the conformance scenarios: those of `tests/scenarios`
//! and `../shared/scenarios/netpol` with the files source, then the same
//! with the kube source (a real kube-apiserver, built by `cargo xtask
//! setup`).

use anyhow::Result;

use crate::{
    build_ebpf,
    util::{self, cmd},
};

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Extra arguments for `cargo test`, after `--`
    /// (e.g. `cargo xtask test -- -p policy-agent -- --nocapture`).
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
    /// Skip the conformance scenarios after the tests.
    #[arg(long)]
    pub no_conformance: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    util::require_root("cargo xtask test")?;
    build_ebpf::run(&build_ebpf::Options::default())?;
    let mut test = cmd!(util::cargo(), "test");
    if !selects_packages(&opts.cargo_args) {
        // policy-ebpf only builds for the BPF target, so it is left out of the
        // host test run; its code is exercised through the kernel tests.
        test = test.args(["--workspace", "--exclude", build_ebpf::PACKAGE]);
    }
    test.args(&opts.cargo_args)
        .current_dir(util::workspace_root())
        .run()?;
    if opts.no_conformance || !opts.cargo_args.is_empty() {
        return Ok(());
    }
    conformance()
}

/// The scenarios with each source, with the runner built by the test run
/// above; each run's last line is `N passed, N failed[, N skipped]`
/// (scenarios). Both runs happen; the task fails if either did.
fn conformance() -> Result<()> {
    let dirs = crate::conformance::default_scenario_dirs();
    let run = |source: &str| {
        cmd!(util::cargo())
            .args(crate::conformance::runner_args(Some(source), &dirs, None))
            .current_dir(util::workspace_root())
            .run()
    };
    let files = run("files");
    let kube = run("kube");
    files.and(kube)
}

/// Whether the user picked packages (`-p`/`--package`) before any `--`: then
/// `--workspace` must not be added, as it would override their choice.
fn selects_packages(cargo_args: &[String]) -> bool {
    cargo_args
        .iter()
        .take_while(|arg| *arg != "--")
        .any(|arg| arg == "--package" || arg.starts_with("--package=") || arg.starts_with("-p"))
}

#[cfg(test)]
mod tests {
    use super::selects_packages;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn package_selection() {
        assert!(!selects_packages(&args(&[])));
        assert!(!selects_packages(&args(&["--", "-p"])));
        assert!(!selects_packages(&args(&[
            "--release",
            "--",
            "--nocapture"
        ])));
        assert!(selects_packages(&args(&["-p", "policy-agent"])));
        assert!(selects_packages(&args(&["-ppolicy-agent"])));
        assert!(selects_packages(&args(&[
            "--package=policy-agent",
            "--",
            "x"
        ])));
    }
}
