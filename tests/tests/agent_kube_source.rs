//! The agent's Kubernetes source and Event sink against a real kube-apiserver
//! (1.20, built by `cargo xtask setup`; see `palisade_tests::kube`).
//!
//! The agent runs as the `palisade-agent` ServiceAccount with exactly the
//! rights of `manifests/rbac.yaml`, through a TCP proxy the test can cut to
//! simulate a lost connection. The 1.20 server has no kubelet, scheduler or
//! controller-manager: pods get `spec.nodeName` and `status` from the test,
//! and a deleted namespace is finalized by the test.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::events::v1 as events;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use palisade_tests::kube::{AGENT_USER, KubeApiServer, delete_namespace, wait_for_agent_rbac};
use policy_agent::agent::diagnostics::DiagnosticSink;
use policy_agent::agent::events::EventSink;
use policy_agent::compile::{IdentityAllocator, NodeScope, compile};
use policy_agent::model::{ClusterState, Diagnostic, DiagnosticCode, ObjectKind, ObjectRef};
use policy_agent::source::kube::KubeSource;
use policy_agent::source::{Kind, Object, Objects, SourceUpdate};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// The node the agent under test runs on.
const NODE: &str = "node-a";
/// How long one expected update (or Event) may take.
const WAIT: Duration = Duration::from_secs(60);

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

