//! Kubernetes Events for diagnostics: what the agent found wrong with a
//! NetworkPolicy or Pod, on the object (`kubectl get events
//! --field-selector involvedObject.name=…`, `kubectl describe pod`).
//!
//! [`EventSink`] is a [`DiagnosticSink`]. For each diagnostic that appears
//! about a NetworkPolicy or a Pod it creates one `events.k8s.io/v1` Event
//! (falling back to a `core/v1` Event where that API is not served) on the
//! object: reason = the diagnostic code in PascalCase (`InvalidCidr`), type
//! `Warning` for warnings and errors, `Normal` for informational ones, note =
//! the rule concerned and the message. Diagnostics about namespaces are left
//! to the log.
//!
//! * **Never blocks the reconciler**: [`DiagnosticSink::report`] only
//!   updates a set and queues work on a bounded channel (`try_send`); a
//!   spawned task does the API calls. When the queue is full the diagnostic
//!   is dropped (with a warning) and reported again if it re-appears.
//! * **Once until cleared**: a diagnostic is reported when it appears and
//!   not again until it has been cleared.
//! * **Rate-limited**: at most [`EventOptions::per_second`] API writes per
//!   second after a burst of [`EventOptions::burst`].
//! * **Once per cluster**: every node's agent compiles the same policies, so
//!   each sees the same policy diagnostics. The Event's name is derived from
//!   the object's uid and the diagnostic, so the first agent creates it and
//!   the others get `AlreadyExists`, which counts as done. A Pod diagnostic
//!   is reported only by the agent of the pod's node.
//! * The Event names the object with its uid (`kubectl describe` looks
//!   Events up by kind, name and uid): the sink reads the object first, and
//!   skips it if it is gone.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{self as core, ObjectReference};
use k8s_openapi::api::events::v1 as events;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client, Resource};
use tokio::sync::mpsc;

use super::diagnostics::DiagnosticSink;
use crate::model::{Diagnostic, DiagnosticCode, ObjectKind, Severity};

/// `reportingController` of the Events (a qualified name).
pub const REPORTING_CONTROLLER: &str = "palisade/policy-agent";
/// `action` of the Events: what the agent was doing when it found the problem.
pub const ACTION: &str = "Compile";
/// The longest note (message) the API server accepts.
pub const MAX_NOTE_BYTES: usize = 1024;

/// Tuning of an [`EventSink`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EventOptions {
    /// Diagnostics waiting for the API; more are dropped.
    pub queue: usize,
    /// Sustained API writes per second.
    pub per_second: f64,
    /// Writes allowed at once before the rate applies.
    pub burst: u32,
}

impl Default for EventOptions {
    fn default() -> Self {
        Self {
            queue: 1024,
            per_second: 5.0,
            burst: 20,
        }
    }
}

/// Why an Event could not be published.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The API server refused or could not be reached.
    #[error("API request failed: {0}")]
    Api(#[from] kube::Error),
}

/// The [`DiagnosticSink`] that writes Kubernetes Events (see the module docs).
pub struct EventSink {
    queue: mpsc::Sender<Diagnostic>,
    reported: Mutex<Reported>,
}

impl EventSink {
    /// A sink writing Events with `client` as the agent of node `node_name`
    /// (the Events' `reportingInstance`), with default [`EventOptions`].
    ///
    /// Must be called within a Tokio runtime: it spawns the task that writes
    /// the Events, which ends when the sink is dropped.
    pub fn new(client: Client, node_name: String) -> Self {
        Self::with_options(client, node_name, EventOptions::default())
    }

    /// [`EventSink::new`] with explicit options.
    pub fn with_options(client: Client, node_name: String, options: EventOptions) -> Self {
        let (queue, rx) = mpsc::channel(options.queue.max(1));
        let publisher = Publisher { client, node_name };
        tokio::spawn(publisher.run(rx, options));
        Self {
            queue,
            reported: Mutex::new(Reported::default()),
        }
    }
}

impl DiagnosticSink for EventSink {
    fn report(&self, appeared: &[Diagnostic], cleared: &[Diagnostic]) {
        let fresh = {
            let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            reported.update(appeared, cleared)
        };
        for diagnostic in fresh {
            if let Err(e) = self.queue.try_send(diagnostic) {
                let diagnostic = match e {
                    mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
                };
                tracing::warn!(%diagnostic, "event queue full; no Kubernetes Event for it");
                let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
                reported.forget(&diagnostic);
            }
        }
    }
}

