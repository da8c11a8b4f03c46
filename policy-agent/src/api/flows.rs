//! The `Flows` service: replays the history, then follows live flows,
//! filtered on the server.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::proto::{self, flows_server};
use crate::flows::filter::FilterText;
use crate::flows::{Flow, FlowFilter, FlowHub, FlowMetrics, FlowPeer, PeerKind};
use crate::model::ObjectRef;

/// Responses queued for one observer before its task waits for the client.
const STREAM_BUFFER: usize = 256;

#[derive(Clone)]
pub struct FlowsApi {
    pub hub: Arc<FlowHub>,
    pub metrics: Arc<FlowMetrics>,
    pub node_name: String,
}

type Item = Result<proto::ObserveResponse, Status>;

#[tonic::async_trait]
impl flows_server::Flows for FlowsApi {
    type ObserveStream = ReceiverStream<Item>;

    async fn observe(
        &self,
        request: Request<proto::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let request = request.into_inner();
        let filter = filter(
            request
                .filter
                .as_ref()
                .unwrap_or(&proto::FlowFilter::default()),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let subscription = self.hub.subscribe(request.last as usize, &filter);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let api = self.clone();
        tokio::spawn(async move {
            for flow in &subscription.replay {
                if tx.send(Ok(api.response(flow))).await.is_err() {
                    return;
                }
            }
            if request.follow {
                api.follow(subscription.live, subscription.kernel_lost, &filter, tx)
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl FlowsApi {
    async fn follow(
        &self,
        mut live: broadcast::Receiver<Arc<Flow>>,
        mut kernel_seen: u64,
        filter: &FlowFilter,
        tx: mpsc::Sender<Item>,
    ) {
        let mut missed = 0u64;
        loop {
            let next = tokio::select! {
                next = live.recv() => next,
                () = tx.closed() => return,
            };
            let flow = match next {
                Ok(flow) => flow,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.hub.observer_missed(n);
                    self.metrics.lost("observer", n);
                    missed += n;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let kernel = self.hub.kernel_lost();
            if missed > 0 || kernel > kernel_seen {
                let lost = proto::LostFlows {
                    kernel: kernel - kernel_seen,
                    observer: missed,
                };
                (missed, kernel_seen) = (0, kernel);
                let item = proto::observe_response::Item::Lost(lost);
                if tx
                    .send(Ok(proto::ObserveResponse { item: Some(item) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if filter.matches(&flow) && tx.send(Ok(self.response(&flow))).await.is_err() {
                return;
            }
        }
    }

    fn response(&self, flow: &Flow) -> proto::ObserveResponse {
        proto::ObserveResponse {
            item: Some(proto::observe_response::Item::Flow(to_proto(
                flow,
                &self.node_name,
            ))),
        }
    }
}

/// The API's filter, parsed.
pub fn filter(f: &proto::FlowFilter) -> Result<FlowFilter, crate::flows::FilterError> {
    FlowFilter::parse(&FilterText {
        namespaces: &f.namespace,
        pods: &f.pod,
        label_selector: &f.label_selector,
        verdict: &f.verdict,
        direction: &f.direction,
        protocols: &f.protocol,
        ports: &f.port,
        policies: &f.policy,
    })
}

/// A flow as the API carries it.
pub fn to_proto(flow: &Flow, node: &str) -> proto::Flow {
    let time_unix_nano = flow
        .time
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    proto::Flow {
        time_unix_nano,
        node: node.to_owned(),
        verdict: match flow.verdict {
            policy_common::Verdict::Allowed => "allowed",
            policy_common::Verdict::Denied => "denied",
        }
        .to_owned(),
        reason: flow.reason.as_str().to_owned(),
        direction: flow.direction.as_str().to_owned(),
        protocol: flow.protocol_name().into_owned(),
        source: Some(peer(&flow.source)),
        destination: Some(peer(&flow.destination)),
        source_port: flow.source.port.into(),
        destination_port: flow.destination.port.into(),
        endpoint: flow.endpoint.as_ref().map(|pod| proto::FlowPeer {
            kind: "pod".to_owned(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            labels: pod.labels.clone().into_iter().collect(),
            ..proto::FlowPeer::default()
        }),
        decided_by: flow.decided_by.as_ref().map(|rule| proto::PolicyRule {
            namespace: rule.namespace.clone(),
            name: rule.policy.clone(),
            direction: rule.direction.as_str().to_owned(),
            rule_index: u32::try_from(rule.index).unwrap_or(u32::MAX),
        }),
        isolated_by: flow.isolated_by.iter().map(policy_name).collect(),
        peer_identity: flow.peer_identity,
        packet_bytes: flow.packet_bytes,
        revision: flow.revision,
        ifindex: flow.ifindex,
    }
}

fn policy_name(p: &ObjectRef) -> proto::PolicyName {
    proto::PolicyName {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    }
}

fn peer(p: &FlowPeer) -> proto::FlowPeer {
    let mut out = proto::FlowPeer {
        ip: p.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        ..proto::FlowPeer::default()
    };
    out.kind = match &p.kind {
        PeerKind::Pod(pod) => {
            out.namespace = pod.namespace.clone();
            out.name = pod.name.clone();
            out.labels = pod.labels.clone().into_iter().collect();
            "pod"
        }
        PeerKind::Node => "node",
        PeerKind::Cidr(net) => {
            out.cidr = net.to_string();
            "cidr"
        }
        PeerKind::World => "world",
        PeerKind::Unknown => "unknown",
    }
    .to_owned();
    out
}
