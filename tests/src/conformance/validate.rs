//! What a valid scenario is. [`validate`] checks what can be checked on the
//! file alone (names, labels, ports, addresses, objects, matrix shapes), then
//! plans the whole scenario with the default [`RunConfig`]: that dry run
//! checks what depends on the step (a pod referenced before it exists or
//! after its deletion, ports the destination does not serve, named ports,
//! service backends, colliding addresses of new pods).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use super::error::{Location, Problem, ScenarioErrors};
use super::matrix;
use super::objects::{source_object, status_ips};
use super::plan::RunConfig;
use super::scenario::{
    Cluster, Endpoint, Expectation, External, KnownObject, NamespaceDef, NamespacedName, ObjectKey,
    PodDef, PortRef, Scenario, Server, Service, ServicePort, SingleProbe, Step,
};
use super::spec::{ExpectSpec, PortSpec, ScenarioFile};
use super::syntax::{
    check_labels, check_server, dns_label, dns_subdomain, kebab_case, namespace_labels, port_name,
    usable_ip,
};

/// Validates `file` (read from `path`) and returns the scenario, or every
/// problem found.
pub fn validate(file: ScenarioFile, path: &Path) -> Result<Scenario, ScenarioErrors> {
    let mut errors = ScenarioErrors::default();
    if let Err(rule) = kebab_case(&file.name) {
        errors.push(
            Location::Scenario,
            Problem::InvalidName {
                what: "scenario name",
                name: file.name.clone(),
                rule,
            },
        );
    }
    let cluster = cluster(&file, &mut errors);
    if file.steps.is_empty() {
        errors.push(Location::Scenario, Problem::NoSteps);
    }
    let mut steps = Vec::new();
    for (index, spec) in file.steps.into_iter().enumerate() {
        let mut step = Step {
            about: spec.about,
            apply: Vec::new(),
            delete: Vec::new(),
            expect: Vec::new(),
        };
        for (i, value) in spec.apply.into_iter().enumerate() {
            match source_object(value) {
                Ok(object) => step.apply.push(object),
                Err(problem) => errors.push(
                    Location::Apply {
                        step: index,
                        index: i,
                    },
                    problem,
                ),
            }
        }
        for (i, delete) in spec.delete.into_iter().enumerate() {
            let at = Location::Delete {
                step: index,
                index: i,
            };
            if delete.kind == "Namespace" && delete.namespace.is_some() {
                errors.push(at, Problem::ClusterScoped(delete.kind.clone()));
                continue;
            }
            step.delete.push(ObjectKey {
                kind: delete.kind,
                namespace: delete.namespace,
                name: delete.name,
            });
        }
        if spec.expect.is_empty() {
            errors.push(Location::Step(index), Problem::NoExpectations);
        }
        for (i, expect) in spec.expect.into_iter().enumerate() {
            if let Some(e) = expectation(expect, (index, i), &mut errors) {
                step.expect.push(e);
            }
        }
        steps.push(step);
    }

    let scenario = Scenario {
        name: file.name,
        about: file.about,
        path: path.to_owned(),
        cluster,
        steps,
    };
    errors.into_result(())?;
    scenario.plan(&RunConfig::default())?;
    Ok(scenario)
}

