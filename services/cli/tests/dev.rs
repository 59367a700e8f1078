//! `herald dev` starts everything with one command, and the event of the printed curl reaches
//! the log destination.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use herald_testkit::{HeraldDev, free_port, wait_until};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_everything_and_delivers_the_printed_curl_event() -> Result<()> {
    let mut dev = HeraldDev::start(Path::new(env!("CARGO_BIN_EXE_herald"))).await?;
    let banner = dev.banner.clone();
    let log_file = dev.log_file();
    let http_port = dev.ports.ingest_http;
    let grpc = [
        dev.ports.ingest_grpc,
        dev.ports.processor_grpc,
        dev.ports.activator_grpc,
    ];
    let curl = banner
        .lines()
        .find(|l| l.trim_start().starts_with("curl "))
        .expect("the banner prints a curl command")
        .trim()
        .to_string();
    let key = std::fs::read_to_string(dev.data_dir().join("write_key"))?;
    assert!(curl.contains(&format!("-u '{key}:'")), "{curl}");
    // The control token was generated in the data dir, readable by its owner only.
    let token_file = dev.data_dir().join("token");
    let token = std::fs::read_to_string(&token_file)?;
    assert!(token.len() >= 32, "a generated token: {token:?}");
    assert!(
        banner.contains(&token_file.canonicalize()?.display().to_string()),
        "the banner says where the token is:\n{banner}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&token_file)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is private");
    }

    // Run the printed command as pasted.
    let sent = tokio::time::Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{curl} -sS"))
        .output()
        .await?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), r#"{"success":true}"#);
    // The default source serves mParticle too: its key with the generated, printed secret.
    let secret = std::fs::read_to_string(dev.data_dir().join("write_secret"))?;
    assert!(banner.contains(&format!("{key}:{secret}")), "{banner}");
    let mp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http_port}/v2/events"))
        .basic_auth(&key, Some(&secret))
        .body(r#"{"mpid": 1, "events": []}"#)
        .send()
        .await?;
    assert_eq!(mp.status().as_u16(), 202, "{}", mp.text().await?);

    wait_until(
        "the event reaches the log destination",
        Duration::from_secs(10),
        || async { std::fs::read_to_string(&log_file).is_ok_and(|s| s.contains("Signed Up")) },
    )
    .await?;
    let latency = sent.elapsed();
    let line = std::fs::read_to_string(&log_file)?;
    let event: serde_json::Value = serde_json::from_str(line.lines().next().expect("one line"))?;
    assert_eq!(event["userId"], "user-1");
    assert_eq!(event["properties"]["plan"], "pro");
    eprintln!("curl to log line: {latency:?}");

    // Every control RPC has a CLI command that reaches the running services.
    for (args, expected) in [
        (vec!["sources", "list", "--ingest-url"], "default"),
        (vec!["status", "--processor-url"], "processed    1"),
        (vec!["destinations", "list", "--activator-url"], "log"),
    ] {
        let port = match args[0] {
            "sources" => grpc[0],
            "status" => grpc[1],
            _ => grpc[2],
        };
        let out = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(&args)
            .arg(format!("http://127.0.0.1:{port}"))
            .env("HERALD_TOKEN", &token)
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "herald {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(expected),
            "herald {args:?} printed {stdout}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "status",
            "--processor-url",
            &format!("http://127.0.0.1:{}", free_port()),
            "--token",
            &token,
        ])
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("is `herald processor` (or `herald dev`) running?"),
        "an unreachable service gets an error that says what to do"
    );

    // Ctrl-C stops everything cleanly.
    let pid = dev.child.id().expect("running");
    Command::new("kill")
        .arg("-INT")
        .arg(pid.to_string())
        .status()
        .await?;
    let status = tokio::time::timeout(Duration::from_secs(20), dev.child.wait()).await??;
    assert!(
        status.success(),
        "herald dev exits cleanly on Ctrl-C: {status:?}"
    );
    Ok(())
}
