//! The node agent: owns the cluster state and the local endpoints, compiles
//! and programs the maps whenever either changes, and reports what it found.
//!
//! * [`reconciler`]: the one owner of state, registry, identities and maps.
//! * [`handle`]: how the API talks to it; [`status`]: what it publishes.
//! * [`endpoints`]: the endpoint registry; [`store`]: the state directory.
//! * [`report`], [`metrics`], [`diagnostics`], [`events`]: what it tells;
//!   [`metrics_http`]: the Prometheus endpoint (`--metrics-listen`).
//! * [`flush`]: forgetting an endpoint's connections.
//!
//! [`run`] wires them with a source and the API server.

pub mod diagnostics;
pub mod endpoints;
pub mod events;
pub mod flush;
pub mod handle;
pub mod metrics;
pub mod metrics_http;
pub mod reconciler;
pub mod report;
pub mod status;
pub mod store;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, oneshot};

use self::diagnostics::DiagnosticSink;
use self::handle::AgentHandle;
use self::metrics::Metrics;
use self::reconciler::{Inputs, Reconciler, ReconcilerConfig};
use self::store::StateStore;
use crate::flows::{FlowHub, FlowPipeline};
use crate::source::SourceUpdate;
use crate::source::files::FilesSource;
use crate::source::kube::KubeSource;

/// Where the cluster comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests, and the node's addresses.
    Files { dir: PathBuf, node_ips: Vec<IpAddr> },
    /// The Kubernetes API (in-cluster config or kubeconfig).
    Kube,
}

impl SourceConfig {
    fn name(&self) -> &'static str {
        match self {
            SourceConfig::Files { .. } => "files",
            SourceConfig::Kube => "kube",
        }
    }
}

/// Everything `policy-agent run` is told.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub source: SourceConfig,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Flows kept for replay to observers.
    pub flow_history: usize,
    /// Where to serve `GET /metrics` (Prometheus); `None`: nowhere, no
    /// socket is opened.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the read-only API (Flows, Explain, Status) over TCP
    /// with TLS; `None`: nowhere, no socket is opened.
    pub flows_listen: Option<FlowsListen>,
}

/// The optional TCP listener of the read-only API (`--flows-listen`).
#[derive(Clone, Debug)]
pub struct FlowsListen {
    pub addr: SocketAddr,
    /// Loaded and checked by [`crate::api::tls::server_config`].
    pub tls: tonic::transport::ServerTlsConfig,
    /// Whether clients must present a certificate (`--tls-client-ca`).
    pub client_auth: bool,
}

/// Flows kept for replay by default (about 2 MB).
pub const DEFAULT_FLOW_HISTORY: usize = 8192;

