//! One profile write per person per batch, against a real nats-server: a key's events are
//! applied in memory and written with one compare-and-set; a conflict applies them again from
//! KV (counters stay exact); nothing is lost when a replica stops between its write and its
//! publish. Each `Profiles` here plays one processor replica (its own cache).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use common::{consent, event, identify};
use herald_common::telemetry;
use herald_processor::{IdentityKey, KeyEvents, Outcome, Profile, Profiles, ProfilesConfig};
use herald_proto::v1::{Event, EventType, ProcessedEvent};
use herald_testkit::NatsServer;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

async fn open(nats: &NatsServer) -> Result<Arc<Profiles>> {
    Ok(Profiles::open(
        nats.jetstream().await,
        common::topology(),
        ProfilesConfig::default(),
        CancellationToken::new(),
    )
    .await?)
}

/// Processes one key's events as the worker does (retryable errors retried, here for at most
/// 10 s); returns each event's outcome, in order.
async fn process_group(p: &Profiles, events: Vec<Event>) -> Result<Vec<Outcome>> {
    process_key(p, KeyEvents::new(events)).await
}

/// [`process_group`] with the worker's [`KeyEvents::publish_early`].
async fn process_group_early(p: &Profiles, events: Vec<Event>) -> Result<Vec<Outcome>> {
    process_key(p, KeyEvents::new(events).publish_early()).await
}

async fn process_key(p: &Profiles, mut group: KeyEvents) -> Result<Vec<Outcome>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match p.process_group(&mut group).await {
            Ok(()) => return Ok(group.into_outcomes()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A nats-server with the processed stream (created as the worker creates it) and one replica.
async fn with_processed_stream() -> Result<(NatsServer, Arc<Profiles>)> {
    let nats = NatsServer::start().await?;
    herald_common::nats::ensure_stream(
        &nats.jetstream().await,
        common::topology().processed_stream_config(),
    )
    .await?;
    let p = open(&nats).await?;
    Ok((nats, p))
}

/// Every message of the processed stream, in stream order.
async fn processed(nats: &NatsServer) -> Result<Vec<ProcessedEvent>> {
    let js = nats.jetstream().await;
    let mut stream = js.get_stream(common::topology().processed_stream()).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let msg = stream.get_raw_message(seq).await?;
        out.push(ProcessedEvent::decode(msg.payload.as_ref())?);
    }
    Ok(out)
}

fn ids(events: &[ProcessedEvent]) -> Vec<String> {
    events
        .iter()
        .map(|p| p.event.as_ref().map(|e| e.id.clone()).unwrap_or_default())
        .collect()
}

/// What each event of a group publishes.
fn published(outcomes: Vec<Outcome>) -> Result<Vec<Vec<ProcessedEvent>>> {
    outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::Publish(list) => Ok(list),
            Outcome::Suppressed => bail!("an event was suppressed"),
            Outcome::Published => bail!("an event was published early (not asked for here)"),
        })
        .collect()
}

/// The last sequence of the profiles bucket's stream: every profile write (create, update,
/// delete) adds one.
async fn profile_writes(nats: &NatsServer) -> Result<u64> {
    let js = nats.jetstream().await;
    let mut stream = js
        .get_stream(format!("KV_{}", common::topology().bucket("profiles")))
        .await?;
    Ok(stream.info().await?.state.last_sequence)
}

async fn profile_of(p: &Profiles, user: &str) -> Result<(u64, Profile)> {
    p.lookup(&IdentityKey::new("user_id", user))
        .await?
        .context("the user has a profile")
}

