//! Connecting to a running agent's API.
//!
//! [`channel`] gives an async [`Channel`] for the generated clients
//! ([`proto::endpoints_client::EndpointsClient`],
//! [`proto::status_client::StatusClient`],
//! [`proto::explain_client::ExplainClient`]); [`Client`] wraps them behind
//! blocking calls for the CLI and for tests. [`Client::connect_tls`] reaches
//! the agent's optional TLS listener (`run --flows-listen`) instead of its
//! socket; only the read-only calls are served there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};

use super::proto::{
    self, endpoints_client::EndpointsClient, explain_client::ExplainClient,
    flows_client::FlowsClient, status_client::StatusClient,
};
/// gRPC status codes, as [`ClientError::code`] returns them.
pub use tonic::Code;

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {socket}: {reason}")]
    Unreachable { socket: PathBuf, reason: String },
    #[error("{}: {}", code_name(.0.code()), rpc_message(.0))]
    Rpc(#[from] tonic::Status),
    #[error("cannot reach the agent at {server}: {reason}")]
    UnreachableServer { server: String, reason: String },
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    #[error("starting the client runtime: {0}")]
    Runtime(std::io::Error),
}

impl ClientError {
    /// The gRPC code, for an error the agent returned.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc(s) => Some(s.code()),
            _ => None,
        }
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::DeadlineExceeded => "timed out",
        tonic::Code::FailedPrecondition => "failed",
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::ResourceExhausted => "no room",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Unimplemented => "not supported by this agent (an older version?)",
        other => other.description(),
    }
}

/// The status's message, with the transport's reason when there is one
/// (e.g. the TLS listener refused the client's certificate).
fn rpc_message(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => {
            let (message, cause) = (status.message(), super::tls::chain(source));
            if cause.starts_with(message) {
                cause
            } else if message.contains(&cause) {
                message.to_owned()
            } else {
                format!("{message}: {cause}")
            }
        }
        None => status.message().to_owned(),
    }
}

fn unreachable_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            "no such socket (is `policy-agent run` running on this node?)".to_owned()
        }
        std::io::ErrorKind::ConnectionRefused => {
            "nobody listens on it (the agent is not running)".to_owned()
        }
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (the socket is root-only)".to_owned()
        }
        _ => e.to_string(),
    }
}

/// Connects to the agent listening on `socket`.
pub async fn channel(socket: &Path) -> Result<Channel, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        socket: socket.to_owned(),
        reason,
    };
    // A first plain connect gives a clear reason when nobody is there.
    drop(
        UnixStream::connect(socket)
            .await
            .map_err(|e| unreachable(unreachable_reason(&e)))?,
    );
    let path = socket.to_owned();
    // The URI is required by the transport and otherwise unused.
    Endpoint::from_static("http://palisade-agent")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| unreachable(e.to_string()))
}

/// Connects to the agent's TLS listener at `server` (`https://HOST:PORT`;
/// a bare `HOST:PORT` means the same). Plain `http://` is refused: the
/// listener only speaks TLS.
pub async fn channel_tls(server: &str, tls: ClientTlsConfig) -> Result<Channel, ClientError> {
    let unreachable = |reason: String| ClientError::UnreachableServer {
        server: server.to_owned(),
        reason,
    };
    let uri = if server.contains("://") {
        server.to_owned()
    } else {
        format!("https://{server}")
    };
    if !uri.starts_with("https://") {
        return Err(unreachable(
            "not an https:// address (the agent serves its API over TCP with TLS only)".into(),
        ));
    }
    Endpoint::from_shared(uri)
        .map_err(|e| unreachable(super::tls::chain(&e)))?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .map_err(|e| unreachable(super::tls::chain(&e)))?
        .connect()
        .await
        .map_err(|e| unreachable(super::tls::chain(&e)))
}

/// A blocking client (owns a small runtime).
pub struct Client {
    runtime: tokio::runtime::Runtime,
    endpoints: EndpointsClient<Channel>,
    status: StatusClient<Channel>,
    flows: FlowsClient<Channel>,
    explain: ExplainClient<Channel>,
}

