//! Each `herald <role>` process sizes its tokio runtime: the processor and the activator run one
//! worker thread unless `--worker-threads` (or `HERALD_WORKER_THREADS`) says otherwise, ingest
//! one per CPU. The gauge `herald_runtime_worker_threads` shows what a process runs.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use herald_testkit::{NatsServer, free_port, spawn_role_with, wait_ready, write_config};
use tokio::process::Child;

const READY: Duration = Duration::from_secs(30);

/// Starts `herald <role>` with `extra` arguments and `env`, and waits until its admin port says
/// ready.
async fn start(
    dir: &Path,
    nats: &str,
    role: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<(Child, u16)> {
    let admin = free_port();
    let config = write_config(
        dir,
        &format!("{role}-{admin}"),
        nats,
        "runtime-test-control-token",
        &format!(
            r#"
[ingest]
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:{admin}"

[processor]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:{admin}"

[activator]
grpc_addr = "127.0.0.1:0"
admin_addr = "127.0.0.1:{admin}"
"#
        ),
    )?;
    let child = spawn_role_with(
        Path::new(env!("CARGO_BIN_EXE_herald")),
        role,
        &config,
        &dir.join(format!("{role}-{admin}.log")),
        extra,
        env,
    )?;
    wait_ready(
        &format!("herald {role} on 127.0.0.1:{admin}"),
        format!("127.0.0.1:{admin}"),
        READY,
    )
    .await?;
    Ok((child, admin))
}

/// The value of `herald_runtime_worker_threads` on `admin`'s `/metrics`.
async fn worker_threads(admin: u16) -> Result<usize> {
    let text = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await?
        .text()
        .await?;
    let line = text
        .lines()
        .find(|l| l.starts_with("herald_runtime_worker_threads "))
        .with_context(|| format!("no herald_runtime_worker_threads in:\n{text}"))?;
    Ok(line["herald_runtime_worker_threads ".len()..]
        .trim()
        .parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_runs_the_worker_threads_it_is_given() -> Result<()> {
    let nats = NatsServer::start().await?;
    let dir = tempfile::tempdir()?;
    let url = nats.url();
    let cpus = std::thread::available_parallelism()?.get();

    // Ingest first: it creates the streams the others read.
    let (_ingest, admin) = start(dir.path(), &url, "ingest", &[], &[]).await?;
    ensure!(
        worker_threads(admin).await? == cpus,
        "ingest runs one per CPU ({cpus})"
    );
    let (_processor, admin) = start(dir.path(), &url, "processor", &[], &[]).await?;
    ensure!(
        worker_threads(admin).await? == 1,
        "the processor runs one by default"
    );
    let (_activator, admin) = start(dir.path(), &url, "activator", &[], &[]).await?;
    ensure!(
        worker_threads(admin).await? == 1,
        "the activator runs one by default"
    );
    let (_three, admin) = start(
        dir.path(),
        &url,
        "processor",
        &["--worker-threads", "3"],
        &[],
    )
    .await?;
    ensure!(worker_threads(admin).await? == 3, "--worker-threads 3");
    let (_two, admin) = start(
        dir.path(),
        &url,
        "activator",
        &[],
        &[("HERALD_WORKER_THREADS", "2")],
    )
    .await?;
    ensure!(worker_threads(admin).await? == 2, "HERALD_WORKER_THREADS=2");
    Ok(())
}
