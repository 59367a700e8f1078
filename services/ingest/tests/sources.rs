//! Sources in the config bucket through the real service: `SourceService` over gRPC on a port-0
//! server, the keys at the HTTP API, a second replica following changes, hashed storage,
//! seeding from the config file.

use std::net::SocketAddr;
use std::time::Duration;

use herald_common::auth::{BearerToken, sha256_hex};
use herald_common::server::ServiceHandle;
use herald_ingest::IngestConfig;
use herald_proto::v1::source_service_client::SourceServiceClient;
use herald_proto::v1::{
    CreateSourceRequest, CreateSourceResponse, DeleteSourceRequest, DisableSourceRequest,
    EnableSourceRequest, GetSourceRequest, ListSourcesRequest, RotateSourceKeyRequest,
    RotateSourceKeyResponse, SourceSettings,
};
use herald_testkit::ingest::{
    CONTROL_TOKEN, DISABLED_KEY, SOURCE, WRITE_KEY, common_config, ingest_config,
};
use herald_testkit::{NatsServer, post_segment_track, segment_batch, segment_track, wait_until};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// The contract: every replica sees a change within a second.
const PROPAGATION: Duration = Duration::from_secs(1);

type Client = SourceServiceClient<InterceptedService<Channel, BearerToken>>;

struct Ingest {
    handle: ServiceHandle,
    http: SocketAddr,
}

async fn start(nats_url: &str, cfg: IngestConfig, token: &CancellationToken) -> Ingest {
    let cfg = IngestConfig {
        http_addr: "127.0.0.1:0".into(),
        grpc_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        ..cfg
    };
    let handle = herald_ingest::start(
        &common_config(nats_url),
        &cfg,
        herald_common::telemetry::metrics(),
        token.clone(),
    )
    .await
    .expect("ingest starts");
    let http = handle.http_addr.expect("ingest serves HTTP");
    Ingest { handle, http }
}

/// Waits until every one of `ingests` is ready.
async fn wait_ready(ingests: &[&Ingest]) {
    for i in ingests {
        let ready = Duration::from_secs(20);
        herald_testkit::wait_ready("ingest is ready", i.handle.admin_addr, ready)
            .await
            .expect("ready");
    }
}

async fn client(i: &Ingest) -> Client {
    let channel = Channel::from_shared(format!("http://{}", i.handle.grpc_addr))
        .expect("URL")
        .connect()
        .await
        .expect("gRPC connects");
    SourceServiceClient::with_interceptor(channel, BearerToken::new(CONTROL_TOKEN).expect("token"))
}

/// Creates the source `id` with generated keys.
async fn create(c: &mut Client, id: &str) -> Result<CreateSourceResponse, Status> {
    c.create_source(CreateSourceRequest {
        id: id.into(),
        ..Default::default()
    })
    .await
    .map(Response::into_inner)
}

/// Gives the source `id` new generated keys.
async fn rotate(c: &mut Client, id: &str) -> RotateSourceKeyResponse {
    c.rotate_source_key(RotateSourceKeyRequest {
        id: id.into(),
        ..Default::default()
    })
    .await
    .expect("rotate")
    .into_inner()
}

/// The status of one Segment batch sent with `key`.
async fn post(i: &Ingest, key: &str) -> u16 {
    post_segment_track(i.http, key).await
}

async fn wait_status(i: &Ingest, key: &str, want: u16, what: &str) {
    if let Err(e) = wait_until(
        what,
        PROPAGATION,
        || async move { post(i, key).await == want },
    )
    .await
    {
        let last = post(i, key).await;
        panic!("{e} (last status {last})");
    }
}

