//! The scenario as a pure state machine. [`ScenarioState::new`] yields the
//! changes that build the starting cluster; each [`ScenarioState::advance`]
//! yields the changes of the next step and the probes to run after it. The
//! executor carries the [`Change`]s out in order and runs the probes; it
//! decides nothing itself.
//!
//! Rules (FORMAT.md, and where it is silent, Kubernetes):
//! - A step's `delete` entries run first, then its `apply` entries, each list
//!   in order (so deleting and applying a pod in one step re-creates it).
//! - Applying an existing Namespace or Pod changes only its labels (replaced
//!   by the applied `metadata.labels`; none means none). Its IP and servers
//!   stay; an applied pod whose container ports or `status` IPs differ from
//!   the live pod's is an error, as the API server would reject it. Applying
//!   it with the same labels changes nothing.
//! - A new Pod gets the servers its `spec.containers[].ports` name, the IPs of
//!   its `status.podIP`/`status.podIPs` if written, else an IPv4 address from
//!   the pool ([`super::ipam`]). Its object for the source gets
//!   `spec.nodeName` (unless set) and a `Running` status with those IPs.
//! - Deleting a Namespace deletes everything in it (objects, pods, services).
//! - Services are those of the `cluster` section; their backends follow the
//!   pods' labels and are re-announced ([`Change::SetService`]) when they
//!   change. A named `targetPort` resolves per pod; a pod without it is no
//!   backend (as with EndpointSlices).
//! - `node` servers are started by the step whose probes first need them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::error::{Location, Problem, ScenarioErrors};
use super::ipam::Allocator;
use super::objects::{self, container_servers, known, parse_status_ips};
use super::plan::{
    Backend, Change, Plan, PodInfo, RunConfig, ServicePortRules, ServiceRules, StepPlan,
};
use super::probes::{self, Family};
use super::scenario::{
    External, KnownObject, Labels, NamespacedName, ObjectKey, PortRef, Protocol, Scenario, Server,
    Service, SourceObject,
};
use super::syntax::{namespace_labels, usable_ip};
use super::validate::explicit_ips;

impl Scenario {
    /// Plans every step with `config` (a scenario that loaded plans without
    /// error with the default config; another pool may run out).
    pub fn plan(&self, config: &RunConfig) -> Result<Plan, ScenarioErrors> {
        let (mut state, setup) = ScenarioState::new(self, config)?;
        let mut steps = Vec::new();
        while let Some(step) = state.advance()? {
            steps.push(step);
        }
        Ok(Plan { setup, steps })
    }
}

#[derive(Clone, Debug)]
struct LivePod {
    info: PodInfo,
    object: core::Pod,
}

/// The state of the cluster between steps (see the module docs).
#[derive(Clone, Debug)]
pub struct ScenarioState<'a> {
    scenario: &'a Scenario,
    config: RunConfig,
    next_step: usize,
    namespaces: BTreeMap<String, core::Namespace>,
    pods: BTreeMap<NamespacedName, LivePod>,
    externals: BTreeMap<String, External>,
    services: BTreeMap<NamespacedName, &'a Service>,
    service_rules: BTreeMap<NamespacedName, ServiceRules>,
    node_servers: BTreeSet<(Protocol, u16)>,
    objects: BTreeMap<ObjectKey, SourceObject>,
    allocator: Allocator,
}

