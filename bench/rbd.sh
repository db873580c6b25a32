#!/usr/bin/env bash
# Ceph RBD benchmark (docs/benchmarks.md, "Ceph RBD"): the same image on the
# same single-node cluster, 4k random reads and writes, 2 jobs x qd 32, through
#
#   fio-rbd   fio's rbd engine: librbd in the fio process (no NBD at all)
#   ringbd    ringbd serve rbd:POOL/IMAGE, fio's nbd engine (one connection per job)
#   qemu-nbd  qemu-nbd -f raw rbd:POOL/IMAGE (qemu's rbd driver), fio's nbd engine
#
# and prints IOPS side by side with the ratios ringbd/fio-rbd and
# ringbd/qemu-nbd, plus each server's CPU time per I/O.
#
#   bench/rbd.sh [--time SECONDS] [--cluster DIR] [--keep]
#
# Starts a cluster (tests/ceph/cluster.sh) in a temporary directory unless
# --cluster names a running one, and stops it at the end. The image has only
# the layering feature: with exclusive-lock, fio-rbd's two jobs (two librbd
# handles) would pass the lock back and forth on every write, which measures
# the lock, not the data path (ringbd serves both connections from one handle).
# Prefilled with sequential 1 MiB writes so reads hit written data.
# Environment: RINGBD_BIN (default target/release/ringbd), RINGBD_ARGS.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
TIME=10
CLUSTER_DIR=""
KEEP=0
SIZE=256M
BIN=${RINGBD_BIN:-$ROOT/target/release/ringbd}

die() { echo "rbd.sh: $*" >&2; exit 1; }
log() { echo "rbd.sh: $*" >&2; }
while (($#)); do
    case $1 in
    --time) TIME=$2; shift 2 ;;
    --cluster) CLUSTER_DIR=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) die "unknown argument $1" ;;
    esac
done
[[ -x $BIN ]] || die "$BIN is missing (cargo build --release)"
fio --enghelp 2>/dev/null | grep -qw rbd || die "this fio has no rbd engine"

