#!/usr/bin/env bash
# Per-request timestamps through both proxy pairs at a low fixed rate (issue 18): records the
# data system calls (sendto, recvfrom, writev) of every process with `perf record -a` while
# bench/dataplane.sh runs its fixed-rate scenario on the Isthmus L4 pair and the HAProxy tcp
# pair, then follows each request through the load generator, both proxies and the app
# (bench/hops.py) and prints where its time went, by latency band.
#
# Root only (network namespaces and perf, as bench/dataplane.sh). RATE, DURATION, ISTHMUS_BIN
# and HTTP_LOAD as in bench/tail.sh. The trace costs the traced processes a few µs a call; the
# comparison between the pairs is made in the same trace.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE="${RATE:-1000}"
DURATION="${DURATION:-10}"
PATHS="${PATHS:-isthmus haproxy}" # any of bench/dataplane.sh's proxy paths but haproxy-http
if [ "$(id -u)" != 0 ]; then
    echo "bench/hops.sh needs root (network namespaces, perf)" >&2
    exit 1
fi
if ! command -v perf >/dev/null 2>&1; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >&2
fi
# shellcheck source=bench/binaries.sh
source bench/binaries.sh
work="$(mktemp -d)"
perf_pid=""
cleanup() {
    [ -z "$perf_pid" ] || kill -INT "$perf_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
events=()
for call in sendto recvfrom writev; do
    events+=(-e "syscalls:sys_enter_$call" -e "syscalls:sys_exit_$call")
done
perf record -a -q -m 16M "${events[@]}" -o "$work/perf.data" >"$work/perf.log" 2>&1 &
perf_pid=$!
sleep 1
PATHS="$PATHS" SCENARIOS=rates RATES="$RATE" DURATION="$DURATION" \
    bash bench/dataplane.sh >/dev/null 2>"$work/dataplane.log"
kill -INT "$perf_pid"
wait "$perf_pid" || true
perf_pid=""
echo "### Where a request's time goes at $RATE req/s: per-request timestamps, both pairs"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); nproc: $(nproc); CPU: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
echo "- isthmus $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3)"
echo "- the load generator's own figures in this run (traced):"
grep -E "^(isthmus|haproxy)\S* r$RATE: " "$work/dataplane.log" |
    sed -E 's/^([a-z0-9-]+) r[0-9]+: (.*) cpu_ticks=.*/\1 \2/' |
    while read -r p json; do
        ms() { jq "(.$1 * 1000 | round) / 1000" <<<"$json"; }
        echo "  $p: p50 $(ms p50_ms) ms, p99 $(ms p99_ms) ms, p99.9 $(ms p999_ms) ms"
    done
echo
perf script -i "$work/perf.data" -F comm,pid,tid,time,event,trace --ns 2>/dev/null |
    grep -E '^ *(http-load|isthmus-proxy|haproxy|nginx) ' >"$work/calls.txt"
# shellcheck disable=SC2086 # PATHS is a list
python3 bench/hops.py "$work/calls.txt" $PATHS