/// `n` tracks of `user` on device `anon`, ids `<prefix>-<i>`, at `secs + i`.
fn tracks(prefix: &str, user: &str, anon: &str, secs: i64, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            event(
                &format!("{prefix}-{i}"),
                EventType::Track,
                user,
                anon,
                secs + i as i64,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_one_persons_events_is_one_profile_write() -> Result<()> {
    let nats = NatsServer::start().await?;
    let p = open(&nats).await?;
    process_group(
        &p,
        vec![identify("first", "ann", "dev-a", 10, r#"{"plan":"free"}"#)],
    )
    .await?;
    let (rev_before, before) = profile_of(&p, "ann").await?;
    let writes_before = profile_writes(&nats).await?;

    // Ten events of one person in one batch: tracks, a trait change, a consent change.
    let mut events = tracks("t", "ann", "dev-a", 20, 10);
    events[3] = identify("t-3", "ann", "dev-a", 23, r#"{"plan":"pro"}"#);
    events[5].consent = consent(&[("advertising", true)], false, 25);
    let out = published(process_group(&p, events).await?)?;

    assert_eq!(
        profile_writes(&nats).await? - writes_before,
        1,
        "one profile write for the batch"
    );
    let (rev, after) = profile_of(&p, "ann").await?;
    assert!(rev > rev_before);
    assert_eq!(after.event_count, before.event_count + 10);
    assert_eq!(after.event_counts["track"], 9);
    assert_eq!(after.trait_values()["plan"], "pro");
    assert_eq!(after.last_seen, Some(t(29)));

    // Every event has its output, in order, with the consent in force as of itself.
    assert_eq!(out.len(), 10);
    for (i, list) in out.iter().enumerate() {
        let e = list[0].event.as_ref().context("the event")?;
        assert_eq!(e.id, format!("test:t-{i}"));
        assert_eq!(list[0].profile_id, after.id);
        assert_eq!(list[0].identities.len(), 2);
        let granted = list[0]
            .consent
            .as_ref()
            .is_some_and(|c| c.purposes.get("advertising") == Some(&true));
        assert_eq!(granted, i >= 5, "event {i}: {:?}", list[0].consent);
        assert_eq!(list.len(), if i == 5 { 2 } else { 1 }, "event {i}");
    }
    assert_eq!(
        out[5][1].event.as_ref().map(|e| e.id.as_str()),
        Some("test:t-5#consent-changed")
    );
    // The consent record follows the written revision.
    let kv = nats
        .jetstream()
        .await
        .get_key_value(common::topology().bucket("consent"))
        .await?;
    let rec: serde_json::Value =
        serde_json::from_slice(&kv.get(&after.id).await?.context("a consent record")?)?;
    assert_eq!(rec["purposes"]["advertising"], true);
    assert_eq!(rec["profile_revision"], rev);

    // A person nobody knew: the profile is created with the first event (its identities must
    // map to a stored profile), the rest of the batch is one more write.
    let writes_before = profile_writes(&nats).await?;
    let out = published(process_group(&p, tracks("n", "bob", "dev-b", 40, 8)).await?)?;
    assert_eq!(profile_writes(&nats).await? - writes_before, 2);
    let (_, bob) = profile_of(&p, "bob").await?;
    assert_eq!(bob.event_count, 8);
    assert!(out.iter().all(|list| list[0].profile_id == bob.id));
    Ok(())
}

fn t(secs: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_760_000_000 + secs, 0).expect("valid")
}

/// Compare-and-set writes of a profile that lost.
const PROFILE_CONFLICTS: &str = r#"herald_processor_cas_conflicts_total{bucket="profiles"}"#;

/// Replica `a` holds the profile at an old revision in its cache while replica `b` writes it:
/// `a`'s write of its batch loses the compare-and-set, and the batch is applied again to what
/// KV holds, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_compare_and_set_applies_the_batch_again_and_counts_stay_exact() -> Result<()> {
    let metrics = telemetry::metrics();
    let nats = NatsServer::start().await?;
    let a = open(&nats).await?;
    let b = open(&nats).await?;
    process_group(&a, tracks("a", "cy", "dev-c", 10, 1)).await?;
    process_group(&b, tracks("b", "cy", "dev-c", 11, 3)).await?;
    let conflicts = || counter(&metrics.render(), PROFILE_CONFLICTS);
    let conflicts_before = conflicts();

    let out = published(process_group(&a, tracks("a2", "cy", "dev-c", 20, 10)).await?)?;
    assert!(conflicts() > conflicts_before, "the stale write lost");
    let (_, prof) = profile_of(&a, "cy").await?;
    assert_eq!(prof.event_count, 14, "every event counted once: {prof:?}");
    assert_eq!(prof.event_counts["track"], 14);
    assert!(out.iter().all(|list| list[0].profile_id == prof.id));
    Ok(())
}

/// Two replicas write batches of one person at the same time (as two partitions can, for a
/// person whose ids route apart): nothing lost, nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_writing_batches_of_one_person_lose_and_double_nothing() -> Result<()> {
    const BATCHES: usize = 10;
    const EACH: usize = 10;
    let nats = NatsServer::start().await?;
    let a = open(&nats).await?;
    let b = open(&nats).await?;
    process_group(&a, tracks("s", "dee", "dev-d", 0, 1)).await?;
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for (w, p) in [a.clone(), b].into_iter().enumerate() {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            for n in 0..BATCHES {
                let mut events = tracks(&format!("w{w}-{n}"), "dee", "dev-d", 100, EACH);
                // Each batch also moves a trait of this writer forward.
                events[EACH - 1] = identify(
                    &format!("w{w}-{n}-trait"),
                    "dee",
                    "dev-d",
                    (1000 + n) as i64,
                    &format!(r#"{{"writer_{w}":{n}}}"#),
                );
                process_group(&p, events).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (_, prof) = profile_of(&a, "dee").await?;
    assert_eq!(
        prof.event_count,
        (1 + 2 * BATCHES * EACH) as u64,
        "{prof:?}"
    );
    assert_eq!(prof.event_counts["identify"], (2 * BATCHES) as u64);
    let traits = prof.trait_values();
    assert_eq!(traits["writer_0"], (BATCHES - 1) as u64);
    assert_eq!(traits["writer_1"], (BATCHES - 1) as u64);
    Ok(())
}

/// The order that makes a crash harmless: a batch's profile write comes before its outputs are
/// published, and its inputs are acked after them. A replica that stops after the write (its
/// outputs never published, here: dropped) leaves its inputs unacked; the replica that takes
/// the partition over gets them again. The trait and consent changes are in the profile
/// already, and the consent change is published again by its redelivered cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopping_between_write_and_publish_loses_no_change() -> Result<()> {
    let nats = NatsServer::start().await?;
    let crashed = open(&nats).await?;
    let batch = || {
        let mut events = tracks("c", "eve", "dev-e", 10, 3);
        events[0] = identify("c-0", "eve", "dev-e", 10, r#"{"plan":"pro"}"#);
        events[1].consent = consent(&[("analytics", true)], false, 11);
        events
    };
    // Written, never published: dropped with the replica.
    drop(process_group(&crashed, batch()).await?);
    drop(crashed);

    let (_, written) = {
        let reader = open(&nats).await?;
        profile_of(&reader, "eve").await?
    };
    assert_eq!(written.trait_values()["plan"], "pro");
    assert!(
        written
            .consent
            .snapshot()
            .is_some_and(|c| c.purposes["analytics"])
    );

    // The new owner gets the same inputs again.
    let owner = open(&nats).await?;
    let out = published(process_group(&owner, batch()).await?)?;
    assert_eq!(
        out[1]
            .iter()
            .map(|p| p.event.as_ref().map(|e| e.id.clone()))
            .collect::<Vec<_>>(),
        [
            Some("test:c-1".into()),
            Some("test:c-1#consent-changed".into())
        ],
        "the consent change is published by its redelivered cause"
    );
    assert!(
        out[2][0]
            .consent
            .as_ref()
            .is_some_and(|c| c.purposes["analytics"])
    );
    let (_, prof) = profile_of(&owner, "eve").await?;
    assert_eq!(prof.trait_values()["plan"], "pro");
    assert_eq!(
        prof.event_count, 6,
        "a redelivered batch counts again (at least once, as Profile::event_count says)"
    );
    Ok(())
}

/// A known person's run is published while its profile is written (the worker's
/// `publish_early`): its outcomes say so, the processed stream holds each event once, with the
/// profile's id and identities, and the profile counts each once. A run with a consent change
/// is not published early: it waits for its write, as its consent record must come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_persons_run_is_published_while_its_profile_is_written() -> Result<()> {
    let (nats, p) = with_processed_stream().await?;
    process_group(&p, tracks("first", "fay", "dev-f", 0, 1)).await?;

    let outcomes = process_group_early(&p, tracks("t", "fay", "dev-f", 10, 4)).await?;
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Published),
        "{outcomes:?}"
    );
    let out = processed(&nats).await?;
    assert_eq!(ids(&out), ["test:t-0", "test:t-1", "test:t-2", "test:t-3"]);
    let (_, prof) = profile_of(&p, "fay").await?;
    assert_eq!(prof.event_count, 5, "{prof:?}");
    assert!(out.iter().all(|e| e.profile_id == prof.id));
    assert!(
        out.iter()
            .all(|e| e.identities.iter().any(|i| i.value == "fay")),
        "{out:?}"
    );

    let mut with_consent = tracks("c", "fay", "dev-f", 20, 2);
    with_consent[1].consent = consent(&[("analytics", true)], false, 21);
    let outcomes = process_group_early(&p, with_consent).await?;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Publish(_))),
        "{outcomes:?}"
    );
    assert_eq!(
        processed(&nats).await?.len(),
        4,
        "published by the worker, not here"
    );
    Ok(())
}

