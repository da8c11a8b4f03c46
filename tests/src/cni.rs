//! A container runtime in miniature, for testing CNI plugins the way
//! containerd or CRI-O run them (CNI spec sections 2 and 3).
//!
//! * [`plugin_binary`] builds `palisade-cni` once per test process (`cargo
//!   build -p policy-agent --bin palisade-cni`); `PALISADE_CNI_BIN`
//!   overrides it. [`install`] runs its `install` command.
//! * [`ConfList`]: a network configuration list, and the request each of
//!   its plugins gets (`cniVersion` and `name` of the list, the plugin's
//!   own fields, `prevResult`, `cni.dev/valid-attachments`).
//! * [`Attachment`]: CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_ARGS of
//!   one pod (the Kubernetes arguments a kubelet's runtime passes), and its
//!   capability arguments (e.g. `ips`), passed as `runtimeConfig` to the
//!   plugins that declare the capability.
//! * [`Runtime`]: runs plugins from its CNI_PATH inside the node's network
//!   namespace (entered with `setns` before exec): a whole chain (ADD in
//!   order, DEL in reverse, CHECK, STATUS, GC) or one plugin of it, and
//!   raw invocations with any environment and stdin for the error cases.
//!
//! Every invocation has a deadline; a plugin that overruns it is killed.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Map, Value, json};

/// Where Debian's containernetworking-plugins are.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// How long one plugin invocation may take before it is killed.
pub const PLUGIN_DEADLINE: Duration = Duration::from_secs(60);

/// The `palisade-cni` binary, built on first use.
pub fn plugin_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            crate::workspace_bin::build("palisade-cni", "PALISADE_CNI_BIN")
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!("building palisade-cni: {e}"))
}

/// `palisade-cni install`, as the DaemonSet's init container runs it:
/// copies the plugin into `bin_dir` and chains it, with `socket` and
/// `timeout_seconds`, last in the first configuration of `conf_dir`.
/// Returns what it printed.
pub fn install(
    conf_dir: &Path,
    bin_dir: &Path,
    socket: &Path,
    timeout_seconds: f64,
) -> Result<String> {
    let plugin = plugin_binary()?;
    let out = Command::new(&plugin)
        .arg("install")
        .arg("--conf-dir")
        .arg(conf_dir)
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--socket")
        .arg(socket)
        .arg(format!("--timeout-seconds={timeout_seconds}"))
        .output()
        .with_context(|| format!("running {} install", plugin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("palisade-cni install ({}): {text}", out.status);
    }
    Ok(text)
}

/// A network configuration list.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfList {
    pub doc: Value,
}

impl ConfList {
    /// Reads a `.conflist`.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if !doc["plugins"].is_array() {
            bail!("{} is not a conflist", path.display());
        }
        Ok(Self { doc })
    }

    /// The list's `cniVersion`.
    pub fn version(&self) -> &str {
        self.doc["cniVersion"].as_str().unwrap_or_default()
    }

    /// The plugins' configurations, in order.
    pub fn plugins(&self) -> &[Value] {
        self.doc["plugins"].as_array().map_or(&[], Vec::as_slice)
    }

    /// The `type` of plugin `index`.
    pub fn plugin_type(&self, index: usize) -> &str {
        self.plugins()[index]["type"].as_str().unwrap_or_default()
    }

    /// The request configuration for plugin `index` (spec section 3,
    /// "Deriving request configuration from plugin configuration").
    pub fn request(&self, index: usize, prev_result: Option<&Value>) -> Value {
        self.request_with(index, prev_result, &Map::new())
    }

    /// [`ConfList::request`] with the runtime's capability arguments: those
    /// the plugin declares in `capabilities` go into its `runtimeConfig`
    /// (spec section 3, "Deriving runtimeConfig").
    pub fn request_with(
        &self,
        index: usize,
        prev_result: Option<&Value>,
        capability_args: &Map<String, Value>,
    ) -> Value {
        let plugin = &self.plugins()[index];
        let mut request: Map<String, Value> = plugin.as_object().cloned().unwrap_or_default();
        request.insert("cniVersion".into(), self.doc["cniVersion"].clone());
        request.insert("name".into(), self.doc["name"].clone());
        let runtime_config: Map<String, Value> = capability_args
            .iter()
            .filter(|(name, _)| plugin["capabilities"][name.as_str()] == Value::Bool(true))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        if !runtime_config.is_empty() {
            request.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
        if let Some(prev) = prev_result {
            request.insert("prevResult".into(), prev.clone());
        }
        Value::Object(request)
    }
}

