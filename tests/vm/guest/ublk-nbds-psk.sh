#!/bin/sh
# The ublk frontend on the NBD-client backend over TLS-PSK: `ringbd attach`
# with `tls-psk-file=` (OpenSSL in the client, crates/ringbd-psk) against `ringbd serve
# --tls-psk` in the same VM. The key files are made here, in psktool's
# `username:hexkey` format. Both URI forms for the username
# (`tls-username=` on nbds+unix://, `alice@` on nbds://127.0.0.1): one
# TLS 1.3 PSK session per backend connection in the server's log, never X.509 or
# plaintext; a pattern written with O_DIRECT reads back through a second
# path (`ringbd copy` of the export as another user of the key file) and
# through a fresh attach over TCP. A wrong key and an unknown username:
# the attach fails with the reason, makes no device, and the server names
# the cause and goes on serving.
. /vmtest/lib.sh

hexkey() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
printf 'alice:%s\nbob:%s\n' "$(hexkey)" "$(hexkey)" >keys.psk
grep '^alice:' keys.psk >alice.psk   # a client needs only its own line
printf 'alice:%s\n' "$(hexkey)" >wrong.psk
printf 'mallory:%s\n' "$(hexkey)" >mallory.psk
[ "$(wc -c <alice.psk)" = 71 ] || fail "bad key line: $(cat alice.psk)"   # alice: + 64 hex digits + newline
psk() { grep -c 'TLS established: TLSv1.3 .* PSK username "alice"' ringbd.err || true; }
psk_at_least() { [ "$(psk)" -ge "$1" ]; }
devices() { ls /dev | grep -c '^ublk[bc][0-9]' || true; }

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

step "serve memory:64M with --tls-psk on a unix socket and TCP; attach as alice (tls-username=) with 2 queues"
ringbd_start --export disk=memory:64M --unix "$PWD/psk.sock" --listen 127.0.0.1:10813 \
    --tls-psk "$PWD/keys.psk" --verbose
case $RINGBD_URI in nbds*) ;; *) fail "ringbd printed $RINGBD_URI, not an nbds:// URI" ;; esac
ublk_attach "nbds+unix:///disk?socket=$PWD/psk.sock&tls-username=alice&tls-psk-file=$PWD/alice.psk" \
    --queues 2 --depth 32
[ "$(blockdev --getsize64 "$UBLK_DEV")" = 67108864 ] || fail "$UBLK_DEV is not 64 MiB"
# One session per connection of the NBD backend (4: the export has multi-conn).
wait_for 10 psk_at_least 4 \
    || fail "ringbd saw $(psk) TLS-PSK session(s) as alice, expected the backend's 4: $(tail -n 5 ringbd.err)"
other=$(grep 'TLS established' ringbd.err | grep -v 'PSK username "alice"' || true)
[ -z "$other" ] || fail "a session that is not PSK as alice: $other"
log "server: $(grep -m1 "TLS established" ringbd.err | sed "s/^ringbd: //")"

step "pattern: O_DIRECT writes at 0, 40 MiB and the last MiB, read back"
ublk_pattern 64 4 40
head -c 1048576 /dev/zero >zero1

step "second path: ringbd copy of the export as bob (nbds+unix://bob@, the whole key file)"
ringbd copy "nbds+unix://bob@/disk?socket=$PWD/psk.sock&tls-psk-file=$PWD/keys.psk" copy.img 2>copy.err \
    || fail "ringbd copy over TLS-PSK failed: $(tail -n 3 copy.err)"
[ "$(wc -c <copy.img)" = 67108864 ] || fail "copy.img is $(wc -c <copy.img) bytes, not 64 MiB"
dd if=copy.img bs=1M count=4 2>/dev/null | cmp -s - pat || fail "copy: data at 0 differs"
dd if=copy.img bs=1M skip=40 count=4 2>/dev/null | cmp -s - pat || fail "copy: data at 40 MiB differs"
dd if=copy.img bs=1M skip=63 2>/dev/null | cmp -s - pat1 || fail "copy: data in the last MiB differs"
dd if=copy.img bs=1M skip=20 count=1 2>/dev/null | cmp -s - zero1 || fail "copy: unwritten 20 MiB is not zeroes"
rm -f copy.img
grep -q 'TLS established: TLSv1.3 .* PSK username "bob"' ringbd.err || fail "no PSK session as bob: $(tail -n 3 ringbd.err)"
log "ringbd copy as bob over TLS-PSK: pattern and zeroes ok"

