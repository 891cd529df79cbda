#!/usr/bin/env bash
# Certificate signing (issue 3): certificates signed per second by `isthmus server` over
# gRPC/TLS, beside `Ca::sign_csr` in-process and `openssl x509 -req`, on the same CSRs in one
# run. Builds the release binaries, prints the machine and a markdown table. Extra arguments go
# to ca-bench (see `ca-bench --help`). The figures in BENCHMARKS.md came from `bench/ca.sh`
# with no arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p isthmus -p isthmus-bench >&2

work_dir="${TMPDIR:-/tmp}"
device="$(df --output=source "$work_dir" | tail -1)"
echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "- source: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')"
echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
echo "- disk under $work_dir: $device ($(findmnt -no FSTYPE --target "$work_dir"))"
echo "- openssl: $(openssl version 2>/dev/null || echo 'not installed')"
echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

target/release/ca-bench \
    --isthmus-bin target/release/isthmus \
    --work-dir "$work_dir" \
    --json-out target/ca-bench.json \
    "$@"

echo
echo "- load average after the run: $(cut -d' ' -f1-3 /proc/loadavg); all figures also in target/ca-bench.json"
