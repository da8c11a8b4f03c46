//! Drains the classifier's ring buffer into the [`FlowHub`].
//!
//! It drains on a timer ([`DRAIN_EVERY`]) rather than on the ring buffer's
//! readiness: the kernel signals a reader that has caught up for nearly
//! every record, so an idle-ish reader would be woken once per connection
//! (measured in docs/benchmarks.md, "Flow-event reading"), while the 8 MiB
//! ring holds about 100,000 records, a tenth of a second at a million
//! flows per second. Every [`TICK`] it also re-reads the kernel's lost
//! counter and re-anchors the records' monotonic clock to the wall clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::flow::Flow;
use super::hub::FlowHub;
use super::metrics::FlowMetrics;
use super::names::FlowNames;
use crate::datapath::{FlowReader, LostCounter};

/// How often the ring buffer is drained.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// How often the lost counter is read and the clock re-anchored.
pub const TICK: Duration = Duration::from_secs(1);
/// Most flows published under one lock of the history.
const BATCH: usize = 1024;

/// The ring buffer and the lost counter, taken from the datapath.
pub struct FlowTap {
    pub reader: FlowReader,
    pub lost: LostCounter,
}

/// See the module docs.
pub struct FlowPipeline {
    reader: Option<FlowReader>,
    lost: LostCounter,
    names: watch::Receiver<Arc<FlowNames>>,
    hub: Arc<FlowHub>,
    metrics: Arc<FlowMetrics>,
    sequence: u64,
    boot_time: SystemTime,
    kernel_lost: u64,
}

impl FlowPipeline {
    pub fn new(
        tap: FlowTap,
        names: watch::Receiver<Arc<FlowNames>>,
        hub: Arc<FlowHub>,
        metrics: Arc<FlowMetrics>,
    ) -> Self {
        // What the ring held before this agent started was lost to it; only
        // records lost from now on are counted.
        let kernel_lost = tap.lost.read().unwrap_or(0);
        Self {
            reader: Some(tap.reader),
            lost: tap.lost,
            names,
            hub,
            metrics,
            sequence: 0,
            boot_time: boot_time(),
            kernel_lost,
        }
    }

    /// Runs until the task is dropped.
    pub async fn run(mut self) -> std::io::Result<()> {
        let mut reader = self
            .reader
            .take()
            .ok_or_else(|| std::io::Error::other("the flow pipeline runs once"))?;
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = tokio::time::Instant::now();
        loop {
            // When a drain takes longer than the interval (a burst), the
            // next one starts at once.
            drain.tick().await;
            self.drain(&mut reader);
            if last_tick.elapsed() >= TICK {
                last_tick = tokio::time::Instant::now();
                self.boot_time = boot_time();
                self.read_lost();
            }
        }
    }

    /// Decodes, names and publishes every record `reader` has now.
    pub fn drain(&mut self, reader: &mut FlowReader) -> usize {
        let names = self.names.borrow().clone();
        let mut batch = Vec::with_capacity(64);
        let mut total = 0;
        let Self {
            hub,
            metrics,
            sequence,
            boot_time,
            ..
        } = self;
        reader.drain(|record| match record {
            Ok((event, codes)) => {
                *sequence += 1;
                let flow = Flow::enrich(*sequence, &event, &codes, &names, *boot_time);
                metrics.count(&flow);
                batch.push(Arc::new(flow));
                if batch.len() == BATCH {
                    total += batch.len();
                    hub.publish(batch.drain(..));
                }
            }
            Err(e) => {
                metrics.invalid.inc();
                tracing::warn!(error = %e, "undecodable flow record");
            }
        });
        total += batch.len();
        self.hub.publish(batch);
        total
    }

    fn read_lost(&mut self) {
        match self.lost.read() {
            Ok(total) => {
                let new = total.saturating_sub(self.kernel_lost);
                if new > 0 {
                    tracing::warn!(lost = new, "flow events lost: the ring buffer was full");
                    self.metrics.lost("kernel", new);
                }
                self.kernel_lost = total;
                self.hub.add_kernel_lost(new);
            }
            Err(e) => tracing::warn!(error = %e, "reading the lost flow events counter"),
        }
    }
}

/// The wall-clock time of CLOCK_MONOTONIC's zero (the clock of
/// `bpf_ktime_get_ns`).
pub fn boot_time() -> SystemTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let since_boot = Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    );
    SystemTime::now()
        .checked_sub(since_boot)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
