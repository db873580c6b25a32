#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for a bounded time.
#
#   scripts/fuzz.sh            # every target, FUZZ_SECONDS each (default 30)
#   scripts/fuzz.sh request    # one target
#
# Release builds with debug assertions (and so overflow checks) on: -O -a.
# Works on the stable toolchain: cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address, ...), which RUSTC_BOOTSTRAP=1 lets stable rustc
# accept. Each target's working corpus (fuzz/corpus/TARGET, not committed)
# starts from the committed seeds in fuzz/seeds/TARGET. A crash fails the
# script; its input is left in fuzz/artifacts/TARGET/ for
# `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...` and becomes a
# regression unit test in the crate that was at fault.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-30}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build -O -a
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    printf '== fuzz %s for %ss\n' "$t" "$seconds"
    # -rss_limit_mb: AddressSanitizer's shadow memory counts too.
    status=0
    cargo fuzz run -O -a "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len=8192 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log" >&2
        echo "fuzz target $t failed; reproduce with:" \
            "RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a $t fuzz/artifacts/$t/<crash file>" >&2
        exit 1
    fi
done
