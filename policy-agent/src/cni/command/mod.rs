//! The CNI commands, one module each. Every command gets a [`Context`]
//! (the invocation, the decoded request, its version and Palisade's
//! settings) and returns what goes to stdout or a [`PluginError`].

mod add;
mod check;
mod del;
mod gc;
mod status;
mod version;

use std::future::Future;

pub use add::add;
pub use check::check;
pub use del::del;
pub use gc::gc;
pub use status::status;
pub use version::version;

use super::agent::AgentError;
use super::config::{Request, Settings};
use super::endpoint::LocateError;
use super::env::{EnvError, Invocation};
use super::error::{ErrorCode, PluginError};
use super::link::LinkError;
use super::spec::Version;

/// What one invocation works with.
pub struct Context<'a> {
    pub invocation: &'a Invocation,
    pub request: &'a Request,
    pub version: Version,
    pub settings: Settings,
    /// Lines for stderr (the runtime's log): what happened that is not an
    /// error, e.g. a DEL while the agent is down.
    pub notes: Vec<String>,
}

/// Runs `future` on a current-thread Tokio runtime (the gRPC calls).
fn block_on<F: Future>(future: F) -> Result<F::Output, PluginError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            PluginError::new(
                ErrorCode::TryAgainLater,
                "cannot start the plugin's runtime",
            )
            .details(e.to_string())
        })?;
    Ok(runtime.block_on(future))
}

/// What to tell a person about the agent being away.
fn agent_hint(settings: &Settings) -> String {
    format!(
        "Palisade's node agent serves {} on every node (DaemonSet palisade-agent in namespace \
         palisade-system): check that its pod on this node is running and ready",
        settings.socket.display()
    )
}

/// The agent could not be asked at all (unreachable, silent, stopping).
fn agent_down(e: &AgentError, settings: &Settings, consequence: &str) -> PluginError {
    let msg = match e {
        AgentError::Silent { .. } => {
            format!("Palisade agent did not answer in time: {consequence}")
        }
        _ => format!("Palisade agent is not reachable: {consequence}"),
    };
    PluginError::new(ErrorCode::TryAgainLater, msg)
        .details(format!("{e}. {}", agent_hint(settings)))
}

impl From<EnvError> for PluginError {
    fn from(e: EnvError) -> Self {
        PluginError::new(ErrorCode::InvalidEnvironment, e.to_string())
    }
}

impl From<LinkError> for PluginError {
    fn from(e: LinkError) -> Self {
        let code = match e {
            LinkError::NetnsMissing(_) | LinkError::NotNetns(_) | LinkError::Netns { .. } => {
                ErrorCode::NetnsNotFound
            }
            LinkError::NoInterface { .. }
            | LinkError::NotVeth { .. }
            | LinkError::Ethtool { .. }
            | LinkError::NoPeer(_) => ErrorCode::PodInterface,
        };
        PluginError::new(code, e.to_string())
    }
}

impl From<LocateError> for PluginError {
    fn from(e: LocateError) -> Self {
        let code = match e {
            LocateError::NoPodInterface { .. } => ErrorCode::PodInterface,
            LocateError::NoHostPeer { .. } => ErrorCode::HostInterface,
        };
        PluginError::new(code, e.to_string())
    }
}

/// Fails with error 1 unless the request's version has `command`.
fn require_version(ctx: &Context<'_>, command: &str, since: Version) -> Result<(), PluginError> {
    if ctx.version >= since {
        Ok(())
    } else {
        Err(PluginError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "{command} is not part of CNI {} (it needs cniVersion {since} or later)",
                ctx.version
            ),
        ))
    }
}
