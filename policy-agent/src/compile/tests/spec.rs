//! One test per clause of the NetworkPolicy v1 spec, through the maps.

use policy_common::{Direction, EndpointInfo, FIRST_ALLOCATED_IDENTITY, identity};

use super::fixture::*;
use crate::compile::{IdentityKey, RuleRef};
use crate::model::{ClusterState, DiagnosticCode, ObjectRef, Pod, Protocol, Severity};

// Addresses of the common cluster.
const PROD_WEB: &str = "10.0.0.1";
const PROD_DB: &str = "10.0.0.2";
const PROD_CACHE: &str = "10.0.0.3";
const DEV_WEB: &str = "10.0.1.1";
const DEV_CLIENT: &str = "10.0.1.2";
const OTHER_X: &str = "10.0.2.1";
const OUTSIDE: &str = "8.8.8.8";

/// prod (team=a, env=prod): web, db, cache (local); dev (team=b, env=dev):
/// web (local), client (remote); other (no labels): x (remote).
fn cluster() -> Fixture {
    let mut f = Fixture::new();
    f.namespace("prod", &[("team", "a"), ("env", "prod")])
        .namespace("dev", &[("team", "b"), ("env", "dev")])
        .namespace("other", &[])
        .pod("prod", "web", &[("app", "web")], &[PROD_WEB])
        .pod("prod", "db", &[("app", "db")], &[PROD_DB])
        .pod(
            "prod",
            "cache",
            &[("app", "cache"), ("tier", "back")],
            &[PROD_CACHE],
        )
        .pod("dev", "web", &[("app", "web")], &[DEV_WEB])
        .remote_pod("dev", "client", &[("app", "client")], &[DEV_CLIENT])
        .remote_pod("other", "x", &[("app", "x")], &[OTHER_X]);
    f
}

const ALL_SOURCES: [&str; 7] = [
    PROD_WEB, PROD_DB, PROD_CACHE, DEV_WEB, DEV_CLIENT, OTHER_X, OUTSIDE,
];

#[test]
fn no_policy_allows_everything() {
    let c = cluster().compile();
    for src in ALL_SOURCES {
        assert!(c.tcp(src, PROD_DB, 5432));
    }
    assert_eq!(c.isolated(PROD_DB), (false, false));
    assert!(c.desired.policy.is_empty());
}

#[test]
fn default_policy_types_is_ingress_only() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
"#,
        )
        .compile();
    assert_eq!(c.isolated(PROD_DB), (true, false));
    assert!(c.tcp(PROD_WEB, PROD_DB, 5432));
    assert!(!c.tcp(PROD_CACHE, PROD_DB, 5432));
    // Egress of db is not isolated.
    assert!(c.tcp(PROD_DB, OUTSIDE, 443));
    // Pods not selected are not isolated.
    assert_eq!(c.isolated(PROD_WEB), (false, false));
}

#[test]
fn default_policy_types_infers_egress_from_egress_rules() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  egress:
  - to: [{podSelector: {matchLabels: {app: cache}}}]
"#,
        )
        .compile();
    // Ingress is always included, and with no ingress rules allows nothing.
    assert_eq!(c.isolated(PROD_DB), (true, true));
    assert!(!c.tcp(PROD_WEB, PROD_DB, 5432));
    assert!(c.tcp(PROD_DB, PROD_CACHE, 6379));
    assert!(!c.tcp(PROD_DB, PROD_WEB, 80));
    assert!(!c.tcp(PROD_DB, OUTSIDE, 443));
}

#[test]
fn empty_egress_list_without_policy_types_does_not_isolate_egress() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {}
  ingress: []
  egress: []
"#,
        )
        .compile();
    assert_eq!(c.isolated(PROD_DB), (true, false));
}

#[test]
fn explicit_egress_only_policy_ignores_ingress_rules() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Egress]
  ingress:
  - from: [{podSelector: {}}]
