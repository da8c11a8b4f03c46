//! How the rest of the agent (the API server) talks to the reconciler:
//! commands on a channel for what changes state (register, unregister,
//! sync), the published [`Snapshot`] for what only reads it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::endpoints::{EndpointRecord, EndpointSpec};
use super::metrics::Metrics;
use super::status::{Snapshot, WaitState};
use crate::explain::{ExplainError, Explanation, Query};
use crate::flows::FlowHub;
use crate::source::files::FilesHandle;
use crate::source::kube::{CatchUpError, KubeHandle};

/// A request to the reconciler.
#[derive(Debug)]
pub enum Command {
    Register(
        EndpointSpec,
        oneshot::Sender<Result<Registered, CommandError>>,
    ),
    Unregister(String, oneshot::Sender<Result<Unregistered, CommandError>>),
    /// The current revision, after every update already sent by the source
    /// has been taken in.
    Revision(oneshot::Sender<u64>),
    /// Explains a connection against the state the reconciler compiles.
    Explain(Query, oneshot::Sender<Result<Explained, CommandError>>),
}

/// An explanation, and the revision of the state it explains.
#[derive(Clone, Debug)]
pub struct Explained {
    pub explanation: Explanation,
    pub revision: u64,
}

/// A registration done.
#[derive(Clone, Debug)]
pub struct Registered {
    pub record: EndpointRecord,
    /// The revision that includes it.
    pub revision: u64,
}

/// An unregistration done.
#[derive(Clone, Copy, Debug)]
pub struct Unregistered {
    pub found: bool,
    pub revision: u64,
    pub connections_flushed: usize,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no interface {interface} in the agent's network namespace: {source}")]
    NoInterface {
        interface: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] super::endpoints::RegistryError),
    #[error("{0}")]
    Datapath(#[from] crate::datapath::DatapathError),
    #[error("the agent has not compiled the cluster state yet ({0})")]
    NotCompiled(String),
    #[error(transparent)]
    Explain(#[from] ExplainError),
    #[error("cannot catch up with the Kubernetes API server: {0}")]
    CatchUp(#[from] CatchUpError),
    #[error("the source did not catch up within {0:?}")]
    SyncTimeout(Duration),
    #[error("the agent is stopping")]
    Stopped,
}

/// Why a wait for enforcement ended without it.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("not enforced within {timeout:?}: {reason}")]
    Timeout { timeout: Duration, reason: String },
    #[error("the agent could not enforce revision {revision}: {error}")]
    Failed { revision: u64, error: String },
    #[error("endpoint {0} is not registered")]
    NotFound(String),
    #[error("the agent is stopping")]
    Stopped,
}

/// A cloneable handle on the running reconciler.
#[derive(Clone)]
pub struct AgentHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) status: watch::Receiver<Arc<Snapshot>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) files: Option<FilesHandle>,
    pub(crate) kube: Option<KubeHandle>,
    pub(crate) started: Instant,
    pub(crate) boot_id: String,
    pub(crate) flows: Arc<FlowHub>,
}

impl AgentHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, CommandError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| CommandError::Stopped)?;
        rx.await.map_err(|_| CommandError::Stopped)
    }

    /// Registers an endpoint (see the API's `Register`).
    pub async fn register(&self, spec: EndpointSpec) -> Result<Registered, CommandError> {
        self.call(|tx| Command::Register(spec, tx)).await?
    }

    /// Unregisters an endpoint (see the API's `Unregister`).
    pub async fn unregister(&self, container_id: String) -> Result<Unregistered, CommandError> {
        self.call(|tx| Command::Unregister(container_id, tx))
            .await?
    }

    /// Explains `query` against the reconciler's current state (see the
    /// API's `Explain`).
    pub async fn explain(&self, query: Query) -> Result<Explained, CommandError> {
        self.call(|tx| Command::Explain(query, tx)).await?
    }

    /// Has the source re-read what it can (files: a re-scan; kube: catch
    /// up with what the API server holds now), within `timeout`, then
    /// returns the revision that includes it.
    pub async fn sync(&self, timeout: Duration) -> Result<u64, CommandError> {
        let source = async {
            if let Some(files) = &self.files
                && !files.rescan().await
            {
                return Err(CommandError::Stopped);
            }
            if let Some(kube) = &self.kube {
                kube.catch_up().await?;
            }
            Ok(())
        };
        tokio::time::timeout(timeout, source)
            .await
            .map_err(|_| CommandError::SyncTimeout(timeout))??;
        self.call(Command::Revision).await
    }

    /// The last published state.
    pub fn status(&self) -> Arc<Snapshot> {
        self.status.borrow().clone()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Time since the agent started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Random per process.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Waits until `revision` (0: the current one) is enforced for
    /// `container_id` (None: the node).
    pub async fn wait_enforced(
        &self,
        container_id: Option<&str>,
        revision: u64,
        timeout: Duration,
    ) -> Result<u64, WaitError> {
        let mut rx = self.status.clone();
        let target = if revision == 0 {
            rx.borrow().revision
        } else {
            revision
        };
        let settled = |s: &Arc<Snapshot>| s.wait_state(container_id, target) != WaitState::Pending;
        let outcome = tokio::time::timeout(timeout, rx.wait_for(settled))
            .await
            .map(|r| r.map(|s| s.clone()));
        let snapshot = match outcome {
            Err(_) => {
                return Err(WaitError::Timeout {
                    timeout,
                    reason: rx.borrow().pending_reason(target),
                });
            }
            Ok(Err(_)) => return Err(WaitError::Stopped),
            Ok(Ok(s)) => s,
        };
        match snapshot.wait_state(container_id, target) {
            WaitState::Enforced(r) => Ok(r),
            WaitState::Failed(error) => Err(WaitError::Failed {
                revision: target,
                error,
            }),
            WaitState::NotFound => Err(WaitError::NotFound(
                container_id.unwrap_or_default().to_owned(),
            )),
            WaitState::Pending => unreachable!("wait_for returned a pending state"),
        }
    }
}
