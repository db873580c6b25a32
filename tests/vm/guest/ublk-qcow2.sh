#!/bin/sh
# The ublk frontend on a qcow2 image (crates/ringbd-backend/src/qcow2/,
# docs/qcow2.md): `ringbd attach qcow2:disk.qcow2` of an empty image that
# qemu-img made gets an ext4 made, filled, synced, checked with e2fsck and
# verified through /dev/ublkbN, with mkfs's discards and write-zeroes
# reaching ringbd as such (zero clusters and freed clusters). After detach,
# `qemu-img check` finds no errors and no leaks, and the image as qemu
# reads it (converted to raw) is what the device showed, a clean ext4
# image. Then an overlay with that raw copy as its backing file (named
# relatively): writes land in the overlay, the rest reads from the backing
# file, which stays as it was. The overlay is attached with `,direct`, so
# its data clusters go through the queue's ring (the backend's
# asynchronous path; the first image, on the guest's tmpfs, is served by
# calls).
. /vmtest/lib.sh

command -v qemu-img >/dev/null || fail "no qemu-img in the guest (tests/vm/run.sh copies the host's)"

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

step "attach qcow2:disk.qcow2 (64 MiB, empty, 64 KiB clusters)"
qemu-img create -q -f qcow2 -o cluster_size=64k disk.qcow2 64M || fail "qemu-img create failed"
ublk_attach "qcow2:$PWD/disk.qcow2" --queues 2 --depth 32
[ "$(blockdev --getsize64 "$UBLK_DEV")" = 67108864 ] || fail "$UBLK_DEV is not 64 MiB"

check_ext4 "$UBLK_DEV"

step "checksum the device, detach, check the image with qemu-img"
drop_caches
dev_sum=$(md5sum <"$UBLK_DEV" | cut -d' ' -f1)
ublk_detach
ublk_mkfs_counts
_rc=0; qemu-img check disk.qcow2 >check.log 2>&1 || _rc=$?
[ "$_rc" = 0 ] || { cat check.log; fail "qemu-img check of the image ringbd wrote: exit $_rc"; }
log "qemu-img check: $(grep -m1 -i 'no errors' check.log)"
qemu-img convert -f qcow2 -O raw disk.qcow2 disk.raw || fail "qemu-img convert failed"
raw_sum=$(md5sum <disk.raw | cut -d' ' -f1)
[ "$dev_sum" = "$raw_sum" ] || fail "qemu reads md5 $raw_sum from the image, the device showed $dev_sum"
_rc=0; e2fsck -fn disk.raw >fsck-raw.log 2>&1 || _rc=$?
[ "$_rc" = 0 ] || { cat fsck-raw.log; fail "e2fsck -fn of the image as qemu reads it: exit $_rc"; }
log "qemu reads what the device showed (md5 $raw_sum), a clean ext4 image"

step "an overlay on the raw copy: writes stay in the overlay"
mkdir -p over
qemu-img create -q -f qcow2 -o cluster_size=4k -b ../disk.raw -F raw over/top.qcow2 || fail "qemu-img create failed"
ublk_attach "qcow2:$PWD/over/top.qcow2,direct" --queues 1
grep "serving" attach.err | tail -n 1 | grep -q "asynchronous I/O" ||
    fail "the overlay is not served on the queue's ring: $(grep serving attach.err | tail -n 1)"
dd if=/dev/urandom of=pat bs=1M count=2 2>/dev/null
# 2 MiB at 40 MiB and 512 bytes inside a 4 KiB cluster (copy-on-write around them).
dd if=pat of="$UBLK_DEV" bs=1M seek=40 oflag=direct conv=fsync 2>/dev/null || fail "write to the overlay failed: $(tail -n 3 attach.err)"
dd if=pat of="$UBLK_DEV" bs=512 seek=7 count=1 oflag=direct conv=fsync 2>/dev/null || fail "512-byte write failed"
dd if="$UBLK_DEV" bs=1M skip=40 count=2 iflag=direct 2>/dev/null | cmp -s - pat || fail "the overlay's data did not read back"
drop_caches
dd if="$UBLK_DEV" bs=1M count=32 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1 >dev32
dd if=disk.raw bs=1M count=32 2>/dev/null >base32
dd if=pat bs=512 count=1 2>/dev/null | dd of=base32 bs=512 seek=7 conv=notrunc 2>/dev/null
[ "$(cat dev32)" = "$(md5sum <base32 | cut -d' ' -f1)" ] || fail "the first 32 MiB do not read as the backing file with the 512-byte write"
ublk_detach
[ "$(md5sum <disk.raw | cut -d' ' -f1)" = "$raw_sum" ] || fail "the backing file changed"
_rc=0; qemu-img check over/top.qcow2 >check2.log 2>&1 || _rc=$?
[ "$_rc" = 0 ] || { cat check2.log; fail "qemu-img check of the overlay: exit $_rc"; }
qemu-img convert -f qcow2 -O raw over/top.qcow2 top.raw || fail "qemu-img convert of the overlay failed"
dd if=top.raw bs=1M skip=40 count=2 2>/dev/null | cmp -s - pat || fail "qemu does not read the overlay's data"
dd if=top.raw bs=1M count=32 2>/dev/null | cmp -s - base32 || fail "qemu reads the overlay's first 32 MiB differently"
log "overlay ok: $(du -k over/top.qcow2 | cut -f1) KiB for 2 MiB and 512 bytes written"
