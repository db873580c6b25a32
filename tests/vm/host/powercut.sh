# shellcheck shell=bash
# Power cut: disks that outlive qemu, boots cut short by SIGKILL.
# Sourced by tests/vm/run.sh in a subshell (its vm_boot, say, now, WORK...);
# the guest side is powercut.guest.sh (see there for what a boot does).
#
# Each disk: a raw image behind nbdkit's cache filter in writeback mode
# (`nbdkit --filter=cache file IMG cache=writeback`), which qemu reaches
# as an NBD drive (virtio-blk, cache=writeback: the guest sees a volatile
# write cache and sends FLUSH). The filter keeps written blocks in its own
# cache and writes them to the image only on FLUSH or FUA, so killing
# nbdkit loses every write not flushed: a disk with a volatile write cache.
# Killing qemu loses the guest's RAM, page cache included. A power cut is
# both: SIGKILL to qemu, then to each nbdkit.
#
# Cycles (VM_POWERCUT_MODES, default "buffered direct": lane a's ringbd
# mode in each): each boots the VM, which first verifies what the cycles
# before left (every fsync'd file whole; e2fsck clean after the journal
# replay), then writes and fsyncs files on ext4 in both lanes, announcing
# each on the console, until the host has seen a random number (5-20) of
# acknowledgements in each lane and cuts the power a random 0-400 ms later.
# A last boot only verifies. Lane b is the negative control (ringbd with
# `fault:flush=ignore`): its acknowledged files must be lost.
# VM_POWERCUT_SEED repeats a run's targets and delays (not its timing).

read -ra PC_MODES <<<"${VM_POWERCUT_MODES:-buffered direct}"
PC_SEED=${VM_POWERCUT_SEED:-$((RANDOM * 32768 + RANDOM))}
RANDOM=$PC_SEED
PC_BOOT_TIMEOUT=${VM_POWERCUT_BOOT_TIMEOUT:-150}
command -v nbdkit >/dev/null || { echo "FAIL: nbdkit is not installed (scripts/install-deps.sh installs it)"; exit 1; }

declare -A NBDKIT_PID=() PC_SOCK=() PC_ACKS=() PC_TARGET=()
for l in a b; do truncate -s 256M "$WORK/powercut-$l.img"; done
pc_cleanup() {
    local p
    for p in "${NBDKIT_PID[@]}"; do kill -9 "$p" 2>/dev/null; done
    [[ -f $VM_PIDFILE ]] && kill -9 "$(cat "$VM_PIDFILE")" 2>/dev/null
    wait
    return 0
}
trap pc_cleanup EXIT

# disk_on LANE BOOT: nbdkit on a fresh socket, socket-activated as systemd
# does it (a helper binds and listens, says so on a FIFO, then execs
# nbdkit with the socket as fd 3): ready when the line arrives, and our own
# child, so disk_cut can wait for its death
disk_on() {
    PC_SOCK[$1]=$WORK/powercut-$1-$2.sock
    local ready=$WORK/powercut-$1-$2.ready line=""
    mkfifo "$ready"
    /usr/bin/python3 -c '
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(16)
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
print("listening", flush=True)
null = os.open("/dev/null", os.O_WRONLY)
os.dup2(null, 1)
os.execvp("nbdkit", ["nbdkit", "-f", "--filter=cache", "file", sys.argv[2], "cache=writeback"])
' "${PC_SOCK[$1]}" "$WORK/powercut-$1.img" >"$ready" &
    NBDKIT_PID[$1]=$!
    read -r line <"$ready" || true
    [[ $line == listening ]] || { echo "FAIL: the disk's nbdkit did not start"; exit 1; }
}
# disk_cut LANE: the disk loses power; returns once nbdkit is gone
disk_cut() {
    kill -9 "${NBDKIT_PID[$1]}"
    wait "${NBDKIT_PID[$1]}" || true
    unset "NBDKIT_PID[$1]"
}

