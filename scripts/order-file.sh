#!/usr/bin/env bash
# Regenerates crates/isthmus/hot-functions.order: the functions the agent runs, hottest first,
# which the release link (crates/isthmus/build.rs) places together at the start of .text.
#
# Why: the kernel maps a file-backed page fault's neighbours too ("fault-around", 64 KiB), so
# an agent touching a few functions scattered over the 12 MB of .text ends up with most of the
# binary in its RSS (10.6 of 12.6 MB measured). With the functions it runs packed together, what
# it maps is what it runs.
#
# How: bench/dataplane.sh's isthmus and isthmus-l7 paths (both agents, fixed-rate and
# closed-loop HTTP, unary gRPC, bulk TCP) with each agent under `valgrind --tool=callgrind`, which records every function executed
# with its instruction count. Root only (network namespaces), ~10 minutes. Symbol names that a
# later change renames just stop matching (the link ignores them); rerun this after large
# changes to the agent and commit the file.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/order-file.sh needs root (bench/dataplane.sh's network namespaces)" >&2
    exit 1
fi
command -v valgrind >/dev/null 2>&1 || {
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >&2
}
# Two builds: built together, isthmus-bench's dependency features would be unified into the
# agent's, giving another binary than `scripts/package.sh` and `scripts/dev.sh` build (other
# symbol names, so the link order file would not match the product).
# ISTHMUS_BIN and ORDER_OUT (scripts/pgo.sh): profile that binary instead of building one, and
# write the file there; a profile-guided build names and inlines its functions its own way.
bin="${ISTHMUS_BIN:-$PWD/target/release/isthmus}"
order_out="${ORDER_OUT:-crates/isthmus/hot-functions.order}"
[ -n "${ISTHMUS_BIN:-}" ] || cargo build --locked --release -p isthmus >&2
cargo build --locked --release -p isthmus-bench --bin http-load --bin grpc-load >&2
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
ISTHMUS_BIN="$bin" HTTP_LOAD="$PWD/target/release/http-load" \
    PATHS="isthmus isthmus-l7" RATES=200 DURATION=5 WARMUP=1 BULK_SECONDS=5 STOP_WAIT=120 \
    AGENT_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$out/callgrind.%p \
--dump-instr=no --dump-line=no --compress-strings=no --compress-pos=no --demangle=no \
--fair-sched=yes" \
    bash bench/dataplane.sh >/dev/null
python3 scripts/order-file.py "$bin" "$out"/callgrind.* >"$order_out.tmp"
mv "$order_out.tmp" "$order_out"
echo "wrote $order_out" >&2
