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
//!   polls the directory every [`POLL_INTERVAL`], comparing contents (not
//!   only mtimes, so no change is missed), and sends a `Replace` for each
//!   kind whose objects changed once the directory has been stable for one
//!   poll (a burst of writes becomes one update; after [`MAX_SETTLE`] of
//!   continuous change it loads anyway).
//! * [`FilesHandle::rescan`] makes it scan now and returns once the updates
//!   are sent (the API's `Sync`).
//!
//! Problems with files are published on a watch channel
//! ([`FilesHandle::problems`]); the agent logs, counts and lists them.
//!
//! [`load_dir`] reads a directory once with the same loader (`policy-agent
//! explain --dir`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
use serde::Deserialize as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{Object, Objects, SourceUpdate};
use crate::model::Severity;

/// How often the directory is compared with what was loaded.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
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
    let Aggregate {
        namespaces,
        pods,
        policies,
    } = loader.aggregate();
    Ok(Loaded {
        namespaces,
        pods,
        policies,
        problems: loader.problems(),
    })
}

/// The source; [`FilesSource::run`] drives it.
pub struct FilesSource {
    dir: PathBuf,
    node_ips: Vec<IpAddr>,
    rescan: mpsc::Receiver<oneshot::Sender<()>>,
    problems: watch::Sender<Vec<FileProblem>>,
    loader: Loader,
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
        let mut loaded = Snapshot::Files(first.clone());
        if !self.load_and_send(first, &tx).await {
            return Ok(());
        }

        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<(Snapshot, Instant)> = None;
        let mut rescans_open = true;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let seen = self.snapshot();
                    if seen == loaded {
                        pending = None;
                        continue;
                    }
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
                    loaded = seen.clone();
                    if !self.load_snapshot(seen, &tx).await {
                        return Ok(());
                    }
                }
                request = self.rescan.recv(), if rescans_open => {
                    let Some(reply) = request else {
                        // Every handle is gone: polling goes on.
                        rescans_open = false;
                        continue;
                    };
                    let seen = self.snapshot();
                    pending = None;
                    loaded = seen.clone();
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

    async fn load_and_send(
        &mut self,
        files: BTreeMap<PathBuf, Vec<u8>>,
        tx: &mpsc::Sender<SourceUpdate>,
    ) -> bool {
        self.loader.dir_problem = None;
        self.loader.load(files);
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
        if !is_manifest(&path) || !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) => {
                files.insert(path, bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                // Recorded as unreadable contents: the loader reports it.
                files.insert(path, format!("\0unreadable: {e}").into_bytes());
            }
        }
    }
    Ok(files)
}

/// (kind, namespace, name) of an object, to find duplicates.
fn object_key(object: &Object) -> (&'static str, String, String) {
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

/// One file's state.
#[derive(Debug, Default)]
struct FileState {
    bytes: Vec<u8>,
    /// The objects of the last version that loaded.
    good: Option<Vec<Object>>,
    problems: Vec<FileProblem>,
}

/// Every object by kind, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
struct Aggregate {
    namespaces: Vec<core::Namespace>,
    pods: Vec<core::Pod>,
    policies: Vec<net::NetworkPolicy>,
}

/// Turns directory snapshots into per-kind updates (no I/O: testable).
#[derive(Debug, Default)]
struct Loader {
    files: BTreeMap<PathBuf, FileState>,
    /// What was sent last (None before the first send).
    sent: Option<Aggregate>,
    duplicates: Vec<FileProblem>,
    dir_problem: Option<FileProblem>,
}

impl Loader {
    /// Takes the directory's current contents; re-parses changed files.
    fn load(&mut self, snapshot: BTreeMap<PathBuf, Vec<u8>>) {
        self.files.retain(|path, _| snapshot.contains_key(path));
        for (path, bytes) in snapshot {
            let known = self.files.contains_key(&path);
            let state = self.files.entry(path.clone()).or_default();
            if known && state.bytes == bytes {
                continue;
            }
            match parse_file(&path, &bytes) {
                Ok((objects, problems)) => {
                    tracing::debug!(file = %path.display(), objects = objects.len(), "files source: loaded");
                    state.good = Some(objects);
                    state.problems = problems;
                }
                Err(message) => {
                    let kept = state.good.as_ref().map_or(0, Vec::len);
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

    /// Every object by kind, later files winning over earlier ones for one
    /// (kind, namespace, name); records duplicates as problems.
    fn aggregate(&mut self) -> Aggregate {
        let mut seen: BTreeMap<(&'static str, String, String), &Path> = BTreeMap::new();
        let mut duplicates = Vec::new();
        let mut by_key: BTreeMap<(&'static str, String, String), &Object> = BTreeMap::new();
        let mut order = Vec::new();
        for (path, state) in &self.files {
            for object in state.good.iter().flatten() {
                let key = object_key(object);
                if let Some(first) = seen.insert(key.clone(), path) {
                    duplicates.push(FileProblem {
                        path: path.clone(),
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
                            first.display()
                        ),
                    });
                } else {
                    order.push(key.clone());
                }
                by_key.insert(key, object);
            }
        }
        let mut aggregate = Aggregate::default();
        for key in &order {
            match by_key[key] {
                Object::Namespace(o) => aggregate.namespaces.push((**o).clone()),
                Object::Pod(o) => aggregate.pods.push((**o).clone()),
                Object::NetworkPolicy(o) => aggregate.policies.push((**o).clone()),
            }
        }
        self.duplicates = duplicates;
        aggregate
    }

    /// A `Replace` for each kind that differs from what was sent (every
    /// kind the first time).
    fn updates(&mut self) -> Vec<SourceUpdate> {
        let now = self.aggregate();
        let before = self.sent.take();
        let mut updates = Vec::new();
        if before.as_ref().map(|b| &b.namespaces) != Some(&now.namespaces) {
            updates.push(SourceUpdate::Replace(Objects::Namespaces(
                now.namespaces.clone(),
            )));
        }
        if before.as_ref().map(|b| &b.pods) != Some(&now.pods) {
            updates.push(SourceUpdate::Replace(Objects::Pods(now.pods.clone())));
        }
        if before.as_ref().map(|b| &b.policies) != Some(&now.policies) {
            updates.push(SourceUpdate::Replace(Objects::NetworkPolicies(
                now.policies.clone(),
            )));
        }
        self.sent = Some(now);
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

        // Policy file deleted: only the policies are replaced.
        loader.load(snapshot(&[("/m/a.yaml", &format!("{NS}---\n{POD}"))]));
        assert_eq!(kinds(&loader.updates()), [Kind::NetworkPolicy]);
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
        // Written, then picked up by polling.
        std::fs::write(dir.join("p.yaml"), POLICY).unwrap();
        let update = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(matches!(
            update,
            Some(SourceUpdate::Replace(Objects::NetworkPolicies(p))) if p.len() == 1
        ));
        // Removed, then a rescan sends it at once.
        std::fs::remove_file(dir.join("p.yaml")).unwrap();
        assert!(handle.rescan().await);
        assert!(matches!(
            rx.try_recv(),
            Ok(SourceUpdate::Replace(Objects::NetworkPolicies(p))) if p.is_empty()
        ));
        drop(rx);
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
