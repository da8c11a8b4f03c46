//! The probes of a round: real connections between the demo's pods (and from
//! the node), each with the verdict the shop policies call for.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, anyhow};
use palisade_tests::netns::{ProbeResult, tcp_probe, udp_probe};

use crate::cluster::{self, Cluster};

/// How long a probe waits for its answer. Allowed connections answer within
/// milliseconds; a dropped one never does. Shorter than the first TCP SYN
/// retransmission (1 s), so a denied TCP probe is one dropped SYN.
const TIMEOUT: Duration = Duration::from_millis(800);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Where a probe starts: a pod (`ns/name`) or the node itself (as kubelet
/// probes do).
#[derive(Clone, Copy, Debug)]
pub enum Source {
    Pod(&'static str),
    Node,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allowed => "ALLOWED",
            Verdict::Denied => "DENIED",
        })
    }
}

/// One connection attempt and its expected verdict.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub from: Source,
    /// `ns/name` of the destination pod.
    pub to: &'static str,
    pub protocol: Protocol,
    pub port: u16,
    /// Over IPv6 instead of IPv4.
    pub ipv6: bool,
    pub expect: Verdict,
}

const fn probe(
    from: Source,
    to: &'static str,
    protocol: Protocol,
    port: u16,
    expect: Verdict,
) -> Probe {
    Probe {
        from,
        to,
        protocol,
        port,
        ipv6: false,
        expect,
    }
}

use Protocol::{Tcp, Udp};
use Source::{Node, Pod};
use Verdict::{Allowed, Denied};

/// Every round, in this order.
pub const PROBES: &[Probe] = &[
    // front-end-access: TCP 8079 from anywhere.
    probe(Pod("outside/client"), "shop/front-end", Tcp, 8079, Allowed),
    // default-deny-ingress: nothing else from outside reaches shop.
    probe(Pod("outside/client"), "shop/catalogue", Tcp, 80, Denied),
    // catalogue-access: TCP 80 from front-end, over IPv4 and IPv6.
    probe(Pod("shop/front-end"), "shop/catalogue", Tcp, 80, Allowed),
    Probe {
        ipv6: true,
        ..probe(Pod("shop/front-end"), "shop/catalogue", Tcp, 80, Allowed)
    },
    // catalogue-db-access: TCP 3306 from catalogue only.
    probe(Pod("shop/orders"), "shop/catalogue-db", Tcp, 3306, Denied),
    probe(
        Pod("shop/catalogue"),
        "shop/catalogue-db",
        Tcp,
        3306,
        Allowed,
    ),
    // cortex-access: cortex of shop reaches every pod of shop, any port and
    // protocol; cortex of monitoring (same label) does not.
    probe(Pod("monitoring/cortex"), "shop/orders", Tcp, 80, Denied),
    probe(Pod("shop/cortex"), "shop/orders", Udp, 8125, Allowed),
    // The node reaches its pods whatever the policies (kubelet probes).
    probe(Node, "shop/catalogue-db", Tcp, 3306, Allowed),
    // No policy isolates outside/client: everything reaches it.
    probe(Pod("shop/front-end"), "outside/client", Tcp, 80, Allowed),
];

impl Probe {
    /// `from -> to:port/PROTO`, e.g. `shop/front-end -> shop/catalogue:80/TCP`.
    pub fn describe(&self) -> String {
        let from = match self.from {
            Source::Pod(name) => name,
            Source::Node => "node",
        };
        let protocol = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        let family = if self.ipv6 { " (IPv6)" } else { "" };
        format!("{from} -> {}:{}/{protocol}{family}", self.to, self.port)
    }
}

/// Checks that every probe names pods of the cluster (with an IPv6 address
/// where it needs one).
pub fn check(cluster: &Cluster) -> Result<()> {
    for probe in PROBES {
        if let Source::Pod(name) = probe.from {
            cluster
                .pod(name)
                .ok_or_else(|| anyhow!("probe {}: no pod {name}", probe.describe()))?;
        }
        let to = cluster
            .pod(probe.to)
            .ok_or_else(|| anyhow!("probe {}: no pod {}", probe.describe(), probe.to))?;
        cluster::target(to, probe.ipv6, probe.port)?;
    }
    Ok(())
}

/// What a probe saw.
#[derive(Debug)]
pub struct Observation {
    /// Where the connection went.
    pub dst: SocketAddr,
    pub result: ProbeResult,
}

impl Observation {
    /// The verdict the result means: an answer is ALLOWED, silence DENIED
    /// (the classifier drops); anything else (refused, errors) is neither.
    pub fn verdict(&self) -> Option<Verdict> {
        match self.result {
            ProbeResult::Open => Some(Verdict::Allowed),
            ProbeResult::TimedOut => Some(Verdict::Denied),
            _ => None,
        }
    }

    pub fn matches(&self, expect: Verdict) -> bool {
        self.verdict() == Some(expect)
    }
}

impl fmt::Display for Observation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.verdict(), &self.result) {
            (Some(Verdict::Allowed), _) => write!(f, "ALLOWED"),
            (Some(Verdict::Denied), _) => write!(f, "DENIED (no answer in {TIMEOUT:?})"),
            (None, other) => write!(f, "{other}"),
        }
    }
}

/// Makes the connection (or sends the datagram) and waits for the answer.
pub fn run(cluster: &Cluster, probe: &Probe) -> Result<Observation> {
    let netns = match probe.from {
        Source::Pod(name) => {
            cluster.netns(cluster.pod(name).ok_or_else(|| anyhow!("no pod {name}"))?)
        }
        Source::Node => cluster.node_ns(),
    };
    let to = cluster
        .pod(probe.to)
        .ok_or_else(|| anyhow!("no pod {}", probe.to))?;
    let dst: SocketAddr = cluster::target(to, probe.ipv6, probe.port)?;
    let result = match probe.protocol {
        Protocol::Tcp => tcp_probe(netns, dst, TIMEOUT),
        Protocol::Udp => udp_probe(netns, dst, TIMEOUT),
    };
    Ok(Observation { dst, result })
}
