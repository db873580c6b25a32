//! Links librbd and librados (Debian: librbd-dev, librados-dev;
//! scripts/install-deps.sh installs them). Only built when something
//! depends on this crate: ringbd-io's `rbd` feature.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-lib=dylib=rbd");
    println!("cargo:rustc-link-lib=dylib=rados");
}
