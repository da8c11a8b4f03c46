//! A step's expectations expanded into probes, against the state after the
//! step's changes.
//!
//! Rules:
//! - A cell from an endpoint to itself is never probed (FORMAT.md says so for
//!   pods; the same holds for `ext:` and `node`).
//! - Sources are pods, externals and the node; services are destinations only.
//! - The port is resolved against the destination: a number must be a port
//!   the destination serves with that protocol (`node` serves any: the step
//!   starts the server); a name must be one of its ports of that protocol.
//!   For a pod (or external) that does not have the name, the cell is an
//!   error, whatever its verdict: there is no port to probe, so a `.` could
//!   never pass and an `X` would pass without testing the enforcer. A
//!   NetworkPolicy named port that a pod lacks is exercised instead by
//!   probing the numbers (as 09-named-port-and-endport.yaml does).
//! - `svc:ns/name` is probed on the service port that matches the table's
//!   port (by number, or by the service port's name) and protocol, at the
//!   cluster IP; the service must have a backend at that step, and every
//!   backend must serve the target port. All backends should deserve the
//!   same verdict: which one answers is the DNAT's choice.
//! - Each cell is probed once per address family both ends have: IPv4
//!   always (every pod has an IPv4 address), IPv6 too between dual-stack
//!   pods (and the node, see [`super::RunConfig::node_ipv6`]); an external
//!   or a service has the family of its one address.
//! - A probe written twice in a step (two tables, a table and a single
//!   probe) is run once; written with both verdicts it is an error.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use super::error::{Location, Problem, ScenarioErrors};
use super::scenario::{Endpoint, Expectation, PortRef, Protocol, Server, Verdict};
use super::state::ScenarioState;

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// One connection to attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Where it starts (a pod, an external host or the node).
    pub from: Endpoint,
    /// Where it goes.
    pub to: Endpoint,
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// The port to connect to: the destination's port, or for a service
    /// the service port (named ports already resolved).
    pub port: u16,
    /// The address family of the connection.
    pub family: Family,
    /// The address to connect to: the pod's or external's address of
    /// `family`, the service's cluster IP; `None` for the node (whose
    /// address the executor knows).
    pub dst_ip: Option<IpAddr>,
    /// What must happen.
    pub expected: Verdict,
}

impl Probe {
    /// Whether the probe needs SCTP sockets: where the kernel has none, the
    /// executor reports it [`super::Observed::Skipped`].
    pub fn needs_sctp(&self) -> bool {
        self.protocol == Protocol::Sctp
    }
}

impl fmt::Display for Probe {
    /// `x/a -> svc:x/s TCP 8080 (IPv4)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {} {} ({})",
            self.from, self.to, self.protocol, self.port, self.family
        )
    }
}

/// How a matrix maps to probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableCheck {
    /// Its index in the step's `expect`.
    pub expect_index: usize,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its port, as written.
    pub port: PortRef,
    /// Destinations.
    pub columns: Vec<Endpoint>,
    /// Sources.
    pub rows: Vec<Endpoint>,
    /// `cells[row][column]`.
    pub cells: Vec<Vec<CellCheck>>,
}

/// One cell of a matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CellCheck {
    /// From an endpoint to itself: not probed.
    SelfCell,
    /// The probes of the cell (one per address family), indices into
    /// [`super::StepPlan::probes`].
    Probes {
        expected: Verdict,
        probes: Vec<usize>,
    },
}

/// How an `expect` entry maps to probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A matrix.
    Table(TableCheck),
    /// A single probe (one probe per address family).
    Single {
        expect_index: usize,
        expected: Verdict,
        probes: Vec<usize>,
    },
}

/// A step's probes and what the step must start on the node.
#[derive(Debug, Default)]
pub struct Expanded {
    /// Every probe, once.
    pub probes: Vec<Probe>,
    /// One check per `expect` entry.
    pub checks: Vec<Check>,
    /// `(protocol, port)` servers the node needs.
    pub node_servers: BTreeSet<(Protocol, u16)>,
}

