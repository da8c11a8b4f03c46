//! The namespace harness itself, with real traffic (needs root; skipped
//! otherwise): topology, servers and probes, teardown, and the packet
//! builder's frames as judged by the kernel's own stack.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use palisade_tests::netns::{
    GATEWAY_V4, GATEWAY_V6, Netns, PacketSocket, ProbeResult, TcpClient, TcpServer, Topology,
    UdpEchoServer, icmp_probe, list_netns, tcp_probe, tcp_probe_from, udp_probe,
};
use palisade_tests::packet::{self, ExtHeader, Packet, SYN};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const NODE_PORT: u16 = 9090;
const OPEN_WAIT: Duration = Duration::from_secs(3);
const DROP_WAIT: Duration = Duration::from_millis(400);
const NEGATIVE_WAIT: Duration = Duration::from_millis(300);

use palisade_tests::is_root;

const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Namespaces and root-namespace interfaces whose name starts with `prefix`.
fn leftovers(prefix: &str) -> Vec<String> {
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
            .map(|n| n.trim().split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with(prefix)),
    );
    v
}

#[test]
fn two_pods_real_traffic() {
    if !is_root() {
        return;
    }
    const P: &str = "nhtr";
    {
        let mut topo = Topology::new(P).unwrap();
        let a_ip4 = Ipv4Addr::new(10, 244, 1, 2);
        let b_ip4 = Ipv4Addr::new(10, 244, 1, 3);
        topo.add_pod("a", a_ip4, Some(ip6("fd00:244::2"))).unwrap();
        topo.add_pod("b", b_ip4, Some(ip6("fd00:244::3"))).unwrap();
        let (a, b) = (topo.pod("a"), topo.pod("b"));
        let node = topo.node_ns();

        // Layout and naming.
        assert_eq!(node.name(), "nhtr-node");
        assert_eq!(a.netns.name(), "nhtr-a");
        assert_eq!(
            (a.host_ifname.as_str(), b.host_ifname.as_str()),
            ("nhtr0", "nhtr1")
        );
        assert_eq!(node.ifindex("nhtr1").unwrap(), b.host_ifindex);
        assert_eq!(b.netns.ifindex("eth0").unwrap(), b.ifindex);
        assert_eq!(node.sysctl("net.ipv4.ip_forward").unwrap(), "1");
        assert_eq!(node.sysctl("net.ipv6.conf.all.forwarding").unwrap(), "1");
        assert_eq!(
            a.netns.sysctl("net.ipv4.ip_forward").unwrap(),
            "0",
            "sysctls are per namespace"
        );
        assert_eq!(
            a.netns.sysctl("net.ipv6.conf.eth0.accept_dad").unwrap(),
            "0"
        );
        let mut links = node.links().unwrap();
        links.sort();
        assert_eq!(links, ["lo", "nhtr0", "nhtr1"]);
        // Nothing in a fresh namespace filters forwarding.
        if let Ok(out) = node.exec(["iptables", "-S", "FORWARD"]) {
            let rules = String::from_utf8_lossy(&out.stdout);
            assert!(
                !out.status.success() || rules.trim() == "-P FORWARD ACCEPT",
                "{rules}"
            );
        }

        // Servers in both pods and on the node.
        let servers: Vec<(TcpServer, UdpEchoServer)> = [&a.netns, &b.netns, node]
            .into_iter()
            .map(|ns| {
                let port = if std::ptr::eq(ns, node) {
                    NODE_PORT
                } else {
                    TCP_PORT
                };
                (
                    TcpServer::start(ns, ANY6, port).unwrap(),
                    UdpEchoServer::start(ns, ANY6, UDP_PORT).unwrap(),
                )
            })
            .collect();

        // Pod to pod, both directions, both families.
        for (from, to) in [(a, b), (b, a)] {
            for v6 in [false, true] {
                let what = format!("{} -> {} v6={v6}", from.name, to.name);
                assert_eq!(
                    tcp_probe(&from.netns, to.addr(v6, TCP_PORT), OPEN_WAIT),
                    ProbeResult::Open,
                    "tcp {what}"
                );
                assert_eq!(
                    udp_probe(&from.netns, to.addr(v6, UDP_PORT), OPEN_WAIT),
                    ProbeResult::Open,
                    "udp {what}"
                );
                assert_eq!(
                    icmp_probe(&from.netns, to.ip(v6), OPEN_WAIT),
                    ProbeResult::Open,
                    "icmp {what}"
                );
            }
        }
        assert!(servers[0].0.accepted() >= 2 && servers[1].0.accepted() >= 2);
        assert!(servers[0].1.received() >= 2 && servers[1].1.received() >= 2);

        // Pod to its gateway on the node, and node to pod.
        let gw6 = SocketAddr::V6(SocketAddrV6::new(GATEWAY_V6, NODE_PORT, 0, a.ifindex));
        let gw4 = SocketAddr::new(GATEWAY_V4.into(), NODE_PORT);
        assert_eq!(tcp_probe(&a.netns, gw4, OPEN_WAIT), ProbeResult::Open);
        assert_eq!(tcp_probe(&a.netns, gw6, OPEN_WAIT), ProbeResult::Open);
        assert_eq!(
            udp_probe(
                &a.netns,
                SocketAddr::new(GATEWAY_V4.into(), UDP_PORT),
                OPEN_WAIT
            ),
            ProbeResult::Open
        );
        assert_eq!(
            icmp_probe(&a.netns, GATEWAY_V4.into(), OPEN_WAIT),
            ProbeResult::Open
        );
        assert_eq!(
            tcp_probe(node, b.addr(false, TCP_PORT), OPEN_WAIT),
            ProbeResult::Open
        );
        assert_eq!(
            tcp_probe(node, b.addr(true, TCP_PORT), OPEN_WAIT),
            ProbeResult::Open
        );

        // No server: refused, distinct from a drop.
        let t = Instant::now();
        assert_eq!(
            tcp_probe(&a.netns, b.addr(false, 1), OPEN_WAIT),
            ProbeResult::Refused
        );
        assert_eq!(
            tcp_probe(&a.netns, b.addr(true, 1), OPEN_WAIT),
            ProbeResult::Refused
        );
        assert_eq!(
            udp_probe(&a.netns, b.addr(false, 1), OPEN_WAIT),
            ProbeResult::Refused
        );
        assert_eq!(
            udp_probe(&a.netns, b.addr(true, 1), OPEN_WAIT),
            ProbeResult::Refused
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "refusals are immediate"
        );
        // Silently dropped (blackhole route on the node): timed out.
        node.ip(["route", "add", "blackhole", "10.99.0.1/32"])
            .unwrap();
        node.ip(["route", "add", "prohibit", "10.99.0.2/32"])
            .unwrap();
        let blackhole = SocketAddr::new(Ipv4Addr::new(10, 99, 0, 1).into(), TCP_PORT);
        let t = Instant::now();
        assert_eq!(
            tcp_probe(&a.netns, blackhole, DROP_WAIT),
            ProbeResult::TimedOut
        );
        assert!(t.elapsed() >= DROP_WAIT && t.elapsed() < DROP_WAIT + Duration::from_secs(2));
        assert_eq!(
            udp_probe(&a.netns, blackhole, DROP_WAIT),
            ProbeResult::TimedOut
        );
        assert_eq!(
            icmp_probe(&a.netns, blackhole.ip(), DROP_WAIT),
            ProbeResult::TimedOut
        );
        // ICMP administratively prohibited: unreachable.
        let prohibited = SocketAddr::new(Ipv4Addr::new(10, 99, 0, 2).into(), TCP_PORT);
        assert_eq!(
            tcp_probe(&a.netns, prohibited, OPEN_WAIT),
            ProbeResult::Unreachable
        );

        // A long-lived connection across a path outage.
        let mut client = TcpClient::connect(&a.netns, b.addr(false, TCP_PORT), OPEN_WAIT).unwrap();
        assert_eq!(client.greeting(), "palisade:8080\n");
        assert!(client.exchange(b"one\n", OPEN_WAIT).unwrap());
        node.ip(["route", "replace", "blackhole", &format!("{b_ip4}/32")])
            .unwrap();
        assert!(
            !client.exchange(b"two\n", DROP_WAIT).unwrap(),
            "path is down"
        );
        node.ip([
            "route",
            "replace",
            &format!("{b_ip4}/32"),
            "dev",
            &b.host_ifname,
            "scope",
            "link",
        ])
        .unwrap();
        // The late echo of "two" arrives first, then "three".
        assert!(
            client
                .exchange(b"three\n", Duration::from_secs(10))
                .unwrap(),
            "path is back"
        );
        assert!(client.exchange(b"four\n", OPEN_WAIT).unwrap());
        client.close(OPEN_WAIT).unwrap();

        // Same source port again after a graceful close (TIME_WAIT reuse),
        // then with probes that close with RST.
        let src = SocketAddr::new(a_ip4.into(), 40123);
        let dst = b.addr(false, TCP_PORT);
        let c = TcpClient::connect_from(&a.netns, src, dst, OPEN_WAIT).unwrap();
        assert_eq!(c.local_addr(), src);
        c.close(OPEN_WAIT).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            tcp_probe_from(&a.netns, src, dst, OPEN_WAIT),
            ProbeResult::Open
        );
        assert_eq!(
            tcp_probe_from(&a.netns, src, dst, OPEN_WAIT),
            ProbeResult::Open
        );
        let c = TcpClient::connect_from(&a.netns, src, dst, OPEN_WAIT).unwrap();
        c.abort();
        assert_eq!(
            tcp_probe_from(&a.netns, src, dst, OPEN_WAIT),
            ProbeResult::Open
        );
        let src6 = SocketAddr::new(a.ip(true), 40124);
        assert_eq!(
            tcp_probe_from(&a.netns, src6, b.addr(true, TCP_PORT), OPEN_WAIT),
            ProbeResult::Open
        );

        // Removing a pod removes its veth at once.
        topo.add_pod("c", Ipv4Addr::new(10, 244, 1, 4), None)
            .unwrap();
        assert_eq!(topo.pod("c").host_ifname, "nhtr2");
        assert_eq!(
            icmp_probe(
                &topo.pod("a").netns,
                Ipv4Addr::new(10, 244, 1, 4).into(),
                OPEN_WAIT
            ),
            ProbeResult::Open
        );
        topo.remove_pod("c").unwrap();
        assert!(
            !topo
                .node_ns()
                .links()
                .unwrap()
                .contains(&"nhtr2".to_string())
        );
        assert!(topo.get_pod("c").is_none());
        drop(servers);
    }
    assert_eq!(
        leftovers(P),
        Vec::<String>::new(),
        "teardown left something behind"
    );
}