/// Which diagnostics have been reported and not cleared since.
#[derive(Debug, Default)]
pub struct Reported {
    active: HashSet<Diagnostic>,
}

impl Reported {
    /// Forgets `cleared`, remembers `appeared`, and returns those of
    /// `appeared` that get an Event: about a Pod or NetworkPolicy, and not
    /// already reported.
    pub fn update(&mut self, appeared: &[Diagnostic], cleared: &[Diagnostic]) -> Vec<Diagnostic> {
        for d in cleared {
            self.active.remove(d);
        }
        appeared
            .iter()
            .filter(|d| target_kind(d).is_some())
            .filter(|d| self.active.insert((*d).clone()))
            .cloned()
            .collect()
    }

    /// Forgets one diagnostic (it was not reported after all).
    pub fn forget(&mut self, diagnostic: &Diagnostic) {
        self.active.remove(diagnostic);
    }

    /// How many diagnostics are reported and not cleared.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }
}

/// The kind of object an Event about `diagnostic` goes on, if any.
pub fn target_kind(diagnostic: &Diagnostic) -> Option<ObjectKind> {
    let named = !diagnostic.name.is_empty() && !diagnostic.namespace.is_empty();
    match diagnostic.object {
        ObjectKind::NetworkPolicy | ObjectKind::Pod if named => Some(diagnostic.object),
        _ => None,
    }
}

/// The Event reason for a code: its name in PascalCase (`invalid_cidr` →
/// `InvalidCidr`), as Kubernetes reasons are written.
pub fn reason(code: DiagnosticCode) -> String {
    code.as_str()
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// The Event type for a severity.
pub fn event_type(severity: Severity) -> &'static str {
    match severity {
        Severity::Info => "Normal",
        Severity::Warning | Severity::Error => "Warning",
    }
}

