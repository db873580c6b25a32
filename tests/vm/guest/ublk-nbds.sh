#!/bin/sh
# The ublk frontend on the NBD-client backend over TLS: `ringbd attach nbds+unix://...` and
# `nbds://127.0.0.1:PORT/...` against `ringbd serve --tls-certificates` in
# the same VM (certificates made on the host by run.sh, in /vmtest/pki).
# Each of the backend's connections does STARTTLS and runs its TLS session
# in the client's worker: a pattern written with O_DIRECT reads back, also through a
# second attach over TCP; mkfs.ext4, files, e2fsck clean. Then a server
# killed with SIGKILL under a running writer and started again: the backend
# reconnects with a new STARTTLS and TLS handshake, the writer finishes, every
# block reads back. Last, a server without TLS: the attach is refused (no
# plaintext fallback), with the reason.
. /vmtest/lib.sh

PKI=/vmtest/pki
[ -f $PKI/client/ca-cert.pem ] || skip "no test certificates (openssl missing on the host)"
tls() { grep -c 'TLS established' ringbd.err || true; }

step "load ublk_drv"
load_module ublk_drv
wait_for 5 test -c /dev/ublk-control || fail "/dev/ublk-control did not appear"

step "serve memory:128M with TLS required on a unix socket and TCP; attach with 2 queues"
ringbd_start --export disk=memory:128M --unix "$PWD/tls.sock" --listen 127.0.0.1:10812 \
    --tls-certificates $PKI/server --verbose
case $RINGBD_URI in nbds*) ;; *) fail "ringbd printed $RINGBD_URI, not an nbds:// URI" ;; esac
ublk_attach "nbds+unix:///disk?socket=$PWD/tls.sock&tls-certificates=$PKI/client" --queues 2 --depth 32
[ "$(blockdev --getsize64 "$UBLK_DEV")" = 134217728 ] || fail "$UBLK_DEV is not 128 MiB"
# One session per connection of the NBD backend (4: the export has multi-conn).
wait_for 10 sh -c '[ "$(grep -c "TLS established" ringbd.err)" -ge 4 ]' \
    || fail "ringbd saw $(tls) TLS session(s), expected the backend's 4: $(tail -n 5 ringbd.err)"
log "ringbd: $(grep -m1 'TLS established' ringbd.err)"

step "pattern: O_DIRECT writes at 0, 100 MiB and the last MiB, read back"
ublk_pattern 128 4 100

step "read back through a fresh attach over TCP (nbds://127.0.0.1)"
ublk_detach
ublk_attach "nbds://127.0.0.1:10812/disk?tls-certificates=$PKI/client" --queues 1
dd if="$UBLK_DEV" bs=1M skip=100 count=4 iflag=direct 2>/dev/null | cmp -s - pat || fail "data at 100 MiB differs after re-attach"
dd if="$UBLK_DEV" bs=1M skip=127 iflag=direct 2>/dev/null | cmp -s - pat1 || fail "data in the last MiB differs after re-attach"
log "pattern ok over TLS (unix socket, then TCP)"

check_ext4 "$UBLK_DEV"
ublk_detach
counts=$(grep 'requests (' attach.err | tail -n1)
log "$counts"
echo "$counts" | grep -q ', 0 failed' || fail "requests failed: $counts"
ringbd_stop

step "reconnect over TLS: serve file:disk.img, attach, writer running, SIGKILL the server"
truncate -s 64M disk.img
ringbd_start --unix "$PWD/file.sock" --tls-certificates $PKI/server --verbose "file:$PWD/disk.img"
uri="nbds+unix:///?socket=$PWD/file.sock&tls-certificates=$PKI/client"
ublk_attach "$uri" --queues 2 --depth 16
dd if=/dev/urandom of=pat2 bs=1M count=2 2>/dev/null
(
    i=0
    while [ $i -lt 8 ]; do
        dd if=pat2 of="$UBLK_DEV" bs=64K seek=$((128 + i * 32)) oflag=direct 2>>writer.err || exit 1
        i=$((i + 1))
    done
) &
writer=$!
on_exit "kill $writer"
wait_for 30 test -s writer.err || true   # first dd done
old=$RINGBD_PID
kill -9 "$old"
wait "$old" 2>/dev/null || true
kill -0 "$writer" 2>/dev/null || fail "the writer finished before the kill; nothing was in flight"
log "killed ringbd serve (pid $old) with the writer still running"
sleep 1
ringbd_start --unix "$PWD/file.sock" --tls-certificates $PKI/server --verbose "file:$PWD/disk.img"
rc=0; wait "$writer" || rc=$?
[ "$rc" = 0 ] || fail "the writer failed across the server restart (status $rc): $(tail -n 3 writer.err); $(tail -n 3 attach.err)"
grep -q 'reconnected' attach.err || fail "ringbd attach did not reconnect: $(tail -n 3 attach.err)"
[ "$(tls)" -ge 1 ] || fail "the reconnected queues did not start TLS: $(tail -n 3 ringbd.err)"
log "writer finished; $(tls) TLS session(s) on the restarted server"
i=0
while [ $i -lt 8 ]; do
    dd if="$UBLK_DEV" bs=1M skip=$((8 + i * 2)) count=2 iflag=direct 2>/dev/null | cmp -s - pat2 \
        || fail "writer's block $i (at $((8 + i * 2)) MiB) differs after the reconnect"
    i=$((i + 1))
done
ublk_detach
ringbd_stop
log "all 8 blocks intact after the TLS reconnect"

step "a server without TLS: nbds:// is refused, never plaintext"
ringbd_start --unix "$PWD/plain.sock" memory:16M
rc=0; ringbd attach "nbds+unix:///?socket=$PWD/plain.sock&tls-certificates=$PKI/client" \
    >plain.out 2>plain.err || rc=$?
[ "$rc" != 0 ] || fail "ringbd attach nbds:// to a plaintext server succeeded: $(cat plain.out)"
[ ! -s plain.out ] || fail "a device was made: $(cat plain.out)"
grep -q 'refused NBD_OPT_STARTTLS' plain.err || fail "no reason given: $(cat plain.err)"
log "refused: $(head -n1 plain.err)"
ringbd_stop