#[test]
fn teardown_on_panic_and_stale_cleanup() {
    if !is_root() {
        return;
    }
    const P: &str = "nhtd";
    // A stale namespace from an "earlier run" is removed by Topology::new.
    std::mem::forget(Netns::create("nhtd-stale").unwrap());
    assert!(list_netns().unwrap().contains(&"nhtd-stale".to_string()));

    let result = std::panic::catch_unwind(|| {
        let mut topo = Topology::new(P).unwrap();
        assert!(!list_netns().unwrap().contains(&"nhtd-stale".to_string()));
        topo.add_pod("x", Ipv4Addr::new(10, 1, 0, 2), None).unwrap();
        let _srv =
            TcpServer::start(&topo.pod("x").netns, Ipv4Addr::UNSPECIFIED.into(), 80).unwrap();
        assert_eq!(leftovers(P).len(), 2, "node and pod namespaces");
        // A failing add_pod leaves nothing half-made behind.
        assert!(topo.add_pod("x", Ipv4Addr::new(10, 1, 0, 3), None).is_err());
        assert!(
            topo.add_pod("bad/name", Ipv4Addr::new(10, 1, 0, 3), None)
                .is_err()
        );
        assert!(
            topo.add_pod("y", Ipv4Addr::new(10, 1, 0, 2), Some(ip6("fe80::1")))
                .is_err()
        );
        assert_eq!(leftovers(P).len(), 2);
        panic!("test failure inside the topology");
    });
    assert!(result.is_err());
    assert_eq!(leftovers(P), Vec::<String>::new());
    assert!(Topology::new("too-long").is_err());
}

