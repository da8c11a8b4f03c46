//! The policy domain model: namespaces, pods and validated NetworkPolicies,
//! apart from the API's wire types, and the conversion from those.
//!
//! * [`selector`]: label selectors and matching.
//! * [`objects`]: namespaces and pods.
//! * [`policy`]: a validated NetworkPolicy with the API's defaults applied.
//! * [`convert`]: k8s-openapi types to the model, with diagnostics.
//! * [`state`]: the whole cluster, the compiler's input.
//! * [`diagnostic`] and [`error`]: what is reported instead of failing.

pub mod convert;
pub mod diagnostic;
pub mod error;
pub mod objects;
pub mod policy;
pub mod selector;
pub mod selector_text;
pub mod state;

pub use diagnostic::{Diagnostic, DiagnosticCode, ObjectKind, Severity};
pub use error::ConvertError;
pub use objects::{NAMESPACE_NAME_LABEL, NamedPort, Namespace, ObjectRef, Pod};
pub use policy::{IpBlock, Peer, Peers, Policy, PolicyPort, PortRef, Ports, Protocol, Rule};
pub use selector::{LabelSelector, Labels, Operator, Requirement, SelectorError};
pub use selector_text::{SelectorTextError, parse_selector};
pub use state::ClusterState;
