#!/usr/bin/env bash
# Ceph RBD benchmark (docs/benchmarks.md, "Ceph RBD"): the same image on the
# same single-node cluster, 4k random reads and writes, 2 jobs x qd 32, through
#
#   fio-rbd   fio's rbd engine: librbd in the fio process (no NBD at all)
#   ringbd    ringbd serve rbd:POOL/IMAGE, fio's nbd engine (one connection per job)
#   qemu-nbd  qemu-nbd -f raw rbd:POOL/IMAGE (qemu's rbd driver), fio's nbd engine
#
# and prints IOPS side by side with the ratios ringbd/fio-rbd and
# ringbd/qemu-nbd, plus the CPU time per I/O of fio, the NBD server and the OSD.
#
#   bench/rbd.sh [--time SECONDS] [--cluster DIR] [--keep]
#
# Starts a cluster (tests/ceph/cluster.sh) in a temporary directory unless
# --cluster names a running one, and stops it at the end. The image has only
# the layering feature: with exclusive-lock, fio-rbd's two jobs (two librbd
# handles) would pass the lock back and forth on every write, which measures
# the lock, not the data path (ringbd serves both connections from one handle).
# Prefilled with sequential 1 MiB writes before each row, so reads hit written
# data laid out the same way for every row.
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
[[ -x $BIN ]] || die "$BIN is missing (cargo build --release --features rbd)"
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

# (Re)writes the whole image sequentially in 1 MiB writes. Before every row:
# memstore keeps an object as the list of buffers it was written in, so after
# a row's 4k random writes the next row's reads would cost the OSD several
# times the CPU (measured: 15 us per read after a prefill, 59-73 us after the
# previous rows' random writes), which would favour whichever row runs first.
prefill() {
    log "prefilling $POOL/$IMAGE ($SIZE) for the next row"
    fio --name=prefill --ioengine=rbd --clientname=admin --pool="$POOL" --rbdname="$IMAGE" \
        --rw=write --bs=1M --iodepth=8 --numjobs=1 --size="$SIZE" --output=/dev/null
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

OSD_PID=$(cat "$CLUSTER_DIR/run/osd.0.pid")

# run_fio ROW RW ENGINE-ARGS...: prints "IOPS CLIENT_US SERVER_US OSD_US", the
# last three CPU time per I/O of fio (librbd included for fio-rbd), of the
# NBD server ($SERVER_PID, if any) and of the OSD.
run_fio() {
    local row=$1 rw=$2; shift 2
    local json="$WORK/$row.$rw.json" s0=0 s1=0 o0 o1 client
    [[ -z $SERVER_PID ]] || s0=$(cpu_ticks "$SERVER_PID")
    o0=$(cpu_ticks "$OSD_PID")
    client=$(python3 -c '
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print("%.3f" % (u.ru_utime + u.ru_stime) if r.returncode == 0 else "fail")' \
        fio --name="$row" "$@" --rw="$rw" --bs=4k --iodepth=32 --numjobs=2 --group_reporting \
        --time_based --runtime="$TIME" --size="$SIZE" --output-format=json --output="$json")
    [[ $client != fail ]] || die "fio $row $rw failed"
    [[ -z $SERVER_PID ]] || s1=$(cpu_ticks "$SERVER_PID")
    o1=$(cpu_ticks "$OSD_PID")
    python3 - "$json" "$client" "$((s1 - s0))" "$((o1 - o0))" "$(getconf CLK_TCK)" "$rw" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = "read" if "read" in sys.argv[6] else "write"
ios = j[side]["total_ios"] or 1
hz = int(sys.argv[5])
us = lambda secs: secs * 1e6 / ios
print("%.0f %.1f %.1f %.1f" % (j[side]["iops"], us(float(sys.argv[2])), us(int(sys.argv[3]) / hz),
                               us(int(sys.argv[4]) / hz)))
EOF
}

declare -A IOPS=() CPU=()
measure() { # ROW ENGINE-ARGS...
    local row=$1 rw i c s o; shift
    prefill
    for rw in randread randwrite; do
        read -r i c s o < <(run_fio "$row" "$rw" "$@")
        IOPS[$row.$rw]=$i
        CPU[$row.$rw]="$c/$s/$o"
        log "$row $rw: $i IOPS; CPU per I/O (us): fio $c, server $s, OSD $o"
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
printf '\n%-10s %9s %9s %9s %15s %16s\n' "4k qd32x2" "fio-rbd" "ringbd" "qemu-nbd" "ringbd/fio-rbd" "ringbd/qemu-nbd"
for rw in randread randwrite; do
    f=${IOPS[fio-rbd.$rw]} r=${IOPS[ringbd.$rw]} q=${IOPS[qemu-nbd.$rw]}
    printf '%-10s %9s %9s %9s %14sx %15sx\n' "$rw" "$f" "$r" "$q" "$(ratio "$r" "$f")" "$(ratio "$r" "$q")"
done
printf '\nCPU per I/O in us, fio / NBD server / OSD:\n'
for rw in randread randwrite; do
    printf '%-10s %20s %20s %20s\n' "$rw" "${CPU[fio-rbd.$rw]}" "${CPU[ringbd.$rw]}" "${CPU[qemu-nbd.$rw]}"
done
echo "(IOPS; targets: ringbd >= 0.8x fio-rbd, >= 4x qemu-nbd; $TIME s per run, image $SIZE, $(nproc) CPUs)"
