//! The agent's API: gRPC (tonic) on a unix socket, defined by
//! `policy-agent/proto/palisade/v1/agent.proto`.
//!
//! * [`proto`]: the generated messages, clients and servers.
//! * [`socket`]: binding the socket, root-only by default.
//! * [`server`]: the `Endpoints`, `Status` and `Explain` services over an
//!   [`AgentHandle`](crate::agent::handle::AgentHandle).
//! * [`client`]: connecting to a running agent (the CLI, tests, the CNI
//!   plugin).
//! * [`tls`]: the optional TCP listener's TLS (`run --flows-listen`), which
//!   serves only the read-only services ([`server::serve_read_only`]).

pub mod client;
mod convert;
pub mod flows;
pub mod server;
pub mod socket;
pub mod tls;

pub use convert::{explain_query, explain_response};

/// Messages and services of `palisade.v1`.
#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod proto {
    tonic::include_proto!("palisade.v1");
}

/// The socket a node's agent serves its API on.
pub const DEFAULT_SOCKET: &str = "/run/palisade/agent.sock";
