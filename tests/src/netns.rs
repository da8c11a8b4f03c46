//! Network-namespace topologies with real sockets (needs root and iproute2).
//!
//! A [`Topology`] is a "node" namespace plus one namespace per [`Pod`],
//! joined to the node by a veth pair and addressed like the CNI `ptp` plugin:
//!
//! ```text
//!  pod ns "<prefix>-<name>"                 node ns "<prefix>-node"
//!  eth0: <ip4>/32, <ip6>/128   <== veth ==>  "<prefix><n>": 169.254.1.1/32, fe80::1/64
//!  169.254.1.1 dev eth0 scope link           <ip4>/32 dev "<prefix><n>"
//!  default via 169.254.1.1 dev eth0          <ip6>/128 dev "<prefix><n>"
//!  default via fe80::1 dev eth0              ip_forward=1, ipv6 forwarding=1
//! ```
//!
//! Pod-to-pod traffic is routed (forwarded) by the node namespace, so a TC
//! program on the host-side veth ([`Pod::host_ifname`], in the node
//! namespace) sees every packet leaving or entering a pod. Nothing is ever
//! created in the root namespace: dropping the topology deletes the
//! namespaces, which destroys the veths with them.
//!
//! Code runs inside a namespace through [`Netns::run`] (a fresh thread that
//! `setns()`'d). A socket stays in the namespace it was created in, so
//! sockets are created inside `run` and then used from any thread: that is
//! how the servers and probes below work. Every blocking operation has a
//! timeout.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage, sockopt,
};

/// Gateway address of every pod (configured on each host-side veth).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// IPv6 gateway of every pod (link-local, configured on each host-side veth).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Directory where `ip netns` keeps its namespace bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

/// Serialises `ip netns add/del` within this process (parallel tests): the
/// first `ip netns add` sets up the /run/netns mount and is not race-free.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

fn netns_lock() -> std::sync::MutexGuard<'static, ()> {
    NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

