//! The benchmark's own nats-server: a child process with JetStream, a temporary store and a
//! random loopback port (learnt from `--ports_file_dir`), killed and cleaned up on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use herald_common::natsbin;
use rand::Rng;

/// A running nats-server owned by the benchmark.
pub struct BenchNats {
    child: Child,
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
        let mut roots = vec![std::env::current_dir()?];
        if let Ok(exe) = std::env::current_exe() {
            roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
        }
        let binary = natsbin::find(&roots).map_err(anyhow::Error::msg)?;
        let version = Command::new(&binary)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .trim_start_matches("nats-server:")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let suffix: u64 = rand::rng().random();
        let dir = std::env::temp_dir().join(format!("herald-bench-{suffix:016x}"));
        let run_dir = dir.join("run");
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let log = std::fs::File::create(dir.join("nats-server.log"))?;
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(dir.join("store"))
            .arg("--ports_file_dir")
            .arg(&run_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut server = Self {
            child,
            dir,
            url: String::new(),
            version,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(url) = read_ports_file(&run_dir) {
                server.url = url;
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!(
                    "nats-server exited at start ({status}); see {}",
                    server.dir.join("nats-server.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("nats-server did not start within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl BenchNats {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BenchNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
