//! The profile and privacy commands against `herald dev`: `herald profile get`,
//! `herald suppress`, `herald unsuppress`, `herald erase`, `herald erasure status`, and the
//! processor's HTTP profile API.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use herald_testkit::{HeraldCli, HeraldDev, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_and_privacy_commands_reach_herald_dev() -> Result<()> {
    let herald = Path::new(env!("CARGO_BIN_EXE_herald"));
    let dev = HeraldDev::start(herald).await?;
    let banner = dev.banner.clone();
    let (ingest_port, processor_grpc, processor_http) = (
        dev.ports.ingest_http,
        dev.ports.processor_grpc,
        dev.ports.processor_http,
    );
    assert!(
        banner.contains(&format!("http://127.0.0.1:{processor_http} (profiles)")),
        "the banner shows the profile API:\n{banner}"
    );
    let write_key = std::fs::read_to_string(dev.data_dir().join("write_key"))?;
    let token = std::fs::read_to_string(dev.data_dir().join("token"))
        .context("herald dev writes the control token")?
        .trim()
        .to_string();
    let cli = HeraldCli::new(herald).trailing([
        "--processor-url".to_string(),
        format!("http://127.0.0.1:{processor_grpc}"),
        "--token".to_string(),
        token.clone(),
    ]);

    // An identify through ingest links the user id, the anonymous id and the email.
    let http = reqwest::Client::new();
    let res = http
        .post(format!("http://127.0.0.1:{ingest_port}/v1/identify"))
        .basic_auth(write_key.trim(), Some(""))
        .json(&serde_json::json!({
            "userId": "cli-user",
            "anonymousId": "cli-anon",
            "traits": {"email": "Cli@Example.com", "plan": "pro"},
        }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    wait_until("the profile exists", Duration::from_secs(20), || async {
        cli.run(&["profile", "get", "email:cli@example.com"])
            .await
            .is_ok_and(|out| out.ok && out.stdout.contains("plan = \"pro\""))
    })
    .await?;
    let shown = cli.ok(&["profile", "get", "anonymous_id:cli-anon"]).await?;
    assert!(shown.contains("user_id:cli-user"), "{shown}");
    assert!(shown.contains("email:cli@example.com"), "{shown}");

    // The HTTP profile API, with the same token.
    let url = format!("http://127.0.0.1:{processor_http}/v1/profiles/user_id/cli-user");
    let res = http.get(&url).bearer_auth(&token).send().await?;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await?;
    assert_eq!(body["traits"]["plan"], "pro");
    assert_eq!(http.get(&url).send().await?.status(), 401);

    // Suppress and unsuppress.
    let out = cli.ok(&["suppress", "user_id:cli-user"]).await?;
    assert!(out.contains("anonymous_id:cli-anon"), "{out}");
    let out = cli.ok(&["unsuppress", "user_id:cli-user"]).await?;
    assert!(out.contains("unsuppressed"), "{out}");
    let out = cli.ok(&["unsuppress", "user_id:cli-user"]).await?;
    assert!(out.contains("not suppressed"), "{out}");

    // Erase, then ask for the request's status.
    let out = cli.ok(&["erase", "email:cli@example.com"]).await?;
    assert!(out.contains("state        completed"), "{out}");
    let request = out
        .lines()
        .find_map(|l| l.strip_prefix("request").map(str::trim))
        .context("the request id is printed")?
        .to_string();
    let out = cli.ok(&["erasure", "status", &request]).await?;
    assert!(out.contains("state        completed"), "{out}");
    assert!(out.contains("user_id:cli-user"), "{out}");
    let out = cli.run(&["profile", "get", "user_id:cli-user"]).await?;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("no profile has identity"),
        "{}",
        out.stderr
    );
    let out = cli.run(&["profile", "get", "cli-user"]).await?;
    assert!(!out.ok);
    assert!(out.stderr.contains("<type>:<value>"), "{}", out.stderr);

    dev.stop().await?;
    Ok(())
}