/// The packet builder's frames, injected on a pod's host-side veth, are
/// accepted by the pod's kernel (which verifies IPv4 header and L4
/// checksums), while the same frames with a wrong checksum are not.
#[test]
fn crafted_frames_accepted_by_kernel() {
    if !is_root() {
        return;
    }
    let mut topo = Topology::new("nhpk").unwrap();
    let pod_ip4 = Ipv4Addr::new(10, 244, 2, 2);
    let pod_ip6 = ip6("fd00:244:2::2");
    topo.add_pod("p", pod_ip4, Some(pod_ip6)).unwrap();
    let pod = topo.pod("p");
    let node = topo.node_ns();
    let _tcp = TcpServer::start(&pod.netns, ANY6, TCP_PORT).unwrap();
    let udp = UdpEchoServer::start(&pod.netns, ANY6, UDP_PORT).unwrap();
    let sock = PacketSocket::open(node, &pod.host_ifname).unwrap();
    let base = || Packet::new().eth_src(pod.host_mac).eth_dst(pod.mac);
    let gw4 = GATEWAY_V4;
    let gw6 = GATEWAY_V6;
    let wait = Duration::from_secs(2);

    // UDP: the echo comes back (v4 from the pod to the gateway).
    let udp_reply = |frame: &[u8], payload: &[u8], wait: Duration| {
        sock.send(frame).unwrap();
        sock.recv_matching(wait, |f| {
            let lay = packet::parse_layout(f);
            lay.l4.is_some() && f[lay.payload.clone()] == *payload
        })
        .unwrap()
    };
    let cases: Vec<(&str, Packet)> = vec![
        ("udp4", base().ipv4(gw4, pod_ip4).udp(40000, UDP_PORT)),
        (
            "udp4 options",
            base()
                .ipv4(gw4, pod_ip4)
                .ipv4_options([1, 1, 1])
                .udp(40000, UDP_PORT),
        ),
        (
            "udp4 df",
            base()
                .ipv4(gw4, pod_ip4)
                .dont_fragment(true)
                .udp(40000, UDP_PORT),
        ),
        ("udp6", base().ipv6(gw6, pod_ip6).udp(40000, UDP_PORT)),
        (
            "udp6 hop-by-hop",
            base()
                .ipv6(gw6, pod_ip6)
                .ext(ExtHeader::hop_by_hop(0))
                .udp(40000, UDP_PORT),
        ),
        (
            "udp6 long hop-by-hop",
            base()
                .ipv6(gw6, pod_ip6)
                .ext(ExtHeader::hop_by_hop(40))
                .udp(40000, UDP_PORT),
        ),
        (
            "udp6 dest opts",
            base()
                .ipv6(gw6, pod_ip6)
                .ext(ExtHeader::dest_opts(4))
                .udp(40000, UDP_PORT),
        ),
        (
            "udp6 routing",
            base()
                .ipv6(gw6, pod_ip6)
                .ext(ExtHeader::routing(2, 0, 0))
                .udp(40000, UDP_PORT),
        ),
        (
            "udp6 atomic fragment",
            base()
                .ipv6(gw6, pod_ip6)
                .ext(ExtHeader::fragment(7, 0, false))
                .udp(40000, UDP_PORT),
        ),
        (
            "udp6 ext chain",
            base()
                .ipv6(gw6, pod_ip6)
                .ext(ExtHeader::hop_by_hop(0))
                .ext(ExtHeader::dest_opts(1))
                .ext(ExtHeader::routing(2, 0, 0))
                .ext(ExtHeader::fragment(7, 0, false))
                .udp(40000, UDP_PORT),
        ),
        (
            "udp4 other port",
            base().ipv4(gw4, pod_ip4).udp(40001, UDP_PORT),
        ),
    ];
    for (i, (name, p)) in cases.into_iter().enumerate() {
        let payload = format!("payload-{i}-{name}!");
        let good = p.clone().payload(&payload).build();
        assert!(
            udp_reply(&good, payload.as_bytes(), wait).is_some(),
            "{name}: no echo"
        );
        let bad = p.clone().l4_checksum(0x1234).payload(&payload).build();
        assert!(
            udp_reply(&bad, payload.as_bytes(), NEGATIVE_WAIT).is_none(),
            "{name}: bad L4 checksum accepted"
        );
    }
    let payload = b"bad ip checksum";
    let bad_ip = base()
        .ipv4(gw4, pod_ip4)
        .ip_checksum(0x4242)
        .udp(40000, UDP_PORT)
        .payload(payload)
        .build();
    assert!(
        udp_reply(&bad_ip, payload, NEGATIVE_WAIT).is_none(),
        "bad IPv4 header checksum accepted"
    );
    let received = udp.received();

    // TCP SYN to a listening port: SYN-ACK.
    for v6 in [false, true] {
        let syn = if v6 {
            base()
                .ipv6(gw6, pod_ip6)
                .tcp(41000, TCP_PORT, SYN)
                .tcp_seq(1000, 0)
                .build()
        } else {
            base()
                .ipv4(gw4, pod_ip4)
                .tcp(41000, TCP_PORT, SYN)
                .tcp_seq(1000, 0)
                .build()
        };
        sock.send(&syn).unwrap();
        let synack = sock
            .recv_matching(wait, |f| {
                let lay = packet::parse_layout(f);
                lay.l4.is_some_and(|r| {
                    f[r.start + 13] == packet::SYN | packet::ACK
                        && f[r.start + 8..r.start + 12] == 1001u32.to_be_bytes()
                })
            })
            .unwrap();
        assert!(synack.is_some(), "no SYN-ACK (v6={v6})");
    }

    // ICMP echo: reply.
    for (v6, req) in [
        (
            false,
            base()
                .ipv4(gw4, pod_ip4)
                .icmp_echo(77, 1, true)
                .payload(b"ping4")
                .build(),
        ),
        (
            true,
            base()
                .ipv6(gw6, pod_ip6)
                .icmp_echo(77, 1, true)
                .payload(b"ping6")
                .build(),
        ),
    ] {
        sock.send(&req).unwrap();
        let want = if v6 {
            packet::icmp6::ECHO_REPLY
        } else {
            packet::icmp::ECHO_REPLY
        };
        let reply = sock
            .recv_matching(wait, |f| {
                let lay = packet::parse_layout(f);
                lay.l4.is_some_and(|r| f[r.start] == want)
                    && f.ends_with(if v6 { b"ping6" } else { b"ping4" })
            })
            .unwrap();
        assert!(reply.is_some(), "no echo reply (v6={v6})");
        // The kernel's IPv4 header checksum verifies with our code.
        if let Some(r) = reply.filter(|_| !v6) {
            assert_eq!(packet::checksum(&r[14..34]), 0);
        }
    }

    // ARP request for the pod's address: reply with its MAC.
    sock.send(&packet::arp_request(pod.host_mac, gw4, pod_ip4))
        .unwrap();
    let arp = sock
        .recv_matching(wait, |f| {
            f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
        })
        .unwrap()
        .expect("no ARP reply");
    assert_eq!(arp[22..28], pod.mac);
    assert_eq!(arp[28..32], pod_ip4.octets());

    assert_eq!(
        udp.received(),
        received,
        "nothing else reached the UDP server"
    );
}
