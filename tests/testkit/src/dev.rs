//! `herald dev` as a child process on picked loopback ports, for tests of the CLI.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use tokio::io::AsyncReadExt as _;
use tokio::process::{Child, Command};

use crate::wait::free_ports;

/// How many times [`HeraldDev::start`] tries when a picked port was taken in between.
const ATTEMPTS: usize = 3;

/// The loopback ports a [`HeraldDev`] listens on.
#[derive(Debug, Clone, Copy)]
pub struct DevPorts {
    /// Ingest's HTTP API (`--ingest-addr`).
    pub ingest_http: u16,
    /// Ingest's gRPC control API.
    pub ingest_grpc: u16,
    /// Ingest's admin server (health, metrics).
    pub ingest_admin: u16,
    /// The processor's gRPC control API.
    pub processor_grpc: u16,
    /// The processor's admin server.
    pub processor_admin: u16,
    /// The processor's HTTP profile API.
    pub processor_http: u16,
    /// The activator's gRPC control API.
    pub activator_grpc: u16,
    /// The activator's admin server.
    pub activator_admin: u16,
}

/// A running `herald dev`: its own nats-server, the three services, the default source and a
/// log destination writing to [`HeraldDev::log_file`]. Killed on drop.
#[derive(Debug)]
pub struct HeraldDev {
    /// The process (stderr is drained in the background after the banner).
    pub child: Child,
    /// What it printed up to and including "Press Ctrl-C".
    pub banner: String,
    /// Where it listens.
    pub ports: DevPorts,
    /// The folder holding its data dir (`.herald`) and log file.
    root: PathBuf,
    /// The folder, when [`HeraldDev::start`] made it (removed on drop).
    _temp: Option<tempfile::TempDir>,
}

impl HeraldDev {
    /// Starts `herald dev` (the binary at `herald`) with a fresh data dir and log file, on
    /// distinct free ports, and waits for its banner. The ports are free a moment before
    /// herald binds them, so another test can take one in between: when herald dev then exits
    /// with "Address already in use", it starts again on new ports (up to 3 attempts).
    ///
    /// # Errors
    ///
    /// When no nats-server is found, or herald dev exits early or prints no banner within 60 s.
    pub async fn start(herald: &Path) -> anyhow::Result<Self> {
        let temp = tempfile::tempdir()?;
        let root = temp.path().to_path_buf();
        let mut dev = Self::start_in(herald, &root).await?;
        dev._temp = Some(temp);
        Ok(dev)
    }

    /// Like [`HeraldDev::start`], in the folder `dir` the caller keeps: the data dir is
    /// `<dir>/.herald` (where admin commands run in `dir` find the token) and the log file
    /// `<dir>/events.jsonl`, so a second start in the same folder reuses the keys, the token and
    /// the NATS store.
    ///
    /// # Errors
    ///
    /// As [`HeraldDev::start`].
    pub async fn start_in(herald: &Path, dir: &Path) -> anyhow::Result<Self> {
        let nats = crate::nats_server_binary()?;
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            match Self::try_start(herald, &nats, dir).await? {
                Ok(dev) => return Ok(dev),
                Err(banner) if banner.contains("Address already in use") => last = banner,
                Err(banner) => bail!("herald dev exited early:\n{banner}"),
            }
        }
        bail!("herald dev found a picked port taken {ATTEMPTS} times; the last time:\n{last}")
    }

    /// One start; `Ok(Err(output))` when it exited before its banner.
    async fn try_start(
        herald: &Path,
        nats: &Path,
        root: &Path,
    ) -> anyhow::Result<Result<Self, String>> {
        let p = free_ports(8)?;
        let ports = DevPorts {
            ingest_http: p[0],
            ingest_grpc: p[1],
            ingest_admin: p[2],
            processor_grpc: p[3],
            processor_admin: p[4],
            processor_http: p[5],
            activator_grpc: p[6],
            activator_admin: p[7],
        };
        let mut cmd = Command::new(herald);
        cmd.arg("dev")
            .arg("--ingest-addr")
            .arg(format!("127.0.0.1:{}", ports.ingest_http))
            .arg("--log-file")
            .arg(root.join("events.jsonl"))
            .arg("--data-dir")
            .arg(root.join(".herald"))
            .env("HERALD_NATS_SERVER", nats)
            // What a newcomer sees: dev's own log filter, its own token and no config file.
            .env_remove("RUST_LOG")
            .env_remove("HERALD__CONTROL__TOKEN")
            .env_remove("HERALD_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (var, port) in [
            ("HERALD__INGEST__GRPC_ADDR", ports.ingest_grpc),
            ("HERALD__INGEST__ADMIN_ADDR", ports.ingest_admin),
            ("HERALD__PROCESSOR__GRPC_ADDR", ports.processor_grpc),
            ("HERALD__PROCESSOR__ADMIN_ADDR", ports.processor_admin),
            ("HERALD__PROCESSOR__HTTP_ADDR", ports.processor_http),
            ("HERALD__ACTIVATOR__GRPC_ADDR", ports.activator_grpc),
            ("HERALD__ACTIVATOR__ADMIN_ADDR", ports.activator_admin),
        ] {
            cmd.env(var, format!("127.0.0.1:{port}"));
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} dev", herald.display()))?;
        let mut stderr = child.stderr.take().context("stderr is piped")?;
        let mut banner = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        while !banner.contains("Press Ctrl-C") {
            let n = tokio::time::timeout_at(deadline, stderr.read(&mut buf))
                .await
                .with_context(|| format!("no banner from herald dev within 60 s:\n{banner}"))??;
            if n == 0 {
                return Ok(Err(banner));
            }
            banner.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = stderr.read_to_end(&mut sink).await;
        });
        Ok(Ok(Self {
            child,
            banner,
            ports,
            root: root.to_path_buf(),
            _temp: None,
        }))
    }

    /// Stops it as Ctrl-C does (SIGINT) and checks that it exits cleanly within 20 s.
    ///
    /// # Errors
    ///
    /// When it has exited already, does not stop in time, or exits with a failure.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("herald dev has exited already")?;
        let sent = Command::new("kill")
            .arg("-INT")
            .arg(pid.to_string())
            .status()
            .await?;
        ensure!(sent.success(), "kill -INT {pid} failed");
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .context("herald dev did not stop within 20 s of Ctrl-C")??;
        ensure!(
            status.success(),
            "herald dev exits cleanly on Ctrl-C: {status:?}"
        );
        Ok(())
    }

    /// The log destination's file (one JSON line per delivered event).
    pub fn log_file(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }

    /// Its data dir (`write_key`, `write_secret`, `token`, the NATS store): `.herald` in its
    /// folder.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join(".herald")
    }
}
