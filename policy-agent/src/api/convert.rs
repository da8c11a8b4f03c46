//! Between the agent's types and the API's messages.

use std::net::IpAddr;

use super::proto;
use crate::agent::endpoints::EndpointSpec;
use crate::agent::metrics::Sample;
use crate::agent::report::AgentDiagnostic;
use crate::agent::status::{EndpointStatus, Snapshot};
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
}