/// A client for the agent's ServiceAccount, talking to `server` (the API
/// server itself or the proxy in front of it).
async fn agent_client(api: &KubeApiServer, server: &str) -> Result<Client> {
    let mut kubeconfig = Kubeconfig::read_from(api.kubeconfig_for(AGENT_USER)?)?;
    for cluster in &mut kubeconfig.clusters {
        if let Some(c) = cluster.cluster.as_mut() {
            c.server = Some(server.to_owned());
        }
    }
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// A TCP proxy in front of the API server that can drop every connection
/// and refuse new ones, like a network partition.
struct Proxy {
    addr: SocketAddr,
    refusing: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accepted: Arc<AtomicUsize>,
    accept_loop: AbortHandle,
}

impl Proxy {
    async fn start(upstream: &str) -> Result<Self> {
        let upstream: SocketAddr = upstream
            .trim_start_matches("https://")
            .parse()
            .context("the API server's address")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let refusing = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (r, c, a) = (refusing.clone(), connections.clone(), accepted.clone());
        let accept_loop = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                a.fetch_add(1, Ordering::SeqCst);
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Ok(Self {
            addr,
            refusing,
            connections,
            accepted,
            accept_loop,
        })
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Drops every open connection and refuses new ones.
    fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Accepts connections again.
    fn resume(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.cut();
    }
}

/// Which watch an update comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Namespaces,
    Pods,
    Policies,
    Node,
}

fn stream_of(update: &SourceUpdate) -> Stream {
    let kind = match update {
        SourceUpdate::Replace(objects) => objects.kind(),
        SourceUpdate::Apply(object) => object.kind(),
        SourceUpdate::Delete(kind, _) => *kind,
        SourceUpdate::NodeAddresses(_) => return Stream::Node,
    };
    match kind {
        Kind::Namespace => Stream::Namespaces,
        Kind::Pod => Stream::Pods,
        Kind::NetworkPolicy => Stream::Policies,
    }
}

/// The updates the source sends, taken per watch (the watches interleave).
struct Updates {
    rx: mpsc::Receiver<SourceUpdate>,
    pending: VecDeque<SourceUpdate>,
}

impl Updates {
    /// The next update of `stream`, within [`WAIT`].
    async fn next(&mut self, stream: Stream) -> Result<SourceUpdate> {
        if let Some(i) = self.pending.iter().position(|u| stream_of(u) == stream) {
            return Ok(self.pending.remove(i).expect("present"));
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let update = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .with_context(|| {
                    format!(
                        "no {stream:?} update within {WAIT:?}; pending others: {:?}",
                        self.pending
                    )
                })?
                .context("the source stopped")?;
            if stream_of(&update) == stream {
                return Ok(update);
            }
            self.pending.push_back(update);
        }
    }

    /// The next update of `stream` if it is already in the channel.
    fn ready(&mut self, stream: Stream) -> Result<SourceUpdate> {
        while let Ok(update) = self.rx.try_recv() {
            self.pending.push_back(update);
        }
        let i = self
            .pending
            .iter()
            .position(|u| stream_of(u) == stream)
            .with_context(|| format!("no {stream:?} update in the channel"))?;
        Ok(self.pending.remove(i).expect("present"))
    }

    /// Asserts that no update of `stream` arrives within `quiet`.
    async fn none(&mut self, stream: Stream, quiet: Duration) -> Result<()> {
        if let Some(u) = self.pending.iter().find(|u| stream_of(u) == stream) {
            bail!("unexpected {stream:?} update: {u:?}");
        }
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(update) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            let update = update.context("the source stopped")?;
            ensure!(
                stream_of(&update) != stream,
                "unexpected {stream:?} update: {update:?}"
            );
            self.pending.push_back(update);
        }
        Ok(())
    }

    async fn namespaces(&mut self) -> Result<Vec<Namespace>> {
        match self.next(Stream::Namespaces).await? {
            SourceUpdate::Replace(Objects::Namespaces(list)) => Ok(list),
            other => bail!("expected a Replace of namespaces, got {other:?}"),
        }
    }

    async fn pods(&mut self) -> Result<Vec<Pod>> {
        match self.next(Stream::Pods).await? {
            SourceUpdate::Replace(Objects::Pods(list)) => Ok(list),
            other => bail!("expected a Replace of pods, got {other:?}"),
        }
    }

    async fn policies(&mut self) -> Result<Vec<NetworkPolicy>> {
        match self.next(Stream::Policies).await? {
            SourceUpdate::Replace(Objects::NetworkPolicies(list)) => Ok(list),
            other => bail!("expected a Replace of policies, got {other:?}"),
        }
    }

    async fn node_addresses(&mut self) -> Result<Vec<IpAddr>> {
        match self.next(Stream::Node).await? {
            SourceUpdate::NodeAddresses(list) => Ok(list),
            other => bail!("expected node addresses, got {other:?}"),
        }
    }

    async fn applied_namespace(&mut self) -> Result<Namespace> {
        match self.next(Stream::Namespaces).await? {
            SourceUpdate::Apply(Object::Namespace(ns)) => Ok(*ns),
            other => bail!("expected an Apply of a namespace, got {other:?}"),
        }
    }

    async fn applied_pod(&mut self) -> Result<Pod> {
        match self.next(Stream::Pods).await? {
            SourceUpdate::Apply(Object::Pod(pod)) => Ok(*pod),
            other => bail!("expected an Apply of a pod, got {other:?}"),
        }
    }

    async fn applied_policy(&mut self) -> Result<NetworkPolicy> {
        match self.next(Stream::Policies).await? {
            SourceUpdate::Apply(Object::NetworkPolicy(p)) => Ok(*p),
            other => bail!("expected an Apply of a policy, got {other:?}"),
        }
    }

    async fn deleted(&mut self, stream: Stream) -> Result<(Kind, ObjectRef)> {
        match self.next(stream).await? {
            SourceUpdate::Delete(kind, key) => Ok((kind, key)),
            other => bail!("expected a Delete, got {other:?}"),
        }
    }
}

fn names<'a, T: kube::Resource + 'a>(objects: impl IntoIterator<Item = &'a T>) -> BTreeSet<String> {
    objects
        .into_iter()
        .map(|o| {
            let meta = o.meta();
            match &meta.namespace {
                Some(ns) => format!("{ns}/{}", meta.name.clone().unwrap_or_default()),
                None => meta.name.clone().unwrap_or_default(),
            }
        })
        .collect()
}

fn set<const N: usize>(items: [&str; N]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn label<'a, T: kube::Resource>(object: &'a T, key: &str) -> Option<&'a str> {
    object.meta().labels.as_ref()?.get(key).map(String::as_str)
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = list.iter().map(|s| s.parse().unwrap()).collect();
    out.sort();
    out
}

fn pod_ips(pod: &Pod) -> Vec<String> {
    pod.status
        .iter()
        .flat_map(|s| s.pod_ips.iter().flatten())
        .map(|ip| ip.ip.clone())
        .collect()
}

fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
    let mut labels: BTreeMap<String, String> = from_json(labels);
    // 1.20 does not add it; the converter does, but keep the objects realistic.
    labels.insert("kubernetes.io/metadata.name".into(), name.into());
    from_json(json!({ "metadata": { "name": name, "labels": labels } }))
}

fn pod(name: &str, node: &str, labels: serde_json::Value) -> Pod {
    from_json(json!({
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": { "note": "dropped by the agent" },
        },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "app",
                "image": "registry.invalid/app:1",
                "env": [{ "name": "A", "value": "dropped" }],
                "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
            }],
        },
    }))
}

/// Writes a pod's addresses, as a kubelet would.
async fn set_pod_ips(pods: &Api<Pod>, name: &str, addresses: &[&str]) -> Result<()> {
    let list: Vec<_> = addresses.iter().map(|ip| json!({ "ip": ip })).collect();
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({
            "status": { "phase": "Running", "podIP": addresses[0], "podIPs": list },
        })),
    )
    .await?;
    Ok(())
}

fn deny_ingress(name: &str, app: &str) -> NetworkPolicy {
    from_json(json!({
        "metadata": { "name": name },
        "spec": {
            "podSelector": { "matchLabels": { "app": app } },
            "policyTypes": ["Ingress"],
        },
    }))
}

