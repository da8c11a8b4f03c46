//! Trimming API objects to what the agent uses, before they are sent to the
//! reconciler (and buffered during a list). Every node watches every pod of
//! the cluster, so what is dropped here is memory saved on every node.
//!
//! Kept: `metadata.{name, namespace, labels, uid, resourceVersion}` (labels
//! are dropped from policies, which are never selected by label); for pods
//! `spec.{nodeName, hostNetwork}`, the names and ports of containers and init
//! containers (init containers can be sidecars serving named ports), and
//! `status.{podIP, podIPs, phase}`; a policy's whole `spec`. Everything else
//! (managedFields, annotations, owner references, container images, pod
//! conditions, namespace status, …) is dropped.

use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The metadata fields the agent uses; `labels` only when `keep_labels`.
pub fn trim_meta(meta: ObjectMeta, keep_labels: bool) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        labels: if keep_labels { meta.labels } else { None },
        uid: meta.uid,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    }
}

/// A namespace reduced to its name, labels, uid and resource version.
pub fn trim_namespace(namespace: Namespace) -> Namespace {
    Namespace {
        metadata: trim_meta(namespace.metadata, true),
        ..Namespace::default()
    }
}

fn trim_container(container: Container) -> Container {
    Container {
        name: container.name,
        ports: container.ports,
        ..Container::default()
    }
}

/// A pod reduced to what selection, peer resolution and named ports use.
pub fn trim_pod(pod: Pod) -> Pod {
    let spec = pod.spec.map(|spec| PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        containers: spec.containers.into_iter().map(trim_container).collect(),
        init_containers: spec
            .init_containers
            .map(|list| list.into_iter().map(trim_container).collect()),
        ..PodSpec::default()
    });
    let status = pod.status.map(|status| PodStatus {
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        phase: status.phase,
        ..PodStatus::default()
    });
    Pod {
        metadata: trim_meta(pod.metadata, true),
        spec,
        status,
    }
}

/// A policy reduced to its coordinates and its spec.
pub fn trim_policy(policy: NetworkPolicy) -> NetworkPolicy {
    NetworkPolicy {
        metadata: trim_meta(policy.metadata, false),
        spec: policy.spec,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A pod the way a kubelet-managed API server returns it, with the
    /// fields the agent does not use.
    fn full_pod() -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1",
                "namespace": "shop",
                "uid": "u-1",
                "resourceVersion": "42",
                "generateName": "web-",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web", "uid": "rs"}],
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]
            },
            "spec": {
                "nodeName": "node-a",
                "hostNetwork": false,
                "serviceAccountName": "default",
                "containers": [{
                    "name": "app",
                    "image": "nginx:1.27",
                    "args": ["--port", "8080"],
                    "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
                }],
                "initContainers": [{
                    "name": "proxy",
                    "image": "envoy",
                    "restartPolicy": "Always",
                    "ports": [{"name": "admin", "containerPort": 9901}]
                }],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.5",
                "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                "hostIP": "192.168.1.10",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "app", "image": "nginx", "imageID": "x",
                                       "ready": true, "restartCount": 0}]
            }
        }))
        .expect("valid pod")
    }

    #[test]
    fn pod_keeps_exactly_what_is_used() {
        let trimmed = trim_pod(full_pod());
        let expected = json!({
            "metadata": {
                "name": "web-1",
                "namespace": "shop",
                "uid": "u-1",
                "resourceVersion": "42",
                "labels": {"app": "web"}
            },
            "spec": {
                "nodeName": "node-a",
                "hostNetwork": false,
                "containers": [{
                    "name": "app",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
                }],
                "initContainers": [{
                    "name": "proxy",
                    "ports": [{"name": "admin", "containerPort": 9901}]
                }]
            },
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.5",
                "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]
            }
        });
        let mut got = serde_json::to_value(&trimmed).unwrap();
        // k8s-openapi writes apiVersion and kind itself.
        got.as_object_mut().unwrap().remove("apiVersion");
        got.as_object_mut().unwrap().remove("kind");
        assert_eq!(got, expected);
    }

    #[test]
    fn trimmed_pod_converts_like_the_full_pod() {
        let full = crate::model::convert::pod_from_k8s(&full_pod()).unwrap();
        let trimmed = crate::model::convert::pod_from_k8s(&trim_pod(full_pod())).unwrap();
        assert_eq!(full, trimmed);
        assert_eq!(trimmed.value.named_ports.len(), 2);
        assert_eq!(trimmed.value.ips.len(), 2);
    }

    #[test]
    fn pod_without_spec_or_status_stays_without() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("n".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        let trimmed = trim_pod(pod.clone());
        assert_eq!(trimmed, pod);
    }

    #[test]
    fn namespace_keeps_labels_drops_the_rest() {
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {
                "name": "shop",
                "uid": "u",
                "resourceVersion": "7",
                "labels": {"team": "a"},
                "annotations": {"x": "y"},
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        }))
        .unwrap();
        let trimmed = trim_namespace(ns);
        assert!(trimmed.spec.is_none());
        assert!(trimmed.status.is_none());
        assert!(trimmed.metadata.annotations.is_none());
        assert!(trimmed.metadata.managed_fields.is_none());
        assert_eq!(trimmed.metadata.name.as_deref(), Some("shop"));
        assert_eq!(trimmed.metadata.uid.as_deref(), Some("u"));
        assert_eq!(trimmed.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(trimmed.metadata.labels.unwrap()["team"], "a");
    }

    #[test]
    fn policy_keeps_spec_drops_metadata_noise() {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {
                "name": "deny", "namespace": "shop", "uid": "u", "resourceVersion": "9",
                "labels": {"a": "b"}, "annotations": {"x": "y"}, "generation": 3,
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                             "ports": [{"port": 80}]}],
                "policyTypes": ["Ingress"]
            }
        }))
        .unwrap();
        let trimmed = trim_policy(np.clone());
        assert_eq!(trimmed.spec, np.spec);
        assert_eq!(
            trimmed.metadata,
            ObjectMeta {
                name: Some("deny".into()),
                namespace: Some("shop".into()),
                uid: Some("u".into()),
                resource_version: Some("9".into()),
                ..ObjectMeta::default()
            }
        );
    }
}
