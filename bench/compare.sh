#!/usr/bin/env bash
# Side-by-side benchmark of ringbd against nbdkit and qemu-nbd, all driven by
# fio's nbd engine (libnbd) in one run; the method is docs/benchmarks.md.
#
#   bench/compare.sh [--time SECONDS] [--servers LIST] [--transports unix,tcp]
#                    [--workloads LIST] [--baseline SERVER] [--out FILE]
#                    [--plot | --no-plot] [--keep] [--tls] [--block NAME]
#
# Each server is started once per transport on a fresh 256 MiB export,
# prefilled, run through every workload, and stopped before the next server
# starts, so no idle server shares the CPUs with a measured one.
# Readiness is a line on the server's stdout, never a sleep: ringbd prints its
# URI per listener; nbdkit and qemu-nbd are socket-activated by sockact.py,
# which listens first, prints the URI, then execs the server in its own PID.
#
# --tls serves every row with X.509 STARTTLS required (certificates made by
# tests/interop/tls_certs.py in the work dir) and connects with nbds://,
# the client certificates in $HOME/.pki/libnbd (fio refuses tls-certificates=
# in a URI), so fio/libnbd (GnuTLS) is the one TLS client
# for every server; the results go to the `bench:tls` block of --out.
# --block NAME writes the results between <!-- bench:NAME:begin/end -->
# instead (e.g. `--block qcow2` for the qcow2 rows of docs/benchmarks.md).
#
# Environment: RINGBD_BIN (default target/release/ringbd), RINGBD_BASE_BIN
# (another ringbd build: rows ringbd-base, ringbd-threads-base and ringbd-proxy-base run it, for
# a before/after pair in one run), RINGBD_ARGS,
# NBDKIT_ARGS, QEMU_NBD_ARGS (extra arguments for every row of that kind),
# RINGBD_LAUNCH=native|activate (default native: `--unix`/`--listen`),
# QEMU_NBD_CACHE (default none, falling back to writeback without O_DIRECT),
# QCOW2_DIR (where the qcow2 rows put their image; default /dev/shm).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
EXPORT_SIZE=256M
EXPORT_BYTES=$((256 << 20))
NUMJOBS=2
READY_TIMEOUT=30

# Server rows: label, kind (ringbd | nbdkit | qemu-nbd), extra arguments.
# An A/B row is one more line here, e.g. `server ringbd-nocoalesce ringbd --no-coalesce`.
# A row can also be given inline on the command line as `KIND[ARGS]`.
declare -A SERVER_KIND=() SERVER_ARGS=()
server() { SERVER_KIND[$1]=$2; SERVER_ARGS[$1]="${*:3}"; }
server ringbd             ringbd   --engine uring
server ringbd-threads     ringbd   --engine threads
# A/B rows: the io_uring engine with one technique switched off.
server ringbd-nocoalesce  ringbd   --engine uring --no-coalesce
server ringbd-nobundle    ringbd   --engine uring --no-bundle
server ringbd-nozerocopy  ringbd   --engine uring --no-zerocopy
server ringbd-noinc       ringbd   --engine uring --no-incremental
server ringbd-nofixed     ringbd   --engine uring --no-fixed-files
server nbdkit         nbdkit
server qemu-nbd       qemu-nbd
# Before/after rows: the same engines from RINGBD_BASE_BIN.
server ringbd-base          ringbd   --engine uring
server ringbd-threads-base  ringbd   --engine threads
# Proxy rows: the server serves another ringbd's memory export over a Unix
# socket (ringbd: `serve nbd+unix:///?socket=UP`; nbdkit: its nbd plugin).
# Server CPU is the proxy's alone; the upstream runs beside it.
server ringbd-proxy ringbd   --engine uring
server nbdkit-proxy nbdkit
server ringbd-proxy-base ringbd --engine uring
declare -A SERVER_PROXY=([ringbd-proxy]=1 [nbdkit-proxy]=1 [ringbd-proxy-base]=1)
# qcow2 rows: the export is a qcow2 image (64 KiB clusters, empty at the
# start) in $QCOW2_DIR (default /dev/shm), made by qemu-img create (ringbd:
# `qcow2:IMG`; qemu-nbd: `-f qcow2`). nbdkit 1.32 has no qcow2 plugin.
# On a disk filesystem (QCOW2_DIR=/var/tmp) ringbd's io_uring rows run data
# clusters on the workers' rings (docs/qcow2.md); ringbd-qcow2-direct adds
# `,direct` (O_DIRECT, as qemu-nbd's --cache=none).
server ringbd-qcow2         ringbd   --engine uring
server ringbd-threads-qcow2 ringbd   --engine threads
server qemu-nbd-qcow2       qemu-nbd
server ringbd-qcow2-base    ringbd   --engine uring
server ringbd-qcow2-direct  ringbd   --engine uring
declare -A SERVER_QCOW2=([ringbd-qcow2]=1 [ringbd-threads-qcow2]=1 [qemu-nbd-qcow2]=1 [ringbd-qcow2-base]=1
    [ringbd-qcow2-direct]=direct)
