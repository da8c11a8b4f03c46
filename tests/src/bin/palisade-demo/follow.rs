//! The agent's flows, followed through its API (`Flows.Observe`) on a thread
//! of their own and printed by the main thread exactly as `policy-agent
//! observe --follow` prints them ([`policy_agent::observe`]), so that each
//! connection's flows come before its check line.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow};
use palisade_tests::agent::{Client, proto};
use policy_agent::observe;
use proto::observe_response::Item;

/// The follow stream and what it printed.
pub struct Follower {
    items: Receiver<Item>,
    thread: Option<JoinHandle<Result<(), String>>>,
    /// Flows printed so far.
    pub printed: u64,
    /// Flows the stream reported lost: dropped by the classifier (ring
    /// buffer full), missed by this observer.
    pub lost_kernel: u64,
    pub lost_observer: u64,
}

impl Follower {
    /// Subscribes to every flow since the agent started (the history, then
    /// what follows, with no gap between them: nothing is missed however
    /// late the subscription lands).
    pub fn start(socket: &Path) -> Result<Self> {
        let socket: PathBuf = socket.to_owned();
        let (tx, items) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("observe".into())
            .spawn(move || {
                let mut client = Client::connect(&socket).map_err(|e| e.to_string())?;
                let request = proto::ObserveRequest {
                    last: u32::MAX,
                    follow: true,
                    filter: Some(proto::FlowFilter::default()),
                };
                // Ends when the agent goes (or the receiver does).
                client
                    .observe(request, None, |response| match response.item {
                        Some(item) => tx.send(item).is_ok(),
                        None => true,
                    })
                    .map_err(|e| e.to_string())
            })
            .context("starting the observe thread")?;
        Ok(Self {
            items,
            thread: Some(thread),
            printed: 0,
            lost_kernel: 0,
            lost_observer: 0,
        })
    }

    /// Prints what the stream delivers until `deadline`, or until a flow for
    /// which `last` is true has been printed (returns true then).
    pub fn print_until(
        &mut self,
        deadline: Instant,
        last: impl Fn(&proto::Flow) -> bool,
    ) -> Result<bool> {
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.items.recv_timeout(wait) {
                Ok(Item::Flow(flow)) => {
                    println!("{}", observe::line(&flow));
                    self.printed += 1;
                    if last(&flow) {
                        return Ok(true);
                    }
                }
                Ok(Item::Lost(lost)) => {
                    println!("{}", observe::lost_line(&lost));
                    self.lost_kernel += lost.kernel;
                    self.lost_observer += lost.observer;
                }
                Err(RecvTimeoutError::Timeout) => return Ok(false),
                Err(RecvTimeoutError::Disconnected) => {
                    let why = match self.thread.take().map(JoinHandle::join) {
                        Some(Ok(Err(e))) => e,
                        Some(Err(_)) => "the observe thread panicked".to_owned(),
                        _ => "the agent closed it".to_owned(),
                    };
                    return Err(anyhow!("the flow stream ended: {why}"));
                }
            }
        }
    }

    /// Waits for the thread, whose stream ended with the agent.
    pub fn finish(mut self) {
        if let Some(thread) = self.thread.take() {
            // The agent is gone: the stream ended with an error, as it must.
            let _ = thread.join();
        }
    }
}

/// Whether `flow` is the one the destination pod's veth reports for a
/// connection to `dst` (its ingress verdict, the last a connection gets).
pub fn is_ingress_to(flow: &proto::Flow, dst: SocketAddr) -> bool {
    flow.direction == "ingress"
        && flow.destination_port == u32::from(dst.port())
        && flow
            .destination
            .as_ref()
            .and_then(|peer| peer.ip.parse::<IpAddr>().ok())
            .is_some_and(|ip| ip == dst.ip())
}