fn cmd_line(prog: &str, args: &[&OsStr]) -> String {
    let mut s = prog.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `prog args…` and returns its output whatever the exit status; errors
/// only if it cannot be started.
pub fn command<I, S>(prog: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    Command::new(prog)
        .args(&args)
        .output()
        .with_context(|| format!("cannot run `{}`", cmd_line(prog, &args)))
}

/// Runs `prog args…`, failing (with the command line, exit status and
/// stderr in the error) unless it exits successfully; returns stdout.
pub fn command_ok<I, S>(prog: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    let out = command(prog, &args)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            cmd_line(prog, &args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip args…` in the current (root) namespace; see [`command_ok`].
pub fn ip<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    command_ok("ip", args)
}

/// Names of all namespaces known to `ip netns` (the entries of /run/netns).
pub fn list_netns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names = Vec::new();
    for entry in dir {
        names.push(
            entry
                .context(NETNS_DIR)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    names.sort();
    Ok(names)
}

/// `ip netns del <name>` (under the process-wide lock).
pub fn delete_netns(name: &str) -> Result<()> {
    let _guard = netns_lock();
    command_ok("ip", ["netns", "del", name]).map(drop)
}

/// Deletes every namespace named `<prefix>-…`: leftovers of an earlier run
/// that did not clean up (e.g. killed). Returns the names deleted.
pub fn cleanup_prefix(prefix: &str) -> Result<Vec<String>> {
    let start = format!("{prefix}-");
    let mut deleted = Vec::new();
    for name in list_netns()? {
        if name.starts_with(&start) {
            delete_netns(&name)?;
            deleted.push(name);
        }
    }
    Ok(deleted)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses one line of `ip -o link show` into (ifindex, MAC).
fn parse_link_line(line: &str) -> Option<(u32, [u8; 6])> {
    let ifindex = line.split(':').next()?.trim().parse().ok()?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "link/ether")?;
    Some((ifindex, parse_mac(words.next()?)?))
}

// ---------------------------------------------------------------------------
// Netns
// ---------------------------------------------------------------------------

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates namespace `name` (deleting a stale one of the same name first)
    /// with `lo` down; see [`Netns::setup_basics`].
    pub fn create(name: &str) -> Result<Self> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            || name.starts_with('.')
        {
            bail!("invalid netns name {name:?}");
        }
        let path = Path::new(NETNS_DIR).join(name);
        let _guard = netns_lock();
        if path.exists() {
            command_ok("ip", ["netns", "del", name])
                .with_context(|| format!("deleting stale netns {name}"))?;
        }
        command_ok("ip", ["netns", "add", name])?;
        Ok(Self {
            name: name.to_string(),
            path,
        })
    }

    /// Brings `lo` up and disables IPv6 duplicate address detection for
    /// interfaces created later (so addresses are usable at once); lets
    /// every group open ICMP "ping" sockets ([`icmp_probe`]); makes a
    /// reconnect from the port of a just-closed (TIME_WAIT) connection
    /// possible (`tcp_tw_reuse=1`, `tcp_tw_reuse_delay=1` where the kernel
    /// has it).
    pub fn setup_basics(&self) -> Result<()> {
        self.ip(["link", "set", "lo", "up"])?;
        self.set_sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        self.set_sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        self.set_sysctl("net.ipv4.ping_group_range", "0 2147483647")?;
        self.set_sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        // Linux >= 6.13; best effort.
        let _ = self.set_sysctl("net.ipv4.tcp_tw_reuse_delay", "1");
        Ok(())
    }

    /// The name given to `ip netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mount path (/run/netns/<name>).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> File {
        File::open(&self.path)
            .unwrap_or_else(|e| panic!("cannot open netns {}: {e}", self.path.display()))
    }

    fn enter(file: &File, name: &str) {
        setns(file, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into netns {name}: {e}"));
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and
    /// returns its result (a panic in `f` is propagated). Sockets, netlink
    /// handles and `/proc/sys/net` opened by `f` belong to this namespace
    /// and stay so after `f` returns. Panics if the namespace cannot be
    /// entered.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.open();
        let name = &self.name;
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("netns:{name}"))
                .spawn_scoped(s, move || {
                    Self::enter(&file, name);
                    drop(file);
                    f()
                })
                .expect("spawning a thread");
            match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::run`] but in the background: spawns a thread inside
    /// this namespace and returns its handle.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let file = self.open();
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("netns:{name}"))
            .spawn(move || {
                Self::enter(&file, &name);
                drop(file);
                f()
            })
            .expect("spawning a thread")
    }

    /// `ip netns exec <name> args…`: runs a program inside the namespace and
    /// returns its output whatever the exit status.
    pub fn exec<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> =
            vec!["netns".into(), "exec".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        command("ip", all)
    }

    /// Like [`Netns::exec`] but fails unless the program succeeds; returns
    /// its stdout.
    pub fn exec_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> =
            vec!["netns".into(), "exec".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        command_ok("ip", all)
    }

    /// `ip -n <name> args…`, failing unless it succeeds; returns stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["-n".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        command_ok("ip", all)
    }

    fn sysctl_path(key: &str) -> PathBuf {
        Path::new("/proc/sys").join(key.replace('.', "/"))
    }

    /// Sets a sysctl inside this namespace, e.g.
    /// `set_sysctl("net.ipv4.ip_forward", "1")` (keys with dots inside an
    /// interface name are not supported).
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Self::sysctl_path(key);
        self.run(|| std::fs::write(&path, value))
            .with_context(|| format!("setting {key}={value} in netns {}", self.name))
    }

    /// Reads a sysctl inside this namespace (trimmed).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = Self::sysctl_path(key);
        self.run(|| std::fs::read_to_string(&path))
            .map(|s| s.trim().to_string())
            .with_context(|| format!("reading {key} in netns {}", self.name))
    }

    /// Interface index and MAC address of `ifname` in this namespace.
    pub fn link_info(&self, ifname: &str) -> Result<(u32, [u8; 6])> {
        let out = self.ip(["-o", "link", "show", "dev", ifname])?;
        parse_link_line(&out).ok_or_else(|| {
            anyhow!(
                "cannot parse `ip -n {} -o link show dev {ifname}`: {out}",
                self.name
            )
        })
    }

    /// Interface index of `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        self.run(|| nix::net::if_::if_nametoindex(ifname))
            .with_context(|| format!("no interface {ifname} in netns {}", self.name))
    }

    /// Names of the interfaces in this namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete_netns(&self.name) {
            eprintln!("palisade-tests: cleanup of netns {}: {e:#}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------

/// A pod: its namespace and both ends of its veth pair.
#[derive(Debug)]
pub struct Pod {
    /// Name given to [`Topology::add_pod`].
    pub name: String,
    /// The pod's namespace, "<prefix>-<name>".
    pub netns: Netns,
    /// Host-side veth in the node namespace, "<prefix><n>": where the TC
    /// program goes.
    pub host_ifname: String,
    /// Index of the host-side veth in the node namespace.
    pub host_ifindex: u32,
    /// MAC of the host-side veth.
    pub host_mac: [u8; 6],
    /// Index of `eth0` in the pod namespace.
    pub ifindex: u32,
    /// MAC of the pod's `eth0`.
    pub mac: [u8; 6],
    /// Pod IPv4 address (/32 on eth0).
    pub ip4: Ipv4Addr,
    /// Pod IPv6 address (/128 on eth0), if any.
    pub ip6: Option<Ipv6Addr>,
}

impl Pod {
    /// The pod's address of the same family as `v6` asks (panics if the pod
    /// has no IPv6 address and `v6` is true).
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(
                self.ip6
                    .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.name)),
            )
        } else {
            IpAddr::V4(self.ip4)
        }
    }

    /// `SocketAddr` of the pod's IPv4 (or IPv6) address and `port`.
    pub fn addr(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(v6), port)
    }
}

