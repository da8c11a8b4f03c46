//! `bench datapath`: the loaded classifier run with BPF_PROG_TEST_RUN on the
//! packets of each path, against the same packets through a program that does
//! nothing (the floor).
//!
//! Established packets and the floor use `repeat`. New-flow verdicts must not
//! find the entry their previous run created, so each run is a distinct flow
//! (a new source port) with `repeat = 1`, compared against the floor measured
//! the same way. Every figure is the median of several batches.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};
use palisade_tests::{
    fixture::{Classifier, TEST_IFINDEX, port_ranges},
    packet::{self, ACK, SYN},
};
use policy_common::{
    Direction::{Egress, Ingress},
    EndpointInfo, PolicyKey, PolicyValue, PortRule, identity, names, proto,
};
use serde_json::json;

use crate::Output;

#[derive(clap::Args)]
pub struct Options {
    /// Policy entries on the endpoint, one run per value.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 1000, 10000])]
    entries: Vec<u32>,
    /// Entries in the IP-to-identity map.
    #[arg(long, default_value_t = 100_000)]
    peers: u32,
    /// Runs per batch for `repeat` measurements.
    #[arg(long, default_value_t = 200_000)]
    repeat: u32,
    /// Distinct flows per batch for new-flow measurements.
    #[arg(long, default_value_t = 4_000)]
    flows: u32,
    /// Batches per figure (the median is reported).
    #[arg(long, default_value_t = 7)]
    batches: usize,
    #[command(flatten)]
    output: Output,
}

/// Runs per batch for frames that write a flow event each (8 MiB ring buffer).
const EVENT_BATCH: u32 = 40_000;

const EP: u32 = 1;
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 20);
const CLIENT_ID: u32 = 5000;
const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 21);
const STRANGER_ID: u32 = 5001;
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CIDR_ID: u32 = 4000;

fn setup(c: &mut Classifier, entries: u32, peers: u32) -> Result<()> {
    c.set_endpoint(EndpointInfo {
        endpoint_id: EP,
        identity: 300,
        flags: EndpointInfo::INGRESS_ISOLATED
            | EndpointInfo::INGRESS_CIDR_PEER
            | EndpointInfo::EGRESS_ISOLATED
            | EndpointInfo::HAS_IPV4,
        ipv4: LOCAL.octets(),
        ipv6: [0; 16],
    })?;
    // Peers: pods spread over 10.128.0.0/9, identities shared by groups of 10.
    for i in 0..peers {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i);
        c.set_peer(IpAddr::V4(ip), 10_000 + i / 10, identity::ANY)?;
    }
    c.set_peer(IpAddr::V4(CLIENT), CLIENT_ID, identity::ANY)?;
    c.set_peer(IpAddr::V4(STRANGER), STRANGER_ID, identity::ANY)?;
    c.set_cidr(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 0)), 24, CIDR_ID)?;
    // `entries` policy entries: the client's and the CIDR's, the rest for other
    // identities, each with a couple of port ranges.
    let key = |id| PolicyKey::new(EP, id, Ingress as u8, proto::TCP);
    c.set_policy(
        key(CLIENT_ID),
        port_ranges(&[(443, 443, 1), (8000, 8080, 2)]),
    )?;
    if entries >= 2 {
        c.set_policy(key(CIDR_ID), port_ranges(&[(443, 443, 3)]))?;
    }
    let mut policy = c.datapath.policy()?;
    for i in 2..entries {
        let mut value = PolicyValue {
            range_count: 2,
            ..Default::default()
        };
        value.ranges[0] = PortRule {
            first: 80,
            last: 80,
            rule_id: 10 + i,
        };
        value.ranges[1] = PortRule {
            first: 9000,
            last: 9100,
            rule_id: 10 + i,
        };
        policy.insert(key(20_000 + i), value, 0)?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Bench<'a> {
    c: &'a mut Classifier,
    opts: &'a Options,
}

impl Bench<'_> {
    /// ns per run of `program` on one frame, `repeat` times a batch.
    fn repeated(&mut self, program: &'static str, frame: &[u8]) -> Result<f64> {
        self.repeated_n(program, frame, self.opts.repeat)
    }

    /// Like `repeated`, `repeat` runs a batch: frames that write a flow event
    /// each run fewer times, so a batch's events fit the ring buffer, which
    /// is drained between batches.
    fn repeated_n(&mut self, program: &'static str, frame: &[u8], repeat: u32) -> Result<f64> {
        let mut samples = Vec::new();
        for _ in 0..self.opts.batches {
            let (_, d) = self
                .c
                .datapath
                .test_run_program(program, frame, TEST_IFINDEX, repeat)?;
            samples.push(d.as_nanos() as f64);
            self.c.events.drain(|_| {});
        }
        Ok(median(samples))
    }

    /// ns per run of `program` over distinct flows, one run each.
    fn distinct(
        &mut self,
        program: &'static str,
        frame_for: impl Fn(u16) -> Vec<u8>,
    ) -> Result<f64> {
        let frames: Vec<Vec<u8>> = (0..self.opts.flows)
            .map(|i| frame_for(1024 + (i % 60000) as u16))
            .collect();
        let mut samples = Vec::new();
        for _ in 0..self.opts.batches {
            let mut total = 0u128;
            for frame in &frames {
                let (_, d) = self
                    .c
                    .datapath
                    .test_run_program(program, frame, TEST_IFINDEX, 1)?;
                total += d.as_nanos();
            }
            samples.push(total as f64 / frames.len() as f64);
            self.c.events.drain(|_| {});
            // The next batch must find no entries: forget the flows.
            let keys: Vec<_> = self
                .c
                .datapath
                .conntrack()?
                .keys()
                .collect::<Result<_, _>>()?;
            let mut ct = self.c.datapath.conntrack()?;
            for k in keys {
                let _ = ct.remove(&k);
            }
        }
        Ok(median(samples))
    }
}

