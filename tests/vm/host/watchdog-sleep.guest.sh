#!/bin/sh
# For tests/vm/host/watchdog.sh: a test that outlives its time limit in an
# ordinary sleep; the guest's watchdog must kill it and the run go on.
. /vmtest/lib.sh
step "sleep past the time limit"
sleep 100000
fail "sleep 100000 returned"
