//! Results and the report.
//!
//! The executor records, per step, what each probe of
//! [`super::StepPlan::probes`] observed. A scenario:
//! - **fails** if any probe observed the opposite of its verdict or could not
//!   be run ([`Observed::Error`]), if the executor recorded an error (setup,
//!   agent), or if fewer steps were recorded than the scenario has;
//! - else is **skipped** if it was not run at all ([`ScenarioResult::skipped`],
//!   e.g. it needs what the API server lacks) or none of its probes ran
//!   (every one [`Observed::Skipped`], e.g. an SCTP-only scenario on a
//!   kernel without SCTP sockets): skipped is never counted as passed;
//! - else **passes**: every probe that ran matched. Skipped probes of a
//!   passing scenario are listed next to it.
//!
//! [`Report::render`] prints one line per scenario, and for a failing one
//! each failing table as expected and observed matrices side by side (`*`
//! marks a differing cell) followed by the differing probes, then the
//! summary line `N passed, N failed` (`, N skipped` when some were).

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::path::PathBuf;

use super::plan::StepPlan;
use super::probes::{CellCheck, Check, Probe, TableCheck};
use super::scenario::{Scenario, Verdict};

/// What happened to one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The server answered.
    Allowed,
    /// No answer within the timeout.
    Blocked,
    /// Not run, e.g. the kernel has no SCTP sockets; the reason is printed.
    Skipped(String),
    /// The probe could not be carried out, or got an answer that is neither
    /// (a TCP reset, a wrong reply); counts as a mismatch.
    Error(String),
}

impl Observed {
    /// The observed-matrix symbol: `.`, `X`, `-` (skipped), `!` (error).
    pub fn symbol(&self) -> char {
        match self {
            Self::Allowed => '.',
            Self::Blocked => 'X',
            Self::Skipped(_) => '-',
            Self::Error(_) => '!',
        }
    }

    /// Whether it is what `expected` asks; `None` when skipped.
    pub fn matches(&self, expected: Verdict) -> Option<bool> {
        match self {
            Self::Allowed => Some(expected == Verdict::Allow),
            Self::Blocked => Some(expected == Verdict::Deny),
            Self::Skipped(_) => None,
            Self::Error(_) => Some(false),
        }
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allowed => f.write_str("allowed"),
            Self::Blocked => f.write_str("blocked"),
            Self::Skipped(reason) => write!(f, "skipped ({reason})"),
            Self::Error(message) => write!(f, "error ({message})"),
        }
    }
}

/// A scenario's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Every probe that ran matched (and at least one ran).
    Passed,
    /// A mismatch, a probe error, a recorded error or missing steps.
    Failed,
    /// No probe ran.
    Skipped,
}

#[derive(Clone, Debug)]
struct StepResult {
    number: usize,
    about: String,
    probes: Vec<Probe>,
    checks: Vec<Check>,
    observed: Vec<Observed>,
}

/// The results of one scenario, step by step.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    name: String,
    path: PathBuf,
    step_count: usize,
    steps: Vec<StepResult>,
    errors: Vec<String>,
    /// Why the scenario was not run, if it was not.
    not_run: Option<String>,
}

impl ScenarioResult {
    /// An empty result for `scenario`.
    pub fn new(scenario: &Scenario) -> Self {
        Self {
            name: scenario.name.clone(),
            path: scenario.path.clone(),
            step_count: scenario.steps.len(),
            steps: Vec::new(),
            errors: Vec::new(),
            not_run: None,
        }
    }

    /// A scenario not run, for `reason`: it is skipped.
    pub fn skipped(scenario: &Scenario, reason: impl Into<String>) -> Self {
        Self {
            not_run: Some(reason.into()),
            ..Self::new(scenario)
        }
    }

