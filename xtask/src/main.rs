//! `cargo xtask`: the one entry point for work around the code.
//!
//! Adding a subcommand: write `src/<name>.rs` with an `Options` struct
//! (`#[derive(clap::Args)]`) and a `pub fn run(&Options) -> anyhow::Result<()>`,
//! add a `mod` line, a variant to [`Command`] and an arm to the `match` in
//! [`main`].

mod bench;
mod build_ebpf;
mod conformance;
mod demo;
mod kube_apiserver;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Palisade development tasks",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install what building, loading and testing the BPF programs needs
    /// (Debian packages, nightly + rust-src, bpf-linker, bpffs). Idempotent.
    Setup(setup::Options),
    /// Build the TC classifier (policy-ebpf) for bpfel-unknown-none.
    BuildEbpf(build_ebpf::Options),
    /// Build the classifier, then run `cargo test` on the workspace (as root).
    Test(test::Options),
    /// Build the classifier and run it on the shop microservices in network
    /// namespaces: allowed and denied connections, the flow log (as root).
    Demo(demo::Options),
    /// Run a benchmark and print its figures (`datapath`; `--json FILE` to save them).
    Bench(bench::Options),
    /// Build the classifier and run the reachability scenarios against the
    /// real agent in network namespaces (as root).
    Conformance(conformance::Options),
}

fn main() -> ExitCode {
    util::forget_package_variables();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Setup(opts) => setup::run(opts),
        Command::BuildEbpf(opts) => build_ebpf::run(opts).map(drop),
        Command::Test(opts) => test::run(opts),
        Command::Demo(opts) => demo::run(opts),
        Command::Bench(opts) => bench::run(opts),
        Command::Conformance(opts) => conformance::run(opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // Exit like the failing command did (e.g. `cargo test`'s status).
            let code = err
                .chain()
                .find_map(|cause| cause.downcast_ref::<util::CommandFailed>())
                .and_then(|failed| failed.code)
                .and_then(|code| u8::try_from(code).ok())
                .filter(|&code| code != 0)
                .unwrap_or(1);
            ExitCode::from(code)
        }
    }
}
