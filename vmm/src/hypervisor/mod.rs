//! The backend-neutral hypervisor interface: `Hypervisor` → `Vm` → `Vcpu`.
//!
//! ```text
//!  Hypervisor ──create_vm──▶ Vm (Send + Sync, shared by all threads)
//!                              │  map_memory / irq lines / MSI / save+restore
//!                              └─create_vcpu (on the vCPU's own thread)──▶ Vcpu (!Send)
//!                                                     run(&mut dyn ExitHandler)
//! ```
//!
//! No platform type appears here: guest RAM is owned by `vmm` and only mapped by a backend,
//! exits are finished by the backend through [`ExitHandler`], and backend state crosses the
//! trait as plain serde data ([`VcpuState`], [`VmState`]) so snapshots can store it.
//! Registers are per architecture: `x86_64.rs` / `aarch64.rs` hold an extension trait of
//! [`Vcpu`] each, compiled only for their target; [`ArchVcpu`] names this target's.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::{
    Aarch64CoreRegs, Aarch64CoreRegs as ArchRegs, VcpuAarch64, VcpuAarch64 as ArchVcpu,
};
#[cfg(target_arch = "x86_64")]
pub use x86_64::{
    VcpuX86_64, VcpuX86_64 as ArchVcpu, X86DescriptorTable, X86Regs, X86Segment, X86Sregs,
    X86VcpuRegs, X86VcpuRegs as ArchRegs,
};

/// Errors from a hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The backend cannot be used on this host at all (no /dev/kvm, wrong OS, ...).
    #[error("Hypervisor {backend} is not available: {reason}")]
    Unavailable { backend: &'static str, reason: String },
    /// A call into the host hypervisor failed.
    #[error("Hypervisor call {op} failed")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor met guest code it could not run (KVM_EXIT_INTERNAL_ERROR and kin).
    #[error(
        "The hypervisor could not emulate guest code (internal error, suberror {suberror}) at \
         rip {rip:#x}{detail}; this host's KVM is probably not hardware-assisted"
    )]
    EmulationFailure { suberror: u32, rip: u64, detail: String },
    /// The hypervisor refused to enter the guest (bad state, e.g. invalid guest registers).
    #[error("The hypervisor could not enter the guest (reason {reason:#x})")]
    FailEntry { reason: u64 },
    /// An exit the backend does not know how to finish.
    #[error("Unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// The backend does not offer this feature; the caller takes its slower path.
    #[error("The hypervisor backend does not support {0}")]
    Unsupported(&'static str),
    /// Saved state that does not fit this backend or this VM.
    #[error("Invalid backend state: {0}")]
    InvalidState(String),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Finishes port I/O and MMIO exits. The backend calls it during [`Vcpu::run`] and completes
/// the guest instruction itself (KVM: on the next KVM_RUN; HVF: write the register, advance PC).
pub trait ExitHandler {
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    fn pio_write(&mut self, port: u16, data: &[u8]);
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned. I/O exits never show up here: the handler finished them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// An I/O or MMIO access was handled; run again.
    Io,
    /// The guest executed HLT (only without an in-kernel irqchip).
    Halt,
    /// The guest asked for a reset (a hypervisor-level reset event, PSCI reset).
    Reset,
    /// The guest crashed: a fault it could not handle (x86: a triple fault), not a reboot.
    /// [`ArchVcpu::crash_detail`] says where.
    Crash,
    /// The guest powered off through a hypervisor-level event (PSCI off, KVM system event).
    Shutdown,
    /// [`VcpuKicker::kick`] interrupted the run.
    Interrupted,
}

/// Forces a running vCPU out of [`Vcpu::run`] from any thread.
pub trait VcpuKicker: Send + Sync {
    fn kick(&self);
}

/// A memory region of host memory mapped as guest RAM.
#[derive(Debug, Clone, Copy)]
pub struct GuestRamMapping {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: *mut u8,
    pub readonly: bool,
    /// Record which pages the guest writes, for [`Vm::take_dirty_pages`].
    pub track_dirty: bool,
}

/// Everything a backend needs to know to create a VM.
#[derive(Debug, Clone)]
pub struct VmSetup {
    pub vcpu_count: u32,
    /// Guest-physical address of the IOAPIC / interrupt controller, for backends that place it.
    pub ioapic_addr: u64,
}

/// Delivers interrupts into the guest. Devices get this (as `Arc<dyn InterruptSink>`), never
/// the `Vm` itself.
pub trait InterruptSink: Send + Sync {
    /// Drive a legacy interrupt line (GSI) high or low.
    fn set_irq_line(&self, gsi: u32, active: bool) -> Result<()>;
    /// Deliver one message-signalled interrupt.
    fn signal_msi(&self, address: u64, data: u32) -> Result<()>;
}

/// Guest writes to one address, caught by the hypervisor without a vCPU exit to the VMM
/// (KVM: an ioeventfd). Dropping it unregisters the address: writes exit as MMIO again.
pub trait GuestNotifier: Send + Sync {
    /// Blocks until the guest wrote the address, or [`GuestNotifier::wake`] was called, at
    /// least once since the last return (several writes may coalesce into one wake-up).
    fn wait(&self) -> Result<()>;
    /// Wakes the waiter from the host side (to make it look at a stop request).
    fn wake(&self);
}

/// Registers [`GuestNotifier`]s. A narrow view of the [`Vm`] that devices may hold.
pub trait NotifierRegistry: Send + Sync {
    /// Guest writes of exactly `len` bytes (1, 2, 4 or 8) to guest-physical `addr` signal the
    /// returned notifier instead of exiting as MMIO. Writes of other sizes still exit.
    /// [`HypervisorError::Unsupported`] when the backend has no such mechanism.
    fn register_notifier(&self, addr: u64, len: u32) -> Result<Box<dyn GuestNotifier>>;
}

/// A [`NotifierRegistry`] over a whole VM (the VM keeps its other powers to itself).
pub struct VmNotifiers(pub Arc<dyn Vm>);

impl NotifierRegistry for VmNotifiers {
    fn register_notifier(&self, addr: u64, len: u32) -> Result<Box<dyn GuestNotifier>> {
        self.0.register_notifier(addr, len)
    }
}

/// One hypervisor (KVM, Hypervisor.framework).
pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;
    fn create_vm(&self, setup: &VmSetup) -> Result<Arc<dyn Vm>>;
}

