//! The guest-physical and port address map of the Hutch x86_64 PC.
//!
//! ```text
//! 0x0000_0000  RAM (real-mode area: GDT, page tables, zero page, command line)
//! 0x000E_0000  ACPI tables (RSDP first, where Linux also scans for it)
//! 0x0010_0000  RAM: kernel, then free RAM, initrd at the top of low RAM
//! 0xC000_0000  boot framebuffer (virtio-gpu's fixed BAR) ┐
//! 0xC100_0000  PCI 32-bit MMIO window (other BARs)      │
//! 0xE000_0000  PCI ECAM (bus 0 only)                   │ the "PCI hole": never RAM
//! 0xFEC0_0000  IOAPIC                                  │
//! 0xFEE0_0000  LAPIC                                   ┘
//! 0x1_0000_0000 RAM above 4 GiB (what did not fit below the hole)
//! ```

/// Start of the hole below 4 GiB where no RAM is mapped.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First RAM address above the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Window from which PCI BARs are assigned.
pub const PCI_MMIO_START: u64 = 0xC000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// The boot framebuffer: host memory mapped at the start of the PCI window, the fixed BAR of
/// the (VGA-class) virtio-gpu function. 16 MiB holds 1920×1200 at 32 bpp with room to spare.
pub const FRAMEBUFFER_START: u64 = PCI_MMIO_START;
pub const FRAMEBUFFER_SIZE: u64 = 16 << 20;
/// Enhanced configuration access (ECAM) for bus 0: 32 devices × 8 functions × 4 KiB.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
pub const IOAPIC_START: u64 = 0xFEC0_0000;
pub const LAPIC_START: u64 = 0xFEE0_0000;

/// Low-memory boot structures.
pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PVH_INFO_START: u64 = 0x6000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of conventional memory (start of the EBDA area we leave alone).
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_SIZE: u64 = 0x20000;
pub const KERNEL_START: u64 = 0x10_0000;

/// Legacy interrupt lines (GSIs on the IOAPIC).
pub const SERIAL_COM1_IRQ: u32 = 4;
pub const ACPI_SCI_IRQ: u32 = 9;
pub const RTC_IRQ: u32 = 8;
pub const KEYBOARD_IRQ: u32 = 1;
/// The i8042's aux (PS/2 mouse) port.
pub const MOUSE_IRQ: u32 = 12;
/// PCI INTx on bus 0: IOAPIC inputs 16–23, above every ISA line. A slot's pins rotate over
/// them (the swizzle of a PCI-to-PCI bridge) so that neighbouring functions rarely share one;
/// `\_SB.PCI0._PRT` names the same lines to the guest.
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI that pin `pin` (0 = INTA#) of bus 0's slot `slot` drives.
pub const fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (slot as u32 + pin as u32) % PCI_INTX_GSI_COUNT
}

/// Routes bus 0's INTx pins as [`pci_intx_gsi`] does (no bridges: other buses stay
/// unconnected).
pub struct PciIntxSwizzle;

impl crate::pci::IntxRouter for PciIntxSwizzle {
    fn route(&self, bdf: crate::pci::Bdf, pin: crate::pci::IntxPin) -> Option<u32> {
        (bdf.bus() == 0).then(|| pci_intx_gsi(bdf.device(), pin as u8 - 1))
    }
}

/// Port I/O map.
pub const COM1_PORT: u16 = 0x3f8;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const RTC_PORT: u16 = 0x70;
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// ACPI fixed-hardware register block (PM1a event, PM1a control, PM timer).
pub const ACPI_PM_PORT: u16 = 0x600;
pub const ACPI_PM1_EVT_PORT: u16 = ACPI_PM_PORT;
pub const ACPI_PM1_EVT_LEN: u8 = 4;
pub const ACPI_PM1_CNT_PORT: u16 = ACPI_PM_PORT + 4;
pub const ACPI_PM1_CNT_LEN: u8 = 2;
pub const ACPI_PM_TMR_PORT: u16 = ACPI_PM_PORT + 8;
pub const ACPI_PM_TMR_LEN: u8 = 4;
pub const ACPI_PM_LEN: u16 = 16;
/// The sleep type the DSDT's \_S5 package advertises; a write of it with SLP_EN powers off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// Upper bound on guest RAM we accept (a sanity limit, not a hardware one).
pub const MAX_GUEST_RAM_MIB: u64 = 1 << 20;

/// The guest RAM regions for `ram_size` bytes: below the PCI hole, then above 4 GiB.
pub fn ram_regions(ram_size: u64) -> Vec<(u64, u64)> {
    if ram_size <= MMIO_HOLE_START {
        vec![(0, ram_size)]
    } else {
        vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, ram_size - MMIO_HOLE_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region_below_the_hole() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
    }

    #[test]
    fn large_ram_is_split_around_the_pci_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START)]
        );
    }
}