"#,
        )
        .compile();
    assert_eq!(c.isolated(PROD_DB), (false, true));
    assert!(c.tcp(OUTSIDE, PROD_DB, 5432));
    assert!(!c.tcp(PROD_DB, PROD_WEB, 80));
    assert!(c.has(DiagnosticCode::IgnoredRules));
}

#[test]
fn empty_pod_selector_selects_every_pod_of_its_namespace_only() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: deny, namespace: prod}
spec:
  podSelector: {}
"#,
        )
        .compile();
    for pod in [PROD_WEB, PROD_DB, PROD_CACHE] {
        assert_eq!(c.isolated(pod), (true, false), "{pod}");
    }
    assert_eq!(c.isolated(DEV_WEB), (false, false));
}

#[test]
fn deny_all_ingress() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: deny, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#,
        )
        .compile();
    for src in ALL_SOURCES {
        for dst in [PROD_WEB, PROD_DB] {
            if src != dst {
                assert!(!c.tcp(src, dst, 80), "{src} -> {dst}");
                assert!(!c.allows(src, dst, ICMP, 0), "{src} -> {dst}");
            }
        }
    }
    // Their egress is untouched.
    assert!(c.tcp(PROD_WEB, DEV_WEB, 80));
}

#[test]
fn deny_all_egress() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: deny, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#,
        )
        .compile();
    assert_eq!(c.isolated(PROD_WEB), (false, true));
    for dst in [PROD_DB, DEV_WEB, DEV_CLIENT, OUTSIDE, NODE_IP] {
        assert!(!c.tcp(PROD_WEB, dst, 80), "{dst}");
        assert!(!c.allows(PROD_WEB, dst, UDP, 53), "{dst}");
    }
    assert!(c.tcp(DEV_WEB, PROD_WEB, 80));
}

#[test]
fn empty_rule_allows_all_sources_ports_and_protocols() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: allow-all, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{}]
  egress: [{}]
"#,
        )
        .compile();
    assert_eq!(c.isolated(PROD_WEB), (true, true));
    for src in ALL_SOURCES {
        for proto in [TCP, UDP, SCTP, ICMP, 47] {
            if src != PROD_WEB {
                assert!(c.allows(src, PROD_WEB, proto, 1234), "{src} {proto}");
                assert!(c.allows(PROD_WEB, src, proto, 1234), "{src} {proto}");
            }
        }
    }
}

#[test]
fn pod_selector_peer_selects_pods_of_the_policy_namespace_only() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
"#,
        )
        .compile();
    assert!(c.tcp(PROD_WEB, PROD_DB, 5432));
    assert!(
        !c.tcp(DEV_WEB, PROD_DB, 5432),
        "same labels, other namespace"
    );
}

#[test]
fn namespace_selector_peer_selects_all_pods_of_matching_namespaces() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: b}}}]
"#,
        )
        .compile();
    assert!(c.tcp(DEV_WEB, PROD_DB, 5432));
    assert!(c.tcp(DEV_CLIENT, PROD_DB, 5432));
    assert!(!c.tcp(PROD_WEB, PROD_DB, 5432));
    assert!(!c.tcp(OTHER_X, PROD_DB, 5432));
    assert!(!c.tcp(OUTSIDE, PROD_DB, 5432));
}

#[test]
fn namespace_selector_by_metadata_name_label() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: other}}}]
"#,
        )
        .compile();
    assert!(c.tcp(OTHER_X, PROD_DB, 5432));
    assert!(!c.tcp(DEV_CLIENT, PROD_DB, 5432));
}

#[test]
fn pod_and_namespace_selector_in_one_peer_is_and() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
      podSelector: {matchLabels: {app: web}}
"#,
        )
        .compile();
    assert!(c.tcp(DEV_WEB, PROD_DB, 5432));
    assert!(
        !c.tcp(DEV_CLIENT, PROD_DB, 5432),
        "right namespace, wrong pod"
    );
    assert!(
        !c.tcp(PROD_WEB, PROD_DB, 5432),
        "right pod, wrong namespace"
    );
}

