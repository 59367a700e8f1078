//! Privacy in delivery: suppressed and erased identities are never delivered, and an erasure
//! reaches each destination once per person.
//!
//! Every replica follows the processor's suppression list (`<prefix>-suppressions`, through
//! [`herald_common::suppressions`]): an erasure suppresses the person's identities before it
//! deletes anything, so the list names erased people too. Before every send attempt the
//! destination's gate ([`crate::deliver::ConsentGate`]) refuses an event any of whose identities
//! ([`identity_keys`]: the profile's identities the processor attached, the `userId`,
//! `anonymousId` and other identities of the event) is suppressed: it is not sent, is acked and
//! counted (`reason="suppressed"`). This holds for live delivery, a destination created with
//! `--start all`, replay and redrive alike, since all of them deliver through that gate. Until
//! the list is loaded the [`SUPPRESSIONS_LOADED_CHECK`] readiness check is false and no
//! destination delivers.
//!
//! The same task opens the erasure ledger ([`crate::erasure`]) before it loads the list.

use std::sync::Arc;

use async_nats::jetstream;
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::identity::{ANONYMOUS_ID, USER_ID, kv_key, normalized_kv_key};
use herald_common::nats::retry_until;
use herald_common::suppressions::{self, Suppressions};
use herald_proto::v1::ProcessedEvent;
use tokio_util::sync::CancellationToken;

use crate::erasure::ErasureLedger;

/// The readiness check flipped once the suppression list has been loaded.
pub const SUPPRESSIONS_LOADED_CHECK: &str = "suppressions loaded";

/// The suppressions-bucket keys of every identity an event names: those the processor attached
/// (the profile's, already normalised), and the event's `userId`, `anonymousId` and other
/// identities (normalised as the processor normalises them).
pub(crate) fn identity_keys(p: &ProcessedEvent) -> Vec<String> {
    let mut keys: Vec<String> = p
        .identities
        .iter()
        .map(|i| kv_key(&i.r#type, &i.value))
        .collect();
    if let Some(e) = &p.event {
        let named = [
            (USER_ID, e.user_id.as_str()),
            (ANONYMOUS_ID, e.anonymous_id.as_str()),
        ]
        .into_iter()
        .chain(e.identities.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (kind, value) in named {
            if !value.trim().is_empty() {
                keys.push(normalized_kv_key(kind, value));
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Opens the erasure ledger and the suppressions bucket (creating either when absent, as the
/// processor would: the activator may start first), then keeps `list` current until `cancel`,
/// flipping [`SUPPRESSIONS_LOADED_CHECK`] once it is loaded.
pub(crate) async fn run(
    list: Arc<Suppressions>,
    ledger: ErasureLedger,
    js: jetstream::Context,
    topology: Topology,
    ready: Readiness,
    cancel: CancellationToken,
) {
    if retry_until("opening the erasure ledger bucket", &cancel, || {
        ledger.open(&js, &topology)
    })
    .await
    .is_none()
    {
        return;
    }
    let Some(kv) = retry_until("opening the suppressions bucket", &cancel, || {
        suppressions::open_bucket(&js, &topology)
    })
    .await
    else {
        return;
    };
    let loaded = async {
        if list.wait_loaded(&cancel).await {
            ready.set(SUPPRESSIONS_LOADED_CHECK, true);
            tracing::info!("suppression list loaded");
        }
    };
    tokio::join!(
        Suppressions::watch(list.clone(), kv, cancel.clone()),
        loaded
    );
}

#[cfg(test)]
mod tests {
    use herald_proto::v1::{Event, Identity};

    use super::*;

    #[test]
    fn every_identity_an_event_names_is_checked() {
        let p = ProcessedEvent {
            event: Some(Event {
                user_id: " u-1 ".into(),
                anonymous_id: "a-1".into(),
                identities: [("Email".to_string(), "Ann@Example.com".to_string())].into(),
                ..Default::default()
            }),
            identities: vec![
                Identity {
                    r#type: "user_id".into(),
                    value: "u-1".into(),
                },
                Identity {
                    r#type: "mpid".into(),
                    value: "42".into(),
                },
            ],
            ..Default::default()
        };
        let mut want = vec![
            kv_key("user_id", "u-1"),
            kv_key("anonymous_id", "a-1"),
            kv_key("email", "ann@example.com"),
            kv_key("mpid", "42"),
        ];
        want.sort();
        assert_eq!(identity_keys(&p), want);
        assert!(identity_keys(&ProcessedEvent::default()).is_empty());
    }
}
