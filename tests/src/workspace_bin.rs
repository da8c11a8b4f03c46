//! The workspace's binaries, built with cargo on first use by the tests,
//! or taken from an environment variable.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// `bin` of the policy-agent package: the path in `override_var` when set,
/// else built with cargo (release when the tests are).
pub fn build(bin: &str, override_var: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(override_var) {
        return Ok(PathBuf::from(path));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_package_variable) {
            command.env_remove(name);
        }
    }
    command
        .args([
            "build",
            "--quiet",
            "--package",
            "policy-agent",
            "--bin",
            bin,
        ])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(&workspace)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    let mut child = command.spawn().context("running cargo build")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["target"]["name"] == bin
            && let Some(path) = message["executable"].as_str()
        {
            executable = Some(PathBuf::from(path));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo build --bin {bin} failed ({status})");
    }
    executable.with_context(|| format!("cargo build did not report the {bin} executable"))
}

/// Whether `name` is one of the variables cargo sets for the package it
/// runs (`cargo test`, `cargo run`). A build started from inside one (a
/// test, the conformance runner) must not inherit them: build scripts that
/// watch them (ring's watches `CARGO_MANIFEST_DIR`) would run again, and
/// everything built on them would be rebuilt, here and at the next plain
/// `cargo build`.
fn is_package_variable(name: &str) -> bool {
    matches!(
        name,
        "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
    ) || name.starts_with("CARGO_PKG_")
}

#[cfg(test)]
mod tests {
    use super::is_package_variable;

    #[test]
    fn package_variables() {
        for name in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
        ] {
            assert!(is_package_variable(name), "{name}");
        }
        for name in ["CARGO", "CARGO_HOME", "CARGO_TARGET_DIR", "PATH"] {
            assert!(!is_package_variable(name), "{name}");
        }
    }
}
