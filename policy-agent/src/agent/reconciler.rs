//! The reconciler: the one owner of the cluster state, the endpoint
//! registry, the identity allocator and the datapath.
//!
//! It takes [`SourceUpdate`]s and [`Command`]s in arrival order, counts
//! every change in a revision, and after a change (debounced: [`DEBOUNCE`]
//! after the last one, at most [`MAX_DELAY`] after the first) compiles the
//! state and applies it with the map writer ([`MapWriter`], which keeps
//! what it wrote so each change costs only its difference). Nothing is compiled before
//! the source has sent every kind once (and the node's addresses): until
//! then the maps keep what a previous agent left, so a restart changes
//! nothing until the new agent knows the whole cluster.
//!
//! After a successful apply, the compiled revision is enforced for the node
//! and for every registered endpoint. A failed apply (e.g. a full map) is
//! logged, counted and published; the writer's batches are atomic, so the
//! classifier keeps enforcing what it enforced before; the apply is retried
//! with backoff (and on the next change).
//!
//! It runs on its own thread with its own single-threaded runtime: map
//! updates are blocking system calls and must not stall the API.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use policy_common::EndpointInfo;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::diagnostics::DiagnosticSink;
use super::endpoints::{EndpointRecord, EndpointRegistry, EndpointSpec, Registration};
use super::flush::flush_endpoint;
use super::handle::{Command, CommandError, Explained, Registered, Unregistered};
use super::metrics::{ApplyErrorLabels, KindLabels, Metrics, OperationLabels, ResultLabels};
use super::report::Reporter;
use super::status::{EndpointStatus, Snapshot};
use super::store::StateStore;
use crate::compile::{CompileMemo, Desired, IdentityAllocator, NodeScope, compile_reusing};
use crate::datapath::writer::MapWriter;
use crate::datapath::{Adopted, Datapath, DatapathError, FlowReader, LostCounter};
use crate::flows::{FlowNames, FlowTap};
use crate::model::convert::rejected;
use crate::model::{ClusterState, Diagnostic, ObjectKind, ObjectRef};
use crate::source::files::FileProblem;
use crate::source::{Kind, Object, Objects, SourceUpdate};

/// Quiet time after a change before compiling.
pub const DEBOUNCE: Duration = Duration::from_millis(10);
/// Longest a stream of changes delays a compile.
pub const MAX_DELAY: Duration = Duration::from_millis(100);
/// Identities are saved once changes have stopped for this long...
const SAVE_QUIET: Duration = Duration::from_secs(1);
/// ...or at the latest this long after they changed.
const SAVE_MAX_DELAY: Duration = Duration::from_secs(10);
/// First and longest delay before retrying a failed apply.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the reconciler is set up with.
#[derive(Clone, Debug)]
pub struct ReconcilerConfig {
    pub node_name: String,
    /// "files" or "kube", for the status.
    pub source: String,
    pub pin_dir: PathBuf,
    /// Whether to wait for [`SourceUpdate::NodeAddresses`] before compiling.
    pub expect_node_addresses: bool,
}

/// Why the reconciler cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading the classifier: {0}")]
    Datapath(#[from] DatapathError),
    #[error("reading the state directory: {0}")]
    Store(#[from] super::store::StoreError),
    #[error(
        "the saved endpoint registry is invalid: {0} (fix or remove it; removing it detaches every pod)"
    )]
    Registry(#[from] super::endpoints::RegistryError),
}

/// The reconciler's inputs.
pub struct Inputs {
    pub sources: mpsc::Receiver<SourceUpdate>,
    pub commands: mpsc::Receiver<Command>,
    /// The files source's problems, when that is the source.
    pub file_problems: Option<watch::Receiver<Vec<FileProblem>>>,
    /// Resolves when the agent stops.
    pub shutdown: oneshot::Receiver<()>,
}

/// The outcome of the last failed apply.
struct Failure {
    revision: u64,
    message: String,
    retry_at: Instant,
    backoff: Duration,
}

