//! Links libslirp by name (no pkg-config: Debian's `slirp.pc` requires glib's development files,
//! which the FFI in `src/slirp/sys.rs` does not need). `SLIRP_LIB_DIR` adds a search directory,
//! e.g. Homebrew's `lib` on macOS.

fn main() {
    println!("cargo:rerun-if-env-changed=SLIRP_LIB_DIR");
    if let Some(dir) = std::env::var_os("SLIRP_LIB_DIR") {
        println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
    }
    println!("cargo:rustc-link-lib=slirp");
}
