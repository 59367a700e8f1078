//! The running processor (`herald_processor::start`) on a real nats-server: identity resolution
//! across partitions, opt-out and consent-changed events, the profile API over gRPC and HTTP,
//! erasure and suppression.

mod common;

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::{self, consumer};
use common::{consent, event, identify, topology};
use futures_util::StreamExt;
use herald_common::auth::BearerToken;
use herald_common::partition::partition_for;
use herald_common::server::ServiceHandle;
use herald_common::{CommonConfig, ControlConfig, NatsConfig, TopologyConfig, telemetry};
use herald_processor::ProcessorConfig;
use herald_proto::v1::profile_service_client::ProfileServiceClient;
use herald_proto::v1::{
    EraseRequest, ErasureState, Event, EventType, GetErasureStatusRequest, GetProfileRequest,
    Identity, ProcessedEvent, SuppressRequest, UnsuppressRequest,
};
use herald_testkit::{NatsServer, read_from_start, wait_ready};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(20);

/// The control token the tests configure.
const TOKEN: &str = "processor-test-token";

/// Publishes events on the events stream as ingest would (creating the stream first).
async fn publish_events(js: &jetstream::Context, events: &[Event]) -> Result<()> {
    let t = topology();
    herald_common::nats::ensure_stream(js, t.events_stream_config()).await?;
    for e in events {
        js.send_publish(
            t.events_subject(e.partition),
            jetstream::message::PublishMessage::build()
                .payload(e.encode_to_vec().into())
                .message_id(&e.id),
        )
        .await?
        .await?;
    }
    Ok(())
}

/// Reads the processed stream from the start.
struct ProcessedReader {
    messages: consumer::pull::Stream,
    /// Everything read so far.
    seen: Vec<(String, ProcessedEvent)>,
}

