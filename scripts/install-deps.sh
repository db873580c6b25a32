#!/usr/bin/env bash
# Installs what the test suite needs, from Debian's packages. Idempotent:
# does nothing when everything is present. Never replaces qemu-utils 10
# (it is the qemu that speaks NBD extended headers). apt waits up to 10
# minutes for a lock another apt run holds.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdkit   || need+=(nbdkit)
have nbdinfo  || need+=(libnbd-bin)
have nbdcopy  || need+=(libnbd-bin)
have fio      || need+=(fio)
have qemu-img || need+=(qemu-utils)
have nbd-server || need+=(nbd-server)
have openssl  || need+=(openssl)   # makes the TLS tests' certificates
# The build links the system's libssl for TLS-PSK (crates/ringbd-psk), found with pkg-config.
have pkg-config || need+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || need+=(libssl-dev)
# Ceph RBD (docs/rbd.md): librbd/librados to build the rbd feature; the
# daemons and CLI for the single-node test cluster (tests/ceph/cluster.sh).
[ -e /usr/include/rbd/librbd.h ]      || need+=(librbd-dev)
[ -e /usr/include/rados/librados.h ]  || need+=(librados-dev)
have ceph-mon || need+=(ceph-mon)
have ceph-osd || need+=(ceph-osd)
have ceph-mgr || need+=(ceph-mgr)
have rbd      || need+=(ceph-common)
# The Debian package (scripts/package.sh, tests/package/test.sh): its
# dependencies (dpkg-shlibdeps), the unit checks and socket activation.
have dpkg-shlibdeps || need+=(dpkg-dev)
have systemd-analyze || need+=(systemd)
have systemd-socket-activate || need+=(systemd)
/usr/bin/python3 -c 'import nbd' 2>/dev/null   || need+=(python3-libnbd)
/usr/bin/python3 -c 'import pytest' 2>/dev/null || need+=(python3-pytest)

if ((${#need[@]})); then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    echo "install-deps: installing ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # Wait for a concurrent apt or dpkg instead of failing on its lock.
    lock=(-o DPkg::Lock::Timeout=600)
    $sudo apt-get "${lock[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get "${lock[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Fail loudly rather than let a test skip: every tool must be here now.
for t in nbdkit nbdinfo nbdsh nbdcopy fio qemu-img qemu-io qemu-nbd nbd-server openssl pkg-config \
         ceph-mon ceph-osd ceph-mgr ceph rbd monmaptool dpkg-shlibdeps systemd-analyze systemd-socket-activate; do
    have "$t" || { echo "install-deps: $t is still missing" >&2; exit 1; }
done
pkg-config --exists openssl || { echo "install-deps: libssl-dev is still missing (pkg-config openssl)" >&2; exit 1; }
[ -e /usr/include/rbd/librbd.h ] && [ -e /usr/include/rados/librados.h ] \
    || { echo "install-deps: librbd-dev/librados-dev missing" >&2; exit 1; }
# The Ceph benchmark (bench/rbd.sh) compares with fio's own rbd engine.
fio --enghelp 2>/dev/null | grep -qw rbd || { echo "install-deps: this fio has no rbd engine" >&2; exit 1; }
/usr/bin/python3 -c 'import nbd, pytest' || { echo "install-deps: python3-libnbd/pytest missing" >&2; exit 1; }
