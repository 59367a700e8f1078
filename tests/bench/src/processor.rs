//! `herald-bench processor`: the processor's throughput on a preloaded events stream, against
//! two raw JetStream baselines over the same stored messages, in one run:
//!
//! 1. consume and publish: a pull consumer takes batches, each batch's messages are published
//!    pipelined to an output stream configured like the processed stream, and the inputs are
//!    acked after the PubAcks (the processor's discipline, without its work);
//! 2. the same, plus one KV read and one KV compare-and-set write per event (a profile-sized
//!    JSON value keyed by the event's user, in a bucket configured like the profiles bucket);
//!    a batch's users are handled concurrently, each user's events in order.
//!
//! Then the processor itself consumes until the processed stream holds every event. It runs
//! as a process of its own (`herald processor`, the `herald` binary found by
//! [`super::child::herald_binary`]),
//! as it is deployed, so the resident memory reported is the processor's alone (its sampled `VmRSS` and the kernel's
//! high-water mark `VmHWM`). A durable consumer that never reads keeps every preloaded event in
//! the (interest-retention) events stream for all three readers.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, Message};
use bytes::Bytes;
use futures_util::{FutureExt as _, StreamExt as _};
use herald_common::nats::ensure_stream;
use herald_common::{Topology, TopologyConfig};
use herald_processor::ProcessorConfig;
use herald_proto::v1::Event;
use prost::Message as _;
use serde_json::{Value, json};

use super::child::{ServiceChild, ServiceSpec, herald_binary};
use super::events::EventFactory;
use super::nats::BenchNats;
use super::report::{
    Counters, CpuMeter, Errors, Progress, cpu_summary, load_average, per_second, pid_status_mib,
    print_machine, print_summary, ratio, round3, samples, thousands,
};

/// The throughput target: the processor at least this share of the KV baseline.
const TARGET_RATIO: f64 = 0.6;
/// The memory target: resident memory within the cache cap plus 100 MB (in MiB).
const TARGET_RSS_HEADROOM_MIB: f64 = 100e6 / (1024.0 * 1024.0);
/// Preload publishers and their acks in flight each.
const PRELOAD_TASKS: u64 = 2;
const PRELOAD_WINDOW: usize = 512;
/// Batch and ack limits when the processor's config does not say.
const FALLBACK_BATCH: usize = 256;
const FALLBACK_MAX_ACK_PENDING: i64 = 20_000;

/// Options of `herald-bench processor`.
#[derive(Debug, clap::Args)]
pub struct ProcessorArgs {
    /// Distinct users the events belong to.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: u64,
    /// Events preloaded into the events stream (default: twice --users, so every user has an
    /// identify and a later event).
    #[arg(long, conflicts_with = "events_per_user")]
    pub events: Option<u64>,
    /// Events per user (repeat visitors): sets --events to --users times this.
    #[arg(long)]
    pub events_per_user: Option<u64>,
    /// Users whose events are interleaved at a time (default: every user, up to 100,000):
    /// with fewer, each user's events come closer together, so a batch holds several events
    /// of one user, as a visit does (e.g. --users 10000 --events-per-user 20
    /// --active-users 1000).
    #[arg(long)]
    pub active_users: Option<u64>,
    /// Memory cap of the processor's hot-profile cache, in MiB.
    #[arg(long, default_value_t = 256)]
    pub cache_mb: u64,
    /// Approximate encoded size of one event, in bytes.
    #[arg(long, default_value_t = 600)]
    pub event_bytes: usize,
    /// Longest the processor (and each baseline) may run, in seconds. A processor that has not
    /// processed every event by then is measured over what it did process (the events are
    /// laid out so that any stretch has the whole run's mix), and the report says so.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Skip both baselines: only the processor's rate and memory (quicker, for memory work).
    #[arg(long)]
    pub processor_only: bool,
    /// The processor's admin address at the first start (tests use it to make the port
    /// taken); by default a free loopback port.
    #[arg(long, hide = true)]
    pub processor_admin: Option<std::net::SocketAddr>,
    /// The `herald` binary that runs the processor (default: the `herald` beside this
    /// binary, else the first on PATH).
    #[arg(long, env = "HERALD_BIN", value_name = "PATH")]
    pub herald_bin: Option<PathBuf>,
}

