//! Verdict tables: the classifier loaded in this kernel, run on crafted
//! packets with BPF_PROG_TEST_RUN, against map contents written the way the
//! agent writes them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use palisade_tests::{
    fixture::{Classifier, Run, TEST_IFINDEX, any_port, port_ranges},
    packet::{self, ACK, FIN, Packet, RST, SYN},
};
use policy_common::{
    CtKey,
    Direction::{Egress, Ingress},
    EndpointInfo, PolicyKey, Reason, Verdict, ct_flags, ct_state, identity, proto, v4_mapped,
};

const EP: u32 = 7;
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 0x10);
const LOCAL_ID: u32 = 300;

/// Pod allowed TCP 80 and 8000-8100, SCTP 9000 (identity 400).
const A: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 20);
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 2, 0x20);
const A_ID: u32 = 400;
/// Pod with no rule of its own (identity 401).
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 21);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 2, 0x21);
const B_ID: u32 = 401;
/// Pod allowed everything by a rule without ports (identity 402).
const C: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 22);
const C_ID: u32 = 402;
const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// ipBlock 192.0.2.0/24 except 192.0.2.128/25.
const EXT_IN_BLOCK: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const EXT_IN_EXCEPT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const EXT_OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const BLOCK_ID: u32 = 1000;
const EXCEPT_ID: u32 = 1001;
/// ipBlock 2001:db8::/32.
const EXT6_IN_BLOCK: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const BLOCK6_ID: u32 = 1002;

const RULE_A_80: u32 = 11;
const RULE_A_RANGE: u32 = 12;
const RULE_ANY_DNS: u32 = 13;
const RULE_BLOCK: u32 = 14;
const RULE_A_SCTP: u32 = 15;
const RULE_C_ALL: u32 = 16;
const RULE_BLOCK6: u32 = 17;

fn ingress_key(identity: u32, protocol: u8) -> PolicyKey {
    PolicyKey::new(EP, identity, Ingress as u8, protocol)
}

/// An endpoint isolated for ingress with the rules named above; egress
/// isolation as given.
fn classifier(egress_isolated: bool) -> Classifier {
    let mut c = Classifier::load().expect("load classifier");
    // Ingress has entries keyed by ANY and by CIDR identities, egress by ANY
    // (added by some tests), as the compiler would flag them.
    let mut flags = EndpointInfo::INGRESS_ISOLATED
        | EndpointInfo::INGRESS_ANY_PEER
        | EndpointInfo::INGRESS_CIDR_PEER
        | EndpointInfo::EGRESS_ANY_PEER
        | EndpointInfo::HAS_IPV4
        | EndpointInfo::HAS_IPV6;
    if egress_isolated {
        flags |= EndpointInfo::EGRESS_ISOLATED;
    }
    c.set_endpoint(EndpointInfo {
        endpoint_id: EP,
        identity: LOCAL_ID,
        flags,
        ipv4: LOCAL.octets(),
        ipv6: LOCAL6.octets(),
    })
    .unwrap();
    for (ip, id) in [
        (IpAddr::V4(A), A_ID),
        (IpAddr::V6(A6), A_ID),
        (IpAddr::V4(B), B_ID),
        (IpAddr::V6(B6), B_ID),
        (IpAddr::V4(C), C_ID),
        (IpAddr::V4(LOCAL), LOCAL_ID),
    ] {
        c.set_peer(ip, id, identity::ANY).unwrap();
    }
    c.set_peer(IpAddr::V4(NODE), identity::HOST, identity::ANY)
        .unwrap();
    c.set_cidr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)), 24, BLOCK_ID)
        .unwrap();
    c.set_cidr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 128)), 25, EXCEPT_ID)
        .unwrap();
    c.set_cidr(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)),
        32,
        BLOCK6_ID,
    )
    .unwrap();

    c.set_policy(
        ingress_key(A_ID, proto::TCP),
        port_ranges(&[(80, 80, RULE_A_80), (8000, 8100, RULE_A_RANGE)]),
    )
    .unwrap();
    c.set_policy(
        ingress_key(A_ID, proto::SCTP),
        port_ranges(&[(9000, 9000, RULE_A_SCTP)]),
    )
    .unwrap();
    c.set_policy(
        ingress_key(identity::ANY, proto::UDP),
        port_ranges(&[(53, 53, RULE_ANY_DNS)]),
    )
    .unwrap();
    c.set_policy(ingress_key(BLOCK_ID, proto::TCP), any_port(RULE_BLOCK))
        .unwrap();
    c.set_policy(ingress_key(BLOCK6_ID, proto::TCP), any_port(RULE_BLOCK6))
        .unwrap();
    for p in [proto::TCP, proto::UDP, proto::SCTP, proto::OTHER] {
        c.set_policy(ingress_key(C_ID, p), any_port(RULE_C_ALL))
            .unwrap();
    }
    c
}

