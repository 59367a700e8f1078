//! The one nats-server launcher against a real nats-server (found like the test harness finds
//! it: `$HERALD_NATS_SERVER`, the checkout's `.tools/`, `PATH`).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_common::natsbin::{self, Launch, LaunchError};

fn nats_server() -> PathBuf {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    natsbin::find(&[root.to_path_buf()]).unwrap_or_else(|err| panic!("{err}"))
}

fn launch(binary: &Path, dir: &Path) -> Launch {
    Launch::new(
        binary,
        dir.join("store"),
        dir.join("ports"),
        dir.join("nats-server.log"),
    )
}

/// A stand-in for nats-server: a shell script.
fn script(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-nats-server");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[tokio::test]
async fn starts_a_jetstream_server_reads_its_url_and_restarts_it_on_the_same_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = nats_server();
    let server = launch(&binary, dir.path())
        .monitor()
        .start()
        .await
        .expect("starts");
    let url = server.url().to_owned();
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    let port = server.ports().client_port().expect("a client port");
    let monitor = server.ports().monitor_port().expect("a monitoring port");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    js.create_stream("S").await.expect("JetStream is on");
    server.kill().await;

    // Killed, it leaves its ports file behind; the restart removes it and reads the new one.
    let mut again = launch(&binary, dir.path())
        .client_port(port)
        .monitor_port(monitor)
        .start()
        .await
        .expect("restarts");
    assert_eq!(again.url(), url);
    assert_eq!(again.ports().monitor_port(), Some(monitor));
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    js.get_stream("S").await.expect("the store is kept");
    assert!(again.is_running());
    again.check_running().expect("running");
}

#[tokio::test]
async fn a_stale_ports_file_is_not_taken_for_the_new_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = dir.path().join("ports");
    std::fs::create_dir_all(&ports).expect("mkdir");
    std::fs::write(
        ports.join("nats-server_1.ports"),
        r#"{"nats":["nats://127.0.0.1:1"]}"#,
    )
    .expect("write");
    let server = launch(&nats_server(), dir.path())
        .start()
        .await
        .expect("starts");
    assert_ne!(server.url(), "nats://127.0.0.1:1");
    async_nats::connect(server.url()).await.expect("connects");
}

#[tokio::test]
async fn terminate_shuts_the_server_down_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = launch(&nats_server(), dir.path())
        .start()
        .await
        .expect("starts");
    assert!(natsbin::read_ports_file(&dir.path().join("ports")).is_some());
    server.terminate(Duration::from_secs(10)).await;
    // A clean shutdown deletes the ports file; a kill would leave it.
    assert!(natsbin::read_ports_file(&dir.path().join("ports")).is_none());
}

#[tokio::test]
async fn a_server_that_exits_at_start_is_reported_with_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = script(dir.path(), "echo 'cannot listen: port taken' >&2\nexit 3");
    let err = launch(&fake, dir.path())
        .start()
        .await
        .expect_err("it exited");
    assert!(matches!(err, LaunchError::Exited { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("exit status: 3"), "{text}");
    assert!(text.contains("cannot listen: port taken"), "{text}");
}

#[tokio::test]
async fn a_server_that_writes_no_ports_file_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = script(dir.path(), "echo 'starting slowly'\nexec sleep 60");
    let err = launch(&fake, dir.path())
        .start_timeout(Duration::from_millis(300))
        .start()
        .await
        .expect_err("no ports file");
    assert!(matches!(err, LaunchError::NoPortsFile { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("within 300ms"), "{text}");
    assert!(text.contains("starting slowly"), "{text}");
}

#[test]
fn the_version_is_read_without_its_prefix() {
    let version = natsbin::version(&nats_server()).expect("a version");
    assert!(version.starts_with('v'), "{version}");
    let missing = natsbin::version(Path::new("/nonexistent/nats-server"));
    assert_eq!(missing, Err("not found".to_owned()));
}
