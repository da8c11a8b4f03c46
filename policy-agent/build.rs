//! Embeds the classifier object built by `cargo xtask build-ebpf`, and
//! generates the agent API's code from `proto/`.
//!
//! The object is optional at build time so that `cargo check` and `cargo clippy`
//! work on a machine without bpf-linker; an agent built without it says so when
//! it tries to load the programs. protoc comes from the `protoc-bin-vendored`
//! crate, so no system protoc is needed either.
use std::{env, fs, path::PathBuf};

fn main() {
    embed_classifier();
    compile_protos();
}

/// `proto/palisade/v1/agent.proto` → `$OUT_DIR/palisade.v1.rs` (messages,
/// client and server).
fn compile_protos() {
    // The build script's own rerun-if lines replace cargo's default (rerun
    // on any change in the package), so the protos must be listed too.
    println!("cargo:rerun-if-changed=proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .expect("protoc-bin-vendored has no protoc for this build host");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        // `policy-agent status --json` prints the messages.
        .type_attribute(".palisade.v1", "#[derive(serde::Serialize)]")
        .compile_with_config(config, &["proto/palisade/v1/agent.proto"], &["proto"])
        .expect("compiling proto/palisade/v1/agent.proto");
}

fn embed_classifier() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let default_object = manifest_dir
        .join("..")
        .join("target")
        .join("bpfel-unknown-none")
        .join("release")
        .join("policy-ebpf");
    println!("cargo:rerun-if-env-changed=PALISADE_BPF_OBJECT");
    let object = env::var_os("PALISADE_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default_object);
    println!("cargo:rerun-if-changed={}", object.display());

    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("policy-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found; the agent will not be able to load \
                 the classifier (run `cargo xtask build-ebpf`)",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
