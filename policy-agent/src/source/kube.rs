//! The Kubernetes API source: watches Namespaces, Pods and NetworkPolicies
//! cluster-wide, and this node's Node object, and sends [`SourceUpdate`]s.
//!
//! * One [`watcher`](kube::runtime::watcher()) per kind. A list (the first one
//!   and every re-list) becomes one [`SourceUpdate::Replace`] holding exactly
//!   the listed objects, sent when the list completes (`InitDone`); then each
//!   watch event becomes an [`SourceUpdate::Apply`] or
//!   [`SourceUpdate::Delete`] ([`track`]).
//! * Objects are trimmed to the fields the agent uses ([`trim`]) and an
//!   update that changes nothing the agent uses is not sent.
//! * The Node watch (field selector on this node's name) sends
//!   [`SourceUpdate::NodeAddresses`] after every list and when the addresses
//!   change ([`node`]).
//! * Objects are decoded through [`DeserializeGuard`], so an object the client
//!   cannot decode is a warning, not a failed watch.
//! * A watch that simply ends (the server's watch timeout, a connection
//!   closed cleanly) is resumed by kube's watcher from the last resource
//!   version: the API server replays what happened since, or answers
//!   `410 Gone`, which is an error (below).
//! * Any watch error (cannot reconnect, API server restarting, expired
//!   resource version, forbidden, …) is logged as a warning with the delay
//!   before the next attempt (exponential backoff with jitter, 0.8 s to 30 s,
//!   as client-go's reflector; reset after two quiet minutes), and that
//!   kind's watch then starts over with a fresh list, so the reconciler gets
//!   a `Replace` with the API server's current contents rather than trusting
//!   that nothing was missed. Nothing is fatal: the source retries until the
//!   receiving end of its channel is dropped.
//! * Lists are served from the API server's watch cache
//!   (`resourceVersion=0`, as client-go informers list), not read from etcd:
//!   every node's agent lists every pod.
//! * [`KubeHandle::catch_up`] (the API's `Sync`) lists each kind once more
//!   with a consistent read (metadata only) and returns once every watch
//!   has sent what that list holds ([`progress`]): then the reconciler has
//!   everything the API server had when `Sync` was asked.

pub mod node;
pub mod progress;
pub mod track;
pub mod trim;

use std::fmt::Debug;
use std::pin::pin;
use std::time::Duration;

use futures::StreamExt;
use futures::future::try_join_all;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::api::ListParams;
use kube::core::DeserializeGuard;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{self, Receiver, Sender};
use tokio::sync::oneshot;

use self::node::NodeTracker;
use self::progress::{Progress, Snapshot};
use self::track::{Tracker, Watched};
use super::SourceUpdate;

/// Why the Kubernetes source cannot run.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The node name is empty: the agent would not know its own node.
    #[error("the node name is empty")]
    EmptyNodeName,
}

/// Why [`KubeHandle::catch_up`] could not confirm that the source caught up.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    /// The consistent list failed (API server unreachable, forbidden, ...).
    #[error("listing {kind} from the API server: {error}")]
    List { kind: String, error: String },
    /// The source has stopped.
    #[error("the Kubernetes source has stopped")]
    Stopped,
}

/// A catch-up request to one watch, answered once it has caught up.
type CatchUp = oneshot::Sender<Result<(), CatchUpError>>;

/// The number of watches: Namespaces, Pods, NetworkPolicies, the Node.
const WATCHES: usize = 4;

/// Asks a running source to catch up with the API server (the API's `Sync`).
#[derive(Clone, Debug)]
pub struct KubeHandle {
    watches: Vec<mpsc::Sender<CatchUp>>,
}

impl KubeHandle {
    /// Returns once every watch has sent the reconciler what a consistent
    /// list of its kind, made now, holds (see [`progress`]).
    pub async fn catch_up(&self) -> Result<(), CatchUpError> {
        try_join_all(self.watches.iter().map(|watch| async move {
            let (tx, rx) = oneshot::channel();
            watch.send(tx).await.map_err(|_| CatchUpError::Stopped)?;
            rx.await.map_err(|_| CatchUpError::Stopped)?
        }))
        .await
        .map(drop)
    }
}

/// The receiving end of the update channel is gone: the agent is stopping.
struct Closed;

/// Translates one watch's events into updates (see [`Tracker`] and
/// [`NodeTracker`]).
trait Translate<K> {
    fn translate(&mut self, event: Event<DeserializeGuard<K>>) -> Option<SourceUpdate>;
}

impl<K: Watched> Translate<K> for Tracker<K> {
    fn translate(&mut self, event: Event<DeserializeGuard<K>>) -> Option<SourceUpdate> {
        self.handle(event)
    }
}

impl Translate<core::Node> for NodeTracker {
    fn translate(&mut self, event: Event<DeserializeGuard<core::Node>>) -> Option<SourceUpdate> {
        self.handle(event)
    }
}

/// The Kubernetes source: watches Namespaces, Pods, NetworkPolicies and
/// this node's Node object (see the module docs).
pub struct KubeSource {
    client: Client,
    node_name: String,
    catch_ups: Vec<Receiver<CatchUp>>,
}

impl KubeSource {
    /// A source reading with `client` for node `node_name`, and the handle
    /// that asks it to catch up.
    pub fn new(client: Client, node_name: String) -> (Self, KubeHandle) {
        let (senders, receivers) = (0..WATCHES).map(|_| mpsc::channel(8)).unzip();
        let source = Self {
            client,
            node_name,
            catch_ups: receivers,
        };
        (source, KubeHandle { watches: senders })
    }

