//! `bench flows`: flow events through the agent's real pipeline at growing
//! rates.
//!
//! The classifier, loaded in the kernel, judges a denied SYN with
//! BPF_PROG_TEST_RUN (`repeat` runs per call, paced in 1 ms slots to the
//! target rate), so every run writes one drop record into the ring buffer,
//! exactly as on a veth. On the other CPU the agent's [`FlowPipeline`] —
//! woken by the ring buffer's epoll readiness, decoding, naming against a
//! cluster of `--pods` pods, counting, publishing into the history and the
//! live broadcast — drains them, and a live observer (like `observe
//! --follow`) receives them. For each rate the bench prints the events
//! generated, decoded end to end, lost in the kernel (ring full) and missed
//! by the observer, and the rates achieved.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use palisade_tests::{
    fixture::{Classifier, TEST_IFINDEX},
    packet::{self, SYN},
};
use policy_agent::compile::{Desired, IdentityAllocator, LocalEndpoint};
use policy_agent::datapath::{Datapath, FlowReader, LostCounter};
use policy_agent::flows::metrics::FlowLabels;
use policy_agent::flows::{FlowHub, FlowMetrics, FlowNames, FlowPipeline, FlowTap};
use policy_agent::model::{ClusterState, ObjectRef, Pod};
use policy_common::{EndpointInfo, names};
use serde_json::json;
use tokio::sync::{broadcast, watch};

use crate::Output;

#[derive(clap::Args)]
pub struct Options {
    /// Target rates in events per second; `max` runs the generator flat out.
    #[arg(long, value_delimiter = ',', default_values_t = ["100000".to_owned(), "200000".to_owned(), "500000".to_owned(), "1000000".to_owned(), "2000000".to_owned(), "max".to_owned()])]
    rates: Vec<String>,
    /// Seconds per rate.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Pods in the cluster the pipeline names flows against.
    #[arg(long, default_value_t = 10_000)]
    pods: u32,
    #[command(flatten)]
    output: Output,
}

const EP: u32 = 1;
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
/// A pod of the named cluster (the first one), denied by the endpoint.
const PEER: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);

/// The named cluster: `pods` pods over 10.128.0.0/9 in 100 namespaces, and
/// the endpoint's own pod.
fn cluster_names(pods: u32) -> FlowNames {
    let mut state = ClusterState::new();
    let pod = |ns: String, name: String, ip: Ipv4Addr| Pod {
        labels: [("app".to_owned(), format!("app-{}", ip.octets()[3] % 16))].into(),
        namespace: ns,
        name,
        node_name: Some("bench".to_owned()),
        ips: vec![IpAddr::V4(ip)],
        named_ports: Vec::new(),
        host_network: false,
    };
    for i in 0..pods {
        let ip = Ipv4Addr::from(u32::from(PEER) + i);
        state.insert_pod(
            pod(format!("ns-{}", i % 100), format!("pod-{i}"), ip),
            Vec::new(),
        );
    }
    state.insert_pod(pod("bench".into(), "server".into(), LOCAL), Vec::new());
    let endpoints = [(
        ObjectRef::new("bench", "server"),
        LocalEndpoint {
            ifindex: TEST_IFINDEX,
            endpoint_id: EP,
        },
    )]
    .into();
    FlowNames::build(
        None,
        1,
        &state,
        &[],
        &endpoints,
        &Desired::default(),
        &IdentityAllocator::new(),
    )
}

struct Row {
    target: Option<f64>,
    generated: u64,
    decoded: u64,
    kernel_lost: u64,
    observed: u64,
    observer_missed: u64,
    elapsed: Duration,
}

/// Flows the pipeline has decoded and counted: every event of this bench
/// is a denied TCP SYN at the endpoint's ingress.
fn decoded(metrics: &FlowMetrics) -> u64 {
    metrics
        .flows
        .get_or_create(&FlowLabels {
            verdict: "denied".into(),
            direction: "ingress".into(),
            protocol: "TCP".into(),
        })
        .get()
}