/// Runs the agent until SIGTERM or SIGINT (or a fatal error). Stopping
/// leaves the links and maps pinned: enforcement goes on, and the next
/// agent adopts them.
pub async fn run(config: AgentConfig) -> Result<()> {
    let started = Instant::now();
    let store = StateStore::open(&config.state_dir).context("state directory")?;
    let metrics = Arc::new(Metrics::new());
    let (source_tx, source_rx) = mpsc::channel::<SourceUpdate>(1024);

    // The source, and its diagnostic sinks.
    let mut sinks: Vec<Arc<dyn DiagnosticSink>> = Vec::new();
    let mut files = None;
    let mut kube = None;
    let source_task = match &config.source {
        SourceConfig::Files { dir, node_ips } => {
            let (source, handle) = FilesSource::new(dir.clone(), node_ips.clone());
            files = Some(handle);
            tokio::spawn(async move { source.run(source_tx).await.map_err(anyhow::Error::from) })
        }
        SourceConfig::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
            sinks.push(Arc::new(events::EventSink::new(
                client.clone(),
                config.node_name.clone(),
            )));
            let (source, handle) = KubeSource::new(client, config.node_name.clone());
            kube = Some(handle);
            tokio::spawn(source.run(source_tx))
        }
    };

    // The reconciler, on its own thread.
    let (command_tx, command_rx) = mpsc::channel(64);
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let (started_tx, started_rx) = oneshot::channel();
    let reconciler_config = ReconcilerConfig {
        node_name: config.node_name.clone(),
        source: config.source.name().to_owned(),
        pin_dir: config.pin_dir.clone(),
        expect_node_addresses: true,
    };
    let inputs = Inputs {
        sources: source_rx,
        commands: command_rx,
        file_problems: files.as_ref().map(|f| f.problems()),
        shutdown: shutdown_rx,
    };
    let reconciler_metrics = metrics.clone();
    // Dropped when the thread ends, also by a panic.
    let (reconciler_alive, mut reconciler_done) = oneshot::channel::<()>();
    let reconciler_thread = std::thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || {
            let _alive = reconciler_alive;
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            let started = Reconciler::start(reconciler_config, store, reconciler_metrics, sinks)
                .map_err(anyhow::Error::from)
                .and_then(|(mut reconciler, status)| {
                    let tap = reconciler.take_flow_tap().context("the flow ring buffer")?;
                    Ok((reconciler, status, tap))
                });
            match started {
                Ok((reconciler, status, tap)) => {
                    let _ = started_tx.send(Ok((status, tap)));
                    runtime.block_on(reconciler.run(inputs));
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            }
        })
        .context("spawning the reconciler thread")?;
    let (status, (tap, names)) = match started_rx.await {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => return Err(e),
        Err(_) => anyhow::bail!("the reconciler thread died while starting"),
    };

    // The flow pipeline, on the API's runtime: it only reads.
    let flows = Arc::new(FlowHub::new(config.flow_history));
    let pipeline = FlowPipeline::new(tap, names, flows.clone(), metrics.flows.clone());
    let pipeline_task = tokio::spawn(pipeline.run());

    let handle = AgentHandle {
        commands: command_tx,
        status,
        metrics,
        files,
        kube,
        started,
        boot_id: boot_id(),
        flows,
    };
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            metrics_http::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?,
        ),
        None => None,
    };
    let flows_listener = match &config.flows_listen {
        Some(listen) => Some(
            tokio::net::TcpListener::bind(listen.addr)
                .await
                .with_context(|| format!("binding the flows listener {}", listen.addr))?,
        ),
        None => None,
    };
    let listener = crate::api::socket::bind(&config.socket)?;
    tracing::info!(
        node = %config.node_name,
        source = config.source.name(),
        pin_dir = %config.pin_dir.display(),
        state_dir = %config.state_dir.display(),
        socket = %config.socket.display(),
        "agent started"
    );
    let (stop_api_tx, stop_api_rx) = oneshot::channel::<()>();
    let (stop_metrics_tx, stop_metrics_rx) = oneshot::channel::<()>();
    if let Some(listener) = metrics_listener {
        let address =
            metrics_http::local_addr(&listener).map_or_else(|| "?".to_owned(), |a| a.to_string());
        tracing::info!(%address, "metrics endpoint listening (GET /metrics)");
        tokio::spawn(metrics_http::serve(
            listener,
            handle.metrics.clone(),
            async {
                let _ = stop_metrics_rx.await;
            },
        ));
    }
    let (stop_flows_tx, stop_flows_rx) = oneshot::channel::<()>();
    let flows_api = match (flows_listener, config.flows_listen) {
        (Some(listener), Some(listen)) => {
            let address = listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |a| a.to_string());
            if listen.client_auth {
                tracing::info!(%address, "read-only API listening (TLS, client certificates required)");
            } else {
                tracing::warn!(
                    %address,
                    "read-only API listening (TLS) without --tls-client-ca: any client that can reach it reads flows"
                );
            }
            Some(tokio::spawn(crate::api::server::serve_read_only(
                listener,
                listen.tls,
                handle.clone(),
                async {
                    let _ = stop_flows_rx.await;
                },
            )))
        }
        _ => None,
    };
    let api = tokio::spawn(crate::api::server::serve(listener, handle, async {
        let _ = stop_api_rx.await;
    }));

    let outcome = tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!(signal, "stopping");
            Ok(())
        }
        result = source_task => match result {
            Ok(Ok(())) => Err(anyhow::anyhow!("the source stopped")),
            Ok(Err(e)) => Err(e.context("the source failed")),
            Err(e) => Err(anyhow::Error::from(e).context("the source task")),
        },
        _ = &mut reconciler_done => Err(anyhow::anyhow!("the reconciler stopped unexpectedly")),
        result = pipeline_task => match result {
            Ok(Ok(())) => Err(anyhow::anyhow!("the flow pipeline stopped")),
            Ok(Err(e)) => Err(anyhow::Error::from(e).context("the flow pipeline failed")),
            Err(e) => Err(anyhow::Error::from(e).context("the flow pipeline task")),
        },
    };

    let _ = stop_api_tx.send(());
    let _ = stop_metrics_tx.send(());
    let _ = stop_flows_tx.send(());
    if let Some(task) = flows_api
        && let Ok(Err(e)) = task.await
    {
        tracing::warn!(error = %e, "read-only API server");
    }
    if let Ok(Err(e)) = api.await {
        tracing::warn!(error = %e, "API server");
    }
    let _ = std::fs::remove_file(&config.socket);
    let _ = shutdown_tx.send(());
    let _ = tokio::task::spawn_blocking(move || reconciler_thread.join()).await;
    outcome
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// A random id for this process (from the kernel's boot-time random pool).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| format!("pid-{}", std::process::id()))
}
