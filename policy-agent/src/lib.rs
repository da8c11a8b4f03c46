//! Palisade node agent library: the datapath loader and map handles, the
//! policy compiler, and the pieces the binary wires together.

pub mod agent;
pub mod api;
pub mod cni;
pub mod datapath;
pub mod explain;
pub mod flows;
pub mod observe;

pub mod compile;
pub mod model;
pub mod source;
