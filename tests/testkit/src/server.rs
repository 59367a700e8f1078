//! One real JetStream `nats-server` per test.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use herald_common::natsbin::{Launch, NatsProcess};
use tempfile::TempDir;

use crate::binary::nats_server_binary;

/// How long a single server may take to come up (its ports file written).
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(10);

/// A real `nats-server` with JetStream, a private file store in a temporary directory and a free
/// client port on 127.0.0.1, started through `herald_common::natsbin::Launch` (the launcher
/// `herald dev` and `herald-bench` use).
///
/// The port is learnt from the server's `--ports_file_dir` file, not from its logs. The process is
/// killed when the value is dropped; the store is deleted with it. Server output goes to
/// [`NatsServer::log_path`].
pub struct NatsServer {
    binary: PathBuf,
    dir: TempDir,
    config: Option<PathBuf>,
    port: u16,
    monitor_port: u16,
    process: Option<NatsProcess>,
}

impl NatsServer {
    /// Starts a server: `-js -sd <temp store> -a 127.0.0.1 -p -1 -m -1 --ports_file_dir <temp>`,
    /// and waits (up to 10 s) for its ports file.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_config("").await
    }

    /// Like [`NatsServer::start`], with `extra` written to a configuration file passed with `-c`
    /// (for example `max_payload: 2MB` or an `accounts { .. }` block). The harness's command-line
    /// flags (listen address, ports, JetStream store) take precedence over the file.
    pub async fn start_with_config(extra: &str) -> anyhow::Result<Self> {
        let binary = nats_server_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("herald-nats-")
            .tempdir()
            .context("creating a temporary directory for nats-server")?;
        let config = if extra.trim().is_empty() {
            None
        } else {
            let path = dir.path().join("server.conf");
            std::fs::write(&path, extra).context("writing nats-server configuration")?;
            Some(path)
        };

        let mut server = Self {
            binary,
            dir,
            config,
            port: 0,
            monitor_port: 0,
            process: None,
        };
        let process = server.launch().monitor().start().await?;
        server.port = process
            .ports()
            .client_port()
            .context("ports file lists no nats URL")?;
        server.monitor_port = process
            .ports()
            .monitor_port()
            .context("ports file lists no monitoring URL")?;
        server.process = Some(process);
        Ok(server)
    }

    /// The launch of this server: its store, ports directory, log and configuration file.
    fn launch(&self) -> Launch {
        let launch = Launch::new(
            &self.binary,
            self.store_dir(),
            self.dir.path().join("ports"),
            self.log_path(),
        )
        .start_timeout(START_DEADLINE);
        match &self.config {
            Some(config) => launch.config_file(config),
            None => launch,
        }
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port. It stays the same across [`NatsServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring base URL (`/varz`, `/jsz?streams=true&consumers=true`, ...). It stays
    /// the same across [`NatsServer::restart`].
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The JetStream store directory; it survives [`NatsServer::stop`] and
    /// [`NatsServer::restart`].
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The file the server's output is appended to (across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Connects a new client.
    ///
    /// # Panics
    ///
    /// If the server does not accept the connection (for example while stopped).
    pub async fn client(&self) -> async_nats::Client {
        match async_nats::connect(self.url()).await {
            Ok(client) => client,
            Err(err) => panic!("connecting to nats-server at {}: {err}", self.url()),
        }
    }

    /// Connects a new client and returns a JetStream context over it.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::client`].
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit. The store is kept.
    pub async fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill().await;
        }
    }

    /// Shuts the server down cleanly (SIGTERM), killing it if it has not exited within 10 s. The
    /// store is kept.
    pub async fn stop_gracefully(&mut self) {
        if let Some(process) = self.process.take() {
            process.terminate(Duration::from_secs(10)).await;
        }
    }

    /// Starts the server again on the same client and monitoring ports with the same store (it is
    /// stopped first if running), and waits (up to 10 s) for its ports file. It accepts
    /// connections by then, and JetStream has recovered its streams: the server opens its client
    /// port only after.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let process = self
            .launch()
            .client_port(self.port)
            .monitor_port(self.monitor_port)
            .start()
            .await?;
        self.process = Some(process);
        Ok(())
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(NatsProcess::is_running)
    }
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("monitor_url", &self.monitor_url())
            .field("store_dir", &self.store_dir())
            .finish_non_exhaustive()
    }
}
