# Helpers for the guest tests (busybox ash). A test starts with
#   . /vmtest/lib.sh
# and then runs with `set -e`: any failing command fails the test, reported
# with the step it was in. Exit 0 = pass, `fail MSG` = fail, `skip MSG` = skip.
set -e

VMTEST_NAME=${VMTEST_NAME:-$(basename "$0" .sh)}
STEP="start"
CLEANUPS=""

# /init reads the failure reason from $VMTEST_REASON and the step a hung
# test was in from $VMTEST_REASON.step
VMTEST_REASON=${VMTEST_REASON:-/dev/null}
log() { echo "[$VMTEST_NAME $(cut -d' ' -f1 /proc/uptime)] $*"; }
step() { STEP="$*"; log "-- $*"; [ "$VMTEST_REASON" = /dev/null ] || echo "$STEP" >"$VMTEST_REASON.step"; }
_reason() { echo "$1: $2"; echo "$2" >>"$VMTEST_REASON"; VMTEST_REPORTED=1; }
fail() { _reason FAIL "$* (step: $STEP)"; exit 1; }
skip() { _reason SKIP "$*"; exit 77; }

# on_exit CMD: run CMD (last registered first) when the test exits, pass or fail
on_exit() { CLEANUPS="$*; $CLEANUPS"; }
_vmtest_exit() {
    rc=$?
    set +e
    if [ "$rc" != 0 ] && [ -z "$VMTEST_REPORTED" ]; then
        _reason FAIL "exit status $rc in step: $STEP"
        dmesg | tail -n 20 | sed 's/^/  dmesg: /'
    fi
    eval "$CLEANUPS" >/dev/null 2>&1
    exit "$rc"
}
trap _vmtest_exit EXIT

# modprobe with a clear failure; modules.dep/alias come from the initramfs
load_module() { modprobe "$1" || fail "modprobe $1 failed: $(dmesg | tail -n 3)"; }
# ext4's metadata_csum needs crc32c: a module (a softdep of ext4) on 6.12, a
# built-in library on newer kernels, where the module does not exist
load_crc32c() {
    if grep -q 'crc32c[-_]generic' "/lib/modules/$(uname -r)/modules.dep"; then load_module crc32c_generic; fi
}

# wait_for SECONDS CMD...: poll CMD every 0.1 s until it succeeds
wait_for() {
    _n=$(($1 * 10)); shift
    while ! "$@" 2>/dev/null; do
        _n=$((_n - 1))
        [ "$_n" -gt 0 ] || return 1
        sleep 0.1
    done
}

# --- ringbd -------------------------------------------------------------------
# ringbd_start ARGS...: `ringbd serve ARGS` in the background; returns once it
# printed its URI. Sets RINGBD_PID, RINGBD_URI; logs in ./ringbd.out/.err.
ringbd_start() {
    : >ringbd.out   # emptied here, not in the background: a restart must not read the old URI
    ringbd serve "$@" >ringbd.out 2>ringbd.err &
    RINGBD_PID=$!
    on_exit "kill $RINGBD_PID"
    if ! wait_for 30 test -s ringbd.out; then
        kill -0 "$RINGBD_PID" 2>/dev/null || fail "ringbd exited at start: $(tail -n 3 ringbd.err)"
        fail "ringbd printed no URI within 30 s"
    fi
    RINGBD_URI=$(head -n1 ringbd.out)
    log "ringbd $* -> $RINGBD_URI (pid $RINGBD_PID)"
}
# ringbd_stop: SIGTERM, which must end it with status 0
ringbd_stop() {
    kill -TERM "$RINGBD_PID"
    _rc=0; wait "$RINGBD_PID" || _rc=$?
    [ "$_rc" = 0 ] || fail "ringbd exited with status $_rc on SIGTERM: $(tail -n 3 ringbd.err)"
    log "ringbd stopped cleanly"
}

