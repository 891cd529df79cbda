#!/usr/bin/env bash
# The newcomer's second command, and exactly what CI runs: lints, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test-tools
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The API docs build without a warning (broken or private links, stray HTML).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
# Advisories need the advisory database from the network, which CI does not reach; licenses,
# sources and duplicate versions are checked offline.
cargo fetch --locked >/dev/null
cargo deny --offline check bans licenses sources
if [ "$(id -u)" != 0 ]; then
  echo "!!!! SKIP WARNING: not root: tests that need network namespaces and iptables will skip !!!!" >&2
fi
cargo nextest run --workspace --locked --no-fail-fast
