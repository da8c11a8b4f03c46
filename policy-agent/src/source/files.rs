//! The files source: a directory of Kubernetes YAML (or JSON) manifests as
//! the cluster, for development, tests and clusters without an API server.
//!
//! * Every regular file of the directory (symlinks followed, not recursive)
//!   whose name ends in `.yaml`, `.yml` or `.json` and does not start with
//!   `.` is read; a file may hold several documents (`---`) and `List`
//!   objects. Namespaces, Pods and NetworkPolicies are used; other kinds
//!   are reported (warning) and ignored. Namespaced objects without a
//!   namespace get `default`, as with `kubectl apply`.
//! * A file is loaded whole or not at all: a file that does not parse, or
//!   holds an object that does not decode, is reported (error) and the
//!   objects it held before stay in effect (none, if it never loaded), so
//!   breaking a file never opens what it enforced. The other files load.
//! * On start the source sends [`SourceUpdate::NodeAddresses`] (the
//!   `--node-ip` flags) and one [`SourceUpdate::Replace`] per kind. Then it
//!   follows the directory with **inotify**: a manifest is read when it has
//!   been closed after writing (`IN_CLOSE_WRITE`) or renamed into place
//!   (`IN_MOVED_TO`: the write-to-temporary-then-rename of editors and
//!   `kubectl`-like writers; the hidden temporary file itself is ignored),
//!   and forgotten when removed or renamed away; never on `IN_MODIFY`, so a
//!   file is not read half-written. Events are batched until [`QUIET`]
//!   passes without one (at most [`MAX_SETTLE`]); only the files named are
//!   read. A `..data` swap (ConfigMap volume), a queue overflow or the
//!   directory itself moving makes it scan the whole directory.
//! * Only what changed is sent: an [`SourceUpdate::Apply`] per object that
//!   is new or different, a [`SourceUpdate::Delete`] per object gone.
//! * The safety net: every [`RESCAN_INTERVAL`] the whole directory is
//!   compared with what was loaded (by contents, so no change is missed
//!   whatever the mtime granularity); a difference is loaded once a second
//!   scan [`POLL_INTERVAL`] later sees the same. Without inotify (no
//!   instance left), that scan runs every [`POLL_INTERVAL`].
//! * [`FilesHandle::rescan`] makes it scan now and returns once the updates
//!   are sent (the API's `Sync`).
//!
//! Problems with files are published on a watch channel
//! ([`FilesHandle::problems`]); the agent logs, counts and lists them.
//!
//! [`load_dir`] reads a directory once with the same loader (`policy-agent
//! explain --dir`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use inotify::{EventMask, Inotify, WatchMask};
use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
use serde::Deserialize as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{Kind, Object, Objects, SourceUpdate};
use crate::model::{ObjectRef, Severity};

/// How often the directory is scanned when inotify is not available, and
/// how soon a scan that found a change looks again before loading it.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the whole directory is compared with what was loaded while
/// inotify watches it: the safety net for a lost event.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(60);
/// Quiet time after an event before the changed files are read: a burst of
/// writes (`kubectl apply` of several files) becomes one batch.
pub const QUIET: Duration = Duration::from_millis(2);
/// Longest a continuously changing directory delays loading.
pub const MAX_SETTLE: Duration = Duration::from_secs(1);
/// The namespace of namespaced objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A problem with one file (or the directory).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileProblem {
    pub path: PathBuf,
    pub severity: Severity,
    /// Stable snake_case code: `unreadable`, `unparseable`, `unsupported_kind`,
    /// `duplicate_object`.
    pub code: &'static str,
    pub message: String,
}

/// Why the source stops.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("the manifest directory {path} cannot be read: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Controls a running [`FilesSource`].
#[derive(Clone, Debug)]
pub struct FilesHandle {
    rescan: mpsc::Sender<oneshot::Sender<()>>,
    problems: watch::Receiver<Vec<FileProblem>>,
}

impl FilesHandle {
    /// Scans the directory now; returns once the resulting updates are in
    /// the reconciler's channel. False if the source has stopped.
    pub async fn rescan(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.rescan.send(tx).await.is_ok() && rx.await.is_ok()
    }

    /// The current problems with files, updated on every load.
    pub fn problems(&self) -> watch::Receiver<Vec<FileProblem>> {
        self.problems.clone()
    }
}

/// A directory's objects, loaded once by [`load_dir`].
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub namespaces: Vec<core::Namespace>,
    pub pods: Vec<core::Pod>,
    pub policies: Vec<net::NetworkPolicy>,
    /// Files that did not load (their objects are left out), kinds ignored,
    /// duplicates.
    pub problems: Vec<FileProblem>,
}

