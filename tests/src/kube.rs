//! A real Kubernetes API server for tests: etcd and the kube-apiserver that
//! `cargo xtask setup` builds from Debian's sources, on loopback, free ports,
//! TLS with a CA made at start, static tokens and RBAC authorization.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use palisade_tests::kube::KubeApiServer;
//! let api = KubeApiServer::start()?;
//! let client = api.client()?; // needs a tokio runtime, like every kube::Client
//! let status = api.kubectl().arg("get").arg("namespaces").status()?;
//! # Ok(()) }
//! ```
//!
//! The server is Kubernetes 1.20 (what Debian 12 ships): it has no
//! NetworkPolicy `endPort` (the field is dropped on write) and does not add
//! the `kubernetes.io/metadata.name` label to namespaces, so tests set that
//! label themselves. ServiceAccount admission is disabled and there is no
//! controller-manager or scheduler: Pods are created with `spec.nodeName`
//! set and their `status` is written by the test (status subresource).
//!
//! Environment: `PALISADE_KUBE_APISERVER` and `PALISADE_ETCD` override the
//! binaries, `PALISADE_KUBECTL` the kubectl that [`KubeApiServer::kubectl`]
//! runs, and `PALISADE_KUBE_KEEP=1` keeps the state directory (logs,
//! certificates, kubeconfigs) after the test.

use std::{
    collections::BTreeMap,
    env,
    ffi::OsString,
    fmt::Write as _,
    fs::{self, File},
    future::Future,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, ServiceAccount},
};
use kube::api::{Api, ObjectMeta, PostParams};

/// The user with every right (group `system:masters`).
pub const ADMIN_USER: &str = "palisade-admin";
/// A user with no rights beyond what every authenticated user has: bind a
/// (Cluster)Role to it to test least privilege.
pub const LEAST_PRIVILEGE_USER: &str = "palisade-user";

/// How long etcd and the API server get to become ready (the API server
/// needs about 7 s on 2 cores; CI machines may be slower and busier).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Attempts with fresh ports when a process exits early (a port taken
/// between our probe and its bind).
const ATTEMPTS: u32 = 3;

/// A running etcd + kube-apiserver pair, stopped (and its state removed) on drop.
pub struct KubeApiServer {
    url: String,
    ca_pem: String,
    ca_der: Vec<u8>,
    /// Static users: name -> token.
    tokens: BTreeMap<String, String>,
    kubeconfig: PathBuf,
    apiserver: Child,
    etcd: Child,
    dir: Option<tempfile::TempDir>,
}

/// The kube-apiserver binary: `PALISADE_KUBE_APISERVER`, else the one
/// `cargo xtask setup` cached (`$XDG_CACHE_HOME/palisade/kube-apiserver/current/`,
/// default `~/.cache/palisade/...`).
pub fn kube_apiserver_binary() -> Result<PathBuf> {
    if let Some(path) = env::var_os("PALISADE_KUBE_APISERVER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("PALISADE_KUBE_APISERVER={} is not a file", path.display());
        }
        return Ok(path);
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .ok_or_else(|| {
            anyhow!("neither XDG_CACHE_HOME nor HOME is set: cannot find the cached kube-apiserver")
        })?;
    let path = cache.join("palisade/kube-apiserver/current/kube-apiserver");
    if !path.is_file() {
        bail!(
            "no kube-apiserver at {}: run `cargo xtask setup` (as root; it builds one from Debian's sources, \
             5-10 minutes) or set PALISADE_KUBE_APISERVER",
            path.display()
        );
    }
    Ok(path)
}

