//! Running the real `policy-agent` binary in tests.
//!
//! * [`binary`] builds it once per test process (`cargo build -p
//!   policy-agent`, the same profile as the tests) and returns its path;
//!   `PALISADE_AGENT_BIN` overrides it.
//! * [`AgentDirs`]: a test's own manifest directory, state directory,
//!   socket (under /tmp) and pin directory (under /sys/fs/bpf), removed on
//!   drop (removing the pins detaches the links).
//! * [`Agent`]: the agent process, run inside a topology's node namespace
//!   (entered with `setns` before exec, so it shares the test's mounts and
//!   bpffs), logging to a file; killed with SIGKILL on drop. It reads the
//!   manifest directory (`--source files`, the default) or a Kubernetes API
//!   server ([`AgentSource::Kube`]).
//! * [`manifest`]: YAML for namespaces, pods and policies.
//! * [`dump_pinned_maps`]: the verdict maps as bpftool reads them, to
//!   compare what two agents programmed.
//!
//! Set `PALISADE_KEEP_AGENT_LOGS=DIR` to keep every agent's log in DIR, and
//! `PALISADE_AGENT_LOG` to the agent's `RUST_LOG` (default
//! `info,policy_agent=debug`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
pub use policy_agent::api::client::{Client, ClientError, Code};
pub use policy_agent::api::proto;

/// The `policy-agent` binary, built on first use.
pub fn binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            crate::workspace_bin::build("policy-agent", "PALISADE_AGENT_BIN")
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!("building policy-agent: {e}"))
}

/// The directories and socket of one test's agent.
#[derive(Debug)]
pub struct AgentDirs {
    pub root: PathBuf,
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
}

impl AgentDirs {
    /// Fresh directories tagged `tag` (unique per test).
    pub fn new(tag: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let unique = format!(
            "palisade-agent-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let root = std::env::temp_dir().join(&unique);
        let pin_dir = Path::new("/sys/fs/bpf").join(&unique);
        for dir in [&root, &pin_dir] {
            let _ = std::fs::remove_dir_all(dir);
        }
        let manifests = root.join("manifests");
        std::fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        Ok(Self {
            state: root.join("state"),
            socket: root.join("run").join("agent.sock"),
            log: root.join("agent.log"),
            manifests,
            pin_dir,
            root,
        })
    }

    /// Writes manifest `name` atomically; see [`write_manifest`].
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        write_manifest(&self.manifests, name, text)
    }

    /// Removes manifest `name`.
    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        remove_manifest(&self.manifests, name)
    }
}

/// Writes manifest `name` into `dir` atomically (a hidden temporary file
/// renamed), so the agent never reads half a file.
pub fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming to {name}"))
}

/// Removes manifest `name` of `dir`.
pub fn remove_manifest(dir: &Path, name: &str) -> Result<()> {
    std::fs::remove_file(dir.join(name)).with_context(|| format!("removing {name}"))
}

impl Drop for AgentDirs {
    fn drop(&mut self) {
        if let Some(keep) = std::env::var_os("PALISADE_KEEP_AGENT_LOGS") {
            let name = self.root.file_name().unwrap_or_default().to_owned();
            let _ = std::fs::copy(&self.log, Path::new(&keep).join(name).with_extension("log"));
        }
        for dir in [&self.pin_dir, &self.root] {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("palisade-tests: removing {}: {e}", dir.display());
            }
        }
    }
}

/// How the agent is run.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node_name: String,
    /// The node's addresses (files source only).
    pub node_ips: Vec<IpAddr>,
    /// The network namespace to run it in (the topology's node namespace).
    pub netns: Option<PathBuf>,
    /// How long to wait for its socket.
    pub start_timeout: Duration,
}

