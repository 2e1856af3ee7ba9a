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
pub mod conformance;
pub mod devices;
pub mod hypervisor;
pub mod machine;
pub mod memory;
pub mod pci;
pub mod virtio;
