//! The Q35 chipset functions firmware programs (FIRMWARE.md §2.4, §3.3, §6 step 6), as
//! standalone devices a Q35 board wires up:
//!
//! ```text
//!  00:00.0  Mch       8086:29C0  PCIEXBAR ─▶ EcamDecode + hook ─▶ board moves ECAM
//!                                PAM0–6, SMRAM, ESMRAMC: storage (no SMM, no shadow RAM)
//!  00:1f.0  Ich9Lpc   8086:2918  PMBASE, ACPI_CNTL ─▶ LpcView + hook ─▶ board gates/moves
//!                                PIRQA–H ─▶ LpcView: storage                   the PM block
//!                                (INTx reaches IOAPIC lines 16–23, not through the PIRQs)
//!  PMBASE   Ich9Pm    128 ports  PM1, PM timer, GPE0, SMI_EN (0x20), SMI_STS; SCI level
//!  0xCF9    ResetControl         RST_CPU (bit 2) ─▶ reset callback
//!  0x92     Port92               fast reset (bit 0) ─▶ reset callback; A20 reads 1
//!  0x402    DebugCon             firmware's debug log ─▶ the VMM's log (reads 0xE9)
//! ```
//!
//! Hooks run on the vCPU thread doing the configuration write, with the PCI root and the
//! device locked: a hook must not lock the PCI root (it may lock other devices, such as the
//! PM block, or record the change for the board to apply).

pub mod debugcon;
pub mod lpc;
pub mod mch;
pub mod persist;
pub mod pm;
pub mod reset;

pub use debugcon::{DebugCon, DEBUG_PORT};
pub use lpc::{Ich9Lpc, LpcView, PmDecode, LPC_BDF};
pub use mch::{EcamDecode, EcamWindow, Mch, MCH_BDF};
pub use persist::{Ich9LpcState, Ich9PmState, MchState, Port92State, ResetControlState};
pub use pm::Ich9Pm;
pub use reset::{ConfigPortsWithReset, Port92, ResetControl, PORT92_PORT, RESET_CONTROL_PORT};

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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::bus::{lock, BusDevice};
    use crate::pci::{Bdf, PciConfigIo, PciRoot, PciRootConfig, PciWindow};
    use crate::testing::IrqLog;

    /// A Q35 bus as a board would wire it: the MCH as host bridge, the LPC at 00:1f.0 whose
    /// hook gates the PM block (locking it under the PCI root's lock), and 0xCF8..0xCFF.
    #[test]
    fn firmware_programs_the_chipset_through_the_config_ports() {
        let ecam = Arc::new(Mutex::new(None));
        let seen = ecam.clone();
        let mch = Mch::new(Box::new(move |w| *seen.lock().unwrap() = w));
        let pm = Arc::new(Mutex::new(Ich9Pm::new(Arc::new(IrqLog::default()), 9, Box::new(|| {}))));
        let pm_for_hook = pm.clone();
        let lpc = Ich9Lpc::new(Box::new(move |decode| {
            lock(&pm_for_hook).set_decoding(decode.enabled && decode.base == 0x600);
        }));
        let root = Arc::new(Mutex::new(
            PciRoot::new(PciRootConfig {
                host_bridge: Box::new(mch),
                mmio32: PciWindow::new(0xc000_0000, 0x3ec0_0000),
                mmio64: PciWindow::EMPTY,
                io: PciWindow::new(0xc000, 0x4000),
                ecam_base: 0xb000_0000,
                bus_count: 256,
                memory: None,
                intx: None,
            })
            .unwrap(),
        ));
        lock(&root).add_device_at(LPC_BDF, Box::new(lpc)).unwrap();
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let mut ports = ConfigPortsWithReset {
            pci: PciConfigIo::new(root),
            reset_control: ResetControl::new(Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })),
        };
        let config =
            |ports: &mut ConfigPortsWithReset, bdf: Bdf, offset: u32, value: Option<u32>| {
                let address = 0x8000_0000
                    | u32::from(bdf.bus()) << 16
                    | u32::from(bdf.device()) << 11
                    | u32::from(bdf.function()) << 8
                    | offset;
                ports.write(0, &address.to_le_bytes());
                let mut data = [0u8; 4];
                match value {
                    Some(v) => ports.write(4, &v.to_le_bytes()),
                    None => ports.read(4, &mut data),
                }
                u32::from_le_bytes(data)
            };
        // OVMF reads the host bridge's device ID to pick the platform.
        assert_eq!(config(&mut ports, MCH_BDF, 0, None), 0x29c0_8086);
        assert_eq!(config(&mut ports, LPC_BDF, 0, None), 0x2918_8086);
        config(&mut ports, MCH_BDF, 0x60, Some(0xb000_0001));
        assert_eq!(*ecam.lock().unwrap(), Some(EcamWindow { base: 0xb000_0000, size: 256 << 20 }));
        let mut smi_en = [0u8; 4];
        lock(&pm).read(0x30, &mut smi_en);
        assert_eq!(smi_en, [0xff; 4], "not decoded before ACPI_EN");
        config(&mut ports, LPC_BDF, 0x40, Some(0x601));
        config(&mut ports, LPC_BDF, 0x44, Some(0x80));
        lock(&pm).read(0x30, &mut smi_en);
        assert_eq!(u32::from_le_bytes(smi_en), 0x20);
        // The dword at 0xCF8 is still the config address; a byte at 0xCF9 is RST_CNT.
        let mut address = [0u8; 4];
        ports.read(0, &mut address);
        assert_eq!(u32::from_le_bytes(address), 0x8000_f844);
        ports.write(1, &[0x06]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }
}
