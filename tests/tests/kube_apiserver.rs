//! The Kubernetes API fixture against the real kube-apiserver that `cargo
//! xtask setup` builds (1.20 from Debian's sources): the objects the agent
//! watches round-trip through kube-rs, RBAC really denies until a role is
//! bound, and kubectl's server-side dry run validates manifests.
//!
//! Each test starts its own etcd + API server on free loopback ports.

use std::{
    collections::BTreeMap,
    fs,
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Client,
    api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use palisade_tests::kube::{KubeApiServer, LEAST_PRIVILEGE_USER};
use serde_json::json;

/// How long RBAC changes may take to reach the authorizer's cache.
const RBAC_WAIT: Duration = Duration::from_secs(30);

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

/// A namespace with the `kubernetes.io/metadata.name` label, which 1.20 does
/// not add by itself.
fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/metadata.name".to_owned(), name.to_owned()),
                ("team".to_owned(), "shop".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// Whether a kube call was refused by authorization (403).
fn forbidden<T>(result: &kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

fn describe<T>(result: &kube::Result<T>) -> String {
    match result {
        Ok(_) => "allowed".to_owned(),
        Err(err) => format!("{err}"),
    }
}

/// Retries `probe` until it is allowed (RBAC changes propagate through an
/// informer), failing after [`RBAC_WAIT`].
async fn wait_allowed<T, F, Fut>(what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let deadline = Instant::now() + RBAC_WAIT;
    loop {
        let result = probe().await;
        match result {
            Ok(value) => return Ok(value),
            Err(kube::Error::Api(status)) if status.code == 403 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => bail!("{what}: still not allowed after the role was bound: {err}"),
        }
    }
}

/// A ClusterRole with `verbs` on `resources` of `group`, bound to `subject`
/// (`{"kind": "User"|"ServiceAccount", ...}`).
async fn grant(
    client: &Client,
    name: &str,
    group: &str,
    resources: &[&str],
    verbs: &[&str],
    subject: serde_json::Value,
) -> Result<()> {
    let pp = PostParams::default();
    let role: ClusterRole = from_json(json!({
        "metadata": { "name": name },
        "rules": [{ "apiGroups": [group], "resources": resources, "verbs": verbs }],
    }));
    Api::<ClusterRole>::all(client.clone())
        .create(&pp, &role)
        .await
        .context("creating the ClusterRole")?;
    let binding: ClusterRoleBinding = from_json(json!({
        "metadata": { "name": name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name },
        "subjects": [subject],
    }));
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&pp, &binding)
        .await
        .context("creating the ClusterRoleBinding")?;
    Ok(())
}

#[tokio::test]
async fn objects_round_trip_and_rbac_denies_until_granted() -> Result<()> {
    let api = KubeApiServer::start()?;
    let client = api.client()?;
    let version = client.apiserver_version().await?;
    eprintln!("kube-apiserver {} at {}", version.git_version, api.url());
    let pp = PostParams::default();

    // A namespace, labelled by hand.
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces.create(&pp, &namespace("shop")).await?;

    // A pod bound to a node by hand (no scheduler), its IPs written through
    // the status subresource (no kubelet).
    let pods = Api::<Pod>::namespaced(client.clone(), "shop");
    let pod: Pod = from_json(json!({
        "metadata": { "name": "web-0", "labels": { "app": "web" } },
        "spec": {
            "nodeName": "node-1",
            "containers": [{
                "name": "web",
                "image": "registry.invalid/web:1",
                "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
            }],
        },
    }));
    pods.create(&pp, &pod).await?;
    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(json!({
            "status": {
                "phase": "Running",
                "podIP": "10.244.1.5",
                "podIPs": [{ "ip": "10.244.1.5" }, { "ip": "fd00:244:1::5" }],
            },
        })),
    )
    .await?;
    let pod = pods.get("web-0").await?;
    let spec = pod.spec.as_ref().expect("a spec");
    assert_eq!(spec.node_name.as_deref(), Some("node-1"));
    let status = pod.status.as_ref().expect("a status");
    let ips: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .collect();
    assert_eq!(ips, ["10.244.1.5", "fd00:244:1::5"]);
    assert_eq!(status.phase.as_deref(), Some("Running"));

    // A NetworkPolicy with a named port, a namespace selector and an ipBlock.
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), "shop");
    let policy: NetworkPolicy = from_json(json!({
        "metadata": { "name": "web-ingress" },
        "spec": {
            "podSelector": { "matchLabels": { "app": "web" } },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [{
                    "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "shop" } },
                    "podSelector": { "matchLabels": { "app": "client" } },
                }],
                "ports": [{ "protocol": "TCP", "port": "http" }],
            }],
            "egress": [{
                "to": [{ "ipBlock": { "cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"] } }],
                "ports": [{ "protocol": "UDP", "port": 53 }],
            }],
        },
    }));
    policies.create(&pp, &policy).await?;

    // Everything lists back.
    let listed = namespaces.list(&ListParams::default()).await?;
    let shop = listed
        .items
        .iter()
        .find(|ns| ns.metadata.name.as_deref() == Some("shop"))
        .expect("namespace shop listed");
    assert_eq!(
        shop.metadata.labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
        "shop"
    );
    let listed = pods.list(&ListParams::default().labels("app=web")).await?;
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.244.1.5")
    );
    let listed = policies.list(&ListParams::default()).await?;
    assert_eq!(listed.items.len(), 1);
    let spec = listed.items[0].spec.as_ref().expect("a policy spec");
    let ingress = &spec.ingress.as_ref().expect("ingress rules")[0];
    let port = &ingress.ports.as_ref().expect("ports")[0];
    assert_eq!(
        port.port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".to_owned()))
    );
    let egress = &spec.egress.as_ref().expect("egress rules")[0];
    let block = egress.to.as_ref().unwrap()[0]
        .ip_block
        .as_ref()
        .expect("an ipBlock");
    assert_eq!(block.cidr, "10.0.0.0/8");
    assert_eq!(
        block.except.as_deref(),
        Some(&["10.1.0.0/16".to_owned()][..])
    );

    // Least privilege: the second user may do nothing until a role is bound.
    let user = api.client_as(LEAST_PRIVILEGE_USER)?;
    let user_pods = Api::<Pod>::all(user.clone());
    let denied = user_pods.list(&ListParams::default()).await;
    assert!(
        forbidden(&denied),
        "listing pods before the grant: {}",
        describe(&denied)
    );
    grant(
        &client,
        "palisade-test-pod-reader",
        "",
        &["pods"],
        &["list", "watch"],
        json!({ "kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": LEAST_PRIVILEGE_USER }),
    )
    .await?;
    let all = ListParams::default();
    let listed = wait_allowed("listing pods", || user_pods.list(&all)).await?;
    assert_eq!(listed.items.len(), 1);
    // Watch is granted too: a change the admin makes reaches the user's watch.
    let version = listed
        .metadata
        .resource_version
        .clone()
        .expect("a list resourceVersion");
    let mut events = user_pods
        .watch(&WatchParams::default().timeout(20), &version)
        .await
        .context("watching pods with the granted role")?
        .boxed();
    pods.patch(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "tier": "frontend" } } })),
    )
    .await?;
    let event = tokio::time::timeout(Duration::from_secs(20), events.try_next())
        .await
        .context("no watch event within 20 s")??;
    match event {
        Some(WatchEvent::Modified(pod)) => {
            assert_eq!(pod.metadata.labels.unwrap()["tier"], "frontend");
        }
        other => panic!("expected the pod's modification, got {other:?}"),
    }
    // Nothing beyond the grant.
    let denied = Api::<Namespace>::all(user.clone())
        .list(&ListParams::default())
        .await;
    assert!(
        forbidden(&denied),
        "listing namespaces: {}",
        describe(&denied)
    );
    let denied = Api::<Pod>::namespaced(user.clone(), "shop")
        .get("web-0")
        .await;
    assert!(
        forbidden(&denied),
        "getting a pod (only list/watch granted): {}",
        describe(&denied)
    );
    let denied = Api::<NetworkPolicy>::all(user)
        .list(&ListParams::default())
        .await;
    assert!(
        forbidden(&denied),
        "listing policies: {}",
        describe(&denied)
    );
    Ok(())
}

