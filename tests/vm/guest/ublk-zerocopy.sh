#!/bin/sh
# ublk zero-copy (UBLK_F_AUTO_BUF_REG, Linux 6.16+; run with VM_KERNEL=new):
# the driver must report AUTO_BUF_REG; `ringbd attach file:...` must create
# the device with it and say "data path: zero-copy"; data written with
# O_DIRECT at 0, 64 MiB and the last MiB reads back through the device
# (O_DIRECT, so through ringbd) and is in the backing file after detach;
# an ext4 made, filled, checked and verified through the device; the device
# and the file have the same md5; and the queue counters printed at teardown
# show the reads and writes were READ_FIXED/WRITE_FIXED operations on the
# requests' own pages ("N zero-copy ops", N > 0) with none failed. Also an
# O_DIRECT file target zero-copy, the same checks with --no-zero-copy (copy
# path, 0 zero-copy ops), a zero-copy device re-attached with --recover after
# its server got SIGKILL mid-write (the writer finishes, its data reads back,
# the new server is zero-copy too), and the null target (copy path by
# design). On a
# kernel without AUTO_BUF_REG (6.12) the test is skipped.
. /vmtest/lib.sh

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"
feat=$(ringbd list | sed -n 's/^# ublk_drv features //p')
log "kernel $(uname -r): ublk_drv features $feat"
case $feat in
    *AUTO_BUF_REG*) ;;
    *) skip "ublk_drv on $(uname -r) does not report AUTO_BUF_REG (6.16+)" ;;
esac

# one_mode NAME ATTACH-FLAGS... : attach file:disk-NAME.img, check mode,
# patterns, ext4, md5, counters
one_mode() {
    _name=$1; shift
    step "[$_name] attach file:disk-$_name.img $*"
    rm -f "disk-$_name.img"
    truncate -s 128M "disk-$_name.img"
    : >attach.err
    ublk_attach "file:$PWD/disk-$_name.img" --queues 2 --depth 32 "$@"
    _mode=$(sed -n 's/^ringbd: ublk device [0-9]* data path: //p' attach.err)
    log "[$_name] data path: $_mode"
    case $_name in
        zc) case $_mode in zero-copy*) ;; *) fail "[$_name] attach did not use zero-copy: $_mode" ;; esac ;;
        copy) case $_mode in "copy (--no-zero-copy)") ;; *) fail "[$_name] expected the copy path: $_mode" ;; esac ;;
    esac
    _devline=$(ringbd list | grep "^$UBLK_ID  *$UBLK_DEV ")
    case $_devline in
        *AUTO_BUF_REG*) _flag=yes ;;
        *) _flag=no ;;
    esac
    log "[$_name] ringbd list: $_devline"
    case $_name in
        zc) [ "$_flag" = yes ] || fail "[$_name] the device was not created with AUTO_BUF_REG" ;;
        copy) [ "$_flag" = no ] || fail "[$_name] the device was created with AUTO_BUF_REG" ;;
    esac

    step "[$_name] O_DIRECT patterns through $UBLK_DEV"
    dd if=/dev/urandom of=pat bs=1M count=4 2>/dev/null
    dd if=pat of="$UBLK_DEV" bs=1M oflag=direct conv=fsync 2>/dev/null || fail "[$_name] write at 0 failed: $(tail -n 3 attach.err)"
    dd if=pat of="$UBLK_DEV" bs=1M seek=64 oflag=direct conv=fsync 2>/dev/null || fail "[$_name] write at 64 MiB failed"
    dd if=pat of="$UBLK_DEV" bs=1M seek=124 oflag=direct conv=fsync 2>/dev/null || fail "[$_name] write in the last MiBs failed"
    # odd-sized, unaligned-in-the-buffer I/O: 3 x 12 KiB at 4 KiB offsets
    dd if=pat of="$UBLK_DEV" bs=12k count=3 seek=1000 oflag=direct conv=fsync 2>/dev/null || fail "[$_name] 12 KiB writes failed"
    for off in 0 64 124; do
        dd if="$UBLK_DEV" bs=1M skip=$off count=4 iflag=direct 2>/dev/null | cmp -s - pat || fail "[$_name] data at $off MiB differs"
    done
    dd if="$UBLK_DEV" bs=12k skip=1000 count=3 iflag=direct 2>/dev/null | cmp -s - "$(head -c 36864 pat >pat36; echo pat36)" || fail "[$_name] 12 KiB blocks differ"
    head -c 1048576 /dev/zero >zero1
    dd if="$UBLK_DEV" bs=1M skip=32 count=1 iflag=direct 2>/dev/null | cmp -s - zero1 || fail "[$_name] unwritten MiB at 32 is not zero"
    ublk_detach
    for off in 0 64 124; do
        dd if="disk-$_name.img" bs=1M skip=$off count=4 2>/dev/null | cmp -s - pat || fail "[$_name] backing file lacks the data at $off MiB"
    done
    log "[$_name] patterns ok, in the backing file too"
    _c1=$(grep 'requests (' attach.err | tail -n1)
    log "[$_name] $_c1"

    step "[$_name] ext4 through the device"
    : >attach.err
    ublk_attach "file:$PWD/disk-$_name.img" --queues 2 --depth 32 "$@"
    check_ext4 "$UBLK_DEV"
    drop_caches
    _dev_sum=$(md5sum <"$UBLK_DEV" | cut -d' ' -f1)
    ublk_detach
    _file_sum=$(md5sum <"disk-$_name.img" | cut -d' ' -f1)
    [ "$_dev_sum" = "$_file_sum" ] || fail "[$_name] backing file md5 $_file_sum differs from the device's $_dev_sum"
    _rc=0; e2fsck -fn "disk-$_name.img" >fsck-file.log 2>&1 || _rc=$?
    [ "$_rc" = 0 ] || { cat fsck-file.log; fail "[$_name] e2fsck -fn of the backing file reports problems (exit $_rc)"; }
    _c2=$(grep 'requests (' attach.err | tail -n1)
    log "[$_name] $_c2"
    for _c in "$_c1" "$_c2"; do
        echo "$_c" | grep -q ', 0 failed' || fail "[$_name] requests failed: $_c"
        _zc=$(echo "$_c" | sed -n 's/.* \([0-9][0-9]*\) zero-copy ops.*/\1/p')
        _rw=$(echo "$_c" | sed -n 's/.*(\([0-9][0-9]*\) reads, \([0-9][0-9]*\) writes.*/\1 \2/p')
        [ -n "$_zc" ] || fail "[$_name] no zero-copy counter in: $_c"
        case $_name in
            zc|direct) [ "$_zc" -gt 0 ] || fail "[$_name] no READ_FIXED/WRITE_FIXED ops: $_c" ;;
            copy) [ "$_zc" = 0 ] || fail "[$_name] zero-copy ops on the copy path: $_c" ;;
        esac
        log "[$_name] reads, writes: $_rw; zero-copy ops: $_zc"
    done
    rm -f "disk-$_name.img"
}

