//! The Hypervisor.framework backend (macOS on Apple silicon), implementing the traits in
//! `vmm::hypervisor` on `applevisor`. Not written yet: this crate will own HVF VM and vCPU
//! creation, the data-abort decoding that finishes MMIO exits, and the GIC/timer state that
//! crosses the trait as serde data. Its platform code will live under a `sys/macos` module,
//! gated to `target_os = "macos"`, with the pure logic (exit decoding) tested on Linux.
#![forbid(unsafe_code)]
