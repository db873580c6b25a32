#!/bin/sh
# kTLS: `ringbd serve --tls-certificates` on TCP loopback with the kernel's
# tls module loaded, against libnbd's nbdcopy and nbdinfo (GnuTLS) in the
# guest. For each engine: 16 MiB written and read back over nbds:// (cmp),
# nbdinfo, then the server's counters must show every TLS session moved to
# the kernel (ktls_conns = TLS sessions, no fallback, no failure), the
# kernel's /proc/net/tls_stat must count that many TX and RX software
# contexts and no decryption error, and no connection may end with a
# warning (clients disconnect with NBD_CMD_DISC and close_notify). The same
# with --no-ktls must stay in userspace (ktls_conns 0). Each case also times
# 1 MiB reads over one connection (TCG: only the ratio of kTLS to userspace
# means anything; VM_APPEND=ktls_bench_mib=64 for longer runs).
. /vmtest/lib.sh

command -v nbdcopy >/dev/null || skip "nbdcopy is not in the initramfs (no libnbd-bin on the host)"
[ -f /vmtest/pki/server/server-key.pem ] || skip "no test certificates (no openssl on the host)"

step "load tls and the AEADs"
load_module tls
# The crypto API asks for gcm(aes) and rfc7539(chacha20,poly1305) when keys
# are set; load them now (the accelerated ones where this kernel has them).
for m in gcm ghash_generic chacha20poly1305 chacha chacha_generic poly1305_generic \
    aesni_intel ghash_clmulni_intel chacha_x86_64 poly1305_x86_64; do
    modprobe "$m" 2>/dev/null || log "no module $m (built in or absent)"
done
[ -r /proc/net/tls_stat ] || fail "/proc/net/tls_stat missing with tls loaded"

PORT=10830
URI="nbds://127.0.0.1:$PORT/?tls-certificates=/vmtest/pki/client"
SIZE_MIB=4
# reads timed per case: ktls_bench_mib=N on the kernel command line (VM_APPEND)
BENCH_MIB=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^ktls_bench_mib=//p')
: "${BENCH_MIB:=$SIZE_MIB}"
dd if=/dev/urandom of=data bs=1M count=$SIZE_MIB 2>/dev/null

tls_stat() { awk -v k="$1" '$1 == k { print $2 }' /proc/net/tls_stat; }
# stat NAME: the number after NAME in ringbd's exit counters
stat() { sed -n "s/.*[:,] $1 \([0-9][0-9]*\).*/\1/p" ringbd.err | tail -n1; }

# serve_case LABEL ARGS...: start ringbd with ARGS, round-trip the data,
# nbdinfo, stop; leaves ringbd.err for the checks
serve_case() {
    label=$1; shift
    step "$label: serve, write and read back $SIZE_MIB MiB, nbdinfo"
    ringbd_start -v --listen 127.0.0.1:$PORT --tls-certificates /vmtest/pki/server "$@" memory:${SIZE_MIB}M
    case $RINGBD_URI in nbds://*) ;; *) fail "URI $RINGBD_URI is not nbds://" ;; esac
    nbdcopy data "$URI" || fail "$label: nbdcopy to the server failed: $(tail -n 3 ringbd.err)"
    rm -f back
    nbdcopy "$URI" back || fail "$label: nbdcopy from the server failed: $(tail -n 3 ringbd.err)"
    cmp -s data back || fail "$label: the data read back differs"
    # 1 MiB reads, one connection, 16 in flight, BENCH_MIB in all
    t0=$(cut -d' ' -f1 /proc/uptime)
    i=0
    while [ $i -lt $((BENCH_MIB / SIZE_MIB)) ]; do
        nbdcopy --connections=1 --request-size=1048576 --requests=16 "$URI" null: || fail "$label: timed read failed"
        i=$((i + 1))
    done
    t1=$(cut -d' ' -f1 /proc/uptime)
    log "RESULT $label: 1 MiB reads $(awk -v a="$t0" -v b="$t1" -v m=$((i * SIZE_MIB)) 'BEGIN { printf "%.2f", m / (b - a) }') MiB/s over $((i * SIZE_MIB)) MiB (TCG: relative only)"
    nbdinfo --no-content "$URI" >info || fail "$label: nbdinfo failed"
    grep -q "export-size: $((SIZE_MIB * 1048576))" info || fail "$label: nbdinfo: $(cat info)"
    ringbd_stop
    grep 'stats:' ringbd.err | tail -n1 | sed 's/^/  /'
    if grep -E 'closing the connection|mid-request|TLS: |kTLS: ' ringbd.err; then
        fail "$label: a connection ended with a warning (above)"
    fi
}

for engine in uring threads; do
    tx0=$(tls_stat TlsTxSw) rx0=$(tls_stat TlsRxSw)
    serve_case "kTLS, $engine" --engine $engine
    grep -q 'kTLS available: TLS 1.3 AES-GCM-128' ringbd.err || fail "no kTLS probe line: $(grep -i ktls ringbd.err | head -n 3)"
    if [ $engine = uring ]; then log "$(grep -m1 'kTLS available' ringbd.err)"; fi
    n=$(stat 'TLS sessions') k=$(stat ktls_conns)
    [ -n "$n" ] && [ "$n" -ge 3 ] || fail "$engine: expected at least 3 TLS sessions, counters say '$n'"
    [ "$k" = "$n" ] || fail "$engine: $k of $n TLS sessions moved to kTLS: $(grep -E 'stays in userspace|kTLS' ringbd.err | head -n 5)"
    [ "$(stat 'kTLS fallbacks to userspace')" = 0 ] && [ "$(stat 'kTLS failures')" = 0 ] || fail "$engine: fallbacks or failures"
    [ "$(grep -c 'kTLS on: ' ringbd.err)" = "$n" ] || fail "$engine: 'kTLS on' logged $(grep -c 'kTLS on: ' ringbd.err) times for $n sessions"
    tx=$(($(tls_stat TlsTxSw) - tx0)) rx=$(($(tls_stat TlsRxSw) - rx0))
    [ "$tx" -ge "$k" ] && [ "$rx" -ge "$k" ] || fail "$engine: /proc/net/tls_stat counted $tx TX and $rx RX contexts for $k sessions"
    [ "$(tls_stat TlsDecryptError)" = 0 ] || fail "TlsDecryptError $(tls_stat TlsDecryptError)"
    if [ $engine = uring ]; then
        # kTLS encrypts from the pages during the send: no SEND_ZC there
        [ "$(stat 'zero-copy sends')" = 0 ] || fail "zero-copy sends on kTLS connections: $(stat 'zero-copy sends')"
    fi
    log "$engine: $k/$n sessions on kTLS ($(grep 'kTLS on: ' ringbd.err | head -n1 | sed 's/.*kTLS on: //')); kernel: +$tx TX, +$rx RX; client close_notify read: $(grep -c 'sent close_notify' ringbd.err)"
done

for engine in uring; do
    tx0=$(tls_stat TlsTxSw)
    serve_case "--no-ktls, $engine" --engine $engine --no-ktls
    [ "$(stat ktls_conns)" = 0 ] || fail "--no-ktls: ktls_conns $(stat ktls_conns)"
    [ "$(stat 'TLS sessions')" -ge 3 ] || fail "--no-ktls: TLS sessions $(stat 'TLS sessions')"
    [ "$(tls_stat TlsTxSw)" = "$tx0" ] || fail "--no-ktls: the kernel counted new TLS contexts"
    grep -q 'kTLS off (--no-ktls)' ringbd.err || fail "--no-ktls not logged"
done
