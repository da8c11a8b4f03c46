//! `cargo xtask bench <name>`: builds the classifier (unless
//! `PALISADE_BPF_OBJECT` names an object that exists, which the agent then
//! embeds), then runs the benchmark binary (release) with the given name and
//! arguments. Benchmarks print their figures and write them as JSON with
//! `--json FILE`.

use anyhow::Result;

use crate::{
    build_ebpf,
    util::{self, cmd},
};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Benchmark to run: `datapath`, `flows`, `peers` or `control-plane`.
    pub name: String,
    /// Arguments for the benchmark (e.g. `--json FILE`, `--entries 1,10000`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    util::require_root("cargo xtask bench")?;
    let prebuilt =
        std::env::var_os("PALISADE_BPF_OBJECT").is_some_and(|p| std::path::Path::new(&p).is_file());
    if prebuilt {
        println!("using the eBPF object named by PALISADE_BPF_OBJECT");
    } else {
        build_ebpf::run(&build_ebpf::Options::default())?;
    }
    cmd!(
        util::cargo(),
        "run",
        "--release",
        "--quiet",
        "-p",
        "palisade-tests",
        "--bin",
        "palisade-bench",
        "--"
    )
    .arg(&opts.name)
    .args(&opts.args)
    .current_dir(util::workspace_root())
    .run()
}
