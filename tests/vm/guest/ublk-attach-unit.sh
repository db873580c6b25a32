#!/bin/sh
# ringbd-attach@.service's restart story, with the unit's own ExecStart
# program (packaging/attach-or-recover, installed where the package puts
# it) run as systemd runs it with Restart=on-failure: started with
# TARGET, DEVICE_ID and ATTACH_ARGS from the environment (the unit's
# EnvironmentFile), it attaches /dev/ublkbN with that id; when ringbd dies
# (SIGKILL with a write in flight), the same program started again finds
# /dev/ublkcN, says so and recovers the device with --recover; the writer
# finishes without an error and its blocks read back, through the device
# and in the backing file; SIGTERM (systemctl stop) removes the device.
. /vmtest/lib.sh

HELPER=/usr/libexec/ringbd/attach-or-recover
[ -x "$HELPER" ] || fail "$HELPER is not in the test image (tests/vm/run.sh installs it)"

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

truncate -s 64M disk.img
TARGET="file:$PWD/disk.img"
DEVICE_ID=7
ATTACH_ARGS="--queues 1 --depth 16"
export TARGET DEVICE_ID ATTACH_ARGS
dev=/dev/ublkb$DEVICE_ID

# start_unit: the unit's ExecStart, in the background; waits for the device path.
start_unit() {
    : >attach.out
    "$HELPER" >attach.out 2>>attach.err &
    UBLK_PID=$!
    on_exit "kill $UBLK_PID"
    wait_for 60 grep -qx "$dev" attach.out \
        || fail "the unit's program printed no $dev within 60 s: $(cat attach.out) $(tail -n 3 attach.err)"
    UBLK_DEV=$dev
    UBLK_ID=$DEVICE_ID
}

step "first start: attach $TARGET as $dev"
start_unit
grep -q 'recovering' attach.out && fail "the first start recovered: $(cat attach.out)"
grep -q 'USER_RECOVERY' attach.err || fail "device not created with USER_RECOVERY: $(tail -n 2 attach.err)"
dd if=/dev/urandom of=pat bs=1M count=2 2>/dev/null

step "ringbd dies with a write in flight"
ublk_start_writer pat "$dev" 0 12
ublk_kill_inflight
kill -0 "$WRITER" 2>/dev/null || fail "the writer finished before the kill; nothing was in flight"
[ -b "$dev" ] || fail "$dev disappeared when its server died"

step "the restart: the same program recovers $dev"
start_unit
grep -q "ublk device $DEVICE_ID exists: recovering it" attach.out || fail "no recovery said: $(cat attach.out)"
grep -q "ublk device $DEVICE_ID recovered" attach.err || fail "no recovery message: $(tail -n 2 attach.err)"
rc=0; wait "$WRITER" || rc=$?
[ "$rc" = 0 ] || fail "the writer failed across the restart (status $rc): $(tail -n 3 writer.err)"
ublk_check_writer pat "$dev" 0 12 "after the recovery"
log "the writer finished without an error and its 12 blocks read back"

step "systemctl stop (SIGTERM) removes the device"
kill -TERM "$UBLK_PID"
rc=0; wait "$UBLK_PID" || rc=$?
[ "$rc" = 0 ] || fail "ringbd attach exited $rc on SIGTERM: $(tail -n 3 attach.err)"
wait_for 10 sh -c "[ ! -e $dev ]" || fail "$dev still there after SIGTERM"
ublk_check_writer pat disk.img 0 12 "the backing file"
log "device removed; the backing file holds the writer's blocks"
