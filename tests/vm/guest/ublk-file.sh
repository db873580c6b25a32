#!/bin/sh
# The ublk frontend on the file backend (its reads, writes, flushes and
# fallocates as operations on the queue's ring): `ringbd attach file:disk.img`
# (on the guest's tmpfs) gets an ext4 made, filled, synced, unmounted,
# checked with e2fsck and verified through /dev/ublkbN; after detach the
# backing file itself must hold exactly what the device showed (same
# checksum) and be a clean ext4 image; mkfs's discards and write-zeroes
# (its journal) must have reached ringbd as such. Then discard (punched
# holes read back as zeroes, in the file too), an O_DIRECT attach with
# 4 KiB blocks whose writes land in the file, a --read-only attach, and
# ENOSPC from a file on a full filesystem reaching the writer.
. /vmtest/lib.sh

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

step "attach file:disk.img (128 MiB sparse file)"
truncate -s 128M disk.img
ublk_attach "file:$PWD/disk.img" --queues 2 --depth 32
[ "$(blockdev --getsize64 "$UBLK_DEV")" = 134217728 ] || fail "$UBLK_DEV is not 128 MiB"

check_ext4 "$UBLK_DEV"

step "checksum the device, detach, compare with the backing file"
drop_caches
dev_sum=$(md5sum <"$UBLK_DEV" | cut -d' ' -f1)
ublk_detach
file_sum=$(md5sum <disk.img | cut -d' ' -f1)
[ "$dev_sum" = "$file_sum" ] || fail "backing file md5 $file_sum differs from the device's $dev_sum"
_rc=0; e2fsck -fn disk.img >fsck-file.log 2>&1 || _rc=$?
[ "$_rc" = 0 ] || { cat fsck-file.log; fail "e2fsck -fn of the backing file reports problems (exit $_rc)"; }
log "backing file matches the device (md5 $file_sum) and is a clean ext4 image"
ublk_mkfs_counts

step "discard through the device reaches the file"
ublk_attach "file:$PWD/disk.img" --queues 1
dd if=/dev/urandom of=pat bs=1M count=2 2>/dev/null
head -c 2097152 /dev/zero >zero2
dd if=pat of="$UBLK_DEV" bs=1M seek=100 oflag=direct conv=fsync 2>/dev/null
dd if=pat of="$UBLK_DEV" bs=1M seek=110 oflag=direct conv=fsync 2>/dev/null
dd if="$UBLK_DEV" bs=1M skip=100 count=2 iflag=direct 2>/dev/null | cmp -s - pat || fail "pattern at 100 MiB did not read back"
blkdiscard -o $((100 << 20)) -l $((2 << 20)) "$UBLK_DEV" || fail "blkdiscard failed: $(tail -n 3 attach.err)"
dd if="$UBLK_DEV" bs=1M skip=100 count=2 iflag=direct 2>/dev/null | cmp -s - zero2 || fail "discarded range does not read as zeroes"
ublk_detach
dd if=disk.img bs=1M skip=100 count=2 2>/dev/null | cmp -s - zero2 || fail "discarded range is not zero in the backing file"
dd if=disk.img bs=1M skip=110 count=2 2>/dev/null | cmp -s - pat || fail "the pattern at 110 MiB is not in the backing file"
log "discard ok"

step "O_DIRECT target, 4 KiB blocks"
if dd if=/dev/zero of=odirect-probe bs=4096 count=1 oflag=direct 2>/dev/null; then
    ublk_attach "file:$PWD/disk.img,direct" --block-size 4096 --queues 1
    b=${UBLK_DEV#/dev/}
    [ "$(cat /sys/block/$b/queue/logical_block_size)" = 4096 ] || fail "logical_block_size is not 4096"
    dd if=pat of="$UBLK_DEV" bs=1M seek=120 conv=fsync 2>/dev/null || fail "dd to the O_DIRECT target failed: $(tail -n 3 attach.err)"
    ublk_detach
    dd if=disk.img bs=1M skip=120 count=2 2>/dev/null | cmp -s - pat || fail "data written through the O_DIRECT target is not in the file"
    log "O_DIRECT target ok"
else
    log "this tmpfs refuses O_DIRECT; skipping the direct part"
fi

step "--read-only: the kernel refuses writes, reads work"
ublk_attach "file:$PWD/disk.img" --read-only --queues 1
[ "$(cat /sys/block/${UBLK_DEV#/dev/}/ro)" = 1 ] || fail "$UBLK_DEV is not read-only in sysfs"
! dd if=pat of="$UBLK_DEV" bs=1M count=1 oflag=direct 2>/dev/null || fail "a write to the read-only device succeeded"
dd if="$UBLK_DEV" bs=1M skip=110 count=2 iflag=direct 2>/dev/null | cmp -s - pat || fail "reading the read-only device failed"
ublk_detach
head -c 1048576 pat >pat1
dd if=disk.img bs=1M count=1 2>/dev/null | cmp -s - pat1 && fail "the refused write reached the file"
log "read-only ok"

step "target errors reach the writer as their errno (ENOSPC from a full tmpfs)"
mkdir -p small && mount -t tmpfs -o size=2M tmpfs small
on_exit "umount $PWD/small"
truncate -s 16M small/disk.img
ublk_attach "file:$PWD/small/disk.img" --queues 1
rc=0; dd if=/dev/zero of="$UBLK_DEV" bs=1M count=4 seek=4 oflag=direct 2>dd.err || rc=$?
[ "$rc" != 0 ] || fail "writing 4 MiB into a 2 MiB tmpfs succeeded"
grep -qi 'no space left' dd.err || fail "the writer did not see ENOSPC: $(cat dd.err)"
grep -q 'No space left on device' attach.err || fail "ringbd did not log the ENOSPC: $(tail -n 3 attach.err)"
log "writer: $(grep -i 'space' dd.err | head -n1)"
log "$(grep -m1 'No space left' attach.err)"
ublk_detach