pub fn run(opts: &Options) -> Result<()> {
    let mut rows = Vec::new();
    println!(
        "{:<40} {:>8} {:>10} {:>12}",
        "path", "entries", "ns/packet", "above floor"
    );
    for &entries in &opts.entries {
        let mut c = Classifier::load()?;
        setup(&mut c, entries, opts.peers)?;
        let mut b = Bench { c: &mut c, opts };

        let syn = packet::tcp4(CLIENT, 40000, LOCAL, 443, SYN);
        let syn_ack = packet::tcp4(LOCAL, 443, CLIENT, 40000, SYN | ACK);
        let ack = packet::tcp4(CLIENT, 40000, LOCAL, 443, ACK);
        // Open the connection the established figure rides on; its reply
        // makes it established.
        b.c.run(Ingress, &syn)?;
        b.c.run(Egress, &syn_ack)?;
        let floor_repeat = b.repeated(names::PROG_NOOP, &ack)?;
        let established = b.repeated(names::PROG_TO_POD, &ack)?;

        // A SYN is always judged as a new connection (and its conntrack entry
        // written again), so repeating one SYN measures the new-connection
        // path with warm caches, as in a busy datapath.
        let syn_cidr = packet::tcp4(EXTERNAL, 40000, LOCAL, 443, SYN);
        let syn_denied = packet::tcp4(STRANGER, 40000, LOCAL, 443, SYN);
        let n = EVENT_BATCH.min(opts.repeat);
        let new_identity_repeat = b.repeated_n(names::PROG_TO_POD, &syn, n)?;
        let new_cidr_repeat = if entries >= 2 {
            Some(b.repeated_n(names::PROG_TO_POD, &syn_cidr, n)?)
        } else {
            None
        };
        let denied_repeat = b.repeated_n(names::PROG_TO_POD, &syn_denied, n)?;

        let floor_distinct = b.distinct(names::PROG_NOOP, |p| {
            packet::tcp4(CLIENT, p, LOCAL, 443, SYN)
        })?;
        let by_identity = b.distinct(names::PROG_TO_POD, |p| {
            packet::tcp4(CLIENT, p, LOCAL, 443, SYN)
        })?;
        let by_cidr = if entries >= 2 {
            Some(b.distinct(names::PROG_TO_POD, |p| {
                packet::tcp4(EXTERNAL, p, LOCAL, 443, SYN)
            })?)
        } else {
            None
        };
        let denied = b.distinct(names::PROG_TO_POD, |p| {
            packet::tcp4(STRANGER, p, LOCAL, 443, SYN)
        })?;
        let lost = b.c.datapath.events_lost()?;
        if lost != 0 {
            bail!("{lost} flow events were lost: the new-flow figures would be too low");
        }

        let mut row = |path: &str, ns: f64, floor: f64| {
            println!("{path:<40} {entries:>8} {ns:>10.1} {:>12.1}", ns - floor);
            rows.push(json!({
                "path": path, "policy_entries": entries, "peer_entries": opts.peers,
                "ns_per_packet": ns, "floor_ns": floor, "ns_above_floor": ns - floor,
            }));
        };
        row("floor (no-op program, repeat)", floor_repeat, floor_repeat);
        row("established flow", established, floor_repeat);
        row(
            "new flow allowed by identity (repeat)",
            new_identity_repeat,
            floor_repeat,
        );
        if let Some(ns) = new_cidr_repeat {
            row("new flow allowed by CIDR (repeat)", ns, floor_repeat);
        }
        row("new flow denied (repeat)", denied_repeat, floor_repeat);
        row(
            "floor (no-op program, per flow)",
            floor_distinct,
            floor_distinct,
        );
        row("new flow allowed by identity", by_identity, floor_distinct);
        if let Some(ns) = by_cidr {
            row("new flow allowed by CIDR", ns, floor_distinct);
        }
        row("new flow denied", denied, floor_distinct);
    }

    // The bar: established <= 40 ns above floor, new-flow verdict <= 200 ns above,
    // 10,000 entries at most 1.2x the cost of 1.
    let above = |path: &str, entries: u32| {
        rows.iter()
            .find(|r| r["path"] == path && r["policy_entries"] == entries)
            .map(|r| r["ns_above_floor"].as_f64().unwrap_or(f64::NAN))
    };
    let (lo, hi) = (
        opts.entries.iter().min().copied().unwrap_or(1),
        opts.entries.iter().max().copied().unwrap_or(1),
    );
    println!();
    for path in [
        "established flow",
        "new flow allowed by identity",
        "new flow denied",
    ] {
        if let (Some(a), Some(b)) = (above(path, lo), above(path, hi)) {
            let ratio = (b.max(1.0)) / (a.max(1.0));
            println!(
                "{path}: {hi} entries cost {ratio:.2}x of {lo} (above floor: {b:.1} ns vs {a:.1} ns)"
            );
        }
    }
    opts.output.write(&json!({
        "bench": "datapath",
        "machine": crate::machine(),
        "repeat": opts.repeat,
        "flows_per_batch": opts.flows,
        "batches": opts.batches,
        "results": rows,
    }))
}
