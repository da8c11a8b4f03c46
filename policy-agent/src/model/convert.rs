//! Conversion from the API's wire types (k8s-openapi) to the model.
//!
//! Conversion applies the API server's defaults and checks its validation
//! rules, so that the compiler sees exactly what a conforming API server would
//! have stored. Whatever fails is reported as a [`Diagnostic`] and left out in
//! the way that allows less:
//!
//! * a bad peer or port entry is dropped from its rule; the rule keeps its
//!   other entries, and a list emptied this way allows nothing (it does not
//!   become "all", which an empty list means in the API);
//! * a bad `podSelector` or `policyTypes` makes the whole policy allow nothing
//!   while still isolating every pod it may select: a `podSelector` is
//!   widened to the requirements that parse (a superset of the pods it could
//!   mean), and unknown `policyTypes` isolate both directions.
//!
//! Only objects without a name or namespace are rejected as a whole (`Err`).

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use policy_common::Direction;

use super::diagnostic::{Diagnostic, DiagnosticCode, ObjectKind, Severity};
use super::error::ConvertError;
use super::objects::{NamedPort, Namespace, Pod};
use super::policy::{
    IpBlock, Peer, Peers, Policy, PolicyPort, PortRef, Ports, Protocol, Rule, parse_cidr,
    port_number,
};
use super::selector::{LabelSelector, Requirement, SelectorError};

/// A converted object with the problems found in parts of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted<T> {
    /// The object, without its invalid parts.
    pub value: T,
    /// What was left out or changed, and why.
    pub diagnostics: Vec<Diagnostic>,
}

fn requirement_from_k8s(
    wire: &meta::LabelSelectorRequirement,
) -> Result<Requirement, SelectorError> {
    Requirement::new(
        wire.key.clone(),
        &wire.operator,
        wire.values.iter().flatten().cloned(),
    )
}

/// Converts a label selector; any invalid requirement makes it an error.
pub fn label_selector_from_k8s(wire: &meta::LabelSelector) -> Result<LabelSelector, SelectorError> {
    let requirements = wire
        .match_expressions
        .iter()
        .flatten()
        .map(requirement_from_k8s)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LabelSelector::new(
        wire.match_labels.clone().unwrap_or_default(),
        requirements,
    ))
}

/// The selector made of the valid parts of `wire` only. It matches every
/// label set the full selector could match, whatever the invalid parts were
/// meant to mean, so it is the safe choice for deciding whom to isolate.
pub fn label_selector_superset_from_k8s(wire: &meta::LabelSelector) -> LabelSelector {
    let requirements = wire
        .match_expressions
        .iter()
        .flatten()
        .filter_map(|r| requirement_from_k8s(r).ok());
    LabelSelector::new(
        wire.match_labels.clone().unwrap_or_default(),
        requirements.collect(),
    )
}

fn object_name(meta: &meta::ObjectMeta) -> Result<String, ConvertError> {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(ConvertError::MissingName)
}

fn object_namespace(meta: &meta::ObjectMeta) -> Result<String, ConvertError> {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(ConvertError::MissingNamespace)
}

/// Converts a Namespace, adding the `kubernetes.io/metadata.name` label.
pub fn namespace_from_k8s(wire: &core::Namespace) -> Result<Namespace, ConvertError> {
    let name = object_name(&wire.metadata)?;
    Ok(Namespace::new(
        name,
        wire.metadata.labels.clone().unwrap_or_default(),
    ))
}

/// Converts a Pod.
///
/// Addresses come from `status.podIPs` (or `status.podIP`); a pod in phase
/// `Succeeded` or `Failed` gets none, since its addresses may already belong
/// to a new pod. Named ports come from all containers and init containers
/// (sidecars can serve); invalid ones are left out with a diagnostic.
pub fn pod_from_k8s(wire: &core::Pod) -> Result<Converted<Pod>, ConvertError> {
    let namespace = object_namespace(&wire.metadata)?;
    let name = object_name(&wire.metadata)?;
    let mut diagnostics = Vec::new();
    let mut report = |error: ConvertError| {
        diagnostics.push(Diagnostic::pod(
            &namespace,
            &name,
            Severity::Warning,
            error.code(),
            format!("{error}; ignored"),
        ));
    };

    let spec = wire.spec.as_ref();
    let status = wire.status.as_ref();
    let terminated = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );

    let mut ips: Vec<IpAddr> = Vec::new();
    if !terminated {
        let listed: Vec<&str> = match status {
            Some(s) => match &s.pod_ips {
                Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
                _ => s.pod_ip.iter().map(String::as_str).collect(),
            },
            None => Vec::new(),
        };
        for text in listed {
            match text.parse::<IpAddr>() {
                Ok(ip) => {
                    let ip = ip.to_canonical();
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
                Err(_) => report(ConvertError::InvalidPodIp(text.to_owned())),
            }
        }
    }

    let mut named_ports = BTreeSet::new();
    let containers = spec.into_iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    });
    for port in containers.flat_map(|c| c.ports.iter().flatten()) {
        let Some(port_name) = port.name.as_ref() else {
            continue;
        };
        let protocol = match port.protocol.as_deref() {
            None => Ok(Protocol::Tcp),
            Some(p) => Protocol::parse(p),
        };
        let number = port_number(i64::from(port.container_port));
        match (protocol, number) {
            (Ok(protocol), Ok(port)) => {
                named_ports.insert(NamedPort {
                    name: port_name.clone(),
                    port,
                    protocol,
                });
            }
            (Err(e), _) | (_, Err(e)) => report(ConvertError::InvalidContainerPort {
                name: port_name.clone(),
                reason: e.to_string(),
            }),
        }
    }

    let pod = Pod {
        labels: wire.metadata.labels.clone().unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()),
        ips,
        named_ports: named_ports.into_iter().collect(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        namespace,
        name,
    };
    Ok(Converted {
        value: pod,
        diagnostics,
    })
}