impl ProcessedReader {
    /// A reader over every processed partition (waits for the stream to exist).
    async fn new(js: &jetstream::Context) -> Result<Self> {
        let t = topology();
        let name = t.processed_stream();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match js.get_stream(&name).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("the processed stream never appeared: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let messages = read_from_start(js, &name).await?;
        Ok(Self {
            messages,
            seen: Vec::new(),
        })
    }

    /// Reads until an event whose id is `id` arrived (or `timeout` passes); returns it.
    async fn wait_for(&mut self, id: &str, timeout: Duration) -> Result<ProcessedEvent> {
        let found = |seen: &[(String, ProcessedEvent)]| {
            seen.iter()
                .find(|(_, p)| p.event.as_ref().is_some_and(|e| e.id == id))
                .map(|(_, p)| p.clone())
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = found(&self.seen) {
                return Ok(p);
            }
            let next = tokio::time::timeout_at(deadline, self.messages.next())
                .await
                .with_context(|| format!("timed out after {timeout:?} waiting for {id}"))?;
            let Some(msg) = next else {
                bail!("the processed stream consumer ended");
            };
            let Ok(msg) = msg else { continue };
            let p = ProcessedEvent::decode(msg.payload.as_ref())?;
            self.seen.push((msg.subject.to_string(), p));
        }
    }
}

async fn start(nats: &NatsServer) -> Result<(ServiceHandle, CancellationToken)> {
    let common = CommonConfig {
        nats: NatsConfig {
            servers: nats.url(),
            ..Default::default()
        },
        topology: TopologyConfig::default(),
        control: ControlConfig::with_token(TOKEN),
    };
    let cfg = ProcessorConfig {
        grpc_addr: "127.0.0.1:0".into(),
        http_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let h = herald_processor::start(&common, &cfg, telemetry::metrics(), shutdown.clone()).await?;
    // The events stream is ingest's: create it so the processor can bind.
    herald_common::nats::ensure_stream(&nats.jetstream().await, topology().events_stream_config())
        .await?;
    wait_ready("the processor is ready", h.admin_addr, WAIT).await?;
    Ok((h, shutdown))
}

async fn client(
    h: &ServiceHandle,
) -> Result<ProfileServiceClient<InterceptedService<Channel, BearerToken>>> {
    let channel = Channel::from_shared(format!("http://{}", h.grpc_addr))?
        .connect()
        .await?;
    Ok(ProfileServiceClient::with_interceptor(
        channel,
        BearerToken::new(TOKEN)?,
    ))
}

/// Another key routed to the same partition as `key`.
fn same_partition(key: &str) -> String {
    let p = partition_for(key, 16);
    (0..)
        .map(|i| format!("{key}-other-{i}"))
        .find(|k| partition_for(k, 16) == p)
        .expect("some key shares the partition")
}

fn identity(kind: &str, value: &str) -> Option<Identity> {
    Some(Identity {
        r#type: kind.into(),
        value: value.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_events_and_the_identified_user_share_one_profile_across_partitions() -> Result<()>
{
    let nats = NatsServer::start().await?;
    let (h, shutdown) = start(&nats).await?;
    let js = nats.jetstream().await;
    let (user, anon) = ("user-77", "anon-77");
    let a = event("a1", EventType::Page, "", anon, 10);
    let i = identify("i1", user, anon, 11, r#"{"plan":"pro"}"#);
    assert_ne!(a.partition, i.partition, "the test needs two partitions");
    publish_events(
        &js,
        &[
            a,
            event("a2", EventType::Track, "", anon, 10),
            i,
            event("u1", EventType::Track, user, "", 12),
            event("a3", EventType::Track, "", anon, 13),
        ],
    )
    .await?;
    let mut r = ProcessedReader::new(&js).await?;
    let first = r.wait_for("test:a1", WAIT).await?;
    let profile = first.profile_id.clone();
    for id in ["test:a2", "test:i1", "test:u1", "test:a3"] {
        let p = r.wait_for(id, WAIT).await?;
        assert_eq!(p.profile_id, profile, "{id}");
    }
    let u1 = r.wait_for("test:u1", WAIT).await?;
    assert_eq!(u1.identities.len(), 2, "{:?}", u1.identities);
    // Published on the partition of the event's own key, with the event id as message id.
    let subjects: Vec<&str> = r
        .seen
        .iter()
        .filter(|(_, p)| p.event.as_ref().is_some_and(|e| e.id == "test:u1"))
        .map(|(s, _)| s.as_str())
        .collect();
    assert_eq!(
        subjects,
        [topology().processed_subject(partition_for(user, 16))]
    );

    // The profile API, with the token, by either identity.
    let mut c = client(&h).await?;
    let got = c
        .get_profile(GetProfileRequest {
            identity: identity("anonymous_id", anon),
        })
        .await?
        .into_inner()
        .profile
        .context("a profile")?;
    assert_eq!(got.id, profile);
    assert_eq!(got.traits["plan"].value_json, "\"pro\"");
    assert_eq!(got.event_count, 5);
    let missing = c
        .get_profile(GetProfileRequest {
            identity: identity("user_id", "nobody"),
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let channel = Channel::from_shared(format!("http://{}", h.grpc_addr))?
        .connect()
        .await?;
    let refused = ProfileServiceClient::new(channel)
        .get_profile(GetProfileRequest {
            identity: identity("user_id", user),
        })
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let http = h.http_addr.context("the processor has an HTTP port")?;
    let url = format!("http://{http}/v1/profiles/user_id/{user}");
    let http_client = reqwest::Client::new();
    let res = http_client.get(&url).bearer_auth(TOKEN).send().await?;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await?;
    assert_eq!(body["id"], profile.as_str());
    assert_eq!(body["traits"]["plan"], "pro");
    assert_eq!(body["eventCount"], 5);
    assert_eq!(
        http_client.get(&url).send().await?.status(),
        401,
        "the token is required"
    );
    assert_eq!(
        http_client
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await?
            .status(),
        401
    );
    let unknown = http_client
        .get(format!(
            "http://{http}/v1/profiles/email/nobody%40example.com"
        ))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(unknown.status(), 404);

    shutdown.cancel();
    h.task.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_out_shows_on_the_next_event_and_is_published_as_a_consent_change() -> Result<()> {
    let nats = NatsServer::start().await?;
    let (h, shutdown) = start(&nats).await?;
    let js = nats.jetstream().await;
    let user = "opt-user";
    let granted = herald_proto::v1::Event {
        consent: consent(&[("advertising", true)], false, 10),
        ..event("g1", EventType::Track, user, "", 10)
    };
    let opt_out = herald_proto::v1::Event {
        consent: consent(&[], true, 11),
        ..event("o1", EventType::OptOut, user, "", 11)
    };
    publish_events(
        &js,
        &[
            granted,
            opt_out,
            event("n1", EventType::Track, user, "", 12),
        ],
    )
    .await?;
    let mut r = ProcessedReader::new(&js).await?;
    let g = r.wait_for("test:g1", WAIT).await?;
    assert!(g.consent.as_ref().expect("snapshot").purposes["advertising"]);
    let changed = r.wait_for("test:o1#consent-changed", WAIT).await?;
    let ce = changed.event.as_ref().expect("event");
    assert_eq!(ce.r#type, EventType::ConsentChanged as i32);
    assert_eq!(changed.profile_id, g.profile_id);
    assert!(changed.consent.as_ref().expect("new consent").opted_out);
    let next = r.wait_for("test:n1", WAIT).await?;
    let snap = next.consent.expect("snapshot");
    assert!(snap.opted_out);
    assert!(!snap.purposes["advertising"]);
    // The consent-changed event sits on the same partition, right after its cause.
    let order: Vec<String> = r
        .seen
        .iter()
        .filter_map(|(_, p)| p.event.as_ref().map(|e| e.id.clone()))
        .collect();
    let pos = |id: &str| order.iter().position(|x| x == id).expect("seen");
    assert_eq!(pos("test:o1#consent-changed"), pos("test:o1") + 1);
    shutdown.cancel();
    h.task.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_removes_the_profile_and_suppresses_its_identities() -> Result<()> {
    let nats = NatsServer::start().await?;
    let (h, shutdown) = start(&nats).await?;
    let js = nats.jetstream().await;
    let mut with_email = identify("e1", "erase-me", "erase-anon", 10, r#"{"plan":"pro"}"#);
    with_email
        .identities
        .insert("email".into(), "erase@example.com".into());
    publish_events(&js, &[with_email]).await?;
    let mut r = ProcessedReader::new(&js).await?;
    let first = r.wait_for("test:e1", WAIT).await?;

    let mut c = client(&h).await?;
    let status = c
        .erase(EraseRequest {
            identity: identity("email", "Erase@Example.com"),
        })
        .await?
        .into_inner()
        .status
        .context("status")?;
    assert_eq!(status.state, ErasureState::Completed as i32, "{status:?}");
    assert_eq!(status.profile_id, first.profile_id);
    assert_eq!(status.identities.len(), 3);
    assert!(status.events_published >= 1);
    // The status is queryable.
    let again = c
        .get_erasure_status(GetErasureStatusRequest {
            request_id: status.request_id.clone(),
        })
        .await?
        .into_inner()
        .status
        .context("status")?;
    assert_eq!(again.state, ErasureState::Completed as i32);
    // The profile and its mappings are gone.
    for (kind, value) in [
        ("user_id", "erase-me"),
        ("anonymous_id", "erase-anon"),
        ("email", "erase@example.com"),
    ] {
        let err = c
            .get_profile(GetProfileRequest {
                identity: identity(kind, value),
            })
            .await
            .expect_err("erased");
        assert_eq!(err.code(), tonic::Code::NotFound, "{kind}");
    }
    // An erasure event went out on the processed partition of each identity.
    let erasure_id = format!(
        "erasure:{}:{}",
        status.request_id,
        partition_for("erase-me", 16)
    );
    let erasure = r.wait_for(&erasure_id, WAIT).await?;
    assert_eq!(
        erasure.event.as_ref().map(|e| e.r#type),
        Some(EventType::Erasure as i32)
    );
    assert_eq!(erasure.profile_id, first.profile_id);

    // Later events of any of its identities are dropped; others flow. Each marker follows the
    // dropped events in their partition, so once it is out, they were handled.
    publish_events(
        &js,
        &[
            event("later-1", EventType::Track, "erase-me", "", 20),
            event("later-2", EventType::Track, "", "erase-anon", 21),
            event(
                "marker-1",
                EventType::Track,
                &same_partition("erase-me"),
                "",
                22,
            ),
            event(
                "marker-2",
                EventType::Track,
                "",
                &same_partition("erase-anon"),
                22,
            ),
        ],
    )
    .await?;
    r.wait_for("test:marker-1", WAIT).await?;
    r.wait_for("test:marker-2", WAIT).await?;
    let ids: Vec<String> = r
        .seen
        .iter()
        .filter_map(|(_, p)| p.event.as_ref().map(|e| e.id.clone()))
        .collect();
    assert!(!ids.iter().any(|i| i.starts_with("test:later-")), "{ids:?}");
    let metrics = reqwest::get(format!("http://{}/metrics", h.admin_addr))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains(r#"herald_processor_events_total{outcome="suppressed"} 2"#),
        "{metrics}"
    );
    assert!(
        c.get_profile(GetProfileRequest {
            identity: identity("user_id", "erase-me"),
        })
        .await
        .is_err()
    );

    // Unsuppress lifts the suppression of every identity erased together.
    let lifted = c
        .unsuppress(UnsuppressRequest {
            identity: identity("user_id", "erase-me"),
        })
        .await?
        .into_inner()
        .identities;
    assert_eq!(lifted.len(), 3);
    publish_events(&js, &[event("back", EventType::Track, "erase-me", "", 30)]).await?;
    let back = r.wait_for("test:back", WAIT).await?;
    assert_ne!(back.profile_id, first.profile_id, "a new profile");

    // Suppress without erasing: the profile stays, its events are dropped.
    let s = c
        .suppress(SuppressRequest {
            identity: identity("user_id", "erase-me"),
        })
        .await?
        .into_inner();
    assert_eq!(s.identities.len(), 1);
    publish_events(
        &js,
        &[
            event("dropped", EventType::Track, "erase-me", "", 31),
            event(
                "marker-3",
                EventType::Track,
                &same_partition("erase-me"),
                "",
                32,
            ),
        ],
    )
    .await?;
    r.wait_for("test:marker-3", WAIT).await?;
    assert!(
        !r.seen
            .iter()
            .any(|(_, p)| p.event.as_ref().is_some_and(|e| e.id == "test:dropped"))
    );
    assert!(
        c.get_profile(GetProfileRequest {
            identity: identity("user_id", "erase-me"),
        })
        .await
        .is_ok()
    );

    shutdown.cancel();
    h.task.await?;
    Ok(())
}
