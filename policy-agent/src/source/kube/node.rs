//! This node's addresses, from its Node object.
//!
//! Connections from the node into its pods are always allowed and the node
//! is a peer of its own (HOST identity), so the reconciler needs the node's
//! addresses: the `InternalIP` and `ExternalIP` entries of
//! `status.addresses` (host names and DNS names are not addresses).

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use kube::core::DeserializeGuard;
use kube::runtime::watcher::Event;

use crate::source::SourceUpdate;

/// The address types that are IP addresses of the node.
pub const ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// The node's IP addresses (IPv4-mapped IPv6 as IPv4), sorted, without
/// duplicates. Entries that do not parse are logged and skipped.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut out = BTreeSet::new();
    let entries = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| ADDRESS_TYPES.contains(&a.type_.as_str()));
    for entry in entries {
        match entry.address.trim().parse::<IpAddr>() {
            Ok(ip) => {
                out.insert(ip.to_canonical());
            }
            Err(_) => tracing::warn!(
                node = node.metadata.name.as_deref().unwrap_or_default(),
                address = %entry.address,
                r#type = %entry.type_,
                "node address is not an IP address; ignored"
            ),
        }
    }
    out.into_iter().collect()
}

/// Translates the events of a watch on this node's Node object (a field
/// selector on its name) into [`SourceUpdate::NodeAddresses`]: one after every
/// list (empty if the node does not exist), then one whenever the address
/// set changes (empty when the node is deleted).
#[derive(Debug, Default)]
pub struct NodeTracker {
    /// The node's name, for logs.
    name: String,
    /// Addresses found in the list in progress (`None`: node not listed yet).
    listing: Option<Vec<IpAddr>>,
    /// What was last sent (`None`: nothing sent yet).
    sent: Option<Vec<IpAddr>>,
}

impl NodeTracker {
    /// A tracker for the node named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    fn decode(&self, guard: DeserializeGuard<Node>) -> Option<Node> {
        match guard.0 {
            Ok(node) => Some(node),
            Err(invalid) => {
                tracing::warn!(
                    node = %self.name,
                    error = %invalid.error,
                    "cannot decode the Node object; keeping its last known addresses"
                );
                None
            }
        }
    }

    fn changed(&mut self, addresses: Vec<IpAddr>) -> Option<SourceUpdate> {
        if self.sent.as_ref() == Some(&addresses) {
            return None;
        }
        tracing::debug!(node = %self.name, ?addresses, "node addresses changed");
        self.sent = Some(addresses.clone());
        Some(SourceUpdate::NodeAddresses(addresses))
    }

    /// The update to send for `event`, if any.
    pub fn handle(&mut self, event: Event<DeserializeGuard<Node>>) -> Option<SourceUpdate> {
        match event {
            Event::Init => {
                self.listing = None;
                None
            }
            Event::InitApply(guard) => {
                self.listing = Some(match self.decode(guard) {
                    Some(node) => node_addresses(&node),
                    None => self.sent.clone().unwrap_or_default(),
                });
                None
            }
            Event::InitDone => {
                let addresses = match self.listing.take() {
                    Some(addresses) => addresses,
                    None => {
                        tracing::warn!(
                            node = %self.name,
                            "this node's Node object does not exist; no node addresses"
                        );
                        Vec::new()
                    }
                };
                // Always sent after a list: the reconciler waits for it.
                self.sent = None;
                self.changed(addresses)
            }
            Event::Apply(guard) => {
                let node = self.decode(guard)?;
                self.changed(node_addresses(&node))
            }
            Event::Delete(_) => {
                tracing::warn!(node = %self.name, "this node's Node object was deleted");
                self.changed(Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::core::error_boundary::InvalidObject;
    use serde_json::json;

    use super::*;

    fn node(addresses: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "node-a", "resourceVersion": "1"},
            "status": {"addresses": addresses}
        }))
        .unwrap()
    }

    fn addrs(update: Option<SourceUpdate>) -> Vec<IpAddr> {
        match update {
            Some(SourceUpdate::NodeAddresses(a)) => a,
            other => panic!("expected NodeAddresses, got {other:?}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_and_external_ips_only() {
        let n = node(json!([
            {"type": "Hostname", "address": "node-a"},
            {"type": "InternalDNS", "address": "node-a.cluster.local"},
            {"type": "InternalIP", "address": "192.168.1.10"},
            {"type": "InternalIP", "address": "fd00::10"},
            {"type": "ExternalIP", "address": "203.0.113.7"},
            {"type": "ExternalIP", "address": "::ffff:203.0.113.7"},
            {"type": "InternalIP", "address": "not-an-ip"}
        ]));
        assert_eq!(
            node_addresses(&n),
            vec![ip("192.168.1.10"), ip("203.0.113.7"), ip("fd00::10")]
        );
    }

    #[test]
    fn node_without_status_has_no_addresses() {
        let n = Node::default();
        assert!(node_addresses(&n).is_empty());
    }

    #[test]
    fn sent_after_every_list_then_on_change() {
        let mut t = NodeTracker::new("node-a");
        let a = node(json!([{"type": "InternalIP", "address": "10.1.0.1"}]));
        assert!(t.handle(Event::Init).is_none());
        assert!(
            t.handle(Event::InitApply(DeserializeGuard(Ok(a.clone()))))
                .is_none()
        );
        assert_eq!(addrs(t.handle(Event::InitDone)), vec![ip("10.1.0.1")]);
        // Heartbeat with the same addresses: nothing.
        assert!(
            t.handle(Event::Apply(DeserializeGuard(Ok(a.clone()))))
                .is_none()
        );
        // New address: sent.
        let b = node(json!([
            {"type": "InternalIP", "address": "10.1.0.1"},
            {"type": "ExternalIP", "address": "198.51.100.1"}
        ]));
        assert_eq!(
            addrs(t.handle(Event::Apply(DeserializeGuard(Ok(b.clone()))))),
            vec![ip("10.1.0.1"), ip("198.51.100.1")]
        );
        // Re-list with unchanged addresses: sent anyway.
        t.handle(Event::Init);
        t.handle(Event::InitApply(DeserializeGuard(Ok(b))));
        assert_eq!(addrs(t.handle(Event::InitDone)).len(), 2);
        // Deleted: empty.
        assert!(addrs(t.handle(Event::Delete(DeserializeGuard(Ok(a))))).is_empty());
    }

    #[test]
    fn missing_node_gives_empty_addresses() {
        let mut t = NodeTracker::new("ghost");
        t.handle(Event::Init);
        assert!(addrs(t.handle(Event::InitDone)).is_empty());
    }

    #[test]
    fn malformed_node_keeps_last_addresses() {
        let mut t = NodeTracker::new("node-a");
        t.handle(Event::Init);
        t.handle(Event::InitApply(DeserializeGuard(Ok(node(
            json!([{"type": "InternalIP", "address": "10.1.0.1"}]),
        )))));
        t.handle(Event::InitDone);
        let bad = DeserializeGuard(Err(InvalidObject {
            error: "bad".into(),
            metadata: Default::default(),
        }));
        assert!(t.handle(Event::Apply(bad)).is_none());
    }
}
