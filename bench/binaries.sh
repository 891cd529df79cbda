# Sourced by the scripts that run bench/dataplane.sh more than once (tail.sh, hops.sh, l7.sh),
# from the repository's root: builds the product and the load generators once, unless
# ISTHMUS_BIN and HTTP_LOAD name them, and exports both for bench/dataplane.sh.
if [ -z "${ISTHMUS_BIN:-}" ] || [ -z "${HTTP_LOAD:-}" ]; then
    scripts/setup.sh >&2
    cargo build --release -p isthmus >&2
    cargo build --release -p isthmus-bench --bin http-load --bin grpc-load >&2
fi
export ISTHMUS_BIN="${ISTHMUS_BIN:-$PWD/target/release/isthmus}"
export HTTP_LOAD="${HTTP_LOAD:-$PWD/target/release/http-load}"
