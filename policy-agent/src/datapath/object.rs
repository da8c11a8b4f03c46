//! The classifier object, embedded at build time by build.rs (empty when the
//! agent was built without it).

pub static CLASSIFIER: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf.o"));