/// Reads `dir` once, the way the source does: the same files, the same
/// parsing, defaults and duplicate handling.
pub fn load_dir(dir: &Path) -> Result<Loaded, FilesError> {
    let files = read_dir(dir).map_err(|source| FilesError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let mut loader = Loader::default();
    loader.load(files);
    let mut loaded = Loaded::default();
    // A first load replaces every kind.
    for update in loader.updates() {
        match update {
            SourceUpdate::Replace(Objects::Namespaces(o)) => loaded.namespaces = o,
            SourceUpdate::Replace(Objects::Pods(o)) => loaded.pods = o,
            SourceUpdate::Replace(Objects::NetworkPolicies(o)) => loaded.policies = o,
            _ => {}
        }
    }
    loaded.problems = loader.problems();
    Ok(loaded)
}

/// The source; [`FilesSource::run`] drives it.
pub struct FilesSource {
    dir: PathBuf,
    node_ips: Vec<IpAddr>,
    rescan: mpsc::Receiver<oneshot::Sender<()>>,
    problems: watch::Sender<Vec<FileProblem>>,
    loader: Loader,
}

/// What a batch of inotify events asks for.
#[derive(Debug, Default)]
struct Dirty {
    /// Manifests written (closed after writing), renamed in or out, removed.
    paths: BTreeSet<PathBuf>,
    /// Something only a full scan can sort out: a `..data` swap (ConfigMap
    /// volumes), the directory itself moved or removed, a queue overflow.
    full: bool,
    /// The watch is gone (the directory moved or removed): watch afresh.
    rewatch: bool,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.paths.is_empty() && !self.full
    }
}

/// Watches the directory with inotify.
struct Watcher {
    events: inotify::EventStream<Vec<u8>>,
}

impl Watcher {
    /// Events that tell a manifest is complete or gone. `IN_MODIFY` is left
    /// out on purpose: a file being written is read once it is closed (or
    /// renamed into place), never half-way.
    fn mask() -> WatchMask {
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::CREATE
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR
    }

    fn new(dir: &Path) -> std::io::Result<Self> {
        let inotify = Inotify::init()?;
        inotify.watches().add(dir, Self::mask())?;
        Ok(Self {
            events: inotify.into_event_stream(vec![0u8; 64 * 1024])?,
        })
    }

    /// Sorts one event into `dirty`.
    fn note(dir: &Path, event: &inotify::Event<std::ffi::OsString>, dirty: &mut Dirty) {
        if event
            .mask
            .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED)
        {
            dirty.full = true;
            dirty.rewatch = true;
            return;
        }
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            dirty.full = true;
            return;
        }
        let Some(name) = &event.name else {
            dirty.full = true;
            return;
        };
        let path = dir.join(name);
        if is_manifest(&path) {
            // A regular file is complete at CLOSE_WRITE; its CREATE says
            // nothing yet. A symlink (or a file linked in) has no CLOSE_WRITE.
            let created = event.mask.contains(EventMask::CREATE);
            if !created || std::fs::symlink_metadata(&path).is_ok_and(|m| !m.file_type().is_file())
            {
                dirty.paths.insert(path);
            }
        } else if name.to_string_lossy().starts_with("..") {
            // The atomic swap of a ConfigMap volume: `..data` now points to
            // a new directory the manifests' symlinks resolve through.
            dirty.full = true;
        }
    }
}

impl FilesSource {
    /// A source reading `dir`, announcing `node_ips` as the node's addresses.
    pub fn new(dir: PathBuf, node_ips: Vec<IpAddr>) -> (Self, FilesHandle) {
        let (rescan_tx, rescan_rx) = mpsc::channel(8);
        let (problems_tx, problems_rx) = watch::channel(Vec::new());
        (
            Self {
                dir,
                node_ips,
                rescan: rescan_rx,
                problems: problems_tx,
                loader: Loader::default(),
            },
            FilesHandle {
                rescan: rescan_tx,
                problems: problems_rx,
            },
        )
    }

