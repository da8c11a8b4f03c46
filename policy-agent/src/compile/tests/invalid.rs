//! Bad input: every error kind is reported, never fatal, and never opens
//! traffic. Selected pods stay isolated; the rest of the policy still works.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_common::Direction;

use super::fixture::*;
use crate::model::{ClusterState, DiagnosticCode, Severity};

const WEB: &str = "10.0.0.1";
const DB: &str = "10.0.0.2";
const CACHE: &str = "10.0.0.3";
const OUTSIDE: &str = "8.8.8.8";

fn cluster() -> Fixture {
    let mut f = Fixture::new();
    f.namespace("prod", &[])
        .pod("prod", "web", &[("app", "web")], &[WEB])
        .pod("prod", "db", &[("app", "db")], &[DB])
        .pod("prod", "cache", &[("app", "cache")], &[CACHE]);
    f
}

/// A policy on db whose ingress rule 0 is `bad` and rule 1 allows web on 5432.
fn with_bad_rule(bad: &str) -> Compiled {
    cluster()
        .policy(&format!(
            r#"
metadata: {{name: db, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  ingress:
  - {bad}
  - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
    ports: [{{port: 5432}}]
"#
        ))
        .compile()
}

#[test]
fn each_bad_rule_part_is_reported_and_allows_nothing() {
    let cases = [
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/33}}]",
            DiagnosticCode::InvalidCidr,
        ),
        (
            "from: [{ipBlock: {cidr: not-a-cidr}}]",
            DiagnosticCode::InvalidCidr,
        ),
        (
            "from: [{ipBlock: {cidr: 10.0.0.2}}]",
            DiagnosticCode::InvalidCidr,
        ),
        (
            r#"from: [{ipBlock: {cidr: "::ffff:10.0.0.0/104"}}]"#,
            DiagnosticCode::InvalidCidr,
        ),
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]",
            DiagnosticCode::ExceptNotInCidr,
        ),
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}}]",
            DiagnosticCode::ExceptNotInCidr,
        ),
        (
            r#"from: [{ipBlock: {cidr: 10.0.0.0/16, except: ["fd00::/64"]}}]"#,
            DiagnosticCode::ExceptNotInCidr,
        ),
        (
            "from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/40]}}]",
            DiagnosticCode::InvalidCidr,
        ),
        ("from: [{}]", DiagnosticCode::InvalidPeer),
        (
            "from: [{ipBlock: {cidr: 0.0.0.0/0}, podSelector: {}}]",
            DiagnosticCode::InvalidPeer,
        ),
        (
            "from: [{ipBlock: {cidr: 0.0.0.0/0}, namespaceSelector: {}}]",
            DiagnosticCode::InvalidPeer,
        ),
        (
            "from: [{podSelector: {matchExpressions: [{key: app, operator: Matches, values: [x]}]}}]",
            DiagnosticCode::InvalidSelector,
        ),
        (
            "from: [{namespaceSelector: {matchExpressions: [{key: app, operator: NotIn}]}}]",
            DiagnosticCode::InvalidSelector,
        ),
        (
            "from: [{podSelector: {matchExpressions: [{key: app, operator: Exists, values: [x]}]}}]",
            DiagnosticCode::InvalidSelector,
        ),
        (
            "ports: [{port: 80, endPort: 79}]",
            DiagnosticCode::InvalidEndPort,
        ),
        (
            "ports: [{port: http, endPort: 90}]",
            DiagnosticCode::InvalidEndPort,
        ),
        ("ports: [{endPort: 90}]", DiagnosticCode::InvalidEndPort),
        (
            "ports: [{port: 80, endPort: 65536}]",
            DiagnosticCode::InvalidPort,
        ),
        ("ports: [{protocol: ICMP}]", DiagnosticCode::UnknownProtocol),
        (
            "ports: [{protocol: tcp, port: 80}]",
            DiagnosticCode::UnknownProtocol,
        ),
        ("ports: [{port: 0}]", DiagnosticCode::InvalidPort),
        ("ports: [{port: 70000}]", DiagnosticCode::InvalidPort),
        ("ports: [{port: -1}]", DiagnosticCode::InvalidPort),
        (r#"ports: [{port: "80"}]"#, DiagnosticCode::InvalidPort),
        ("ports: [{port: HTTP}]", DiagnosticCode::InvalidPort),
        (
            "ports: [{port: very-long-port-name}]",
            DiagnosticCode::InvalidPort,
        ),
    ];
    for (bad, code) in cases {
        let c = with_bad_rule(bad);
        let d = c
            .desired
            .diagnostics
            .iter()
            .find(|d| d.code == code)
            .unwrap_or_else(|| panic!("{bad}: no {code:?} in {:?}", c.desired.diagnostics));
        assert_eq!(d.severity, Severity::Error, "{bad}");
        assert_eq!(d.rule, Some((Direction::Ingress, 0)), "{bad}");
        assert_eq!((d.namespace.as_str(), d.name.as_str()), ("prod", "db"));
        assert_eq!(c.isolated(DB), (true, false), "{bad}");
        // The bad rule allows nothing: its list did not become "all".
        for (src, port) in [
            (OUTSIDE, 80),
            (CACHE, 80),
            (WEB, 80),
            (OUTSIDE, 5432),
            ("10.0.0.9", 80),
        ] {
            assert!(!c.tcp(src, DB, port), "{bad}: {src}:{port}");
        }
        assert!(!c.allows(CACHE, DB, ICMP, 0), "{bad}");
        // The good rule still works.
        assert!(c.tcp(WEB, DB, 5432), "{bad}");
    }
}

