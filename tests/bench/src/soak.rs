//! `herald-bench soak`: Herald alone (ingest, the processor and the activator as `herald <role>`
//! processes, a webhook sink in this process, as in `herald-bench pipeline`) at one offered
//! rate for a long time, watching resident memory (issue 13: memory stays flat).
//!
//! Every `--sample-every` seconds it records `VmRSS` of each service, nats-server and the
//! bench itself, with the events accepted by ingest, arrived at the sink, and the backlog
//! between them. The first `--warmup` seconds of the run (part of `--duration`) are the
//! warm-up: the report's start is the first sample at or after it, and the slope is a
//! least-squares fit over the samples from it on. Freshness is over every event of the run.
//! No raw chain, no rate search.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::child::herald_binary;
use super::nats::BenchNats;
use super::pipeline::{
    ConfigFile, HeraldSide, PhaseOpts, ServiceArgs, Services, Sink, Tracker, herald_load,
};
use super::report::{
    load_average, pid_status_mib, print_machine, print_summary, round3, thousands,
};

/// Options of `herald-bench soak`.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Offered rate, events per second, for the whole run.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Seconds of load, the warm-up included.
    #[arg(long, default_value_t = 1_800)]
    pub duration: u64,
    /// Seconds between samples of resident memory and the event counts.
    #[arg(long, default_value_t = 30)]
    pub sample_every: u64,
    /// Seconds at the start of the run that the start figures and the slope leave out.
    #[arg(long, default_value_t = 60)]
    pub warmup: u64,
    /// Distinct users the events belong to.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    /// Approximate size of one event's JSON, in bytes.
    #[arg(long, default_value_t = 600)]
    pub event_bytes: usize,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Concurrent HTTP connections (requests in flight).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Partitions (`topology.partitions`).
    #[arg(long, default_value_t = 16)]
    pub partitions: u32,
    /// Longest the run waits, after its offer ends, for the accepted events to arrive.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,
    #[command(flatten)]
    pub services: ServiceArgs,
}

/// One sample: seconds since the load started, events accepted and arrived, and each
/// process's resident memory in MiB (in the order of the run's processes).
#[derive(Debug, Clone)]
struct Sample {
    t_s: f64,
    accepted: u64,
    arrived: u64,
    rss_mib: Vec<f64>,
}

