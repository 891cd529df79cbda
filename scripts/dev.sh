#!/usr/bin/env bash
# The newcomer's first command: a throwaway control plane on its embedded store.
# Extra arguments go to `isthmus server --dev` (e.g. --admin-addr 127.0.0.1:0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p isthmus
install -d "$HOME/.local/bin" && ln -sf "$PWD/target/release/isthmus" "$HOME/.local/bin/isthmus"
echo "isthmus is linked into ~/.local/bin (add it to PATH to type 'isthmus')" >&2
exec target/release/isthmus server --dev "$@"
