//! The profile store against a real nats-server: merges, out-of-order traits, concurrent
//! writers, guard rails, consent. Each `Profiles` here plays one processor replica (its own
//! cache); they share only KV.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Result, bail};
use common::{consent, event, identify};
use herald_common::{Topology, TopologyConfig};
use herald_processor::{IdentityKey, Outcome, Profiles, ProfilesConfig};
use herald_proto::v1::{Event, EventType, ProcessedEvent};
use herald_testkit::{NatsCluster, NatsServer};
use tokio_util::sync::CancellationToken;

/// A profile store on `nats`, with its own cache (one per simulated replica).
async fn open(nats: &NatsServer, cfg: ProfilesConfig) -> Result<Arc<Profiles>> {
    Ok(Profiles::open(
        nats.jetstream().await,
        common::topology(),
        cfg,
        CancellationToken::new(),
    )
    .await?)
}

/// Processes `e`, expecting it to be published; returns what would be published. Retryable
/// store errors are retried for a few seconds, as the worker retries them (a fresh replicated
/// bucket can answer "no responders" for a moment after it was created).
async fn process(p: &Profiles, e: Event) -> Result<Vec<ProcessedEvent>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut e = e;
    loop {
        match p.process(e).await {
            Ok(Outcome::Publish(list)) => return Ok(list),
            Ok(Outcome::Suppressed) => bail!("the event was suppressed"),
            Ok(Outcome::Published) => bail!("published early, which only the worker asks for"),
            Err((err, back)) if err.retryable() && std::time::Instant::now() < deadline => {
                e = back;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err((err, _)) => return Err(err.into()),
        }
    }
}

