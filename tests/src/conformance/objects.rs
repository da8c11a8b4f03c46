//! Kubernetes objects: the ones a step applies, read and checked
//! ([`source_object`]), and the ones the runner writes for the source (pods
//! with their IPs and node, namespaces with their labels).

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_yaml_ng::Value;

use super::error::Problem;
use super::plan::PodInfo;
use super::probes::Family;
use super::scenario::{
    KnownObject, Labels, NamespacedName, ObjectKey, Protocol, Server, SourceObject,
};
use super::syntax::{check_labels, check_server, dns_label, dns_subdomain};

/// Image named in the Pod objects the runner writes for `cluster` pods.
pub const SERVER_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.47";

/// A typed object with its YAML.
pub fn known(typed: KnownObject) -> SourceObject {
    let (key, value) = match &typed {
        KnownObject::Namespace(ns) => (
            ObjectKey::namespace(ns.metadata.name.as_deref().unwrap_or_default()),
            serde_yaml_ng::to_value(ns),
        ),
        KnownObject::Pod(pod) => (
            ObjectKey::pod(&NamespacedName::new(
                pod.metadata.namespace.clone().unwrap_or_default(),
                pod.metadata.name.clone().unwrap_or_default(),
            )),
            serde_yaml_ng::to_value(pod),
        ),
        KnownObject::NetworkPolicy(np) => (
            ObjectKey {
                kind: "NetworkPolicy".into(),
                namespace: np.metadata.namespace.clone(),
                name: np.metadata.name.clone().unwrap_or_default(),
            },
            serde_yaml_ng::to_value(np),
        ),
    };
    let value = value.expect("k8s-openapi objects serialize to YAML");
    SourceObject {
        key,
        value,
        typed: Some(typed),
    }
}

/// The servers named by a new pod's containers.
pub fn container_servers(
    containers: &[core::Container],
    pod: &NamespacedName,
) -> Result<Vec<Server>, Problem> {
    let bad = |reason: String| Problem::BadContainerPort {
        pod: pod.clone(),
        reason,
    };
    let mut servers = Vec::new();
    for port in containers.iter().flat_map(|c| c.ports.iter().flatten()) {
        let number = u16::try_from(port.container_port).map_err(|_| {
            bad(format!(
                "containerPort {} is out of range",
                port.container_port
            ))
        })?;
        let protocol = match port.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(p) => {
                Protocol::from_k8s(p).ok_or_else(|| bad(format!("unknown protocol {p:?}")))?
            }
        };
        let server = Server {
            port: number,
            protocol,
            name: port.name.clone(),
        };
        check_server(&servers, &server).map_err(|p| bad(p.to_string()))?;
        servers.push(server);
    }
    Ok(servers)
}

/// The IPs written in a pod's status: at most one per family.
pub fn parse_status_ips(pod: &core::Pod, name: &NamespacedName) -> Result<Vec<IpAddr>, Problem> {
    let bad = |error: String| Problem::BadObject {
        kind: "Pod".into(),
        error: format!("{name}: {error}"),
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for text in status_ips(pod) {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| bad(format!("status IP {text:?} is not an IP address")))?;
        if ips.iter().any(|other| other.is_ipv4() == ip.is_ipv4()) {
            return Err(bad("status names two IPs of one family".into()));
        }
        ips.push(ip);
    }
    Ok(ips)
}

