#!/usr/bin/env bash
# Three replicas on a three-member etcd, on loopback: 1,000 agents converging over them, the
# failover of a SIGKILLed replica's agents, and the survivors' memory with 10,100 workloads.
# Installs etcd (Debian's etcd-server) if missing, builds the release binaries, prints the
# machine and a markdown table. Extra arguments go to replicas-bench (`replicas-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v etcd >/dev/null 2>&1; then
    echo "etcd not found: installing Debian's etcd-server" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >&2
fi
cargo build --release -p isthmus -p isthmus-bench >&2
echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
echo "- etcd: $(etcd --version | head -1)"
echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
target/release/replicas-bench --isthmus-bin target/release/isthmus "$@"
echo
echo "- load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
