#!/bin/sh
# The kernel's NBD client with two connections to one named export
# (`nbd-client -C 2`; ringbd advertises NBD_FLAG_CAN_MULTI_CONN) and 4 KiB
# blocks: the same pattern and ext4 checks as nbd-kernel-client, with the
# kernel spreading I/O over both sockets.
. /vmtest/lib.sh

conns() { grep -c 'export "disk"' ringbd.err || true; }

step "load nbd.ko"
load_module nbd
wait_for 5 test -b /dev/nbd2 || fail "/dev/nbd2 did not appear"

step "start ringbd (verbose: one log line per connection)"
ringbd_start --export disk=memory:256M --listen 127.0.0.1:10810 --verbose

step "connect /dev/nbd2 with 2 connections"
nbd_connect /dev/nbd2 -N disk -b 4096 -C 2 127.0.0.1 10810
[ "$(blockdev --getsize64 /dev/nbd2)" = 268435456 ] || fail "/dev/nbd2 is not 256 MiB"
[ "$(blockdev --getbsz /dev/nbd2)" = 4096 ] || fail "/dev/nbd2 block size is $(blockdev --getbsz /dev/nbd2), not 4096"
wait_for 10 sh -c '[ "$(grep -c "export \"disk\"" ringbd.err)" -ge 2 ]' \
    || fail "ringbd saw $(conns) connection(s), expected 2: $(cat ringbd.err)"
log "ringbd saw $(conns) connections"

check_pattern /dev/nbd2 /dev/nbd3 \
    'nbd_disconnect /dev/nbd2; nbd_connect /dev/nbd3 -N disk -b 4096 -C 2 127.0.0.1 10810'
[ "$(conns)" -ge 4 ] || fail "the reconnect did not open 2 more connections ($(conns) in all)"

check_ext4 /dev/nbd3

step "disconnect"
nbd_disconnect /dev/nbd3
ringbd_stop
