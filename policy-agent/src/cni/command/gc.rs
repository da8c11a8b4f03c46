//! GC (CNI 1.1): remove the endpoints whose container is not among the
//! runtime's `cni.dev/valid-attachments`. Every stale endpoint is tried;
//! the failures are reported together.

use std::collections::BTreeSet;

use super::{Context, agent_down, block_on, require_version};
use crate::cni::agent::AgentConn;
use crate::cni::error::{ErrorCode, PluginError};
use crate::cni::spec::Version;

/// Runs GC.
pub fn gc(ctx: &mut Context<'_>) -> Result<(), PluginError> {
    require_version(ctx, "GC", Version::V1_1_0)?;
    let valid: BTreeSet<String> = ctx
        .request
        .conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| {
            PluginError::new(
                ErrorCode::InvalidConfig,
                "GC without cni.dev/valid-attachments: the runtime must list the attachments \
                 that are still valid (none would remove every endpoint)",
            )
        })?
        .iter()
        .map(|a| a.container_id.clone())
        .collect();
    let settings = ctx.settings.clone();
    let (removed, failed) = block_on(async {
        let down = |e| agent_down(&e, &settings, "stale endpoints were not removed");
        let mut agent = AgentConn::connect(&settings.socket, settings.timeout)
            .await
            .map_err(down)?;
        let endpoints = agent.list().await.map_err(down)?;
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        for stale in endpoints
            .iter()
            .filter(|e| !valid.contains(&e.container_id))
        {
            match agent.unregister(&stale.container_id).await {
                Ok(_) => removed.push(format!(
                    "{} ({}/{} on {})",
                    stale.container_id, stale.namespace, stale.pod_name, stale.host_interface
                )),
                Err(e) => failed.push(format!("{}: {e}", stale.container_id)),
            }
        }
        Ok::<_, PluginError>((removed, failed))
    })??;
    if !removed.is_empty() {
        ctx.notes
            .push(format!("removed stale endpoints: {}", removed.join(", ")));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(PluginError::new(
            ErrorCode::CleanupFailed,
            format!(
                "Palisade agent failed to remove {} stale endpoint(s)",
                failed.len()
            ),
        )
        .details(failed.join("; ")))
    }
}
