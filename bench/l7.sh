#!/usr/bin/env bash
# Issue 17's fixed-rate target over interleaved rounds: ROUNDS runs of bench/dataplane.sh's
# fixed-rate scenario at each of RATES, each round with the Isthmus L4 pair, the Isthmus L7
# pair and the HAProxy tcp and http pairs back to back, so that the machine's drift hits them
# alike. Prints one row per round and rate (p50 / p99 of each, L7's p99 over L4's, CPU per
# request of both agents), then per rate the median over the rounds of L7's added p99 (the
# target: at most +30% over L4), in how many rounds it was met, and how L7 stood against the
# HAProxy http pair in the same rounds (paired differences, sign test). One round is noisy on
# two shared vCPUs (BENCHMARKS.md, issue 17 runs 18-23); the median over rounds is the figure.
#
# Root only (network namespaces, as bench/dataplane.sh). ISTHMUS_BIN and HTTP_LOAD as there;
# any other setting of bench/dataplane.sh (ISTHMUS_BUSY_POLL for the agents...) passes through.
# LOGS_DIR=<dir> keeps each round's bench/dataplane.sh log there (round-N.log: the result lines
# with CPU, context switches, polling seconds and moves), which are otherwise removed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-5}"
RATES="${RATES:-1000 10000}"
DURATION="${DURATION:-20}"
case "$ROUNDS" in '' | *[!0-9]* | 0)
    echo "bench/l7.sh: ROUNDS must be a whole number of rounds, at least 1 (got '$ROUNDS')" >&2
    exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "bench/l7.sh needs root (network namespaces, iptables), as bench/dataplane.sh" >&2
    exit 1
fi
# shellcheck source=bench/binaries.sh
source bench/binaries.sh
work="$(mktemp -d)"
keep_logs() {
    if [ -n "${LOGS_DIR:-}" ]; then
        mkdir -p "$LOGS_DIR" && cp "$work"/round-*.log "$LOGS_DIR"/ 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap keep_logs EXIT

echo "### Issue 17's fixed rates: $ROUNDS interleaved rounds, ${DURATION} s measured each"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); nproc: $(nproc); CPU: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- isthmus $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($ISTHMUS_BIN); $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3)"
echo
for round in $(seq "$ROUNDS"); do
    PATHS="isthmus isthmus-l7 haproxy haproxy-http" SCENARIOS=rates RATES="$RATES" \
        DURATION="$DURATION" bash bench/dataplane.sh >/dev/null 2>"$work/round-$round.log"
done
python3 - "$ROUNDS" "$(getconf CLK_TCK)" "$work" $RATES <<'PY'
import json, math, re, statistics, sys

rounds, hz, work, rates = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
LINE = re.compile(r"^(\S+) r(\d+): (\{.*\}) cpu_ticks=(\d*)")
paths = ("isthmus", "isthmus-l7", "haproxy", "haproxy-http")
runs = {}  # (round, rate, path) -> (p50, p99, cpu µs per request)
for r in range(1, rounds + 1):
    with open(f"{work}/round-{r}.log") as f:
        for line in f:
            m = LINE.match(line.strip())
            if not m or m.group(1) not in paths:
                continue
            j = json.loads(m.group(3))
            if j.get("errors"):
                sys.exit(f"round {r}: {m.group(1)} at {m.group(2)} req/s had {j['errors']} errors: {j.get('first_error')}")
            cpu = int(m.group(4) or 0) / hz * 1e6 / max(j["requests"], 1)
            runs[(r, m.group(2), m.group(1))] = (j["p50_ms"], j["p99_ms"], cpu)

def sign_p(diffs):
    below, above = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    n = below + above
    if not n:
        return below, above, 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(below, above) + 1))
    return below, above, min(1.0, 2 * tail / 2**n)

print("| round | req/s | L4 p50 / p99 ms | L7 p50 / p99 ms | L7 p99 over L4 | HAProxy tcp p50 / p99 | HAProxy http p50 / p99 | CPU µs / request, L4 / L7 |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for rate in rates:
    for r in range(1, rounds + 1):
        try:
            l4, l7, ht, hh = (runs[(r, rate, p)] for p in paths)
        except KeyError as e:
            sys.exit(f"round {r} at {rate} req/s has no result for {e.args[0][2]}: see bench/dataplane.sh's log")
        print(f"| {r} | {int(rate):,} | {l4[0]:.3f} / {l4[1]:.3f} | {l7[0]:.3f} / {l7[1]:.3f} | "
              f"{(l7[1] / l4[1] - 1) * 100:+.0f}% | {ht[0]:.3f} / {ht[1]:.3f} | {hh[0]:.3f} / {hh[1]:.3f} | "
              f"{l4[2]:.0f} / {l7[2]:.0f} |")
print()
for rate in rates:
    ratios = [runs[(r, rate, "isthmus-l7")][1] / runs[(r, rate, "isthmus")][1] - 1 for r in range(1, rounds + 1)]
    met = sum(x <= 0.30 for x in ratios)
    vs_http = [runs[(r, rate, "isthmus-l7")][1] - runs[(r, rate, "haproxy-http")][1] for r in range(1, rounds + 1)]
    below, above, p = sign_p(vs_http)
    http_ratio = [runs[(r, rate, "haproxy-http")][1] / runs[(r, rate, "haproxy")][1] - 1 for r in range(1, rounds + 1)]
    print(f"- {int(rate):,} req/s: L7 adds {statistics.median(ratios) * 100:+.0f}% p99 over L4, median of "
          f"{rounds} rounds ({min(ratios) * 100:+.0f}% to {max(ratios) * 100:+.0f}%; at most +30% in {met} of {rounds}). "
          f"L7 minus the HAProxy http pair, p99: median {statistics.median(vs_http):+.3f} ms, below in {below}, "
          f"above in {above}, sign test p = {p:.2f}. The HAProxy http pair adds "
          f"{statistics.median(http_ratio) * 100:+.0f}% p99 over its tcp pair (median).")
PY