impl AgentOptions {
    /// The agent of a harness topology: in its node namespace, the node's
    /// addresses those of the pods' gateway.
    pub fn in_topology(node_name: &str, topology: &crate::netns::Topology) -> Self {
        Self {
            node_name: node_name.to_owned(),
            node_ips: vec![
                IpAddr::V4(crate::netns::GATEWAY_V4),
                IpAddr::V6(crate::netns::GATEWAY_V6),
            ],
            netns: Some(topology.node_ns().path().to_owned()),
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// Registers the harness pod `pod` as `namespace/name` (its IPv4 address),
/// as the CNI plugin would, and waits until the agent enforces it.
pub fn register_and_wait(
    client: &mut Client,
    namespace: &str,
    name: &str,
    container_id: &str,
    pod: &crate::netns::Pod,
    timeout: Duration,
) -> Result<proto::RegisterResponse> {
    let done = client
        .register(proto::RegisterRequest {
            namespace: namespace.to_owned(),
            pod_name: name.to_owned(),
            container_id: container_id.to_owned(),
            netns_path: pod.netns.path().display().to_string(),
            host_interface: pod.host_ifname.clone(),
            ips: vec![pod.ip4.to_string()],
        })
        .map_err(|e| anyhow!("registering {namespace}/{name}: {e}"))?;
    client
        .wait_enforced(Some(container_id), done.revision, timeout)
        .map_err(|e| anyhow!("waiting for {namespace}/{name} to be enforced: {e}"))?;
    Ok(done)
}

/// Where the agent reads the cluster from.
#[derive(Clone, Copy, Debug)]
pub enum AgentSource<'a> {
    /// `--source files`: the manifest directory of its [`AgentDirs`], and
    /// `--node-ip` for each of [`AgentOptions::node_ips`].
    Files,
    /// `--source kube`, with `KUBECONFIG` set to this file; the node's
    /// addresses come from its Node object.
    Kube { kubeconfig: &'a Path },
}

/// A running `policy-agent run`.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
    socket: PathBuf,
}

impl Agent {
    /// Starts the agent on `dirs` and waits until its API answers.
    pub fn start(dirs: &AgentDirs, options: &AgentOptions) -> Result<Self> {
        Self::start_with_args(dirs, options, &[])
    }

    /// [`Agent::start`], with more arguments for `policy-agent run` (e.g.
    /// `--metrics-listen`).
    pub fn start_with_args(
        dirs: &AgentDirs,
        options: &AgentOptions,
        extra_args: &[String],
    ) -> Result<Self> {
        Self::spawn(dirs, options, AgentSource::Files, extra_args, false)
    }

    /// [`Agent::start`], in a process group of its own, and killed if the
    /// caller dies: a terminal's Ctrl-C (SIGINT to the foreground process
    /// group) reaches the caller alone, which can still ask the agent for
    /// its status before it stops it.
    pub fn start_detached(dirs: &AgentDirs, options: &AgentOptions) -> Result<Self> {
        Self::spawn(dirs, options, AgentSource::Files, &[], true)
    }

    /// [`Agent::start_detached`], reading the cluster from `source`.
    pub fn start_detached_with(
        dirs: &AgentDirs,
        options: &AgentOptions,
        source: AgentSource<'_>,
    ) -> Result<Self> {
        Self::spawn(dirs, options, source, &[], true)
    }

    fn spawn(
        dirs: &AgentDirs,
        options: &AgentOptions,
        source: AgentSource<'_>,
        extra_args: &[String],
        detached: bool,
    ) -> Result<Self> {
        let binary = binary()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&dirs.log)
            .with_context(|| format!("opening {}", dirs.log.display()))?;
        let mut command = Command::new(&binary);
        command.arg("run").args(["--node", &options.node_name]);
        match source {
            AgentSource::Files => {
                command
                    .args(["--source", "files"])
                    .arg("--dir")
                    .arg(&dirs.manifests);
                for ip in &options.node_ips {
                    command.arg("--node-ip").arg(ip.to_string());
                }
            }
            AgentSource::Kube { kubeconfig } => {
                command
                    .args(["--source", "kube"])
                    .env("KUBECONFIG", kubeconfig);
            }
        }
        command
            .arg("--pin-dir")
            .arg(&dirs.pin_dir)
            .arg("--state-dir")
            .arg(&dirs.state)
            .arg("--socket")
            .arg(&dirs.socket)
            .env(
                "RUST_LOG",
                std::env::var("PALISADE_AGENT_LOG")
                    .unwrap_or_else(|_| "info,policy_agent=debug".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        command.args(extra_args);
        // Kept open until spawn returns; entered in the child before exec.
        let netns = options
            .netns
            .as_ref()
            .map(|p| File::open(p).with_context(|| format!("opening {}", p.display())))
            .transpose()?;
        if let Some(file) = &netns {
            let fd = file.as_raw_fd();
            // SAFETY: setns is async-signal-safe; fd is open in the child.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if detached {
            crate::child::detach_until_spawner_exits(&mut command);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        drop(netns);
        let mut agent = Self {
            child: Some(child),
            log: dirs.log.clone(),
            socket: dirs.socket.clone(),
        };
        agent.wait_ready(options.start_timeout)?;
        Ok(agent)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the agent exited ({status}) while starting:\n{}",
                    self.log_tail()
                );
            }
            match Client::connect(&self.socket) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "the agent did not answer within {timeout:?}: {e}\n{}",
                        self.log_tail()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// A client of its API.
    pub fn client(&self) -> Result<Client> {
        Client::connect(&self.socket).map_err(|e| anyhow!("{e}\n{}", self.log_tail()))
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then reaps it: the agent gets no chance to clean up.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing the agent")?;
            child.wait().context("reaping the agent")?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for it to exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Ok(child.wait()?.success())
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 60)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// The last `lines` lines of the file at `path`.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::from("(no agent log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!(
        "--- agent log ({}) ---\n{}",
        path.display(),
        all[start..].join("\n")
    )
}

/// The verdict maps and epochs pinned in `pin_dir`, as `bpftool -j map
/// dump` shows them, each map's entries sorted (hash maps iterate in no
/// particular order).
pub fn dump_pinned_maps(pin_dir: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    use policy_common::names;
    let mut maps = BTreeMap::new();
    for name in [
        names::ENDPOINTS,
        names::EPOCHS,
        names::PEER_IPS,
        names::PEER_CIDRS,
        names::POLICY,
    ] {
        let path = pin_dir.join(name);
        let out = crate::netns::command_ok(
            "bpftool",
            [
                "-j".as_ref(),
                "map".as_ref(),
                "dump".as_ref(),
                "pinned".as_ref(),
                path.as_os_str(),
            ],
        )?;
        let value: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("bpftool output for {name}"))?;
        let mut entries: Vec<String> = value
            .as_array()
            .ok_or_else(|| anyhow!("bpftool: {name} is not a list"))?
            .iter()
            .map(|e| e.to_string())
            .collect();
        entries.sort();
        maps.insert(name.to_owned(), entries);
    }
    Ok(maps)
}

/// YAML for the objects of a test cluster.
pub mod manifest {
    use std::fmt::Write as _;
    use std::net::IpAddr;