#[test]
fn two_peers_are_or() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
    - podSelector: {matchLabels: {app: web}}
"#,
        )
        .compile();
    assert!(c.tcp(DEV_WEB, PROD_DB, 5432));
    assert!(c.tcp(DEV_CLIENT, PROD_DB, 5432));
    assert!(c.tcp(PROD_WEB, PROD_DB, 5432));
    assert!(!c.tcp(PROD_CACHE, PROD_DB, 5432));
    assert!(!c.tcp(OTHER_X, PROD_DB, 5432));
}

#[test]
fn empty_namespace_selector_selects_all_namespaces() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{namespaceSelector: {}}]
"#,
        )
        .compile();
    for src in [PROD_WEB, PROD_CACHE, DEV_WEB, DEV_CLIENT, OTHER_X] {
        assert!(c.tcp(src, PROD_DB, 5432), "{src}");
    }
    assert!(!c.tcp(OUTSIDE, PROD_DB, 5432), "not a pod");
    assert!(
        !c.tcp(NODE_IP, PROD_DB, 5432),
        "not a pod (classifier allows the node by itself)"
    );
}

#[test]
fn match_expressions_each_operator() {
    let policy = |expr: &str| {
        format!(
            r#"
metadata: {{name: db, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  ingress:
  - from:
    - namespaceSelector: {{}}
      podSelector: {{matchExpressions: [{expr}]}}
"#
        )
    };
    let cases = [
        (
            "{key: app, operator: In, values: [web, x]}",
            vec![PROD_WEB, DEV_WEB, OTHER_X],
        ),
        (
            "{key: app, operator: NotIn, values: [web, x]}",
            vec![PROD_DB, PROD_CACHE, DEV_CLIENT],
        ),
        ("{key: tier, operator: Exists}", vec![PROD_CACHE]),
        (
            "{key: tier, operator: DoesNotExist}",
            vec![PROD_WEB, PROD_DB, DEV_WEB, DEV_CLIENT, OTHER_X],
        ),
    ];
    for (expr, allowed) in cases {
        let c = cluster().policy(&policy(expr)).compile();
        for src in [PROD_WEB, PROD_DB, PROD_CACHE, DEV_WEB, DEV_CLIENT, OTHER_X] {
            // prod/db talking to itself is not a network connection; skip it.
            if src == PROD_DB {
                continue;
            }
            assert_eq!(
                c.tcp(src, PROD_DB, 5432),
                allowed.contains(&src),
                "{expr}: {src}"
            );
        }
    }
    // And in a namespace selector and the policy's own podSelector.
    let c = cluster()
        .policy(
            r#"
metadata: {name: sel, namespace: prod}
spec:
  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}
  ingress:
  - from: [{namespaceSelector: {matchExpressions: [{key: env, operator: In, values: [dev]}]}}]
"#,
        )
        .compile();
    assert_eq!(c.isolated(PROD_WEB), (false, false));
    assert_eq!(c.isolated(PROD_DB), (true, false));
    assert!(c.tcp(DEV_CLIENT, PROD_CACHE, 1));
    assert!(!c.tcp(OTHER_X, PROD_CACHE, 1));
}

#[test]
fn ip_block_with_except() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}
    - ipBlock: {cidr: 8.8.0.0/16}
