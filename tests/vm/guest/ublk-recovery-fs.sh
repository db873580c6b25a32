#!/bin/sh
# USER_RECOVERY under a mounted filesystem: ext4 on a ublk file target, a
# writer creating files and syncing, the server killed with SIGKILL in the
# middle and re-attached with `ringbd attach --recover`. A write issued
# while no server runs blocks in the kernel (checked) and completes after
# the recovery. The filesystem must not see an error (no I/O or ext4 errors
# in the kernel log, the writers finish), and after umount e2fsck is clean
# and every file's checksum verifies after a remount.
. /vmtest/lib.sh

step "load modules, attach file:disk.img (128 MiB)"
load_module ublk_drv
load_crc32c
load_module ext4
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"
truncate -s 128M disk.img
ublk_attach "file:$PWD/disk.img" --queues 2 --depth 16 --block-size 4096

step "mkfs.ext4 and mount"
mkfs.ext4 -q -F "$UBLK_DEV" || fail "mkfs.ext4 failed"
mkdir -p /mnt/r
mount -t ext4 "$UBLK_DEV" /mnt/r || fail "mount failed: $(dmesg | tail -n 3)"
on_exit "umount /mnt/r"
dmesg -c >/dev/null

step "writer in the filesystem; SIGKILL the server"
dd if=/dev/urandom of=blob bs=64K count=16 2>/dev/null
(
    i=0
    while [ $i -lt 40 ]; do
        cp blob /mnt/r/f$i || exit 1
        [ $((i % 4)) = 3 ] && { sync || exit 2; }
        i=$((i + 1))
    done
    sync || exit 3
) >writer.log 2>&1 &
writer=$!
on_exit "kill $writer"
wait_for 30 test -e /mnt/r/f6 || fail "the writer made no progress"
ublk_kill_inflight
kill -0 "$writer" 2>/dev/null || fail "the writer finished before the kill"
# Nothing here may touch /mnt/r until --recover: I/O to the device waits
# for a new server, so a command that reads the filesystem can block
# (an `ls` that updates atime waits for the journal, whose commit waits
# for the writes the dead server left queued). An `ls` in this log line
# hung half the CI runs (docs/ublk.md, "Recovery").

step "I/O issued while the server is down waits for the recovery"
wait_for 10 sh -c "ringbd list | grep -q '^$UBLK_ID .*quiesced'" || fail "device not quiesced: $(ringbd list)"
# an fsync'd file: its write and flush can only complete on a new server
dd if=blob of=/mnt/r/during bs=64K conv=fsync 2>during.err &
during=$!
on_exit "kill $during"
wait_for 30 grep -q '^State:.*D' "/proc/$during/status" \
    || fail "the write during the outage never blocked in the kernel: $(cat during.err)"
log "a write during the outage is blocked in the kernel (pid $during, $(cat "/proc/$during/wchan"))"

step "ringbd attach --recover $UBLK_ID"
kill -0 "$during" 2>/dev/null || fail "the write during the outage ended before the recovery: $(cat during.err)"
ublk_attach "file:$PWD/disk.img" --recover "$UBLK_ID"
rc=0; wait "$during" || rc=$?
[ "$rc" = 0 ] || fail "the write issued during the outage failed (status $rc): $(cat during.err)"
rc=0; wait "$writer" || rc=$?
[ "$rc" = 0 ] || fail "the writer failed across the restart (status $rc): $(cat writer.log)"
[ "$(ls /mnt/r | grep -c '^f')" = 40 ] || fail "expected 40 files, have $(ls /mnt/r | grep -c '^f')"
if dmesg | grep -iE 'I/O error|EXT4-fs error|EXT4-fs warning|blk_update_request'; then
    fail "the kernel logged errors across the restart"
fi
log "writer and the write during the outage done, no I/O or ext4 errors in the kernel log"

step "umount, e2fsck, remount and verify"
umount /mnt/r
drop_caches
_rc=0; e2fsck -fn "$UBLK_DEV" >fsck.log 2>&1 || _rc=$?
[ "$_rc" = 0 ] || { cat fsck.log; fail "e2fsck -fn reports problems (exit $_rc)"; }
mount -t ext4 -o ro "$UBLK_DEV" /mnt/r || fail "remount failed"
want=$(md5sum <blob | cut -d' ' -f1)
i=0
while [ $i -lt 40 ]; do
    [ "$(md5sum </mnt/r/f$i | cut -d' ' -f1)" = "$want" ] || fail "file f$i differs after recovery"
    i=$((i + 1))
done
cmp -s blob /mnt/r/during || fail "the file written during the outage differs after recovery"
umount /mnt/r
log "e2fsck clean, 40 files and the one written during the outage verified"
ublk_detach
