#!/bin/sh
# For tests/vm/host/watchdog.sh: a test whose process sleeps in the kernel
# uninterruptibly (D state), which SIGKILL cannot end: an O_DIRECT read of
# a ublk device whose server is stopped. The server is a copy of ringbd
# under another name in its own session, so neither the watchdog's kill
# nor its cleanup (which kills every `ringbd`) reaches it. The watchdog
# must report the test as hung, with the read's kernel stack, and end the
# VM without running the tests after it.
. /vmtest/lib.sh

step "a ublk device whose server is stopped"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"
cp /usr/bin/ringbd /tmp/stuckd
setsid /tmp/stuckd attach null:16M --queues 1 >stuck.out 2>stuck.err &
server=$!
wait_for 60 test -s stuck.out || fail "attach printed no device: $(tail -n 3 stuck.err)"
dev=$(head -n1 stuck.out)
kill -STOP "$server"
log "$dev served by pid $server, now stopped"

step "read the device with O_DIRECT (blocks in D state)"
dd if="$dev" of=/dev/null bs=4K count=1 iflag=direct
fail "the read of a device whose server is stopped returned"
