//! `herald sources ...` against a real `herald dev`, with the control token `herald dev` wrote
//! to its data dir and the CLI finds at `./.herald/token`.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use herald_testkit::{CliOutput, HeraldCli, HeraldDev, post_segment_track, wait_until};

/// `herald sources` against a running dev.
struct Sources {
    dev: HeraldDev,
    cli: HeraldCli,
}

impl Sources {
    /// Starts `herald dev` with its data in `<dir>/.herald`.
    async fn start(dir: &Path) -> Result<Self> {
        let herald = Path::new(env!("CARGO_BIN_EXE_herald"));
        let dev = HeraldDev::start_in(herald, dir).await?;
        let cli = HeraldCli::new(herald).trailing([
            "--ingest-url".to_string(),
            format!("http://127.0.0.1:{}", dev.ports.ingest_grpc),
        ]);
        Ok(Self { dev, cli })
    }

    /// Runs `herald sources <args>` in `cwd`, with no token but what `./.herald/token` holds.
    async fn sources(&self, cwd: &Path, args: &[&str]) -> Result<CliOutput> {
        self.cli
            .clone()
            .current_dir(cwd)
            .run(&with_sources(args))
            .await
    }

    /// Like [`Sources::sources`], and it must succeed; returns stdout.
    async fn ok(&self, cwd: &Path, args: &[&str]) -> Result<String> {
        self.cli
            .clone()
            .current_dir(cwd)
            .ok(&with_sources(args))
            .await
    }

    async fn wait_status(&self, key: &str, want: u16, what: &str) -> Result<()> {
        let http = format!("127.0.0.1:{}", self.dev.ports.ingest_http);
        wait_until(what, Duration::from_secs(5), || {
            let http = http.clone();
            async move { post_segment_track(http, key).await == want }
        })
        .await
    }

    async fn stop(self) -> Result<()> {
        self.dev.stop().await
    }
}

/// `["sources", args...]`.
fn with_sources<'a>(args: &[&'a str]) -> Vec<&'a str> {
    ["sources"]
        .into_iter()
        .chain(args.iter().copied())
        .collect()
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
    let dev = Sources::start(dir.path()).await?;
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
    assert!(!out.ok);
    let err = &out.stderr;
    assert!(
        err.contains("not found") && err.contains("herald sources list"),
        "{err}"
    );
    let out = dev.sources(here, &["create", "default"]).await?;
    assert!(out.stderr.contains("exists already"));
    let elsewhere = tempfile::tempdir()?;
    let out = dev.sources(elsewhere.path(), &["list"]).await?;
    assert!(!out.ok);
    let err = &out.stderr;
    assert!(
        err.contains("no control token") && err.contains("--token") && err.contains("HERALD_TOKEN"),
        "{err}"
    );
    let out = dev
        .sources(elsewhere.path(), &["list", "--token", "not-the-token"])
        .await?;
    assert!(!out.ok);
    let err = &out.stderr;
    assert!(err.contains("refused the token"), "{err}");

    dev.stop().await?;

    // A restart reuses the token (and keeps the sources).
    let token = std::fs::read_to_string(here.join(".herald/token"))?;
    let dev = Sources::start(dir.path()).await?;
    assert_eq!(std::fs::read_to_string(here.join(".herald/token"))?, token);
    let list = dev.ok(here, &["list"]).await?;
    assert!(list.contains("default") && !list.contains("web "), "{list}");
    dev.stop().await?;
    Ok(())
}
