//! Herald services under test as child processes of the `herald` binary, as they are deployed:
//! `herald <role>`, so each one's CPU time and resident memory are its own.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use herald_common::CommonConfig;

/// What to do when no `herald` binary is found.
const HERALD_HINT: &str = "build it with `cargo build --release -p herald` (herald-bench then \
                           finds it beside itself), or pass --herald-bin <path> (or set HERALD_BIN)";

/// The `herald` binary whose roles are measured: `--herald-bin` (or `HERALD_BIN`), else a
/// `herald` beside this binary (as `cargo build` lays them out), else the first on PATH.
pub fn herald_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let path = std::env::var_os("PATH");
    find_herald(explicit, exe.as_deref(), path.as_deref()).map_err(anyhow::Error::msg)
}

fn find_herald(
    explicit: Option<&Path>,
    exe: Option<&Path>,
    path: Option<&OsStr>,
) -> Result<PathBuf, String> {
    if let Some(bin) = explicit {
        return if bin.is_file() {
            Ok(bin.to_path_buf())
        } else {
            Err(format!(
                "--herald-bin {}: no such file; {HERALD_HINT}",
                bin.display()
            ))
        };
    }
    let beside = exe.map(|e| e.with_file_name("herald"));
    if let Some(bin) = beside.as_ref().filter(|b| b.is_file()) {
        return Ok(bin.clone());
    }
    if let Some(bin) = path
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("herald"))
        .find(|b| b.is_file())
    {
        return Ok(bin);
    }
    Err(format!(
        "no herald binary found ({}not on PATH) to run the services; {HERALD_HINT}",
        beside.map_or(String::new(), |b| format!("not at {}, ", b.display()))
    ))
}

/// How to start one role.
pub struct ServiceSpec<'a> {
    /// The `herald` binary.
    pub herald: &'a Path,
    /// `ingest`, `processor` or `activator`: the subcommand and the config section.
    pub role: &'static str,
    /// Its config file (`--config`); without one, the defaults and `env`.
    pub config: Option<&'a Path>,
    /// Listeners whose address the bench needs (`admin_addr` always, `http_addr` for ingest):
    /// each gets a free loopback port. Every other listener (`extra_listeners`) gets port 0.
    pub listeners: &'a [&'static str],
    /// Listeners the bench does not talk to: `127.0.0.1:0`.
    pub extra_listeners: &'a [&'static str],
    /// More `HERALD__*` variables.
    pub env: Vec<(String, String)>,
    /// Where its log goes (`<role>.log`).
    pub dir: &'a Path,
    /// The admin address of the first start (tests use it to make the port taken); by default
    /// a free loopback port.
    pub first_admin: Option<SocketAddr>,
}

/// A Herald service under test: `herald <role>` as a child process, configured through its
/// config file and `HERALD__*` variables (the caller's own `HERALD__*` variables and
/// `HERALD_CONFIG` are not passed on), on loopback ports, logging to `<role>.log` in the
/// bench's directory.
pub struct ServiceChild {
    child: std::process::Child,
    role: &'static str,
    /// The addresses of [`ServiceSpec::listeners`], by listener.
    addrs: Vec<(&'static str, SocketAddr)>,
    log: PathBuf,
}

/// Attempts at starting a child when one of its ports was taken in between.
const START_ATTEMPTS: usize = 3;

impl ServiceChild {
    /// Spawns the child and waits until its admin server answers. Ports are picked by binding
    /// port 0 and releasing it, so another process can take one in between: the child then
    /// exits with "Address already in use" and is started again on new ports.
    pub async fn start(spec: &ServiceSpec<'_>, control: &CommonConfig) -> Result<Self> {
        let role = spec.role;
        let mut last = String::new();
        for attempt in 0..START_ATTEMPTS {
            let mut addrs = Vec::with_capacity(spec.listeners.len() + 1);
            for &listener in spec.listeners.iter().chain(["admin_addr"].iter()) {
                if addrs.iter().any(|(l, _)| *l == listener) {
                    continue;
                }
                let addr = match spec.first_admin.filter(|_| attempt == 0) {
                    Some(addr) if listener == "admin_addr" => addr,
                    _ => std::net::TcpListener::bind("127.0.0.1:0")
                        .and_then(|l| l.local_addr())
                        .with_context(|| format!("no free loopback port for the {role}"))?,
                };
                addrs.push((listener, addr));
            }
            let mut child = Self::spawn(spec, control, addrs)?;
            match child.admin_up().await {
                Ok(()) => return Ok(child),
                Err(tail) if child.log().contains("Address already in use") => {
                    eprintln!(
                        "the {role}'s admin port {} was taken; starting it again on another port",
                        child.admin()
                    );
                    last = tail;
                }
                Err(tail) => bail!("the {role} process exited at start\n{tail}"),
            }
        }
        bail!(
            "the {role}'s ports were taken {START_ATTEMPTS} times in a row; free some loopback \
             ports and run the bench again\n{last}"
        )
    }

