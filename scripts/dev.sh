#!/usr/bin/env bash
# Herald's one run command (the README's): installs nats-server if needed, builds the herald
# binary, and runs `herald dev` (nats-server child, the three services, a default source, a log
# destination). Extra arguments go to `herald dev`, e.g. scripts/dev.sh --ingest-addr 127.0.0.1:9000
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "FAILED: cargo is not on PATH. Install the Rust toolchain (rustup) and run this again." >&2
    exit 1
fi

echo "==> nats-server: find or install (scripts/install-nats-server.sh)" >&2
if ! nats_server="$(bash scripts/install-nats-server.sh)"; then
    echo "FAILED: no usable nats-server; see the message above." >&2
    exit 1
fi
export HERALD_NATS_SERVER="$nats_server"

echo "==> building herald (cargo build --locked -p herald)" >&2
if ! cargo build --locked -p herald; then
    echo "FAILED: the build failed; see the compiler output above." >&2
    exit 1
fi

echo "==> starting herald dev" >&2
exec target/debug/herald dev "$@"
