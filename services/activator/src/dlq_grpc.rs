//! The DLQ's control API, `herald.v1.DlqService`: `ListDlq` reads one destination's dead
//! letters in stream order; `RedriveDlq` sends each again, once, through the destination's
//! sender after asking its consent gate (delivered: the dead letter is deleted; refused again:
//! a new dead letter with one more attempt and the new answer replaces it; consent no longer
//! allows it, or an identity of the event is suppressed or erased: deleted and counted as
//! consent-dropped); `PurgeDlq` deletes them all.

use std::pin::Pin;

use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use chrono::Utc;
use futures_util::Stream;
use herald_common::Topology;
use herald_proto::v1::dlq_service_server::{DlqService, DlqServiceServer};
use herald_proto::v1::{
    DeliveryState, DlqEntry, DlqRecord, DlqRedriveOutcome, ListDlqRequest, ListDlqResponse,
    PurgeDlqRequest, PurgeDlqResponse, RedriveDlqProgress, RedriveDlqRequest,
};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::deliver::{ConsentGate, Delivery, DeliveryDeps};
use crate::destinations::Sender;
use crate::dlq::{self, DeadLetters, LastFailure};
use crate::filter::Decision;
use crate::record::check_id;
use crate::status::{self, StatusStore};
use crate::store::{DestinationError, DestinationStore};
use crate::{events, payload};

/// Records listed when a request names no limit.
const DEFAULT_LIST_LIMIT: u32 = 100;
/// Most records listed in one request.
const MAX_LIST_LIMIT: u32 = 1000;

/// Serves `herald.v1.DlqService`.
#[derive(Clone)]
pub(crate) struct DlqGrpc {
    pub js: jetstream::Context,
    pub topology: Topology,
    pub store: DestinationStore,
    /// What a destination's delivery is built from (its sender and consent gate).
    pub deps: DeliveryDeps,
    pub status: StatusStore,
}

/// A destination's sender and consent gate, built for a redrive.
struct Redriver {
    destination: String,
    sender: std::sync::Arc<Sender>,
    metrics: events::DestinationMetrics,
    gate: ConsentGate,
    dlq: DeadLetters,
    status: StatusStore,
}

/// The stream of redrive progress messages.
type ProgressStream = Pin<Box<dyn Stream<Item = Result<RedriveDlqProgress, Status>> + Send>>;

impl DlqGrpc {
    /// The tonic server wrapping it.
    pub fn into_server(self) -> DlqServiceServer<Self> {
        DlqServiceServer::new(self)
    }

    async fn stream(&self) -> Result<stream::Stream, Status> {
        let name = self.topology.dlq_stream();
        self.js.get_stream(&name).await.map_err(|e| {
            Status::unavailable(format!(
                "cannot read the DLQ stream {name}: {e} (is NATS up and the activator ready?)"
            ))
        })
    }

    fn subject(&self, destination: &str) -> Result<String, Status> {
        check_id(destination).map_err(Status::invalid_argument)?;
        Ok(self.topology.dlq_subject(destination))
    }

    /// Every dead letter on `subject` up to stream sequence `last`, in stream order.
    async fn read_all(
        &self,
        stream: &stream::Stream,
        subject: &str,
        last: u64,
    ) -> Result<Vec<StreamMessage>, Status> {
        let mut next = 1;
        let mut out = Vec::new();
        loop {
            match stream.get_first_raw_message_by_subject(subject, next).await {
                Ok(m) if m.sequence <= last => {
                    next = m.sequence + 1;
                    out.push(m);
                }
                Ok(_) => break,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(Status::unavailable(format!("cannot read the DLQ: {e}"))),
            }
        }
        Ok(out)
    }

    async fn redriver(&self, destination: &str) -> Result<Redriver, Status> {
        let record = self.store.get(destination).await.map_err(|e| match e {
            DestinationError::NotFound(_) => Status::not_found(format!(
                "no destination {destination:?}: a redrive sends through it (list or purge its DLQ instead)"
            )),
            other => Status::unavailable(other.to_string()),
        })?;
        let delivery = Delivery::build(&record, &self.deps, Default::default())
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Redriver {
            destination: destination.to_string(),
            sender: delivery.sender,
            metrics: delivery.metrics,
            gate: delivery.gate,
            dlq: DeadLetters::new(self.js.clone(), &self.topology, destination),
            status: self.status.clone(),
        })
    }
}

