//! Logs (tracing) and metrics (one Prometheus recorder per process).
//!
//! Every metric family shows on `/metrics` from start-up: each service describes all its
//! metrics and publishes zero-valued series where it knows the label values
//! ([`zero_counters`], [`zero_gauges`], [`zero_histograms`]); [`render`] adds HELP and TYPE
//! lines for the described metrics that have no series yet.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::sync::{Mutex, OnceLock};

use metrics::{
    Counter, Gauge, Histogram, IntoLabels, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
pub use metrics_exporter_prometheus::PrometheusHandle;

pub use crate::events::RuntimeStarted;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, formatting};
use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Latency buckets (seconds) for every `_seconds` histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The buckets (seconds) every `_freshness_seconds` histogram (receipt to delivery) adds above
/// [`LATENCY_BUCKETS`], up to an hour, so a backlog's age shows (the freshness alert's 60 s
/// objective among them) instead of piling up above 10 s.
const FRESHNESS_EXTRA_BUCKETS: &[f64] = &[30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// Size buckets (bytes) for every `_bytes` histogram.
pub const SIZE_BUCKETS: &[f64] = &[
    256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder on first call and returns its handle; later
/// calls return the same handle (several services in one process share it).
pub fn metrics() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // Of several matching suffixes the exporter takes the first in their sort order:
            // "_freshness_seconds" before "_seconds" (a test holds this).
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_freshness_seconds".into()),
                        &[LATENCY_BUCKETS, FRESHNESS_EXTRA_BUCKETS].concat(),
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), SIZE_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(Describing(recorder))
                .expect("the metrics recorder is installed once per process");
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets without a scrape.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds every histogram's recorded samples into its buckets every [`UPKEEP_EVERY`], on a
/// thread of its own. The recorder keeps each sample (16 bytes and a timestamp) until then, and
/// otherwise only a scrape does it: a service nobody scrapes (`herald dev`, a bench, a broken
/// Prometheus) grew by about 24 bytes an event without end.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are folded only when scraped");
    }
}

/// The described metrics (name to type and HELP text), for [`render`].
static DESCRIBED: Mutex<BTreeMap<String, (&'static str, String)>> = Mutex::new(BTreeMap::new());

/// The Prometheus recorder, remembering what is described so that [`render`] can show the
/// metrics that have no series yet.
struct Describing<R>(R);

impl<R> Describing<R> {
    fn remember(key: &KeyName, kind: &'static str, description: &SharedString) {
        DESCRIBED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.as_str().to_string(), (kind, description.to_string()));
    }
}

impl<R: Recorder> Recorder for Describing<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        Self::remember(&key, "counter", &description);
        self.0.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        Self::remember(&key, "gauge", &description);
        self.0.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        Self::remember(&key, "histogram", &description);
        self.0.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(key, metadata)
    }
}

/// The Prometheus exposition of `handle`, plus HELP and TYPE lines for every described metric
/// that has no series yet (its label values are not known before its first event): every
/// family Herald describes shows from start-up. The admin server's `/metrics`.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    let present: std::collections::HashSet<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut missing = String::new();
    for (name, (kind, help)) in DESCRIBED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        if !present.contains(name.as_str()) {
            formatting::write_help_line(&mut missing, name, None, None, help);
            formatting::write_type_line(&mut missing, name, None, None, kind);
            let _ = writeln!(missing);
        }
    }
    out.push_str(&missing);
    out
}

/// Publishes counter `name` at 0 with each of `series`' label sets (a value it has is kept), so
/// dashboards and alerts see the series before its first event.
pub fn zero_counters<L>(name: &'static str, series: impl IntoIterator<Item = L>)
where
    for<'a> &'a L: IntoLabels,
{
    for labels in series {
        metrics::counter!(name, &labels).increment(0);
    }
}

/// Publishes gauge `name` with each of `series`' label sets (at 0 unless it has a value).
pub fn zero_gauges<L>(name: &'static str, series: impl IntoIterator<Item = L>)
where
    for<'a> &'a L: IntoLabels,
{
    for labels in series {
        metrics::gauge!(name, &labels).increment(0.0);
    }
}

/// Publishes histogram `name` with each of `series`' label sets (empty buckets until its first
/// observation).
pub fn zero_histograms<L>(name: &'static str, series: impl IntoIterator<Item = L>)
where
    for<'a> &'a L: IntoLabels,
{
    for labels in series {
        let _ = metrics::histogram!(name, &labels);
    }
}

/// No labels: `zero_counters(NAME, [NO_LABELS])` publishes one unlabelled series.
pub const NO_LABELS: [(&str, &str); 0] = [];

/// Starts logging to stderr, with colours only when stderr is a terminal. Safe to call more
/// than once (later calls do nothing).
pub fn init_tracing(cfg: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| cfg.filter.clone())
        .unwrap_or_else(|| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if cfg.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upper bounds of `name`'s buckets in `text`.
    fn bounds(text: &str, name: &str) -> Vec<String> {
        let prefix = format!("{name}_bucket{{le=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|l| l.split('"').next())
            .map(str::to_string)
            .collect()
    }

    /// This process's resident memory, MiB.
    fn rss_mib() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS");
        kib / 1024.0
    }

    #[test]
    fn unscraped_histograms_do_not_grow_without_end() {
        let _handle = metrics();
        // 2,000,000 samples a round: about 48 MiB if they were kept until a scrape. Nothing
        // scrapes here; the upkeep thread folds them into buckets and frees them, so the
        // second and third rounds reuse the first one's memory.
        let round = || {
            for i in 0..2_000_000u32 {
                metrics::histogram!("herald_test_unscraped_seconds").record(f64::from(i % 100));
            }
            std::thread::sleep(UPKEEP_EVERY + std::time::Duration::from_secs(1));
        };
        round();
        let after_one = rss_mib();
        round();
        round();
        let grown = rss_mib() - after_one;
        assert!(
            grown < 24.0,
            "resident memory grew {grown:.1} MiB over two more rounds"
        );
    }

    #[test]
    fn freshness_histograms_reach_an_hour_and_other_latencies_stop_at_ten_seconds() {
        let handle = metrics();
        metrics::histogram!("herald_test_freshness_seconds").record(90.0);
        metrics::histogram!("herald_test_wait_seconds").record(0.2);
        let text = render(&handle);
        let freshness = bounds(&text, "herald_test_freshness_seconds");
        assert_eq!(
            freshness.len(),
            LATENCY_BUCKETS.len() + FRESHNESS_EXTRA_BUCKETS.len() + 1,
            "{freshness:?}"
        );
        for le in ["0.0005", "10", "60", "120", "3600", "+Inf"] {
            assert!(freshness.iter().any(|b| b == le), "{le} in {freshness:?}");
        }
        let wait = bounds(&text, "herald_test_wait_seconds");
        assert_eq!(wait.len(), LATENCY_BUCKETS.len() + 1, "{wait:?}");
        assert!(!wait.iter().any(|b| b == "60"), "{wait:?}");
    }
}
