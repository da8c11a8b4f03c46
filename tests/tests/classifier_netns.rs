//! The classifier attached to real pod interfaces (network namespaces, real
//! sockets; needs root, skipped otherwise): policy verdicts on live traffic,
//! flow events as the kernel writes them, an established connection across
//! a policy change, frames a pod forges, and the verdict counters.
//!
//! Every test builds its own two-pod topology (its own netns prefix) and
//! loads its own classifier with maps pinned in a private directory, so the
//! tests run in parallel with each other and with the rest of the suite.
//!
//! Pods: `a` (endpoint 1, identity 1001) is not isolated; `b` (endpoint 2,
//! identity 1002) is isolated for ingress and allows `a` on TCP 8080 and
//! UDP 5353, nothing else; its egress is open.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use palisade_tests::{
    fixture::{addr, port_ranges},
    netns::{
        GATEWAY_V4, GATEWAY_V6, PacketSocket, Pod, ProbeResult, TcpClient, TcpServer, Topology,
        UdpEchoServer, icmp_probe, list_netns, tcp_probe, udp_probe,
    },
    packet::{self, Packet, SYN},
};
use policy_agent::datapath::{Datapath, FlowReader};
use policy_common::{
    CtKey, Direction, EndpointInfo, EndpointKey, FlowEvent, PeerInfo, PeerIpKey, PolicyKey, Reason,
    Verdict, ct_state, event::DecodedCodes, identity, proto,
};

const A4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 1, 2);
const B4: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 2, 2);
const A_EP: u32 = 1;
const B_EP: u32 = 2;
const A_ID: u32 = 1001;
const B_ID: u32 = 1002;
const RULE_TCP: u32 = 71;
const RULE_UDP: u32 = 72;

const TCP_ALLOWED: u16 = 8080;
const TCP_DENIED: u16 = 8081;
const UDP_ALLOWED: u16 = 5353;
const UDP_DENIED: u16 = 5354;
const A_TCP: u16 = 9090;

/// Timeout of one attempt at a cell expected open (retried).
const OPEN_WAIT: Duration = Duration::from_secs(2);
const OPEN_ATTEMPTS: usize = 3;
/// Timeout of a cell expected blocked (not retried).
const DROP_WAIT: Duration = Duration::from_millis(400);

const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

type Event = (FlowEvent, DecodedCodes);

use palisade_tests::is_root;

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

/// A private pin directory under /sys/fs/bpf, removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/palisade-netns-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("classifier_netns: removing {}: {e}", self.0.display());
        }
    }
}

/// Two pods with the classifier attached to both host-side veths and the
/// policy described in the module docs. Fields drop in order: the event
/// reader and the classifier (detaching it), the namespaces, the pin dir.
struct Env {
    events: FlowReader,
    dp: Datapath,
    topo: Topology,
    pin: PinDir,
}

fn ingress_key(protocol: u8) -> PolicyKey {
    PolicyKey::new(B_EP, A_ID, Direction::Ingress as u8, protocol)
}

impl Env {
    fn new(prefix: &str) -> Self {
        let pin = PinDir::new();
        let mut topo = Topology::new(prefix).expect("topology");
        topo.add_pod("a", A4, Some(A6)).expect("pod a");
        topo.add_pod("b", B4, Some(B6)).expect("pod b");
        let mut dp = Datapath::load(&pin.0).expect("loading the classifier");
        let events = FlowReader::take(&mut dp).expect("flow reader");
        let mut env = Self {
            events,
            dp,
            topo,
            pin,
        };
        env.write_maps();
        let node = env.topo.node_ns();
        for pod in env.topo.pods() {
            let dp = &mut env.dp;
            node.run(|| dp.attach(&pod.host_ifname))
                .unwrap_or_else(|e| panic!("attaching to {}: {e}", pod.host_ifname));
        }
        env
    }

