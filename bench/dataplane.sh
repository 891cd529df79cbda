#!/usr/bin/env bash
# Data plane latency and throughput (issue 5): one HTTP app and one iperf3 server on a "mesh"
# host, a client on a "VM" host, three ways between them in one run:
#   direct   the client connects to the app (plain TCP, no proxy)
#   isthmus  the client connects to the service VIP; the VM's agent captures it (iptables, 15001)
#            and tunnels it over HBONE (mTLS, HTTP/2 CONNECT, 15008) to the mesh host's agent
#            (STRICT inbound), which delivers it to the app
#   haproxy  the client connects to a plain haproxy on the VM, which opens TLS with a client
#            certificate to a haproxy on the mesh host that requires one and forwards to the app
#   isthmus-l7  as isthmus, to a port declared HTTP: both agents terminate HTTP and route,
#            balance and report each request (issue 17)
#   haproxy-http  the haproxy pair in `mode http` (each request parsed on both sides), over the
#            same mTLS
# and unary gRPC (h2c, `grpc-load` from crates/bench, closed loop) on direct, isthmus (a port
# declared TCP), isthmus-l7 (a port declared gRPC) and haproxy-http (HTTP/2 on every hop).
# Fixed-rate latency (open loop, `http-load` from crates/bench), closed-loop maximum throughput,
# bulk TCP (iperf3), and the RSS of each proxy idle and under load.
#
# Root only: every packet stays inside network namespaces this script creates (a bridge namespace
# and three hosts) and their loopbacks; all of them, the processes and the temp dir go on exit.
# Installs Debian's haproxy, nginx-light and iperf3 if missing. Prints the machine and markdown.
# The figures in BENCHMARKS.md came from `bench/dataplane.sh` with no arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"          # seconds measured per HTTP run
WARMUP="${WARMUP:-2}"               # seconds of load before each HTTP run is measured
RATES="${RATES:-1000 10000}"        # fixed rates, requests/s
CONNS="${CONNS:-32}"                # keep-alive connections of every HTTP run
PACING="${PACING:-precise}"         # fixed rates: each request at its due time (precise), or the ones due within a 1 ms tick together (tick: runs before 2026-12-05)
BULK_SECONDS="${BULK_SECONDS:-5}"   # iperf3 -t
BODY_BYTES="${BODY_BYTES:-1024}"
PATHS="${PATHS:-direct isthmus isthmus-l7 haproxy haproxy-http}" # which paths run (the report needs direct for "added"; also haproxy-captured, HTTP L4)
PERF_DIR="${PERF_DIR:-}"            # if set: `perf record -g` both agents during each isthmus run
SCENARIOS="${SCENARIOS:-rates max grpc bulk}" # which runs (the report needs all four)
HAPROXY_NBTHREAD="${HAPROXY_NBTHREAD:-}" # if set: both haproxy processes get `nbthread N` (default: one per CPU)
HAPROXY_BUSY_POLLING="${HAPROXY_BUSY_POLLING:-}" # if set: both haproxy processes get `busy-polling` (they never sleep; the agents poll only under load, ISTHMUS_BUSY_POLL)
SYSCALLS="${SYSCALLS:-}"            # if set: count both proxies' system calls in each HTTP run (perf stat)
SMAPS_DIR="${SMAPS_DIR:-}"          # if set: both agents' /proc/PID/smaps at the end of each isthmus run
AGENT_WRAPPER="${AGENT_WRAPPER:-}"  # a command the agents run under (scripts/order-file.sh: valgrind)
STOP_WAIT="${STOP_WAIT:-5}"         # seconds the processes get to exit on SIGTERM at the end
VIP_ROUTE_MTU="${VIP_ROUTE_MTU:-}"  # if set: the service CIDR's route gets this MTU (captured connections' MSS)
VIP_CIDR="${VIP_CIDR:-}"            # if set (10.96.0.0/12): the agents' ISTHMUS_VIP_CIDR, and haproxy-captured's address routed through lo alike
AGENT_WAIT=30                       # seconds an agent gets to start
[ -n "$AGENT_WRAPPER" ] && AGENT_WAIT=300

load_at_start="$(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$(id -u)" != 0 ]; then
    echo "bench/dataplane.sh needs root (network namespaces, iptables)" >&2
    exit 1
fi
# What building and the agents need (protoc, iptables, ip) on a fresh machine.
scripts/setup.sh >&2
missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# ISTHMUS_BIN: another build of isthmus, e.g. a baseline; HTTP_LOAD: a built load generator.
# With both given nothing is built.
if [ -z "${ISTHMUS_BIN:-}" ] || [ -z "${HTTP_LOAD:-}" ]; then
    # Two builds: built together, isthmus-bench's dependency features would be unified into the
    # agent's, giving another binary than `scripts/package.sh` and `scripts/dev.sh` build (other
    # symbol names, so the link order file would not match the product).
    cargo build --release -p isthmus >&2
    cargo build --release -p isthmus-bench --bin http-load --bin grpc-load >&2
