//! `palisade-cni`: the chained CNI plugin that puts each new pod under its
//! policy before the pod starts (CNI spec 1.0 for chained plugins, plus
//! STATUS and GC of 1.1), and its node install.
//!
//! Listed last in the node's conflist, after the plugin that creates the
//! pod's veth (bridge, ptp, …). On ADD it finds the host side of the pod's
//! veth in `prevResult`, registers the endpoint with the node agent over
//! its unix socket, waits until the agent reports the endpoint's policy
//! programmed, and only then passes `prevResult` on: a pod never runs
//! unprotected, and when the agent cannot confirm, ADD fails.
//!
//! * [`spec`]: the protocol's serde types.
//! * [`env`](mod@env): the CNI_* environment variables.
//! * [`config`]: the request on stdin and Palisade's settings in it.
//! * [`link`]: netns, interface indexes and veth peers in the kernel.
//! * [`endpoint`]: the pod's interfaces and addresses in `prevResult`.
//! * [`agent`]: the agent API calls, bounded by the command's budget.
//! * [`command`]: ADD, DEL, CHECK, STATUS, GC, VERSION.
//! * [`plugin`]: one invocation, from environment and stdin to stdout.
//! * [`error`]: error codes and the plugin's error type.
//! * [`install`]: `palisade-cni install`, the conflist edit.

pub mod agent;
pub mod command;
pub mod config;
pub mod endpoint;
pub mod env;
pub mod error;
pub mod install;
pub mod link;
pub mod plugin;
pub mod spec;
#[cfg(test)]
mod tests;

pub use config::PLUGIN_TYPE;
pub use error::{ErrorCode, PluginError};
pub use plugin::{Outcome, run};