    /// A failed result for something that could not even be planned (a file
    /// that did not load, a plan that failed): `name` is what to call it.
    pub fn failed(
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        error: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            step_count: 0,
            steps: Vec::new(),
            errors: vec![error.into()],
            not_run: None,
        }
    }

    /// The scenario's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records what the probes of `step` observed, in the order of
    /// `step.probes`.
    ///
    /// # Panics
    /// If `observed` does not have one entry per probe (an executor bug).
    pub fn record_step(&mut self, step: &StepPlan, observed: Vec<Observed>) {
        assert_eq!(
            observed.len(),
            step.probes.len(),
            "step {} of {}: one observation per probe",
            step.number,
            self.name
        );
        self.steps.push(StepResult {
            number: step.number,
            about: step.about.clone(),
            probes: step.probes.clone(),
            checks: step.checks.clone(),
            observed,
        });
    }

    /// Records an error outside the probes (setup, the agent not reporting
    /// enforcement, ...): the scenario fails.
    pub fn record_error(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    fn observations(&self) -> impl Iterator<Item = (&Probe, &Observed)> {
        self.steps
            .iter()
            .flat_map(|s| s.probes.iter().zip(&s.observed))
    }

    /// Probes that matched, that did not, and that were skipped.
    pub fn counts(&self) -> (usize, usize, usize) {
        let (mut matched, mut mismatched, mut skipped) = (0, 0, 0);
        for (probe, observed) in self.observations() {
            match observed.matches(probe.expected) {
                Some(true) => matched += 1,
                Some(false) => mismatched += 1,
                None => skipped += 1,
            }
        }
        (matched, mismatched, skipped)
    }

    /// The outcome (see the module docs).
    pub fn status(&self) -> Status {
        if self.not_run.is_some() && self.errors.is_empty() {
            return Status::Skipped;
        }
        let (matched, mismatched, _) = self.counts();
        if mismatched > 0 || !self.errors.is_empty() || self.steps.len() < self.step_count {
            Status::Failed
        } else if matched == 0 {
            Status::Skipped
        } else {
            Status::Passed
        }
    }

    /// This scenario's part of the report.
    pub fn render(&self) -> String {
        let (matched, mismatched, skipped) = self.counts();
        let total = matched + mismatched + skipped;
        let reasons: BTreeSet<&str> = self
            .observations()
            .filter_map(|(_, o)| match o {
                Observed::Skipped(reason) => Some(reason.as_str()),
                _ => None,
            })
            .collect();
        let reasons = reasons.into_iter().collect::<Vec<_>>().join("; ");
        let mut out = String::new();
        match self.status() {
            Status::Passed if skipped == 0 => writeln!(out, "PASS {} ({total} probes)", self.name),
            Status::Passed => {
                writeln!(
                    out,
                    "PASS {} ({skipped} of {total} probes skipped: {reasons})",
                    self.name
                )
            }
            Status::Skipped => match &self.not_run {
                Some(reason) => writeln!(out, "SKIP {} (not run: {reason})", self.name),
                None => writeln!(
                    out,
                    "SKIP {} (all {total} probes skipped: {reasons})",
                    self.name
                ),
            },
            Status::Failed if total == 0 => {
                writeln!(out, "FAIL {} ({})", self.name, self.path.display())
            }
            Status::Failed => {
                writeln!(
                    out,
                    "FAIL {} ({}): {mismatched} of {total} probes differ",
                    self.name,
                    self.path.display()
                )
            }
        }
        .expect("writing to a String");
        if self.status() != Status::Failed {
            return out;
        }
        for error in &self.errors {
            let _ = writeln!(out, "  error: {error}");
        }
        if self.steps.len() < self.step_count {
            let _ = writeln!(
                out,
                "  only {} of {} steps ran",
                self.steps.len(),
                self.step_count
            );
        }
        if mismatched > 0 {
            let _ = writeln!(
                out,
                "  (`.` allowed, `X` blocked, `-` skipped, `!` probe error, `*` differs from expected)"
            );
        }
        for step in &self.steps {
            render_step(&mut out, step, self.step_count);
        }
        out
    }
}

fn differs(step: &StepResult, index: usize) -> bool {
    step.observed[index].matches(step.probes[index].expected) == Some(false)
}

fn render_step(out: &mut String, step: &StepResult, step_count: usize) {
    let failing: Vec<&Check> = step
        .checks
        .iter()
        .filter(|check| match check {
            Check::Table(t) => t.cells.iter().flatten().any(|cell| match cell {
                CellCheck::Probes { probes, .. } => probes.iter().any(|&i| differs(step, i)),
                CellCheck::SelfCell => false,
            }),
            Check::Single { probes, .. } => probes.iter().any(|&i| differs(step, i)),
        })
        .collect();
    if failing.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  step {} of {}: {}",
        step.number, step_count, step.about
    );
    for check in failing {
        match check {
            Check::Table(table) => render_table(out, step, table),
            Check::Single {
                expect_index,
                probes,
                ..
            } => {
                for &i in probes.iter().filter(|&&i| differs(step, i)) {
                    let _ = writeln!(out, "    expect[{expect_index}]: {}", difference(step, i));
                }
            }
        }
    }
}