impl<'a> ScenarioState<'a> {
    /// The starting cluster of `scenario` and the changes that build it:
    /// namespaces, externals, pods (file order), services.
    pub fn new(
        scenario: &'a Scenario,
        config: &RunConfig,
    ) -> Result<(Self, Vec<Change>), ScenarioErrors> {
        let mut state = Self {
            scenario,
            config: config.clone(),
            next_step: 0,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            externals: BTreeMap::new(),
            services: BTreeMap::new(),
            service_rules: BTreeMap::new(),
            node_servers: BTreeSet::new(),
            objects: BTreeMap::new(),
            allocator: Allocator::new(
                config.pool,
                explicit_ips(scenario)
                    .into_iter()
                    .chain(config.node_ips.iter().copied()),
            ),
        };
        let mut changes = Vec::new();
        let mut errors = ScenarioErrors::default();
        let cluster = &scenario.cluster;
        for ns in &cluster.namespaces {
            let object = core::Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.name.clone()),
                    labels: Some(ns.labels.clone()),
                    ..ObjectMeta::default()
                },
                ..core::Namespace::default()
            };
            state.namespaces.insert(ns.name.clone(), object.clone());
            changes.push(Change::AddNamespace {
                name: ns.name.clone(),
                labels: ns.labels.clone(),
                object: known(KnownObject::Namespace(object)),
            });
        }
        for ext in &cluster.externals {
            state.externals.insert(ext.name.clone(), ext.clone());
            changes.push(Change::AddExternal(ext.clone()));
        }
        for (i, pod) in cluster.pods.iter().enumerate() {
            let written = pod
                .ip
                .map(IpAddr::V4)
                .into_iter()
                .chain(pod.ip6.map(IpAddr::V6));
            for ip in written.filter(|ip| config.node_ips.contains(ip)) {
                errors.push(
                    Location::Pod(i),
                    Problem::IpCollision {
                        ip,
                        first: "the node".into(),
                        second: format!("pod {}", pod.name),
                    },
                );
            }
            let Some(ip) = pod.ip.or_else(|| state.allocator.allocate()) else {
                errors.push(
                    Location::Pod(i),
                    Problem::PoolExhausted(config.pool.to_string()),
                );
                continue;
            };
            let info = PodInfo {
                name: pod.name.clone(),
                labels: pod.labels.clone(),
                ip,
                ip6: pod.ip6,
                servers: pod.servers.clone(),
            };
            let object = objects::cluster_pod(&info, &config.node_name);
            changes.push(state.add_pod(info, object));
        }
        for svc in &cluster.services {
            state.services.insert(svc.name.clone(), svc);
        }
        state.update_services(&mut changes);
        errors.into_result((state, changes))
    }

    /// Plans the next step: its changes and probes. `Ok(None)` after the
    /// last step. On error the state is left mid-step: stop there.
    pub fn advance(&mut self) -> Result<Option<StepPlan>, ScenarioErrors> {
        let index = self.next_step;
        let Some(step) = self.scenario.steps.get(index) else {
            return Ok(None);
        };
        self.next_step += 1;
        let mut errors = ScenarioErrors::default();
        let mut changes = Vec::new();
        for (i, key) in step.delete.iter().enumerate() {
            if let Err(problem) = self.delete(key, &mut changes) {
                errors.push(
                    Location::Delete {
                        step: index,
                        index: i,
                    },
                    problem,
                );
            }
        }
        for (i, object) in step.apply.iter().enumerate() {
            if let Err(problem) = self.apply(object, &mut changes) {
                errors.push(
                    Location::Apply {
                        step: index,
                        index: i,
                    },
                    problem,
                );
            }
        }
        self.update_services(&mut changes);
        errors.into_result(())?;

        let expanded = probes::expand(index, &step.expect, self)?;
        for (protocol, port) in expanded.node_servers {
            if self.node_servers.insert((protocol, port)) {
                changes.push(Change::AddNodeServer(Server {
                    port,
                    protocol,
                    name: None,
                }));
            }
        }
        Ok(Some(StepPlan {
            number: index + 1,
            about: step.about.clone(),
            changes,
            probes: expanded.probes,
            checks: expanded.checks,
        }))
    }

    /// The run's configuration.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// A live pod.
    pub fn pod(&self, name: &NamespacedName) -> Option<&PodInfo> {
        self.pods.get(name).map(|p| &p.info)
    }

    /// The live pods, by name.
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values().map(|p| &p.info)
    }

    /// A live namespace's labels.
    pub fn namespace_labels(&self, name: &str) -> Option<&Labels> {
        self.namespaces
            .get(name)
            .and_then(|ns| ns.metadata.labels.as_ref())
    }

    /// An external host.
    pub fn external(&self, name: &str) -> Option<&External> {
        self.externals.get(name)
    }

    /// A live service.
    pub fn service(&self, name: &NamespacedName) -> Option<&Service> {
        self.services.get(name).copied()
    }

    /// A live service's current DNAT rules.
    pub fn service_rules(&self, name: &NamespacedName) -> Option<&ServiceRules> {
        self.service_rules.get(name)
    }

    /// The applied objects other than Namespaces and Pods (policies, ...).
    pub fn objects(&self) -> impl Iterator<Item = &SourceObject> {
        self.objects.values()
    }

    fn add_pod(&mut self, info: PodInfo, object: core::Pod) -> Change {
        let change = Change::AddPod {
            pod: info.clone(),
            object: known(KnownObject::Pod(Box::new(object.clone()))),
        };
        self.pods
            .insert(info.name.clone(), LivePod { info, object });
        change
    }

    /// Who uses `ip` now, if anyone.
    fn address_owner(&self, ip: IpAddr) -> Option<String> {
        if self.config.node_ips.contains(&ip) {
            return Some("the node".into());
        }
        if let Some(p) = self
            .pods()
            .find(|p| p.ip_of(Family::V4) == Some(ip) || p.ip_of(Family::V6) == Some(ip))
        {
            return Some(format!("pod {}", p.name));
        }
        if let Some(e) = self.externals.values().find(|e| e.ip == ip) {
            return Some(format!("external {}", e.name));
        }
        self.services
            .values()
            .find(|s| s.cluster_ip == ip)
            .map(|s| format!("service {}", s.name))
    }

    fn delete(&mut self, key: &ObjectKey, changes: &mut Vec<Change>) -> Result<(), Problem> {
        let missing = || Problem::NothingToDelete(key.clone());
        if self.objects.remove(key).is_some() {
            changes.push(Change::Delete(key.clone()));
            return Ok(());
        }
        match (key.kind.as_str(), &key.namespace) {
            ("Namespace", None) => {
                if !self.namespaces.contains_key(&key.name) {
                    return Err(missing());
                }
                let inside = |ns: &Option<String>| ns.as_deref() == Some(key.name.as_str());
                let objects: Vec<ObjectKey> = self
                    .objects
                    .keys()
                    .filter(|k| inside(&k.namespace))
                    .cloned()
                    .collect();
                for k in objects {
                    self.objects.remove(&k);
                    changes.push(Change::Delete(k));
                }
                let pods: Vec<NamespacedName> = self
                    .pods
                    .keys()
                    .filter(|p| p.namespace == key.name)
                    .cloned()
                    .collect();
                for pod in pods {
                    self.pods.remove(&pod);
                    changes.push(Change::RemovePod {
                        key: ObjectKey::pod(&pod),
                        pod,
                    });
                }
                let services: Vec<NamespacedName> = self
                    .services
                    .keys()
                    .filter(|s| s.namespace == key.name)
                    .cloned()
                    .collect();
                for svc in services {
                    self.remove_service(&svc, changes);
                }
                self.namespaces.remove(&key.name);
                changes.push(Change::RemoveNamespace {
                    name: key.name.clone(),
                    key: key.clone(),
                });
            }
            ("Pod", Some(ns)) => {
                let pod = NamespacedName::new(ns, &key.name);
                self.pods.remove(&pod).ok_or_else(missing)?;
                changes.push(Change::RemovePod {
                    pod,
                    key: key.clone(),
                });
            }
            ("Service", Some(ns)) => {
                let svc = NamespacedName::new(ns, &key.name);
                if !self.services.contains_key(&svc) {
                    return Err(missing());
                }
                self.remove_service(&svc, changes);
            }
            _ => return Err(missing()),
        }
        Ok(())
    }

    fn remove_service(&mut self, svc: &NamespacedName, changes: &mut Vec<Change>) {
        self.services.remove(svc);
        if self.service_rules.remove(svc).is_some() {
            changes.push(Change::RemoveService(svc.clone()));
        }
    }

    fn apply(&mut self, object: &SourceObject, changes: &mut Vec<Change>) -> Result<(), Problem> {
        if let Some(ns) = &object.key.namespace
            && !self.namespaces.contains_key(ns)
        {
            return Err(Problem::UnknownNamespace(ns.clone()));
        }
        match &object.typed {
            Some(KnownObject::Namespace(ns)) => self.apply_namespace(ns, changes),
            Some(KnownObject::Pod(pod)) => self.apply_pod(pod, &object.key, changes),
            Some(KnownObject::NetworkPolicy(_)) | None => {
                self.objects.insert(object.key.clone(), object.clone());
                changes.push(Change::Apply(object.clone()));
                Ok(())
            }
        }
    }

    fn apply_namespace(
        &mut self,
        ns: &core::Namespace,
        changes: &mut Vec<Change>,
    ) -> Result<(), Problem> {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let labels = namespace_labels(&name, &ns.metadata.labels.clone().unwrap_or_default())?;
        let existed = match self.namespaces.get(&name) {
            Some(live) if live.metadata.labels.as_ref() == Some(&labels) => return Ok(()),
            Some(_) => true,
            None => false,
        };
        let mut object = ns.clone();
        object.metadata.labels = Some(labels.clone());
        self.namespaces.insert(name.clone(), object.clone());
        let object = known(KnownObject::Namespace(object));
        changes.push(if existed {
            Change::RelabelNamespace {
                name,
                labels,
                object,
            }
        } else {
            Change::AddNamespace {
                name,
                labels,
                object,
            }
        });
        Ok(())
    }

    fn apply_pod(
        &mut self,
        pod: &core::Pod,
        key: &ObjectKey,
        changes: &mut Vec<Change>,
    ) -> Result<(), Problem> {
        let name = NamespacedName::new(key.namespace.clone().unwrap_or_default(), &key.name);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        let written_ips = parse_status_ips(pod, &name)?;

        if let Some(live) = self.pods.get_mut(&name) {
            if !containers.is_empty() {
                let mut servers = container_servers(containers, &name)?;
                let mut live_servers = live.info.servers.clone();
                servers.sort();
                live_servers.sort();
                if servers != live_servers {
                    return Err(Problem::ImmutablePod {
                        pod: name,
                        what: "its container ports",
                    });
                }
            }
            let live_ips = [live.info.ip_of(Family::V4), live.info.ip_of(Family::V6)];
            if written_ips.iter().any(|ip| !live_ips.contains(&Some(*ip))) {
                return Err(Problem::ImmutablePod {
                    pod: name,
                    what: "its IP",
                });
            }
            if live.info.labels == labels {
                return Ok(());
            }
            live.info.labels = labels.clone();
            live.object.metadata.labels = Some(labels.clone());
            let object = known(KnownObject::Pod(Box::new(live.object.clone())));
            changes.push(Change::RelabelPod {
                pod: name,
                labels,
                object,
            });
            return Ok(());
        }

        if containers.is_empty() {
            return Err(Problem::NoContainers(name));
        }
        let servers = container_servers(containers, &name)?;
        let what = format!("pod {name}");
        for ip in &written_ips {
            usable_ip(*ip)?;
            if let Some(first) = self.address_owner(*ip) {
                return Err(Problem::IpCollision {
                    ip: *ip,
                    first,
                    second: what,
                });
            }
        }
        let v4 = written_ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        let ip6 = written_ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        let ip = match v4 {
            Some(ip) => ip,
            None => self
                .allocator
                .allocate()
                .ok_or_else(|| Problem::PoolExhausted(self.config.pool.to_string()))?,
        };
        let info = PodInfo {
            name,
            labels,
            ip,
            ip6,
            servers,
        };
        let object = objects::running(pod.clone(), &info, &self.config.node_name);
        changes.push(self.add_pod(info, object));
        Ok(())
    }

    /// Recomputes every service's rules; announces those that changed.
    fn update_services(&mut self, changes: &mut Vec<Change>) {
        let services: Vec<&Service> = self.services.values().copied().collect();
        for svc in services {
            let rules = self.rules_of(svc);
            if self.service_rules.get(&svc.name) != Some(&rules) {
                self.service_rules.insert(svc.name.clone(), rules.clone());
                changes.push(Change::SetService(rules));
            }
        }
    }

    fn rules_of(&self, svc: &Service) -> ServiceRules {
        let family = Family::of(svc.cluster_ip);
        let selected: Vec<&PodInfo> = self
            .pods()
            .filter(|p| p.name.namespace == svc.name.namespace)
            .filter(|p| {
                !svc.selector.is_empty()
                    && svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .collect();
        let ports = svc
            .ports
            .iter()
            .map(|sp| ServicePortRules {
                port: sp.port,
                protocol: sp.protocol,
                backends: selected
                    .iter()
                    .filter_map(|pod| {
                        let ip = pod.ip_of(family)?;
                        let port = match &sp.target_port {
                            PortRef::Number(n) => *n,
                            PortRef::Name(name) => {
                                pod.servers
                                    .iter()
                                    .find(|s| {
                                        s.name.as_ref() == Some(name) && s.protocol == sp.protocol
                                    })?
                                    .port
                            }
                        };
                        Some(Backend {
                            pod: pod.name.clone(),
                            ip,
                            port,
                        })
                    })
                    .collect(),
            })
            .collect();
        ServiceRules {
            service: svc.name.clone(),
            cluster_ip: svc.cluster_ip,
            ports,
        }
    }
}
