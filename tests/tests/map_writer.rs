//! The map writer against the loaded classifier: a change is invisible to
//! packets until it is committed, then visible whole; a restarted writer
//! adopts what the maps hold and rewrites nothing.

use std::net::{IpAddr, Ipv4Addr};

use palisade_tests::{
    fixture::{Classifier, TEST_IFINDEX, addr, port_ranges},
    packet::{self, SYN},
};
use policy_agent::{compile::Desired, datapath::writer::MapWriter};
use policy_common::{
    Direction::Ingress, EndpointInfo, PeerInfo, PolicyKey, Reason, identity, proto,
};

const EP: u32 = 9;
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 10);
const POD: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 20);
const FRONTEND: u32 = 300;
const BACKEND: u32 = 301;

/// The endpoint is ingress-isolated and admits identity `allowed` on TCP 80;
/// POD has identity `pod_identity`.
fn desired(pod_identity: u32, allowed: u32, rule_id: u32) -> Desired {
    let mut d = Desired::default();
    d.endpoints.insert(
        TEST_IFINDEX,
        EndpointInfo {
            endpoint_id: EP,
            identity: 500,
            flags: EndpointInfo::INGRESS_ISOLATED | EndpointInfo::HAS_IPV4,
            ipv4: LOCAL.octets(),
            ipv6: [0; 16],
        },
    );
    d.peer_ips.insert(
        addr(IpAddr::V4(POD)),
        PeerInfo {
            identity: pod_identity,
            cidr_identity: identity::ANY,
        },
    );
    d.policy.insert(
        PolicyKey::new(EP, allowed, Ingress as u8, proto::TCP),
        port_ranges(&[(80, 80, rule_id)]),
    );
    d
}

fn verdict(c: &mut Classifier, sport: u16) -> Option<Reason> {
    c.run(Ingress, &packet::tcp4(POD, sport, LOCAL, 80, SYN))
        .unwrap()
        .reason()
}

#[test]
fn a_change_is_invisible_until_committed_then_whole() {
    let mut c = Classifier::load().unwrap();
    let mut writer = MapWriter::new();
    // POD is a frontend and frontends may connect.
    let before = desired(FRONTEND, FRONTEND, 1);
    writer.apply(&mut c.datapath, &before).unwrap();
    assert_eq!(verdict(&mut c, 1000), Some(Reason::AllowedByPolicy));

    // One change that moves POD to the backend identity AND lets backends in
    // (the policy now names backends). Applied in any order entry by entry,
    // POD would be denied in between (new identity, old rule, or the reverse).
    let after = desired(BACKEND, BACKEND, 2);
    let staged = writer.stage(&mut c.datapath, &after).unwrap();
    for sport in 1001..1010 {
        assert_eq!(
            verdict(&mut c, sport),
            Some(Reason::AllowedByPolicy),
            "staged but not committed: the old state still holds"
        );
    }
    let stats = writer.commit(&mut c.datapath, &after, staged).unwrap();
    assert!(stats.written > 0 && stats.epochs_bumped == 1, "{stats:?}");
    let run = c
        .run(Ingress, &packet::tcp4(POD, 2000, LOCAL, 80, SYN))
        .unwrap();
    assert_eq!(run.reason(), Some(Reason::AllowedByPolicy));
    assert_eq!(run.events[0].0.rule_id, 2, "the new rule decides");
    assert_eq!(run.events[0].0.peer_identity, BACKEND);

    // And the reverse: denied before and after (POD a frontend, the rule for
    // backends), while the intermediate mixes would allow it.
    let deny_before = desired(FRONTEND, BACKEND, 3);
    writer.apply(&mut c.datapath, &deny_before).unwrap();
    assert_eq!(verdict(&mut c, 3000), Some(Reason::DeniedByPolicy));
    let deny_after = desired(BACKEND, FRONTEND, 4);
    let staged = writer.stage(&mut c.datapath, &deny_after).unwrap();
    assert_eq!(verdict(&mut c, 3001), Some(Reason::DeniedByPolicy));
    writer.commit(&mut c.datapath, &deny_after, staged).unwrap();
    assert_eq!(verdict(&mut c, 3002), Some(Reason::DeniedByPolicy));
}

#[test]
fn a_restarted_writer_adopts_the_maps() {
    let mut c = Classifier::load().unwrap();
    let state = desired(FRONTEND, FRONTEND, 1);
    MapWriter::new().apply(&mut c.datapath, &state).unwrap();
    // A new writer knows nothing and reads both generations from the maps:
    // nothing to write, and no switch.
    let generation = c.datapath.active_generation().unwrap();
    let stats = MapWriter::new().apply(&mut c.datapath, &state).unwrap();
    assert_eq!(stats.written, 0, "{stats:?}");
    assert_eq!(stats.removed, 0, "{stats:?}");
    assert_eq!(c.datapath.active_generation().unwrap(), generation);
    assert_eq!(verdict(&mut c, 1000), Some(Reason::AllowedByPolicy));
    // A change after adoption is written as a difference.
    let stats = MapWriter::new()
        .apply(&mut c.datapath, &desired(FRONTEND, BACKEND, 1))
        .unwrap();
    assert_eq!((stats.written, stats.removed), (1, 1), "{stats:?}");
    assert_eq!(verdict(&mut c, 1001), Some(Reason::DeniedByPolicy));
}

#[test]
fn removing_an_endpoint_stops_its_connections() {
    let mut c = Classifier::load().unwrap();
    let mut writer = MapWriter::new();
    writer
        .apply(&mut c.datapath, &desired(FRONTEND, FRONTEND, 1))
        .unwrap();
    assert_eq!(verdict(&mut c, 1000), Some(Reason::AllowedByPolicy));
    let ack = packet::tcp4(POD, 1000, LOCAL, 80, packet::ACK);
    assert!(c.run(Ingress, &ack).unwrap().passed(), "established");
    writer.apply(&mut c.datapath, &Desired::default()).unwrap();
    let run = c.run(Ingress, &ack).unwrap();
    assert_eq!(
        run.reason(),
        Some(Reason::DroppedUnknownEndpoint),
        "{run:?}"
    );
}