/// `from -> to PROTO port (family): expected allow, observed blocked`.
fn difference(step: &StepResult, i: usize) -> String {
    format!(
        "{}: expected {}, observed {}",
        step.probes[i], step.probes[i].expected, step.observed[i]
    )
}

fn render_table(out: &mut String, step: &StepResult, table: &TableCheck) {
    let mut probe_ids = Vec::new();
    let (mut expected, mut observed) = (vec![header(table)], vec![header(table)]);
    for (row, cells) in table.rows.iter().zip(&table.cells) {
        let mut exp = vec![row.to_string()];
        let mut obs = vec![row.to_string()];
        for cell in cells {
            match cell {
                CellCheck::SelfCell => {
                    exp.push(".".into());
                    obs.push(".".into());
                }
                CellCheck::Probes { expected, probes } => {
                    exp.push(expected.symbol().to_string());
                    let mismatch = probes.iter().copied().find(|&i| differs(step, i));
                    let shown = mismatch
                        .or_else(|| {
                            probes
                                .iter()
                                .copied()
                                .find(|&i| !matches!(step.observed[i], Observed::Skipped(_)))
                        })
                        .unwrap_or(probes[0]);
                    let mut symbol = step.observed[shown].symbol().to_string();
                    if mismatch.is_some() {
                        symbol.push('*');
                    }
                    obs.push(symbol);
                    probe_ids.extend(probes.iter().copied().filter(|&i| differs(step, i)));
                }
            }
        }
        expected.push(exp);
        observed.push(obs);
    }
    let total: usize = table
        .cells
        .iter()
        .flatten()
        .map(|c| match c {
            CellCheck::Probes { probes, .. } => probes.len(),
            CellCheck::SelfCell => 0,
        })
        .sum();
    let _ = writeln!(
        out,
        "    expect[{}]: {} {}: {} of {total} probes differ",
        table.expect_index,
        table.protocol,
        table.port,
        probe_ids.len()
    );
    // Column widths: the widest of the names and the cells (`X*` is 2 wide).
    let columns = expected[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            expected
                .iter()
                .chain(&observed)
                .map(|row| row[c].len())
                .max()
                .unwrap_or(1)
        })
        .collect();
    let line = |cells: &[String]| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        text.join(" ")
    };
    let left: Vec<String> = expected.iter().map(|r| line(r)).collect();
    let right: Vec<String> = observed.iter().map(|r| line(r)).collect();
    let width = left
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("expected".len());
    let _ = writeln!(out, "      {:<width$} | observed", "expected");
    for (l, r) in left.iter().zip(&right) {
        let _ = writeln!(out, "      {l:<width$} | {}", r.trim_end());
    }
    for i in probe_ids {
        let _ = writeln!(out, "      {}", difference(step, i));
    }
}

fn header(table: &TableCheck) -> Vec<String> {
    std::iter::once(".".to_owned())
        .chain(table.columns.iter().map(ToString::to_string))
        .collect()
}

/// Scenario counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Scenarios that passed.
    pub passed: usize,
    /// Scenarios that failed.
    pub failed: usize,
    /// Scenarios none of whose probes ran.
    pub skipped: usize,
}

impl fmt::Display for Summary {
    /// `N passed, N failed`, then `, N skipped` when some were.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        if self.skipped > 0 {
            write!(f, ", {} skipped", self.skipped)?;
        }
        Ok(())
    }
}

/// Every scenario's result.
#[derive(Clone, Debug, Default)]
pub struct Report {
    results: Vec<ScenarioResult>,
}

impl Report {
    /// Adds a scenario's result.
    pub fn push(&mut self, result: ScenarioResult) {
        self.results.push(result);
    }

    /// The results, in the order pushed.
    pub fn results(&self) -> &[ScenarioResult] {
        &self.results
    }

    /// The counts of the summary line.
    pub fn summary(&self) -> Summary {
        let mut summary = Summary::default();
        for result in &self.results {
            match result.status() {
                Status::Passed => summary.passed += 1,
                Status::Failed => summary.failed += 1,
                Status::Skipped => summary.skipped += 1,
            }
        }
        summary
    }

    /// Whether no scenario failed (skipped ones do not fail the run).
    pub fn success(&self) -> bool {
        self.summary().failed == 0
    }

    /// The whole report: each scenario, then the summary line.
    pub fn render(&self) -> String {
        let mut out: String = self.results.iter().map(ScenarioResult::render).collect();
        let _ = writeln!(out, "{}", self.summary());
        out
    }
}
