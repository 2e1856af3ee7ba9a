//! The Q35 chipset functions firmware programs (FIRMWARE.md §2.4, §3.3, §6 step 6), as
//! standalone devices a Q35 board wires up:
//!
//! ```text
//!  00:00.0  Mch       8086:29C0  PCIEXBAR ─▶ EcamDecode + hook ─▶ board moves ECAM
//!                                PAM0–6, SMRAM, ESMRAMC: storage (no SMM, no shadow RAM)
//!  00:1f.0  Ich9Lpc   8086:2918  PMBASE, ACPI_CNTL ─▶ LpcView + hook ─▶ board gates/moves
//!                                PIRQA–H ─▶ LpcView (a future INTx router)     the PM block
//!  PMBASE   Ich9Pm    128 ports  PM1, PM timer, GPE0, SMI_EN (0x20), SMI_STS; SCI level
//!  0xCF9    ResetControl         RST_CPU (bit 2) ─▶ reset callback
//!  0x92     Port92               fast reset (bit 0) ─▶ reset callback; A20 reads 1
//! ```
//!
//! Hooks run on the vCPU thread doing the configuration write, with the PCI root and the
//! device locked: a hook must not lock the PCI root (it may lock other devices, such as the
//! PM block, or record the change for the board to apply).

pub mod lpc;
pub mod mch;
pub mod persist;
pub mod pm;
pub mod reset;

pub use lpc::{Ich9Lpc, LpcView, PmDecode, LPC_BDF};
pub use mch::{EcamDecode, EcamWindow, Mch, MCH_BDF};
pub use persist::{Ich9LpcState, Ich9PmState, MchState, Port92State, ResetControlState};
pub use pm::Ich9Pm;
pub use reset::{Port92, ResetControl, PORT92_PORT, RESET_CONTROL_PORT};

/// QEMU's subsystem ID for every function it emulates (Red Hat / QEMU), which firmware and
/// guests see on a Q35 machine.
pub const QEMU_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
pub const QEMU_SUBSYSTEM_ID: u16 = 0x1100;
pub const INTEL_VENDOR_ID: u16 = 0x8086;

/// Whether a write of `len` bytes at byte `offset` of configuration dword `reg` touches
/// configuration bytes `start..start + size`.
fn write_overlaps(reg: usize, offset: u64, len: usize, start: usize, size: usize) -> bool {
    let first =
        usize::try_from(offset).ok().and_then(|offset| reg.checked_mul(4)?.checked_add(offset));
    let Some(first) = first else {
        return false;
    };
    first < start + size && first.checked_add(len).is_some_and(|end| start < end)
}
