//! The one place that finds and starts a `nats-server` child, for `herald dev`, `herald-bench`
//! and the test harness.
//!
//! Finding a usable binary (2.12 or newer) works the same way as
//! `scripts/install-nats-server.sh`: `$HERALD_NATS_SERVER`, then `.tools/bin/nats-server` under
//! the given roots, then every `nats-server` on `PATH`. Each candidate's version is checked:
//! Debian's packaged 2.9 is too old (no priority groups, per-message TTL or atomic batch publish).
//!
//! Starting one is [`Launch`]: JetStream with its store, loopback only, a random client port (or
//! a given one), the port learnt from the server's `--ports_file_dir` file ([`read_ports_file`])
//! within a deadline, never from its logs. The [`NatsProcess`] it returns is killed on drop.

use std::env;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Child;
use tokio::time::Instant;

/// The oldest usable server release, as `(major, minor)`.
pub const MIN_VERSION: (u32, u32) = (2, 12);

/// What to do when no server is found.
pub const INSTALL_HINT: &str = "run scripts/install-nats-server.sh (it installs nats-server 2.15.1 into .tools/), or set HERALD_NATS_SERVER to a nats-server >= 2.12";

/// Finds a usable nats-server; the error lists every candidate, why it was rejected, and what
/// to do.
pub fn find(roots: &[PathBuf]) -> Result<PathBuf, String> {
    let mut candidates: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(path) = env::var_os("HERALD_NATS_SERVER").filter(|p| !p.is_empty()) {
        candidates.push(("$HERALD_NATS_SERVER", PathBuf::from(path)));
    }
    for root in roots {
        candidates.push((".tools", root.join(".tools/bin/nats-server")));
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                candidates.push(("PATH", candidate));
            }
        }
    }
    first_usable(candidates)
}

fn first_usable(candidates: Vec<(&str, PathBuf)>) -> Result<PathBuf, String> {
    let mut rejected = Vec::new();
    for (origin, path) in candidates {
        match check_version(&path) {
            Ok(()) => return Ok(path),
            Err(why) => rejected.push(format!("{} (from {origin}): {why}", path.display())),
        }
    }
    let (major, minor) = MIN_VERSION;
    Err(format!(
        "no usable nats-server >= {major}.{minor} found; {INSTALL_HINT}\nchecked:\n  {}",
        rejected.join("\n  ")
    ))
}

/// Finds a usable nats-server for a command run by hand (`herald dev`, `herald-bench`): the
/// roots are the current directory and the four directories above the running executable, so a
/// binary under `target/<profile>/` finds the checkout's `.tools/`.
pub fn find_from_here() -> Result<PathBuf, String> {
    let mut roots: Vec<PathBuf> = env::current_dir().into_iter().collect();
    if let Ok(exe) = env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    find(&roots)
}

/// What `nats-server --version` prints, without its `nats-server:` prefix (e.g. `v2.15.1`).
pub fn version(path: &Path) -> Result<String, String> {
    if !path.is_file() {
        return Err("not found".to_owned());
    }
    let output = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|err| format!("cannot run --version: {err}"))?;
    if !output.status.success() {
        return Err(format!("--version exited with {}", output.status));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let text = text.trim();
    Ok(text
        .strip_prefix("nats-server:")
        .unwrap_or(text)
        .trim()
        .to_owned())
}

fn check_version(path: &Path) -> Result<(), String> {
    let text = version(path)?;
    let version =
        parse_version(&text).ok_or_else(|| format!("cannot read a version from {text:?}"))?;
    let (major, minor) = MIN_VERSION;
    if (version.0, version.1) < (major, minor) {
        return Err(format!(
            "version {}.{}.{} is older than {major}.{minor}",
            version.0, version.1, version.2
        ));
    }
    Ok(())
}

/// Reads `(major, minor, patch)` from `nats-server --version` output such as
/// `nats-server: v2.15.1`.
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split_whitespace().find_map(|word| {
        let digits = word.strip_prefix('v').unwrap_or(word);
        let core = digits.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let version = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(version)
    })
}

