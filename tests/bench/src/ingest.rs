//! `herald-bench ingest`: Segment batches over HTTP against Herald ingest, and raw pipelined
//! JetStream publishing of the same events, in one run against one nats-server.
//!
//! Phases, each `--duration` seconds:
//! 1. raw: the stored form of ingest's own events (read back from the events stream after a
//!    warm-up request), published with async-nats, `--raw-window` acks in flight, to a fresh
//!    stream with the events stream's settings;
//!
//!    Then (unless `--flat-out`) raw at the fixed rate of phase 3 on the same stream: groups of
//!    `--batch` messages, each pipelined and timed from its first publish to its last PubAck:
//!    the server's own latency floor for a request's worth;
//! 2. ingest flat out: `--connections` clients, each posting its next batch as soon as the
//!    last one is answered;
//! 3. ingest at a fixed offered rate: `--rate`, or half of what raw publishing reached.
//!
//! Both streams have a durable consumer that never reads (interest retention stores messages
//! only while a consumer is interested), and both are purged between phases.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::Subject;
use async_nats::jetstream::{self, message::PublishMessage};
use herald_common::{Secret, Topology, telemetry};
use herald_ingest::{IngestConfig, SourceConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::events::{RawTemplate, SOURCE_ID, SegmentBatches};
use super::nats::BenchNats;
use super::report::{
    CLIENT_THREADS, Counters, CpuMeter, Errors, Latency, Progress, counter_by_label, cpu_summary,
    load_average, per_second, print_machine, print_summary, ratio, round3, thousands,
};

/// The throughput target: ingest at least this share of raw publishing.
const TARGET_RATIO: f64 = 0.6;
/// The latency target: 2xx p99 below this at half the raw rate.
const TARGET_P99_MS: f64 = 20.0;
/// Tasks publishing in the raw baseline (the window is split between them).
const RAW_TASKS: usize = 2;
/// Distinct request bodies (they differ in users).
const TEMPLATES: usize = 64;
/// Requests sent before measuring, to open connections and warm caches.
const WARMUP_REQUESTS: u64 = 200;
/// Where raw publishes go.
const RAW_STREAM: &str = "BENCH_RAW_EVENTS";
const RAW_SUBJECT_PREFIX: &str = "bench-raw.events";

/// Options of `herald-bench ingest`.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Offered load in events per second; without it (and without --flat-out) ingest runs flat
    /// out and then at half the raw publish rate.
    #[arg(long, conflicts_with = "flat_out")]
    pub rate: Option<u64>,
    /// Only the flat-out run (no fixed-rate run).
    #[arg(long)]
    pub flat_out: bool,
    /// Without --rate: the fixed-rate run offers this share of the raw publish rate (the
    /// latency target is read at 0.5; 0.3 is half of the 0.60 throughput target).
    #[arg(long, default_value_t = 0.5, conflicts_with = "rate")]
    pub fixed_share: f64,
    /// Seconds each measured phase lasts.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Approximate size of one event's JSON, in bytes.
    #[arg(long, default_value_t = 600)]
    pub event_bytes: usize,
    /// Concurrent HTTP connections (requests in flight).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Publish acknowledgements in flight in the raw baseline.
    #[arg(long, default_value_t = 1024)]
    pub raw_window: usize,
    /// Write each HTTP phase's requests (send time, latency) to `flat-out.tsv` and
    /// `fixed-rate.tsv` in this directory, to see when slow requests happen.
    #[arg(long)]
    pub trace_dir: Option<std::path::PathBuf>,
    /// The bench's source stores each request all-or-nothing with JetStream atomic batch
    /// publish (`atomic_publish`), one PubAck per request instead of one per event.
    #[arg(long)]
    pub atomic: bool,
}

