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

step "interop suite (ringbd and nbdkit)"
cargo build --release --locked --quiet
RINGBD_BIN="$PWD/target/release/ringbd" /usr/bin/python3 -m pytest tests/interop -q -p no:cacheprovider "$@"