"#,
        )
        .compile();
    assert!(
        c.tcp(PROD_WEB, PROD_DB, 5432),
        "pod address inside the block"
    );
    assert!(
        c.tcp(OTHER_X, PROD_DB, 5432),
        "pod address inside the block"
    );
    assert!(!c.tcp(DEV_WEB, PROD_DB, 5432), "pod address in the except");
    assert!(
        !c.tcp(DEV_CLIENT, PROD_DB, 5432),
        "pod address in the except"
    );
    assert!(
        c.tcp("10.0.200.7", PROD_DB, 5432),
        "external address in the block"
    );
    assert!(
        !c.tcp("10.0.1.200", PROD_DB, 5432),
        "external address in the except"
    );
    assert!(c.tcp(OUTSIDE, PROD_DB, 5432));
    assert!(!c.tcp("8.9.0.1", PROD_DB, 5432));
    assert!(!c.tcp("10.1.0.1", PROD_DB, 5432));
    // Every ipBlock prefix is in the LPM map, with a CIDR identity.
    assert_eq!(c.desired.peer_cidrs.len(), 3);
    assert!(
        c.desired
            .peer_cidrs
            .values()
            .all(|p| p.identity == identity::WORLD && p.cidr_identity >= FIRST_ALLOCATED_IDENTITY)
    );
}

#[test]
fn ip_block_egress_and_node_address() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 192.168.0.0/24}}]
    ports: [{port: 10250}]
"#,
        )
        .compile();
    assert!(
        c.tcp(PROD_WEB, NODE_IP, 10250),
        "node address inside the block"
    );
    assert!(c.tcp(PROD_WEB, "192.168.0.77", 10250));
    assert!(!c.tcp(PROD_WEB, "192.168.0.77", 22));
    assert!(!c.tcp(PROD_WEB, PROD_DB, 10250));
    let node = c.desired.peer_ips[&map_addr(&ip(NODE_IP))];
    assert_eq!(node.identity, identity::HOST);
    assert_ne!(node.cidr_identity, identity::ANY);
}

#[test]
fn ipv6_ip_block_and_dual_stack_pods() {
    let mut f = cluster();
    f.pod("prod", "v6", &[("app", "v6")], &["10.0.0.9", "fd00::9"])
        .remote_pod(
            "dev",
            "v6client",
            &[("app", "v6c")],
            &["10.0.1.9", "fd00:1::9"],
        )
        .policy(
            r#"
metadata: {name: v6, namespace: prod}
spec:
  podSelector: {matchLabels: {app: v6}}
  ingress:
  - from: [{ipBlock: {cidr: "fd00:1::/64", except: ["fd00:1::8/125"]}}]
  - from: [{ipBlock: {cidr: "::/0"}}]
    ports: [{port: 443}]
"#,
        );
    let c = f.compile();
    let e = c.endpoint("fd00::9");
    assert_ne!(e.flags & EndpointInfo::HAS_IPV4, 0);
    assert_ne!(e.flags & EndpointInfo::HAS_IPV6, 0);
    assert!(!c.tcp("fd00:1::9", "fd00::9", 80), "in the except");
    assert!(c.tcp("fd00:1::1", "fd00::9", 80));
    assert!(c.tcp("2001:db8::1", "fd00::9", 443), "::/0");
    assert!(!c.tcp("2001:db8::1", "fd00::9", 80));
    // ::/0 is not IPv4: IPv4 sources match nothing.
    assert!(!c.tcp(OUTSIDE, "10.0.0.9", 443));
    assert!(!c.tcp("10.0.1.9", "10.0.0.9", 443));
}

#[test]
fn named_ports_resolve_on_each_destination_pod() {
    let mut f = Fixture::new();
    f.namespace("ns", &[])
        .pod_with_ports(
            "ns",
            "a",
            &[("app", "srv"), ("v", "1")],
            &["10.1.0.1"],
            &[("http", 8080, Protocol::Tcp)],
        )
        .pod_with_ports(
            "ns",
            "b",
            &[("app", "srv"), ("v", "2")],
            &["10.1.0.2"],
            &[("http", 9090, Protocol::Tcp)],
        )
        .pod_with_ports(
            "ns",
            "c",
            &[("app", "srv"), ("v", "3")],
            &["10.1.0.3"],
            &[("http", 7070, Protocol::Udp)],
        )
        .pod("ns", "client", &[("app", "client")], &["10.1.0.9"])
        .policy(
            r#"
metadata: {name: srv, namespace: ns}
spec:
  podSelector: {matchLabels: {app: srv}}
  ingress:
  - ports: [{port: http}]
"#,
        )
        .policy(
            r#"
metadata: {name: client, namespace: ns}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: srv}}}]
    ports: [{port: http}]
  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]
    ports: [{port: http, protocol: UDP}]
