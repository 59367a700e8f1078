//! One delivery loop per destination: ordered batches from the destination's own consumer,
//! handed to the destination's [`Delivery`] (see [`crate::deliver`]) while in-progress acks keep
//! each batch from being redelivered behind later events.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::nats::{retry_until, wait_for_stream};
use herald_common::ordered::{OrderedReader, ReaderConfig};
use herald_common::retry::KeepAlive;
use tokio_util::sync::CancellationToken;

use crate::config::ActivatorConfig;
use crate::deliver::Delivery;
use crate::record::DestinationRecord;

/// The durable consumer name of a destination.
pub fn consumer_name(destination_id: &str) -> String {
    format!("activator-{destination_id}")
}

pub(crate) fn readiness_check(destination_id: &str) -> String {
    format!("destination {destination_id} consumer")
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    js: jetstream::Context,
    topology: Topology,
    cfg: ActivatorConfig,
    dest: DestinationRecord,
    delivery: Delivery,
    ready: Readiness,
    cancel: CancellationToken,
) {
    if wait_for_stream(&js, &topology.processed_stream(), &cancel)
        .await
        .is_none()
    {
        return;
    }
    // Nothing is sent before the person's current consent and the suppressions can be checked.
    if !delivery.gate.wait_loaded(&cancel).await {
        return;
    }
    let reader_cfg = ReaderConfig {
        stream: topology.processed_stream(),
        durable: consumer_name(&dest.id),
        filter_subject: topology.processed_wildcard(),
        ack_wait: Duration::from_secs(cfg.ack_wait_seconds),
        max_ack_pending: cfg.max_ack_pending,
        batch: cfg.batch_size,
        description: format!("Herald activator: destination {}", dest.id),
    };
    let check = readiness_check(&dest.id);
    ready.set(&check, false);
    let Some(mut reader) = retry_until("binding a destination consumer", &cancel, || async {
        create_consumer(&js, &reader_cfg, &dest).await?;
        OrderedReader::bind(&js, reader_cfg.clone())
            .await
            .map_err(|e| e.to_string())
    })
    .await
    else {
        // Stopped before it was bound: nothing to wait for.
        ready.set(&check, true);
        return;
    };
    ready.set(&check, true);
    tracing::info!(destination = %dest.id, kind = dest.kind.as_str(), "delivering");

    let keep_alive_every = Duration::from_secs(cfg.ack_wait_seconds.max(3)) / 3;
    while let Some(batch) = reader.next_batch(&cancel).await {
        let keep_alive = KeepAlive::start(batch.clone(), keep_alive_every);
        delivery.deliver_batch(batch, &cancel).await;
        drop(keep_alive);
        if cancel.is_cancelled() {
            break;
        }
    }
    // Messages the reader holds and has not handed out go back at once (nak), so a resumed or
    // updated destination, or another replica, gets them without waiting for the ack wait.
    reader.release().await;
    // A stopped destination (paused, deleted, updated, or the service stopping) holds nothing
    // up; an updated one sets its check again as it binds.
    ready.set(&check, true);
}

/// Creates a destination's consumer when it does not exist yet, starting where the record's
/// `start` says. An existing consumer (an upgrade from the config-file activator, an update, a
/// restart) is left where it is: nothing it acknowledged is skipped or sent again.
async fn create_consumer(
    js: &jetstream::Context,
    reader_cfg: &ReaderConfig,
    dest: &DestinationRecord,
) -> Result<(), String> {
    let stream = js
        .get_stream(&reader_cfg.stream)
        .await
        .map_err(|e| e.to_string())?;
    if stream
        .get_consumer::<PullConfig>(&reader_cfg.durable)
        .await
        .is_ok()
    {
        return Ok(());
    }
    let config = PullConfig {
        durable_name: Some(reader_cfg.durable.clone()),
        description: Some(reader_cfg.description.clone()),
        deliver_policy: dest.deliver_policy(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: reader_cfg.ack_wait,
        max_ack_pending: reader_cfg.max_ack_pending,
        filter_subject: reader_cfg.filter_subject.clone(),
        ..Default::default()
    };
    match stream.create_consumer(config).await {
        Ok(_) => Ok(()),
        // Another replica created it meanwhile.
        Err(_)
            if stream
                .get_consumer::<PullConfig>(&reader_cfg.durable)
                .await
                .is_ok() =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