/// How long [`Launch::start`] waits for the ports file unless told otherwise.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the ports file is looked for.
const POLL: Duration = Duration::from_millis(20);

/// Why a nats-server child did not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Its directories or log file could not be prepared.
    #[error("cannot prepare {}: {source}", path.display())]
    Prepare {
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The binary could not be run.
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        /// The nats-server binary.
        binary: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// It exited (at start, or later when checked with [`NatsProcess::check_running`]).
    #[error("nats-server exited with {status}; {log_tail}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// The end of its log.
        log_tail: String,
    },
    /// It wrote no ports file in time (it was killed).
    #[error("nats-server wrote no ports file in {} within {timeout:?}; {log_tail}", dir.display())]
    NoPortsFile {
        /// The `--ports_file_dir`.
        dir: PathBuf,
        /// How long it was given.
        timeout: Duration,
        /// The end of its log.
        log_tail: String,
    },
    /// Its status could not be read.
    #[error("cannot check the nats-server process: {0}")]
    Status(io::Error),
}

/// What a server lists in its `--ports_file_dir` file: URLs per listener.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Ports {
    /// Client URLs, e.g. `nats://127.0.0.1:41234`.
    #[serde(default)]
    pub nats: Vec<String>,
    /// HTTP monitoring URLs, when monitoring is on.
    #[serde(default)]
    pub monitoring: Vec<String>,
    /// Cluster route URLs, when clustered.
    #[serde(default)]
    pub cluster: Vec<String>,
}

impl Ports {
    /// The first client URL.
    pub fn client_url(&self) -> Option<&str> {
        self.nats.first().map(String::as_str)
    }

    /// The client port.
    pub fn client_port(&self) -> Option<u16> {
        url_port(self.client_url()?)
    }

    /// The HTTP monitoring port, when monitoring is on.
    pub fn monitor_port(&self) -> Option<u16> {
        url_port(self.monitoring.first()?)
    }
}

fn url_port(url: &str) -> Option<u16> {
    url.rsplit_once(':')?.1.trim_end_matches('/').parse().ok()
}

/// Reads the `*.ports` file a server started with `--ports_file_dir <dir>` writes once all its
/// listeners are bound. `None` while there is none, or while it is half written or lists no
/// client URL (poll again). The directory is expected to hold one server's file only.
pub fn read_ports_file(dir: &Path) -> Option<Ports> {
    // The file is named after the executable and pid (`nats-server_<pid>.ports`).
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "ports") {
            let text = std::fs::read(&path).ok()?;
            let ports: Ports = serde_json::from_slice(&text).ok()?;
            if !ports.nats.is_empty() {
                return Some(ports);
            }
        }
    }
    None
}

/// The last lines of a server log, for error messages.
pub fn log_tail(log: &Path) -> String {
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

/// Which HTTP monitoring port to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Monitor {
    Off,
    Random,
    Port(u16),
}

/// How to start a nats-server child: `-js -sd <store> -a 127.0.0.1 -p <port or -1>
/// [-m <port or -1>] [-c <config>] --ports_file_dir <dir> [extra args]`, output appended to a
/// log file. Command-line flags take precedence over the config file.
#[derive(Debug, Clone)]
pub struct Launch {
    binary: PathBuf,
    store_dir: PathBuf,
    ports_dir: PathBuf,
    log: PathBuf,
    port: Option<u16>,
    monitor: Monitor,
    config: Option<PathBuf>,
    args: Vec<OsString>,
    start_timeout: Duration,
}