/// Converts an ipBlock; also says whether a CIDR had host bits set.
pub fn ip_block_from_k8s(wire: &net::IPBlock) -> Result<(IpBlock, bool), ConvertError> {
    let (cidr, mut host_bits) = parse_cidr(&wire.cidr)?;
    let mut except = Vec::new();
    for text in wire.except.iter().flatten() {
        let (e, bits) = parse_cidr(text)?;
        host_bits |= bits;
        except.push(e);
    }
    Ok((IpBlock::new(cidr, except)?, host_bits))
}

/// Converts one peer (without the host-bits note; see [`ip_block_from_k8s`]).
pub fn peer_from_k8s(wire: &net::NetworkPolicyPeer) -> Result<Peer, ConvertError> {
    Ok(peer_with_note(wire)?.0)
}

fn peer_with_note(wire: &net::NetworkPolicyPeer) -> Result<(Peer, bool), ConvertError> {
    let pods = wire.pod_selector.as_ref();
    let namespaces = wire.namespace_selector.as_ref();
    match (&wire.ip_block, pods, namespaces) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(ConvertError::IpBlockWithSelector),
        (Some(block), None, None) => {
            let (block, host_bits) = ip_block_from_k8s(block)?;
            Ok((Peer::IpBlock(block), host_bits))
        }
        (None, Some(p), None) => Ok((Peer::PodSelector(label_selector_from_k8s(p)?), false)),
        (None, None, Some(n)) => Ok((Peer::NamespaceSelector(label_selector_from_k8s(n)?), false)),
        (None, Some(p), Some(n)) => Ok((
            Peer::PodAndNamespaceSelector {
                pod: label_selector_from_k8s(p)?,
                namespace: label_selector_from_k8s(n)?,
            },
            false,
        )),
        (None, None, None) => Err(ConvertError::EmptyPeer),
    }
}

/// Converts one port entry, defaulting the protocol to TCP.
pub fn port_from_k8s(wire: &net::NetworkPolicyPort) -> Result<PolicyPort, ConvertError> {
    let protocol = match wire.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(p) => Protocol::parse(p)?,
    };
    let port = match &wire.port {
        None => None,
        Some(IntOrString::Int(n)) => Some(PortRef::Number(port_number(i64::from(*n))?)),
        Some(IntOrString::String(s)) => Some(PortRef::Named(s.clone())),
    };
    PolicyPort::new(protocol, port, wire.end_port.map(i64::from))
}

/// Collects problems of one policy.
struct PolicyReport<'a> {
    namespace: &'a str,
    name: &'a str,
    diagnostics: Vec<Diagnostic>,
}

impl PolicyReport<'_> {
    fn push(
        &mut self,
        rule: Option<(Direction, usize)>,
        severity: Severity,
        code: DiagnosticCode,
        message: String,
    ) {
        self.diagnostics.push(Diagnostic::policy(
            self.namespace,
            self.name,
            rule,
            severity,
            code,
            message,
        ));
    }
}

fn rule_from_k8s(
    peers: Option<&Vec<net::NetworkPolicyPeer>>,
    ports: Option<&Vec<net::NetworkPolicyPort>>,
    at: (Direction, usize),
    report: &mut PolicyReport<'_>,
) -> Rule {
    let peers = match peers {
        None => Peers::All,
        Some(list) if list.is_empty() => Peers::All,
        Some(list) => {
            let mut kept = Vec::new();
            for (i, wire) in list.iter().enumerate() {
                match peer_with_note(wire) {
                    Ok((peer, host_bits)) => {
                        if host_bits {
                            report.push(
                                Some(at),
                                Severity::Info,
                                DiagnosticCode::CidrHostBits,
                                format!(
                                    "peer {i}: ipBlock CIDR has host bits set; they are ignored"
                                ),
                            );
                        }
                        kept.push(peer);
                    }
                    Err(e) => report.push(
                        Some(at),
                        Severity::Error,
                        e.code(),
                        format!("peer {i}: {e}; this peer allows nothing"),
                    ),
                }
            }
            Peers::Only(kept)
        }
    };
    let ports = match ports {
        None => Ports::All,
        Some(list) if list.is_empty() => Ports::All,
        Some(list) => {
            let mut kept = Vec::new();
            for (i, wire) in list.iter().enumerate() {
                match port_from_k8s(wire) {
                    Ok(port) => kept.push(port),
                    Err(e) => report.push(
                        Some(at),
                        Severity::Error,
                        e.code(),
                        format!("port {i}: {e}; this port entry allows nothing"),
                    ),
                }
            }
            Ports::Only(kept)
        }
    };
    Rule { peers, ports }
}