#[track_caller]
fn expect_allowed(run: &Run, reason: Reason, rule_id: u32, peer_identity: u32) {
    assert!(run.passed(), "expected pass, got {run:?}");
    let [(event, codes)] = run.events.as_slice() else {
        panic!("expected one flow event, got {run:?}");
    };
    assert_eq!(codes.verdict, Verdict::Allowed, "{run:?}");
    assert_eq!(codes.reason, reason, "{run:?}");
    assert_eq!(event.rule_id, rule_id, "{run:?}");
    assert_eq!(event.peer_identity, peer_identity, "{run:?}");
    assert_eq!(event.endpoint_id, EP);
}

#[track_caller]
fn expect_dropped(run: &Run, reason: Reason) {
    assert!(run.dropped(), "expected drop, got {run:?}");
    assert_eq!(run.reason(), Some(reason), "{run:?}");
}

/// Passed without a flow event (established, related, fragment, control).
#[track_caller]
fn expect_quiet_pass(run: &Run) {
    assert!(run.passed(), "expected pass, got {run:?}");
    assert!(run.events.is_empty(), "expected no event, got {run:?}");
}

#[test]
fn identity_rule_allows_only_its_peer_and_ports() {
    let mut c = classifier(false);
    let run = c
        .run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, SYN))
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_A_80, A_ID);
    let (event, codes) = &run.events[0];
    assert_eq!(codes.direction, Ingress);
    assert_eq!(
        (event.src_port, event.dst_port, event.protocol),
        (40000, 80, proto::TCP)
    );
    assert_eq!(&event.src_addr[12..], &A.octets());
    assert_eq!(&event.dst_addr[12..], &LOCAL.octets());
    assert_eq!(event.family, 4);

    let run = c
        .run(Ingress, &packet::tcp4(B, 40000, LOCAL, 80, SYN))
        .unwrap();
    expect_dropped(&run, Reason::DeniedByPolicy);
    assert_eq!(run.events[0].0.peer_identity, B_ID);
}

#[test]
fn port_range_edges() {
    let mut c = classifier(false);
    for (dport, allowed_by) in [
        (79, None),
        (80, Some(RULE_A_80)),
        (81, None),
        (7999, None),
        (8000, Some(RULE_A_RANGE)),
        (8050, Some(RULE_A_RANGE)),
        (8100, Some(RULE_A_RANGE)),
        (8101, None),
    ] {
        let run = c
            .run(Ingress, &packet::tcp4(A, 40000 + dport, LOCAL, dport, SYN))
            .unwrap();
        match allowed_by {
            Some(rule) => expect_allowed(&run, Reason::AllowedByPolicy, rule, A_ID),
            None => expect_dropped(&run, Reason::DeniedByPolicy),
        }
    }
}

