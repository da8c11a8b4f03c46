//! `palisade-demo` (what `cargo xtask demo` runs) as a smoke test: one short
//! real run on the shop cluster, with the agent (needs root; skipped
//! otherwise).

use std::process::Command;

#[test]
fn the_demo_runs_the_agent_and_prints_its_flows() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_palisade-demo"))
        .args(["--duration", "3", "--interval", "1"])
        .output()
        .expect("running palisade-demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = || {
        format!(
            "status {}\n{stdout}\n--- stderr ---\n{stderr}",
            output.status
        )
    };
    assert!(output.status.success(), "{}", context());
    let lines: Vec<&str> = stdout.lines().collect();
    // An allowed flow with the rule that allowed it, a denied one with the
    // policies that isolate its pod, as `policy-agent observe` prints them.
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" ALLOWED ") && l.contains(" by shop/")),
        "no allowed flow naming its rule:\n{}",
        context()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" DENIED ") && l.contains("isolated by shop/")),
        "no denied flow naming the isolating policies:\n{}",
        context()
    );
    assert!(
        lines.iter().any(|l| l.starts_with("summary after")),
        "{}",
        context()
    );
    assert!(
        stdout.contains("teardown complete: nothing left behind"),
        "{}",
        context()
    );
    assert!(!stdout.contains("FAIL"), "{}", context());
}
