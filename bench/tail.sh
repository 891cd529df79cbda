#!/usr/bin/env bash
# Tail latency of the proxy pairs at a low fixed rate, interleaved (issue 18): ROUNDS runs of
# bench/dataplane.sh's fixed-rate scenario, each with the direct path, the Isthmus pair and the
# HAProxy pair back to back, so that the machine's drift hits both pairs alike. Prints one row
# per round with each pair's added p99 and p99.9 (over direct, same round) and CPU per request,
# then how many rounds Isthmus was at or below HAProxy. HAPROXY_PATH=haproxy-captured puts
# HAProxy's client behind the same iptables REDIRECT as the Isthmus path's (the capture's cost
# on both sides).
#
# Root only (network namespaces, as bench/dataplane.sh). ISTHMUS_BIN and HTTP_LOAD as there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-5}"
RATE="${RATE:-1000}"
DURATION="${DURATION:-10}"
HAPROXY_PATH="${HAPROXY_PATH:-haproxy}" # or haproxy-captured
# shellcheck source=bench/binaries.sh
source bench/binaries.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
hz=$(getconf CLK_TCK)

echo "### Tail at $RATE req/s: $ROUNDS interleaved rounds, ${DURATION} s measured each"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); nproc: $(nproc); CPU: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
echo "- isthmus $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3)"
echo
echo "| round | direct p99 ms | isthmus added p99 / p99.9 ms | $HAPROXY_PATH added p99 / p99.9 ms | CPU µs / request, isthmus / $HAPROXY_PATH |"
echo "| ---: | ---: | ---: | ---: | ---: |"
wins99=0 wins999=0 diffs99="" diffs999=""
for round in $(seq "$ROUNDS"); do
    PATHS="direct isthmus $HAPROXY_PATH" SCENARIOS=rates RATES="$RATE" DURATION="$DURATION" \
        bash bench/dataplane.sh >/dev/null 2>"$log"
    json() { grep "^$1 r$RATE: " "$log" | sed -E "s/^$1 r$RATE: //; s/ cpu_ticks=.*//"; }
    ticks() { grep "^$1 r$RATE: " "$log" | sed -E 's/.* cpu_ticks=([0-9]*).*/\1/'; }
    d99=$(json direct | jq .p99_ms) d999=$(json direct | jq .p999_ms)
    i99=$(json isthmus | jq .p99_ms) i999=$(json isthmus | jq .p999_ms)
    h99=$(json "$HAPROXY_PATH" | jq .p99_ms) h999=$(json "$HAPROXY_PATH" | jq .p999_ms)
    ni=$(json isthmus | jq .requests) nh=$(json "$HAPROXY_PATH" | jq .requests)
    read -r ai99 ai999 ah99 ah999 < <(awk -v d="$d99" -v dd="$d999" -v a="$i99" -v b="$i999" -v c="$h99" -v e="$h999" \
        'BEGIN {printf "%.3f %.3f %.3f %.3f\n", a - d, b - dd, c - d, e - dd}')
    cpu=$(awk -v ti="$(ticks isthmus)" -v th="$(ticks "$HAPROXY_PATH")" -v hz="$hz" -v ni="$ni" -v nh="$nh" \
        'BEGIN {printf "%.0f / %.0f", ti / hz * 1e6 / ni, th / hz * 1e6 / nh}')
    awk -v a="$ai99" -v b="$ah99" 'BEGIN {exit !(a <= b)}' && wins99=$((wins99 + 1))
    awk -v a="$ai999" -v b="$ah999" 'BEGIN {exit !(a <= b)}' && wins999=$((wins999 + 1))
    echo "| $round | $(printf '%.3f' "$d99") | $ai99 / $ai999 | $ah99 / $ah999 | $cpu |"
    diffs99+=" $(awk -v a="$ai99" -v b="$ah99" 'BEGIN {printf "%.3f", a - b}')"
    diffs999+=" $(awk -v a="$ai999" -v b="$ah999" 'BEGIN {printf "%.3f", a - b}')"
done
echo
echo "Isthmus at or below $HAPROXY_PATH: added p99 in $wins99 of $ROUNDS rounds, added p99.9 in $wins999 of $ROUNDS."
# Single rounds flip (BENCHMARKS.md, issue 18 runs 20-22): the median of the paired differences
# and a sign test (ties dropped; two-sided) say how sure a set of rounds is about the order.
for q in 99 99.9; do
    if [ "$q" = 99 ]; then d="$diffs99"; else d="$diffs999"; fi
    python3 - "$q" $d <<'PY'
import math, statistics, sys
q, diffs = sys.argv[1], [float(x) for x in sys.argv[2:]]
below, above = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
n = below + above
p = min(1.0, 2 * sum(math.comb(n, k) for k in range(0, min(below, above) + 1)) / 2**n) if n else 1.0
print(f"Added p{q}, Isthmus minus HAProxy: median {statistics.median(diffs):+.3f} ms over {len(diffs)} rounds; "
      f"below in {below}, above in {above}; sign test p = {p:.2f}")
PY
done
