#!/usr/bin/env bash
# The client targets of issue 4, side by side in one run, as ratios:
#
#   bench/client.sh [--time SECONDS] [--reps N] [--only bench|copy]
#
# 1. `ringbd bench` vs fio's nbd engine (libnbd), 4k randread, 2 connections
#    (fio: 2 jobs) x qd 32, against one `nbdkit memory size=256M` prefilled
#    with 1 MiB writes. IOPS, and client CPU per I/O measured the same way for
#    both: user+system time of the whole client process tree (/usr/bin/time)
#    divided by the I/Os it completed (so set-up counts against both).
# 2. `ringbd copy` vs `nbdcopy`: a 1 GiB half-sparse image (1 MiB of random
#    data every 2 MiB) from one nbdkit memory export to a fresh one; wall
#    time. Both at their defaults (ringbd: a connection per CPU up to 4, 16
#    requests each; nbdcopy: 4 connections, 64 requests each; both 256 KiB
#    requests), and nbdcopy once more with ringbd's connection and request
#    counts ("nbdcopy=").
#
# The order of the two clients alternates per repetition. Readiness is the URI
# line sockact.py prints once the socket listens, never a sleep.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
RINGBD=${RINGBD_BIN:-$ROOT/target/release/ringbd}
PY=/usr/bin/python3
TIME=5
REPS=3
ONLY=
while (($#)); do
    case $1 in
        --time) TIME=${2:?}; shift ;;
        --reps) REPS=${2:?}; shift ;;
        --only) ONLY=${2:?}; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) echo "client.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ -x "$RINGBD" ] || { echo "client.sh: build first: cargo build --release" >&2; exit 1; }

