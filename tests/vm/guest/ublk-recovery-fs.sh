#!/bin/sh
# USER_RECOVERY under a mounted filesystem: ext4 on a ublk file target, a
# writer creating files and syncing, the server killed with SIGKILL in the
# middle and re-attached with `ringbd attach --recover`. The filesystem must
# not see an error (no I/O or ext4 errors in the kernel log, the writer
# finishes), and after umount e2fsck is clean and every file's checksum
# verifies after a remount.
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
old=$UBLK_PID
kill -9 "$old"
wait "$old" 2>/dev/null || true
kill -0 "$writer" 2>/dev/null || fail "the writer finished before the kill"
log "killed ringbd (pid $old) while the writer was at $(ls /mnt/r | wc -l) files"

step "ringbd attach --recover $UBLK_ID"
ublk_attach "file:$PWD/disk.img" --recover "$UBLK_ID"
rc=0; wait "$writer" || rc=$?
[ "$rc" = 0 ] || fail "the writer failed across the restart (status $rc): $(cat writer.log)"
[ "$(ls /mnt/r | grep -c '^f')" = 40 ] || fail "expected 40 files, have $(ls /mnt/r | grep -c '^f')"
if dmesg | grep -iE 'I/O error|EXT4-fs error|EXT4-fs warning|blk_update_request'; then
    fail "the kernel logged errors across the restart"
fi
log "writer done, no I/O or ext4 errors in the kernel log"

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
umount /mnt/r
log "e2fsck clean, 40 files verified"
ublk_detach
