//! `herald-bench` runs end to end with small loads and reports what docs/benchmarks.md relies
//! on. Speed is never asserted here: only that every number is there and positive.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tokio::process::Command;

const HERALD_BENCH: &str = env!("CARGO_BIN_EXE_herald-bench");

/// The `herald` binary that `herald-bench processor` finds beside itself, built when it is
/// missing. `cargo nextest run --workspace` builds it with everything else; `-p herald-bench`
/// alone does not (a dev-dependency on the herald package would not give this package
/// `CARGO_BIN_EXE_herald`), so the test builds it with the same cargo, profile and target
/// directory as herald-bench.
async fn herald_beside_bench() -> Result<PathBuf> {
    let bench = Path::new(HERALD_BENCH);
    let herald = bench.with_file_name("herald");
    if herald.is_file() {
        return Ok(herald);
    }
    let profile_dir = bench.parent().context("herald-bench has a directory")?;
    let target_dir = profile_dir
        .parent()
        .context("the profile directory has a parent")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    eprintln!("building {} (cargo build -p herald)", herald.display());
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "herald",
            "--profile",
            profile,
            "--target-dir",
        ])
        .arg(target_dir)
        .status()
        .await
        .context("running cargo build -p herald")?;
    ensure!(status.success(), "cargo build -p herald failed ({status})");
    ensure!(
        herald.is_file(),
        "cargo build -p herald made no {}",
        herald.display()
    );
    Ok(herald)
}

/// Runs `herald-bench <args>` and returns its stdout and the JSON summary (its last line).
async fn bench(args: &[&str]) -> Result<(String, Value)> {
    let (stdout, _, summary) = bench_with_stderr(args).await?;
    Ok((stdout, summary))
}