/// A node namespace plus pods; everything is deleted on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    next_index: u32,
    // Dropped in this order: pods, then the node.
    pods: Vec<Pod>,
    node: Netns,
}

impl Topology {
    /// `prefix`: short unique tag (1–6 ASCII letters/digits) used in netns
    /// and interface names so parallel tests don't clash. It must be unique
    /// among everything running at the same time, other test processes
    /// included: creation deletes any namespace "<prefix>-*".
    ///
    /// Deletes leftover namespaces "<prefix>-*", then creates "<prefix>-node"
    /// with `lo` up, `net.ipv4.ip_forward=1`, `net.ipv6.conf.all.forwarding=1`
    /// (plus [`Netns::setup_basics`]).
    pub fn new(prefix: &str) -> Result<Self> {
        if prefix.is_empty()
            || prefix.len() > 6
            || !prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            bail!("topology prefix must be 1-6 ASCII letters/digits, got {prefix:?}");
        }
        cleanup_prefix(prefix)?;
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.setup_basics()?;
        node.set_sysctl("net.ipv4.ip_forward", "1")?;
        node.set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(Self {
            prefix: prefix.to_string(),
            next_index: 0,
            pods: Vec::new(),
            node,
        })
    }

    /// The prefix given to [`Topology::new`].
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node namespace (holds every host-side veth).
    pub fn node_ns(&self) -> &Netns {
        &self.node
    }

    /// Adds a pod: namespace "<prefix>-<name>" with `eth0`, veth peer
    /// "<prefix><n>" in the node namespace (n counts from 0 and is never
    /// reused), addressed as described in the [module docs](self).
    /// `name`: ASCII letters, digits, '-' or '_', not "node".
    pub fn add_pod(&mut self, name: &str, ip4: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Result<&Pod> {
        if name.is_empty()
            || name == "node"
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("invalid pod name {name:?}");
        }
        if self.get_pod(name).is_some() {
            bail!("pod {name} already exists");
        }
        let host = format!("{}{}", self.prefix, self.next_index);
        if host.len() > 15 {
            bail!("interface name {host} too long");
        }
        self.next_index += 1;
        let pod = self
            .make_pod(name, &host, ip4, ip6)
            .with_context(|| format!("adding pod {name}"))?;
        self.pods.push(pod);
        Ok(self.pods.last().expect("just pushed"))
    }

    fn make_pod(
        &self,
        name: &str,
        host: &str,
        ip4: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
    ) -> Result<Pod> {
        let netns = Netns::create(&format!("{}-{name}", self.prefix))?;
        // From here on, an error drops `netns`, which deletes the namespace
        // and with it the veth pair.
        netns.setup_basics()?;
        let node = &self.node;
        let gw4 = GATEWAY_V4.to_string();
        let gw6 = GATEWAY_V6.to_string();

        node.ip([
            "link",
            "add",
            host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        // Explicit too, in case the device did not inherit the defaults.
        netns.set_sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
        node.set_sysctl(&format!("net.ipv6.conf.{host}.accept_dad"), "0")?;

        netns.ip(["link", "set", "eth0", "up"])?;
        netns.ip(["addr", "add", &format!("{ip4}/32"), "dev", "eth0"])?;
        netns.ip([
            "route",
            "add",
            &format!("{gw4}/32"),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        netns.ip(["route", "add", "default", "via", &gw4, "dev", "eth0"])?;
        if let Some(ip6) = ip6 {
            netns.ip([
                "-6",
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            netns.ip(["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        }

        node.ip(["link", "set", host, "up"])?;
        node.ip(["addr", "add", &format!("{gw4}/32"), "dev", host])?;
        node.ip([
            "-6",
            "addr",
            "add",
            &format!("{gw6}/64"),
            "dev",
            host,
            "nodad",
        ])?;
        node.ip([
            "route",
            "add",
            &format!("{ip4}/32"),
            "dev",
            host,
            "scope",
            "link",
        ])?;
        if let Some(ip6) = ip6 {
            node.ip(["-6", "route", "add", &format!("{ip6}/128"), "dev", host])?;
        }

        let (host_ifindex, host_mac) = node.link_info(host)?;
        let (ifindex, mac) = netns.link_info("eth0")?;
        Ok(Pod {
            name: name.to_string(),
            netns,
            host_ifname: host.to_string(),
            host_ifindex,
            host_mac,
            ifindex,
            mac,
            ip4,
            ip6,
        })
    }

    /// The pod called `name`; panics if there is none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.get_pod(name)
            .unwrap_or_else(|| panic!("no pod {name} in topology {}", self.prefix))
    }

    /// The pod called `name`, if any.
    pub fn get_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// All pods, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Removes a pod: deletes its host veth (synchronously, so it is gone
    /// from the node namespace on return) and its namespace.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| anyhow!("no pod {name}"))?;
        let pod = self.pods.remove(i);
        self.node.ip(["link", "del", &pod.host_ifname])?;
        drop(pod);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------

/// Outcome of a connectivity probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// TCP: connected and the server's greeting arrived. UDP/ICMP: the echo
    /// came back.
    Open,
    /// Actively refused: TCP RST in answer to the SYN, or (UDP) an ICMP
    /// port unreachable.
    Refused,
    /// Nothing (or not everything) came back before the deadline: what a
    /// dropping policy looks like.
    TimedOut,
    /// ICMP host/network unreachable or administratively prohibited.
    Unreachable,
    /// Anything else (local errors, unexpected replies, reset after
    /// connect…), with a description.
    Failed(String),
}

impl ProbeResult {
    /// `self == Open`.
    pub fn is_open(&self) -> bool {
        *self == ProbeResult::Open
    }
}

impl std::fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeResult::Failed(why) => write!(f, "Failed({why})"),
            other => write!(f, "{other:?}"),
        }
    }
}

fn classify(e: Errno) -> ProbeResult {
    match e {
        Errno::ECONNREFUSED | Errno::ECONNRESET => ProbeResult::Refused,
        Errno::ETIMEDOUT | Errno::EAGAIN => ProbeResult::TimedOut,
        Errno::EHOSTUNREACH | Errno::ENETUNREACH | Errno::EACCES | Errno::EPERM => {
            ProbeResult::Unreachable
        }
        other => ProbeResult::Failed(other.desc().to_string()),
    }
}

fn classify_io(e: &std::io::Error) -> ProbeResult {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ProbeResult::TimedOut,
        _ => match e.raw_os_error() {
            Some(n) => classify(Errno::from_raw(n)),
            None => ProbeResult::Failed(e.to_string()),
        },
    }
}

/// Time left until `deadline`, at least 1 ms (socket timeouts reject zero).
fn left(deadline: Instant) -> Option<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    (!d.is_zero()).then(|| d.max(Duration::from_millis(1)))
}

/// Waits until `fd` is ready for `events`; false on timeout.
fn wait_fd(fd: &impl AsFd, events: PollFlags, deadline: Instant) -> nix::Result<bool> {
    loop {
        let Some(d) = left(deadline) else {
            return Ok(false);
        };
        let ms = u16::try_from(d.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), events)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn family(addr: &SocketAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn new_socket(
    netns: &Netns,
    dst: &SocketAddr,
    ty: SockType,
    proto: Option<SockProtocol>,
) -> Result<OwnedFd, ProbeResult> {
    netns
        .run(|| {
            socket::socket(
                family(dst),
                ty,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                proto,
            )
        })
        .map_err(|e| ProbeResult::Failed(format!("socket(): {e}")))
}

fn bind_reuse(fd: &OwnedFd, src: SocketAddr) -> Result<(), ProbeResult> {
    socket::setsockopt(fd, sockopt::ReuseAddr, &true)
        .map_err(|e| ProbeResult::Failed(format!("SO_REUSEADDR: {e}")))?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(src))
        .map_err(|e| ProbeResult::Failed(format!("bind({src}): {e}")))
}

/// Connects a TCP socket created in `netns` to `dst`, optionally bound to
/// `src` first (with SO_REUSEADDR). Returns a blocking stream or the reason.
pub fn tcp_connect(
    netns: &Netns,
    src: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ProbeResult> {
    let deadline = Instant::now() + timeout;
    let fd = new_socket(netns, &dst, SockType::Stream, None)?;
    if let Some(src) = src {
        bind_reuse(&fd, src)?;
    }
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) => {}
        Err(Errno::EINPROGRESS) => {
            let ready = wait_fd(&fd, PollFlags::POLLOUT, deadline)
                .map_err(|e| ProbeResult::Failed(format!("poll: {e}")))?;
            if !ready {
                return Err(ProbeResult::TimedOut);
            }
            let err = socket::getsockopt(&fd, sockopt::SocketError)
                .map_err(|e| ProbeResult::Failed(format!("SO_ERROR: {e}")))?;
            if err != 0 {
                return Err(classify(Errno::from_raw(err)));
            }
        }
        Err(Errno::EADDRNOTAVAIL) if src.is_some() => {
            return Err(ProbeResult::Failed(
                "connect: EADDRNOTAVAIL (4-tuple still in use, e.g. TIME_WAIT)".into(),
            ));
        }
        Err(e) => return Err(classify(e)),
    }
    let stream = TcpStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|e| ProbeResult::Failed(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Reads one '\n'-terminated line (at most 256 bytes) before `deadline`.
fn read_line(stream: &mut TcpStream, deadline: Instant) -> Result<String, ProbeResult> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        let Some(d) = left(deadline) else {
            return Err(ProbeResult::TimedOut);
        };
        stream
            .set_read_timeout(Some(d))
            .map_err(|e| ProbeResult::Failed(e.to_string()))?;
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(ProbeResult::Failed(format!(
                    "EOF after {:?}",
                    String::from_utf8_lossy(&line)
                )));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(match classify_io(&e) {
                    ProbeResult::Refused => {
                        ProbeResult::Failed(format!("reset after connect: {e}"))
                    }
                    other => other,
                });
            }
        }
        if line.len() > 256 {
            return Err(ProbeResult::Failed("reply line too long".into()));
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Sets SO_LINGER {on, 0}: closing then sends RST and skips TIME_WAIT.
fn set_abortive(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = socket::setsockopt(stream, sockopt::Linger, &linger);
}

/// The line a [`TcpServer`] listening on `port` sends on every new
/// connection.
pub fn greeting(port: u16) -> String {
    format!("palisade:{port}\n")
}

/// TCP probe from `netns` to a [`TcpServer`] at `dst`: `Open` only if the
/// connection is established *and* the greeting line arrives within
/// `timeout` (total). The connection is then closed normally (FIN).
pub fn tcp_probe(netns: &Netns, dst: SocketAddr, timeout: Duration) -> ProbeResult {
    tcp_probe_inner(netns, None, dst, timeout)
}

/// Like [`tcp_probe`], from a fixed source address/port (bound with
/// SO_REUSEADDR), e.g. to re-use the 5-tuple of an earlier connection. The
/// connection is closed with RST (SO_LINGER 0) so the port can be used again
/// immediately. Use port 0 in `src` to pick only the source address.
pub fn tcp_probe_from(
    netns: &Netns,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> ProbeResult {
    tcp_probe_inner(netns, Some(src), dst, timeout)
}

fn tcp_probe_inner(
    netns: &Netns,
    src: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> ProbeResult {
    let deadline = Instant::now() + timeout;
    let mut stream = match tcp_connect(netns, src, dst, timeout) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let result = match read_line(&mut stream, deadline) {
        Ok(line) if line == greeting(dst.port()) => ProbeResult::Open,
        Ok(line) => ProbeResult::Failed(format!("unexpected greeting {line:?}")),
        Err(r) => r,
    };
    if src.is_some() {
        set_abortive(&stream);
    }
    result
}

fn random_payload() -> Vec<u8> {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let mut out = b"palisade-probe:".to_vec();
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out.extend_from_slice(format!("{:016x}", h.finish()).as_bytes());
    }
    out
}

/// UDP probe from `netns`: sends one datagram with a random payload to `dst`
/// (normally a [`UdpEchoServer`]) and waits up to `timeout` for the same
/// payload to come back. An ICMP port unreachable gives `Refused`.
pub fn udp_probe(netns: &Netns, dst: SocketAddr, timeout: Duration) -> ProbeResult {
    udp_probe_inner(netns, None, dst, timeout)
}

/// Like [`udp_probe`], from a fixed source address/port (SO_REUSEADDR).
pub fn udp_probe_from(
    netns: &Netns,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> ProbeResult {
    udp_probe_inner(netns, Some(src), dst, timeout)
}

fn udp_probe_inner(
    netns: &Netns,
    src: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> ProbeResult {
    let deadline = Instant::now() + timeout;
    let fd = match new_socket(netns, &dst, SockType::Datagram, None) {
        Ok(fd) => fd,
        Err(r) => return r,
    };
    if let Some(src) = src
        && let Err(r) = bind_reuse(&fd, src)
    {
        return r;
    }
    let payload = random_payload();
    dgram_exchange(fd, dst, &payload, deadline, |reply| {
        reply == payload.as_slice()
    })
}

/// Connects the datagram socket, sends `msg`, and waits for a reply that
/// `matches`.
fn dgram_exchange(
    fd: OwnedFd,
    dst: SocketAddr,
    msg: &[u8],
    deadline: Instant,
    matches: impl Fn(&[u8]) -> bool,
) -> ProbeResult {
    if let Err(e) = socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        return classify(e);
    }
    if let Err(e) = socket::send(fd.as_raw_fd(), msg, MsgFlags::empty()) {
        return classify(e);
    }
    let mut buf = vec![0u8; 65536];
    loop {
        match wait_fd(&fd, PollFlags::POLLIN, deadline) {
            Ok(true) => {}
            Ok(false) => return ProbeResult::TimedOut,
            Err(e) => return ProbeResult::Failed(format!("poll: {e}")),
        }
        match socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) if matches(&buf[..n]) => return ProbeResult::Open,
            Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(e) => return classify(e),
        }
    }
}

/// ICMP echo ("ping") probe from `netns` to `dst` using an unprivileged ICMP
/// datagram socket (allowed by [`Netns::setup_basics`]): `Open` if the echo
/// reply arrives within `timeout`.
pub fn icmp_probe(netns: &Netns, dst: IpAddr, timeout: Duration) -> ProbeResult {
    let deadline = Instant::now() + timeout;
    let dst = SocketAddr::new(dst, 0);
    let (proto, req, rep) = if dst.is_ipv4() {
        (
            SockProtocol::Icmp,
            crate::packet::icmp::ECHO_REQUEST,
            crate::packet::icmp::ECHO_REPLY,
        )
    } else {
        (
            SockProtocol::IcmpV6,
            crate::packet::icmp6::ECHO_REQUEST,
            crate::packet::icmp6::ECHO_REPLY,
        )
    };
    let fd = match new_socket(netns, &dst, SockType::Datagram, Some(proto)) {
        Ok(fd) => fd,
        Err(r) => return r,
    };
    let payload = random_payload();
    // type, code, checksum and identifier are filled in by the kernel.
    let mut msg = vec![req, 0, 0, 0, 0, 0, 0, 1];
    msg.extend_from_slice(&payload);
    dgram_exchange(fd, dst, &msg, deadline, |reply| {
        reply.len() == msg.len() && reply[0] == rep && reply[8..] == payload[..]
    })
}

// ---------------------------------------------------------------------------
// TcpClient
// ---------------------------------------------------------------------------

/// One TCP connection to a [`TcpServer`] kept open across calls, to check
/// that an established connection keeps (or stops) working when policy
/// changes.
#[derive(Debug)]
pub struct TcpClient {
    stream: TcpStream,
    greeting: String,
    /// Echo bytes still owed by the server from exchanges that timed out.
    pending: Vec<u8>,
}

impl TcpClient {
    /// Connects from `netns` to `dst` and reads the greeting; fails (with the
    /// [`ProbeResult`] in the message) unless that works within `timeout`.
    pub fn connect(netns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<Self> {
        Self::connect_inner(netns, None, dst, timeout)
    }

    /// Like [`TcpClient::connect`], from a fixed source address/port
    /// (SO_REUSEADDR), e.g. to reconnect with the 5-tuple of a closed
    /// connection.
    pub fn connect_from(
        netns: &Netns,
        src: SocketAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        Self::connect_inner(netns, Some(src), dst, timeout)
    }

    fn connect_inner(
        netns: &Netns,
        src: Option<SocketAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let what = || format!("TCP connection from netns {} to {dst}", netns.name());
        let mut stream =
            tcp_connect(netns, src, dst, timeout).map_err(|r| anyhow!("{}: {r}", what()))?;
        let greeting =
            read_line(&mut stream, deadline).map_err(|r| anyhow!("{}: greeting: {r}", what()))?;
        Ok(Self {
            stream,
            greeting,
            pending: Vec::new(),
        })
    }

    /// The greeting line received (with its '\n').
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// Local (source) address of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream
            .local_addr()
            .expect("local_addr of a connected socket")
    }

    /// Remote address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.stream
            .peer_addr()
            .expect("peer_addr of a connected socket")
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends `msg` and waits up to `timeout` for the server to echo it.
    ///
    /// `Ok(true)`: echoed. `Ok(false)`: not (completely) echoed in time, as
    /// when packets are dropped; the bytes still owed are remembered, so if
    /// the path opens again, the next exchange first expects the late echo
    /// and then its own. `Err`: the connection was reset or closed, or the
    /// echo differs.
    pub fn exchange(&mut self, msg: &[u8], timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        self.stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        self.stream
            .write_all(msg)
            .context("sending on the TCP connection")?;
        let mut expected = std::mem::take(&mut self.pending);
        expected.extend_from_slice(msg);
        let mut got = 0;
        let mut buf = vec![0u8; expected.len()];
        while got < expected.len() {
            let Some(d) = left(deadline) else {
                self.pending = expected[got..].to_vec();
                return Ok(false);
            };
            self.stream.set_read_timeout(Some(d))?;
            match self.stream.read(&mut buf[..expected.len() - got]) {
                Ok(0) => bail!("connection closed by the server"),
                Ok(n) => {
                    if buf[..n] != expected[got..got + n] {
                        bail!(
                            "echo mismatch: got {:?}, expected {:?}",
                            &buf[..n],
                            &expected[got..got + n]
                        );
                    }
                    got += n;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.pending = expected[got..].to_vec();
                    return Ok(false);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the echo"),
            }
        }
        Ok(true)
    }

    /// Graceful close: sends FIN and waits up to `timeout` for the server's
    /// FIN (discarding any echo still in flight). This side then sits in
    /// TIME_WAIT; [`Netns::setup_basics`] allows reusing the port right away.
    pub fn close(self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.stream.shutdown(Shutdown::Write)?;
        let mut stream = self.stream;
        let mut buf = [0u8; 4096];
        loop {
            let Some(d) = left(deadline) else {
                bail!("no FIN from the server within {timeout:?}")
            };
            stream.set_read_timeout(Some(d))?;
            match stream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no FIN from the server within {timeout:?}")
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("waiting for the server's FIN"),
            }
        }
    }

    /// Abortive close: sends RST (SO_LINGER 0), no TIME_WAIT.
    pub fn abort(self) {
        set_abortive(&self.stream);
    }
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

const POLL_SLICE: Duration = Duration::from_millis(50);

/// TCP server in a namespace: for each connection, sends [`greeting`]`(port)`
/// then echoes everything it reads until EOF. Stops (closing every
/// connection) on drop.
#[derive(Debug)]
pub struct TcpServer {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// A non-blocking TCP listener on `addr` inside `netns`, and the address it
/// got (port 0: any free port).
fn listen_in(netns: &Netns, addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = netns
        .run(|| TcpListener::bind(addr))
        .with_context(|| format!("TCP listen on {addr} in netns {}", netns.name()))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

impl TcpServer {
    /// Listens on `addr:port` inside `netns` (port 0: any free port, see
    /// [`TcpServer::local_addr`]). Use an unspecified address (0.0.0.0 or
    /// `::`, which also takes IPv4) to serve every address.
    pub fn start(netns: &Netns, addr: IpAddr, port: u16) -> Result<Self> {
        let (listener, local) = listen_in(netns, SocketAddr::new(addr, port))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            std::thread::Builder::new()
                .name(format!("tcp-server:{local}"))
                .spawn(move || Self::accept_loop(listener, local.port(), &stop, &accepted))?
        };
        Ok(Self {
            local,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    fn accept_loop(
        listener: TcpListener,
        port: u16,
        stop: &Arc<AtomicBool>,
        accepted: &AtomicUsize,
    ) {
        let mut handlers: Vec<JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let _ = wait_fd(&listener, PollFlags::POLLIN, Instant::now() + POLL_SLICE);
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let stop = stop.clone();
                    match std::thread::Builder::new()
                        .spawn(move || Self::serve(stream, port, &stop))
                    {
                        Ok(h) => handlers.push(h),
                        Err(e) => eprintln!("palisade-tests: TCP server thread: {e}"),
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => {
                    eprintln!("palisade-tests: TCP server accept on port {port}: {e}");
                    std::thread::sleep(POLL_SLICE);
                }
            }
            let (done, running): (Vec<_>, Vec<_>) =
                handlers.into_iter().partition(|h| h.is_finished());
            handlers = running;
            done.into_iter().for_each(|h| drop(h.join()));
        }
        for h in handlers {
            let _ = h.join();
        }
    }

    fn serve(mut stream: TcpStream, port: u16, stop: &AtomicBool) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(POLL_SLICE));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(greeting(port).as_bytes()).is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Number of connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// UDP server in a namespace echoing every datagram to its sender. Stops on
/// drop.
#[derive(Debug)]
pub struct UdpEchoServer {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    /// Binds `addr:port` inside `netns` (port 0: any free port) and echoes.
    pub fn start(netns: &Netns, addr: IpAddr, port: u16) -> Result<Self> {
        let sa = SocketAddr::new(addr, port);
        let sock = netns
            .run(|| UdpSocket::bind(sa))
            .with_context(|| format!("UDP bind on {sa} in netns {}", netns.name()))?;
        sock.set_read_timeout(Some(POLL_SLICE))?;
        let local = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            let received = received.clone();
            std::thread::Builder::new()
                .name(format!("udp-echo:{local}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        // Errors are timeouts (or stray ICMP errors): keep going.
                        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                            received.fetch_add(1, Ordering::Relaxed);
                            let _ = sock.send_to(&buf[..n], peer);
                        }
                    }
                })?
        };
        Ok(Self {
            local,
            stop,
            received,
            thread: Some(thread),
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Number of datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwards the TCP connections made to an address inside a namespace to
/// an address reached from the caller's namespace: a process in a node
/// namespace (the agent) reaches a server on the test machine's loopback
/// (a kube-apiserver) with no interface in the root namespace. Stops, and
/// closes every forwarded connection, on drop.
#[derive(Debug)]
pub struct TcpForwarder {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Both ends of every connection, to shut them down on drop.
    streams: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpForwarder {
    /// Listens on `listen` inside `netns` and connects each connection to
    /// `upstream` from the caller's namespace.
    pub fn start(netns: &Netns, listen: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        let (listener, local) = listen_in(netns, listen)?;
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, streams) = (stop.clone(), streams.clone());
            std::thread::Builder::new()
                .name(format!("tcp-forward:{local}"))
                .spawn(move || Self::accept_loop(&listener, upstream, &stop, &streams))?
        };
        Ok(Self {
            local,
            stop,
            streams,
            thread: Some(thread),
        })
    }

    fn accept_loop(
        listener: &TcpListener,
        upstream: SocketAddr,
        stop: &AtomicBool,
        streams: &Mutex<Vec<TcpStream>>,
    ) {
        while !stop.load(Ordering::Relaxed) {
            let _ = wait_fd(listener, PollFlags::POLLIN, Instant::now() + POLL_SLICE);
            let client = match listener.accept() {
                Ok((client, _)) => client,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    continue;
                }
                Err(e) => {
                    eprintln!("palisade-tests: TCP forwarder accept: {e}");
                    std::thread::sleep(POLL_SLICE);
                    continue;
                }
            };
            // A refused upstream closes the client's connection, as the
            // upstream itself would.
            let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
                continue;
            };
            let _ = client.set_nonblocking(false);
            let pipes = (|| -> std::io::Result<()> {
                let mut kept = streams.lock().unwrap_or_else(|e| e.into_inner());
                kept.push(client.try_clone()?);
                kept.push(server.try_clone()?);
                Self::pipe(client.try_clone()?, server.try_clone()?)?;
                Self::pipe(server, client)
            })();
            if let Err(e) = pipes {
                eprintln!("palisade-tests: TCP forwarder: {e}");
            }
        }
    }

    /// Copies `from` to `to` on a thread of its own until EOF or an error,
    /// then half-closes `to`.
    fn pipe(mut from: TcpStream, mut to: TcpStream) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("tcp-forward-pipe".into())
            .spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            })
            .map(drop)
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for stream in self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------
// PacketSocket
// ---------------------------------------------------------------------------

/// An `AF_PACKET` socket bound to one interface of a namespace: injects
/// hand-made frames (see [`crate::packet`]) and captures what arrives.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
}

const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

impl PacketSocket {
    /// Opens a socket on `ifname` in `netns` that sees every protocol.
    pub fn open(netns: &Netns, ifname: &str) -> Result<Self> {
        netns
            .run(|| -> Result<Self> {
                let ifindex = nix::net::if_::if_nametoindex(ifname)
                    .with_context(|| format!("no interface {ifname}"))?;
                // SAFETY: plain socket(2) call; the result is checked.
                let raw = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        i32::from(ETH_P_ALL_BE),
                    )
                };
                if raw < 0 {
                    return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
                }
                // SAFETY: `raw` is a fresh, valid descriptor that we own.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: all-zero is a valid sockaddr_ll.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = ETH_P_ALL_BE;
                sll.sll_ifindex = ifindex as i32;
                // SAFETY: `sll` is a valid sockaddr_ll of the size given.
                let rc = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&raw const sll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error())
                        .context(format!("bind(AF_PACKET, {ifname})"));
                }
                Ok(Self { fd, ifindex })
            })
            .with_context(|| format!("packet socket on {ifname} in netns {}", netns.name()))
    }

    /// Index of the interface bound.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Transmits `frame` (a complete Ethernet frame) on the interface.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let n = socket::send(self.fd.as_raw_fd(), frame, MsgFlags::empty())
            .context("send(AF_PACKET)")?;
        if n != frame.len() {
            bail!("short send: {n} of {} bytes", frame.len());
        }
        Ok(())
    }

    /// Next frame *received* by the interface (frames it transmits are
    /// skipped), or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.recv_matching(timeout, |_| true)
    }

    /// Next received frame for which `pred` holds, or `None` after `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            if !wait_fd(&self.fd, PollFlags::POLLIN, deadline)? {
                return Ok(None);
            }
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buffer and address pointers/lengths are valid.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut sll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                    continue;
                }
                return Err(e).context("recvfrom(AF_PACKET)");
            }
            let frame = &buf[..n as usize];
            if sll.sll_pkttype == libc::PACKET_OUTGOING || sll.sll_ifindex != self.ifindex as i32 {
                continue;
            }
            if pred(frame) {
                return Ok(Some(frame.to_vec()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_link_output() {
        let line = "7: pa0@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\\    link/ether 5e:2b:9a:0c:11:fe brd ff:ff:ff:ff:ff:ff link-netns pa-a";
        assert_eq!(
            parse_link_line(line),
            Some((7, [0x5e, 0x2b, 0x9a, 0x0c, 0x11, 0xfe]))
        );
        assert_eq!(
            parse_link_line("1: lo: <LOOPBACK> mtu 65536\\    link/loopback 00:00:00:00:00:00"),
            None
        );
        assert_eq!(parse_mac("00:11:22:33:44"), None);
    }

    #[test]
    fn probe_result_display() {
        assert_eq!(ProbeResult::Open.to_string(), "Open");
        assert_eq!(ProbeResult::Failed("x".into()).to_string(), "Failed(x)");
        assert_eq!(greeting(80), "palisade:80\n");
    }

    #[test]
    fn random_payloads_differ() {
        assert_ne!(random_payload(), random_payload());
    }
}