impl Sample {
    fn json(&self, names: &[String]) -> Value {
        json!({
            "t_s": round3(self.t_s),
            "events_accepted": self.accepted,
            "events_arrived": self.arrived,
            "backlog": self.accepted.saturating_sub(self.arrived),
            "rss_mib": names.iter().cloned().zip(self.rss_mib.iter().map(|m| json!(m)))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// One process's memory over the run, in MiB.
#[derive(Debug, Clone, PartialEq)]
struct Memory {
    /// At the first sample at or after the warm-up.
    start: f64,
    /// At the last sample.
    end: f64,
    /// The kernel's `VmHWM` at the end: the highest resident memory of the process's life.
    peak: f64,
    /// Least-squares slope over the samples from the warm-up on, MiB per hour; `None` with
    /// fewer than two such samples.
    slope_per_h: Option<f64>,
}

/// The least-squares slope of `points` (x, y); `None` with fewer than two distinct x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Each process's [`Memory`] from the samples (`peaks` by process, in the samples' order).
fn memory(samples: &[Sample], warmup_s: f64, peaks: &[f64]) -> Vec<Memory> {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= warmup_s).collect();
    peaks
        .iter()
        .enumerate()
        .map(|(i, &peak)| {
            let points: Vec<(f64, f64)> = after
                .iter()
                .map(|s| (s.t_s / 3600.0, s.rss_mib[i]))
                .collect();
            Memory {
                start: after.first().map_or(0.0, |s| s.rss_mib[i]),
                end: samples.last().map_or(0.0, |s| s.rss_mib[i]),
                peak,
                slope_per_h: slope(&points),
            }
        })
        .collect()
}

/// Takes a sample at 0 s, every `every` after, and at `duration` (then stops), printing a
/// progress line for each.
async fn sample_loop(
    tracker: Arc<Tracker>,
    processes: Vec<(String, u32)>,
    every: Duration,
    duration: Duration,
    stop: CancellationToken,
) -> Vec<Sample> {
    let start = tokio::time::Instant::now();
    let mut samples = Vec::new();
    let mut at = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep_until(start + at) => {}
        }
        let s = Sample {
            t_s: start.elapsed().as_secs_f64(),
            accepted: tracker.accepted.load(Ordering::Relaxed),
            arrived: tracker.arrived.load(Ordering::Relaxed),
            rss_mib: processes
                .iter()
                .map(|(_, pid)| pid_status_mib(*pid, "VmRSS"))
                .collect(),
        };
        let rss: Vec<String> = processes
            .iter()
            .zip(&s.rss_mib)
            .map(|((name, _), mib)| format!("{name} {mib:.1}"))
            .collect();
        eprintln!(
            "  [soak] {:>5.0}s/{}s  sent {}  arrived {}  backlog {}  RSS MiB: {}",
            s.t_s,
            duration.as_secs(),
            thousands(s.accepted),
            thousands(s.arrived),
            thousands(s.accepted.saturating_sub(s.arrived)),
            rss.join(", ")
        );
        samples.push(s);
        if at >= duration || stop.is_cancelled() {
            return samples;
        }
        at = (at + every).min(duration);
    }
}

/// Runs the soak and prints its report.
pub async fn run(args: SoakArgs) -> Result<()> {
    if args.batch == 0
        || args.connections == 0
        || args.duration == 0
        || args.partitions == 0
        || args.sample_every == 0
    {
        bail!(
            "--batch, --connections, --duration, --partitions and --sample-every must be at least 1"
        );
    }
    if args.rate < args.batch as u64 {
        bail!("--rate must be at least one batch a second (--batch events)");
    }
    if args.warmup >= args.duration {
        bail!("--warmup must be shorter than --duration");
    }
    let herald = herald_binary(args.services.herald_bin.as_deref())?;
    let nats = BenchNats::start().await?;
    print_machine(&nats.version);
    let load_before = load_average();
    let run_id = super::random_hex(4);
    let (_, mut common) = super::common_config(&nats.url);
    common.topology.partitions = args.partitions;
    let topology = herald_common::Topology::new(common.topology.clone());
    let client = herald_common::nats::connect(&common.nats, "herald-bench").await?;
    let js = herald_common::nats::jetstream(client.clone(), &common.nats);

    let sink = Sink::start().await?;
    let write_key = super::random_hex(16);
    let dir = nats.dir().to_path_buf();
    let config = ConfigFile {
        partitions: args.partitions,
        write_key: &write_key,
        sink_url: &sink.url,
        services: &args.services,
    }
    .write(&dir, "herald", None)?;
    let mut services =
        Services::start(&herald, &config, &dir, &common, &args.services.service_env).await?;
    let mut processes = services.pids();
    processes.extend([
        ("nats-server".to_string(), nats.pid()),
        ("herald-bench".to_string(), std::process::id()),
    ]);
    let (client_rt, batches, http) = herald_load(
        &run_id,
        args.users,
        args.batch,
        args.event_bytes,
        args.connections,
        services.ingest_http,
        &write_key,
    )?;
    eprintln!(
        "Herald: ingest at http://{}; {} events of {} B per request, {} connections; webhook sink {}; \
         {} ev/s for {} s, a sample every {} s, the first {} s a warm-up",
        services.ingest_http,
        args.batch,
        batches.event_bytes(),
        args.connections,
        sink.url,
        thousands(args.rate),
        args.duration,
        args.sample_every,
        args.warmup
    );
    let side = HeraldSide {
        http,
        sink: sink.clone(),
        js,
        topology,
    };
    let opts = PhaseOpts {
        batch: args.batch as u64,
        connections: args.connections,
        drain: Duration::from_secs(args.drain_timeout.max(1)),
    };
    let rate = args.rate as f64;
    let duration = Duration::from_secs(args.duration);
    let tracker = side.tracker(rate, duration, opts);
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(sample_loop(
        tracker.clone(),
        processes.clone(),
        Duration::from_secs(args.sample_every),
        duration,
        stop.clone(),
    ));
    let phase = side
        .phase_with(tracker, rate, duration, false, opts, &processes, false)
        .await;
    // The offer is over (the load ran for `duration`): the last sample is taken by now, or at
    // once when the offer ended early.
    stop.cancel();
    let samples = sampler.await?;
    let run = phase?;
    let peaks: Vec<f64> = processes
        .iter()
        .map(|(_, pid)| pid_status_mib(*pid, "VmHWM"))
        .collect();
    services.check_alive()?;
    if run.delivered == 0 {
        bail!(
            "no event reached the webhook sink ({}); {}",
            run.errors.summary(),
            services.log_tails()
        );
    }
    let consumers = side.consumer_counts().await?;
    let load_after = load_average();
    services.stop().await;
    drop(client_rt);
    drop(client);

    let names: Vec<String> = processes.iter().map(|(n, _)| n.clone()).collect();
    let mem = memory(&samples, args.warmup as f64, &peaks);
    let after_warmup = samples
        .iter()
        .filter(|s| s.t_s >= args.warmup as f64)
        .count();
    let start_at = samples
        .iter()
        .find(|s| s.t_s >= args.warmup as f64)
        .map_or(0.0, |s| s.t_s);
    let end_at = samples.last().map_or(0.0, |s| s.t_s);

    println!();
    println!(
        "herald-bench soak: {} ev/s offered for {} s ({} users, {}-event requests, {} connections, {} partitions), a sample every {} s",
        thousands(args.rate),
        args.duration,
        thousands(args.users),
        args.batch,
        args.connections,
        args.partitions,
        args.sample_every
    );
    println!(
        "  resident memory, MiB (start: at {start_at:.0} s, after a {} s warm-up; end: at {end_at:.0} s; peak: VmHWM; slope: least squares over the {after_warmup} samples from the warm-up on)",
        args.warmup
    );
    println!(
        "  {:<14} {:>9} {:>9} {:>9} {:>12}",
        "process", "start", "end", "peak", "slope MiB/h"
    );
    for (name, m) in names.iter().zip(&mem) {
        println!(
            "  {name:<14} {:>9.1} {:>9.1} {:>9.1} {:>12}",
            m.start,
            m.end,
            m.peak,
            m.slope_per_h.map_or("-".into(), |s| format!("{s:+.2}"))
        );
    }
    let f = &run.freshness;
    println!(
        "  freshness over the run (ms): p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}",
        f.ms(0.5),
        f.ms(0.9),
        f.ms(0.99),
        f.ms(1.0)
    );
    println!(
        "  events: {} accepted, {} arrived ({} ev/s while offered), {} duplicates, backlog at the end of the offer {}{}; errors: {}",
        thousands(run.accepted),
        thousands(run.delivered),
        thousands(run.delivered_per_s() as u64),
        thousands(run.duplicates),
        thousands(run.backlog_at_end),
        if run.drained { "" } else { ", NOT all arrived" },
        run.errors.summary()
    );
    let memory_json: serde_json::Map<String, Value> = names
        .iter()
        .zip(&mem)
        .map(|(name, m)| {
            (
                name.clone(),
                json!({
                    "start_mib": round3(m.start),
                    "end_mib": round3(m.end),
                    "peak_mib": round3(m.peak),
                    "slope_mib_per_h": m.slope_per_h.map(round3),
                }),
            )
        })
        .collect();
    let fields = json!({
        "rate": args.rate,
        "duration_s": args.duration,
        "sample_every_s": args.sample_every,
        "warmup_s": args.warmup,
        "users": args.users,
        "event_json_bytes": batches.event_bytes(),
        "batch": args.batch,
        "connections": args.connections,
        "partitions": args.partitions,
        "webhook_batch_max": args.services.webhook_batch_max,
        "webhook_ordered": !args.services.webhook_unordered,
        "herald_consumers": consumers,
        "memory": memory_json,
        "start_at_s": round3(start_at),
        "end_at_s": round3(end_at),
        "samples_after_warmup": after_warmup,
        "freshness": run.freshness.json_p90(),
        "events_accepted": run.accepted,
        "events_delivered": run.delivered,
        "sink_requests": sink.requests(),
        "delivered_events_per_s": round3(run.delivered_per_s()),
        "duplicates": run.duplicates,
        "backlog_at_end": run.backlog_at_end,
        "drained": run.drained,
        "errors": run.errors.json(),
        "cpu_s": run.cpu_s,
        "samples": samples.iter().map(|s| s.json(&names)).collect::<Vec<_>>(),
    });
    print_summary("soak", &nats.version, load_before, load_after, fields);
    nats.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_the_least_squares_fit() {
        assert_eq!(slope(&[]), None);
        assert_eq!(slope(&[(1.0, 5.0)]), None);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 6.0)]), None);
        let s = slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).expect("a slope");
        assert!((s - 2.0).abs() < 1e-9, "{s}");
        // Noise around a flat line fits to (nearly) zero.
        let s = slope(&[(0.0, 10.0), (1.0, 11.0), (2.0, 9.0), (3.0, 10.0)]).expect("a slope");
        assert!(s.abs() < 0.5, "{s}");
    }

    #[test]
    fn memory_starts_after_the_warmup_and_fits_the_slope_in_mib_per_hour() {
        let sample = |t_s: f64, mib: f64| Sample {
            t_s,
            accepted: 0,
            arrived: 0,
            rss_mib: vec![mib, 7.0],
        };
        // 100 MiB at 0 s (warm-up), then 1 MiB more every 30 s from 60 s on: 120 MiB/h.
        let samples = [
            sample(0.0, 100.0),
            sample(60.0, 200.0),
            sample(90.0, 201.0),
            sample(120.0, 202.0),
        ];
        let mem = memory(&samples, 60.0, &[250.0, 8.0]);
        assert_eq!(mem[0].start, 200.0);
        assert_eq!(mem[0].end, 202.0);
        assert_eq!(mem[0].peak, 250.0);
        let s = mem[0].slope_per_h.expect("a slope");
        assert!((s - 120.0).abs() < 1e-6, "{s}");
        assert_eq!(mem[1].slope_per_h, Some(0.0));
        assert_eq!(
            memory(&samples[..2], 60.0, &[1.0, 1.0])[0].slope_per_h,
            None
        );
    }
}