fn id(s: &str) -> IdentityKey {
    IdentityKey::parse(s).expect("type:value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_browsing_then_identify_is_one_profile_and_alias_merges() -> Result<()> {
    let nats = NatsServer::start().await?;
    let p = open(&nats, ProfilesConfig::default()).await?;

    let a1 = process(&p, event("a1", EventType::Page, "", "anon-1", 10)).await?;
    let a2 = process(&p, event("a2", EventType::Track, "", "anon-1", 11)).await?;
    let anon_profile = a1[0].profile_id.clone();
    assert!(!anon_profile.is_empty());
    assert_eq!(a2[0].profile_id, anon_profile);

    // The identify links the user id to the anonymous profile.
    let i = process(
        &p,
        identify("i1", "user-1", "anon-1", 12, r#"{"plan":"pro"}"#),
    )
    .await?;
    assert_eq!(i[0].profile_id, anon_profile);
    // Later events by either identity alone resolve to it.
    let u = process(&p, event("u1", EventType::Track, "user-1", "", 13)).await?;
    let a3 = process(&p, event("a3", EventType::Track, "", "anon-1", 14)).await?;
    assert_eq!(u[0].profile_id, anon_profile);
    assert_eq!(a3[0].profile_id, anon_profile);
    let kinds: BTreeSet<String> = u[0].identities.iter().map(|i| i.r#type.clone()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["user_id".into(), "anonymous_id".into()])
    );

    // A user known on another device identifies on this one: the two profiles merge and the
    // older one survives.
    let other = process(&p, event("o1", EventType::Track, "user-2", "", 1)).await?;
    let device = process(&p, event("d1", EventType::Track, "", "anon-2", 20)).await?;
    assert_ne!(other[0].profile_id, device[0].profile_id);
    let merged = process(&p, identify("i2", "user-2", "anon-2", 21, "{}")).await?;
    assert_eq!(
        merged[0].profile_id, other[0].profile_id,
        "the older survives"
    );
    let after = process(&p, event("d2", EventType::Track, "", "anon-2", 22)).await?;
    assert_eq!(after[0].profile_id, other[0].profile_id);
    let (_, prof) = p.lookup(&id("anonymous_id:anon-2")).await?.expect("found");
    assert_eq!(prof.id, other[0].profile_id);
    assert_eq!(prof.merged_from, [device[0].profile_id.clone()]);
    assert_eq!(prof.event_count, 4);

    // alias previousId -> userId merges, even two user ids (an explicit instruction).
    let old = process(&p, event("x1", EventType::Track, "old-id", "", 30)).await?;
    let new = process(&p, event("x2", EventType::Track, "new-id", "", 31)).await?;
    let alias = herald_proto::v1::Event {
        previous_id: "old-id".into(),
        ..event("x3", EventType::Alias, "new-id", "", 32)
    };
    let aliased = process(&p, alias).await?;
    assert_eq!(aliased[0].profile_id, old[0].profile_id);
    let (_, prof) = p.lookup(&id("user_id:new-id")).await?.expect("found");
    assert_eq!(prof.id, old[0].profile_id);
    assert!(prof.merged_from.contains(&new[0].profile_id));

    // An alias from an anonymous id.
    let anon = process(&p, event("y1", EventType::Page, "", "anon-3", 40)).await?;
    let alias = herald_proto::v1::Event {
        previous_id: "anon-3".into(),
        ..event("y2", EventType::Alias, "user-3", "", 41)
    };
    assert_eq!(process(&p, alias).await?[0].profile_id, anon[0].profile_id);
    let later = process(&p, event("y3", EventType::Track, "user-3", "", 42)).await?;
    assert_eq!(later[0].profile_id, anon[0].profile_id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_trait_updates_resolve_by_event_time() -> Result<()> {
    let nats = NatsServer::start().await?;
    let p = open(&nats, ProfilesConfig::default()).await?;
    // Arrival order: newest first, then older ones.
    process(&p, identify("t3", "u", "", 300, r#"{"plan":"team"}"#)).await?;
    process(
        &p,
        identify("t1", "u", "", 100, r#"{"plan":"free","city":"Oslo"}"#),
    )
    .await?;
    process(
        &p,
        identify("t2", "u", "", 200, r#"{"plan":"pro","city":"Rome"}"#),
    )
    .await?;
    let (_, prof) = p.lookup(&id("user_id:u")).await?.expect("found");
    let traits = prof.trait_values();
    assert_eq!(traits["plan"], "team");
    assert_eq!(traits["city"], "Rome");
    assert_eq!(prof.event_count, 3);
    Ok(())
}

/// Eight replicas write one profile at once; returns after checking nothing was lost.
async fn eight_writers(replicas: Vec<Arc<Profiles>>) -> Result<()> {
    const EACH: usize = 25;
    let writers = replicas.len();
    // All start at once on a user nobody knows yet, so even the profile's creation races, and
    // each writer's device merges in while the others write.
    let barrier = Arc::new(tokio::sync::Barrier::new(writers));
    let mut tasks = Vec::new();
    for (w, p) in replicas.iter().cloned().enumerate() {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut profiles = BTreeSet::new();
            for i in 0..EACH {
                let e = identify(
                    &format!("w{w}-{i}"),
                    "shared-user",
                    &format!("device-{w}"),
                    (i * writers + w) as i64,
                    &format!(r#"{{"writer_{w}":{i}}}"#),
                );
                let out = process(&p, e).await?;
                profiles.insert(out[0].profile_id.clone());
            }
            anyhow::Ok(profiles)
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.extend(t.await??);
    }
    let (_, prof) = replicas[0]
        .lookup(&id("user_id:shared-user"))
        .await?
        .expect("found");
    assert_eq!(prof.event_count, (writers * EACH) as u64, "no update lost");
    assert_eq!(prof.event_counts["identify"], (writers * EACH) as u64);
    let traits = prof.trait_values();
    for w in 0..writers {
        assert_eq!(
            traits[&format!("writer_{w}")],
            (EACH - 1) as u64,
            "{traits:?}"
        );
        assert!(
            prof.identities
                .contains(&id(&format!("anonymous_id:device-{w}")))
        );
    }
    // Every event resolved to the one profile.
    assert_eq!(ids, BTreeSet::from([prof.id.clone()]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_writers_on_one_profile_lose_no_update() -> Result<()> {
    let nats = NatsServer::start().await?;
    let mut replicas = Vec::new();
    for _ in 0..8 {
        replicas.push(open(&nats, ProfilesConfig::default()).await?);
    }
    eight_writers(replicas).await
}

/// The same on a 3-node cluster with R3 buckets, each writer connected to another node (KV reads
/// may be served by a follower that lags: compare-and-set still decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_writers_on_a_three_node_cluster_lose_no_update() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let topology = Topology::new(TopologyConfig {
        replicas: 3,
        ..Default::default()
    });
    let mut replicas = Vec::new();
    for w in 0..8 {
        let client = async_nats::connect(cluster.url(w % 3)).await?;
        let js = async_nats::jetstream::new(client);
        replicas.push(
            Profiles::open(
                js,
                topology.clone(),
                ProfilesConfig::default(),
                CancellationToken::new(),
            )
            .await?,
        );
    }
    eight_writers(replicas).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_identity_value_never_merges_profiles() -> Result<()> {
    let nats = NatsServer::start().await?;
    let mut cfg = ProfilesConfig::default();
    cfg.blocked_values.push("anonymous".into());
    let p = open(&nats, cfg).await?;
    let mut profiles = BTreeSet::new();
    for (i, user) in ["ann", "bob", "cid"].iter().enumerate() {
        for (j, bad) in ["null", "undefined", "0", "", "Anonymous"]
            .iter()
            .enumerate()
        {
            let mut e = event(&format!("{i}-{j}"), EventType::Track, user, bad, i as i64);
            e.identities.insert("email".into(), "NULL".into());
            let out = process(&p, e).await?;
            profiles.insert(out[0].profile_id.clone());
            assert_eq!(out[0].identities.len(), 1, "only the user id is linked");
        }
    }
    assert_eq!(profiles.len(), 3, "one profile per user, never merged");
    assert!(p.lookup(&id("anonymous_id:null")).await?.is_none());
    // An event with nothing but blocked values resolves to no profile.
    let out = process(&p, event("none", EventType::Track, "", "undefined", 9)).await?;
    assert_eq!(out[0].profile_id, "");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_type_limit_holds() -> Result<()> {
    let nats = NatsServer::start().await?;
    let p = open(&nats, ProfilesConfig::default()).await?;
    for i in 0..7 {
        let mut e = event(&format!("e{i}"), EventType::Track, "u", "", i);
        e.identities
            .insert("email".into(), format!("u{i}@example.com"));
        process(&p, e).await?;
    }
    let (_, prof) = p.lookup(&id("user_id:u")).await?.expect("found");
    let emails = prof.identities.iter().filter(|i| i.kind == "email").count();
    assert_eq!(emails, 5, "at most 5 emails per profile by default");
    assert!(p.lookup(&id("email:u6@example.com")).await?.is_none());
    assert_eq!(prof.event_count, 7, "the events still count");

    // A second user id on a shared device does not pull the first user's profile in.
    process(
        &p,
        event("s1", EventType::Track, "first", "shared-device", 50),
    )
    .await?;
    let second = process(
        &p,
        event("s2", EventType::Track, "second", "shared-device", 51),
    )
    .await?;
    let (_, first) = p.lookup(&id("user_id:first")).await?.expect("found");
    assert_ne!(second[0].profile_id, first.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_is_kept_by_event_time_and_opt_out_denies_everything() -> Result<()> {
    let nats = NatsServer::start().await?;
    let p = open(&nats, ProfilesConfig::default()).await?;
    let with_consent = herald_proto::v1::Event {
        consent: consent(&[("advertising", true), ("analytics", true)], false, 10),
        ..event("c1", EventType::Track, "u", "", 10)
    };
    let out = process(&p, with_consent).await?;
    assert_eq!(out.len(), 2, "a first consent is a change");
    assert_eq!(
        out[1].event.as_ref().map(|e| e.r#type),
        Some(EventType::ConsentChanged as i32)
    );
    assert_eq!(
        out[1].event.as_ref().map(|e| e.id.as_str()),
        Some("test:c1#consent-changed")
    );
    // The same consent again is no change.
    let same = herald_proto::v1::Event {
        consent: consent(&[("advertising", true)], false, 11),
        ..event("c2", EventType::Track, "u", "", 11)
    };
    assert_eq!(process(&p, same).await?.len(), 1);
    // An older statement does not override a newer one.
    let old = herald_proto::v1::Event {
        consent: consent(&[("advertising", false)], false, 5),
        ..event("c3", EventType::Track, "u", "", 5)
    };
    let out = process(&p, old).await?;
    assert_eq!(out.len(), 1);
    assert!(out[0].consent.as_ref().expect("snapshot").purposes["advertising"]);

    // opt_out: every purpose denied on the next event, until opted back in.
    let opt_out = herald_proto::v1::Event {
        consent: consent(&[], true, 20),
        ..event("c4", EventType::OptOut, "u", "", 20)
    };
    let out = process(&p, opt_out).await?;
    assert_eq!(out.len(), 2);
    let next = process(&p, event("c5", EventType::Track, "u", "", 21)).await?;
    let snap = next[0].consent.clone().expect("snapshot");
    assert!(snap.opted_out);
    assert!(snap.purposes.values().all(|allowed| !allowed), "{snap:?}");
    let opt_in = herald_proto::v1::Event {
        consent: consent(&[], false, 30),
        ..event("c6", EventType::OptOut, "u", "", 30)
    };
    process(&p, opt_in).await?;
    let next = process(&p, event("c7", EventType::Track, "u", "", 31)).await?;
    let snap = next[0].consent.clone().expect("snapshot");
    assert!(!snap.opted_out);
    assert!(snap.purposes["analytics"]);

    // The consent bucket holds the state in force, keyed by profile id.
    let js = nats.jetstream().await;
    let kv = js.get_key_value("herald-consent").await?;
    let rec: serde_json::Value =
        serde_json::from_slice(&kv.get(&next[0].profile_id).await?.expect("record"))?;
    assert_eq!(rec["opted_out"], false);
    assert_eq!(rec["purposes"]["analytics"], true);
    assert_eq!(rec["schema_version"], 1);
    Ok(())
}

/// A replica that has never seen a person creates a profile for their event without looking
/// their identities up (most such events are new people). When one identity is known after
/// all (here: created by another replica, so not in this one's cache), the new profile is
/// undone and the event resolves to the existing profile: no stray profile, no stray link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_guess_that_a_person_is_new_leaves_nothing_behind() -> Result<()> {
    let nats = NatsServer::start().await?;
    let a = open(&nats, ProfilesConfig::default()).await?;
    let b = open(&nats, ProfilesConfig::default()).await?;
    let known = process(
        &a,
        identify("k1", "user-k", "anon-k1", 10, r#"{"plan":"pro"}"#),
    )
    .await?;
    // Replica b knows nothing: its guess that user-k is new is wrong. The anonymous id (tried
    // first) is new, so the guess has linked it before the user id conflicts.
    let other = process(&b, event("k2", EventType::Track, "user-k", "anon-k2", 11)).await?;
    assert_eq!(other[0].profile_id, known[0].profile_id);
    let (_, prof) = a.lookup(&id("anonymous_id:anon-k2")).await?.expect("found");
    assert_eq!(prof.id, known[0].profile_id);
    assert_eq!(prof.event_count, 2, "the event applied once: {prof:?}");
    // Exactly one profile is stored: the undone one is gone.
    let js = nats.jetstream().await;
    let kv = js
        .get_key_value(Topology::new(TopologyConfig::default()).bucket("profiles"))
        .await?;
    let mut keys = futures_util::TryStreamExt::try_collect::<Vec<String>>(kv.keys().await?).await?;
    keys.sort();
    assert_eq!(keys, vec![known[0].profile_id.clone()]);
    // A person who is new is created in one go.
    let new = process(&b, identify("n1", "user-n", "anon-n", 12, "{}")).await?;
    let (_, prof) = b.lookup(&id("user_id:user-n")).await?.expect("found");
    assert_eq!(prof.id, new[0].profile_id);
    assert_eq!(prof.identities.len(), 2);
    Ok(())
}

/// An erasure sweeps again after its first pass: a replica whose suppression list is behind
/// (here: frozen, its watch stopped) can link an erased identity again in between, and the
/// second pass erases that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_sweeps_up_a_link_made_by_a_lagging_replica() -> Result<()> {
    let nats = NatsServer::start().await?;
    let cfg = ProfilesConfig {
        erasure_sweep_ms: 1500,
        ..ProfilesConfig::default()
    };
    let a = open(&nats, cfg.clone()).await?;
    let frozen = CancellationToken::new();
    let lagging = Profiles::open(
        nats.jetstream().await,
        common::topology(),
        cfg,
        frozen.clone(),
    )
    .await?;
    frozen.cancel();
    // Erasure events go to the processed stream.
    let topology = common::topology();
    herald_common::nats::ensure_stream(&nats.jetstream().await, topology.processed_stream_config())
        .await?;
    process(&a, identify("s1", "user-s", "anon-s", 10, "{}")).await?;

    let eraser = a.clone();
    let erase = tokio::spawn(async move { eraser.erase(&id("user_id:user-s")).await });
    // Wait for the first pass to remove the mapping, then let the lagging replica link the
    // erased user id again.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.lookup(&id("user_id:user-s")).await?.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first pass too slow"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let relinked = process(&lagging, event("s2", EventType::Track, "user-s", "", 11)).await?;
    assert!(!relinked.is_empty() && !relinked[0].profile_id.is_empty());
    assert!(
        a.lookup(&id("user_id:user-s")).await?.is_some(),
        "the lagging replica linked the erased id again"
    );
    let record = erase.await??;
    assert_eq!(
        record.state,
        herald_processor::ErasureState::Completed,
        "{record:?}"
    );
    assert!(a.lookup(&id("user_id:user-s")).await?.is_none());
    assert!(record.erased_profiles.contains(&relinked[0].profile_id));
    Ok(())
}