/// A run published early whose write then loses to another replica's: applied again from KV
/// (each event counted once), and published again with the same ids, which the server drops,
/// so the processed stream holds each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_run_that_loses_its_write_is_counted_once_and_published_once() -> Result<()> {
    let metrics = telemetry::metrics();
    let (nats, a) = with_processed_stream().await?;
    let b = open(&nats).await?;
    process_group(&a, tracks("a", "gus", "dev-g", 10, 1)).await?;
    process_group(&b, tracks("b", "gus", "dev-g", 11, 3)).await?;
    let conflicts = || counter(&metrics.render(), PROFILE_CONFLICTS);
    let conflicts_before = conflicts();

    let outcomes = process_group_early(&a, tracks("a2", "gus", "dev-g", 20, 5)).await?;
    assert!(conflicts() > conflicts_before, "the stale write lost");
    let (_, prof) = profile_of(&a, "gus").await?;
    assert_eq!(prof.event_count, 9, "every event counted once: {prof:?}");
    // Published early (and dropped as copies when the run came again), or by the worker.
    assert_eq!(outcomes.len(), 5);
    let mut published = Vec::new();
    for (o, i) in outcomes.into_iter().zip(0..) {
        match o {
            Outcome::Published => published.push(format!("test:a2-{i}")),
            Outcome::Publish(list) => {
                assert_eq!(list[0].profile_id, prof.id);
            }
            Outcome::Suppressed => bail!("suppressed"),
        }
    }
    let out = ids(&processed(&nats).await?);
    let mut seen = out.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), out.len(), "no event twice: {out:?}");
    assert_eq!(out.len(), 5, "{out:?}");
    assert!(published.iter().all(|id| out.contains(id)));
    Ok(())
}