impl Redriver {
    /// Sends one dead letter again; see the module docs.
    async fn redrive(
        &self,
        stream: &stream::Stream,
        msg: StreamMessage,
    ) -> (String, DlqRedriveOutcome, String) {
        let seq = msg.sequence;
        let mut record = match DlqRecord::decode(msg.payload) {
            Ok(r) => r,
            Err(e) => {
                return (
                    String::new(),
                    DlqRedriveOutcome::Failed,
                    format!("message {seq} is not a dead letter: {e}"),
                );
            }
        };
        let event_id = dlq::event_id(&record).to_string();
        let event = record.event.clone().unwrap_or_default();
        let destination = self.destination.as_str();
        let snapshot = event.consent.clone().unwrap_or_default();
        let refused = if self.gate.suppressed(&event) {
            events::SuppressedDropped {
                destination,
                event_id: &event_id,
            }
            .emit();
            true
        } else if let Decision::Deny(denial) = self.gate.decide_for(&event, &snapshot) {
            events::ConsentDropped {
                destination,
                event_id: &event_id,
                denial: &denial,
            }
            .emit();
            true
        } else {
            false
        };
        if refused {
            return match stream.delete_message(seq).await {
                Ok(_) => (event_id, DlqRedriveOutcome::ConsentDropped, String::new()),
                Err(e) => (
                    event_id,
                    DlqRedriveOutcome::Failed,
                    format!(
                        "consent no longer allows it, but its dead letter could not be deleted: {e}"
                    ),
                ),
            };
        }
        let body = bytes::Bytes::from(payload::render_json(&event));
        let now = Utc::now();
        record.attempts = record.attempts.saturating_add(1);
        record.last_attempt_at = Some(herald_proto::time::to_proto(now));
        if record.first_attempt_at.is_none() {
            record.first_attempt_at = record.last_attempt_at;
        }
        match self.sender.send(&event_id, &body).await {
            Ok(()) => {
                events::Attempted {
                    metrics: &self.metrics,
                    class: events::AttemptClass::Success,
                }
                .emit();
                events::Redriven {
                    destination,
                    event_id: &event_id,
                    delivered: true,
                }
                .emit();
                events::Delivered {
                    metrics: &self.metrics,
                    freshness: crate::deliver::freshness(&event),
                }
                .emit();
                if self.status.enabled() {
                    let tried = dlq::Tried {
                        attempts: record.attempts,
                        ..Default::default()
                    };
                    let done =
                        status::record(&event_id, destination, DeliveryState::Delivered, &tried);
                    if let Err(e) = self.status.write(&done).await {
                        events::StatusWriteFailed {
                            destination,
                            error: &e,
                        }
                        .emit();
                    }
                }
                match stream.delete_message(seq).await {
                    Ok(_) => (event_id, DlqRedriveOutcome::Delivered, String::new()),
                    Err(e) => (
                        event_id,
                        DlqRedriveOutcome::Failed,
                        format!(
                            "delivered, but its dead letter could not be deleted: {e}; a second redrive sends it again"
                        ),
                    ),
                }
            }
            Err(error) => {
                events::Attempted {
                    metrics: &self.metrics,
                    class: error.class().into(),
                }
                .emit();
                events::Redriven {
                    destination,
                    event_id: &event_id,
                    delivered: false,
                }
                .emit();
                let failure = LastFailure {
                    status: error.status().unwrap_or(0),
                    kind: error.kind(),
                    error: error.to_string(),
                    body: error.body_excerpt().to_string(),
                };
                record.last_status = u32::from(failure.status);
                record.last_error_kind = failure.kind.to_string();
                record.last_error = failure.error.clone();
                record.body_excerpt = failure.body;
                let message = match self.dlq.publish(&record).await {
                    Ok(()) => match stream.delete_message(seq).await {
                        Ok(_) => failure.error,
                        Err(e) => format!(
                            "{}; its updated dead letter was written but the old one could not be deleted: {e}",
                            failure.error
                        ),
                    },
                    Err(e) => format!("{}; the dead letter is left as it was: {e}", failure.error),
                };
                (event_id, DlqRedriveOutcome::Failed, message)
            }
        }
    }
}

