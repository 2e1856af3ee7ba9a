//! The KVM backend of Hutch: implements `vmm::hypervisor::{Hypervisor, Vm, Vcpu}` on Linux's
//! `/dev/kvm` through kvm-ioctls.
//!
//! ```text
//!  KvmHypervisor (/dev/kvm, cached CPUID + MSR list)
//!    └─create_vm──▶ KvmVm (VM fd, in-kernel PIC/IOAPIC/LAPIC + PIT)
//!                     └─create_vcpu──▶ KvmVcpu (vCPU fd, kvm_run) ──kicker──▶ KvmKicker
//! ```
//!
//! All KVM code lives in `sys::linux` (x86_64 so far); elsewhere the crate compiles empty.

mod sys;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub use sys::linux::{kvm_acceleration, KvmAcceleration, KvmHypervisor, KvmKicker};
