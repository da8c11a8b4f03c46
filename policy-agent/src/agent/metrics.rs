//! The agent's metrics: one `prometheus-client` registry, served by
//! `policy-agent run --metrics-listen ADDR` at `GET /metrics`
//! ([`super::metrics_http`]) and listed sample by sample in the status API
//! ([`Metrics::samples`]).
//!
//! Other modules may keep metrics of their own in this registry: add a
//! public field and register it in [`Metrics::new`].

use std::sync::Arc;

use std::time::Duration;

use policy_common::{GENERATIONS, capacity};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::compile::Desired;

use crate::flows::FlowMetrics;

/// Labels of per-kind source counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Namespace`, `Pod`, `NetworkPolicy`, `NodeAddresses`.
    pub kind: String,
}

/// Labels of outcome counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of apply errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyErrorLabels {
    /// `map_full` (a map has no room: E2BIG, ENOSPC, ENOMEM) or `other`.
    pub reason: String,
}

/// Labels of diagnostic counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiagnosticLabels {
    pub severity: String,
    /// `NetworkPolicy`, `Pod`, `Namespace`, `File`.
    pub kind: String,
    pub code: String,
}

/// Labels of endpoint operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `register`, `unregister`.
    pub operation: String,
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of map occupancy gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    /// `endpoints`, `peer_ips`, `peer_cidrs`, `policy`.
    pub map: String,
}

impl MapLabels {
    fn new(map: &str) -> Self {
        Self {
            map: map.to_owned(),
        }
    }
}

/// The maps whose occupancy is reported: the verdict maps the writer fills
/// from the compiler's output, with their capacity (both generations).
const OCCUPANCY_MAPS: [(&str, u32); 4] = [
    ("endpoints", capacity::ENDPOINTS * GENERATIONS),
    ("peer_ips", capacity::PEER_IPS),
    ("peer_cidrs", capacity::PEER_CIDRS),
    ("policy", capacity::POLICY),
];

