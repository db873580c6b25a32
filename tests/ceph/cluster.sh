#!/usr/bin/env bash
# A throw-away single-node Ceph cluster on loopback, for ringbd's rbd: tests
# and benchmarks: one mon, one mgr, one OSD on memstore (data in RAM), pools
# of size 1, no authentication (auth none) unless CEPH_AUTH=cephx.
#
#   tests/ceph/cluster.sh start DIR     # prints "CEPH_CONF=DIR/ceph.conf" when ready
#   tests/ceph/cluster.sh stop DIR      # stops the daemons started from DIR
#   tests/ceph/cluster.sh stop-osd DIR  # stops the OSD (failure tests)
#   tests/ceph/cluster.sh start-osd DIR # starts it again, waits until it is up
#
# Everything lives under DIR (config, mon/osd stores, logs, sockets, pid
# files); nothing touches /etc/ceph or /var/lib/ceph. The mon listens on a
# free loopback port (msgr2 only) chosen at start, so several clusters can
# run side by side. Readiness is polled with a deadline, never slept for.
# Environment: CEPH_MEMSTORE_BYTES (OSD capacity, default 2 GiB),
# CEPH_START_TIMEOUT (seconds, default 90), CEPH_POOL (default "rbd"),
# CEPH_AUTH (none, the default, or cephx).
#
# CEPH_AUTH=cephx: cephx required everywhere; every daemon has its own key
# (mon., mgr.x, osd.0 in their data directories) and the clients below have
# keyrings DIR/ceph.client.NAME.keyring, which the conf's [client] section
# names (keyring = DIR/ceph.$name.keyring: /etc/ceph's default layout, moved
# under DIR), so `--id NAME` with the conf is all a client needs. start then
# also prints one CEPH_KEYRING_NAME=PATH line per client:
#   admin          everything (the ceph/rbd/rados CLIs' default user)
#   ringbd         mon 'profile rbd', osd 'profile rbd pool=POOL'
#   ringbd-ro      mon 'profile rbd', osd 'profile rbd-read-only pool=POOL'
#   ringbd-nopool  mon 'profile rbd', osd 'profile rbd pool=POOL-other' (no
#                  access to POOL; the pool named does not exist)
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || { echo "usage: $0 start|stop|stop-osd|start-osd DIR" >&2; exit 2; }
conf="$dir/ceph.conf"
timeout_s=${CEPH_START_TIMEOUT:-90}
pool=${CEPH_POOL:-rbd}
auth=${CEPH_AUTH:-none}
[[ $auth == none || $auth == cephx ]] || { echo "CEPH_AUTH must be none or cephx, not $auth" >&2; exit 2; }

