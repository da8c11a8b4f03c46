//! ADD: register the pod's endpoint with the agent and return only when
//! the agent has programmed its policy. The pod does not start before
//! that: when the agent is unreachable or does not confirm within the
//! budget, ADD fails.
//!
//! A failed ADD may leave the endpoint registered (isolated both ways until
//! its policy is programmed); the DEL the runtime sends after a failed ADD
//! removes it.

use serde_json::Value;

use super::{Context, agent_down, agent_hint, block_on};
use crate::api::proto;
use crate::cni::agent::{AgentConn, AgentError};
use crate::cni::endpoint::{self, Located};
use crate::cni::error::{ErrorCode, PluginError};
use crate::cni::link;

/// Runs ADD; returns the result to print: `prevResult` unchanged but for
/// its `cniVersion`, which is the request's.
pub fn add(ctx: &mut Context<'_>) -> Result<Value, PluginError> {
    let invocation = ctx.invocation;
    let container_id = invocation.container_id()?;
    let ifname = invocation.ifname()?;
    let netns = invocation.netns()?;
    let prev_json = ctx.request.prev_result_json()?;
    let prev = ctx.request.prev_result()?;
    let (namespace, pod_name) = invocation.args()?.pod()?;

    let pod = link::pod_link(&netns, ifname)?;
    let located = endpoint::locate(&prev, ifname, pod, link::ifindex)?;
    let request = proto::RegisterRequest {
        namespace,
        pod_name,
        container_id: container_id.to_owned(),
        netns_path: netns.display().to_string(),
        host_interface: located.host_interface.clone(),
        ips: located.ips.iter().map(ToString::to_string).collect(),
    };
    let enforced = block_on(register_and_wait(ctx, request, &located))??;
    ctx.notes.push(format!(
        "{container_id}: endpoint on {} enforced at revision {enforced}",
        located.host_interface
    ));

    let mut result = prev_json.clone();
    if let Value::Object(fields) = &mut result {
        fields.insert(
            "cniVersion".to_owned(),
            Value::String(ctx.version.to_string()),
        );
    }
    Ok(result)
}

async fn register_and_wait(
    ctx: &Context<'_>,
    request: proto::RegisterRequest,
    located: &Located,
) -> Result<u64, PluginError> {
    let settings = &ctx.settings;
    let container_id = request.container_id.clone();
    let unprotected = "the pod is not started without its network policy";
    let mut agent = AgentConn::connect(&settings.socket, settings.timeout)
        .await
        .map_err(|e| agent_down(&e, settings, unprotected))?;
    let registered = agent.register(request).await.map_err(|e| {
        if e.is_agent_down() {
            agent_down(&e, settings, unprotected)
        } else {
            PluginError::new(
                ErrorCode::AgentRefused,
                format!(
                    "Palisade agent refused the endpoint on {}: {e}",
                    located.host_interface
                ),
            )
            .details(agent_hint(settings))
        }
    })?;
    agent
        .wait_enforced(&container_id, registered.revision)
        .await
        .map_err(|e| wait_error(&e, ctx, registered.revision))
}

fn wait_error(e: &AgentError, ctx: &Context<'_>, revision: u64) -> PluginError {
    let settings = &ctx.settings;
    let timed_out =
        matches!(e, AgentError::Silent { .. }) || e.code() == Some(tonic::Code::DeadlineExceeded);
    if timed_out {
        return PluginError::new(
            ErrorCode::TryAgainLater,
            format!(
                "Palisade agent did not confirm the pod's network policy within {:?} \
                 (timeoutSeconds): the pod is not started unprotected",
                settings.timeout
            ),
        )
        .details(format!("{e}. {}", agent_hint(settings)));
    }
    if e.is_agent_down() {
        return agent_down(
            e,
            settings,
            "the pod is not started without its network policy",
        );
    }
    match e.code() {
        Some(tonic::Code::NotFound) => PluginError::new(
            ErrorCode::NotEnforced,
            "the endpoint was removed while ADD waited for its policy (a DEL for the same container?)",
        )
        .details(e.to_string()),
        _ => PluginError::new(
            ErrorCode::NotEnforced,
            format!("Palisade agent could not program the pod's network policy: {e}"),
        )
        .details(format!(
            "revision {revision}; `policy-agent status` on the node shows the agent's last error"
        )),
    }
}
