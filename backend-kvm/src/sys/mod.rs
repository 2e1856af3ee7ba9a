//! Platform code. Only Linux has KVM, and only its x86_64 side is written so far.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod linux;
