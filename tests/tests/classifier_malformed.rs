//! Malformed packets in the real kernel: the classifier never fails, drops what
//! it cannot read with `dropped_malformed` (or its own reason), and never lets
//! through a packet the policy denies.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_tests::{
    fixture::{Classifier, any_port, port_ranges},
    packet::{self, ExtHeader, Packet, SYN},
};
use policy_common::{
    Direction::{Egress, Ingress},
    EndpointInfo, PolicyKey, Reason, identity, proto,
};

const EP: u32 = 3;
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 10);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 0x10);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 9, 1, 20);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 1, 0x20);
const PEER_ID: u32 = 500;

/// Ingress isolated; PEER may reach TCP 80, UDP 53, SCTP 9000 and ICMP.
fn allowing_classifier() -> Classifier {
    let mut c = Classifier::load().unwrap();
    c.set_endpoint(EndpointInfo {
        endpoint_id: EP,
        identity: 300,
        flags: EndpointInfo::INGRESS_ISOLATED
            | EndpointInfo::EGRESS_ISOLATED
            | EndpointInfo::HAS_IPV4
            | EndpointInfo::HAS_IPV6,
        ipv4: LOCAL.octets(),
        ipv6: LOCAL6.octets(),
    })
    .unwrap();
    c.set_peer(IpAddr::V4(PEER), PEER_ID, identity::ANY)
        .unwrap();
    c.set_peer(IpAddr::V6(PEER6), PEER_ID, identity::ANY)
        .unwrap();
    let key = |p| PolicyKey::new(EP, PEER_ID, Ingress as u8, p);
    c.set_policy(key(proto::TCP), port_ranges(&[(80, 80, 1)]))
        .unwrap();
    c.set_policy(key(proto::UDP), port_ranges(&[(53, 53, 2)]))
        .unwrap();
    c.set_policy(key(proto::SCTP), port_ranges(&[(9000, 9000, 3)]))
        .unwrap();
    c.set_policy(key(proto::OTHER), any_port(4)).unwrap();
    c
}

/// BPF_PROG_TEST_RUN refuses (EINVAL) a frame shorter than Ethernet plus the
/// fixed IPv4 (20) or IPv6 (40) header its EtherType announces, so shorter
/// truncations cannot be fed to it; the classifier's bounds checks for them are
/// exercised with real frames in `classifier_netns`.
fn min_test_run_len(frame: &[u8]) -> usize {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => packet::ETH_HLEN + 20,
        0x86dd => packet::ETH_HLEN + 40,
        _ => packet::ETH_HLEN,
    }
}

fn counter(c: &mut Classifier, reason: Reason) -> u64 {
    c.datapath
        .verdict_totals()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .unwrap()
        .1
        .packets
}

/// Frames the policy allows, each with the byte where its transport header ends.
fn allowed_frames() -> Vec<(&'static str, Vec<u8>, usize)> {
    let mut frames = Vec::new();
    let mut add = |name, p: Packet| {
        let (frame, layout) = p.build_with_layout();
        let l4_end = layout
            .l4
            .as_ref()
            .expect("frame has a transport header")
            .end;
        frames.push((name, frame, l4_end));
    };
    add(
        "tcp4",
        Packet::new()
            .ipv4(PEER, LOCAL)
            .tcp(40000, 80, SYN)
            .payload([7u8; 32]),
    );
    add(
        "tcp4 with options",
        Packet::new()
            .ipv4(PEER, LOCAL)
            .ipv4_options([1u8, 1, 1, 1, 7, 7, 4, 0, 0, 0, 0, 0])
            .tcp(40000, 80, SYN),
    );
    add(
        "udp6",
        Packet::new()
            .ipv6(PEER6, LOCAL6)
            .udp(5000, 53)
            .payload([1u8; 16]),
    );
    add(
        "tcp6 behind extension headers",
        Packet::new()
            .ipv6(PEER6, LOCAL6)
            .exts([
                ExtHeader::hop_by_hop(0),
                ExtHeader::dest_opts(1),
                ExtHeader::routing(0, 0, 0),
            ])
            .tcp(40000, 80, SYN),
    );
    add("sctp4", Packet::new().ipv4(PEER, LOCAL).sctp(5000, 9000, 1));
    add(
        "icmp4 echo",
        Packet::new().ipv4(PEER, LOCAL).icmp_echo(1, 1, true),
    );
    add(
        "icmp6 echo",
        Packet::new().ipv6(PEER6, LOCAL6).icmp_echo(1, 1, true),
    );
    frames
}

