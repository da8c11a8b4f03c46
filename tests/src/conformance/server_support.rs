//! Whether a scenario can run against a given kube-apiserver, decided from
//! the scenario's objects. A server older than 1.22 drops NetworkPolicy
//! `endPort` on write (the field came in 1.21 behind a feature gate that was
//! off by default): the agent would be given another policy than the
//! scenario's, so such a scenario is skipped, with the reason.

use std::fmt;

use super::scenario::{KnownObject, Scenario};

/// A kube-apiserver's version, as its `/version` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    /// From `/version`'s `major` and `minor` (which may carry a `+`, as in
    /// `20+`).
    pub fn parse(major: &str, minor: &str) -> Option<Self> {
        let number = |s: &str| s.trim_end_matches('+').parse().ok();
        Some(Self {
            major: number(major)?,
            minor: number(minor)?,
        })
    }

    /// Whether NetworkPolicy `endPort` survives a write (beta, on by
    /// default, from 1.22).
    pub fn keeps_end_port(self) -> bool {
        self >= Self {
            major: 1,
            minor: 22,
        }
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
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

/// Why `scenario` cannot run against a kube-apiserver of `version`, if it
/// cannot.
pub fn unsupported_by(scenario: &Scenario, version: ServerVersion) -> Option<String> {
    if version.keeps_end_port() {
        return None;
    }
    let users = end_port_policies(scenario);
    (!users.is_empty()).then(|| {
        format!(
            "the kube-apiserver {version} drops NetworkPolicy endPort (from 1.22), which {} uses",
            users.join(", ")
        )
    })
}
