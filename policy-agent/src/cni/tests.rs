//! The commands against a scripted agent (a real gRPC server on a unix
//! socket answering what a test tells it to): the agent's failures each
//! reach the runtime as their own CNI error. ADD needs a veth pair in
//! network namespaces: those tests run as root only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};

use crate::api::proto::{self, endpoints_server, status_server};
use crate::cni::plugin::{Outcome, run};

/// What the scripted agent answers.
#[derive(Clone, Debug)]
struct Script {
    register: Result<u64, Code>,
    wait: Result<u64, (Code, &'static str)>,
    /// Unregister by container id; absent: found.
    unregister: HashMap<String, Code>,
    endpoints: Vec<proto::Endpoint>,
    status: proto::AgentStatus,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            register: Ok(7),
            wait: Ok(7),
            unregister: HashMap::new(),
            endpoints: Vec::new(),
            status: proto::AgentStatus {
                ready: true,
                enforced_revision: 7,
                ..proto::AgentStatus::default()
            },
        }
    }
}

#[derive(Clone)]
struct Scripted {
    script: Arc<Script>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

#[tonic::async_trait]
impl endpoints_server::Endpoints for Scripted {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let r = request.into_inner();
        self.log(format!(
            "register {} {}/{} {} {:?}",
            r.container_id, r.namespace, r.pod_name, r.host_interface, r.ips
        ));
        match self.script.register {
            Ok(revision) => Ok(Response::new(proto::RegisterResponse {
                endpoint: None,
                revision,
            })),
            Err(code) => Err(Status::new(code, "scripted refusal")),
        }
    }

    async fn unregister(
        &self,
        request: Request<proto::UnregisterRequest>,
    ) -> Result<Response<proto::UnregisterResponse>, Status> {
        let id = request.into_inner().container_id;
        self.log(format!("unregister {id}"));
        match self.script.unregister.get(&id) {
            Some(code) => Err(Status::new(*code, "scripted failure")),
            None => Ok(Response::new(proto::UnregisterResponse {
                found: true,
                revision: 8,
                connections_flushed: 0,
            })),
        }
    }

    async fn list(
        &self,
        _request: Request<proto::ListEndpointsRequest>,
    ) -> Result<Response<proto::ListEndpointsResponse>, Status> {
        Ok(Response::new(proto::ListEndpointsResponse {
            endpoints: self.script.endpoints.clone(),
        }))
    }
}