WORK=$(mktemp -d /dev/shm/ringbd-client-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# start_nbdkit NAME SIZE: sets URI_<NAME> and PID_<NAME>.
start_nbdkit() {
    local name=$1 size=$2 fifo="$WORK/$1.uri"
    mkfifo "$fifo"
    "$PY" "$HERE/sockact.py" --unix "$WORK/$name.sock" -- nbdkit -f --exit-with-parent memory "size=$size" >"$fifo" 2>"$WORK/$name.err" &
    local pid=$!
    PIDS+=("$pid")
    local uri
    read -r uri <"$fifo" || { echo "client.sh: nbdkit $name did not start: $(cat "$WORK/$name.err")" >&2; exit 1; }
    printf -v "URI_$name" '%s' "$uri"
    printf -v "PID_$name" '%s' "$pid"
}

stop() {
    local pid=$1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# cpu_of FILE: user+sys seconds written by /usr/bin/time -f '%U %S'.
cpu_of() { awk 'END { print $1 + $2 }' "$1"; }

bench_target() {
    start_nbdkit bench 256M
    fio --name=prefill --ioengine=nbd --uri="$URI_bench" --rw=write --bs=1M --iodepth=4 \
        --size=256M --output="$WORK/prefill.txt" >/dev/null
    echo "== 4k randread, 2 connections x qd 32, nbdkit memory 256M (prefilled), ${TIME}s per run"
    printf '%-4s %-8s %10s %12s %12s\n' rep client IOPS "CPU us/IO" "(measured)"
    local sum_ratio=0 sum_cpu_ratio=0
    for rep in $(seq 1 "$REPS"); do
        local order=(fio ringbd)
        ((rep % 2 == 0)) && order=(ringbd fio)
        local fio_iops ring_iops fio_cpu ring_cpu ring_own
        for c in "${order[@]}"; do
            if [[ $c == fio ]]; then
                /usr/bin/time -f '%U %S' -o "$WORK/fio.time" \
                    fio --name=randread --ioengine=nbd --uri="$URI_bench" --rw=randread --bs=4k \
                    --iodepth=32 --numjobs=2 --group_reporting --time_based --runtime="$TIME" \
                    --size=256M --output-format=json --output="$WORK/fio.json" >/dev/null
                read -r fio_iops fio_ios < <("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["jobs"][0]["read"]; print("%.0f %d" % (r["iops"], r["total_ios"]))' "$WORK/fio.json")
                fio_cpu=$(awk -v c="$(cpu_of "$WORK/fio.time")" -v n="$fio_ios" 'BEGIN { printf "%.2f", c * 1e6 / n }')
                printf '%-4s %-8s %10s %12s\n' "$rep" fio "$fio_iops" "$fio_cpu"
            else
                /usr/bin/time -f '%U %S' -o "$WORK/ringbd.time" \
                    "$RINGBD" bench "$URI_bench" --rw randread --bs 4k --qd 32 --conns 2 \
                    --time "${TIME}s" --json >"$WORK/ringbd.json"
                read -r ring_iops ring_ios ring_own < <("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print("%.0f %d %.2f" % (r["iops"], r["ops"], r["cpu_us_per_io"]))' "$WORK/ringbd.json")
                ring_cpu=$(awk -v c="$(cpu_of "$WORK/ringbd.time")" -v n="$ring_ios" 'BEGIN { printf "%.2f", c * 1e6 / n }')
                printf '%-4s %-8s %10s %12s %12s\n' "$rep" ringbd "$ring_iops" "$ring_cpu" "$ring_own"
            fi
        done
        local r c
        r=$(awk -v a="$ring_iops" -v b="$fio_iops" 'BEGIN { printf "%.2f", a / b }')
        c=$(awk -v a="$ring_cpu" -v b="$fio_cpu" 'BEGIN { printf "%.2f", a / b }')
        echo "     ratio ringbd/fio: IOPS x$r, CPU per I/O x$c"
        sum_ratio=$(awk -v s="$sum_ratio" -v r="$r" 'BEGIN { print s + r }')
        sum_cpu_ratio=$(awk -v s="$sum_cpu_ratio" -v r="$c" 'BEGIN { print s + r }')
    done
    awk -v s="$sum_ratio" -v c="$sum_cpu_ratio" -v n="$REPS" \
        'BEGIN { printf "bench: mean IOPS ratio ringbd/fio x%.2f (target >= 1.30), mean CPU-per-I/O ratio x%.2f (target < 1)\n", s / n, c / n }'
    stop "$PID_bench"
}

copy_target() {
    # The source image: 1 MiB of random data every 2 MiB of a 1 GiB export.
    start_nbdkit src 1G
    "$PY" - "$WORK/src.img" <<'EOF'
import os, sys
size, step = 1 << 30, 2 << 20
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    for off in range(0, size, step):
        f.seek(off)
        f.write(os.urandom(1 << 20))
EOF
    "$RINGBD" copy "$WORK/src.img" "$URI_src"
    rm -f "$WORK/src.img"
    echo "== copy 1 GiB half-sparse image between two nbdkit memory exports"
    printf '%-4s %-8s %9s\n' rep client seconds
    local ncpu conns
    ncpu=$(nproc)
    conns=$((ncpu < 4 ? ncpu : 4))
    local sum=0 sum_eq=0
    for rep in $(seq 1 "$REPS"); do
        local order=(nbdcopy ringbd nbdcopy=)
        ((rep % 2 == 0)) && order=(nbdcopy= ringbd nbdcopy)
        local t_nbdcopy t_ringbd t_eq
        for c in "${order[@]}"; do
            rm -f "$WORK/dst.uri" "$WORK/dst.sock"
            start_nbdkit dst 1G
            local t0 t1
            t0=$(date +%s.%N)
            case $c in
                nbdcopy) nbdcopy "$URI_src" "$URI_dst" ;;
                nbdcopy=) nbdcopy --connections="$conns" --requests=16 "$URI_src" "$URI_dst" ;;
                ringbd) "$RINGBD" copy "$URI_src" "$URI_dst" ;;
            esac
            t1=$(date +%s.%N)
            local t
            t=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
            case $c in
                nbdcopy) t_nbdcopy=$t ;;
                nbdcopy=) t_eq=$t ;;
                ringbd) t_ringbd=$t ;;
            esac
            printf '%-4s %-8s %9s\n' "$rep" "$c" "$t"
            if ((rep == 1)) && [[ $c == ringbd ]]; then
                qemu-img compare -q -f raw -F raw "$URI_src" "$URI_dst" || { echo "client.sh: copy differs" >&2; exit 1; }
            fi
            stop "$PID_dst"
        done
        local r e
        r=$(awk -v a="$t_nbdcopy" -v b="$t_ringbd" 'BEGIN { printf "%.2f", a / b }')
        e=$(awk -v a="$t_eq" -v b="$t_ringbd" 'BEGIN { printf "%.2f", a / b }')
        echo "     speed ratio ringbd/nbdcopy: x$r, ringbd/nbdcopy=: x$e"
        sum=$(awk -v s="$sum" -v r="$r" 'BEGIN { print s + r }')
        sum_eq=$(awk -v s="$sum_eq" -v r="$e" 'BEGIN { print s + r }')
    done
    awk -v s="$sum_eq" -v n="$REPS" 'BEGIN { printf "copy: mean speed ratio ringbd/nbdcopy with the same connections and requests x%.2f\n", s / n }'
    awk -v s="$sum" -v n="$REPS" 'BEGIN { printf "copy: mean speed ratio ringbd/nbdcopy x%.2f (target >= 1.00)\n", s / n }'
    stop "$PID_src"
}

[[ $ONLY == copy ]] || bench_target
[[ $ONLY == bench ]] || copy_target
