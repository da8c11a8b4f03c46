//! Where compiler and conversion diagnostics go: a log line always, a metric,
//! and a Kubernetes Event on the object when the agent runs against an API
//! server. The reconciler calls every sink with the diagnostics that appeared
//! and those that cleared since the previous compile, so a sink reports each
//! problem once, not on every compile.

use crate::model::Diagnostic;

pub trait DiagnosticSink: Send + Sync {
    /// `appeared`: new since the last compile; `cleared`: gone since then.
    fn report(&self, appeared: &[Diagnostic], cleared: &[Diagnostic]);
}
