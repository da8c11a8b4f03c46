//! The explanation as text for a person at 3 a.m.

use std::fmt;

use policy_common::Direction;

use super::{Explanation, Party, Side};
use crate::compile::lookup::Decision;

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Party::Pod(r) => write!(f, "{}/{}", r.namespace, r.name),
            Party::Node => f.write_str("node"),
            Party::Address(ip) => write!(f, "{ip}"),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = &self.query;
        writeln!(
            f,
            "{} -> {} {}/{}: {}",
            q.from,
            q.to,
            q.port,
            q.protocol,
            if self.allowed() { "ALLOWED" } else { "DENIED" }
        )?;
        write_side(f, &self.egress, &q.from)?;
        write_side(f, &self.ingress, &q.to)
    }
}

fn write_side(f: &mut fmt::Formatter<'_>, side: &Side, party: &Party) -> fmt::Result {
    let dir = match side.direction {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    };
    let Some(decision) = side.decision else {
        return writeln!(f, "  {dir} of {party}: not a pod, nothing enforced");
    };
    let verdict = match decision {
        Decision::NotIsolated => format!("allowed: no policy selects it for {dir}"),
        Decision::FromNode => {
            "allowed: connections from the pod's own node are always allowed".to_owned()
        }
        Decision::Allowed(_) => match &side.rule {
            Some(r) => format!(
                "allowed by {}/{} {dir} rule[{}]",
                r.namespace, r.policy, r.index
            ),
            None => "allowed".to_owned(),
        },
        Decision::Denied => format!(
            "DENIED: isolated by {} and no rule allows it",
            side.policies
                .iter()
                .map(|p| format!("{}/{}", p.policy.namespace, p.policy.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    writeln!(f, "  {dir} of {party}: {verdict}")?;
    for policy in &side.policies {
        writeln!(
            f,
            "    policy {}/{}:",
            policy.policy.namespace, policy.policy.name
        )?;
        if policy.rules.is_empty() {
            writeln!(f, "      no {dir} rules: allows nothing")?;
        }
        for rule in &policy.rules {
            writeln!(
                f,
                "      rule[{}] {}: peers: {}; ports: {}",
                rule.index,
                if rule.matches {
                    "matches"
                } else {
                    "does not match"
                },
                rule.peers,
                rule.ports
            )?;
        }
    }
    if let Some(d) = &side.disagreement {
        writeln!(f, "    warning: {d}")?;
    }
    Ok(())
}