/// An `apply` entry: any Kubernetes object (apiVersion, kind, metadata.name,
/// a namespace name if namespaced), typed when it is a Namespace, a Pod or
/// a `networking.k8s.io/v1` NetworkPolicy.
pub fn source_object(value: Value) -> Result<SourceObject, Problem> {
    let text = |field: &str| value.get(field).and_then(Value::as_str).map(str::to_owned);
    let shape = |what: &str| Problem::ObjectShape(what.to_owned());
    if !value.is_mapping() {
        return Err(shape("expected a mapping"));
    }
    let api_version = text("apiVersion").ok_or_else(|| shape("apiVersion is missing"))?;
    let kind = text("kind").ok_or_else(|| shape("kind is missing"))?;
    let metadata = value
        .get("metadata")
        .ok_or_else(|| shape("metadata is missing"))?;
    let meta = |field: &str| {
        metadata
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let name = meta("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| shape("metadata.name is missing"))?;
    let namespace = meta("namespace");
    if let Some(ns) = &namespace
        && let Err(rule) = dns_label(ns)
    {
        return Err(Problem::InvalidName {
            what: "metadata.namespace",
            name: ns.clone(),
            rule,
        });
    }
    let labels = metadata
        .get("labels")
        .cloned()
        .map(serde_yaml_ng::from_value::<Labels>);
    if let Some(labels) = labels {
        let labels = labels.map_err(|e| Problem::BadObject {
            kind: kind.clone(),
            error: format!("metadata.labels: {e}"),
        })?;
        check_labels(&labels)?;
    }

    let expected = match kind.as_str() {
        "Namespace" | "Pod" => Some("v1"),
        "NetworkPolicy" if api_version.starts_with("networking.k8s.io/") => {
            Some("networking.k8s.io/v1")
        }
        _ => None,
    };
    let typed = match expected {
        None => None,
        Some(expected) if api_version != expected => {
            return Err(Problem::WrongApiVersion {
                kind,
                found: api_version,
                expected,
            });
        }
        Some(_) => {
            let bad = |e: serde_yaml_ng::Error| Problem::BadObject {
                kind: kind.clone(),
                error: e.to_string(),
            };
            Some(match kind.as_str() {
                "Namespace" => {
                    if namespace.is_some() {
                        return Err(Problem::ClusterScoped(kind));
                    }
                    dns_label(&name).map_err(|rule| Problem::InvalidName {
                        what: "namespace name",
                        name: name.clone(),
                        rule,
                    })?;
                    KnownObject::Namespace(
                        serde_yaml_ng::from_value::<core::Namespace>(value.clone()).map_err(bad)?,
                    )
                }
                "Pod" => {
                    dns_subdomain(&name).map_err(|rule| Problem::InvalidName {
                        what: "pod name",
                        name: name.clone(),
                        rule,
                    })?;
                    KnownObject::Pod(Box::new(
                        serde_yaml_ng::from_value::<core::Pod>(value.clone()).map_err(bad)?,
                    ))
                }
                _ => KnownObject::NetworkPolicy(
                    serde_yaml_ng::from_value::<net::NetworkPolicy>(value.clone()).map_err(bad)?,
                ),
            })
        }
    };
    if matches!(
        typed,
        Some(KnownObject::Pod(_) | KnownObject::NetworkPolicy(_))
    ) && namespace.is_none()
    {
        return Err(Problem::MissingNamespace(kind));
    }
    Ok(SourceObject {
        key: ObjectKey {
            kind,
            namespace,
            name,
        },
        value,
        typed,
    })
}

/// The addresses in a pod's `status.podIP` and `status.podIPs`, as written.
pub fn status_ips(pod: &core::Pod) -> Vec<String> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<String> = status.pod_ip.iter().cloned().collect();
    for ip in status.pod_ips.iter().flatten() {
        if !ips.contains(&ip.ip) {
            ips.push(ip.ip.clone());
        }
    }
    ips
}
/// The Pod object of a `cluster` pod.
pub fn cluster_pod(info: &PodInfo, node_name: &str) -> core::Pod {
    let ports = info
        .servers
        .iter()
        .map(|s| core::ContainerPort {
            container_port: i32::from(s.port),
            protocol: Some(s.protocol.as_str().into()),
            name: s.name.clone(),
            ..core::ContainerPort::default()
        })
        .collect::<Vec<_>>();
    let pod = core::Pod {
        metadata: ObjectMeta {
            name: Some(info.name.name.clone()),
            namespace: Some(info.name.namespace.clone()),
            labels: Some(info.labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(core::PodSpec {
            containers: vec![core::Container {
                name: "server".into(),
                image: Some(SERVER_IMAGE.into()),
                ports: (!ports.is_empty()).then_some(ports),
                ..core::Container::default()
            }],
            ..core::PodSpec::default()
        }),
        status: None,
    };
    running(pod, info, node_name)
}

/// `pod` scheduled on the node and running with `info`'s addresses.
pub fn running(mut pod: core::Pod, info: &PodInfo, node_name: &str) -> core::Pod {
    let spec = pod.spec.get_or_insert_with(core::PodSpec::default);
    spec.node_name.get_or_insert_with(|| node_name.to_owned());
    let ips: Vec<String> = [info.ip_of(Family::V4), info.ip_of(Family::V6)]
        .into_iter()
        .flatten()
        .map(|ip| ip.to_string())
        .collect();
    let status = pod.status.get_or_insert_with(core::PodStatus::default);
    status.phase = Some("Running".into());
    status.pod_ip = Some(ips[0].clone());
    status.pod_ips = Some(ips.into_iter().map(|ip| core::PodIP { ip }).collect());
    pod
}