/// One pod's attachment parameters.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// CNI_ARGS, in order.
    pub args: Vec<(String, String)>,
    /// Capability arguments (e.g. `ips`, `portMappings`).
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    /// What a Kubernetes runtime passes for pod `namespace/name`.
    pub fn pod(container_id: &str, netns: &Path, namespace: &str, name: &str) -> Self {
        Self {
            container_id: container_id.to_owned(),
            netns: netns.to_owned(),
            ifname: "eth0".to_owned(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), namespace.into()),
                ("K8S_POD_NAME".into(), name.into()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), container_id.into()),
            ],
            capability_args: Map::new(),
        }
    }

    /// Adds a capability argument, e.g. `ips` with the addresses the pod
    /// must get (host-local honours it).
    pub fn with_capability(mut self, name: &str, value: Value) -> Self {
        self.capability_args.insert(name.to_owned(), value);
        self
    }

    /// Adds a CNI_ARGS pair (e.g. `IP` for host-local).
    pub fn with_arg(mut self, key: &str, value: &str) -> Self {
        self.args.push((key.to_owned(), value.to_owned()));
        self
    }

    /// CNI_ARGS as a runtime writes it.
    pub fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The environment of `command` for this attachment.
    pub fn env(&self, command: &str) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), self.container_id.clone()),
            ("CNI_NETNS".into(), self.netns.display().to_string()),
            ("CNI_IFNAME".into(), self.ifname.clone()),
            ("CNI_ARGS".into(), self.cni_args()),
        ]
    }
}

