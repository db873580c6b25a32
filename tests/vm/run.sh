#!/usr/bin/env bash
# tests/vm/run.sh [TEST...]: kernel-in-the-loop tests for ringbd.
#
# Builds an initramfs (busybox, the kernel modules the tests need, ringbd,
# nbd-client, e2fsprogs, their shared libraries, and tests/vm/guest/*.sh),
# boots it under qemu-system-x86_64 (TCG; VM_ACCEL=kvm to opt in), runs
# the guest tests, parses their `VMTEST PASS|FAIL|SKIP name` lines from the
# serial console and ends with `N passed, M failed`. Exits non-zero on any
# failure, on a test that reported nothing, or on a guest that hung (hard
# time limit).
#
# With no TEST arguments every tests/vm/guest/*.sh runs, in name order, in
# one boot; then every host-driven test, tests/vm/host/NAME.sh, which boots
# the same initramfs several times itself (e.g. `powercut`: a disk that
# outlives a killed qemu). A TEST is a file name in tests/vm/guest/ or
# tests/vm/host/ without the .sh.
#
# Environment:
#   RINGBD            ringbd binary (default target/release/ringbd; built with
#                     `cargo build --release --locked -p ringbd` if missing)
#   VM_TEST_TIMEOUT   limit for one guest test in seconds (default 150), held
#                     by the guest's watchdog even when the test's processes
#                     sleep uninterruptibly in the kernel (tests/vm/init)
#   VM_BOOT_TIMEOUT   limit for booting to userspace (default 120)
#   VM_WATCHDOG_GRACE seconds the guest gets beyond each limit before the
#                     host's watchdog kills qemu (default 60)
#   VM_TIMEOUT        backstop for one whole boot (default: boot + every test
#                     at its limit plus the grace)
#   VM_MEM, VM_SMP    guest memory in MiB (default 1024) and CPUs (default 2)
#   VM_CACHE          cache dir made by setup.sh (default target/vm-cache)
#   VM_KEEP=1         keep the initramfs staging dir (path printed)
#   VM_VERBOSE=1      show the kernel's log on the console too
#   VM_ACCEL          tcg (default) or kvm
#   VM_TCG_THREAD     single (default) or multi (see ACCEL below)
#   VM_APPEND         extra words for the guest kernel command line (tests
#                     read their own knobs there, e.g. ktls_bench_mib=64)
#   VM_KERNEL         6.12 (default: Debian 12's, the one the suite is written
#                     for) or new (the 6.16+ kernel from trixie-backports that
#                     setup.sh fetches, for ublk zero-copy)
set -euo pipefail
shopt -s extglob

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${VM_CACHE:-$REPO/target/vm-cache}
export VM_CACHE=$CACHE
ROOT=$CACHE/root
VM_TEST_TIMEOUT=${VM_TEST_TIMEOUT:-150}
VM_MEM=${VM_MEM:-1024}
VM_SMP=${VM_SMP:-2}