/// Runs the benchmark and prints its report.
pub async fn run(args: IngestArgs) -> Result<()> {
    if args.batch == 0 || args.connections == 0 || args.duration == 0 {
        bail!("--batch, --connections and --duration must be at least 1");
    }
    if !(args.fixed_share > 0.0 && args.fixed_share <= 1.0) {
        bail!(
            "--fixed-share must be above 0 and at most 1 (got {}); 0.5 is half the raw rate",
            args.fixed_share
        );
    }
    let nats = BenchNats::start().await?;
    print_machine(&nats.version);
    let load_before = load_average();
    let run_id = super::random_hex(4);
    let write_key = super::random_hex(16);
    let (topology, common) = super::common_config(&nats.url);
    let ingest_cfg = super::on_loopback(&IngestConfig {
        sources: vec![SourceConfig {
            id: SOURCE_ID.into(),
            name: "herald-bench".into(),
            write_key: Secret(write_key.clone()),
            atomic_publish: args.atomic,
            ..Default::default()
        }],
        ..Default::default()
    })?;
    let shutdown = CancellationToken::new();
    let ingest = herald_ingest::start(&common, &ingest_cfg, telemetry::metrics(), shutdown.clone())
        .await
        .context("starting ingest")?;
    super::wait_ready("ingest", ingest.admin_addr).await?;
    let http_addr = ingest.http_addr.context("ingest serves HTTP")?;

    let client = herald_common::nats::connect(&common.nats, "herald-bench").await?;
    let js = herald_common::nats::jetstream(client.clone(), &common.nats);
    let events_stream = topology.events_stream();
    super::hold_interest(&js, &events_stream).await?;

    let batches = Arc::new(SegmentBatches::new(
        &run_id,
        args.batch,
        args.event_bytes,
        TEMPLATES,
    ));
    // The HTTP client runs on threads of its own, so its CPU time is reported apart from
    // ingest's.
    let client_rt = ClientRuntime::start()?;
    if let Some(dir) = &args.trace_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --trace-dir {}", dir.display()))?;
    }
    let http = Arc::new(Http::new(
        format!("http://{http_addr}/v1/batch"),
        write_key,
        args.connections,
        args.batch,
        batches.clone(),
        client_rt.handle(),
        args.trace_dir.clone(),
    )?);
    eprintln!(
        "ingest at http://{http_addr}; {} events of {} B per request ({} B), {} connections",
        args.batch,
        batches.event_bytes(),
        batches.body_bytes(),
        args.connections
    );

    // Request 0 is stored first: its events, read back, are the raw baseline's payloads.
    let status = {
        let http = http.clone();
        http.rt
            .clone()
            .spawn(async move { http.post(http.next_seq()).await })
            .await?
    };
    if status != Ok(200) {
        bail!("the first request to ingest failed: {status:?}");
    }
    let templates = Arc::new(raw_templates(&js, &events_stream, &run_id, args.batch).await?);
    let nats_pid = nats.pid();
    let warm = flat_out(
        &http,
        Duration::from_secs(3600),
        Some(WARMUP_REQUESTS),
        "warm-up",
        nats_pid,
    )
    .await;
    if warm.ok_requests == 0 {
        bail!(
            "ingest accepted no warm-up request: {}",
            warm.errors.summary()
        );
    }

    let duration = Duration::from_secs(args.duration);
    // The raw floor of the fixed-rate phase, at the same rate.
    let raw_fixed = (!args.flat_out).then_some(RawFixed {
        rate: args.rate.map(|r| r as f64),
        share: args.fixed_share,
        batch: args.batch,
        in_flight: args.connections,
    });
    let raw_publisher = RawPublisher {
        js: js.clone(),
        templates,
        id_prefix: format!("{SOURCE_ID}:bench-{run_id}-").into(),
        seq: Arc::new(AtomicU64::new(1 << 40)),
    };
    let (raw, raw_floor) = raw_publish(
        &raw_publisher,
        &topology,
        args.raw_window,
        duration,
        nats_pid,
        raw_fixed,
    )
    .await?;
    let raw_rate = raw.events_per_s();

    let mut flat = None;
    if args.rate.is_none() {
        js.get_stream(&events_stream).await?.purge().await?;
        let mut r = flat_out(&http, duration, None, "ingest flat out", nats_pid).await;
        r.stored_bytes = avg_stored(&js, &events_stream).await;
        flat = Some(r);
    }
    let mut fixed = None;
    if !args.flat_out {
        let rate = args.rate.map_or(raw_rate * args.fixed_share, |r| r as f64);
        if rate >= args.batch as f64 {
            js.get_stream(&events_stream).await?.purge().await?;
            let label = format!("ingest at {} ev/s", thousands(rate as u64));
            let mut r = fixed_rate(&http, rate, duration, &label, nats_pid).await;
            r.stored_bytes = avg_stored(&js, &events_stream).await;
            fixed = Some(r);
        } else {
            eprintln!("skipping the fixed-rate run: {rate:.0} ev/s is under one batch a second");
        }
    }
    let load_after = load_average();
    // With --atomic: how ingest stored the requests (committed atomically, or each fallback).
    let atomic_batches = if args.atomic {
        let url = format!("http://{}/metrics", ingest.admin_addr);
        let text = async { reqwest::get(&url).await?.error_for_status()?.text().await };
        match text.await {
            Ok(text) => Some(counter_by_label(
                &text,
                herald_ingest::events::ATOMIC_BATCHES_TOTAL,
                "outcome",
            )),
            Err(e) => {
                eprintln!("could not read ingest's metrics at {url}: {e}");
                None
            }
        }
    } else {
        None
    };

    shutdown.cancel();
    let _ = ingest.task.await;
    drop(client);

    let ingest_rate = flat
        .as_ref()
        .or(fixed.as_ref())
        .map_or(0.0, |r| r.events_per_s());
    let throughput_ratio = ratio(ingest_rate, raw_rate);
    let half_rate_run = fixed
        .as_ref()
        .filter(|_| args.rate.is_none() && args.fixed_share == 0.5);
    println!();
    println!("herald-bench ingest ({}s per phase)", args.duration);
    println!(
        "  raw JetStream publish  {:>9} ev/s   {} acks in flight, {} B stored per message; {}; errors: {}",
        thousands(raw_rate as u64),
        args.raw_window,
        raw.stored_bytes,
        cpu_summary(&raw.cpu),
        raw.errors.summary()
    );
    if let Some(g) = &raw_floor {
        println!(
            "  {:<22} {:>9} ev/s   groups of {} pipelined, {} at once; group {}; {}; errors: {}",
            format!("raw at {} ev/s", thousands(g.rate as u64)),
            thousands(g.groups * args.batch as u64 / args.duration.max(1)),
            args.batch,
            args.connections,
            g.latency.summary(),
            cpu_summary(&g.cpu),
            g.errors.summary()
        );
    }
    for r in flat.iter().chain(fixed.iter()) {
        println!(
            "  {:<22} {:>9} ev/s   {:.2} of raw; 2xx {}; {}; errors: {}",
            r.label,
            thousands(r.events_per_s() as u64),
            ratio(r.events_per_s(), raw_rate),
            r.latency.summary(),
            cpu_summary(&r.cpu),
            r.errors.summary()
        );
        if let Some(offered) = r.offered {
            println!(
                "  {:<22} offered {} ev/s; p99 from the scheduled send time {:.2} ms",
                "",
                thousands(offered as u64),
                r.from_schedule.ms(0.99)
            );
        }
    }
    if flat.is_some() {
        println!(
            "  target: ingest >= {TARGET_RATIO:.2} of raw: {} ({throughput_ratio:.2})",
            if throughput_ratio >= TARGET_RATIO {
                "met"
            } else {
                "NOT met"
            },
        );
    }
    if let Some(r) = half_rate_run {
        let p99 = r.latency.ms(0.99);
        println!(
            "  target: 2xx p99 < {TARGET_P99_MS} ms at half the raw rate: {} ({p99:.2} ms)",
            if p99 < TARGET_P99_MS && r.ok_requests > 0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if let Some(batches) = &atomic_batches {
        let list: Vec<String> = batches
            .iter()
            .map(|(outcome, n)| format!("{outcome} {}", thousands(*n)))
            .collect();
        println!("  atomic batches (--atomic): {}", list.join(", "));
    }
    let fields = json!({
        "duration_s": args.duration,
        "batch": args.batch,
        "atomic_publish": args.atomic,
        "atomic_batches": atomic_batches,
        "event_json_bytes": batches.event_bytes(),
        "connections": args.connections,
        "fixed_share": args.rate.is_none().then_some(args.fixed_share),
        "raw": {
            "events_per_s": round3(raw_rate),
            "events": raw.acked,
            "acks_in_flight": args.raw_window,
            "stored_bytes_per_message": raw.stored_bytes,
            "cpu_cores": raw.cpu,
            "errors": raw.errors.json(),
        },
        "raw_fixed_rate": raw_floor.as_ref().map(RawGroups::json),
        "ingest_flat_out": flat.as_ref().map(|r| r.json(raw_rate)),
        "ingest_fixed_rate": fixed.as_ref().map(|r| r.json(raw_rate)),
        "ratio": throughput_ratio,
        "targets": {
            "ratio_min": TARGET_RATIO,
            "ratio_met": flat.as_ref().map(|_| throughput_ratio >= TARGET_RATIO),
            "p99_ms_max_at_half_raw": TARGET_P99_MS,
            "p99_met": half_rate_run.map(|r| r.latency.ms(0.99) < TARGET_P99_MS && r.ok_requests > 0),
        },
    });
    print_summary("ingest", &nats.version, load_before, load_after, fields);
    nats.stop().await;
    Ok(())
}

/// Reads request 0's events back from the events stream: the raw baseline publishes exactly
/// these payloads (with fresh ids) to the same partition numbers.
async fn raw_templates(
    js: &jetstream::Context,
    stream: &str,
    run_id: &str,
    batch: usize,
) -> Result<Vec<RawTemplate>> {
    let stream = js.get_stream(stream).await?;
    let mut templates = Vec::with_capacity(batch);
    for seq in 1..=batch as u64 {
        let msg = stream
            .get_raw_message(seq)
            .await
            .with_context(|| format!("reading back stored event {seq}"))?;
        let partition = msg.subject.rsplit('.').next().unwrap_or("0");
        let subject = Subject::from(format!("{RAW_SUBJECT_PREFIX}.{partition}"));
        let counter = msg
            .headers
            .get("Nats-Msg-Id")
            .and_then(|id| {
                let id = id.as_str();
                id.strip_prefix(&format!("{SOURCE_ID}:bench-{run_id}-"))
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            })
            .with_context(|| format!("stored event {seq} has no bench message id"))?;
        let template = RawTemplate::new(subject, msg.payload.to_vec(), counter)
            .with_context(|| format!("stored event {seq} does not contain its message id"))?;
        templates.push(template);
    }
    Ok(templates)
}

/// Average stored bytes per message of a stream (subject, headers and payload).
async fn avg_stored(js: &jetstream::Context, stream: &str) -> u64 {
    match super::stream_state(js, stream).await {
        Ok((msgs, bytes)) if msgs > 0 => bytes / msgs,
        _ => 0,
    }
}

/// What the raw baseline reached.
struct RawRun {
    acked: u64,
    cpu: Value,
    elapsed: Duration,
    stored_bytes: u64,
    errors: Errors,
}

impl RawRun {
    fn events_per_s(&self) -> f64 {
        per_second(self.acked, self.elapsed)
    }
}

/// What the raw phases publish, and where: request 0's events with fresh message ids.
#[derive(Clone)]
struct RawPublisher {
    js: jetstream::Context,
    templates: Arc<Vec<RawTemplate>>,
    /// `<source>:bench-<run>-`: the message id before the counter.
    id_prefix: Arc<str>,
    /// The next message counter.
    seq: Arc<AtomicU64>,
}

impl RawPublisher {
    /// Sends the next message; its PubAck future.
    async fn send(&self) -> Result<jetstream::context::PublishAckFuture, String> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let t = &self.templates[(n % self.templates.len() as u64) as usize];
        let publish = PublishMessage::build()
            .payload(t.payload(n))
            .message_id(format!("{}{n:016x}", self.id_prefix));
        self.js
            .send_publish(t.subject.clone(), publish)
            .await
            .map_err(|e| format!("publish_{:?}", e.kind()).to_lowercase())
    }
}

