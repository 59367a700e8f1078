//! Finding a usable `nats-server` binary (2.12 or newer), the same way as
//! `scripts/install-nats-server.sh`: `$HERALD_NATS_SERVER`, then `.tools/bin/nats-server` under
//! the given roots, then `PATH`. Each candidate's version is checked: Debian's packaged 2.9 is
//! too old (no priority groups, per-message TTL or atomic batch publish).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest usable server version.
pub const MIN_VERSION: (u32, u32) = (2, 12);

/// What to do when no server is found.
pub const INSTALL_HINT: &str =
    "run scripts/install-nats-server.sh (it installs nats-server 2.15.1 into .tools/), or set HERALD_NATS_SERVER to a nats-server >= 2.12";

/// Parses `nats-server: v2.15.1` (the output of `--version`) into (major, minor).
pub fn parse_version(output: &str) -> Option<(u32, u32)> {
    let v = output.trim().rsplit(['v', ' ']).next()?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The version of the binary at `path`, if it runs.
pub fn version_of(path: &Path) -> Option<(u32, u32)> {
    let out = Command::new(path).arg("--version").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// Finds a usable nats-server; the error lists what was tried and what to do.
pub fn find(roots: &[PathBuf]) -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("HERALD_NATS_SERVER") {
        candidates.push(PathBuf::from(p));
    }
    for root in roots {
        candidates.push(root.join(".tools/bin/nats-server"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    let mut tried = Vec::new();
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        match version_of(&c) {
            Some(v) if v >= MIN_VERSION => return Ok(c),
            Some((major, minor)) => tried.push(format!("{} is {major}.{minor}, too old", c.display())),
            None => tried.push(format!("{} does not run", c.display())),
        }
    }
    let tried = if tried.is_empty() {
        "no nats-server found".to_string()
    } else {
        tried.join("; ")
    };
    Err(format!("{tried}: {INSTALL_HINT}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9)));
        assert!(parse_version("garbage").is_none());
        assert!((2, 9) < MIN_VERSION && (2, 15) >= MIN_VERSION);
    }
}
