//! `--source kube`: a real kube-apiserver (1.20, built by `cargo xtask
//! setup`) for the whole run ([`KubeApi`]), and each scenario's objects
//! written through its API ([`ApiObjects`]).
//!
//! There is no scheduler, kubelet or namespace controller: the runner plays
//! them. Pods are created with `spec.nodeName` (the plan sets it) and get
//! their `status` (phase, `podIP`, `podIPs`) once the CNI ADD returned; a
//! namespace is deleted after its contents, then finalized; the Node object
//! carries the node's addresses. Namespaces carry the
//! `kubernetes.io/metadata.name` label (the plan adds it; 1.20 does not).
//! The agent runs as its ServiceAccount with the ClusterRole of
//! `manifests/rbac.yaml`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use palisade_tests::agent::AgentSource;
use palisade_tests::conformance::{
    NamespacedName, ObjectKey, ServerSupport, SourceEdit, SourceObject,
};
use palisade_tests::kube::{KubeApiServer, delete_namespace};
use palisade_tests::netns::{Netns, TcpForwarder};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

use super::PolicySource;

/// The run's API server, ready for agents: their RBAC applied, the node
/// registered.
pub struct KubeApi {
    runtime: Arc<Runtime>,
    client: Client,
    /// Where the server listens (on the machine's loopback).
    api_address: SocketAddr,
    agent_kubeconfig: PathBuf,
    version: String,
    support: ServerSupport,
    // Last: stopped (etcd and the API server killed) after the rest.
    server: KubeApiServer,
}

impl KubeApi {
    /// Starts etcd and the kube-apiserver (in their own process group, so
    /// a Ctrl-C leaves them to the teardown), applies the agent's
    /// manifests and creates the Node `node_name` with `node_ips`.
    pub fn start(node_name: &str, node_ips: &[IpAddr]) -> Result<Self> {
        let server = KubeApiServer::start_detached()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("building a tokio runtime")?;
        let client = runtime.block_on(async { server.client() })?;
        let info = runtime
            .block_on(client.apiserver_version())
            .context("reading the API server's version")?;
        let support = runtime.block_on(probe_support(&client))?;
        server.apply_agent_manifests()?;
        runtime.block_on(create_node(&client, node_name, node_ips))?;
        let agent_kubeconfig = server.agent_kubeconfig()?;
        let api_address = server
            .url()
            .trim_start_matches("https://")
            .parse()
            .with_context(|| format!("the API server's address in {}", server.url()))?;
        Ok(Self {
            api_address,
            runtime: Arc::new(runtime),
            client,
            agent_kubeconfig,
            version: info.git_version,
            support,
            server,
        })
    }

    /// The server's version, as it reports it (a server built from a
    /// source tarball may say `v0.0.0-master`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// What the server keeps of what scenarios write.
    pub fn support(&self) -> ServerSupport {
        self.support
    }

    /// The server's address.
    pub fn url(&self) -> &str {
        self.server.url()
    }

    /// A writer for one scenario's objects.
    pub fn scenario(&self) -> ApiObjects {
        ApiObjects {
            runtime: self.runtime.clone(),
            client: self.client.clone(),
            api_address: self.api_address,
            agent_kubeconfig: self.agent_kubeconfig.clone(),
            written: BTreeMap::new(),
            namespaces: Vec::new(),
        }
    }
}

/// What the server keeps: a NetworkPolicy with `endPort`, created with a
/// server-side dry run, comes back with or without it.
async fn probe_support(client: &Client) -> Result<ServerSupport> {
    let probe: NetworkPolicy = serde_json::from_value(json!({
        "metadata": { "name": "palisade-conformance-probe", "namespace": "default" },
        "spec": {
            "podSelector": {},
            "ingress": [{ "ports": [{ "protocol": "TCP", "port": 9000, "endPort": 9010 }] }],
        },
    }))?;
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let answer = Api::<NetworkPolicy>::namespaced(client.clone(), "default")
        .create(&params, &probe)
        .await
        .context("creating a NetworkPolicy with a server-side dry run")?;
    let end_port = answer
        .spec
        .and_then(|spec| spec.ingress)
        .and_then(|rules| rules.into_iter().next())
        .and_then(|rule| rule.ports)
        .and_then(|ports| ports.into_iter().next())
        .and_then(|port| port.end_port);
    Ok(ServerSupport {
        end_port: end_port.is_some(),
    })
}