impl Launch {
    /// A server from `binary` (see [`find`]) with its JetStream store in `store_dir`, its ports
    /// file in `ports_dir` (created; it must hold no other server's file) and its output
    /// appended to `log`; a random client port, no monitoring, [`START_TIMEOUT`].
    pub fn new(
        binary: impl Into<PathBuf>,
        store_dir: impl Into<PathBuf>,
        ports_dir: impl Into<PathBuf>,
        log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            binary: binary.into(),
            store_dir: store_dir.into(),
            ports_dir: ports_dir.into(),
            log: log.into(),
            port: None,
            monitor: Monitor::Off,
            config: None,
            args: Vec::new(),
            start_timeout: START_TIMEOUT,
        }
    }

    /// Listens for clients on this port instead of a random one (to restart on the same port).
    pub fn client_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Opens HTTP monitoring on a random port ([`Ports::monitor_port`] says which).
    pub fn monitor(mut self) -> Self {
        self.monitor = Monitor::Random;
        self
    }

    /// Opens HTTP monitoring on this port.
    pub fn monitor_port(mut self, port: u16) -> Self {
        self.monitor = Monitor::Port(port);
        self
    }

    /// Passes a configuration file with `-c` (for example a `cluster { .. }` or an
    /// `accounts { .. }` block).
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = Some(path.into());
        self
    }

    /// Appends more command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// How long to wait for the ports file.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// The command-line arguments.
    pub fn command_args(&self) -> Vec<OsString> {
        let port = |p: Option<u16>| p.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let mut args: Vec<OsString> = vec!["-js".into(), "-sd".into(), (&self.store_dir).into()];
        args.extend(["-a", "127.0.0.1", "-p"].map(OsString::from));
        args.push(port(self.port).into());
        match self.monitor {
            Monitor::Off => {}
            Monitor::Random => args.extend(["-m", "-1"].map(OsString::from)),
            Monitor::Port(p) => args.extend(["-m".into(), p.to_string().into()]),
        }
        if let Some(config) = &self.config {
            args.push("-c".into());
            args.push(config.into());
        }
        args.push("--ports_file_dir".into());
        args.push((&self.ports_dir).into());
        args.extend(self.args.iter().cloned());
        args
    }

    /// Starts the server and waits until its ports file lists a client URL: by then every
    /// listener is bound, and JetStream has recovered its store (the server opens its client
    /// port only after). A ports file left by an earlier server in `ports_dir` is removed
    /// first. Fails early when the process exits, and after the start timeout (killing it).
    pub async fn start(&self) -> Result<NatsProcess, LaunchError> {
        fn prepare(path: &Path) -> impl FnOnce(io::Error) -> LaunchError + '_ {
            move |source| LaunchError::Prepare {
                path: path.to_path_buf(),
                source,
            }
        }
        std::fs::create_dir_all(&self.ports_dir).map_err(prepare(&self.ports_dir))?;
        remove_stale_ports_files(&self.ports_dir).map_err(prepare(&self.ports_dir))?;
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(prepare(&self.log))?;
        let err = out.try_clone().map_err(prepare(&self.log))?;
        let child = tokio::process::Command::new(&self.binary)
            .args(self.command_args())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let mut process = NatsProcess {
            child,
            binary: self.binary.clone(),
            log: self.log.clone(),
            ports: Ports::default(),
        };
        let deadline = Instant::now() + self.start_timeout;
        loop {
            process.check_running()?;
            if let Some(ports) = read_ports_file(&self.ports_dir) {
                process.ports = ports;
                return Ok(process);
            }
            if Instant::now() >= deadline {
                process.kill().await;
                return Err(LaunchError::NoPortsFile {
                    dir: self.ports_dir.clone(),
                    timeout: self.start_timeout,
                    log_tail: log_tail(&self.log),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Removes `*.ports` files (a killed server leaves its own behind).
fn remove_stale_ports_files(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "ports") {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// A running nats-server started by [`Launch::start`]; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct NatsProcess {
    child: Child,
    binary: PathBuf,
    log: PathBuf,
    ports: Ports,
}

impl NatsProcess {
    /// The client URL from its ports file, e.g. `nats://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        self.ports.client_url().unwrap_or_default()
    }

    /// Everything its ports file lists.
    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    /// Its process id (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Fails with [`LaunchError::Exited`] (and the log tail) once it has exited.
    pub fn check_running(&mut self) -> Result<(), LaunchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(LaunchError::Exited {
                status,
                log_tail: log_tail(&self.log),
            }),
            Err(err) => Err(LaunchError::Status(err)),
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until it exits.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Kills it (SIGKILL, like a crash) and reaps it.
    pub async fn kill(mut self) {
        // An error means it has already exited, which is what is asked.
        let _ = self.child.kill().await;
    }

    /// Asks it to shut down cleanly (SIGTERM, sent with `nats-server --signal term=<pid>`),
    /// killing it if it has not exited within `grace`.
    pub async fn terminate(mut self, grace: Duration) {
        let signalled = match self.child.id() {
            Some(pid) => tokio::process::Command::new(&self.binary)
                .arg("--signal")
                .arg(format!("term={pid}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success()),
            None => false,
        };
        if !signalled
            || tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};

    use super::{Launch, first_usable, parse_version, url_port};

    fn fake_server(dir: &Path, name: &str, version_line: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho '{version_line}'\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn skips_old_and_missing_binaries_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let debian = fake_server(dir.path(), "debian", "nats-server: v2.9.10");
        let good = fake_server(dir.path(), "good", "nats-server: v2.15.1");
        let later = fake_server(dir.path(), "later", "nats-server: v2.16.0");
        let candidates = vec![
            ("env", dir.path().join("missing")),
            ("PATH", debian),
            ("PATH", good.clone()),
            ("PATH", later),
        ];
        assert_eq!(first_usable(candidates), Ok(good));
    }

    #[test]
    fn explains_every_rejection_and_how_to_install() {
        let dir = tempfile::tempdir().expect("tempdir");
        let debian = fake_server(dir.path(), "debian", "nats-server: v2.9.10");
        let garbled = fake_server(dir.path(), "garbled", "hello");
        let err = first_usable(vec![("PATH", debian), ("env", garbled)]).expect_err("none usable");
        assert!(err.contains("2.9.10 is older than 2.12"), "{err}");
        assert!(err.contains("cannot read a version"), "{err}");
        assert!(err.contains("run scripts/install-nats-server.sh"), "{err}");
    }

    #[test]
    fn parses_nats_server_version_output() {
        let cases = [
            ("nats-server: v2.15.1\n", Some((2, 15, 1))),
            ("nats-server: v2.9.10", Some((2, 9, 10))),
            ("nats-server: v2.12.0-RC.3", Some((2, 12, 0))),
            ("nats-server: 2.12.4", Some((2, 12, 4))),
            ("nats-server: dev", None),
            ("", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_version(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn old_debian_version_is_rejected() {
        let old = parse_version("nats-server: v2.9.10").map(|(a, b, _)| (a, b));
        assert!(old < Some(super::MIN_VERSION));
    }

    #[test]
    fn reads_ports_from_urls() {
        let cases = [
            ("nats://127.0.0.1:4222", Some(4222)),
            ("http://127.0.0.1:8222", Some(8222)),
            ("http://127.0.0.1:8222/", Some(8222)),
            ("nats://127.0.0.1", None),
        ];
        for (url, expected) in cases {
            assert_eq!(url_port(url), expected, "url {url:?}");
        }
    }

    #[test]
    fn command_line_has_store_loopback_ports_file_and_extras() {
        let args = |l: Launch| -> Vec<String> {
            l.command_args()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let base = Launch::new("nats-server", "/s", "/p", "/l");
        assert_eq!(
            args(base.clone()).join(" "),
            "-js -sd /s -a 127.0.0.1 -p -1 --ports_file_dir /p"
        );
        let all = base
            .client_port(4222)
            .monitor_port(8222)
            .config_file("/c.conf")
            .args(["--no_advertise"]);
        assert_eq!(
            args(all).join(" "),
            "-js -sd /s -a 127.0.0.1 -p 4222 -m 8222 -c /c.conf --ports_file_dir /p --no_advertise"
        );
        let random_monitor = Launch::new("nats-server", "/s", "/p", "/l").monitor();
        assert!(args(random_monitor).join(" ").contains("-m -1"));
    }
}