"#,
        );
    let c = f.compile();
    // Ingress: each pod's own number.
    assert!(c.tcp(OUTSIDE, "10.1.0.1", 8080));
    assert!(!c.tcp(OUTSIDE, "10.1.0.1", 9090));
    assert!(c.tcp(OUTSIDE, "10.1.0.2", 9090));
    assert!(!c.tcp(OUTSIDE, "10.1.0.2", 8080));
    // Protocol must match the container port's.
    assert!(!c.tcp(OUTSIDE, "10.1.0.3", 7070));
    // Egress: the destination's number, only towards pods.
    assert!(c.tcp("10.1.0.9", "10.1.0.1", 8080));
    assert!(!c.tcp("10.1.0.9", "10.1.0.1", 9090));
    assert!(c.tcp("10.1.0.9", "10.1.0.2", 9090));
    assert!(
        c.egress("10.1.0.9", "10.1.0.3", UDP, 7070),
        "UDP named port via ipBlock"
    );
    assert!(!c.egress("10.1.0.9", "10.1.0.3", UDP, 8080));
    assert!(
        !c.egress("10.1.0.9", "10.1.0.1", UDP, 8080),
        "protocol must match"
    );
    assert!(
        !c.egress("10.1.0.9", OUTSIDE, UDP, 7070),
        "named ports never match non-pods"
    );
    assert!(!c.has(DiagnosticCode::NamedPortInexact));
}

#[test]
fn named_port_that_differs_between_pods_with_the_same_labels_resolves_per_pod() {
    let mut f = Fixture::new();
    f.namespace("ns", &[])
        .pod_with_ports(
            "ns",
            "a",
            &[("app", "srv")],
            &["10.1.0.1"],
            &[("http", 8080, Protocol::Tcp), ("http", 80, Protocol::Tcp)],
        )
        .pod_with_ports(
            "ns",
            "b",
            &[("app", "srv")],
            &["10.1.0.2"],
            &[("http", 80, Protocol::Tcp)],
        )
        .pod("ns", "client", &[("app", "client")], &["10.1.0.9"])
        .policy(
            r#"
metadata: {name: client, namespace: ns}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: http}]
"#,
        );
    let c = f.compile();
    // Same labels, different numbers behind `http`: the pods get distinct
    // identities, so each resolves its own.
    assert!(c.tcp("10.1.0.9", "10.1.0.1", 80));
    assert!(c.tcp("10.1.0.9", "10.1.0.2", 80));
    assert!(c.tcp("10.1.0.9", "10.1.0.1", 8080), "pod a names 8080 http");
    assert!(!c.tcp("10.1.0.9", "10.1.0.2", 8080), "pod b does not");
    assert!(!c.has(DiagnosticCode::NamedPortInexact));
}

#[test]
fn named_port_nobody_has_is_a_warning() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - ports: [{port: postgres}]
"#,
        )
        .compile();
    assert!(!c.tcp(PROD_WEB, PROD_DB, 5432));
    let d = c
        .desired
        .diagnostics
        .iter()
        .find(|d| d.code == DiagnosticCode::NamedPortNotFound)
        .expect("warning");
    assert_eq!(d.severity, Severity::Warning);
    assert_eq!(d.rule, Some((Direction::Ingress, 0)));
}

#[test]
fn end_port_ranges() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - ports: [{port: 32000, endPort: 32768}, {port: 80, endPort: 80}]
"#,
        )
        .compile();
    assert!(!c.tcp(OUTSIDE, PROD_DB, 31999));
    assert!(c.tcp(OUTSIDE, PROD_DB, 32000));
    assert!(c.tcp(OUTSIDE, PROD_DB, 32500));
    assert!(c.tcp(OUTSIDE, PROD_DB, 32768));
    assert!(!c.tcp(OUTSIDE, PROD_DB, 32769));
    assert!(c.tcp(OUTSIDE, PROD_DB, 80));
    assert!(!c.tcp(OUTSIDE, PROD_DB, 81));
}

