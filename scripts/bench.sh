#!/usr/bin/env bash
# Herald's standard benchmarks in one go, each against its raw JetStream baselines in the same run:
#   scripts/bench.sh [--skip-build] [--no-docs]
#
# 1. Builds `herald` and `herald-bench` in release mode (not timed).
# 2. Runs `herald-bench ingest` (raw publish; ingest flat out and at half the raw rate),
#    `herald-bench processor` on a repeat-visitor workload (10,000 users, 20 events each; raw
#    consume+publish and the KV baseline) and `herald-bench pipeline --failing-neighbour
#    --search-steps 3` (the raw three-hop chain and the whole pipeline: highest sustained
#    rates, freshness at 5,000 and 20,000 events/s, the stage split).
# 3. Inserts a dated table (machine, nats-server version, figures, ratios to the baselines) at
#    the top of the "scripts/bench.sh runs" section of docs/benchmarks.md (unless --no-docs),
#    and keeps each bench's full output in $BENCH_OUT_DIR/<date>/ (default
#    $CARGO_TARGET_DIR/bench, else target/bench).
#
# About 6 to 8 minutes on a 2-core machine, not counting the build. Numbers move with whatever
# else the machine is doing: each bench prints the load average before and after it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

build=1
docs=1
for arg in "$@"; do
    case "$arg" in
        --skip-build) build=0 ;;
        --no-docs) docs=0 ;;
        -h | --help)
            sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            printf 'bench.sh: unknown argument %s (try --help)\n' "$arg" >&2
            exit 2
            ;;
    esac
done

announce() { printf '\n==> %s\n' "$*" >&2; }

if ! nats_server="$(bash scripts/install-nats-server.sh)"; then
    printf 'bench.sh: no usable nats-server (scripts/install-nats-server.sh failed)\n' >&2
    exit 1
fi
export HERALD_NATS_SERVER="$nats_server"

target="${CARGO_TARGET_DIR:-target}"
if (( build )); then
    announce "release build (cargo build --release -p herald -p herald-bench; not timed)"
    cargo build --release --locked -p herald -p herald-bench
fi
bench="$target/release/herald-bench"
export HERALD_BIN="$target/release/herald"
for bin in "$bench" "$HERALD_BIN"; do
    if [[ ! -x "$bin" ]]; then
        printf 'bench.sh: %s is missing; run without --skip-build\n' "$bin" >&2
        exit 1
    fi
done

stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
out="${BENCH_OUT_DIR:-$target/bench}/$stamp"
mkdir -p "$out"
started=$(date +%s)

# run NAME ARGS...: runs herald-bench ARGS, its report to $out/NAME.txt (progress lines on
# stderr to $out/NAME.err and the terminal), its JSON summary line to $out/NAME.json.
run() {
    local name="$1"
    shift
    # A large page cache (builds, earlier runs' stores) can keep the kernel's memory reclaim
    # busy through a run (docs/benchmarks.md, "The machine and the runs"): drop it when allowed.
    sync
    if ! { echo 3 > /proc/sys/vm/drop_caches; } 2> /dev/null; then
        printf 'bench.sh: could not drop the page cache; as root run "sync; echo 3 > /proc/sys/vm/drop_caches" first, or the numbers may move with it\n' >&2
    fi
    announce "herald-bench $*"
    "$bench" "$@" > "$out/$name.txt" 2> >(tee "$out/$name.err" >&2)
    cat "$out/$name.txt"
    grep '^{' "$out/$name.txt" | tail -n 1 > "$out/$name.json"
}

run ingest ingest
run processor processor --users 10000 --events 200000 --cache-mb 256
# Three bisections: the highest sustained rates to within an eighth of the last doubling.
run pipeline pipeline --failing-neighbour --search-steps 3
elapsed=$(( $(date +%s) - started ))
announce "benchmarks done in ${elapsed} s (without the build); outputs in $out"

if (( docs )); then
    python3 - "$out" "$elapsed" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        docs/benchmarks.md <<'PY'
import json, sys, datetime, pathlib

out, elapsed, commit, doc = sys.argv[1], int(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4])
load = lambda n: json.loads((pathlib.Path(out) / f"{n}.json").read_text())
ing, proc, pipe = load("ingest"), load("processor"), load("pipeline")

def n(x):
    return "–" if x is None else f"{x:,.0f}"

def r(x):
    return "–" if x is None else f"{x:.2f}"

def ms(f):
    return f"{f['p50_ms']:.1f} / {f['p90_ms']:.1f} / {f['p99_ms']:.1f} / {f['max_ms']:.0f}"