QCOW2_DIR=${QCOW2_DIR:-/dev/shm}
declare -A SERVER_BIN=()
SERVER_BIN[ringbd-base]=${RINGBD_BASE_BIN:-}
SERVER_BIN[ringbd-threads-base]=${RINGBD_BASE_BIN:-}
SERVER_BIN[ringbd-proxy-base]=${RINGBD_BASE_BIN:-}
SERVER_BIN[ringbd-qcow2-base]=${RINGBD_BASE_BIN:-}

# Workloads: name, title, fio --rw, --bs, --iodepth.
declare -A WL_TITLE=() WL_RW=() WL_BS=() WL_QD=()
ALL_WORKLOADS=()
workload() { ALL_WORKLOADS+=("$1"); WL_TITLE[$1]=$2; WL_RW[$1]=$3; WL_BS[$1]=$4; WL_QD[$1]=$5; }
workload 4k-randread  "4k randread qd32"  randread  4k  32
workload 4k-randwrite "4k randwrite qd32" randwrite 4k  32
workload 512-randread "512 randread qd32" randread  512 32
workload 64k-read     "64k read qd16"     read      64k 16
workload 1m-read      "1M read qd4"       read      1M  4
workload 1m-write     "1M write qd4"      write     1M  4
# Allocating writes: random 64 KiB writes over the whole empty export, each
# block once, before the prefill (so for a qcow2 image with 64 KiB clusters,
# every write is the first write to its cluster); not time-based.
workload 64k-allocwrite "64k allocating randwrite qd32" randwrite 64k 32
declare -A WL_BEFORE_PREFILL=([64k-allocwrite]=1)

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit "${1:-0}"; }
die() { echo "compare.sh: $*" >&2; exit 1; }
log() { echo "compare.sh: $*" >&2; }
split_list() { local IFS=,; read -ra "$1" <<<"$2"; }

# ---- arguments ---------------------------------------------------------------
RUNTIME=5
SERVERS_ARG=ringbd,ringbd-threads,nbdkit,qemu-nbd
TRANSPORTS_ARG=unix
WORKLOADS_ARG=$(IFS=,; echo "${ALL_WORKLOADS[*]}")
BASELINE=nbdkit
OUT=$ROOT/docs/benchmarks.md
PLOT=auto
KEEP=
TLS=
BLOCK=
while (($#)); do
    case $1 in
        --time) RUNTIME=${2:?}; shift ;;
        --servers) SERVERS_ARG=${2:?}; shift ;;
        --transports) TRANSPORTS_ARG=${2:?}; shift ;;
        --workloads) WORKLOADS_ARG=${2:?}; shift ;;
        --baseline) BASELINE=${2:?}; shift ;;
        --out) OUT=$(realpath -m -- "${2:?}"); shift ;;
        --plot) PLOT=yes ;;
        --no-plot) PLOT=no ;;
        --keep) KEEP=1 ;;
        --tls) TLS=1 ;;
        --block) BLOCK=${2:?}; shift ;;
        -h|--help) usage 0 ;;
        *) echo "compare.sh: unknown argument: $1" >&2; usage 2 ;;
    esac
    shift
done
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "--time wants whole seconds, got '$RUNTIME'"
split_list SERVERS "$SERVERS_ARG"
split_list TRANSPORTS "$TRANSPORTS_ARG"
split_list WORKLOADS "$WORKLOADS_ARG"
for t in "${TRANSPORTS[@]}"; do
    [[ $t == unix || $t == tcp ]] || die "unknown transport '$t' (unix, tcp)"
done
for w in "${WORKLOADS[@]}"; do
    [[ -n ${WL_RW[$w]:-} ]] || die "unknown workload '$w' (known: ${ALL_WORKLOADS[*]})"