/// See the module docs.
pub struct Reconciler {
    config: ReconcilerConfig,
    dp: Datapath,
    writer: MapWriter,
    store: StateStore,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    status: watch::Sender<Arc<Snapshot>>,
    /// What the flow pipeline names flows with, as last programmed.
    flow_names: watch::Sender<Arc<FlowNames>>,
    /// The maps changed since `flow_names` was built.
    names_stale: bool,

    state: ClusterState,
    /// Objects whose conversion failed, by kind and coordinates.
    rejected: BTreeMap<(Kind, ObjectRef), Diagnostic>,
    kinds_seen: BTreeSet<Kind>,
    node_ips: Option<Vec<IpAddr>>,
    registry: EndpointRegistry,
    ids: IdentityAllocator,
    /// What the last compile computed, for the next one to reuse.
    memo: CompileMemo,
    /// [`IdentityAllocator::changes`] when the identities were last saved.
    saved_ids: Option<u64>,

    revision: u64,
    /// When the oldest and the newest uncompiled change arrived.
    dirty: Option<(Instant, Instant)>,
    /// The last input that changed the state.
    last_change: Instant,
    /// When the identities first differed from what was saved.
    unsaved_since: Option<Instant>,
    enforced_revision: u64,
    endpoint_enforced: BTreeMap<String, u64>,
    /// What the maps hold after the last successful apply (isolation flags
    /// for the status).
    last_applied: Option<Desired>,
    failure: Option<Failure>,
}

