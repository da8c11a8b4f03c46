//! The API server: the `Endpoints`, `Status` and `Explain` services of
//! `palisade.v1`, served on the agent's unix socket; and the read-only
//! subset served over TCP with TLS when `run --flows-listen` asks for it
//! ([`serve_read_only`]).

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use super::convert;
use super::proto::{self, endpoints_server, explain_server, status_server};
use crate::agent::endpoints::RegistryError;
use crate::agent::handle::{AgentHandle, CommandError, WaitError};
use crate::explain::ExplainError;
use crate::source::kube::CatchUpError;

/// How long WaitEnforced waits, and Sync lets the source take, when the
/// request says 0.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest wait a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    handle: AgentHandle,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let flows = flows_api(&handle);
    let api = Api { handle };
    tonic::transport::Server::builder()
        .add_service(proto::flows_server::FlowsServer::new(flows))
        .add_service(endpoints_server::EndpointsServer::new(api.clone()))
        .add_service(status_server::StatusServer::new(api.clone()))
        .add_service(explain_server::ExplainServer::new(api))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// Serves only what cannot change the agent's state, on `listener`, with
/// TLS, until `shutdown` resolves: `Flows`, `Explain` and `Status` (whose
/// `Sync` is refused with PERMISSION_DENIED). `Endpoints` is not served.
pub async fn serve_read_only(
    listener: TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    handle: AgentHandle,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let flows = flows_api(&handle);
    let api = Api { handle };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(proto::flows_server::FlowsServer::new(flows))
        .add_service(status_server::StatusServer::new(ReadOnly(api.clone())))
        .add_service(explain_server::ExplainServer::new(api))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

fn flows_api(handle: &AgentHandle) -> super::flows::FlowsApi {
    super::flows::FlowsApi {
        hub: handle.flows.clone(),
        metrics: handle.metrics.flows.clone(),
        node_name: handle.status().node_name.clone(),
    }
}

#[derive(Clone)]
struct Api {
    handle: AgentHandle,
}

/// The `Status` service without `Sync`.
struct ReadOnly(Api);

#[tonic::async_trait]
impl status_server::Status for ReadOnly {
    async fn get(
        &self,
        request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::AgentStatus>, Status> {
        status_server::Status::get(&self.0, request).await
    }

    async fn wait_enforced(
        &self,
        request: Request<proto::WaitEnforcedRequest>,
    ) -> Result<Response<proto::WaitEnforcedResponse>, Status> {
        status_server::Status::wait_enforced(&self.0, request).await
    }

    async fn sync(
        &self,
        _request: Request<proto::SyncRequest>,
    ) -> Result<Response<proto::SyncResponse>, Status> {
        Err(Status::permission_denied(
            "Sync is served on the agent's unix socket only",
        ))
    }
}

fn command_status(e: CommandError) -> Status {
    let message = e.to_string();
    match e {
        CommandError::Invalid(_) => Status::invalid_argument(message),
        CommandError::NoInterface { .. } => Status::not_found(message),
        CommandError::Registry(RegistryError::Exhausted) => Status::resource_exhausted(message),
        CommandError::Registry(_) | CommandError::Datapath(_) => Status::internal(message),
        CommandError::NotCompiled(_) => Status::failed_precondition(message),
        CommandError::Explain(ExplainError::UnknownPod(_) | ExplainError::NoAddress(_)) => {
            Status::not_found(message)
        }
        CommandError::Explain(ExplainError::NoNodeAddress) => Status::failed_precondition(message),
        CommandError::CatchUp(CatchUpError::List { .. }) => Status::unavailable(message),
        CommandError::SyncTimeout(_) => Status::deadline_exceeded(message),
        CommandError::Stopped | CommandError::CatchUp(CatchUpError::Stopped) => {
            Status::unavailable(message)
        }
    }
}

fn wait_status(e: WaitError) -> Status {
    let message = e.to_string();
    match e {
        WaitError::Timeout { .. } => Status::deadline_exceeded(message),
        WaitError::Failed { .. } => Status::failed_precondition(message),
        WaitError::NotFound(_) => Status::not_found(message),
        WaitError::Stopped => Status::unavailable(message),
    }
}

#[tonic::async_trait]
impl endpoints_server::Endpoints for Api {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let spec =
            convert::endpoint_spec(request.into_inner()).map_err(Status::invalid_argument)?;
        let registered = self.handle.register(spec).await.map_err(command_status)?;
        let status = self.handle.status();
        let endpoint = status
            .endpoint(&registered.record.container_id)
            .map(convert::endpoint)
            .unwrap_or_else(|| proto::Endpoint {
                container_id: registered.record.container_id.clone(),
                endpoint_id: registered.record.endpoint_id,
                ifindex: registered.record.ifindex,
                ..proto::Endpoint::default()
            });
        Ok(Response::new(proto::RegisterResponse {
            endpoint: Some(endpoint),
            revision: registered.revision,
        }))
    }

    async fn unregister(
        &self,
        request: Request<proto::UnregisterRequest>,
    ) -> Result<Response<proto::UnregisterResponse>, Status> {
        let container_id = request.into_inner().container_id;
        if container_id.trim().is_empty() {
            return Err(Status::invalid_argument("container_id is empty"));
        }
        let done = self
            .handle
            .unregister(container_id)
            .await
            .map_err(command_status)?;
        Ok(Response::new(proto::UnregisterResponse {
            found: done.found,
            revision: done.revision,
            connections_flushed: done.connections_flushed as u64,
        }))
    }

    async fn list(
        &self,
        _request: Request<proto::ListEndpointsRequest>,
    ) -> Result<Response<proto::ListEndpointsResponse>, Status> {
        let status = self.handle.status();
        Ok(Response::new(proto::ListEndpointsResponse {
            endpoints: status.endpoints.iter().map(convert::endpoint).collect(),
        }))
    }
}

#[tonic::async_trait]
impl status_server::Status for Api {
    async fn get(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::AgentStatus>, Status> {
        let status = self.handle.status();
        Ok(Response::new(convert::status(
            &status,
            self.handle.metrics().samples(),
            self.handle.boot_id(),
            self.handle.uptime().as_secs(),
        )))
    }

    async fn wait_enforced(
        &self,
        request: Request<proto::WaitEnforcedRequest>,
    ) -> Result<Response<proto::WaitEnforcedResponse>, Status> {
        let req = request.into_inner();
        let timeout = match req.timeout_ms {
            0 => DEFAULT_WAIT,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_WAIT),
        };
        let container = (!req.container_id.is_empty()).then_some(req.container_id.as_str());
        let enforced = self
            .handle
            .wait_enforced(container, req.revision, timeout)
            .await
            .map_err(wait_status)?;
        Ok(Response::new(proto::WaitEnforcedResponse {
            enforced_revision: enforced,
        }))
    }

    async fn sync(
        &self,
        request: Request<proto::SyncRequest>,
    ) -> Result<Response<proto::SyncResponse>, Status> {
        let timeout = match request.into_inner().timeout_ms {
            0 => DEFAULT_WAIT,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_WAIT),
        };
        let revision = self.handle.sync(timeout).await.map_err(command_status)?;
        Ok(Response::new(proto::SyncResponse { revision }))
    }
}

#[tonic::async_trait]
impl explain_server::Explain for Api {
    async fn explain(
        &self,
        request: Request<proto::ExplainRequest>,
    ) -> Result<Response<proto::ExplainResponse>, Status> {
        let query = convert::explain_query(&request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let explained = self.handle.explain(query).await.map_err(command_status)?;
        Ok(Response::new(convert::explain_response(
            &explained.explanation,
            explained.revision,
        )))
    }
}