#[tokio::test]
async fn service_account_tokens_follow_rbac() -> Result<()> {
    let api = KubeApiServer::start()?;
    let admin = api.client()?;
    // The agent runs as a service account; TokenRequest mints its token.
    let account = "system:serviceaccount:palisade-system:policy-agent";
    let agent = api.client_as(account)?;
    let policies = Api::<NetworkPolicy>::all(agent.clone());
    let denied = policies.list(&ListParams::default()).await;
    assert!(
        forbidden(&denied),
        "listing policies before the grant: {}",
        describe(&denied)
    );
    grant(
        &admin,
        "palisade-test-policy-reader",
        "networking.k8s.io",
        &["networkpolicies"],
        &["list", "watch"],
        json!({ "kind": "ServiceAccount", "name": "policy-agent", "namespace": "palisade-system" }),
    )
    .await?;
    let all = ListParams::default();
    let listed = wait_allowed("listing policies", || policies.list(&all)).await?;
    assert!(listed.items.is_empty());

    // A kubeconfig for that account works for kubectl as well.
    let kubeconfig = api.kubeconfig_for(account)?;
    let out = run(api.kubectl_with(&kubeconfig).args([
        "get",
        "networkpolicies",
        "--all-namespaces",
        "-o",
        "name",
    ]))?;
    assert!(
        out.status.success(),
        "kubectl get as the agent: {}",
        text(&out)
    );
    let out = run(api
        .kubectl_with(&kubeconfig)
        .args(["get", "pods", "--all-namespaces"]))?;
    assert!(
        !out.status.success(),
        "kubectl get pods as the agent should be forbidden"
    );
    assert!(text(&out).contains("forbidden"), "{}", text(&out));
    Ok(())
}

