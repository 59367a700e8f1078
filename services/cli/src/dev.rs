//! `herald dev`: a nats-server child, the three services in one process, a default source and a
//! log destination: a working Herald on a laptop with one command.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use figment::Figment;
use figment::providers::Serialized;
use herald_activator::{DestinationConfig, DestinationKind};
use herald_common::{Secret, natsbin, server, telemetry};
use herald_ingest::SourceConfig;
use rand::Rng;
use tokio::process::{Child, Command};

use crate::config::Config;

/// Options of `herald dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Address of the Segment/mParticle HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub ingest_addr: String,
    /// Write key of the default source (default: reused from the data dir, else generated).
    #[arg(long)]
    pub write_key: Option<String>,
    /// File the log destination appends event lines to (default: stdout).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Where nats-server keeps its store and Herald its generated keys.
    #[arg(long, default_value = "./.herald")]
    pub data_dir: PathBuf,
}

/// Dev defaults: every port on loopback, the ports of the documented defaults.
fn dev_layer() -> Figment {
    Figment::new()
        .merge(Serialized::default("ingest.grpc_addr", "127.0.0.1:50051"))
        .merge(Serialized::default("ingest.admin_addr", "127.0.0.1:9091"))
        .merge(Serialized::default(
            "processor.grpc_addr",
            "127.0.0.1:50052",
        ))
        .merge(Serialized::default(
            "processor.admin_addr",
            "127.0.0.1:9092",
        ))
        .merge(Serialized::default(
            "activator.grpc_addr",
            "127.0.0.1:50053",
        ))
        .merge(Serialized::default(
            "activator.admin_addr",
            "127.0.0.1:9093",
        ))
}

/// Runs `herald dev` until Ctrl-C or SIGTERM.
pub async fn run(config_file: Option<&Path>, args: DevArgs) -> Result<()> {
    let mut cfg = Config::load(config_file, Some(dev_layer()))?;
    telemetry::init_tracing(&cfg.log);
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data dir {}: pass a writable --data-dir",
            args.data_dir.display()
        )
    })?;
    let data_dir = args.data_dir.canonicalize()?;

    let (mut nats_child, nats_url) = start_nats(&data_dir).await?;
    let write_key = match args.write_key {
        Some(k) => k,
        None => reuse_or_generate(&data_dir.join("write_key"))?,
    };

    cfg.nats.servers = nats_url.clone();
    cfg.ingest.http_addr = args.ingest_addr.clone();
    cfg.ingest.sources.push(SourceConfig {
        id: "default".into(),
        name: "Default source (herald dev)".into(),
        write_key: Secret(write_key.clone()),
        write_secret: None,
        enabled: true,
    });
    cfg.activator.destinations.push(DestinationConfig {
        id: "log".into(),
        kind: DestinationKind::Log,
        url: None,
        timeout_ms: 10_000,
        log_file: args.log_file.clone(),
    });

    let metrics = telemetry::metrics();
    let shutdown = server::shutdown_on_signals();
    let common = cfg.common();
    let ingest = herald_ingest::start(&common, &cfg.ingest, metrics.clone(), shutdown.clone())
        .await
        .context("starting ingest")?;
    let processor =
        herald_processor::start(&common, &cfg.processor, metrics.clone(), shutdown.clone())
            .await
            .context("starting the processor")?;
    let activator = herald_activator::start(&common, &cfg.activator, metrics, shutdown.clone())
        .await
        .context("starting the activator")?;
    let services = [ingest, processor, activator];

    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &services {
        wait_ready(s.name, s.admin_addr, deadline).await?;
    }
    let http = services[0].http_addr.expect("ingest has an HTTP address");
    eprintln!(
        "\nHerald is running (NATS at {nats_url}, data in {}).\n\
         \n  ingest     http://{http}  gRPC {}  admin http://{}\
         \n  processor  gRPC {}  admin http://{}\
         \n  activator  gRPC {}  admin http://{}\
         \n\nDefault source write key: {write_key}\
         \nDelivered events are written as JSON lines to {}.\
         \n\nSend an event:\n\n  curl -u '{write_key}:' http://{http}/v1/track -H 'Content-Type: application/json' -d '{{\"userId\":\"user-1\",\"event\":\"Signed Up\",\"properties\":{{\"plan\":\"pro\"}}}}'\n\
         \nPress Ctrl-C to stop.\n",
        data_dir.display(),
        services[0].grpc_addr,
        services[0].admin_addr,
        services[1].grpc_addr,
        services[1].admin_addr,
        services[2].grpc_addr,
        services[2].admin_addr,
        args.log_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "stdout".into()),
    );

    tokio::select! {
        _ = shutdown.cancelled() => {}
        status = nats_child.wait() => {
            shutdown.cancel();
            for s in services { let _ = s.task.await; }
            bail!("nats-server exited ({status:?}); see {}", data_dir.join("nats-server.log").display());
        }
    }
    for s in services {
        let _ = s.task.await;
    }
    let _ = nats_child.kill().await;
    eprintln!("Herald stopped.");
    Ok(())
}

/// Starts nats-server with JetStream, its store under the data dir, on a free loopback port.
async fn start_nats(data_dir: &Path) -> Result<(Child, String)> {
    let mut roots = vec![std::env::current_dir()?];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    let binary = natsbin::find(&roots).map_err(anyhow::Error::msg)?;
    let run_dir = data_dir.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let log = std::fs::File::create(data_dir.join("nats-server.log"))?;
    let child = Command::new(&binary)
        .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
        .arg(data_dir.join("nats"))
        .arg("--ports_file_dir")
        .arg(&run_dir)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(url) = read_ports_file(&run_dir) {
            return Ok((child, url));
        }
        if Instant::now() > deadline {
            bail!(
                "nats-server did not start within 15 s; see {}",
                data_dir.join("nats-server.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_ports_file(dir: &Path) -> Option<String> {
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.extension().is_some_and(|e| e == "ports") {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            return v["nats"][0].as_str().map(str::to_string);
        }
    }
    None
}

/// Reads a key saved by an earlier run, or generates and saves one.
pub fn reuse_or_generate(path: &Path) -> Result<String> {
    if let Ok(k) = std::fs::read_to_string(path) {
        let k = k.trim();
        if !k.is_empty() {
            return Ok(k.to_string());
        }
    }
    let bytes: [u8; 16] = rand::rng().random();
    let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(path, &key).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(key)
}

async fn wait_ready(name: &str, admin: std::net::SocketAddr, deadline: Instant) -> Result<()> {
    let url = format!("http://{admin}/readyz");
    let client = reqwest::Client::new();
    loop {
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            _ if Instant::now() > deadline => {
                let why = match client.get(&url).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                bail!("{name} did not become ready within 60 s: {why}");
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