/// [`bench`], also returning its stderr (progress lines and notices).
async fn bench_with_stderr(args: &[&str]) -> Result<(String, String, Value)> {
    let nats = herald_testkit::nats_server_binary()?;
    if matches!(args.first(), Some(&"processor" | &"pipeline" | &"soak")) {
        herald_beside_bench().await?;
    }
    let child = Command::new(HERALD_BENCH)
        .args(args)
        .env("HERALD_NATS_SERVER", nats)
        // herald-bench finds the `herald` beside it.
        .env_remove("HERALD_BIN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .context("herald-bench did not finish within 240 s")??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "herald-bench {args:?} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON summary line in:\n{stdout}"))?;
    let summary = serde_json::from_str(line).context("the summary line is JSON")?;
    assert!(
        stderr.contains("/s  total"),
        "progress lines are printed:\n{stderr}"
    );
    Ok((stdout, stderr, summary))
}

fn positive(v: &Value, path: &str) -> f64 {
    let x = v
        .pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing in {v}"));
    assert!(x > 0.0, "{path} = {x} in {v}");
    x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_bench_reports_raw_and_ingest_rates_latencies_and_ratios() -> Result<()> {
    let traces = tempfile::tempdir()?;
    let trace_dir = traces.path().to_str().context("a UTF-8 temp dir")?;
    let (stdout, s) = bench(&[
        "ingest",
        "--duration",
        "2",
        "--connections",
        "4",
        "--trace-dir",
        trace_dir,
    ])
    .await?;
    assert_eq!(s["bench"], "ingest");
    assert!(
        s["nats_server"]
            .as_str()
            .is_some_and(|v| v.starts_with('v')),
        "{s}"
    );
    positive(&s, "/machine/cores");
    positive(&s, "/raw/events_per_s");
    positive(&s, "/raw/stored_bytes_per_message");
    positive(&s, "/ratio");
    for run in ["/ingest_flat_out", "/ingest_fixed_rate"] {
        positive(&s, &format!("{run}/events_per_s"));
        positive(&s, &format!("{run}/ratio_to_raw"));
        positive(&s, &format!("{run}/latency_2xx/p50_ms"));
        positive(&s, &format!("{run}/latency_2xx/p99_ms"));
        positive(&s, &format!("{run}/latency_2xx/p999_ms"));
        assert!(
            s.pointer(&format!("{run}/errors"))
                .is_some_and(Value::is_object),
            "{s}"
        );
    }
    // The fixed-rate run offers half of what raw publishing reached.
    let offered = positive(&s, "/ingest_fixed_rate/offered_events_per_s");
    let raw = positive(&s, "/raw/events_per_s");
    assert!((offered - raw / 2.0).abs() < 1.0, "{offered} vs {raw}");
    // The raw floor of the fixed-rate run: raw publishing at the same rate, in groups of a
    // request's worth, each timed to its last PubAck.
    let floor = positive(&s, "/raw_fixed_rate/offered_events_per_s");
    assert!((floor - offered).abs() < 1e-6, "{floor} vs {offered}");
    positive(&s, "/raw_fixed_rate/groups");
    positive(&s, "/raw_fixed_rate/latency_group/p50_ms");
    positive(&s, "/raw_fixed_rate/latency_group/p99_ms");
    assert_eq!(s["raw_fixed_rate"]["errors"], serde_json::json!({}), "{s}");
    assert!(s["targets"]["ratio_met"].is_boolean() && s["targets"]["p99_met"].is_boolean());
    for text in [
        "raw JetStream publish",
        "ingest flat out",
        "of raw",
        "p99",
        "groups of 100 pipelined",
    ] {
        assert!(stdout.contains(text), "{text:?} missing in:\n{stdout}");
    }
    // --trace-dir: one line per 2xx request of each HTTP phase, in send order.
    for (file, run) in [
        ("flat-out.tsv", "/ingest_flat_out"),
        ("fixed-rate.tsv", "/ingest_fixed_rate"),
    ] {
        let text = std::fs::read_to_string(traces.path().join(file))?;
        let rows: Vec<(f64, f64)> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (sent, ms) = l.split_once('\t').expect("two tab-separated columns");
                (sent.parse().unwrap(), ms.parse().unwrap())
            })
            .collect();
        let requests = s
            .pointer(&format!("{run}/requests_2xx"))
            .and_then(Value::as_u64);
        assert_eq!(Some(rows.len() as u64), requests, "{file}: {s}");
        assert!(
            rows.windows(2).all(|w| w[0].0 <= w[1].0),
            "{file} in send order"
        );
        assert!(
            rows.iter().all(|&(sent, ms)| sent > 1.7e9 && ms > 0.0),
            "{file}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_bench_fixed_share_sets_the_fixed_rate_and_leaves_the_half_rate_target_unjudged()
-> Result<()> {
    let (_, s) = bench(&[
        "ingest",
        "--duration",
        "1",
        "--connections",
        "2",
        "--fixed-share",
        "0.3",
    ])
    .await?;
    assert_eq!(s["fixed_share"], 0.3, "{s}");
    let raw = positive(&s, "/raw/events_per_s");
    for run in ["/ingest_fixed_rate", "/raw_fixed_rate"] {
        let offered = positive(&s, &format!("{run}/offered_events_per_s"));
        assert!(
            (offered - raw * 0.3).abs() < 1.0,
            "{run}: {offered} vs {raw}"
        );
    }
    // The latency target is read at half the raw rate only.
    assert!(s["targets"]["p99_met"].is_null(), "{s}");
    assert!(s["targets"]["ratio_met"].is_boolean(), "{s}");
    Ok(())
}

#[tokio::test]
async fn ingest_bench_refuses_a_fixed_share_outside_zero_to_one() -> Result<()> {
    let out = Command::new(HERALD_BENCH)
        .args(["ingest", "--fixed-share", "1.5"])
        .output()
        .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--fixed-share must be above 0 and at most 1"),
        "{stderr}"
    );
    Ok(())
}

/// A processor bench with baselines, small but long enough for progress lines.
const SMALL_PROCESSOR_RUN: [&str; 7] = [
    "processor",
    "--users",
    "1000",
    "--events",
    "5000",
    "--cache-mb",
    "16",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_bench_reports_both_baselines_ratios_and_memory() -> Result<()> {
    let (stdout, s) = bench(&SMALL_PROCESSOR_RUN).await?;
    assert_eq!(s["bench"], "processor");
    assert_eq!(s["events"], 5000);
    assert_eq!(s["users"], 1000);
    positive(&s, "/preload/events_per_s");
    positive(&s, "/raw_consume_publish/events_per_s");
    positive(&s, "/raw_consume_kv_publish/events_per_s");
    positive(&s, "/processor/events_per_s");
    positive(&s, "/processor/rss_peak_mb");
    positive(&s, "/ratio_to_raw");
    positive(&s, "/ratio_to_kv");
    assert_eq!(s["processor"]["processed"], 5000);
    assert_eq!(s["processor"]["complete"], true);
    assert_eq!(s["processor"]["cache_mb"], 16);
    // Counters scraped from the processor process's own metrics endpoint.
    assert_eq!(s["processor"]["counters"]["events_total"], 5000, "{s}");
    assert!(s["targets"]["rss_met"].is_boolean());
    for text in [
        "raw consume + publish",
        "KV CAS write",
        "processor",
        "resident memory",
    ] {
        assert!(stdout.contains(text), "{text:?} missing in:\n{stdout}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_only_skips_the_baselines_and_still_measures_the_processor_process() -> Result<()>
{
    let (stdout, s) = bench(&[
        "processor",
        "--processor-only",
        "--users",
        "2000",
        "--events",
        "20000",
        "--cache-mb",
        "8",
    ])
    .await?;
    assert!(s["raw_consume_publish"].is_null(), "{s}");
    assert!(s["raw_consume_kv_publish"].is_null(), "{s}");
    assert!(
        s["ratio_to_kv"].is_null() && s["targets"]["ratio_met"].is_null(),
        "{s}"
    );
    positive(&s, "/processor/events_per_s");
    positive(&s, "/processor/rss_peak_mb");
    positive(&s, "/processor/cpu_cores/service_process");
    assert_eq!(s["processor"]["processed"], 20000);
    assert_eq!(s["processor"]["counters"]["events_total"], 20000, "{s}");
    assert!(stdout.contains("not measured"), "{stdout}");
    Ok(())
}

/// Repeat visitors: each user's events close together, so the processor's batches hold several
/// events of one user, written as one profile write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_bench_with_repeat_visitors_counts_fewer_profile_writes_than_events() -> Result<()>
{
    let (stdout, s) = bench(&[
        "processor",
        "--processor-only",
        "--users",
        "2000",
        "--events-per-user",
        "10",
        "--active-users",
        "200",
        "--cache-mb",
        "8",
    ])
    .await?;
    assert_eq!(s["events"], 20000, "{s}");
    assert_eq!(s["active_users"], 200, "{s}");
    assert_eq!(s["processor"]["processed"], 20000, "{s}");
    let writes = s["processor"]["counters"]["profile_writes_total"]
        .as_u64()
        .unwrap_or(u64::MAX);
    // One write per event would be 20,000.
    assert!(
        writes < 20000,
        "{writes} profile writes for 20000 events: {s}"
    );
    assert!(stdout.contains("(200 at a time)"), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_bench_with_atomic_stores_requests_as_atomic_batches() -> Result<()> {
    let (stdout, s) = bench(&[
        "ingest",
        "--flat-out",
        "--duration",
        "2",
        "--connections",
        "2",
        "--atomic",
    ])
    .await?;
    assert_eq!(s["atomic_publish"], true, "{s}");
    positive(&s, "/ingest_flat_out/events_per_s");
    // Ingest's own counter: the requests went as committed atomic batches.
    positive(&s, "/atomic_batches/committed");
    assert!(s["ingest_fixed_rate"].is_null(), "{s}");
    assert!(
        s["raw_fixed_rate"].is_null(),
        "--flat-out has no raw floor: {s}"
    );
    assert!(
        stdout.contains("atomic batches (--atomic): committed"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_bench_starts_the_processor_again_when_its_admin_port_was_taken() -> Result<()> {
    // Another process holds the port the first start is given.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let args: Vec<&str> = SMALL_PROCESSOR_RUN
        .into_iter()
        .chain(["--processor-admin", &addr])
        .collect();
    let (_, stderr, summary) = bench_with_stderr(&args).await?;
    assert!(
        stderr.contains(&format!("admin port {addr} was taken")),
        "{stderr}"
    );
    assert_eq!(summary["processor"]["processed"], 5000, "{summary}");
    drop(taken);
    Ok(())
}

#[tokio::test]
async fn processor_bench_says_what_to_do_when_the_herald_binary_is_not_there() -> Result<()> {
    let flag = Command::new(HERALD_BENCH)
        .args(["processor", "--herald-bin", "/nonexistent/herald"])
        .env_remove("HERALD_BIN")
        .env("RUST_BACKTRACE", "1")
        .output()
        .await?;
    let env = Command::new(HERALD_BENCH)
        .arg("processor")
        .env("HERALD_BIN", "/nonexistent/herald")
        .output()
        .await?;
    for out in [flag, env] {
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--herald-bin /nonexistent/herald: no such file"),
            "{stderr}"
        );
        assert!(
            stderr.contains("cargo build --release -p herald"),
            "{stderr}"
        );
        assert!(!stderr.contains("backtrace"), "{stderr}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_bench_reports_rates_freshness_stages_and_processes_on_both_sides() -> Result<()> {
    let (stdout, s) = bench(&[
        "pipeline",
        "--rates",
        "300",
        "--duration",
        "2",
        "--probe-duration",
        "1",
        "--search-from",
        "300",
        "--search-max",
        "600",
        "--search-steps",
        "1",
        "--users",
        "50",
        "--batch",
        "10",
        "--connections",
        "2",
        "--partitions",
        "4",
        "--keep-up-duration",
        "1",
        "--failing-neighbour",
    ])
    .await?;
    assert_eq!(s["bench"], "pipeline");
    assert_eq!(s["partitions"], 4, "{s}");
    // One request per event by default (the warm-up's events count too).
    assert_eq!(s["webhook_batch_max"], 1, "{s}");
    positive(&s, "/sink_requests");
    // Two ordered destinations (the sink and the failing neighbour): one consumer per partition
    // each on the processed stream; the stage split's readers are gone by the end.
    assert_eq!(s["webhook_ordered"], true, "{s}");
    assert_eq!(s["herald_consumers"]["processed"], 8, "{s}");
    positive(&s, "/machine/cores");
    for side in ["/raw", "/herald"] {
        positive(&s, &format!("{side}/highest_sustained_events_per_s"));
        let probes = s
            .pointer(&format!("{side}/probes"))
            .and_then(Value::as_array)
            .with_context(|| format!("{side}/probes in {s}"))?;
        assert!(!probes.is_empty(), "{s}");
        for p in probes {
            positive(p, "/offered_events_per_s");
            assert!(p["sustained"].is_boolean(), "{p}");
        }
    }
    positive(&s, "/throughput_ratio");
    assert!(s["targets"]["ratio_met"].is_boolean(), "{s}");
    // Freshness targets are read at 5,000 ev/s only, not among this run's rates.
    assert!(s["targets"]["at_target_rate"].is_null(), "{s}");
    // The raw chain's highest is held for the keep-up phase's duration first: the search's
    // highest is tried first, and the rate that held (if any) is the first sustained run.
    let raw_highest = s["raw"]["highest_sustained_events_per_s"]
        .as_f64()
        .context("raw highest")?;
    let confirmed = &s["raw"]["confirmed"];
    let tries = confirmed["runs"]
        .as_array()
        .with_context(|| format!("raw/confirmed/runs in {s}"))?;
    assert_eq!(tries[0]["offered_events_per_s"], raw_highest, "{s}");
    let held = tries
        .iter()
        .find(|t| t["sustained"] == true)
        .map(|t| t["offered_events_per_s"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(confirmed["events_per_s"], held, "{s}");
    // The keep-up phase offers Herald half of that (the search's highest if none held).
    let base = held.as_f64().unwrap_or(raw_highest);
    let keep_up = &s["herald"]["keep_up"];
    let offered = keep_up["offered_events_per_s"]
        .as_f64()
        .with_context(|| format!("keep_up in {s}"))?;
    assert!(offered >= base / 2.0 && offered < base / 2.0 + 10.0, "{s}");
    assert_eq!(keep_up["events_missing"], 0, "{s}");
    // Each process's CPU per event delivered, the number a CPU-bound machine's rate follows.
    for process in ["activator", "processor", "nats-server", "herald-bench"] {
        positive(keep_up, &format!("/cpu_us_per_event/{process}"));
    }
    assert_eq!(
        s["targets"]["keep_up"]["offered_events_per_s"], offered,
        "{s}"
    );
    assert!(s["targets"]["keep_up"]["met"].is_boolean(), "{s}");
    let fixed = |path: &str| -> Result<Value> {
        let runs = s
            .pointer(path)
            .and_then(Value::as_array)
            .with_context(|| format!("{path} in {s}"))?;
        assert_eq!(runs.len(), 1, "one fixed rate: {s}");
        Ok(runs[0].clone())
    };
    for path in [
        "/raw/fixed",
        "/herald/fixed",
        "/herald_failing_neighbour/fixed",
    ] {
        let run = fixed(path)?;
        assert_eq!(run["offered_events_per_s"], 300.0, "{path}: {run}");
        positive(&run, "/delivered_events_per_s");
        // Every accepted event reached the sink, once.
        assert_eq!(
            run["events_delivered"], run["events_accepted"],
            "{path}: {run}"
        );
        assert_eq!(run["events_missing"], 0, "{path}: {run}");
        for q in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
            positive(&run, &format!("/freshness/{q}"));
        }
        positive(&run, "/cpu_s/nats-server");
        assert!(run["cpu_s"]["herald-bench"].is_number(), "{path}: {run}");
    }
    // The stage split, on Herald's side only, from JetStream's stored times.
    for path in ["/herald/fixed", "/herald_failing_neighbour/fixed"] {
        let run = fixed(path)?;
        positive(&run, "/stages/events_sampled");
        for stage in ["ingest", "processor", "activator"] {
            positive(&run, &format!("/stages/{stage}/p50_ms"));
            positive(&run, &format!("/stages/{stage}/p99_ms"));
        }
        for service in ["ingest", "processor", "activator"] {
            positive(&run, &format!("/cpu_s/{service}"));
        }
    }
    assert!(fixed("/raw/fixed")?["stages"].is_null(), "{s}");
    // The failing neighbour's sink was tried (and answered 500).
    positive(&s, "/herald_failing_neighbour/failing_sink_requests");
    for process in [
        "ingest",
        "processor",
        "activator",
        "nats-server",
        "herald-bench",
    ] {
        positive(&s, &format!("/processes/cpu_s/{process}"));
        positive(&s, &format!("/processes/peak_rss_mb/{process}"));
    }
    for text in [
        "highest sustained rate, raw chain",
        "throughput ratio",
        "raw chain at 300 ev/s",
        "Herald at 300 ev/s",
        "failing neighbour",
        "stage split",
        "raw chain held for 1 s",
        "keeps up at 0.50 of the raw chain's sustained rate",
        "CPU per event (µs), keeping up, Herald at",
        "CPU per event (µs), raw chain at 300 ev/s: herald-bench",
        "peak resident memory",
    ] {
        assert!(stdout.contains(text), "{text:?} missing in:\n{stdout}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_bench_reports_memory_per_process_samples_and_freshness() -> Result<()> {
    let (stdout, stderr, s) = bench_with_stderr(&[
        "soak",
        "--rate",
        "300",
        "--duration",
        "4",
        "--sample-every",
        "1",
        "--warmup",
        "1",
        "--users",
        "50",
        "--batch",
        "10",
        "--connections",
        "2",
        "--partitions",
        "4",
        "--webhook-batch-max",
        "20",
        "--webhook-unordered",
    ])
    .await?;
    assert_eq!(s["bench"], "soak");
    assert_eq!(s["webhook_batch_max"], 20, "{s}");
    // An unordered destination: one shared consumer on the processed stream, not one per
    // partition; the processor keeps one per partition on the events stream.
    assert_eq!(s["webhook_ordered"], false, "{s}");
    assert_eq!(s["herald_consumers"]["processed"], 1, "{s}");
    assert_eq!(s["herald_consumers"]["events"], 4, "{s}");
    assert_eq!(s["rate"], 300, "{s}");
    assert_eq!(s["duration_s"], 4, "{s}");
    assert_eq!(s["warmup_s"], 1, "{s}");
    positive(&s, "/machine/cores");
    for process in [
        "ingest",
        "processor",
        "activator",
        "nats-server",
        "herald-bench",
    ] {
        for field in ["start_mib", "end_mib", "peak_mib"] {
            positive(&s, &format!("/memory/{process}/{field}"));
        }
        assert!(
            s["memory"][process]["slope_mib_per_h"].is_number(),
            "{process}: {s}"
        );
        assert!(
            stdout.contains(&format!("\n  {process} ")),
            "{process} row in:\n{stdout}"
        );
    }
    // Samples at 0, 1, 2, 3 and 4 s: four from the warm-up on.
    let samples = s["samples"]
        .as_array()
        .with_context(|| format!("samples in {s}"))?;
    assert_eq!(samples.len(), 5, "{s}");
    assert_eq!(s["samples_after_warmup"], 4, "{s}");
    for sample in samples {
        assert!(sample["t_s"].is_number(), "{sample}");
        assert!(sample["events_accepted"].is_u64(), "{sample}");
        assert!(sample["events_arrived"].is_u64(), "{sample}");
        assert!(sample["backlog"].is_u64(), "{sample}");
        positive(sample, "/rss_mib/processor");
    }
    positive(&samples[4], "/events_arrived");
    positive(&s, "/events_accepted");
    assert_eq!(s["events_delivered"], s["events_accepted"], "{s}");
    // With batch_max 20 the activator sent some requests of several events.
    let (requests, delivered) = (
        s["sink_requests"].as_u64().context("sink_requests")?,
        s["events_delivered"].as_u64().context("events_delivered")?,
    );
    assert!(requests > 0 && requests < delivered, "{s}");
    assert_eq!(s["drained"], true, "{s}");
    for q in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
        positive(&s, &format!("/freshness/{q}"));
    }
    positive(&s, "/cpu_s/nats-server");
    for text in [
        "herald-bench soak: 300 ev/s offered for 4 s",
        "after a 1 s warm-up",
        "slope MiB/h",
        "freshness over the run (ms): p50",
    ] {
        assert!(stdout.contains(text), "{text:?} missing in:\n{stdout}");
    }
    assert!(
        stderr.contains("[soak]"),
        "a progress line per sample:\n{stderr}"
    );
    Ok(())
}
