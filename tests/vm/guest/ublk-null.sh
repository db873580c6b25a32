#!/bin/sh
# The ublk frontend's kernel path with the null target: `ringbd attach
# null:256M` with 4 KiB blocks and two queues makes /dev/ublkbN of the
# configured size and block size (sysfs), each queue's thread is pinned to
# the CPUs blk-mq maps to that queue, dd writes go through and reads
# return zeroes, `ringbd list` shows the device and the driver's features,
# and `ringbd detach` removes it (the attach process exits 0). A second
# device with 512-byte blocks and --size checks the other geometry, and
# SIGTERM tears it down as well.
. /vmtest/lib.sh

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"
ringbd list >list.out || fail "ringbd list failed"
log "$(head -n1 list.out)"

step "attach null:256M, 4 KiB blocks, 2 queues"
ublk_attach null:256M --block-size 4096 --queues 2 --depth 32
b=${UBLK_DEV#/dev/}
[ "$(cat /sys/block/$b/queue/logical_block_size)" = 4096 ] || fail "logical_block_size $(cat /sys/block/$b/queue/logical_block_size), not 4096"
[ "$(cat /sys/block/$b/queue/physical_block_size)" = 4096 ] || fail "physical_block_size is not 4096"
[ "$(cat /sys/block/$b/size)" = 524288 ] || fail "size $(cat /sys/block/$b/size) sectors, not 524288"
[ "$(blockdev --getsize64 "$UBLK_DEV")" = 268435456 ] || fail "$UBLK_DEV is not 256 MiB"
[ "$(ls /sys/block/$b/mq | wc -l)" = 2 ] || fail "expected 2 hardware queues, sysfs has $(ls /sys/block/$b/mq | wc -l)"
log "sysfs: $(cat /sys/block/$b/size) sectors, $(cat /sys/block/$b/queue/logical_block_size)-byte blocks, $(ls /sys/block/$b/mq | wc -l) queues"
for t in /proc/$UBLK_PID/task/*; do
    case $(cat "$t/comm") in
        ublk*q*) echo "$(cat "$t/comm") $(awk '/^Cpus_allowed_list/ {print $2}' "$t/status")" ;;
    esac
done | sort >pins
log "queue threads: $(tr '\n' ' ' <pins)"
[ "$(wc -l <pins)" = 2 ] || fail "expected 2 queue threads, found: $(cat pins)"
[ "$(cut -d' ' -f2 pins | sort -u | wc -l)" = 2 ] || fail "the two queue threads are not pinned to different CPUs: $(cat pins)"
for q in 0 1; do
    want=$(cat /sys/block/$b/mq/$q/cpu_list)
    grep -q "^ublk${UBLK_ID}q$q $want\$" pins || fail "queue $q thread not pinned to its blk-mq CPUs ($want): $(cat pins)"
done

step "dd write and read"
dd if=/dev/urandom of=data bs=1M count=4 2>/dev/null
dd if=data of="$UBLK_DEV" bs=1M oflag=direct conv=fsync 2>/dev/null || fail "dd write failed"
dd if=data of="$UBLK_DEV" bs=4096 seek=65535 count=1 oflag=direct 2>/dev/null || fail "dd write of the last block failed"
head -c 4194304 /dev/zero >zero4
dd if="$UBLK_DEV" bs=1M count=4 iflag=direct 2>/dev/null | cmp -s - zero4 || fail "null reads are not zeroes"
dd if="$UBLK_DEV" of=/dev/null bs=64K count=256 skip=3840 2>/dev/null || fail "reading the last 16 MiB failed"
blkdiscard "$UBLK_DEV" || fail "blkdiscard failed"

step "list"
ringbd list >list.out || fail "ringbd list failed"
cat list.out
grep -q "^$UBLK_ID .*$UBLK_DEV .*live .*268435456 .*4096 .*2 .*32 " list.out || fail "ringbd list does not show $UBLK_DEV as live, 256 MiB, 4096, 2 x 32"

step "detach"
ublk_detach

step "attach null:1G --size 64M, 512-byte blocks; SIGTERM"
ublk_attach null:1G --size 64M --queues 1
b=${UBLK_DEV#/dev/}
[ "$(cat /sys/block/$b/queue/logical_block_size)" = 512 ] || fail "logical_block_size is not 512"
[ "$(blockdev --getsize64 "$UBLK_DEV")" = 67108864 ] || fail "$UBLK_DEV is not 64 MiB"
dd if=data of="$UBLK_DEV" bs=512 count=7 seek=3 2>/dev/null || fail "512-byte dd failed"
sync
kill -TERM "$UBLK_PID"
rc=0; wait "$UBLK_PID" || rc=$?
[ "$rc" = 0 ] || fail "ringbd attach exited with $rc on SIGTERM: $(tail -n 3 attach.err)"
[ ! -e "$UBLK_DEV" ] || fail "$UBLK_DEV still exists after SIGTERM"
[ -z "$(ls /sys/class/ublk-char/ 2>/dev/null)" ] || fail "ublk char devices left: $(ls /sys/class/ublk-char/)"
log "SIGTERM: clean teardown"

step "--no-recovery: the block device goes when the server dies; detach removes the rest"
ublk_attach null:64M --no-recovery --queues 1
ringbd list | grep "^$UBLK_ID " | grep -q USER_RECOVERY && fail "--no-recovery device has USER_RECOVERY: $(ringbd list)"
kill -9 "$UBLK_PID"
wait "$UBLK_PID" 2>/dev/null || true
wait_for 10 sh -c "[ ! -e $UBLK_DEV ]" || fail "$UBLK_DEV still there after its server died"
ringbd list | grep -q "^$UBLK_ID .*dead" || fail "device $UBLK_ID not listed as dead: $(ringbd list)"
ringbd detach "$UBLK_ID" || fail "ringbd detach of a dead device failed"
[ -z "$(ls /sys/class/ublk-char/ 2>/dev/null)" ] || fail "ublk char devices left: $(ls /sys/class/ublk-char/)"
log "no-recovery device removed after its server died"