pub fn run(opts: &Options) -> Result<()> {
    let mut c = Classifier::load()?;
    c.set_endpoint(EndpointInfo {
        endpoint_id: EP,
        identity: 300,
        flags: EndpointInfo::INGRESS_ISOLATED | EndpointInfo::HAS_IPV4,
        ipv4: LOCAL.octets(),
        ipv6: [0; 16],
    })?;
    // The pipeline's own handle on the same pinned maps, as a restarted
    // agent would have.
    let mut reader_side = Datapath::load(c.pin_dir()).context("second load of the pinned maps")?;
    let tap = FlowTap {
        reader: FlowReader::take(&mut reader_side)?,
        lost: LostCounter::take(&mut reader_side)?,
    };
    let (_names_tx, names) = watch::channel(Arc::new(cluster_names(opts.pods)));
    let hub = Arc::new(FlowHub::new(policy_agent::agent::DEFAULT_FLOW_HISTORY));
    let metrics = Arc::new(FlowMetrics::default());

    let pipeline = FlowPipeline::new(tap, names, hub.clone(), metrics.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pipeline_thread = std::thread::spawn(move || runtime.block_on(pipeline.run()));

    // A live observer, as `observe --follow` is.
    let observer_stop = Arc::new(AtomicBool::new(false));
    let observed = Arc::new(AtomicU64::new(0));
    let observer_missed = Arc::new(AtomicU64::new(0));
    let mut live = hub.subscribe(0, &Default::default()).live;
    let observer = {
        let (stop, observed, missed) = (
            observer_stop.clone(),
            observed.clone(),
            observer_missed.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match live.try_recv() {
                    Ok(_) => {
                        observed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        missed.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };

    let syn = packet::tcp4(PEER, 40000, LOCAL, 8080, SYN);
    println!(
        "{:>10} {:>11} {:>11} {:>11} {:>9} {:>11} {:>9}",
        "target/s", "generated/s", "decoded/s", "decoded", "lost", "observed", "missed"
    );
    let mut rows = Vec::new();
    for rate in &opts.rates {
        let target = match rate.as_str() {
            "max" => None,
            n => Some(n.parse::<f64>().with_context(|| format!("rate {n:?}"))?),
        };
        let lost_before = hub.kernel_lost();
        let decoded_before = decoded(&metrics);
        let observed_before = observed.load(Ordering::Relaxed);
        let missed_before = observer_missed.load(Ordering::Relaxed);
        let started = Instant::now();
        let duration = Duration::from_secs_f64(opts.seconds);
        let mut generated = 0u64;
        let mut slot = 0u64;
        while started.elapsed() < duration {
            let runs = match target {
                // 1 ms slots: the runs due by the end of this slot.
                Some(r) => {
                    slot += 1;
                    let due = (r * slot as f64 / 1000.0) as u64;
                    let runs = due.saturating_sub(generated);
                    let slot_end = started + Duration::from_millis(slot);
                    if runs == 0 {
                        std::thread::sleep(slot_end.saturating_duration_since(Instant::now()));
                        continue;
                    }
                    runs
                }
                None => 2000,
            };
            let runs = u32::try_from(runs).unwrap_or(u32::MAX);
            c.datapath
                .test_run_program(names::PROG_TO_POD, &syn, TEST_IFINDEX, runs)?;
            generated += u64::from(runs);
            if target.is_some() {
                let slot_end = started + Duration::from_millis(slot);
                std::thread::sleep(slot_end.saturating_duration_since(Instant::now()));
            }
        }
        let generation_time = started.elapsed();
        // Wait for the pipeline to catch up (or give up after 2 s).
        let settle = Instant::now();
        loop {
            let lost = hub.kernel_lost() - lost_before;
            let done = decoded(&metrics) - decoded_before;
            if done + lost >= generated || settle.elapsed() > Duration::from_secs(2) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // The lost counter is read on the pipeline's 1 s tick.
        std::thread::sleep(policy_agent::flows::pipeline::TICK + Duration::from_millis(100));
        let row = Row {
            target,
            generated,
            decoded: decoded(&metrics) - decoded_before,
            kernel_lost: hub.kernel_lost() - lost_before,
            observed: observed.load(Ordering::Relaxed) - observed_before,
            observer_missed: observer_missed.load(Ordering::Relaxed) - missed_before,
            elapsed: generation_time,
        };
        let per_s = |n: u64| n as f64 / row.elapsed.as_secs_f64();
        println!(
            "{:>10} {:>11.0} {:>11.0} {:>11} {:>9} {:>11} {:>9}",
            rate,
            per_s(row.generated),
            per_s(row.decoded),
            row.decoded,
            row.kernel_lost,
            row.observed,
            row.observer_missed
        );
        rows.push(row);
    }
    observer_stop.store(true, Ordering::Relaxed);
    let _ = observer.join();
    drop(pipeline_thread);

    let results: Vec<_> = rows
        .iter()
        .map(|r| {
            let secs = r.elapsed.as_secs_f64();
            json!({
                "target_per_s": r.target,
                "seconds": secs,
                "generated": r.generated,
                "generated_per_s": r.generated as f64 / secs,
                "decoded": r.decoded,
                "decoded_per_s": r.decoded as f64 / secs,
                "kernel_lost": r.kernel_lost,
                "observed": r.observed,
                "observer_missed": r.observer_missed,
            })
        })
        .collect();
    let best = rows
        .iter()
        .map(|r| r.decoded as f64 / r.elapsed.as_secs_f64())
        .fold(0.0, f64::max);
    println!("\nmost decoded end to end: {best:.0} events/s");
    if let Some(r) = rows.iter().find(|r| r.target == Some(200_000.0)) {
        println!(
            "at 200,000/s: {} generated, {} decoded, {} lost",
            r.generated, r.decoded, r.kernel_lost
        );
    }
    opts.output.write(&json!({
        "bench": "flows",
        "machine": crate::machine(),
        "pods_named": opts.pods,
        "results": results,
    }))
}
