//! What the benchmarks measure with and how they print it: latency histograms, the
//! once-a-second progress line, resident memory, the machine and its load.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Request latencies in microseconds (1 µs to 60 s, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(us.max(1));
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    /// The quantile `q` (0..=1) in milliseconds; 0 when empty.
    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// `{"p50_ms", "p99_ms", "p999_ms", "max_ms"}`.
    pub fn json(&self) -> Value {
        json!({
            "p50_ms": round3(self.ms(0.5)),
            "p99_ms": round3(self.ms(0.99)),
            "p999_ms": round3(self.ms(0.999)),
            "max_ms": round3(self.ms(1.0)),
        })
    }

    /// `{"p50_ms", "p90_ms", "p99_ms", "max_ms"}`: the freshness quantiles of the pipeline
    /// bench.
    pub fn json_p90(&self) -> Value {
        json!({
            "p50_ms": round3(self.ms(0.5)),
            "p90_ms": round3(self.ms(0.9)),
            "p99_ms": round3(self.ms(0.99)),
            "max_ms": round3(self.ms(1.0)),
        })
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// `p50 1.23 ms, p99 4.56 ms, p999 7.89 ms`.
    pub fn summary(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms",
            self.ms(0.5),
            self.ms(0.99),
            self.ms(0.999)
        )
    }
}

/// Failed requests or publishes by cause (`http_503`, `transport`, `puback`, ...).
#[derive(Debug, Clone, Default)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    /// Counts one failure.
    pub fn add(&mut self, cause: impl Into<String>) {
        *self.0.entry(cause.into()).or_default() += 1;
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, other: &Errors) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// `none` or `http_503: 4, transport: 1`.
    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// As a JSON object.
    pub fn json(&self) -> Value {
        json!(self.0)
    }
}

/// Counters a running phase updates and the progress line reads.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events done (acknowledged, accepted or processed).
    pub done: AtomicU64,
    /// Failures.
    pub errors: AtomicU64,
}

/// Prints one line a second to stderr while a phase runs, and one when it ends: elapsed time,
/// the rate since the previous line, the total, failures, and whatever `extra` adds.
pub struct Progress {
    counters: Arc<Counters>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Progress {
    /// Starts printing for phase `label`.
    pub fn start(label: &str, extra: impl Fn() -> String + Send + 'static) -> Self {
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (counters, stop, label) = (counters.clone(), stop.clone(), label.to_string());
            async move {
                let start = Instant::now();
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + Duration::from_secs(1),
                    Duration::from_secs(1),
                );
                let (mut last, mut last_at) = (0u64, start);
                loop {
                    // The phase's end prints a last line too, so even a phase shorter than a
                    // second shows its total.
                    let last_line = tokio::select! {
                        _ = stop.cancelled() => true,
                        _ = tick.tick() => false,
                    };
                    let now = Instant::now();
                    let done = counters.done.load(Ordering::Relaxed);
                    let rate = (done - last) as f64 / (now - last_at).as_secs_f64();
                    (last, last_at) = (done, now);
                    eprintln!(
                        "  [{label}] {:>4.0}s  {:>9}/s  total {:>10}  errors {}{}",
                        (now - start).as_secs_f64(),
                        thousands(rate as u64),
                        thousands(done),
                        counters.errors.load(Ordering::Relaxed),
                        extra(),
                    );
                    if last_line {
                        return;
                    }
                }
            }
        });
        Self {
            counters,
            stop,
            task,
        }
    }

    /// The counters to update.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Stops printing.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The samples of a Prometheus text exposition: `(metric name, labels text, value)`, comments
/// and unparsable lines skipped (`x_total{a="1",b="2"} 3` gives `("x_total", "a=\"1\",b=\"2\"", 3.0)`).
pub fn samples(exposition: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse::<f64>().ok()?;
            Some(match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}')?, value),
                None => (series, "", value),
            })
        })
}

/// The samples of counter `name` in a Prometheus exposition, by the value of `label` (one
/// entry per value, summed over the other labels).
pub fn counter_by_label(exposition: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (_, labels, value) in samples(exposition).filter(|(n, _, _)| *n == name) {
        let key = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.trim() == label)
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
            .unwrap_or_default();
        *out.entry(key).or_default() += value as u64;
    }
    out
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Rounds to three decimals (for JSON output).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `a / b`, rounded to three decimals; 0 when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { round3(a / b) } else { 0.0 }
}

