//! The agent killed (SIGKILL) and restarted under live traffic (needs root;
//! skipped otherwise).
//!
//! Pods `a` and `b` in namespace `app`; `b` takes TCP from `a` on one port
//! only (8080 at first). A [`TcpClient`] keeps an established connection
//! from `a` to `b`:8080 exchanging; `b`:8081 is blocked.
//!
//! 1. Killed: the established connection keeps working, 8081 stays blocked,
//!    and new connections still get the old verdicts (the links are pinned,
//!    so the classifier stays attached to its pinned maps).
//! 2. Restarted with no change: while it adopts the links and reconciles,
//!    the connection never stalls and 8081 never opens; afterwards the
//!    verdict maps and epochs are identical to before the kill (nothing
//!    judged again) and the endpoints keep their ids.
//! 3. Killed again, the policy changed to allow 8081 instead of 8080 while it
//!    is down (still the old verdicts then), restarted: the maps converge to
//!    the new policy, the established connection on 8080 is revoked, 8081
//!    opens, new connections to 8080 are dropped.
//! 4. SIGTERM: exits 0, removes its socket, leaves links and verdicts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use palisade_tests::agent::{Agent, AgentDirs, AgentOptions, dump_pinned_maps, manifest, proto};
use palisade_tests::netns::{Netns, ProbeResult, TcpClient, TcpServer, Topology, tcp_probe};

const PREFIX: &str = "agrs";
const NODE: &str = "agrs-node";
const WAIT: Duration = Duration::from_secs(20);
const A: Ipv4Addr = Ipv4Addr::new(10, 213, 1, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 213, 1, 3);
const OPEN_WAIT: Duration = Duration::from_secs(2);
const DROP_WAIT: Duration = Duration::from_millis(300);
const EXCHANGE_WAIT: Duration = Duration::from_secs(1);

use palisade_tests::is_root;

fn cluster_yaml() -> String {
    manifest::documents(&[
        manifest::namespace("app", &[]),
        manifest::pod(
            "app",
            "a",
            &[("role", "client")],
            NODE,
            &[IpAddr::V4(A)],
            &[],
        ),
        manifest::pod(
            "app",
            "b",
            &[("role", "server")],
            NODE,
            &[IpAddr::V4(B)],
            &[8080, 8081],
        ),
    ])
}

/// `b` takes TCP `port` from `a`, nothing else.
fn policy_yaml(port: u16) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: b-ingress
  namespace: app
spec:
  podSelector:
    matchLabels: {{role: server}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {{role: client}}
    ports:
    - protocol: TCP
      port: {port}
"#
    )
}

fn options(topo: &Topology) -> AgentOptions {
    AgentOptions::in_topology(NODE, topo)
}

fn b_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(B), port)
}

fn assert_probe(netns: &Netns, port: u16, open: bool, what: &str, agent: &Agent) {
    let result = tcp_probe(
        netns,
        b_addr(port),
        if open { OPEN_WAIT } else { DROP_WAIT },
    );
    let expected = if open {
        ProbeResult::Open
    } else {
        ProbeResult::TimedOut
    };
    assert_eq!(
        result,
        expected,
        "{what}: a -> b:{port}\n{}",
        agent.log_tail()
    );
}

/// What the background traffic saw while the agent restarted.
struct Traffic {
    connection: TcpClient,
    exchanges: usize,
    stalls: Vec<String>,
    probes: usize,
    opened: Vec<String>,
}

impl Traffic {
    fn check(&self, what: &str) {
        assert!(
            self.stalls.is_empty(),
            "{what}: the established connection stalled: {:?}",
            self.stalls
        );
        assert!(
            self.opened.is_empty(),
            "{what}: the blocked port answered: {:?}",
            self.opened
        );
        assert!(
            self.exchanges > 0 && self.probes > 0,
            "{what}: no traffic ran"
        );
        eprintln!(
            "agent_restart: {what}: {} exchanges, {} blocked probes, all as expected",
            self.exchanges, self.probes
        );
    }
}

