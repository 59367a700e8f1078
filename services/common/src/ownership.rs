//! Partition ownership: which replica of a role processes which partition.
//!
//! Every replica of a role (the processor; later the activator) joins a membership list kept in
//! the KV bucket `<prefix>-members`: it writes the key `<role>.<member id>` every
//! [`OwnershipConfig::heartbeat_ms`] with a per-message TTL of
//! [`OwnershipConfig::member_ttl_seconds`], and watches the role's keys. A key that is not
//! renewed expires, and the server's delete marker tells every watcher at once. From the live
//! member list each replica computes the same assignment ([`assign`], rendezvous hashing with a
//! load bound), so no coordinator is needed and a membership change moves few partitions.
//!
//! The assignment says who *should* pull a partition; exclusivity is the server's job. Each
//! partition has its own durable pull consumer ([`partition_consumer`]) with a priority group
//! ([`PRIORITY_GROUP`]) under the `pinned_client` policy: only the pinned pull client receives
//! messages, and the pin moves only when its holder releases it (unpin) or stops pulling for
//! [`OwnershipConfig::pin_timeout_seconds`]. So while two replicas briefly disagree about the
//! member list, still only one of them receives a partition's messages.
//! [`crate::ordered::OrderedReader::bind_pinned`] reads such a consumer and holds a new owner's
//! messages until everything its predecessor left unacked is back, so a move never reorders a key.
//!
//! [`Ownership::join`] returns a handle whose [`Ownership::subscribe`] yields the owned
//! partition set as it changes; [`PartitionTasks`] keeps one task per owned partition.
//! [`Ownership::leave`] deletes the membership key, so the others take over at once.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Topology;
use crate::config::ConfigError;
use crate::partition::stable_hash;

/// The priority group of every partition consumer.
pub const PRIORITY_GROUP: &str = "owner";

/// How long the server keeps the delete marker it writes when a membership key expires.
const MARKER_TTL: Duration = Duration::from_secs(60);

/// How long a membership bucket entry lives at most, whatever its TTL (deleted keys' markers
/// vanish after this).
const BUCKET_MAX_AGE: Duration = Duration::from_secs(3600);

/// Timing of membership and pins (a `[<service>.ownership]` config table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnershipConfig {
    /// How often a replica renews its membership key.
    pub heartbeat_ms: u64,
    /// How long a membership key lives without renewal (whole seconds, at least 1): a replica
    /// that stops heartbeating (killed, cut off from NATS) leaves the member list after this.
    pub member_ttl_seconds: u64,
    /// The consumers' priority timeout: a pinned pull client that stops pulling loses its pin
    /// after this, and a standby client is pinned instead (the server's default is 2 minutes).
    pub pin_timeout_seconds: u64,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 1_000,
            member_ttl_seconds: 5,
            pin_timeout_seconds: 5,
        }
    }
}

impl OwnershipConfig {
    /// Checks the values fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.member_ttl_seconds == 0 || self.pin_timeout_seconds == 0 {
            return Err(ConfigError::Value(
                "ownership.member_ttl_seconds and ownership.pin_timeout_seconds must be at least 1"
                    .into(),
            ));
        }
        if self.heartbeat_ms < 50 || self.heartbeat_ms * 2 > self.member_ttl_seconds * 1_000 {
            return Err(ConfigError::Value(format!(
                "ownership.heartbeat_ms ({}) must be at least 50 and at most half of \
                 ownership.member_ttl_seconds ({} s)",
                self.heartbeat_ms, self.member_ttl_seconds
            )));
        }
        Ok(())
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// The membership key's TTL.
    pub fn member_ttl(&self) -> Duration {
        Duration::from_secs(self.member_ttl_seconds)
    }

    /// The consumers' priority (pin) timeout.
    pub fn pin_timeout(&self) -> Duration {
        Duration::from_secs(self.pin_timeout_seconds)
    }

    /// How long a killed replica's partitions stay without a pulling owner at most: its key
    /// expires after the member TTL (noticed at once through the watch), and its pin after the
    /// pin timeout counted from its last pull. Processing resumes once its unacked messages come
    /// back, within the consumers' ack wait of their delivery.
    pub fn takeover_bound(&self) -> Duration {
        self.member_ttl().max(self.pin_timeout()) + self.heartbeat()
    }
}