const MANIFESTS: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: dry-run-shop
  labels:
    kubernetes.io/metadata.name: dry-run-shop
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny
  namespace: default
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-dns
  namespace: default
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
";

/// A policy only the server's validation rejects (kubectl's client side
/// accepts any string as a protocol).
const INVALID: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: bad-protocol
  namespace: default
spec:
  podSelector: {}
  ingress:
  - ports:
    - {protocol: ICMP, port: 1}
";

#[tokio::test]
async fn kubectl_server_side_dry_run() -> Result<()> {
    let api = KubeApiServer::start()?;
    let good = api.dir().join("good.yaml");
    let bad = api.dir().join("bad.yaml");
    fs::write(&good, MANIFESTS)?;
    fs::write(&bad, INVALID)?;
    let namespace_manifest =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/namespace.yaml");

    for file in [&good, &namespace_manifest] {
        let out = run(api
            .kubectl()
            .args(["apply", "--dry-run=server", "-f"])
            .arg(file))?;
        assert!(
            out.status.success(),
            "kubectl apply --dry-run=server -f {}: {}",
            file.display(),
            text(&out)
        );
        assert!(text(&out).contains("(server dry run)"), "{}", text(&out));
    }
    let out = run(api
        .kubectl()
        .args(["apply", "--dry-run=server", "-f"])
        .arg(&bad))?;
    assert!(
        !out.status.success(),
        "an ICMP NetworkPolicy port passed server validation"
    );
    assert!(text(&out).contains("Unsupported value"), "{}", text(&out));

    // A dry run stores nothing.
    let client = api.client()?;
    assert!(
        Api::<Namespace>::all(client.clone())
            .get_opt("dry-run-shop")
            .await?
            .is_none()
    );
    assert!(
        Api::<NetworkPolicy>::namespaced(client, "default")
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
    );
    Ok(())
}

fn run(command: &mut std::process::Command) -> Result<Output> {
    command.output().with_context(|| {
        format!(
            "running {:?} (kubectl comes with `cargo xtask setup`: Debian kubernetes-client; PALISADE_KUBECTL overrides)",
            command.get_program()
        )
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
