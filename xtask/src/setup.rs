//! `cargo xtask setup`: installs what building, loading and testing the BPF
//! programs needs. Idempotent: every step checks first and only acts on what
//! is missing. What it cannot fix is reported as one line each (what, and how
//! to fix it), and then setup exits non-zero.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    build_ebpf::TOOLCHAIN,
    util::{self, cmd},
};

/// The bpf-linker release that fits the aya versions this workspace pins.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The `llvm-N` features bpf-linker 0.13.0 offers.
const BPF_LINKER_LLVM_MAJORS: [u32; 3] = [21, 22, 23];
const BPFFS: &str = "/sys/fs/bpf";

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Build bpf-linker even if a working 0.13.0 is already installed.
    #[arg(long)]
    pub rebuild_bpf_linker: bool,
    /// Install bpf-linker under DIR/bin (`cargo install --root DIR`) instead
    /// of cargo's default ($CARGO_HOME/bin).
    #[arg(long, value_name = "DIR")]
    pub cargo_root: Option<PathBuf>,
    /// Do not build the kube-apiserver the Kubernetes API tests run (nor install etcd).
    #[arg(long)]
    pub skip_kube_apiserver: bool,
}

/// What a Debian package is for us, and how we see that it is installed.
struct Package {
    /// The Debian package.
    name: &'static str,
    /// What it gives us, for the summary.
    what: &'static str,
    probe: Probe,
}

