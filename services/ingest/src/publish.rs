//! Publishing normalised events to JetStream: pipelined, with the event id as `Nats-Msg-Id`,
//! and successful only once every event is acknowledged.

use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use futures_util::future::join_all;
use herald_common::Topology;
use herald_common::nats::is_connected;
use herald_proto::v1::Event;
use prost::Message as _;

use crate::error::ApiError;

/// How often an in-flight publish checks that the connection is still up.
const CONNECTION_POLL: Duration = Duration::from_millis(50);

/// The outcome of publishing a request's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Events acknowledged.
    pub acked: usize,
    /// Of those, how many JetStream reported as duplicates.
    pub duplicates: usize,
    /// Time from the first publish to the last ack.
    pub elapsed: Duration,
}

/// Publishes events to the events stream.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    js: jetstream::Context,
    topology: Topology,
    timeout: Duration,
}

impl Publisher {
    /// A publisher over this client; acks are awaited at most `timeout` per request.
    pub fn new(
        client: Client,
        js: jetstream::Context,
        topology: Topology,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            js,
            topology,
            timeout,
        }
    }

    /// The NATS client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The topology events are published by.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Fails at once when NATS is not connected, so clients are told to retry without waiting
    /// for a publish timeout.
    pub fn check_connected(&self) -> Result<(), ApiError> {
        if is_connected(&self.client) {
            Ok(())
        } else {
            Err(ApiError::Unavailable {
                cause: "NATS is not connected".into(),
            })
        }
    }

    /// Sends every event, then awaits all acks together. Succeeds only when JetStream
    /// acknowledged each one (a duplicate ack counts: the event is stored). Fails with
    /// `StreamFull` when the stream refused for lack of space, else `Unavailable`; also fails as
    /// soon as the connection drops or the timeout passes.
    pub async fn publish(&self, events: &[Event]) -> Result<Published, ApiError> {
        self.check_connected()?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let send_and_ack = async {
            let mut acks = Vec::with_capacity(events.len());
            for event in events {
                let publish = PublishMessage::build()
                    .payload(event.encode_to_vec().into())
                    .message_id(&event.id);
                let subject = self.topology.events_subject(event.partition);
                acks.push(
                    self.js
                        .send_publish(subject, publish)
                        .await
                        .map_err(classify)?,
                );
            }
            let mut duplicates = 0;
            let mut first_err: Option<ApiError> = None;
            for result in join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await
            {
                match result {
                    Ok(ack) => duplicates += usize::from(ack.duplicate),
                    Err(e) => {
                        let e = classify(e);
                        // A full stream is the more useful answer: the client should slow down.
                        if first_err.is_none() || matches!(e, ApiError::StreamFull { .. }) {
                            first_err = Some(e);
                        }
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(duplicates),
            }
        };
        let disconnected = async {
            loop {
                tokio::time::sleep(CONNECTION_POLL).await;
                if !is_connected(&self.client) {
                    return;
                }
            }
        };
        tokio::select! {
            result = send_and_ack => result.map(|duplicates| Published {
                acked: events.len(),
                duplicates,
                elapsed: started.elapsed(),
            }),
            () = disconnected => Err(ApiError::Unavailable {
                cause: "NATS connection lost while awaiting acks".into(),
            }),
            () = tokio::time::sleep_until(deadline) => Err(ApiError::Unavailable {
                cause: format!("no JetStream ack within {} ms", self.timeout.as_millis()),
            }),
        }
    }
}

/// Maps a publish error to the answer: a full stream is 429, anything else 503.
///
/// A stream at its limits with DiscardNew answers with JetStream error 10077 ("maximum bytes
/// exceeded", "maximum messages exceeded", "maximum messages per subject exceeded"); 10077 also
/// covers other store failures, so the description decides.
fn classify(e: PublishError) -> ApiError {
    // The error's text includes the server's description and code.
    let cause = e.to_string();
    if is_stream_full(&cause) {
        ApiError::StreamFull { cause }
    } else {
        ApiError::Unavailable { cause }
    }
}

/// Whether an error text means the stream is out of space.
fn is_stream_full(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("maximum bytes") || m.contains("maximum messages")
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::PublishErrorKind;

    use super::*;

    #[test]
    fn stream_full_detection() {
        assert!(is_stream_full(
            "maximum bytes exceeded (code 503, error code 10077)"
        ));
        assert!(is_stream_full("maximum messages exceeded"));
        assert!(is_stream_full("publish failed: Maximum Bytes exceeded"));
        assert!(!is_stream_full("disk I/O error"));
        let err = classify(PublishError::new(PublishErrorKind::TimedOut));
        assert_eq!(err.kind(), "unavailable");
        let err = classify(PublishError::with_source(
            PublishErrorKind::Other,
            "maximum bytes exceeded",
        ));
        assert_eq!(err.kind(), "stream_full");
    }
}