#[test]
fn protocol_defaults_to_tcp() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - ports: [{port: 53}]
"#,
        )
        .compile();
    assert!(c.allows(OUTSIDE, PROD_DB, TCP, 53));
    assert!(!c.allows(OUTSIDE, PROD_DB, UDP, 53));
    assert!(!c.allows(OUTSIDE, PROD_DB, SCTP, 53));
    assert!(
        !c.allows(OUTSIDE, PROD_DB, ICMP, 0),
        "ports given: other protocols denied"
    );
}

#[test]
fn sctp_and_protocol_without_port() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - ports: [{protocol: SCTP, port: 3868}, {protocol: UDP}]
"#,
        )
        .compile();
    assert!(c.allows(OUTSIDE, PROD_DB, SCTP, 3868));
    assert!(!c.allows(OUTSIDE, PROD_DB, SCTP, 3869));
    assert!(!c.allows(OUTSIDE, PROD_DB, TCP, 3868));
    assert!(c.allows(OUTSIDE, PROD_DB, UDP, 1));
    assert!(c.allows(OUTSIDE, PROD_DB, UDP, 65535));
}

#[test]
fn policies_add_up() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: a, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
"#,
        )
        .policy(
            r#"
metadata: {name: b, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: b}}}]
"#,
        )
        .compile();
    assert!(c.tcp(PROD_WEB, PROD_DB, 5432));
    assert!(!c.tcp(PROD_WEB, PROD_DB, 22));
    assert!(c.tcp(DEV_WEB, PROD_DB, 22));
    assert!(c.tcp(DEV_WEB, PROD_CACHE, 22));
    assert!(!c.tcp(PROD_WEB, PROD_CACHE, 5432));
}

#[test]
fn policies_of_other_namespaces_do_not_select() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: deny, namespace: dev}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
"#,
        )
        .compile();
    assert_eq!(c.isolated(DEV_WEB), (true, true));
    assert_eq!(c.isolated(PROD_WEB), (false, false));
}

#[test]
fn rule_ids_name_the_allowing_rule() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
  - from: [{podSelector: {matchLabels: {app: cache}}}]
"#,
        )
        .compile();
    let d = &c.desired;
    let e = c.endpoint(PROD_DB);
    let rule = endpoint_verdict(d, e, Direction::Ingress, &ip(PROD_CACHE), TCP, 1)
        .flatten()
        .expect("allowed");
    assert_eq!(
        d.rules[&rule],
        RuleRef {
            namespace: "prod".into(),
            policy: "db".into(),
            direction: Direction::Ingress,
            index: 1
        }
    );
    assert!(!d.rules.contains_key(&0));
}

#[test]
fn host_network_pods_are_not_peers() {
    let mut f = cluster();
    let mut host = make_pod(
        "prod",
        "agent",
        &[("app", "web")],
        &[NODE_IP],
        &[],
        Some(NODE),
    );
    host.host_network = true;
    f.state.insert_pod(host, Vec::new());
    f.policy(
        r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
"#,
    );
    let c = f.compile();
    assert_eq!(
        c.desired.peer_ips[&map_addr(&ip(NODE_IP))].identity,
        identity::HOST
    );
    assert!(!c.tcp(NODE_IP, PROD_DB, 5432), "the node is not a web pod");
    assert!(!c.has(DiagnosticCode::DuplicatePodIp));
}

