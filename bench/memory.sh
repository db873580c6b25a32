#!/usr/bin/env bash
# Memory bound under write pressure: 64 connections x qd 128 x 1 MiB writes
# (8 GiB in flight: fio needs that much memory; pass a smaller QD on a small
# machine) against a null export, for each engine;
# prints the server's peak RSS (VmHWM). Then HOLD_CONNS (default 1000)
# connections that each send the most they can have in flight and never
# read a reply (bench/hold.py: small and large reads of a 256 MiB memory
# export with 128 MiB written, then of a 256 MiB file on a disk filesystem,
# under /var/tmp, whose reads are the engine's file operations), printing
# the server's RSS before, at the peak and after (docs/engine.md,
# "Resource model"; the bound is --reply-memory, default 256M, plus a
# share's worth of pieces and received input per connection).
# Usage: bench/memory.sh [JOBS] [QD]   (HOLD_ONLY=1: only the held loads;
# REPLY_MEMORY=SIZE: passed as --reply-memory)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RINGBD_BIN=${RINGBD_BIN:-$HERE/../target/release/ringbd}
JOBS=${1:-64}
QD=${2:-128}
WORK=$(mktemp -d /tmp/ringbd-memory.XXXXXX)
FILE_DIR=$(mktemp -d /var/tmp/ringbd-memory.XXXXXX)
trap 'rm -rf "$WORK" "$FILE_DIR"' EXIT
EXTRA=()
[[ -n ${REPLY_MEMORY:-} ]] && EXTRA=(--reply-memory "$REPLY_MEMORY")
cat >"$WORK/load.sh" <<LOAD
pid=\$(cat "$WORK/pid")
fio --name=w --ioengine=nbd --uri="\$uri" --rw=write --bs=1M --iodepth=$QD --numjobs=$JOBS --size=1G \
    --time_based --runtime=8 --group_reporting --output-format=terse --terse-version=3 \
    | awk -F';' 'NF > 50 { printf "fio: %d MiB/s written\n", \$48 / 1024 }' >&2
grep VmHWM /proc/\$pid/status >&2
LOAD
for engine in uring threads; do
    [[ -n ${HOLD_ONLY:-} ]] && break
    echo "== $engine: $JOBS connections x qd $QD x 1 MiB writes"
    # The shell records its pid, then becomes ringbd (exec keeps the pid).
    sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$WORK/pid" \
        "$RINGBD_BIN" serve --engine "$engine" null:1G --unix "$WORK/s.sock" --run "sh $WORK/load.sh" \
        2>&1 >/dev/null | grep -E '^fio:|VmHWM'
done

HOLD_CONNS=${HOLD_CONNS:-1000}
head -c 128M /dev/urandom >"$WORK/fill"
cat >"$WORK/hold.sh" <<HOLD
pid=\$(cat "$WORK/pid")
nbdcopy "$WORK/fill" "\$uri" >&2
python3 "$HERE/hold.py" "\$unixsocket" "\$pid" $HOLD_CONNS small >&2
python3 "$HERE/hold.py" "\$unixsocket" "\$pid" $HOLD_CONNS large >&2
HOLD
for engine in uring threads; do
    echo "== $engine: $HOLD_CONNS connections holding their maximum in flight (memory export)"
    sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$WORK/pid" \
        "$RINGBD_BIN" serve --engine "$engine" "${EXTRA[@]}" memory:256M --unix "$WORK/h.sock" \
        --run "sh $WORK/hold.sh" 2>&1 >/dev/null | grep -E 'connections, '
done
truncate -s 256M "$FILE_DIR/disk.img"
for engine in uring threads; do
    echo "== $engine: $HOLD_CONNS connections holding their maximum in flight (file export on $(stat -f -c %T "$FILE_DIR"))"
    sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$WORK/pid" \
        "$RINGBD_BIN" serve --engine "$engine" "${EXTRA[@]}" "file:$FILE_DIR/disk.img" --unix "$WORK/f.sock" \
        --run "sh $WORK/hold.sh" 2>&1 >/dev/null | grep -E 'connections, '
done