/// Publishes the templates flat out for `duration` to a fresh stream configured like the
/// events stream, with `window` acks in flight; then, with `fixed`, the raw floor of the
/// fixed-rate phase on the same stream; then deletes the stream.
async fn raw_publish(
    raw: &RawPublisher,
    topology: &Topology,
    window: usize,
    duration: Duration,
    nats_pid: u32,
    fixed: Option<RawFixed>,
) -> Result<(RawRun, Option<RawGroups>)> {
    let js = &raw.js;
    super::create_stream_like(
        js,
        topology.events_stream_config(),
        RAW_STREAM,
        RAW_SUBJECT_PREFIX,
        "raw publish baseline",
    )
    .await?;
    super::hold_interest(js, RAW_STREAM).await?;

    let per_task = (window / RAW_TASKS).max(1);
    // Warm-up: a second's worth at most, not measured.
    let warm = Arc::new(Counters::default());
    run_raw_tasks(raw, per_task, Duration::from_millis(500), &warm).await;

    let progress = Progress::start("raw publish", String::new);
    let counters = progress.counters();
    let started = Instant::now();
    let cpu = CpuMeter::start(nats_pid);
    let errors = run_raw_tasks(raw, per_task, duration, &counters).await;
    let elapsed = started.elapsed();
    let cpu = cpu.stop();
    progress.finish().await;
    let acked = counters.done.load(Ordering::Relaxed);
    let stored_bytes = avg_stored(js, RAW_STREAM).await;
    let run = RawRun {
        acked,
        cpu,
        elapsed,
        stored_bytes,
        errors,
    };
    let mut groups = None;
    if let Some(f) = fixed {
        let rate = f.rate.unwrap_or(run.events_per_s() * f.share);
        if rate >= f.batch as f64 {
            js.get_stream(RAW_STREAM).await?.purge().await?;
            groups = Some(raw_groups(raw, f, rate, duration, nats_pid).await);
        }
    }
    js.delete_stream(RAW_STREAM)
        .await
        .context("deleting the raw stream")?;
    Ok((run, groups))
}

