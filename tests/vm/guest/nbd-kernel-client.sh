#!/bin/sh
# The kernel's NBD client (nbd.ko, configured by nbd-client over netlink)
# against ringbd inside the guest: known data written and read back through a
# fresh connection, then ext4 made, filled, checked with e2fsck and verified.
. /vmtest/lib.sh

step "load nbd.ko"
load_module nbd
wait_for 5 test -b /dev/nbd0 || fail "/dev/nbd0 did not appear"

step "start ringbd"
ringbd_start memory:256M --listen 127.0.0.1:10809

step "connect /dev/nbd0"
# nbd-client 3.24: `nbd-client -N NAME HOST PORT DEV` (fixed newstyle,
# NBD_OPT_GO, configured over netlink); -N "" is ringbd's default export.
# nbd-client treats "" like no name and prints a harmless "oldstyle protocol
# is no longer supported ... uses the newstyle protocol with a default
# export" warning. Default block size: 512 (nbd-multiconn uses 4096).
nbd_connect /dev/nbd0 -N "" 127.0.0.1 10809
[ "$(blockdev --getsize64 /dev/nbd0)" = 268435456 ] || fail "/dev/nbd0 is not 256 MiB"

check_pattern /dev/nbd0 /dev/nbd1 \
    'nbd_disconnect /dev/nbd0; nbd_connect /dev/nbd1 -N "" 127.0.0.1 10809'

check_ext4 /dev/nbd1

step "disconnect"
nbd_disconnect /dev/nbd1
ringbd_stop
