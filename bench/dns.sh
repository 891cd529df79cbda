#!/usr/bin/env bash
# Mesh DNS: Isthmus's DNS server beside dnsmasq answering the same names from a hosts file, in one
# run, on loopback, driven by dnsperf with the same query file and settings.
# Installs Debian's dnsmasq, dnsperf and dnsutils if missing, builds the release example server,
# prints the machine and a markdown table. Settings come from the environment (defaults below).
# The figures in BENCHMARKS.md came from `bench/dns.sh` with no arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICES="${SERVICES:-1000}"           # mesh names served by every server
DURATION="${DURATION:-20}"             # seconds per throughput run
ROUNDS="${ROUNDS:-2}"                  # throughput runs per server, order rotated each round
CLIENTS="${CLIENTS:-4}"                # dnsperf -c
THREADS="${THREADS:-1}"                # dnsperf -T
OUTSTANDING="${OUTSTANDING:-100}"      # dnsperf -q
LATENCY_QPS="${LATENCY_QPS:-20000}"    # dnsperf -Q for the fixed-load latency run
LATENCY_DURATION="${LATENCY_DURATION:-10}"
# Isthmus configurations, each "runtime threads x UDP receiving tasks": 1x1 is like for like
# with dnsmasq's single thread; 2x2 is what the server does by default on a 2-core host.
ISTHMUS_CONFIGS="${ISTHMUS_CONFIGS:-1x1 2x2}"
BASE_PORT="${BASE_PORT:-25353}"        # dnsmasq here, the Isthmus configurations just above

missing=()
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq)
command -v dnsperf >/dev/null 2>&1 || missing+=(dnsperf)
command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
DNSMASQ="$(command -v dnsmasq || echo /usr/sbin/dnsmasq)"

cargo build --release -p isthmus-dns --example mesh_dns_server >&2
server_bin=target/release/examples/mesh_dns_server

work="$(mktemp -d)"
chmod 755 "$work" # dnsmasq reads the hosts file after dropping to user nobody
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