/// One virtual machine. Shared by the VMM's threads.
pub trait Vm: InterruptSink {
    /// Maps host memory into the guest-physical address space.
    ///
    /// # Safety
    /// `mapping.host_addr .. + mapping.size` must be a valid, page-aligned host mapping that
    /// outlives the VM (the guest writes it behind Rust's back).
    unsafe fn map_memory(&self, mapping: GuestRamMapping) -> Result<()>;

    /// Removes the mapping [`Vm::map_memory`] made as `slot` (at `guest_addr`, `size` bytes):
    /// afterwards guest accesses there exit as MMIO, and the slot may be mapped again.
    fn unmap_memory(&self, slot: u32, guest_addr: u64, size: u64) -> Result<()>;

    /// Creates vCPU `id`. Call it on the thread that will run the vCPU; the result never
    /// leaves that thread. It comes with its architecture's extension ([`ArchVcpu`]).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn ArchVcpu>>;

    /// See [`NotifierRegistry::register_notifier`]. Backends without a way to catch guest
    /// writes in the hypervisor keep this default: the VMM then handles them as MMIO exits.
    fn register_notifier(&self, _addr: u64, _len: u32) -> Result<Box<dyn GuestNotifier>> {
        Err(HypervisorError::Unsupported("guest notifiers"))
    }

    /// The pages of slot `slot` (`size` bytes, mapped with `track_dirty`) the guest wrote
    /// since the previous call, one bit per 4 KiB page (page `i` is bit `i % 64` of word
    /// `i / 64`); the next round starts empty. Backends without dirty logging keep this
    /// default, and the caller compares the whole region instead.
    fn take_dirty_pages(&self, _slot: u32, _size: u64) -> Result<Vec<u64>> {
        Err(HypervisorError::Unsupported("dirty page tracking"))
    }

    /// Saves VM-wide backend state (interrupt controllers, timers, clock).
    fn save_state(&self) -> Result<VmState>;
    fn restore_state(&self, state: &VmState) -> Result<()>;
}

/// One virtual CPU, bound to the thread that created it. Architecture-neutral: registers are
/// reached through the per-architecture extension ([`ArchVcpu`], crosvm's pattern).
pub trait Vcpu {
    fn id(&self) -> u32;
    /// Runs the guest until an exit that the VMM must see.
    fn run(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuExit>;
    fn kicker(&self) -> Arc<dyn VcpuKicker>;

    fn save_state(&self) -> Result<VcpuState>;
    fn restore_state(&mut self, state: &VcpuState) -> Result<()>;
}

/// Saved state of one vCPU. The architecture's registers are typed ([`ArchRegs`]);
/// everything else the backend needs (FPU, XSAVE, XCRs, MSRs, LAPIC, pending events, debug
/// registers, MP state) travels as named, backend-encoded blobs that only the same backend can
/// read back. The bincode layout is format-visible: `regs` encodes its fields in place, so
/// the x86 state reads exactly as snapshot format 1 wrote it (`backend, regs, sregs, blobs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub backend: String,
    pub regs: ArchRegs,
    pub blobs: BTreeMap<String, Vec<u8>>,
}

/// Saved VM-wide backend state (irqchips, PIT, clock), as named backend-encoded blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub backend: String,
    pub blobs: BTreeMap<String, Vec<u8>>,
}