/// Buckets of the latency histograms: 100 µs doubling to about 6.5 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every metric of the agent, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Updates received from the source, by kind.
    pub source_updates: Family<KindLabels, Counter>,
    /// Compile-and-apply rounds, by result.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Failed applies, by reason. Never silent: each is also logged and
    /// shown in the status.
    pub apply_errors: Family<ApplyErrorLabels, Counter>,
    /// Map entries written and removed by the writer.
    pub map_entries_written: Counter,
    pub map_entries_removed: Counter,
    /// Endpoint epochs bumped (their connections judged again).
    pub epochs_bumped: Counter,
    /// Diagnostics that appeared, by severity, object kind and code.
    pub diagnostics: Family<DiagnosticLabels, Counter>,
    /// Diagnostics that cleared.
    pub diagnostics_cleared: Family<DiagnosticLabels, Counter>,
    /// Endpoint registrations and unregistrations.
    pub endpoint_operations: Family<OperationLabels, Counter>,
    /// Failures to write the state directory.
    pub state_write_errors: Counter,
    /// Registered endpoints now.
    pub endpoints: Gauge,
    /// Current diagnostics, by severity and code.
    pub diagnostics_active: Family<DiagnosticLabels, Gauge>,
    /// The agent's revision and the last enforced one.
    pub revision: Gauge,
    pub enforced_revision: Gauge,
    /// The flow pipeline's counters.
    pub flows: Arc<FlowMetrics>,
    /// Seconds spent compiling the cluster state into map contents.
    pub compile_seconds: Histogram,
    /// Seconds spent applying compiled contents to the maps (successful or
    /// not).
    pub apply_seconds: Histogram,
    /// Entries of each verdict map after the last successful apply, both
    /// generations counted (each holds the whole state after an apply).
    pub map_entries: Family<MapLabels, Gauge>,
    /// Capacity (max_entries) of each verdict map.
    pub map_capacity: Family<MapLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut this = Self {
            registry: Registry::with_prefix("palisade_agent"),
            source_updates: Family::default(),
            reconciles: Family::default(),
            apply_errors: Family::default(),
            map_entries_written: Counter::default(),
            map_entries_removed: Counter::default(),
            epochs_bumped: Counter::default(),
            diagnostics: Family::default(),
            diagnostics_cleared: Family::default(),
            endpoint_operations: Family::default(),
            state_write_errors: Counter::default(),
            endpoints: Gauge::default(),
            diagnostics_active: Family::default(),
            revision: Gauge::default(),
            enforced_revision: Gauge::default(),
            flows: Arc::default(),
            compile_seconds: latency_histogram(),
            apply_seconds: latency_histogram(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
        };
        this.flows.register(&mut this.registry);
        this.registry.register(
            "source_updates",
            "Updates received from the source, by kind",
            this.source_updates.clone(),
        );
        this.registry.register(
            "reconciles",
            "Compile-and-apply rounds, by result",
            this.reconciles.clone(),
        );
        this.registry.register(
            "apply_errors",
            "Map updates that failed, by reason (map_full: a map has no room)",
            this.apply_errors.clone(),
        );
        this.registry.register(
            "map_entries_written",
            "Map entries written",
            this.map_entries_written.clone(),
        );
        this.registry.register(
            "map_entries_removed",
            "Map entries removed",
            this.map_entries_removed.clone(),
        );
        this.registry.register(
            "epochs_bumped",
            "Endpoint policy epochs bumped",
            this.epochs_bumped.clone(),
        );
        this.registry.register(
            "diagnostics",
            "Diagnostics that appeared, by severity, object kind and code",
            this.diagnostics.clone(),
        );
        this.registry.register(
            "diagnostics_cleared",
            "Diagnostics that cleared, by severity, object kind and code",
            this.diagnostics_cleared.clone(),
        );
        this.registry.register(
            "endpoint_operations",
            "Endpoint registrations and unregistrations, by result",
            this.endpoint_operations.clone(),
        );
        this.registry.register(
            "state_write_errors",
            "Failures to write the state directory",
            this.state_write_errors.clone(),
        );
        this.registry
            .register("endpoints", "Registered endpoints", this.endpoints.clone());
        this.registry.register(
            "diagnostics_active",
            "Current diagnostics, by severity, object kind and code",
            this.diagnostics_active.clone(),
        );
        this.registry.register(
            "revision",
            "Changes the agent has seen",
            this.revision.clone(),
        );
        this.registry.register(
            "enforced_revision",
            "The last revision programmed into the maps",
            this.enforced_revision.clone(),
        );
        this.registry.register_with_unit(
            "compile_duration",
            "Time to compile the cluster state into map contents",
            Unit::Seconds,
            this.compile_seconds.clone(),
        );
        this.registry.register_with_unit(
            "apply_duration",
            "Time to apply compiled contents to the maps (successful or not)",
            Unit::Seconds,
            this.apply_seconds.clone(),
        );
        this.registry.register(
            "map_entries",
            "Entries of each verdict map after the last successful apply (both generations)",
            this.map_entries.clone(),
        );
        this.registry.register(
            "map_capacity",
            "Capacity (max_entries) of each verdict map",
            this.map_capacity.clone(),
        );
        for (map, capacity) in OCCUPANCY_MAPS {
            this.map_capacity
                .get_or_create(&MapLabels::new(map))
                .set(i64::from(capacity));
            this.map_entries.get_or_create(&MapLabels::new(map)).set(0);
        }
        this
    }

    /// Records the occupancy of the maps after `desired` was applied.
    pub fn map_occupancy(&self, desired: &Desired) {
        let generations = i64::from(GENERATIONS);
        for (map, count) in [
            ("endpoints", desired.endpoints.len()),
            ("peer_ips", desired.peer_ips.len()),
            ("peer_cidrs", desired.peer_cidrs.len()),
            ("policy", desired.policy.len()),
        ] {
            self.map_entries
                .get_or_create(&MapLabels::new(map))
                .set(count as i64 * generations);
        }
    }

    /// Records one compile's duration.
    pub fn observe_compile(&self, elapsed: Duration) {
        self.compile_seconds.observe(elapsed.as_secs_f64());
    }

    /// Records one apply's duration.
    pub fn observe_apply(&self, elapsed: Duration) {
        self.apply_seconds.observe(elapsed.as_secs_f64());
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Every sample: (name, labels without braces, value).
    pub fn samples(&self) -> Vec<Sample> {
        parse_samples(&self.encode())
    }
}

