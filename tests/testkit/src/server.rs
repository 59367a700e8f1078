//! One real JetStream `nats-server` per test.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use tempfile::TempDir;
use tokio::process::Child;
use tokio::time::Instant;

use crate::binary::nats_server_binary;
use crate::process::{self, START_DEADLINE};

/// A real `nats-server` with JetStream, a private file store in a temporary directory and a free
/// client port on 127.0.0.1.
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
    child: Option<Child>,
}

#[derive(Deserialize)]
struct PortsFile {
    #[serde(default)]
    nats: Vec<String>,
    #[serde(default)]
    monitoring: Vec<String>,
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
        let ports_dir = dir.path().join("ports");
        std::fs::create_dir(&ports_dir).context("creating the ports file directory")?;
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
            child: None,
        };
        let mut args = server.common_args();
        args.extend(["-p", "-1", "-m", "-1", "--ports_file_dir"].map(OsString::from));
        args.push(ports_dir.clone().into_os_string());
        let mut child = process::spawn(&server.binary, &args, &server.log_path())?;
        let deadline = Instant::now() + START_DEADLINE;
        let ports = read_ports_file(&ports_dir, &mut child, &server.log_path(), deadline).await?;
        server.port = url_port(ports.nats.first().map(String::as_str))
            .context("ports file lists no nats URL")?;
        server.monitor_port = url_port(ports.monitoring.first().map(String::as_str))
            .context("ports file lists no monitoring URL")?;
        process::wait_for_tcp(server.port, &mut child, &server.log_path(), deadline).await?;
        server.child = Some(child);
        Ok(server)
    }

    fn common_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["-js".into(), "-sd".into(), self.store_dir().into()];
        args.extend(["-a", "127.0.0.1"].map(OsString::from));
        if let Some(config) = &self.config {
            args.push("-c".into());
            args.push(config.into());
        }
        args
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
        process::kill(self.child.take()).await;
    }

    /// Shuts the server down cleanly (SIGTERM), killing it if it has not exited within 10 s. The
    /// store is kept.
    pub async fn stop_gracefully(&mut self) {
        process::terminate(&self.binary, self.child.take(), Duration::from_secs(10)).await;
    }

    /// Starts the server again on the same client and monitoring ports with the same store (it is
    /// stopped first if running), and waits (up to 10 s) until it accepts TCP connections.
    /// JetStream has recovered its streams by then: the server opens its client port only after.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let mut args = self.common_args();
        args.extend(["-p".into(), self.port.to_string().into()]);
        args.extend(["-m".into(), self.monitor_port.to_string().into()]);
        let mut child = process::spawn(&self.binary, &args, &self.log_path())?;
        let deadline = Instant::now() + START_DEADLINE;
        process::wait_for_tcp(self.port, &mut child, &self.log_path(), deadline).await?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        process::is_alive(self.child.as_mut())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
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

/// Waits for the `*.ports` file a server started with `--ports_file_dir` writes once it listens.
async fn read_ports_file(
    dir: &Path,
    child: &mut Child,
    log: &Path,
    deadline: Instant,
) -> anyhow::Result<PortsFile> {
    loop {
        process::ensure_alive(child, log)?;
        if let Some(ports) = try_read_ports_file(dir) {
            return Ok(ports);
        }
        if Instant::now() >= deadline {
            bail!(
                "nats-server wrote no ports file in {} within {:?}; {}",
                dir.display(),
                START_DEADLINE,
                process::log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn try_read_ports_file(dir: &Path) -> Option<PortsFile> {
    // The file is named after the executable and pid; the directory holds only this server's.
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "ports") {
            // A half-written file fails to parse; the caller polls again.
            let text = std::fs::read(&path).ok()?;
            let ports: PortsFile = serde_json::from_slice(&text).ok()?;
            if !ports.nats.is_empty() {
                return Some(ports);
            }
        }
    }
    None
}

fn url_port(url: Option<&str>) -> Option<u16> {
    url?.rsplit_once(':')?.1.trim_end_matches('/').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::url_port;

    #[test]
    fn reads_port_from_urls() {
        let cases = [
            (Some("nats://127.0.0.1:4222"), Some(4222)),
            (Some("http://127.0.0.1:8222"), Some(8222)),
            (Some("http://127.0.0.1:8222/"), Some(8222)),
            (Some("nats://127.0.0.1"), None),
            (None, None),
        ];
        for (url, expected) in cases {
            assert_eq!(url_port(url), expected, "url {url:?}");
        }
    }
}