/// Sets the node's addresses through the status subresource.
async fn set_node_addresses(nodes: &Api<Node>, addresses: serde_json::Value) -> Result<()> {
    nodes
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "addresses": addresses } })),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_lists_watches_and_relists_with_least_privilege() -> Result<()> {
    let started = Instant::now();
    let api = KubeApiServer::start()?;
    let admin = api.client()?;
    api.apply_agent_manifests()?;
    let pp = PostParams::default();

    // The cluster before the agent starts: a namespace, a pod of this node
    // with addresses, a policy, this node (and another node's pod).
    let namespaces = Api::<Namespace>::all(admin.clone());
    namespaces
        .create(&pp, &namespace("shop", json!({ "team": "shop" })))
        .await?;
    let shop_pods = Api::<Pod>::namespaced(admin.clone(), "shop");
    shop_pods
        .create(&pp, &pod("web-0", NODE, json!({ "app": "web" })))
        .await?;
    set_pod_ips(&shop_pods, "web-0", &["10.244.1.5", "fd00:244:1::5"]).await?;
    let shop_policies = Api::<NetworkPolicy>::namespaced(admin.clone(), "shop");
    shop_policies
        .create(&pp, &deny_ingress("deny-web", "web"))
        .await?;
    let nodes = Api::<Node>::all(admin.clone());
    nodes
        .create(&pp, &from_json(json!({ "metadata": { "name": NODE } })))
        .await?;
    nodes
        .create(&pp, &from_json(json!({ "metadata": { "name": "node-b" } })))
        .await?;
    set_node_addresses(
        &nodes,
        json!([
            { "type": "Hostname", "address": NODE },
            { "type": "InternalIP", "address": "192.168.50.10" },
            { "type": "InternalIP", "address": "fd00:50::10" },
        ]),
    )
    .await?;

    // The agent: its ServiceAccount with the manifests' role, through a proxy.
    let proxy = Proxy::start(api.url()).await?;
    let agent = agent_client(&api, &proxy.url()).await?;
    wait_for_agent_rbac(&agent).await?;
    // Least privilege: nothing beyond what the agent needs.
    let denied = Api::<k8s_openapi::api::core::v1::Secret>::all(agent.clone())
        .list(&ListParams::default())
        .await;
    ensure!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "the agent may list secrets: {denied:?}"
    );
    let denied = Api::<Pod>::namespaced(agent.clone(), "shop")
        .delete("web-0", &DeleteParams::default())
        .await;
    ensure!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "the agent may delete pods: {denied:?}"
    );

    let (tx, rx) = mpsc::channel(64);
    let (kube_source, catch_up) = KubeSource::new(agent, NODE.to_owned());
    let source = tokio::spawn(kube_source.run(tx));
    let mut updates = Updates {
        rx,
        pending: VecDeque::new(),
    };

    // 1. The initial lists: one Replace per kind, and the node's addresses.
    let listed = updates.namespaces().await?;
    let listed_names = names(&listed);
    for expected in [
        "default",
        "kube-system",
        "kube-public",
        "palisade-system",
        "shop",
    ] {
        ensure!(
            listed_names.contains(expected),
            "{expected} not in {listed_names:?}"
        );
    }
    let shop = listed
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("shop"))
        .unwrap();
    ensure!(label(shop, "team") == Some("shop"));
    ensure!(
        shop.status.is_none() && shop.metadata.managed_fields.is_none(),
        "trimmed: {shop:?}"
    );

    let listed = updates.pods().await?;
    ensure!(
        names(&listed) == set(["shop/web-0"]),
        "{:?}",
        names(&listed)
    );
    let web = &listed[0];
    ensure!(pod_ips(web) == ["10.244.1.5", "fd00:244:1::5"], "{web:?}");
    ensure!(web.spec.as_ref().unwrap().node_name.as_deref() == Some(NODE));
    ensure!(web.metadata.annotations.is_none() && web.metadata.managed_fields.is_none());
    ensure!(web.metadata.uid.is_some() && web.metadata.resource_version.is_some());
    let container = &web.spec.as_ref().unwrap().containers[0];
    ensure!(
        container.image.is_none() && container.env.is_none(),
        "{container:?}"
    );
    ensure!(container.ports.as_ref().unwrap()[0].name.as_deref() == Some("http"));

    let listed = updates.policies().await?;
    ensure!(
        names(&listed) == set(["shop/deny-web"]),
        "{:?}",
        names(&listed)
    );
    ensure!(updates.node_addresses().await? == ips(&["192.168.50.10", "fd00:50::10"]));
    eprintln!("initial lists after {:?}", started.elapsed());

    // 2. Namespaces: created, relabelled; deleted (finalized by hand).
    namespaces
        .create(&pp, &namespace("blog", json!({ "team": "blog" })))
        .await?;
    let ns = updates.applied_namespace().await?;
    ensure!(ns.metadata.name.as_deref() == Some("blog") && label(&ns, "team") == Some("blog"));
    namespaces
        .patch(
            "blog",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "team": "news" } } })),
        )
        .await?;
    let ns = updates.applied_namespace().await?;
    ensure!(label(&ns, "team") == Some("news"), "{ns:?}");

    // 3. Pods: created without addresses, given addresses, a status change
    //    the agent does not use (not sent), relabelled, deleted.
    let blog_pods = Api::<Pod>::namespaced(admin.clone(), "blog");
    blog_pods
        .create(&pp, &pod("api-0", "node-b", json!({ "app": "api" })))
        .await?;
    let p = updates.applied_pod().await?;
    ensure!(
        p.metadata.name.as_deref() == Some("api-0") && pod_ips(&p).is_empty(),
        "{p:?}"
    );
    ensure!(p.spec.as_ref().unwrap().node_name.as_deref() == Some("node-b"));
    set_pod_ips(&blog_pods, "api-0", &["10.244.2.7"]).await?;
    let p = updates.applied_pod().await?;
    ensure!(pod_ips(&p) == ["10.244.2.7"], "{p:?}");
    blog_pods
        .patch_status(
            "api-0",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": { "conditions": [{ "type": "Ready", "status": "True" }] },
            })),
        )
        .await?;
    blog_pods
        .patch(
            "api-0",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "app": "api-v2" } } })),
        )
        .await?;
    // The next pod update is the relabelling: the conditions were not sent.
    let p = updates.applied_pod().await?;
    ensure!(label(&p, "app") == Some("api-v2"), "{p:?}");
    blog_pods
        .delete("api-0", &DeleteParams::default().grace_period(0))
        .await?;
    let (kind, key) = updates.deleted(Stream::Pods).await?;
    ensure!(
        kind == Kind::Pod && key == ObjectRef::new("blog", "api-0"),
        "{key:?}"
    );

    // 4. Policies: created, changed, deleted.
    let blog_policies = Api::<NetworkPolicy>::namespaced(admin.clone(), "blog");
    blog_policies
        .create(&pp, &deny_ingress("deny-api", "api"))
        .await?;
    let p = updates.applied_policy().await?;
    ensure!(names([&p]) == set(["blog/deny-api"]));
    blog_policies
        .patch(
            "deny-api",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "spec": { "podSelector": { "matchLabels": { "app": "api-v2" } } } }),
            ),
        )
        .await?;
    let p = updates.applied_policy().await?;
    let selector = p.spec.as_ref().unwrap().pod_selector.as_ref().unwrap();
    ensure!(
        selector.match_labels.as_ref().unwrap()["app"] == "api-v2",
        "{p:?}"
    );
    blog_policies
        .delete("deny-api", &DeleteParams::default())
        .await?;
    let (kind, key) = updates.deleted(Stream::Policies).await?;
    ensure!(kind == Kind::NetworkPolicy && key == ObjectRef::new("blog", "deny-api"));

    delete_namespace(&admin, "blog").await?;
    // Terminating is not sent (nothing the agent uses changed); the removal is.
    let (kind, key) = updates.deleted(Stream::Namespaces).await?;
    ensure!(
        kind == Kind::Namespace && key == ObjectRef::new("", "blog"),
        "{key:?}"
    );

    // 5. The node's addresses change; a heartbeat-like change does not send.
    set_node_addresses(
        &nodes,
        json!([
            { "type": "InternalIP", "address": "192.168.50.10" },
            { "type": "InternalIP", "address": "fd00:50::10" },
            { "type": "ExternalIP", "address": "203.0.113.10" },
        ]),
    )
    .await?;
    ensure!(
        updates.node_addresses().await? == ips(&["192.168.50.10", "fd00:50::10", "203.0.113.10"])
    );
    nodes
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "heartbeat": "1" } } })),
        )
        .await?;
    updates.none(Stream::Node, Duration::from_secs(2)).await?;
    eprintln!("watch events checked after {:?}", started.elapsed());

    // 6. Catching up (the API's Sync): once it returns, what was written
    //    before is already in the channel; with nothing written since, it
    //    returns as well (every kind idle: no event is due).
    shop_policies
        .create(&pp, &deny_ingress("sync-check", "sync"))
        .await?;
    tokio::time::timeout(WAIT, catch_up.catch_up()).await??;
    let p = updates.ready(Stream::Policies)?;
    ensure!(
        matches!(&p, SourceUpdate::Apply(Object::NetworkPolicy(p)) if names([&**p]) == set(["shop/sync-check"])),
        "{p:?}"
    );
    tokio::time::timeout(WAIT, catch_up.catch_up()).await??;
    updates.none(Stream::Policies, Duration::ZERO).await?;
    shop_policies
        .delete("sync-check", &DeleteParams::default())
        .await?;
    tokio::time::timeout(WAIT, catch_up.catch_up()).await??;
    let (kind, key) = match updates.ready(Stream::Policies)? {
        SourceUpdate::Delete(kind, key) => (kind, key),
        other => bail!("expected a Delete, got {other:?}"),
    };
    ensure!(kind == Kind::NetworkPolicy && key == ObjectRef::new("shop", "sync-check"));

    // 7. The connection is lost (every connection dropped, new ones refused
    //    for 3 s, as during an API server restart); the cluster changes
    //    meanwhile; when the API server is reachable again, every watch
    //    starts over with a fresh list whose Replace holds the current
    //    objects, and nothing from the outage arrives as an Apply first.
    let connections_before = proxy.accepted.load(Ordering::SeqCst);
    proxy.cut();
    shop_pods
        .create(&pp, &pod("late-0", NODE, json!({ "app": "late" })))
        .await?;
    set_pod_ips(&shop_pods, "late-0", &["10.244.1.9"]).await?;
    shop_policies
        .delete("deny-web", &DeleteParams::default())
        .await?;
    namespaces
        .create(&pp, &namespace("after", json!({ "team": "after" })))
        .await?;
    set_node_addresses(
        &nodes,
        json!([{ "type": "InternalIP", "address": "192.168.50.11" }]),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.resume();

    let listed = updates.namespaces().await?;
    let listed_names = names(&listed);
    ensure!(
        listed_names.contains("after") && !listed_names.contains("blog"),
        "{listed_names:?}"
    );
    let listed = updates.pods().await?;
    ensure!(
        names(&listed) == set(["shop/late-0", "shop/web-0"]),
        "{:?}",
        names(&listed)
    );
    let late = listed
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("late-0"))
        .unwrap();
    ensure!(pod_ips(late) == ["10.244.1.9"], "{late:?}");
    let listed = updates.policies().await?;
    ensure!(listed.is_empty(), "{:?}", names(&listed));
    ensure!(updates.node_addresses().await? == ips(&["192.168.50.11"]));
    ensure!(proxy.accepted.load(Ordering::SeqCst) > connections_before);
    eprintln!("re-listed after the cut; total {:?}", started.elapsed());

    // Watching continues after the re-list.
    shop_policies
        .create(&pp, &deny_ingress("deny-late", "late"))
        .await?;
    let p = updates.applied_policy().await?;
    ensure!(names([&p]) == set(["shop/deny-late"]));

    // The source stops when the reconciler's end of the channel is gone.
    drop(updates);
    tokio::time::timeout(Duration::from_secs(10), source)
        .await
        .context("the source did not stop when its channel closed")???;
    Ok(())
}

