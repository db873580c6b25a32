#!/bin/sh
# USER_RECOVERY: the process serving /dev/ublkbN is killed with SIGKILL
# while a writer's O_DIRECT writes are in flight (the server is stopped
# first, and killed once the device counts a write in flight); the device
# stays (the driver quiesces it and holds the I/O), `ringbd attach
# --recover N` takes it over, the writer finishes without an error
# (in-flight requests are reissued), and both the data synced before the
# kill and everything the writer wrote read back intact, through the device
# and in the backing file. Three cycles: the first recovers once the
# device reports itself quiesced; the next two start --recover right after
# the kill, racing the driver's quiesce and the old server's release of
# /dev/ublkcN.
. /vmtest/lib.sh

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

step "attach file:disk.img (96 MiB), write and sync a pattern"
truncate -s 96M disk.img
ublk_attach "file:$PWD/disk.img" --queues 2 --depth 16
grep -q 'USER_RECOVERY' attach.err || fail "device not created with USER_RECOVERY: $(tail -n 2 attach.err)"
dd if=/dev/urandom of=synced bs=1M count=4 2>/dev/null
dd if=synced of="$UBLK_DEV" bs=1M conv=fsync 2>/dev/null || fail "writing the synced pattern failed"
dd if=/dev/urandom of=pat bs=1M count=2 2>/dev/null
dev=$UBLK_DEV

# cycle N: 12 x 2 MiB O_DIRECT writes of pat at 8 + 24 * (N - 1) MiB onwards,
# each completed before the next starts; the server dies in the middle
for cycle in 1 2 3; do
    base=$((128 + (cycle - 1) * 384))   # in 64 KiB blocks
    step "cycle $cycle: writer running, SIGKILL the server with a write in flight"
    ublk_start_writer pat "$UBLK_DEV" "$base" 12
    ublk_kill_inflight
    kill -0 "$WRITER" 2>/dev/null || fail "the writer finished before the kill; nothing was in flight"
    [ -b "$UBLK_DEV" ] || fail "$UBLK_DEV disappeared when its server died"
    if [ "$cycle" = 1 ]; then
        wait_for 10 sh -c "ringbd list | grep -q '^$UBLK_ID .*quiesced'" || fail "device not quiesced: $(ringbd list)"
        log "$(ringbd list | grep "^$UBLK_ID ")"
    fi

    step "cycle $cycle: ringbd attach --recover $UBLK_ID"
    : >attach.err
    ublk_attach "file:$PWD/disk.img" --recover "$UBLK_ID"
    [ "$UBLK_DEV" = "$dev" ] || fail "recovered $UBLK_DEV, expected $dev"
    grep -q "ublk device $UBLK_ID recovered" attach.err || fail "no recovery message: $(tail -n 2 attach.err)"
    rc=0; wait "$WRITER" || rc=$?
    [ "$rc" = 0 ] || fail "the writer failed across the restart (status $rc): $(tail -n 3 writer.err)"
    ringbd list | grep -q "^$UBLK_ID .*live" || fail "device not live after recovery: $(ringbd list)"
    ublk_check_writer pat "$UBLK_DEV" "$base" 12 "cycle $cycle, after recovery"
    log "cycle $cycle: the writer finished without an error and its 12 blocks read back"
done

step "data synced before the kills reads back"
dd if="$UBLK_DEV" bs=1M count=4 iflag=direct 2>/dev/null | cmp -s - synced || fail "data synced before the kill differs"
log "all data intact through the device"

step "detach the recovered device; check the backing file"
ublk_detach
dd if=disk.img bs=1M count=4 2>/dev/null | cmp -s - synced || fail "synced data is not in the backing file"
for cycle in 1 2 3; do
    dd if=disk.img bs=1M skip=$((30 + (cycle - 1) * 24)) count=2 2>/dev/null | cmp -s - pat \
        || fail "the writer's last block of cycle $cycle is not in the backing file"
done
log "backing file ok"
