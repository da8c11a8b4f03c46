//! The flow log, printed like `hubble observe`: one line per event of the
//! classifier's ring buffer, with addresses resolved to pods and verdicts
//! explained by the policies that made them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::BorrowedFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use policy_agent::compile::RuleRef;
use policy_agent::datapath::{FlowReader, ReadEvent};
use policy_agent::model::ObjectRef;
use policy_common::{Direction, FlowEvent, Reason, event::DecodedCodes, proto};

use crate::cluster::{self, Cluster};

/// The line layout: time, source, arrow, destination, protocol, verdict,
/// direction, reason (then what decided, appended).
fn columns([time, src, arrow, dst, proto, verdict, dir, reason]: [&str; 8]) -> String {
    format!(
        "{time:<12}  {src:<24} {arrow:2} {dst:<24} {proto:<6} {verdict:<7} {dir:<7} {reason:<20}"
    )
}

/// Column titles of the lines [`FlowLog`] prints.
pub fn header() -> String {
    let titles = columns([
        "TIME",
        "SOURCE",
        "",
        "DESTINATION",
        "PROTO",
        "VERDICT",
        "DIR",
        "REASON",
    ]);
    format!("{titles} POLICY")
}

/// Prints the classifier's flow events.
pub struct FlowLog {
    reader: FlowReader,
    /// Pod addresses and the node's.
    names: BTreeMap<IpAddr, String>,
    /// Endpoint id → pod.
    endpoints: BTreeMap<u32, ObjectRef>,
    /// Rule id → rule, from the compiler.
    rules: BTreeMap<u32, RuleRef>,
    /// The policies isolating each endpoint in each direction, `ns/name`.
    isolating: BTreeMap<(u32, Direction), Vec<String>>,
    /// Events printed so far.
    pub printed: u64,
}

impl FlowLog {
    pub fn new(reader: FlowReader, cluster: &Cluster) -> Self {
        let mut isolating = BTreeMap::new();
        for pod in &cluster.pods {
            let Some(model) = cluster.state.pod(&pod.object) else {
                continue;
            };
            for direction in [Direction::Ingress, Direction::Egress] {
                let names: Vec<String> = cluster
                    .state
                    .policies_in(&pod.object.namespace)
                    .filter(|p| p.selects(model) && p.isolates(direction))
                    .map(|p| p.object_ref().to_string())
                    .collect();
                isolating.insert((pod.endpoint.endpoint_id, direction), names);
            }
        }
        Self {
            reader,
            names: cluster::address_names(cluster),
            endpoints: cluster
                .pods
                .iter()
                .map(|p| (p.endpoint.endpoint_id, p.object.clone()))
                .collect(),
            rules: cluster.desired.rules.clone(),
            isolating,
            printed: 0,
        }
    }

    /// Prints every event available now; returns how many.
    pub fn drain(&mut self) -> usize {
        let mut lines = Vec::new();
        self.reader.drain(|event| lines.push(event));
        for event in &lines {
            println!("{}", self.format(event));
        }
        self.printed += lines.len() as u64;
        lines.len()
    }

    /// Waits up to `timeout` for events, then prints what arrived.
    pub fn wait(&mut self, timeout: Duration) -> usize {
        // SAFETY: the descriptor belongs to `self.reader`, which outlives
        // this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.reader.as_raw_fd()) };
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        // Interrupted (a signal) or not, whatever is there gets printed.
        let _ = poll(
            &mut [PollFd::new(fd, PollFlags::POLLIN)],
            PollTimeout::from(ms),
        );
        self.drain()
    }

    fn format(&self, event: &ReadEvent) -> String {
        match event {
            Ok((event, codes)) => self.format_event(event, codes),
            Err(e) => format!("{:<12}  undecodable flow record: {e}", clock(None)),
        }
    }

    fn format_event(&self, ev: &FlowEvent, codes: &DecodedCodes) -> String {
        let (src, dst) = if ev.family == 0 {
            // Dropped before its addresses were read.
            let at = self
                .endpoints
                .get(&ev.endpoint_id)
                .map_or_else(|| format!("ifindex {}", ev.ifindex), ToString::to_string);
            (format!("({at})"), "?".to_owned())
        } else {
            let ports = !matches!(ev.protocol, proto::ICMP | proto::ICMPV6);
            (
                self.endpoint_name(&ev.src_addr, ports.then_some(ev.src_port)),
                self.endpoint_name(&ev.dst_addr, ports.then_some(ev.dst_port)),
            )
        };
        let mut line = columns([
            &clock(Some(ev.timestamp_ns)),
            &src,
            "->",
            &dst,
            &protocol_name(ev.protocol, ev.family),
            codes.verdict.as_str(),
            codes.direction.as_str(),
            codes.reason.as_str(),
        ]);
        match codes.reason {
            Reason::AllowedByPolicy => match self.rules.get(&ev.rule_id) {
                Some(rule) => line.push_str(&format!(
                    " {}/{} rule[{}]",
                    rule.namespace, rule.policy, rule.index
                )),
                None => line.push_str(&format!(" rule id {}", ev.rule_id)),
            },
            Reason::DeniedByPolicy | Reason::DeniedRevoked => {
                if let Some(policies) = self.isolating.get(&(ev.endpoint_id, codes.direction))
                    && !policies.is_empty()
                {
                    line.push_str(&format!(" isolated by {}", policies.join(", ")));
                }
            }
            _ => {}
        }
        line.truncate(line.trim_end().len());
        line
    }

    /// `ns/pod:port`, `node:port` or `address:port`.
    fn endpoint_name(&self, addr: &policy_common::Addr, port: Option<u16>) -> String {
        let ip = Ipv6Addr::from(*addr).to_canonical();
        let name = match self.names.get(&ip) {
            Some(name) => name.clone(),
            None if ip.is_ipv6() && port.is_some() => format!("[{ip}]"),
            None => ip.to_string(),
        };
        match port {
            Some(port) => format!("{name}:{port}"),
            None => name,
        }
    }
}

/// `TCP`, `UDP`, `SCTP` (`TCP6`… over IPv6), `ICMP`, `ICMPv6`, else the number.
fn protocol_name(protocol: u8, family: u8) -> String {
    let v6 = if family == 6 { "6" } else { "" };
    match protocol {
        proto::TCP => format!("TCP{v6}"),
        proto::UDP => format!("UDP{v6}"),
        proto::SCTP => format!("SCTP{v6}"),
        proto::ICMP => "ICMP".to_owned(),
        proto::ICMPV6 => "ICMPv6".to_owned(),
        other => format!("ip{v6}/{other}"),
    }
}

/// CLOCK_MONOTONIC now, in ns (the clock of `bpf_ktime_get_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Local wall-clock time `HH:MM:SS.mmm` of a monotonic timestamp (now if
/// `None`).
fn clock(monotonic: Option<u64>) -> String {
    let age = monotonic.map_or(0, |ts| monotonic_ns().saturating_sub(ts));
    let wall = SystemTime::now()
        .checked_sub(Duration::from_nanos(age))
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = libc::time_t::try_from(wall.as_secs()).unwrap_or(0);
    // SAFETY: all-zero is a valid `tm`; localtime_r writes only into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::localtime_r(&secs, &mut tm) };
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        wall.subsec_millis()
    )
}
