#!/usr/bin/env bash
# Herald's one test command (the README's, and CI's through .ci/run):
#   scripts/test.sh [extra arguments for cargo nextest run]
# Installs or finds nats-server, makes sure the cargo tools are present, then checks formatting,
# checks and unit-tests the alert rules with promtool (installing Debian's prometheus package when
# missing), checks the Helm chart, compose file and Dockerfile offline (scripts/check-chart.py),
# runs clippy with warnings denied, runs every test with nextest and checks that the fuzz targets build. Each step is announced on stderr; a failure says which step failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

announce() { printf '\n==> %s\n' "$*" >&2; }
fail() {
    printf '\nFAILED step: %s\n' "$1" >&2
    exit "${2:-1}"
}
# step NAME COMMAND...: announces and runs COMMAND; on failure reports NAME and exits with its code.
step() {
    local name="$1"
    shift
    announce "$name"
    local rc=0
    "$@" || rc=$?
    if (( rc != 0 )); then
        fail "$name (exit code $rc): $*" "$rc"
    fi
}

if [[ "${CI:-}" == "true" ]]; then
    # Incremental compilation only costs time on a fresh CI machine.
    export CARGO_INCREMENTAL=0
    # The nextest ci profile (see .config/nextest.toml), unless one was chosen explicitly.
    export NEXTEST_PROFILE="${NEXTEST_PROFILE:-ci}"
fi

announce "nats-server: find or install (scripts/install-nats-server.sh)"
if ! nats_server="$(bash scripts/install-nats-server.sh)"; then
    fail "nats-server: find or install"
fi
export HERALD_NATS_SERVER="$nats_server"
printf 'HERALD_NATS_SERVER=%s\n' "$HERALD_NATS_SERVER" >&2

announce "cargo-nextest: check"
if ! cargo nextest --version >/dev/null 2>&1; then
    step "cargo-nextest: install" cargo install cargo-nextest --locked
fi

announce "rustfmt and clippy: check"
for component in rustfmt clippy; do
    case "$component" in
        rustfmt) probe=(cargo fmt --version) ;;
        clippy) probe=(cargo clippy --version) ;;
    esac
    if ! "${probe[@]}" >/dev/null 2>&1; then
        printf 'component %s is missing; running rustup component add %s\n' "$component" "$component" >&2
        if ! rustup component add "$component" >&2; then
            printf 'WARNING: could not install %s with rustup; the step that needs it will fail.\n' \
                "$component" >&2
            printf 'Install it by hand (rustup component add %s) and run this script again.\n' \
                "$component" >&2
        fi
    fi
done

step "format check (cargo fmt --all -- --check)" cargo fmt --all -- --check
# Alerts: deploy/prometheus/rules.yml parses and its unit tests pass. promtool comes from
# Debian's `prometheus` package, installed when missing (the metrics lint test,
# tests/e2e/tests/metrics.rs, runs it too).
announce "promtool: find or install (Debian package prometheus)"
if ! command -v promtool >/dev/null 2>&1; then
    apt=(apt-get)
    if (( EUID != 0 )); then
        if command -v sudo >/dev/null 2>&1; then
            apt=(sudo apt-get)
        else
            fail "promtool: install (promtool is missing and installing the prometheus package needs root or sudo: run 'apt-get install prometheus' as root)"
        fi
    fi
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends prometheus >&2; then
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >&2 || true
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends prometheus >&2 \
            || fail "promtool: install (apt-get install prometheus failed; install the package by hand)"
    fi
    command -v promtool >/dev/null 2>&1 \
        || fail "promtool: install (the prometheus package is installed but promtool is not on PATH)"
fi
printf 'promtool: %s\n' "$(command -v promtool)" >&2
step "alert rules parse (promtool check rules deploy/prometheus/rules.yml)" \
    promtool check rules deploy/prometheus/rules.yml
step "alert rule unit tests (promtool test rules deploy/prometheus/rules.test.yml)" \
    promtool test rules deploy/prometheus/rules.test.yml
# No helm binary or cluster: renders, lints and validates helm/herald with every override set in
# helm/herald/ci/, and checks deploy/compose.yaml and deploy/Dockerfile against the chart
# (installs helm-python-sdk and kubernetes-validate into .tools/python when missing).
step "chart, compose and Dockerfile checks (scripts/check-chart.py)" python3 scripts/check-chart.py
# The shipped binary carries no load generator: herald-bench (tests/bench) has it.
announce "the herald binary links no benchmark code (cargo tree -p herald -e normal)"
if cargo tree -p herald -e normal --locked --prefix none | grep -q '^hdrhistogram '; then
    fail "the herald binary depends on hdrhistogram: keep benchmark code in tests/bench (herald-bench)"
fi
step "lint (cargo clippy --workspace --all-targets --locked -- -D warnings)" \
    cargo clippy --workspace --all-targets --locked -- -D warnings
step "tests (cargo nextest run --workspace --locked)" \
    cargo nextest run --workspace --locked "$@"
# The fuzz targets (fuzz/, outside the workspace) must keep building; fuzzing itself runs by
# hand (see fuzz/Cargo.toml). Shares the workspace's target directory to reuse what is built.
step "fuzz targets build (cargo check --manifest-path fuzz/Cargo.toml --bins --locked)" \
    env CARGO_TARGET_DIR="$PWD/target" cargo check --manifest-path fuzz/Cargo.toml --bins --locked

announce "all steps passed"