#[test]
fn any_identity_rule_and_protocol_mismatch() {
    let mut c = classifier(false);
    // UDP 53 from anyone (ANY identity), including a pod without rules and the world.
    let run = c.run(Ingress, &packet::udp4(B, 5000, LOCAL, 53)).unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_ANY_DNS, B_ID);
    let run = c
        .run(Ingress, &packet::udp4(EXT_OUTSIDE, 5000, LOCAL, 53))
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_ANY_DNS, identity::WORLD);
    // Same port, other protocol: TCP 53 has no rule.
    expect_dropped(
        &c.run(Ingress, &packet::tcp4(B, 5000, LOCAL, 53, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
    // A's TCP 80 rule does not open UDP 80.
    expect_dropped(
        &c.run(Ingress, &packet::udp4(A, 5000, LOCAL, 80)).unwrap(),
        Reason::DeniedByPolicy,
    );
    // SCTP 9000 for A, not TCP 9000.
    let run = c
        .run(Ingress, &packet::sctp4(A, 5000, LOCAL, 9000))
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_A_SCTP, A_ID);
    expect_dropped(
        &c.run(Ingress, &packet::tcp4(A, 5000, LOCAL, 9000, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
    expect_dropped(
        &c.run(Ingress, &packet::sctp4(A, 5000, LOCAL, 9001))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
    expect_dropped(
        &c.run(Ingress, &packet::sctp4(B, 5000, LOCAL, 9000))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn rule_without_ports_allows_every_port_and_protocol() {
    let mut c = classifier(false);
    for frame in [
        packet::tcp4(C, 1, LOCAL, 65535, SYN),
        packet::udp4(C, 1, LOCAL, 1),
        packet::sctp4(C, 1, LOCAL, 4242),
        packet::icmp4_echo(C, LOCAL, 7, 1, true),
        Packet::new()
            .ipv4(C, LOCAL)
            .raw_l4(47, vec![0u8; 8])
            .build(), // GRE
    ] {
        let run = c.run(Ingress, &frame).unwrap();
        expect_allowed(&run, Reason::AllowedByPolicy, RULE_C_ALL, C_ID);
    }
    // A rule with ports never matches ICMP or other protocols.
    expect_dropped(
        &c.run(Ingress, &packet::icmp4_echo(A, LOCAL, 7, 1, true))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn cidr_and_except() {
    let mut c = classifier(false);
    let run = c
        .run(Ingress, &packet::tcp4(EXT_IN_BLOCK, 5000, LOCAL, 443, SYN))
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_BLOCK, identity::WORLD);
    assert_eq!(run.events[0].0.peer_cidr_identity, BLOCK_ID);
    let run = c
        .run(Ingress, &packet::tcp4(EXT_IN_EXCEPT, 5000, LOCAL, 443, SYN))
        .unwrap();
    expect_dropped(&run, Reason::DeniedByPolicy);
    assert_eq!(run.events[0].0.peer_cidr_identity, EXCEPT_ID);
    expect_dropped(
        &c.run(Ingress, &packet::tcp4(EXT_OUTSIDE, 5000, LOCAL, 443, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn pod_address_inside_an_ipblock_matches_it() {
    let mut c = classifier(false);
    // B's entry says its address lies in the block: the block's rule applies to it.
    c.set_peer(IpAddr::V4(B), B_ID, BLOCK_ID).unwrap();
    let run = c
        .run(Ingress, &packet::tcp4(B, 5000, LOCAL, 443, SYN))
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_BLOCK, B_ID);
}

#[test]
fn ipv6_identity_and_cidr() {
    let mut c = classifier(false);
    let run = c
        .run(Ingress, &packet::tcp6(A6, 40000, LOCAL6, 80, SYN))
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_A_80, A_ID);
    assert_eq!(run.events[0].0.family, 6);
    expect_dropped(
        &c.run(Ingress, &packet::tcp6(B6, 40000, LOCAL6, 80, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
    let run = c
        .run(
            Ingress,
            &packet::tcp6(EXT6_IN_BLOCK, 40000, LOCAL6, 22, SYN),
        )
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_BLOCK6, identity::WORLD);
    let run = c.run(Ingress, &packet::udp6(B6, 5000, LOCAL6, 53)).unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_ANY_DNS, B_ID);
}

#[test]
fn node_may_always_connect_in_but_not_isolation_exempt_out() {
    let mut c = classifier(true);
    let run = c
        .run(Ingress, &packet::tcp4(NODE, 40000, LOCAL, 10250, SYN))
        .unwrap();
    expect_allowed(&run, Reason::AllowedFromNode, 0, identity::HOST);
    // The pod's reply to the probe rides the connection.
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 10250, NODE, 40000, SYN | ACK))
            .unwrap(),
    );
    // The pod's own connection to its node is governed by its egress policy.
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 40001, NODE, 443, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn direction_not_isolated_allows_everything() {
    let mut c = classifier(false);
    let run = c
        .run(Egress, &packet::tcp4(LOCAL, 40000, EXT_OUTSIDE, 443, SYN))
        .unwrap();
    expect_allowed(&run, Reason::AllowedNotIsolated, 0, identity::WORLD);
    let mut c = classifier(true);
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 40000, EXT_OUTSIDE, 443, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
    c.set_policy(
        PolicyKey::new(EP, identity::ANY, Egress as u8, proto::TCP),
        port_ranges(&[(443, 443, 99)]),
    )
    .unwrap();
    let run = c
        .run(Egress, &packet::tcp4(LOCAL, 40000, EXT_OUTSIDE, 443, SYN))
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, 99, identity::WORLD);
}

#[test]
fn replies_flow_through_conntrack_and_do_not_open_the_other_way() {
    // Egress isolated with no egress rules: only replies may leave.
    let mut c = classifier(true);
    let run = c
        .run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, SYN))
        .unwrap();
    expect_allowed(&run, Reason::AllowedByPolicy, RULE_A_80, A_ID);
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, SYN | ACK))
            .unwrap(),
    );
    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, ACK))
            .unwrap(),
    );
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, ACK))
            .unwrap(),
    );
    // A new connection from the pod to the same peer is its own verdict.
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40001, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 40000, A, 80, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );

    // UDP: the answer to an allowed datagram passes, a datagram to another port does not.
    expect_allowed(
        &c.run(Ingress, &packet::udp4(B, 5353, LOCAL, 53)).unwrap(),
        Reason::AllowedByPolicy,
        RULE_ANY_DNS,
        B_ID,
    );
    expect_quiet_pass(&c.run(Egress, &packet::udp4(LOCAL, 53, B, 5353)).unwrap());
    expect_dropped(
        &c.run(Egress, &packet::udp4(LOCAL, 53, B, 5354)).unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn each_endpoint_decides_for_itself() {
    // The client's egress allowed the connection (not isolated); the server
    // (this endpoint) still judges it on ingress.
    let mut c = classifier(false);
    expect_allowed(
        &c.run(Egress, &packet::tcp4(LOCAL, 40000, B, 80, SYN))
            .unwrap(),
        Reason::AllowedNotIsolated,
        0,
        B_ID,
    );
    // B opening a connection to this endpoint is judged on ingress and denied.
    expect_dropped(
        &c.run(Ingress, &packet::tcp4(B, 80, LOCAL, 40001, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn icmp_echo_and_related_errors() {
    let mut c = classifier(true);
    // Echo from an allowed peer; the reply leaves through conntrack.
    expect_allowed(
        &c.run(Ingress, &packet::icmp4_echo(C, LOCAL, 77, 1, true))
            .unwrap(),
        Reason::AllowedByPolicy,
        RULE_C_ALL,
        C_ID,
    );
    expect_quiet_pass(
        &c.run(Egress, &packet::icmp4_echo(LOCAL, C, 77, 1, false))
            .unwrap(),
    );
    // The pod may not ping C itself: egress isolated, and C's echo id does not open it.
    expect_dropped(
        &c.run(Egress, &packet::icmp4_echo(LOCAL, C, 77, 2, true))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
    // Echo from a peer without a rule.
    expect_dropped(
        &c.run(Ingress, &packet::icmp4_echo(B, LOCAL, 78, 1, true))
            .unwrap(),
        Reason::DeniedByPolicy,
    );

    // An error the pod sends about an allowed connection it received is related.
    let syn = packet::tcp4(A, 40000, LOCAL, 80, SYN);
    expect_allowed(
        &c.run(Ingress, &syn).unwrap(),
        Reason::AllowedByPolicy,
        RULE_A_80,
        A_ID,
    );
    let unreachable = packet::icmp4_error(LOCAL, A, 3, 3, packet::l3(&syn));
    let run = c.run(Egress, &unreachable).unwrap();
    expect_quiet_pass(&run);
    // An error quoting a connection nobody opened is judged as plain ICMP: denied.
    let stray = packet::tcp4(A, 40999, LOCAL, 80, SYN);
    expect_dropped(
        &c.run(
            Egress,
            &packet::icmp4_error(LOCAL, A, 3, 3, packet::l3(&stray)),
        )
        .unwrap(),
        Reason::DeniedByPolicy,
    );

    // An error coming back about the pod's own connection (egress open here).
    let mut c = classifier(false);
    let query = packet::udp4(LOCAL, 5000, EXT_OUTSIDE, 53);
    expect_allowed(
        &c.run(Egress, &query).unwrap(),
        Reason::AllowedNotIsolated,
        0,
        identity::WORLD,
    );
    let router = Ipv4Addr::new(203, 0, 113, 1);
    expect_quiet_pass(
        &c.run(
            Ingress,
            &packet::icmp4_error(router, LOCAL, 11, 0, packet::l3(&query)),
        )
        .unwrap(),
    );
    // ICMPv6 packet too big about the pod's connection.
    let query6 = packet::tcp6(LOCAL6, 5000, EXT6_IN_BLOCK, 443, SYN);
    expect_allowed(
        &c.run(Egress, &query6).unwrap(),
        Reason::AllowedNotIsolated,
        0,
        identity::WORLD,
    );
    expect_quiet_pass(
        &c.run(
            Ingress,
            &packet::icmp6_error(B6, LOCAL6, 2, 0, packet::l3(&query6)),
        )
        .unwrap(),
    );
}

#[test]
fn policy_change_cuts_established_connections_it_no_longer_allows() {
    let mut c = classifier(true);
    expect_allowed(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, SYN))
            .unwrap(),
        Reason::AllowedByPolicy,
        RULE_A_80,
        A_ID,
    );
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, SYN | ACK))
            .unwrap(),
    );

    // The agent removes A's rule and bumps the endpoint's epoch.
    c.remove_policy(ingress_key(A_ID, proto::TCP)).unwrap();
    c.bump_epoch().unwrap();
    expect_dropped(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, ACK))
            .unwrap(),
        Reason::DeniedRevoked,
    );
    // Both directions of the revoked connection stop.
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, ACK))
            .unwrap(),
        Reason::DeniedRevoked,
    );

    // Allowed again (by another rule): the connection resumes, attributed to it.
    c.set_policy(ingress_key(A_ID, proto::TCP), port_ranges(&[(1, 1000, 55)]))
        .unwrap();
    c.bump_epoch().unwrap();
    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, ACK))
            .unwrap(),
    );
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, ACK))
            .unwrap(),
    );

    // A change that keeps allowing the connection does not disturb it.
    c.bump_epoch().unwrap();
    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, ACK))
            .unwrap(),
    );
}

