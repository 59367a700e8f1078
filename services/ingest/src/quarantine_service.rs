//! The quarantine's gRPC service, `herald.v1.QuarantineService`: `ListQuarantine` reads records
//! in stream order; `RedriveQuarantine` submits a record's original payload again through
//! [`Intake::submit`], so it meets exactly the validation a new one would: what passes goes to
//! the events stream and the record is deleted; what fails again is written as a new record
//! (the new reason, attempt + 1) and the old one is deleted.

use std::pin::Pin;

use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use bytes::Bytes;
use chrono::Utc;
use futures_util::{Stream, TryStreamExt};
use herald_common::Topology;
use herald_proto::time::from_proto;
use herald_proto::v1::quarantine_service_server::{QuarantineService, QuarantineServiceServer};
use herald_proto::v1::{
    ListQuarantineRequest, ListQuarantineResponse, PayloadFormat, QuarantineEntry,
    QuarantineRecord, RedriveOutcome, RedriveQuarantineProgress, RedriveQuarantineRequest,
};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::events::{EventsAccepted, RedriveDone};
use crate::intake::Intake;
use crate::quarantine::{Submission, emit_quarantined, is_historical, subject_token};

/// Records listed when a request names no limit.
const DEFAULT_LIST_LIMIT: u32 = 100;
/// Most records listed in one request.
const MAX_LIST_LIMIT: u32 = 1000;

/// Serves `herald.v1.QuarantineService`.
#[derive(Clone)]
pub struct QuarantineGrpc {
    intake: Intake,
    js: jetstream::Context,
}

impl QuarantineGrpc {
    /// The service: redrives go through `intake`; records are read with `js`.
    pub fn new(intake: Intake, js: jetstream::Context) -> Self {
        Self { intake, js }
    }

    /// The tonic server wrapping it.
    pub fn into_server(self) -> QuarantineServiceServer<Self> {
        QuarantineServiceServer::new(self)
    }

    fn topology(&self) -> &Topology {
        self.intake.core().topology()
    }

    async fn stream(&self) -> Result<stream::Stream, Status> {
        let name = self.topology().quarantine_stream();
        self.js.get_stream(&name).await.map_err(|e| {
            Status::unavailable(format!(
                "cannot read the quarantine stream {name}: {e} (is NATS up and ingest ready?)"
            ))
        })
    }

    fn filter(&self, source_id: &str) -> Result<String, Status> {
        if source_id.is_empty() {
            return Ok(self.topology().quarantine_wildcard());
        }
        if subject_token(source_id) != source_id {
            return Err(Status::invalid_argument(format!(
                "source id {source_id:?} cannot name a quarantine subject"
            )));
        }
        Ok(self.topology().quarantine_subject(source_id))
    }

    /// Redrives one fetched record; see the module docs.
    async fn redrive_message(&self, stream: &stream::Stream, msg: StreamMessage) -> Progress {
        let seq = msg.sequence;
        let rec = match QuarantineRecord::decode(msg.payload) {
            Ok(rec) => rec,
            Err(e) => {
                return Progress::failed(
                    seq,
                    format!("message {seq} is not a quarantine record: {e}"),
                );
            }
        };
        if rec.payload_truncated {
            return Progress::failed(
                seq,
                "its payload was truncated to fit the NATS message size limit; it cannot be redriven".into(),
            );
        }
        let historical = is_historical(&rec);
        let payload = Bytes::from(rec.payload);
        let received_at = rec
            .received_at
            .as_ref()
            .and_then(from_proto)
            .unwrap_or_else(Utc::now);
        let format = PayloadFormat::try_from(rec.format).unwrap_or(PayloadFormat::Unspecified);
        let decoded = self.intake.submit(&Submission {
            source_id: &rec.source_id,
            format,
            content_type: &rec.content_type,
            payload: &payload,
            received_at,
            origin: &rec.origin,
            historical,
            intake_sequence: rec.intake_sequence,
            attempt: rec.attempt.saturating_add(1),
            item_index: (rec.item_index >= 0).then_some(rec.item_index),
        });
        let (published, new_sequences) = match self.intake.store(&decoded).await {
            Ok(stored) => stored,
            Err(e) => return Progress::failed(seq, format!("not redriven: {e}")),
        };
        if let Some(p) = published {
            EventsAccepted {
                source: &rec.source_id,
                count: p.acked,
                duplicates: p.duplicates,
                publish_elapsed: p.elapsed,
            }
            .emit();
        }
        emit_quarantined("redrive", &decoded.records);
        if let Err(e) = stream.delete_message(seq).await {
            return Progress::failed(
                seq,
                format!(
                    "its payload was stored again, but the record could not be deleted: {e}; redriving it again is harmless"
                ),
            );
        }
        let events = u32::try_from(decoded.events.len()).unwrap_or(u32::MAX);
        match decoded.records.first() {
            None => Progress {
                sequence: seq,
                outcome: RedriveOutcome::Redriven,
                events_published: events,
                ..Progress::default()
            },
            Some(first) => Progress {
                sequence: seq,
                outcome: RedriveOutcome::QuarantinedAgain,
                events_published: events,
                new_sequences,
                reason: first.reason.clone(),
                message: first.message.clone(),
            },
        }
    }

