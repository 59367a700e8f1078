//! `herald delivery <event id>`: how an event's delivery to each destination ended.

use anyhow::Result;
use herald_proto::v1::delivery_status_service_client::DeliveryStatusServiceClient;
use herald_proto::v1::{DeliveryState, GetDeliveryStatusRequest, GetDeliveryStatusResponse};
use serde_json::json;

use crate::control::{Control, rpc_error};
use crate::output::outln;

/// What a missing record means, by whether every delivered event of the destination is
/// recorded.
fn no_record(delivered_recorded: bool) -> &'static str {
    if delivered_recorded {
        "no record: filtered out for this destination, not reached yet, or expired"
    } else {
        "no record: delivered (plain deliveries are recorded only with --record-deliveries true on the destination, or activator.delivery_status_delivered = true), filtered out for this destination, not reached yet, or expired"
    }
}

/// `herald delivery <event id> [--json]`.
#[derive(Debug, clap::Args)]
pub struct DeliveryArgs {
    /// The event: Herald's id `<source>:<messageId>`, or the messageId the client sent.
    pub event_id: String,
    /// One JSON object: the event id and, per destination, its state, attempts and last error.
    #[arg(long)]
    pub json: bool,
}

/// Runs `herald delivery` against the activator control API.
pub async fn run(args: DeliveryArgs, control: &Control) -> Result<()> {
    let mut c = DeliveryStatusServiceClient::new(control.channel().await?);
    let res = c
        .get_delivery_status(GetDeliveryStatusRequest {
            event_id: args.event_id.clone(),
        })
        .await
        .map_err(|e| rpc_error("activator", e))?
        .into_inner();
    if args.json {
        outln!("{}", to_json(&args.event_id, &res));
        return Ok(());
    }
    if res.event_id.is_empty() {
        let every_one = res.delivered_recorded
            || (!res.destinations.is_empty()
                && res.destinations.iter().all(|d| d.delivered_recorded));
        let (delivered, hint) = if every_one {
            ("", "")
        } else {
            (
                "delivered, ",
                " Plain deliveries are not recorded everywhere: `herald destinations update <id> --record-deliveries true` records every one of a destination, activator.delivery_status_delivered = true of all.",
            )
        };
        outln!(
            "No delivery record of {} at any destination: it was {delivered}filtered out, has not reached them yet, or its records expired (they are kept {}s).{hint}",
            args.event_id,
            res.ttl_seconds
        );
        return Ok(());
    }
    outln!("Event {}", res.event_id);
    outln!(
        "{:<24} {:<16} {:>8} {:>6}  {:<24} LAST ERROR",
        "DESTINATION",
        "STATE",
        "ATTEMPTS",
        "STATUS",
        "RECORDED"
    );
    for d in &res.destinations {
        match &d.record {
            Some(r) => outln!(
                "{:<24} {:<16} {:>8} {:>6}  {:<24} {}",
                d.destination,
                state(r.state()),
                r.attempts,
                if r.last_status == 0 {
                    "-".to_string()
                } else {
                    r.last_status.to_string()
                },
                crate::output::time(r.recorded_at.as_ref(), chrono::SecondsFormat::Millis),
                r.last_error
            ),
            None => outln!("{:<24} {}", d.destination, no_record(d.delivered_recorded)),
        }
    }
    Ok(())
}

fn state(s: DeliveryState) -> &'static str {
    match s {
        DeliveryState::Delivered => "delivered",
        DeliveryState::Dlq => "dlq",
        DeliveryState::ConsentDropped => "consent-dropped",
        DeliveryState::Retrying => "retrying",
        DeliveryState::Unspecified => "unknown",
    }
}

/// The answer as the JSON of `herald delivery --json`.
fn to_json(asked: &str, res: &GetDeliveryStatusResponse) -> serde_json::Value {
    let destinations: Vec<serde_json::Value> = res
        .destinations
        .iter()
        .map(|d| match &d.record {
            Some(r) => json!({
                "destination": d.destination,
                "state": state(r.state()),
                "attempts": r.attempts,
                "lastStatus": r.last_status,
                "lastError": r.last_error,
                "recordedAt": crate::output::time(r.recorded_at.as_ref(), chrono::SecondsFormat::Millis),
                "deliveredRecorded": d.delivered_recorded,
            }),
            None => json!({
                "destination": d.destination,
                "state": null,
                "note": no_record(d.delivered_recorded),
                "deliveredRecorded": d.delivered_recorded,
            }),
        })
        .collect();
    json!({
        "asked": asked,
        "eventId": (!res.event_id.is_empty()).then_some(&res.event_id),
        "destinations": destinations,
        "ttlSeconds": res.ttl_seconds,
        "deliveredRecorded": res.delivered_recorded,
    })
}