impl Client {
    /// Connects to the agent on `socket`.
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        let runtime = Self::runtime()?;
        let channel = runtime.block_on(channel(socket))?;
        Ok(Self::new(runtime, channel))
    }

    /// Connects to the agent's TLS listener (see [`channel_tls`]); `tls`
    /// from [`super::tls::client_config`]. Only `status`, `wait_enforced`,
    /// `explain` and `observe` are served there.
    pub fn connect_tls(server: &str, tls: ClientTlsConfig) -> Result<Self, ClientError> {
        let runtime = Self::runtime()?;
        let channel = runtime.block_on(channel_tls(server, tls))?;
        Ok(Self::new(runtime, channel))
    }

    fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)
    }

    fn new(runtime: tokio::runtime::Runtime, channel: Channel) -> Self {
        Self {
            runtime,
            endpoints: EndpointsClient::new(channel.clone()),
            flows: FlowsClient::new(channel.clone()),
            status: StatusClient::new(channel.clone()),
            explain: ExplainClient::new(channel),
        }
    }

    /// `Status.Get`.
    pub fn status(&mut self) -> Result<proto::AgentStatus, ClientError> {
        let call = self.status.get(proto::GetStatusRequest {});
        Ok(self.runtime.block_on(call)?.into_inner())
    }

    /// `Status.WaitEnforced`: `revision` 0 is the agent's current one.
    pub fn wait_enforced(
        &mut self,
        container_id: Option<&str>,
        revision: u64,
        timeout: Duration,
    ) -> Result<u64, ClientError> {
        let call = self.status.wait_enforced(proto::WaitEnforcedRequest {
            container_id: container_id.unwrap_or_default().to_owned(),
            revision,
            timeout_ms: u32::try_from(timeout.as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
        });
        Ok(self.runtime.block_on(call)?.into_inner().enforced_revision)
    }

    /// `Status.Sync`: the revision that includes everything the source
    /// holds now (the agent's default time to catch up).
    pub fn sync(&mut self) -> Result<u64, ClientError> {
        self.sync_within(Duration::ZERO)
    }

    /// `Status.Sync`, letting the source take up to `timeout` to catch up
    /// (zero: the agent's default).
    pub fn sync_within(&mut self, timeout: Duration) -> Result<u64, ClientError> {
        let call = self.status.sync(proto::SyncRequest {
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        });
        Ok(self.runtime.block_on(call)?.into_inner().revision)
    }

    /// Sync, then wait until that revision is enforced for the node (each
    /// within `timeout`).
    pub fn sync_and_wait(&mut self, timeout: Duration) -> Result<u64, ClientError> {
        let revision = self.sync_within(timeout)?;
        self.wait_enforced(None, revision, timeout)
    }

    /// `Explain.Explain`: the verdict for a connection, and why.
    pub fn explain(
        &mut self,
        request: proto::ExplainRequest,
    ) -> Result<proto::ExplainResponse, ClientError> {
        let call = self.explain.explain(request);
        Ok(self.runtime.block_on(call)?.into_inner())
    }

    /// `Endpoints.Register`.
    pub fn register(
        &mut self,
        request: proto::RegisterRequest,
    ) -> Result<proto::RegisterResponse, ClientError> {
        let call = self.endpoints.register(request);
        Ok(self.runtime.block_on(call)?.into_inner())
    }

    /// `Endpoints.Unregister`.
    pub fn unregister(
        &mut self,
        container_id: &str,
    ) -> Result<proto::UnregisterResponse, ClientError> {
        let call = self.endpoints.unregister(proto::UnregisterRequest {
            container_id: container_id.to_owned(),
        });
        Ok(self.runtime.block_on(call)?.into_inner())
    }

    /// `Endpoints.List`.
    pub fn list(&mut self) -> Result<Vec<proto::Endpoint>, ClientError> {
        let call = self.endpoints.list(proto::ListEndpointsRequest {});
        Ok(self.runtime.block_on(call)?.into_inner().endpoints)
    }

    /// `Flows.Observe`: calls `on_item` for each response until the stream
    /// ends, `on_item` returns false, or `limit` has passed.
    pub fn observe(
        &mut self,
        request: proto::ObserveRequest,
        limit: Option<Duration>,
        mut on_item: impl FnMut(proto::ObserveResponse) -> bool,
    ) -> Result<(), ClientError> {
        let flows = &mut self.flows;
        let stream = async move {
            let mut stream = flows.observe(request).await?.into_inner();
            while let Some(item) = stream.message().await? {
                if !on_item(item) {
                    break;
                }
            }
            Ok::<(), ClientError>(())
        };
        self.runtime.block_on(async move {
            match limit {
                Some(limit) => tokio::time::timeout(limit, stream).await.unwrap_or(Ok(())),
                None => stream.await,
            }
        })
    }
}