say() { echo "cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# Runs a ceph CLI command with a bounded connect timeout.
cephc() { timeout 30 ceph -c "$conf" --connect-timeout 10 "$@"; }

# wait_for DESCRIPTION COMMAND...: polls until COMMAND succeeds or the deadline passes.
wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + timeout_s))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "timed out after ${timeout_s}s waiting for $what; last logs:"
            tail -n 20 "$dir"/log/*.log >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.2
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

osd_up() { cephc osd dump -f json | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(o["up"] for o in d["osds"]) else 1)'; }
# All placement groups active (I/O is served), e.g. after the OSD restarted.
pgs_active() { cephc pg stat -f json | python3 -c 'import json,sys; d=json.load(sys.stdin); s=d.get("pg_summary", d); n=s["num_pgs"]; a=sum(x["num"] for x in s["num_pg_by_state"] if "active" in x["name"].split("+")); sys.exit(0 if a == n else 1)'; }

start_daemon() { # name, command...
    local name=$1; shift
    "$@" -c "$conf" >"$dir/log/$name.out" 2>&1 || die "$name failed to start: $(tail -n 5 "$dir/log/$name.out")"
}

start_osd() {
    start_daemon osd.0 ceph-osd -i 0
    wait_for "the OSD to come up" osd_up
    wait_for "placement groups to be active" pgs_active
}

# add_client NAME CAPS...: client.NAME with these caps, its keyring
# DIR/ceph.client.NAME.keyring (where the conf's [client] keyring points).
add_client() {
    local name=$1; shift
    cephc auth get-or-create "client.$name" "$@" -o "$dir/ceph.client.$name.keyring" \
        || die "creating client.$name failed"
}

stop_pidfile() { # pidfile
    local f=$1 pid
    [[ -f $f ]] || return 0
    pid=$(cat "$f")
    rm -f "$f"
    [[ -n $pid ]] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

case $cmd in
start)
    tools=(ceph-mon ceph-osd ceph-mgr ceph monmaptool rbd)
    [[ $auth == none ]] || tools+=(ceph-authtool)
    for t in "${tools[@]}"; do
        command -v "$t" >/dev/null || die "$t is not installed (scripts/install-deps.sh installs it)"
    done
    [[ ! -e $conf ]] || die "$dir already holds a cluster (stop it first, or use an empty directory)"
    mkdir -p "$dir"/{mon/ceph-a,osd/ceph-0,mgr/ceph-x,log,run}
    dir=$(cd "$dir" && pwd)
    conf="$dir/ceph.conf"
    port=$(free_port)
    fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
mon initial members = a
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = $auth
auth service required = $auth
auth client required = $auth
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon cluster log file = $dir/log/cluster.log
crash dir = $dir/crash
[mon]
mon data = $dir/mon/ceph-\$id
[osd]
osd data = $dir/osd/ceph-\$id
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-2147483648}
osd op num shards = 1
osd fast shutdown = false
osd op num threads per shard = 2
[mgr]
mgr data = $dir/mgr/ceph-\$id
CONF
    mon_keyring=()
    if [[ $auth == cephx ]]; then
        # Daemons read their key from their data directory; clients from
        # DIR/ceph.client.NAME.keyring (as from /etc/ceph by default).
        cat >>"$conf" <<CONF
[client]
keyring = $dir/ceph.\$name.keyring
[mon]
keyring = \$mon_data/keyring
auth allow insecure global id reclaim = false
[mgr]
keyring = \$mgr_data/keyring
[osd]
keyring = \$osd_data/keyring
CONF
        # The mon's keyring seeds the auth database: mon. and client.admin.
        umask 077
        ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
        ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
        mon_keyring=(--keyring "$dir/mon.keyring")
    fi
    monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" "${mon_keyring[@]}" >"$dir/log/mkfs.out" 2>&1 \
        || die "ceph-mon --mkfs failed: $(tail -n 5 "$dir/log/mkfs.out")"
    start_daemon mon.a ceph-mon -i a
    wait_for "the monitor" cephc mon stat
    if [[ $auth == cephx ]]; then
        cephc auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
            -o "$dir/mgr/ceph-x/keyring" || die "creating mgr.x's key failed"
    fi
    start_daemon mgr.x ceph-mgr -i x
    id=$(cephc osd create) || die "ceph osd create failed"
    [[ $id == 0 ]] || die "ceph osd create returned id $id, expected 0"
    if [[ $auth == cephx ]]; then
        # (--mkfs already asks the mon for config, so the key comes first.)
        cephc auth get-or-create osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
            -o "$dir/osd/ceph-0/keyring" || die "creating osd.0's key failed"
    fi
    ceph-osd -c "$conf" -i 0 --mkfs >"$dir/log/osd-mkfs.out" 2>&1 \
        || die "ceph-osd --mkfs failed: $(tail -n 5 "$dir/log/osd-mkfs.out")"
    start_osd
    cephc osd pool create "$pool" 8 8 >/dev/null
    cephc osd pool set "$pool" size 1 --yes-i-really-mean-it >/dev/null
    timeout 60 rbd -c "$conf" pool init "$pool"
    wait_for "pool $pool to be usable" timeout 15 rados -c "$conf" -p "$pool" ls
    if [[ $auth == cephx ]]; then
        add_client ringbd mon 'profile rbd' osd "profile rbd pool=$pool" mgr "profile rbd pool=$pool"
        add_client ringbd-ro mon 'profile rbd' osd "profile rbd-read-only pool=$pool" mgr "profile rbd pool=$pool"
        add_client ringbd-nopool mon 'profile rbd' osd "profile rbd pool=$pool-other"
    fi
    say "ready in ${SECONDS}s: mon on 127.0.0.1:$port, pool $pool, auth $auth"
    echo "CEPH_CONF=$conf"
    if [[ $auth == cephx ]]; then
        for n in admin ringbd ringbd-ro ringbd-nopool; do
            v=${n^^}
            echo "CEPH_KEYRING_${v//-/_}=$dir/ceph.client.$n.keyring"
        done
    fi
    ;;
stop)
    stop_pidfile "$dir/run/osd.0.pid"
    stop_pidfile "$dir/run/mgr.x.pid"
    stop_pidfile "$dir/run/mon.a.pid"
    ;;
stop-osd)
    # A clean stop (SIGTERM): memstore writes its contents to the OSD's
    # directory on the way down, so start-osd brings the same data back.
    # The monitor marks the OSD down at once; client operations then wait
    # for it (bounded by rados_osd_op_timeout).
    stop_pidfile "$dir/run/osd.0.pid"
    ;;
start-osd)
    start_osd
    ;;
*)
    die "unknown command $cmd (start, stop, stop-osd, start-osd)"
    ;;
esac
