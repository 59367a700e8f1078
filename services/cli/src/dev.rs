//! `herald dev`: a nats-server child, the three services in one process, a default source and a
//! log destination: a working Herald on a laptop with one command.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use figment::Figment;
use figment::providers::Serialized;
use herald_activator::destinations::ssrf::DEV_ALLOWED_NETWORKS;
use herald_activator::{DestinationConfig, DestinationKind, Settings};
use herald_common::natsbin::{self, Launch, NatsProcess};
use herald_common::server::ServiceHandle;
use herald_common::{ControlConfig, Secret, server, telemetry};
use herald_ingest::SourceConfig;
use rand::Rng;

use crate::config::{Config, ConfigArg};
use crate::output::hint;

/// Options of `herald dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Address of the Segment/mParticle HTTP API [default: ingest.http_addr from the config or
    /// HERALD__INGEST__HTTP_ADDR, else 127.0.0.1:8080].
    #[arg(long)]
    pub ingest_addr: Option<String>,
    /// Write key of the default source (default: reused from the data dir, else generated).
    #[arg(long)]
    pub write_key: Option<String>,
    /// mParticle secret of the default source, paired with the write key on `/v2/*` (default:
    /// reused from the data dir, else generated).
    #[arg(long)]
    pub write_secret: Option<String>,
    /// File the log destination appends event lines to (default: stdout).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Where nats-server keeps its store and Herald its generated keys.
    #[arg(long, default_value = "./.herald")]
    pub data_dir: PathBuf,
}

/// Dev's log filter when neither `RUST_LOG` nor `log.filter` is set: warnings and errors only,
/// so that the banner, the ready lines and the delivered events are what a first run shows.
const DEV_LOG_FILTER: &str = "warn";

/// The flags of `herald dev` that set a listen address, by config key (for port-clash hints).
const DEV_FLAGS: &[(&str, &str)] = &[("ingest.http_addr", "--ingest-addr")];

/// Dev defaults: every port on loopback, the ports of the documented defaults.
fn dev_layer() -> Figment {
    Figment::new()
        .merge(Serialized::default("ingest.http_addr", "127.0.0.1:8080"))
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
        .merge(Serialized::default("processor.http_addr", "127.0.0.1:8081"))
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
pub async fn run(args: DevArgs) -> Result<()> {
    let mut cfg = Config::load(args.config.config.as_deref(), Some(dev_layer()))?;
    if cfg.log.filter.is_none() {
        cfg.log.filter = Some(DEV_LOG_FILTER.into());
    }
    telemetry::init_tracing(&cfg.log);
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        hint(
            anyhow::Error::new(e).context(format!(
                "cannot create the data dir {}",
                args.data_dir.display()
            )),
            "pass a writable directory with --data-dir",
        )
    })?;
    let data_dir = args.data_dir.canonicalize()?;
    let token_note = control_token(&mut cfg, &data_dir)?;

    let mut nats_child = start_nats(&data_dir).await?;
    let nats_url = nats_child.url().to_owned();
    let write_key = match args.write_key {
        Some(k) => k,
        None => reuse_or_generate(&data_dir.join("write_key"))?,
    };
    let write_secret = match args.write_secret {
        Some(s) => s,
        None => reuse_or_generate(&data_dir.join("write_secret"))?,
    };

    cfg.nats.servers = nats_url.clone();
    if let Some(addr) = args.ingest_addr {
        cfg.ingest.http_addr = addr;
    }
    cfg.ingest.sources.push(SourceConfig {
        id: "default".into(),
        name: "Default source (herald dev)".into(),
        write_key: Secret(write_key.clone()),
        write_secret: Some(Secret(write_secret.clone())),
        enabled: true,
        ..Default::default()
    });
    let mut log_settings = Settings::default();
    if let Some(path) = &args.log_file {
        log_settings
            .0
            .insert("log_file".into(), path.display().to_string());
    }
    cfg.activator.destinations.push(DestinationConfig {
        id: "log".into(),
        kind: DestinationKind::Log,
        settings: log_settings,
        ..Default::default()
    });
    let private_note = allow_private_networks(&mut cfg.activator);

    let metrics = telemetry::metrics();
    let shutdown = server::shutdown_on_signals();
    let common = cfg.common();
    let clash = |e| cfg.bind_hint(e, "herald dev", DEV_FLAGS);
    let ingest = herald_ingest::start(&common, &cfg.ingest, metrics.clone(), shutdown.clone())
        .await
        .context("starting ingest")
        .map_err(clash)?;
    let processor =
        herald_processor::start(&common, &cfg.processor, metrics.clone(), shutdown.clone())
            .await
            .context("starting the processor")
            .map_err(clash)?;
    let activator = herald_activator::start(&common, &cfg.activator, metrics, shutdown.clone())
        .await
        .context("starting the activator")
        .map_err(clash)?;
    let services = [ingest, processor, activator];

    let http = services[0].http_addr.expect("ingest has an HTTP address");
    eprintln!(
        "Herald dev: NATS at {nats_url}, data in {}\n\
         \nDefault source write key: {write_key}\
         \nmParticle key:secret:     {write_key}:{write_secret}\
         \nControl token:            {token_note}\
         \nDelivered events:         JSON lines to {}\
         \nWebhook private networks: {private_note}\
         \n\nSend an event:\
         \n  curl -u '{write_key}:' http://{http}/v1/track -H 'Content-Type: application/json' -d '{{\"userId\":\"user-1\",\"event\":\"Signed Up\",\"properties\":{{\"plan\":\"pro\"}}}}'\n",
        data_dir.display(),
        args.log_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "stdout".into()),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &services {
        wait_ready(s.name, s.admin_addr, deadline).await?;
        eprintln!("{}", ready_line(s));
    }
    eprintln!(
        "\nPress Ctrl-C to stop. Logs show warnings and errors (RUST_LOG=info shows more).\n"
    );

    tokio::select! {
        _ = shutdown.cancelled() => {}
        status = nats_child.wait() => {
            shutdown.cancel();
            for s in services { let _ = s.task.await; }
            return Err(hint(
                anyhow!("nats-server exited ({status:?})"),
                format!("see {}", data_dir.join("nats-server.log").display()),
            ));
        }
    }
    for s in services {
        let _ = s.task.await;
    }
    nats_child.terminate(Duration::from_secs(5)).await;
    eprintln!("Herald stopped.");
    Ok(())
}