#[test]
fn truncated_at_every_header_boundary() {
    let mut c = allowing_classifier();
    for (name, frame, l4_end) in allowed_frames() {
        assert!(
            c.run(Ingress, &frame).unwrap().passed(),
            "{name}: the whole frame is allowed"
        );
        for cut in packet::truncation_points(&frame) {
            if cut < min_test_run_len(&frame) {
                continue;
            }
            let run = c.run(Ingress, &frame[..cut]).unwrap();
            if cut < l4_end {
                assert!(run.dropped(), "{name} cut at {cut}: {run:?}");
                assert_eq!(
                    run.reason(),
                    Some(Reason::DroppedMalformed),
                    "{name} cut at {cut}"
                );
            } else {
                assert!(
                    run.passed(),
                    "{name} cut at {cut} keeps every header: {run:?}"
                );
            }
        }
    }
}

#[test]
fn inconsistent_ipv4_headers() {
    let mut c = allowing_classifier();
    let base = || Packet::new().ipv4(PEER, LOCAL).tcp(40000, 80, SYN);
    for (name, frame) in [
        ("ihl 0", base().ihl(0).build()),
        ("ihl 4", base().ihl(4).build()),
        ("ihl 15 past the end", base().ihl(15).build()),
        (
            "total length shorter than the header",
            base().total_len(12).build(),
        ),
        ("version 6 under EtherType IPv4", {
            let mut f = base().build();
            f[14] = 0x65;
            f
        }),
        ("version 4 under EtherType IPv6", {
            let mut f = Packet::new()
                .ipv6(PEER6, LOCAL6)
                .tcp(40000, 80, SYN)
                .build();
            f[14] = 0x45;
            f
        }),
    ] {
        let run = c.run(Ingress, &frame).unwrap();
        assert!(run.dropped(), "{name}: {run:?}");
        assert_eq!(run.reason(), Some(Reason::DroppedMalformed), "{name}");
    }
}

#[test]
fn bogus_ipv6_extension_chains() {
    let mut c = allowing_classifier();
    let tcp_after = |exts: Vec<ExtHeader>| {
        Packet::new()
            .ipv6(PEER6, LOCAL6)
            .exts(exts)
            .tcp(40000, 80, SYN)
            .build()
    };

    // Eight headers are walked; a ninth is refused with its own reason.
    let run = c
        .run(Ingress, &tcp_after(vec![ExtHeader::dest_opts(0); 8]))
        .unwrap();
    assert!(run.passed(), "eight extension headers: {run:?}");
    let run = c
        .run(Ingress, &tcp_after(vec![ExtHeader::dest_opts(0); 9]))
        .unwrap();
    assert!(run.dropped(), "{run:?}");
    assert_eq!(run.reason(), Some(Reason::DroppedIpv6ExtChain));

    // A length field running past the end of the packet.
    let run = c
        .run(
            Ingress,
            &tcp_after(vec![ExtHeader::hop_by_hop(0).with_len_field(200)]),
        )
        .unwrap();
    assert!(run.dropped(), "{run:?}");
    assert_eq!(run.reason(), Some(Reason::DroppedMalformed));

    // A chain that claims a transport header the packet does not have.
    let frame = Packet::new()
        .ipv6(PEER6, LOCAL6)
        .ext(ExtHeader::dest_opts(0).with_next_header(proto::TCP))
        .build();
    let run = c.run(Ingress, &frame).unwrap();
    assert!(run.dropped(), "{run:?}");
    assert_eq!(run.reason(), Some(Reason::DroppedMalformed));

    // Headers that look like a port-bearing transport but are not allowed as such:
    // the packet is judged as "other protocol" and denied for a peer with only port rules.
    let mut c2 = allowing_classifier();
    c2.remove_policy(PolicyKey::new(EP, PEER_ID, Ingress as u8, proto::OTHER))
        .unwrap();
    let esp = Packet::new()
        .ipv6(PEER6, LOCAL6)
        .raw_l4(50, vec![0u8; 16])
        .build();
    assert_eq!(
        c2.run(Ingress, &esp).unwrap().reason(),
        Some(Reason::DeniedByPolicy)
    );
}

