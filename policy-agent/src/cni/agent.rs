//! The calls the plugin makes to the node agent's API (gRPC on its unix
//! socket), every one bounded by the command's time budget.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;

use crate::api::client;
use crate::api::proto::{self, endpoints_client::EndpointsClient, status_client::StatusClient};

/// How much of the budget WaitEnforced leaves for the answer to travel, so
/// that the agent's own timeout (with its reason) arrives before ours.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);
/// How long a NOT_FOUND from WaitEnforced may be a registration the agent
/// has not published yet.
const NOT_FOUND_SETTLE: Duration = Duration::from_secs(2);
/// The pause between two asks meanwhile.
const NOT_FOUND_RETRY: Duration = Duration::from_millis(10);

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nobody serves the socket (or it cannot be opened).
    #[error("{0}")]
    Unreachable(String),
    /// The budget ran out before the agent answered.
    #[error("the agent at {socket} did not answer {what} within {budget:?}")]
    Silent {
        socket: PathBuf,
        what: &'static str,
        budget: Duration,
    },
    /// The agent answered with an error.
    #[error("{what}: {message}")]
    Rpc {
        what: &'static str,
        code: tonic::Code,
        message: String,
    },
}

impl AgentError {
    /// The gRPC code, when the agent answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            AgentError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the agent is not there to answer: unreachable, silent, or
    /// stopping (UNAVAILABLE).
    pub fn is_agent_down(&self) -> bool {
        match self {
            AgentError::Unreachable(_) | AgentError::Silent { .. } => true,
            AgentError::Rpc { code, .. } => *code == tonic::Code::Unavailable,
        }
    }
}

/// A connection to the agent, with the command's deadline.
pub struct AgentConn {
    socket: PathBuf,
    budget: Duration,
    deadline: Instant,
    endpoints: EndpointsClient<Channel>,
    status: StatusClient<Channel>,
}

impl AgentConn {
    /// Connects to the agent on `socket`; every later call must finish
    /// within `budget` from now.
    pub async fn connect(socket: &Path, budget: Duration) -> Result<Self, AgentError> {
        let deadline = Instant::now() + budget;
        let channel = match tokio::time::timeout_at(deadline, client::channel(socket)).await {
            Err(_) => {
                return Err(AgentError::Silent {
                    socket: socket.to_owned(),
                    what: "the connection",
                    budget,
                });
            }
            Ok(Err(e)) => return Err(AgentError::Unreachable(e.to_string())),
            Ok(Ok(channel)) => channel,
        };
        Ok(Self {
            socket: socket.to_owned(),
            budget,
            deadline,
            endpoints: EndpointsClient::new(channel.clone()),
            status: StatusClient::new(channel),
        })
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, AgentError> {
        match tokio::time::timeout_at(self.deadline, call).await {
            Err(_) => Err(AgentError::Silent {
                socket: self.socket.clone(),
                what,
                budget: self.budget,
            }),
            Ok(Err(status)) => Err(AgentError::Rpc {
                what,
                code: status.code(),
                message: status.message().to_owned(),
            }),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }

    /// `Endpoints.Register`.
    pub async fn register(
        &mut self,
        request: proto::RegisterRequest,
    ) -> Result<proto::RegisterResponse, AgentError> {
        let mut endpoints = self.endpoints.clone();
        self.call("registering the endpoint", endpoints.register(request))
            .await
    }

    /// `Status.WaitEnforced` for `container_id` (revision 0: the agent's
    /// current one), waiting at most what is left of the budget.
    ///
    /// NOT_FOUND right after a registration is asked again for a short
    /// while: the agent may answer Register before the state WaitEnforced
    /// reads includes the endpoint. The runtime runs no DEL concurrently
    /// with ADD or CHECK of the same container, so a NOT_FOUND that lasts
    /// is real.
    pub async fn wait_enforced(
        &mut self,
        container_id: &str,
        revision: u64,
    ) -> Result<u64, AgentError> {
        let settle_until = Instant::now() + NOT_FOUND_SETTLE;
        loop {
            let wait = self.remaining().saturating_sub(ANSWER_MARGIN);
            let request = proto::WaitEnforcedRequest {
                container_id: container_id.to_owned(),
                revision,
                timeout_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1),
            };
            let mut status = self.status.clone();
            let answer = self
                .call("waiting for the policy", status.wait_enforced(request))
                .await;
            match answer {
                Err(e)
                    if e.code() == Some(tonic::Code::NotFound)
                        && Instant::now() < settle_until.min(self.deadline) =>
                {
                    tokio::time::sleep(NOT_FOUND_RETRY).await;
                }
                other => return other.map(|r| r.enforced_revision),
            }
        }
    }

    /// `Endpoints.Unregister`.
    pub async fn unregister(
        &mut self,
        container_id: &str,
    ) -> Result<proto::UnregisterResponse, AgentError> {
        let request = proto::UnregisterRequest {
            container_id: container_id.to_owned(),
        };
        let mut endpoints = self.endpoints.clone();
        self.call("removing the endpoint", endpoints.unregister(request))
            .await
    }

    /// `Endpoints.List`.
    pub async fn list(&mut self) -> Result<Vec<proto::Endpoint>, AgentError> {
        let mut endpoints = self.endpoints.clone();
        self.call(
            "listing the endpoints",
            endpoints.list(proto::ListEndpointsRequest {}),
        )
        .await
        .map(|r| r.endpoints)
    }

    /// `Status.Get`.
    pub async fn status(&mut self) -> Result<proto::AgentStatus, AgentError> {
        let mut status = self.status.clone();
        self.call("reading the status", status.get(proto::GetStatusRequest {}))
            .await
    }
}