    fn labels(out: &mut String, indent: &str, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            let _ = writeln!(out, "{indent}labels: {{}}");
            return;
        }
        let _ = writeln!(out, "{indent}labels:");
        for (k, v) in labels {
            let _ = writeln!(out, "{indent}  {k}: {v:?}");
        }
    }

    /// A Namespace.
    pub fn namespace(name: &str, namespace_labels: &[(&str, &str)]) -> String {
        let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
        labels(&mut out, "  ", namespace_labels);
        out
    }

    /// A running Pod on `node` with addresses `ips` serving TCP `ports`.
    pub fn pod(
        namespace: &str,
        name: &str,
        pod_labels: &[(&str, &str)],
        node: &str,
        ips: &[IpAddr],
        ports: &[u16],
    ) -> String {
        let mut out = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n"
        );
        labels(&mut out, "  ", pod_labels);
        let _ = writeln!(
            out,
            "spec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: test"
        );
        if !ports.is_empty() {
            let _ = writeln!(out, "    ports:");
            for port in ports {
                let _ = writeln!(out, "    - containerPort: {port}\n      protocol: TCP");
            }
        }
        let _ = writeln!(out, "status:\n  phase: Running");
        if let Some(first) = ips.first() {
            let _ = writeln!(out, "  podIP: \"{first}\"\n  podIPs:");
            for ip in ips {
                let _ = writeln!(out, "  - ip: \"{ip}\"");
            }
        }
        out
    }

    /// Documents joined into one multi-document file.
    pub fn documents<S: AsRef<str>>(docs: &[S]) -> String {
        docs.iter()
            .map(|d| d.as_ref().trim_end().to_owned())
            .collect::<Vec<_>>()
            .join("\n---\n")
            + "\n"
    }
}
