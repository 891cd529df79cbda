#!/usr/bin/env bash
# Builds the Debian package (release profile unless --profile NAME) and prints its path.
#   scripts/package.sh                 # target/debian/isthmus_<version>-1_<arch>.deb
#   scripts/package.sh --profile NAME  # another cargo profile (e.g. a custom [profile.dist])
#   scripts/package.sh --pgo           # the release binary built by scripts/pgo.sh (profile-guided;
#                                      # root, about 25 minutes): what a release should ship
# Contents and maintainer scripts: [package.metadata.deb] in crates/isthmus/Cargo.toml and
# packaging/; the layout it installs: docs/host-layout.md.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
pgo=
while (($#)); do
  case "$1" in
    --profile)
      [ $# -ge 2 ] || { echo "package: --profile needs a cargo profile name, e.g. --profile release" >&2; exit 2; }
      profile="$2"; shift 2 ;;
    --pgo) pgo=1; shift ;;
    *) echo "usage: scripts/package.sh [--profile NAME] [--pgo]" >&2; exit 2 ;;
  esac
done
case "$profile" in
  dev | debug) echo "package: use a release-like profile (cargo-deb refuses dev builds)" >&2; exit 2 ;;
esac
if [ -n "$pgo" ] && [ "$profile" != release ]; then
  echo "package: --pgo builds the release profile (scripts/pgo.sh); drop --profile $profile or --pgo" >&2
  exit 2
fi
if [ -n "$pgo" ] && [ "$(id -u)" != 0 ]; then
  echo "package: --pgo trains the profile on bench/dataplane.sh, which needs root (network namespaces): run it as root, or without --pgo" >&2
  exit 2
fi

cargo deb --version >/dev/null 2>&1 || {
  echo "package: cargo-deb is missing: run scripts/setup.sh --test-tools" >&2
  exit 1
}
if [ -n "$pgo" ]; then
  # Leaves target/release/isthmus built with the profile; a cargo build here would replace it.
  scripts/pgo.sh >&2
else
  cargo build --locked --profile "$profile" -p isthmus >&2
fi

target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target_dir/$profile/isthmus"
# The link order file (crates/isthmus/build.rs) goes stale as names change with code and
# dependency updates. A stale file costs the agent RSS, not correctness: warn, do not fail.
order=crates/isthmus/hot-functions.order
[ -z "$pgo" ] || order=target/pgo/hot-functions.order # scripts/pgo.sh makes its own
if [ "$profile" = release ] && [ -z "${ISTHMUS_NO_ORDER_FILE:-}" ] && [ -f "$order" ] &&
  command -v nm >/dev/null 2>&1; then
  read -r found listed < <(python3 scripts/order-file.py --matched "$bin" "$order")
  if ((found * 10 < listed * 9)); then
    echo "package: warning: only $found of the $listed functions in $order are in the binary;" \
      "regenerate it with scripts/order-file.sh (root) to keep the agent's RSS low" >&2
  fi
fi
# Completions come from the binary just built; cargo-deb picks them up from there
# (`target/release/completions/*` in the asset list means this profile's directory).
completions="$target_dir/$profile/completions"
mkdir -p "$completions"
"$bin" completion bash >"$completions/isthmus.bash"
"$bin" completion zsh >"$completions/_isthmus"
"$bin" completion fish >"$completions/isthmus.fish"

out="$target_dir/debian"
mkdir -p "$out"
# Debian's way with debug info ([profile.release] debug = 1): a stripped binary in the .deb,
# its symbols in isthmus-dbgsym_*.ddeb beside it.
built=$(cargo deb --locked -p isthmus --no-build --profile "$profile" --dbgsym -o "$out" --quiet)
grep -v '\.deb$' <<<"$built" | sed 's/^/package: also /' >&2 || true
grep '\.deb$' <<<"$built"
