#!/usr/bin/env bash
# Builds the Debian package: target/debian/ringbd_VERSION-1_ARCH.deb.
#
#   scripts/package.sh                      # with Ceph RBD (the build scripts/test.sh tests)
#   PACKAGE_FEATURES= scripts/package.sh    # without: no librbd1/librados2 dependency
#
# The release binary (stripped), its man pages (`ringbd generate man`) and
# shell completions (`ringbd generate completions`), the systemd units and
# the example configuration of packaging/, the docs. Built with Debian's own
# tools, dpkg-shlibdeps (the library dependencies) and dpkg-deb, which every
# Debian machine has (dpkg-dev: scripts/install-deps.sh), rather than
# cargo-deb: the same package, without compiling a packaging tool from
# crates.io on every fresh CI machine (3.5 minutes measured). Prints the
# package's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

features="${PACKAGE_FEATURES-rbd}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
for t in dpkg-deb dpkg-shlibdeps dpkg-architecture strip gzip; do
    command -v "$t" >/dev/null || { echo "package.sh: $t is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done

cargo build --release --locked -p ringbd ${features:+--features "$features"}
bin="$target/release/ringbd"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[ -n "$version" ] || { echo "package.sh: no version in Cargo.toml" >&2; exit 1; }
arch="$(dpkg-architecture -qDEB_HOST_ARCH)"

root="$target/debian/root"
rm -rf "$root"
mkdir -p "$root/DEBIAN"
# The release profile keeps line tables for backtraces in the tree, not in the package.
install -D -m 755 "$bin" "$root/usr/bin/ringbd"
strip --strip-debug "$root/usr/bin/ringbd"
# Generated from the clap definitions of this very binary; man pages
# compressed reproducibly (Debian policy 12.1).
man="$root/usr/share/man/man1"
"$bin" generate man "$man"
gzip -9n "$man"/*.1
comp() { install -d "$root/$(dirname "$2")"; "$bin" generate completions "$1" >"$root/$2"; }
comp bash usr/share/bash-completion/completions/ringbd
comp zsh usr/share/zsh/vendor-completions/_ringbd
comp fish usr/share/fish/vendor_completions.d/ringbd.fish
for u in ringbd@.service ringbd@.socket ringbd-attach@.service; do
    install -D -m 644 "packaging/systemd/$u" "$root/lib/systemd/system/$u"
done
install -D -m 755 packaging/attach-or-recover "$root/usr/libexec/ringbd/attach-or-recover"
install -D -m 644 packaging/example.toml "$root/etc/ringbd/example.toml"
doc="$root/usr/share/doc/ringbd"
install -D -m 644 docs/daemon.md "$doc/daemon.md"
install -D -m 644 README.md "$doc/README.md"
printf 'ringbd\n\nCopyright: ringbd developers\nLicense: MIT OR Apache-2.0\n' >"$doc/copyright"

# The shared libraries the binary links, as package dependencies (what
# cargo-deb's `depends = "$auto"` runs too). dpkg-shlibdeps wants a source
# package's debian/control around it.
shl="$(mktemp -d)"
trap 'rm -rf "$shl"' EXIT
mkdir -p "$shl/debian"
printf 'Source: ringbd\n\nPackage: ringbd\nArchitecture: any\n' >"$shl/debian/control"
depends="$(cd "$shl" && dpkg-shlibdeps -O -e "$root/usr/bin/ringbd" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
[ -n "$depends" ] || { echo "package.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat >"$root/DEBIAN/control" <<EOF
Package: ringbd
Version: $version-1
Architecture: $arch
Maintainer: ringbd developers <ringbd@localhost>
Section: admin
Priority: optional
Installed-Size: $size
Depends: $depends
Description: userspace network block storage on io_uring
 ringbd serve: an NBD server on io_uring (memory, file, block device,
 Ceph RBD and NBD exports; TLS; reloadable TOML configuration); ringbd
 attach: any of those as a ublk block device with crash recovery; ringbd
 info, copy and bench: NBD client tools. systemd units: ringbd@.socket and
 ringbd@.service serve /etc/ringbd/NAME.toml by socket activation;
 ringbd-attach@.service keeps a ublk device across restarts.
EOF
echo /etc/ringbd/example.toml >"$root/DEBIAN/conffiles"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"

out="$target/debian/ringbd_${version}-1_${arch}.deb"
rm -f "$target"/debian/ringbd_*.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "$out"
