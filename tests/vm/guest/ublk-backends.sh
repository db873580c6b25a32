#!/bin/sh
# The export backends of `ringbd serve` that answer from memory, through
# ublk (crates/ringbd-ublk/src/backend/inline.rs; files: ublk-file, NBD
# exports: ublk-nbd*): `ringbd attach memory:256M` gets an
# ext4 made, filled, synced, checked with e2fsck and verified, with mkfs's
# discards, write-zeroes and flushes reaching ringbd and none failing; the
# memory device is made without USER_RECOVERY (its data dies with the
# process: when the server is killed the device goes) and `--recover` of a
# memory export is refused. A fault export's injected errors reach the
# writer and the reader with their errno (ENOSPC, EIO) while the other
# direction keeps working.
. /vmtest/lib.sh

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

step "attach memory:256M"
ublk_attach memory:256M --queues 2 --depth 32
[ "$(blockdev --getsize64 "$UBLK_DEV")" = 268435456 ] || fail "$UBLK_DEV is not 256 MiB"
ringbd list | grep "^$UBLK_ID " | grep -q USER_RECOVERY && fail "a memory device has USER_RECOVERY: $(ringbd list)"

check_ext4 "$UBLK_DEV"

step "the memory device's counters"
ublk_detach
ublk_mkfs_counts

step "a killed memory server takes its device with it; --recover is refused"
ublk_attach memory:64M --queues 1
dd if=/dev/urandom of="$UBLK_DEV" bs=1M count=1 oflag=direct 2>/dev/null || fail "write failed"
kill -9 "$UBLK_PID"
wait "$UBLK_PID" 2>/dev/null || true
wait_for 10 sh -c "[ ! -e $UBLK_DEV ]" || fail "$UBLK_DEV still there after its memory server died"
rc=0; ringbd attach memory:64M --recover "$UBLK_ID" >recover.out 2>recover.err || rc=$?
[ "$rc" != 0 ] || fail "--recover of a memory export succeeded"
grep -q 'starts empty' recover.err || fail "--recover was not refused with the reason: $(cat recover.err)"
[ ! -s recover.out ] || fail "--recover printed a device: $(cat recover.out)"
log "refused: $(cat recover.err)"
ringbd detach "$UBLK_ID" || fail "ringbd detach of the dead device failed"

step "fault: ENOSPC on writes reaches the writer; reads go on"
ublk_attach "fault:write=1@ENOSPC:memory:64M" --queues 1
dd if="$UBLK_DEV" of=/dev/null bs=1M count=4 iflag=direct 2>dd.err || fail "reads failed: $(cat dd.err)"
rc=0; dd if=/dev/zero of="$UBLK_DEV" bs=1M count=1 oflag=direct 2>dd.err || rc=$?
[ "$rc" != 0 ] || fail "a write the fault export fails succeeded"
grep -qi 'no space left' dd.err || fail "the writer did not see ENOSPC: $(cat dd.err)"
grep -q 'No space left on device' attach.err || fail "ringbd did not log the ENOSPC: $(tail -n 3 attach.err)"
log "writer: $(grep -i 'space' dd.err | head -n1)"
log "$(grep -m1 'No space left' attach.err)"
ublk_detach

step "fault: EIO on reads reaches the reader; writes go on"
ublk_attach "fault:read=1@EIO:memory:64M" --queues 1
dd if=/dev/zero of="$UBLK_DEV" bs=1M count=1 oflag=direct 2>dd.err || fail "writes failed: $(cat dd.err)"
rc=0; dd if="$UBLK_DEV" of=/dev/null bs=4k count=1 iflag=direct 2>dd.err || rc=$?
[ "$rc" != 0 ] || fail "a read the fault export fails succeeded"
grep -qi 'input/output error' dd.err || fail "the reader did not see EIO: $(cat dd.err)"
log "reader: $(grep -i 'error' dd.err | head -n1)"
ublk_detach
