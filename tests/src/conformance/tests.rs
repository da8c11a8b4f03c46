//! Tests of the pure runner: the shared and the project's scenarios load and
//! agree with an independent reading of the spec, counts by hand, malformed
//! scenarios, the state machine, the report.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use super::*;
use crate::conformance::scenario::Expectation;

fn shared_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/scenarios/netpol");
    if dir.is_dir() {
        Some(dir)
    } else {
        println!(
            "skipping: the shared scenarios are not at {}",
            dir.display()
        );
        None
    }
}

fn own_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn shared(name: &str) -> Option<Scenario> {
    let scenarios = load_dir(&shared_dir()?).expect("shared scenarios load");
    Some(
        scenarios
            .into_iter()
            .find(|s| s.name == name)
            .expect("scenario exists"),
    )
}

/// The scenarios Palisade does not pass yet (kept out of the CI run).
fn known_gaps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios-known-gaps")
}

fn own(name: &str) -> Scenario {
    [own_dir(), known_gaps_dir()]
        .iter()
        .flat_map(|dir| load_dir(dir).expect("own scenarios load"))
        .find(|s| s.name == name)
        .expect("scenario exists")
}

fn probe_counts(scenario: &Scenario) -> Vec<usize> {
    let plan = scenario.plan(&RunConfig::default()).expect("plans");
    plan.steps.iter().map(|s| s.probes.len()).collect()
}

// ---------------------------------------------------------------------------
// Loading the real scenarios.

#[test]
fn shared_scenarios_load_and_validate() {
    let Some(dir) = shared_dir() else { return };
    let scenarios = load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "namespace-isolation-live",
            "deny-egress-except-dns",
            "egress-hole-release-agent-to-core",
            "elasticsearch-ingress-from-tenants",
            "shop-microservice-isolation",
            "deny-all-then-project-ingress",
            "database-only-from-api",
            "ipblock-egress-except",
            "named-port-and-endport",
            "label-changes-move-access",
        ]
    );
}

#[test]
fn own_scenarios_load_and_validate() {
    let scenarios = load_dir(&own_dir()).unwrap_or_else(|e| panic!("{e}"));
    assert!(scenarios.len() >= 3, "{} scenarios", scenarios.len());
    let gaps = load_dir(&known_gaps_dir()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!gaps.is_empty(), "{} known-gap scenarios", gaps.len());
}