    /// Watches with the client, sending what changes to `tx`, until `tx`'s
    /// receiver is dropped (then returns `Ok`). Watch errors are retried
    /// forever with backoff; the only error is an empty node name.
    ///
    /// The client needs `get`, `list` and `watch` on namespaces, pods,
    /// networkpolicies (cluster-wide) and nodes: `manifests/rbac.yaml`.
    pub async fn run(self, tx: Sender<SourceUpdate>) -> anyhow::Result<()> {
        let Self {
            client,
            node_name,
            catch_ups,
        } = self;
        if node_name.is_empty() {
            return Err(KubeSourceError::EmptyNodeName.into());
        }
        tracing::info!(node = %node_name, "watching the Kubernetes API");
        let config = watch_config();
        let node_config = config.clone().fields(&format!("metadata.name={node_name}"));
        let Ok([namespaces, pods, policies, node]) = <[_; WATCHES]>::try_from(catch_ups) else {
            unreachable!("one catch-up channel per watch");
        };
        let watches = async {
            tokio::try_join!(
                watch(
                    Api::<DeserializeGuard<core::Namespace>>::all(client.clone()),
                    config.clone(),
                    Tracker::new(),
                    &tx,
                    namespaces,
                ),
                watch(
                    Api::<DeserializeGuard<core::Pod>>::all(client.clone()),
                    config.clone(),
                    Tracker::new(),
                    &tx,
                    pods,
                ),
                watch(
                    Api::<DeserializeGuard<net::NetworkPolicy>>::all(client.clone()),
                    config.clone(),
                    Tracker::new(),
                    &tx,
                    policies,
                ),
                watch(
                    Api::<DeserializeGuard<core::Node>>::all(client.clone()),
                    node_config,
                    NodeTracker::new(node_name.clone()),
                    &tx,
                    node,
                ),
            )
        };
        tokio::select! {
            _ = watches => {}
            () = tx.closed() => {}
        }
        tracing::info!("update channel closed; Kubernetes watches stopped");
        Ok(())
    }
}

/// [`KubeSource::run`] without a handle (nothing can ask it to catch up).
pub async fn run(
    client: Client,
    node_name: String,
    tx: Sender<SourceUpdate>,
) -> anyhow::Result<()> {
    KubeSource::new(client, node_name).0.run(tx).await
}

/// The watches' configuration: lists are served from the API server's watch
/// cache (`resourceVersion=0`, as client-go informers and the kubelet list)
/// rather than read from etcd, since every node's agent lists every pod; the
/// watch that follows catches up from the list's resource version.
fn watch_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

/// Runs one kind's watch forever: a fresh [`watcher`](watcher::watcher) (list,
/// then watch) after every error, with backoff. Answers the catch-up
/// requests of `catch_ups` as its events show it caught up. Returns only
/// when `tx` is closed.
async fn watch<K, T>(
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
    mut translate: T,
    tx: &Sender<SourceUpdate>,
    mut catch_ups: Receiver<CatchUp>,
) -> Result<(), Closed>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static,
    T: Translate<K>,
{
    let kind = K::kind(&());
    let mut backoff = DefaultBackoff::default();
    let mut progress = Progress::default();
    // Requests not answered yet, with the snapshot each waits for.
    let mut waiting: Vec<(Snapshot, CatchUp)> = Vec::new();
    let mut requests_open = true;
    loop {
        let mut events = pin!(watcher::watcher(api.clone(), config.clone()));
        let failure = loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => {
                        progress.observe(&event);
                        if let Some(update) = translate.translate(event) {
                            tx.send(update).await.map_err(|_| Closed)?;
                        }
                        answer(&progress, &mut waiting);
                    }
                    Some(Err(error)) => break error.to_string(),
                    None => break "the watch stream ended".to_owned(),
                },
                request = catch_ups.recv(), if requests_open => match request {
                    Some(reply) => match consistent_snapshot(&api, &config).await {
                        Ok(snapshot) => {
                            waiting.push((snapshot, reply));
                            answer(&progress, &mut waiting);
                        }
                        Err(error) => {
                            let _ = reply.send(Err(CatchUpError::List {
                                kind: kind.to_string(),
                                error: error.to_string(),
                            }));
                        }
                    },
                    None => requests_open = false,
                },
            }
        };
        let delay = backoff.next().unwrap_or(MAX_BACKOFF);
        tracing::warn!(
            %kind,
            error = %failure,
            retry_in = ?delay,
            "watch failed; it will start over with a fresh list"
        );
        tokio::time::sleep(delay).await;
    }
}

/// Lists the watched objects' metadata with a consistent read (from etcd:
/// no `resourceVersion`), with the watch's selectors.
async fn consistent_snapshot<K>(
    api: &Api<DeserializeGuard<K>>,
    config: &watcher::Config,
) -> kube::Result<Snapshot>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    let params = ListParams {
        label_selector: config.label_selector.clone(),
        field_selector: config.field_selector.clone(),
        ..ListParams::default()
    };
    let list = api.list_metadata(&params).await?;
    Ok(Snapshot::from_list(&list))
}

/// Answers the requests `progress` has caught up with, and drops those
/// whose asker has gone.
fn answer(progress: &Progress, waiting: &mut Vec<(Snapshot, CatchUp)>) {
    waiting.retain(|(_, reply)| !reply.is_closed());
    let (done, still): (Vec<_>, Vec<_>) = std::mem::take(waiting)
        .into_iter()
        .partition(|(snapshot, _)| progress.has_caught_up(snapshot));
    *waiting = still;
    for (_, reply) in done {
        let _ = reply.send(Ok(()));
    }
}

/// The longest wait between two attempts (also [`DefaultBackoff`]'s cap).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
