#!/bin/sh
# USER_RECOVERY: the process serving /dev/ublkbN is killed with SIGKILL
# while a writer is in the middle of O_DIRECT writes; the device stays (the
# driver quiesces it and holds the I/O), `ringbd attach --recover N` takes
# it over, the writer finishes without an error (in-flight requests are
# reissued), and both the data synced before the kill and everything the
# writer wrote read back intact, through the device and in the backing file.
. /vmtest/lib.sh

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

step "attach file:disk.img (64 MiB), write and sync a pattern"
truncate -s 64M disk.img
ublk_attach "file:$PWD/disk.img" --queues 2 --depth 16
grep -q 'USER_RECOVERY' attach.err || fail "device not created with USER_RECOVERY: $(tail -n 2 attach.err)"
dd if=/dev/urandom of=synced bs=1M count=4 2>/dev/null
dd if=synced of="$UBLK_DEV" bs=1M conv=fsync 2>/dev/null || fail "writing the synced pattern failed"
dd if=/dev/urandom of=pat bs=1M count=2 2>/dev/null

step "writer running, SIGKILL the server"
# 12 x 2 MiB O_DIRECT writes at 8, 10, ... 30 MiB, each completed before
# the next starts; the server dies somewhere in the middle.
(
    i=0
    while [ $i -lt 12 ]; do
        dd if=pat of="$UBLK_DEV" bs=64K seek=$((128 + i * 32)) oflag=direct 2>>writer.err || exit 1
        i=$((i + 1))
    done
) &
writer=$!
on_exit "kill $writer"
wait_for 30 test -s writer.err || true   # first dd done (busybox dd prints its record counts)
old=$UBLK_PID
kill -9 "$old"
wait "$old" 2>/dev/null || true
kill -0 "$writer" 2>/dev/null || fail "the writer finished before the kill; nothing was in flight"
log "killed ringbd (pid $old) with the writer still running"
[ -b "$UBLK_DEV" ] || fail "$UBLK_DEV disappeared when its server died"
wait_for 10 sh -c "ringbd list | grep -q '^$UBLK_ID .*quiesced'" || fail "device not quiesced: $(ringbd list)"
log "$(ringbd list | grep "^$UBLK_ID ")"

step "ringbd attach --recover $UBLK_ID"
dev=$UBLK_DEV
ublk_attach "file:$PWD/disk.img" --recover "$UBLK_ID"
[ "$UBLK_DEV" = "$dev" ] || fail "recovered $UBLK_DEV, expected $dev"
grep -q "ublk device $UBLK_ID recovered" attach.err || fail "no recovery message: $(tail -n 2 attach.err)"
rc=0; wait "$writer" || rc=$?
[ "$rc" = 0 ] || fail "the writer failed across the restart (status $rc): $(tail -n 3 writer.err)"
log "writer finished without an error"
ringbd list | grep -q "^$UBLK_ID .*live" || fail "device not live after recovery: $(ringbd list)"

step "data synced before the kill and written across it reads back"
dd if="$UBLK_DEV" bs=1M count=4 iflag=direct 2>/dev/null | cmp -s - synced || fail "data synced before the kill differs"
i=0
while [ $i -lt 12 ]; do
    dd if="$UBLK_DEV" bs=64K skip=$((128 + i * 32)) count=32 iflag=direct 2>/dev/null | cmp -s - pat \
        || fail "writer's block $i (at $((8 + i * 2)) MiB) differs after recovery"
    i=$((i + 1))
done
log "all data intact through the device"

step "detach the recovered device; check the backing file"
ublk_detach
dd if=disk.img bs=1M count=4 2>/dev/null | cmp -s - synced || fail "synced data is not in the backing file"
dd if=disk.img bs=1M skip=30 count=2 2>/dev/null | cmp -s - pat || fail "the writer's last block is not in the backing file"
log "backing file ok"
