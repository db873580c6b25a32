#!/bin/sh
# For tests/vm/host/watchdog.sh: runs after a test the watchdog killed and
# must pass: nothing of that test is left.
. /vmtest/lib.sh
step "nothing of the killed test remains"
if ps -o args | grep -q '^sleep 100000'; then fail "the killed test's sleep is still running"; fi
log "no process of the killed test left"