/// Cancels `token` and waits until every one of `ingests` (started with it) has stopped.
async fn stop(token: &CancellationToken, ingests: impl IntoIterator<Item = Ingest>) {
    token.cancel();
    for i in ingests {
        tokio::time::timeout(Duration::from_secs(10), i.handle.task)
            .await
            .expect("stops")
            .expect("task ends cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_list_get_rotate_disable_enable_delete() {
    let nats = NatsServer::start().await.expect("nats-server");
    let token = CancellationToken::new();
    let ingest = start(&nats.url(), ingest_config(), &token).await;
    wait_ready(&[&ingest]).await;
    let mut c = client(&ingest).await;

    // The config file's sources were seeded into the bucket.
    let listed = c
        .list_sources(ListSourcesRequest {})
        .await
        .expect("list")
        .into_inner()
        .sources;
    let ids: Vec<(&str, bool, bool)> = listed
        .iter()
        .map(|s| (s.id.as_str(), s.enabled, s.from_config))
        .collect();
    assert_eq!(ids, [(SOURCE, true, true), ("disabled", false, true)]);
    assert_eq!(post(&ingest, WRITE_KEY).await, 200);
    assert_eq!(post(&ingest, DISABLED_KEY).await, 403);

    let created = c
        .create_source(CreateSourceRequest {
            id: "web".into(),
            name: "Website".into(),
            write_key: None,
            write_secret: None,
            settings: Some(SourceSettings {
                atomic_publish: true,
                rate_limit_per_second: 100.0,
                rate_limit_burst: 200,
            }),
        })
        .await
        .expect("create")
        .into_inner();
    let key = created.write_key.clone();
    let secret = created.write_secret.clone();
    assert!(
        key.len() >= 32 && secret.len() >= 32,
        "generated: {key} {secret}"
    );
    let source = created.source.expect("source");
    assert_eq!(
        (source.id.as_str(), source.name.as_str(), source.enabled),
        ("web", "Website", true)
    );
    assert!(source.has_write_secret && !source.from_config);
    assert_eq!(source.settings.expect("settings").rate_limit_burst, 200);
    // Read-your-writes on the replica that served the call; the contract is a second.
    wait_status(&ingest, &key, 200, "the new key works").await;

    // Stored hashed: neither the key nor the secret is in the bucket.
    let kv = nats
        .jetstream()
        .await
        .get_key_value("herald-config")
        .await
        .expect("config bucket");
    let stored = kv.get("sources.web").await.expect("get").expect("stored");
    let stored = String::from_utf8(stored.to_vec()).expect("JSON");
    assert!(!stored.contains(&key), "{stored}");
    assert!(!stored.contains(&secret), "{stored}");
    assert!(stored.contains(&sha256_hex(key.as_bytes())), "{stored}");
    assert!(stored.contains(r#""schema":1"#), "{stored}");
    for s in ["sources.acceptance", "sources.disabled"] {
        let v = kv.get(s).await.expect("get").expect("seeded");
        let v = String::from_utf8(v.to_vec()).expect("JSON");
        assert!(!v.contains(WRITE_KEY) && !v.contains(DISABLED_KEY), "{v}");
    }

    let got = c
        .get_source(GetSourceRequest { id: "web".into() })
        .await
        .expect("get")
        .into_inner()
        .source
        .expect("source");
    assert_eq!(got.name, "Website");
    assert!(got.settings.expect("settings").atomic_publish);
    assert!(got.created_at.is_some() && got.updated_at.is_some());

    // Refusals say what is wrong.
    let again = create(&mut c, "web").await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let taken = c
        .create_source(CreateSourceRequest {
            id: "other".into(),
            write_key: Some(WRITE_KEY.into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert!(taken.message().contains("in use"), "{taken:?}");
    let bad = create(&mut c, "bad.id").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let missing = c
        .get_source(GetSourceRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(
        missing.message().contains("herald sources list"),
        "{missing:?}"
    );

    // A chosen key (e.g. the one an SDK already sends) is accepted as is.
    let chosen = c
        .create_source(CreateSourceRequest {
            id: "ios".into(),
            write_key: Some("ios-chosen-write-key".into()),
            write_secret: Some("ios-chosen-secret".into()),
            ..Default::default()
        })
        .await
        .expect("create with a chosen key")
        .into_inner();
    assert_eq!(chosen.write_key, "ios-chosen-write-key");
    assert_eq!(chosen.write_secret, "ios-chosen-secret");
    wait_status(&ingest, "ios-chosen-write-key", 200, "the chosen key works").await;

    let rotated = rotate(&mut c, "web").await;
    assert_ne!(rotated.write_key, key);
    assert_ne!(rotated.write_secret, secret);
    wait_status(&ingest, &key, 401, "the old key stops working").await;
    wait_status(&ingest, &rotated.write_key, 200, "the new key works").await;
    let new_key = rotated.write_key;

    let disabled = c
        .disable_source(DisableSourceRequest { id: "web".into() })
        .await
        .expect("disable")
        .into_inner()
        .source
        .expect("source");
    assert!(!disabled.enabled);
    wait_status(&ingest, &new_key, 403, "a disabled source gets 403").await;
    c.enable_source(EnableSourceRequest { id: "web".into() })
        .await
        .expect("enable");
    wait_status(&ingest, &new_key, 200, "an enabled source works again").await;

    c.delete_source(DeleteSourceRequest { id: "web".into() })
        .await
        .expect("delete");
    wait_status(&ingest, &new_key, 401, "a deleted source's key gets 401").await;
    let gone = c
        .get_source(GetSourceRequest { id: "web".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let missing = c
        .delete_source(DeleteSourceRequest { id: "web".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let ids: Vec<String> = c
        .list_sources(ListSourcesRequest {})
        .await
        .expect("list")
        .into_inner()
        .sources
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, [SOURCE, "disabled", "ios"]);

    // A deleted id can be created again.
    create(&mut c, "web").await.expect("re-create");

    stop(&token, [ingest]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_follows_changes_within_a_second() {
    let nats = NatsServer::start().await.expect("nats-server");
    let token = CancellationToken::new();
    let a = start(&nats.url(), ingest_config(), &token).await;
    let b = start(&nats.url(), ingest_config(), &token).await;
    wait_ready(&[&a, &b]).await;
    let mut c = client(&a).await;

    let created = create(&mut c, "app").await.expect("create");
    wait_status(&b, &created.write_key, 200, "replica B accepts the new key").await;

    let rotated = rotate(&mut c, "app").await;
    wait_status(&b, &created.write_key, 401, "replica B refuses the old key").await;
    wait_status(&b, &rotated.write_key, 200, "replica B accepts the new key").await;

    c.disable_source(DisableSourceRequest { id: "app".into() })
        .await
        .expect("disable");
    wait_status(
        &b,
        &rotated.write_key,
        403,
        "replica B sees the source disabled",
    )
    .await;
    // A config source disabled through the API too.
    c.disable_source(DisableSourceRequest { id: SOURCE.into() })
        .await
        .expect("disable");
    wait_status(
        &b,
        WRITE_KEY,
        403,
        "replica B sees the config source disabled",
    )
    .await;

    c.delete_source(DeleteSourceRequest { id: "app".into() })
        .await
        .expect("delete");
    wait_status(
        &b,
        &rotated.write_key,
        401,
        "replica B forgets the deleted source",
    )
    .await;

    // Replica B's API sees A's changes too (it reads the bucket).
    let on_b = client(&b)
        .await
        .get_source(GetSourceRequest { id: SOURCE.into() })
        .await
        .expect("get on B")
        .into_inner()
        .source
        .expect("source");
    assert!(!on_b.enabled);

    stop(&token, [a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_survive_restarts_until_the_config_entry_changes() {
    let nats = NatsServer::start().await.expect("nats-server");
    let token = CancellationToken::new();
    let ingest = start(&nats.url(), ingest_config(), &token).await;
    wait_ready(&[&ingest]).await;
    let rotated = client(&ingest)
        .await
        .rotate_source_key(RotateSourceKeyRequest {
            id: SOURCE.into(),
            ..Default::default()
        })
        .await
        .expect("rotate the config source")
        .into_inner();
    stop(&token, [ingest]).await;

    // Same config: the rotation holds; the config file's old key stays refused.
    let token = CancellationToken::new();
    let ingest = start(&nats.url(), ingest_config(), &token).await;
    wait_ready(&[&ingest]).await;
    assert_eq!(post(&ingest, WRITE_KEY).await, 401);
    assert_eq!(post(&ingest, &rotated.write_key).await, 200);
    stop(&token, [ingest]).await;

    // A changed config entry wins.
    let mut cfg = ingest_config();
    cfg.sources[0].write_key = herald_common::Secret("acceptance-key-from-config-2".into());
    let token = CancellationToken::new();
    let ingest = start(&nats.url(), cfg, &token).await;
    wait_ready(&[&ingest]).await;
    assert_eq!(post(&ingest, "acceptance-key-from-config-2").await, 200);
    assert_eq!(post(&ingest, &rotated.write_key).await, 401);
    stop(&token, [ingest]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_503_until_sources_are_loaded() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    nats.stop().await;
    let token = CancellationToken::new();
    let ingest = start(&nats.url(), ingest_config(), &token).await;
    let res = reqwest::Client::new()
        .post(format!("http://{}/v1/batch", ingest.http))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&segment_batch(vec![segment_track("u1", 1)]))
        .send()
        .await
        .expect("HTTP answer");
    assert_eq!(res.status(), 503, "a key may be valid: retry, don't drop");
    assert!(res.headers().contains_key("retry-after"));
    let readyz = reqwest::get(format!("http://{}/readyz", ingest.handle.admin_addr))
        .await
        .expect("admin")
        .text()
        .await
        .expect("body");
    assert!(readyz.contains("sources loaded"), "{readyz}");
    let unavailable = client(&ingest)
        .await
        .list_sources(ListSourcesRequest {})
        .await
        .unwrap_err();
    assert_eq!(unavailable.code(), Code::Unavailable, "{unavailable:?}");

    nats.restart().await.expect("nats-server restarts");
    wait_ready(&[&ingest]).await;
    assert_eq!(post(&ingest, WRITE_KEY).await, 200);
    stop(&token, [ingest]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_still_arrive_after_nats_restarts() {
    let mut nats = NatsServer::start().await.expect("nats-server");
    let token = CancellationToken::new();
    let a = start(&nats.url(), ingest_config(), &token).await;
    let b = start(&nats.url(), ingest_config(), &token).await;
    wait_ready(&[&a, &b]).await;

    nats.restart().await.expect("nats-server restarts");
    wait_ready(&[&a, &b]).await;
    // The first call after the restart may race the client's reconnect.
    let c = client(&a).await;
    wait_until(
        "the control API answers after the restart",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move { c.list_sources(ListSourcesRequest {}).await.is_ok() }
        },
    )
    .await
    .expect("answers");
    let mut c = c;
    let created = create(&mut c, "late").await.expect("create");
    wait_status(
        &b,
        &created.write_key,
        200,
        "replica B sees a change made after the restart",
    )
    .await;
    c.disable_source(DisableSourceRequest { id: "late".into() })
        .await
        .expect("disable");
    wait_status(&b, &created.write_key, 403, "and the next one").await;

    stop(&token, [a, b]).await;
}
