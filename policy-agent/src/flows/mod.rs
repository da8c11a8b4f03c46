//! The flow pipeline: "which policy dropped my packet?", answered live.
//!
//! The classifier writes one record per new-connection verdict and per drop
//! into its ring buffer. The agent drains it continuously ([`pipeline`]),
//! decodes each record (length and codes checked), names both ends and the
//! deciding policy from the last programmed state ([`names`], [`flow`]),
//! counts it ([`metrics`]) and hands it to the [`hub`]: a bounded history of
//! recent flows plus a broadcast to live observers. Nothing here can slow
//! the datapath: the kernel drops records when the ring is full (and counts
//! them), and an observer that falls behind misses flows (and is told how
//! many). [`filter`] is the server-side filter of the Flows API.

pub mod filter;
pub mod flow;
pub mod hub;
pub mod metrics;
pub mod names;
pub mod pipeline;

pub use filter::{FilterError, FlowFilter};
pub use flow::{Flow, FlowPeer, PeerKind};
pub use hub::{FlowHub, Subscription};
pub use metrics::FlowMetrics;
pub use names::{FlowNames, PodName};
pub use pipeline::{FlowPipeline, FlowTap};