#[test]
fn closed_connection_leaves_no_opening() {
    let mut c = classifier(true);
    // RST: the entry is gone, the server's next segment is a new egress attempt.
    expect_allowed(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, SYN))
            .unwrap(),
        Reason::AllowedByPolicy,
        RULE_A_80,
        A_ID,
    );
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, SYN | ACK))
            .unwrap(),
    );
    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, RST))
            .unwrap(),
    );
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, ACK))
            .unwrap(),
        Reason::DeniedByPolicy,
    );

    // FIN both ways: the last ACK passes; a SYN on the same tuple is judged anew
    // (its event proves it) and, once A's rule is gone, denied.
    expect_allowed(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, SYN))
            .unwrap(),
        Reason::AllowedByPolicy,
        RULE_A_80,
        A_ID,
    );
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, SYN | ACK))
            .unwrap(),
    );
    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, FIN | ACK))
            .unwrap(),
    );
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, FIN | ACK))
            .unwrap(),
    );
    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, ACK))
            .unwrap(),
    );
    expect_allowed(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, SYN))
            .unwrap(),
        Reason::AllowedByPolicy,
        RULE_A_80,
        A_ID,
    );
    c.remove_policy(ingress_key(A_ID, proto::TCP)).unwrap();
    expect_dropped(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

/// A segment of A's connection from `port` to LOCAL:80, with sequence and
/// acknowledgment numbers and `data` bytes of payload.
fn segment(from_a: bool, port: u16, flags: u8, seq: u32, ack: u32, data: usize) -> Vec<u8> {
    let (src, sport, dst, dport) = if from_a {
        (A, port, LOCAL, 80)
    } else {
        (LOCAL, 80, A, port)
    };
    Packet::new()
        .ipv4(src, dst)
        .tcp(sport, dport, flags)
        .tcp_seq(seq, ack)
        .payload(vec![0u8; data])
        .build()
}

/// Sends [`segment`] the way it travels (from A: ingress) and expects it to
/// pass as part of the connection.
fn passes(c: &mut Classifier, from_a: bool, port: u16, flags: u8, seq: u32, ack: u32) {
    let direction = if from_a { Ingress } else { Egress };
    let frame = segment(from_a, port, flags, seq, ack, 0);
    expect_quiet_pass(&c.run(direction, &frame).unwrap());
}

fn is_tracked(c: &mut Classifier, key: &CtKey) -> bool {
    c.datapath.conntrack().unwrap().get(key, 0).is_ok()
}

#[test]
fn a_connection_closed_by_fins_leaves_conntrack_when_both_are_acknowledged() {
    let mut c = classifier(true);
    let port = 40010;
    let key = tcp_key(A, port, 80);
    open_from_a(&mut c, port);
    // A sends its last 10 bytes with FIN: the FIN is covered by ack 1012.
    let last_data = segment(true, port, FIN | ACK, 1001, 5001, 10);
    expect_quiet_pass(&c.run(Ingress, &last_data).unwrap());
    // Acknowledging part of the data is not acknowledging the FIN. Once a
    // FIN is seen the flow is never cached again (so later FINs and the
    // removal need not make slots stale).
    passes(&mut c, false, port, ACK, 5001, 1005);
    assert!(!c.is_cached(&key).unwrap());
    // The pod acknowledges A's FIN and sends its own.
    passes(&mut c, false, port, FIN | ACK, 5001, 1012);
    let entry = c.datapath.conntrack().unwrap().get(&key, 0).unwrap();
    assert_eq!(entry.state, ct_state::CLOSING, "{entry:?}");
    // An older acknowledgment from A does not cover the pod's FIN...
    passes(&mut c, true, port, ACK, 1012, 5001);
    assert!(
        is_tracked(&mut c, &key),
        "removed before the pod's FIN was acknowledged"
    );
    // ...the last ACK does: it passes, and the entry is gone.
    passes(&mut c, true, port, ACK, 1012, 5002);
    assert!(
        !is_tracked(&mut c, &key),
        "a closed connection stayed in conntrack"
    );
    // Anything after that is judged anew: the pod (egress isolated, no
    // rule) cannot send on the tuple.
    expect_dropped(
        &c.run(Egress, &segment(false, port, FIN | ACK, 5001, 1012, 0))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn a_simultaneous_close_keeps_the_entry_until_both_fins_are_acknowledged() {
    let mut c = classifier(true);
    let port = 40011;
    let key = tcp_key(A, port, 80);
    open_from_a(&mut c, port);
    // Both FINs cross, neither acknowledging the other.
    passes(&mut c, true, port, FIN | ACK, 1001, 5001);
    passes(&mut c, false, port, FIN | ACK, 5001, 1001);
    // A acknowledges the pod's FIN: the pod's ACK of A's FIN must still pass.
    passes(&mut c, true, port, ACK, 1002, 5002);
    assert!(
        is_tracked(&mut c, &key),
        "removed with A's FIN unacknowledged"
    );
    passes(&mut c, false, port, ACK, 5002, 1002);
    assert!(
        !is_tracked(&mut c, &key),
        "a closed connection stayed in conntrack"
    );
}

#[test]
fn spoofed_source_is_dropped_with_its_own_reason() {
    let mut c = classifier(false);
    expect_dropped(
        &c.run(
            Egress,
            &packet::tcp4(Ipv4Addr::new(10, 0, 1, 99), 40000, EXT_OUTSIDE, 443, SYN),
        )
        .unwrap(),
        Reason::DroppedSpoofedSource,
    );
    // Another pod's address, even one with broad rights.
    expect_dropped(
        &c.run(Egress, &packet::udp4(C, 53, B, 53)).unwrap(),
        Reason::DroppedSpoofedSource,
    );
    expect_dropped(
        &c.run(Egress, &packet::tcp6(A6, 1, EXT6_IN_BLOCK, 443, SYN))
            .unwrap(),
        Reason::DroppedSpoofedSource,
    );
    // An endpoint without an IPv6 address may not send IPv6 at all.
    c.set_endpoint(EndpointInfo {
        endpoint_id: EP,
        identity: LOCAL_ID,
        flags: EndpointInfo::HAS_IPV4,
        ipv4: LOCAL.octets(),
        ipv6: LOCAL6.octets(),
    })
    .unwrap();
    expect_dropped(
        &c.run(Egress, &packet::tcp6(LOCAL6, 1, EXT6_IN_BLOCK, 443, SYN))
            .unwrap(),
        Reason::DroppedSpoofedSource,
    );
    // Its own address passes.
    assert!(
        c.run(Egress, &packet::tcp4(LOCAL, 40000, EXT_OUTSIDE, 443, SYN))
            .unwrap()
            .passed()
    );
}

#[test]
fn later_fragments_follow_the_first() {
    let mut c = classifier(true);
    let first = Packet::new()
        .ipv4(B, LOCAL)
        .ip_id(0x1234)
        .fragment(0, true)
        .udp(5000, 53)
        .payload([1u8; 64])
        .build();
    let middle = Packet::new()
        .ipv4(B, LOCAL)
        .ip_id(0x1234)
        .fragment(9, true)
        .raw_l4(proto::UDP, vec![2u8; 64])
        .build();
    let last = Packet::new()
        .ipv4(B, LOCAL)
        .ip_id(0x1234)
        .fragment(17, false)
        .raw_l4(proto::UDP, vec![3u8; 16])
        .build();
    expect_allowed(
        &c.run(Ingress, &first).unwrap(),
        Reason::AllowedByPolicy,
        RULE_ANY_DNS,
        B_ID,
    );
    expect_quiet_pass(&c.run(Ingress, &middle).unwrap());
    expect_quiet_pass(&c.run(Ingress, &last).unwrap());
    // The datagram is complete: a replayed later fragment no longer passes.
    expect_dropped(
        &c.run(Ingress, &middle).unwrap(),
        Reason::DroppedFragmentUnknown,
    );

    // Fragments of a denied datagram never pass, whatever their payload claims.
    let denied_first = Packet::new()
        .ipv4(B, LOCAL)
        .ip_id(0x99)
        .fragment(0, true)
        .udp(5000, 54)
        .payload([1u8; 64])
        .build();
    let denied_later = Packet::new()
        .ipv4(B, LOCAL)
        .ip_id(0x99)
        .fragment(9, false)
        .raw_l4(proto::UDP, vec![0u8; 8])
        .build();
    expect_dropped(
        &c.run(Ingress, &denied_first).unwrap(),
        Reason::DeniedByPolicy,
    );
    expect_dropped(
        &c.run(Ingress, &denied_later).unwrap(),
        Reason::DroppedFragmentUnknown,
    );
    // A later fragment whose first was never seen.
    let orphan = Packet::new()
        .ipv4(A, LOCAL)
        .ip_id(0x77)
        .fragment(100, false)
        .raw_l4(proto::TCP, vec![0u8; 40])
        .build();
    expect_dropped(
        &c.run(Ingress, &orphan).unwrap(),
        Reason::DroppedFragmentUnknown,
    );

    // IPv6 fragment header.
    let first6 = Packet::new()
        .ipv6(B6, LOCAL6)
        .ext(packet::ExtHeader::fragment(0xabcd, 0, true))
        .udp(5000, 53)
        .payload([1u8; 64])
        .build();
    let last6 = Packet::new()
        .ipv6(B6, LOCAL6)
        .ext(packet::ExtHeader::fragment(0xabcd, 9, false))
        .raw_l4(proto::UDP, vec![0u8; 8])
        .build();
    expect_allowed(
        &c.run(Ingress, &first6).unwrap(),
        Reason::AllowedByPolicy,
        RULE_ANY_DNS,
        B_ID,
    );
    expect_quiet_pass(&c.run(Ingress, &last6).unwrap());
    let orphan6 = Packet::new()
        .ipv6(A6, LOCAL6)
        .ext(packet::ExtHeader::fragment(0x1, 9, false))
        .raw_l4(proto::TCP, vec![0u8; 8])
        .build();
    expect_dropped(
        &c.run(Ingress, &orphan6).unwrap(),
        Reason::DroppedFragmentUnknown,
    );
}

#[test]
fn link_control_passes_and_unknown_traffic_does_not() {
    let mut c = classifier(true);
    let arp = packet::arp_request([2, 0, 0, 0, 0, 1], LOCAL, NODE);
    expect_quiet_pass(&c.run(Egress, &arp).unwrap());
    // Neighbour solicitation from the pod's link-local address.
    let ns = Packet::new()
        .ipv6(
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 5),
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1),
        )
        .icmp6(135, 0, [0; 4])
        .payload([0u8; 16])
        .build();
    expect_quiet_pass(&c.run(Egress, &ns).unwrap());
    // LLDP is neither IP nor ARP.
    let lldp = Packet::new().ethertype(0x88cc).payload([0u8; 46]).build();
    expect_dropped(&c.run(Egress, &lldp).unwrap(), Reason::DroppedUnsupportedL3);
}

#[test]
fn interface_without_endpoint_fails_closed() {
    let mut c = Classifier::load().unwrap();
    let run = c.run(Ingress, &packet::tcp4(A, 1, LOCAL, 80, SYN)).unwrap();
    expect_dropped(&run, Reason::DroppedUnknownEndpoint);
}

#[test]
fn counters_count_packets_and_bytes_by_reason() {
    let mut c = classifier(false);
    let before = c.datapath.verdict_totals().unwrap();
    let allowed = packet::tcp4(A, 40000, LOCAL, 80, SYN);
    let denied = packet::tcp4(B, 40000, LOCAL, 80, SYN);
    c.run(Ingress, &allowed).unwrap();
    c.run(Ingress, &denied).unwrap();
    c.run(Ingress, &denied).unwrap();
    let after = c.datapath.verdict_totals().unwrap();
    let delta = |reason: Reason| {
        let b = before.iter().find(|(r, _)| *r == reason).unwrap().1;
        let a = after.iter().find(|(r, _)| *r == reason).unwrap().1;
        (a.packets - b.packets, a.bytes - b.bytes)
    };
    assert_eq!(delta(Reason::AllowedByPolicy), (1, allowed.len() as u64));
    assert_eq!(delta(Reason::DeniedByPolicy), (2, 2 * denied.len() as u64));
    assert_eq!(c.datapath.events_lost().unwrap(), 0);
}

#[test]
fn idle_connections_expire() {
    let mut c = classifier(true);
    let hz = c.datapath.config().unwrap().get(&0, 0).unwrap().hz;
    assert!([100, 250, 300, 1000].contains(&hz), "measured HZ {hz}");

    // A UDP exchange allowed in, then idle for longer than the UDP lifetime:
    // the pod's late answer is a new egress attempt, which policy denies.
    expect_allowed(
        &c.run(Ingress, &packet::udp4(B, 5353, LOCAL, 53)).unwrap(),
        Reason::AllowedByPolicy,
        RULE_ANY_DNS,
        B_ID,
    );
    expect_quiet_pass(&c.run(Egress, &packet::udp4(LOCAL, 53, B, 5353)).unwrap());
    c.age(policy_common::ct_timeout::UDP - 5).unwrap();
    expect_quiet_pass(&c.run(Egress, &packet::udp4(LOCAL, 53, B, 5353)).unwrap());
    c.age(policy_common::ct_timeout::UDP + 5).unwrap();
    expect_dropped(
        &c.run(Egress, &packet::udp4(LOCAL, 53, B, 5353)).unwrap(),
        Reason::DeniedByPolicy,
    );
}

// The flow cache: established packets are passed from a per-CPU slot, which
// must never outlive what conntrack and the epochs say.

fn tcp_key(peer: Ipv4Addr, peer_port: u16, local_port: u16) -> CtKey {
    CtKey {
        ifindex: TEST_IFINDEX,
        local_addr: v4_mapped(LOCAL.octets()),
        peer_addr: v4_mapped(peer.octets()),
        local_port,
        peer_port,
        protocol: proto::TCP,
        _pad: [0; 3],
    }
}

/// A's connection from `port` to LOCAL:80, opened and answered.
fn open_from_a(c: &mut Classifier, port: u16) {
    expect_allowed(
        &c.run(Ingress, &packet::tcp4(A, port, LOCAL, 80, SYN))
            .unwrap(),
        Reason::AllowedByPolicy,
        RULE_A_80,
        A_ID,
    );
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, port, SYN | ACK))
            .unwrap(),
    );
}