m = ing["machine"]
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
rows = []
rows.append(f"### {date}, commit {commit}\n")
rows.append(
    f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.1f} GiB; nats-server "
    f"{ing['nats_server']}; release build; {elapsed} s for the three benches. 1-minute load "
    f"before / after each: "
    + ", ".join(
        f"{name} {b['load_average_before'][0]:.2f} / {b['load_average_after'][0]:.2f}"
        for name, b in (("ingest", ing), ("processor", proc), ("pipeline", pipe))
    )
    + ".\n"
)
rows.append("| bench | baseline | Herald | ratio |")
rows.append("| --- | --- | --- | --- |")
fl = ing.get("ingest_flat_out") or {}
rows.append(
    f"| ingest, flat out (ev/s) | raw publish {n(ing['raw']['events_per_s'])} | "
    f"{n(fl.get('events_per_s'))} | **{r(ing.get('ratio'))}** |"
)
fx = ing.get("ingest_fixed_rate") or {}
rf = ing.get("raw_fixed_rate") or {}
if fx:
    rows.append(
        f"| ingest at {n(fx.get('offered_events_per_s'))} ev/s, p50 / p99 (ms) | raw group "
        f"{rf.get('latency_group', {}).get('p50_ms', 0):.1f} / {rf.get('latency_group', {}).get('p99_ms', 0):.1f} | "
        f"2xx {fx['latency_2xx']['p50_ms']:.1f} / {fx['latency_2xx']['p99_ms']:.1f} | |"
    )
rows.append(
    f"| processor, {proc['users']:,} users x {proc['events'] // max(proc['users'], 1)} events (ev/s) | "
    f"consume+publish {n((proc.get('raw_consume_publish') or {}).get('events_per_s'))}, "
    f"+KV {n((proc.get('raw_consume_kv_publish') or {}).get('events_per_s'))} | "
    f"{n(proc['processor']['events_per_s'])} | {r(proc.get('ratio_to_raw'))} of raw, "
    f"**{r(proc.get('ratio_to_kv'))}** of KV |"
)
rows.append(
    f"| pipeline, highest sustained (ev/s) | raw 3-hop chain "
    f"{n(pipe['raw']['highest_sustained_events_per_s'])} | "
    f"{n(pipe['herald']['highest_sustained_events_per_s'])} | **{r(pipe['throughput_ratio'])}** |"
)
conf = pipe["raw"].get("confirmed")
if conf:
    tried = ", ".join(
        f"{n(t['offered_events_per_s'])} {'ok' if t['sustained'] else 'behind'}"
        for t in conf["runs"]
    )
    held = n(conf["events_per_s"]) if conf.get("events_per_s") else "none"
    rows.append(
        f"| pipeline, raw chain held for {pipe['keep_up_duration_s']} s (ev/s) | {held} (tried {tried}) | | |"
    )
ku = (pipe.get("targets") or {}).get("keep_up")
if ku:
    rows.append(
        f"| pipeline keeps up at half the raw chain's sustained rate ({n(ku['offered_events_per_s'])} ev/s) | | "
        f"delivered {n(ku['delivered_events_per_s'])} ev/s, backlog at end {ku['backlog_at_end']:,} | "
        f"**{'met' if ku['met'] else 'NOT met'}** |"
    )
neighbour = (pipe.get("herald_failing_neighbour") or {}).get("fixed") or []
for i, raw in enumerate(pipe["raw"]["fixed"]):
    h = pipe["herald"]["fixed"][i]
    rate = n(raw["offered_events_per_s"])
    late = "" if h["drained"] else ", not all arrived"
    rows.append(
        f"| pipeline freshness at {rate} ev/s, p50 / p90 / p99 / max (ms) | {ms(raw['freshness'])} | "
        f"{ms(h['freshness'])} (delivered {n(h['delivered_events_per_s'])} ev/s{late}) | "
        f"p50 +{h['freshness']['p50_ms'] - raw['freshness']['p50_ms']:.1f} ms |"
    )
    if i < len(neighbour):
        nb = neighbour[i]
        rows.append(
            f"| the same with a failing neighbour destination | | {ms(nb['freshness'])} | |"
        )
    s = h.get("stages")
    if s:
        rows.append(
            f"| stage split at {rate} ev/s, p50 / p99 (ms, partition {s['partition']}, "
            f"{s['events_sampled']:,} events) | | ingest {s['ingest']['p50_ms']:.1f} / "
            f"{s['ingest']['p99_ms']:.1f}, processor {s['processor']['p50_ms']:.1f} / "
            f"{s['processor']['p99_ms']:.1f}, activator {s['activator']['p50_ms']:.1f} / "
            f"{s['activator']['p99_ms']:.1f} | |"
        )
cpu = pipe["processes"]["cpu_s"]
rss = pipe["processes"]["peak_rss_mb"]
rows.append(
    "| pipeline run, CPU s / peak RSS MiB per process | | "
    + ", ".join(f"{k} {cpu[k]:.0f} / {rss.get(k, 0):.0f}" for k in cpu)
    + " | |"
)
table = "\n".join(rows) + "\n"

start, end = "<!-- bench.sh runs start -->", "<!-- bench.sh runs end -->"
text = doc.read_text()
if start not in text:
    text = text.rstrip("\n") + f"\n\n## scripts/bench.sh runs\n\n{start}\n{end}\n"
head, rest = text.split(start, 1)
text = f"{head}{start}\n\n{table}{rest}"
doc.write_text(text)
print(f"bench.sh: table added to {doc}", file=sys.stderr)
PY
fi