#[test]
fn unknown_local_endpoint_fails_closed() {
    let mut f = cluster();
    f.node.endpoints.insert(
        ObjectRef::new("prod", "ghost"),
        crate::compile::LocalEndpoint {
            ifindex: 99,
            endpoint_id: 1099,
        },
    );
    // A pod scheduled elsewhere is not local either.
    f.remote_pod("prod", "moved", &[], &["10.0.0.50"]);
    f.node.endpoints.insert(
        ObjectRef::new("prod", "moved"),
        crate::compile::LocalEndpoint {
            ifindex: 98,
            endpoint_id: 1098,
        },
    );
    let c = f.compile();
    for ifindex in [98, 99] {
        let e = c.desired.endpoints[&ifindex];
        assert_eq!(
            e.flags,
            EndpointInfo::INGRESS_ISOLATED | EndpointInfo::EGRESS_ISOLATED,
            "{ifindex}"
        );
        assert!(
            !c.desired
                .policy
                .keys()
                .any(|k| k.endpoint_id == e.endpoint_id)
        );
    }
    assert_eq!(c.count(DiagnosticCode::EndpointWithoutPod), 2);
}

#[test]
fn too_many_port_ranges_are_reported() {
    let ports: Vec<String> = (0..20)
        .map(|i| format!("{{port: {}}}", 1000 + 2 * i))
        .collect();
    let c = cluster()
        .policy(&format!(
            r#"
metadata: {{name: db, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  ingress:
  - ports: [{}]
"#,
            ports.join(", ")
        ))
        .compile();
    assert!(c.has(DiagnosticCode::PortRangesOverflow));
    // What is kept is allowed, nothing else is.
    assert!(c.tcp(OUTSIDE, PROD_DB, 1000));
    assert!(!c.tcp(OUTSIDE, PROD_DB, 1001));
    assert!(!c.tcp(OUTSIDE, PROD_DB, 1038), "left out, reported");
}

#[test]
fn compile_is_deterministic() {
    let build = || {
        let mut f = cluster();
        f.policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {}}, {ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
    ports: [{port: 80}, {port: http}, {protocol: UDP}]
  egress:
  - to: [{podSelector: {}}]
"#,
        );
        f
    };
    let mut a = build();
    let mut b = build();
    let (ca, cb) = (a.compile(), b.compile());
    assert_eq!(ca.desired, cb.desired);
    let again = a.compile();
    assert_eq!(ca.desired, again.desired);
}

#[test]
fn identities_are_per_label_set_stable_and_freed() {
    let mut f = cluster();
    f.remote_pod("prod", "web-2", &[("app", "web")], &["10.0.0.11"]);
    let c1 = f.compile();
    let web = c1.desired.peer_ips[&map_addr(&ip(PROD_WEB))].identity;
    let web2 = c1.desired.peer_ips[&map_addr(&ip("10.0.0.11"))].identity;
    let dev_web = c1.desired.peer_ips[&map_addr(&ip(DEV_WEB))].identity;
    assert_eq!(web, web2, "same labels, same namespace: one identity");
    assert_ne!(web, dev_web, "same labels, other namespace");
    assert_eq!(c1.endpoint(PROD_WEB).identity, web);

    // A new pod and a new policy do not move existing numbers.
    f.remote_pod("other", "new", &[("app", "new")], &["10.0.2.2"]);
    f.policy(
        r#"
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]
"#,
    );
    let c2 = f.compile();
    for (a, i) in &c1.desired.peer_ips {
        assert_eq!(c2.desired.peer_ips[a].identity, i.identity);
    }
    let cidr = f
        .ids
        .get(&IdentityKey::Cidr("10.0.0.0/8".parse().expect("cidr")));
    assert!(cidr.is_some());

    // Once no pod has a label set, its identity is freed and can be reused.
    let cache_key = IdentityKey::Labels {
        namespace: f.state.namespace_labels("prod"),
        pod: labels(&[("app", "cache"), ("tier", "back")]),
        named_ports: Vec::new(),
    };
    let cache_id = f.ids.get(&cache_key).expect("allocated");
    f.state.remove_pod(&ObjectRef::new("prod", "cache"));
    f.node.endpoints.remove(&ObjectRef::new("prod", "cache"));
    f.state.remove_policy(&ObjectRef::new("prod", "p"));
    f.compile();
    assert_eq!(f.ids.get(&cache_key), None);
    assert_eq!(
        f.ids
            .get(&IdentityKey::Cidr("10.0.0.0/8".parse().expect("cidr"))),
        None
    );
    f.remote_pod("other", "newer", &[("app", "newer")], &["10.0.2.3"]);
    f.compile();
    let newer = f
        .ids
        .get(&IdentityKey::Labels {
            namespace: f.state.namespace_labels("other"),
            pod: labels(&[("app", "newer")]),
            named_ports: Vec::new(),
        })
        .expect("allocated");
    assert!(
        newer == cache_id || Some(newer) == cidr,
        "a freed number is reused"
    );

    // Seeding from saved assignments keeps the numbers across a restart.
    let saved: Vec<(u32, IdentityKey)> = f.ids.assignments().map(|(i, k)| (i, k.clone())).collect();
    let before = f.compile().desired;
    f.ids = crate::compile::IdentityAllocator::from_assignments(saved).expect("valid seed");
    assert_eq!(f.compile().desired, before);
}