fn established_count(c: &mut Classifier) -> u64 {
    let totals = c.datapath.verdict_totals().unwrap();
    totals
        .iter()
        .find(|(r, _)| *r == Reason::AllowedEstablished)
        .unwrap()
        .1
        .packets
}

#[test]
fn cached_flows_are_still_revoked_by_a_policy_change() {
    // Egress isolated with no egress rule: the pod's segments pass only as
    // part of a tracked connection.
    let mut c = classifier(true);
    let key = tcp_key(A, 40000, 80);
    open_from_a(&mut c, 40000);
    let before = established_count(&mut c);
    for _ in 0..3 {
        expect_quiet_pass(
            &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, ACK))
                .unwrap(),
        );
        expect_quiet_pass(
            &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, ACK))
                .unwrap(),
        );
    }
    assert!(c.is_cached(&key).unwrap());
    assert_eq!(established_count(&mut c) - before, 6);

    c.remove_policy(ingress_key(A_ID, proto::TCP)).unwrap();
    c.bump_epoch().unwrap();
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40000, ACK))
            .unwrap(),
        Reason::DeniedRevoked,
    );
    expect_dropped(
        &c.run(Ingress, &packet::tcp4(A, 40000, LOCAL, 80, ACK))
            .unwrap(),
        Reason::DeniedRevoked,
    );
}