/// Early publishing keeps a key's order: a new person's first event is written alone and
/// published by the worker, so the run after it waits for that rather than going out first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_after_an_event_the_worker_publishes_is_not_published_before_it() -> Result<()> {
    let (nats, p) = with_processed_stream().await?;
    let outcomes = process_group_early(&p, tracks("n", "hal", "dev-h", 0, 3)).await?;
    assert!(matches!(outcomes[0], Outcome::Publish(_)), "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Publish(_))),
        "the run after it is published by the worker too, in order: {outcomes:?}"
    );
    assert!(processed(&nats).await?.is_empty());
    Ok(())
}

/// An event of the key that names no identity is published bare, by the worker, in the middle
/// of a known person's run: the run is not published early, so nothing overtakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_around_an_event_published_bare_is_not_published_early() -> Result<()> {
    let (nats, p) = with_processed_stream().await?;
    process_group(&p, tracks("first", "ida", "dev-i", 0, 1)).await?;
    let mut events = tracks("r", "ida", "dev-i", 10, 3);
    events[1] = event("r-1", EventType::Track, "", "", 11);
    let outcomes = process_group_early(&p, events).await?;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Publish(_))),
        "{outcomes:?}"
    );
    assert!(processed(&nats).await?.is_empty());
    Ok(())
}

/// The sum of a counter's samples (over its labels) in a Prometheus exposition.
fn counter(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