/// Errors of joining the member list.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The membership bucket could not be created or opened.
    #[error("cannot open the membership bucket {bucket}: {message}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// What the server said.
        message: String,
    },
    /// The first heartbeat or the watch failed.
    #[error("cannot join the {role} members in {bucket}: {message}")]
    Join {
        /// The role.
        role: String,
        /// The bucket.
        bucket: String,
        /// What failed.
        message: String,
    },
}

/// One replica's view: the live members of its role and the partitions it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Live member ids of the role, sorted.
    pub members: Vec<String>,
    /// The partitions this replica owns.
    pub owned: BTreeSet<u32>,
}

/// The durable consumer of one partition: `<durable>-p<partition>`.
pub fn partition_consumer(durable: &str, partition: u32) -> String {
    format!("{durable}-p{partition}")
}

/// Config of the membership bucket: one value per key, file storage, `replicas` replicas,
/// per-message TTLs and delete markers on expiry.
pub fn members_bucket_config(topology: &Topology) -> kv::Config {
    kv::Config {
        bucket: topology.bucket("members"),
        description: "Herald: live replicas of each role (heartbeat keys with a TTL)".into(),
        history: 1,
        max_age: BUCKET_MAX_AGE,
        storage: stream::StorageType::File,
        num_replicas: topology.config().replicas,
        limit_markers: Some(MARKER_TTL),
        ..Default::default()
    }
}

/// The owner of each partition among `members` (sorted, distinct), as an index into `members`;
/// `None` for every partition when there are no members.
///
/// Rendezvous (highest random weight) hashing with a load bound: partitions are placed in
/// order, each on the member with the highest weight for it among those below
/// `ceil(partitions / members)` partitions. Every replica computes the same answer from the same
/// list; a member joining or leaving moves about `partitions / members` partitions.
pub fn assign(members: &[String], partitions: u32) -> Vec<Option<usize>> {
    if members.is_empty() {
        return vec![None; partitions as usize];
    }
    let cap = (partitions as usize).div_ceil(members.len());
    let seeds: Vec<u64> = members.iter().map(|m| stable_hash(m)).collect();
    let mut load = vec![0usize; members.len()];
    (0..partitions)
        .map(|p| {
            let best = (0..members.len())
                .filter(|&i| load[i] < cap)
                .max_by_key(|&i| (weight(seeds[i], p), std::cmp::Reverse(i)))
                .expect("total capacity covers every partition");
            load[best] += 1;
            Some(best)
        })
        .collect()
}

/// The partitions `member` owns among `members` (sorted, distinct).
pub fn owned_by(member: &str, members: &[String], partitions: u32) -> BTreeSet<u32> {
    let Some(me) = members.iter().position(|m| m == member) else {
        return BTreeSet::new();
    };
    assign(members, partitions)
        .into_iter()
        .enumerate()
        .filter(|(_, owner)| *owner == Some(me))
        .map(|(p, _)| p as u32)
        .collect()
}

