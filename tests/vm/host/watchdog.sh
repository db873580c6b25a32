# shellcheck shell=bash
# The harness's watchdogs, tested (sourced by tests/vm/run.sh in a
# subshell, with its vm_boot, RESULT, REASON...).
#
# Boot 1, the guest's watchdog (tests/vm/init), with a 15 s test limit:
# watchdog-sleep outlives it in an ordinary sleep (killed, the run goes
# on: watchdog-ok passes after it); watchdog-stuck blocks in an O_DIRECT
# read of a ublk device whose server is stopped (D state: SIGKILL cannot
# end it), so the VM must end right after it, reporting ublk-present as
# not run, print the stuck read's kernel stack and the blocked tasks, and
# power off on its own within the stated bound.
# Boot 2, the host's watchdog (read_console in run.sh): qemu is frozen
# (SIGSTOP) when a test starts; the host must kill it once the test's limit
# and the grace have passed, and name the test.

fails=0
check() {  # check WHAT CONDITION...
    local what=$1; shift
    if "$@"; then say "watchdog: ok: $what"; else echo "FAIL: $what"; fails=$((fails + 1)); fi
}

log1=$CACHE/last-watchdog-1.log
t0=$(now)
VM_TEST_TIMEOUT=15 vm_boot "$log1" watchdog-sleep,watchdog-ok,watchdog-stuck,ublk-present "vmtest_timeout=15"
secs=$(elapsed "$t0" "$(now)")
say "watchdog: boot 1 took $secs s"
check "watchdog-sleep failed as hung and killed (${REASON[watchdog-sleep]:-no result})" \
    grep -q "^VMTEST FAIL watchdog-sleep: hung in step 'sleep past the time limit': still running after 15s (vmtest_timeout), killed" "$log1"
check "the dump shows the sleeping process" grep -qE '^  [0-9]+ S sleep wchan=' "$log1"
check "watchdog-ok ran after it and passed (${RESULT[watchdog-ok]:-no result})" test "${RESULT[watchdog-ok]:-}" = PASS
check "watchdog-stuck failed as hung, its read unkillable (${REASON[watchdog-stuck]:-no result})" \
    grep -qE "^VMTEST FAIL watchdog-stuck: hung in step 'read the device with O_DIRECT \(blocks in D state\)': .*neither SIGKILL nor the cleanup could end dd\[[0-9]+\]" "$log1"
dd_stack() { grep -A3 -E '^  [0-9]+ D dd wchan=' "$log1" | grep -qE '^      \[<0>\] '; }
check "the dump shows dd in D state with its kernel stack" dd_stack
check "the blocked tasks (sysrq w) were printed" grep -qE 'task:dd +state:D' "$log1"
check "ublk-present was reported as not run (${REASON[ublk-present]:-no result})" \
    test "${REASON[ublk-present]:-}" = "not run: the VM ended after watchdog-stuck hung"
check "the guest powered off by itself (done: $GUEST_DONE, qemu status $QEMU_RC)" \
    test "$GUEST_DONE" = 1 -a "$QEMU_RC" = 0
# boot, 15 s + the dump for the sleep, 15 s + the dump + the bounded
# cleanup (30 s) + 10 s for the stuck read: the VM must be gone within
# VM_BOOT_TIMEOUT + 2 x 15 + 2 x VM_WATCHDOG_GRACE
check "boot 1 ended within its bound ($secs s)" \
    awk -v s="$secs" -v b="$((VM_BOOT_TIMEOUT + 30 + 2 * VM_WATCHDOG_GRACE))" 'BEGIN { exit !(s < b) }'

log2=$CACHE/last-watchdog-2.log
vm_on_line() {
    if [[ $1 == "=== watchdog-ok" ]]; then kill -STOP "$(cat "$VM_PIDFILE")"; fi
}
t0=$(now)
VM_TEST_TIMEOUT=10 VM_WATCHDOG_GRACE=10 vm_boot "$log2" watchdog-ok "vmtest_timeout=10"
secs=$(elapsed "$t0" "$(now)")
unset -f vm_on_line
say "watchdog: boot 2 took $secs s"
check "the host's watchdog killed the frozen guest ($WATCHDOG)" \
    test "$WATCHDOG" = "the guest printed no progress for 20s while running test watchdog-ok"
check "watchdog-ok is failed with the reason (${REASON[watchdog-ok]:-})" \
    test "${RESULT[watchdog-ok]:-}/${REASON[watchdog-ok]:-}" = "FAIL/no result: $WATCHDOG (qemu killed by the host's watchdog; console: $log2)"
check "boot 2 ended within its bound ($secs s)" \
    awk -v s="$secs" -v b="$((VM_BOOT_TIMEOUT + 30))" 'BEGIN { exit !(s < b) }'
((fails == 0)) || exit 1
say "watchdog: both watchdogs held their limits"
