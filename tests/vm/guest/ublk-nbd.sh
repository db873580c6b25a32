#!/bin/sh
# The ublk frontend on the NBD-client backend (the one `ringbd serve
# nbd://...` proxies with) against `ringbd serve` in the same VM:
# `ringbd attach nbd+unix:///disk?socket=...` on a memory: export, the
# backend's 4 connections (the export has multi-conn); a pattern written with O_DIRECT reads back, also
# through a second attach over TCP (`nbd://127.0.0.1:PORT/disk`, so it went
# through the server, not a cache);
# mkfs.ext4, mount, files, umount, e2fsck clean; flushes, discards and
# write-zeroes reached ringbd as such. A read-only export gives a read-only
# device. Then reconnect: a file: export's
# server is killed with SIGKILL while a writer runs and started again on the
# same socket; the writer finishes without an error and every block reads
# back, through the device and in the file. The attach process itself
# killed mid-write and restarted with --recover (new connections): the
# writer finishes, its data reads back. Last, a server that does not come
# back: the writer gets EIO after the reconnect window (10 s here, the
# recovered attach's `reconnect-delay=10`; 30 s by default), nothing hangs.
. /vmtest/lib.sh

conns() { grep -c 'export "disk"' ringbd.err || true; }

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

step "serve memory:256M on a unix socket and TCP; attach it with 2 queues"
ringbd_start --export disk=memory:256M --unix "$PWD/mem.sock" --listen 127.0.0.1:10811 --verbose
uri="nbd+unix:///disk?socket=$PWD/mem.sock"
ublk_attach "$uri" --queues 2 --depth 32
[ "$(blockdev --getsize64 "$UBLK_DEV")" = 268435456 ] || fail "$UBLK_DEV is not 256 MiB"
b=${UBLK_DEV#/dev/}
log "logical block size $(cat /sys/block/$b/queue/logical_block_size), max_sectors_kb $(cat /sys/block/$b/queue/max_sectors_kb), write cache: $(cat /sys/block/$b/queue/write_cache)"
wait_for 10 sh -c '[ "$(grep -c "export \"disk\"" ringbd.err)" -ge 4 ]' \
    || fail "ringbd saw $(conns) connection(s), expected the backend's 4 (multi-conn): $(tail -n 5 ringbd.err)"
log "ringbd saw $(conns) connections"

step "pattern: O_DIRECT writes at 0, 100 MiB and the last MiB"
ublk_pattern 256 8 100
# A queue that got requests runs the NBD client on its own thread, with a
# connection of its own beside the backend's 4 (crates/ringbd-backend/src/nbd/local.rs).
wait_for 10 sh -c '[ "$(grep -c "export \"disk\"" ringbd.err)" -ge 5 ]' \
    || fail "no queue opened a connection of its own: ringbd saw $(conns) connection(s)"
log "ringbd saw $(conns) connections after the writes"
head -c 1048576 /dev/zero >zero1

step "pattern: read back through a fresh attach, over TCP"
ublk_detach
ublk_attach "nbd://127.0.0.1:10811/disk" --queues 1
dd if="$UBLK_DEV" bs=1M count=8 iflag=direct 2>/dev/null | cmp -s - pat || fail "data at 0 differs after re-attach"
dd if="$UBLK_DEV" bs=1M skip=100 count=8 iflag=direct 2>/dev/null | cmp -s - pat || fail "data at 100 MiB differs after re-attach"
dd if="$UBLK_DEV" bs=1M skip=255 iflag=direct 2>/dev/null | cmp -s - pat1 || fail "data in the last MiB differs after re-attach"
dd if="$UBLK_DEV" bs=1M skip=32 count=1 iflag=direct 2>/dev/null | cmp -s - zero1 || fail "unwritten 32 MiB does not read as zeroes"
log "pattern ok (0, 100 MiB, last MiB; zeroes at 32 MiB)"

check_ext4 "$UBLK_DEV"

step "detach; flushes, discards and write-zeroes reached ringbd"
ublk_detach
ublk_mkfs_counts
ringbd_stop

step "a read-only export makes a read-only device"
ringbd_start --read-only --unix "$PWD/ro.sock" memory:16M
ublk_attach "nbd+unix:///?socket=$PWD/ro.sock" --queues 1
[ "$(cat /sys/block/${UBLK_DEV#/dev/}/ro)" = 1 ] || fail "$UBLK_DEV is not read-only in sysfs"
! dd if=pat1 of="$UBLK_DEV" bs=1M count=1 oflag=direct 2>/dev/null || fail "a write to the read-only device succeeded"
dd if="$UBLK_DEV" bs=1M count=1 iflag=direct 2>/dev/null | cmp -s - zero1 || fail "reading the read-only device failed"
ublk_detach
ringbd_stop
log "read-only ok"

step "reconnect: serve file:disk.img, attach, writer running, SIGKILL the server"
truncate -s 64M disk.img
ringbd_start --unix "$PWD/file.sock" "file:$PWD/disk.img"
ublk_attach "nbd+unix:///?socket=$PWD/file.sock" --queues 2 --depth 16
dd if=/dev/urandom of=pat2 bs=1M count=2 2>/dev/null
# 12 x 2 MiB O_DIRECT writes at 8, 10, ... 30 MiB, one after the other.
ublk_start_writer pat2 "$UBLK_DEV" 128 12
wait_for 30 test -s writer.err || true   # first dd done
old=$RINGBD_PID
kill -9 "$old"
wait "$old" 2>/dev/null || true
kill -0 "$WRITER" 2>/dev/null || fail "the writer finished before the kill; nothing was in flight"
log "killed ringbd serve (pid $old) with the writer still running"
sleep 1
ringbd_start --unix "$PWD/file.sock" "file:$PWD/disk.img"
rc=0; wait "$WRITER" || rc=$?
[ "$rc" = 0 ] || fail "the writer failed across the server restart (status $rc): $(tail -n 3 writer.err); $(tail -n 3 attach.err)"
log "writer finished without an error"
grep -q 'the upstream failed' attach.err || fail "ringbd attach did not notice the lost connection"
grep -q 'reconnected' attach.err || fail "ringbd attach did not reconnect: $(tail -n 3 attach.err)"
grep -E 'the upstream failed|reconnected' attach.err | while read -r l; do log "$l"; done

step "reconnect: every block reads back, through the device and in the file"
ublk_check_writer pat2 "$UBLK_DEV" 128 12 "after the reconnect"
ublk_detach
ublk_check_writer pat2 disk.img 128 12 "the backing file"
log "all 12 blocks intact"

step "USER_RECOVERY of an NBD export: SIGKILL the attach process, --recover"
ublk_attach "nbd+unix:///?socket=$PWD/file.sock" --queues 2 --depth 16
ublk_start_writer pat2 "$UBLK_DEV" 640 8
ublk_kill_inflight
kill -0 "$WRITER" 2>/dev/null || fail "the writer finished before the kill; nothing was in flight"
wait_for 10 sh -c "ringbd list | grep -q '^$UBLK_ID .*quiesced'" || fail "device not quiesced: $(ringbd list)"
dev=$UBLK_DEV
# A shorter reconnect window than the default 30 s for the last step.
ublk_attach "nbd+unix:///?socket=$PWD/file.sock&reconnect-delay=10" --recover "$UBLK_ID"
[ "$UBLK_DEV" = "$dev" ] || fail "recovered $UBLK_DEV, expected $dev"
rc=0; wait "$WRITER" || rc=$?
[ "$rc" = 0 ] || fail "the writer failed across the recovery (status $rc): $(tail -n 3 writer.err)"
ublk_check_writer pat2 "$UBLK_DEV" 640 8 "after the recovery"
log "recovered $UBLK_DEV over new connections; the writer finished and its 8 blocks read back"

step "a server that does not come back: EIO after the 10 s reconnect window"
kill -9 "$RINGBD_PID"
wait "$RINGBD_PID" 2>/dev/null || true
t0=$(cut -d' ' -f1 /proc/uptime)
rc=0; dd if=pat2 of="$UBLK_DEV" bs=64K count=4 oflag=direct 2>dd.err || rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
[ "$rc" != 0 ] || fail "a write with no server succeeded"
grep -qi 'i/o error\|input/output' dd.err || fail "the writer did not see EIO: $(cat dd.err)"
grep -q 'no upstream for 10 s' attach.err || fail "ringbd attach did not give up: $(tail -n 3 attach.err)"
log "writer failed after $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s: $(head -n1 dd.err)"
log "$(grep -m1 'no upstream for' attach.err)"
ublk_detach