step "read back through a fresh attach over TCP (nbds://alice@127.0.0.1)"
ublk_detach
counts=$(grep 'requests (' attach.err | tail -n1)
log "$counts"
echo "$counts" | grep -q ', 0 failed' || fail "requests failed: $counts"
before=$(psk)
ublk_attach "nbds://alice@127.0.0.1:10813/disk?tls-psk-file=$PWD/alice.psk" --queues 1
[ "$(psk)" -gt "$before" ] || fail "the TCP attach made no new PSK session as alice: $(tail -n 3 ringbd.err)"
dd if="$UBLK_DEV" bs=1M skip=40 count=4 iflag=direct 2>/dev/null | cmp -s - pat || fail "data at 40 MiB differs after re-attach"
dd if="$UBLK_DEV" bs=1M skip=63 iflag=direct 2>/dev/null | cmp -s - pat1 || fail "data in the last MiB differs after re-attach"
ublk_detach
log "pattern ok over TLS-PSK (unix socket, ringbd copy, then TCP)"

step "a wrong key: the attach is refused with the reason, no device is made"
n0=$(devices)
rc=0; timeout 60 ringbd attach "nbds+unix:///disk?socket=$PWD/psk.sock&tls-username=alice&tls-psk-file=$PWD/wrong.psk" \
    >wrong.out 2>wrong.err || rc=$?
[ "$rc" != 0 ] || fail "ringbd attach with a wrong key succeeded: $(cat wrong.out)"
[ "$rc" -lt 124 ] || fail "ringbd attach with a wrong key hung or died (status $rc): $(tail -n 3 wrong.err)"
[ ! -s wrong.out ] || fail "a device was made: $(cat wrong.out)"
[ "$(devices)" = "$n0" ] || fail "ublk devices before: $n0, after the failed attach: $(ls /dev | grep '^ublk')"
grep -q 'the server refused the TLS-PSK handshake as username "alice" (a wrong key' wrong.err \
    || fail "no clear reason: $(cat wrong.err)"
grep -q 'TLS-PSK handshake with username "alice" failed (wrong key?)' ringbd.err \
    || fail "the server did not log the wrong key: $(tail -n 3 ringbd.err)"
log "refused: $(head -n1 wrong.err)"

step "an unknown username: refused the same way; a username missing from the file fails before connecting"
rc=0; timeout 60 ringbd attach "nbds://mallory@127.0.0.1:10813/disk?tls-psk-file=$PWD/mallory.psk" \
    >mallory.out 2>mallory.err || rc=$?
[ "$rc" != 0 ] && [ "$rc" -lt 124 ] && [ ! -s mallory.out ] || fail "attach as mallory: status $rc, $(cat mallory.out)"
grep -q 'the server refused the TLS-PSK handshake as username "mallory"' mallory.err \
    || fail "no clear reason: $(cat mallory.err)"
grep -q 'unknown PSK username "mallory"' ringbd.err || fail "the server did not name mallory: $(tail -n 3 ringbd.err)"
rc=0; ringbd attach "nbds+unix:///disk?socket=$PWD/psk.sock&tls-username=carol&tls-psk-file=$PWD/alice.psk" \
    >carol.out 2>carol.err || rc=$?
[ "$rc" != 0 ] && [ ! -s carol.out ] || fail "attach as carol: status $rc, $(cat carol.out)"
grep -q 'no key for username "carol"' carol.err || fail "no clear reason: $(cat carol.err)"
[ "$(devices)" = "$n0" ] || fail "ublk devices before: $n0, after the failed attaches: $(ls /dev | grep '^ublk')"

step "the server still serves alice"
ringbd info "nbds://alice@127.0.0.1:10813/disk?tls-psk-file=$PWD/alice.psk" >info.out 2>info.err \
    || fail "ringbd info after the refusals failed: $(cat info.err)"
grep -q 'export-size: 67108864' info.out || fail "ringbd info: $(cat info.out)"
grep -q 'protocol: .*with TLS' info.out || fail "ringbd info does not report TLS: $(head -n1 info.out)"
ringbd_stop