/// etcd: `PALISADE_ETCD`, else `etcd` on PATH or in /usr/bin (Debian etcd-server).
pub fn etcd_binary() -> Result<PathBuf> {
    if let Some(path) = env::var_os("PALISADE_ETCD").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    find_program("etcd").ok_or_else(|| {
        anyhow!(
            "etcd not found: run `cargo xtask setup` (as root; it installs Debian's etcd-server)"
        )
    })
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl KubeApiServer {
    /// Starts etcd and the API server with the two standard users
    /// ([`ADMIN_USER`], [`LEAST_PRIVILEGE_USER`]) and waits until the server
    /// is ready (`/readyz`, and the `default` namespace exists).
    pub fn start() -> Result<Self> {
        Self::start_with_users(&[])
    }

    /// Like [`start`](Self::start), with further token users (no groups, no
    /// rights until a role is bound to them).
    pub fn start_with_users(users: &[&str]) -> Result<Self> {
        Self::start_as(users, false)
    }

    /// Like [`start`](Self::start), with etcd and the API server in a
    /// process group of their own and killed if the calling thread ends: a
    /// terminal's Ctrl-C (SIGINT to the foreground process group) reaches
    /// the caller alone, which can still use the server while it tears
    /// down. Call it from a thread that lives as long as the server should
    /// (e.g. the main thread).
    pub fn start_detached() -> Result<Self> {
        Self::start_as(&[], true)
    }

    fn start_as(users: &[&str], detached: bool) -> Result<Self> {
        let apiserver = kube_apiserver_binary()?;
        let etcd = etcd_binary()?;
        let mut last = None;
        for attempt in 1..=ATTEMPTS {
            match Self::try_start(&apiserver, &etcd, users, detached) {
                Ok(server) => return Ok(server),
                Err(StartError::Retry(err)) if attempt < ATTEMPTS => {
                    eprintln!(
                        "kube fixture: attempt {attempt} failed ({err:#}); retrying with fresh ports"
                    );
                    last = Some(err);
                }
                Err(StartError::Retry(err) | StartError::Fatal(err)) => return Err(err),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no attempt made")))
    }

    fn try_start(
        apiserver: &Path,
        etcd: &Path,
        users: &[&str],
        detached: bool,
    ) -> Result<Self, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("palisade-kube-")
            .tempdir()
            .context("creating the state directory")
            .map_err(StartError::Fatal)?;
        let path = dir.path().to_owned();
        let [etcd_port, peer_port, api_port] = free_ports().map_err(StartError::Fatal)?;

        // Certificates: a CA, the server's certificate, the service-account key.
        let certs = Certificates::generate().map_err(StartError::Fatal)?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let file = path.join(name);
            fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
            Ok(file)
        };
        let ca_file = write("ca.crt", &certs.ca_pem).map_err(StartError::Fatal)?;
        let cert_file = write("apiserver.crt", &certs.server_pem).map_err(StartError::Fatal)?;
        let key_file = write("apiserver.key", &certs.server_key_pem).map_err(StartError::Fatal)?;
        let sa_key_file = write("sa.key", &certs.sa_key_pem).map_err(StartError::Fatal)?;
        let sa_pub_file = write("sa.pub", &certs.sa_pub_pem).map_err(StartError::Fatal)?;

        // Static tokens: `token,user,uid,"group,..."`.
        let mut tokens = BTreeMap::new();
        let mut token_csv = String::new();
        let standard = [(ADMIN_USER, "system:masters"), (LEAST_PRIVILEGE_USER, "")];
        let extra = users.iter().map(|user| (*user, ""));
        for (index, (user, groups)) in standard.into_iter().chain(extra).enumerate() {
            if user.contains([',', '"', '\n']) {
                return Err(StartError::Fatal(anyhow!(
                    "user name {user:?} cannot go into a token file"
                )));
            }
            let token = random_token().map_err(StartError::Fatal)?;
            let _ = writeln!(token_csv, "{token},{user},uid-{index},\"{groups}\"");
            tokens.insert(user.to_owned(), token);
        }
        let token_file = write("tokens.csv", &token_csv).map_err(StartError::Fatal)?;

        let etcd_dir = path.join("etcd");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_child = spawn_logged(
            Command::new(etcd)
                .arg("--name=palisade")
                .arg(flag("--data-dir", &etcd_dir))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=palisade={peer_url}"))
                .arg("--initial-cluster-state=new")
                .arg("--logger=zap")
                .arg("--log-outputs=stderr")
                // A test's data is small; etcd's default quota is 2 GiB.
                .arg("--quota-backend-bytes=268435456"),
            &path.join("etcd.log"),
            detached,
        )
        .map_err(StartError::Fatal)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        if let Err(err) = wait_etcd(&mut etcd_child, etcd_port, deadline, &path.join("etcd.log")) {
            stop(&mut etcd_child);
            return Err(StartError::Retry(err));
        }

        let url = format!("https://127.0.0.1:{api_port}");
        let apiserver_log = path.join("kube-apiserver.log");
        let apiserver_child = match spawn_logged(
            Command::new(apiserver)
                .arg(format!("--etcd-servers={etcd_url}"))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--secure-port={api_port}"))
                // 1.20 still opens an insecure port (8080) unless told not to.
                .arg("--insecure-port=0")
                .arg(flag("--cert-dir", &path.join("certs")))
                .arg(flag("--tls-cert-file", &cert_file))
                .arg(flag("--tls-private-key-file", &key_file))
                .arg(flag("--token-auth-file", &token_file))
                .arg("--authorization-mode=RBAC")
                // As kubeadm, kind and managed clusters run it: the agent's
                // DaemonSet is privileged.
                .arg("--allow-privileged=true")
                // No controller-manager mints service-account tokens.
                .arg("--disable-admission-plugins=ServiceAccount")
                .arg(flag("--service-account-key-file", &sa_pub_file))
                .arg(flag("--service-account-signing-key-file", &sa_key_file))
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg("--service-cluster-ip-range=10.96.0.0/16")
                // The `kubernetes` Service's endpoints would be a loopback
                // address, which validation rejects: leave them out.
                .arg("--endpoint-reconciler-type=none")
                .arg("--profiling=false"),
            &apiserver_log,
            detached,
        ) {
            Ok(child) => child,
            Err(err) => {
                stop(&mut etcd_child);
                return Err(StartError::Fatal(err));
            }
        };

        let kubeconfig = path.join("kubeconfig");
        let mut server = Self {
            url,
            ca_pem: certs.ca_pem,
            ca_der: certs.ca_der,
            tokens,
            kubeconfig: kubeconfig.clone(),
            apiserver: apiserver_child,
            etcd: etcd_child,
            dir: Some(dir),
        };
        let admin = server.tokens[ADMIN_USER].clone();
        write_kubeconfig(&kubeconfig, &server.url, &ca_file, ADMIN_USER, &admin)
            .map_err(StartError::Fatal)?;
        if let Err(err) = server.wait_ready(deadline) {
            let err = err.context(format!(
                "kube-apiserver did not become ready; its log ends with:\n{}",
                log_tail(&apiserver_log)
            ));
            // Drop stops both processes.
            return Err(if server.apiserver_exited() {
                StartError::Retry(err)
            } else {
                StartError::Fatal(err)
            });
        }
        Ok(server)
    }

    fn apiserver_exited(&mut self) -> bool {
        matches!(self.apiserver.try_wait(), Ok(Some(_)))
    }

    /// Polls `/readyz` (then the `default` namespace, which a post-start
    /// controller creates) until `deadline`.
    fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if let Ok(Some(status)) = self.apiserver.try_wait() {
                bail!("kube-apiserver exited ({status}) while starting");
            }
            let probe = block_on(async {
                let client = self.client_as(ADMIN_USER)?;
                let ready = client
                    .request_text(http_get("/readyz?verbose")?)
                    .await
                    .map_err(|e| anyhow!("/readyz: {e}"))?;
                Api::<Namespace>::all(client)
                    .get("default")
                    .await
                    .map_err(|e| anyhow!("namespace default: {e}"))?;
                anyhow::Ok(ready)
            });
            let last = match probe {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                bail!(
                    "not ready after {}s at {} (last: {last:#})",
                    READY_TIMEOUT.as_secs(),
                    self.url
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA file the kubeconfigs point at.
    pub fn ca_path(&self) -> PathBuf {
        self.dir().join("ca.crt")
    }

    /// The token of [`ADMIN_USER`] (group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.tokens[ADMIN_USER]
    }

    /// The state directory (logs, certificates, kubeconfigs), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// A kubeconfig for [`ADMIN_USER`], for kubectl and the agent.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A token for `user`: one of the static users ([`ADMIN_USER`],
    /// [`LEAST_PRIVILEGE_USER`], those given to
    /// [`start_with_users`](Self::start_with_users)), or a service account
    /// `system:serviceaccount:<namespace>:<name>`, which is created if needed
    /// (with its namespace) and given a token through the TokenRequest API.
    pub fn token_for(&self, user: &str) -> Result<String> {
        if let Some(token) = self.tokens.get(user) {
            return Ok(token.clone());
        }
        if let Some(rest) = user.strip_prefix("system:serviceaccount:") {
            let (namespace, name) = rest.split_once(':').ok_or_else(|| {
                anyhow!("{user:?}: expected system:serviceaccount:<namespace>:<name>")
            })?;
            return self.service_account_token(namespace, name);
        }
        bail!(
            "no token for user {user:?}: the static users are {:?} (more with KubeApiServer::start_with_users), \
             or name a service account as system:serviceaccount:<namespace>:<name>",
            self.tokens.keys().collect::<Vec<_>>()
        )
    }

    fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        block_on(async {
            let client = self.client_as(ADMIN_USER)?;
            let pp = PostParams::default();
            let namespaces = Api::<Namespace>::all(client.clone());
            if namespaces.get_opt(namespace).await?.is_none() {
                let mut ns = Namespace {
                    metadata: ObjectMeta {
                        name: Some(namespace.to_owned()),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                };
                ns.metadata.labels = Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_owned(),
                    namespace.to_owned(),
                )]));
                create_or_exists(namespaces.create(&pp, &ns).await)?;
            }
            let accounts = Api::<ServiceAccount>::namespaced(client, namespace);
            if accounts.get_opt(name).await?.is_none() {
                let sa = ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        ..ObjectMeta::default()
                    },
                    ..ServiceAccount::default()
                };
                create_or_exists(accounts.create(&pp, &sa).await)?;
            }
            let request = TokenRequest {
                spec: Some(TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..TokenRequestSpec::default()
                }),
                ..TokenRequest::default()
            };
            let response = accounts
                .create_token_request(name, &pp, &request)
                .await
                .with_context(|| format!("TokenRequest for {namespace}/{name}"))?;
            response
                .status
                .and_then(|status| status.token)
                .ok_or_else(|| anyhow!("TokenRequest for {namespace}/{name} returned no token"))
        })
    }

    /// A kube client as [`ADMIN_USER`]. Like every `kube::Client`, it must be
    /// made and used inside a tokio runtime.
    pub fn client(&self) -> Result<kube::Client> {
        self.client_as(ADMIN_USER)
    }

    /// A kube client as `user` (see [`token_for`](Self::token_for)).
    pub fn client_as(&self, user: &str) -> Result<kube::Client> {
        let token = self.token_for(user)?;
        self.client_with_token(&token)
    }

    /// A kube client that authenticates with `token`.
    pub fn client_with_token(&self, token: &str) -> Result<kube::Client> {
        let mut config = kube::Config::new(self.url.parse().context("the server URL")?);
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config.auth_info.token = Some(secrecy::SecretString::from(token.to_owned()));
        config.read_timeout = Some(Duration::from_secs(60));
        kube::Client::try_from(config).context("building a kube client")
    }

    /// Writes a kubeconfig for `user` into the state directory and returns its path.
    pub fn kubeconfig_for(&self, user: &str) -> Result<PathBuf> {
        let token = self.token_for(user)?;
        let file_name: String = user
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.dir().join(format!("kubeconfig-{file_name}"));
        write_kubeconfig(&path, &self.url, &self.ca_path(), user, &token)?;
        Ok(path)
    }

    /// `kubectl --kubeconfig <admin kubeconfig>`: `PALISADE_KUBECTL` or `kubectl` on PATH.
    pub fn kubectl(&self) -> Command {
        self.kubectl_with(&self.kubeconfig)
    }

    /// `kubectl --kubeconfig <kubeconfig>` (e.g. from [`kubeconfig_for`](Self::kubeconfig_for)).
    pub fn kubectl_with(&self, kubeconfig: &Path) -> Command {
        let program = env::var_os("PALISADE_KUBECTL")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| OsString::from("kubectl"));
        let mut command = Command::new(program);
        command.arg("--kubeconfig").arg(kubeconfig);
        command
    }
}

