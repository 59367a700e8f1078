//! The benchmark's own nats-server: started through `herald_common::natsbin` (the launcher
//! `herald dev` and the test harness use) with JetStream, a temporary store and a random
//! loopback port, killed and cleaned up at the end.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use herald_common::natsbin::{self, Launch, NatsProcess};

/// A running nats-server owned by the benchmark.
pub struct BenchNats {
    process: Option<NatsProcess>,
    pid: u32,
    dir: PathBuf,
    /// Client URL, e.g. `nats://127.0.0.1:41234`.
    pub url: String,
    /// What `nats-server --version` printed, e.g. `v2.15.1`.
    pub version: String,
}

impl BenchNats {
    /// The run's directory (the store, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finds a nats-server >= 2.12 (like `herald dev`) and starts it with a fresh file store
    /// under the system temp dir.
    pub async fn start() -> Result<Self> {
        let binary = natsbin::find_from_here().map_err(anyhow::Error::msg)?;
        let version = natsbin::version(&binary).unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("herald-bench-{}", super::random_hex(8)));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let launch = Launch::new(
            binary,
            dir.join("store"),
            dir.join("run"),
            dir.join("nats-server.log"),
        );
        let process = match launch.start().await {
            Ok(process) => process,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err.into());
            }
        };
        Ok(Self {
            pid: process.pid().context("nats-server has a pid")?,
            url: process.url().to_owned(),
            process: Some(process),
            dir,
            version,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the server, waits for it to exit and removes its directory.
    pub async fn stop(mut self) {
        if let Some(process) = self.process.take() {
            process.kill().await;
        }
        // Drop removes the directory.
    }
}

impl Drop for BenchNats {
    fn drop(&mut self) {
        // Dropping the process kills it (a run that failed or was interrupted).
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
