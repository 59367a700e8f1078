//! Destinations as live config: opens the config bucket, seeds the config file's destinations,
//! loads every `destinations.<id>` record and follows the bucket's watch until shutdown,
//! starting, restarting (on update), stopping (on pause) and deleting (stop, then delete every
//! consumer of the destination: `activator-<id>` and `activator-<id>-p<N>`) each destination's
//! delivery loops as its record changes. Every replica runs this, so a change made through any
//! replica's control API reaches all of them within milliseconds. Before loading, the replica
//! joins the `activator` member list once; every ordered destination's loops follow the
//! partitions it owns there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, kv};
use herald_common::Topology;
use herald_common::admin::Readiness;
use herald_common::kvwatch::{Follower, follow};
use herald_common::nats::retry_until;
use herald_common::ownership::{Assignment, Ownership};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ActivatorConfig, DestinationConfig};
use crate::deliver::{Delivery, DeliveryDeps, DestinationStats};
use crate::events;
use crate::record::DestinationRecord;
use crate::store::{self, DestinationStore, KEY_PREFIX};
use crate::worker;

/// The role activator replicas join in the members bucket.
const ROLE: &str = "activator";

/// The readiness check flipped once the destinations have been loaded from the bucket.
pub const DESTINATIONS_LOADED_CHECK: &str = "destinations loaded";

/// Each destination's delivery counters on this replica, by id.
pub(crate) type StatsMap = Arc<Mutex<HashMap<String, Arc<DestinationStats>>>>;

/// What the delivery loops share.
pub(crate) struct Shared {
    pub js: jetstream::Context,
    pub topology: Topology,
    pub cfg: ActivatorConfig,
    pub ready: Readiness,
    pub stats: StatsMap,
    /// What each destination's delivery is built from (guard, consent, suppressions, ...).
    pub deps: DeliveryDeps,
}

struct Running {
    /// The record as delivery sees it ([`delivery_view`]).
    view: DestinationRecord,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The running delivery loops of this replica.
struct Loops {
    shared: Shared,
    /// This replica's partitions in the `activator` member list.
    view: watch::Receiver<Assignment>,
    store: DestinationStore,
    running: HashMap<String, Running>,
    /// The last revision applied per id, so the load and the watch order by revision.
    applied: HashMap<String, u64>,
    cancel: CancellationToken,
}

/// What of a record matters to its delivery loop: a change elsewhere (the pause flag, the
/// revision, the update time, the seeding digest) restarts nothing.
fn delivery_view(r: &DestinationRecord) -> DestinationRecord {
    DestinationRecord {
        revision: 0,
        updated_at: r.created_at,
        paused: false,
        config_sha256: None,
        ..r.clone()
    }
}

impl Loops {
    async fn apply(&mut self, id: &str, revision: u64, record: Option<DestinationRecord>) {
        if self.applied.get(id).is_some_and(|seen| *seen >= revision) {
            return;
        }
        self.applied.insert(id.to_string(), revision);
        match record {
            None => {
                let was_running = self.stop(id).await;
                self.delete_consumers(id, was_running).await;
                self.shared.stats.lock().expect("stats lock").remove(id);
            }
            Some(r) if r.paused => {
                // A paused destination holds up no readiness.
                self.shared.ready.set(&worker::readiness_check(id), true);
                if self.stop(id).await {
                    events::DestinationChanged {
                        destination: id,
                        action: "paused",
                    }
                    .emit();
                }
            }
            Some(r) => {
                let view = delivery_view(&r);
                if self.running.get(id).is_some_and(|run| run.view == view) {
                    return;
                }
                let action = if self.stop(id).await {
                    "updated"
                } else {
                    "started"
                };
                self.start(r, view, action).await;
            }
        }
    }

    async fn start(&mut self, record: DestinationRecord, view: DestinationRecord, action: &str) {
        let stats = self
            .shared
            .stats
            .lock()
            .expect("stats lock")
            .entry(record.id.clone())
            .or_default()
            .clone();
        let delivery = match Delivery::build(&record, &self.shared.deps, stats).await {
            Ok(built) => Arc::new(built),
            Err(e) => {
                self.shared
                    .ready
                    .set(&worker::readiness_check(&record.id), true);
                events::DestinationRefused {
                    destination: &record.id,
                    error: &e,
                }
                .emit();
                return;
            }
        };
        let stop = self.cancel.child_token();
        events::DestinationSeries {
            destination: &record.id,
        }
        .emit();
        let task = tokio::spawn(worker::run(
            self.shared.js.clone(),
            self.shared.topology.clone(),
            self.shared.cfg.clone(),
            record.clone(),
            delivery,
            self.store.clone(),
            self.shared.ready.clone(),
            self.view.clone(),
            stop.clone(),
        ));
        events::DestinationChanged {
            destination: &record.id,
            action,
        }
        .emit();
        self.running
            .insert(record.id.clone(), Running { view, stop, task });
    }

