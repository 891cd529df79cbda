#!/usr/bin/env bash
# Registry writes and watch latency: Isthmus beside etcd, in one run, on loopback.
# Installs etcd (Debian's etcd-server) if missing, builds the release binaries, prints the machine
# and a markdown table. Extra arguments go to registry-bench (see `registry-bench --help`).
# The figures in BENCHMARKS.md came from `bench/registry.sh` with no arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v etcd >/dev/null 2>&1; then
    echo "etcd not found: installing Debian's etcd-server" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server; } >&2; then
        echo "etcd-server could not be installed: the table will say etcd was not run" >&2
    fi
fi

cargo build --release -p isthmus -p isthmus-bench >&2

work_dir="${TMPDIR:-/tmp}"
device="$(df --output=source "$work_dir" | tail -1)"
disk="$(lsblk -dno NAME,ROTA,MODEL,SIZE "$device" 2>/dev/null | tr -s ' ' || true)"
echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
echo "- disk under $work_dir: $device ($(findmnt -no FSTYPE --target "$work_dir")${disk:+; lsblk: $disk})"
echo "- etcd: $(command -v etcd >/dev/null 2>&1 && etcd --version | head -1 || echo 'not installed')"
echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

target/release/registry-bench \
    --isthmus-bin target/release/isthmus \
    --work-dir "$work_dir" \
    --json-out target/registry-bench.json \
    "$@"

echo
echo "- load average after the run: $(cut -d' ' -f1-3 /proc/loadavg); all figures also in target/registry-bench.json"
