//! The bounded history of recent flows and the broadcast to live
//! observers.
//!
//! A new observer gets the history and a receiver for what follows in one
//! step under the history's lock, and publishing pushes and broadcasts
//! under the same lock, so the replay and the live stream neither overlap
//! nor leave a gap. An observer that falls more than the broadcast's
//! capacity behind misses flows and learns how many
//! ([`tokio::sync::broadcast::error::RecvError::Lagged`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::filter::FlowFilter;
use super::flow::Flow;

/// Flows a live observer may be behind before it misses some.
pub const LIVE_BUFFER: usize = 16_384;

/// See the module docs.
pub struct FlowHub {
    history: Mutex<VecDeque<Arc<Flow>>>,
    capacity: usize,
    live: broadcast::Sender<Arc<Flow>>,
    /// Records the classifier could not write (ring full) since the agent
    /// started.
    kernel_lost: AtomicU64,
    /// Flows observers missed, summed over observers.
    observer_lost: AtomicU64,
}

/// What [`FlowHub::subscribe`] gives an observer.
pub struct Subscription {
    /// The newest flows of the history that pass the filter, oldest first.
    pub replay: Vec<Arc<Flow>>,
    /// What follows.
    pub live: broadcast::Receiver<Arc<Flow>>,
    /// [`FlowHub::kernel_lost`] when subscribing.
    pub kernel_lost: u64,
}

impl FlowHub {
    /// A hub keeping the last `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        Self {
            history: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            live: broadcast::channel(LIVE_BUFFER).0,
            kernel_lost: AtomicU64::new(0),
            observer_lost: AtomicU64::new(0),
        }
    }

    /// Adds flows, oldest first.
    pub fn publish(&self, flows: impl IntoIterator<Item = Arc<Flow>>) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        for flow in flows {
            if self.capacity == 0 {
                let _ = self.live.send(flow);
                continue;
            }
            if history.len() == self.capacity {
                history.pop_front();
            }
            history.push_back(flow.clone());
            // No receiver is not an error.
            let _ = self.live.send(flow);
        }
    }

    /// The last `last` flows passing `filter`, and a receiver for the rest.
    pub fn subscribe(&self, last: usize, filter: &FlowFilter) -> Subscription {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let live = self.live.subscribe();
        let mut replay: Vec<Arc<Flow>> = history
            .iter()
            .rev()
            .filter(|f| filter.matches(f))
            .take(last)
            .cloned()
            .collect();
        drop(history);
        replay.reverse();
        Subscription {
            replay,
            live,
            kernel_lost: self.kernel_lost(),
        }
    }

    /// Flows in the history now.
    pub fn len(&self) -> usize {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kernel_lost(&self) -> u64 {
        self.kernel_lost.load(Ordering::Relaxed)
    }

    pub fn add_kernel_lost(&self, n: u64) {
        self.kernel_lost.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts flows an observer missed.
    pub fn observer_missed(&self, n: u64) {
        self.observer_lost.fetch_add(n, Ordering::Relaxed);
    }

    pub fn observer_lost(&self) -> u64 {
        self.observer_lost.load(Ordering::Relaxed)
    }
}