#[tonic::async_trait]
impl DlqService for DlqGrpc {
    async fn list_dlq(
        &self,
        request: Request<ListDlqRequest>,
    ) -> Result<Response<ListDlqResponse>, Status> {
        let req = request.into_inner();
        let subject = self.subject(&req.destination)?;
        let limit = match req.limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        } as usize;
        let stream = self.stream().await?;
        let mut next = req.start_sequence.max(1);
        let mut entries = Vec::new();
        let mut next_sequence = 0;
        loop {
            let msg = match stream
                .get_first_raw_message_by_subject(&subject, next)
                .await
            {
                Ok(msg) => msg,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => {
                    return Err(Status::unavailable(format!("cannot read the DLQ: {e}")));
                }
            };
            if entries.len() == limit {
                next_sequence = msg.sequence;
                break;
            }
            next = msg.sequence + 1;
            let record = DlqRecord::decode(msg.payload).map_err(|e| {
                Status::internal(format!(
                    "DLQ message {} is not a DlqRecord: {e}",
                    msg.sequence
                ))
            })?;
            entries.push(DlqEntry {
                sequence: msg.sequence,
                record: Some(record),
            });
        }
        Ok(Response::new(ListDlqResponse {
            entries,
            next_sequence,
        }))
    }

    type RedriveDlqStream = ProgressStream;

    async fn redrive_dlq(
        &self,
        request: Request<RedriveDlqRequest>,
    ) -> Result<Response<Self::RedriveDlqStream>, Status> {
        let req = request.into_inner();
        let subject = self.subject(&req.destination)?;
        if req.all != req.event_ids.is_empty() {
            return Err(Status::invalid_argument(
                "name the dead letters to redrive: `all`, or event ids, not both",
            ));
        }
        let redriver = self.redriver(&req.destination).await?;
        let mut stream = self.stream().await?;
        let last = stream
            .info()
            .await
            .map_err(|e| Status::unavailable(format!("DLQ stream info: {e}")))?
            .state
            .last_sequence;
        let mut messages = self.read_all(&stream, &subject, last).await?;
        let mut not_found = Vec::new();
        if !req.all {
            let wanted: std::collections::HashSet<&str> =
                req.event_ids.iter().map(String::as_str).collect();
            messages.retain(|m| {
                DlqRecord::decode(m.payload.clone())
                    .is_ok_and(|r| wanted.contains(dlq::event_id(&r)))
            });
            let found: std::collections::HashSet<String> = messages
                .iter()
                .filter_map(|m| DlqRecord::decode(m.payload.clone()).ok())
                .map(|r| dlq::event_id(&r).to_string())
                .collect();
            let mut seen = std::collections::HashSet::new();
            not_found = req
                .event_ids
                .iter()
                .filter(|id| !found.contains(*id) && seen.insert(id.as_str()))
                .cloned()
                .collect();
        }
        let total = (messages.len() + not_found.len()) as u64;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut done = 0u64;
            for id in not_found {
                done += 1;
                let p = RedriveDlqProgress {
                    message: format!("no dead letter of this destination has event id {id:?}"),
                    event_id: id,
                    outcome: DlqRedriveOutcome::NotFound as i32,
                    done,
                    total,
                };
                if tx.send(Ok(p)).await.is_err() {
                    return;
                }
            }
            for msg in messages {
                let (event_id, outcome, message) = redriver.redrive(&stream, msg).await;
                done += 1;
                let p = RedriveDlqProgress {
                    event_id,
                    outcome: outcome as i32,
                    message,
                    done,
                    total,
                };
                if tx.send(Ok(p)).await.is_err() {
                    return; // the caller went away: stop here
                }
            }
        });
        let out = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn purge_dlq(
        &self,
        request: Request<PurgeDlqRequest>,
    ) -> Result<Response<PurgeDlqResponse>, Status> {
        let req = request.into_inner();
        let subject = self.subject(&req.destination)?;
        let stream = self.stream().await?;
        let purged = stream
            .purge()
            .filter(&subject)
            .await
            .map_err(|e| Status::unavailable(format!("cannot purge the DLQ: {e}")))?
            .purged;
        events::DlqPurged {
            destination: &req.destination,
            purged,
        }
        .emit();
        Ok(Response::new(PurgeDlqResponse { purged }))
    }
}
