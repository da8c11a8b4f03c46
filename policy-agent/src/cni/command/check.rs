//! CHECK: the endpoint `prevResult` describes is registered with the agent,
//! on the same interface and addresses, and its policy is programmed up to
//! the agent's current revision (waiting up to the budget, since CHECK may
//! come right after ADD).

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::{Context, agent_down, block_on, require_version};
use crate::cni::agent::AgentConn;
use crate::cni::endpoint::{self, Located};
use crate::cni::error::{ErrorCode, PluginError};
use crate::cni::link;
use crate::cni::spec::Version;

/// Runs CHECK.
pub fn check(ctx: &mut Context<'_>) -> Result<(), PluginError> {
    require_version(ctx, "CHECK", Version::V0_4_0)?;
    let invocation = ctx.invocation;
    let container_id = invocation.container_id()?.to_owned();
    let ifname = invocation.ifname()?;
    let netns = invocation.netns()?;
    let prev = ctx.request.prev_result()?;
    let pod = link::pod_link(&netns, ifname)?;
    let located = endpoint::locate(&prev, ifname, pod, link::ifindex)?;
    block_on(check_agent(ctx, &container_id, &located))?
}

async fn check_agent(
    ctx: &Context<'_>,
    container_id: &str,
    located: &Located,
) -> Result<(), PluginError> {
    let settings = &ctx.settings;
    let down = |e| agent_down(&e, settings, "cannot check the pod's policy");
    let mut agent = AgentConn::connect(&settings.socket, settings.timeout)
        .await
        .map_err(down)?;
    let endpoints = agent.list().await.map_err(down)?;
    let Some(registered) = endpoints.iter().find(|e| e.container_id == container_id) else {
        return Err(PluginError::new(
            ErrorCode::NotRegistered,
            format!(
                "container {container_id} has no endpoint in the Palisade agent: its traffic \
                 on {} is not checked against policy",
                located.host_interface
            ),
        ));
    };
    let mismatch = |what: String| {
        Err(PluginError::new(
            ErrorCode::EndpointMismatch,
            format!("the Palisade endpoint of {container_id} does not match the pod: {what}"),
        ))
    };
    if registered.host_interface != located.host_interface {
        return mismatch(format!(
            "it is on {}, the pod's veth is {}",
            registered.host_interface, located.host_interface
        ));
    }
    if registered.ifindex != located.host_ifindex {
        return mismatch(format!(
            "{} had ifindex {} when registered and has {} now (the veth was recreated)",
            located.host_interface, registered.ifindex, located.host_ifindex
        ));
    }
    let agent_ips: BTreeSet<IpAddr> = registered
        .ips
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let pod_ips: BTreeSet<IpAddr> = located.ips.iter().copied().collect();
    if !pod_ips.is_empty() && agent_ips != pod_ips {
        return mismatch(format!(
            "the agent has addresses {agent_ips:?}, prevResult {pod_ips:?}"
        ));
    }
    agent
        .wait_enforced(container_id, 0)
        .await
        .map(drop)
        .map_err(|e| {
            if e.is_agent_down() {
                agent_down(&e, settings, "cannot check the pod's policy")
            } else {
                PluginError::new(
                    ErrorCode::EndpointMismatch,
                    format!("the policy of {container_id} is not enforced: {e}"),
                )
            }
        })
}
