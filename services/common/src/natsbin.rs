//! Finding a usable `nats-server` binary (2.12 or newer), the same way as
//! `scripts/install-nats-server.sh`: `$HERALD_NATS_SERVER`, then `.tools/bin/nats-server` under
//! the given roots, then every `nats-server` on `PATH`. Each candidate's version is checked:
//! Debian's packaged 2.9 is too old (no priority groups, per-message TTL or atomic batch publish).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

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

fn check_version(path: &Path) -> Result<(), String> {
    if !path.is_file() {
        return Err("not found".to_owned());
    }
    let output = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|err| format!("cannot run --version: {err}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("--version exited with {}", output.status));
    }
    let version = parse_version(&text)
        .ok_or_else(|| format!("cannot read a version from {:?}", text.trim()))?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};

    use super::{first_usable, parse_version};

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
}
