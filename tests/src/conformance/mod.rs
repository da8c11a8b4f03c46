//! The pure part of the conformance runner: reachability scenarios (see
//! `shared/scenarios/FORMAT.md`) read, validated, turned into a plan of
//! cluster changes and probes, and the results reported.
//!
//! Nothing here touches the network. The executor (network namespaces, the
//! agent, real sockets) drives it like this:
//!
//! ```no_run
//! use palisade_tests::conformance::{self, Observed, Report, RunConfig, ScenarioResult};
//!
//! # fn run_probe(_: &conformance::Probe) -> Observed { Observed::Allowed }
//! let scenarios = conformance::load_dir("tests/scenarios".as_ref()).expect("valid scenarios");
//! let mut report = Report::default();
//! for scenario in &scenarios {
//!     let plan = scenario.plan(&RunConfig::default()).expect("plannable");
//!     // carry out plan.setup (pods, externals, services, objects for the source)
//!     let mut result = ScenarioResult::new(scenario);
//!     for step in &plan.steps {
//!         // carry out step.changes, wait until the agent enforced them, then:
//!         let observed = step.probes.iter().map(run_probe).collect();
//!         result.record_step(step, observed);
//!     }
//!     report.push(result);
//! }
//! print!("{}", report.render()); // ends with "N passed, N failed[, N skipped]"
//! ```
//!
//! Modules: [`scenario`] (the model and loader), [`spec`] (the file as
//! written), [`validate`], [`syntax`] and [`matrix`] (what a valid scenario
//! is), [`objects`] (Kubernetes objects in and out), [`ipam`] (addresses for
//! pods without one), [`state`] (the step-by-step state machine), [`plan`]
//! (the [`Change`]s and [`StepPlan`]s it yields), [`probes`] (expectations
//! expanded into [`Probe`]s), [`report`] (results, matrices, summary line),
//! [`server_support`] (what a scenario needs of a kube-apiserver).

pub mod error;
pub mod ipam;
pub mod matrix;
pub mod objects;
pub mod plan;
pub mod probes;
pub mod report;
pub mod scenario;
pub mod server_support;
pub mod spec;
pub mod state;
pub mod syntax;
pub mod validate;

#[cfg(test)]
mod oracle;
#[cfg(test)]
mod tests;

pub use error::{LoadError, Location, Problem, ScenarioError, ScenarioErrors};
pub use ipam::IpPool;
pub use plan::{
    Backend, Change, Plan, PodInfo, RunConfig, ServicePortRules, ServiceRules, SourceEdit, StepPlan,
};
pub use probes::{CellCheck, Check, Family, Probe, TableCheck};
pub use report::{Observed, Report, ScenarioResult, Status, Summary};
pub use scenario::{
    Endpoint, Expectation, KnownObject, Labels, NamespacedName, ObjectKey, PortRef, Protocol,
    Scenario, Server, SourceObject, Verdict, load_dir, load_file, parse_str, scenario_paths,
};
pub use server_support::ServerSupport;
pub use state::ScenarioState;