/// The `cluster` section, checked.
fn cluster(file: &ScenarioFile, errors: &mut ScenarioErrors) -> Cluster {
    let spec = &file.cluster;
    let mut cluster = Cluster::default();
    let mut addresses = Addresses::default();

    for (i, ns) in spec.namespaces.iter().enumerate() {
        let at = || Location::Namespace(i);
        if let Err(rule) = dns_label(&ns.name) {
            errors.push(
                at(),
                Problem::InvalidName {
                    what: "namespace name",
                    name: ns.name.clone(),
                    rule,
                },
            );
        }
        if cluster
            .namespaces
            .iter()
            .any(|n: &NamespaceDef| n.name == ns.name)
        {
            errors.push(
                at(),
                Problem::Duplicate {
                    what: "namespace",
                    name: ns.name.clone(),
                },
            );
            continue;
        }
        match namespace_labels(&ns.name, &ns.labels) {
            Ok(labels) => cluster.namespaces.push(NamespaceDef {
                name: ns.name.clone(),
                labels,
            }),
            Err(problem) => errors.push(at(), problem),
        }
    }
    let namespace_exists = |name: &str| spec.namespaces.iter().any(|n| n.name == name);

    for (i, pod) in spec.pods.iter().enumerate() {
        let at = || Location::Pod(i);
        let name = NamespacedName::new(&pod.namespace, &pod.name);
        if let Err(rule) = dns_subdomain(&pod.name) {
            errors.push(
                at(),
                Problem::InvalidName {
                    what: "pod name",
                    name: pod.name.clone(),
                    rule,
                },
            );
        }
        if !namespace_exists(&pod.namespace) {
            errors.push(at(), Problem::UnknownNamespace(pod.namespace.clone()));
        }
        if cluster.pods.iter().any(|p: &PodDef| p.name == name) {
            errors.push(
                at(),
                Problem::Duplicate {
                    what: "pod",
                    name: name.to_string(),
                },
            );
            continue;
        }
        if let Err(problem) = check_labels(&pod.labels) {
            errors.push(at(), problem);
        }
        let what = format!("pod {name}");
        for ip in pod
            .ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(pod.ip6.map(IpAddr::V6))
        {
            if let Err(problem) = addresses.claim(ip, &what) {
                errors.push(at(), problem);
            }
        }
        let servers = servers(&pod.ports, at, errors);
        cluster.pods.push(PodDef {
            name,
            labels: pod.labels.clone(),
            ip: pod.ip,
            ip6: pod.ip6,
            servers,
        });
    }

    for (i, ext) in spec.externals.iter().enumerate() {
        let at = || Location::External(i);
        if let Err(rule) = dns_label(&ext.name) {
            errors.push(
                at(),
                Problem::InvalidName {
                    what: "external name",
                    name: ext.name.clone(),
                    rule,
                },
            );
        }
        if cluster
            .externals
            .iter()
            .any(|e: &External| e.name == ext.name)
        {
            errors.push(
                at(),
                Problem::Duplicate {
                    what: "external",
                    name: ext.name.clone(),
                },
            );
            continue;
        }
        if let Err(problem) = addresses.claim(ext.ip, &format!("external {}", ext.name)) {
            errors.push(at(), problem);
        }
        let servers = servers(&ext.ports, at, errors);
        cluster.externals.push(External {
            name: ext.name.clone(),
            ip: ext.ip,
            servers,
        });
    }

    for (i, svc) in spec.services.iter().enumerate() {
        let at = || Location::Service(i);
        let name = NamespacedName::new(&svc.namespace, &svc.name);
        if let Err(rule) = dns_label(&svc.name) {
            errors.push(
                at(),
                Problem::InvalidName {
                    what: "service name",
                    name: svc.name.clone(),
                    rule,
                },
            );
        }
        if !namespace_exists(&svc.namespace) {
            errors.push(at(), Problem::UnknownNamespace(svc.namespace.clone()));
        }
        if cluster.services.iter().any(|s: &Service| s.name == name) {
            errors.push(
                at(),
                Problem::Duplicate {
                    what: "service",
                    name: name.to_string(),
                },
            );
            continue;
        }
        if let Err(problem) = check_labels(&svc.selector) {
            errors.push(at(), problem);
        }
        if let Err(problem) = addresses.claim(svc.cluster_ip, &format!("service {name}")) {
            errors.push(at(), problem);
        }
        let mut ports: Vec<ServicePort> = Vec::new();
        for p in &svc.ports {
            let target_port = p.target_port.clone().unwrap_or(PortRef::Number(p.port));
            let problem = if p.port == 0 || target_port == PortRef::Number(0) {
                Some(Problem::PortZero)
            } else if ports
                .iter()
                .any(|q| q.port == p.port && q.protocol == p.protocol)
            {
                Some(Problem::DuplicatePort {
                    port: p.port,
                    protocol: p.protocol,
                })
            } else if let Some(Err(rule)) = p.name.as_deref().map(dns_label) {
                Some(Problem::InvalidName {
                    what: "service port name",
                    name: p.name.clone().unwrap_or_default(),
                    rule,
                })
            } else if let PortRef::Name(n) = &target_port
                && let Err(rule) = port_name(n)
            {
                Some(Problem::InvalidName {
                    what: "targetPort name",
                    name: n.clone(),
                    rule,
                })
            } else if p.name.is_some() && ports.iter().any(|q| q.name == p.name) {
                Some(Problem::Duplicate {
                    what: "service port name",
                    name: p.name.clone().unwrap_or_default(),
                })
            } else {
                None
            };
            match problem {
                Some(problem) => errors.push(at(), problem),
                None => ports.push(ServicePort {
                    port: p.port,
                    protocol: p.protocol,
                    target_port,
                    name: p.name.clone(),
                }),
            }
        }
        cluster.services.push(Service {
            name,
            cluster_ip: svc.cluster_ip,
            selector: svc.selector.clone(),
            ports,
        });
    }
    cluster
}

