#!/usr/bin/env bash
# tests/vm/setup.sh: fetch everything the kernel-in-the-loop VM tests need
# into target/vm-cache/, installing nothing system-wide.
#
# Debian packages are fetched with `apt-get download` and unpacked with
# `dpkg -x` into target/vm-cache/root/ (a private prefix), so nothing here can
# disturb the host's packages: in particular Debian 12's qemu-system-x86 (7.2)
# conflicts with the qemu-utils 10 the interop suite needs, so it is never
# installed, only unpacked and run from the private prefix.
#
# Idempotent: once everything is in place a stamp file records what was
# fetched and a second run does nothing. Remove target/vm-cache/ (or set
# VM_SETUP_FORCE=1) to fetch again.
#
# A second, newer kernel (6.16+, for ublk zero-copy: UBLK_F_AUTO_BUF_REG)
# comes from Debian trixie-backports, which the host's apt need not know:
# its Packages.xz is fetched with curl from deb.debian.org, the newest
# linux-image-6.1[6-9].*+deb13-amd64 picked, its .deb downloaded, checked
# against the SHA256 of its Packages entry and unpacked with `dpkg -x` into
# target/vm-cache/kernel-new/root/ (its own stamp: kernel-new/setup.stamp).
# Everything else (qemu, busybox, e2fsprogs) is shared with the 6.12 setup.
#
# Environment:
#   VM_CACHE        cache dir (default: <repo>/target/vm-cache)
#   VM_KERNEL_PKG   kernel package (default: the newest
#                   linux-image-6.12.*+deb12-amd64-unsigned apt knows of)
#   VM_SETUP_FORCE  1: ignore the stamp and check/fetch everything again
#   VM_SETUP_KERNELS  guest kernels to set up: "6.12 new" (default) or
#                   "6.12" (run.sh passes its VM_KERNEL, so a 6.12 run does
#                   not need trixie-backports); qemu and the guest tools are
#                   always set up
#   VM_NEW_KERNEL_PKG  the new kernel's package (default: the newest
#                   linux-image-6.1[6-9].*+deb13-amd64 that has its modules)
#   VM_NEW_KERNEL_MIRROR  Debian mirror for the new kernel
#                   (default http://deb.debian.org/debian)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${VM_CACHE:-$REPO/target/vm-cache}
DEBS=$CACHE/debs
ROOT=$CACHE/root
STAMP=$CACHE/setup.stamp
MANIFEST=$CACHE/packages.txt
# Bump when the package list or the layout below changes: a cache made by
# an older setup.sh is then refreshed.
LAYOUT=2

say() { printf 'vm-setup: %s\n' "$*"; }
die() { printf 'vm-setup: ERROR: %s\n' "$*" >&2; exit 1; }