/// Registers the node, with its addresses as a kubelet reports them.
async fn create_node(client: &Client, name: &str, ips: &[IpAddr]) -> Result<()> {
    let nodes = Api::<Node>::all(client.clone());
    let node: Node = serde_json::from_value(json!({ "metadata": { "name": name } }))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating the Node {name}"))?;
    let addresses: Vec<Value> = ips
        .iter()
        .map(|ip| json!({ "type": "InternalIP", "address": ip.to_string() }))
        .collect();
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "addresses": addresses } })),
        )
        .await
        .with_context(|| format!("setting the addresses of the Node {name}"))?;
    Ok(())
}

/// One scenario's objects in the API server.
pub struct ApiObjects {
    runtime: Arc<Runtime>,
    client: Client,
    api_address: SocketAddr,
    agent_kubeconfig: PathBuf,
    /// Every object written and not deleted since (Namespaces aside).
    written: BTreeMap<ObjectKey, ApiResource>,
    /// The namespaces written, in order, each with the labels it had if it
    /// existed before (`default`, `kube-system`: relabelled, never deleted).
    namespaces: Vec<(String, Option<BTreeMap<String, String>>)>,
}

fn has_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}

impl ApiObjects {
    /// The API resource of `object`'s kind: the typed ones known, others
    /// found through discovery.
    async fn resource(&self, object: &SourceObject) -> Result<ApiResource> {
        let kind = object.key.kind.as_str();
        let api_version = object.value["apiVersion"].as_str().unwrap_or_default();
        Ok(match (api_version, kind) {
            ("v1", "Namespace") => ApiResource::erase::<Namespace>(&()),
            ("v1", "Pod") => ApiResource::erase::<Pod>(&()),
            ("networking.k8s.io/v1", "NetworkPolicy") => ApiResource::erase::<NetworkPolicy>(&()),
            _ => {
                let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
                let gvk = GroupVersionKind::gvk(group, version, kind);
                kube::discovery::pinned_kind(&self.client, &gvk)
                    .await
                    .with_context(|| format!("the API server does not serve {api_version} {kind}"))?
                    .0
            }
        })
    }