impl Reconciler {
    /// Loads the classifier (reusing the maps pinned in the pin directory),
    /// reads the state directory and adopts the links pinned by an earlier
    /// agent: each registered endpoint whose interface is still there gets
    /// the new programs swapped into its links; the others are dropped.
    pub fn start(
        config: ReconcilerConfig,
        store: StateStore,
        metrics: Arc<Metrics>,
        sinks: Vec<Arc<dyn DiagnosticSink>>,
    ) -> Result<(Self, watch::Receiver<Arc<Snapshot>>), StartError> {
        let registry = EndpointRegistry::from_records(store.load_endpoints()?)?;
        let saved_ids = match store.load_identities() {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "saved identities unreadable; identities are renumbered \
                    (tracked connections are judged again, nothing else changes)");
                Vec::new()
            }
        };
        let ids =
            IdentityAllocator::from_assignments(saved_ids.iter().cloned()).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "saved identities invalid; identities are renumbered");
                IdentityAllocator::new()
            });
        let dp = Datapath::load(&config.pin_dir)?;
        let (status, status_rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut this = Self {
            reporter: Reporter::new(metrics.clone(), sinks),
            config,
            dp,
            writer: MapWriter::new(),
            store,
            metrics,
            status,
            flow_names: watch::channel(Arc::new(FlowNames::default())).0,
            names_stale: false,
            state: ClusterState::new(),
            rejected: BTreeMap::new(),
            kinds_seen: BTreeSet::new(),
            node_ips: None,
            registry,
            saved_ids: Some(ids.changes()),
            ids,
            memo: CompileMemo::default(),
            revision: 0,
            dirty: None,
            last_change: Instant::now(),
            unsaved_since: None,
            enforced_revision: 0,
            endpoint_enforced: BTreeMap::new(),
            last_applied: None,
            failure: None,
        };
        this.adopt_links();
        this.publish();
        Ok((this, status_rx))
    }

    /// Takes the ring buffer and lost counter out of the datapath, for the
    /// flow pipeline, with the names it should use.
    pub fn take_flow_tap(
        &mut self,
    ) -> Result<(FlowTap, watch::Receiver<Arc<FlowNames>>), DatapathError> {
        let tap = FlowTap {
            reader: FlowReader::take(&mut self.dp)?,
            lost: LostCounter::take(&mut self.dp)?,
        };
        Ok((tap, self.flow_names.subscribe()))
    }

    /// Rebuilds what the flow pipeline names flows with, from the state and
    /// the maps last programmed.
    fn publish_flow_names(&mut self) {
        self.names_stale = false;
        let Some(desired) = &self.last_applied else {
            return;
        };
        let node_ips = self.node_ips.clone().unwrap_or_default();
        let endpoints = self.registry.local_endpoints();
        let input = Self::compile_input(&self.state, &self.registry);
        let previous = self.flow_names.borrow().clone();
        let names = FlowNames::build(
            Some(&previous),
            self.enforced_revision,
            &input,
            &node_ips,
            &endpoints,
            desired,
            &self.ids,
        );
        self.flow_names.send_replace(Arc::new(names));
    }

    /// Handles inputs until shutdown (or until every input is closed).
    pub async fn run(mut self, mut inputs: Inputs) {
        let mut problems = inputs.file_problems.take();
        if let Some(rx) = &mut problems {
            let current = rx.borrow_and_update().clone();
            self.reporter.files(&current);
        }
        let mut sources_open = true;
        loop {
            let deadline = self.deadline();
            tokio::select! {
                biased;
                _ = &mut inputs.shutdown => break,
                update = inputs.sources.recv(), if sources_open => match update {
                    Some(update) => self.on_update(update),
                    None => {
                        // The agent stops when its source fails; until
                        // then, keep serving endpoints with what is known.
                        tracing::warn!("the source stopped sending updates");
                        sources_open = false;
                    }
                },
                command = inputs.commands.recv() => match command {
                    Some(command) => self.on_command(command, &mut inputs.sources),
                    None => break,
                },
                changed = async {
                    match &mut problems {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match changed {
                        Ok(()) => {
                            let current = problems.as_mut().map(|rx| rx.borrow_and_update().clone()).unwrap_or_default();
                            self.reporter.files(&current);
                        }
                        Err(_) => problems = None,
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => self.reconcile(),
                // Idle: bring the generation the classifier left up to date.
                () = std::future::ready(()), if self.writer.lagging() && self.dirty.is_none() => {
                    self.catch_up();
                }
                // Idle: name flows after what was just programmed (off the
                // path from a change to its enforcement).
                () = std::future::ready(()), if self.names_stale => self.publish_flow_names(),
                // The identities the maps now use, for the next start, once
                // changes pause: off the path of every change. The next
                // start reconciles whatever the file says, so losing the
                // latest numbers to a crash costs re-judged connections,
                // never a wrong verdict.
                () = sleep_until(self.save_due()), if self.dirty.is_none() && self.save_due().is_some() => {
                    self.save_identities();
                }
            }
            self.publish();
        }
        self.save_identities();
        tracing::info!(
            revision = self.revision,
            enforced = self.enforced_revision,
            "reconciler stopped; links and maps stay in place"
        );
    }

    // ----- inputs --------------------------------------------------------

    fn changed(&mut self) -> u64 {
        self.revision += 1;
        let now = Instant::now();
        self.last_change = now;
        self.dirty = Some(match self.dirty {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
        self.revision
    }

    fn on_update(&mut self, update: SourceUpdate) {
        let kind = match &update {
            SourceUpdate::Replace(o) => format!("{:?}", o.kind()),
            SourceUpdate::Apply(o) => format!("{:?}", o.kind()),
            SourceUpdate::Delete(k, _) => format!("{k:?}"),
            SourceUpdate::NodeAddresses(_) => "NodeAddresses".to_owned(),
        };
        self.metrics
            .source_updates
            .get_or_create(&KindLabels { kind })
            .inc();
        match update {
            SourceUpdate::Replace(objects) => self.replace(objects),
            SourceUpdate::Apply(object) => self.apply(object),
            SourceUpdate::Delete(kind, key) => self.delete(kind, &key),
            SourceUpdate::NodeAddresses(ips) => {
                tracing::info!(addresses = ?ips, "node addresses");
                self.node_ips = Some(ips);
            }
        }
        self.changed();
    }

    fn replace(&mut self, objects: Objects) {
        let kind = objects.kind();
        self.kinds_seen.insert(kind);
        self.rejected.retain(|(k, _), _| *k != kind);
        match objects {
            Objects::Namespaces(list) => {
                let keep: BTreeSet<&str> = list
                    .iter()
                    .filter_map(|o| o.metadata.name.as_deref())
                    .collect();
                let gone: Vec<String> = self
                    .state
                    .namespaces()
                    .keys()
                    .filter(|n| !keep.contains(n.as_str()))
                    .cloned()
                    .collect();
                for name in gone {
                    self.state.remove_namespace(&name);
                }
                for o in &list {
                    self.apply(Object::Namespace(Box::new(o.clone())));
                }
            }
            Objects::Pods(list) => {
                let keep: BTreeSet<ObjectRef> =
                    list.iter().map(|o| object_ref(&o.metadata)).collect();
                let gone: Vec<ObjectRef> = self
                    .state
                    .pods()
                    .keys()
                    .filter(|k| !keep.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.state.remove_pod(&key);
                }
                for o in list {
                    self.apply(Object::Pod(Box::new(o)));
                }
            }
            Objects::NetworkPolicies(list) => {
                let keep: BTreeSet<ObjectRef> =
                    list.iter().map(|o| object_ref(&o.metadata)).collect();
                let gone: Vec<ObjectRef> = self
                    .state
                    .policies()
                    .keys()
                    .filter(|k| !keep.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.state.remove_policy(&key);
                }
                for o in list {
                    self.apply(Object::NetworkPolicy(Box::new(o)));
                }
            }
        }
    }

    fn apply(&mut self, object: Object) {
        let kind = object.kind();
        let (result, object_kind, meta) = match &object {
            Object::Namespace(o) => (
                self.state.apply_namespace(o),
                ObjectKind::Namespace,
                &o.metadata,
            ),
            Object::Pod(o) => (self.state.apply_pod(o), ObjectKind::Pod, &o.metadata),
            Object::NetworkPolicy(o) => (
                self.state.apply_policy(o),
                ObjectKind::NetworkPolicy,
                &o.metadata,
            ),
        };
        let key = (kind, object_ref(meta));
        match result {
            Ok(()) => {
                self.rejected.remove(&key);
            }
            Err(e) => {
                self.rejected.insert(key, rejected(object_kind, meta, &e));
            }
        }
    }

    fn delete(&mut self, kind: Kind, key: &ObjectRef) {
        match kind {
            Kind::Namespace => {
                self.state.remove_namespace(&key.name);
            }
            Kind::Pod => {
                self.state.remove_pod(key);
            }
            Kind::NetworkPolicy => {
                self.state.remove_policy(key);
            }
        }
        self.rejected.remove(&(kind, key.clone()));
    }

    fn on_command(&mut self, command: Command, sources: &mut mpsc::Receiver<SourceUpdate>) {
        match command {
            Command::Register(spec, reply) => {
                let result = self.register(spec);
                self.count_operation("register", result.is_ok());
                let _ = reply.send(result);
            }
            Command::Unregister(container_id, reply) => {
                let result = self.unregister(&container_id);
                self.count_operation("unregister", result.is_ok());
                let _ = reply.send(result);
            }
            Command::Revision(reply) => {
                // Updates the source sent before this command was sent.
                while let Ok(update) = sources.try_recv() {
                    self.on_update(update);
                }
                let _ = reply.send(self.revision);
            }
            Command::Explain(query, reply) => {
                let _ = reply.send(self.explain(&query));
            }
        }
    }

    /// Explains `query` against what the reconciler compiles: the same
    /// input (pods filled with registered addresses) and node addresses.
    fn explain(&self, query: &crate::explain::Query) -> Result<Explained, CommandError> {
        if self.last_applied.is_none() && self.failure.is_none() {
            let waiting = self.waiting_for();
            return Err(CommandError::NotCompiled(if waiting.is_empty() {
                "first compile pending".to_owned()
            } else {
                format!("waiting for {}", waiting.join(", "))
            }));
        }
        let input = Self::compile_input(&self.state, &self.registry);
        let node_ips = self.node_ips.as_deref().unwrap_or_default();
        let explanation = crate::explain::explain(&input, node_ips, query)?;
        Ok(Explained {
            explanation,
            revision: self.revision,
        })
    }

    fn count_operation(&self, operation: &str, ok: bool) {
        self.metrics
            .endpoint_operations
            .get_or_create(&OperationLabels {
                operation: operation.to_owned(),
                result: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
    }

    // ----- endpoints -----------------------------------------------------

    fn register(&mut self, spec: EndpointSpec) -> Result<Registered, CommandError> {
        let ifindex =
            ifindex_of(&spec.host_interface).map_err(|source| CommandError::NoInterface {
                interface: spec.host_interface.clone(),
                source,
            })?;
        let (record, how, old) = self.registry.register(spec, ifindex)?;
        let pin = pin_name(&record);
        let same_interface = match (&how, &old) {
            (Registration::New, _) => false,
            (_, Some(old)) => old.ifindex == record.ifindex,
            (_, None) => true,
        };
        let attached = if same_interface {
            // A retried ADD, or new pod data on the same interface: the
            // links stay (swapping in the same programs is a no-op for
            // traffic); attach only if they are missing.
            match self.dp.adopt_pinned(&pin) {
                Ok(Adopted::Both) => Ok(()),
                Ok(Adopted::Missing) | Err(_) => {
                    self.dp.attach_pinned(&record.host_interface, &pin)
                }
            }
        } else {
            // A new endpoint, or the container moved to another interface
            // (its old links are replaced and its old connections flushed).
            if let Some(old) = &old {
                self.flush(old);
            }
            self.dp.attach_pinned(&record.host_interface, &pin)
        };
        if let Err(e) = attached {
            // Leave no half-registered endpoint behind.
            let _ = self.dp.detach_pinned(&pin);
            self.registry.remove(&record.container_id);
            self.save_registry();
            return Err(e.into());
        }
        let revision = if how == Registration::Unchanged {
            self.revision
        } else {
            self.save_registry();
            tracing::info!(
                container = %record.container_id,
                pod = %record.pod(),
                interface = %record.host_interface,
                ifindex = record.ifindex,
                endpoint = record.endpoint_id,
                "endpoint registered"
            );
            self.changed()
        };
        Ok(Registered { record, revision })
    }

    fn unregister(&mut self, container_id: &str) -> Result<Unregistered, CommandError> {
        let Some(record) = self.registry.remove(container_id) else {
            return Ok(Unregistered {
                found: false,
                revision: self.revision,
                connections_flushed: 0,
            });
        };
        // Detach first, so no new connection of it gets tracked, then flush.
        if let Err(e) = self.dp.detach_pinned(&pin_name(&record)) {
            tracing::error!(container = %record.container_id, error = %e, "removing the endpoint's pinned links");
        }
        let flushed = self.flush(&record);
        self.save_registry();
        self.endpoint_enforced.remove(container_id);
        let revision = self.changed();
        tracing::info!(
            container = %record.container_id,
            pod = %record.pod(),
            interface = %record.host_interface,
            flushed,
            "endpoint unregistered"
        );
        Ok(Unregistered {
            found: true,
            revision,
            connections_flushed: flushed,
        })
    }

    fn flush(&mut self, record: &EndpointRecord) -> usize {
        match flush_endpoint(&mut self.dp, record.ifindex, record.endpoint_id) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(container = %record.container_id, error = %e, "flushing tracked connections");
                0
            }
        }
    }

    fn save_registry(&self) {
        if let Err(e) = self.store.save_endpoints(self.registry.records()) {
            self.metrics.state_write_errors.inc();
            tracing::error!(error = %e, "saving the endpoint registry");
        }
    }

    /// Takes over the links an earlier agent pinned (see [`Reconciler::start`]).
    fn adopt_links(&mut self) {
        let records: Vec<EndpointRecord> = self.registry.records().cloned().collect();
        let mut changed = false;
        for record in &records {
            let pin = pin_name(record);
            let current = ifindex_of(&record.host_interface).ok();
            if current != Some(record.ifindex) {
                tracing::info!(
                    container = %record.container_id,
                    interface = %record.host_interface,
                    "interface gone while the agent was down; endpoint dropped"
                );
                let _ = self.dp.detach_pinned(&pin);
                self.flush(record);
                self.registry.remove(&record.container_id);
                changed = true;
                continue;
            }
            let result = match self.dp.adopt_pinned(&pin) {
                Ok(Adopted::Both) => Ok("adopted"),
                Ok(Adopted::Missing) => self
                    .dp
                    .attach_pinned(&record.host_interface, &pin)
                    .map(|()| "attached (no pinned link)"),
                Err(e) => {
                    tracing::warn!(container = %record.container_id, error = %e, "adopting pinned links; attaching afresh");
                    self.dp
                        .attach_pinned(&record.host_interface, &pin)
                        .map(|()| "attached afresh")
                }
            };
            match result {
                Ok(how) => tracing::info!(
                    container = %record.container_id,
                    pod = %record.pod(),
                    interface = %record.host_interface,
                    endpoint = record.endpoint_id,
                    how,
                    "endpoint restored"
                ),
                Err(e) => {
                    tracing::error!(container = %record.container_id, error = %e, "cannot attach; endpoint dropped");
                    let _ = self.dp.detach_pinned(&pin);
                    self.registry.remove(&record.container_id);
                    changed = true;
                }
            }
        }
        // Links no registered endpoint owns.
        let known: BTreeSet<String> = self.registry.records().map(pin_name).collect();
        match self.dp.pinned_link_names() {
            Ok(names) => {
                for name in names.into_iter().filter(|n| !known.contains(n)) {
                    tracing::info!(link = %name, "removing a pinned link no endpoint owns");
                    let _ = self.dp.detach_pinned(&name);
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing pinned links"),
        }
        if changed {
            self.save_registry();
        }
        self.metrics.endpoints.set(self.registry.len() as i64);
    }

    // ----- compile and apply ----------------------------------------------

    /// What the first compile still waits for.
    fn waiting_for(&self) -> Vec<String> {
        let mut waiting: Vec<String> = [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy]
            .into_iter()
            .filter(|k| !self.kinds_seen.contains(k))
            .map(|k| format!("{k:?}"))
            .collect();
        if self.config.expect_node_addresses && self.node_ips.is_none() {
            waiting.push("node addresses".to_owned());
        }
        waiting
    }

    /// When to compile next, if at all.
    fn deadline(&self) -> Option<Instant> {
        if !self.waiting_for().is_empty() {
            return None;
        }
        let compile = self
            .dirty
            .map(|(first, last)| (last + DEBOUNCE).min(first + MAX_DELAY));
        let retry = self.failure.as_ref().map(|f| f.retry_at);
        match (compile, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The state to compile: pods without addresses yet (the API server
    /// learns them after the CNI ADD) take those their endpoint registered.
    fn compile_input<'a>(
        state: &'a ClusterState,
        registry: &EndpointRegistry,
    ) -> Cow<'a, ClusterState> {
        let local = registry.local_endpoints();
        let fills: Vec<(&EndpointRecord, crate::model::Pod)> = registry
            .records()
            .filter(|r| !r.ips.is_empty())
            .filter(|r| local.get(&r.pod()).is_some_and(|e| e.ifindex == r.ifindex))
            .filter_map(|r| {
                let pod = state.pod(&r.pod())?;
                pod.ips.is_empty().then(|| (r, pod.clone()))
            })
            .collect();
        if fills.is_empty() {
            return Cow::Borrowed(state);
        }
        let original = state;
        let mut state = original.clone();
        for (record, mut pod) in fills {
            let diagnostics = original
                .diagnostics_of(ObjectKind::Pod, &pod.object_ref())
                .to_vec();
            pod.ips = record.ips.clone();
            state.insert_pod(pod, diagnostics);
        }
        Cow::Owned(state)
    }

    fn reconcile(&mut self) {
        let revision = self.revision;
        self.dirty = None;
        let scope = NodeScope {
            node_name: self.config.node_name.clone(),
            node_ips: self.node_ips.clone().unwrap_or_default(),
            endpoints: self.registry.local_endpoints(),
        };
        let started = std::time::Instant::now();
        let desired = {
            let input = Self::compile_input(&self.state, &self.registry);
            compile_reusing(&input, &scope, &mut self.ids, &mut self.memo)
        };
        self.metrics.observe_compile(started.elapsed());
        if self.unsaved_since.is_none() && self.saved_ids != Some(self.ids.changes()) {
            self.unsaved_since = Some(Instant::now());
        }
        let compiled = started.elapsed();
        let mut diagnostics = desired.diagnostics.clone();
        diagnostics.extend(self.rejected.values().cloned());
        self.reporter.compiled(&diagnostics);
        let reported = started.elapsed();

        let applying = std::time::Instant::now();
        let applied = self.writer.apply_deferred(&mut self.dp, &desired);
        self.metrics.observe_apply(applying.elapsed());
        match applied {
            Ok(stats) => {
                self.metrics.map_occupancy(&desired);
                self.metrics
                    .reconciles
                    .get_or_create(&ResultLabels {
                        result: "ok".into(),
                    })
                    .inc();
                self.metrics
                    .map_entries_written
                    .inc_by(stats.written as u64);
                self.metrics
                    .map_entries_removed
                    .inc_by(stats.removed as u64);
                self.metrics
                    .epochs_bumped
                    .inc_by(stats.epochs_bumped as u64);
                if self.failure.take().is_some() {
                    tracing::info!(revision, "maps programmed again after a failure");
                }
                let level_info = !stats.is_noop() || self.enforced_revision == 0;
                if level_info {
                    tracing::info!(
                        revision,
                        written = stats.written,
                        removed = stats.removed,
                        epochs_bumped = stats.epochs_bumped,
                        endpoints = desired.endpoints.len(),
                        policy_entries = desired.policy.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        compile_ms = compiled.as_millis() as u64,
                        report_ms = (reported - compiled).as_millis() as u64,
                        "maps programmed"
                    );
                } else {
                    tracing::debug!(revision, "maps already up to date");
                }
                self.enforced_revision = revision;
                self.endpoint_enforced = self
                    .registry
                    .records()
                    .map(|r| (r.container_id.clone(), revision))
                    .collect();
                self.last_applied = Some(desired);
                self.names_stale = self.flow_names.receiver_count() > 0;
            }
            Err(e) => self.apply_failed(revision, &e),
        }
    }

    /// Writes the last applied contents into the generation the classifier
    /// no longer reads (after the change was enforced: see
    /// [`MapWriter::apply_deferred`]). A failure only means the next apply
    /// writes more (and reports a real problem then).
    fn catch_up(&mut self) {
        let Some(desired) = &self.last_applied else {
            return;
        };
        let started = std::time::Instant::now();
        match self.writer.catch_up(&mut self.dp, desired) {
            Ok((written, removed)) => tracing::debug!(
                written,
                removed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "other generation brought up to date"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "bringing the other generation up to date; the next apply will")
            }
        }
    }

    fn apply_failed(&mut self, revision: u64, error: &DatapathError) {
        let reason = if is_map_full(error) {
            "map_full"
        } else {
            "other"
        };
        self.metrics
            .reconciles
            .get_or_create(&ResultLabels {
                result: "error".into(),
            })
            .inc();
        self.metrics
            .apply_errors
            .get_or_create(&ApplyErrorLabels {
                reason: reason.into(),
            })
            .inc();
        let message = if reason == "map_full" {
            format!("a map is full, revision {revision} not enforced: {error}")
        } else {
            format!("programming revision {revision} failed: {error}")
        };
        tracing::error!(revision, reason, error = %error, "applying the maps failed; keeping what was enforced before");
        let backoff = self
            .failure
            .as_ref()
            .map_or(RETRY_MIN, |f| (f.backoff * 2).min(RETRY_MAX));
        self.failure = Some(Failure {
            revision,
            message,
            retry_at: Instant::now() + backoff,
            backoff,
        });
    }

    /// When to save the identities, if they changed since the last save.
    fn save_due(&self) -> Option<Instant> {
        let since = self.unsaved_since?;
        Some((self.last_change + SAVE_QUIET).min(since + SAVE_MAX_DELAY))
    }

    fn save_identities(&mut self) {
        let now = self.ids.changes();
        if self.saved_ids == Some(now) {
            return;
        }
        // Attempted counts as saved: a failing disk is retried on the next
        // change, not in a loop.
        self.saved_ids = Some(now);
        self.unsaved_since = None;
        if let Err(e) = self.store.save_identities(&self.ids) {
            self.metrics.state_write_errors.inc();
            tracing::error!(error = %e, "saving identities; retried after the next change");
        }
    }

    // ----- status ----------------------------------------------------------

    fn publish(&self) {
        let flags = |ifindex: u32| {
            self.last_applied
                .as_ref()
                .and_then(|d| d.endpoints.get(&ifindex))
                .map_or(0, |e: &EndpointInfo| e.flags)
        };
        let endpoints = self
            .registry
            .records()
            .map(|r| {
                let f = flags(r.ifindex);
                EndpointStatus {
                    record: r.clone(),
                    enforced_revision: self
                        .endpoint_enforced
                        .get(&r.container_id)
                        .copied()
                        .unwrap_or(0),
                    pod_known: self.state.pod(&r.pod()).is_some_and(|p| {
                        p.node_name.as_deref() == Some(self.config.node_name.as_str())
                    }),
                    ingress_isolated: f & EndpointInfo::INGRESS_ISOLATED != 0,
                    egress_isolated: f & EndpointInfo::EGRESS_ISOLATED != 0,
                }
            })
            .collect();
        let waiting_for = self.waiting_for();
        let snapshot = Snapshot {
            node_name: self.config.node_name.clone(),
            source: self.config.source.clone(),
            revision: self.revision,
            enforced_revision: self.enforced_revision,
            ready: waiting_for.is_empty() && self.enforced_revision > 0,
            waiting_for,
            endpoints,
            diagnostics: self.reporter.current(),
            last_error: self.failure.as_ref().map(|f| f.message.clone()),
            failed_revision: self.failure.as_ref().map_or(0, |f| f.revision),
        };
        self.metrics.revision.set(self.revision as i64);
        self.metrics
            .enforced_revision
            .set(self.enforced_revision as i64);
        self.metrics.endpoints.set(self.registry.len() as i64);
        self.status.send_replace(Arc::new(snapshot));
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Coordinates of an object from its metadata (empty when absent).
fn object_ref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The name an endpoint's links are pinned under.
fn pin_name(record: &EndpointRecord) -> String {
    format!("ep{}", record.endpoint_id)
}

/// The index of interface `name` in the agent's network namespace.
fn ifindex_of(name: &str) -> std::io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// Whether an apply failed because a map has no room.
fn is_map_full(error: &DatapathError) -> bool {
    let DatapathError::Map { source, .. } = error else {
        return false;
    };
    let aya::maps::MapError::SyscallError(e) = source else {
        return false;
    };
    matches!(
        e.io_error.raw_os_error(),
        Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
    )
}
