#!/bin/sh
# Guest side of the power-cut test; tests/vm/host/powercut.sh boots the VM
# once per cycle with the same two virtual disks, whose unflushed writes
# the host loses at the cut, and says on the kernel command line what this
# boot does. Two lanes run side by side, each ext4 on /dev/nbdN through its
# own `ringbd serve`:
#   lane a, /dev/vda: ringbd serve file:/dev/vda (pc_mode=buffered) or
#       file:/dev/vda,direct (pc_mode=direct): must lose nothing;
#   lane b, /dev/vdb: the negative control, ringbd serve
#       fault:flush=ignore:file:/dev/vdb,direct, which acknowledges FLUSH
#       and FUA without doing them: must lose acknowledged files, else the
#       test could not see a missing flush.
# pc_check_a=C:N,... / pc_check_b=...: first verify, through the ringbd
# of this boot's mode, that files f1..fN of cycle C (each one acknowledged:
# its fsync returned) are there, whole, after the journal replay, and
# e2fsck is clean; then (pc_mode not none) cycle pc_boot: in each lane write and fsync files one after the other,
# each followed by `POWERCUT ACK LANE CYCLE I end` on the console, until the
# host kills qemu.
. /vmtest/lib.sh

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }
BOOT=$(arg pc_boot) MODE=$(arg pc_mode)
[ -n "$BOOT" ] && [ -n "$MODE" ] || skip "the host side (tests/vm/host/powercut.sh) runs this test"

# lane L: its disk, port and NBD device
disk() { [ "$1" = a ] && echo /dev/vda || echo /dev/vdb; }
port() { [ "$1" = a ] && echo 10820 || echo 10821; }
nbd() { [ "$1" = a ] && echo /dev/nbd0 || echo /dev/nbd1; }
# The content of file I of cycle C in lane L: 4-32 KiB of 32-byte stamp lines.
content() { yes "$(printf '%-31s' "ringbd powercut $1 c$2 f$3")" | head -c $((4096 * (1 + ($3 * 7 + $2) % 8))); }

# attach L SPEC: ringbd serve SPEC for lane L, its NBD device connected
attach() {
    : >"ringbd-$1.out"
    ringbd serve --listen "127.0.0.1:$(port "$1")" "$2" >"ringbd-$1.out" 2>"ringbd-$1.err" &
    if [ "$1" = a ]; then PID_a=$!; else PID_b=$!; fi
    on_exit "kill $!"
    wait_for 30 test -s "ringbd-$1.out" || fail "ringbd serve $2 printed no URI: $(tail -n 3 "ringbd-$1.err")"
    nbd_connect "$(nbd "$1")" -b 4096 -N "" 127.0.0.1 "$(port "$1")"
    _q=$(nbd "$1")
    _q=/sys/block/${_q#/dev/}/queue
    [ "$(cat "$_q/write_cache")" = "write back" ] && [ "$(cat "$_q/fua")" = 1 ] \
        || fail "$(nbd "$1"): write cache '$(cat "$_q/write_cache")', fua $(cat "$_q/fua"): the kernel would send no FLUSH or no FUA to ringbd"
}
# detach L: disconnect, then SIGTERM (which flushes) must end ringbd with 0
detach() {
    nbd_disconnect "$(nbd "$1")"
    if [ "$1" = a ]; then _pid=$PID_a; else _pid=$PID_b; fi
    kill -TERM "$_pid"
    _rc=0; wait "$_pid" || _rc=$?
    [ "$_rc" = 0 ] || fail "ringbd (lane $1) exited with status $_rc on SIGTERM: $(tail -n 3 "ringbd-$1.err")"
}

step "the virtio disks and the drivers"
load_module virtio_blk
wait_for 10 test -b /dev/vdb || fail "/dev/vda and /dev/vdb did not appear"
for d in vda vdb; do
    [ "$(cat /sys/block/$d/queue/write_cache)" = "write back" ] \
        || fail "/dev/$d has no volatile write cache ($(cat /sys/block/$d/queue/write_cache)): the guest would send no FLUSH"
done
load_module nbd
load_crc32c
load_module ext4
# Nothing leaves the guest's page cache unless someone syncs it: no
# periodic or background writeback (a power cut loses all of it).
echo 0 >/proc/sys/vm/dirty_writeback_centisecs
echo 360000 >/proc/sys/vm/dirty_expire_centisecs
echo 90 >/proc/sys/vm/dirty_background_ratio
echo 90 >/proc/sys/vm/dirty_ratio
mkdir -p /mnt/pca /mnt/pcb
log "boot $BOOT: check a=$(arg pc_check_a) b=$(arg pc_check_b); then cycle mode $MODE"

# verify L CHECK: mount (journal replay), compare every acknowledged file,
# umount, e2fsck; lane a must have lost nothing, lane b something per cycle
verify() {
    _l=$1
    step "lane $_l after the power cut: mount (replays the journal)"
    mount -t ext4 "$(nbd "$_l")" "/mnt/pc$_l" || fail "lane $_l: mount after the power cut failed: $(dmesg | tail -n 3)"
    step "lane $_l: every acknowledged file"
    _bad=""
    for _e in $(echo "$2" | tr ',' ' '); do
        _c=${_e%%:*} _n=${_e#*:} _lost=0 _first="" _i=1
        while [ "$_i" -le "$_n" ]; do
            if ! content "$_l" "$_c" "$_i" | cmp -s - "/mnt/pc$_l/c$_c/f$_i"; then
                _lost=$((_lost + 1))
                [ -n "$_first" ] || _first=f$_i
            fi
            _i=$((_i + 1))
        done
        echo "POWERCUT CHECK lane=$_l cycle=$_c acked=$_n lost=$_lost${_first:+ first=$_first}"
        if [ "$_l" = a ]; then
            [ "$_lost" = 0 ] || _bad="$_bad cycle $_c: $_lost of $_n (first $_first);"
        elif [ "$_lost" = 0 ]; then
            fail "negative control: lane b ran with flush=ignore in cycle $_c, yet none of its $_n acknowledged files was lost: this test would not see a missing flush"
        fi
    done
    umount "/mnt/pc$_l"
    step "lane $_l: e2fsck -fn after the journal replay"
    _rc=0; e2fsck -fn "$(nbd "$_l")" >"fsck-$_l.log" 2>&1 || _rc=$?
    log "lane $_l: e2fsck (exit $_rc): $(tail -n1 "fsck-$_l.log")"
    [ -z "$_bad" ] || fail "acknowledged (fsync'd) files lost or damaged at the power cut:$_bad"
    [ "$_rc" = 0 ] || { cat "fsck-$_l.log"; fail "lane $_l: e2fsck -fn reports problems after the power cut (exit $_rc)"; }
}

case $MODE in
    buffered) spec_a=file:/dev/vda spec_b=fault:flush=ignore:file:/dev/vdb,direct ;;
    direct) spec_a=file:/dev/vda,direct spec_b=fault:flush=ignore:file:/dev/vdb,direct ;;
    none) spec_a=file:/dev/vda spec_b=file:/dev/vdb ;;
    *) fail "unknown pc_mode $MODE" ;;