    /// Sends the initial state, then follows the directory until the
    /// receiver is gone. Fails only if the directory cannot be read at start.
    pub async fn run(mut self, tx: mpsc::Sender<SourceUpdate>) -> Result<(), FilesError> {
        // Watch first, then read: nothing written in between is missed.
        let mut watcher = match Watcher::new(&self.dir) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e,
                    "files source: cannot watch the directory with inotify; polling every {POLL_INTERVAL:?}");
                None
            }
        };
        let first = read_dir(&self.dir).map_err(|source| FilesError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        tracing::info!(dir = %self.dir.display(), files = first.len(), "files source: loading");
        if tx
            .send(SourceUpdate::NodeAddresses(self.node_ips.clone()))
            .await
            .is_err()
        {
            return Ok(());
        }
        if !self.load_and_send(first, &tx).await {
            return Ok(());
        }

        // The safety net: a full scan now and then (every poll without
        // inotify), loaded once two scans agree.
        let every = if watcher.is_some() {
            RESCAN_INTERVAL
        } else {
            POLL_INTERVAL
        };
        let mut next_scan = Instant::now() + every;
        let mut pending: Option<(Snapshot, Instant)> = None;
        let mut dirty = Dirty::default();
        let mut dirty_since: Option<Instant> = None;
        let mut rescans_open = true;
        loop {
            // Events are read as they come; the batch is loaded after
            // QUIET without events (at most MAX_SETTLE after the first).
            let load_at = dirty_since.map(|first| (Instant::now() + QUIET).min(first + MAX_SETTLE));
            let scan_at = match &pending {
                Some(_) => (Instant::now() + POLL_INTERVAL).min(next_scan),
                None => next_scan,
            };
            tokio::select! {
                event = async {
                    match &mut watcher {
                        Some(w) => w.events.next().await,
                        None => std::future::pending().await,
                    }
                } => match event {
                    Some(Ok(event)) => {
                        Watcher::note(&self.dir, &event, &mut dirty);
                        if !dirty.is_empty() && dirty_since.is_none() {
                            dirty_since = Some(Instant::now());
                        }
                        if dirty.rewatch {
                            dirty.rewatch = false;
                            match Watcher::new(&self.dir) {
                                Ok(w) => watcher = Some(w),
                                Err(e) => {
                                    tracing::warn!(error = %e, "files source: cannot watch the directory again; polling every {POLL_INTERVAL:?}");
                                    watcher = None;
                                    next_scan = Instant::now();
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "files source: reading inotify events; scanning instead");
                        dirty.full = true;
                        dirty_since.get_or_insert_with(Instant::now);
                    }
                    None => {
                        tracing::warn!("files source: inotify stream ended; polling every {POLL_INTERVAL:?}");
                        watcher = None;
                        next_scan = Instant::now();
                    }
                },
                () = sleep_until(load_at), if load_at.is_some() => {
                    let batch = std::mem::take(&mut dirty);
                    dirty_since = None;
                    let ok = if batch.full {
                        let seen = self.snapshot();
                        self.load_snapshot(seen, &tx).await
                    } else {
                        self.load_paths(batch.paths, &tx).await
                    };
                    if !ok {
                        return Ok(());
                    }
                }
                () = tokio::time::sleep_until(scan_at) => {
                    if pending.is_none() {
                        next_scan = Instant::now() + if watcher.is_some() { RESCAN_INTERVAL } else { POLL_INTERVAL };
                    }
                    let seen = self.snapshot();
                    if self.loader.holds(&seen) {
                        pending = None;
                        continue;
                    }
                    // Changed without an event (or before it): load once a
                    // second scan sees the same, so a file being written in
                    // place is never loaded half-way.
                    let settled = match &pending {
                        Some((p, since)) => *p == seen || since.elapsed() >= MAX_SETTLE,
                        None => false,
                    };
                    if !settled {
                        let since = pending.map_or_else(Instant::now, |(_, s)| s);
                        pending = Some((seen, since));
                        continue;
                    }
                    pending = None;
                    if watcher.is_some() {
                        tracing::info!("files source: the periodic scan found changes no event announced");
                    }
                    if !self.load_snapshot(seen, &tx).await {
                        return Ok(());
                    }
                }
                request = self.rescan.recv(), if rescans_open => {
                    let Some(reply) = request else {
                        // Every handle is gone: watching goes on.
                        rescans_open = false;
                        continue;
                    };
                    let seen = self.snapshot();
                    pending = None;
                    dirty = Dirty::default();
                    dirty_since = None;
                    if !self.load_snapshot(seen, &tx).await {
                        return Ok(());
                    }
                    let _ = reply.send(());
                }
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        match read_dir(&self.dir) {
            Ok(files) => Snapshot::Files(files),
            Err(e) => Snapshot::Unreadable(e.to_string()),
        }
    }

    /// Loads a snapshot; false when the receiver is gone.
    async fn load_snapshot(&mut self, snapshot: Snapshot, tx: &mpsc::Sender<SourceUpdate>) -> bool {
        match snapshot {
            Snapshot::Files(files) => self.load_and_send(files, tx).await,
            Snapshot::Unreadable(message) => {
                // Keep what was loaded: a directory that vanishes (a volume
                // remounted) must not open everything.
                self.loader.dir_problem = Some(FileProblem {
                    path: self.dir.clone(),
                    severity: Severity::Error,
                    code: "unreadable",
                    message: format!(
                        "directory cannot be read, keeping what was loaded: {message}"
                    ),
                });
                self.publish_problems();
                true
            }
        }
    }

    /// Reads and loads only `paths` (written, renamed or removed).
    async fn load_paths(
        &mut self,
        paths: BTreeSet<PathBuf>,
        tx: &mpsc::Sender<SourceUpdate>,
    ) -> bool {
        let changes = paths.into_iter().map(|path| {
            let bytes = read_manifest(&path);
            (path, bytes)
        });
        self.loader.apply_changes(changes.collect());
        self.send_updates(tx).await
    }

    async fn load_and_send(
        &mut self,
        files: BTreeMap<PathBuf, Vec<u8>>,
        tx: &mpsc::Sender<SourceUpdate>,
    ) -> bool {
        self.loader.dir_problem = None;
        self.loader.load(files);
        self.send_updates(tx).await
    }

    async fn send_updates(&mut self, tx: &mpsc::Sender<SourceUpdate>) -> bool {
        let updates = self.loader.updates();
        self.publish_problems();
        for update in updates {
            if tx.send(update).await.is_err() {
                return false;
            }
        }
        true
    }

    fn publish_problems(&self) {
        let problems = self.loader.problems();
        self.problems.send_if_modified(|current| {
            if *current == problems {
                false
            } else {
                *current = problems;
                true
            }
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What a poll saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Snapshot {
    Files(BTreeMap<PathBuf, Vec<u8>>),
    Unreadable(String),
}

/// Whether a directory entry is a manifest.
fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

/// The contents of every manifest of `dir`. A file that vanishes between
/// listing and reading is left out; one that cannot be read is an error of
/// the whole scan only if the directory itself cannot be listed.
fn read_dir(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !is_manifest(&path) {
            continue;
        }
        if let Some(bytes) = read_manifest(&path) {
            files.insert(path, bytes);
        }
    }
    Ok(files)
}

/// One manifest's contents; `None` when it is gone (or not a regular file).
/// Contents that cannot be read are recorded as such: the loader reports them.
fn read_manifest(path: &Path) -> Option<Vec<u8>> {
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("\0unreadable: {e}").into_bytes()),
    }
}

/// (kind, namespace, name) of an object, to find duplicates.
fn object_key(object: &Object) -> ObjectKey {
    let (kind, meta) = match object {
        Object::Namespace(o) => ("Namespace", &o.metadata),
        Object::Pod(o) => ("Pod", &o.metadata),
        Object::NetworkPolicy(o) => ("NetworkPolicy", &o.metadata),
    };
    (
        kind,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One file's state. Only bytes and object keys are kept: the objects are
/// parsed again when a change needs them (10,000 pods as API objects would
/// be most of the agent's memory).
#[derive(Debug, Default)]
struct FileState {
    /// The contents last seen.
    bytes: Arc<[u8]>,
    /// The last version that loaded.
    good: Option<Good>,
    problems: Vec<FileProblem>,
}

/// A version of a file that loaded.
#[derive(Clone, Debug)]
struct Good {
    bytes: Arc<[u8]>,
    keys: Vec<ObjectKey>,
}

impl Good {
    /// Its objects, parsed again (it parsed before, so it parses now).
    fn objects(&self, path: &Path) -> Vec<Object> {
        parse_file(path, &self.bytes).map_or_else(|_| Vec::new(), |(objects, _)| objects)
    }
}

/// (kind, namespace, name).
type ObjectKey = (&'static str, String, String);

/// Turns directory contents into updates (no I/O: testable): the first
/// time one `Replace` per kind, then an `Apply` for each object that
/// changed and a `Delete` for each one gone, looking only at the files that
/// changed.
#[derive(Debug, Default)]
struct Loader {
    files: BTreeMap<PathBuf, FileState>,
    /// Whether the first `Replace`s went out.
    sent: bool,
    /// The files holding each object, in path order, once per copy: the
    /// last one's copy is the object (later files win).
    index: BTreeMap<ObjectKey, Vec<PathBuf>>,
    /// Files whose objects changed since the last [`Loader::updates`], with
    /// the version that loaded before.
    touched: BTreeMap<PathBuf, Option<Good>>,
    /// The objects of the files parsed since the last [`Loader::updates`].
    fresh: BTreeMap<PathBuf, Vec<Object>>,
    duplicates: Vec<FileProblem>,
    dir_problem: Option<FileProblem>,
}

impl Loader {
    /// Takes the directory's whole contents; re-parses changed files.
    fn load(&mut self, snapshot: BTreeMap<PathBuf, Vec<u8>>) {
        let mut changes: BTreeMap<PathBuf, Option<Vec<u8>>> = self
            .files
            .keys()
            .filter(|p| !snapshot.contains_key(*p))
            .map(|p| (p.clone(), None))
            .collect();
        changes.extend(snapshot.into_iter().map(|(p, b)| (p, Some(b))));
        self.apply_changes(changes);
    }

    /// Whether the files hold exactly `snapshot` already.
    fn holds(&self, snapshot: &Snapshot) -> bool {
        let Snapshot::Files(files) = snapshot else {
            return self.dir_problem.is_some();
        };
        files.len() == self.files.len()
            && files
                .iter()
                .all(|(p, b)| self.files.get(p).is_some_and(|s| *s.bytes == **b))
    }

    /// Takes the contents of some files (`None`: the file is gone).
    fn apply_changes(&mut self, changes: BTreeMap<PathBuf, Option<Vec<u8>>>) {
        for (path, bytes) in changes {
            let Some(bytes) = bytes else {
                if let Some(state) = self.files.remove(&path) {
                    self.fresh.remove(&path);
                    self.touched.entry(path).or_insert(state.good);
                }
                continue;
            };
            let known = self.files.contains_key(&path);
            let state = self.files.entry(path.clone()).or_default();
            if known && *state.bytes == *bytes {
                continue;
            }
            let bytes: Arc<[u8]> = bytes.into();
            match parse_file(&path, &bytes) {
                Ok((objects, problems)) => {
                    tracing::debug!(file = %path.display(), objects = objects.len(), "files source: loaded");
                    let good = Good {
                        bytes: bytes.clone(),
                        keys: objects.iter().map(object_key).collect(),
                    };
                    let before = state.good.replace(good);
                    state.problems = problems;
                    self.touched.entry(path.clone()).or_insert(before);
                    self.fresh.insert(path, objects);
                }
                Err(message) => {
                    let kept = state.good.as_ref().map_or(0, |g| g.keys.len());
                    let problem = FileProblem {
                        path: path.clone(),
                        severity: Severity::Error,
                        code: "unparseable",
                        message: if state.good.is_some() {
                            format!("{message}; keeping its previous {kept} objects")
                        } else {
                            format!("{message}; nothing loaded from it")
                        },
                    };
                    state.problems = vec![problem];
                }
            }
            state.bytes = bytes;
        }
    }

    /// The file whose copy of `key` is in effect.
    fn winner(&self, key: &ObjectKey) -> Option<&PathBuf> {
        self.index.get(key)?.last()
    }

    /// Takes `path`'s keys `before` out of the index and its current ones in.
    fn reindex(&mut self, path: &Path, before: Option<&[ObjectKey]>) {
        for key in before.into_iter().flatten() {
            if let Some(paths) = self.index.get_mut(key) {
                paths.retain(|p| p != path);
                if paths.is_empty() {
                    self.index.remove(key);
                }
            }
        }
        let Some(good) = self.files.get(path).and_then(|s| s.good.as_ref()) else {
            return;
        };
        for key in &good.keys {
            let paths = self.index.entry(key.clone()).or_default();
            let at = paths.partition_point(|p| p.as_path() <= path);
            paths.insert(at, path.to_owned());
        }
    }

    /// Objects in several files (or twice in one) are problems: the later
    /// copy is used.
    fn find_duplicates(&mut self) {
        self.duplicates = self
            .index
            .iter()
            .filter(|(_, paths)| paths.len() > 1)
            .flat_map(|(key, paths)| {
                paths.windows(2).map(move |pair| FileProblem {
                    path: pair[1].clone(),
                    severity: Severity::Warning,
                    code: "duplicate_object",
                    message: format!(
                        "{} {}{} is also in {}; this file's copy is used",
                        key.0,
                        if key.1.is_empty() {
                            String::new()
                        } else {
                            format!("{}/", key.1)
                        },
                        key.2,
                        pair[0].display()
                    ),
                })
            })
            .collect();
    }

    /// The current objects of the file at `path`: parsed just now, or
    /// parsed again into `cache`.
    fn current<'a>(
        &'a self,
        fresh: &'a BTreeMap<PathBuf, Vec<Object>>,
        cache: &'a mut BTreeMap<PathBuf, Vec<Object>>,
        path: &Path,
    ) -> &'a [Object] {
        if let Some(objects) = fresh.get(path) {
            return objects;
        }
        let good = self.files.get(path).and_then(|s| s.good.as_ref());
        cache
            .entry(path.to_owned())
            .or_insert_with(|| good.map(|g| g.objects(path)).unwrap_or_default())
    }

    /// The updates since the last call (see [`Loader`]).
    fn updates(&mut self) -> Vec<SourceUpdate> {
        let touched = std::mem::take(&mut self.touched);
        let fresh = std::mem::take(&mut self.fresh);
        // Only objects that were or are in a changed file can have changed.
        let mut candidates: BTreeSet<ObjectKey> = BTreeSet::new();
        for (path, before) in &touched {
            candidates.extend(before.iter().flat_map(|g| g.keys.iter().cloned()));
            if let Some(good) = self.files.get(path).and_then(|s| s.good.as_ref()) {
                candidates.extend(good.keys.iter().cloned());
            }
        }
        let old: Vec<Option<PathBuf>> = candidates
            .iter()
            .map(|key| self.winner(key).cloned())
            .collect();
        for (path, before) in &touched {
            self.reindex(path, before.as_ref().map(|g| g.keys.as_slice()));
        }
        self.find_duplicates();
        if !self.sent {
            self.sent = true;
            // Every file was just parsed: the winners are moved out.
            let mut fresh: BTreeMap<PathBuf, Vec<Option<Object>>> = fresh
                .into_iter()
                .map(|(p, objects)| (p, objects.into_iter().map(Some).collect()))
                .collect();
            let mut aggregate = Aggregate::default();
            for (key, paths) in &self.index {
                let Some(path) = paths.last() else { continue };
                let object = fresh.get_mut(path).and_then(|objects| {
                    objects
                        .iter_mut()
                        .rev()
                        .find(|o| o.as_ref().is_some_and(|o| object_key(o) == *key))
                        .and_then(Option::take)
                });
                match object {
                    Some(Object::Namespace(o)) => aggregate.namespaces.push(*o),
                    Some(Object::Pod(o)) => aggregate.pods.push(*o),
                    Some(Object::NetworkPolicy(o)) => aggregate.policies.push(*o),
                    None => {}
                }
            }
            return vec![
                SourceUpdate::Replace(Objects::Namespaces(aggregate.namespaces)),
                SourceUpdate::Replace(Objects::Pods(aggregate.pods)),
                SourceUpdate::Replace(Objects::NetworkPolicies(aggregate.policies)),
            ];
        }
        // The versions before, of the touched files, parsed again.
        let before: BTreeMap<&PathBuf, Vec<Object>> = touched
            .iter()
            .filter(|(_, good)| good.is_some())
            .map(|(path, good)| {
                (
                    path,
                    good.as_ref().map(|g| g.objects(path)).unwrap_or_default(),
                )
            })
            .collect();
        let mut cache: BTreeMap<PathBuf, Vec<Object>> = BTreeMap::new();
        let mut updates = Vec::new();
        for (key, old_path) in candidates.iter().zip(old) {
            let old = old_path.and_then(|path| match touched.get(&path) {
                Some(_) => before
                    .get(&path)
                    .and_then(|objects| find(objects, key))
                    .cloned(),
                None => find(self.current(&fresh, &mut cache, &path), key).cloned(),
            });
            let new = self
                .winner(key)
                .cloned()
                .and_then(|path| find(self.current(&fresh, &mut cache, &path), key).cloned());
            match (old, new) {
                (old, Some(new)) if old.as_ref().is_none_or(|old| !same_object(old, &new)) => {
                    updates.push(SourceUpdate::Apply(new));
                }
                (Some(_), None) => updates.push(SourceUpdate::Delete(
                    kind_of(key.0),
                    ObjectRef::new(key.1.clone(), key.2.clone()),
                )),
                _ => {}
            }
        }
        updates
    }

    /// Every current problem, by path.
    fn problems(&self) -> Vec<FileProblem> {
        let mut all: Vec<FileProblem> = self
            .files
            .values()
            .flat_map(|s| s.problems.iter().cloned())
            .chain(self.duplicates.iter().cloned())
            .chain(self.dir_problem.iter().cloned())
            .collect();
        all.sort();
        all
    }
}

/// The last object `key` of a file's objects (the later copy wins).
fn find<'a>(objects: &'a [Object], key: &ObjectKey) -> Option<&'a Object> {
    objects.iter().rev().find(|o| object_key(o) == *key)
}

fn same_object(a: &Object, b: &Object) -> bool {
    match (a, b) {
        (Object::Namespace(a), Object::Namespace(b)) => a == b,
        (Object::Pod(a), Object::Pod(b)) => a == b,
        (Object::NetworkPolicy(a), Object::NetworkPolicy(b)) => a == b,
        _ => false,
    }
}

fn kind_of(kind: &str) -> Kind {
    match kind {
        "Namespace" => Kind::Namespace,
        "Pod" => Kind::Pod,
        _ => Kind::NetworkPolicy,
    }
}

/// Every object by kind, for the first `Replace`s.
#[derive(Clone, Debug, Default, PartialEq)]
struct Aggregate {
    namespaces: Vec<core::Namespace>,
    pods: Vec<core::Pod>,
    policies: Vec<net::NetworkPolicy>,
}

/// Parses one file: every document, `List`s flattened.
fn parse_file(path: &Path, bytes: &[u8]) -> Result<(Vec<Object>, Vec<FileProblem>), String> {
    if let Some(why) = bytes.strip_prefix(b"\0unreadable: ") {
        return Err(format!("cannot read: {}", String::from_utf8_lossy(why)));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(document)
            .map_err(|e| format!("document {}: {e}", index + 1))?;
        if value.is_null() {
            continue;
        }
        collect(path, value, index + 1, &mut objects, &mut problems)?;
    }
    Ok((objects, problems))
}

/// Decodes one object (or the items of a list) of document `doc`.
fn collect(
    path: &Path,
    value: serde_yaml_ng::Value,
    doc: usize,
    objects: &mut Vec<Object>,
    problems: &mut Vec<FileProblem>,
) -> Result<(), String> {
    let text = |field: &str| value.get(field).and_then(|v| v.as_str()).map(str::to_owned);
    let (kind, api_version) = (text("kind"), text("apiVersion").unwrap_or_default());
    let Some(kind) = kind else {
        return Err(format!("document {doc}: no `kind`"));
    };
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_owned();
    let what = || format!("document {doc} ({kind} {name:?})");
    match (kind.as_str(), api_version.as_str()) {
        ("Namespace", "v1") => {
            let o: core::Namespace =
                serde_yaml_ng::from_value(value).map_err(|e| format!("{}: {e}", what()))?;
            objects.push(Object::Namespace(Box::new(o)));
        }
        ("Pod", "v1") => {
            let mut o: core::Pod =
                serde_yaml_ng::from_value(value).map_err(|e| format!("{}: {e}", what()))?;
            o.metadata
                .namespace
                .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
            objects.push(Object::Pod(Box::new(o)));
        }
        ("NetworkPolicy", "networking.k8s.io/v1") => {
            let mut o: net::NetworkPolicy =
                serde_yaml_ng::from_value(value).map_err(|e| format!("{}: {e}", what()))?;
            o.metadata
                .namespace
                .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
            objects.push(Object::NetworkPolicy(Box::new(o)));
        }
        (list, _) if list.ends_with("List") && value.get("items").is_some() => {
            let items = match value.get("items") {
                Some(serde_yaml_ng::Value::Sequence(items)) => items.clone(),
                Some(serde_yaml_ng::Value::Null) => Vec::new(),
                _ => return Err(format!("{}: `items` is not a list", what())),
            };
            for item in items {
                collect(path, item, doc, objects, problems)?;
            }
        }
        (other, version) => problems.push(FileProblem {
            path: path.to_owned(),
            severity: Severity::Warning,
            code: "unsupported_kind",
            message: format!(
                "document {doc}: {other} {name:?} ({version}) is not a kind the agent uses; ignored"
            ),
        }),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers: []\n";
    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: a\nspec:\n  podSelector: {}\n";

    fn snapshot(files: &[(&str, &str)]) -> BTreeMap<PathBuf, Vec<u8>> {
        files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.as_bytes().to_vec()))
            .collect()
    }

    fn kinds(updates: &[SourceUpdate]) -> Vec<crate::source::Kind> {
        updates
            .iter()
            .map(|u| match u {
                SourceUpdate::Replace(o) => o.kind(),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn first_load_replaces_every_kind_then_only_changed_ones() {
        use crate::source::Kind;
        let mut loader = Loader::default();
        loader.load(snapshot(&[(
            "/m/a.yaml",
            &format!("{NS}---\n{POD}---\n{POLICY}"),
        )]));
        let updates = loader.updates();
        assert_eq!(
            kinds(&updates),
            [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy]
        );
        let SourceUpdate::Replace(Objects::Pods(pods)) = &updates[1] else {
            panic!()
        };
        assert_eq!(pods[0].metadata.namespace.as_deref(), Some("default"));

        // Unchanged contents: nothing.
        loader.load(snapshot(&[(
            "/m/a.yaml",
            &format!("{NS}---\n{POD}---\n{POLICY}"),
        )]));
        assert!(loader.updates().is_empty());

        // The policy moved to its own file: no change of objects at all.
        loader.load(snapshot(&[
            ("/m/a.yaml", &format!("{NS}---\n{POD}")),
            ("/m/b.yaml", POLICY),
        ]));
        assert!(loader.updates().is_empty());

        // Policy file deleted: only the policy is deleted.
        loader.load(snapshot(&[("/m/a.yaml", &format!("{NS}---\n{POD}"))]));
        let updates = loader.updates();
        assert!(
            matches!(&updates[..], [SourceUpdate::Delete(Kind::NetworkPolicy, r)] if *r == ObjectRef::new("a", "deny")),
            "{updates:?}"
        );

        // A pod relabelled: only that pod is applied.
        let relabelled = POD.replace("  name: p\n", "  name: p\n  labels: {app: x}\n");
        loader.apply_changes(BTreeMap::from([(
            PathBuf::from("/m/a.yaml"),
            Some(format!("{NS}---\n{relabelled}").into_bytes()),
        )]));
        let updates = loader.updates();
        assert!(
            matches!(&updates[..], [SourceUpdate::Apply(Object::Pod(p))] if p.metadata.labels.is_some()),
            "{updates:?}"
        );
    }

    #[test]
    fn a_broken_file_keeps_its_previous_objects_and_is_reported() {
        use crate::source::Kind;
        let mut loader = Loader::default();
        loader.load(snapshot(&[("/m/a.yaml", NS), ("/m/p.yaml", POLICY)]));
        loader.updates();
        assert!(loader.problems().is_empty());

        loader.load(snapshot(&[
            ("/m/a.yaml", NS),
            ("/m/p.yaml", "kind: NetworkPolicy\n  bad: [indent"),
        ]));
        assert!(loader.updates().is_empty(), "the old policy stays");
        let problems = loader.problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].code, "unparseable");
        assert_eq!(problems[0].path, PathBuf::from("/m/p.yaml"));
        assert!(problems[0].message.contains("keeping its previous 1"));

        // A new file that never loaded contributes nothing.
        loader.load(snapshot(&[
            ("/m/a.yaml", NS),
            ("/m/p.yaml", POLICY),
            (
                "/m/q.yaml",
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: q\nspec:\n  podSelector: 5\n",
            ),
        ]));
        assert!(loader.updates().is_empty());
        let problems = loader.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, PathBuf::from("/m/q.yaml"));

        // Fixed: loads, problem cleared.
        loader.load(snapshot(&[("/m/a.yaml", NS), ("/m/p.yaml", POLICY)]));
        assert!(loader.updates().is_empty());
        assert!(loader.problems().is_empty());
        let _ = Kind::Pod;
    }

    #[test]
    fn other_kinds_are_reported_and_lists_are_flattened() {
        let mut loader = Loader::default();
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata:\n    name: d\n",
            NS.trim_end().replace('\n', "\n  ")
        );
        loader.load(snapshot(&[("/m/l.yaml", &list)]));
        let updates = loader.updates();
        let SourceUpdate::Replace(Objects::Namespaces(ns)) = &updates[0] else {
            panic!()
        };
        assert_eq!(ns.len(), 1);
        let problems = loader.problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].code, "unsupported_kind");
        assert_eq!(problems[0].severity, Severity::Warning);
    }

    #[test]
    fn duplicates_are_reported_and_the_later_file_wins() {
        let mut loader = Loader::default();
        let other = POLICY.replace("podSelector: {}", "podSelector: {matchLabels: {x: y}}");
        loader.load(snapshot(&[("/m/1.yaml", POLICY), ("/m/2.yaml", &other)]));
        let updates = loader.updates();
        let SourceUpdate::Replace(Objects::NetworkPolicies(p)) = &updates[2] else {
            panic!()
        };
        assert_eq!(p.len(), 1);
        assert!(
            p[0].spec
                .as_ref()
                .unwrap()
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .is_some()
        );
        assert_eq!(loader.problems()[0].code, "duplicate_object");
    }

    #[test]
    fn manifests_are_yaml_and_json_files_not_hidden() {
        assert!(is_manifest(Path::new("/d/a.yaml")));
        assert!(is_manifest(Path::new("/d/a.yml")));
        assert!(is_manifest(Path::new("/d/a.json")));
        assert!(!is_manifest(Path::new("/d/.a.yaml")));
        assert!(!is_manifest(Path::new("/d/a.yaml.tmp")));
        assert!(!is_manifest(Path::new("/d/..data")));
    }

    #[test]
    fn load_dir_reads_once_like_the_source() {
        let dir = std::env::temp_dir().join(format!("palisade-load-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), format!("{NS}---\n{POD}")).unwrap();
        std::fs::write(dir.join("p.yml"), POLICY).unwrap();
        std::fs::write(dir.join("bad.yaml"), "kind: [").unwrap();
        std::fs::write(dir.join(".hidden.yaml"), POLICY).unwrap();
        let loaded = load_dir(&dir).unwrap();
        assert_eq!(
            (
                loaded.namespaces.len(),
                loaded.pods.len(),
                loaded.policies.len()
            ),
            (1, 1, 1)
        );
        assert_eq!(
            loaded.pods[0].metadata.namespace.as_deref(),
            Some("default")
        );
        assert_eq!(loaded.problems.len(), 1);
        assert_eq!(loaded.problems[0].code, "unparseable");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(load_dir(&dir), Err(FilesError::Dir { .. })));
    }

    async fn next(rx: &mut mpsc::Receiver<SourceUpdate>) -> Option<SourceUpdate> {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an update within 5 s (no event seen?)")
    }

    #[tokio::test]
    async fn follows_the_directory_and_rescans_on_demand() {
        let dir = std::env::temp_dir().join(format!("palisade-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ns.yaml"), NS).unwrap();
        let (source, handle) = FilesSource::new(dir.clone(), vec!["10.0.0.1".parse().unwrap()]);
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(source.run(tx));
        assert!(matches!(
            rx.recv().await,
            Some(SourceUpdate::NodeAddresses(a)) if a.len() == 1
        ));
        for _ in 0..3 {
            assert!(matches!(rx.recv().await, Some(SourceUpdate::Replace(_))));
        }
        // Written in place: read when closed.
        std::fs::write(dir.join("p.yaml"), POLICY).unwrap();
        assert!(matches!(
            next(&mut rx).await,
            Some(SourceUpdate::Apply(Object::NetworkPolicy(p))) if p.metadata.name.as_deref() == Some("deny")
        ));
        // Written to a hidden temporary file, half first: nothing is read
        // until it is renamed into place.
        let tmp = dir.join(".q.yaml.tmp");
        let second = POLICY.replace("name: deny", "name: second");
        let (half, rest) = second.split_at(second.len() / 2);
        std::fs::write(&tmp, half).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "a temporary file is not read");
        let mut all = half.to_owned();
        all.push_str(rest);
        std::fs::write(&tmp, &all).unwrap();
        std::fs::rename(&tmp, dir.join("q.yaml")).unwrap();
        assert!(matches!(
            next(&mut rx).await,
            Some(SourceUpdate::Apply(Object::NetworkPolicy(p))) if p.metadata.name.as_deref() == Some("second")
        ));
        // Renamed away: deleted.
        std::fs::rename(dir.join("q.yaml"), dir.join("q.yaml.off")).unwrap();
        assert!(matches!(
            next(&mut rx).await,
            Some(SourceUpdate::Delete(Kind::NetworkPolicy, r)) if r.name == "second"
        ));
        // An unchanged rewrite sends nothing.
        std::fs::write(dir.join("p.yaml"), POLICY).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "nothing changed");
        // Removed, then a rescan sends it at once.
        std::fs::remove_file(dir.join("p.yaml")).unwrap();
        assert!(handle.rescan().await);
        let mut deleted = false;
        while let Ok(update) = rx.try_recv() {
            deleted |=
                matches!(update, SourceUpdate::Delete(Kind::NetworkPolicy, r) if r.name == "deny");
        }
        // (the event may have been handled before the rescan: then it is already sent)
        if !deleted {
            assert!(handle.rescan().await);
        }
        drop(rx);
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