/// Diagnostics of the current cluster contents, as the reconciler gets them:
/// through `ClusterState` and `compile`.
async fn diagnostics(client: &Client) -> Result<Vec<Diagnostic>> {
    let lp = ListParams::default();
    let namespaces = Api::<Namespace>::all(client.clone()).list(&lp).await?.items;
    let pods = Api::<Pod>::all(client.clone()).list(&lp).await?.items;
    let policies = Api::<NetworkPolicy>::all(client.clone())
        .list(&lp)
        .await?
        .items;
    let (state, rejected) = ClusterState::from_k8s(&namespaces, &pods, &policies);
    ensure!(rejected.is_empty(), "{rejected:?}");
    let scope = NodeScope {
        node_name: NODE.to_owned(),
        ..NodeScope::default()
    };
    Ok(compile(&state, &scope, &mut IdentityAllocator::new()).diagnostics)
}

/// The Events of namespace `ns` about the object named `name`.
async fn events_about(client: &Client, ns: &str, name: &str) -> Result<Vec<events::Event>> {
    let list = Api::<events::Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect())
}

async fn wait_events(client: &Client, ns: &str, name: &str) -> Result<Vec<events::Event>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = events_about(client, ns, name).await?;
        if !found.is_empty() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("no Event about {ns}/{name} within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_sink_reports_diagnostics_once_on_the_object() -> Result<()> {
    let api = KubeApiServer::start()?;
    let admin = api.client()?;
    api.apply_agent_manifests()?;
    let pp = PostParams::default();
    Api::<Namespace>::all(admin.clone())
        .create(&pp, &namespace("shop", json!({})))
        .await?;

    // A policy the API server accepts but the agent cannot enforce: an
    // IPv4-mapped IPv6 CIDR (Go parses it; the converter rejects it).
    let policies = Api::<NetworkPolicy>::namespaced(admin.clone(), "shop");
    let policy: NetworkPolicy = from_json(json!({
        "metadata": { "name": "bad-cidr" },
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{ "from": [{ "ipBlock": { "cidr": "::ffff:10.0.0.0/104" } }] }],
        },
    }));
    let policy = policies.create(&pp, &policy).await?;
    // Two pods with one address: a diagnostic about the second, which is on
    // another node.
    let pods = Api::<Pod>::namespaced(admin.clone(), "shop");
    pods.create(&pp, &pod("dup-a", NODE, json!({ "app": "a" })))
        .await?;
    pods.create(&pp, &pod("dup-b", "node-b", json!({ "app": "b" })))
        .await?;
    set_pod_ips(&pods, "dup-a", &["10.244.1.20"]).await?;
    set_pod_ips(&pods, "dup-b", &["10.244.1.20"]).await?;

    let found = diagnostics(&admin).await?;
    let cidr: Vec<Diagnostic> = found
        .iter()
        .filter(|d| d.code == DiagnosticCode::InvalidCidr && d.name == "bad-cidr")
        .cloned()
        .collect();
    ensure!(
        cidr.len() == 1,
        "expected one invalid_cidr diagnostic: {found:#?}"
    );
    let dup: Vec<Diagnostic> = found
        .iter()
        .filter(|d| d.code == DiagnosticCode::DuplicatePodIp && d.object == ObjectKind::Pod)
        .cloned()
        .collect();
    ensure!(
        dup.len() == 1 && dup[0].name == "dup-b",
        "expected one duplicate_pod_ip diagnostic about dup-b: {found:#?}"
    );

    let agent = api.client_as(AGENT_USER)?;
    wait_for_agent_rbac(&agent).await?;
    let sink_a = EventSink::new(agent.clone(), NODE.to_owned());
    // The pod diagnostic first: node-a's agent must skip it (the pod runs on
    // node-b); once the policy's Event exists, it has been handled.
    let appeared: Vec<Diagnostic> = dup.iter().chain(&cidr).cloned().collect();
    sink_a.report(&appeared, &[]);

    let found = wait_events(&admin, "shop", "bad-cidr").await?;
    ensure!(found.len() == 1, "{found:#?}");
    let event = &found[0];
    let regarding = event.regarding.as_ref().unwrap();
    ensure!(regarding.kind.as_deref() == Some("NetworkPolicy"));
    ensure!(regarding.api_version.as_deref() == Some("networking.k8s.io/v1"));
    ensure!(regarding.uid == policy.metadata.uid, "{regarding:?}");
    ensure!(event.reason.as_deref() == Some("InvalidCidr"), "{event:?}");
    ensure!(event.type_.as_deref() == Some("Warning"));
    let note = event.note.as_deref().unwrap_or_default();
    ensure!(
        note.starts_with("ingress rule 0: peer 0:") && note.contains("::ffff:10.0.0.0/104"),
        "{note}"
    );
    ensure!(event.reporting_controller.as_deref() == Some("palisade/policy-agent"));
    ensure!(event.reporting_instance.as_deref() == Some("policy-agent@node-a"));
    ensure!(
        events_about(&admin, "shop", "dup-b").await?.is_empty(),
        "node-a reported node-b's pod"
    );

    // Found the way `kubectl describe` looks up an object's Events: core/v1
    // Events by kind, name and uid.
    let uid = policy.metadata.uid.clone().unwrap_or_default();
    let selector = format!(
        "involvedObject.kind=NetworkPolicy,involvedObject.name=bad-cidr,involvedObject.uid={uid}"
    );
    let core = Api::<k8s_openapi::api::core::v1::Event>::namespaced(admin.clone(), "shop")
        .list(&ListParams::default().fields(&selector))
        .await?;
    ensure!(core.items.len() == 1, "core/v1 view: {:#?}", core.items);
    ensure!(core.items[0].reason.as_deref() == Some("InvalidCidr"));
    ensure!(core.items[0].message.as_deref() == Some(note));

    // Reported again (still present), re-appearing after a clear, and from a
    // second node: still one Event.
    sink_a.report(&cidr, &[]);
    sink_a.report(&[], &cidr);
    sink_a.report(&cidr, &[]);
    let sink_b = EventSink::new(agent.clone(), "node-b".to_owned());
    sink_b.report(&appeared, &[]);
    // node-b's agent owns dup-b.
    let found = wait_events(&admin, "shop", "dup-b").await?;
    ensure!(found.len() == 1, "{found:#?}");
    ensure!(found[0].reason.as_deref() == Some("DuplicatePodIp"));
    ensure!(found[0].type_.as_deref() == Some("Warning"));
    ensure!(found[0].reporting_instance.as_deref() == Some("policy-agent@node-b"));
    ensure!(found[0].regarding.as_ref().unwrap().kind.as_deref() == Some("Pod"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let found = events_about(&admin, "shop", "bad-cidr").await?;
    ensure!(found.len() == 1, "duplicated Events: {found:#?}");
    Ok(())
}