/// Runs `during` while the established `connection` keeps exchanging and
/// the blocked port is probed from `netns`, both in the background.
fn with_traffic<T: Send>(
    connection: TcpClient,
    netns: &Netns,
    blocked_port: u16,
    during: impl FnOnce() -> T + Send,
) -> (T, Traffic) {
    let stop = &AtomicBool::new(false);
    std::thread::scope(|s| {
        let exchanger = s.spawn(move || {
            let mut connection = connection;
            let (mut rounds, mut stalls) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                rounds += 1;
                match connection.exchange(format!("ping {rounds}\n").as_bytes(), EXCHANGE_WAIT) {
                    Ok(true) => {}
                    Ok(false) => stalls.push(format!("round {rounds}: no echo")),
                    Err(e) => stalls.push(format!("round {rounds}: {e:#}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (connection, rounds, stalls)
        });
        let prober = s.spawn(move || {
            let (mut probes, mut opened) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                probes += 1;
                let result = tcp_probe(netns, b_addr(blocked_port), Duration::from_millis(100));
                if result != ProbeResult::TimedOut {
                    opened.push(format!("probe {probes}: {result}"));
                }
            }
            (probes, opened)
        });
        let value = during();
        stop.store(true, Ordering::Relaxed);
        let (connection, exchanges, stalls) = exchanger.join().expect("exchanger");
        let (probes, opened) = prober.join().expect("prober");
        (
            value,
            Traffic {
                connection,
                exchanges,
                stalls,
                probes,
                opened,
            },
        )
    })
}

fn register(agent: &Agent, topo: &Topology, name: &str) -> proto::Endpoint {
    let pod = topo.pod(name);
    let mut client = agent.client().expect("client");
    let done = palisade_tests::agent::register_and_wait(
        &mut client,
        "app",
        name,
        &format!("ctr-{name}"),
        pod,
        WAIT,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_tail()));
    done.endpoint.expect("endpoint")
}

fn sync(agent: &Agent) -> proto::AgentStatus {
    let mut client = agent.client().expect("client");
    client
        .sync_and_wait(WAIT)
        .unwrap_or_else(|e| panic!("sync: {e}\n{}", agent.log_tail()));
    client.status().expect("status")
}

fn endpoint_ids(status: &proto::AgentStatus) -> Vec<(String, u32, u32)> {
    let mut ids: Vec<_> = status
        .endpoints
        .iter()
        .map(|e| (e.container_id.clone(), e.endpoint_id, e.ifindex))
        .collect();
    ids.sort();
    ids
}

#[test]
fn restart_keeps_enforcing_and_converges() {
    if !is_root() {
        return;
    }
    let started = Instant::now();
    let dirs = AgentDirs::new(PREFIX).expect("dirs");
    dirs.write_manifest("cluster.yaml", &cluster_yaml())
        .unwrap();
    dirs.write_manifest("policy.yaml", &policy_yaml(8080))
        .unwrap();
    let mut topo = Topology::new(PREFIX).expect("topology");
    topo.add_pod("a", A, None).expect("pod a");
    topo.add_pod("b", B, None).expect("pod b");
    let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let _servers = [
        TcpServer::start(&topo.pod("b").netns, any, 8080).unwrap(),
        TcpServer::start(&topo.pod("b").netns, any, 8081).unwrap(),
    ];

    let mut agent = Agent::start(&dirs, &options(&topo)).expect("agent");
    register(&agent, &topo, "a");
    register(&agent, &topo, "b");
    let before = sync(&agent);
    assert!(before.ready);
    let a = &topo.pod("a").netns;
    assert_probe(a, 8080, true, "first agent", &agent);
    assert_probe(a, 8081, false, "first agent", &agent);
    let mut connection = TcpClient::connect(a, b_addr(8080), OPEN_WAIT).expect("connection");
    assert!(connection.exchange(b"hello\n", EXCHANGE_WAIT).unwrap());
    let maps_before = dump_pinned_maps(&dirs.pin_dir).expect("maps");

    // 1. Killed: enforcement goes on.
    agent.kill9().unwrap();
    assert!(connection.exchange(b"while down\n", EXCHANGE_WAIT).unwrap());
    assert_probe(a, 8080, true, "agent down", &agent);
    assert_probe(a, 8081, false, "agent down", &agent);
    assert_eq!(dump_pinned_maps(&dirs.pin_dir).unwrap(), maps_before);

    // 2. Restarted, nothing changed, traffic running throughout.
    let ((agent, after), traffic) = with_traffic(connection, a, 8081, || {
        let agent = Agent::start(&dirs, &options(&topo)).expect("agent restart");
        let after = sync(&agent);
        (agent, after)
    });
    traffic.check("restart without change");
    let mut connection = traffic.connection;
    assert!(after.ready);
    assert_ne!(after.boot_id, before.boot_id);
    assert_eq!(endpoint_ids(&after), endpoint_ids(&before));
    assert!(after.endpoints.iter().all(|e| e.enforced_revision > 0));
    assert_eq!(
        dump_pinned_maps(&dirs.pin_dir).unwrap(),
        maps_before,
        "the restarted agent changed the maps\n{}",
        agent.log_tail()
    );
    assert!(
        connection
            .exchange(b"after restart\n", EXCHANGE_WAIT)
            .unwrap()
    );
    assert_probe(a, 8080, true, "restarted", &agent);
    assert_probe(a, 8081, false, "restarted", &agent);

    // 3. Killed again; the policy changes while it is down.
    let mut agent = agent;
    agent.kill9().unwrap();
    dirs.write_manifest("policy.yaml", &policy_yaml(8081))
        .unwrap();
    assert_probe(a, 8081, false, "down, policy file changed", &agent);
    assert!(connection.exchange(b"still old\n", EXCHANGE_WAIT).unwrap());
    let agent = Agent::start(&dirs, &options(&topo)).expect("agent second restart");
    let converged = sync(&agent);
    assert!(converged.ready);
    assert_eq!(endpoint_ids(&converged), endpoint_ids(&before));
    assert_ne!(dump_pinned_maps(&dirs.pin_dir).unwrap(), maps_before);
    assert_probe(a, 8081, true, "new policy", &agent);
    assert_probe(a, 8080, false, "new policy", &agent);
    assert!(
        !connection
            .exchange(b"revoked?\n", EXCHANGE_WAIT)
            .unwrap_or(false),
        "the established connection on 8080 must be revoked by the new policy"
    );
    connection.abort();

    // SIGTERM: a clean exit that leaves enforcement in place.
    let mut agent = agent;
    assert!(
        agent.terminate().unwrap(),
        "exit status\n{}",
        agent.log_tail()
    );
    assert!(!dirs.socket.exists(), "the socket is removed on exit");
    assert!(dirs.pin_dir.join("links").read_dir().unwrap().count() == 4);
    assert_probe(a, 8081, true, "after SIGTERM", &agent);
    assert_probe(a, 8080, false, "after SIGTERM", &agent);

    eprintln!("agent_restart: {:.1}s", started.elapsed().as_secs_f64());
}