/// A field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`) in MiB; 0 where unavailable.
pub fn pid_status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| round3(kib / 1024.0))
        .unwrap_or(0.0)
}

/// CPU time (user and system, all threads) a process has used, in seconds: this process when
/// `pid` is `None`. Reads `/proc/<pid>/stat` (clock ticks of 1/100 s); 0 where unavailable.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_string(),
        |p| format!("/proc/{p}/stat"),
    );
    stat_cpu_seconds(std::path::Path::new(&path))
}

/// User plus system seconds from a `stat` file of `/proc`.
fn stat_cpu_seconds(path: &std::path::Path) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The name of the threads the HTTP load generator runs on (so its CPU time can be told
/// apart from the service's).
pub const CLIENT_THREADS: &str = "bench-client";

/// CPU time, in seconds, of this process's threads named `name`.
pub fn threads_cpu_seconds(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .map(|t| stat_cpu_seconds(&t.path().join("stat")))
        .sum()
}

/// `n` over `elapsed`, per second (0 elapsed counts as a nanosecond).
pub fn per_second(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Cores used over a phase by this process, by its load-generator threads, and by
/// nats-server.
pub struct CpuMeter {
    nats_pid: u32,
    at: Instant,
    own: f64,
    client: f64,
    nats: f64,
    /// A service under test running as a process of its own, and its CPU time at the start.
    service: Option<(u32, f64)>,
}

impl CpuMeter {
    /// Starts measuring.
    pub fn start(nats_pid: u32) -> Self {
        Self {
            nats_pid,
            at: Instant::now(),
            own: cpu_seconds(None),
            client: threads_cpu_seconds(CLIENT_THREADS),
            nats: cpu_seconds(Some(nats_pid)),
            service: None,
        }
    }

    /// Starts measuring, counting apart the service process `pid` as well.
    pub fn with_service(nats_pid: u32, pid: u32) -> Self {
        Self {
            service: Some((pid, cpu_seconds(Some(pid)))),
            ..Self::start(nats_pid)
        }
    }

    /// Average cores used since the start: `{"bench_process", "http_client", "nats_server"}`
    /// (`http_client` is part of `bench_process`), and `service_process` when measured apart.
    pub fn stop(&self) -> Value {
        let secs = self.at.elapsed().as_secs_f64().max(1e-9);
        let mut v = json!({
            "bench_process": round3((cpu_seconds(None) - self.own) / secs),
            "http_client": round3((threads_cpu_seconds(CLIENT_THREADS) - self.client) / secs),
            "nats_server": round3((cpu_seconds(Some(self.nats_pid)) - self.nats) / secs),
        });
        if let Some((pid, start)) = self.service {
            v["service_process"] = json!(round3((cpu_seconds(Some(pid)) - start) / secs));
        }
        v
    }
}

/// CPU seconds of named processes over a span (each service, nats-server, the bench itself),
/// and their peak resident memory (the kernel's `VmHWM`).
pub struct ProcessCpu {
    start: Vec<(String, u32, f64)>,
}

impl ProcessCpu {
    /// Starts measuring the processes `(name, pid)`.
    pub fn start(processes: &[(String, u32)]) -> Self {
        Self {
            start: processes
                .iter()
                .map(|(name, pid)| (name.clone(), *pid, cpu_seconds(Some(*pid))))
                .collect(),
        }
    }

    /// CPU seconds each process used since the start: `{"<name>": seconds, ...}`.
    pub fn stop(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .start
            .iter()
            .map(|(name, pid, at)| {
                (
                    name.clone(),
                    json!(round3((cpu_seconds(Some(*pid)) - at).max(0.0))),
                )
            })
            .collect();
        Value::Object(map)
    }

    /// Each process's peak resident memory so far, in MiB: `{"<name>": mib, ...}`.
    pub fn peak_rss_mib(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .start
            .iter()
            .map(|(name, pid, _)| (name.clone(), json!(pid_status_mib(*pid, "VmHWM"))))
            .collect();
        Value::Object(map)
    }
}

/// `cpu: herald-bench 1.20 (HTTP client 0.20) + nats-server 0.70 cores`; with a service process
/// measured apart, `cpu: service 0.90 + herald-bench 0.05 + nats-server 0.70 cores`.
pub fn cpu_summary(cpu: &Value) -> String {
    let client = cpu["http_client"].as_f64().unwrap_or(0.0);
    let service = cpu["service_process"]
        .as_f64()
        .map_or(String::new(), |c| format!("service {c:.2} + "));
    format!(
        "cpu: {service}herald-bench {:.2}{} + nats-server {:.2} cores",
        cpu["bench_process"].as_f64().unwrap_or(0.0),
        if client > 0.0 {
            format!(" (HTTP client {client:.2})")
        } else {
            String::new()
        },
        cpu["nats_server"].as_f64().unwrap_or(0.0)
    )
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|w| w.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// The machine: CPU model, cores, memory.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": round3(mem_kib / 1024.0 / 1024.0),
    })
}

