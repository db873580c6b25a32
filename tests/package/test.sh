#!/usr/bin/env bash
# The Debian package, end to end (docs/daemon.md):
#
#   1. build it (scripts/package.sh; RINGBD_DEB=PATH tests a package built before),
#   2. install it with apt-get, check that its files are where they belong,
#   3. `systemd-analyze verify` the installed units,
#   4. run ringbd@.service's own ExecStartPre and ExecStart lines (read from the
#      installed unit) under systemd-socket-activate as an unprivileged user, read
#      the exports with nbdinfo, reload with SIGHUP as ExecReload does, stop with
#      SIGTERM and check the exit status,
#   5. `apt-get remove --purge` it and check that none of its files is left.
#
# No running systemd is needed. Needs root or sudo (it installs the package).
# Idempotent: a package left installed by an earlier run is replaced, and
# whatever this run installs or writes is removed on exit, failed or not.
# Every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."

T0=$SECONDS
step() { printf '== package: %s\n' "$*"; }
fail() { printf 'package test: FAILED: %s\n' "$*" >&2; exit 1; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
for t in apt-get dpkg systemd-analyze systemd-socket-activate nbdinfo setpriv; do
    command -v "$t" >/dev/null || fail "$t is missing (scripts/install-deps.sh installs it)"
done

instance="pkgtest"
conf="/etc/ringbd/$instance.toml"
work="$(mktemp -d)"
server=""
cleanup() {
    if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
        kill -KILL "$server" 2>/dev/null || true
    fi
    $sudo rm -f "$conf"
    if dpkg-query -W -f='${Status}' ringbd 2>/dev/null | grep -q installed; then
        $sudo apt-get -o DPkg::Lock::Timeout=600 remove --purge -y -qq ringbd >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

step "build"
if [ -n "${RINGBD_DEB:-}" ]; then
    deb="$RINGBD_DEB"
else
    deb="$(scripts/package.sh | tail -n 1)"
fi
[ -f "$deb" ] || fail "no package at $deb"
deb="$(realpath "$deb")"
echo "$deb"

step "install"
# --reinstall: idempotent when an earlier run left the same version installed.
DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install --reinstall -y -qq "$deb" >/dev/null
dpkg-query -L ringbd >"$work/files"
for f in /usr/bin/ringbd /lib/systemd/system/ringbd@.service /lib/systemd/system/ringbd@.socket \
         /lib/systemd/system/ringbd-attach@.service /usr/libexec/ringbd/attach-or-recover \
         /etc/ringbd/example.toml /usr/share/bash-completion/completions/ringbd \
         /usr/share/zsh/vendor-completions/_ringbd /usr/share/fish/vendor_completions.d/ringbd.fish; do
    [ -e "$f" ] || fail "$f is not installed"
done
# A man page for every subcommand clap knows.
for sub in $(ringbd --help | sed -n '/^Commands:/,/^$/s/^  \([a-z][a-z-]*\) .*/\1/p' | grep -vx help); do
    [ -e "/usr/share/man/man1/ringbd-$sub.1.gz" ] || fail "no man page for ringbd $sub"
done
grep -qx /etc/ringbd/example.toml /var/lib/dpkg/info/ringbd.conffiles || fail "example.toml is not a conffile"
ringbd serve --check-config /etc/ringbd/example.toml >/dev/null || fail "the shipped example.toml does not check"

step "systemd-analyze verify"
# Templates are checked as an instance (systemd-analyze instantiates them).
timeout 60 systemd-analyze verify /lib/systemd/system/ringbd@.socket /lib/systemd/system/ringbd@.service \
    /lib/systemd/system/ringbd-attach@.service 2>&1 | tee "$work/verify"
[ ! -s "$work/verify" ] || fail "systemd-analyze verify complained (above)"

step "the service's command line under systemd-socket-activate"
unit=/lib/systemd/system/ringbd@.service
pre="$(sed -n 's/^ExecStartPre=//p' "$unit" | sed "s/%i/$instance/g")"
start="$(sed -n 's/^ExecStart=//p' "$unit" | sed "s/%i/$instance/g")"
[ -n "$start" ] || fail "no ExecStart= in $unit"
metrics_port=$((20000 + RANDOM % 20000))
printf 'metrics = "127.0.0.1:%d"\n\n[[export]]\nspec = "memory:64M"\n\n[[export]]\nname = "b"\nspec = "null:1G"\nread_only = true\n' \
    "$metrics_port" | $sudo tee "$conf" >/dev/null
$sudo chmod 644 "$conf"
# The unit runs as a dynamic user with no capabilities: nobody is close.
as_nobody=(setpriv --reuid=nobody --regid=nogroup --clear-groups --no-new-privs)
# shellcheck disable=SC2086 # the unit's command lines, split as systemd splits these
$sudo "${as_nobody[@]}" $pre || fail "ExecStartPre ($pre) failed"
sock="$work/nbd.sock"
chmod 755 "$work"
# shellcheck disable=SC2086
$sudo systemd-socket-activate -l "$sock" -- "${as_nobody[@]}" $start >"$work/out" 2>"$work/err" &
server=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || fail "systemd-socket-activate made no socket in 10s: $(cat "$work/err")"
$sudo chmod 666 "$sock"
uri="nbd+unix:///?socket=$sock"
size="$(timeout 20 nbdinfo --size "$uri")" || fail "nbdinfo could not read the export: $(cat "$work/err")"
[ "$size" = $((64 << 20)) ] || fail "export size $size, expected 64 MiB"
timeout 20 nbdinfo --list "$uri" >"$work/list" || fail "nbdinfo --list failed: $(cat "$work/err")"
grep -q 'export="b"' "$work/list" || fail "export b is not listed: $(cat "$work/list")"
grep -q 'is_read_only: true' "$work/list" || fail "export b is not read-only"
echo "nbdinfo: size $size, exports: $(grep -c '^export=' "$work/list")"
# The metrics the config file asked for, counting what nbdinfo just did.
scrape="$(timeout 20 python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
    "http://127.0.0.1:$metrics_port/metrics")" || fail "no metrics on 127.0.0.1:$metrics_port: $(cat "$work/err")"
grep -q '^ringbd_connections_total{export=""} [1-9]' <<<"$scrape" \
    || fail "the metrics did not count nbdinfo's connections: $(grep connections <<<"$scrape")"
echo "metrics: $(grep -c '^ringbd_' <<<"$scrape") samples, $(grep '^ringbd_connections_total{export=""}' <<<"$scrape")"

# ExecReload: SIGHUP re-reads the exports.
printf '[[export]]\nspec = "memory:64M"\n\n[[export]]\nname = "c"\nspec = "memory:1M"\n' | $sudo tee "$conf" >/dev/null
pid="$(pgrep -P "$server" -x ringbd || echo "$server")"
$sudo kill -HUP "$pid"
for _ in $(seq 100); do grep -q 'reload:' "$work/err" && break; sleep 0.1; done
grep -q 'reload: added "c"; removed "b"' "$work/err" || fail "no reload logged: $(cat "$work/err")"
[ "$(timeout 20 nbdinfo --size "nbd+unix:///c?socket=$sock")" = $((1 << 20)) ] || fail "export c not served after the reload"

$sudo kill -TERM "$pid"
status=0
timeout 30 tail --pid="$server" -f /dev/null || fail "ringbd did not exit within 30s of SIGTERM"
wait "$server" || status=$?
server=""
[ "$status" -eq 0 ] || fail "ringbd exited $status on SIGTERM: $(cat "$work/err")"
! grep -q panicked "$work/err" || fail "ringbd panicked: $(cat "$work/err")"

step "remove --purge"
$sudo rm -f "$conf"
DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 remove --purge -y -qq ringbd >/dev/null
! dpkg-query -W -f='${Status}' ringbd 2>/dev/null | grep -q installed || fail "ringbd is still installed"
left=()
while read -r f; do
    [ -e "$f" ] || continue
    if [ ! -d "$f" ]; then
        left+=("$f")
    # A directory stays if another package owns it (/usr/bin) or it holds
    # other files; an empty one that nothing owns is ours, left behind.
    elif [ -z "$(dpkg-query -S "$f" 2>/dev/null)" ] && [ -z "$(ls -A "$f")" ]; then
        left+=("$f")
    fi
done <"$work/files"
for d in /etc/ringbd /usr/libexec/ringbd /usr/share/doc/ringbd; do
    [ ! -e "$d" ] || left+=("$d")
done
[ ${#left[@]} -eq 0 ] || fail "left behind after purge: ${left[*]}"

printf '== package: ok in %ds\n' $((SECONDS - T0))
