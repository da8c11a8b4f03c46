//! DEL: release the endpoint. Idempotent and best effort, as the spec
//! asks: an endpoint that was never added, a netns that is gone and an
//! agent that is down are all success (the agent's own state and GC deal
//! with what a DEL could not reach). Only an agent that answers with a
//! failure makes DEL fail, so that the runtime retries it.

use super::{Context, agent_hint, block_on};
use crate::cni::agent::AgentConn;
use crate::cni::error::{ErrorCode, PluginError};

/// Runs DEL.
pub fn del(ctx: &mut Context<'_>) -> Result<(), PluginError> {
    let container_id = ctx.invocation.container_id()?.to_owned();
    let settings = ctx.settings.clone();
    let outcome = block_on(async {
        let mut agent = AgentConn::connect(&settings.socket, settings.timeout).await?;
        agent.unregister(&container_id).await
    })?;
    match outcome {
        Ok(done) if done.found => {
            ctx.notes.push(format!(
                "{container_id}: endpoint removed ({} tracked connections flushed, revision {})",
                done.connections_flushed, done.revision
            ));
            Ok(())
        }
        Ok(_) => {
            ctx.notes.push(format!(
                "{container_id}: no endpoint registered, nothing to do"
            ));
            Ok(())
        }
        Err(e) if e.is_agent_down() => {
            ctx.notes.push(format!(
                "{container_id}: agent not reachable, DEL succeeds without it ({e}); \
                 the endpoint's interface goes with the pod"
            ));
            Ok(())
        }
        Err(e) => Err(PluginError::new(
            ErrorCode::CleanupFailed,
            format!("Palisade agent failed to remove the endpoint of {container_id}: {e}"),
        )
        .details(agent_hint(&settings))),
    }
}