fn weight(seed: u64, partition: u32) -> u64 {
    // splitmix64 finaliser over the member's hash and the partition.
    let mut z = seed ^ u64::from(partition).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A member id unique per process start: the host name (the pod name in Kubernetes) and a
/// random suffix.
fn new_member_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let mut host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    if host.is_empty() {
        host = "herald".into();
    }
    let suffix = std::collections::hash_map::RandomState::new().hash_one((
        std::process::id(),
        SystemTime::now(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
    ));
    format!("{host}-{:08x}", suffix as u32)
}

/// Renews one membership key.
#[derive(Clone)]
struct Heartbeat {
    js: jetstream::Context,
    subject: String,
    ttl: String,
    value: Bytes,
}

impl Heartbeat {
    async fn beat(&self) -> Result<(), String> {
        let ack = self
            .js
            .send_publish(
                self.subject.clone(),
                PublishMessage::build()
                    .payload(self.value.clone())
                    .header("Nats-TTL", self.ttl.as_str()),
            )
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Membership in a role and the partitions it gives this replica; see the module docs.
///
/// Dropping it stops the heartbeat (the key then expires); [`Ownership::leave`] removes the
/// key at once.
pub struct Ownership {
    member: String,
    role: String,
    key: String,
    store: kv::Store,
    view: watch::Receiver<Assignment>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Ownership {
    /// Joins the members of `role` (lower-case letters, digits, `-` and `_`) in the bucket
    /// `topology.bucket("members")`, creating the bucket if needed, and returns once this
    /// replica has read the member list and computed its share of `partitions`.
    pub async fn join(
        js: &jetstream::Context,
        topology: &Topology,
        role: &str,
        partitions: u32,
        cfg: &OwnershipConfig,
    ) -> Result<Self, OwnershipError> {
        cfg.validate()?;
        if role.is_empty()
            || !role
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::Value(format!(
                "ownership role {role:?} must be lower-case letters, digits, '-' or '_'"
            ))
            .into());
        }
        let bucket = topology.bucket("members");
        let store = js
            .create_or_update_key_value(members_bucket_config(topology))
            .await
            .map_err(|e| OwnershipError::Bucket {
                bucket: bucket.clone(),
                message: e.to_string(),
            })?;
        let join_err = |message: String| OwnershipError::Join {
            role: role.to_string(),
            bucket: bucket.clone(),
            message,
        };
        let member = new_member_id();
        let key = format!("{role}.{member}");
        let heartbeat = Heartbeat {
            js: js.clone(),
            subject: format!("$KV.{bucket}.{key}"),
            ttl: cfg.member_ttl_seconds.to_string(),
            value: Bytes::from(format!(
                "{{\"member\":\"{member}\",\"pid\":{}}}",
                std::process::id()
            )),
        };
        heartbeat.beat().await.map_err(&join_err)?;
        let mut watcher = store
            .watch_with_history(format!("{role}.>"))
            .await
            .map_err(|e| join_err(e.to_string()))?;
        let mut members = BTreeSet::new();
        // The list holds at least our own key, so the initial replay ends with an entry that
        // says it is current.
        let deadline = Instant::now() + cfg.member_ttl();
        loop {
            let entry = tokio::time::timeout_at(deadline, watcher.next())
                .await
                .map_err(|_| join_err("the member list did not arrive in time".into()))?
                .ok_or_else(|| join_err("the member watch ended".into()))?
                .map_err(|e| join_err(e.to_string()))?;
            apply(&mut members, role, &entry);
            if entry.seen_current {
                break;
            }
        }
        let state = Membership {
            role: role.to_string(),
            member: member.clone(),
            partitions,
            members,
            last_beat: Instant::now(),
            ttl: cfg.member_ttl(),
        };
        let (tx, view) = watch::channel(state.assignment());
        tracing::info!(
            role,
            member = %member,
            members = ?state.members,
            owned = ?view.borrow().owned,
            "joined the member list"
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(maintain(
            state,
            store.clone(),
            watcher,
            heartbeat,
            cfg.heartbeat(),
            tx,
            stop.clone(),
        ));
        Ok(Self {
            member,
            role: role.to_string(),
            key,
            store,
            view,
            stop,
            task: Some(task),
        })
    }

    /// This replica's member id (its key is `<role>.<member id>`).
    pub fn member_id(&self) -> &str {
        &self.member
    }

    /// The role it joined.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The current view.
    pub fn assignment(&self) -> Assignment {
        self.view.borrow().clone()
    }

    /// A receiver of the view, notified whenever the member list or the owned set changes.
    pub fn subscribe(&self) -> watch::Receiver<Assignment> {
        self.view.clone()
    }

    /// Leaves the member list now: stops the heartbeat and deletes the key, so the other
    /// replicas take this one's partitions over at once. Call it before releasing the
    /// partitions' pins.
    pub async fn leave(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        match self.store.purge_with_ttl(&self.key, MARKER_TTL).await {
            Ok(()) => {
                tracing::info!(role = %self.role, member = %self.member, "left the member list")
            }
            Err(e) => tracing::warn!(
                role = %self.role,
                member = %self.member,
                error = %e,
                "cannot delete the membership key; it expires after its TTL"
            ),
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The member list as this replica sees it.
struct Membership {
    role: String,
    member: String,
    partitions: u32,
    members: BTreeSet<String>,
    /// When this replica's own heartbeat last succeeded.
    last_beat: Instant,
    ttl: Duration,
}

impl Membership {
    fn assignment(&self) -> Assignment {
        let members: Vec<String> = self.members.iter().cloned().collect();
        // A replica whose own key has expired (or would have: its heartbeats fail) owns
        // nothing: the others count it out.
        let alive = self.last_beat.elapsed() < self.ttl;
        let owned = if alive {
            owned_by(&self.member, &members, self.partitions)
        } else {
            BTreeSet::new()
        };
        Assignment { members, owned }
    }
}

fn apply(members: &mut BTreeSet<String>, role: &str, entry: &kv::Entry) {
    let Some(member) = entry
        .key
        .strip_prefix(role)
        .and_then(|k| k.strip_prefix('.'))
    else {
        return;
    };
    match entry.operation {
        kv::Operation::Put => {
            members.insert(member.to_string());
        }
        kv::Operation::Delete | kv::Operation::Purge => {
            members.remove(member);
        }
    }
}

/// Heartbeats and follows the member list until `stop`.
async fn maintain(
    mut state: Membership,
    store: kv::Store,
    watcher: kv::Watch,
    heartbeat: Heartbeat,
    every: Duration,
    tx: watch::Sender<Assignment>,
    stop: CancellationToken,
) {
    let mut watcher = Some(watcher);
    // While re-reading the list after a broken watch: the entries so far.
    let mut resync: Option<BTreeSet<String>> = None;
    let mut rewatch_at = Instant::now();
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    let publish = |state: &Membership| {
        let next = state.assignment();
        tx.send_if_modified(|current| {
            if *current == next {
                return false;
            }
            tracing::info!(
                role = %state.role,
                member = %state.member,
                members = ?next.members,
                owned = ?next.owned,
                "partition assignment changed"
            );
            *current = next;
            true
        });
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                match heartbeat.beat().await {
                    Ok(()) => {
                        if failures > 0 {
                            tracing::info!(role = %state.role, member = %state.member, failures, "heartbeat restored");
                        }
                        failures = 0;
                        state.last_beat = Instant::now();
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(20) {
                            tracing::warn!(role = %state.role, member = %state.member, error = %e, failures, "membership heartbeat failed");
                        }
                    }
                }
                publish(&state);
            }
            entry = async { watcher.as_mut().expect("guarded").next().await }, if watcher.is_some() => {
                match entry {
                    Some(Ok(entry)) => {
                        match resync.as_mut() {
                            Some(fresh) => {
                                apply(fresh, &state.role, &entry);
                                if entry.seen_current {
                                    state.members = resync.take().expect("checked");
                                    publish(&state);
                                }
                            }
                            None => {
                                apply(&mut state.members, &state.role, &entry);
                                if entry.seen_current {
                                    publish(&state);
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(role = %state.role, error = %e, "member watch failed; watching again");
                        watcher = None;
                        rewatch_at = Instant::now() + Duration::from_millis(500);
                    }
                    None => {
                        tracing::warn!(role = %state.role, "member watch ended; watching again");
                        watcher = None;
                        rewatch_at = Instant::now() + Duration::from_millis(500);
                    }
                }
            }
            _ = tokio::time::sleep_until(rewatch_at), if watcher.is_none() => {
                match store.watch_with_history(format!("{}.>", state.role)).await {
                    Ok(w) => {
                        watcher = Some(w);
                        resync = Some(BTreeSet::new());
                    }
                    Err(e) => {
                        tracing::warn!(role = %state.role, error = %e, "cannot watch the member list; retrying");
                        rewatch_at = Instant::now() + Duration::from_millis(500);
                    }
                }
            }
        }
    }
}

/// One task per owned partition: [`PartitionTasks::reconcile`] starts tasks for newly owned
/// partitions and cancels those of partitions no longer owned. A cancelled task is expected to
/// finish its in-flight work and release its partition; a partition owned again before its old
/// task has ended starts its new task only after the old one ended.
#[derive(Default)]
pub struct PartitionTasks {
    running: BTreeMap<u32, (CancellationToken, JoinHandle<()>)>,
    stopping: BTreeMap<u32, JoinHandle<()>>,
}

impl PartitionTasks {
    /// No tasks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The partitions with a running (not cancelled) task.
    pub fn running(&self) -> BTreeSet<u32> {
        self.running.keys().copied().collect()
    }

    /// Makes the running set equal `owned`: `start(partition, token)` builds the task of a
    /// newly owned partition (it must end soon after `token` is cancelled). Returns the
    /// partitions started and the partitions stopped.
    pub fn reconcile<F, Fut>(&mut self, owned: &BTreeSet<u32>, mut start: F) -> (Vec<u32>, Vec<u32>)
    where
        F: FnMut(u32, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.stopping.retain(|_, h| !h.is_finished());
        let stopped: Vec<u32> = self
            .running
            .keys()
            .filter(|p| !owned.contains(p))
            .copied()
            .collect();
        for p in &stopped {
            if let Some((token, handle)) = self.running.remove(p) {
                token.cancel();
                self.stopping.insert(*p, handle);
            }
        }
        let started: Vec<u32> = owned
            .iter()
            .filter(|p| !self.running.contains_key(p))
            .copied()
            .collect();
        for &p in &started {
            let token = CancellationToken::new();
            let task = start(p, token.clone());
            let previous = self.stopping.remove(&p);
            let handle = tokio::spawn(async move {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                task.await;
            });
            self.running.insert(p, (token, handle));
        }
        (started, stopped)
    }

    /// Cancels every task and waits for all of them (stopping ones included).
    pub async fn stop_all(&mut self) {
        for (p, (token, handle)) in std::mem::take(&mut self.running) {
            token.cancel();
            self.stopping.insert(p, handle);
        }
        for (_, handle) in std::mem::take(&mut self.stopping) {
            let _ = handle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        let mut v: Vec<String> = (0..n).map(|i| format!("processor-{i:02}-abcd")).collect();
        v.sort();
        v
    }

    fn owners(members: &[String], partitions: u32) -> Vec<String> {
        assign(members, partitions)
            .into_iter()
            .map(|o| members[o.expect("owned")].clone())
            .collect()
    }

    #[test]
    fn every_partition_has_one_owner_and_load_is_bounded() {
        for (members, partitions) in [(1, 16), (2, 16), (3, 16), (5, 16), (3, 64), (7, 5)] {
            let m = names(members);
            let a = assign(&m, partitions);
            assert_eq!(a.len(), partitions as usize);
            let cap = (partitions as usize).div_ceil(members);
            for i in 0..members {
                let load = a.iter().filter(|o| **o == Some(i)).count();
                assert!(
                    load <= cap,
                    "{members} members, {partitions} partitions: {load} > {cap}"
                );
            }
            let owned: usize = m.iter().map(|x| owned_by(x, &m, partitions).len()).sum();
            assert_eq!(owned, partitions as usize);
        }
        assert_eq!(assign(&[], 4), vec![None; 4]);
        assert!(owned_by("stranger", &names(2), 16).is_empty());
    }

    #[test]
    fn assignment_is_deterministic() {
        let m = names(3);
        assert_eq!(assign(&m, 16), assign(&m.clone(), 16));
        // Known values: changing the hash moves partitions on upgrade (harmless but churny).
        let owners = owners(&m, 8);
        assert_eq!(owners.len(), 8);
    }

    #[test]
    fn membership_changes_move_few_partitions() {
        // Adding a third member to two moves about a third of the partitions; removing one of
        // three moves about its share.
        let partitions = 48;
        let mut total_join = 0;
        let mut total_leave = 0;
        let trials = 20;
        for t in 0..trials {
            let mut two: Vec<String> = (0..2).map(|i| format!("r{t}-{i}")).collect();
            two.sort();
            let mut three = two.clone();
            three.push(format!("r{t}-new"));
            three.sort();
            let before = owners(&two, partitions);
            let after = owners(&three, partitions);
            total_join += before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let back = owners(&two, partitions);
            total_leave += after.iter().zip(&back).filter(|(a, b)| a != b).count();
        }
        let ideal = trials * partitions as usize / 3;
        assert!(
            total_join <= ideal * 5 / 4,
            "join moved {total_join}, ideal {ideal}"
        );
        assert!(
            total_leave <= ideal * 5 / 4,
            "leave moved {total_leave}, ideal {ideal}"
        );
    }

    #[test]
    fn config_is_checked() {
        assert!(OwnershipConfig::default().validate().is_ok());
        let bad = [
            OwnershipConfig {
                member_ttl_seconds: 0,
                ..Default::default()
            },
            OwnershipConfig {
                heartbeat_ms: 3_000,
                ..Default::default()
            },
            OwnershipConfig {
                pin_timeout_seconds: 0,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
        assert_eq!(
            OwnershipConfig::default().takeover_bound(),
            Duration::from_secs(6)
        );
    }

    #[test]
    fn member_ids_are_unique_key_tokens() {
        let a = new_member_id();
        let b = new_member_id();
        assert_ne!(a, b);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{a}"
        );
    }
}