/// Expands the `expect` entries of step `step` (from 0) against `state`.
pub fn expand(
    step: usize,
    expect: &[Expectation],
    state: &ScenarioState<'_>,
) -> Result<Expanded, ScenarioErrors> {
    let mut x = Expander {
        state,
        out: Expanded::default(),
        seen: HashMap::new(),
        errors: ScenarioErrors::default(),
    };
    for (index, expectation) in expect.iter().enumerate() {
        let at = Location::Expect { step, index };
        match expectation {
            Expectation::Table(table) => {
                let sources: Vec<Option<Vec<Family>>> =
                    table.rows.iter().map(|(ep, _)| x.source(ep, &at)).collect();
                let dests: Vec<Option<Dest>> = table
                    .columns
                    .iter()
                    .map(|col| {
                        // A column only its own row would probe is not resolved.
                        let probed = table.rows.iter().any(|(row, _)| row != col);
                        if probed {
                            x.dest(col, table.protocol, &table.port, &at)
                        } else {
                            None
                        }
                    })
                    .collect();
                let mut cells = Vec::new();
                for ((from, verdicts), families) in table.rows.iter().zip(&sources) {
                    let mut row = Vec::new();
                    for ((to, verdict), dest) in table.columns.iter().zip(verdicts).zip(&dests) {
                        if from == to {
                            row.push(CellCheck::SelfCell);
                            continue;
                        }
                        let (Some(families), Some(dest)) = (families, dest) else {
                            continue;
                        };
                        let probes =
                            x.probes(from, to, families, dest, table.protocol, *verdict, &at);
                        row.push(CellCheck::Probes {
                            expected: *verdict,
                            probes,
                        });
                    }
                    cells.push(row);
                }
                x.out.checks.push(Check::Table(TableCheck {
                    expect_index: index,
                    protocol: table.protocol,
                    port: table.port.clone(),
                    columns: table.columns.clone(),
                    rows: table.rows.iter().map(|(ep, _)| ep.clone()).collect(),
                    cells,
                }));
            }
            Expectation::Single(single) => {
                let families = x.source(&single.from, &at);
                let dest = x.dest(&single.to, single.protocol, &single.port, &at);
                if let (Some(families), Some(dest)) = (families, dest) {
                    let probes = x.probes(
                        &single.from,
                        &single.to,
                        &families,
                        &dest,
                        single.protocol,
                        single.verdict,
                        &at,
                    );
                    x.out.checks.push(Check::Single {
                        expect_index: index,
                        expected: single.verdict,
                        probes,
                    });
                }
            }
        }
    }
    x.errors.into_result(x.out)
}

/// A resolved destination.
struct Dest {
    port: u16,
    addrs: Vec<(Family, Option<IpAddr>)>,
    node: bool,
}

struct Expander<'s, 'a> {
    state: &'s ScenarioState<'a>,
    out: Expanded,
    seen: HashMap<(Endpoint, Endpoint, Protocol, u16, Family), usize>,
    errors: ScenarioErrors,
}

impl Expander<'_, '_> {
    fn fail<T>(&mut self, at: &Location, problem: Problem) -> Option<T> {
        self.errors.push(at.clone(), problem);
        None
    }

