//! How `policy-agent observe` prints flows: one line each, like
//! `hubble observe`, or one JSON object per line.

use std::fmt::Write as _;
use std::time::Duration;

use crate::api::proto;

/// The line layout: time, source, arrow, destination, protocol, verdict,
/// direction (then the reason and what decided, appended).
fn columns([time, src, arrow, dst, proto, verdict, dir]: [&str; 7]) -> String {
    format!("{time:<12}  {src:<32} {arrow:2} {dst:<32} {proto:<6} {verdict:<7} {dir:<7}")
}

/// Column titles of [`line`].
pub fn header() -> String {
    let titles = columns([
        "TIME",
        "SOURCE",
        "",
        "DESTINATION",
        "PROTO",
        "VERDICT",
        "DIR",
    ]);
    format!("{titles} REASON / POLICY")
}

/// One flow: `time src -> dst proto VERDICT dir reason policy`.
pub fn line(flow: &proto::Flow) -> String {
    let ports = matches!(flow.protocol.as_str(), "TCP" | "UDP" | "SCTP");
    let end = |peer: &Option<proto::FlowPeer>, port: u32| {
        let name = peer.as_ref().map_or_else(|| "?".to_owned(), peer_name);
        if ports {
            format!("{name}:{port}")
        } else {
            name
        }
    };
    // Dropped before its headers were read: say where instead.
    let (source, destination) = if flow.protocol.is_empty() {
        let at = match &flow.endpoint {
            Some(pod) => format!("(at {}/{})", pod.namespace, pod.name),
            None => format!("(at interface {})", flow.ifindex),
        };
        (at, "?".to_owned())
    } else {
        (
            end(&flow.source, flow.source_port),
            end(&flow.destination, flow.destination_port),
        )
    };
    let protocol = if flow.protocol.is_empty() {
        "-"
    } else {
        &flow.protocol
    };
    let mut out = columns([
        &clock(flow.time_unix_nano),
        &source,
        "->",
        &destination,
        protocol,
        &flow.verdict.to_ascii_uppercase(),
        &flow.direction,
    ]);
    let _ = write!(out, " {}", flow.reason);
    if let Some(rule) = &flow.decided_by {
        let _ = write!(
            out,
            " by {}/{} {}[{}]",
            rule.namespace, rule.name, rule.direction, rule.rule_index
        );
    }
    if !flow.isolated_by.is_empty() {
        let names: Vec<String> = flow
            .isolated_by
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let _ = write!(
            out,
            " (no rule allows it; isolated by {})",
            names.join(", ")
        );
    }
    out
}

/// A notice of lost flows.
pub fn lost_line(lost: &proto::LostFlows) -> String {
    let mut parts = Vec::new();
    if lost.kernel > 0 {
        parts.push(format!(
            "{} dropped by the classifier (ring buffer full)",
            lost.kernel
        ));
    }
    if lost.observer > 0 {
        parts.push(format!(
            "{} missed by this observer (too slow)",
            lost.observer
        ));
    }
    format!("-- flows lost: {} --", parts.join(", "))
}

/// `ns/pod`, `node`, the CIDR, `world`, or the address.
fn peer_name(peer: &proto::FlowPeer) -> String {
    match peer.kind.as_str() {
        "pod" => format!("{}/{}", peer.namespace, peer.name),
        "node" => "node".to_owned(),
        "cidr" if peer.ip.contains(':') => format!("[{}] ({})", peer.ip, peer.cidr),
        "cidr" => format!("{} ({})", peer.ip, peer.cidr),
        "world" if peer.ip.contains(':') => format!("[{}] (world)", peer.ip),
        "world" => format!("{} (world)", peer.ip),
        _ => "?".to_owned(),
    }
}

/// Local time `HH:MM:SS.mmm`.
fn clock(unix_nano: i64) -> String {
    let wall = Duration::from_nanos(u64::try_from(unix_nano).unwrap_or(0));
    let secs = libc::time_t::try_from(wall.as_secs()).unwrap_or(0);
    // SAFETY: all-zero is a valid `tm`; localtime_r writes only into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        wall.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ip: &str) -> Option<proto::FlowPeer> {
        Some(proto::FlowPeer {
            kind: "pod".into(),
            ip: ip.into(),
            namespace: ns.into(),
            name: name.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_denied_flow_names_the_isolating_policies() {
        let flow = proto::Flow {
            verdict: "denied".into(),
            reason: "denied_by_policy".into(),
            direction: "ingress".into(),
            protocol: "TCP".into(),
            source: pod("shop", "front-end", "10.0.0.2"),
            destination: pod("shop", "catalogue-db", "10.0.0.4"),
            source_port: 40000,
            destination_port: 3306,
            isolated_by: vec![proto::PolicyName {
                namespace: "shop".into(),
                name: "default-deny".into(),
            }],
            ..Default::default()
        };
        let text = line(&flow);
        assert!(text.contains("shop/front-end:40000"), "{text}");
        assert!(text.contains("-> shop/catalogue-db:3306"), "{text}");
        assert!(text.contains("DENIED"), "{text}");
        assert!(text.contains("isolated by shop/default-deny"), "{text}");
    }

    #[test]
    fn a_drop_before_the_headers_says_where() {
        let flow = proto::Flow {
            verdict: "denied".into(),
            reason: "dropped_unknown_endpoint".into(),
            direction: "egress".into(),
            ifindex: 42,
            ..Default::default()
        };
        let text = line(&flow);
        assert!(text.contains("(at interface 42)"), "{text}");
        assert!(text.contains(" -  "), "{text}");
        assert!(text.contains("dropped_unknown_endpoint"), "{text}");
    }

    #[test]
    fn an_allowed_flow_names_the_rule() {
        let flow = proto::Flow {
            verdict: "allowed".into(),
            reason: "allowed_by_policy".into(),
            direction: "egress".into(),
            protocol: "ICMP".into(),
            source: pod("a", "x", "10.0.0.2"),
            destination: Some(proto::FlowPeer {
                kind: "cidr".into(),
                ip: "192.0.2.1".into(),
                cidr: "192.0.2.0/24".into(),
                ..Default::default()
            }),
            decided_by: Some(proto::PolicyRule {
                namespace: "a".into(),
                name: "egress-out".into(),
                direction: "egress".into(),
                rule_index: 1,
            }),
            ..Default::default()
        };
        let text = line(&flow);
        assert!(text.contains("-> 192.0.2.1 (192.0.2.0/24)"), "{text}");
        assert!(text.contains("ALLOWED"), "{text}");
        assert!(text.contains("by a/egress-out egress[1]"), "{text}");
        assert!(!text.contains("a/x:"), "ICMP has no ports: {text}");
    }
}
