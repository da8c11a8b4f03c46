//! Flow counters: connections by verdict, direction and protocol, blocked
//! connections by protocol and port, lost and invalid records.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::flow::Flow;

/// Distinct port values the blocked-connections counter labels; further
/// ports count under `port="other"`, so a port scan cannot blow up the
/// series count.
pub const MAX_PORT_LABELS: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    /// `allowed` or `denied`.
    pub verdict: String,
    /// `ingress` or `egress`.
    pub direction: String,
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlockedLabels {
    pub protocol: String,
    /// The destination port, `other` past [`MAX_PORT_LABELS`] values,
    /// `none` for protocols without ports.
    pub port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LostLabels {
    /// `kernel`: the ring buffer was full; `observer`: an observer of the
    /// Flows API fell behind.
    pub at: String,
}

/// See the module docs.
#[derive(Default)]
pub struct FlowMetrics {
    /// Verdicts on new connections, and drops.
    pub flows: Family<FlowLabels, Counter>,
    /// Denied flows (each dropped SYN retransmission counts).
    pub blocked: Family<BlockedLabels, Counter>,
    pub lost: Family<LostLabels, Counter>,
    /// Ring-buffer records that did not decode.
    pub invalid: Counter,
    port_labels: Mutex<HashSet<u16>>,
    /// The counters of the label sets seen so far, by a key that costs no
    /// allocation: a flow is counted by one small-key lookup, not by
    /// building label strings (the pipeline counts millions a second).
    counters: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    /// (verdict, direction, protocol, family known) → `flows` series.
    flows: HashMap<(bool, u8, u8, bool), Counter>,
    /// (protocol, family known, port: `None` for none or other) → `blocked`
    /// series.
    blocked: HashMap<(u8, bool, Option<u16>), Counter>,
}

impl FlowMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flows",
            "Flow verdicts (new connections and drops), by verdict, direction and protocol",
            self.flows.clone(),
        );
        registry.register(
            "blocked_connections",
            "Denied flows, by protocol and destination port",
            self.blocked.clone(),
        );
        registry.register(
            "flow_events_lost",
            "Flow events lost: kernel (ring buffer full) or observer (an observer fell behind)",
            self.lost.clone(),
        );
        registry.register(
            "flow_records_invalid",
            "Ring-buffer records that did not decode",
            self.invalid.clone(),
        );
    }

    /// Counts one flow.
    pub fn count(&self, flow: &Flow) {
        let denied = flow.verdict == policy_common::Verdict::Denied;
        let known = flow.family != 0;
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let flows_key = (denied, flow.direction as u8, flow.protocol, known);
        counters
            .flows
            .entry(flows_key)
            .or_insert_with(|| {
                self.flows
                    .get_or_create(&FlowLabels {
                        verdict: if denied { "denied" } else { "allowed" }.to_owned(),
                        direction: flow.direction.as_str().to_owned(),
                        protocol: protocol_label(flow),
                    })
                    .clone()
            })
            .inc();
        if denied {
            let port = (flow.has_ports() && self.port_labelled(flow.destination.port))
                .then_some(flow.destination.port);
            counters
                .blocked
                .entry((flow.protocol, known, port))
                .or_insert_with(|| {
                    let port = match port {
                        Some(port) => port.to_string(),
                        None if flow.has_ports() => "other".to_owned(),
                        None => "none".to_owned(),
                    };
                    self.blocked
                        .get_or_create(&BlockedLabels {
                            protocol: protocol_label(flow),
                            port,
                        })
                        .clone()
                })
                .inc();
        }
    }

    pub fn lost(&self, at: &str, n: u64) {
        if n > 0 {
            self.lost
                .get_or_create(&LostLabels { at: at.to_owned() })
                .inc_by(n);
        }
    }

    /// Whether `port` has a label of its own (else it counts as `other`).
    fn port_labelled(&self, port: u16) -> bool {
        let mut labels = self.port_labels.lock().unwrap_or_else(|e| e.into_inner());
        if labels.contains(&port) || labels.len() < MAX_PORT_LABELS {
            labels.insert(port);
            true
        } else {
            false
        }
    }
}

/// A flow's protocol label: its name, `none` when it was dropped before its
/// headers were read.
fn protocol_label(flow: &Flow) -> String {
    match flow.protocol_name() {
        name if name.is_empty() => "none".to_owned(),
        name => name.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use policy_common::{Direction, Reason, Verdict, proto};
    use prometheus_client::encoding::text::encode;

    use super::*;
    use crate::flows::flow::{FlowPeer, PeerKind};

    fn flow(verdict: Verdict, protocol: u8, family: u8, port: u16) -> Flow {
        let peer = |port| FlowPeer {
            kind: PeerKind::World,
            ip: None,
            port,
        };
        Flow {
            sequence: 0,
            time: SystemTime::UNIX_EPOCH,
            verdict,
            reason: match verdict {
                Verdict::Allowed => Reason::AllowedByPolicy,
                Verdict::Denied => Reason::DeniedByPolicy,
            },
            direction: Direction::Ingress,
            protocol,
            family,
            source: peer(40000),
            destination: peer(port),
            endpoint: None,
            endpoint_id: 1,
            ifindex: 1,
            decided_by: None,
            isolated_by: Arc::from([]),
            peer_identity: 0,
            packet_bytes: 60,
            tcp_flags_or_icmp_type: 0,
            revision: 1,
        }
    }

    fn scrape(metrics: &FlowMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encodes");
        text
    }

    #[test]
    fn flows_count_under_their_labels_and_ports_past_the_limit_as_other() {
        let metrics = FlowMetrics::default();
        for _ in 0..3 {
            metrics.count(&flow(Verdict::Denied, proto::TCP, 4, 8080));
        }
        metrics.count(&flow(Verdict::Allowed, proto::UDP, 6, 53));
        metrics.count(&flow(Verdict::Denied, proto::ICMP, 4, 0));
        metrics.count(&flow(Verdict::Denied, 0, 0, 0));
        for port in 0..MAX_PORT_LABELS as u16 + 2 {
            metrics.count(&flow(Verdict::Denied, proto::UDP, 4, 1000 + port));
        }
        let text = scrape(&metrics);
        for line in [
            r#"flows_total{verdict="denied",direction="ingress",protocol="TCP"} 3"#,
            r#"flows_total{verdict="allowed",direction="ingress",protocol="UDP"} 1"#,
            r#"flows_total{verdict="denied",direction="ingress",protocol="none"} 1"#,
            r#"blocked_connections_total{protocol="TCP",port="8080"} 3"#,
            r#"blocked_connections_total{protocol="ICMP",port="none"} 1"#,
            r#"blocked_connections_total{protocol="none",port="none"} 1"#,
            // 8080 took one of the labels: the last three UDP ports are other.
            r#"blocked_connections_total{protocol="UDP",port="other"} 3"#,
            r#"blocked_connections_total{protocol="UDP",port="1000"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert_eq!(
            text.matches("blocked_connections_total{").count(),
            MAX_PORT_LABELS + 3
        );
    }
}