done
for s in "${SERVERS[@]}"; do
    if [[ -z ${SERVER_KIND[$s]:-} && $s =~ ^([a-z-]+)\[(.*)\]$ ]]; then
        server "$s" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
    fi
    case ${SERVER_KIND[$s]:-} in
        ringbd|nbdkit|qemu-nbd) ;;
        *) die "unknown server '$s' (known: ${!SERVER_KIND[*]}, or KIND[ARGS])" ;;
    esac
done

# ---- tools ---------------------------------------------------------------------
if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY=$(command -v python3) || die "python3 not found"; fi
need() { command -v "$1" >/dev/null || die "$1 not found${2:+: $2}"; }
need fio "apt-get install fio"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (Debian's fio links libnbd)"
need getconf
need setsid
RINGBD_BIN=${RINGBD_BIN:-$ROOT/target/release/ringbd}
declare -A KIND_BIN=()
for s in "${SERVERS[@]}"; do
    case ${SERVER_KIND[$s]} in
        ringbd) [[ -x $RINGBD_BIN ]] || die "ringbd binary not found at $RINGBD_BIN (cargo build --release, or set RINGBD_BIN)"
                if [[ -n ${SERVER_BIN[$s]+x} ]]; then
                    [[ -x ${SERVER_BIN[$s]} ]] || die "row $s needs RINGBD_BASE_BIN (another ringbd build)"
                fi
                KIND_BIN[ringbd]=$(realpath "$RINGBD_BIN") ;;
        nbdkit) need nbdkit "apt-get install nbdkit"
                nbdkit memory --version >/dev/null 2>&1 || die "nbdkit has no memory plugin"
                KIND_BIN[nbdkit]=$(realpath "$(command -v nbdkit)") ;;
        qemu-nbd) need qemu-nbd "apt-get install qemu-utils"
                  KIND_BIN[qemu-nbd]=$(realpath "$(command -v qemu-nbd)") ;;
    esac
done
[[ " ${SERVERS[*]} " == *" $BASELINE "* ]] || log "baseline '$BASELINE' is not among the servers: no ratio columns"

have_matplotlib() { "$PY" -c 'import matplotlib' 2>/dev/null; }
if [[ $PLOT == yes ]] && ! have_matplotlib; then
    [[ $PY == /usr/bin/python3 && $(id -u) == 0 ]] || die "--plot needs matplotlib for $PY"
    log "installing python3-matplotlib for the plot"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-matplotlib >&2 ||
        { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-matplotlib >&2; } ||
        die "could not install python3-matplotlib"
fi
if [[ $PLOT == auto ]]; then
    if have_matplotlib; then PLOT=yes; else PLOT=no; log "no matplotlib for $PY: no plot (--plot installs it)"; fi
fi

