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
