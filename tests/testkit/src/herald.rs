//! The `herald` binary in tests: its config file, its service roles as child processes, its
//! admin commands, and the control APIs it serves. The binary's path is a parameter:
//! `env!("CARGO_BIN_EXE_herald")` exists only in the cli crate's tests.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};
use herald_common::auth::BearerToken;
use herald_common::{CommonConfig, ControlConfig, NatsConfig, TopologyConfig};
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Writes `<dir>/<name>.toml`: `[nats]` at `nats_url` (2 s request timeout), `[control]` with
/// `token`, then `sections`, the test's own TOML (`[ingest]`, `[processor]`, ...). Returns its
/// path.
///
/// # Errors
///
/// When the file cannot be written.
pub fn write_config(
    dir: &Path,
    name: &str,
    nats_url: &str,
    token: &str,
    sections: &str,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[nats]\nservers = \"{nats_url}\"\nrequest_timeout_ms = 2000\n\n\
         [control]\ntoken = \"{token}\"\n\n{sections}"
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The shared config of services started in process: NATS at `nats_url` (2 s request
/// timeout), `partitions` partitions, the control token `token`.
pub fn common_config(nats_url: &str, partitions: u32, token: &str) -> CommonConfig {
    CommonConfig {
        nats: NatsConfig {
            servers: nats_url.into(),
            request_timeout_ms: 2_000,
            ..Default::default()
        },
        topology: TopologyConfig {
            partitions,
            ..Default::default()
        },
        control: ControlConfig::with_token(token),
    }
}

/// Starts `herald <role> --config <config>` (the binary at `herald`) with `RUST_LOG=info`,
/// its stderr appended to `log`. Killed on drop.
///
/// # Errors
///
/// When the log file cannot be created or the binary not started.
pub fn spawn_role(herald: &Path, role: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    spawn_role_with(herald, role, config, log, &[], &[])
}

/// [`spawn_role`] with more arguments after `--config <config>` and environment variables
/// (the caller's `HERALD_WORKER_THREADS` is not passed on, so a role runs its default unless
/// `env` sets it).
///
/// # Errors
///
/// When the log file cannot be created or the binary not started.
pub fn spawn_role_with(
    herald: &Path,
    role: &str,
    config: &Path,
    log: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    Command::new(herald)
        .arg(role)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("HERALD_WORKER_THREADS")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning herald {role}"))
}

/// A control API client's channel: `addr` (`host:port`) with every call carrying the bearer
/// `token`. Wrap it in a generated client: `ProcessorServiceClient::new(channel)`.
///
/// # Errors
///
/// When the address is no valid URI, the connection fails, or the token is not a valid header.
pub async fn control_channel(
    addr: impl std::fmt::Display,
    token: &str,
) -> anyhow::Result<InterceptedService<Channel, BearerToken>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the control API at {addr}"))?;
    Ok(InterceptedService::new(channel, BearerToken::new(token)?))
}

/// Runs admin commands of the binary at `herald`: each call appends the same trailing
/// arguments (e.g. `--ingest-url <url> --token <token>`) and runs with `HERALD_TOKEN` unset
/// unless [`HeraldCli::env`] sets it.
#[derive(Debug, Clone)]
pub struct HeraldCli {
    binary: PathBuf,
    trailing: Vec<OsString>,
    env: Vec<(String, String)>,
    dir: Option<PathBuf>,
}

/// What one command did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Whether it exited with status 0.
    pub ok: bool,
    /// Its exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// What it printed to stdout.
    pub stdout: String,
    /// What it printed to stderr.
    pub stderr: String,
}

impl HeraldCli {
    /// Commands of the binary at `herald`, with no trailing arguments.
    pub fn new(herald: &Path) -> Self {
        Self {
            binary: herald.to_path_buf(),
            trailing: Vec::new(),
            env: Vec::new(),
            dir: None,
        }
    }

    /// Appends `args` after every command's own arguments.
    #[must_use]
    pub fn trailing<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.trailing.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for every command.
    #[must_use]
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs every command in `dir`.
    #[must_use]
    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// The command `herald <args> <trailing>`, not started yet (to set its stdio).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args)
            .args(&self.trailing)
            .env_remove("HERALD_TOKEN")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        cmd
    }

    /// Runs `herald <args> <trailing>` to its end.
    ///
    /// # Errors
    ///
    /// When the binary cannot be started.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        let out = self
            .command(args)
            .output()
            .await
            .with_context(|| format!("running herald {args:?}"))?;
        Ok(CliOutput {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Like [`HeraldCli::run`], and it must succeed; returns stdout.
    ///
    /// # Errors
    ///
    /// When the command fails (with its stderr).
    pub async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args).await?;
        if !out.ok {
            bail!("herald {args:?} failed:\n{}", out.stderr);
        }
        Ok(out.stdout)
    }
}

/// Creates what the processor provides the activator, for tests that run an activator without
/// a processor: the processed stream and the consent bucket (the activator waits for both
/// before delivering).
///
/// # Errors
///
/// When either cannot be created.
pub async fn activator_upstream(
    js: &async_nats::jetstream::Context,
    topology: &herald_common::Topology,
) -> anyhow::Result<()> {
    herald_common::nats::ensure_stream(js, topology.processed_stream_config())
        .await
        .context("creating the processed stream")?;
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: topology.bucket("consent"),
        ..Default::default()
    })
    .await
    .context("creating the consent bucket")?;
    Ok(())
}
