//! Every metric from start-up: each service shows its metric families on `/metrics` as soon as
//! it is ready; `promtool check metrics` accepts each exposition; and every metric name a panel
//! of the Grafana dashboard or an alert of the Prometheus rules queries is on a freshly started
//! service's `/metrics`.
//!
//! The services start in this test's own process (nextest runs each test in its own), through
//! the library functions the binary calls, one after the other; each is scraped right after it
//! is ready, before the next starts. They share the process's one recorder, so a scrape shows
//! the families of the services started so far.
//!
//! promtool comes from Debian's `prometheus` package (scripts/test.sh installs it when missing).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use herald_activator::{ActivatorConfig, DestinationConfig, DestinationKind, Settings};
use herald_common::{CommonConfig, ControlConfig, NatsConfig, Secret, telemetry};
use herald_e2e::processor_config;
use herald_ingest::{IngestConfig, SourceConfig};
use herald_testkit::{NatsServer, WebhookServer, wait_ready};
use tokio_util::sync::CancellationToken;

const READY: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `promtool` on PATH, or a failure saying how to get it.
fn promtool() -> Result<Command> {
    match Command::new("promtool").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(Command::new("promtool")),
        Ok(out) => bail!(
            "promtool --version failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => bail!(
            "promtool is not on PATH ({e}): install Debian's prometheus package \
             (apt-get install prometheus; scripts/test.sh does it when missing)"
        ),
    }
}

/// Runs `promtool check metrics` on an exposition; fails with promtool's report.
fn promtool_check_metrics(service: &str, exposition: &str) -> Result<()> {
    let mut child = promtool()?
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool check metrics")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics fails on {service}'s /metrics (exit {:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The metric names a PromQL query can select in an exposition: each sample's name, and each
/// `# TYPE`d family (a family with no series yet), with `_bucket`, `_sum` and `_count` for
/// histograms.
fn exposed_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_string());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            names.insert(name.to_string());
        }
    }
    names
}

/// Herald metric names (`herald_...`) in a PromQL expression.
fn herald_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("herald_") {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The `expr` of every panel target of a Grafana dashboard (rows' nested panels included).
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(e)) = map.get("expr") {
                    exprs.push(e.clone());
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    exprs
}

/// The `expr` of every rule of a Prometheus rules file: `expr: <inline>` or a block scalar
/// (`expr: |`) whose lines are indented deeper than the key.
fn rule_exprs(rules: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let indent = line.len() - line.trim_start().len();
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if !rest.starts_with(['|', '>']) {
            exprs.push(rest.to_string());
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let next_indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && next_indent <= indent {
                break;
            }
            block.push_str(next.trim());
            block.push('\n');
            lines.next();
        }
        exprs.push(block);
    }
    exprs
}

/// The names `queries` use that neither an exposition shows nor the allow-list names (a
/// histogram's `_bucket`, `_sum`, `_count` count as its own name there).
fn missing_names(
    queries: &[(String, String)],
    exposed: &BTreeSet<String>,
    allowed: &[&str],
) -> Vec<String> {
    let allowed = |name: &str| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        allowed.contains(&name) || allowed.contains(&base)
    };
    let mut missing = Vec::new();
    for (place, expr) in queries {
        for name in herald_names(expr) {
            if !exposed.contains(&name) && !allowed(&name) {
                missing.push(format!("{name} (in {place})"));
            }
        }
    }
    missing
}

/// The panel queries of deploy/grafana/herald.json and the alert expressions of
/// deploy/prometheus/rules.yml, each with where it comes from.
fn dashboard_and_alert_queries() -> Result<Vec<(String, String)>> {
    let root = repo_root();
    let dashboard_path = root.join("deploy/grafana/herald.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&dashboard_path)
            .with_context(|| format!("reading {}", dashboard_path.display()))?,
    )
    .context("deploy/grafana/herald.json is not JSON")?;
    let rules_path = root.join("deploy/prometheus/rules.yml");
    let rules = std::fs::read_to_string(&rules_path)
        .with_context(|| format!("reading {}", rules_path.display()))?;
    let mut queries: Vec<(String, String)> = dashboard_exprs(&dashboard)
        .into_iter()
        .map(|e| ("deploy/grafana/herald.json".to_string(), e))
        .collect();
    let panel_queries = queries.len();
    queries.extend(
        rule_exprs(&rules)
            .into_iter()
            .map(|e| ("deploy/prometheus/rules.yml".to_string(), e)),
    );
    ensure!(
        panel_queries >= 7 && queries.len() > panel_queries,
        "found {panel_queries} panel queries and {} alert expressions: the files did not parse as expected",
        queries.len() - panel_queries
    );
    Ok(queries)
}

