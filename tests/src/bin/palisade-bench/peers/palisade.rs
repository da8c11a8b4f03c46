//! Palisade as the agent runs it: the embedded classifier loaded with its
//! maps pinned in a private directory, the maps compiled from the scenario
//! by the agent's compiler and written by its [`MapWriter`], a reader
//! draining the flow-event ring buffer (as an agent must), and the
//! programs attached to both pods' host veths with pinned TCX links for the
//! Palisade turns only.
//!
//! Dropping it detaches the links and removes the pin directory (maps and
//! links with it).

use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use palisade_tests::netns::{GATEWAY_V4, Netns};
use policy_agent::compile::{IdentityAllocator, LocalEndpoint, NodeScope, compile};
use policy_agent::datapath::{Datapath, FlowReader, writer::MapWriter};
use policy_agent::model::{ClusterState, ObjectRef, Severity};
use policy_common::Reason;

/// Where the benchmark pins the classifier's maps and links.
pub const PIN_DIR: &str = "/sys/fs/bpf/palisade-bench-peers";

/// A pod interface the classifier is attached to.
pub struct Endpoint {
    pub object: ObjectRef,
    pub host_ifname: String,
    pub local: LocalEndpoint,
}

/// What programming one policy count cost and produced.
pub struct Programmed {
    pub compile: Duration,
    pub write: Duration,
    pub policy_keys: usize,
    pub peer_ips: usize,
    pub written: usize,
}

/// How the flow-event reader waits for records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowReading {
    /// Drains every [`BATCH_INTERVAL`]: the classifier's ring-buffer writes
    /// seldom find the reader caught up, so they rarely wake anyone.
    Batch,
    /// Sleeps in poll() on the ring buffer: woken for (nearly) every record.
    Wakeup,
}

impl FlowReading {
    pub fn name(self) -> &'static str {
        match self {
            FlowReading::Batch => "batch",
            FlowReading::Wakeup => "wakeup",
        }
    }
}

/// How often a batch reader drains the ring buffer (8 MiB: about 100,000
/// records, 3 s at the highest rate measured here).
pub const BATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Drains the flow-event ring buffer on a thread, counting records.
struct EventDrain {
    stop: Arc<AtomicBool>,
    events: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl EventDrain {
    fn start(mut reader: FlowReader, mode: FlowReading) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, events) = (stop.clone(), events.clone());
            std::thread::Builder::new()
                .name("flow-events".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match mode {
                            FlowReading::Batch => std::thread::sleep(BATCH_INTERVAL),
                            FlowReading::Wakeup => {
                                // SAFETY: the ring buffer's descriptor outlives this borrow.
                                let fd = unsafe {
                                    std::os::fd::BorrowedFd::borrow_raw(reader.as_raw_fd())
                                };
                                let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                                let _ = poll(&mut fds, PollTimeout::from(100u16));
                            }
                        }
                        let n = reader.drain(|_| {});
                        events.fetch_add(n as u64, Ordering::Relaxed);
                    }
                })?
        };
        Ok(Self {
            stop,
            events,
            thread: Some(thread),
        })
    }
}

impl Drop for EventDrain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Removes the pin directory on drop.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("peers: removing {}: {e}", self.0.display()),
        }
    }
}

/// Removes a pin directory left by a killed run (it may hold links that
/// keep the classifier attached). Returns whether there was one.
pub fn remove_stale_pins() -> Result<bool> {
    match std::fs::remove_dir_all(PIN_DIR) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {PIN_DIR}")),
    }
}

pub struct Palisade {
    // Drop order: the event reader, the links (Drop impl), the classifier,
    // then the pin directory.
    drain: EventDrain,
    dp: Datapath,
    writer: MapWriter,
    endpoints: Vec<Endpoint>,
    attached: bool,
    _pin: PinDir,
}

impl Palisade {
    /// Loads the classifier (maps pinned in [`PIN_DIR`]) for `endpoints`.
    pub fn load(endpoints: Vec<Endpoint>, reading: FlowReading) -> Result<Self> {
        remove_stale_pins()?;
        let pin = PinDir(PathBuf::from(PIN_DIR));
        let mut dp = Datapath::load(Path::new(PIN_DIR)).context("loading the classifier")?;
        let drain = EventDrain::start(FlowReader::take(&mut dp)?, reading)?;
        Ok(Self {
            drain,
            dp,
            writer: MapWriter::new(),
            endpoints,
            attached: false,
            _pin: pin,
        })
    }

    /// Compiles `state` with the agent's compiler and writes the difference
    /// with what the maps hold.
    pub fn program(&mut self, state: &ClusterState, node_name: &str) -> Result<Programmed> {
        let scope = NodeScope {
            node_name: node_name.to_owned(),
            node_ips: vec![IpAddr::V4(GATEWAY_V4)],
            endpoints: self
                .endpoints
                .iter()
                .map(|e| (e.object.clone(), e.local))
                .collect(),
        };
        let start = Instant::now();
        let desired = compile(state, &scope, &mut IdentityAllocator::new());
        let compile_time = start.elapsed();
        if let Some(d) = desired
            .diagnostics
            .iter()
            .find(|d| d.severity == Severity::Error)
        {
            anyhow::bail!("the compiler reports an error: {d}");
        }
        let start = Instant::now();
        let stats = self
            .writer
            .apply(&mut self.dp, &desired)
            .context("writing the maps")?;
        Ok(Programmed {
            compile: compile_time,
            write: start.elapsed(),
            policy_keys: desired.policy.len(),
            peer_ips: desired.peer_ips.len(),
            written: stats.written,
        })
    }

    /// Attaches both programs to every endpoint's host veth (in `node`).
    pub fn attach(&mut self, node: &Netns) -> Result<()> {
        self.attached = true;
        let (dp, endpoints) = (&mut self.dp, &self.endpoints);
        node.run(|| {
            endpoints.iter().try_for_each(|e| {
                dp.attach_pinned(&e.host_ifname, &e.host_ifname)
                    .with_context(|| format!("attaching to {}", e.host_ifname))
            })
        })
    }

    /// Detaches from every endpoint.
    pub fn detach(&mut self) -> Result<()> {
        for e in &self.endpoints {
            self.dp.detach_pinned(&e.host_ifname)?;
        }
        self.attached = false;
        Ok(())
    }

    /// Empties the connection tracker, so each turn starts as the iptables
    /// turns do (their conntrack table is flushed).
    pub fn clear_conntrack(&mut self) -> Result<usize> {
        let keys: Vec<_> = self.dp.conntrack()?.keys().collect::<Result<_, _>>()?;
        let mut ct = self.dp.conntrack()?;
        for k in &keys {
            let _ = ct.remove(k);
        }
        self.dp.count_ct_flush()?;
        Ok(keys.len())
    }

    /// Packets counted for `reason`, summed over CPUs.
    pub fn packets(&mut self, reason: Reason) -> Result<u64> {
        Ok(self
            .dp
            .verdict_totals()?
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.packets))
    }

    /// Flow events read so far, and events the ring buffer had no room for.
    pub fn events(&mut self) -> Result<(u64, u64)> {
        Ok((
            self.drain.events.load(Ordering::Relaxed),
            self.dp.events_lost()?,
        ))
    }
}

impl Drop for Palisade {
    fn drop(&mut self) {
        if self.attached
            && let Err(e) = self.detach()
        {
            eprintln!("peers: detaching the classifier: {e:#}");
        }
    }
}