/// Addresses of the cluster section, to find collisions.
#[derive(Default)]
struct Addresses(BTreeMap<IpAddr, String>);

impl Addresses {
    fn claim(&mut self, ip: IpAddr, what: &str) -> Result<(), Problem> {
        usable_ip(ip)?;
        if let Some(first) = self.0.get(&ip) {
            return Err(Problem::IpCollision {
                ip,
                first: first.clone(),
                second: what.to_owned(),
            });
        }
        self.0.insert(ip, what.to_owned());
        Ok(())
    }
}

/// A `ports` list, checked: no port 0, no port listed twice, names valid
/// and unique.
fn servers(
    ports: &[PortSpec],
    at: impl Fn() -> Location,
    errors: &mut ScenarioErrors,
) -> Vec<Server> {
    let mut servers: Vec<Server> = Vec::new();
    for p in ports {
        let server = Server {
            port: p.port,
            protocol: p.protocol,
            name: p.name.clone(),
        };
        match check_server(&servers, &server) {
            Ok(()) => servers.push(server),
            Err(problem) => errors.push(at(), problem),
        }
    }
    servers
}

/// An `expect` entry: a table or a single probe.
fn expectation(
    spec: ExpectSpec,
    (step, index): (usize, usize),
    errors: &mut ScenarioErrors,
) -> Option<Expectation> {
    let at = Location::Expect { step, index };
    if let PortRef::Number(0) = spec.port {
        errors.push(at, Problem::PortZero);
        return None;
    }
    if let PortRef::Name(name) = &spec.port
        && let Err(rule) = port_name(name)
    {
        errors.push(
            at,
            Problem::InvalidName {
                what: "port name",
                name: name.clone(),
                rule,
            },
        );
        return None;
    }
    let single = spec.from.is_some() || spec.to.is_some() || spec.verdict.is_some();
    match (spec.matrix, single) {
        (Some(_), true) => {
            errors.push(
                at,
                Problem::ExpectShape(
                    "an expect entry has either `matrix` or `from`/`to`/`verdict`, not both",
                ),
            );
            None
        }
        (None, false) => {
            errors.push(
                at,
                Problem::ExpectShape(
                    "an expect entry needs `matrix`, or `from`, `to` and `verdict`",
                ),
            );
            None
        }
        (Some(text), false) => {
            matrix::parse(&text, spec.protocol, spec.port, (step, index), errors)
                .map(Expectation::Table)
        }
        (None, true) => {
            let (Some(from), Some(to), Some(verdict)) = (spec.from, spec.to, spec.verdict) else {
                errors.push(
                    at,
                    Problem::ExpectShape("a single probe needs `from`, `to` and `verdict`"),
                );
                return None;
            };
            let (from, to) = match (matrix::endpoint(&from), matrix::endpoint(&to)) {
                (Ok(from), Ok(to)) => (from, to),
                (Err(problem), _) | (_, Err(problem)) => {
                    errors.push(at, problem);
                    return None;
                }
            };
            let problem = match &from {
                Endpoint::Service(_) => Some(Problem::ServiceAsSource(from.clone())),
                _ if from == to => Some(Problem::SelfProbe(from.clone())),
                _ => None,
            };
            if let Some(problem) = problem {
                errors.push(at, problem);
                return None;
            }
            Some(Expectation::Single(SingleProbe {
                from,
                to,
                protocol: spec.protocol,
                port: spec.port,
                verdict,
            }))
        }
    }
}

/// The set of every IP written in the scenario (cluster section and the
/// `status` of applied pods), which allocation avoids.
pub fn explicit_ips(scenario: &Scenario) -> BTreeSet<IpAddr> {
    let c = &scenario.cluster;
    let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
    for pod in &c.pods {
        ips.extend(pod.ip.map(IpAddr::V4));
        ips.extend(pod.ip6.map(IpAddr::V6));
    }
    ips.extend(c.externals.iter().map(|e| e.ip));
    ips.extend(c.services.iter().map(|s| s.cluster_ip));
    for step in &scenario.steps {
        for object in &step.apply {
            if let Some(KnownObject::Pod(pod)) = &object.typed {
                ips.extend(
                    status_ips(pod)
                        .into_iter()
                        .filter_map(|s| s.parse::<IpAddr>().ok()),
                );
            }
        }
    }
    ips
}
