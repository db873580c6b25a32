#!/usr/bin/env bash
# Shows that each data-plane technique engaged: runs fio (nbd engine, 4k
# randread, 2 jobs x qd 32, prefilled) against `ringbd serve` in captive mode
# and prints the counters ringbd reports at exit (requests per receive
# completion, buffers per bundle, replies per send, ring enters per request,
# zero-copy sends). Usage: bench/counters.sh [--time S] [extra ringbd args...]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RINGBD_BIN=${RINGBD_BIN:-$HERE/../target/release/ringbd}
TIME=5
if [ "${1:-}" = "--time" ]; then TIME=${2:?}; shift 2; fi
WORK=$(mktemp -d /tmp/ringbd-counters.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

cat >"$WORK/load.sh" <<LOAD
fio --name=prefill --ioengine=nbd --uri="\$uri" --rw=write --bs=1M --iodepth=4 --size=256M >/dev/null
fio --name=load --ioengine=nbd --uri="\$uri" --rw=${RW:-randread} --bs=${BS:-4k} --iodepth=32 --numjobs=2 \
    --size=256M --time_based --runtime=$TIME --group_reporting --output-format=terse --terse-version=3 \
    | awk -F';' 'NF > 50 { printf "fio: read IOPS %s, write IOPS %s\n", \$8, \$49 }' >&2
LOAD
for transport in unix tcp; do
    if [ "$transport" = unix ]; then where=(--unix "$WORK/s.sock"); else where=(--listen 127.0.0.1:0); fi
    echo "== $transport: ${RW:-randread} ${BS:-4k} qd32 x 2 jobs, ringbd $*"
    "$RINGBD_BIN" serve memory:256M "${where[@]}" "$@" --run "sh $WORK/load.sh" 2>&1 >/dev/null \
        | grep -E '^fio:|stats:|engine' | sed 's/^ringbd: //'
done
