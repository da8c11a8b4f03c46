//! A larger cluster, to keep an eye on compile time:
//! `cargo test --release -p policy-agent compile_scales -- --ignored --nocapture`.

use std::time::Instant;

use super::fixture::*;
use crate::model::Protocol;

#[test]
#[ignore = "timing only; run in release"]
fn compile_scales() {
    let mut f = Fixture::new();
    for ns in 0..50 {
        f.namespace(
            &format!("ns{ns}"),
            &[("team", if ns % 2 == 0 { "a" } else { "b" })],
        );
    }
    for i in 0..5000u32 {
        let ns = format!("ns{}", i % 50);
        let app = format!("app{}", i % 40);
        let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        let pod = make_pod(
            &ns,
            &format!("p{i}"),
            &[("app", &app)],
            &[&ip],
            &[("http", 8080, Protocol::Tcp)],
            Some(if i % 50 == 0 { NODE } else { "node-b" }),
        );
        if i % 50 == 0 {
            f.add_local(pod);
        } else {
            f.state.insert_pod(pod, Vec::new());
        }
    }
    for p in 0..500 {
        f.policy(&format!(
            r#"
metadata: {{name: pol{p}, namespace: ns{}}}
spec:
  podSelector: {{matchLabels: {{app: app{}}}}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{team: a}}}}, podSelector: {{matchExpressions: [{{key: app, operator: NotIn, values: [app1]}}]}}}}]
    ports: [{{port: http}}, {{port: 9000, endPort: 9100}}]
  - from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.0.{}.0/24]}}}}]
  egress:
  - to: [{{podSelector: {{}}}}]
    ports: [{{port: http}}]
  - to: [{{ipBlock: {{cidr: 0.0.0.0/0}}}}]
    ports: [{{port: 443}}]
"#,
            p % 50,
            p % 40,
            p % 200,
        ));
    }
    let t = Instant::now();
    let c = f.compile();
    let first = t.elapsed();
    let t = Instant::now();
    let again = f.compile();
    eprintln!(
        "compile: {first:?} (again {:?}); {} endpoints, {} policy entries, {} peer ips, {} cidrs, {} diagnostics",
        t.elapsed(),
        c.desired.endpoints.len(),
        c.desired.policy.len(),
        c.desired.peer_ips.len(),
        c.desired.peer_cidrs.len(),
        c.desired.diagnostics.len()
    );
    assert_eq!(c.desired, again.desired);
}