/// Lets webhooks reach loopback and private ranges (the SSRF guard refuses them elsewhere),
/// unless the config lists its own `activator.allow_private_networks`. Returns the banner's note.
fn allow_private_networks(cfg: &mut herald_activator::ActivatorConfig) -> String {
    if cfg.allow_private_networks.is_empty() {
        cfg.allow_private_networks = DEV_ALLOWED_NETWORKS
            .iter()
            .map(|n| n.parse().expect("valid built-in CIDR"))
            .collect();
        format!(
            "loopback and private ranges allowed ({}; activator.allow_private_networks)",
            DEV_ALLOWED_NETWORKS.join(", ")
        )
    } else {
        let listed: Vec<String> = cfg
            .allow_private_networks
            .iter()
            .map(ToString::to_string)
            .collect();
        format!(
            "{} allowed (activator.allow_private_networks)",
            listed.join(", ")
        )
    }
}

/// `ingest ready: http://127.0.0.1:8080, gRPC :50051, admin :9091`.
fn ready_line(s: &ServiceHandle) -> String {
    let http = match (s.name, s.http_addr) {
        ("processor", Some(a)) => format!(" http://{a} (profiles),"),
        (_, Some(a)) => format!(" http://{a},"),
        (_, None) => String::new(),
    };
    format!(
        "{} ready:{http} gRPC {}, admin {}",
        s.name,
        short(s.grpc_addr),
        short(s.admin_addr)
    )
}

/// `:port` on 127.0.0.1, the whole address elsewhere.
fn short(addr: SocketAddr) -> String {
    if addr.ip() == IpAddr::from([127, 0, 0, 1]) {
        format!(":{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Starts nats-server with JetStream, its store under the data dir, on a free loopback port.
async fn start_nats(data_dir: &Path) -> Result<NatsProcess> {
    let binary = natsbin::find_from_here().map_err(anyhow::Error::msg)?;
    let log = data_dir.join("nats-server.log");
    // A fresh log each run: "see nats-server.log" then points at this run's lines.
    let _ = std::fs::remove_file(&log);
    Ok(
        Launch::new(binary, data_dir.join("nats"), data_dir.join("run"), log)
            .start()
            .await?,
    )
}

/// The control token: the configured one (`control.token` or `control.token_file`), else
/// `<data-dir>/token`, reused or generated. Returns where it is, for the banner.
fn control_token(cfg: &mut Config, data_dir: &Path) -> Result<String> {
    if cfg.control.token.is_some() || cfg.control.token_file.is_some() {
        return Ok(
            "from control.token / control.token_file; pass it with --token or HERALD_TOKEN".into(),
        );
    }
    let path = data_dir.join("token");
    cfg.control = ControlConfig::with_token(reuse_or_generate(&path)?);
    let default_dir = Path::new(crate::control::DEFAULT_TOKEN_FILE)
        .parent()
        .and_then(|d| d.canonicalize().ok());
    Ok(if default_dir.as_deref() == Some(data_dir) {
        format!(
            "{} (found there by admin commands run from this directory)",
            path.display()
        )
    } else {
        format!(
            "{} (for admin commands: export HERALD_TOKEN=$(cat {}))",
            path.display(),
            path.display()
        )
    })
}

/// Reads a key saved by an earlier run, or generates and saves one (readable by the owner only).
pub fn reuse_or_generate(path: &Path) -> Result<String> {
    if let Ok(k) = std::fs::read_to_string(path) {
        let k = k.trim();
        if !k.is_empty() {
            return Ok(k.to_string());
        }
    }
    let bytes: [u8; 16] = rand::rng().random();
    let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, &key).with_context(|| format!("cannot write {}", path.display()))?;
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
                return Err(hint(
                    anyhow!("{name} did not become ready within 60 s: {why}"),
                    "run again with RUST_LOG=info to see what it waits for",
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Writes `contents` to a new file only its owner can read (0600 on Unix).
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(contents.as_bytes())
}