    fn node_families(&self) -> Vec<Family> {
        if self.state.config().node_ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    /// The families a source can probe from.
    fn source(&mut self, ep: &Endpoint, at: &Location) -> Option<Vec<Family>> {
        match ep {
            Endpoint::Pod(name) => match self.state.pod(name) {
                Some(pod) => Some(if pod.ip6.is_some() {
                    vec![Family::V4, Family::V6]
                } else {
                    vec![Family::V4]
                }),
                None => self.fail(at, Problem::NoSuchEndpoint(ep.clone())),
            },
            Endpoint::External(name) => match self.state.external(name) {
                Some(ext) => Some(vec![Family::of(ext.ip)]),
                None => self.fail(at, Problem::NoSuchEndpoint(ep.clone())),
            },
            Endpoint::Node => Some(self.node_families()),
            Endpoint::Service(_) => self.fail(at, Problem::ServiceAsSource(ep.clone())),
        }
    }

    /// Resolves a destination and its port.
    fn dest(
        &mut self,
        ep: &Endpoint,
        protocol: Protocol,
        port: &PortRef,
        at: &Location,
    ) -> Option<Dest> {
        let state = self.state;
        let resolved = match ep {
            Endpoint::Pod(name) => match state.pod(name) {
                Some(pod) => resolve(&pod.servers, ep, protocol, port).map(|port| Dest {
                    port,
                    addrs: [Family::V4, Family::V6]
                        .into_iter()
                        .filter_map(|f| pod.ip_of(f).map(|ip| (f, Some(ip))))
                        .collect(),
                    node: false,
                }),
                None => Err(Problem::NoSuchEndpoint(ep.clone())),
            },
            Endpoint::External(name) => match state.external(name) {
                Some(ext) => resolve(&ext.servers, ep, protocol, port).map(|port| Dest {
                    port,
                    addrs: vec![(Family::of(ext.ip), Some(ext.ip))],
                    node: false,
                }),
                None => Err(Problem::NoSuchEndpoint(ep.clone())),
            },
            Endpoint::Service(name) => match state.service(name) {
                Some(svc) => self.service_dest(ep, svc, protocol, port),
                None => Err(Problem::NoSuchEndpoint(ep.clone())),
            },
            Endpoint::Node => match port {
                PortRef::Name(_) => Err(Problem::NodeNamedPort),
                PortRef::Number(n) => Ok(Dest {
                    port: *n,
                    addrs: self
                        .node_families()
                        .into_iter()
                        .map(|f| (f, None))
                        .collect(),
                    node: true,
                }),
            },
        };
        resolved.map_or_else(|problem| self.fail(at, problem), Some)
    }

    fn service_dest(
        &self,
        ep: &Endpoint,
        svc: &super::scenario::Service,
        protocol: Protocol,
        port: &PortRef,
    ) -> Result<Dest, Problem> {
        let matches = |sp: &super::scenario::ServicePort| {
            sp.protocol == protocol
                && match port {
                    PortRef::Number(n) => sp.port == *n,
                    PortRef::Name(name) => sp.name.as_ref() == Some(name),
                }
        };
        let sp = svc
            .ports
            .iter()
            .find(|sp| matches(sp))
            .ok_or_else(|| Problem::NoServicePort {
                service: ep.clone(),
                protocol,
                port: port.clone(),
            })?;
        let rules = self.state.service_rules(&svc.name).and_then(|r| {
            r.ports
                .iter()
                .find(|p| p.port == sp.port && p.protocol == sp.protocol)
        });
        let backends = rules.map(|r| r.backends.as_slice()).unwrap_or_default();
        if backends.is_empty() {
            return Err(Problem::NoBackends(ep.clone()));
        }
        for backend in backends {
            let pod = self
                .state
                .pod(&backend.pod)
                .expect("backends are live pods");
            if !pod
                .servers
                .iter()
                .any(|s| s.port == backend.port && s.protocol == protocol)
            {
                return Err(Problem::NoServer {
                    endpoint: Endpoint::Pod(backend.pod.clone()),
                    protocol,
                    port: backend.port,
                });
            }
        }
        Ok(Dest {
            port: sp.port,
            addrs: vec![(Family::of(svc.cluster_ip), Some(svc.cluster_ip))],
            node: false,
        })
    }

    /// The probes of one cell or single probe: one per common family.
    #[allow(clippy::too_many_arguments)]
    fn probes(
        &mut self,
        from: &Endpoint,
        to: &Endpoint,
        families: &[Family],
        dest: &Dest,
        protocol: Protocol,
        expected: Verdict,
        at: &Location,
    ) -> Vec<usize> {
        let mut indices = Vec::new();
        for &(family, dst_ip) in dest.addrs.iter().filter(|(f, _)| families.contains(f)) {
            let probe = Probe {
                from: from.clone(),
                to: to.clone(),
                protocol,
                port: dest.port,
                family,
                dst_ip,
                expected,
            };
            let key = (from.clone(), to.clone(), protocol, dest.port, family);
            if let Some(&i) = self.seen.get(&key) {
                if self.out.probes[i].expected != expected {
                    self.errors.push(
                        at.clone(),
                        Problem::ConflictingExpectations {
                            probe: probe.to_string(),
                        },
                    );
                }
                indices.push(i);
                continue;
            }
            if dest.node {
                self.out.node_servers.insert((protocol, dest.port));
            }
            self.seen.insert(key, self.out.probes.len());
            indices.push(self.out.probes.len());
            self.out.probes.push(probe);
        }
        if indices.is_empty() {
            self.errors.push(
                at.clone(),
                Problem::NoCommonFamily {
                    from: from.clone(),
                    to: to.clone(),
                },
            );
        }
        indices
    }
}

/// The port `port` names on a destination serving `servers`.
fn resolve(
    servers: &[Server],
    ep: &Endpoint,
    protocol: Protocol,
    port: &PortRef,
) -> Result<u16, Problem> {
    match port {
        PortRef::Number(n)
            if servers
                .iter()
                .any(|s| s.port == *n && s.protocol == protocol) =>
        {
            Ok(*n)
        }
        PortRef::Number(n) => Err(Problem::NoServer {
            endpoint: ep.clone(),
            protocol,
            port: *n,
        }),
        PortRef::Name(name) => servers
            .iter()
            .find(|s| s.name.as_ref() == Some(name) && s.protocol == protocol)
            .map(|s| s.port)
            .ok_or_else(|| Problem::NoNamedPort {
                endpoint: ep.clone(),
                protocol,
                name: name.clone(),
            }),
    }
}