/// Runs the benchmark and prints its report.
pub async fn run(args: ProcessorArgs) -> Result<()> {
    let users = args.users.max(1);
    let total = match args.events_per_user {
        Some(each) => users * each,
        None => args.events.unwrap_or(users * 2),
    };
    if total == 0 {
        bail!("--events must be at least 1");
    }
    let timeout = Duration::from_secs(args.timeout.max(1));
    let herald = herald_binary(args.herald_bin.as_deref())?;
    let nats = BenchNats::start().await?;
    print_machine(&nats.version);
    let load_before = load_average();
    let run_id = super::random_hex(4);
    let (topology, common) = super::common_config(&nats.url);
    let (processor_cfg, cache_applied) = processor_config(args.cache_mb)?;
    let batch = setting(&processor_cfg, "batch_size")
        .and_then(|v| v.as_u64())
        .map_or(FALLBACK_BATCH, |b| b as usize);
    let max_ack_pending = setting(&processor_cfg, "max_ack_pending")
        .and_then(|v| v.as_i64())
        .unwrap_or(FALLBACK_MAX_ACK_PENDING);

    let client = herald_common::nats::connect(&common.nats, "herald-bench").await?;
    let js = herald_common::nats::jetstream(client.clone(), &common.nats);
    // Ingest owns the events stream in production; here the bench creates it with the same
    // settings.
    ensure_stream(&js, topology.events_stream_config()).await?;
    super::hold_interest(&js, &topology.events_stream()).await?;

    eprintln!(
        "preloading {} events for {} users (about {} B each)",
        thousands(total),
        thousands(users),
        args.event_bytes
    );
    let mut factory = EventFactory::new(
        &run_id,
        users,
        total,
        topology.partitions(),
        &topology.config().prefix,
        args.event_bytes,
    );
    if let Some(active) = args.active_users {
        factory = factory.with_active_users(active);
    }
    let factory = Arc::new(factory);
    let cpu = CpuMeter::start(nats.pid());
    let preload = preload(&js, factory, total).await?;
    let preload_cpu = cpu.stop();
    let (stored, stored_bytes) = super::stream_state(&js, &topology.events_stream()).await?;
    if stored < total {
        bail!("the events stream holds {stored} of {total} preloaded events");
    }

    let reader = Reader {
        stream: topology.events_stream(),
        filter: topology.events_wildcard(),
        batch,
        max_ack_pending,
    };
    let baselines = if args.processor_only {
        None
    } else {
        let cpu = CpuMeter::start(nats.pid());
        let raw = baseline(&js, &reader, total, None, timeout).await?;
        let raw_cpu = cpu.stop();
        let cpu = CpuMeter::start(nats.pid());
        let kv = baseline(&js, &reader, total, Some(&topology), timeout).await?;
        let kv_cpu = cpu.stop();
        Some(((raw, raw_cpu), (kv, kv_cpu)))
    };

    let started = Instant::now();
    let mut child = ServiceChild::start(
        &ServiceSpec {
            herald: &herald,
            role: "processor",
            config: None,
            listeners: &["admin_addr"],
            extra_listeners: &["grpc_addr", "http_addr"],
            env: vec![(
                "HERALD__PROCESSOR__PROFILES__CACHE_MAX_BYTES".into(),
                (args.cache_mb * 1024 * 1024).to_string(),
            )],
            dir: nats.dir(),
            first_admin: args.processor_admin,
        },
        &common,
    )
    .await?;
    let cpu = CpuMeter::with_service(nats.pid(), child.pid());
    let run = watch_processor(&js, &topology, total, timeout, started, &mut child).await;
    let processor_cpu = cpu.stop();
    let rss_end = pid_status_mib(child.pid(), "VmRSS");
    let rss_hwm = pid_status_mib(child.pid(), "VmHWM");
    let counters = settled_counters(&child, run.processed).await;
    child.stop().await;
    let load_after = load_average();
    drop(client);
    if let Some(failure) = &run.failure {
        bail!("{failure}\n{}", child.log_tail());
    }

    let cache_mib = args.cache_mb as f64;
    let rss_peak = run.rss_peak.max(rss_end).max(rss_hwm);
    let processor_rate = run.events_per_s();
    let ratio_raw = baselines
        .as_ref()
        .map(|((raw, _), _)| ratio(processor_rate, raw.events_per_s()));
    let ratio_kv = baselines
        .as_ref()
        .map(|(_, (kv, _))| ratio(processor_rate, kv.events_per_s()));
    let rss_ok = cache_applied && rss_peak <= cache_mib + TARGET_RSS_HEADROOM_MIB;

    println!();
    println!(
        "herald-bench processor ({} events, {} users{}, {} B stored per event)",
        thousands(total),
        thousands(users),
        args.active_users
            .map(|a| format!(" ({} at a time)", thousands(a.clamp(1, users))))
            .unwrap_or_default(),
        stored_bytes / stored.max(1)
    );
    println!(
        "  preload (raw publish)          {:>9} ev/s   {}",
        thousands(preload.events_per_s() as u64),
        cpu_summary(&preload_cpu)
    );
    if let Some(((raw, raw_cpu), (kv, kv_cpu))) = &baselines {
        for (label, b, cpu) in [
            ("raw consume + publish", raw, raw_cpu),
            ("raw + KV read + KV CAS write", kv, kv_cpu),
        ] {
            println!(
                "  {label:<30} {:>9} ev/s   {}; errors: {}",
                thousands(b.events_per_s() as u64),
                cpu_summary(cpu),
                b.errors.summary()
            );
        }
    }
    println!(
        "  processor                      {:>9} ev/s   {}; {}{}",
        thousands(processor_rate as u64),
        match (ratio_raw, ratio_kv) {
            (Some(r), Some(k)) => format!("{r:.2} of consume+publish, {k:.2} of +KV"),
            _ => "baselines skipped (--processor-only)".into(),
        },
        cpu_summary(&processor_cpu),
        if run.complete {
            String::new()
        } else {
            format!(
                " (INCOMPLETE: {} of {} after {:.0} s, --timeout; the rate is over those)",
                run.processed,
                total,
                run.elapsed.as_secs_f64()
            )
        }
    );
    println!(
        "  processor startup to first output {:.2} s; resident memory of the processor process: peak {rss_peak:.0} MiB, {rss_end:.0} MiB at the end, with the cache capped at {} MiB{}",
        run.startup.as_secs_f64(),
        args.cache_mb,
        if cache_applied {
            ""
        } else {
            " (this processor has no cache setting: cap not applied)"
        }
    );
    if !counters.is_empty() {
        let list: Vec<String> = counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  processor counters: {}", list.join(", "));
    }
    println!(
        "  target: processor >= {TARGET_RATIO:.2} of the KV baseline: {}",
        match ratio_kv {
            Some(k) if k >= TARGET_RATIO => format!("met ({k:.2})"),
            Some(k) => format!("NOT met ({k:.2})"),
            None => "not measured (--processor-only)".into(),
        }
    );
    println!(
        "  target: resident memory <= cache cap + 100 MB ({:.0} MiB): {} ({rss_peak:.0} MiB, the processor process)",
        cache_mib + TARGET_RSS_HEADROOM_MIB,
        if rss_ok { "met" } else { "NOT met" }
    );
    let fields = json!({
        "users": users,
        "events": total,
        "active_users": args.active_users,
        "stored_bytes_per_event": stored_bytes / stored.max(1),
        "batch": batch,
        "preload": {"events_per_s": round3(preload.events_per_s()), "cpu_cores": preload_cpu},
        "raw_consume_publish": baselines.as_ref().map(|((b, cpu), _)| b_json(b, cpu.clone())),
        "raw_consume_kv_publish": baselines.as_ref().map(|(_, (b, cpu))| b_json(b, cpu.clone())),
        "processor": {
            "events_per_s": round3(processor_rate),
            "processed": run.processed,
            "complete": run.complete,
            "startup_s": round3(run.startup.as_secs_f64()),
            "elapsed_s": round3(run.elapsed.as_secs_f64()),
            "cache_mb": args.cache_mb,
            "cache_cap_applied": cache_applied,
            "rss_peak_mb": rss_peak,
            "rss_end_mb": rss_end,
            "cpu_cores": processor_cpu,
            "counters": counters,
        },
        "ratio_to_raw": ratio_raw,
        "ratio_to_kv": ratio_kv,
        "targets": {
            "ratio_to_kv_min": TARGET_RATIO,
            "ratio_met": ratio_kv.map(|k| k >= TARGET_RATIO),
            "rss_max_mb": cache_mib + TARGET_RSS_HEADROOM_MIB,
            "rss_met": rss_ok,
        },
    });
    print_summary("processor", &nats.version, load_before, load_after, fields);
    nats.stop().await;
    Ok(())
}

