//! Gives `libtunnel.so` a versioned SONAME (`libtunnel.so.MAJOR.MINOR`): until 1.0 every minor
//! release may break the ABI, so programs linked against one minor never load another.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets the package version");
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").expect("cargo sets the package version");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtunnel.so.{major}.{minor}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