#[test]
fn a_slot_cached_before_rst_is_not_trusted_after_it() {
    let mut c = classifier(true);
    let key = tcp_key(A, 40001, 80);
    open_from_a(&mut c, 40001);
    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, 40001, LOCAL, 80, ACK))
            .unwrap(),
    );
    let slot = *c
        .flow_slots(&key)
        .unwrap()
        .iter()
        .find(|s| s.key == key)
        .expect("the established flow is cached");

    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, 40001, LOCAL, 80, RST))
            .unwrap(),
    );
    // Every CPU still holding the slot (a CPU that did not see the RST)
    // must not pass the pod's next segment: it is a new egress attempt.
    c.put_flow_slot(slot).unwrap();
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40001, ACK))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
    // A new SYN on the tuple is judged anew, with its own event.
    c.remove_policy(ingress_key(A_ID, proto::TCP)).unwrap();
    expect_dropped(
        &c.run(Ingress, &packet::tcp4(A, 40001, LOCAL, 80, SYN))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn a_slot_cached_before_a_new_syn_is_not_trusted_after_it() {
    let mut c = classifier(true);
    let key = tcp_key(A, 40002, 80);
    open_from_a(&mut c, 40002);
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40002, ACK))
            .unwrap(),
    );
    let slot = *c
        .flow_slots(&key)
        .unwrap()
        .iter()
        .find(|s| s.key == key)
        .expect("the established flow is cached");

    // A new SYN replaces the entry: no reply seen yet.
    expect_allowed(
        &c.run(Ingress, &packet::tcp4(A, 40002, LOCAL, 80, SYN))
            .unwrap(),
        Reason::AllowedByPolicy,
        RULE_A_80,
        A_ID,
    );
    c.put_flow_slot(slot).unwrap();
    // The pod's reply goes through conntrack, which records it.
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40002, ACK))
            .unwrap(),
    );
    let entry = c.datapath.conntrack().unwrap().get(&key, 0).unwrap();
    assert_ne!(entry.flags & ct_flags::SEEN_REPLY, 0, "{entry:?}");
}