fi
BIN="${ISTHMUS_BIN:-$PWD/target/release/isthmus}"
LOAD="${HTTP_LOAD:-$PWD/target/release/http-load}"
GRPC_LOAD="$(dirname "$LOAD")/grpc-load"
GRPC_CONNS="${GRPC_CONNS:-4}"       # HTTP/2 connections of the gRPC runs
GRPC_STREAMS="${GRPC_STREAMS:-8}"   # calls in flight on each (4 x 8: as many as the HTTP runs' 32)

id=$(($$ % 100000))
SW="dpsw-$id"
ns() { echo "dp$1-$id"; }
CP=10.78.0.1
MESH=10.78.0.2
VM=10.78.0.3
work="$(mktemp -d)"
chmod 755 "$work" # nginx's worker reads its files as www-data
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq $((STOP_WAIT * 10))); do
        alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in "$SW" "$(ns cp)" "$(ns mesh)" "$(ns vm)"; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
inns() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }
# In the background, with $! the program's own pid (`ip netns exec` execs it).
spawn() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@" & }
wait_until() { # what seconds command...
    local what=$1 deadline=$((SECONDS + $2)); shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "timed out waiting for $what" >&2
            tail -n 20 "$work"/*.log >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

# --- Namespaces: one bridge, three hosts (as crates/isthmus/tests/netns.rs) ---
ip netns add "$SW"
ip -n "$SW" link add br0 type bridge
ip -n "$SW" link set br0 up
for h in cp mesh vm; do
    case $h in cp) addr=$CP ;; mesh) addr=$MESH ;; vm) addr=$VM ;; esac
    ip netns add "$(ns "$h")"
    ip link add "d$h$id" type veth peer name eth0 netns "$(ns "$h")"
    ip link set "d$h$id" netns "$SW"
    ip -n "$SW" link set "d$h$id" master br0 up
    ip -n "$(ns "$h")" addr add "$addr/24" dev eth0
    ip -n "$(ns "$h")" link set eth0 up
    ip -n "$(ns "$h")" link set lo up
    # The service CIDR needs a route for the kernel to hand connections to the nat rules.
    ip -n "$(ns "$h")" route add 10.96.0.0/12 dev eth0 ${VIP_ROUTE_MTU:+mtu lock $VIP_ROUTE_MTU}
done

# --- The app: nginx serving BODY_BYTES on 9080 (mesh service port, STRICT) and 8080 (direct,
# haproxy), and iperf3 on 5201 (mesh) and 5202 (direct, haproxy) ---
mkdir -p "$work/www"
head -c "$BODY_BYTES" /dev/zero | tr '\0' 'x' >"$work/www/index.html"
cat >"$work/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 9080;
        listen 9081;
        listen 8080;
        root $work/www;
    }
}
EOF
spawn mesh "$NGINX" -c "$work/nginx.conf" -e "$work/nginx-error.log" >"$work/nginx.log" 2>&1
pids+=($!)
spawn mesh iperf3 -s -p 5201 >"$work/iperf-5201.log" 2>&1
pids+=($!)
# gRPC: 9082 (mesh, declared grpc), 9083 (mesh, declared tcp), 8082 (direct, haproxy).
for port in 9082 9083 8082; do
    spawn mesh "$GRPC_LOAD" serve --addr "0.0.0.0:$port" --bytes "$BODY_BYTES" >"$work/grpc-$port.log" 2>&1
    pids+=($!)
done
pids+=($!)
spawn mesh iperf3 -s -p 5202 >"$work/iperf-5202.log" 2>&1
pids+=($!)

# --- Isthmus: control plane, then one agent per host (join tokens, cluster.env, sidecar.env) ---
ISTHMUS_LOG=warn spawn cp "$BIN" server --data-dir "$work/cp" --admin-addr 127.0.0.1:0 \
    --registration-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --grpc-addr "$CP:15012" \
    --dns-addr "$CP:15054" --server-ip "$CP" --autoreg-grace 30s >"$work/cp.log" 2>&1
pids+=($!)
wait_until "the control plane's endpoints.json" 30 test -s "$work/cp/endpoints.json"
wait_until "the control plane's admin API" 30 jq -e .admin "$work/cp/endpoints.json"
export ISTHMUS_SERVER ISTHMUS_TOKEN
ISTHMUS_SERVER="$(jq -r .admin "$work/cp/endpoints.json")"
ISTHMUS_TOKEN="$(tr -d '[:space:]' <"$work/cp/admin-token")"
cli() { inns cp "$BIN" "$@"; }
cli apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: bookinfo}
spec:
  selector: {app: productpage}
  ports: [{name: tcp-web, port: 9080}, {name: http-web, port: 9081}, {name: tcp-bulk, port: 5201},
          {name: grpc-echo, port: 9082}, {name: tcp-grpc, port: 9083}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: productpage, namespace: bookinfo}
spec:
  metadata: {labels: {app: productpage}}
  template: {serviceAccount: productpage, ports: {tcp-web: 9080, http-web: 9081, tcp-bulk: 5201, grpc-echo: 9082, tcp-grpc: 9083}}
EOF
mesh_token="$(cli token create -n bookinfo -s productpage)"
vm_token="$(cli token create -n onprem -s mysql)"
declare -A agent_pid ready
declare -A metrics
start_agent() { # host ip token inbound-ports extra...
    local h=$1 ip=$2 token=$3 ports=$4
    local d="$work/$h" # a separate `local`: its words are expanded before any is assigned
    shift 4
    mkdir -p "$d"
    cli vm certs -o "$d/certs" >/dev/null
    printf '%s' "$token" >"$d/token"
    printf 'ISTIO_SERVICE_CIDR=10.96.0.0/12\nISTIO_META_DNS_CAPTURE=true\n' >"$d/cluster.env"
    printf 'ISTIO_INBOUND_PORTS=%s\n' "$ports" >"$d/sidecar.env"
    [ -z "$VIP_CIDR" ] || printf 'ISTHMUS_VIP_CIDR=%s\n' "$VIP_CIDR" >>"$d/sidecar.env"
    # shellcheck disable=SC2086 # AGENT_WRAPPER is a command line
    ISTHMUS_LOG=warn spawn "$h" $AGENT_WRAPPER "$BIN" agent --ca-addr "https://$CP:15012" --ip "$ip" --proxy \
        --capture --metrics-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
        --readiness-addr 127.0.0.1:0 --dns-upstream 127.0.0.1:9 --cert-dir "$d/certs" \
        --state-dir "$d/state" --join-token-file "$d/token" --cluster-env "$d/cluster.env" \
        --sidecar-env "$d/sidecar.env" "$@" >"$work/agent-$h.log" 2>&1
    pids+=($!)
    agent_pid[$h]=$!
    wait_until "the $h agent's endpoints" "$AGENT_WAIT" jq -e .readiness "$d/state/agent-endpoints.json"
    ready[$h]="$(jq -r .readiness "$d/state/agent-endpoints.json")"
    metrics[$h]="$(jq -r .metrics "$d/state/agent-endpoints.json")"
}
# A counter summed over both agents' metrics, as "<name> <value>" lines for each name given.
agents_counters() {
    local h
    for h in vm mesh; do
        inns "$h" curl -sf --max-time 2 "${metrics[$h]}/metrics" || true
    done | awk -v names="$*" 'BEGIN { n = split(names, want, " "); for (i = 1; i <= n; i++) sum[want[i]] = 0 }
        ($1 in sum) { sum[$1] += $2 }
        END { for (i = 1; i <= n; i++) printf "%s %.6f\n", want[i], sum[want[i]] }'
}
# Seconds both agents have spent busy polling (ISTHMUS_BUSY_POLL) and the times their polling
# threads moved off a CPU shared with another busy thread: "<seconds> <moves>".
busy_poll_counters() {
    agents_counters isthmus_agent_busy_poll_seconds_total isthmus_agent_busy_poll_moves_total |
        awk '{ v[NR] = $2 } END { printf "%s %d\n", v[1], v[2] }'
}
start_agent mesh "$MESH" "$mesh_token" 9080,9081,9082,9083,5201 --group productpage --inbound-mode strict
start_agent vm "$VM" "$vm_token" 3306
for h in mesh vm; do
    wait_until "the $h agent ready" "$AGENT_WAIT" inns "$h" curl -sf --max-time 2 "${ready[$h]}/healthz/ready"
done
VIP="$(cli get svc productpage -n bookinfo -o json | jq -r .status.vip)"
# The VM finds the service by name: its query to port 53 is captured into its agent's DNS proxy.
resolved="$(inns vm dig +short +time=2 +tries=3 @"$VM" productpage.bookinfo.svc.cluster.local A)"
if [ "$resolved" != "$VIP" ]; then
    echo "the VM's agent resolved productpage to '$resolved', not the service VIP $VIP" >&2
    exit 1
fi

# --- HAProxy pair: plain on the VM's loopback, TLS with client certificates between hosts ---
pki="$work/pki"
mkdir -p "$pki"
(
    cd "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench-ca -keyout ca.key -out ca.pem
    for who in server client; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
            -keyout "$who.key" -out "$who.csr"
        printf 'subjectAltName=IP:%s\n' "$MESH" >"$who.ext"
        openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile "$who.ext" -out "$who.crt"
        cat "$who.crt" "$who.key" >"$who.pem"
    done
) >"$work/openssl.log" 2>&1
cat >"$work/haproxy-mesh.cfg" <<EOF
global
    log stdout format raw local0 err
${HAPROXY_NBTHREAD:+    nbthread $HAPROXY_NBTHREAD}
${HAPROXY_BUSY_POLLING:+    busy-polling}
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend http_in
    bind $MESH:8443 ssl crt $pki/server.pem ca-file $pki/ca.pem verify required
    default_backend app_http
frontend bulk_in
    bind $MESH:8444 ssl crt $pki/server.pem ca-file $pki/ca.pem verify required
    default_backend app_bulk
frontend http_l7_in
    mode http
    timeout http-keep-alive 300s
    bind $MESH:8445 ssl crt $pki/server.pem ca-file $pki/ca.pem verify required
    default_backend app_http_l7
frontend grpc_in
    mode http
    timeout http-keep-alive 300s
    bind $MESH:8446 ssl crt $pki/server.pem ca-file $pki/ca.pem verify required alpn h2
    default_backend app_grpc
backend app_grpc
    mode http
    server app 127.0.0.1:8082 proto h2
backend app_http_l7
    mode http
    server app 127.0.0.1:8080
backend app_http
    server app 127.0.0.1:8080
backend app_bulk
    server app 127.0.0.1:5202
EOF
cat >"$work/haproxy-vm.cfg" <<EOF
global
    log stdout format raw local0 err
${HAPROXY_NBTHREAD:+    nbthread $HAPROXY_NBTHREAD}
${HAPROXY_BUSY_POLLING:+    busy-polling}
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend http_out
    bind 127.0.0.1:18080
    default_backend mesh_http
frontend bulk_out
    bind 127.0.0.1:15202
    default_backend mesh_bulk
frontend http_l7_out
    mode http
    timeout http-keep-alive 300s
    bind 127.0.0.1:18081
    default_backend mesh_http_l7
frontend grpc_out
    mode http
    timeout http-keep-alive 300s
    bind 127.0.0.1:18082 proto h2
    default_backend mesh_grpc
backend mesh_grpc
    mode http
    http-reuse always
    server mesh $MESH:8446 ssl crt $pki/client.pem ca-file $pki/ca.pem verify required alpn h2
backend mesh_http_l7
    mode http
    http-reuse always
    server mesh $MESH:8445 ssl crt $pki/client.pem ca-file $pki/ca.pem verify required alpn http/1.1
backend mesh_http
    server mesh $MESH:8443 ssl crt $pki/client.pem ca-file $pki/ca.pem verify required
backend mesh_bulk
    server mesh $MESH:8444 ssl crt $pki/client.pem ca-file $pki/ca.pem verify required
EOF
declare -A hap_pid
for h in mesh vm; do
    spawn "$h" haproxy -db -f "$work/haproxy-$h.cfg" >"$work/haproxy-$h.log" 2>&1
    pids+=($!)
    hap_pid[$h]=$!
done

declare -A http_addr bulk_host bulk_port
http_addr[direct]="$MESH:8080"
http_addr[isthmus]="$VIP:9080"
http_addr[haproxy]="127.0.0.1:18080"
http_addr[isthmus-l7]="$VIP:9081"
http_addr[haproxy-http]="127.0.0.1:18081"
declare -A grpc_addr
grpc_addr[direct]="$MESH:8082"
grpc_addr[isthmus]="$VIP:9083"
grpc_addr[isthmus-l7]="$VIP:9082"
grpc_addr[haproxy-http]="127.0.0.1:18082"
bulk_host[direct]=$MESH bulk_port[direct]=5202
bulk_host[isthmus]=$VIP bulk_port[isthmus]=5201
bulk_host[haproxy]=127.0.0.1 bulk_port[haproxy]=15202
# An unused address of the bridge subnet: its connections are captured by an iptables REDIRECT
# in the VM's nat OUTPUT, as the isthmus path's are, so that the capture's cost shows next to
# the proxies' (bulk below; and the HTTP path `haproxy-captured`, not in the default PATHS).
CAPTURED=10.78.0.99
http_addr[haproxy-captured]="$CAPTURED:18080"
if [ -n "$VIP_CIDR" ]; then # as the agent routes ISTHMUS_VIP_CIDR, in a table of its own
    inns vm ip rule add priority 15000 to "$CAPTURED" lookup 15999
    inns vm ip route add "$CAPTURED" dev lo table 15999
fi
read -r -a paths <<<"$PATHS"
if [[ " $PATHS " == *" haproxy-captured "* ]]; then
    inns vm iptables -t nat -I OUTPUT -d "$CAPTURED/32" -p tcp --dport 18080 -j REDIRECT --to-ports 18080
fi
for p in "${paths[@]}"; do
    wait_until "$p path answering 200" 30 \
        sh -c "[ \"\$(ip netns exec $(ns vm) curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://${http_addr[$p]}/)\" = 200 ]"
done
# The STRICT port refuses plaintext: what the isthmus path carried went over mTLS.
if [ "$(inns vm curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$MESH:9080/" || true)" = 200 ]; then
    echo "plaintext reached the STRICT app port; the isthmus path is not what it claims" >&2
    exit 1
fi

hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
threads() { awk '/^Threads/ {print $2}' "/proc/$1/status"; }
# Major page faults so far: pages read back from disk (field 12 of stat; the names have no spaces).
majflt() { awk '{print $12}' "/proc/$1/stat"; }
# CPU time so far, user + system, all threads, in clock ticks (fields 14 and 15; no spaces in the names).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Context switches so far, voluntary + involuntary, summed over the threads.
ctxsw() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'; }
HZ=$(getconf CLK_TCK)
# VmRSS, RssAnon and RssFile of a process into MEM_RSS, MEM_ANON, MEM_FILE, without a fork
# (`mapfile` reads the file in a few system calls; `while read` takes two per line).
mem_kb() {
    local l
    MEM_RSS=0 MEM_ANON=0 MEM_FILE=0
    mapfile -t MEM_LINES <"/proc/$1/status"
    for l in "${MEM_LINES[@]}"; do
        case $l in
        VmRSS:*) MEM_RSS=${l//[!0-9]/} ;;
        RssAnon:*) MEM_ANON=${l//[!0-9]/} ;;
        RssFile:*) MEM_FILE=${l//[!0-9]/} ;;
        esac
    done
}
# A pipe nobody writes: `read -t` on it is a sleep without forking `sleep`.
exec {nap_fd}<> <(:)
# Minor page faults so far (field 10 of stat).
minflt() { awk '{print $10}' "/proc/$1/stat"; }
# The machine's idle and total CPU time so far (idle + iowait; all of /proc/stat's first line),
# into CPU_IDLE and CPU_TOTAL, with builtins only: a closed loop that leaves the machine idle is
# bound by its chain of wake-ups, not by CPU (BENCHMARKS.md, issue 17, run 15).
machine_cpu() {
    local _cpu user nice sys idle iowait irq softirq steal
    read -r _cpu user nice sys idle iowait irq softirq steal _ </proc/stat
    CPU_IDLE=$((idle + iowait))
    CPU_TOTAL=$((user + nice + sys + idle + iowait + irq + softirq + steal))
}
proxy_pids() { # path
    case $1 in
    isthmus | isthmus-l7) echo "${agent_pid[vm]} ${agent_pid[mesh]}" ;;
    haproxy | haproxy-http | haproxy-captured) echo "${hap_pid[vm]} ${hap_pid[mesh]}" ;;
    esac
}
declare -A rss_idle rss_peak anon_peak file_peak majflt_idle cpu_used cpu_sides ctx_used sys_used flt_used
for p in isthmus isthmus-l7 haproxy haproxy-http; do
    read -r a b <<<"$(proxy_pids $p)"
    mem_kb "$a"
    rss_idle[$p]="$MEM_RSS"
    mem_kb "$b"
    rss_idle[$p]+=" $MEM_RSS"
    majflt_idle[$p]="$(majflt "$a") $(majflt "$b")"
done

# With PERF_DIR: samples both agents (call graphs) for the given seconds, in the background.
perf_agents() { # label seconds
    [ -n "$PERF_DIR" ] || return 0
    mkdir -p "$PERF_DIR"
    for h in vm mesh; do
        perf record -q -F 499 --call-graph dwarf,8192 -p "${agent_pid[$h]}" -o "$PERF_DIR/$1-$h.data" -- sleep "$2" \
            >/dev/null 2>&1 &
    done
}

# Runs the load in the background, sampling the proxies' memory once a second; keeps the largest.
results="$work/results"
mkdir -p "$results"
run_http() { # path label rate
    local p=$1 label=$2 rate=$3 out="$results/$1-$2.json" max_a=0 max_b=0 a=0 b=0 lp r
    local anon_a=0 anon_b=0 file_a=0 file_b=0
    # Both agents' busy polling over the run, warm-up included (read before the load starts).
    local bp0="" busy="" mv0="" bp1="" mv1="" moves=""
    case $p in isthmus*) read -r bp0 mv0 < <(busy_poll_counters) ;; esac
    if [ "$label" = grpc ]; then
        timeout $((WARMUP + DURATION + 30)) ip netns exec "$(ns vm)" "$GRPC_LOAD" load \
            --addr "${grpc_addr[$p]}" --conns "$GRPC_CONNS" --streams "$GRPC_STREAMS" \
            --bytes 64 --duration "$DURATION" --warmup "$WARMUP" >"$out" &
    else
        timeout $((WARMUP + DURATION + 30)) ip netns exec "$(ns vm)" "$LOAD" --addr "${http_addr[$p]}" \
            --rate "$rate" --conns "$CONNS" --duration "$DURATION" --warmup "$WARMUP" --pacing "$PACING" >"$out" &
    fi
    lp=$!
    if [ "$p" != direct ]; then read -r a b <<<"$(proxy_pids "$p")"; fi
    sleep "$WARMUP"
    case $p in isthmus*) perf_agents "$p-$label" "$DURATION" ;; esac
    local cpu0=0 cpu_a0=0 cpu_b0=0 ctx0=0 flt0=0 sysf="" idle0 total0
    machine_cpu
    idle0=$CPU_IDLE total0=$CPU_TOTAL
    if [ "$p" != direct ]; then
        cpu_a0=$(cpu_ticks "$a") cpu_b0=$(cpu_ticks "$b")
        cpu0=$((cpu_a0 + cpu_b0))
        ctx0=$(($(ctxsw "$a") + $(ctxsw "$b")))
        flt0=$(($(minflt "$a") + $(minflt "$b")))
        if [ -n "$SYSCALLS" ]; then
            sysf="$results/$p-$label.syscalls"
            perf stat -x, -e raw_syscalls:sys_enter -p "$a,$b" -o "$sysf" -- sleep "$DURATION" >/dev/null 2>&1 &
        fi
    fi
    # Sampled once a second with shell builtins only: forking `awk` and `sleep` five times a
    # second took 1.4 s of CPU over a 28 s run on the same two vCPUs, and the processes on the
    # request path waited behind it (BENCHMARKS.md, issue 18).
    while kill -0 "$lp" 2>/dev/null; do
        if [ "$p" != direct ]; then
            mem_kb "$a"
            ((MEM_RSS > max_a)) && max_a=$MEM_RSS
            ((MEM_ANON > anon_a)) && anon_a=$MEM_ANON
            ((MEM_FILE > file_a)) && file_a=$MEM_FILE
            mem_kb "$b"
            ((MEM_RSS > max_b)) && max_b=$MEM_RSS
            ((MEM_ANON > anon_b)) && anon_b=$MEM_ANON
            ((MEM_FILE > file_b)) && file_b=$MEM_FILE
        fi
        read -r -t 1 -u "$nap_fd" || true
    done
    wait "$lp"
    machine_cpu
    # The whole machine's idle share over the measured seconds, percent.
    local idle_pct=$(((CPU_IDLE - idle0) * 100 / (CPU_TOTAL - total0 > 0 ? CPU_TOTAL - total0 : 1)))
    if [ "$p" != direct ]; then
        # Both proxies' CPU over the measured seconds (and a little of the load's tail).
        cpu_used[$p-$label]=$(($(cpu_ticks "$a") + $(cpu_ticks "$b") - cpu0))
        # Each side's share: the client's proxy (on the VM) and the server's (on the mesh host).
        cpu_sides[$p-$label]="cpu_ticks_client=$(($(cpu_ticks "$a") - cpu_a0)) cpu_ticks_server=$(($(cpu_ticks "$b") - cpu_b0))"
        ctx_used[$p-$label]=$(($(ctxsw "$a") + $(ctxsw "$b") - ctx0))
        flt_used[$p-$label]=$(($(minflt "$a") + $(minflt "$b") - flt0))
        if [ -n "$sysf" ]; then
            wait_until "syscall count of $p $label" 10 test -s "$sysf"
            sys_used[$p-$label]=$(awk -F, '/raw_syscalls/ {print $1}' "$sysf")
        fi
    fi
    # After the agents' CPU is read: scraping their metrics costs them CPU too.
    if [ -n "$bp0" ]; then
        read -r bp1 mv1 < <(busy_poll_counters)
        busy=$(awk -v a="$bp0" -v b="$bp1" 'BEGIN {printf "%.3f", b - a}')
        moves=$((mv1 - mv0))
    fi
    if [ "$p" = isthmus ] && [ -n "$SMAPS_DIR" ]; then
        mkdir -p "$SMAPS_DIR"
        cp "/proc/${agent_pid[vm]}/smaps" "$SMAPS_DIR/$label-vm.smaps"
        cp "/proc/${agent_pid[mesh]}/smaps" "$SMAPS_DIR/$label-mesh.smaps"
    fi
    rss_peak[$p-$label]="$max_a $max_b"
    anon_peak[$p-$label]="$anon_a $anon_b"
    file_peak[$p-$label]="$file_a $file_b"
    echo "$p $label: $(cat "$out") cpu_ticks=${cpu_used[$p-$label]:-} ctx=${ctx_used[$p-$label]:-} syscalls=${sys_used[$p-$label]:-} minflt=${flt_used[$p-$label]:-} idle_pct=$idle_pct busy_poll_s=$busy busy_poll_moves=$moves ${cpu_sides[$p-$label]:-}" >&2
}
run_bulk() { # path
    local p=$1
    [ "$p" = isthmus ] && perf_agents bulk "$BULK_SECONDS"
    timeout $((BULK_SECONDS + 30)) ip netns exec "$(ns vm)" iperf3 -c "${bulk_host[$p]}" \
        -p "${bulk_port[$p]}" -t "$BULK_SECONDS" -J >"$results/$p-bulk.json"
    echo "$p bulk: $(jq -r '.end.sum_received.bits_per_second / 1e9 | . * 100 | round / 100' "$results/$p-bulk.json") Gbit/s" >&2
}

load_before_runs="$(cut -d' ' -f1-3 /proc/loadavg)"
# Each scenario runs the three paths back to back, so slow drift of the machine hits them alike.
scenario() { [[ " $SCENARIOS " == *" $1 "* ]]; }
if scenario rates; then
    for rate in $RATES; do
        for p in "${paths[@]}"; do run_http "$p" "r$rate" "$rate"; done
    done
fi
if scenario max; then
    for p in "${paths[@]}"; do run_http "$p" max 0; done
fi
if scenario grpc; then
    for p in "${paths[@]}"; do
        case $p in haproxy | haproxy-captured) ;; *) run_http "$p" grpc 0 ;; esac
    done
fi
if scenario bulk; then
    for p in "${paths[@]}"; do
        case $p in *-l7 | *-http | haproxy-captured) ;; *) run_bulk "$p" ;; esac
    done
fi
# HAProxy once more, with iperf3's connection captured by an iptables REDIRECT in the VM's nat
# OUTPUT as the isthmus path's is (from $CAPTURED to the VM haproxy's port).
if [[ " $PATHS " == *" haproxy "* ]] && scenario bulk; then
    capture_rule=(OUTPUT -d "$CAPTURED/32" -p tcp --dport 15202 -j REDIRECT --to-ports 15202)
    inns vm iptables -t nat -I "${capture_rule[@]}"
    bulk_host[haproxy-captured]=$CAPTURED bulk_port[haproxy-captured]=15202
    run_bulk haproxy-captured
    inns vm iptables -t nat -D "${capture_rule[@]}"
fi
if [ "$PATHS" != "direct isthmus isthmus-l7 haproxy haproxy-http" ] || [ "$SCENARIOS" != "rates max grpc bulk" ]; then
    echo "PATHS=$PATHS SCENARIOS=$SCENARIOS: no report (it compares all five paths in all four scenarios)" >&2
    exit 0
fi
declare -A hwm
for p in isthmus isthmus-l7 haproxy haproxy-http; do
    read -r a b <<<"$(proxy_pids $p)"
    hwm[$p]="$(hwm_kb "$a") $(hwm_kb "$b")"
    hwm[$p-threads]="$(threads "$a") $(threads "$b")"
    read -r ia ib <<<"${majflt_idle[$p]}"
    hwm[$p-majflt]="$(($(majflt "$a") - ia)) / $(($(majflt "$b") - ib))"
done

# --- Report ---
mb() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
pair_mb() { local a b; read -r a b <<<"$1"; echo "$(mb "$a") / $(mb "$b")"; }
field() { jq -r "$2" "$results/$1.json"; }
f2() { awk -v x="$1" 'BEGIN {printf "%.3f", x}'; }
echo "### Machine"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- nproc: $(nproc); CPU: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
echo "- RAM: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo); kernel: $(uname -r)"
echo "- load average (1, 5, 15 min): $load_at_start at the start of the script, $load_before_runs after the build and setup, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
echo "- isthmus $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $("$BIN" --version 2>/dev/null || true); $(haproxy -v | head -1 | cut -d' ' -f1-3); nginx $("$NGINX" -v 2>&1 | cut -d/ -f2); $(iperf3 --version | head -1 | cut -d' ' -f1-2)"
echo "- isthmus agent threads (vm / mesh): ${hwm[isthmus-threads]}; haproxy threads: ${hwm[haproxy-threads]}"
echo "- busy polling: agents ISTHMUS_BUSY_POLL=${ISTHMUS_BUSY_POLL:-20us (the default)}; haproxy ${HAPROXY_BUSY_POLLING:+busy-polling}${HAPROXY_BUSY_POLLING:-off (the default)}"
echo "- scheduler slice: agents' data-plane threads ISTHMUS_SCHED_SLICE=${ISTHMUS_SCHED_SLICE:-100us (the default)}; haproxy the kernel's default"
if [ -n "$VIP_CIDR" ]; then
    echo "- service network: ISTHMUS_VIP_CIDR=$VIP_CIDR, routed through lo (haproxy-captured's address too)"
else
    echo "- service network: routed out eth0${VIP_ROUTE_MTU:+ with MTU $VIP_ROUTE_MTU}"
fi
# scripts/pgo.sh's binary is linked with an order file of its own, the plain build with the
# committed one: report whichever matches more of its names.
best=
for order in crates/isthmus/hot-functions.order target/pgo/hot-functions.order; do
    [ -f "$order" ] && command -v nm >/dev/null 2>&1 || continue
    read -r found listed < <(python3 scripts/order-file.py --matched "$BIN" "$order")
    if [ -z "$best" ] || ((found * best_listed > best_found * listed)); then
        best="$order" best_found=$found best_listed=$listed
    fi
done
if [ -n "$best" ]; then
    echo "- link order: $best_found of the $best_listed functions in $best are in the binary (scripts/order-file.sh)"
fi
echo
echo "### HTTP, ${BODY_BYTES}-byte responses, $CONNS keep-alive connections, ${DURATION} s measured after ${WARMUP} s warm-up"
echo
echo "| load | path | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | queued | errors | added p99 ms |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for label in $(for r in $RATES; do echo "r$r"; done) max; do
    base=$(field "direct-$label" .p99_ms)
    for p in "${paths[@]}"; do
        k="$p-$label"
        if [ "$label" = max ]; then load="max (closed loop)"; else load="${label#r} req/s"; fi
        added="—"
        [ "$p" != direct ] && added=$(f2 "$(awk -v a="$(field "$k" .p99_ms)" -v b="$base" 'BEGIN {print a - b}')")
        echo "| $load | $p | $(field "$k" .rps | awk '{printf "%.0f", $1}') | $(f2 "$(field "$k" .p50_ms)") | $(f2 "$(field "$k" .p99_ms)") | $(f2 "$(field "$k" .p999_ms)") | $(f2 "$(field "$k" .max_ms)") | $(field "$k" .queued) | $(field "$k" .errors) | $added |"
    done
done
echo
echo "### Unary gRPC (h2c), ${BODY_BYTES}-byte answers, $GRPC_CONNS HTTP/2 connections x $GRPC_STREAMS calls in flight, closed loop, ${DURATION} s measured"
echo
echo "isthmus: a port declared TCP (the calls ride the L4 tunnel); isthmus-l7: a port declared gRPC"
echo "(each call routed and balanced on its own); haproxy-http: \`mode http\` with HTTP/2 on every hop."
echo
echo "| path | calls/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | added p99 ms |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
base=$(field "direct-grpc" .p99_ms)
for p in "${paths[@]}"; do
    [ "$p" = haproxy ] && continue
    k="$p-grpc"
    added="—"
    [ "$p" != direct ] && added=$(f2 "$(awk -v a="$(field "$k" .p99_ms)" -v b="$base" 'BEGIN {print a - b}')")
    echo "| $p | $(field "$k" .rps | awk '{printf "%.0f", $1}') | $(f2 "$(field "$k" .p50_ms)") | $(f2 "$(field "$k" .p99_ms)") | $(f2 "$(field "$k" .p999_ms)") | $(f2 "$(field "$k" .max_ms)") | $(field "$k" .errors) | $added |"
done
echo
echo "### Cost per request (both proxies of the pair together, over the measured seconds)"
echo
echo "CPU is user + system time of both processes from /proc (clock ticks of 1/$HZ s); context"
echo "switches are voluntary + involuntary over all their threads${SYSCALLS:+; system calls counted with perf stat (raw_syscalls:sys_enter)}."
echo
echo "| load | path | CPU µs / request | requests / CPU-second | context switches / request |${SYSCALLS:+ syscalls / request |}"
echo "| --- | --- | ---: | ---: | ---: |${SYSCALLS:+ ---: |}"
for label in $(for r in $RATES; do echo "r$r"; done) max grpc; do
    for p in "${paths[@]}"; do
        [ "$p" = direct ] && continue
        [ "$label-$p" = grpc-haproxy ] && continue
        k="$p-$label"
        case $label in
        max) load="max (closed loop)" ;;
        grpc) load="gRPC unary (closed loop)" ;;
        *) load="${label#r} req/s" ;;
        esac
        n=$(field "$k" .requests)
        row="| $load | $p | $(awk -v t="${cpu_used[$k]}" -v hz="$HZ" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}') | $(awk -v t="${cpu_used[$k]}" -v hz="$HZ" -v n="$n" 'BEGIN {printf "%.0f", (t > 0 ? n / (t / hz) : 0)}') | $(awk -v c="${ctx_used[$k]}" -v n="$n" 'BEGIN {printf "%.2f", c / n}') |"
        [ -n "$SYSCALLS" ] && row="$row $(awk -v c="${sys_used[$k]:-0}" -v n="$n" 'BEGIN {printf "%.2f", c / n}') |"
        echo "$row"
    done
done
echo
echo "### Bulk TCP (iperf3, one stream, ${BULK_SECONDS} s, VM → mesh host)"
echo
echo "| path | Gbit/s received | retransmits |"
echo "| --- | ---: | ---: |"
for p in direct isthmus haproxy haproxy-captured; do
    label=$p
    [ "$p" = haproxy-captured ] && label="haproxy, client captured by iptables REDIRECT (as isthmus)"
    echo "| $label | $(field "$p-bulk" '.end.sum_received.bits_per_second / 1e9 | . * 100 | round / 100') | $(field "$p-bulk" '.end.sum_sent.retransmits // 0') |"
done
echo
echo "### Proxy RSS, MB (VM side / mesh side)"
echo
header="| proxy | idle |"
sep="| --- | ---: |"
for r in $RATES; do header="$header at $r req/s (max sampled) |"; sep="$sep ---: |"; done
echo "$header closed loop (max sampled) | peak over the run (VmHWM) |"
echo "$sep ---: | ---: |"
for p in isthmus isthmus-l7 haproxy haproxy-http; do
    row="| $p | $(pair_mb "${rss_idle[$p]}") |"
    for r in $RATES; do row="$row $(pair_mb "${rss_peak[$p-r$r]}") |"; done
    echo "$row $(pair_mb "${rss_peak[$p-max]}") | $(pair_mb "${hwm[$p]}") |"
done
echo
echo "Major page faults (pages read back from disk) from idle to the end, VM / mesh side:"
echo "isthmus ${hwm[isthmus-majflt]}, haproxy ${hwm[haproxy-majflt]}."
echo
echo "Of that RSS, max sampled per phase (VM side / mesh side), MB: RssAnon is heap and stacks,"
echo "RssFile the mapped pages of the executable and shared libraries (shared with every process"
echo "mapping the same file)."
echo
header="| proxy | part |"
sep="| --- | --- |"
for r in $RATES; do header="$header at $r req/s |"; sep="$sep ---: |"; done
echo "$header closed loop |"
echo "$sep ---: |"
for p in isthmus haproxy; do
    for part in anon file; do
        row="| $p | Rss${part^} |"
        for r in $RATES; do
            if [ "$part" = anon ]; then v=${anon_peak[$p-r$r]}; else v=${file_peak[$p-r$r]}; fi
            row="$row $(pair_mb "$v") |"
        done
        if [ "$part" = anon ]; then v=${anon_peak[$p-max]}; else v=${file_peak[$p-max]}; fi
        echo "$row $(pair_mb "$v") |"
    done
done