esac
for l in a b; do
    if [ "$BOOT" = 1 ]; then
        step "lane $l: mkfs.ext4 on a fresh disk (through ringbd; its SIGTERM flushes)"
        attach "$l" "file:$(disk "$l")"
        mkfs.ext4 -q -F -b 4096 "$(nbd "$l")" || fail "mkfs.ext4 failed"
        detach "$l"
    fi
    if [ "$l" = a ]; then spec=$spec_a; else spec=$spec_b; fi
    step "lane $l: ringbd serve $spec, ext4 on $(nbd "$l")"
    attach "$l" "$spec"
    check=$(arg "pc_check_$l")
    [ -z "$check" ] || verify "$l" "$check"
    if [ "$MODE" = none ]; then
        detach "$l"
    else
        mount -t ext4 "$(nbd "$l")" "/mnt/pc$l" || fail "lane $l: mount failed: $(dmesg | tail -n 3)"
    fi
done
[ "$MODE" != none ] || exit 0

# writer L: files of this cycle, each fsync'd (its data, then a journal
# commit: a FLUSH and a FUA write of the commit block through the kernel's
# NBD client to ringbd), each acknowledgement on the console
writer() {
    mkdir -p "/mnt/pc$1/c$BOOT"
    _i=1
    while [ "$_i" -le 2000 ]; do
        content "$1" "$BOOT" "$_i" >"/mnt/pc$1/c$BOOT/f$_i" && sync "/mnt/pc$1/c$BOOT/f$_i" \
            || { echo "POWERCUT WRITER FAILED lane $1 file $_i: $(dmesg | tail -n 2)"; return 1; }
        echo "POWERCUT ACK $1 $BOOT $_i end"
        _i=$((_i + 1))
    done
    echo "POWERCUT WRITER FAILED lane $1: 2000 files and the host never cut the power"
    return 1
}
step "cycle $BOOT: fsync'd files in both lanes until the power is cut"
echo "POWERCUT WRITING cycle=$BOOT a=$spec_a b=$spec_b"
writer a &
wa=$!
on_exit "kill $wa"
writer b &
wb=$!
on_exit "kill $wb"
wait "$wa" || true
wait "$wb" || true
fail "the writers ended before the power cut"