#[test]
fn a_bad_entry_leaves_the_good_entries_of_its_rule() {
    let c = with_bad_rule(
        "from: [{ipBlock: {cidr: 10.0.0.0/33}}, {podSelector: {matchLabels: {app: cache}}}]",
    );
    assert!(c.tcp(CACHE, DB, 80));
    assert!(!c.tcp(OUTSIDE, DB, 80));
    let c = with_bad_rule("ports: [{port: 80, endPort: 79}, {port: 81}]");
    assert!(c.tcp(OUTSIDE, DB, 81));
    assert!(!c.tcp(OUTSIDE, DB, 80));
}

#[test]
fn bad_pod_selector_isolates_the_widest_match_and_allows_nothing() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector:
    matchLabels: {app: db}
    matchExpressions: [{key: tier, operator: Like, values: [x]}]
  ingress: [{}]
"#,
        )
        .compile();
    let d = c
        .desired
        .diagnostics
        .iter()
        .find(|d| d.code == DiagnosticCode::InvalidSelector)
        .expect("diagnostic");
    assert_eq!(d.rule, None);
    assert_eq!(c.isolated(DB), (true, false));
    assert_eq!(c.isolated(WEB), (false, false));
    assert!(!c.tcp(OUTSIDE, DB, 80), "its allow-all rule is not trusted");
}

#[test]
fn unknown_policy_type_isolates_both_directions() {
    let c = cluster()
        .policy(
            r#"
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egres]
  ingress: [{}]
"#,
        )
        .compile();
    assert!(c.has(DiagnosticCode::UnknownPolicyType));
    assert_eq!(c.isolated(DB), (true, true));
    assert!(!c.tcp(OUTSIDE, DB, 80));
    assert!(!c.tcp(DB, OUTSIDE, 80));
}

#[test]
fn policy_without_spec_denies_ingress_to_the_whole_namespace() {
    let c = cluster()
        .policy("metadata: {name: empty, namespace: prod}")
        .compile();
    assert_eq!(c.isolated(WEB), (true, false));
    assert!(!c.tcp(DB, WEB, 80));
}

#[test]
fn policy_without_namespace_is_rejected_not_fatal() {
    let wire: NetworkPolicy =
        serde_yaml_ng::from_str("metadata: {name: x}\nspec: {podSelector: {}}").expect("yaml");
    let (state, rejected) = ClusterState::from_k8s([], [], [&wire]);
    assert!(state.policies().is_empty());
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].code, DiagnosticCode::MissingMetadata);
}

#[test]
fn cidr_host_bits_are_masked_with_a_note() {
    let c = with_bad_rule("from: [{ipBlock: {cidr: 10.0.0.77/24}}]");
    assert!(c.tcp(CACHE, DB, 80));
    assert!(!c.tcp("10.0.1.1", DB, 80));
    let d = c
        .desired
        .diagnostics
        .iter()
        .find(|d| d.code == DiagnosticCode::CidrHostBits)
        .expect("note");
    assert_eq!(d.severity, Severity::Info);
}