# The console watcher (run.sh's read_console calls it for every line):
# counts each lane's acknowledgements and, once both reached their target,
# cuts the power. Only whole lines with the trailing `end` count (qemu may
# die mid-line); every line read was printed before qemu died, so each
# counted acknowledgement happened before the cut.
vm_on_line() {
    if [[ $1 == "POWERCUT WRITER FAILED"* ]]; then
        echo "FAIL: ${1#POWERCUT }"
        exit 1
    fi
    [[ $1 =~ ^POWERCUT\ ACK\ ([ab])\ ([0-9]+)\ ([0-9]+)\ end$ ]] || return 0
    local l=${BASH_REMATCH[1]}
    ((BASH_REMATCH[2] == PC_CYCLE)) || return 0
    if ((BASH_REMATCH[3] != PC_ACKS[$l] + 1)); then
        echo "FAIL: lane $l: acknowledgement ${BASH_REMATCH[3]} of cycle $PC_CYCLE after ${PC_ACKS[$l]}: the console lost a line"
        exit 1
    fi
    PC_ACKS[$l]=${BASH_REMATCH[3]}
    if ((!PC_CUT && PC_ACKS[a] >= PC_TARGET[a] && PC_ACKS[b] >= PC_TARGET[b])); then
        PC_DELAY=$(printf '0.%03d' $((RANDOM % 400)))
        sleep "$PC_DELAY"   # the kill point: somewhere in the next writes and fsyncs
        kill -9 "$(cat "$VM_PIDFILE")"
        PC_CUT=1
    fi
}

check_a="" check_b="" summary=()
ncycles=${#PC_MODES[@]}
say "powercut: seed $PC_SEED, lane a modes: ${PC_MODES[*]}, lane b: flush=ignore; disks behind nbdkit --filter=cache cache=writeback"
for ((b = 1; b <= ncycles + 1; b++)); do
    mode=none
    ((b <= ncycles)) && mode=${PC_MODES[b - 1]}
    PC_CYCLE=$b PC_CUT=0 PC_ACKS=([a]=0 [b]=0) PC_TARGET=([a]=$((5 + RANDOM % 16)) [b]=$((5 + RANDOM % 16)))
    unset 'RESULT[powercut]'
    disk_on a "$b"
    disk_on b "$b"
    log=$CACHE/last-powercut-$b.log
    what="power off"
    ((b <= ncycles)) && what="cycle $b, lane a $mode, cut after ${PC_TARGET[a]} (a) and ${PC_TARGET[b]} (b) acknowledged files"
    say "powercut boot $b: verify a=${check_a:--} b=${check_b:--}; then $what (console: $log)"
    VM_TIMEOUT=$PC_BOOT_TIMEOUT vm_boot "$log" powercut \
        "pc_boot=$b pc_mode=$mode${check_a:+ pc_check_a=$check_a}${check_b:+ pc_check_b=$check_b}" \
        -drive "driver=raw,if=virtio,cache=writeback,file.driver=nbd,file.server.type=unix,file.server.path=${PC_SOCK[a]}" \
        -drive "driver=raw,if=virtio,cache=writeback,file.driver=nbd,file.server.type=unix,file.server.path=${PC_SOCK[b]}"
    disk_cut a
    disk_cut b
    if [[ ${RESULT[powercut]:-} == FAIL ]]; then
        echo "FAIL: boot $b: ${REASON[powercut]}"
        exit 1
    fi
    if ((b <= ncycles)); then
        if ((!PC_CUT)); then
            echo "FAIL: boot $b ended before the power cut (acknowledged: a ${PC_ACKS[a]}, b ${PC_ACKS[b]}): ${REASON[powercut]:-qemu exit status $QEMU_RC}"
            exit 1
        fi
        say "powercut boot $b: power cut $PC_DELAY s after the targets; acknowledged files: a ${PC_ACKS[a]}, b ${PC_ACKS[b]}"
        summary+=("cycle $b (a: $mode): a ${PC_ACKS[a]}, b ${PC_ACKS[b]} acknowledged")
        check_a+=${check_a:+,}$b:${PC_ACKS[a]}
        check_b+=${check_b:+,}$b:${PC_ACKS[b]}
    elif [[ ${RESULT[powercut]:-} != PASS || $QEMU_RC != 0 ]]; then
        echo "FAIL: verification boot: ${REASON[powercut]:-no result (qemu exit status $QEMU_RC)}"
        exit 1
    fi
done
say "powercut: $(IFS=';'; echo "${summary[*]}")"
say "powercut: $(grep -h '^POWERCUT CHECK' "$CACHE/last-powercut-$((ncycles + 1)).log" | sed 's/^POWERCUT CHECK //' | paste -sd';')"
