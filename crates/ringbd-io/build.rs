//! Links librbd and librados when the `rbd` feature is on (Debian:
//! librbd-dev, librados-dev; scripts/install-deps.sh installs them).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_RBD").is_some() {
        println!("cargo:rustc-link-lib=dylib=rbd");
        println!("cargo:rustc-link-lib=dylib=rados");
    }
}