declare -A port pid label
systems=()
last=$((SERVICES - 1))
probe="svc-$last.ns-$((last % 10)).svc.cluster.local"
expect="10.$((96 + last / 65536)).$(((last / 256) % 256)).$((last % 256))"
wait_ready() { # system
    local deadline=$((SECONDS + 30))
    until [ "$(dig @127.0.0.1 -p "${port[$1]}" +short +time=1 +tries=1 "$probe" A 2>/dev/null)" = "$expect" ]; do
        if ! kill -0 "${pid[$1]}" 2>/dev/null || ((SECONDS > deadline)); then
            echo "$1 did not answer $probe with $expect on port ${port[$1]}:" >&2
            cat "$work"/*.log >&2
            exit 1
        fi
        sleep 0.1
    done
}

# The example writes the names it serves as a hosts file and a dnsperf query file, so every
# server answers exactly the same names with the same addresses.
n=0
for config in $ISTHMUS_CONFIGS; do
    n=$((n + 1))
    threads="${config%x*}" workers="${config#*x}" sys="isthmus-$config"
    port[$sys]=$((BASE_PORT + n))
    label[$sys]="Isthmus $threads thr / $workers UDP task"
    "$server_bin" --listen "127.0.0.1:${port[$sys]}" --services "$SERVICES" \
        --threads "$threads" --udp-workers "$workers" \
        --write-hosts "$work/hosts" --write-queries "$work/queries" >"$work/$sys.log" 2>&1 &
    pid[$sys]=$!
    pids+=("${pid[$sys]}")
    systems+=("$sys")
    wait_ready "$sys" # the files are complete once it answers
done
# --local-ttl=30 gives dnsmasq's answers the TTL Isthmus uses, so all send the same bytes.
sys=dnsmasq
port[$sys]=$BASE_PORT
label[$sys]="dnsmasq"
"$DNSMASQ" -k --no-resolv --no-hosts --addn-hosts="$work/hosts" --port="${port[$sys]}" \
    --listen-address=127.0.0.1 --bind-interfaces --cache-size=10000 --local-ttl=30 \
    --pid-file= --log-facility=- >"$work/dnsmasq.log" 2>&1 &
pid[$sys]=$!
pids+=("${pid[$sys]}")
systems+=("$sys")
wait_ready "$sys"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
tck="$(getconf CLK_TCK)"

# One throughput run: prints "qps lost avg_ms max_ms cpu_us_per_query".
throughput() { # system
    local before after out qps sent lost avg max
    before="$(cpu_ticks "${pid[$1]}")"
    out="$(dnsperf -s 127.0.0.1 -p "${port[$1]}" -d "$work/queries" -l "$DURATION" \
        -c "$CLIENTS" -T "$THREADS" -q "$OUTSTANDING" 2>&1)"
    after="$(cpu_ticks "${pid[$1]}")"
    qps="$(awk '/Queries per second/ {print $4}' <<<"$out")"
    sent="$(awk '/Queries sent/ {print $3}' <<<"$out")"
    lost="$(awk '/Queries lost/ {print $3}' <<<"$out")"
    avg="$(awk '/Average Latency/ {printf "%.3f", $4 * 1000}' <<<"$out")"
    max="$(awk '/Average Latency/ {gsub(/[()]/, ""); printf "%.2f", $8 * 1000}' <<<"$out")"
    awk -v q="$qps" -v l="$lost" -v a="$avg" -v m="$max" -v t=$((after - before)) -v hz="$tck" -v n="$sent" \
        'BEGIN {printf "%.0f %s %s %s %.2f\n", q, l, a, m, (t / hz) * 1e6 / n}'
}

# Latency at a fixed load every server sustains: dnsperf -v prints each query's latency.
latency() { # system -> "p50_ms p99_ms p999_ms max_ms lost"
    local out lost
    out="$(dnsperf -s 127.0.0.1 -p "${port[$1]}" -d "$work/queries" -l "$LATENCY_DURATION" \
        -c "$CLIENTS" -T "$THREADS" -q "$OUTSTANDING" -Q "$LATENCY_QPS" -v 2>&1)"
    lost="$(awk '/Queries lost/ {print $3}' <<<"$out")"
    awk '/^> NOERROR/ {print $NF}' <<<"$out" | sort -g | awk -v lost="$lost" '
        {v[NR] = $1}
        END {
            if (NR == 0) { print "- - - - " lost; exit }
            printf "%.3f %.3f %.3f %.3f %s\n", v[int(NR*0.5)]*1000, v[int(NR*0.99)]*1000,
                v[int(NR*0.999)]*1000, v[NR]*1000, lost
        }'
}

echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
echo "- $("$DNSMASQ" --version | head -1 | sed 's/  Copyright.*//'); dnsperf $(dnsperf -h 2>&1 | awk '/^Version/ {print $2}'); $(dig -v 2>&1)"
echo "- isthmus: $server_bin --services $SERVICES, configurations (threads x UDP tasks): $ISTHMUS_CONFIGS"
echo "- dnsperf: -c $CLIENTS -T $THREADS -q $OUTSTANDING -l $DURATION, $ROUNDS rounds (order rotated); latency run -Q $LATENCY_QPS -l $LATENCY_DURATION"
echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

declare -A results lat
count=${#systems[@]}
for round in $(seq 1 "$ROUNDS"); do
    # Rotate who goes first so drifting background load does not favour one server.
    for i in $(seq 0 $((count - 1))); do
        sys="${systems[$(((i + round - 1) % count))]}"
        results[$sys,$round]="$(throughput "$sys")"
        echo "round $round $sys: qps lost avg_ms max_ms cpu_us/query = ${results[$sys,$round]}" >&2
    done
done
for sys in "${systems[@]}"; do
    lat[$sys]="$(latency "$sys")"
    echo "latency $sys: p50 p99 p99.9 max lost = ${lat[$sys]}" >&2
done

field() { awk -v i="$2" '{print $i}' <<<"$1"; }
header="| UDP, $SERVICES mesh names; per round $(seq -s ' / ' 1 "$ROUNDS")"
rule="|---"
for sys in "${systems[@]}"; do header+=" | ${label[$sys]}"; rule+="|---:"; done
echo "$header |"
echo "$rule|"
row() { # label field-index
    local line="| $1" sys round vals
    for sys in "${systems[@]}"; do
        vals=()
        for round in $(seq 1 "$ROUNDS"); do vals+=("$(field "${results[$sys,$round]}" "$2")"); done
        line+=" | $(printf '%s / ' "${vals[@]}" | sed 's| / $||')"
    done
    echo "$line |"
}
row "queries/s" 1
row "lost queries" 2
row "average latency ms (dnsperf)" 3
row "max latency ms (dnsperf)" 4
row "server CPU µs per query" 5
line="| latency p50 / p99 / p99.9 / max ms at $LATENCY_QPS q/s"
for sys in "${systems[@]}"; do
    line+=" | $(field "${lat[$sys]}" 1) / $(field "${lat[$sys]}" 2) / $(field "${lat[$sys]}" 3) / $(field "${lat[$sys]}" 4)"
done
echo "$line |"
line="| lost queries at $LATENCY_QPS q/s"
for sys in "${systems[@]}"; do line+=" | $(field "${lat[$sys]}" 5)"; done
echo "$line |"
line="| server RSS after the runs, MiB"
for sys in "${systems[@]}"; do
    line+=" | $(awk -v k="$(rss_kib "${pid[$sys]}")" 'BEGIN {printf "%.1f", k/1024}')"
done
echo "$line |"
echo
echo "- load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