    fn spawn(
        spec: &ServiceSpec<'_>,
        common: &CommonConfig,
        addrs: Vec<(&'static str, SocketAddr)>,
    ) -> Result<Self> {
        let role = spec.role;
        let log = spec.dir.join(format!("{role}.log"));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = std::process::Command::new(spec.herald);
        cmd.arg(role);
        if let Some(config) = spec.config {
            cmd.arg("--config").arg(config);
        }
        // What the bench sets, and nothing of the caller's: no config file, no `HERALD__*`
        // overrides.
        cmd.env_remove("HERALD_CONFIG");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HERALD__") {
                cmd.env_remove(key);
            }
        }
        let section = role.to_uppercase();
        for (listener, addr) in &addrs {
            cmd.env(
                format!("HERALD__{section}__{}", listener.to_uppercase()),
                addr.to_string(),
            );
        }
        for listener in spec.extra_listeners {
            cmd.env(
                format!("HERALD__{section}__{}", listener.to_uppercase()),
                "127.0.0.1:0",
            );
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .env("HERALD__NATS__SERVERS", &common.nats.servers)
            .env(
                "HERALD__CONTROL__TOKEN",
                common.control.resolve_token()?.expose(),
            )
            .env("HERALD__LOG__FILTER", "warn")
            // An error at start is reported in a line or two, not with a backtrace.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {} {role}", spec.herald.display()))?;
        Ok(Self {
            child,
            role,
            addrs,
            log,
        })
    }

    /// The address of listener `name` (one of [`ServiceSpec::listeners`], or `admin_addr`).
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(l, _)| *l == name).map(|(_, a)| *a)
    }

    /// Its admin address (`/healthz`, `/readyz`, `/metrics`).
    pub fn admin(&self) -> SocketAddr {
        self.addr("admin_addr")
            .expect("every child has an admin address")
    }

    /// Waits until its admin server answers `/healthz`; the log tail when it exits first or
    /// does not answer within 60 s.
    async fn admin_up(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("http://{}/healthz", self.admin());
        // Short timeouts: whoever took the port may accept connections and never answer.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| e.to_string())?;
        loop {
            if self.exited().is_some() {
                return Err(self.log_tail());
            }
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "its admin server did not answer within 60 s\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until its `/readyz` answers 200 (60 s deadline).
    pub async fn ready(&self) -> Result<()> {
        super::wait_ready(self.role, self.admin()).await
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Its Prometheus exposition.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.admin());
        Ok(reqwest::get(&url).await?.error_for_status()?.text().await?)
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s.
    pub async fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.exited().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its whole log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of its log, to show with a failure.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "last lines of {}:\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

impl Drop for ServiceChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_herald_binary_is_the_given_one_else_beside_this_one_else_on_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let touch = |sub: &str| {
            let d = dir.path().join(sub);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("herald"), "").expect("write");
            d.join("herald")
        };
        let given = touch("given");
        let beside = touch("target");
        let on_path = touch("bin");
        let exe = dir.path().join("target/herald-bench");
        let lonely_exe = dir.path().join("elsewhere/herald-bench");
        let path = std::env::join_paths([dir.path().join("empty"), dir.path().join("bin")])
            .expect("a PATH");
        let cases = [
            (
                Some(given.as_path()),
                Some(exe.as_path()),
                Some(path.as_os_str()),
                Ok(&given),
            ),
            (
                None,
                Some(exe.as_path()),
                Some(path.as_os_str()),
                Ok(&beside),
            ),
            (
                None,
                Some(lonely_exe.as_path()),
                Some(path.as_os_str()),
                Ok(&on_path),
            ),
            (None, None, Some(path.as_os_str()), Ok(&on_path)),
        ];
        for (i, (explicit, exe, path, expected)) in cases.into_iter().enumerate() {
            assert_eq!(
                find_herald(explicit, exe, path).as_ref(),
                expected,
                "case {i}"
            );
        }
        let none = find_herald(None, Some(&lonely_exe), Some(OsStr::new("")))
            .expect_err("nothing to find");
        assert!(none.contains("cargo build --release -p herald"), "{none}");
        assert!(none.contains("elsewhere/herald"), "{none}");
        let missing = find_herald(Some(Path::new("/nowhere/herald")), Some(&exe), None)
            .expect_err("the given one is missing");
        assert!(
            missing.starts_with("--herald-bin /nowhere/herald: no such file"),
            "{missing}"
        );
    }
}