#[test]
fn payload_sizes_do_not_change_the_verdict() {
    let mut c = allowing_classifier();
    for len in [0usize, 1, 1400, 3000] {
        let allowed = Packet::new()
            .ipv4(PEER, LOCAL)
            .tcp(40000, 80, SYN)
            .payload(vec![0xab; len])
            .build();
        let denied = Packet::new()
            .ipv4(PEER, LOCAL)
            .tcp(40000, 81, SYN)
            .payload(vec![0xab; len])
            .build();
        assert!(c.run(Ingress, &allowed).unwrap().passed(), "payload {len}");
        let run = c.run(Ingress, &denied).unwrap();
        assert_eq!(
            run.reason(),
            Some(Reason::DeniedByPolicy),
            "payload {len}: {run:?}"
        );
    }
    // A total length claiming more than the frame holds: the verdict is the
    // policy's (the IP stack discards such a packet after us).
    let liar = Packet::new()
        .ipv4(PEER, LOCAL)
        .tcp(40000, 81, SYN)
        .total_len(65535)
        .build();
    assert_eq!(
        c.run(Ingress, &liar).unwrap().reason(),
        Some(Reason::DeniedByPolicy)
    );
}

/// Deterministic pseudo-random bytes (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_frames_never_pass_a_deny_all_endpoint() {
    // Isolated both ways with no rule at all: only link-local control may pass.
    let mut c = Classifier::load().unwrap();
    c.set_endpoint(EndpointInfo {
        endpoint_id: EP,
        identity: 300,
        flags: EndpointInfo::INGRESS_ISOLATED
            | EndpointInfo::EGRESS_ISOLATED
            | EndpointInfo::HAS_IPV4
            | EndpointInfo::HAS_IPV6,
        ipv4: LOCAL.octets(),
        ipv6: LOCAL6.octets(),
    })
    .unwrap();
    let valid: Vec<Vec<u8>> = allowed_frames().into_iter().map(|(_, f, _)| f).collect();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for i in 0..4000 {
        let frame = match i % 3 {
            // Random bytes under an IP EtherType.
            0 | 1 => {
                let len = 54 + (rng.next() % 200) as usize;
                let mut f = rng.bytes(len);
                let ethertype: u16 = if i % 3 == 0 { 0x0800 } else { 0x86dd };
                f[12..14].copy_from_slice(&ethertype.to_be_bytes());
                if len > 14 {
                    f[14] = (f[14] & 0x0f) | if i % 3 == 0 { 0x40 } else { 0x60 };
                }
                f
            }
            // A valid frame with a few bytes flipped.
            _ => {
                let mut f = valid[i % valid.len()].clone();
                for _ in 0..1 + rng.next() % 4 {
                    let at = 12 + (rng.next() as usize) % (f.len() - 12);
                    f[at] ^= 1 << (rng.next() % 8);
                }
                f
            }
        };
        let direction = if i % 2 == 0 { Ingress } else { Egress };
        let control_before = counter(&mut c, Reason::AllowedControl);
        let (action, events) = match c.run_raw(direction, &frame) {
            Ok(run) => run,
            Err(e) if frame.len() < min_test_run_len(&frame) => {
                let _ = e; // a flipped EtherType made the frame too short to feed
                continue;
            }
            Err(e) => panic!("frame {i}: {e:#}"),
        };
        for event in &events {
            assert!(event.is_ok(), "frame {i}: undecodable event {event:?}");
        }
        if action == policy_agent::datapath::action::PASS {
            assert_eq!(
                counter(&mut c, Reason::AllowedControl),
                control_before + 1,
                "frame {i} passed a deny-all endpoint without being link control: {frame:02x?}"
            );
        } else {
            assert_eq!(action, policy_agent::datapath::action::DROP, "frame {i}");
        }
    }
}
