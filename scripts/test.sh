#!/usr/bin/env bash
# The whole test suite: static checks, unit tests, then the interop suite
# against real NBD clients (libnbd, qemu, fio), run against ringbd and
# against nbdkit as the reference server.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "dependencies"
scripts/install-deps.sh

step "format, lints, docs"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "unit tests"
cargo test --workspace --locked --quiet

cargo build --release --locked --quiet
export RINGBD_BIN="$PWD/target/release/ringbd"

step "interop suite: ringbd's threaded engine"
RINGBD_ARGS="--engine threads" INTEROP_SERVERS=ringbd \
    /usr/bin/python3 -m pytest tests/interop -q -p no:cacheprovider "$@"

step "interop suite: ringbd's io_uring engine, and nbdkit as the reference"
RINGBD_ARGS="--engine uring" /usr/bin/python3 -m pytest tests/interop -q -p no:cacheprovider "$@"