/// The processor's config: the defaults on loopback ports, with the hot-profile cache capped
/// at `cache_mb` where this processor has the setting (`profiles.cache_max_bytes`). Returns
/// whether the cap was applied.
fn processor_config(cache_mb: u64) -> Result<(ProcessorConfig, bool)> {
    let cfg = super::on_loopback(&ProcessorConfig::default())?;
    let mut v = serde_json::to_value(&cfg)?;
    let applied = match v.pointer_mut("/profiles/cache_max_bytes") {
        Some(cap) => {
            *cap = json!(cache_mb * 1024 * 1024);
            true
        }
        None => false,
    };
    Ok((serde_json::from_value(v)?, applied))
}

/// The processor's counters once they count every event seen published (`processed`), or
/// after 5 s. A run published early is counted after its profile write lands, so the last
/// outputs can arrive a moment before their count.
async fn settled_counters(
    child: &ServiceChild,
    processed: u64,
) -> std::collections::BTreeMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counters = match child.metrics().await {
            Ok(text) => processor_counters(&text),
            Err(e) => {
                eprintln!("could not read the processor's metrics: {e:#}");
                return Default::default();
            }
        };
        if counters.get("events_total").copied().unwrap_or(0) >= processed
            || Instant::now() >= deadline
        {
            return counters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The processor's own counters from the process's Prometheus exposition: every
/// `herald_processor_*_total` summed over its labels, and the cache size, named without the
/// `herald_processor_` prefix. Whatever the processor counts today shows up.
fn processor_counters(exposition: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for (name, _, value) in samples(exposition) {
        let Some(short) = name.strip_prefix("herald_processor_") else {
            continue;
        };
        if short.ends_with("_total") || short == "profile_cache_bytes" {
            *out.entry(short.to_string()).or_default() += value as u64;
        }
    }
    out
}

/// A top-level setting of the processor's config, by name.
fn setting(cfg: &ProcessorConfig, key: &str) -> Option<Value> {
    serde_json::to_value(cfg).ok()?.get(key).cloned()
}

fn b_json(b: &Baseline, cpu: Value) -> Value {
    json!({
        "cpu_cores": cpu,
        "events_per_s": round3(b.events_per_s()),
        "events": b.done,
        "elapsed_s": round3(b.elapsed.as_secs_f64()),
        "errors": b.errors.json(),
    })
}

/// How fast something went.
struct Throughput {
    done: u64,
    elapsed: Duration,
}

impl Throughput {
    fn events_per_s(&self) -> f64 {
        per_second(self.done, self.elapsed)
    }
}

/// Publishes `total` events from the factory, pipelined.
async fn preload(
    js: &jetstream::Context,
    factory: Arc<EventFactory>,
    total: u64,
) -> Result<Throughput> {
    let progress = Progress::start("preload", String::new);
    let counters = progress.counters();
    let started = Instant::now();
    let tasks: Vec<_> = (0..PRELOAD_TASKS)
        .map(|t| {
            let (js, factory, counters) = (js.clone(), factory.clone(), counters.clone());
            tokio::spawn(async move {
                let mut in_flight = std::collections::VecDeque::with_capacity(PRELOAD_WINDOW);
                let mut n = t;
                let mut failed = 0u64;
                while n < total || !in_flight.is_empty() {
                    if n < total && in_flight.len() < PRELOAD_WINDOW {
                        let (subject, id, payload) = factory.event(n);
                        n += PRELOAD_TASKS;
                        match js
                            .send_publish(
                                subject,
                                PublishMessage::build().payload(payload).message_id(id),
                            )
                            .await
                        {
                            Ok(ack) => in_flight.push_back(ack),
                            Err(_) => failed += 1,
                        }
                        continue;
                    }
                    if let Some(ack) = in_flight.pop_front() {
                        match ack.await {
                            Ok(_) => counters.done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => {
                                failed += 1;
                                counters.errors.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(1);
    }
    let elapsed = started.elapsed();
    progress.finish().await;
    if failed > 0 {
        bail!("{failed} preload publishes failed");
    }
    Ok(Throughput {
        done: total,
        elapsed,
    })
}

/// Where and how the baselines read.
struct Reader {
    stream: String,
    filter: String,
    batch: usize,
    max_ack_pending: i64,
}

/// What a baseline reached.
struct Baseline {
    done: u64,
    elapsed: Duration,
    errors: Errors,
}

impl Baseline {
    fn events_per_s(&self) -> f64 {
        Throughput {
            done: self.done,
            elapsed: self.elapsed,
        }
        .events_per_s()
    }
}

/// Runs one baseline over every preloaded event: with `kv_topology`, the KV variant. Its
/// consumer, output stream and bucket are deleted afterwards.
async fn baseline(
    js: &jetstream::Context,
    reader: &Reader,
    total: u64,
    kv_topology: Option<&Topology>,
    timeout: Duration,
) -> Result<Baseline> {
    let (name, label) = match kv_topology {
        None => ("BENCH_OUT_RAW", "consume+publish"),
        Some(_) => ("BENCH_OUT_KV", "consume+KV+publish"),
    };
    let durable = name.to_lowercase().replace('_', "-");
    let out_prefix = durable.clone();
    let topology = Topology::new(TopologyConfig::default());
    super::create_stream_like(
        js,
        topology.processed_stream_config(),
        name,
        &out_prefix,
        "baseline output",
    )
    .await?;
    let bucket = match kv_topology {
        Some(t) => Some(
            js.create_key_value(kv::Config {
                bucket: format!("{}-bench-profiles", t.config().prefix),
                description: "herald-bench: KV baseline".into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: t.config().replicas,
                ..Default::default()
            })
            .await
            .context("creating the KV baseline bucket")?,
        ),
        None => None,
    };
    let consumer = js
        .get_stream(&reader.stream)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(durable.clone()),
            description: Some("herald-bench: baseline reader".into()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: reader.max_ack_pending,
            filter_subject: reader.filter.clone(),
            ..Default::default()
        })
        .await
        .context("creating a baseline consumer")?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(reader.batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;

    let progress = Progress::start(label, String::new);
    let counters = progress.counters();
    let mut errors = Errors::default();
    let deadline = Instant::now() + timeout;
    let mut started = None;
    while counters.done.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        let first = match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                errors.add(format!("pull_{:?}", e.kind()).to_lowercase());
                continue;
            }
            Ok(None) => bail!("the baseline's message stream ended"),
            Err(_) => continue,
        };
        started.get_or_insert_with(Instant::now);
        let mut batch = vec![first];
        while batch.len() < reader.batch {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        let outcome = match &bucket {
            Some(kv) => kv_work(kv, &batch).await,
            None => Ok(()),
        };
        if let Err(e) = outcome {
            errors.add(e);
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        match publish_batch(js, &out_prefix, &batch).await {
            Ok(()) => {
                for m in &batch {
                    if m.ack().await.is_err() {
                        errors.add("ack");
                    }
                }
                counters
                    .done
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // Left unacked: redelivered after the ack wait, and counted then.
                errors.add(e);
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    progress.finish().await;
    drop(messages);
    let done = counters.done.load(Ordering::Relaxed);
    let stream = js.get_stream(&reader.stream).await?;
    let _ = stream.delete_consumer(&durable).await;
    let _ = js.delete_stream(name).await;
    if let Some(t) = kv_topology {
        let _ = js
            .delete_key_value(format!("{}-bench-profiles", t.config().prefix))
            .await;
    }
    if done < total {
        bail!("the {label} baseline handled {done} of {total} events within the timeout");
    }
    Ok(Baseline {
        done,
        elapsed,
        errors,
    })
}

/// Publishes every message of the batch to the output stream (same partition, same message
/// id), pipelined, and waits for all PubAcks.
pub(crate) async fn publish_batch(
    js: &jetstream::Context,
    prefix: &str,
    batch: &[Message],
) -> Result<(), String> {
    let mut acks = Vec::with_capacity(batch.len());
    for m in batch {
        let partition = m.subject.rsplit('.').next().unwrap_or("0");
        let mut publish = PublishMessage::build().payload(m.payload.clone());
        if let Some(id) = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            publish = publish.message_id(id.as_str());
        }
        let ack = js
            .send_publish(format!("{prefix}.{partition}"), publish)
            .await
            .map_err(|e| format!("publish_{:?}", e.kind()).to_lowercase())?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await
            .map_err(|e| format!("puback_{:?}", e.kind()).to_lowercase())?;
    }
    Ok(())
}

/// One KV read and one compare-and-set write per event: a batch's users concurrently, each
/// user's events in order.
async fn kv_work(kv: &kv::Store, batch: &[Message]) -> Result<(), String> {
    let mut by_user: Vec<(String, Vec<Event>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for m in batch {
        let event = Event::decode(m.payload.as_ref()).map_err(|_| "decode".to_string())?;
        let key = event.partition_key.clone();
        let slot = *index.entry(key.clone()).or_insert_with(|| {
            by_user.push((key, Vec::new()));
            by_user.len() - 1
        });
        by_user[slot].1.push(event);
    }
    let results =
        futures_util::future::join_all(by_user.into_iter().map(|(key, events)| async move {
            for event in events {
                update_profile(kv, &key, &event).await?;
            }
            Ok::<(), String>(())
        }))
        .await;
    results.into_iter().collect()
}

/// Reads the user's profile-sized record and writes it back with compare-and-set (create
/// when absent), retrying on a conflict.
async fn update_profile(kv: &kv::Store, key: &str, event: &Event) -> Result<(), String> {
    // KV keys allow letters, digits, `-`, `_`, `=` and `.` (partition keys here are safe).
    for _ in 0..10 {
        let entry = kv
            .entry(key)
            .await
            .map_err(|e| format!("kv_get_{:?}", e.kind()).to_lowercase())?;
        let mut profile = match &entry {
            Some(e) => serde_json::from_slice::<Value>(&e.value).map_err(|_| "kv_value")?,
            None => json!({
                "schema_version": 1,
                "id": key,
                "identities": [
                    {"type": "user_id", "value": event.user_id},
                    {"type": "anonymous_id", "value": event.anonymous_id},
                ],
                "traits": {},
                "event_count": 0,
            }),
        };
        if !event.traits.is_empty()
            && let Ok(Value::Object(traits)) = serde_json::from_slice::<Value>(&event.traits)
        {
            for (k, v) in traits {
                profile["traits"][k] =
                    json!({"value": v, "at": event.timestamp.map(|t| t.seconds)});
            }
        }
        profile["event_count"] = json!(profile["event_count"].as_u64().unwrap_or(0) + 1);
        profile["last_seen"] = json!(event.timestamp.map(|t| t.seconds));
        let value = Bytes::from(serde_json::to_vec(&profile).map_err(|_| "encode")?);
        let written = match entry {
            Some(e) => kv.update(key, value, e.revision).await.map_err(|e| {
                (e.kind() == UpdateErrorKind::WrongLastRevision)
                    .then_some(())
                    .ok_or_else(|| format!("kv_update_{:?}", e.kind()).to_lowercase())
            }),
            None => kv.create(key, value).await.map_err(|e| {
                (e.kind() == CreateErrorKind::AlreadyExists)
                    .then_some(())
                    .ok_or_else(|| format!("kv_create_{:?}", e.kind()).to_lowercase())
            }),
        };
        match written {
            Ok(_) => return Ok(()),
            Err(Ok(())) => continue, // lost a race: read again
            Err(Err(e)) => return Err(e),
        }
    }
    Err("kv_conflicts".into())
}

/// What the processor reached.
struct ProcessorRun {
    processed: u64,
    complete: bool,
    startup: Duration,
    elapsed: Duration,
    rss_peak: f64,
    /// Why the run ended early, when the processor process died.
    failure: Option<String>,
}

impl ProcessorRun {
    fn events_per_s(&self) -> f64 {
        per_second(self.processed, self.elapsed)
    }
}

/// Polls the processed stream until it holds `total` messages (or `timeout`), sampling the
/// process's resident memory. The rate is counted from the first output on.
async fn watch_processor(
    js: &jetstream::Context,
    topology: &Topology,
    total: u64,
    timeout: Duration,
    started: Instant,
    child: &mut ServiceChild,
) -> ProcessorRun {
    let pid = child.pid();
    let progress = Progress::start("processor", move || {
        format!("  rss {:.0} MiB", pid_status_mib(pid, "VmRSS"))
    });
    let counters: Arc<Counters> = progress.counters();
    let stream = topology.processed_stream();
    let deadline = Instant::now() + timeout;
    let mut first_output = None;
    let mut rss_peak: f64 = 0.0;
    let mut processed = 0;
    let mut failure = None;
    while processed < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(status) = child.exited() {
            failure = Some(format!("the processor process exited ({status})"));
            break;
        }
        rss_peak = rss_peak.max(pid_status_mib(pid, "VmRSS"));
        if let Ok((msgs, _)) = super::stream_state(js, &stream).await {
            processed = msgs;
            counters.done.store(msgs, Ordering::Relaxed);
            if msgs > 0 {
                first_output.get_or_insert_with(Instant::now);
            }
        }
    }
    progress.finish().await;
    let first = first_output.unwrap_or(started);
    ProcessorRun {
        processed,
        complete: processed >= total,
        startup: first - started,
        elapsed: first.elapsed(),
        rss_peak,
        failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processor_config_is_on_loopback() {
        let (cfg, _) = processor_config(64).expect("config");
        let v = serde_json::to_value(&cfg).expect("serialises");
        for (key, value) in v.as_object().expect("object") {
            if key.ends_with("_addr") {
                assert_eq!(value, "127.0.0.1:0", "{key}");
            }
        }
        assert!(setting(&cfg, "no_such_setting").is_none());
    }

    #[test]
    fn processor_counters_are_summed_over_labels() {
        let text = "# HELP herald_processor_events_total x\n\
                    herald_processor_events_total{outcome=\"ok\"} 5\n\
                    herald_processor_events_total{outcome=\"suppressed\"} 2\n\
                    herald_processor_profile_cache_bytes 1024\n\
                    herald_processor_batch_duration_seconds_sum 0.5\n\
                    herald_ingest_requests_total 9\n";
        let c = processor_counters(text);
        assert_eq!(c.get("events_total"), Some(&7));
        assert_eq!(c.get("profile_cache_bytes"), Some(&1024));
        assert_eq!(c.len(), 2);
    }
}