/// Every verdict written in a scenario is the one an independent reading of
/// the NetworkPolicy spec gives (see `oracle.rs`).
#[test]
fn expectations_agree_with_the_spec() {
    let mut dirs = vec![own_dir(), known_gaps_dir()];
    let with_shared = shared_dir().is_some();
    dirs.extend(shared_dir());
    let mut disagreements = Vec::new();
    let mut checked = 0;
    for dir in dirs {
        for scenario in load_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
            let (mut state, _) = ScenarioState::new(&scenario, &RunConfig::default()).unwrap();
            while let Some(step) = state.advance().unwrap() {
                for probe in &step.probes {
                    match oracle::verdict(&state, probe) {
                        Some(v) if v == probe.expected => checked += 1,
                        Some(v) => disagreements.push(format!(
                            "{} step {}: {probe}: written {}, spec says {v}",
                            scenario.name, step.number, probe.expected
                        )),
                        None => {}
                    }
                }
            }
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    println!("{checked} probes agree with the spec");
    // Our own scenarios alone have a few hundred probes, the shared ones
    // add more than two thousand: a check that silently covers less fails.
    let floor = if with_shared { 2000 } else { 400 };
    assert!(checked > floor, "only {checked} probes checked");
}

/// The oracle is not vacuous: a wrong cell is caught.
#[test]
fn the_oracle_catches_a_wrong_cell() {
    let wrong = TINY.replace("x/a  .   X", "x/a  .   .");
    let scenario = parse_str(&wrong, Path::new("wrong.yaml")).unwrap();
    let (mut state, _) = ScenarioState::new(&scenario, &RunConfig::default()).unwrap();
    let step = state.advance().unwrap().unwrap();
    let verdicts: Vec<_> = step
        .probes
        .iter()
        .map(|p| oracle::verdict(&state, p))
        .collect();
    assert_eq!(verdicts, [Some(Verdict::Deny), Some(Verdict::Deny)]);
    assert_eq!(step.probes[0].expected, Verdict::Allow);
}

// ---------------------------------------------------------------------------
// Expansion, counted by hand.

#[test]
fn probe_counts_of_shared_scenarios() {
    // 07: 6 rows x 5 columns - 5 diagonal = 25 per table; 3 tables, then
    // 7 x 6 - 6 = 36 per table, 2 tables. IPv4 only.
    let Some(db) = shared("database-only-from-api") else {
        return;
    };
    assert_eq!(probe_counts(&db), [75, 72]);
    // 02: 5 x 4 - 4 = 16 per table, 3 tables, plus 4 single probes.
    assert_eq!(
        probe_counts(&shared("deny-egress-except-dns").unwrap()),
        [52, 52]
    );
    // 01: 8 x 6 - 6 = 42 per table; 2 tables, then 4.
    assert_eq!(
        probe_counts(&shared("namespace-isolation-live").unwrap()),
        [84, 168]
    );
    // 08: 5 x 11 - 5 = 50 per table, 2 tables, + 1 single; then + 4, + 2.
    // edge/dual is the only dual-stack pod and no IPv6 peer is in a table.
    assert_eq!(
        probe_counts(&shared("ipblock-egress-except").unwrap()),
        [101, 104, 102]
    );
}

#[test]
fn probe_counts_of_own_scenarios() {
    // Step 1: UDP 1053 6 x 3 - 3 = 15, TCP dns-tcp 15, TCP 8080 5 x 4 - 4 =
    // 16, UDP 53 3 x 2 = 6, 3 singles.
    assert_eq!(probe_counts(&own("egress-dns-via-service"))[0], 55);
    // Dual-stack: db, c1, c2, c3 and the node have IPv6. Step 1: TCP 5432
    // 8 x 5 - 5 = 35 IPv4, 4 x 4 - 4 + 4 (node) = 16 IPv6; TCP 8080 25 + 16;
    // 2 singles from the IPv6-only ext:office6. Step 2: 51 + (3 cells x 2).
    // Step 3: 6 x 7 - 5 = 37 IPv4 + 16 IPv6, 1 single.
    assert_eq!(
        probe_counts(&own("ipblock-except-pod-ip-dual-stack")),
        [94, 57, 54]
    );
    // Without IPv6 at the node, its 4 IPv6 probes per table go.
    let config = RunConfig {
        node_ipv6: false,
        ..RunConfig::default()
    };
    let plan = own("ipblock-except-pod-ip-dual-stack")
        .plan(&config)
        .unwrap();
    assert_eq!(plan.steps[0].probes.len(), 94 - 8);
}

#[test]
fn diagonal_is_never_probed_and_cells_map_to_probes() {
    let plan = own("relabel-pod-out-of-policy")
        .plan(&RunConfig::default())
        .unwrap();
    let step = &plan.steps[0];
    assert!(step.probes.iter().all(|p| p.from != p.to));
    let Check::Table(table) = &step.checks[0] else {
        panic!("a table")
    };
    assert_eq!(table.cells[0][0], CellCheck::SelfCell);
    let CellCheck::Probes { expected, probes } = &table.cells[2][1] else {
        panic!("probed")
    };
    assert_eq!(*expected, Verdict::Deny);
    let probe = &step.probes[probes[0]];
    assert_eq!(
        probe.to_string(),
        "ops/probe -> web/backend TCP 8080 (IPv4)"
    );
    assert_eq!(
        probe.dst_ip,
        Some(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 11)))
    );
}