/// Converts a NetworkPolicy, applying the API server's defaults.
///
/// `policyTypes` absent or empty means `Ingress`, plus `Egress` when the
/// `egress` list is non-empty. An absent `spec` or `podSelector` is empty (as
/// in the Go types, where they are not pointers): the policy selects every
/// pod of its namespace. Rules of a direction the policy does not declare are
/// dropped (they have no effect), with an informational diagnostic.
pub fn policy_from_k8s(wire: &net::NetworkPolicy) -> Result<Converted<Policy>, ConvertError> {
    let namespace = object_namespace(&wire.metadata)?;
    let name = object_name(&wire.metadata)?;
    let mut report = PolicyReport {
        namespace: &namespace,
        name: &name,
        diagnostics: Vec::new(),
    };

    let default_spec = net::NetworkPolicySpec::default();
    let spec = wire.spec.as_ref().unwrap_or(&default_spec);
    let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
    let egress_rules = spec.egress.as_deref().unwrap_or_default();

    let mut valid = true;
    let pod_selector = match spec.pod_selector.as_ref() {
        None => LabelSelector::everything(),
        Some(wire_selector) => match label_selector_from_k8s(wire_selector) {
            Ok(s) => s,
            Err(e) => {
                valid = false;
                report.push(
                    None,
                    Severity::Error,
                    DiagnosticCode::InvalidSelector,
                    format!(
                        "podSelector: {e}; the policy allows nothing and isolates every pod \
                         matching the rest of its selector"
                    ),
                );
                label_selector_superset_from_k8s(wire_selector)
            }
        },
    };

    let (mut isolates_ingress, mut isolates_egress) = (false, false);
    match spec.policy_types.as_deref() {
        None | Some([]) => {
            isolates_ingress = true;
            isolates_egress = !egress_rules.is_empty();
        }
        Some(types) => {
            for t in types {
                match t.as_str() {
                    "Ingress" => isolates_ingress = true,
                    "Egress" => isolates_egress = true,
                    other => {
                        valid = false;
                        let e = ConvertError::UnknownPolicyType(other.to_owned());
                        report.push(
                            None,
                            Severity::Error,
                            e.code(),
                            format!(
                                "{e}; the policy allows nothing and isolates its pods in both \
                                 directions"
                            ),
                        );
                    }
                }
            }
            if !valid {
                isolates_ingress = true;
                isolates_egress = true;
            }
        }
    }

    let mut policy = Policy {
        namespace: namespace.clone(),
        name: name.clone(),
        pod_selector,
        isolates_ingress,
        isolates_egress,
        ingress: Vec::new(),
        egress: Vec::new(),
    };
    if valid {
        if isolates_ingress {
            policy.ingress = ingress_rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    rule_from_k8s(
                        r.from.as_ref(),
                        r.ports.as_ref(),
                        (Direction::Ingress, i),
                        &mut report,
                    )
                })
                .collect();
        } else if !ingress_rules.is_empty() {
            report.push(
                None,
                Severity::Info,
                DiagnosticCode::IgnoredRules,
                "ingress rules are ignored: policyTypes does not include Ingress".to_owned(),
            );
        }
        if isolates_egress {
            policy.egress = egress_rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    rule_from_k8s(
                        r.to.as_ref(),
                        r.ports.as_ref(),
                        (Direction::Egress, i),
                        &mut report,
                    )
                })
                .collect();
        } else if !egress_rules.is_empty() {
            report.push(
                None,
                Severity::Info,
                DiagnosticCode::IgnoredRules,
                "egress rules are ignored: policyTypes does not include Egress".to_owned(),
            );
        }
    }
    let diagnostics = report.diagnostics;
    Ok(Converted {
        value: policy,
        diagnostics,
    })
}

/// A diagnostic for an object rejected as a whole (no name or namespace).
pub fn rejected(kind: ObjectKind, meta: &meta::ObjectMeta, error: &ConvertError) -> Diagnostic {
    Diagnostic {
        object: kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        rule: None,
        severity: Severity::Error,
        code: error.code(),
        message: format!("{error}; object ignored"),
    }
}
