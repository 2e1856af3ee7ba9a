//! Platform code. Only Linux has KVM.

#[cfg(target_os = "linux")]
pub mod linux;