    /// Endpoints (keyed by host-side ifindex), epochs, peers, b's policy.
    fn write_maps(&mut self) {
        let dp = &mut self.dp;
        let (a, b) = (self.topo.pod("a"), self.topo.pod("b"));
        let both = EndpointInfo::HAS_IPV4 | EndpointInfo::HAS_IPV6;
        let mut epochs = dp.epochs().unwrap();
        epochs.set(A_EP, 1, 0).unwrap();
        epochs.set(B_EP, 1, 0).unwrap();

        let mut policy = dp.policy().unwrap();
        policy
            .insert(
                ingress_key(proto::TCP),
                port_ranges(&[(TCP_ALLOWED, TCP_ALLOWED, RULE_TCP)]),
                0,
            )
            .unwrap();
        policy
            .insert(
                ingress_key(proto::UDP),
                port_ranges(&[(UDP_ALLOWED, UDP_ALLOWED, RULE_UDP)]),
                0,
            )
            .unwrap();

        let mut peers = dp.peer_ips().unwrap();
        for (ip, id) in [
            (IpAddr::V4(A4), A_ID),
            (IpAddr::V6(A6), A_ID),
            (IpAddr::V4(B4), B_ID),
            (IpAddr::V6(B6), B_ID),
            (IpAddr::V4(GATEWAY_V4), identity::HOST),
            (IpAddr::V6(GATEWAY_V6), identity::HOST),
        ] {
            let info = PeerInfo {
                identity: id,
                cidr_identity: identity::ANY,
            };
            peers
                .insert(
                    PeerIpKey {
                        addr: addr(ip),
                        generation: 0,
                    },
                    info,
                    0,
                )
                .unwrap();
        }

        let mut endpoints = dp.endpoints().unwrap();
        for (pod, endpoint_id, identity, flags) in [
            (a, A_EP, A_ID, both),
            (b, B_EP, B_ID, both | EndpointInfo::INGRESS_ISOLATED),
        ] {
            let info = EndpointInfo {
                endpoint_id,
                identity,
                flags,
                ipv4: pod.ip4.octets(),
                ipv6: pod.ip6.unwrap().octets(),
            };
            let key = EndpointKey {
                ifindex: pod.host_ifindex,
                generation: 0,
            };
            endpoints.insert(key, info, 0).unwrap();
        }
    }

    fn pin_path(&self) -> PathBuf {
        self.pin.0.clone()
    }
}

/// Every flow event available now; panics on an undecodable one.
fn drain(events: &mut FlowReader) -> Vec<Event> {
    events
        .drain_all()
        .into_iter()
        .map(|e| e.unwrap_or_else(|e| panic!("undecodable flow event: {e}")))
        .collect()
}

/// Packets counted per reason, summed over CPUs.
fn totals(dp: &mut Datapath) -> BTreeMap<Reason, u64> {
    dp.verdict_totals()
        .unwrap()
        .into_iter()
        .map(|(r, c)| (r, c.packets))
        .collect()
}

fn bump_epoch(dp: &mut Datapath, endpoint_id: u32) -> u32 {
    let mut epochs = dp.epochs().unwrap();
    let epoch = epochs.get(&endpoint_id, 0).unwrap() + 1;
    epochs.set(endpoint_id, epoch, 0).unwrap();
    epoch
}

/// Namespaces and root-namespace interfaces named `<prefix>…`, plus the pin
/// directory if it still exists.
fn leftovers(prefix: &str, pin: &Path) -> Vec<String> {
    let mut v: Vec<String> = list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    let links = palisade_tests::netns::ip(["-o", "link", "show"]).unwrap();
    v.extend(
        links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .filter(|n| n.starts_with(prefix)),
    );
    if pin.exists() {
        v.push(pin.display().to_string());
    }
    v
}

// ---------------------------------------------------------------------------
// Probing and event matching
// ---------------------------------------------------------------------------

/// Runs `probe` until it reports `Open`, at most [`OPEN_ATTEMPTS`] times.
#[track_caller]
fn expect_open(what: &str, mut probe: impl FnMut() -> ProbeResult) {
    let mut results = Vec::new();
    for _ in 0..OPEN_ATTEMPTS {
        let r = probe();
        if r.is_open() {
            return;
        }
        results.push(r.to_string());
    }
    panic!("{what}: expected Open, got {results:?}");
}

/// One probe that must time out: blocked, not refused.
#[track_caller]
fn expect_blocked(what: &str, probe: impl FnOnce() -> ProbeResult) {
    let started = Instant::now();
    let r = probe();
    assert_eq!(r, ProbeResult::TimedOut, "{what}: expected a silent drop");
    assert!(started.elapsed() >= DROP_WAIT, "{what}: returned early");
}

