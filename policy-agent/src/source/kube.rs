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

pub mod node;
pub mod track;
pub mod trim;

use std::fmt::Debug;
use std::pin::pin;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::core::DeserializeGuard;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::Sender;

use self::node::NodeTracker;
use self::track::{Tracker, Watched};
use super::SourceUpdate;

/// Why the Kubernetes source cannot run.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The node name is empty: the agent would not know its own node.
    #[error("the node name is empty")]
    EmptyNodeName,
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

/// Watches Namespaces, Pods, NetworkPolicies and the Node named `node_name`
/// with `client`, sending what changes to `tx`, until `tx`'s receiver is
/// dropped (then returns `Ok`). Watch errors are retried forever with
/// backoff; the only error is an empty `node_name`.
///
/// The client needs `get`, `list` and `watch` on namespaces, pods,
/// networkpolicies (cluster-wide) and nodes: `manifests/rbac.yaml`.
pub async fn run(
    client: Client,
    node_name: String,
    tx: Sender<SourceUpdate>,
) -> anyhow::Result<()> {
    if node_name.is_empty() {
        return Err(KubeSourceError::EmptyNodeName.into());
    }
    tracing::info!(node = %node_name, "watching the Kubernetes API");
    let config = watch_config();
    let node_config = config.clone().fields(&format!("metadata.name={node_name}"));
    let watches = async {
        tokio::try_join!(
            watch(
                Api::<DeserializeGuard<core::Namespace>>::all(client.clone()),
                config.clone(),
                Tracker::new(),
                &tx,
            ),
            watch(
                Api::<DeserializeGuard<core::Pod>>::all(client.clone()),
                config.clone(),
                Tracker::new(),
                &tx,
            ),
            watch(
                Api::<DeserializeGuard<net::NetworkPolicy>>::all(client.clone()),
                config.clone(),
                Tracker::new(),
                &tx,
            ),
            watch(
                Api::<DeserializeGuard<core::Node>>::all(client.clone()),
                node_config,
                NodeTracker::new(node_name.clone()),
                &tx,
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

/// The watches' configuration: lists are served from the API server's watch
/// cache (`resourceVersion=0`, as client-go informers and the kubelet list)
/// rather than read from etcd, since every node's agent lists every pod; the
/// watch that follows catches up from the list's resource version.
fn watch_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

/// Runs one kind's watch forever: a fresh [`watcher`](watcher::watcher) (list,
/// then watch) after every error, with backoff. Returns only when `tx` is
/// closed.
async fn watch<K, T>(
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
    mut translate: T,
    tx: &Sender<SourceUpdate>,
) -> Result<(), Closed>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + 'static,
    T: Translate<K>,
{
    let kind = K::kind(&());
    let mut backoff = DefaultBackoff::default();
    loop {
        let mut events = pin!(watcher::watcher(api.clone(), config.clone()));
        let failure = loop {
            match events.next().await {
                Some(Ok(event)) => {
                    if let Some(update) = translate.translate(event) {
                        tx.send(update).await.map_err(|_| Closed)?;
                    }
                }
                Some(Err(error)) => break error.to_string(),
                None => break "the watch stream ended".to_owned(),
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

/// The longest wait between two attempts (also [`DefaultBackoff`]'s cap).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