#[test]
fn duplicate_pod_addresses_are_reported() {
    let mut f = cluster();
    f.remote_pod("other", "dup", &[("app", "dup")], &[PROD_WEB]);
    let c = f.compile();
    assert!(c.has(DiagnosticCode::DuplicatePodIp));
    // The first in (namespace, name) order keeps the address.
    let web_key = IdentityKey::Labels {
        namespace: f.state.namespace_labels("other"),
        pod: labels(&[("app", "dup")]),
        named_ports: Vec::new(),
    };
    assert_eq!(
        c.desired.peer_ips[&map_addr(&ip(PROD_WEB))].identity,
        f.ids.get(&web_key).expect("id")
    );
}

#[test]
fn state_from_wire_objects() {
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_yaml_ng::from_str("metadata: {name: prod, labels: {team: a}}").expect("yaml");
    let pod: k8s_openapi::api::core::v1::Pod = serde_yaml_ng::from_str(
        r#"
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  nodeName: node-a
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}, {containerPort: 9}]
  initContainers:
  - name: sidecar
    ports: [{name: metrics, containerPort: 9090, protocol: HTTP}]
status:
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}, {ip: bogus}]
"#,
    )
    .expect("yaml");
    let done: k8s_openapi::api::core::v1::Pod = serde_yaml_ng::from_str(
        "metadata: {name: job, namespace: prod}\nstatus: {phase: Succeeded, podIP: 10.0.0.1}",
    )
    .expect("yaml");
    let nameless: k8s_openapi::api::core::v1::Pod =
        serde_yaml_ng::from_str("metadata: {namespace: prod}").expect("yaml");
    let (state, rejected) = ClusterState::from_k8s([&ns], [&pod, &done, &nameless], []);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].code, DiagnosticCode::MissingMetadata);
    assert_eq!(
        state.namespaces()["prod"].labels["kubernetes.io/metadata.name"],
        "prod"
    );
    let web: &Pod = state.pod(&ObjectRef::new("prod", "web")).expect("pod");
    assert_eq!(web.ips, vec![ip("10.0.0.1"), ip("fd00::1")]);
    assert_eq!(web.node_name.as_deref(), Some(NODE));
    assert_eq!(web.named_ports.len(), 2);
    assert_eq!(
        web.resolve_named_port("dns", Protocol::Udp)
            .collect::<Vec<_>>(),
        vec![53]
    );
    let codes: Vec<DiagnosticCode> = state.diagnostics().map(|d| d.code).collect();
    assert_eq!(
        codes,
        vec![
            DiagnosticCode::InvalidPodIp,
            DiagnosticCode::InvalidContainerPort
        ]
    );
    assert!(
        state
            .pod(&ObjectRef::new("prod", "job"))
            .expect("pod")
            .ips
            .is_empty()
    );
}
