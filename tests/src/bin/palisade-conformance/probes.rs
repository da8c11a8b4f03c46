//! Running a step's probes: all in parallel (a bounded pool of workers),
//! short timeouts. A probe expected to be allowed is retried a few times
//! before it counts as blocked; one expected to be blocked is tried as many
//! times and must be blocked on every try.

use std::io::{ErrorKind, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palisade_tests::conformance::{Endpoint, Family, Observed, Probe, Protocol, Verdict};
use palisade_tests::netns::{Netns, ProbeResult, tcp_connect, tcp_probe, udp_probe};

/// How long a try waits for an answer.
pub const TIMEOUT: Duration = Duration::from_millis(800);
/// Tries of a probe expected to be allowed (stops at the first answer).
pub const ALLOW_TRIES: usize = 3;
/// Tries of a probe expected to be blocked (every one must time out).
pub const DENY_TRIES: usize = 2;
/// Probes in flight at once.
const WORKERS: usize = 32;

/// Where a probe starts: the namespace to open the socket in.
pub struct Source<'a> {
    pub netns: &'a Netns,
}

/// The node's addresses on the pod network (the pods' gateway): where
/// probes to `node` go.
#[derive(Clone, Copy, Debug)]
pub struct NodeAddresses {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl NodeAddresses {
    /// The address of `family`.
    pub fn of(self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.v4),
            Family::V6 => IpAddr::V6(self.v6),
        }
    }
}

/// Whether the kernel can open SCTP sockets.
pub fn sctp_available() -> bool {
    // SAFETY: plain socket(2); the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd >= 0 {
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        true
    } else {
        false
    }
}

fn target(probe: &Probe, node: NodeAddresses) -> SocketAddr {
    // No destination address: the node.
    let ip = probe.dst_ip.unwrap_or_else(|| node.of(probe.family));
    SocketAddr::new(ip, probe.port)
}

fn try_once(probe: &Probe, source: &Source<'_>, node: NodeAddresses) -> ProbeResult {
    let dst = target(probe, node);
    match probe.protocol {
        // Through a service the backend's port greets (the target port).
        Protocol::Tcp if matches!(probe.to, Endpoint::Service(_)) => service_tcp(source.netns, dst),
        Protocol::Tcp => tcp_probe(source.netns, dst, TIMEOUT),
        Protocol::Udp => udp_probe(source.netns, dst, TIMEOUT),
        Protocol::Sctp => ProbeResult::Failed("SCTP probes are not implemented".into()),
    }
}

/// A TCP probe to a service: connect, then any server greeting
/// (`palisade:<port>`) counts, since DNAT picks the backend and its port.
fn service_tcp(netns: &Netns, dst: SocketAddr) -> ProbeResult {
    let deadline = Instant::now() + TIMEOUT;
    let mut stream = match tcp_connect(netns, None, dst, TIMEOUT) {
        Ok(stream) => stream,
        Err(result) => return result,
    };
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() <= 256 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return ProbeResult::TimedOut;
        }
        match stream.read(&mut byte) {
            Ok(0) => return ProbeResult::Failed("EOF before the greeting".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return ProbeResult::TimedOut;
            }
            Err(e) => return ProbeResult::Failed(format!("reading the greeting: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text
        .strip_prefix("palisade:")
        .and_then(|rest| rest.trim_end().parse::<u16>().ok())
    {
        Some(_) => ProbeResult::Open,
        None => ProbeResult::Failed(format!("unexpected greeting {text:?}")),
    }
}

fn observe(result: &ProbeResult) -> Observed {
    match result {
        ProbeResult::Open => Observed::Allowed,
        ProbeResult::TimedOut => Observed::Blocked,
        other => Observed::Error(other.to_string()),
    }
}

/// One probe, with its retries.
pub fn run_one(probe: &Probe, source: &Source<'_>, node: NodeAddresses, sctp: bool) -> Observed {
    if probe.needs_sctp() {
        return if sctp {
            Observed::Skipped("the runner has no SCTP client".into())
        } else {
            Observed::Skipped("the kernel has no SCTP sockets".into())
        };
    }
    let tries = match probe.expected {
        Verdict::Allow => ALLOW_TRIES,
        Verdict::Deny => DENY_TRIES,
    };
    let mut last = Observed::Blocked;
    for _ in 0..tries {
        last = observe(&try_once(probe, source, node));
        match (probe.expected, &last) {
            // Allowed once is allowed; for a deny it is already a failure.
            (_, Observed::Allowed) => return last,
            (Verdict::Deny, Observed::Error(_)) => return last,
            _ => {}
        }
    }
    last
}

/// Runs every probe in parallel; `source` maps a probe's `from` to where it
/// starts (`None`: an error, the endpoint does not exist).
pub fn run_all<'a>(
    probes: &[Probe],
    node: NodeAddresses,
    source: impl Fn(&Endpoint) -> Option<Source<'a>> + Sync,
) -> Vec<Observed> {
    let sctp = sctp_available();
    let results: Mutex<Vec<Option<Observed>>> = Mutex::new(vec![None; probes.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS.min(probes.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(probe) = probes.get(i) else { break };
                    let observed = match source(&probe.from) {
                        Some(src) => run_one(probe, &src, node, sctp),
                        None => Observed::Error(format!("no source {}", probe.from)),
                    };
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(observed);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Observed::Error("not run".into())))
        .collect()
}
