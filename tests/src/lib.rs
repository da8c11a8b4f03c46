//! Helpers for Palisade's end-to-end tests: packet crafting for
//! BPF_PROG_TEST_RUN and network-namespace topologies with real sockets.

pub mod agent;
pub mod child;
pub mod cni;
pub mod conformance;
pub mod fixture;
pub mod kube;
pub mod netns;
pub mod packet;
pub mod workspace_bin;

/// Whether the test runs as root (kernel tests need it); says it is skipped
/// when not.
pub fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("skipped: needs root");
        false
    }
}
