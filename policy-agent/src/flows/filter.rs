//! The Flows API's server-side filter: every set field must match; within a
//! field, any value may.

use std::collections::BTreeSet;

use policy_common::{Direction, Verdict};

use super::flow::{Flow, FlowPeer};
use crate::model::{LabelSelector, ObjectRef, SelectorTextError, parse_selector};

/// A pod or policy named `namespace/name`, or `name` in any namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamePattern {
    pub namespace: Option<String>,
    pub name: String,
}

impl NamePattern {
    fn parse(what: &'static str, text: &str) -> Result<Self, FilterError> {
        let bad = || FilterError::Name {
            what,
            text: text.to_owned(),
        };
        let (namespace, name) = match text.split_once('/') {
            Some((ns, name)) if !ns.is_empty() => (Some(ns.to_owned()), name),
            Some(_) => return Err(bad()),
            None => (None, text),
        };
        if name.is_empty() || name.contains('/') {
            return Err(bad());
        }
        Ok(Self {
            namespace,
            name: name.to_owned(),
        })
    }

    fn matches(&self, namespace: &str, name: &str) -> bool {
        self.name == name && self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }

    fn matches_ref(&self, object: &ObjectRef) -> bool {
        self.matches(&object.namespace, &object.name)
    }
}

/// Why a filter is rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("{what} {text:?}: expected NAME or NAMESPACE/NAME")]
    Name { what: &'static str, text: String },
    #[error("verdict {0:?}: expected allowed or denied")]
    Verdict(String),
    #[error("direction {0:?}: expected ingress or egress")]
    Direction(String),
    #[error("protocol {0:?}: expected TCP, UDP, SCTP, ICMP or ICMPv6")]
    Protocol(String),
    #[error("port {0}: not a port number")]
    Port(u32),
    #[error(transparent)]
    Selector(#[from] SelectorTextError),
}

/// See the module docs. [`FlowFilter::default`] keeps every flow.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    pub namespaces: BTreeSet<String>,
    pub pods: Vec<NamePattern>,
    pub selector: Option<LabelSelector>,
    pub verdict: Option<Verdict>,
    pub direction: Option<Direction>,
    /// Names as [`Flow::protocol_name`] spells them.
    pub protocols: BTreeSet<String>,
    pub ports: BTreeSet<u16>,
    pub policies: Vec<NamePattern>,
}

/// The filter as the API carries it (strings), before parsing.
#[derive(Clone, Debug, Default)]
pub struct FilterText<'a> {
    pub namespaces: &'a [String],
    pub pods: &'a [String],
    pub label_selector: &'a str,
    pub verdict: &'a str,
    pub direction: &'a str,
    pub protocols: &'a [String],
    pub ports: &'a [u32],
    pub policies: &'a [String],
}

impl FlowFilter {
    pub fn parse(text: &FilterText<'_>) -> Result<Self, FilterError> {
        let verdict = match text.verdict.to_ascii_lowercase().as_str() {
            "" => None,
            "allowed" => Some(Verdict::Allowed),
            "denied" | "dropped" => Some(Verdict::Denied),
            _ => return Err(FilterError::Verdict(text.verdict.to_owned())),
        };
        let direction = match text.direction.to_ascii_lowercase().as_str() {
            "" => None,
            "ingress" => Some(Direction::Ingress),
            "egress" => Some(Direction::Egress),
            _ => return Err(FilterError::Direction(text.direction.to_owned())),
        };
        let protocols = text
            .protocols
            .iter()
            .map(|p| match p.to_ascii_uppercase().as_str() {
                "TCP" | "UDP" | "SCTP" | "ICMP" => Ok(p.to_ascii_uppercase()),
                "ICMPV6" => Ok("ICMPv6".to_owned()),
                _ => Err(FilterError::Protocol(p.clone())),
            })
            .collect::<Result<_, _>>()?;
        let ports = text
            .ports
            .iter()
            .map(|&p| u16::try_from(p).map_err(|_| FilterError::Port(p)))
            .collect::<Result<_, _>>()?;
        let selector = if text.label_selector.trim().is_empty() {
            None
        } else {
            Some(parse_selector(text.label_selector)?)
        };
        Ok(Self {
            namespaces: text.namespaces.iter().cloned().collect(),
            pods: text
                .pods
                .iter()
                .map(|p| NamePattern::parse("pod", p))
                .collect::<Result<_, _>>()?,
            selector,
            verdict,
            direction,
            protocols,
            ports,
            policies: text
                .policies
                .iter()
                .map(|p| NamePattern::parse("policy", p))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        let ends = [&flow.source, &flow.destination];
        let any_pod = |f: &dyn Fn(&FlowPeer) -> bool| ends.iter().any(|p| f(p));
        self.verdict.is_none_or(|v| v == flow.verdict)
            && self.direction.is_none_or(|d| d == flow.direction)
            && (self.protocols.is_empty() || self.protocols.contains(flow.protocol_name().as_ref()))
            && (self.ports.is_empty()
                || (flow.has_ports() && ends.iter().any(|p| self.ports.contains(&p.port))))
            && (self.namespaces.is_empty()
                || any_pod(&|p| {
                    p.pod()
                        .is_some_and(|pod| self.namespaces.contains(&pod.namespace))
                }))
            && (self.pods.is_empty()
                || any_pod(&|p| {
                    p.pod().is_some_and(|pod| {
                        self.pods
                            .iter()
                            .any(|pat| pat.matches(&pod.namespace, &pod.name))
                    })
                }))
            && self
                .selector
                .as_ref()
                .is_none_or(|s| any_pod(&|p| p.pod().is_some_and(|pod| s.matches(&pod.labels))))
            && (self.policies.is_empty()
                || self.policies.iter().any(|pat| policy_matches(pat, flow)))
    }
}

fn policy_matches(pattern: &NamePattern, flow: &Flow) -> bool {
    flow.decided_by
        .as_ref()
        .is_some_and(|rule| pattern.matches(&rule.namespace, &rule.policy))
        || flow.isolated_by.iter().any(|p| pattern.matches_ref(p))
}