/// The families and one zero-valued series each service shows right after it is ready.
fn expected_at_start(role: &str) -> (&'static [&'static str], &'static str) {
    match role {
        "ingest" => (
            &[
                "herald_ingest_requests_total",
                "herald_ingest_events_accepted_total",
                "herald_ingest_events_rejected_total",
                "herald_ingest_quarantined_total",
            ],
            r#"herald_ingest_events_accepted_total{source="web"} 0"#,
        ),
        "processor" => (
            &[
                "herald_processor_events_total",
                "herald_processor_partition_lag_events",
                "herald_processor_owned_partitions",
                "herald_processor_cas_conflicts_total",
            ],
            r#"herald_processor_partition_lag_events{partition="0"} 0"#,
        ),
        _ => (
            &[
                "herald_activator_deliveries_total",
                "herald_activator_send_failures_total",
            ],
            r#"herald_activator_deliveries_total{destination="hook",outcome="delivered"} 0"#,
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_shows_from_start_up_and_passes_promtool() -> Result<()> {
    let queries = dashboard_and_alert_queries()?;
    let nats = NatsServer::start().await?;
    let hook = WebhookServer::start().await?;
    let common = CommonConfig {
        nats: NatsConfig {
            servers: nats.url(),
            request_timeout_ms: 2_000,
            ..Default::default()
        },
        control: ControlConfig::with_token("metrics-test-control-token"),
        ..Default::default()
    };
    let ingest_cfg = IngestConfig {
        http_addr: "127.0.0.1:0".into(),
        grpc_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        sources: vec![SourceConfig {
            id: "web".into(),
            name: "Web".into(),
            write_key: Secret("metrics-key".into()),
            write_secret: None,
            enabled: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let activator_cfg = ActivatorConfig {
        grpc_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        destinations: vec![DestinationConfig {
            id: "hook".into(),
            kind: DestinationKind::Webhook,
            settings: Settings([("url".to_string(), hook.url())].into_iter().collect()),
            ..Default::default()
        }],
        allow_private_networks: vec!["127.0.0.0/8".parse()?],
        ..Default::default()
    };
    let metrics = telemetry::metrics();
    let shutdown = CancellationToken::new();
    let http = reqwest::Client::new();
    let mut exposed = BTreeSet::new();
    let mut services = Vec::new();
    // In pipeline order: the processor needs the events stream, the activator the consent
    // bucket the processor creates.
    for role in ["ingest", "processor", "activator"] {
        let service = match role {
            "ingest" => {
                herald_ingest::start(&common, &ingest_cfg, metrics.clone(), shutdown.clone())
                    .await?
            }
            "processor" => {
                herald_processor::start(
                    &common,
                    &processor_config(),
                    metrics.clone(),
                    shutdown.clone(),
                )
                .await?
            }
            _ => {
                herald_activator::start(&common, &activator_cfg, metrics.clone(), shutdown.clone())
                    .await?
            }
        };
        let admin: SocketAddr = service.admin_addr;
        wait_ready(&format!("{role} is ready"), admin, READY).await?;
        let exposition = http
            .get(format!("http://{admin}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        promtool_check_metrics(role, &exposition)?;
        let names = exposed_names(&exposition);
        let (families, zero_series) = expected_at_start(role);
        for name in families {
            ensure!(
                names.contains(*name),
                "{role}'s /metrics right after start has no {name}:\n{exposition}"
            );
        }
        ensure!(
            exposition.lines().any(|l| l == zero_series),
            "{role}'s /metrics right after start has no `{zero_series}`:\n{exposition}"
        );
        exposed.extend(names);
        services.push(service);
    }

    let missing = missing_names(&queries, &exposed, &[]);
    ensure!(
        missing.is_empty(),
        "metric names queried by the dashboard or the alerts that no freshly started service \
         shows on /metrics: {missing:?}"
    );
    shutdown.cancel();
    for s in services {
        let _ = s.task.await;
    }
    Ok(())
}

#[test]
fn dashboard_queries_parse_as_promql() -> Result<()> {
    // promtool parses PromQL in rule files only: each panel query becomes a recording rule,
    // with Grafana's $__rate_interval as 5m.
    let queries = dashboard_and_alert_queries()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("dashboard-queries.yml");
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (place, expr)) in queries.iter().enumerate() {
        if place.ends_with(".json") {
            let expr = expr.replace("$__rate_interval", "5m");
            text.push_str(&format!(
                "      - record: dashboard:query{i}\n        expr: {}\n",
                serde_json::to_string(&expr)?
            ));
        }
    }
    std::fs::write(&path, text)?;
    let out = promtool()?.args(["check", "rules"]).arg(&path).output()?;
    ensure!(
        out.status.success(),
        "a query of deploy/grafana/herald.json is not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_queried_name_no_service_shows_is_reported() {
    let exposition = "# HELP herald_a_total A.\n# TYPE herald_a_total counter\n\
                      herald_a_total{x=\"1\"} 0\n\n# TYPE herald_h_seconds histogram\n";
    let exposed = exposed_names(exposition);
    let queries = vec![
        (
            "dashboard".to_string(),
            "sum(rate(herald_a_total[5m])) / sum(rate(herald_h_seconds_count[5m]))".to_string(),
        ),
        (
            "rules".to_string(),
            "histogram_quantile(0.99, rate(herald_future_seconds_bucket[5m])) > 1 and herald_gone_events > 0"
                .to_string(),
        ),
    ];
    assert_eq!(
        missing_names(&queries, &exposed, &["herald_future_seconds"]),
        vec!["herald_gone_events (in rules)".to_string()],
        "only the name neither exposed nor allowed is reported"
    );
    assert_eq!(
        missing_names(&queries, &exposed, &[]),
        vec![
            "herald_future_seconds_bucket (in rules)".to_string(),
            "herald_gone_events (in rules)".to_string()
        ]
    );
}

#[test]
fn rule_expressions_are_read_inline_and_as_blocks() {
    let rules = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: herald_a_total > 0\n\
                 \x20     - alert: B\n        expr: |\n          sum(herald_b_events)\n            > 1\n\
                 \x20       for: 5m\n";
    assert_eq!(
        rule_exprs(rules),
        vec![
            "herald_a_total > 0".to_string(),
            "sum(herald_b_events)\n> 1\n".to_string()
        ]
    );
}