/// The Event note: the rule concerned, if any, then the message, cut to
/// [`MAX_NOTE_BYTES`].
pub fn note(diagnostic: &Diagnostic) -> String {
    let mut text = String::new();
    if let Some((direction, index)) = diagnostic.rule {
        let _ = write!(text, "{} rule {index}: ", direction.as_str());
    }
    text.push_str(&diagnostic.message);
    truncate(&mut text, MAX_NOTE_BYTES);
    text
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// FNV-1a, 64 bits: a hash that is the same on every node and every build,
/// so that agents agree on Event names.
fn stable_hash(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The Event's name: the object's name and a hash of the object (with its
/// uid, so a re-created object gets its own Events) and the diagnostic. The
/// same on every node, so one Event is created per problem in the cluster.
pub fn event_name(target: &ObjectReference, diagnostic: &Diagnostic) -> String {
    let rule = diagnostic
        .rule
        .map(|(direction, index)| format!("{}/{index}", direction.as_str()))
        .unwrap_or_default();
    let hash = stable_hash(&[
        diagnostic.object.as_str(),
        &diagnostic.namespace,
        &diagnostic.name,
        target.uid.as_deref().unwrap_or_default(),
        diagnostic.code.as_str(),
        diagnostic.severity.as_str(),
        &rule,
        &diagnostic.message,
    ]);
    // A DNS subdomain of at most 253 characters whose labels end with an
    // alphanumeric character.
    let mut prefix: String = diagnostic.name.chars().take(200).collect();
    while prefix.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        prefix.pop();
    }
    if prefix.is_empty() {
        format!("palisade.{hash:016x}")
    } else {
        format!("{prefix}.{hash:016x}")
    }
}

/// The `events.k8s.io/v1` Event for `diagnostic` on `target`.
pub fn event_for(
    diagnostic: &Diagnostic,
    target: &ObjectReference,
    node_name: &str,
    now: Timestamp,
) -> events::Event {
    events::Event {
        metadata: ObjectMeta {
            name: Some(event_name(target, diagnostic)),
            namespace: target.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(ACTION.to_owned()),
        reason: Some(reason(diagnostic.code)),
        note: Some(note(diagnostic)),
        type_: Some(event_type(diagnostic.severity).to_owned()),
        regarding: Some(target.clone()),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(reporting_instance(node_name)),
        ..events::Event::default()
    }
}

/// The same Event as a `core/v1` Event, for API servers without
/// `events.k8s.io/v1`.
pub fn core_event_for(
    diagnostic: &Diagnostic,
    target: &ObjectReference,
    node_name: &str,
    now: Timestamp,
) -> core::Event {
    core::Event {
        metadata: ObjectMeta {
            name: Some(event_name(target, diagnostic)),
            namespace: target.namespace.clone(),
            ..ObjectMeta::default()
        },
        involved_object: target.clone(),
        reason: Some(reason(diagnostic.code)),
        message: Some(note(diagnostic)),
        type_: Some(event_type(diagnostic.severity).to_owned()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        source: Some(core::EventSource {
            component: Some(REPORTING_CONTROLLER.to_owned()),
            host: Some(node_name.to_owned()),
        }),
        action: Some(ACTION.to_owned()),
        reporting_component: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(reporting_instance(node_name)),
        ..core::Event::default()
    }
}

/// `reportingInstance`: the node name, cut to the 128 characters allowed.
fn reporting_instance(node_name: &str) -> String {
    let mut instance = format!("policy-agent@{node_name}");
    truncate(&mut instance, 128);
    instance
}

/// What happened to one diagnostic's Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The Event was created.
    Created,
    /// The Event already existed (another agent, or an earlier appearance).
    AlreadyReported,
    /// The object is gone (or not on this node, for a pod): no Event.
    Skipped,
}

/// Writes the Events, one at a time, at a limited rate.
struct Publisher {
    client: Client,
    node_name: String,
}

impl Publisher {
    async fn run(self, mut rx: mpsc::Receiver<Diagnostic>, options: EventOptions) {
        let mut bucket = TokenBucket::new(options.per_second, options.burst);
        while let Some(diagnostic) = rx.recv().await {
            let wait = bucket.take(tokio::time::Instant::now().into_std());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            match self.publish(&diagnostic).await {
                Ok(outcome) => tracing::debug!(%diagnostic, ?outcome, "diagnostic event"),
                Err(error) => {
                    tracing::warn!(%diagnostic, %error, "could not create a Kubernetes Event");
                }
            }
        }
    }

    /// The object the diagnostic is about, as an Event's reference; `None`
    /// if it is gone or (a pod) runs on another node.
    async fn target(&self, diagnostic: &Diagnostic) -> Result<Option<ObjectReference>, EventError> {
        let ns = diagnostic.namespace.as_str();
        let name = diagnostic.name.as_str();
        match target_kind(diagnostic) {
            Some(ObjectKind::NetworkPolicy) => {
                let api = Api::<net::NetworkPolicy>::namespaced(self.client.clone(), ns);
                Ok(api.get_opt(name).await?.map(|p| p.object_ref(&())))
            }
            Some(ObjectKind::Pod) => {
                let api = Api::<core::Pod>::namespaced(self.client.clone(), ns);
                Ok(api
                    .get_opt(name)
                    .await?
                    .filter(|pod| {
                        pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some(self.node_name.as_str())
                    })
                    .map(|p| p.object_ref(&())))
            }
            _ => Ok(None),
        }
    }

    /// Creates the Event for one diagnostic.
    async fn publish(&self, diagnostic: &Diagnostic) -> Result<Outcome, EventError> {
        let Some(target) = self.target(diagnostic).await? else {
            return Ok(Outcome::Skipped);
        };
        let ns = target.namespace.clone().unwrap_or_default();
        let now = Timestamp::now();
        let params = PostParams::default();
        let event = event_for(diagnostic, &target, &self.node_name, now);
        let created = Api::<events::Event>::namespaced(self.client.clone(), &ns)
            .create(&params, &event)
            .await;
        let created = match created {
            Err(kube::Error::Api(status)) if status.code == 404 => {
                // events.k8s.io/v1 not served (before Kubernetes 1.19).
                let event = core_event_for(diagnostic, &target, &self.node_name, now);
                Api::<core::Event>::namespaced(self.client.clone(), &ns)
                    .create(&params, &event)
                    .await
                    .map(|_| ())
            }
            other => other.map(|_| ()),
        };
        match created {
            Ok(()) => Ok(Outcome::Created),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Outcome::AlreadyReported),
            Err(e) => Err(e.into()),
        }
    }
}

/// A token bucket: `take` says how long to wait before the next write.
#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Option<std::time::Instant>,
}

impl TokenBucket {
    fn new(per_second: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second: if per_second > 0.0 { per_second } else { 1.0 },
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes one token at `now`; returns how long to wait for it.
    fn take(&mut self, now: std::time::Instant) -> Duration {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        }
        self.last = Some(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use policy_common::Direction;

    use super::*;

    fn cidr_diagnostic() -> Diagnostic {
        Diagnostic::policy(
            "shop",
            "allow-office",
            Some((Direction::Ingress, 1)),
            Severity::Error,
            DiagnosticCode::InvalidCidr,
            "peer 0: invalid CIDR \"10.0.0.0/33\"; this peer allows nothing",
        )
    }

    fn policy_ref(uid: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: Some("NetworkPolicy".into()),
            namespace: Some("shop".into()),
            name: Some("allow-office".into()),
            uid: Some(uid.into()),
            resource_version: Some("12".into()),
            ..ObjectReference::default()
        }
    }

    #[test]
    fn reasons_are_pascal_case_codes() {
        assert_eq!(reason(DiagnosticCode::InvalidCidr), "InvalidCidr");
        assert_eq!(
            reason(DiagnosticCode::NamedPortNotFound),
            "NamedPortNotFound"
        );
        assert_eq!(reason(DiagnosticCode::DuplicatePodIp), "DuplicatePodIp");
    }

    #[test]
    fn types_by_severity() {
        assert_eq!(event_type(Severity::Error), "Warning");
        assert_eq!(event_type(Severity::Warning), "Warning");
        assert_eq!(event_type(Severity::Info), "Normal");
    }

    #[test]
    fn event_translation() {
        let now: Timestamp = "2026-11-02T10:00:00Z".parse().unwrap();
        let event = event_for(&cidr_diagnostic(), &policy_ref("u1"), "node-a", now);
        assert_eq!(event.metadata.namespace.as_deref(), Some("shop"));
        let name = event.metadata.name.as_deref().unwrap();
        assert!(name.starts_with("allow-office."), "{name}");
        assert_eq!(event.reason.as_deref(), Some("InvalidCidr"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(
            event.note.as_deref(),
            Some("ingress rule 1: peer 0: invalid CIDR \"10.0.0.0/33\"; this peer allows nothing")
        );
        assert_eq!(event.regarding, Some(policy_ref("u1")));
        assert_eq!(event.action.as_deref(), Some(ACTION));
        assert_eq!(
            event.reporting_controller.as_deref(),
            Some(REPORTING_CONTROLLER)
        );
        assert_eq!(
            event.reporting_instance.as_deref(),
            Some("policy-agent@node-a")
        );
        assert_eq!(event.event_time, Some(MicroTime(now)));
        assert!(event.series.is_none());

        let core = core_event_for(&cidr_diagnostic(), &policy_ref("u1"), "node-a", now);
        assert_eq!(core.metadata.name.as_deref(), Some(name));
        assert_eq!(core.involved_object, policy_ref("u1"));
        assert_eq!(core.reason, event.reason);
        assert_eq!(core.message, event.note);
        assert_eq!(core.type_, event.type_);
        assert_eq!(core.count, Some(1));
    }

    #[test]
    fn event_names_agree_across_nodes_and_differ_per_problem() {
        let d = cidr_diagnostic();
        let now = Timestamp::now();
        let a = event_for(&d, &policy_ref("u1"), "node-a", now);
        let b = event_for(&d, &policy_ref("u1"), "node-b", Timestamp::UNIX_EPOCH);
        assert_eq!(a.metadata.name, b.metadata.name, "same problem, same name");
        let recreated = event_for(&d, &policy_ref("u2"), "node-a", now);
        assert_ne!(a.metadata.name, recreated.metadata.name);
        let mut other = d.clone();
        other.rule = Some((Direction::Egress, 1));
        assert_ne!(
            a.metadata.name,
            event_for(&other, &policy_ref("u1"), "node-a", now)
                .metadata
                .name
        );
        // The hash is fixed: agents of different builds agree.
        assert_eq!(stable_hash(&["a", "b"]), stable_hash(&["a", "b"]));
        assert_ne!(stable_hash(&["ab", ""]), stable_hash(&["a", "b"]));
        assert_eq!(stable_hash(&[]), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn event_names_are_valid_for_long_names() {
        let mut d = cidr_diagnostic();
        d.name = format!("{}-x", "a".repeat(199));
        let name = event_name(&policy_ref("u"), &d);
        assert!(name.len() <= 253);
        let first_label = name.split('.').next().unwrap();
        assert!(first_label.ends_with('a'), "no trailing dash: {name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        );
    }

    #[test]
    fn notes_are_cut_at_a_char_boundary() {
        let mut d = cidr_diagnostic();
        d.rule = None;
        d.message = "é".repeat(MAX_NOTE_BYTES);
        let text = note(&d);
        assert!(text.len() <= MAX_NOTE_BYTES);
        assert!(text.len() >= MAX_NOTE_BYTES - 1);
        assert!(note(&cidr_diagnostic()).starts_with("ingress rule 1: peer 0: "));
    }

    #[test]
    fn reported_once_until_cleared() {
        let mut r = Reported::default();
        let d = cidr_diagnostic();
        assert_eq!(r.update(std::slice::from_ref(&d), &[]), vec![d.clone()]);
        assert!(
            r.update(std::slice::from_ref(&d), &[]).is_empty(),
            "no repeat"
        );
        assert!(r.update(&[], std::slice::from_ref(&d)).is_empty());
        assert!(r.is_empty());
        assert_eq!(
            r.update(std::slice::from_ref(&d), &[]),
            vec![d.clone()],
            "again after clear"
        );
        r.forget(&d);
        assert_eq!(
            r.update(std::slice::from_ref(&d), &[]).len(),
            1,
            "after a dropped send"
        );
    }

    #[test]
    fn only_pods_and_policies_with_names_get_events() {
        let mut r = Reported::default();
        let ns = Diagnostic {
            object: ObjectKind::Namespace,
            namespace: String::new(),
            name: "shop".into(),
            rule: None,
            severity: Severity::Error,
            code: DiagnosticCode::MissingMetadata,
            message: "m".into(),
        };
        let nameless = Diagnostic::policy(
            "shop",
            "",
            None,
            Severity::Error,
            DiagnosticCode::MissingMetadata,
            "no name",
        );
        let pod = Diagnostic::pod(
            "shop",
            "web-1",
            Severity::Warning,
            DiagnosticCode::InvalidPodIp,
            "bad ip",
        );
        assert_eq!(r.update(&[ns, nameless, pod.clone()], &[]), vec![pod]);
    }

    #[test]
    fn token_bucket_bursts_then_paces() {
        let start = std::time::Instant::now();
        let mut bucket = TokenBucket::new(2.0, 3);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Duration::ZERO);
        }
        assert_eq!(bucket.take(start), Duration::from_millis(500));
        // A second later two tokens came back, one of which the wait above used.
        let later = start + Duration::from_secs(1);
        assert_eq!(bucket.take(later), Duration::ZERO);
        assert_eq!(bucket.take(later), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn report_does_not_block_when_the_queue_is_full() {
        // A client that never answers: the publisher is stuck on its first
        // request, the queue (1) fills, further diagnostics are dropped, and
        // report returns at once.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let sink = EventSink::with_options(
            client,
            "node-a".into(),
            EventOptions {
                queue: 1,
                per_second: 1000.0,
                burst: 1000,
            },
        );
        let diagnostics: Vec<Diagnostic> = (0..100)
            .map(|i| {
                let mut d = cidr_diagnostic();
                d.name = format!("p{i}");
                d
            })
            .collect();
        let started = std::time::Instant::now();
        sink.report(&diagnostics, &[]);
        assert!(started.elapsed() < Duration::from_millis(100));
        // The publisher has not run yet (this runtime has one thread and
        // report never yields): one diagnostic is queued, the others were
        // dropped and forgotten, so they are reported if they appear again.
        let reported = sink.reported.lock().unwrap().len();
        assert_eq!(reported, 1, "dropped diagnostics are forgotten");
    }
}
