#!/usr/bin/env bash
# A profile-guided release build of isthmus: builds an instrumented binary, runs the data plane
# under it (bench/dataplane.sh: L4 and L7 at fixed rates, closed loop, gRPC), and builds
# target/release/isthmus again with that profile (rustc's -Cprofile-use).
#
# Why: at a fixed rate each request wakes each agent on its own and everything it runs is cold
# (BENCHMARKS.md, issue 17 run 20); PGO lays out the hot paths together, separates the cold
# blocks and inlines by measured counts (BENCHMARKS.md, issue 17 run 21, part 3, measured it).
#
# Root only (network namespaces), about 25 minutes on 2 vCPUs. Needs llvm-profdata of the
# LLVM that rustc uses (`rustc -vV`); installed from Debian as llvm-<major> when missing.
# Leaves target/release/isthmus built with the profile; the profile is in target/pgo/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/pgo.sh needs root (bench/dataplane.sh's network namespaces)" >&2
    exit 1
fi
major="$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
profdata="/usr/lib/llvm-$major/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "llvm-$major" >&2 || {
        echo "scripts/pgo.sh: rustc uses LLVM $major and no llvm-$major package is available here; install llvm-profdata $major (or rustup's llvm-tools) and put it at $profdata" >&2
        exit 1
    }
fi
pgo="$PWD/target/pgo"
rm -rf "$pgo"
mkdir -p "$pgo/raw"
# The bench tools first, built apart (as scripts/order-file.sh explains), and without the
# instrumentation.
cargo build --locked --release -p isthmus-bench --bin http-load --bin grpc-load >&2
# Both builds with --target: RUSTFLAGS then reach the target's crates only, not build scripts and
# proc macros, and the two builds name their functions alike (the profile is matched by name).
host="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-Cprofile-generate=$pgo/raw" \
    cargo build --locked --release -p isthmus --target "$host" --target-dir "$pgo/gen" >&2
ISTHMUS_BIN="$pgo/gen/$host/release/isthmus" HTTP_LOAD="$PWD/target/release/http-load" \
    PATHS="isthmus isthmus-l7" SCENARIOS="rates max grpc" RATES="1000 10000" DURATION=8 \
    bash bench/dataplane.sh >/dev/null
"$profdata" merge -o "$pgo/isthmus.profdata" "$pgo"/raw/*.profraw
RUSTFLAGS="-Cprofile-use=$pgo/isthmus.profdata" \
    cargo build --locked --release -p isthmus --target "$host" --target-dir "$pgo/use" >&2
# The link order file (crates/isthmus/build.rs) lists the plain build's functions; this build
# hashes their names apart and inlines by the profile, so few of them match and the agents'
# RssFile was 13-14 MB against the plain build's 9 (BENCHMARKS.md, issue 17 run 22). So the
# order is made again from this binary (scripts/order-file.sh, callgrind) and it is linked again
# with it (only the isthmus crate rebuilds).
ISTHMUS_BIN="$pgo/use/$host/release/isthmus" ORDER_OUT="$pgo/hot-functions.order" \
    bash scripts/order-file.sh
ISTHMUS_ORDER_FILE="$pgo/hot-functions.order" RUSTFLAGS="-Cprofile-use=$pgo/isthmus.profdata" \
    cargo build --locked --release -p isthmus --target "$host" --target-dir "$pgo/use" >&2
install -m 755 "$pgo/use/$host/release/isthmus" target/release/isthmus
echo "built target/release/isthmus with the profile $pgo/isthmus.profdata (a plain cargo build replaces it)" >&2
