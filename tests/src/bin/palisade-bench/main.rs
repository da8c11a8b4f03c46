//! Palisade benchmarks, run by `cargo xtask bench <name>`. Each prints a table
//! and can write its figures as JSON.

mod control_plane;
mod datapath;
mod flows;
mod peers;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "palisade-bench", about = "Palisade benchmarks (run as root)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// The classifier in the kernel via BPF_PROG_TEST_RUN: ns per packet by path.
    Datapath(datapath::Options),
    /// Flow events through the agent's pipeline at growing rates: decoded per second, lost.
    Flows(flows::Options),
    /// Palisade against no filter and iptables+ipset (kube-router layout) between two pods, as policies grow.
    Peers(peers::Options),
    /// The agent on a 10,000-pod cluster from files: cold sync, label change to enforcement, peak RSS.
    ControlPlane(control_plane::Options),
}

/// Where to write the figures, shared by every benchmark.
#[derive(clap::Args, Clone)]
pub struct Output {
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl Output {
    pub fn write(&self, value: &serde_json::Value) -> Result<()> {
        if let Some(path) = &self.json {
            std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")?;
            println!("figures written to {}", path.display());
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Datapath(opts) => datapath::run(&opts),
        Bench::Peers(opts) => peers::run(&opts),
        Bench::Flows(opts) => flows::run(&opts),
        Bench::ControlPlane(opts) => control_plane::run(&opts),
    }
}

/// Kernel release and CPU model, printed with every figure.
pub fn machine() -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    serde_json::json!({
        "kernel": kernel.trim(),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}