/// The agent's identity, as `manifests/rbac.yaml` binds it.
pub const AGENT_USER: &str = "system:serviceaccount:palisade-system:palisade-agent";

/// How long a new role binding may take to be in effect.
const RBAC_TIMEOUT: Duration = Duration::from_secs(30);

impl KubeApiServer {
    /// Applies the agent's `manifests/namespace.yaml` and `manifests/rbac.yaml`
    /// with kubectl: its namespace, ServiceAccount ([`AGENT_USER`]) and
    /// least-privilege ClusterRole.
    pub fn apply_agent_manifests(&self) -> Result<()> {
        let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
        let out = self
            .kubectl()
            .arg("apply")
            .arg("-f")
            .arg(manifests.join("namespace.yaml"))
            .arg("-f")
            .arg(manifests.join("rbac.yaml"))
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl apply of the agent's manifests: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A kubeconfig for the agent's ServiceAccount, once its role (see
    /// [`apply_agent_manifests`](Self::apply_agent_manifests)) is in effect.
    pub fn agent_kubeconfig(&self) -> Result<PathBuf> {
        let path = self.kubeconfig_for(AGENT_USER)?;
        block_on(async {
            let client = self.client_as(AGENT_USER)?;
            wait_for_agent_rbac(&client).await
        })?;
        Ok(path)
    }
}

/// Waits until `client` (the agent's identity) may list what the agent
/// watches: the authorizer's cache lags behind a new binding.
pub async fn wait_for_agent_rbac(client: &kube::Client) -> Result<()> {
    use k8s_openapi::api::core::v1::{Node, Pod};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::api::ListParams;
    let deadline = Instant::now() + RBAC_TIMEOUT;
    let probe = ListParams::default().limit(1);
    loop {
        let pods = Api::<Pod>::all(client.clone()).list(&probe).await;
        let policies = Api::<NetworkPolicy>::all(client.clone()).list(&probe).await;
        let namespaces = Api::<Namespace>::all(client.clone()).list(&probe).await;
        let nodes = Api::<Node>::all(client.clone()).list(&probe).await;
        if pods.is_ok() && policies.is_ok() && namespaces.is_ok() && nodes.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent's role is not in effect after {RBAC_TIMEOUT:?}: pods {:?}, networkpolicies {:?}, namespaces {:?}, nodes {:?}",
                pods.err(),
                policies.err(),
                namespaces.err(),
                nodes.err()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes a namespace the way the namespace controller (which this fixture
/// does not run) would finish it: delete, empty its finalizers, delete
/// again. Its contents must be deleted first: nothing else will.
pub async fn delete_namespace(client: &kube::Client, name: &str) -> Result<()> {
    use kube::api::DeleteParams;
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces.delete(name, &DeleteParams::default()).await?;
    let Some(mut ns) = namespaces.get_opt(name).await? else {
        return Ok(());
    };
    if let Some(spec) = ns.spec.as_mut() {
        spec.finalizers = Some(Vec::new());
    }
    let request = http::Request::put(format!("/api/v1/namespaces/{name}/finalize"))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&ns)?)?;
    client.request::<Namespace>(request).await?;
    if namespaces.get_opt(name).await?.is_some() {
        let _ = namespaces.delete(name, &DeleteParams::default()).await;
    }
    Ok(())
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        stop(&mut self.apiserver);
        stop(&mut self.etcd);
        if let Some(dir) = self.dir.take()
            && env::var_os("PALISADE_KUBE_KEEP").is_some_and(|v| v == "1")
        {
            eprintln!("kube fixture: keeping {}", dir.keep().display());
        }
    }
}

enum StartError {
    /// Worth another try with fresh ports.
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(err: anyhow::Error) -> Self {
        Self::Fatal(err)
    }
}

fn flag(name: &str, path: &Path) -> OsString {
    let mut arg = OsString::from(name);
    arg.push("=");
    arg.push(path);
    arg
}

/// Three distinct free loopback ports (bound, read, released).
fn free_ports() -> Result<[u16; 3]> {
    let listeners = [(); 3].map(|()| TcpListener::bind("127.0.0.1:0"));
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(listeners) {
        *port = listener
            .and_then(|l| l.local_addr())
            .context("finding a free port on 127.0.0.1")?
            .port();
    }
    Ok(ports)
}

fn spawn_logged(command: &mut Command, log: &Path, detached: bool) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    if detached {
        crate::child::detach_until_spawner_exits(command);
    }
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls etcd's `/health` until it reports healthy or `deadline` passes.
fn wait_etcd(child: &mut Child, port: u16, deadline: Instant, log: &Path) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "etcd exited ({status}) while starting; its log ends with:\n{}",
                log_tail(log)
            );
        }
        if http_health(addr).unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "etcd not healthy on {addr} after {}s; its log ends with:\n{}",
                READY_TIMEOUT.as_secs(),
                log_tail(log)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /health` over plain HTTP/1.0: whether etcd says `"health":"true"`.
fn http_health(addr: SocketAddr) -> Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.starts_with("HTTP/1.") && answer.contains("\"health\":\"true\""))
}

fn http_get(path: &str) -> Result<http::Request<Vec<u8>>> {
    http::Request::get(path)
        .body(Vec::new())
        .context("building a request")
}

/// The last lines of a log file, for error messages.
fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Runs a future to completion on a fresh current-thread runtime in a helper
/// thread, so that the synchronous fixture works inside and outside tokio.
fn block_on<T: Send>(future: impl Future<Output = Result<T>> + Send) -> Result<T> {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building a tokio runtime")?
                    .block_on(future)
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the fixture's helper thread panicked")))
    })
}

fn create_or_exists<T>(result: kube::Result<T>) -> Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// 32 random hex characters from the kernel.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

fn write_kubeconfig(path: &Path, url: &str, ca: &Path, user: &str, token: &str) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "palisade-test",
            "cluster": { "server": url, "certificate-authority": ca },
        }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{
            "name": "palisade-test",
            "context": { "cluster": "palisade-test", "user": user, "namespace": "default" },
        }],
        "current-context": "palisade-test",
    });
    let text = serde_yaml_ng::to_string(&config).context("serializing a kubeconfig")?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// What TLS and service-account tokens need, made fresh for each server.
struct Certificates {
    ca_pem: String,
    ca_der: Vec<u8>,
    server_pem: String,
    server_key_pem: String,
    sa_key_pem: String,
    sa_pub_pem: String,
}

impl Certificates {
    fn generate() -> Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "palisade-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let server_key = KeyPair::generate()?;
        let mut server_params = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        server_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = server_params.signed_by(&server_key, &ca)?;

        let sa_key = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            server_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
        })
    }
}