/// One sample of the text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// Parses the sample lines of the text format (comments and `# EOF` skipped).
fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').unwrap_or(rest)),
                None => (series, ""),
            };
            Some(Sample {
                name: name.to_owned(),
                labels: labels.to_owned(),
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_list_counters_with_labels() {
        let metrics = Metrics::new();
        metrics
            .diagnostics
            .get_or_create(&DiagnosticLabels {
                severity: "error".into(),
                kind: "NetworkPolicy".into(),
                code: "invalid_cidr".into(),
            })
            .inc();
        metrics.revision.set(7);
        let samples = metrics.samples();
        assert!(samples.contains(&Sample {
            name: "palisade_agent_diagnostics_total".into(),
            labels: r#"severity="error",kind="NetworkPolicy",code="invalid_cidr""#.into(),
            value: 1.0,
        }));
        assert!(samples.contains(&Sample {
            name: "palisade_agent_revision".into(),
            labels: String::new(),
            value: 7.0,
        }));
    }

    #[test]
    fn latency_histograms_and_map_occupancy() {
        let metrics = Metrics::new();
        metrics.observe_compile(Duration::from_millis(3));
        metrics.observe_apply(Duration::from_millis(20));
        let mut desired = Desired::default();
        desired
            .endpoints
            .insert(7, policy_common::EndpointInfo::default());
        metrics.map_occupancy(&desired);
        let text = metrics.encode();
        assert!(
            text.contains("# UNIT palisade_agent_compile_duration_seconds seconds"),
            "{text}"
        );
        let samples = metrics.samples();
        let value = |name: &str, labels: &str| {
            samples
                .iter()
                .find(|s| s.name == name && s.labels == labels)
                .map(|s| s.value)
        };
        assert_eq!(
            value("palisade_agent_compile_duration_seconds_count", ""),
            Some(1.0)
        );
        assert_eq!(
            value("palisade_agent_apply_duration_seconds_count", ""),
            Some(1.0)
        );
        let sum = value("palisade_agent_apply_duration_seconds_sum", "").unwrap();
        assert!((sum - 0.02).abs() < 1e-9, "{sum}");
        // Seconds: 20 ms is above the 12.8 ms bucket and within the 25.6 ms one.
        let bucket = |le: f64| {
            samples
                .iter()
                .find(|s| {
                    s.name == "palisade_agent_apply_duration_seconds_bucket"
                        && s.labels
                            .trim_start_matches("le=\"")
                            .trim_end_matches('"')
                            .parse::<f64>()
                            .is_ok_and(|b| (b - le).abs() < 1e-9)
                })
                .map(|s| s.value)
        };
        assert_eq!(bucket(0.0128), Some(0.0));
        assert_eq!(bucket(0.0256), Some(1.0));
        assert_eq!(
            value("palisade_agent_map_entries", r#"map="endpoints""#),
            Some(2.0)
        );
        assert_eq!(
            value("palisade_agent_map_entries", r#"map="policy""#),
            Some(0.0)
        );
        assert_eq!(
            value("palisade_agent_map_capacity", r#"map="endpoints""#),
            Some(8192.0)
        );
        assert_eq!(
            value("palisade_agent_map_capacity", r#"map="peer_ips""#),
            Some(262_144.0)
        );
    }
}
