//! Whether a scenario can run against a given kube-apiserver, decided from
//! the scenario's objects and what the server keeps. A server older than
//! 1.22 (such as the 1.20 `cargo xtask setup` builds) drops NetworkPolicy
//! `endPort` on write: the agent would be given another policy than the
//! scenario's, so such a scenario is skipped, with the reason.

use super::scenario::{KnownObject, Scenario};

/// What a kube-apiserver keeps of the fields scenarios write (found by
/// asking it, e.g. with a dry-run create).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerSupport {
    /// NetworkPolicy `spec.{ingress,egress}[].ports[].endPort`.
    pub end_port: bool,
}

/// The NetworkPolicies of `scenario` whose ports use `endPort`, as
/// `namespace/name (step N)`, in step order.
pub fn end_port_policies(scenario: &Scenario) -> Vec<String> {
    let mut found = Vec::new();
    for (index, step) in scenario.steps.iter().enumerate() {
        for object in &step.apply {
            let Some(KnownObject::NetworkPolicy(policy)) = &object.typed else {
                continue;
            };
            let spec = policy.spec.as_ref();
            let ingress = spec
                .and_then(|s| s.ingress.as_ref())
                .into_iter()
                .flatten()
                .flat_map(|rule| rule.ports.iter().flatten());
            let egress = spec
                .and_then(|s| s.egress.as_ref())
                .into_iter()
                .flatten()
                .flat_map(|rule| rule.ports.iter().flatten());
            if ingress.chain(egress).any(|port| port.end_port.is_some()) {
                found.push(format!(
                    "{}/{} (step {})",
                    object.key.namespace.as_deref().unwrap_or_default(),
                    object.key.name,
                    index + 1
                ));
            }
        }
    }
    found
}

/// Why `scenario` cannot run against a kube-apiserver that keeps only
/// what `support` says, if it cannot.
pub fn unsupported_by(scenario: &Scenario, support: ServerSupport) -> Option<String> {
    if support.end_port {
        return None;
    }
    let users = end_port_policies(scenario);
    (!users.is_empty()).then(|| {
        format!(
            "the kube-apiserver drops NetworkPolicy endPort (before 1.22), which {} uses",
            users.join(", ")
        )
    })
}