#[tonic::async_trait]
impl status_server::Status for Scripted {
    async fn get(
        &self,
        _request: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::AgentStatus>, Status> {
        Ok(Response::new(self.script.status.clone()))
    }

    async fn wait_enforced(
        &self,
        request: Request<proto::WaitEnforcedRequest>,
    ) -> Result<Response<proto::WaitEnforcedResponse>, Status> {
        let r = request.into_inner();
        self.log(format!("wait {} {}", r.container_id, r.revision));
        match self.script.wait {
            Ok(enforced_revision) => Ok(Response::new(proto::WaitEnforcedResponse {
                enforced_revision,
            })),
            Err((code, message)) => Err(Status::new(code, message)),
        }
    }

    async fn sync(
        &self,
        _request: Request<proto::SyncRequest>,
    ) -> Result<Response<proto::SyncResponse>, Status> {
        Ok(Response::new(proto::SyncResponse { revision: 7 }))
    }
}

/// The scripted agent, serving on its own thread until dropped.
struct FakeAgent {
    dir: PathBuf,
    socket: PathBuf,
    calls: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "pcni-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl FakeAgent {
    fn start(script: Script) -> Self {
        let dir = std::env::temp_dir().join(unique("agent"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let api = Scripted {
            script: Arc::new(script),
            calls: calls.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = socket.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&path).unwrap();
                ready_tx.send(()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(endpoints_server::EndpointsServer::new(api.clone()))
                    .add_service(status_server::StatusServer::new(api))
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        ready_rx.recv().unwrap();
        Self {
            dir,
            socket,
            calls,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn invoke(env: &[(&str, &str)], stdin: &Value) -> Outcome {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    run(|k| env.get(k).cloned(), Ok(stdin.to_string().into_bytes()))
}

fn code(outcome: &Outcome) -> u64 {
    assert!(!outcome.success, "{outcome:?}");
    let error: Value = serde_json::from_str(&outcome.stdout).unwrap();
    error["code"].as_u64().unwrap()
}

fn conf(agent: &FakeAgent, version: &str) -> Value {
    json!({"cniVersion": version, "name": "net", "type": "palisade-cni",
           "socket": agent.socket, "timeoutSeconds": 2})
}

fn endpoint(id: &str) -> proto::Endpoint {
    proto::Endpoint {
        container_id: id.into(),
        namespace: "ns".into(),
        pod_name: id.into(),
        host_interface: format!("veth{id}"),
        ..proto::Endpoint::default()
    }
}

#[test]
fn status_reports_readiness() {
    let ready = FakeAgent::start(Script::default());
    let out = invoke(&[("CNI_COMMAND", "STATUS")], &conf(&ready, "1.1.0"));
    assert!(out.success && out.stdout.is_empty(), "{out:?}");

    let mut script = Script::default();
    script.status.ready = false;
    script.status.waiting_for = vec!["Pod".into(), "node addresses".into()];
    let waiting = FakeAgent::start(script);
    let out = invoke(&[("CNI_COMMAND", "STATUS")], &conf(&waiting, "1.1.0"));
    assert_eq!(code(&out), 50);
    assert!(
        out.stdout.contains("waiting for Pod, node addresses"),
        "{}",
        out.stdout
    );

    let mut script = Script::default();
    script.status.failed_revision = 9;
    script.status.last_error = "PALISADE_POLICY is full".into();
    let failing = FakeAgent::start(script);
    let out = invoke(&[("CNI_COMMAND", "STATUS")], &conf(&failing, "1.1.0"));
    assert_eq!(code(&out), 51);
    assert!(out.stdout.contains("is full"), "{}", out.stdout);
}

#[test]
fn gc_removes_only_stale_endpoints_and_reports_failures() {
    let script = Script {
        endpoints: vec![endpoint("keep"), endpoint("gone"), endpoint("stuck")],
        unregister: HashMap::from([("stuck".to_owned(), Code::Internal)]),
        ..Script::default()
    };
    let agent = FakeAgent::start(script);
    let mut request = conf(&agent, "1.1.0");
    request["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let out = invoke(&[("CNI_COMMAND", "GC")], &request);
    assert_eq!(code(&out), 107);
    assert!(out.stdout.contains("stuck"), "{}", out.stdout);
    assert_eq!(agent.calls(), ["unregister gone", "unregister stuck"]);
    assert!(
        out.notes
            .iter()
            .any(|n| n.contains("gone (ns/gone on vethgone)")),
        "{:?}",
        out.notes
    );
}

#[test]
fn del_fails_only_when_the_agent_fails() {
    let script = Script {
        unregister: HashMap::from([
            ("broken".to_owned(), Code::Internal),
            ("stopping".to_owned(), Code::Unavailable),
        ]),
        ..Script::default()
    };
    let agent = FakeAgent::start(script);
    let del = |id: &str| {
        invoke(
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", "eth0"),
            ],
            &conf(&agent, "1.0.0"),
        )
    };
    assert!(del("fine").success);
    assert!(del("stopping").success, "an agent that is stopping is down");
    assert_eq!(code(&del("broken")), 107);
}

/// A node namespace and a pod namespace joined by a veth (root only).
struct VethPair {
    node: String,
    pod: String,
}

impl VethPair {
    fn create() -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return None;
        }
        let pair = Self {
            node: unique("node"),
            pod: unique("pod"),
        };
        let ip = |args: &[&str]| {
            let ok = Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {args:?}");
        };
        ip(&["netns", "add", &pair.node]);
        ip(&["netns", "add", &pair.pod]);
        ip(&[
            "-n", &pair.node, "link", "add", "host0", "type", "veth", "peer", "name", "eth0",
            "netns", &pair.pod,
        ]);
        Some(pair)
    }

    fn pod_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.pod)
    }

    /// ADD run from the node's namespace.
    fn add(&self, agent: &FakeAgent) -> Outcome {
        let mut request = conf(agent, "1.0.0");
        request["prevResult"] = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "host0"}, {"name": "eth0", "sandbox": self.pod_path()}],
            "ips": [{"interface": 1, "address": "10.9.0.5/24"}],
        });
        let netns = std::fs::File::open(Path::new("/run/netns").join(&self.node)).unwrap();
        let pod = self.pod_path().display().to_string();
        crate::cni::link::in_netns(&netns, Path::new(&self.node), || {
            invoke(
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "c1"),
                    ("CNI_NETNS", &pod),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"),
                ],
                &request,
            )
        })
        .unwrap()
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn add_registers_then_waits() {
    let Some(pair) = VethPair::create() else {
        return;
    };
    let agent = FakeAgent::start(Script::default());
    let out = pair.add(&agent);
    assert!(out.success, "{out:?}");
    let result: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(result["interfaces"][0]["name"], "host0");
    assert_eq!(
        agent.calls(),
        ["register c1 shop/web host0 [\"10.9.0.5\"]", "wait c1 7"]
    );
}

#[test]
fn add_fails_with_the_agents_reason() {
    let Some(pair) = VethPair::create() else {
        return;
    };
    let cases = [
        (
            Script {
                register: Err(Code::NotFound),
                ..Script::default()
            },
            103,
            "refused the endpoint on host0",
        ),
        (
            Script {
                wait: Err((
                    Code::DeadlineExceeded,
                    "waiting for Pod from the kube source",
                )),
                ..Script::default()
            },
            11,
            "did not confirm the pod's network policy within",
        ),
        (
            Script {
                wait: Err((Code::FailedPrecondition, "PALISADE_POLICY is full")),
                ..Script::default()
            },
            104,
            "PALISADE_POLICY is full",
        ),
        (
            Script {
                register: Err(Code::Unavailable),
                ..Script::default()
            },
            11,
            "not reachable",
        ),
    ];
    for (script, expected, text) in cases {
        let agent = FakeAgent::start(script);
        let out = pair.add(&agent);
        assert_eq!(code(&out), expected, "{out:?}");
        assert!(out.stdout.contains(text), "{text:?} not in {}", out.stdout);
    }
}