    fn api(&self, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, resource),
            None => Api::all_with(self.client.clone(), resource),
        }
    }

    async fn upsert(&mut self, object: &SourceObject) -> Result<()> {
        let key = &object.key;
        let resource = self.resource(object).await?;
        let api = self.api(&resource, key.namespace.as_deref());
        let mut dynamic: DynamicObject =
            serde_json::from_value(serde_json::to_value(&object.value)?)
                .with_context(|| format!("{key} as an API object"))?;
        let mut existed_with = None;
        match api.create(&PostParams::default(), &dynamic).await {
            Ok(_) => {}
            Err(e) if has_status(&e, 409) => match key.kind.as_str() {
                // The plan changes only the labels of a live Namespace or Pod.
                "Namespace" | "Pod" => {
                    existed_with = Some(relabel(&api, &key.name, &dynamic).await?);
                }
                _ => {
                    let current = api.get(&key.name).await?;
                    dynamic.metadata.resource_version = current.metadata.resource_version;
                    api.replace(&key.name, &PostParams::default(), &dynamic)
                        .await
                        .with_context(|| format!("replacing {key}"))?;
                }
            },
            Err(e) => return Err(e).with_context(|| format!("creating {key}")),
        }
        if key.kind == "Namespace" {
            if !self.namespaces.iter().any(|(ns, _)| *ns == key.name) {
                self.namespaces.push((key.name.clone(), existed_with));
            }
        } else {
            self.written.insert(key.clone(), resource);
        }
        Ok(())
    }

    async fn delete(&mut self, key: &ObjectKey) -> Result<()> {
        if key.kind == "Namespace" {
            delete_namespace(&self.client, &key.name)
                .await
                .with_context(|| format!("deleting {key}"))?;
            self.namespaces.retain(|(ns, _)| *ns != key.name);
            return Ok(());
        }
        let resource = self
            .written
            .remove(key)
            .ok_or_else(|| anyhow!("{key} was not written in this scenario"))?;
        self.delete_object(key, &resource).await
    }

    async fn delete_object(&self, key: &ObjectKey, resource: &ApiResource) -> Result<()> {
        let params = if key.kind == "Pod" {
            // No kubelet confirms a graceful deletion: the CNI DEL is the
            // runner's.
            DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            }
        } else {
            DeleteParams::default()
        };
        match self
            .api(resource, key.namespace.as_deref())
            .delete(&key.name, &params)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if has_status(&e, 404) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {key}")),
        }
    }

    async fn set_running(&self, pod: &NamespacedName, ips: &[IpAddr]) -> Result<()> {
        let first = ips
            .first()
            .ok_or_else(|| anyhow!("pod {pod} has no address"))?;
        let all: Vec<Value> = ips
            .iter()
            .map(|ip| json!({ "ip": ip.to_string() }))
            .collect();
        Api::<Pod>::namespaced(self.client.clone(), &pod.namespace)
            .patch_status(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "status": { "phase": "Running", "podIP": first.to_string(), "podIPs": all },
                })),
            )
            .await
            .with_context(|| format!("writing the status of pod {pod}"))?;
        Ok(())
    }

    async fn delete_everything(&mut self) -> Result<()> {
        let mut first_error = None;
        for (key, resource) in std::mem::take(&mut self.written) {
            if let Err(e) = self.delete_object(&key, &resource).await {
                first_error.get_or_insert(e);
            }
        }
        let namespaces = Api::<DynamicObject>::all_with(
            self.client.clone(),
            &ApiResource::erase::<Namespace>(&()),
        );
        for (namespace, original) in std::mem::take(&mut self.namespaces).into_iter().rev() {
            let done = match original {
                None => delete_namespace(&self.client, &namespace).await,
                Some(labels) => {
                    let mut wanted =
                        DynamicObject::new(&namespace, &ApiResource::erase::<Namespace>(&()));
                    wanted.metadata.labels = Some(labels);
                    relabel(&namespaces, &namespace, &wanted).await.map(drop)
                }
            };
            if let Err(e) = done {
                first_error.get_or_insert(e.context(format!("clearing namespace {namespace}")));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Replaces the labels of a live object with those of `wanted` (a merge
/// patch: the labels it lacks are removed); returns those it had.
async fn relabel(
    api: &Api<DynamicObject>,
    name: &str,
    wanted: &DynamicObject,
) -> Result<BTreeMap<String, String>> {
    let current = api.get(name).await?;
    let wanted_labels = wanted.metadata.labels.clone().unwrap_or_default();
    let had = current.metadata.labels.unwrap_or_default();
    let mut labels: BTreeMap<String, Value> =
        had.keys().map(|k| (k.clone(), Value::Null)).collect();
    labels.extend(
        wanted_labels
            .into_iter()
            .map(|(k, v)| (k, Value::String(v))),
    );
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": { "labels": labels, "resourceVersion": current.metadata.resource_version },
        })),
    )
    .await
    .with_context(|| format!("relabelling {name}"))?;
    Ok(had)
}

impl PolicySource for ApiObjects {
    fn agent_source(&self) -> AgentSource<'_> {
        AgentSource::Kube {
            kubeconfig: Path::new(&self.agent_kubeconfig),
        }
    }

    /// The API server listens on the machine's loopback, which the node
    /// namespace does not share: the same address inside the node is
    /// forwarded to it, so the agent's kubeconfig (and the server's
    /// certificate, issued for 127.0.0.1) hold as they are.
    fn reach_from(&self, node: &Netns) -> Result<Option<TcpForwarder>> {
        TcpForwarder::start(node, self.api_address, self.api_address)
            .map(Some)
            .context("forwarding the API server into the node namespace")
    }

    fn apply(&mut self, edit: SourceEdit<'_>) -> Result<()> {
        let runtime = self.runtime.clone();
        match edit {
            SourceEdit::Upsert(object) => runtime.block_on(self.upsert(object)),
            SourceEdit::Delete(key) => runtime.block_on(self.delete(key)),
        }
    }

    fn pod_running(&mut self, pod: &NamespacedName, ips: &[IpAddr]) -> Result<()> {
        self.runtime.block_on(self.set_running(pod, ips))
    }

    fn clear(&mut self) -> Result<()> {
        let runtime = self.runtime.clone();
        runtime.block_on(self.delete_everything())
    }
}