/// Ends a report: the load-average line, then the one-line JSON summary: what every bench
/// records (`bench`, `nats_server`, `machine`, the load averages before and after), then the
/// bench's own `fields`.
pub fn print_summary(
    bench: &str,
    nats_version: &str,
    load_before: [f64; 3],
    load_after: [f64; 3],
    fields: Value,
) {
    println!(
        "  load average {:.2} before, {:.2} after (1 min)",
        load_before[0], load_after[0]
    );
    let mut summary = json!({
        "bench": bench,
        "nats_server": nats_version,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
    });
    if let (Some(all), Value::Object(own)) = (summary.as_object_mut(), fields) {
        all.extend(own);
    }
    println!("{summary}");
}

/// Prints the machine and its load before a benchmark.
pub fn print_machine(nats_version: &str) {
    let m = machine();
    let load = load_average();
    eprintln!(
        "machine: {} ({} cores, {:.1} GiB); nats-server {nats_version}; load average {:.2} {:.2} {:.2}",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"].as_f64().unwrap_or(0.0),
        load[0],
        load[1],
        load[2]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_by_label_sums_each_label_value() {
        let text = "# TYPE x_total counter\n\
                    x_total{outcome=\"committed\",source=\"a\"} 3\n\
                    x_total{source=\"b\",outcome=\"committed\"} 4\n\
                    x_total{outcome=\"too_large\"} 1\n\
                    x_total_other{outcome=\"committed\"} 100\n";
        let got = counter_by_label(text, "x_total", "outcome");
        assert_eq!(got.get("committed"), Some(&7));
        assert_eq!(got.get("too_large"), Some(&1));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn thousands_groups_digits() {
        for (n, s) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (1234567, "1,234,567"),
        ] {
            assert_eq!(thousands(n), s);
        }
    }

    #[test]
    fn latency_quantiles_in_ms() {
        let mut l = Latency::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        assert!((l.ms(0.5) - 50.0).abs() < 0.1, "{}", l.ms(0.5));
        assert!((l.ms(0.99) - 99.0).abs() < 0.1, "{}", l.ms(0.99));
        assert_eq!(Latency::default().ms(0.99), 0.0);
    }

    #[test]
    fn errors_merge_and_summarise() {
        let mut a = Errors::default();
        a.add("http_503");
        let mut b = Errors::default();
        b.add("http_503");
        b.add("transport");
        a.merge(&b);
        assert_eq!(a.summary(), "http_503: 2, transport: 1");
        assert_eq!(Errors::default().summary(), "none");
    }

    #[test]
    fn cpu_time_of_this_process_is_read() {
        let start = cpu_seconds(None);
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(None) >= start);
        assert_eq!(cpu_seconds(Some(u32::MAX)), 0.0);
        assert_eq!(threads_cpu_seconds("no-such-thread"), 0.0);
    }

    #[test]
    fn ratio_guards_division_by_zero() {
        assert_eq!(ratio(1.0, 0.0), 0.0);
        assert_eq!(ratio(2.0, 3.0), 0.667);
    }
}
