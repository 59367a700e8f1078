//! `herald dev` starts everything with one command, prints a short plain banner with one ready
//! line per service, and the event of the printed curl reaches the log destination; the admin
//! commands reach it, `herald status` says which partitions are idle, and a reader that closes
//! its pipe early gets no panic.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use herald_testkit::{HeraldCli, HeraldDev, free_port, wait_until};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_everything_and_delivers_the_printed_curl_event() -> Result<()> {
    let herald = Path::new(env!("CARGO_BIN_EXE_herald"));
    let dev = HeraldDev::start(herald).await?;
    let banner = dev.banner.clone();
    // What a newcomer reads: plain text (stderr is a pipe here), no warning on a first start,
    // the write key near the top, then one ready line per service.
    assert!(!banner.contains("\x1b["), "no colour codes:\n{banner}");
    assert!(
        !banner.lines().any(|l| l.contains("WARN")),
        "a first start logs no warning:\n{banner}"
    );
    let key_line = banner
        .lines()
        .position(|l| l.contains("write key"))
        .context("the banner shows the write key")?;
    assert!(
        key_line <= 15,
        "{key_line} lines before the write key:\n{banner}"
    );
    for ready in [
        format!("ingest ready: http://127.0.0.1:{}", dev.ports.ingest_http),
        format!(
            "processor ready: http://127.0.0.1:{}",
            dev.ports.processor_http
        ),
        "activator ready:".to_string(),
    ] {
        assert!(banner.contains(&ready), "{ready:?} in:\n{banner}");
    }
    // Webhooks on this machine or its network are allowed, and the banner says so.
    assert!(
        banner.contains("Webhook private networks: loopback and private ranges allowed"),
        "{banner}"
    );
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
        let out = HeraldCli::new(herald)
            .env("HERALD_TOKEN", &token)
            .command(&args)
            .arg(format!("http://127.0.0.1:{port}"))
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
    let out = HeraldCli::new(herald)
        .command(&[
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

    // `herald status` lists the partitions no event reached as idle, not as standby.
    let cli = HeraldCli::new(herald).trailing([
        "--processor-url".to_string(),
        format!("http://127.0.0.1:{}", grpc[1]),
        "--token".to_string(),
        token.clone(),
    ]);
    let status = cli.ok(&["status"]).await?;
    let idle = status
        .lines()
        .find_map(|l| l.strip_prefix("idle"))
        .with_context(|| format!("idle partitions listed:\n{status}"))?;
    assert_eq!(
        idle.split(',').count(),
        15,
        "one partition got the event:\n{status}"
    );
    assert!(!status.contains("standby"), "{status}");
    assert!(status.contains("processor-p0"), "{status}");

    // A reader that goes away early (`herald ... | head`) ends the command quietly.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = HeraldCli::new(herald)
        .env("HERALD_TOKEN", &token)
        .command(&["sources", "list", "--ingest-url"])
        .arg(format!("http://127.0.0.1:{}", grpc[0]))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "a closed pipe is no error: {stderr}");

    // Ctrl-C stops everything cleanly.
    dev.stop().await?;
    Ok(())
}