# ---- state and cleanup -----------------------------------------------------------
WORK=$(mktemp -d /tmp/ringbd-bench.XXXXXX)
SHM_FILES=()
LIVE_PIDS=()    # servers and their stdout drainers
# stop_pid PID: SIGTERM to PID's process group if it leads one (servers run
# under setsid), else to PID; SIGKILL if anything is still there 5 s later.
stop_pid() {
    local target=$1 i
    if [[ $(ps -o pgid= -p "$1" 2>/dev/null) -eq $1 ]]; then target=-$1; fi
    kill -- "$target" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        if ! kill -0 -- "$target" 2>/dev/null; then wait "$1" 2>/dev/null || true; return 0; fi
        sleep 0.1
    done
    log "PID $1 ignored SIGTERM: SIGKILL"
    kill -KILL -- "$target" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    local rc=$? pid
    for pid in "${LIVE_PIDS[@]}"; do stop_pid "$pid"; done
    rm -f -- "${SHM_FILES[@]}"
    if [[ -n $KEEP ]]; then log "raw results kept in $WORK"; else rm -rf -- "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

CLK_TCK=$(getconf CLK_TCK)
PKI=
if [[ -n $TLS ]]; then
    need openssl "apt-get install openssl"
    PKI=$WORK/pki
    "$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import tls_certs; tls_certs.make_pki(sys.argv[2])' \
        "$ROOT/tests/interop" "$PKI" || die "could not make test certificates in $PKI"
    # fio's nbd engine refuses `tls-certificates=` in URIs (libnbd's local file
    # access guard); libnbd's default directory $HOME/.pki/libnbd is allowed.
    mkdir -p "$WORK/home/.pki" && ln -s "$PKI/client" "$WORK/home/.pki/libnbd"
fi
QEMU_CACHE=${QEMU_NBD_CACHE:-}
if [[ -z $QEMU_CACHE && " ${SERVERS[*]} " == *qemu* ]]; then
    # --cache=none opens the image O_DIRECT; tmpfs supports that only since Linux 6.6.
    probe=/dev/shm/ringbd-bench-probe.$$
    if dd if=/dev/zero of="$probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
        QEMU_CACHE=none
    else
        QEMU_CACHE=writeback
        log "O_DIRECT not supported on /dev/shm: qemu-nbd runs with --cache=writeback"
    fi
    rm -f "$probe"
fi

# Server CPU time (utime + stime, clock ticks) of the whole thread group.
cpu_ticks() {
    local stat f
    stat=$(<"/proc/$1/stat") || die "server PID $1 is gone"
    stat=${stat##*) }          # drop "pid (comm) ", comm may hold spaces
    read -ra f <<<"$stat"      # f[0] is field 3 (state); utime is field 14
    echo $((f[11] + f[12]))
}

tag_of() { tr -c 'A-Za-z0-9_.\n-' _ <<<"$1-$2"; }    # LABEL TRANSPORT -> file-name stem
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_upstream TAG: a ringbd memory export on a Unix socket for a proxy row;
# sets UP_PID and UP_SOCK.
start_upstream() {
    local out line
    UP_SOCK=$WORK/$1-upstream.sock
    exec {out}< <(exec setsid "$RINGBD_BIN" serve "memory:$EXPORT_SIZE" --unix "$UP_SOCK" </dev/null \
        2>"$WORK/$1-upstream.stderr")
    UP_PID=$!
    LIVE_PIDS+=("$UP_PID")
    read -r -t "$READY_TIMEOUT" -u "$out" line || die "the upstream of $1 gave no ready line: $(cat "$WORK/$1-upstream.stderr")"
    cat <&"$out" >/dev/null &
    LIVE_PIDS+=("$!")
    exec {out}<&-
}

# start_server LABEL TRANSPORT: sets SRV_PID, SRV_DRAIN, SRV_URI and SRV_STDERR,
# records the command line.
start_server() {
    local label=$1 transport=$2 kind=${SERVER_KIND[$1]} tag line
    tag=$(tag_of "$label" "$transport")
    local sock=$WORK/$tag.sock activate=1 kind_args=() extra=() cmd=()
    local export_ringbd=("memory:$EXPORT_SIZE") export_nbdkit=(memory "$EXPORT_SIZE") format=raw img=
    if [[ -n ${SERVER_QCOW2[$label]:-} ]]; then
        [[ $kind != nbdkit ]] || die "$label: nbdkit has no qcow2 row"
        img=$QCOW2_DIR/ringbd-bench.$$.$tag.qcow2
        SHM_FILES+=("$img")
        rm -f "$img"
        qemu-img create -q -f qcow2 -o cluster_size=64k "$img" "$EXPORT_SIZE" || die "qemu-img create $img failed"
        export_ringbd=("qcow2:$img")
        [[ ${SERVER_QCOW2[$label]} != direct ]] || export_ringbd=("qcow2:$img,direct")
        format=qcow2
    fi
    UP_PID=
    if [[ -n ${SERVER_PROXY[$label]:-} ]]; then
        [[ -z $PKI ]] || die "$label: proxy rows do not run with --tls"
        start_upstream "$tag"
        export_ringbd=("nbd+unix:///?socket=$UP_SOCK")
        export_nbdkit=(nbd "socket=$UP_SOCK")
    fi
    read -ra extra <<<"${SERVER_ARGS[$label]}"
    case $kind in
        ringbd)
            read -ra kind_args <<<"${RINGBD_ARGS:-}"
            cmd=("${SERVER_BIN[$label]:-$RINGBD_BIN}" serve "${export_ringbd[@]}" "${kind_args[@]}" "${extra[@]}")
            [[ -z $PKI ]] || cmd+=(--tls require --tls-certificates "$PKI/server")
            if [[ ${RINGBD_LAUNCH:-native} == native ]]; then
                activate=
                if [[ $transport == unix ]]; then cmd+=(--unix "$sock")
                else cmd+=(--listen "127.0.0.1:$(free_port)"); fi
            fi ;;
        nbdkit)
            read -ra kind_args <<<"${NBDKIT_ARGS:-}"
            [[ -z $PKI ]] || kind_args+=(--tls=require "--tls-certificates=$PKI/server")
            cmd=(nbdkit -f --exit-with-parent "${kind_args[@]}" "${extra[@]}" "${export_nbdkit[@]}") ;;
        qemu-nbd)
            read -ra kind_args <<<"${QEMU_NBD_ARGS:-}"
            if [[ -z $img ]]; then
                img=/dev/shm/ringbd-bench.$$.$tag.img
                SHM_FILES+=("$img")
                rm -f "$img" && truncate -s "$EXPORT_SIZE" "$img"
            fi
            [[ -z $PKI ]] || kind_args+=(--object "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir=$PKI/server" --tls-creds tls0)
            cmd=(qemu-nbd -f "$format" -e 16 -t "--cache=$QEMU_CACHE" --aio=io_uring "${kind_args[@]}" "${extra[@]}" "$img") ;;
    esac
    if [[ -n $activate ]]; then
        if [[ $transport == unix ]]; then cmd=("$PY" "$HERE/sockact.py" --unix "$sock" -- "${cmd[@]}")
        else cmd=("$PY" "$HERE/sockact.py" --tcp 127.0.0.1:0 -- "${cmd[@]}"); fi
    fi
    printf 'cmd\t%s\t%s\t%s\n' "$label" "$transport" "${cmd[*]}" >>"$WORK/meta.tsv"

    local out
    SRV_STDERR=$WORK/$tag.stderr
    # setsid: its own process group, so that stopping it takes any children too;
    # it execs in place (this subshell leads no group), keeping the PID.
    exec {out}< <(exec setsid "${cmd[@]}" </dev/null 2>"$SRV_STDERR")
    SRV_PID=$!
    LIVE_PIDS+=("$SRV_PID")
    if ! read -r -t "$READY_TIMEOUT" -u "$out" line; then
        cat "$SRV_STDERR" >&2
        die "$label ($transport) gave no ready line (it exited, or was silent for ${READY_TIMEOUT}s): ${cmd[*]}"
    fi
    cat <&"$out" >"$WORK/$tag.stdout" &     # keep draining the server's stdout
    SRV_DRAIN=$!
    LIVE_PIDS+=("$SRV_DRAIN")
    exec {out}<&-
    [[ $line =~ (nbds?(\+unix)?://[^[:space:]]+) ]] || die "$label printed no NBD URI but: $line"
    SRV_URI=${BASH_REMATCH[1]}
    if [[ -n $PKI ]]; then
        # The same TLS URI for every server, whatever scheme it printed.
        SRV_URI=${SRV_URI/#nbds:/nbd:}; SRV_URI=${SRV_URI/#nbds+unix:/nbd+unix:}
        SRV_URI=nbds${SRV_URI#nbd}
    fi
    log "$label ($transport) ready at $SRV_URI, pid $SRV_PID"
}

stop_server() {
    local pid keep=()
    stop_pid "$SRV_PID"
    stop_pid "$SRV_DRAIN"
    # A proxy's upstream after the proxy (its final flush goes there).
    [[ -z ${UP_PID:-} ]] || stop_pid "$UP_PID"
    for pid in "${LIVE_PIDS[@]}"; do
        [[ $pid == "$SRV_PID" || $pid == "$SRV_DRAIN" || $pid == "${UP_PID:-}" ]] || keep+=("$pid")
    done
    LIVE_PIDS=("${keep[@]}")
}

# run_fio NAME JSON ARGS...: one fio run against SRV_URI; any fio error fails the benchmark.
run_fio() {
    local name=$1 json=$2
    shift 2
    local env=()
    [[ -z $PKI ]] || env=(HOME="$WORK/home")
    if ! env "${env[@]}" fio --name="$name" --ioengine=nbd --uri="$SRV_URI" --output-format=json --output="$json" "$@" \
            2>"$json.stderr"; then
        cat "$json.stderr" >&2
        if [[ -s $SRV_STDERR ]]; then echo "--- server stderr:" >&2; tail -n 20 "$SRV_STDERR" >&2; fi
        die "fio $name failed against $SRV_URI"
    fi
}

# ---- the run ---------------------------------------------------------------------
server_version() {
    case ${SERVER_KIND[$1]} in
        ringbd) local v
                if v=$("${SERVER_BIN[$1]:-$RINGBD_BIN}" --version 2>/dev/null) && [[ -n $v ]]; then echo "${v%%$'\n'*}"
                else echo "ringbd $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '(no git revision)')"; fi ;;
        nbdkit) nbdkit --version | head -n1 ;;
        qemu-nbd) qemu-nbd --version | head -n1 ;;
    esac
}
{
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'cpus\t%s\n' "$(nproc)"
    printf 'cpu_model\t%s\n' "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
    printf 'fio\t%s\n' "$(fio --version)"
    printf 'runtime\t%s\n' "$RUNTIME"
    printf 'numjobs\t%s\n' "$NUMJOBS"
    printf 'clk_tck\t%s\n' "$CLK_TCK"
    printf 'export_size\t%s\n' "$EXPORT_SIZE"
    printf 'baseline\t%s\n' "$BASELINE"
    [[ -z $PKI ]] || printf 'tls\t%s\n' "X.509 STARTTLS required by every server, client nbds:// with libnbd (GnuTLS)"
    for s in "${SERVERS[@]}"; do printf 'version\t%s\t%s\n' "$s" "$(server_version "$s")"; done
} >"$WORK/meta.tsv"
: >"$WORK/results.tsv"

for transport in "${TRANSPORTS[@]}"; do
    for label in "${SERVERS[@]}"; do
        start_server "$label" "$transport"
        tag=$(tag_of "$label" "$transport")

        for w in "${WORKLOADS[@]}"; do
            [[ -n ${WL_BEFORE_PREFILL[$w]:-} ]] || continue
            json=$WORK/$tag.$w.json
            before=$(cpu_ticks "$SRV_PID")
            run_fio "$w" "$json" --rw="${WL_RW[$w]}" --bs="${WL_BS[$w]}" --iodepth="${WL_QD[$w]}" \
                --numjobs=1 --size="$EXPORT_SIZE"
            after=$(cpu_ticks "$SRV_PID")
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$transport" "$label" "$w" "${WL_TITLE[$w]}" "$json" \
                "$((after - before))" >>"$WORK/results.tsv"
            log "[$transport] $label ${WL_TITLE[$w]}: $("$PY" "$HERE/report.py" summary "$json" "$((after - before))" "$CLK_TCK")"
        done
        run_fio prefill "$WORK/$tag.prefill.json" --rw=write --bs=1M --iodepth=4 --numjobs=1 --size="$EXPORT_SIZE"
        "$PY" "$HERE/report.py" check-prefill "$WORK/$tag.prefill.json" "$EXPORT_BYTES"
        exe=$(readlink "/proc/$SRV_PID/exe") || die "$label exited after the prefill: $(tail -n 5 "$SRV_STDERR")"
        want_exe=${KIND_BIN[${SERVER_KIND[$label]}]}
        [[ -z ${SERVER_BIN[$label]:-} ]] || want_exe=$(realpath "${SERVER_BIN[$label]}")
        [[ $exe == "$want_exe" ]] ||
            die "PID $SRV_PID runs $exe, not $want_exe: CPU would be measured on the wrong process"

        for w in "${WORKLOADS[@]}"; do
            [[ -z ${WL_BEFORE_PREFILL[$w]:-} ]] || continue
            json=$WORK/$tag.$w.json
            before=$(cpu_ticks "$SRV_PID")
            run_fio "$w" "$json" --rw="${WL_RW[$w]}" --bs="${WL_BS[$w]}" --iodepth="${WL_QD[$w]}" \
                --numjobs="$NUMJOBS" --group_reporting --time_based --runtime="$RUNTIME"
            after=$(cpu_ticks "$SRV_PID")
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$transport" "$label" "$w" "${WL_TITLE[$w]}" "$json" \
                "$((after - before))" >>"$WORK/results.tsv"
            log "[$transport] $label ${WL_TITLE[$w]}: $("$PY" "$HERE/report.py" summary "$json" "$((after - before))" "$CLK_TCK")"
        done
        stop_server
    done
done

plot_args=()
if [[ $PLOT == yes ]]; then plot_args=(--plot "${OUT%.md}${TLS:+-tls}.png"); fi
mkdir -p "$(dirname "$OUT")"
block_args=()
[[ -z $TLS ]] || block_args=(--block tls)
[[ -z $BLOCK ]] || block_args=(--block "$BLOCK")
"$PY" "$HERE/report.py" report --work "$WORK" --out "$OUT" "${plot_args[@]}" "${block_args[@]}"
