//! `cargo xtask build-ebpf`: builds the classifier crate for the BPF target.
//!
//! Mirrors what aya-build 0.2.0 does from a build.rs: `rustup run nightly cargo
//! build --bins --target bpfel-unknown-none -Z build-std=core`, with the
//! `bpf_target_arch` cfg, full debuginfo and `--btf` passed to bpf-linker
//! through `CARGO_ENCODED_RUSTFLAGS`. The object lands where the agent's
//! build.rs looks for it: `target/bpfel-unknown-none/release/policy-ebpf`.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cmd};

/// The crate holding the TC classifier(s).
pub const PACKAGE: &str = "policy-ebpf";
/// Little-endian BPF: the hosts we target (x86_64, aarch64) are little-endian.
pub const TARGET: &str = "bpfel-unknown-none";
/// The toolchain that builds it (`-Z build-std` needs nightly).
pub const TOOLCHAIN: &str = "nightly";

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Build with the dev profile (target/bpfel-unknown-none/debug) instead of
    /// release. The agent embeds the release object unless PALISADE_BPF_OBJECT
    /// points elsewhere.
    #[arg(long)]
    pub debug: bool,
}

/// The value aya-build gives `bpf_target_arch`: the host's architecture.
fn bpf_target_arch() -> &'static str {
    match std::env::consts::ARCH {
        arch if arch.starts_with("riscv64") => "riscv64",
        arch => arch,
    }
}

/// Checks the toolchain pieces and says in one line what to do if one is missing.
fn preflight() -> Result<()> {
    if util::which_on_path("bpf-linker").is_none() {
        bail!("bpf-linker not found: run `cargo xtask setup`");
    }
    if util::which_on_path("rustup").is_none() {
        bail!(
            "rustup not found on PATH: install it from https://rustup.rs, then run `cargo xtask setup`"
        );
    }
    let sysroot = util::toolchain_sysroot(TOOLCHAIN).map_err(|_| {
        anyhow::anyhow!("the {TOOLCHAIN} toolchain is not installed: run `cargo xtask setup`")
    })?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!(
            "rust-src is missing from the {TOOLCHAIN} toolchain (needed by -Z build-std): run `cargo xtask setup`"
        );
    }
    Ok(())
}

/// Builds the eBPF object and returns its path.
pub fn run(opts: &Options) -> Result<PathBuf> {
    preflight()?;

    let root = util::workspace_root();
    // Always the workspace's own target dir, even if CARGO_TARGET_DIR is set:
    // that is where policy-agent's build.rs picks the object up.
    let target_dir = root.join("target");
    let profile = if opts.debug { "debug" } else { "release" };

    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{}\"", bpf_target_arch()),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f");

    let mut build = cmd!(
        "rustup",
        "run",
        TOOLCHAIN,
        "cargo",
        "build",
        "--package",
        PACKAGE,
        "--bins"
    );
    if !opts.debug {
        build = build.arg("--release");
    }
    build
        .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // Let `rustup run` pick the toolchain and its own cargo/rustc; values
        // inherited from the `cargo xtask` invocation would point at stable.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        // Plain RUSTFLAGS would be ignored in favour of the encoded ones anyway.
        .env_remove("RUSTFLAGS")
        .run()
        .context("building the eBPF object failed")?;

    let object = target_dir.join(TARGET).join(profile).join(PACKAGE);
    let size = fs::metadata(&object)
        .with_context(|| format!("the build succeeded but {} is missing", object.display()))?
        .len();
    println!(
        "eBPF object: {} ({})",
        object.display(),
        util::human_size(size)
    );
    if opts.debug {
        println!(
            "note: the agent embeds the release object; set PALISADE_BPF_OBJECT={} to use this one",
            object.display()
        );
    }
    Ok(object)
}
