//! The deployment manifests (manifests/*.yaml) against a real
//! kube-apiserver (the 1.20 that `cargo xtask setup` builds): they apply
//! cleanly with a server-side dry run, and every flag the DaemonSet passes
//! to `policy-agent` and `palisade-cni` is one those binaries have.
//!
//! The DaemonSet is privileged (BPF, host interfaces, a bidirectional
//! bpffs mount), which an API server only accepts with
//! `--allow-privileged=true`, as every real cluster runs it (kubeadm,
//! kind, managed offerings). The shared fixture does not pass that flag,
//! so this test runs it through a wrapper that adds it. It is alone in
//! its test binary because it points `PALISADE_KUBE_APISERVER` at that
//! wrapper before any other thread runs.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use palisade_tests::kube::{self, KubeApiServer};
use palisade_tests::{agent, cni};
use serde_json::Value;

/// Writes `dir/kube-apiserver`, which runs `real` with the arguments it
/// gets plus `--allow-privileged=true`.
fn allow_privileged(real: &Path, dir: &Path) -> std::path::PathBuf {
    let wrapper = dir.join("kube-apiserver");
    let script = format!(
        "#!/bin/sh\nexec '{}' \"$@\" --allow-privileged=true\n",
        real.display()
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

#[test]
fn manifests_pass_server_side_dry_run() {
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let real = kube::kube_apiserver_binary().expect("kube-apiserver (run `cargo xtask setup`)");
    let wrapper_dir = tempfile::tempdir().unwrap();
    let wrapper = allow_privileged(&real, wrapper_dir.path());
    // SAFETY: the only test of this binary, before it starts any thread.
    unsafe { std::env::set_var("PALISADE_KUBE_APISERVER", &wrapper) };
    let api = KubeApiServer::start().expect("starting kube-apiserver");

    let apply = |args: &[&str], file: &Path| {
        let out = api
            .kubectl()
            .arg("apply")
            .args(args)
            .arg("-f")
            .arg(file)
            .output()
            .expect("running kubectl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubectl apply {args:?} -f {}: {text}",
            file.display()
        );
        text
    };
    // The namespace for real (dry runs of namespaced objects need it).
    apply(&[], &manifests.join("namespace.yaml"));
    let mut files = vec!["configmap.yaml", "daemonset.yaml"];
    if manifests.join("rbac.yaml").exists() {
        files.insert(0, "rbac.yaml");
    }
    for file in files {
        let text = apply(&["--dry-run=server"], &manifests.join(file));
        assert!(text.contains("(server dry run)"), "{file}: {text}");
    }

    // Every --flag the DaemonSet passes is one the binary has.
    let daemonset: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(manifests.join("daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let spec = &daemonset["spec"]["template"]["spec"];
    let agent_bin = agent::binary().expect("policy-agent");
    let cni_bin = cni::plugin_binary().expect("palisade-cni");
    let help = |binary: &Path, subcommand: &str| {
        let out = Command::new(binary)
            .args([subcommand, "--help"])
            .output()
            .expect("--help");
        assert!(
            out.status.success(),
            "{} {subcommand} --help",
            binary.display()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let check_flags = |args: &[Value], help: &str, what: &str| {
        for arg in args.iter().filter_map(Value::as_str) {
            if let Some(flag) = arg.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("--{flag}")),
                    "{what}: no --{flag} in:\n{help}"
                );
            }
        }
    };
    let init = &spec["initContainers"][0];
    let init_args = init["args"].as_array().unwrap();
    assert_eq!(init_args[0], "install");
    check_flags(
        init_args,
        &help(&cni_bin, "install"),
        "palisade-cni install",
    );
    let container = &spec["containers"][0];
    let agent_args = container["args"].as_array().unwrap();
    assert_eq!(agent_args[0], "run");
    check_flags(agent_args, &help(&agent_bin, "run"), "policy-agent run");
    for probe in ["readinessProbe", "livenessProbe"] {
        let command = container[probe]["exec"]["command"].as_array().unwrap();
        let subcommand = command[1].as_str().unwrap();
        check_flags(&command[2..], &help(&agent_bin, subcommand), probe);
    }
}
