#!/usr/bin/env bash
# Makes qemu's rbd block driver available to the installed qemu-utils 10
# without installing anything system-wide: downloads Debian's
# qemu-block-extra of exactly the installed qemu-utils version (apt-get
# download; for a bookworm-backports qemu, from that suite through a private
# apt list directory) and unpacks it with dpkg -x into DIR. Prints the module
# directory to pass as QEMU_MODULE_DIR. Idempotent (cached in DIR).
#
#   tests/ceph/qemu-rbd.sh DIR     # e.g. target/rbd-cache/qemu
set -euo pipefail
dir=${1:?usage: $0 DIR}
say() { echo "qemu-rbd.sh: $*" >&2; }

ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) || { say "qemu-utils is not installed"; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
vdir="$dir/${ver//[^A-Za-z0-9.+-]/_}"   # no ':' or '~' in paths
mods="$vdir/usr/lib/x86_64-linux-gnu/qemu"
if [[ -f $mods/block-rbd.so ]]; then
    echo "$mods"
    exit 0
fi
work="$dir/apt"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
opts=()
if [[ $ver == *bpo12* ]]; then
    # The suite apt may not know: a private source list and list directory.
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$work/sources.list"
    opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache")
    timeout 300 apt-get "${opts[@]}" update -qq || { say "apt-get update of bookworm-backports failed"; exit 1; }
fi
# apt's sandbox user cannot write here: download as root, quietly.
(cd "$work/deb" && timeout 300 apt-get "${opts[@]}" -o APT::Sandbox::User=root download -qq "qemu-block-extra=$ver") \
    || { say "no qemu-block-extra $ver to download"; exit 1; }
deb=$(ls "$work/deb"/qemu-block-extra_*.deb | head -n 1)
mkdir -p "$vdir"
dpkg -x "$deb" "$vdir"
[[ -f $mods/block-rbd.so ]] || { say "$deb has no block-rbd.so"; exit 1; }
rm -rf "$work"
echo "$mods"
