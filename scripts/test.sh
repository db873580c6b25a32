#!/usr/bin/env bash
# The whole test suite: static checks, unit tests, bounded fuzzing, the interop
# suite against real NBD clients (libnbd, qemu, fio) run against both of
# ringbd's engines and against nbdkit as the reference server (with the
# reliability batteries: faults, hostile clients, kill -9, soak), then the
# kernel's own NBD client against ringbd inside a VM.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's wall time goes into the summary printed at the end (and on a
# failure): where CI's minutes went.
STEPS=() T0=$SECONDS T_STEP=$SECONDS CUR=""
end_step() { [[ -z $CUR ]] || STEPS+=("$(printf '%5ds  %s' $((SECONDS - T_STEP)) "$CUR")"); }
step() { end_step; CUR=$*; T_STEP=$SECONDS; printf '\n== %s\n' "$*"; }
summary() {
    end_step; CUR=""
    printf '\n== wall time per step (total %dm%02ds)\n' $(((SECONDS - T0) / 60)) $(((SECONDS - T0) % 60))
    printf '%s\n' "${STEPS[@]}"
}
trap summary EXIT

step "dependencies"
scripts/install-deps.sh

step "format, lints, docs"
cargo fmt --all --check
# --all-features: the `rbd` feature (librbd, installed above) is opt-in so
# that the README's serve command builds on a machine without Ceph's libraries.
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --locked --quiet

step "unit tests"
cargo test --workspace --all-features --locked --quiet

export FUZZ_SECONDS="${FUZZ_SECONDS:-10}"
step "fuzzing: every cargo-fuzz target, ${FUZZ_SECONDS}s each (stable toolchain, RUSTC_BOOTSTRAP=1)"
scripts/fuzz.sh

step "release build"
cargo build --release --features rbd --locked --quiet
export RINGBD_BIN="$PWD/target/release/ringbd"
# The reliability batteries in the interop suite (docs/reliability.md), sized
# for CI; run longer by hand with larger values.
export RINGBD_SOAK_SECONDS="${RINGBD_SOAK_SECONDS:-20}"
export RINGBD_DURABILITY_ITERATIONS="${RINGBD_DURABILITY_ITERATIONS:-12}"

step "Debian package: build, install, verify units, serve under socket activation, purge"
tests/package/test.sh

step "interop suite: ringbd's threaded engine"
RINGBD_ARGS="--engine threads" INTEROP_SERVERS=ringbd \
    /usr/bin/python3 -m pytest tests/interop -q -p no:cacheprovider "$@"

step "interop suite: ringbd's io_uring engine, and nbdkit as the reference"
RINGBD_ARGS="--engine uring" /usr/bin/python3 -m pytest tests/interop -q -p no:cacheprovider "$@"

step "kernel in the loop: Linux 6.12 under qemu (nbd and ublk drivers)"
tests/vm/setup.sh
tests/vm/run.sh

step "kernel in the loop: a 6.16+ kernel from trixie-backports (ublk zero-copy, kTLS, recovery)"
VM_KERNEL=new tests/vm/run.sh ublk-zerocopy ktls ublk-recovery ublk-recovery-fs
