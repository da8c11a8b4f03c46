//! Reporting what the compiler and the source found: each diagnostic is
//! logged once when it appears and once when it clears, counted in the
//! metrics, and handed to every registered [`DiagnosticSink`] (e.g. the
//! Kubernetes Event sink).
//!
//! Two streams: the compiler's [`Diagnostic`]s (every compile lists all of
//! them; the [`Reporter`] diffs consecutive lists) and the files source's
//! [`FileProblem`]s (published whole on each load; diffed the same way).
//! Both end up in the status as [`AgentDiagnostic`]s.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::diagnostics::DiagnosticSink;
use super::metrics::{DiagnosticLabels, Metrics};
use crate::model::{Diagnostic, Severity};
use crate::source::files::FileProblem;

/// A diagnostic as the status lists it: from the compiler or about a file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgentDiagnostic {
    Object(Diagnostic),
    File(FileProblem),
}

impl AgentDiagnostic {
    /// Its severity.
    pub fn severity(&self) -> Severity {
        match self {
            AgentDiagnostic::Object(d) => d.severity,
            AgentDiagnostic::File(p) => p.severity,
        }
    }

    fn labels(&self) -> DiagnosticLabels {
        match self {
            AgentDiagnostic::Object(d) => DiagnosticLabels {
                severity: d.severity.as_str().to_owned(),
                kind: d.object.as_str().to_owned(),
                code: d.code.as_str().to_owned(),
            },
            AgentDiagnostic::File(p) => DiagnosticLabels {
                severity: p.severity.as_str().to_owned(),
                kind: "File".to_owned(),
                code: p.code.to_owned(),
            },
        }
    }
}

impl std::fmt::Display for AgentDiagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentDiagnostic::Object(d) => d.fmt(f),
            AgentDiagnostic::File(p) => write!(
                f,
                "{} File {}: {} ({})",
                p.severity.as_str(),
                p.path.display(),
                p.message,
                p.code
            ),
        }
    }
}

/// Diffs, logs, counts and forwards diagnostics.
pub struct Reporter {
    objects: BTreeSet<Diagnostic>,
    files: BTreeSet<FileProblem>,
    metrics: Arc<Metrics>,
    sinks: Vec<Arc<dyn DiagnosticSink>>,
}

impl Reporter {
    /// A reporter with nothing reported yet.
    pub fn new(metrics: Arc<Metrics>, sinks: Vec<Arc<dyn DiagnosticSink>>) -> Self {
        Self {
            objects: BTreeSet::new(),
            files: BTreeSet::new(),
            metrics,
            sinks,
        }
    }

    /// Takes the complete list of a compile's diagnostics.
    pub fn compiled(&mut self, all: &[Diagnostic]) {
        let now: BTreeSet<Diagnostic> = all.iter().cloned().collect();
        let appeared: Vec<Diagnostic> = now.difference(&self.objects).cloned().collect();
        let cleared: Vec<Diagnostic> = self.objects.difference(&now).cloned().collect();
        if appeared.is_empty() && cleared.is_empty() {
            return;
        }
        for d in &appeared {
            self.appeared(&AgentDiagnostic::Object(d.clone()));
        }
        for d in &cleared {
            self.cleared(&AgentDiagnostic::Object(d.clone()));
        }
        for sink in &self.sinks {
            sink.report(&appeared, &cleared);
        }
        self.objects = now;
    }

    /// Takes the complete list of the files source's problems.
    pub fn files(&mut self, all: &[FileProblem]) {
        let now: BTreeSet<FileProblem> = all.iter().cloned().collect();
        for p in now.difference(&self.files) {
            self.appeared(&AgentDiagnostic::File(p.clone()));
        }
        for p in self.files.difference(&now) {
            self.cleared(&AgentDiagnostic::File(p.clone()));
        }
        self.files = now;
    }

    /// Every current diagnostic, errors first.
    pub fn current(&self) -> Vec<AgentDiagnostic> {
        let mut all: Vec<AgentDiagnostic> = self
            .files
            .iter()
            .cloned()
            .map(AgentDiagnostic::File)
            .chain(self.objects.iter().cloned().map(AgentDiagnostic::Object))
            .collect();
        all.sort_by_key(|d| std::cmp::Reverse(d.severity()));
        all
    }

    fn appeared(&self, d: &AgentDiagnostic) {
        match d.severity() {
            Severity::Error => tracing::error!(diagnostic = %d, "diagnostic"),
            Severity::Warning => tracing::warn!(diagnostic = %d, "diagnostic"),
            Severity::Info => tracing::info!(diagnostic = %d, "diagnostic"),
        }
        let labels = d.labels();
        self.metrics.diagnostics.get_or_create(&labels).inc();
        self.metrics.diagnostics_active.get_or_create(&labels).inc();
    }

    fn cleared(&self, d: &AgentDiagnostic) {
        tracing::info!(diagnostic = %d, "diagnostic cleared");
        let labels = d.labels();
        self.metrics
            .diagnostics_cleared
            .get_or_create(&labels)
            .inc();
        self.metrics.diagnostics_active.get_or_create(&labels).dec();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::model::DiagnosticCode;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(usize, usize)>>);

    impl DiagnosticSink for Recorder {
        fn report(&self, appeared: &[Diagnostic], cleared: &[Diagnostic]) {
            self.0.lock().unwrap().push((appeared.len(), cleared.len()));
        }
    }

    fn diag(name: &str) -> Diagnostic {
        Diagnostic::policy(
            "ns",
            name,
            None,
            Severity::Error,
            DiagnosticCode::InvalidCidr,
            "bad",
        )
    }

    #[test]
    fn each_diagnostic_is_reported_once_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let sink = Arc::new(Recorder::default());
        let mut reporter = Reporter::new(metrics.clone(), vec![sink.clone()]);
        reporter.compiled(&[diag("a")]);
        reporter.compiled(&[diag("a")]);
        reporter.compiled(&[diag("a"), diag("b")]);
        reporter.compiled(&[diag("b")]);
        assert_eq!(*sink.0.lock().unwrap(), vec![(1, 0), (1, 0), (0, 1)]);
        let labels = DiagnosticLabels {
            severity: "error".into(),
            kind: "NetworkPolicy".into(),
            code: "invalid_cidr".into(),
        };
        assert_eq!(metrics.diagnostics.get_or_create(&labels).get(), 2);
        assert_eq!(metrics.diagnostics_cleared.get_or_create(&labels).get(), 1);
        assert_eq!(metrics.diagnostics_active.get_or_create(&labels).get(), 1);
        assert_eq!(reporter.current().len(), 1);
    }
}
