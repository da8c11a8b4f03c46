//! Every probed cell asked of the live agent's `Explain` too: the verdict
//! `policy-agent explain` gives must be the one the scenario expects (and
//! the classifier enforced), so what operators are told is what happens.
//!
//! Cells towards a service are not asked: the probe goes through kube-proxy's
//! DNAT, and explain judges the backend pods, not the service address.

use palisade_tests::agent::proto;
use palisade_tests::conformance::{Endpoint, Observed, Probe, Verdict};

use crate::cluster::Cluster;

/// What the explain check found over a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub agreed: usize,
    pub disagreed: usize,
    /// Service destinations and skipped probes.
    pub not_asked: usize,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.agreed += other.agreed;
        self.disagreed += other.disagreed;
        self.not_asked += other.not_asked;
    }
}

/// Asks the agent about each probe of a step; returns one message per cell
/// where explain's verdict is not the expected one.
pub fn check(
    cluster: &mut Cluster,
    probes: &[Probe],
    observed: &[Observed],
) -> (Tally, Vec<String>) {
    let mut tally = Tally::default();
    let mut problems = Vec::new();
    for (probe, seen) in probes.iter().zip(observed) {
        let (from, to) = match (
            cluster.address(&probe.from, probe.family),
            cluster.address(&probe.to, probe.family),
        ) {
            (Some(from), Some(to))
                if !matches!(probe.to, Endpoint::Service(_))
                    && !matches!(seen, Observed::Skipped(_)) =>
            {
                (from, to)
            }
            _ => {
                tally.not_asked += 1;
                continue;
            }
        };
        let request = proto::ExplainRequest {
            from: from.to_string(),
            to: to.to_string(),
            protocol: probe.protocol.as_str().to_owned(),
            port: probe.port.into(),
        };
        let cell = format!(
            "{} -> {} {}/{}",
            probe.from, probe.to, probe.port, probe.protocol
        );
        match cluster.client().explain(request) {
            Ok(answer) => {
                let expected = probe.expected == Verdict::Allow;
                if answer.allowed == expected {
                    tally.agreed += 1;
                } else {
                    tally.disagreed += 1;
                    problems.push(format!(
                        "explain says {} for {cell}, the scenario expects {}:\n{}",
                        if answer.allowed { "allowed" } else { "denied" },
                        if expected { "allowed" } else { "denied" },
                        answer.text
                    ));
                }
            }
            Err(e) => {
                tally.disagreed += 1;
                problems.push(format!("explain failed for {cell}: {e}"));
            }
        }
    }
    (tally, problems)
}