    /// Stops a destination's loop (it settles the batch in hand) and waits for it; whether one
    /// was running.
    async fn stop(&mut self, id: &str) -> bool {
        let Some(run) = self.running.remove(id) else {
            return false;
        };
        run.stop.cancel();
        let _ = run.task.await;
        true
    }

    /// Deletes every consumer of a deleted destination (the shared one and the partitions').
    async fn delete_consumers(&self, id: &str, was_running: bool) {
        let stream_name = self.shared.topology.processed_stream();
        let stream = match self.shared.js.get_stream(&stream_name).await {
            Ok(s) => s,
            Err(e) => {
                events::ConsumerNotDeleted {
                    destination: id,
                    consumer: &worker::consumer_name(id),
                    error: &e.to_string(),
                }
                .emit();
                return;
            }
        };
        let mut all_gone = true;
        for name in worker::consumer_names(id, self.shared.topology.partitions()) {
            match stream.delete_consumer(&name).await {
                // Another replica may have deleted it first; most never existed (the other
                // mode's).
                Err(e) if !worker::is_consumer_not_found(&e) => {
                    all_gone = false;
                    events::ConsumerNotDeleted {
                        destination: id,
                        consumer: &name,
                        error: &e.to_string(),
                    }
                    .emit();
                }
                _ => {}
            }
        }
        if all_gone && was_running {
            events::DestinationChanged {
                destination: id,
                action: "deleted",
            }
            .emit();
        }
    }

    async fn stop_all(&mut self) {
        let ids: Vec<String> = self.running.keys().cloned().collect();
        for id in ids {
            self.stop(&id).await;
        }
    }
}

/// Keeps this replica's delivery loops in step with the bucket until `cancel`: opens (or
/// creates) the bucket, seeds the configured destinations, loads everything (then flips the
/// [`DESTINATIONS_LOADED_CHECK`] readiness check), and applies every change the watch reports.
/// A broken watch is restarted with a full reload; NATS being down only delays all this. At
/// shutdown every loop settles its batch before this returns.
pub(crate) async fn run(
    store: DestinationStore,
    shared: Shared,
    seeds: Vec<DestinationConfig>,
    cancel: CancellationToken,
) {
    let Some(kv) = retry_until("opening the config bucket", &cancel, || {
        herald_common::nats::open_config_bucket(&shared.js, &shared.topology)
    })
    .await
    else {
        return;
    };
    store.open(kv.clone());
    if retry_until("seeding destinations from the config file", &cancel, || {
        store::seed(&kv, &seeds)
    })
    .await
    .is_none()
    {
        return;
    }
    let Some(ownership) = retry_until("joining the activator replicas", &cancel, || {
        Ownership::join(
            &shared.js,
            &shared.topology,
            ROLE,
            shared.topology.partitions(),
            &shared.cfg.ownership,
        )
    })
    .await
    else {
        return;
    };
    tracing::info!(member = %ownership.member_id(), "activator joined the member list");
    let client = shared.js.client();
    let mut loops = Loops {
        view: ownership.subscribe(),
        store: store.clone(),
        shared,
        running: HashMap::new(),
        applied: HashMap::new(),
        cancel: cancel.clone(),
    };
    follow(
        &kv,
        &client,
        &format!("{KEY_PREFIX}>"),
        "destinations",
        &mut loops,
        &cancel,
    )
    .await;
    // Leave first, so the other replicas start pulling at once; then each loop finishes its
    // batch and releases its partition.
    ownership.leave().await;
    loops.stop_all().await;
}

impl Follower for Loops {
    async fn reload(&mut self, kv: &kv::Store) -> Result<(), String> {
        let loaded = store::load_all(kv).await?;
        // A destination deleted while the watch was down is stopped too.
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|id| !loaded.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.stop(&id).await;
        }
        let count = loaded.values().filter(|r| r.is_some()).count();
        for (id, record) in loaded {
            let revision = record.as_ref().map_or(0, |r| r.revision);
            if record.is_none() {
                // Unreadable or deleted: stop it (the consumer stays until a delete is seen).
                self.stop(&id).await;
                continue;
            }
            self.apply(&id, revision, record).await;
        }
        self.shared.ready.set(DESTINATIONS_LOADED_CHECK, true);
        tracing::info!(
            destinations = count,
            "destinations loaded from the config bucket"
        );
        Ok(())
    }

    async fn changed(&mut self, entry: kv::Entry) {
        if let Some((id, record)) = store::from_entry(&entry) {
            tracing::debug!(destination = %id, revision = entry.revision, "destination changed");
            if record.is_none() && entry.operation == kv::Operation::Put {
                // Unreadable: stop it, keep its consumer.
                self.stop(&id).await;
            } else {
                self.apply(&id, entry.revision, record).await;
            }
        }
    }
}
