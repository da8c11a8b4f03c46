//! `palisade-cni`: Palisade's chained CNI plugin, and its node install.
//!
//! * Run by a container runtime (CNI_COMMAND set, no arguments): one CNI
//!   command, see `policy_agent::cni`.
//! * `palisade-cni install --conf-dir DIR --bin-dir DIR`: copies itself into
//!   the CNI binary directory and chains itself last into the node's
//!   network configuration (the DaemonSet's init container).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use policy_agent::api::DEFAULT_SOCKET;
use policy_agent::cni::{self, install};

#[derive(Parser, Debug)]
#[command(
    name = "palisade-cni",
    version,
    about = "Palisade's chained CNI plugin (run by the container runtime with CNI_COMMAND set) \
             and its node install"
)]
struct Cli {
    #[command(subcommand)]
    command: CliCommand,
}

#[derive(Subcommand, Debug)]
enum CliCommand {
    /// Copy the plugin into the CNI binary directory and add it as the last
    /// plugin of the node's network configuration (idempotent; keeps a
    /// backup of the original).
    Install(InstallArgs),
}

#[derive(Args, Debug)]
struct InstallArgs {
    /// The runtime's network configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The runtime's CNI binary directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The plugin binary to copy (default: this executable).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// The agent's API socket, as the plugin (on the host) sees it.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: String,
    /// How long ADD may wait for the agent to confirm a pod's policy.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    timeout_seconds: f64,
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() || std::env::args_os().len() <= 1 {
        return plugin();
    }
    match Cli::parse().command {
        CliCommand::Install(args) => run_install(args),
    }
}

/// One CNI command: stdin and environment in, result or error object out.
fn plugin() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin).map(|_| stdin);
    let outcome = cni::run(|name| std::env::var(name).ok(), read);
    for note in &outcome.notes {
        eprintln!("palisade-cni: {note}");
    }
    if std::env::var_os("CNI_COMMAND").is_none() {
        eprintln!(
            "palisade-cni: this is a CNI plugin, run by the container runtime; \
             `palisade-cni install --help` installs it on a node"
        );
    }
    if !outcome.stdout.is_empty() {
        println!("{}", outcome.stdout);
    }
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_install(args: InstallArgs) -> ExitCode {
    let binary = match args.binary.map_or_else(std::env::current_exe, Ok) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("palisade-cni install: cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !(args.timeout_seconds > 0.0
        && args.timeout_seconds <= cni::config::MAX_TIMEOUT.as_secs_f64())
    {
        eprintln!(
            "palisade-cni install: --timeout-seconds must be more than 0 and at most {}",
            cni::config::MAX_TIMEOUT.as_secs()
        );
        return ExitCode::FAILURE;
    }
    let options = install::InstallOptions {
        conf_dir: args.conf_dir,
        bin_dir: args.bin_dir,
        binary,
        socket: args.socket,
        timeout_seconds: args.timeout_seconds,
    };
    match install::install(&options) {
        Ok(report) => {
            let bin = options.bin_dir.join(cni::PLUGIN_TYPE);
            if report.binary_written {
                println!("installed {}", bin.display());
            } else {
                println!("{} is up to date", bin.display());
            }
            if let Some(backup) = &report.backup {
                println!("saved the original configuration as {}", backup.display());
            }
            if let Some(replaced) = &report.replaced {
                println!("replaced {} by a conflist", replaced.display());
            }
            if report.config_written {
                println!("chained palisade-cni last in {}", report.config.display());
            } else {
                println!("{} already ends with palisade-cni", report.config.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("palisade-cni install: {e}");
            ExitCode::FAILURE
        }
    }
}
