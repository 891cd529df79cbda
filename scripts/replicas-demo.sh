#!/usr/bin/env bash
# Three control-plane replicas on a three-member etcd cluster, all on this machine's loopback:
# what "Run several control planes" in the README walks through. Stops everything on Ctrl-C.
#
#   scripts/replicas-demo.sh            # builds isthmus if needed, then runs until Ctrl-C
#   ISTHMUS=/path/to/isthmus scripts/replicas-demo.sh
#   DEMO_DIR=/tmp/x scripts/replicas-demo.sh    # keep the data there (default: a temp dir)
#
# Ports: etcd clients 127.0.0.1:23791-23793 (peers 23801-23803); replica N (0, 1, 2) adds N*100
# to every isthmus port: gRPC 15012/15112/15212, admin 15080/15180/15280, registration
# 8080/8180/8280, metrics 15014/15114/15214, DNS 15054/15154/15254.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v etcd >/dev/null || {
  echo "replicas-demo: etcd is missing: install Debian's etcd-server (apt-get install etcd-server)" >&2
  exit 1
}
if [ -z "${ISTHMUS:-}" ]; then
  if command -v isthmus >/dev/null; then
    ISTHMUS=$(command -v isthmus)
  else
    cargo build --release -p isthmus
    ISTHMUS=$PWD/target/release/isthmus
  fi
fi

dir=${DEMO_DIR:-$(mktemp -d -t isthmus-replicas-XXXXXX)}
mkdir -p "$dir"
pids=()
stop() {
  trap - INT TERM EXIT
  echo "replicas-demo: stopping" >&2
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${DEMO_DIR:-}" ] || rm -rf "$dir"
  exit 0
}
trap stop INT TERM EXIT

# etcd: three members, each keeping 100,000 revisions (revisions are shared by every mesh on
# one etcd, so compaction is etcd's job, not a replica's).
cluster=""
for i in 1 2 3; do cluster+="${cluster:+,}e$i=http://127.0.0.1:2380$i"; done
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$dir/etcd$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token isthmus-demo \
    --auto-compaction-mode revision --auto-compaction-retention 100000 \
    --max-txn-ops 1024 --max-request-bytes 4194304 \
    >"$dir/etcd$i.log" 2>&1 &
  pids+=($!)
done
endpoints=http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793

# One seal key and one admin token for every replica: the key seals the mesh CA in etcd, the
# token's hash is what etcd keeps.
umask 077
[ -s "$dir/seal.key" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/seal.key"
[ -s "$dir/admin-token" ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/admin-token"
umask 022

public=""
for n in 0 1 2; do public+="${public:+,}https://127.0.0.1:$((15012 + n * 100))"; done
for n in 0 1 2; do
  o=$((n * 100))
  "$ISTHMUS" server --store etcd --etcd-endpoints "$endpoints" --etcd-prefix /isthmus/demo \
    --seal-key-file "$dir/seal.key" --admin-token-file "$dir/admin-token" \
    --replica-name "replica$n" --data-dir "$dir/replica$n" --public-addr "$public" \
    --grpc-addr "127.0.0.1:$((15012 + o))" --admin-addr "127.0.0.1:$((15080 + o))" \
    --registration-addr "127.0.0.1:$((8080 + o))" --metrics-addr "127.0.0.1:$((15014 + o))" \
    --dns-addr "127.0.0.1:$((15054 + o))" --advertise-ip 127.0.0.1 \
    >"$dir/replica$n.log" 2>&1 &
  pids+=($!)
done

# Ready when every replica answers /readyz.
for n in 0 1 2; do
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$((15080 + n * 100))/readyz" >/dev/null 2>&1 && break
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null || {
        echo "replicas-demo: a process exited; logs in $dir:" >&2
        tail -n 5 "$dir"/*.log >&2
        exit 1
      }
    done
    sleep 0.1
  done
done

cat <<EOF
replicas-demo: ready: 3 etcd members ($endpoints), 3 replicas; data and logs in $dir

In another terminal:
  export ISTHMUS_SERVER=http://127.0.0.1:15080 ISTHMUS_TOKEN=\$(cat $dir/admin-token)
  isthmus register mysql 10.0.0.5 3306 -n onprem                                     # through replica 0
  curl -s 'http://127.0.0.1:8180/v1/registration/mysql.onprem.svc.cluster.local%7Cmysql'   # replica 1 has it
  dig +short @127.0.0.1 -p 15254 mysql.onprem.svc.cluster.local                        # so does replica 2's DNS
  isthmus vm config -o ./vm -n onprem      # the bundle's CA_ADDR lists all three replicas

Replica pids: ${pids[*]:3}. Kill one and the others carry on; hosts move to another. Ctrl-C stops everything.
EOF
# Runs until Ctrl-C; a process that exits (killed to see failover) is reported, not fatal.
declare -A gone
while sleep 1; do
  for p in "${pids[@]}"; do
    if [ -z "${gone[$p]:-}" ] && ! kill -0 "$p" 2>/dev/null; then
      gone[$p]=1
      echo "replicas-demo: process $p exited; the others carry on (logs in $dir)" >&2
    fi
  done
done