#[track_caller]
fn connect(from: &Pod, dst: SocketAddr) -> TcpClient {
    let mut errors = Vec::new();
    for _ in 0..OPEN_ATTEMPTS {
        match TcpClient::connect(&from.netns, dst, OPEN_WAIT) {
            Ok(c) => return c,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    panic!("connecting from {} to {dst}: {errors:?}", from.name);
}

fn ip_of(a: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn show(events: &[Event]) -> String {
    let mut s = String::new();
    for (e, c) in events {
        s.push_str(&format!(
            "\n  ep{} if{} {} {:?} {} proto {} {}:{} -> {}:{} peer {} rule {} flags/type {:#x}",
            e.endpoint_id,
            e.ifindex,
            c.direction.as_str(),
            c.verdict,
            c.reason.as_str(),
            e.protocol,
            ip_of(&e.src_addr),
            e.src_port,
            ip_of(&e.dst_addr),
            e.dst_port,
            e.peer_identity,
            e.rule_id,
            e.tcp_flags_or_icmp_type,
        ));
    }
    if s.is_empty() {
        s.push_str(" (none)");
    }
    s
}

/// What a flow event must say; `None` fields are not checked.
#[derive(Clone, Copy, Debug)]
struct Expect {
    reason: Reason,
    endpoint_id: u32,
    ifindex: u32,
    direction: Direction,
    protocol: u8,
    src: IpAddr,
    dst: IpAddr,
    src_port: Option<u16>,
    dst_port: Option<u16>,
    peer_identity: Option<u32>,
    rule_id: Option<u32>,
}

impl Expect {
    fn new(reason: Reason, pod: &Pod, endpoint_id: u32, direction: Direction) -> Self {
        Self {
            reason,
            endpoint_id,
            ifindex: pod.host_ifindex,
            direction,
            protocol: proto::TCP,
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            src_port: None,
            dst_port: None,
            peer_identity: None,
            rule_id: None,
        }
    }
    fn proto(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }
    fn flow(mut self, src: SocketAddr, dst: SocketAddr) -> Self {
        self.src = src.ip();
        self.dst = dst.ip();
        self.src_port = (src.port() != 0).then_some(src.port());
        self.dst_port = Some(dst.port());
        self
    }
    fn addrs(mut self, src: IpAddr, dst: IpAddr) -> Self {
        self.src = src;
        self.dst = dst;
        self
    }
    fn peer(mut self, identity: u32, rule_id: u32) -> Self {
        self.peer_identity = Some(identity);
        self.rule_id = Some(rule_id);
        self
    }

    fn matches(&self, (e, c): &Event) -> bool {
        c.reason == self.reason
            && c.direction == self.direction
            && e.endpoint_id == self.endpoint_id
            && e.ifindex == self.ifindex
            && e.protocol == self.protocol
            && ip_of(&e.src_addr) == self.src
            && ip_of(&e.dst_addr) == self.dst
            && self.src_port.is_none_or(|p| e.src_port == p)
            && self.dst_port.is_none_or(|p| e.dst_port == p)
    }

    /// The events matching this one's flow and reason, each checked in full;
    /// panics unless there are at least `min` of them.
    #[track_caller]
    fn find<'a>(&self, events: &'a [Event], min: usize) -> Vec<&'a Event> {
        let found: Vec<&Event> = events.iter().filter(|ev| self.matches(ev)).collect();
        assert!(
            found.len() >= min,
            "expected at least {min} event(s) like {self:?}, got:{}",
            show(events)
        );
        for (e, c) in &found {
            assert_eq!(c.verdict, self.reason.verdict(), "{self:?}");
            assert_eq!(e.verdict, self.reason.verdict() as u8);
            assert_eq!(
                e.family,
                if self.src.is_ipv4() { 4 } else { 6 },
                "family, {self:?}"
            );
            if let Some(id) = self.peer_identity {
                assert_eq!(e.peer_identity, id, "peer identity, {self:?}");
            }
            if let Some(rule) = self.rule_id {
                assert_eq!(e.rule_id, rule, "rule id, {self:?}");
            }
            assert_eq!(e.peer_cidr_identity, identity::ANY);
            assert!(e.timestamp_ns > 0 && e.packet_len > 0);
        }
        found
    }

    /// Exactly one matching event.
    #[track_caller]
    fn one<'a>(&self, events: &'a [Event]) -> &'a Event {
        let found = self.find(events, 1);
        assert_eq!(
            found.len(),
            1,
            "expected one event like {self:?}, got:{}",
            show(events)
        );
        found[0]
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Allowed and blocked cells with real sockets, both families, with the flow
/// events each one writes and the verdict counters.
#[test]
fn policy_enforced_on_real_traffic() {
    if !is_root() {
        return;
    }
    const P: &str = "clnsp";
    let pin;
    {
        let mut env = Env::new(P);
        pin = env.pin_path();
        let (a, b) = (env.topo.pod("a"), env.topo.pod("b"));
        let events = &mut env.events;
        let before = totals(&mut env.dp);

        let b_tcp_ok = TcpServer::start(&b.netns, ANY6, TCP_ALLOWED).unwrap();
        let b_tcp_denied = TcpServer::start(&b.netns, ANY6, TCP_DENIED).unwrap();
        let b_udp_ok = UdpEchoServer::start(&b.netns, ANY6, UDP_ALLOWED).unwrap();
        let b_udp_denied = UdpEchoServer::start(&b.netns, ANY6, UDP_DENIED).unwrap();
        let _a_tcp = TcpServer::start(&a.netns, ANY6, A_TCP).unwrap();
        let mut denied_seen = 0;
        drain(events);

        // a -> b TCP 8080, both families: one event at each end for the SYN,
        // none for the packets of the established connection.
        for v6 in [false, true] {
            let dst = b.addr(v6, TCP_ALLOWED);
            let mut client = connect(a, dst);
            assert_eq!(client.greeting(), "palisade:8080\n");
            let src = client.local_addr();
            assert_eq!(src.ip(), a.ip(v6));
            let evs = drain(events);
            let egress = Expect::new(Reason::AllowedNotIsolated, a, A_EP, Direction::Egress)
                .flow(src, dst)
                .peer(B_ID, 0);
            let ingress = Expect::new(Reason::AllowedByPolicy, b, B_EP, Direction::Ingress)
                .flow(src, dst)
                .peer(A_ID, RULE_TCP);
            let (e_out, _) = egress.one(&evs);
            let (e_in, _) = ingress.one(&evs);
            for e in [e_out, e_in] {
                assert_eq!(e.tcp_flags_or_icmp_type, SYN, "{}", show(&evs));
                assert_eq!(e.src_addr, addr(src.ip()));
                assert_eq!(e.dst_addr, addr(dst.ip()));
            }
            assert!(e_in.timestamp_ns >= e_out.timestamp_ns);
            // Only the SYN is reported (other source ports: failed attempts).
            let any_port = |x: Expect| Expect {
                src_port: None,
                ..x
            };
            assert!(
                evs.iter()
                    .all(|ev| any_port(egress).matches(ev) || any_port(ingress).matches(ev)),
                "unexpected events (v6={v6}):{}",
                show(&evs)
            );

            for i in 0..50 {
                let msg = format!("message {i} of a long exchange\n");
                assert!(
                    client.exchange(msg.as_bytes(), OPEN_WAIT).unwrap(),
                    "exchange {i} (v6={v6})"
                );
            }
            let evs = drain(events);
            assert!(
                evs.is_empty(),
                "established packets write no events (v6={v6}):{}",
                show(&evs)
            );
            client.close(OPEN_WAIT).unwrap();
            let evs = drain(events);
            assert!(evs.is_empty(), "closing writes no events:{}", show(&evs));
            // Both FINs acknowledged: neither end keeps the connection.
            let tracked = |dp: &mut Datapath| {
                let ct = dp.conntrack().unwrap();
                let keys: Vec<_> = ct.keys().map(Result::unwrap).collect();
                keys.into_iter()
                    .filter(|k| k.local_port == src.port() || k.peer_port == src.port())
                    .count()
            };
            let deadline = Instant::now() + OPEN_WAIT;
            while tracked(&mut env.dp) != 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(
                tracked(&mut env.dp),
                0,
                "closed connection still tracked (v6={v6})"
            );
        }

        // a -> b TCP 8081: silently dropped at b, whichever the family.
        for v6 in [false, true] {
            let dst = b.addr(v6, TCP_DENIED);
            expect_blocked(&format!("tcp a->b:{TCP_DENIED} v6={v6}"), || {
                tcp_probe(&a.netns, dst, DROP_WAIT)
            });
            let evs = drain(events);
            let denied = Expect::new(Reason::DeniedByPolicy, b, B_EP, Direction::Ingress)
                .flow(SocketAddr::new(a.ip(v6), 0), dst)
                .peer(A_ID, 0)
                .find(&evs, 1);
            // SYN and its retransmits, all from one source port; a's egress
            // judged each of them as a new connection.
            let sport = denied[0].0.src_port;
            assert!(sport >= 1024, "ephemeral source port, got {sport}");
            for (e, _) in &denied {
                assert_eq!((e.src_port, e.tcp_flags_or_icmp_type), (sport, SYN));
            }
            let src = SocketAddr::new(a.ip(v6), sport);
            let allowed = Expect::new(Reason::AllowedNotIsolated, a, A_EP, Direction::Egress)
                .flow(src, dst)
                .peer(B_ID, 0)
                .find(&evs, 1);
            assert_eq!(allowed.len(), denied.len(), "{}", show(&evs));
            assert_eq!(evs.len(), 2 * denied.len(), "{}", show(&evs));
            denied_seen += denied.len();
        }
        assert_eq!(b_tcp_denied.accepted(), 0);
        assert!(b_tcp_ok.accepted() >= 2);

        // a -> b UDP: 5353 echoed, 5354 never reaches b.
        for v6 in [false, true] {
            let dst = b.addr(v6, UDP_ALLOWED);
            expect_open(&format!("udp a->b:{UDP_ALLOWED} v6={v6}"), || {
                udp_probe(&a.netns, dst, OPEN_WAIT)
            });
            let evs = drain(events);
            let src = SocketAddr::new(a.ip(v6), 0);
            Expect::new(Reason::AllowedByPolicy, b, B_EP, Direction::Ingress)
                .proto(proto::UDP)
                .flow(src, dst)
                .peer(A_ID, RULE_UDP)
                .find(&evs, 1);
            Expect::new(Reason::AllowedNotIsolated, a, A_EP, Direction::Egress)
                .proto(proto::UDP)
                .flow(src, dst)
                .peer(B_ID, 0)
                .find(&evs, 1);

            let dst = b.addr(v6, UDP_DENIED);
            expect_blocked(&format!("udp a->b:{UDP_DENIED} v6={v6}"), || {
                udp_probe(&a.netns, dst, DROP_WAIT)
            });
            let evs = drain(events);
            let found = Expect::new(Reason::DeniedByPolicy, b, B_EP, Direction::Ingress)
                .proto(proto::UDP)
                .flow(src, dst)
                .peer(A_ID, 0)
                .find(&evs, 1);
            denied_seen += found.len();
        }
        assert!(b_udp_ok.received() >= 2);
        assert_eq!(b_udp_denied.received(), 0);

        // b -> a TCP 9090: b's egress is open and a is not isolated.
        for v6 in [false, true] {
            let dst = a.addr(v6, A_TCP);
            let client = connect(b, dst);
            let src = client.local_addr();
            drop(client);
            let evs = drain(events);
            Expect::new(Reason::AllowedNotIsolated, b, B_EP, Direction::Egress)
                .flow(src, dst)
                .peer(A_ID, 0)
                .one(&evs);
            Expect::new(Reason::AllowedNotIsolated, a, A_EP, Direction::Ingress)
                .flow(src, dst)
                .peer(B_ID, 0)
                .one(&evs);
            expect_open(&format!("tcp b->a:{A_TCP} v6={v6}"), || {
                tcp_probe(&b.netns, dst, OPEN_WAIT)
            });
        }

        // ICMP echo: a -> b has no rule (b allows a only on ports), b -> a is open.
        for v6 in [false, true] {
            let (icmp, request) = if v6 {
                (proto::ICMPV6, packet::icmp6::ECHO_REQUEST)
            } else {
                (proto::ICMP, packet::icmp::ECHO_REQUEST)
            };
            drain(events);
            expect_blocked(&format!("icmp a->b v6={v6}"), || {
                icmp_probe(&a.netns, b.ip(v6), DROP_WAIT)
            });
            let evs = drain(events);
            let found = Expect::new(Reason::DeniedByPolicy, b, B_EP, Direction::Ingress)
                .proto(icmp)
                .addrs(a.ip(v6), b.ip(v6))
                .peer(A_ID, 0)
                .find(&evs, 1);
            for (e, _) in &found {
                assert_eq!((e.tcp_flags_or_icmp_type, e.dst_port), (request, 0));
            }
            denied_seen += found.len();
            expect_open(&format!("icmp b->a v6={v6}"), || {
                icmp_probe(&b.netns, a.ip(v6), OPEN_WAIT)
            });
            let evs = drain(events);
            Expect::new(Reason::AllowedNotIsolated, a, A_EP, Direction::Ingress)
                .proto(icmp)
                .addrs(b.ip(v6), a.ip(v6))
                .peer(B_ID, 0)
                .find(&evs, 1);
        }

        // Counters: everything above was counted, nothing was lost.
        let after = totals(&mut env.dp);
        let grew = |r: Reason| after[&r] - before[&r];
        assert!(grew(Reason::AllowedByPolicy) >= 4, "{after:?}");
        assert!(grew(Reason::AllowedNotIsolated) >= 8, "{after:?}");
        // Two exchanges of 50 messages, each crossing two classifiers both ways.
        assert!(grew(Reason::AllowedEstablished) >= 2 * 50 * 4, "{after:?}");
        assert!(
            grew(Reason::DeniedByPolicy) >= denied_seen as u64 && denied_seen >= 6,
            "{denied_seen} denial events, {after:?}"
        );
        assert_eq!(grew(Reason::DroppedUnknownEndpoint), 0, "{after:?}");
        assert_eq!(grew(Reason::DroppedMalformed), 0, "{after:?}");
        assert_eq!(grew(Reason::DroppedSpoofedSource), 0, "{after:?}");
        assert_eq!(env.dp.events_lost().unwrap(), 0);
    }
    assert_eq!(leftovers(P, &pin), Vec::<String>::new(), "teardown");
}

/// A connection opened under a policy that allows it is cut when the rule is
/// removed (on its next packet) and works again, on the same socket, when the
/// rule comes back.
#[test]
fn policy_change_revokes_and_restores_an_established_connection() {
    if !is_root() {
        return;
    }
    const P: &str = "clnsr";
    let pin;
    {
        let mut env = Env::new(P);
        pin = env.pin_path();
        let (a, b) = (env.topo.pod("a"), env.topo.pod("b"));
        let (dp, events) = (&mut env.dp, &mut env.events);
        let _server = TcpServer::start(&b.netns, ANY6, TCP_ALLOWED).unwrap();
        let before = totals(dp);

        let dst = b.addr(false, TCP_ALLOWED);
        let mut client = connect(a, dst);
        let src = client.local_addr();
        assert!(client.exchange(b"before\n", OPEN_WAIT).unwrap());
        let ct_key = CtKey {
            ifindex: b.host_ifindex,
            local_addr: addr(dst.ip()),
            peer_addr: addr(src.ip()),
            local_port: dst.port(),
            peer_port: src.port(),
            protocol: proto::TCP,
            _pad: [0; 3],
        };
        let ct = |dp: &mut Datapath| dp.conntrack().unwrap().get(&ct_key, 0).unwrap();
        let entry = ct(dp);
        assert_eq!(
            (entry.state, entry.epoch, entry.rule_id, entry.peer_identity),
            (ct_state::OPEN, 1, RULE_TCP, A_ID)
        );
        assert_eq!(entry.origin, Direction::Ingress as u8);
        drain(events);

        // Rule removed, epoch bumped: the next packet is judged again and dropped.
        let saved = dp
            .policy()
            .unwrap()
            .get(&ingress_key(proto::TCP), 0)
            .unwrap();
        dp.policy()
            .unwrap()
            .remove(&ingress_key(proto::TCP))
            .unwrap();
        assert_eq!(bump_epoch(dp, B_EP), 2);
        assert!(
            !client.exchange(b"revoked\n", DROP_WAIT).unwrap(),
            "the connection must stop working once its rule is gone"
        );
        let evs = drain(events);
        let revoked = Expect::new(Reason::DeniedRevoked, b, B_EP, Direction::Ingress)
            .flow(src, dst)
            .peer(A_ID, 0)
            .find(&evs, 1);
        assert!(
            evs.iter().all(|(_, c)| c.reason == Reason::DeniedRevoked),
            "{}",
            show(&evs)
        );
        let entry = ct(dp);
        assert_eq!(
            (entry.state, entry.epoch, entry.reason),
            (ct_state::REVOKED, 2, Reason::DeniedByPolicy as u8)
        );

        // Rule back, epoch bumped again: the same connection carries on, and
        // the late echo of "revoked" arrives before "restored".
        dp.policy()
            .unwrap()
            .insert(ingress_key(proto::TCP), saved, 0)
            .unwrap();
        assert_eq!(bump_epoch(dp, B_EP), 3);
        drain(events);
        assert!(
            client
                .exchange(b"restored\n", Duration::from_secs(10))
                .unwrap(),
            "the connection must work again once its rule is back"
        );
        for i in 0..5 {
            assert!(
                client
                    .exchange(format!("{i}\n").as_bytes(), OPEN_WAIT)
                    .unwrap()
            );
        }
        assert_eq!(client.local_addr(), src, "same connection");
        let evs = drain(events);
        assert!(
            evs.is_empty(),
            "a restored connection writes no events:{}",
            show(&evs)
        );
        let entry = ct(dp);
        assert_eq!(
            (entry.state, entry.epoch, entry.rule_id, entry.reason),
            (ct_state::OPEN, 3, RULE_TCP, Reason::AllowedByPolicy as u8)
        );
        client.close(OPEN_WAIT).unwrap();

        let after = totals(dp);
        assert!(
            after[&Reason::DeniedRevoked] - before[&Reason::DeniedRevoked] >= revoked.len() as u64
        );
        assert!(after[&Reason::AllowedEstablished] > before[&Reason::AllowedEstablished]);
        assert_eq!(dp.events_lost().unwrap(), 0);
    }
    assert_eq!(leftovers(P, &pin), Vec::<String>::new(), "teardown");
}

/// Frames forged inside a pod and sent from its eth0: a foreign source
/// address, and headers cut short (which BPF_PROG_TEST_RUN cannot feed).
#[test]
fn spoofed_and_malformed_frames_from_a_pod() {
    if !is_root() {
        return;
    }
    const P: &str = "clnsf";
    let pin;
    {
        let mut env = Env::new(P);
        pin = env.pin_path();
        let (a, b) = (env.topo.pod("a"), env.topo.pod("b"));
        let (dp, events) = (&mut env.dp, &mut env.events);
        let server = TcpServer::start(&b.netns, ANY6, TCP_ALLOWED).unwrap();
        let before = totals(dp);
        let tx = PacketSocket::open(&a.netns, "eth0").unwrap();
        let sniff = PacketSocket::open(&b.netns, "eth0").unwrap();
        let base = || Packet::new().eth_src(a.mac).eth_dst(a.host_mac);
        let syn_from = |src: IpAddr, dst: IpAddr, sport: u16| {
            base()
                .ip(src, dst)
                .tcp(sport, TCP_ALLOWED, SYN)
                .tcp_seq(7000, 0)
                .build()
        };
        // A SYN from `src` as b's eth0 receives it.
        let arrives = |src: IpAddr, sport: u16, wait: Duration| {
            sniff
                .recv_matching(wait, |f| {
                    let lay = packet::parse_layout(f);
                    let Some(l4) = lay.l4 else { return false };
                    // Source address offset and length, protocol offset.
                    let (s, len, p) = if f[12..14] == [8, 0] {
                        (26, 4, 23)
                    } else {
                        (22, 16, 20)
                    };
                    f.len() >= l4.start + 20
                        && f[p] == proto::TCP
                        && f[s..s + len] == addr(src)[16 - len..]
                        && f[l4.start..l4.start + 2] == sport.to_be_bytes()
                        && f[l4.start + 13] == SYN
                })
                .unwrap()
                .is_some()
        };
        drain(events);

        for v6 in [false, true] {
            // Control: the same frame with a's own address crosses the node
            // to b (and is allowed by policy), so the sniffer sees forwarded SYNs.
            let sport = 40100 + u16::from(v6);
            tx.send(&syn_from(a.ip(v6), b.ip(v6), sport)).unwrap();
            assert!(
                arrives(a.ip(v6), sport, OPEN_WAIT),
                "a forged SYN with a's own address reaches b (v6={v6})"
            );

            // Another source address: dropped where it leaves a.
            let spoofed: IpAddr = if v6 {
                Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 1, 0x99).into()
            } else {
                Ipv4Addr::new(10, 201, 1, 99).into()
            };
            let sport = 40200 + u16::from(v6);
            tx.send(&syn_from(spoofed, b.ip(v6), sport)).unwrap();
            assert!(
                !arrives(spoofed, sport, DROP_WAIT),
                "a SYN with a spoofed source reached b (v6={v6})"
            );
            let evs = drain(events);
            let dst = b.addr(v6, TCP_ALLOWED);
            Expect::new(Reason::DroppedSpoofedSource, a, A_EP, Direction::Egress)
                .flow(SocketAddr::new(spoofed, sport), dst)
                .one(&evs);
            Expect::new(Reason::AllowedByPolicy, b, B_EP, Direction::Ingress)
                .flow(SocketAddr::new(a.ip(v6), 40100 + u16::from(v6)), dst)
                .peer(A_ID, RULE_TCP)
                .one(&evs);
            assert!(
                !evs.iter()
                    .any(|(e, _)| ip_of(&e.src_addr) == spoofed && e.endpoint_id == B_EP),
                "the spoofed SYN never reached b's interface:{}",
                show(&evs)
            );
        }
        assert_eq!(server.accepted(), 0, "raw SYNs never complete a handshake");

        // Headers cut short: IPv4 with 10 bytes of its header, IPv4 with 8
        // bytes of TCP header, IPv6 with 20 bytes of its header.
        let syn4 = syn_from(a.ip(false), b.ip(false), 40300);
        let syn6 = syn_from(a.ip(true), b.ip(true), 40301);
        let short_tcp = base()
            .ipv4(A4, B4)
            .raw_l4(proto::TCP, [0x9d, 0x6c, 0x1f, 0x90, 0, 0, 0, 1])
            .build();
        for (what, frame) in [
            ("IPv4 header of 10 bytes", &syn4[..packet::ETH_HLEN + 10]),
            ("TCP header of 8 bytes", &short_tcp[..]),
            ("IPv6 header of 20 bytes", &syn6[..packet::ETH_HLEN + 20]),
        ] {
            tx.send(frame).unwrap();
            let deadline = Instant::now() + OPEN_WAIT;
            let evs = loop {
                let evs = drain(events);
                if !evs.is_empty() || Instant::now() > deadline {
                    break evs;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            let [(e, c)] = evs.as_slice() else {
                panic!("{what}: expected one event, got:{}", show(&evs));
            };
            assert_eq!(
                (c.verdict, c.reason, c.direction),
                (Verdict::Denied, Reason::DroppedMalformed, Direction::Egress),
                "{what}:{}",
                show(&evs)
            );
            assert_eq!((e.endpoint_id, e.ifindex), (A_EP, a.host_ifindex), "{what}");
            assert_eq!(e.packet_len as usize, frame.len(), "{what}");
        }
        assert!(
            !arrives(a.ip(false), 40300, Duration::from_millis(100)),
            "no truncated frame is forwarded"
        );

        let after = totals(dp);
        let grew = |r: Reason| after[&r] - before[&r];
        assert_eq!(grew(Reason::DroppedSpoofedSource), 2, "{after:?}");
        assert_eq!(grew(Reason::DroppedMalformed), 3, "{after:?}");
        assert!(grew(Reason::AllowedByPolicy) >= 2, "{after:?}");
        assert_eq!(dp.events_lost().unwrap(), 0);
    }
    assert_eq!(leftovers(P, &pin), Vec::<String>::new(), "teardown");
}
