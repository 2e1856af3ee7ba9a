//! The Hutch virtual machine monitor, hypervisor-neutral.
//!
//! ```text
//!   app (hutch) ──▶ machine::Machine ──▶ hypervisor::{Hypervisor, Vm, Vcpu}  ◀── backend-kvm / backend-hvf
//!                        │
//!                        ├─ memory       guest RAM (owned here, mapped by the backend)
//!                        ├─ arch::x86_64 boot (bzImage / PVH), e820, ACPI tables, layout
//!                        ├─ devices      buses, 16550 serial, i8042, CMOS RTC, ACPI PM
//!                        ├─ pci          host bridge, config space (0xCF8 and ECAM)
//!                        └─ virtio       virtio-pci transport (MSI-X), blk, rng
//! ```
//! Devices see guest memory, their queues and an [`hypervisor::InterruptSink`]; never a backend.

pub mod arch;
pub mod board;
#[cfg(target_arch = "x86_64")]
pub mod conformance;
pub mod devices;
pub mod fsutil;
pub mod hypervisor;
pub mod machine;
pub mod memory;
pub mod pci;
pub mod snapshot;
pub mod state;
pub mod sys;
#[cfg(test)]
pub(crate) mod testing;
pub mod virtio;

/// Formats an error with its whole `source()` chain on one line ("a: b: c").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