    async fn redrive_sequence(&self, stream: &stream::Stream, seq: u64) -> Progress {
        match stream.get_raw_message(seq).await {
            Ok(msg) => self.redrive_message(stream, msg).await,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Progress {
                sequence: seq,
                outcome: RedriveOutcome::NotFound,
                message: format!("no quarantine record has sequence {seq}"),
                ..Progress::default()
            },
            Err(e) => Progress::failed(seq, format!("cannot read record {seq}: {e}")),
        }
    }

    async fn run_redrive(
        self,
        stream: stream::Stream,
        plan: Plan,
        tx: tokio::sync::mpsc::Sender<Result<RedriveQuarantineProgress, Status>>,
    ) {
        let mut done = 0u64;
        let send = |p: Progress, done: u64, total: u64| {
            RedriveDone {
                outcome: outcome_label(p.outcome),
            }
            .emit();
            p.into_proto(done, total.max(done))
        };
        match plan {
            Plan::Sequences(seqs) => {
                let total = seqs.len() as u64;
                for seq in seqs {
                    let p = self.redrive_sequence(&stream, seq).await;
                    done += 1;
                    if tx.send(Ok(send(p, done, total))).await.is_err() {
                        return; // the caller went away: stop here
                    }
                }
            }
            Plan::All {
                subject,
                last,
                total,
            } => {
                let mut next = 1u64;
                loop {
                    let msg = match stream
                        .get_first_raw_message_by_subject(&subject, next)
                        .await
                    {
                        Ok(msg) if msg.sequence <= last => msg,
                        Ok(_) => break,
                        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::unavailable(format!(
                                    "cannot read the quarantine after {done} records: {e}; run the redrive again to continue"
                                ))))
                                .await;
                            return;
                        }
                    };
                    next = msg.sequence + 1;
                    let p = self.redrive_message(&stream, msg).await;
                    done += 1;
                    if tx.send(Ok(send(p, done, total))).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Which records a redrive handles.
enum Plan {
    Sequences(Vec<u64>),
    All {
        subject: String,
        last: u64,
        total: u64,
    },
}

/// One record's redrive result, before the running counts are added.
#[derive(Default)]
struct Progress {
    sequence: u64,
    outcome: RedriveOutcome,
    events_published: u32,
    new_sequences: Vec<u64>,
    reason: String,
    message: String,
}

impl Progress {
    fn failed(sequence: u64, message: String) -> Self {
        Self {
            sequence,
            outcome: RedriveOutcome::Failed,
            message,
            ..Self::default()
        }
    }

    fn into_proto(self, done: u64, total: u64) -> RedriveQuarantineProgress {
        RedriveQuarantineProgress {
            sequence: self.sequence,
            outcome: self.outcome as i32,
            events_published: self.events_published,
            new_sequences: self.new_sequences,
            reason: self.reason,
            message: self.message,
            done,
            total,
        }
    }
}

/// The metric label of a redrive outcome.
pub fn outcome_label(o: RedriveOutcome) -> &'static str {
    match o {
        RedriveOutcome::Unspecified => "unspecified",
        RedriveOutcome::Redriven => "redriven",
        RedriveOutcome::QuarantinedAgain => "quarantined_again",
        RedriveOutcome::NotFound => "not_found",
        RedriveOutcome::Failed => "failed",
    }
}

/// The stream of redrive progress messages.
pub type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<RedriveQuarantineProgress, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl QuarantineService for QuarantineGrpc {
    async fn list_quarantine(
        &self,
        request: Request<ListQuarantineRequest>,
    ) -> Result<Response<ListQuarantineResponse>, Status> {
        let req = request.into_inner();
        let filter = self.filter(&req.source_id)?;
        let limit = match req.limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        } as usize;
        let stream = self.stream().await?;
        let mut next = req.start_sequence.max(1);
        let mut entries = Vec::new();
        let mut next_sequence = 0;
        loop {
            let msg = match stream.get_first_raw_message_by_subject(&filter, next).await {
                Ok(msg) => msg,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "cannot read the quarantine: {e}"
                    )));
                }
            };
            if entries.len() == limit {
                next_sequence = msg.sequence;
                break;
            }
            next = msg.sequence + 1;
            let record = QuarantineRecord::decode(msg.payload).map_err(|e| {
                Status::internal(format!(
                    "quarantine message {} is not a QuarantineRecord: {e}",
                    msg.sequence
                ))
            })?;
            entries.push(QuarantineEntry {
                sequence: msg.sequence,
                record: Some(record),
            });
        }
        Ok(Response::new(ListQuarantineResponse {
            entries,
            next_sequence,
        }))
    }

    type RedriveQuarantineStream = ProgressStream;

    async fn redrive_quarantine(
        &self,
        request: Request<RedriveQuarantineRequest>,
    ) -> Result<Response<Self::RedriveQuarantineStream>, Status> {
        let req = request.into_inner();
        if !self.intake.sources_loaded() {
            return Err(Status::unavailable(
                "ingest has not loaded its sources yet (see its /readyz); retry shortly",
            ));
        }
        let plan = match (req.sequences.is_empty(), req.all) {
            (false, false) => {
                if !req.source_id.is_empty() {
                    return Err(Status::invalid_argument(
                        "give sequences, or a source with `all`, not both",
                    ));
                }
                let mut seqs = req.sequences;
                let mut seen = std::collections::HashSet::new();
                seqs.retain(|s| seen.insert(*s));
                Plan::Sequences(seqs)
            }
            (true, true) => {
                if req.source_id.is_empty() {
                    return Err(Status::invalid_argument(
                        "`all` redrives every record of one source: name the source",
                    ));
                }
                let subject = self.filter(&req.source_id)?;
                let mut stream = self.stream().await?;
                let last = stream
                    .info()
                    .await
                    .map_err(|e| Status::unavailable(format!("quarantine stream info: {e}")))?
                    .state
                    .last_sequence;
                let total = stream
                    .info_with_subjects(&subject)
                    .await
                    .map_err(|e| Status::unavailable(format!("quarantine stream info: {e}")))?
                    .try_fold(0u64, |n, (_, count)| async move { Ok(n + count as u64) })
                    .await
                    .map_err(|e| Status::unavailable(format!("quarantine stream info: {e}")))?;
                Plan::All {
                    subject,
                    last,
                    total,
                }
            }
            (false, true) => {
                return Err(Status::invalid_argument(
                    "give sequences, or a source with `all`, not both",
                ));
            }
            (true, false) => {
                return Err(Status::invalid_argument(
                    "name the records to redrive: sequences, or a source with `all`",
                ));
            }
        };
        let stream = self.stream().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(self.clone().run_redrive(stream, plan, tx));
        let out = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(out)))
    }
}