# --- the new kernel (trixie-backports) ------------------------------------------
NEW=$CACHE/kernel-new
NEW_STAMP=$NEW/setup.stamp
NEW_LAYOUT=1
MIRROR=${VM_NEW_KERNEL_MIRROR:-http://deb.debian.org/debian}
setup_new_kernel() {
    if [[ ${VM_SETUP_FORCE:-0} != 1 && -f $NEW_STAMP ]] && grep -qx "layout=$NEW_LAYOUT" "$NEW_STAMP"; then
        say "new kernel up to date ($(sed -n 's/^kernel=//p' "$NEW_STAMP")); nothing to do"
        return 0
    fi
    for tool in curl xz sha256sum dpkg; do
        command -v "$tool" >/dev/null || die "$tool not found (needed for the new kernel)"
    done
    mkdir -p "$NEW"
    local idx=$NEW/Packages.xz
    say "fetching $MIRROR/dists/trixie-backports/main/binary-amd64/Packages.xz"
    curl -fsSL --retry 3 -o "$idx.part" "$MIRROR/dists/trixie-backports/main/binary-amd64/Packages.xz" \
        || die "cannot fetch trixie-backports' Packages.xz from $MIRROR"
    mv "$idx.part" "$idx"
    # "package version filename sha256" of every generic amd64 6.16-6.19
    # kernel image (not -cloud, -rt, -dbg, -unsigned) that carries its
    # kernel and modules itself: from 6.19 on Debian splits them into
    # linux-binary-* and linux-modules-* packages (the image then only
    # depends on them), which this does not follow.
    local entries
    entries=$(xz -dc "$idx" | awk -v want="${VM_NEW_KERNEL_PKG:-}" '
        function emit() {
            if (p == "" || f == "" || h == "" || d ~ /linux-(binary|modules)-/) return
            if (want != "" ? p == want : p ~ /^linux-image-6\.1[6-9]\.[0-9]+\+deb13-amd64$/) print p, v, f, h
        }
        /^Package: / { p = $2; v = f = h = d = "" }
        /^Version: / { v = $2 }
        /^Depends: / { d = $0 }
        /^Filename: / { f = $2 }
        /^SHA256: / { h = $2 }
        /^$/ { emit(); p = "" }
        END { emit() }')
    [[ -n $entries ]] || die "no ${VM_NEW_KERNEL_PKG:-linux-image-6.1[6-9].*+deb13-amd64} with its modules in trixie-backports"
    local pkg ver file sum
    read -r pkg ver file sum < <(sort -V -k1,1 -k2,2 <<<"$entries" | tail -n1)
    local deb=$NEW/${file##*/}
    if [[ -f $deb ]] && echo "$sum  $deb" | sha256sum -c --quiet - >/dev/null 2>&1; then
        say "have $pkg $ver"
    else
        rm -f "$NEW"/linux-image-*.deb
        say "downloading $pkg $ver ($file)"
        curl -fsSL --retry 3 -o "$deb.part" "$MIRROR/$file" || die "cannot download $MIRROR/$file"
        echo "$sum  $deb.part" | sha256sum -c --quiet - >/dev/null 2>&1 \
            || die "$file: SHA256 does not match its Packages entry ($sum)"
        mv "$deb.part" "$deb"
    fi
    say "unpacking ${deb##*/}"
    rm -rf "$NEW/root"
    mkdir -p "$NEW/root"
    dpkg -x "$deb" "$NEW/root"
    # trixie's packages put modules under usr/lib/modules (merged /usr).
    local kver moddir
    moddir=$(ls -d "$NEW"/root/usr/lib/modules/*/ "$NEW"/root/lib/modules/*/ 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $moddir ]] || die "no lib/modules in $deb"
    moddir=${moddir%/}
    kver=${moddir##*/}
    [[ -f $NEW/root/boot/vmlinuz-$kver ]] || die "no kernel image vmlinuz-$kver in $deb"
    for m in drivers/block/ublk_drv fs/ext4/ext4; do
        ls "$moddir/kernel/$m.ko"* >/dev/null 2>&1 || die "kernel $kver lacks $m module"
    done
    {
        echo "layout=$NEW_LAYOUT"
        echo "kernel=$kver"
        echo "moddir=${moddir#"$NEW/root/"}"
        echo "$pkg $ver sha256=$sum"
    } >"$NEW_STAMP"
    say "done: new kernel $kver ($pkg $ver) in $NEW/root"
}
WANT_NEW=0
[[ " ${VM_SETUP_KERNELS:-6.12 new} " == *" new "* ]] && WANT_NEW=1

if [[ ${VM_SETUP_FORCE:-0} != 1 && -f $STAMP ]] && grep -qx "layout=$LAYOUT" "$STAMP"; then
    say "cache up to date ($CACHE); nothing to do"
    ((WANT_NEW)) && setup_new_kernel
    exit 0
fi

for tool in apt-get apt-cache dpkg dpkg-query ldd; do
    command -v "$tool" >/dev/null || die "$tool not found (this needs a Debian host)"
done
mkdir -p "$DEBS" "$ROOT"

# --- which packages ---------------------------------------------------------
if [[ -n ${VM_KERNEL_PKG:-} ]]; then
    KPKG=$VM_KERNEL_PKG
else
    # bookworm-security / bookworm-backports ship 6.12 (with nbd and
    # ublk_drv as modules); pick the newest ABI apt knows of.
    find_kernel() {
        apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' \
            | awk '{print $1}' | sort -V | tail -n1
    }
    KPKG=$(find_kernel)
    if [[ -z $KPKG ]]; then
        # A fresh machine may have empty package lists: read them once.
        echo "setup: no 6.12 kernel in apt's lists; running apt-get update"
        apt-get update -qq || die "apt-get update failed"
        KPKG=$(find_kernel)
    fi
    [[ -n $KPKG ]] || die "no linux-image-6.12.*+deb12-amd64-unsigned in apt (run apt-get update; is bookworm-security or bookworm-backports in sources?)"
fi

# Host side: qemu-system-x86 with its ROMs (SeaBIOS; no NIC so no iPXE).
# Guest side: busybox, e2fsprogs (mkfs.ext4, e2fsck), nbd-client.
TOP_PKGS=("$KPKG" qemu-system-x86 qemu-system-data seabios busybox-static e2fsprogs nbd-client)
# Unpacked without following their library dependencies: from
# qemu-system-common only the TCG accelerator module is used
# (usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so; Debian builds TCG as a
# module), not its GUI/audio/USB modules and their many libraries.
NODEPS_PKGS=(qemu-system-common)

installed() {  # is package $1 installed on the host (any version)?
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

# Shared-library dependencies (recursively) of the packages we unpack that are
# not installed on the host: their files are unpacked into the private prefix
# too, so that ldd (for qemu on the host, for the guest's tools) finds them.
lib_deps() {  # print lib* deps of package $1, first alternative of each group
    apt-cache depends "$1" 2>/dev/null | awk '
        /^ *\|?(Pre)?Depends:/ {
            alt = ($1 ~ /^\|/)                 # this one has an alternative after it
            name = $2
            if (!inalt && name !~ /^</ && (name ~ /^lib/ || name ~ /^zlib/)) print name
            inalt = alt
            next
        }'
}

declare -A WANT=()
queue=("${TOP_PKGS[@]}")
for p in "${TOP_PKGS[@]}" "${NODEPS_PKGS[@]}"; do WANT[$p]=1; done
while ((${#queue[@]})); do
    p=${queue[0]}; queue=("${queue[@]:1}")
    while read -r d; do
        [[ -z $d || -n ${WANT[$d]:-} ]] && continue
        if installed "$d"; then WANT[$d]=host; continue; fi
        WANT[$d]=1
        queue+=("$d")
    done < <(lib_deps "$p")
done
FETCH=()
for p in "${!WANT[@]}"; do [[ ${WANT[$p]} == 1 ]] && FETCH+=("$p"); done
mapfile -t FETCH < <(printf '%s\n' "${FETCH[@]}" | sort)

# --- download and unpack ------------------------------------------------------
: >"$MANIFEST.new"
for p in "${FETCH[@]}"; do
    ver=$(apt-cache policy "$p" | awk '/Candidate:/ {print $2}')
    [[ -n $ver && $ver != "(none)" ]] || die "package $p has no candidate version"
    # apt-get download names files <pkg>_<version with : as %3a>_<arch>.deb
    deb=$(ls "$DEBS/${p}_${ver//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
    if [[ -z $deb ]]; then
        rm -f "$DEBS/${p}_"*.deb   # an older version fetched before
        say "downloading $p $ver"
        (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$p=$ver" >/dev/null) \
            || die "apt-get download $p=$ver failed"
        deb=$(ls "$DEBS/${p}_${ver//:/%3a}_"*.deb | head -n1)
    else
        say "have $p $ver"
    fi
    say "unpacking $(basename "$deb")"
    dpkg -x "$deb" "$ROOT"
    printf '%s %s\n' "$p" "$ver" >>"$MANIFEST.new"
done
mv "$MANIFEST.new" "$MANIFEST"

# --- sanity checks --------------------------------------------------------------
LIBPATH=$ROOT/lib/x86_64-linux-gnu:$ROOT/usr/lib/x86_64-linux-gnu
check_ldd() {
    local missing
    missing=$(LD_LIBRARY_PATH=$LIBPATH ldd "$1" 2>&1 | grep 'not found' || true)
    [[ -z $missing ]] || die "$1 misses shared libraries:"$'\n'"$missing"
}
QEMU=$ROOT/usr/bin/qemu-system-x86_64
[[ -x $QEMU ]] || die "qemu-system-x86_64 not found in $ROOT"
check_ldd "$QEMU"
TCG=$ROOT/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so
[[ -f $TCG ]] || die "qemu's TCG module $TCG is missing"
check_ldd "$TCG"
say "$(LD_LIBRARY_PATH=$LIBPATH "$QEMU" --version | head -n1)"
for b in sbin/mke2fs sbin/e2fsck sbin/nbd-client; do
    [[ -x $ROOT/$b ]] || die "$b not found in $ROOT"
    check_ldd "$ROOT/$b"
done
[[ -x $ROOT/bin/busybox ]] || die "busybox not found in $ROOT"
ls "$ROOT"/boot/vmlinuz-* >/dev/null 2>&1 || die "no kernel image in $ROOT/boot"
KVER=$(basename "$(ls -d "$ROOT"/lib/modules/*/ | sort -V | tail -n1)")
for m in drivers/block/nbd drivers/block/ublk_drv fs/ext4/ext4; do
    ls "$ROOT/lib/modules/$KVER/kernel/$m.ko"* >/dev/null 2>&1 || die "kernel $KVER lacks $m module"
done
[[ -f $ROOT/usr/share/seabios/bios-256k.bin ]] || die "SeaBIOS ROM missing"

if command -v qemu-img >/dev/null; then
    say "host $(qemu-img --version | head -n1) (untouched)"
fi
{
    echo "layout=$LAYOUT"
    echo "kernel=$KVER"
    cat "$MANIFEST"
} >"$STAMP"
say "done: kernel $KVER, $(wc -l <"$MANIFEST") packages unpacked into $ROOT (list: $MANIFEST)"
((WANT_NEW)) && setup_new_kernel
exit 0