WORK=$(mktemp -d /tmp/ringbd-rbd-bench.XXXXXX)
OWN_CLUSTER=0
SERVER_PID=""
cleanup() {
    [[ -z $SERVER_PID ]] || { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
    if ((OWN_CLUSTER)); then "$ROOT/tests/ceph/cluster.sh" stop "$CLUSTER_DIR" || true; fi
    if ((KEEP)); then log "kept $WORK"; else rm -rf "$WORK"; ((OWN_CLUSTER)) && rm -rf "$CLUSTER_DIR"; fi
    return 0
}
trap cleanup EXIT

if [[ -z $CLUSTER_DIR ]]; then
    CLUSTER_DIR="$WORK/cluster"
    OWN_CLUSTER=1
    "$ROOT/tests/ceph/cluster.sh" start "$CLUSTER_DIR" >/dev/null
fi
export CEPH_CONF="$CLUSTER_DIR/ceph.conf"
POOL=rbd
IMAGE="bench$$"
rbd create --size "$SIZE" --image-feature layering "$POOL/$IMAGE"
QEMU_MODULE_DIR=$("$ROOT/tests/ceph/qemu-rbd.sh" "$ROOT/target/rbd-cache/qemu")
export QEMU_MODULE_DIR

log "prefilling $POOL/$IMAGE ($SIZE)"
fio --name=prefill --ioengine=rbd --clientname=admin --pool="$POOL" --rbdname="$IMAGE" \
    --rw=write --bs=1M --iodepth=8 --numjobs=1 --size="$SIZE" --output=/dev/null

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run_fio ROW RW ENGINE-ARGS...: prints "IOPS CPU_US_PER_IO" (CPU of $SERVER_PID, if any).
run_fio() {
    local row=$1 rw=$2; shift 2
    local json="$WORK/$row.$rw.json" t0=0 t1=0
    [[ -z $SERVER_PID ]] || t0=$(cpu_ticks "$SERVER_PID")
    fio --name="$row" "$@" --rw="$rw" --bs=4k --iodepth=32 --numjobs=2 --group_reporting \
        --time_based --runtime="$TIME" --ramp_time=1 --size="$SIZE" \
        --output-format=json --output="$json" || die "fio $row $rw failed"
    [[ -z $SERVER_PID ]] || t1=$(cpu_ticks "$SERVER_PID")
    python3 - "$json" "$((t1 - t0))" "$(getconf CLK_TCK)" "$rw" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = "read" if "read" in sys.argv[4] else "write"
iops = j[side]["iops"]
ios = j[side]["total_ios"] or 1
ticks, hz = int(sys.argv[2]), int(sys.argv[3])
cpu = ticks / hz * 1e6 / ios if ticks else 0.0
print("%.0f %.1f" % (iops, cpu))
EOF
}

declare -A IOPS=() CPU=()
measure() { # ROW ENGINE-ARGS...
    local row=$1; shift
    for rw in randread randwrite; do
        read -r IOPS[$row.$rw] CPU[$row.$rw] < <(run_fio "$row" "$rw" "$@")
        log "$row $rw: ${IOPS[$row.$rw]} IOPS"
    done
}

# wait_uri FILE: the first line a server printed (its URI), with a deadline.
wait_line() {
    local f=$1 deadline=$((SECONDS + 60))
    until [[ -s $f ]]; do
        kill -0 "$SERVER_PID" 2>/dev/null || die "server exited: $(cat "$WORK/server.err")"
        ((SECONDS < deadline)) || die "server not ready after 60s"
        sleep 0.05
    done
}

measure fio-rbd --ioengine=rbd --clientname=admin --pool="$POOL" --rbdname="$IMAGE"

sock="$WORK/ringbd.sock"
# shellcheck disable=SC2086
"$BIN" serve ${RINGBD_ARGS:-} --unix "$sock" --ceph-conf "$CEPH_CONF" "rbd:$POOL/$IMAGE" \
    >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
wait_line "$WORK/server.out"
measure ringbd --ioengine=nbd --uri="nbd+unix:///?socket=$sock"
kill "$SERVER_PID"; wait "$SERVER_PID" || die "ringbd exited with an error: $(cat "$WORK/server.err")"
grep 'stats:' "$WORK/server.err" | tail -n 1 | sed 's/^/rbd.sh: ringbd /' >&2
SERVER_PID=""

qsock="$WORK/qemu.sock"
qemu-nbd -f raw -t -e 4 --cache=writeback -k "$qsock" "rbd:$POOL/$IMAGE:conf=$CEPH_CONF" \
    >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
deadline=$((SECONDS + 60))
until [[ -S $qsock ]]; do
    kill -0 "$SERVER_PID" 2>/dev/null || die "qemu-nbd exited: $(cat "$WORK/server.err")"
    ((SECONDS < deadline)) || die "qemu-nbd not ready after 60s"
    sleep 0.05
done
measure qemu-nbd --ioengine=nbd --uri="nbd+unix:///?socket=$qsock"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
printf '\n%-12s %12s %12s %14s %14s\n' "4k qd32 x2" "fio-rbd" "ringbd" "qemu-nbd" "ringbd/fio-rbd"
for rw in randread randwrite; do
    f=${IOPS[fio-rbd.$rw]} r=${IOPS[ringbd.$rw]} q=${IOPS[qemu-nbd.$rw]}
    printf '%-12s %12s %12s %14s %13.2fx   ringbd/qemu-nbd %.2fx   server CPU/IO: ringbd %sus, qemu-nbd %sus\n' \
        "$rw" "$f" "$r" "$q" "$(ratio "$r" "$f")" "$(ratio "$r" "$q")" \
        "${CPU[ringbd.$rw]}" "${CPU[qemu-nbd.$rw]}"
done
echo "(IOPS; targets: ringbd >= 0.8x fio-rbd, >= 4x qemu-nbd; $TIME s per run, image $SIZE, $(nproc) CPUs)"
