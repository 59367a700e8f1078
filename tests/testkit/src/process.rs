//! Spawning and watching `nats-server` child processes.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a single server may take to come up (ports file written, or port accepting).
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(20);

/// Starts `binary` with `args`, appending its output to `log`. The child is killed if dropped.
pub(crate) fn spawn<I, S>(binary: &Path, args: I, log: &Path) -> anyhow::Result<Child>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let err = out.try_clone().context("duplicating log file handle")?;
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))
}

/// The last lines of a server log, for error messages.
pub(crate) fn log_tail(log: &Path) -> String {
    const LINES: usize = 15;
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LINES);
            format!(
                "last lines of {}:\n{}",
                log.display(),
                lines[start..].join("\n")
            )
        }
        Err(err) => format!("(cannot read {}: {err})", log.display()),
    }
}

/// Fails with the log tail if the child has exited.
pub(crate) fn ensure_alive(child: &mut Child, log: &Path) -> anyhow::Result<()> {
    match child.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(status)) => bail!("nats-server exited with {status}; {}", log_tail(log)),
        Err(err) => bail!("cannot check nats-server status: {err}"),
    }
}

/// Whether the child is still running.
pub(crate) fn is_alive(child: Option<&mut Child>) -> bool {
    child.is_some_and(|c| matches!(c.try_wait(), Ok(None)))
}

/// Waits until `127.0.0.1:port` accepts TCP connections, failing early if the child exits.
pub(crate) async fn wait_for_tcp(
    port: u16,
    child: &mut Child,
    log: &Path,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        ensure_alive(child, log)?;
        let attempt = tokio::time::timeout_at(deadline, TcpStream::connect(("127.0.0.1", port)));
        match attempt.await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(_)) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            _ => bail!(
                "nats-server did not accept connections on port {port} in time; {}",
                log_tail(log)
            ),
        }
    }
}

/// Kills the child (SIGKILL) and reaps it.
pub(crate) async fn kill(child: Option<Child>) {
    if let Some(mut child) = child {
        // An error means it already exited, which is what we want.
        let _ = child.kill().await;
    }
}

/// Asks the child to shut down cleanly (SIGTERM, sent by `nats-server --signal`), waiting up to
/// `grace` before killing it.
pub(crate) async fn terminate(binary: &Path, child: Option<Child>, grace: Duration) {
    let Some(mut child) = child else { return };
    let signalled = match child.id() {
        Some(pid) => Command::new(binary)
            .arg("--signal")
            .arg(format!("term={pid}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success()),
        None => false,
    };
    if !signalled || tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
