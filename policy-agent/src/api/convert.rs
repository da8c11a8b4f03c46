//! Between the agent's types and the API's messages.

use std::net::IpAddr;

use super::proto;
use crate::agent::endpoints::EndpointSpec;
use crate::agent::metrics::Sample;
use crate::agent::report::AgentDiagnostic;
use crate::agent::status::{EndpointStatus, Snapshot};
use crate::compile::RuleRef;
use crate::explain::{Explanation, Query, QueryError, Side, parse_query};
use crate::model::Severity;

/// A `RegisterRequest` checked: every field set, addresses parsed.
pub fn endpoint_spec(req: proto::RegisterRequest) -> Result<EndpointSpec, String> {
    for (field, value) in [
        ("namespace", &req.namespace),
        ("pod_name", &req.pod_name),
        ("container_id", &req.container_id),
        ("host_interface", &req.host_interface),
    ] {
        if value.trim().is_empty() {
            return Err(format!("{field} is empty"));
        }
    }
    if req.host_interface.len() > 15 || req.host_interface.contains(['/', '\0', ' ']) {
        return Err(format!("invalid interface name {:?}", req.host_interface));
    }
    let ips = req
        .ips
        .iter()
        .map(|s| {
            s.parse::<IpAddr>()
                // Accept CIDR notation as CNI results write it.
                .or_else(|_| s.split('/').next().unwrap_or("").parse())
                .map_err(|_| format!("invalid address {s:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EndpointSpec {
        container_id: req.container_id,
        namespace: req.namespace,
        pod_name: req.pod_name,
        netns_path: req.netns_path,
        host_interface: req.host_interface,
        ips,
    })
}

/// The message of an endpoint.
pub fn endpoint(e: &EndpointStatus) -> proto::Endpoint {
    let r = &e.record;
    proto::Endpoint {
        container_id: r.container_id.clone(),
        namespace: r.namespace.clone(),
        pod_name: r.pod_name.clone(),
        netns_path: r.netns_path.clone(),
        host_interface: r.host_interface.clone(),
        ifindex: r.ifindex,
        endpoint_id: r.endpoint_id,
        ips: r.ips.iter().map(ToString::to_string).collect(),
        enforced_revision: e.enforced_revision,
        pod_known: e.pod_known,
        ingress_isolated: e.ingress_isolated,
        egress_isolated: e.egress_isolated,
    }
}

fn diagnostic(d: &AgentDiagnostic) -> proto::Diagnostic {
    match d {
        AgentDiagnostic::Object(d) => proto::Diagnostic {
            severity: d.severity.as_str().to_owned(),
            object_kind: d.object.as_str().to_owned(),
            namespace: d.namespace.clone(),
            name: d.name.clone(),
            rule: d
                .rule
                .map(|(direction, index)| format!("{} rule {index}", direction.as_str()))
                .unwrap_or_default(),
            code: d.code.as_str().to_owned(),
            message: d.message.clone(),
        },
        AgentDiagnostic::File(p) => proto::Diagnostic {
            severity: p.severity.as_str().to_owned(),
            object_kind: "File".to_owned(),
            namespace: String::new(),
            name: p.path.display().to_string(),
            rule: String::new(),
            code: p.code.to_owned(),
            message: p.message.clone(),
        },
    }
}

/// The summary of the current diagnostics.
pub fn diagnostics(all: &[AgentDiagnostic]) -> proto::DiagnosticsSummary {
    let count = |s: Severity| all.iter().filter(|d| d.severity() == s).count() as u32;
    proto::DiagnosticsSummary {
        errors: count(Severity::Error),
        warnings: count(Severity::Warning),
        infos: count(Severity::Info),
        items: all.iter().map(diagnostic).collect(),
    }
}

/// The status message.
pub fn status(
    s: &Snapshot,
    samples: Vec<Sample>,
    boot_id: &str,
    uptime_seconds: u64,
) -> proto::AgentStatus {
    proto::AgentStatus {
        node_name: s.node_name.clone(),
        source: s.source.clone(),
        revision: s.revision,
        enforced_revision: s.enforced_revision,
        ready: s.ready,
        waiting_for: s.waiting_for.clone(),
        endpoints: s.endpoints.iter().map(endpoint).collect(),
        diagnostics: Some(diagnostics(&s.diagnostics)),
        metrics: samples
            .into_iter()
            .map(|m| proto::Metric {
                name: m.name,
                labels: m.labels,
                value: m.value,
            })
            .collect(),
        last_error: s.last_error.clone().unwrap_or_default(),
        failed_revision: s.failed_revision,
        boot_id: boot_id.to_owned(),
        uptime_seconds,
    }
}

/// An `ExplainRequest` checked: parties, protocol (default TCP) and port.
pub fn explain_query(req: &proto::ExplainRequest) -> Result<Query, QueryError> {
    parse_query(&req.from, &req.to, &req.protocol, req.port)
}

fn policy_rule(r: &RuleRef) -> proto::PolicyRule {
    proto::PolicyRule {
        namespace: r.namespace.clone(),
        name: r.policy.clone(),
        direction: r.direction.as_str().to_owned(),
        rule_index: r.index as u32,
    }
}

fn explain_side(side: &Side) -> proto::ExplainSide {
    proto::ExplainSide {
        direction: side.direction.as_str().to_owned(),
        pod: side
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_default(),
        allowed: side.allows(),
        allowed_by: side.rule.as_ref().map(policy_rule),
        policies: side
            .policies
            .iter()
            .map(|p| proto::ExplainPolicy {
                policy: Some(proto::PolicyName {
                    namespace: p.policy.namespace.clone(),
                    name: p.policy.name.clone(),
                }),
                rules: p
                    .rules
                    .iter()
                    .map(|r| proto::ExplainRule {
                        rule_index: r.index as u32,
                        matched: r.matches,
                        reason: format!("peers: {}; ports: {}", r.peers, r.ports),
                    })
                    .collect(),
            })
            .collect(),
        disagreement: side.disagreement.clone().unwrap_or_default(),
    }
}

/// The response for an explanation of the state at `revision` (0 offline).
pub fn explain_response(e: &Explanation, revision: u64) -> proto::ExplainResponse {
    proto::ExplainResponse {
        allowed: e.allowed(),
        sides: [&e.egress, &e.ingress]
            .into_iter()
            .map(explain_side)
            .collect(),
        text: e.to_string(),
        revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> proto::RegisterRequest {
        proto::RegisterRequest {
            namespace: "ns".into(),
            pod_name: "p".into(),
            container_id: "c".into(),
            netns_path: "/run/netns/x".into(),
            host_interface: "veth0".into(),
            ips: vec!["10.0.0.2/32".into(), "fd00::2".into()],
        }
    }

    #[test]
    fn register_requests_are_checked() {
        let spec = endpoint_spec(request()).unwrap();
        assert_eq!(spec.ips.len(), 2);
        let mut r = request();
        r.container_id = " ".into();
        assert!(endpoint_spec(r).unwrap_err().contains("container_id"));
        let mut r = request();
        r.ips.push("nope".into());
        assert!(endpoint_spec(r).unwrap_err().contains("nope"));
        let mut r = request();
        r.host_interface = "a-very-long-interface-name".into();
        assert!(endpoint_spec(r).is_err());
    }

    #[test]
    fn explain_requests_are_checked() {
        use crate::explain::Party;
        use crate::model::{ObjectRef, Protocol};
        let request = |from: &str, to: &str, protocol: &str, port: u32| proto::ExplainRequest {
            from: from.into(),
            to: to.into(),
            protocol: protocol.into(),
            port,
        };
        let q = explain_query(&request("shop/web", "10.0.0.1", "", 443)).unwrap();
        assert_eq!(q.from, Party::Pod(ObjectRef::new("shop", "web")));
        assert_eq!(q.to, Party::Address("10.0.0.1".parse().unwrap()));
        assert_eq!((q.protocol, q.port), (Protocol::Tcp, 443));
        let q = explain_query(&request("node", "a/b", "udp", 53)).unwrap();
        assert_eq!((q.from, q.protocol), (Party::Node, Protocol::Udp));
        assert_eq!(
            explain_query(&request("a/b", "c/d", "", 0)),
            Err(QueryError::Port(0))
        );
        assert!(matches!(
            explain_query(&request("a/b", "c/d", "GRE", 1)),
            Err(QueryError::Protocol(_))
        ));
        assert!(matches!(
            explain_query(&request("", "c/d", "", 1)),
            Err(QueryError::Party { field: "from", .. })
        ));
    }

    #[test]
    fn explanations_become_responses() {
        use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
        let pod = |name: &str, ip: &str, app: &str| -> core::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns", "labels": {"app": app}},
                "spec": {"nodeName": "n", "containers": []},
                "status": {"podIPs": [{"ip": ip}]}
            }))
            .unwrap()
        };
        let policy: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                             "ports": [{"port": 80}]}]
            }
        }))
        .unwrap();
        let (state, rejected) = crate::model::ClusterState::from_k8s(
            [],
            &[
                pod("web", "10.0.0.2", "web"),
                pod("client", "10.0.0.3", "client"),
            ],
            &[policy],
        );
        assert!(rejected.is_empty());
        let explain = |port: u32| {
            let q = explain_query(&proto::ExplainRequest {
                from: "ns/client".into(),
                to: "ns/web".into(),
                protocol: String::new(),
                port,
            })
            .unwrap();
            let e = crate::explain::explain(&state, &[], &q).unwrap();
            explain_response(&e, 9)
        };
        let allowed = explain(80);
        assert!(allowed.allowed);
        assert_eq!(allowed.revision, 9);
        assert_eq!(allowed.sides.len(), 2);
        let (egress, ingress) = (&allowed.sides[0], &allowed.sides[1]);
        assert_eq!(
            (egress.direction.as_str(), egress.pod.as_str()),
            ("egress", "ns/client")
        );
        assert!(egress.allowed && egress.policies.is_empty() && egress.allowed_by.is_none());
        assert_eq!(
            (ingress.direction.as_str(), ingress.pod.as_str()),
            ("ingress", "ns/web")
        );
        assert_eq!(
            ingress.allowed_by,
            Some(proto::PolicyRule {
                namespace: "ns".into(),
                name: "web".into(),
                direction: "ingress".into(),
                rule_index: 0,
            })
        );
        assert!(ingress.policies[0].rules[0].matched);
        assert!(allowed.text.contains("ALLOWED"), "{}", allowed.text);

        let denied = explain(81);
        assert!(!denied.allowed);
        assert!(!denied.sides[1].allowed && denied.sides[1].allowed_by.is_none());
        let rule = &denied.sides[1].policies[0].rules[0];
        assert!(!rule.matched);
        assert!(
            rule.reason.contains("81/TCP is not in [80/TCP]"),
            "{}",
            rule.reason
        );
        assert!(denied.text.contains("DENIED"), "{}", denied.text);
    }
}
