//! `herald sources ...` against a real `herald dev`, with the control token `herald dev` wrote
//! to its data dir and the CLI finds at `./.herald/token`.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Result, bail};
use herald_testkit::{free_port, segment_batch, segment_track, wait_until};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

struct Dev {
    child: Child,
    http: u16,
    ingest_grpc: u16,
}

/// Starts `herald dev` with its data in `<dir>/.herald` and waits for its banner.
async fn start_dev(dir: &Path) -> Result<Dev> {
    let nats = herald_testkit::nats_server_binary()?;
    let http = free_port();
    let ingest_grpc = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("dev")
        .arg("--ingest-addr")
        .arg(format!("127.0.0.1:{http}"))
        .arg("--log-file")
        .arg(dir.join("events.jsonl"))
        .arg("--data-dir")
        .arg(dir.join(".herald"))
        .env("HERALD_NATS_SERVER", nats)
        .env_remove("HERALD__CONTROL__TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (var, port) in [
        ("HERALD__INGEST__GRPC_ADDR", ingest_grpc),
        ("HERALD__INGEST__ADMIN_ADDR", free_port()),
        ("HERALD__PROCESSOR__GRPC_ADDR", free_port()),
        ("HERALD__PROCESSOR__ADMIN_ADDR", free_port()),
        ("HERALD__PROCESSOR__HTTP_ADDR", free_port()),
        ("HERALD__ACTIVATOR__GRPC_ADDR", free_port()),
        ("HERALD__ACTIVATOR__ADMIN_ADDR", free_port()),
    ] {
        cmd.env(var, format!("127.0.0.1:{port}"));
    }
    let mut child = cmd.spawn()?;
    let mut stderr = child.stderr.take().expect("piped");
    let mut banner = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while !banner.contains("Press Ctrl-C") {
        let n = tokio::time::timeout_at(deadline, stderr.read(&mut buf)).await??;
        if n == 0 {
            bail!("herald dev exited early:\n{banner}");
        }
        banner.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = stderr.read_to_end(&mut sink).await;
    });
    Ok(Dev {
        child,
        http,
        ingest_grpc,
    })
}

impl Dev {
    /// Runs `herald sources <args>` in `cwd`, with no token but what `./.herald/token` holds.
    async fn sources(&self, cwd: &Path, args: &[&str]) -> Result<Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_herald"))
            .current_dir(cwd)
            .arg("sources")
            .args(args)
            .arg("--ingest-url")
            .arg(format!("http://127.0.0.1:{}", self.ingest_grpc))
            .env_remove("HERALD_TOKEN")
            .output()
            .await?)
    }

    /// Like [`Dev::sources`], and it must succeed; returns stdout.
    async fn ok(&self, cwd: &Path, args: &[&str]) -> Result<String> {
        let out = self.sources(cwd, args).await?;
        if !out.status.success() {
            bail!(
                "herald sources {args:?} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The status of a Segment batch sent with `key`.
    async fn post(&self, key: &str) -> u16 {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/v1/batch", self.http))
            .basic_auth(key, Some(""))
            .json(&segment_batch(vec![segment_track("u1", 1)]))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    async fn wait_status(&self, key: &str, want: u16, what: &str) -> Result<()> {
        wait_until(what, Duration::from_secs(5), || async move {
            self.post(key).await == want
        })
        .await
    }

    async fn stop(mut self) -> Result<()> {
        let pid = self.child.id().expect("running");
        Command::new("kill")
            .arg("-INT")
            .arg(pid.to_string())
            .status()
            .await?;
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??;
        assert!(status.success(), "herald dev exits cleanly: {status:?}");
        Ok(())
    }
}

/// The value printed after `label` (e.g. `write key:`).
fn printed(stdout: &str, label: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{label} in:\n{stdout}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_commands_against_herald_dev() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = start_dev(dir.path()).await?;
    let here = dir.path();

    let list = dev.ok(here, &["list"]).await?;
    assert!(list.contains("ID") && list.contains("default"), "{list}");

    let created = dev
        .ok(
            here,
            &[
                "create",
                "web",
                "--name",
                "Website",
                "--rate-limit-per-second",
                "50",
            ],
        )
        .await?;
    assert!(created.contains("Created source web"), "{created}");
    assert!(created.contains("not shown again"), "{created}");
    let key = printed(&created, "write key:");
    let secret = printed(&created, "write secret:");
    assert!(key.len() >= 32 && secret.len() >= 32, "{created}");
    dev.wait_status(&key, 200, "the created key works").await?;

    let list = dev.ok(here, &["list"]).await?;
    let web = list
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("web listed:\n{list}"));
    assert!(web.contains("Website") && web.contains("50/s"), "{web}");
    assert!(!list.contains(&key), "list never shows keys:\n{list}");

    let got = dev.ok(here, &["get", "web"]).await?;
    assert!(
        got.contains("Website") && got.contains("enabled         yes"),
        "{got}"
    );
    assert!(!got.contains(&key), "{got}");

    let rotated = dev.ok(here, &["rotate", "web"]).await?;
    assert!(rotated.contains("not shown again"), "{rotated}");
    let new_key = printed(&rotated, "write key:");
    assert_ne!(new_key, key);
    dev.wait_status(&key, 401, "the old key stops working")
        .await?;
    dev.wait_status(&new_key, 200, "the new key works").await?;

    let disabled = dev.ok(here, &["disable", "web"]).await?;
    assert!(
        disabled.contains("disabled") && disabled.contains("403"),
        "{disabled}"
    );
    dev.wait_status(&new_key, 403, "the disabled source gets 403")
        .await?;
    dev.ok(here, &["enable", "web"]).await?;
    dev.wait_status(&new_key, 200, "the enabled source works")
        .await?;

    let deleted = dev.ok(here, &["delete", "web"]).await?;
    assert!(deleted.contains("deleted"), "{deleted}");
    dev.wait_status(&new_key, 401, "the deleted source's key gets 401")
        .await?;

    // Errors say what to do next.
    let out = dev.sources(here, &["get", "web"]).await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not found") && err.contains("herald sources list"),
        "{err}"
    );
    let out = dev.sources(here, &["create", "default"]).await?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    let elsewhere = tempfile::tempdir()?;
    let out = dev.sources(elsewhere.path(), &["list"]).await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no control token") && err.contains("--token") && err.contains("HERALD_TOKEN"),
        "{err}"
    );
    let out = dev
        .sources(elsewhere.path(), &["list", "--token", "not-the-token"])
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the token"), "{err}");

    dev.stop().await?;

    // A restart reuses the token (and keeps the sources).
    let token = std::fs::read_to_string(here.join(".herald/token"))?;
    let dev = start_dev(dir.path()).await?;
    assert_eq!(std::fs::read_to_string(here.join(".herald/token"))?, token);
    let list = dev.ok(here, &["list"]).await?;
    assert!(list.contains("default") && !list.contains("web "), "{list}");
    dev.stop().await?;
    Ok(())
}
