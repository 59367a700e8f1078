//! Finding a `nats-server` binary recent enough for Herald (see `herald_common::natsbin`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use herald_common::natsbin::MIN_VERSION as MIN_NATS_SERVER_VERSION;

/// Returns the path of a usable `nats-server` (version >= [`MIN_NATS_SERVER_VERSION`]), tried
/// in the same order as `scripts/install-nats-server.sh`: `$HERALD_NATS_SERVER`, then
/// `<workspace root>/.tools/bin/nats-server`, then every `nats-server` on `PATH`. The answer is
/// cached for the process. When none is usable the error lists every candidate and why it was
/// rejected, and says how to install one; tests never skip for a missing server.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| herald_common::natsbin::find(&[workspace_root()]))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn workspace_root() -> PathBuf {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}
