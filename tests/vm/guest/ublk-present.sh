#!/bin/sh
# Smoke test for the ublk frontend's kernel side: ublk_drv.ko loads and
# creates /dev/ublk-control (the frontend itself is not written yet).
. /vmtest/lib.sh

step "insmod ublk_drv.ko"
[ ! -e /dev/ublk-control ] || fail "/dev/ublk-control exists before the module is loaded"
ko=$(find /lib/modules/"$(uname -r)" -name ublk_drv.ko)
[ -n "$ko" ] || fail "ublk_drv.ko is not in the initramfs"
insmod "$ko" || fail "insmod $ko failed: $(dmesg | tail -n 3)"
grep -q '^ublk_drv ' /proc/modules || fail "ublk_drv not in /proc/modules"
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"
log "$(ls -l /dev/ublk-control)"

step "rmmod ublk_drv"
rmmod ublk_drv || fail "rmmod ublk_drv failed"
