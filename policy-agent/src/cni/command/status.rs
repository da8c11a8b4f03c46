//! STATUS (CNI 1.1): can the plugin serve ADD now? Only when the agent
//! answers and reports itself ready (its source delivered everything once
//! and the maps were programmed).

use super::{Context, agent_hint, block_on, require_version};
use crate::cni::agent::AgentConn;
use crate::cni::error::{ErrorCode, PluginError};
use crate::cni::spec::Version;

/// Runs STATUS.
pub fn status(ctx: &mut Context<'_>) -> Result<(), PluginError> {
    require_version(ctx, "STATUS", Version::V1_1_0)?;
    let settings = ctx.settings.clone();
    let status = block_on(async {
        let mut agent = AgentConn::connect(&settings.socket, settings.timeout).await?;
        agent.status().await
    })?
    .map_err(|e| {
        PluginError::new(
            ErrorCode::NotAvailable,
            format!("Palisade agent is not available, pods cannot be added: {e}"),
        )
        .details(agent_hint(&settings))
    })?;
    if !status.ready {
        let waiting = if status.waiting_for.is_empty() {
            "its first programming of the maps".to_owned()
        } else {
            status.waiting_for.join(", ")
        };
        return Err(PluginError::new(
            ErrorCode::NotAvailable,
            format!(
                "Palisade agent is not ready yet (waiting for {waiting}): pods cannot be added"
            ),
        )
        .details(agent_hint(&settings)));
    }
    if !status.last_error.is_empty() && status.failed_revision > status.enforced_revision {
        return Err(PluginError::new(
            ErrorCode::LimitedConnectivity,
            format!(
                "Palisade agent failed to program revision {}: {}",
                status.failed_revision, status.last_error
            ),
        )
        .details(format!(
            "existing pods keep the policy of revision {} and may miss rules that allow \
             traffic; new pods cannot be added until the agent succeeds",
            status.enforced_revision
        )));
    }
    ctx.notes.push(format!(
        "agent ready on node {}: revision {} enforced, {} endpoints",
        status.node_name,
        status.enforced_revision,
        status.endpoints.len()
    ));
    Ok(())
}
