#!/bin/sh
# Smoke test for the ublk frontend's kernel side: ublk_drv.ko loads and
# creates /dev/ublk-control, `ringbd list` answers (and says the driver is
# not loaded before), and the module unloads
# (so no earlier ublk test left a device or a reference behind).
. /vmtest/lib.sh

step "unload ublk_drv if an earlier test loaded it"
if grep -q '^ublk_drv ' /proc/modules; then
    rmmod ublk_drv || fail "rmmod ublk_drv failed (a device left behind? $(ls /sys/class/ublk-char/ 2>/dev/null))"
fi

step "ringbd without the driver: a clear error"
[ ! -e /dev/ublk-control ] || fail "/dev/ublk-control exists before the module is loaded"
! ringbd list >/dev/null 2>nodrv.err || fail "ringbd list succeeded without ublk_drv"
grep -q 'ublk_drv not loaded' nodrv.err || fail "unclear error without ublk_drv: $(cat nodrv.err)"
log "$(cat nodrv.err)"

step "insmod ublk_drv.ko"
ko=$(find /lib/modules/"$(uname -r)" -name ublk_drv.ko)
[ -n "$ko" ] || fail "ublk_drv.ko is not in the initramfs"
insmod "$ko" || fail "insmod $ko failed: $(dmesg | tail -n 3)"
grep -q '^ublk_drv ' /proc/modules || fail "ublk_drv not in /proc/modules"
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"
log "$(ls -l /dev/ublk-control)"
ringbd list >list.out || fail "ringbd list failed"
log "$(head -n1 list.out)"
[ "$(wc -l <list.out)" = 2 ] || fail "ringbd list shows devices on a fresh driver: $(cat list.out)"

step "rmmod ublk_drv"
rmmod ublk_drv || fail "rmmod ublk_drv failed"