# --- kernel NBD client -----------------------------------------------------------
# nbd_connect DEV ARGS...: nbd-client ARGS DEV, then check the device is live
nbd_connect() {
    _dev=$1; shift
    nbd-client "$@" "$_dev" || fail "nbd-client $* $_dev failed: $(dmesg | tail -n 3)"
    on_exit "nbd-client -d $_dev"
    wait_for 10 nbd-client -c "$_dev" >/dev/null || fail "$_dev not connected after nbd-client"
    log "$_dev connected: $(blockdev --getsize64 "$_dev") bytes"
}
nbd_disconnect() {
    nbd-client -d "$1" >/dev/null || fail "nbd-client -d $1 failed"
    wait_for 10 sh -c "! nbd-client -c $1 >/dev/null" || fail "$1 still connected after nbd-client -d"
    log "$1 disconnected"
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# --- workloads shared by the NBD tests ----------------------------------------
# (cmp and md5sum, not sha256sum: hashing is slow under TCG)

# check_pattern WRITE_DEV READ_DEV RECONNECT_CMD: write known data through
# WRITE_DEV (at the start, at 64 MiB, in the last MiB), then after
# RECONNECT_CMD (which must make READ_DEV a fresh connection to the same
# export) read it back, so the data demonstrably went through the server and
# not just the page cache. Also checks that an unwritten region reads zeroes.
check_pattern() {
    _w=$1 _r=$2 _reconnect=$3
    step "pattern: write through $_w"
    _size=$(blockdev --getsize64 "$_w")
    _mib=$((_size / 1048576))
    dd if=/dev/urandom of=pattern bs=1M count=8 2>/dev/null
    head -c 1048576 pattern >pattern1
    head -c 1048576 /dev/zero >zero1
    dd if=pattern of="$_w" bs=1M conv=fsync 2>/dev/null
    dd if=pattern of="$_w" bs=1M seek=64 conv=fsync 2>/dev/null
    dd if=pattern1 of="$_w" bs=1M seek=$((_mib - 1)) conv=fsync 2>/dev/null
    step "pattern: read back through $_r after reconnecting"
    eval "$_reconnect"
    drop_caches
    dd if="$_r" bs=1M count=8 2>/dev/null | cmp -s - pattern || fail "data at offset 0 differs"
    dd if="$_r" bs=1M skip=64 count=8 2>/dev/null | cmp -s - pattern || fail "data at 64 MiB differs"
    dd if="$_r" bs=1M skip=$((_mib - 1)) 2>/dev/null | cmp -s - pattern1 || fail "data in the last MiB differs"
    dd if="$_r" bs=1M skip=32 count=1 2>/dev/null | cmp -s - zero1 || fail "unwritten region at 32 MiB does not read as zeroes"
    log "pattern ok (offset 0, 64 MiB, last MiB; zeroes at 32 MiB)"
}

# check_ext4 DEV: mkfs.ext4, mount, write files, sync, umount, e2fsck -fn
# clean, remount and verify every file's checksum
check_ext4() {
    _dev=$1
    load_crc32c
    load_module ext4
    step "mkfs.ext4 $_dev"
    mkfs.ext4 -q -F "$_dev" || fail "mkfs.ext4 failed"
    step "mount and write files"
    mkdir -p /mnt/t
    mount -t ext4 "$_dev" /mnt/t || fail "mount failed: $(dmesg | tail -n 3)"
    on_exit "umount /mnt/t"
    for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/t/big$i bs=1M count=4 2>/dev/null; done
    mkdir -p /mnt/t/dir/sub
    i=0
    while [ $i -lt 200 ]; do echo "file $i $(date)" >/mnt/t/dir/sub/f$i; i=$((i + 1)); done
    dd if=/dev/urandom of=/mnt/t/dir/odd bs=1000 count=77 2>/dev/null
    _manifest=$PWD/manifest
    (cd /mnt/t && find . -type f | sort | xargs md5sum) >"$_manifest"
    sync
    step "umount and e2fsck -fn"
    umount /mnt/t || fail "umount failed"
    drop_caches
    _rc=0; e2fsck -fn "$_dev" >fsck.log 2>&1 || _rc=$?
    [ "$_rc" = 0 ] || { cat fsck.log; fail "e2fsck -fn reports problems (exit $_rc)"; }
    log "e2fsck: $(tail -n1 fsck.log)"
    step "remount read-only and verify checksums"
    mount -t ext4 -o ro "$_dev" /mnt/t || fail "remount failed"
    (cd /mnt/t && md5sum -c -s "$_manifest") || fail "file checksums differ after remount"
    [ "$(wc -l <manifest)" = 205 ] || fail "expected 205 files, manifest has $(wc -l <manifest)"
    umount /mnt/t
    log "ext4 ok: $(wc -l <manifest) files verified"
}

# ublk_start_writer PAT DEV BASE N: in the background, N O_DIRECT writes of
# PAT (2 MiB: 32 blocks of 64 KiB) to DEV at 64 KiB block BASE, BASE+32, ...,
# each done before the next starts; dd's output goes to ./writer.err
# (emptied first). Sets WRITER (its pid, killed at exit).
ublk_start_writer() {
    : >writer.err
    (
        _i=0
        while [ $_i -lt "$4" ]; do
            dd if="$1" of="$2" bs=64K seek=$(($3 + _i * 32)) oflag=direct 2>>writer.err || exit 1
            _i=$((_i + 1))
        done
    ) &
    WRITER=$!
    on_exit "kill $WRITER"
}
# ublk_check_writer PAT SRC BASE N WHAT: the N blocks ublk_start_writer
# wrote read back from SRC (a block device, read O_DIRECT, or the backing
# file); fails naming WHAT and the block.
ublk_check_writer() {
    _flag=""
    [ -b "$2" ] && _flag=iflag=direct
    _i=0
    while [ $_i -lt "$4" ]; do
        # shellcheck disable=SC2086
        dd if="$2" bs=64K skip=$(($3 + _i * 32)) count=32 $_flag 2>/dev/null | cmp -s - "$1" \
            || fail "$5: the writer's block $_i (at $((($3 + _i * 32) / 16)) MiB of $2) differs"
        _i=$((_i + 1))
    done
}
# --- ublk ----------------------------------------------------------------------
# ublk_attach ARGS...: `ringbd attach ARGS` in the background; returns once
# it printed the block device. Sets UBLK_PID, UBLK_DEV (/dev/ublkbN),
# UBLK_ID; logs in ./attach.out/.err (appended to, so a recovery run keeps
# the first run's log).
ublk_attach() {
    : >attach.out
    ringbd attach "$@" >attach.out 2>>attach.err &
    UBLK_PID=$!
    on_exit "kill $UBLK_PID"
    if ! wait_for 60 test -s attach.out; then
        kill -0 "$UBLK_PID" 2>/dev/null || fail "ringbd attach exited at start: $(tail -n 3 attach.err)"
        fail "ringbd attach printed no device within 60 s: $(tail -n 3 attach.err)"
    fi
    UBLK_DEV=$(head -n1 attach.out)
    UBLK_ID=${UBLK_DEV#/dev/ublkb}
    [ -b "$UBLK_DEV" ] || fail "$UBLK_DEV is not a block device"
    log "ringbd attach $* -> $UBLK_DEV (pid $UBLK_PID)"
}
# ublk_mkfs_counts: ringbd's last request counts (in attach.err, printed
# when the device went away) show that mkfs's discards and write-zeroes and
# flushes reached it and that no request failed
ublk_mkfs_counts() {
    counts=$(grep 'requests (' attach.err | tail -n1)
    log "$counts"
    echo "$counts" | grep -q ' [1-9][0-9]* discards' || fail "mkfs sent no discard through ringbd"
    echo "$counts" | grep -q ' [1-9][0-9]* write-zeroes' || fail "mkfs sent no write-zeroes through ringbd"
    echo "$counts" | grep -q ' [1-9][0-9]* flushes' || fail "no flush reached ringbd"
    echo "$counts" | grep -q ', 0 failed' || fail "requests failed: $counts"
}
# ublk_detach: `ringbd detach` must make the attach process exit 0 and the
# device disappear
ublk_detach() {
    ringbd detach "$UBLK_DEV" || fail "ringbd detach $UBLK_DEV failed"
    _rc=0; wait "$UBLK_PID" || _rc=$?
    [ "$_rc" = 0 ] || fail "ringbd attach exited with status $_rc after detach: $(tail -n 3 attach.err)"
    [ ! -e "$UBLK_DEV" ] || fail "$UBLK_DEV still exists after detach"
    log "$UBLK_DEV detached"
}
# ublk_pattern SIZE_MIB PAT_MIB MID_MIB: O_DIRECT writes to $UBLK_DEV of a
# random PAT_MIB-MiB pattern at 0 (1 MiB requests) and at MID_MIB MiB (64 KiB
# requests), and of its first MiB into the last MiB of the SIZE_MIB-MiB device;
# the first two are read back. Leaves ./pat (the pattern) and ./pat1 (its
# first MiB) for later checks.
ublk_pattern() {
    dd if=/dev/urandom of=pat bs=1M count="$2" 2>/dev/null
    head -c 1048576 pat >pat1
    dd if=pat of="$UBLK_DEV" bs=1M oflag=direct 2>/dev/null || fail "write at 0 failed: $(tail -n 8 attach.err)"
    dd if=pat of="$UBLK_DEV" bs=64K seek=$(($3 * 16)) oflag=direct 2>/dev/null || fail "write at $3 MiB failed"
    dd if=pat1 of="$UBLK_DEV" bs=1M seek=$(($1 - 1)) oflag=direct conv=fsync 2>/dev/null \
        || fail "write in the last MiB failed"
    dd if="$UBLK_DEV" bs=1M count="$2" iflag=direct 2>/dev/null | cmp -s - pat || fail "data at 0 differs"
    dd if="$UBLK_DEV" bs=256K skip=$(($3 * 4)) count=$(($2 * 4)) iflag=direct 2>/dev/null | cmp -s - pat \
        || fail "data at $3 MiB differs"
}
# ublk_kill_inflight: SIGKILL the attach process ($UBLK_PID) at a chosen
# point, with the device's requests in flight, so a recovery test never
# passes with nothing to recover: the server is stopped (SIGSTOP), the
# caller's writer (running) then queues a write that cannot complete,
# and once /sys/block/ublkbN/inflight counts it the server is killed.
# Sets UBLK_KILLED_INFLIGHT ("reads writes" in flight at the kill).
ublk_kill_inflight() {
    _inflight=/sys/block/${UBLK_DEV#/dev/}/inflight
    kill -STOP "$UBLK_PID"
    if ! wait_for 60 sh -c "read _r _w <$_inflight; [ \$_w -gt 0 ]"; then
        kill -CONT "$UBLK_PID"
        fail "no write in flight on $UBLK_DEV within 60 s of stopping its server (inflight: $(cat "$_inflight"))"
    fi
    UBLK_KILLED_INFLIGHT=$(echo $(cat "$_inflight"))
    kill -9 "$UBLK_PID"
    wait "$UBLK_PID" 2>/dev/null || true
    log "killed ringbd attach (pid $UBLK_PID) with requests in flight (reads writes: $UBLK_KILLED_INFLIGHT)"
}