#[test]
fn named_ports_resolve_per_destination() {
    let text = TINY.replace("port: 80\n", "port: web\n").replace(
        "ports: [{port: 80, protocol: TCP, name: http}]}",
        "ports: [{port: 8080, protocol: TCP, name: web}]}",
    );
    let text = text.replace(
        "{port: 80, protocol: TCP, name: http}, {port: 81",
        "{port: 80, protocol: TCP, name: web}, {port: 81",
    );
    let scenario = parse_str(&text, Path::new("named.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let plan = scenario.plan(&RunConfig::default()).unwrap();
    let ports: Vec<String> = plan.steps[0]
        .probes
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        ports,
        ["x/a -> x/b TCP 80 (IPv4)", "x/b -> x/a TCP 8080 (IPv4)"]
    );
}

#[test]
fn services_are_probed_on_the_service_port_at_the_cluster_ip() {
    let plan = own("egress-dns-via-service")
        .plan(&RunConfig::default())
        .unwrap();
    let step = &plan.steps[0];
    let svc: Vec<&Probe> = step
        .probes
        .iter()
        .filter(|p| matches!(p.to, Endpoint::Service(_)))
        .collect();
    assert_eq!(svc.len(), 4);
    assert!(
        svc.iter()
            .all(|p| p.port == 53 && p.dst_ip == Some("10.96.0.10".parse().unwrap()))
    );
    // The cluster's pods got 10.244.0.2.. (.1 is the node) in file order;
    // coredns is third.
    let rules = plan.setup.iter().find_map(|c| match c {
        Change::SetService(rules) => Some(rules),
        _ => None,
    });
    let rules = rules.expect("the service is set up");
    assert_eq!(rules.ports.len(), 2);
    for port in &rules.ports {
        assert_eq!(port.port, 53);
        assert_eq!(
            port.backends,
            [Backend {
                pod: NamespacedName::new("kube-system", "coredns"),
                ip: "10.244.0.4".parse().unwrap(),
                port: 1053,
            }]
        );
    }
}

#[test]
fn sctp_probes_are_marked() {
    let plan = own("sctp-port-range").plan(&RunConfig::default()).unwrap();
    let step = &plan.steps[0];
    // 4 tables of 5 x 4 - 4 = 16 probes; three are SCTP.
    assert_eq!(step.probes.len(), 64);
    assert_eq!(step.probes.iter().filter(|p| p.needs_sctp()).count(), 48);
}

#[test]
fn node_servers_start_with_the_first_step_that_needs_them() {
    let text = TINY
        .replace(
            "          x/b  X   .\n",
            "          x/b  X   .\n          node X   X\n",
        )
        .replace("x/a x/b\n", "x/a x/b node\n")
        .replace("x/a  .   X\n", "x/a  .   X   .\n")
        .replace("x/b  X   .\n", "x/b  X   .   .\n")
        .replace("node X   X\n", "node .   .   .\n");
    let scenario = parse_str(&text, Path::new("node.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let plan = scenario
        .plan(&RunConfig {
            node_ipv6: false,
            ..RunConfig::default()
        })
        .unwrap();
    let step = &plan.steps[0];
    assert_eq!(
        step.changes.last(),
        Some(&Change::AddNodeServer(Server {
            port: 80,
            protocol: Protocol::Tcp,
            name: None
        }))
    );
    let to_node = step.probes.iter().find(|p| p.to == Endpoint::Node).unwrap();
    assert_eq!(to_node.dst_ip, None);
    assert_eq!(step.probes.len(), 6);
}

// ---------------------------------------------------------------------------
// The state machine.

#[test]
fn setup_builds_the_cluster() {
    let Some(shop) = shared("shop-microservice-isolation") else {
        return;
    };
    let plan = shop.plan(&RunConfig::default()).unwrap();
    let namespaces = plan
        .setup
        .iter()
        .filter(|c| matches!(c, Change::AddNamespace { .. }))
        .count();
    let pods: Vec<&PodInfo> = plan
        .setup
        .iter()
        .filter_map(|c| match c {
            Change::AddPod { pod, .. } => Some(pod),
            _ => None,
        })
        .collect();
    assert_eq!((namespaces, pods.len()), (3, 7));
    assert_eq!(pods[0].servers.len(), 4);
    let Some(Change::AddNamespace { labels, object, .. }) = plan.setup.first() else {
        panic!()
    };
    assert_eq!(
        labels
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("shop")
    );
    assert!(matches!(object.typed, Some(KnownObject::Namespace(_))));
    // Step 2 only deletes a policy.
    let expected = ObjectKey {
        kind: "NetworkPolicy".into(),
        namespace: Some("shop".into()),
        name: "cortex-access".into(),
    };
    assert_eq!(plan.steps[1].changes, [Change::Delete(expected.clone())]);
    assert_eq!(
        plan.steps[1].changes[0].source_edit(),
        Some(SourceEdit::Delete(&expected))
    );
}

#[test]
fn a_new_pod_gets_an_allocated_ip_and_the_servers_of_its_containers() {
    let Some(db) = shared("database-only-from-api") else {
        return;
    };
    let plan = db.plan(&RunConfig::default()).unwrap();
    let [Change::AddPod { pod, object }] = plan.steps[1].changes.as_slice() else {
        panic!("{:?}", plan.steps[1].changes)
    };
    assert_eq!(pod.name, NamespacedName::new("prod", "migrate"));
    // The first address of the pool is the node's.
    assert_eq!(pod.ip, Ipv4Addr::new(10, 244, 0, 2));
    assert_eq!(pod.servers.len(), 3);
    let Some(KnownObject::Pod(k8s)) = &object.typed else {
        panic!()
    };
    let status = k8s.status.as_ref().unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.2"));
    assert_eq!(
        k8s.spec.as_ref().unwrap().node_name.as_deref(),
        Some("conformance-node")
    );
    assert_eq!(object.value["status"]["podIP"].as_str(), Some("10.244.0.2"));
}

#[test]
fn applying_an_existing_pod_or_namespace_changes_only_labels() {
    let Some(labels) = shared("label-changes-move-access") else {
        return;
    };
    let plan = labels.plan(&RunConfig::default()).unwrap();
    let [
        Change::RelabelNamespace {
            name,
            labels: ns_labels,
            ..
        },
    ] = plan.steps[1].changes.as_slice()
    else {
        panic!("{:?}", plan.steps[1].changes)
    };
    assert_eq!(name, "team-b");
    assert_eq!(
        ns_labels.len(),
        2,
        "team=a and kubernetes.io/metadata.name: {ns_labels:?}"
    );
    let [
        Change::RelabelPod {
            pod,
            labels,
            object,
        },
    ] = plan.steps[2].changes.as_slice()
    else {
        panic!("{:?}", plan.steps[2].changes)
    };
    assert_eq!(pod.to_string(), "backend/frontend");
    assert_eq!(labels.get("role").map(String::as_str), Some("retired"));
    let Some(KnownObject::Pod(k8s)) = &object.typed else {
        panic!()
    };
    assert_eq!(
        k8s.status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.244.1.11")
    );
    assert_eq!(
        k8s.spec.as_ref().unwrap().containers[0]
            .ports
            .as_ref()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn allocation_follows_the_configured_pool() {
    let config = RunConfig {
        pool: "10.250.0.0/24".parse().unwrap(),
        ..RunConfig::default()
    };
    let plan = own("relabel-pod-out-of-policy").plan(&config).unwrap();
    let ips: Vec<Ipv4Addr> = plan
        .setup
        .iter()
        .chain(plan.steps.iter().flat_map(|s| &s.changes))
        .filter_map(|c| match c {
            Change::AddPod { pod, .. } => Some(pod.ip),
            _ => None,
        })
        .collect();
    assert_eq!(
        ips,
        [
            Ipv4Addr::new(10, 244, 1, 10),
            Ipv4Addr::new(10, 244, 1, 11),
            Ipv4Addr::new(10, 250, 0, 1),
            Ipv4Addr::new(10, 250, 0, 2),
        ]
    );
    // 10.244.1.9 and .10 are the pool; .10 is frontend's: one pod gets .9,
    // the next one finds the pool empty.
    let full = RunConfig {
        pool: "10.244.1.8/30".parse().unwrap(),
        ..RunConfig::default()
    };
    let errors = own("relabel-pod-out-of-policy").plan(&full).unwrap_err();
    assert_eq!(errors.0[0].at, Location::Apply { step: 2, index: 0 });
    assert_eq!(
        errors.problems(),
        [&Problem::PoolExhausted("10.244.1.8/30".into())]
    );
}

#[test]
fn deleting_a_namespace_removes_its_contents_and_a_pod_can_be_recreated() {
    let text = TINY.replace(
        "    expect:\n",
        "    expect:\n      - {from: x/a, to: x/b, protocol: TCP, port: 80, verdict: deny}\n",
    ) + r#"
  - about: re-create x/b
    delete:
      - {kind: Pod, namespace: x, name: b}
    apply:
      - apiVersion: v1
        kind: Pod
        metadata: {name: b, namespace: x, labels: {pod: b2}}
        spec: {containers: [{name: s, ports: [{containerPort: 80}]}]}
    expect:
      - {from: x/a, to: x/b, protocol: TCP, port: 80, verdict: deny}
  - about: delete the namespace and create another
    delete:
      - {kind: Namespace, name: x}
    apply:
      - {apiVersion: v1, kind: Namespace, metadata: {name: y}}
      - apiVersion: v1
        kind: Pod
        metadata: {name: c, namespace: y, labels: {pod: c}}
        spec: {containers: [{name: s, ports: [{containerPort: 80, protocol: TCP}]}]}
    expect:
      - {from: ext:web, to: y/c, protocol: TCP, port: 80, verdict: allow}
"#;
    let scenario = parse_str(&text, Path::new("delete.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let plan = scenario.plan(&RunConfig::default()).unwrap();
    let describe = |c: &Change| match c {
        Change::AddPod { pod, .. } => format!("add pod {} {}", pod.name, pod.ip),
        Change::RemovePod { pod, .. } => format!("remove pod {pod}"),
        Change::AddNamespace { name, .. } => format!("add namespace {name}"),
        Change::RemoveNamespace { name, .. } => format!("remove namespace {name}"),
        Change::Delete(key) => format!("delete {key}"),
        other => format!("{other:?}"),
    };
    let changes = |i: usize| {
        plan.steps[i]
            .changes
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
    };
    // x/b had 10.244.0.2; the re-created pod does not reuse it.
    assert_eq!(changes(1), ["remove pod x/b", "add pod x/b 10.244.0.3"]);
    assert_eq!(
        changes(2),
        [
            "delete NetworkPolicy x/deny-all",
            "remove pod x/a",
            "remove pod x/b",
            "remove namespace x",
            "add namespace y",
            "add pod y/c 10.244.0.4",
        ]
    );
}

// ---------------------------------------------------------------------------
// Malformed scenarios.

const TINY: &str = r#"name: tiny
about: a tiny scenario
cluster:
  namespaces:
    - name: x
      labels: {ns: x}
  pods:
    - {name: a, namespace: x, labels: {pod: a}, ip: 10.244.1.10, ports: [{port: 80, protocol: TCP, name: http}]}
    - {name: b, namespace: x, labels: {pod: b}, ports: [{port: 80, protocol: TCP, name: http}, {port: 81, protocol: UDP, name: udp}]}
  externals:
    - {name: web, ip: 192.0.2.10, ports: [{port: 80, protocol: TCP}]}
steps:
  - about: deny all ingress in x
    apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: x}
        spec: {podSelector: {}, policyTypes: [Ingress]}
    expect:
      - protocol: TCP
        port: 80
        matrix: |
          .    x/a x/b
          x/a  .   X
          x/b  X   .
"#;

fn problems(text: &str) -> Vec<Problem> {
    match parse_str(text, Path::new("bad.yaml")) {
        Err(LoadError::Invalid { errors, .. }) => errors.0.into_iter().map(|e| e.problem).collect(),
        Err(other) => panic!("not a validation error: {other}"),
        Ok(_) => panic!("accepted:\n{text}"),
    }
}

fn message(text: &str) -> String {
    parse_str(text, Path::new("bad.yaml"))
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

fn pod(ns: &str, name: &str) -> Endpoint {
    Endpoint::Pod(NamespacedName::new(ns, name))
}

#[test]
fn tiny_is_valid() {
    let scenario = parse_str(TINY, Path::new("tiny.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(probe_counts(&scenario), [2]);
}

#[test]
fn matrix_errors() {
    assert_eq!(
        problems(&TINY.replace(".    x/a x/b", ".    x-a x/b")),
        [Problem::BadEndpoint("x-a".into())]
    );
    assert_eq!(
        problems(&TINY.replace("x/b  X   .", "x/c  X   .")),
        [Problem::NoSuchEndpoint(pod("x", "c"))]
    );
    assert_eq!(
        problems(&TINY.replace("x/a  .   X", "x/a  .   X   .")),
        [Problem::WrongCellCount {
            row: "x/a".into(),
            expected: 2,
            found: 3
        }]
    );
    assert_eq!(
        problems(&TINY.replace("x/a  .   X", "x/a  .   x")),
        [Problem::BadCell {
            row: "x/a".into(),
            column: "x/b".into(),
            cell: "x".into()
        }]
    );
    assert_eq!(
        problems(&TINY.replace("x/a  .   X", "x/a  X   X")),
        [Problem::SelfCell(pod("x", "a"))]
    );
    assert_eq!(
        problems(&TINY.replace(".    x/a x/b", ".    x/a x/a")),
        // and the row x/a now has `X` under a column x/a
        [
            Problem::DuplicateEndpoint {
                what: "column",
                name: pod("x", "a")
            },
            Problem::SelfCell(pod("x", "a"))
        ]
    );
    assert_eq!(
        problems(&TINY.replace("x/b  X   .", "svc:x/s  X   .")),
        [Problem::ServiceAsSource(Endpoint::Service(
            NamespacedName::new("x", "s")
        ))]
    );
    assert_eq!(
        problems(&TINY.replace(
            "protocol: TCP\n        port: 80",
            "protocol: UDP\n        port: 80"
        )),
        [
            Problem::NoServer {
                endpoint: pod("x", "a"),
                protocol: Protocol::Udp,
                port: 80
            },
            Problem::NoServer {
                endpoint: pod("x", "b"),
                protocol: Protocol::Udp,
                port: 80
            },
        ]
    );
    assert_eq!(
        problems(
            &TINY
                .replace("port: 80\n", "port: udp\n")
                .replace("protocol: TCP\n        port", "protocol: UDP\n        port")
        ),
        [Problem::NoNamedPort {
            endpoint: pod("x", "a"),
            protocol: Protocol::Udp,
            name: "udp".into()
        }]
    );
    assert_eq!(
        message(&TINY.replace("x/a  .   X", "x/a  .   X   .")),
        "bad.yaml: invalid scenario:\n  steps[0].expect[0].matrix line 2: row x/a has 3 cells, the header has 2 columns"
    );
}

#[test]
fn cluster_errors() {
    let dup = TINY.replace(
        "{name: b, namespace: x, labels: {pod: b}",
        "{name: a, namespace: x, labels: {pod: b}",
    );
    assert_eq!(
        problems(&dup),
        [Problem::Duplicate {
            what: "pod",
            name: "x/a".into()
        }]
    );
    let collide = TINY.replace(
        "labels: {pod: b}, ports",
        "labels: {pod: b}, ip: 192.0.2.10, ports",
    );
    assert_eq!(
        problems(&collide),
        [Problem::IpCollision {
            ip: "192.0.2.10".parse().unwrap(),
            first: "pod x/b".into(),
            second: "external web".into()
        }]
    );
    let unknown_ns = TINY.replace("{name: b, namespace: x", "{name: b, namespace: z");
    assert!(problems(&unknown_ns).contains(&Problem::UnknownNamespace("z".into())));
    let metadata_name = TINY.replace(
        "labels: {ns: x}",
        "labels: {ns: x, kubernetes.io/metadata.name: y}",
    );
    assert_eq!(
        problems(&metadata_name),
        [Problem::MetadataNameLabel {
            namespace: "x".into(),
            value: "y".into()
        }]
    );
    let dup_port = TINY.replace(
        "{port: 81, protocol: UDP, name: udp}",
        "{port: 80, protocol: TCP, name: udp}",
    );
    assert_eq!(
        problems(&dup_port),
        [Problem::DuplicatePort {
            port: 80,
            protocol: Protocol::Tcp
        }]
    );
    let loopback = TINY.replace("ip: 10.244.1.10", "ip: 127.0.0.1");
    assert!(matches!(
        problems(&loopback)[..],
        [Problem::UnusableIp {
            reason: "loopback",
            ..
        }]
    ));
    let bad_name = TINY.replace("name: tiny", "name: Tiny_Scenario");
    assert!(matches!(
        problems(&bad_name)[..],
        [Problem::InvalidName {
            what: "scenario name",
            ..
        }]
    ));
    let no_steps = TINY.split("steps:").next().unwrap().to_owned() + "steps: []\n";
    assert_eq!(problems(&no_steps), [Problem::NoSteps]);
}

#[test]
fn step_errors() {
    // A pod referenced before the step that creates it.
    let later = TINY
        .replace(".    x/a x/b", ".    x/a x/b x/c")
        .replace("x/a  .   X", "x/a  .   X   .")
        .replace("x/b  X   .", "x/b  X   .   .")
        + r#"
  - about: create x/c
    apply:
      - {apiVersion: v1, kind: Pod, metadata: {name: c, namespace: x}, spec: {containers: [{name: s, ports: [{containerPort: 80}]}]}}
    expect:
      - {from: x/a, to: x/c, protocol: TCP, port: 80, verdict: deny}
"#;
    let errors = match parse_str(&later, Path::new("later.yaml")) {
        Err(LoadError::Invalid { errors, .. }) => errors,
        other => panic!("{:?}", other.map(|s| s.name)),
    };
    assert_eq!(errors.0[0].at, Location::Expect { step: 0, index: 0 });
    assert_eq!(errors.problems(), [&Problem::NoSuchEndpoint(pod("x", "c"))]);

    let policy_ns = TINY.replace(
        "{name: deny-all, namespace: x}",
        "{name: deny-all, namespace: nope}",
    );
    assert_eq!(
        problems(&policy_ns),
        [Problem::UnknownNamespace("nope".into())]
    );
    let api = TINY.replace(
        "apiVersion: networking.k8s.io/v1\n",
        "apiVersion: networking.k8s.io/v1beta1\n",
    );
    assert_eq!(
        problems(&api),
        [Problem::WrongApiVersion {
            kind: "NetworkPolicy".into(),
            found: "networking.k8s.io/v1beta1".into(),
            expected: "networking.k8s.io/v1"
        }]
    );
    let no_ns = TINY.replace("{name: deny-all, namespace: x}", "{name: deny-all}");
    assert_eq!(
        problems(&no_ns),
        [Problem::MissingNamespace("NetworkPolicy".into())]
    );
    let delete = TINY.replace(
        "    expect:\n",
        "    delete:\n      - {kind: NetworkPolicy, namespace: x, name: old}\n    expect:\n",
    );
    assert!(matches!(
        problems(&delete)[..],
        [Problem::NothingToDelete(_)]
    ));
    let both = TINY.replace("        matrix: |", "        from: x/a\n        matrix: |");
    assert!(matches!(problems(&both)[..], [Problem::ExpectShape(_)]));
    let conflict = TINY.replace(
        "    expect:\n",
        "    expect:\n      - {from: x/a, to: x/b, protocol: TCP, port: 80, verdict: allow}\n",
    );
    assert_eq!(
        problems(&conflict),
        [Problem::ConflictingExpectations {
            probe: "x/a -> x/b TCP 80 (IPv4)".into()
        }]
    );
    let moved = TINY.to_owned()
        + "  - about: move x/a\n    apply:\n      - {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x}, status: {podIP: 10.244.9.9}}\n    expect:\n      - {from: x/a, to: x/b, protocol: TCP, port: 80, verdict: deny}\n";
    assert_eq!(
        problems(&moved),
        [Problem::ImmutablePod {
            pod: NamespacedName::new("x", "a"),
            what: "its IP"
        }]
    );
}

#[test]
fn yaml_errors_name_the_file_and_the_field() {
    let typo = TINY.replace("labels: {ns: x}", "lables: {ns: x}");
    let error = parse_str(&typo, Path::new("dir/typo.yaml")).unwrap_err();
    assert!(matches!(error, LoadError::Yaml { .. }));
    let text = error.to_string();
    assert!(text.starts_with("dir/typo.yaml: "), "{text}");
    assert!(text.contains("unknown field `lables`"), "{text}");
    let verdict = TINY.replace(
        "    expect:\n",
        "    expect:\n      - {from: x/a, to: x/b, protocol: TCP, port: 80, verdict: blocked}\n",
    );
    assert!(
        parse_str(&verdict, Path::new("v.yaml"))
            .unwrap_err()
            .to_string()
            .contains("unknown variant `blocked`")
    );
}

#[test]
fn load_dir_reports_every_bad_file_and_sorts_the_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        TINY.replace("name: tiny", "name: tiny-b"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.yml"),
        TINY.replace("name: tiny", "name: tiny-a"),
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a scenario").unwrap();
    let names: Vec<String> = load_dir(dir.path())
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["tiny-a", "tiny-b"]);

    std::fs::write(
        dir.path().join("c.yaml"),
        TINY.replace("name: tiny", "name: tiny-a"),
    )
    .unwrap();
    std::fs::write(dir.path().join("d.yaml"), "name: [").unwrap();
    let error = load_dir(dir.path()).unwrap_err();
    let LoadError::Files(errors) = &error else {
        panic!("{error}")
    };
    assert!(matches!(errors[0], LoadError::DuplicateName { .. }));
    assert!(matches!(&errors[1], LoadError::Yaml { path, .. } if path.ends_with("d.yaml")));

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        load_dir(empty.path()),
        Err(LoadError::NoScenarios { .. })
    ));
}

// ---------------------------------------------------------------------------
// Results and the report.

fn tiny_plan() -> (Scenario, Plan) {
    let text = TINY.replace(
        "    expect:\n",
        "    expect:\n      - {from: ext:web, to: x/b, protocol: TCP, port: 80, verdict: deny}\n",
    );
    let scenario = parse_str(&text, Path::new("tiny.yaml")).unwrap();
    let plan = scenario.plan(&RunConfig::default()).unwrap();
    (scenario, plan)
}

#[test]
fn report_shows_failing_tables_side_by_side() {
    let (scenario, plan) = tiny_plan();
    let step = &plan.steps[0];
    let order: Vec<String> = step.probes.iter().map(ToString::to_string).collect();
    assert_eq!(
        order,
        [
            "ext:web -> x/b TCP 80 (IPv4)",
            "x/a -> x/b TCP 80 (IPv4)",
            "x/b -> x/a TCP 80 (IPv4)"
        ]
    );
    let mut result = ScenarioResult::new(&scenario);
    result.record_step(
        step,
        vec![Observed::Blocked, Observed::Allowed, Observed::Blocked],
    );
    assert_eq!(result.status(), Status::Failed);
    let mut report = Report::default();
    report.push(result);
    assert_eq!(
        report.render(),
        "\
FAIL tiny (tiny.yaml): 1 of 3 probes differ
  (`.` allowed, `X` blocked, `-` skipped, `!` probe error, `*` differs from expected)
  step 1 of 1: deny all ingress in x
    expect[1]: TCP 80: 1 of 2 probes differ
      expected    | observed
      .   x/a x/b | .   x/a x/b
      x/a .   X   | x/a .   .*
      x/b X   .   | x/b X   .
      x/a -> x/b TCP 80 (IPv4): expected deny, observed allowed
0 passed, 1 failed
"
    );
}

#[test]
fn report_lists_failing_single_probes_and_errors() {
    let (scenario, plan) = tiny_plan();
    let mut result = ScenarioResult::new(&scenario);
    result.record_step(
        &plan.steps[0],
        vec![
            Observed::Error("connection refused".into()),
            Observed::Blocked,
            Observed::Blocked,
        ],
    );
    result.record_error("agent did not report enforcement within 30s");
    assert_eq!(
        result.render(),
        "\
FAIL tiny (tiny.yaml): 1 of 3 probes differ
  error: agent did not report enforcement within 30s
  (`.` allowed, `X` blocked, `-` skipped, `!` probe error, `*` differs from expected)
  step 1 of 1: deny all ingress in x
    expect[0]: ext:web -> x/b TCP 80 (IPv4): expected deny, observed error (connection refused)
"
    );
}

#[test]
fn statuses_and_the_summary_line() {
    let (scenario, plan) = tiny_plan();
    let step = &plan.steps[0];
    let run = |observed: Vec<Observed>| {
        let mut result = ScenarioResult::new(&scenario);
        result.record_step(step, observed);
        result
    };
    let skip = || Observed::Skipped("no SCTP sockets".into());
    let passed = run(vec![Observed::Blocked; 3]);
    let partly_skipped = run(vec![Observed::Blocked, skip(), Observed::Blocked]);
    let skipped = run(vec![skip(), skip(), skip()]);
    assert_eq!(passed.status(), Status::Passed);
    assert_eq!(passed.render(), "PASS tiny (3 probes)\n");
    assert_eq!(partly_skipped.status(), Status::Passed);
    assert_eq!(
        partly_skipped.render(),
        "PASS tiny (1 of 3 probes skipped: no SCTP sockets)\n"
    );
    assert_eq!(skipped.status(), Status::Skipped);
    assert_eq!(
        skipped.render(),
        "SKIP tiny (all 3 probes skipped: no SCTP sockets)\n"
    );
    let unfinished = ScenarioResult::new(&scenario);
    assert_eq!(unfinished.status(), Status::Failed);
    assert!(unfinished.render().contains("only 0 of 1 steps ran"));

    let mut report = Report::default();
    report.push(passed.clone());
    report.push(passed);
    assert_eq!(report.render().lines().last(), Some("2 passed, 0 failed"));
    report.push(skipped);
    report.push(ScenarioResult::failed(
        "broken",
        "broken.yaml",
        "did not load",
    ));
    assert_eq!(
        report.summary(),
        Summary {
            passed: 2,
            failed: 1,
            skipped: 1
        }
    );
    assert_eq!(
        report.render().lines().last(),
        Some("2 passed, 1 failed, 1 skipped")
    );
    assert!(!report.success());
}

#[test]
fn a_scenario_not_run_is_skipped_with_its_reason() {
    let (scenario, _) = tiny_plan();
    let not_run = ScenarioResult::skipped(&scenario, "the server drops endPort");
    assert_eq!(not_run.status(), Status::Skipped);
    assert_eq!(
        not_run.render(),
        "SKIP tiny (not run: the server drops endPort)\n"
    );
    // An error recorded after all (e.g. teardown) still fails it.
    let mut broken = not_run.clone();
    broken.record_error("teardown failed");
    assert_eq!(broken.status(), Status::Failed);
    let mut report = Report::default();
    report.push(not_run);
    assert_eq!(
        report.render().lines().last(),
        Some("0 passed, 0 failed, 1 skipped")
    );
    assert!(report.success());
}

// ---------------------------------------------------------------------------
// What a scenario needs of the API server.

#[test]
fn scenarios_using_end_port_are_not_run_against_an_older_server() {
    use crate::conformance::server_support::{end_port_policies, unsupported_by};
    let old = ServerSupport { end_port: false };
    let new = ServerSupport { end_port: true };
    let sctp = own("sctp-port-range");
    assert_eq!(
        end_port_policies(&sctp).len(),
        1,
        "{:?}",
        end_port_policies(&sctp)
    );
    let reason = unsupported_by(&sctp, old).expect("skipped without endPort");
    assert!(
        reason.starts_with(
            "the kube-apiserver drops NetworkPolicy endPort (before 1.22), which telco/"
        ),
        "{reason}"
    );
    assert!(reason.ends_with("(step 1) uses"), "{reason}");
    assert_eq!(unsupported_by(&sctp, new), None);
    // Port ranges only in egress count too; plain ports do not.
    let egress = TINY.replace(
        "spec: {podSelector: {}, policyTypes: [Ingress]}",
        "spec: {podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 80, endPort: 90}]}]}",
    );
    let egress = parse_str(&egress, Path::new("egress.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(end_port_policies(&egress), ["x/deny-all (step 1)"]);
    let tiny = parse_str(TINY, Path::new("tiny.yaml")).unwrap();
    assert_eq!(unsupported_by(&tiny, old), None);
    let relabel = own("relabel-pod-out-of-policy");
    assert_eq!(unsupported_by(&relabel, old), None);
    if let Some(named) = shared("named-port-and-endport") {
        assert!(unsupported_by(&named, old).is_some());
    }
    if let Some(live) = shared("namespace-isolation-live") {
        assert_eq!(unsupported_by(&live, old), None);
    }
}

#[test]
fn the_node_address_is_never_a_pod_address() {
    // The first address of the pool is the node's: b gets the next one.
    let plan = parse_str(TINY, Path::new("tiny.yaml"))
        .unwrap()
        .plan(&RunConfig::default())
        .unwrap();
    let b = plan.setup.iter().find_map(|c| match c {
        Change::AddPod { pod, .. } if pod.name.name == "b" => Some(pod.ip),
        _ => None,
    });
    assert_eq!(b, Some(Ipv4Addr::new(10, 244, 0, 2)));
    // A scenario that gives a pod the node's address does not load (loading
    // plans it with the default configuration).
    let taken = TINY.replace("ip: 10.244.1.10", "ip: 10.244.0.1");
    assert_eq!(
        problems(&taken),
        [Problem::IpCollision {
            ip: "10.244.0.1".parse().unwrap(),
            first: "the node".into(),
            second: "pod x/a".into(),
        }]
    );
}

#[test]
fn every_expectation_kind_is_kept() {
    let scenario = parse_str(TINY, Path::new("t.yaml")).unwrap();
    assert!(matches!(scenario.steps[0].expect[0], Expectation::Table(_)));
    assert!(matches!(
        scenario.steps[0].apply[0].typed,
        Some(KnownObject::NetworkPolicy(_))
    ));
    assert_eq!(
        scenario.steps[0].apply[0].value["kind"].as_str(),
        Some("NetworkPolicy")
    );
}
