//! The agent's metrics: one `prometheus-client` registry. The HTTP endpoint
//! that serves it is a later step; for now [`Metrics::samples`] feeds the
//! status API, which lists every sample.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
        this
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
}
