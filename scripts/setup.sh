#!/usr/bin/env bash
# Installs what building and testing Isthmus needs on a Debian machine, if it is missing.
# Idempotent and quiet when everything is there. Needs root (or sudo) only to install.
set -euo pipefail

need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v dig >/dev/null || need+=(dnsutils)
command -v curl >/dev/null || need+=(curl)
# The package test: debootstrap makes a throwaway Debian root to install the .deb into.
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v dpkg-deb >/dev/null || need+=(dpkg)
# Tests of several control-plane replicas run a real etcd cluster.
if [ "${1:-}" = "--test-tools" ]; then
  command -v etcd >/dev/null || need+=(etcd-server)
fi
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  sudo_=""
  [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing: install Rust stable (https://rustup.rs) first" >&2
  exit 1
fi
if [ "${1:-}" = "--test-tools" ]; then
  cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
  cargo deny --version >/dev/null 2>&1 || cargo install cargo-deny --locked
  # The package test builds the .deb from the debug binary (`--profile dev --no-build`), which
  # cargo-deb 3.x only warns about: keep to the version it was written against.
  cargo deb --version >/dev/null 2>&1 || cargo install cargo-deb --version 3.8.0 --locked
fi