say() { printf 'vm: %s\n' "$*"; }
die() { printf 'vm: ERROR: %s\n' "$*" >&2; exit 2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(now)

# --- what to run ------------------------------------------------------------------
TESTS=()       # guest tests: one boot runs them all
HOST_TESTS=()  # host-driven tests: tests/vm/host/NAME.sh (its guest side: NAME.guest.sh)
if (($#)); then
    for t in "$@"; do
        t=${t%.sh}; t=${t##*/}
        if [[ -f $HERE/guest/$t.sh ]]; then
            TESTS+=("$t")
        elif [[ -f $HERE/host/$t.sh && $t != *.guest ]]; then
            HOST_TESTS+=("$t")
        else
            all=""
            for f in "$HERE"/guest/*.sh "$HERE"/host/*.sh; do
                f=${f##*/}; [[ $f == *.guest.sh ]] || all+=" ${f%.sh}"
            done
            die "no such test: $t (tests:$all)"
        fi
    done
else
    for f in "$HERE"/guest/*.sh; do t=${f##*/}; TESTS+=("${t%.sh}"); done
    for f in "$HERE"/host/*.sh; do
        t=${f##*/}; t=${t%.sh}
        if [[ -f $f && $t != *.guest ]]; then HOST_TESTS+=("$t"); fi
    done
fi
((${#TESTS[@]} + ${#HOST_TESTS[@]})) || die "no tests in $HERE/guest or $HERE/host"
# The watchdogs (tests/vm/init in the guest, read_console below on the host)
# bound each step; VM_TIMEOUT is only the backstop for the whole boot: boot,
# then every test at its limit plus the grace each step gets.
VM_TIMEOUT=${VM_TIMEOUT:-$((${VM_BOOT_TIMEOUT:-120} + ${#TESTS[@]} * (VM_TEST_TIMEOUT + ${VM_WATCHDOG_GRACE:-60}) + 60))}

# --- inputs -------------------------------------------------------------------------
VM_KERNEL=${VM_KERNEL:-6.12}
case $VM_KERNEL in
    6.12)
        VM_SETUP_KERNELS=6.12 "$HERE/setup.sh"
        KVER=$(sed -n 's/^kernel=//p' "$CACHE/setup.stamp")
        KERNEL=$ROOT/boot/vmlinuz-$KVER
        MODDIR=$ROOT/lib/modules/$KVER
        ;;
    new)
        VM_SETUP_KERNELS="6.12 new" "$HERE/setup.sh"
        KROOT=$CACHE/kernel-new/root
        KVER=$(sed -n 's/^kernel=//p' "$CACHE/kernel-new/setup.stamp")
        KERNEL=$KROOT/boot/vmlinuz-$KVER
        MODDIR=$KROOT/$(sed -n 's/^moddir=//p' "$CACHE/kernel-new/setup.stamp")
        ;;
    *) die "VM_KERNEL must be 6.12 or new" ;;
esac
BUSYBOX=$ROOT/bin/busybox
LIBPATH=$ROOT/lib/x86_64-linux-gnu:$ROOT/usr/lib/x86_64-linux-gnu
[[ -f $KERNEL && -d $MODDIR ]] || die "kernel $KVER ($KERNEL, $MODDIR) missing (rerun with VM_SETUP_FORCE=1 tests/vm/setup.sh)"

RINGBD=${RINGBD:-$REPO/target/release/ringbd}
if [[ ! -x $RINGBD ]]; then
    [[ $RINGBD == "$REPO/target/release/ringbd" ]] || die "RINGBD=$RINGBD is not an executable"
    say "building ringbd (cargo build --release --locked -p ringbd)"
    (cd "$REPO" && cargo build --release --features rbd --locked -p ringbd)
fi

# --- initramfs ------------------------------------------------------------------------
WORK=$(mktemp -d "$CACHE/run.XXXXXX")
cleanup() {
    if [[ ${VM_KEEP:-0} == 1 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
STAGE=$WORK/stage
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc,proc,sys,dev,tmp,run,mnt,root,vmtest/guest}

# busybox and its applet links (real binaries copied below replace some)
cp "$BUSYBOX" "$STAGE/bin/busybox"
while read -r applet; do
    [[ $applet == bin/busybox ]] && continue
    ln -sf /bin/busybox "$STAGE/$applet"
done < <("$BUSYBOX" --list-full)

# dynamically linked programs, each with the libraries ldd resolves for it
declare -A COPIED_LIB=()
add_prog() {  # add_prog SRC DEST-IN-GUEST
    local src=$1 dest=$2 line name path
    rm -f "$STAGE/$dest"
    cp -L "$src" "$STAGE/$dest"
    while read -r line; do
        if [[ $line =~ ^([^[:space:]]+)\ =\>\ (/[^[:space:]]+) ]]; then
            name=${BASH_REMATCH[1]}; path=${BASH_REMATCH[2]}
            [[ -n ${COPIED_LIB[$name]:-} ]] && continue
            cp -L "$path" "$STAGE/lib/x86_64-linux-gnu/$name"
            COPIED_LIB[$name]=1
        elif [[ $line =~ ^(/[^[:space:]]+)\ \( ]]; then   # the ELF interpreter
            path=${BASH_REMATCH[1]}
            mkdir -p "$STAGE/$(dirname "$path")"
            cp -L "$path" "$STAGE/$path"
        elif [[ $line == *"not found"* ]]; then
            die "$src: $line"
        fi
    done < <(LD_LIBRARY_PATH=$LIBPATH ldd "$src" | sed 's/^[[:space:]]*//')
}
add_prog "$RINGBD" usr/bin/ringbd
add_prog "$ROOT/sbin/nbd-client" sbin/nbd-client
add_prog "$ROOT/sbin/mke2fs" sbin/mke2fs
add_prog "$ROOT/sbin/e2fsck" sbin/e2fsck
# qemu-img (the host's, qemu-utils from scripts/install-deps.sh) for the
# qcow2 test: it makes the images and checks them after ringbd wrote them.
add_prog "$(command -v qemu-img || die "qemu-img not found (scripts/install-deps.sh installs qemu-utils)")" usr/bin/qemu-img
ln -sf mke2fs "$STAGE/sbin/mkfs.ext4"
ln -sf e2fsck "$STAGE/sbin/fsck.ext4"
cp "$ROOT/etc/mke2fs.conf" "$STAGE/etc/mke2fs.conf"
# libnbd's TLS clients for the kTLS test (from the host, as ringbd is; the
# test skips without them)
for p in nbdcopy nbdinfo; do
    if [[ -x /usr/bin/$p ]]; then add_prog "/usr/bin/$p" "usr/bin/$p"; else say "no /usr/bin/$p on the host: the kTLS test will skip"; fi
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$STAGE/etc/passwd"
printf 'root:x:0:\n' >"$STAGE/etc/group"

# kernel modules: the ones the tests load, with their dependencies (from each
# module's .modinfo), uncompressed (busybox insmod does not read .ko.xz);
# busybox depmod then writes modules.dep and modules.alias for modprobe.
# tls (kTLS) and the AEADs it asks the crypto API for (gcm(aes),
# rfc7539(chacha20,poly1305)), generic and x86-accelerated.
KTLS_CRYPTO=(gcm ghash_generic ghash_clmulni_intel aesni_intel chacha20poly1305 chacha chacha_generic chacha_x86_64
    poly1305_generic poly1305_x86_64)
WANT_MODULES=(nbd ublk_drv ext4 crc32c_generic virtio_blk tls "${KTLS_CRYPTO[@]}")
# Loaded by the tests where the kernel has them as modules; newer kernels
# have crc32c as a library (ext4 then depends on nothing of this name), and
# the crypto modules' names and splits change between kernels.
OPTIONAL_MODULES=(crc32c_generic "${KTLS_CRYPTO[@]}")
declare -A MODPATH=() MODDONE=()
while read -r f; do
    n=${f##*/}; n=${n%%.ko*}; MODPATH[${n//-/_}]=$f
done < <(cd "$MODDIR" && find kernel -name '*.ko*')
add_module() {
    local name=${1//-/_} rel dst deps d
    [[ -n ${MODDONE[$name]:-} ]] && return 0
    MODDONE[$name]=1
    if [[ -z ${MODPATH[$name]:-} ]]; then
        grep -q "/${name//_/[-_]}\.ko" "$MODDIR/modules.builtin" && return 0   # built in
        [[ " ${OPTIONAL_MODULES[*]} " == *" $name "* ]] && { MODDONE[$name]=absent; return 0; }
        die "module $name not found in kernel $KVER"
    fi
    rel=${MODPATH[$name]}
    dst=$STAGE/lib/modules/$KVER/${rel%%.ko*}.ko
    mkdir -p "$(dirname "$dst")"
    case $rel in
        *.ko.xz) "$BUSYBOX" unxz -c "$MODDIR/$rel" >"$dst" ;;
        *.ko.gz) "$BUSYBOX" gunzip -c "$MODDIR/$rel" >"$dst" ;;
        *.ko.zst) zstd -qdc "$MODDIR/$rel" >"$dst" ;;
        *.ko) cp "$MODDIR/$rel" "$dst" ;;
        *) die "unknown module format: $rel" ;;
    esac
    deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | tr ',' ' ')
    for d in $deps; do add_module "$d"; done
}
for m in "${WANT_MODULES[@]}"; do add_module "$m"; done
cp "$MODDIR"/modules.builtin* "$MODDIR/modules.order" "$STAGE/lib/modules/$KVER/"
"$BUSYBOX" depmod -b "$STAGE" "$KVER"

# the guest side of the harness and the tests
cp "$HERE/init" "$STAGE/init"
cp "$HERE/lib.sh" "$STAGE/vmtest/lib.sh"
cp "$HERE"/guest/*.sh "$STAGE/vmtest/guest/"
# ringbd-attach@.service's ExecStart program, where the package installs it.
install -D -m 755 "$REPO/packaging/attach-or-recover" "$STAGE/usr/libexec/ringbd/attach-or-recover"
for f in "$HERE"/host/*.guest.sh; do   # a host-driven test's guest side runs as /vmtest/guest/NAME.sh
    [[ -f $f ]] || continue
    t=${f##*/}; cp "$f" "$STAGE/vmtest/guest/${t%.guest.sh}.sh"
done
chmod 755 "$STAGE/init" "$STAGE"/vmtest/guest/*.sh

# test certificates for the TLS tests (made here, fresh each run, never
# committed): /vmtest/pki/server and /vmtest/pki/client, as
# tests/interop/tls_certs.py makes them
make_pki() {
    local d=$1 name ext
    mkdir -p "$d/server" "$d/client"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/ca-key.pem"
    openssl req -x509 -new -key "$d/ca-key.pem" -out "$d/ca-cert.pem" -days 2 -subj /CN=ringbd-vm-test-ca \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    for name in server client; do
        if [[ $name == server ]]; then
            ext="extendedKeyUsage=serverAuth"$'\n'"subjectAltName=DNS:localhost,IP:127.0.0.1"
        else
            ext="extendedKeyUsage=clientAuth"
        fi
        printf '%s\n' basicConstraints=critical,CA:FALSE keyUsage=critical,digitalSignature,keyEncipherment \
            "$ext" >"$d/$name.ext"
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/$name/$name-key.pem"
        openssl req -new -key "$d/$name/$name-key.pem" -out "$d/$name.csr" -subj "/CN=$name"
        openssl x509 -req -in "$d/$name.csr" -CA "$d/ca-cert.pem" -CAkey "$d/ca-key.pem" -CAcreateserial \
            -out "$d/$name/$name-cert.pem" -days 2 -extfile "$d/$name.ext"
        cp "$d/ca-cert.pem" "$d/$name/"
    done
    rm -f "$d"/*.csr "$d"/*.ext "$d"/ca-key.pem "$d"/*.srl
}
if command -v openssl >/dev/null; then
    make_pki "$STAGE/vmtest/pki" >/dev/null 2>&1 || die "openssl could not make the test certificates"
else
    say "no openssl on the host: the TLS tests will skip"
fi

INITRD=$WORK/initramfs.cpio
(cd "$STAGE" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc >"$INITRD" 2>/dev/null)
T_BUILT=$(now)
HAVE_MODULES=()
for m in "${!MODDONE[@]}"; do [[ ${MODDONE[$m]} == absent ]] || HAVE_MODULES+=("$m"); done
say "initramfs: $(du -m "$INITRD" | cut -f1) MiB, modules: ${HAVE_MODULES[*]} ($(elapsed "$T_START" "$T_BUILT") s)"

# --- boot --------------------------------------------------------------------------------
QEMU=$ROOT/usr/bin/qemu-system-x86_64
# TCG by default: it works everywhere (a /dev/kvm may exist on a nested host
# and still not work, e.g. qemu 7.2 aborts on "failed to set MSR 0x10a").
# One TCG thread for both vCPUs: with thread=multi, qemu 7.2 lets a vCPU run
# code translated before another vCPU patched it, and the kernel's live
# patching (text_poke_bp: int3, then the new bytes) then dies on a stale
# int3 ("Oops: int3" in enqueue_timer, a boot in about 16 here). Single
# cost about 10% (the 6.12 guest tests: 228 s against 206 s).
case ${VM_ACCEL:-tcg} in
    tcg) ACCEL=(-accel "tcg,thread=${VM_TCG_THREAD:-single}" -cpu max) ;;
    kvm) ACCEL=(-accel kvm -cpu host) ;;
    *) die "VM_ACCEL must be tcg or kvm" ;;
esac
LOGLEVEL="quiet loglevel=1"
[[ ${VM_VERBOSE:-0} == 1 ]] && LOGLEVEL="loglevel=7"
BASE_APPEND="console=ttyS0 panic=-1 $LOGLEVEL rdinit=/init vmtest_timeout=$VM_TEST_TIMEOUT${VM_APPEND:+ $VM_APPEND}"

declare -A RESULT=() REASON=()
T_BOOTED="" GUEST_DONE=0 WATCHDOG="" PANIC=""
# The host's watchdog: the guest must reach each next mark in time: boot to
# userspace (VM_BOOT_TIMEOUT), each test's result (VM_TEST_TIMEOUT plus
# VM_WATCHDOG_GRACE for the guest's own watchdog to dump, kill and clean
# up), the next test or the end after a result (VM_WATCHDOG_GRACE). The
# guest's watchdog (tests/vm/init) ends a hung test itself; this one covers
# a guest that stops running altogether (a kernel deadlock, a panic that
# does not reboot): it kills qemu and names what the guest was doing.
VM_BOOT_TIMEOUT=${VM_BOOT_TIMEOUT:-120}
VM_WATCHDOG_GRACE=${VM_WATCHDOG_GRACE:-60}
watch_for() {  # watch_for SECONDS WHAT: the guest must print the next mark within SECONDS
    WATCH_DEADLINE=$(($(date +%s) + $1)) WATCH_WHAT=$2 WATCH_SECS=$1
}
read_console() {  # echo the console, keep a copy in $LOG, collect results
    local line part="" rc test=""
    watch_for "$VM_BOOT_TIMEOUT" "booting to userspace"
    while :; do
        rc=0
        IFS= read -r -t 2 line || rc=$?
        if ((rc > 128)); then   # nothing for 2 s: keep a partial line, check the deadline
            part+=$line
            if [[ -z $WATCHDOG ]] && (($(date +%s) > WATCH_DEADLINE)); then
                WATCHDOG="the guest printed no progress for ${WATCH_SECS}s while $WATCH_WHAT"
                printf '\n'; say "WATCHDOG: $WATCHDOG; killing qemu"
                if [[ -n $test && -z ${RESULT[$test]:-} ]]; then
                    RESULT[$test]=FAIL REASON[$test]="no result: $WATCHDOG (qemu killed by the host's watchdog; console: $VM_LOG)"
                fi
                [[ -f $VM_PIDFILE ]] && kill -9 "$(cat "$VM_PIDFILE")" 2>/dev/null
            fi
            continue
        fi
        line=$part$line part=""
        ((rc == 0)) || [[ -n $line ]] || break   # end of the console
        line=${line//$'\r'/}
        line=${line//$'\e'\[*([0-9;?])[a-zA-Z]/}   # SeaBIOS's terminal escapes
        line=${line//$'\e'c/}
        printf '%s\n' "$line"
        printf '%s\n' "$line" >&3
        if [[ $line =~ VMTEST\ BOOTED ]]; then
            T_BOOTED=$(now)
            say "guest userspace up after $(elapsed "$T_BOOT" "$T_BOOTED") s (host wall clock)"
            watch_for "$VM_WATCHDOG_GRACE" "starting the first test"
        elif [[ $line =~ ^===\ ([A-Za-z0-9_.-]+)$ ]]; then
            test=${BASH_REMATCH[1]}
            watch_for $((VM_TEST_TIMEOUT + VM_WATCHDOG_GRACE)) "running test $test"
        elif [[ $line =~ VMTEST\ (PASS|FAIL|SKIP)\ ([A-Za-z0-9_.-]+)(:\ (.*)|\ .*)?$ ]]; then
            RESULT[${BASH_REMATCH[2]}]=${BASH_REMATCH[1]}
            REASON[${BASH_REMATCH[2]}]=${BASH_REMATCH[4]}
            watch_for "$VM_WATCHDOG_GRACE" "going on after test ${BASH_REMATCH[2]}"
        elif [[ $line =~ (Oops:|Kernel\ panic\ -\ not\ syncing).* ]]; then
            # the kernel dies: name it (panic=-1 and -no-reboot end qemu)
            [[ -n $PANIC ]] || PANIC=${BASH_REMATCH[0]}
            if [[ -n $test && -z ${RESULT[$test]:-} ]]; then
                RESULT[$test]=FAIL REASON[$test]="no result: the guest kernel crashed during it: $PANIC (console: $VM_LOG)"
            fi
        elif [[ $line =~ VMTEST\ DONE ]]; then
            GUEST_DONE=1
            watch_for "$VM_WATCHDOG_GRACE" "powering off"
        fi
        # a host-driven test watches the console (e.g. to cut the power)
        if declare -F vm_on_line >/dev/null; then vm_on_line "$line"; fi
        ((rc == 0)) || break
    done
}

# vm_boot LOG TESTS APPEND [QEMU-ARGS...]: boot the initramfs, run the guest
# tests TESTS (comma-separated) with APPEND added to the kernel command line
# and QEMU-ARGS to qemu's, echo the console and keep it in LOG; sets
# QEMU_RC, GUEST_DONE, T_BOOT, T_BOOTED, RESULT[test], REASON[test]. qemu's
# pid is in $VM_PIDFILE while it runs (a host-driven test may SIGKILL it).
VM_PIDFILE=$WORK/qemu.pid
vm_boot() {
    local log=$1 tests=$2 append=$3
    shift 3
    T_BOOT=$(now) T_BOOTED="" GUEST_DONE=0 WATCHDOG="" PANIC="" VM_LOG=$log
    local t
    for t in ${tests//,/ }; do unset "RESULT[$t]" "REASON[$t]"; done
    exec 3>"$log"
    read_console < <(LD_LIBRARY_PATH=$LIBPATH QEMU_MODULE_DIR=$ROOT/usr/lib/x86_64-linux-gnu/qemu exec timeout -k 5 "$VM_TIMEOUT" "$QEMU" \
        -L "$ROOT/usr/share/qemu" -L "$ROOT/usr/share/seabios" \
        "${ACCEL[@]}" -m "$VM_MEM" -smp "$VM_SMP" \
        -nographic -no-reboot -nodefaults -no-user-config -vga none -net none \
        -serial stdio -monitor none -pidfile "$VM_PIDFILE" \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$BASE_APPEND vmtests=$tests${append:+ $append}" \
        "$@" </dev/null 2>&1)
    QEMU_RC=0
    wait $! || QEMU_RC=$?
    exec 3>&-
    rm -f "$VM_PIDFILE"
    [[ -t 1 ]] && stty sane 2>/dev/null || true
}

LOG=$CACHE/last-run.log
QEMU_RC=0
if ((${#TESTS[@]})); then
    say "booting $KVER [VM_KERNEL=$VM_KERNEL] (${ACCEL[*]}, ${VM_MEM} MiB, ${VM_SMP} CPUs), tests: ${TESTS[*]}; console log: $LOG"
    vm_boot "$LOG" "$(IFS=,; echo "${TESTS[*]}")" ""
    if [[ -n $PANIC ]]; then
        echo; say "the guest kernel crashed: $PANIC (see $LOG)"
    fi
    if [[ -n $WATCHDOG ]]; then
        echo; say "WATCHDOG: $WATCHDOG: qemu was killed"
    elif ((QEMU_RC == 124 || QEMU_RC == 137)); then
        echo; say "TIMEOUT: the VM ran past VM_TIMEOUT=${VM_TIMEOUT}s and was killed"
    elif ((QEMU_RC != 0)); then
        echo; say "qemu exited with status $QEMU_RC"
    fi
    ((GUEST_DONE)) || say "the guest did not finish its test run (hung, crashed or panicked: see $LOG)"
else
    GUEST_DONE=1
fi
T_GUEST_END=$(now)

# host-driven tests: each in a subshell with the functions above; exit 0
# pass, 77 skip, else fail; its last `FAIL: reason` / `SKIP: reason` line
# is the reason
for t in "${HOST_TESTS[@]}"; do
    say "host-driven test $t (tests/vm/host/$t.sh)"
    rc=0
    # shellcheck source=/dev/null
    (set -euo pipefail; . "$HERE/host/$t.sh") 2>&1 | tee "$WORK/$t.out" || rc=$?
    reason=$(sed -n 's/^\(FAIL\|SKIP\): //p' "$WORK/$t.out" | tail -n1)
    case $rc in
        0) RESULT[$t]=PASS ;;
        77) RESULT[$t]=SKIP; REASON[$t]=${reason:-skipped} ;;
        *) RESULT[$t]=FAIL; REASON[$t]=${reason:-exit status $rc; last output: $(tail -n1 "$WORK/$t.out")} ;;
    esac
done
T_END=$(now)

# --- verdict -------------------------------------------------------------------------------
echo
passed=0 failed=0 skipped=0
for t in "${TESTS[@]}" "${HOST_TESTS[@]}"; do
    case ${RESULT[$t]:-} in
        PASS) passed=$((passed + 1)); say "PASS $t" ;;
        SKIP) skipped=$((skipped + 1)); say "SKIP $t: ${REASON[$t]}" ;;
        FAIL) failed=$((failed + 1)); say "FAIL $t: ${REASON[$t]}" ;;
        *) failed=$((failed + 1)); say "FAIL $t: no result from the guest" ;;
    esac
done
if ((!GUEST_DONE || QEMU_RC != 0)) && ((failed == 0)); then
    failed=1   # every test reported, but the VM itself did not end cleanly
fi
((${#TESTS[@]})) && say "boot to userspace: $( [[ -n $T_BOOTED ]] && elapsed "$T_BUILT" "$T_BOOTED" || echo '?') s, guest tests' VM: $(elapsed "$T_BUILT" "$T_GUEST_END") s"
((${#HOST_TESTS[@]})) && say "host-driven tests: $(elapsed "$T_GUEST_END" "$T_END") s"
say "run.sh total: $(elapsed "$T_START" "$T_END") s"
((skipped)) && echo "$skipped skipped"
echo "$passed passed, $failed failed"
((failed == 0))