enum Probe {
    /// A program on PATH (or in /usr/sbin, /sbin).
    Program(&'static str),
    /// A file that the package installs.
    File(&'static str),
}

impl Probe {
    fn found(&self) -> bool {
        match self {
            Self::Program(program) => util::which(program).is_some(),
            Self::File(path) => Path::new(path).exists(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Program(program) => program,
            Self::File(path) => path,
        }
    }
}

const fn package(name: &'static str, what: &'static str, probe: Probe) -> Package {
    Package { name, what, probe }
}

const PACKAGES: &[Package] = &[
    package(
        "containernetworking-plugins",
        "CNI plugins",
        Probe::File("/usr/lib/cni/bridge"),
    ),
    package("iptables", "iptables", Probe::Program("iptables")),
    package("ipset", "ipset", Probe::Program("ipset")),
    package("nftables", "nftables", Probe::Program("nft")),
    package("iperf3", "iperf3", Probe::Program("iperf3")),
    package("bpftool", "bpftool", Probe::Program("bpftool")),
    package("iproute2", "iproute2", Probe::Program("ip")),
    package("procps", "procps", Probe::Program("sysctl")),
    // Only when no kubectl is on PATH at all: another package may already own
    // /usr/bin/kubectl, and kubernetes-client would then fail to unpack.
    package("kubernetes-client", "kubectl", Probe::Program("kubectl")),
];

#[derive(Default)]
struct Summary {
    present: Vec<String>,
    installed: Vec<String>,
    /// One line each: what is missing, and how to fix it.
    missing: Vec<String>,
}

impl Summary {
    fn missing(&mut self, line: String) {
        self.missing.push(line);
    }

    fn print(&self) {
        println!();
        println!("setup summary:");
        if !self.present.is_empty() {
            println!("  already present: {}", self.present.join(", "));
        }
        if !self.installed.is_empty() {
            println!("  installed now:   {}", self.installed.join(", "));
        }
        if self.installed.is_empty() && self.missing.is_empty() {
            println!("  nothing to do: everything was already in place");
        }
        for line in &self.missing {
            println!("  MISSING {line}");
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    let root = util::is_root();
    let mut summary = Summary::default();

    // The parts that need root: Debian packages and the bpf filesystem.
    let missing_packages: Vec<&Package> = PACKAGES
        .iter()
        .filter(|package| {
            let found = package.probe.found();
            if found {
                summary.present.push(package.what.to_owned());
            }
            !found
        })
        .collect();
    let bpffs_mounted = util::bpffs_mounted(BPFFS)?;
    if bpffs_mounted {
        summary.present.push(format!("bpffs at {BPFFS}"));
    }
    if root {
        install_packages(&missing_packages, &mut summary);
        if !bpffs_mounted {
            mount_bpffs(&mut summary);
        }
    } else if !missing_packages.is_empty() || !bpffs_mounted {
        let mut needs: Vec<String> = missing_packages.iter().map(|p| p.name.to_owned()).collect();
        if !bpffs_mounted {
            needs.push(format!("bpffs mount at {BPFFS}"));
        }
        summary.missing(format!(
            "{}: not root, so setup cannot install these: rerun `cargo xtask setup` as root",
            needs.join(", ")
        ));
    }

    // The Rust parts are per user (rustup, $CARGO_HOME) and need no root.
    rust_toolchain(opts, &mut summary);

    // etcd and a kube-apiserver built from Debian's sources, for the API tests.
    let kube = crate::kube_apiserver::ensure(opts.skip_kube_apiserver, root);
    summary.present.extend(kube.present);
    summary.installed.extend(kube.installed);
    summary.missing.extend(kube.missing);

    summary.print();
    if summary.missing.is_empty() {
        Ok(())
    } else {
        bail!(
            "setup is incomplete: {} missing piece(s), listed above",
            summary.missing.len()
        )
    }
}

fn install_packages(missing: &[&Package], summary: &mut Summary) {
    if missing.is_empty() {
        return;
    }
    if util::which("apt-get").is_none() {
        for package in missing {
            summary.missing(format!(
                "{}: no apt-get on this machine: install the equivalent of Debian's `{}`",
                package.probe.label(),
                package.name
            ));
        }
        return;
    }
    let apt = |args: &[&str]| {
        cmd!("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
    };
    if let Err(err) = apt(&["update"]) {
        eprintln!(
            "warning: apt-get update failed ({err:#}); trying to install from the current package lists"
        );
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&names);
    if apt(&install).is_err() && names.len() > 1 {
        // One broken package must not keep the others out: go one by one.
        eprintln!("apt-get install of all packages failed; installing them one at a time");
        for name in &names {
            let _ = apt(&["install", "-y", "--no-install-recommends", name]);
        }
    }
    for package in missing {
        if package.probe.found() {
            summary.installed.push(package.name.to_owned());
        } else {
            summary.missing(format!(
                "{}: `apt-get install {}` did not provide it: see the apt output above, check /etc/apt/sources.list*",
                package.probe.label(),
                package.name
            ));
        }
    }
}

fn mount_bpffs(summary: &mut Summary) {
    let result = fs::create_dir_all(BPFFS)
        .with_context(|| format!("creating {BPFFS}"))
        .and_then(|()| cmd!("mount", "-t", "bpf", "bpf", BPFFS).run());
    match result.and_then(|()| util::bpffs_mounted(BPFFS)) {
        Ok(true) => summary.installed.push(format!("bpffs at {BPFFS}")),
        Ok(false) => summary.missing(format!(
            "bpffs at {BPFFS}: mount reported success but /proc/mounts has no bpf mount there: run `mount -t bpf bpf {BPFFS}`"
        )),
        Err(err) => summary.missing(format!(
            "bpffs at {BPFFS}: mounting failed ({err:#}): run `mount -t bpf bpf {BPFFS}` (needs CAP_SYS_ADMIN)"
        )),
    }
}

fn rust_toolchain(opts: &Options, summary: &mut Summary) {
    if util::which_on_path("rustup").is_none() {
        summary.missing(
            "rustup: not on PATH: install it from https://rustup.rs (the eBPF build needs its nightly toolchain), then rerun setup"
                .to_owned(),
        );
        return;
    }

    // The nightly toolchain (for -Z build-std) ...
    let nightly_probe = || {
        cmd!("rustup", "run", TOOLCHAIN, "rustc", "--version")
            // Never let a probe download a toolchain behind our back.
            .env("RUSTUP_AUTO_INSTALL", "0")
            .try_read()
    };
    if let Some(version) = nightly_probe() {
        summary.present.push(format!("{TOOLCHAIN} ({version})"));
    } else {
        let install = cmd!(
            "rustup",
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal"
        )
        .run();
        match (install, nightly_probe()) {
            (Ok(()), Some(version)) => summary.installed.push(format!("{TOOLCHAIN} ({version})")),
            (result, _) => {
                let why = result
                    .err()
                    .map_or_else(|| "it still does not run".to_owned(), |e| format!("{e:#}"));
                summary.missing(format!(
                    "{TOOLCHAIN} toolchain: `rustup toolchain install {TOOLCHAIN} --profile minimal` failed ({why}): \
                     make static.rust-lang.org reachable or install a toolchain named `{TOOLCHAIN}` by other means"
                ));
                return;
            }
        }
    }

    // ... with the standard library's sources ...
    let has_rust_src = || {
        cmd!(
            "rustup",
            "component",
            "list",
            "--toolchain",
            TOOLCHAIN,
            "--installed"
        )
        .try_read()
        .is_some_and(|list| list.lines().any(|line| line.starts_with("rust-src")))
    };
    if has_rust_src() {
        summary.present.push(format!("rust-src ({TOOLCHAIN})"));
    } else {
        match cmd!("rustup", "component", "add", "rust-src", "--toolchain", TOOLCHAIN).run() {
            Ok(()) if has_rust_src() => summary.installed.push(format!("rust-src ({TOOLCHAIN})")),
            result => summary.missing(format!(
                "rust-src for {TOOLCHAIN}: `rustup component add rust-src --toolchain {TOOLCHAIN}` failed{}: \
                 make static.rust-lang.org reachable and rerun setup",
                result.err().map(|e| format!(" ({e:#})")).unwrap_or_default()
            )),
        }
    }

    // ... and bpf-linker built against that toolchain's own LLVM.
    bpf_linker(opts, summary);
}

/// Where cargo installs binaries: `--cargo-root`/bin, else $CARGO_HOME/bin.
fn cargo_bin_dir(opts: &Options) -> Option<PathBuf> {
    if let Some(root) = &opts.cargo_root {
        return Some(root.join("bin"));
    }
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// Whether `program --version` runs and reports the wanted version.
fn bpf_linker_ok(program: &Path) -> bool {
    cmd!(program, "--version").try_read().is_some_and(|out| {
        out.split_whitespace()
            .any(|word| word == BPF_LINKER_VERSION)
    })
}

fn bpf_linker(opts: &Options, summary: &mut Summary) {
    let label = format!("bpf-linker {BPF_LINKER_VERSION}");
    let bin_dir = cargo_bin_dir(opts);
    let candidate = match &opts.cargo_root {
        Some(_) => bin_dir.as_ref().map(|dir| dir.join("bpf-linker")),
        None => util::which_on_path("bpf-linker")
            .or_else(|| bin_dir.as_ref().map(|dir| dir.join("bpf-linker"))),
    };
    let already = candidate.as_deref().filter(|path| bpf_linker_ok(path));

    let installed = match already {
        Some(path) if !opts.rebuild_bpf_linker => {
            summary.present.push(label.clone());
            path.to_owned()
        }
        _ => match build_bpf_linker(opts) {
            Ok(path) => {
                summary
                    .installed
                    .push(format!("{label} ({})", path.display()));
                path
            }
            Err(err) => {
                summary.missing(format!(
                    "{label}: building it failed ({err:#}): see the cargo output above; \
                     it needs the {TOOLCHAIN} toolchain, crates.io and a C toolchain (cc)"
                ));
                return;
            }
        },
    };

    // The eBPF build finds bpf-linker through PATH.
    if opts.cargo_root.is_none() && util::which_on_path("bpf-linker").is_none() {
        summary.missing(format!(
            "{label}: installed at {} but that directory is not on PATH: add it to PATH",
            installed.display()
        ));
    }
}

/// `cargo install bpf-linker` linked against the libLLVM shipped inside the
/// nightly toolchain, so no system LLVM is needed. Returns the binary's path.
fn build_bpf_linker(opts: &Options) -> Result<PathBuf> {
    let sysroot = util::toolchain_sysroot(TOOLCHAIN)?;
    let lib_dir = sysroot.join("lib");
    let libllvm = find_libllvm(&lib_dir)?;

    let verbose = cmd!("rustup", "run", TOOLCHAIN, "rustc", "-vV").read()?;
    let major = llvm_major(&verbose)?;
    if !BPF_LINKER_LLVM_MAJORS.contains(&major) {
        bail!(
            "the {TOOLCHAIN} toolchain ships LLVM {major}, but bpf-linker {BPF_LINKER_VERSION} supports LLVM {:?} only",
            BPF_LINKER_LLVM_MAJORS
        );
    }

    // A prefix whose lib/libLLVM.so is the toolchain's library: bpf-linker's
    // build.rs links `-lLLVM` from $LLVM_PREFIX/lib.
    let cache = cache_dir()?.join("palisade");
    let prefix = cache.join("llvm-prefix");
    let link = prefix.join("lib").join("libLLVM.so");
    fs::create_dir_all(link.parent().expect("has a parent"))
        .with_context(|| format!("creating {}", prefix.display()))?;
    if fs::read_link(&link).ok().as_deref() != Some(libllvm.as_path()) {
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
        eprintln!("linked {} -> {}", link.display(), libllvm.display());
    }

    let install = |locked: bool| {
        let mut install = cmd!(
            util::cargo(),
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force"
        );
        if locked {
            install = install.arg("--locked");
        }
        install = install.args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ]);
        if let Some(root) = &opts.cargo_root {
            install = install.arg("--root").arg(root);
        }
        install
            .env("LLVM_PREFIX", &prefix)
            // At run time the binary finds libLLVM.so.<version> in the toolchain.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
            )
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            // Outside the workspace, so its .cargo/config.toml does not apply.
            .current_dir(&cache)
            .run()
    };
    if let Err(err) = install(true) {
        eprintln!("warning: {err:#}; retrying without --locked");
        install(false)?;
    }

    let bin = cargo_bin_dir(opts)
        .ok_or_else(|| {
            anyhow!(
                "cannot tell where cargo installed bpf-linker (neither CARGO_HOME nor HOME is set)"
            )
        })?
        .join("bpf-linker");
    if !bpf_linker_ok(&bin) {
        bail!(
            "{} was installed but `{} --version` does not report {BPF_LINKER_VERSION}",
            bin.display(),
            bin.display()
        );
    }
    Ok(bin)
}

/// `$sysroot/lib/libLLVM.so.<version>-rust-<rust version>`.
fn find_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libLLVM.so.") && name.contains("-rust-")
        })
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow!(
            "no libLLVM.so.*-rust-* in {} (is the {TOOLCHAIN} toolchain complete?)",
            lib_dir.display()
        )
    })
}

/// The major version from the `LLVM version: 22.1.4` line of `rustc -vV`.
fn llvm_major(rustc_verbose_version: &str) -> Result<u32> {
    rustc_verbose_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .and_then(|version| version.trim().split('.').next())
        .and_then(|major| major.parse().ok())
        .ok_or_else(|| {
            anyhow!("no `LLVM version:` line in `rustc -vV` output:\n{rustc_verbose_version}")
        })
}

fn cache_dir() -> Result<PathBuf> {
    env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .ok_or_else(|| anyhow!("neither XDG_CACHE_HOME nor HOME is set"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc() {
        let out = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(out).unwrap(), 22);
        assert!(llvm_major("rustc 1.0").is_err());
    }
}