one_mode zc
one_mode copy --no-zero-copy

step "[direct] O_DIRECT file target, zero-copy"
if dd if=/dev/zero of=odirect-probe bs=4096 count=1 oflag=direct 2>/dev/null; then
    truncate -s 64M disk-direct.img
    : >attach.err
    ublk_attach "file:$PWD/disk-direct.img,direct" --block-size 4096 --queues 1
    grep -q 'data path: zero-copy' attach.err || fail "[direct] not zero-copy: $(grep 'data path' attach.err)"
    dd if=pat of="$UBLK_DEV" bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null || fail "[direct] write failed: $(tail -n 3 attach.err)"
    dd if="$UBLK_DEV" bs=1M skip=8 count=4 iflag=direct 2>/dev/null | cmp -s - pat || fail "[direct] data differs"
    ublk_detach
    dd if=disk-direct.img bs=1M skip=8 count=4 2>/dev/null | cmp -s - pat || fail "[direct] backing file lacks the data"
    _c=$(grep 'requests (' attach.err | tail -n1)
    echo "$_c" | grep -q ', 0 failed' || fail "[direct] requests failed: $_c"
    echo "$_c" | grep -q ' [1-9][0-9]* zero-copy ops' || fail "[direct] no zero-copy ops: $_c"
    log "[direct] $_c"
else
    log "[direct] the guest's /tmp has no O_DIRECT; not tried"
fi

step "[recover] a zero-copy device survives SIGKILL of its server (USER_RECOVERY)"
truncate -s 64M disk-rec.img
: >attach.err
ublk_attach "file:$PWD/disk-rec.img" --queues 1 --depth 16
grep -q 'data path: zero-copy' attach.err || fail "[recover] not zero-copy: $(grep 'data path' attach.err)"
dd if=/dev/urandom of=pat2 bs=1M count=2 2>/dev/null
ublk_start_writer pat2 "$UBLK_DEV" 128 12
ublk_kill_inflight
kill -0 "$WRITER" 2>/dev/null || fail "[recover] the writer finished before the kill; nothing was in flight"
dev=$UBLK_DEV
: >attach.err
ublk_attach "file:$PWD/disk-rec.img" --recover "$UBLK_ID"
[ "$UBLK_DEV" = "$dev" ] || fail "[recover] recovered $UBLK_DEV, expected $dev"
grep -q 'data path: zero-copy' attach.err || fail "[recover] recovered device not zero-copy: $(grep 'data path' attach.err)"
rc=0; wait "$WRITER" || rc=$?
[ "$rc" = 0 ] || fail "[recover] the writer failed across the restart (status $rc): $(tail -n 3 writer.err)"
ublk_check_writer pat2 "$UBLK_DEV" 128 12 "[recover] after recovery"
ublk_detach
dd if=disk-rec.img bs=1M skip=30 count=2 2>/dev/null | cmp -s - pat2 || fail "[recover] the writer's last block is not in the backing file"
log "[recover] $(grep 'requests (' attach.err | tail -n1)"
grep 'requests (' attach.err | tail -n1 | grep -q ' [1-9][0-9]* zero-copy ops' || fail "[recover] no zero-copy ops after recovery"

step "[null] the null target keeps the copy path"
: >attach.err
ublk_attach null:64M --queues 1
grep -q 'data path: copy (this target cannot use' attach.err || fail "[null] unexpected: $(grep 'data path' attach.err)"
dd if="$UBLK_DEV" bs=1M count=1 iflag=direct 2>/dev/null | cmp -s - zero1 || fail "[null] does not read zeroes"
ublk_detach
log "zero-copy verified (see the counters above)"
