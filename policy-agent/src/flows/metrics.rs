//! Flow counters: connections by verdict, direction and protocol, blocked
//! connections by protocol and port, lost and invalid records.

use std::collections::HashSet;
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
        let verdict = match flow.verdict {
            policy_common::Verdict::Allowed => "allowed",
            policy_common::Verdict::Denied => "denied",
        };
        let protocol = match flow.protocol_name() {
            // Dropped before its headers were read.
            name if name.is_empty() => "none".into(),
            name => name,
        };
        self.flows
            .get_or_create(&FlowLabels {
                verdict: verdict.to_owned(),
                direction: flow.direction.as_str().to_owned(),
                protocol: protocol.to_string(),
            })
            .inc();
        if flow.verdict == policy_common::Verdict::Denied {
            let port = if flow.has_ports() {
                self.port_label(flow.destination.port)
            } else {
                "none".to_owned()
            };
            self.blocked
                .get_or_create(&BlockedLabels {
                    protocol: protocol.into_owned(),
                    port,
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

    fn port_label(&self, port: u16) -> String {
        let mut labels = self.port_labels.lock().unwrap_or_else(|e| e.into_inner());
        if labels.contains(&port) || labels.len() < MAX_PORT_LABELS {
            labels.insert(port);
            port.to_string()
        } else {
            "other".to_owned()
        }
    }
}