/// A plugin's answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub plugin: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// A CNI error object, with the plugin that returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub plugin: String,
    pub cni_version: String,
    pub code: u64,
    pub msg: String,
    pub details: String,
    pub stderr: String,
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed with code {}: {}",
            self.plugin, self.code, self.msg
        )?;
        if !self.details.is_empty() {
            write!(f, "; {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

impl Reply {
    /// Success: stdout as JSON (`Value::Null` when empty). Failure: the
    /// error object (boxed: it is large) (the spec's shape is checked: a non-zero exit status
    /// with cniVersion, code and msg on stdout).
    pub fn into_result(self) -> Result<Value, Box<CniError>> {
        let parsed = || -> Option<Value> {
            if self.stdout.trim().is_empty() {
                Some(Value::Null)
            } else {
                serde_json::from_str(&self.stdout).ok()
            }
        };
        if self.status.success() {
            return parsed()
                .ok_or_else(|| self.malformed("succeeded with stdout that is not JSON"));
        }
        let Some(error) = parsed() else {
            return Err(self.malformed("failed without a JSON error object"));
        };
        match (
            error["code"].as_u64(),
            error["msg"].as_str(),
            error["cniVersion"].as_str(),
        ) {
            (Some(code), Some(msg), Some(version)) => Err(Box::new(CniError {
                plugin: self.plugin.clone(),
                cni_version: version.to_owned(),
                code,
                msg: msg.to_owned(),
                details: error["details"].as_str().unwrap_or_default().to_owned(),
                stderr: self.stderr.clone(),
            })),
            _ => Err(self.malformed("failed with an error object without cniVersion, code or msg")),
        }
    }

    fn malformed(&self, what: &str) -> Box<CniError> {
        Box::new(CniError {
            plugin: self.plugin.clone(),
            cni_version: String::new(),
            code: 0,
            msg: format!(
                "the plugin {what} (exit {}): stdout {:?}",
                self.status, self.stdout
            ),
            details: String::new(),
            stderr: self.stderr.clone(),
        })
    }
}

/// Runs plugins as a container runtime does.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// CNI_PATH: where plugins are looked up, in order.
    pub cni_path: Vec<PathBuf>,
    /// The node's network namespace (the runtime's networking domain);
    /// `None`: the test's own.
    pub host_netns: Option<PathBuf>,
}

impl Runtime {
    /// The executable of plugin `plugin_type`.
    pub fn find(&self, plugin_type: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|dir| dir.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow!("no plugin {plugin_type:?} in CNI_PATH {:?}", self.cni_path))
    }

    fn cni_path_var(&self) -> String {
        self.cni_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Runs `plugin_type` with exactly `env` (plus PATH and CNI_PATH) and
    /// `stdin`, in the node's namespace.
    pub fn exec(&self, plugin_type: &str, env: &[(String, String)], stdin: &[u8]) -> Result<Reply> {
        let program = self.find(plugin_type)?;
        let mut command = Command::new(&program);
        command
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_PATH", self.cni_path_var())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let netns = self
            .host_netns
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
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        drop(netns);
        let mut input = child.stdin.take().context("plugin stdin")?;
        // A plugin may exit before reading stdin: ignore a broken pipe.
        let _ = input.write_all(stdin);
        drop(input);
        let (status, stdout, stderr) = wait_with_deadline(&mut child, PLUGIN_DEADLINE)
            .with_context(|| format!("running {plugin_type}"))?;
        Ok(Reply {
            plugin: plugin_type.to_owned(),
            status,
            stdout,
            stderr,
            took: started.elapsed(),
        })
    }

    /// Runs `command` of plugin `index` of `list` for `attachment`.
    pub fn step(
        &self,
        list: &ConfList,
        index: usize,
        command: &str,
        attachment: &Attachment,
        prev_result: Option<&Value>,
    ) -> Result<Reply> {
        let request = list.request_with(index, prev_result, &attachment.capability_args);
        self.exec(
            list.plugin_type(index),
            &attachment.env(command),
            request.to_string().as_bytes(),
        )
    }

    /// ADD of plugin `index` with `prev_result`: its result.
    pub fn add_step(
        &self,
        list: &ConfList,
        index: usize,
        attachment: &Attachment,
        prev_result: Option<&Value>,
    ) -> Result<Result<Value, Box<CniError>>> {
        Ok(self
            .step(list, index, "ADD", attachment, prev_result)?
            .into_result())
    }

    /// ADD of the whole list: each plugin in order gets the previous one's
    /// result; the first error stops the chain.
    pub fn add(
        &self,
        list: &ConfList,
        attachment: &Attachment,
    ) -> Result<Result<Value, Box<CniError>>> {
        let mut prev: Option<Value> = None;
        for index in 0..list.plugins().len() {
            match self.add_step(list, index, attachment, prev.as_ref())? {
                Ok(result) => prev = Some(result),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(prev.unwrap_or(Value::Null)))
    }

    /// DEL of the whole list, in reverse order, each plugin with the
    /// cached result of the ADD (`prev_result`) as a runtime passes it.
    pub fn del(
        &self,
        list: &ConfList,
        attachment: &Attachment,
        prev_result: Option<&Value>,
    ) -> Result<Result<(), Box<CniError>>> {
        for index in (0..list.plugins().len()).rev() {
            if let Err(e) = self
                .step(list, index, "DEL", attachment, prev_result)?
                .into_result()
            {
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    }

    /// CHECK of the whole list, in order, with the ADD's result.
    pub fn check(
        &self,
        list: &ConfList,
        attachment: &Attachment,
        prev_result: &Value,
    ) -> Result<Result<(), Box<CniError>>> {
        for index in 0..list.plugins().len() {
            if let Err(e) = self
                .step(list, index, "CHECK", attachment, Some(prev_result))?
                .into_result()
            {
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    }

    /// STATUS of plugin `index` (only CNI_COMMAND is set).
    pub fn status_step(&self, list: &ConfList, index: usize) -> Result<Result<(), Box<CniError>>> {
        let env = [("CNI_COMMAND".to_owned(), "STATUS".to_owned())];
        let request = list.request(index, None);
        Ok(self
            .exec(
                list.plugin_type(index),
                &env,
                request.to_string().as_bytes(),
            )?
            .into_result()
            .map(drop))
    }

    /// GC of plugin `index` with the still valid attachments.
    pub fn gc_step(
        &self,
        list: &ConfList,
        index: usize,
        valid: &[&Attachment],
    ) -> Result<Result<(), Box<CniError>>> {
        let env = [("CNI_COMMAND".to_owned(), "GC".to_owned())];
        let mut request = list.request(index, None);
        request["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|a| json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect();
        Ok(self
            .exec(
                list.plugin_type(index),
                &env,
                request.to_string().as_bytes(),
            )?
            .into_result()
            .map(drop))
    }
}

/// Waits for `child` (reading its output meanwhile); kills it after
/// `deadline`.
fn wait_with_deadline(
    child: &mut Child,
    deadline: Duration,
) -> Result<(ExitStatus, String, String)> {
    let mut stdout = child.stdout.take().context("plugin stdout")?;
    let mut stderr = child.stderr.take().context("plugin stderr")?;
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {deadline:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out.join().map_err(|_| anyhow!("stdout reader panicked"))?;
    let stderr = err.join().map_err(|_| anyhow!("stderr reader panicked"))?;
    Ok((status, stdout, stderr))
}