/// The raw floor of the fixed-rate phase: groups of `batch` messages (a request's worth) due
/// at `rate` events a second, each published pipelined, at most `in_flight` groups at once.
#[derive(Debug, Clone, Copy)]
struct RawFixed {
    /// Events a second; `None`: `share` of what the flat-out raw phase reached.
    rate: Option<f64>,
    share: f64,
    batch: usize,
    in_flight: usize,
}

/// What the raw fixed-rate phase reached: a group's latency is from its first publish to its
/// last PubAck.
struct RawGroups {
    rate: f64,
    groups: u64,
    latency: Latency,
    cpu: Value,
    errors: Errors,
}

impl RawGroups {
    fn json(&self) -> Value {
        json!({
            "offered_events_per_s": round3(self.rate),
            "groups": self.groups,
            "latency_group": self.latency.json(),
            "cpu_cores": self.cpu,
            "errors": self.errors.json(),
        })
    }
}

/// Slots due at a fixed interval from a start until a deadline, shared by the workers of a
/// fixed-rate phase: each takes the next slot and waits for its time.
#[derive(Clone)]
pub(crate) struct Schedule {
    started: Instant,
    interval: Duration,
    deadline: Instant,
    slot: Arc<AtomicU64>,
}

impl Schedule {
    /// `per_second` slots a second for `duration`, starting now.
    pub(crate) fn start(per_second: f64, duration: Duration) -> Self {
        let started = Instant::now();
        Self {
            started,
            interval: Duration::from_secs_f64(1.0 / per_second),
            deadline: started + duration,
            slot: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Waits for the next free slot and returns when it was due; `None` past the deadline.
    pub(crate) async fn next(&self) -> Option<Instant> {
        let k = self.slot.fetch_add(1, Ordering::Relaxed);
        let due = self.started + self.interval.mul_f64(k as f64);
        if due >= self.deadline {
            return None;
        }
        tokio::time::sleep_until(due.into()).await;
        Some(due)
    }
}

async fn raw_groups(
    raw: &RawPublisher,
    f: RawFixed,
    rate: f64,
    duration: Duration,
    nats_pid: u32,
) -> RawGroups {
    let label = format!("raw at {} ev/s", thousands(rate as u64));
    let progress = Progress::start(&label, String::new);
    let counters = progress.counters();
    let cpu = CpuMeter::start(nats_pid);
    let schedule = Schedule::start(rate / f.batch as f64, duration);
    let workers: Vec<_> = (0..f.in_flight)
        .map(|_| {
            let (raw, counters, schedule) = (raw.clone(), counters.clone(), schedule.clone());
            tokio::spawn(async move {
                let (mut groups, mut latency, mut errors) =
                    (0u64, Latency::default(), Errors::default());
                let mut acks = Vec::with_capacity(f.batch);
                while schedule.next().await.is_some() {
                    let sent = Instant::now();
                    let mut failed = false;
                    for _ in 0..f.batch {
                        match raw.send().await {
                            Ok(ack) => acks.push(ack),
                            Err(cause) => {
                                errors.add(cause);
                                failed = true;
                            }
                        }
                    }
                    for ack in acks.drain(..) {
                        if let Err(e) = ack.await {
                            errors.add(format!("puback_{:?}", e.kind()).to_lowercase());
                            failed = true;
                        }
                    }
                    if failed {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    } else {
                        groups += 1;
                        latency.record(sent.elapsed());
                        counters.done.fetch_add(f.batch as u64, Ordering::Relaxed);
                    }
                }
                (groups, latency, errors)
            })
        })
        .collect();
    let mut run = RawGroups {
        rate,
        groups: 0,
        latency: Latency::default(),
        cpu: Value::Null,
        errors: Errors::default(),
    };
    for w in workers {
        if let Ok((groups, latency, errors)) = w.await {
            run.groups += groups;
            run.latency.merge(&latency);
            run.errors.merge(&errors);
        }
    }
    run.cpu = cpu.stop();
    progress.finish().await;
    run
}

async fn run_raw_tasks(
    raw: &RawPublisher,
    window: usize,
    duration: Duration,
    counters: &Arc<Counters>,
) -> Errors {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..RAW_TASKS)
        .map(|_| {
            let (raw, counters) = (raw.clone(), counters.clone());
            tokio::spawn(async move {
                let mut errors = Errors::default();
                let mut in_flight = VecDeque::with_capacity(window);
                let mut sent = 0u64;
                loop {
                    if sent.is_multiple_of(64) && Instant::now() >= deadline {
                        break;
                    }
                    sent += 1;
                    match raw.send().await {
                        Ok(ack) => in_flight.push_back(ack),
                        Err(cause) => {
                            errors.add(cause);
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    while in_flight.len() >= window {
                        settle(in_flight.pop_front(), &counters, &mut errors).await;
                    }
                }
                while let Some(ack) = in_flight.pop_front() {
                    settle(Some(ack), &counters, &mut errors).await;
                }
                errors
            })
        })
        .collect();
    let mut errors = Errors::default();
    for t in tasks {
        if let Ok(e) = t.await {
            errors.merge(&e);
        }
    }
    errors
}

async fn settle(
    ack: Option<jetstream::context::PublishAckFuture>,
    counters: &Counters,
    errors: &mut Errors,
) {
    let Some(ack) = ack else { return };
    match ack.await {
        Ok(_) => {
            counters.done.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            errors.add(format!("puback_{:?}", e.kind()).to_lowercase());
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The load generator's runtime; dropped without blocking (it may be dropped on an async
/// task, where blocking is not allowed).
pub(crate) struct ClientRuntime(pub(crate) Option<tokio::runtime::Runtime>);

impl ClientRuntime {
    /// One worker thread named [`CLIENT_THREADS`], so its CPU time can be told apart.
    pub(crate) fn start() -> std::io::Result<Self> {
        Ok(Self(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(CLIENT_THREADS)
                .enable_all()
                .build()?,
        )))
    }

    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("present until dropped")
            .handle()
            .clone()
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The HTTP side: one client, one body generator, one request counter for the whole run.
pub(crate) struct Http {
    client: reqwest::Client,
    url: String,
    write_key: String,
    batches: Arc<SegmentBatches>,
    seq: AtomicU64,
    connections: usize,
    batch: u64,
    /// Where to write per-request traces (`--trace-dir`).
    trace_dir: Option<std::path::PathBuf>,
    /// The load generator's own runtime (threads named [`CLIENT_THREADS`]).
    pub(crate) rt: tokio::runtime::Handle,
}

impl Http {
    pub(crate) fn new(
        url: String,
        write_key: String,
        connections: usize,
        batch: usize,
        batches: Arc<SegmentBatches>,
        rt: tokio::runtime::Handle,
        trace_dir: Option<std::path::PathBuf>,
    ) -> Result<Self> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            client,
            url,
            write_key,
            batches,
            seq: AtomicU64::new(0),
            connections,
            batch: batch as u64,
            trace_dir,
            rt,
        })
    }

    /// The number the next request will get.
    pub(crate) fn peek_seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Posts request `seq`; the status, or `Err` for a transport failure.
    pub(crate) async fn post(&self, seq: u64) -> Result<u16, String> {
        let body = self.batches.body(seq);
        let res = self
            .client
            .post(&self.url)
            .basic_auth(&self.write_key, Some(""))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let _ = res.bytes().await;
        Ok(status)
    }
}

/// What one HTTP phase reached.
struct HttpRun {
    label: String,
    offered: Option<f64>,
    elapsed: Duration,
    ok_requests: u64,
    ok_events: u64,
    /// Send to response, 2xx only.
    latency: Latency,
    /// Scheduled send time to response, 2xx only (fixed rate: includes waiting for a free
    /// connection, so a generator that falls behind cannot hide it).
    from_schedule: Latency,
    errors: Errors,
    stored_bytes: u64,
    cpu: Value,
}

impl HttpRun {
    fn events_per_s(&self) -> f64 {
        per_second(self.ok_events, self.elapsed)
    }

    fn json(&self, raw_rate: f64) -> Value {
        let mut v = json!({
            "events_per_s": round3(self.events_per_s()),
            "ratio_to_raw": ratio(self.events_per_s(), raw_rate),
            "requests_2xx": self.ok_requests,
            "events": self.ok_events,
            "latency_2xx": self.latency.json(),
            "stored_bytes_per_message": self.stored_bytes,
            "cpu_cores": self.cpu,
            "errors": self.errors.json(),
        });
        if let Some(offered) = self.offered {
            v["offered_events_per_s"] = json!(round3(offered));
            v["latency_2xx_from_schedule"] = self.from_schedule.json();
        }
        v
    }
}

/// One worker's tally.
#[derive(Default)]
struct Tally {
    ok: u64,
    latency: Latency,
    from_schedule: Latency,
    errors: Errors,
    /// Send time and latency of each 2xx request, when tracing (`--trace-dir`).
    trace: Vec<(Instant, Duration)>,
}

impl Tally {
    fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        self.latency.merge(&other.latency);
        self.from_schedule.merge(&other.from_schedule);
        self.errors.merge(&other.errors);
    }

    /// Sends request `seq` and records its outcome; `scheduled` is when it was due.
    async fn request(&mut self, http: &Http, seq: u64, scheduled: Instant, counters: &Counters) {
        let sent = Instant::now();
        match http.post(seq).await {
            Ok(status) if (200..300).contains(&status) => {
                let done = Instant::now();
                self.ok += 1;
                self.latency.record(done - sent);
                if http.trace_dir.is_some() {
                    self.trace.push((sent, done - sent));
                }
                self.from_schedule.record(done - scheduled);
                counters.done.fetch_add(http.batch, Ordering::Relaxed);
            }
            Ok(status) => {
                self.errors.add(format!("http_{status}"));
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.errors.add("transport");
                counters.errors.fetch_add(1, Ordering::Relaxed);
                // A refused connection fails at once: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn finish(
    label: &str,
    offered: Option<f64>,
    http: &Http,
    elapsed: Duration,
    tallies: Vec<Tally>,
    cpu: Value,
) -> HttpRun {
    let mut all = Tally::default();
    for t in &tallies {
        all.merge(t);
    }
    if let Some(dir) = &http.trace_dir {
        let stem = if offered.is_some() {
            "fixed-rate"
        } else {
            "flat-out"
        };
        let path = dir.join(format!("{stem}.tsv"));
        if let Err(e) = write_trace(&path, &tallies) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    HttpRun {
        label: label.to_string(),
        offered,
        elapsed,
        ok_requests: all.ok,
        ok_events: all.ok * http.batch,
        latency: all.latency,
        from_schedule: all.from_schedule,
        errors: all.errors,
        stored_bytes: 0,
        cpu,
    }
}

/// Writes every 2xx request of a phase, in send order, as `sent_unix_seconds latency_ms` lines
/// (wall-clock send times, to line up with other logs such as nats-server's).
fn write_trace(path: &std::path::Path, tallies: &[Tally]) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut rows: Vec<(Instant, Duration)> = tallies
        .iter()
        .flat_map(|t| t.trace.iter().copied())
        .collect();
    rows.sort();
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let unix = |t: Instant| {
        (wall - now.duration_since(t))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let mut text = String::from("# sent_unix_seconds\tlatency_ms\n");
    for (sent, latency) in rows {
        let _ = writeln!(
            text,
            "{:.6}\t{:.3}",
            unix(sent),
            latency.as_secs_f64() * 1e3
        );
    }
    std::fs::write(path, text)
}

/// Every connection posts its next batch as soon as the last one is answered, for `duration`
/// or until `max_requests` have been sent.
async fn flat_out(
    http: &Arc<Http>,
    duration: Duration,
    max_requests: Option<u64>,
    label: &str,
    nats_pid: u32,
) -> HttpRun {
    let progress = (max_requests.is_none()).then(|| Progress::start(label, String::new));
    let counters = progress
        .as_ref()
        .map_or_else(|| Arc::new(Counters::default()), Progress::counters);
    let started = Instant::now();
    let cpu = CpuMeter::start(nats_pid);
    let deadline = started + duration;
    let sent = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..http.connections)
        .map(|_| {
            let (http, counters, sent) = (http.clone(), counters.clone(), sent.clone());
            http.rt.clone().spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < deadline
                    && max_requests.is_none_or(|max| sent.fetch_add(1, Ordering::Relaxed) < max)
                {
                    let now = Instant::now();
                    tally.request(&http, http.next_seq(), now, &counters).await;
                }
                tally
            })
        })
        .collect();
    let tallies = join_all(workers).await;
    let elapsed = started.elapsed();
    let cpu = cpu.stop();
    if let Some(p) = progress {
        p.finish().await;
    }
    finish(label, None, http, elapsed, tallies, cpu)
}

/// What the workers that finished tallied.
async fn join_all(workers: Vec<tokio::task::JoinHandle<Tally>>) -> Vec<Tally> {
    let mut tallies = Vec::with_capacity(workers.len());
    for w in workers {
        if let Ok(t) = w.await {
            tallies.push(t);
        }
    }
    tallies
}

/// Requests are due at a fixed rate (`rate` events a second, so `rate / batch` requests); each
/// connection takes the next due slot, waits for its time, and sends it. A connection that
/// is late sends at once, and the delay shows in the latency from the scheduled time.
async fn fixed_rate(
    http: &Arc<Http>,
    rate: f64,
    duration: Duration,
    label: &str,
    nats_pid: u32,
) -> HttpRun {
    let progress = Progress::start(label, String::new);
    let counters = progress.counters();
    let started = Instant::now();
    let cpu = CpuMeter::start(nats_pid);
    let schedule = Schedule::start(rate / http.batch as f64, duration);
    let workers: Vec<_> = (0..http.connections)
        .map(|_| {
            let (http, counters, schedule) = (http.clone(), counters.clone(), schedule.clone());
            http.rt.clone().spawn(async move {
                let mut tally = Tally::default();
                while let Some(due) = schedule.next().await {
                    tally.request(&http, http.next_seq(), due, &counters).await;
                }
                tally
            })
        })
        .collect();
    let tallies = join_all(workers).await;
    // The offered load spans exactly `duration`; late answers must not stretch it.
    let elapsed = started.elapsed().max(duration);
    let cpu = cpu.stop();
    progress.finish().await;
    finish(label, Some(rate), http, elapsed, tallies, cpu)
}