#[test]
fn a_conntrack_flush_from_user_space_empties_the_cache() {
    let mut c = classifier(true);
    let key = tcp_key(A, 40003, 80);
    open_from_a(&mut c, 40003);
    expect_quiet_pass(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40003, ACK))
            .unwrap(),
    );
    assert!(c.is_cached(&key).unwrap());
    c.datapath.conntrack().unwrap().remove(&key).unwrap();
    c.datapath.count_ct_flush().unwrap();
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, 40003, ACK))
            .unwrap(),
        Reason::DeniedByPolicy,
    );
}

#[test]
fn flows_colliding_on_a_slot_take_turns() {
    let mut c = classifier(true);
    let (p1, k1) = (41000, tcp_key(A, 41000, 80));
    let (p2, k2) = (41001..)
        .map(|p| (p, tcp_key(A, p, 80)))
        .find(|(_, k)| k.cache_index() == k1.cache_index())
        .unwrap();
    open_from_a(&mut c, p1);
    open_from_a(&mut c, p2);
    let before = established_count(&mut c);
    for _ in 0..3 {
        for (port, key) in [(p1, &k1), (p2, &k2)] {
            expect_quiet_pass(
                &c.run(Egress, &packet::tcp4(LOCAL, 80, A, port, ACK))
                    .unwrap(),
            );
            assert!(c.is_cached(key).unwrap());
        }
    }
    assert_eq!(established_count(&mut c) - before, 6);

    // Closing one leaves the other established.
    expect_quiet_pass(
        &c.run(Ingress, &packet::tcp4(A, p1, LOCAL, 80, RST))
            .unwrap(),
    );
    expect_dropped(
        &c.run(Egress, &packet::tcp4(LOCAL, 80, A, p1, ACK)).unwrap(),
        Reason::DeniedByPolicy,
    );
    expect_quiet_pass(&c.run(Egress, &packet::tcp4(LOCAL, 80, A, p2, ACK)).unwrap());
}

#[test]
fn one_way_flows_are_cached_for_their_direction_only() {
    // UDP from A that the pod never answers: cached for ingress; the pod's
    // first answer still reaches conntrack and is recorded as a reply.
    let mut c = classifier(true);
    expect_allowed(
        &c.run(Ingress, &packet::udp4(C, 7000, LOCAL, 7001)).unwrap(),
        Reason::AllowedByPolicy,
        RULE_C_ALL,
        C_ID,
    );
    expect_quiet_pass(&c.run(Ingress, &packet::udp4(C, 7000, LOCAL, 7001)).unwrap());
    let key = CtKey {
        protocol: proto::UDP,
        ..tcp_key(C, 7000, 7001)
    };
    let slot = *c
        .flow_slots(&key)
        .unwrap()
        .iter()
        .find(|s| s.key == key)
        .expect("the flow is cached");
    assert_eq!(slot.passes, 1 << Ingress as u8);
    expect_quiet_pass(&c.run(Egress, &packet::udp4(LOCAL, 7001, C, 7000)).unwrap());
    let entry = c.datapath.conntrack().unwrap().get(&key, 0).unwrap();
    assert_ne!(entry.flags & ct_flags::SEEN_REPLY, 0, "{entry:?}");
}
