#!/usr/bin/env bash
# Builds the Debian package: target/debian/ringbd_VERSION-1_ARCH.deb.
#
#   scripts/package.sh                      # with Ceph RBD (the build scripts/test.sh tests)
#   PACKAGE_FEATURES= scripts/package.sh    # without: no librbd1/librados2 dependency
#
# The release binary, its man pages (`ringbd generate man`) and shell
# completions (`ringbd generate completions`), the systemd units and the
# example configuration of packaging/, as [package.metadata.deb] in
# crates/ringbd/Cargo.toml lists them. Installs cargo-deb from crates.io
# when it is missing. Prints the package's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

features="${PACKAGE_FEATURES-rbd}"
target="${CARGO_TARGET_DIR:-$PWD/target}"

if ! cargo deb --version >/dev/null 2>&1; then
    cargo install cargo-deb --locked
fi

cargo build --release --locked -p ringbd ${features:+--features "$features"}
bin="$target/release/ringbd"

# Generated from the clap definitions of this very binary.
gen="$target/release/package"
rm -rf "$gen"
mkdir -p "$gen/completions"
"$bin" generate man "$gen/man"
# Debian policy: compressed, reproducibly (cargo-deb compresses only the
# man pages that are not under the target directory).
gzip -9n "$gen"/man/*.1
"$bin" generate completions bash >"$gen/completions/ringbd.bash"
"$bin" generate completions zsh >"$gen/completions/_ringbd"
"$bin" generate completions fish >"$gen/completions/ringbd.fish"

# --no-build: the binary above is the one packaged (cargo-deb would build
# again with its own idea of the features). --strip: the release profile
# keeps line tables for backtraces in the tree, not in the package.
rm -f "$target"/debian/ringbd_*.deb
cargo deb -p ringbd --no-build --strip --locked ${features:+--features "$features"} >/dev/null
ls "$target"/debian/ringbd_*.deb
