//! The node agent: owns the cluster state and the local endpoints, compiles
//! and programs the maps whenever either changes, and reports what it found.

pub mod diagnostics;
