//! Installing the generated ruleset ([`super::kuberouter`]) in the node
//! namespace and taking it out again.
//!
//! Before each iptables turn the ipsets are loaded with one `ipset restore`
//! and the filter table with one `iptables-restore`; after it both are
//! removed, so that the other turns run without any table, hook, conntrack
//! or set in the node namespace. (Sets no rule references cost nothing per
//! packet, but kube-router's are created with `timeout 0`, and the kernel
//! runs a garbage-collection pass over each such set every second: 20,000
//! sets at 10,000 policies keep about 2 % of this machine busy.) With the nft backend removing means deleting the
//! `ip filter` table, which unregisters its hooks and (through the
//! conntrack rules going away) the conntrack hooks. The legacy backend
//! cannot unregister a table: its chains are flushed and deleted, the empty
//! built-in chains stay hooked.
//!
//! Everything lives in the node namespace: deleting it (the topology's
//! drop) removes whatever a killed run left there.

use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use palisade_tests::netns::Netns;

use super::kuberouter::Ruleset;

/// Which iptables to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// iptables-nft (Debian 12's `iptables`).
    Nft,
    /// iptables-legacy (x_tables).
    Legacy,
}

impl Backend {
    fn restore(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
}

/// Runs `prog args…` inside namespace `netns` with `input` on stdin, in its
/// own process group (a Ctrl-C for the benchmark does not cut a restore in
/// half; the benchmark cleans up after it). Returns how long it took.
pub fn exec_with_input(netns: &str, prog: &str, args: &[&str], input: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, prog])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {prog} in netns {netns}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("stdin writer panicked"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} in netns {netns} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    written.with_context(|| format!("writing to {prog}"))?;
    Ok(start.elapsed())
}

/// The ruleset's state in the node namespace; removes what it installed on
/// drop.
pub struct Iptables {
    netns: String,
    backend: Backend,
    sets_loaded: bool,
    rules_loaded: bool,
}

impl Iptables {
    pub fn new(node: &Netns, backend: Backend) -> Self {
        Self {
            netns: node.name().to_owned(),
            backend,
            sets_loaded: false,
            rules_loaded: false,
        }
    }

    /// `ipset restore` of every set of `ruleset`.
    pub fn load_sets(&mut self, ruleset: &Ruleset) -> Result<Duration> {
        self.sets_loaded = true;
        exec_with_input(&self.netns, "ipset", &["restore"], &ruleset.ipsets)
    }

    /// One `iptables-restore` of the whole filter table.
    pub fn load_rules(&mut self, ruleset: &Ruleset) -> Result<Duration> {
        self.rules_loaded = true;
        exec_with_input(
            &self.netns,
            self.backend.restore(),
            &["-w"],
            &ruleset.filter,
        )
    }

    /// Takes the filter table out (see the module docs).
    pub fn unload_rules(&mut self) -> Result<Duration> {
        let start = Instant::now();
        match self.backend {
            Backend::Nft => {
                exec_with_input(&self.netns, "nft", &["-f", "-"], "delete table ip filter\n")?;
            }
            Backend::Legacy => {
                let empty = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
                exec_with_input(&self.netns, self.backend.restore(), &["-w"], empty)?;
            }
        }
        self.rules_loaded = false;
        Ok(start.elapsed())
    }

    /// Destroys every ipset of the node namespace (only ours live there).
    pub fn destroy_sets(&mut self) -> Result<()> {
        exec_with_input(&self.netns, "ipset", &["destroy"], "")?;
        self.sets_loaded = false;
        Ok(())
    }
}

impl Drop for Iptables {
    fn drop(&mut self) {
        if self.rules_loaded
            && let Err(e) = self.unload_rules()
        {
            eprintln!("peers: removing the iptables rules: {e:#}");
        }
        if self.sets_loaded
            && let Err(e) = self.destroy_sets()
        {
            eprintln!("peers: destroying the ipsets: {e:#}");
        }
    }
}

/// Entries in the node namespace's conntrack table (0 when conntrack has
/// never been used there).
pub fn conntrack_count(node: &Netns) -> u64 {
    node.sysctl("net.netfilter.nf_conntrack_count")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Empties the node namespace's conntrack table (ctnetlink
/// IPCTNL_MSG_CT_DELETE without a tuple, as `conntrack -F` does), so each
/// iptables turn starts from an empty table as each Palisade turn does.
pub fn flush_conntrack(node: &Netns) -> Result<()> {
    node.run(|| -> Result<()> {
        // SAFETY: plain socket(2); the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(NETLINK_NETFILTER)");
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // nlmsghdr (16 bytes) + nfgenmsg (4 bytes, family AF_UNSPEC: all).
        const NFNL_SUBSYS_CTNETLINK: u16 = 1;
        const IPCTNL_MSG_CT_DELETE: u16 = 2;
        let mut msg = [0u8; 20];
        msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
        msg[4..6]
            .copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // SAFETY: valid buffer and length.
        let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("sending the conntrack flush");
        }
        let mut buf = [0u8; 512];
        // SAFETY: valid buffer and length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("reading the conntrack flush ack");
        }
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if n >= 20 && ty == libc::NLMSG_ERROR as u16 {
            let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            if errno != 0 {
                return Err(std::io::Error::from_raw_os_error(-errno)).context("conntrack flush");
            }
        }
        Ok(())
    })
}
