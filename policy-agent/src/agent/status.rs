//! What the reconciler publishes after every event it handles: revisions,
//! endpoints, diagnostics, the last error. The API reads it (Get, List) and
//! waits on it (WaitEnforced) without going through the reconciler.

use super::endpoints::EndpointRecord;
use super::report::AgentDiagnostic;

/// One endpoint as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointStatus {
    pub record: EndpointRecord,
    /// The last revision programmed for it; 0 if none yet.
    pub enforced_revision: u64,
    /// Its Pod object is known and on this node (else it is isolated).
    pub pod_known: bool,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
}

/// The reconciler's state as published.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub node_name: String,
    /// "files" or "kube".
    pub source: String,
    pub revision: u64,
    pub enforced_revision: u64,
    pub ready: bool,
    /// What the first compile still waits for.
    pub waiting_for: Vec<String>,
    /// By container id.
    pub endpoints: Vec<EndpointStatus>,
    pub diagnostics: Vec<AgentDiagnostic>,
    /// The error of the last failed apply, while no later one succeeded.
    pub last_error: Option<String>,
    /// The revision of that failed apply; 0 if none.
    pub failed_revision: u64,
}

/// Where a wait for enforcement stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitState {
    /// Enforced; the revision enforced now.
    Enforced(u64),
    /// The agent tried to enforce the revision and could not.
    Failed(String),
    /// The endpoint waited for is not registered.
    NotFound,
    /// Not yet.
    Pending,
}

impl Snapshot {
    /// The endpoint of `container_id`.
    pub fn endpoint(&self, container_id: &str) -> Option<&EndpointStatus> {
        self.endpoints
            .iter()
            .find(|e| e.record.container_id == container_id)
    }

    /// Whether `revision` is enforced for `container_id` (or the node).
    pub fn wait_state(&self, container_id: Option<&str>, revision: u64) -> WaitState {
        let enforced = match container_id {
            Some(id) => match self.endpoint(id) {
                Some(e) => e.enforced_revision,
                // This snapshot predates the registration the caller waits
                // on (Register answers before the published state catches
                // up): not an unknown endpoint yet.
                None if self.revision < revision => return WaitState::Pending,
                None => return WaitState::NotFound,
            },
            None => self.enforced_revision,
        };
        if enforced >= revision && enforced > 0 {
            WaitState::Enforced(enforced)
        } else if self.failed_revision >= revision && self.failed_revision > 0 {
            WaitState::Failed(self.last_error.clone().unwrap_or_default())
        } else {
            WaitState::Pending
        }
    }

    /// Why a wait for `revision` has not returned, for a timeout message.
    pub fn pending_reason(&self, revision: u64) -> String {
        if !self.waiting_for.is_empty() {
            format!(
                "the agent has not compiled yet: waiting for {} from the {} source",
                self.waiting_for.join(", "),
                self.source
            )
        } else if self.revision < revision {
            format!(
                "revision {revision} not reached yet (the agent is at revision {})",
                self.revision
            )
        } else {
            format!(
                "revision {revision} not programmed yet (enforced: {})",
                self.enforced_revision
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, enforced: u64) -> EndpointStatus {
        EndpointStatus {
            record: EndpointRecord {
                container_id: id.into(),
                namespace: "ns".into(),
                pod_name: "p".into(),
                netns_path: String::new(),
                host_interface: "v".into(),
                ifindex: 3,
                endpoint_id: 1,
                ips: Vec::new(),
                sequence: 0,
            },
            enforced_revision: enforced,
            pod_known: true,
            ingress_isolated: false,
            egress_isolated: false,
        }
    }

    #[test]
    fn wait_states() {
        let mut s = Snapshot {
            revision: 5,
            enforced_revision: 4,
            endpoints: vec![endpoint("a", 4)],
            ..Snapshot::default()
        };
        assert_eq!(s.wait_state(None, 4), WaitState::Enforced(4));
        assert_eq!(s.wait_state(Some("a"), 3), WaitState::Enforced(4));
        assert_eq!(s.wait_state(Some("a"), 5), WaitState::Pending);
        assert_eq!(s.wait_state(Some("b"), 1), WaitState::NotFound);
        // Registered at revision 6, which this snapshot has not seen yet.
        assert_eq!(s.wait_state(Some("b"), 6), WaitState::Pending);
        s.failed_revision = 5;
        s.last_error = Some("map full".into());
        assert_eq!(s.wait_state(None, 5), WaitState::Failed("map full".into()));
        assert_eq!(s.wait_state(None, 6), WaitState::Pending);
        // Nothing enforced yet: even revision 0 waits.
        let fresh = Snapshot::default();
        assert_eq!(fresh.wait_state(None, 0), WaitState::Pending);
    }
}
