//! The guest's ACPI tables, written once at boot into the reserved area at
//! `layout::ACPI_START` (where Linux also scans for the RSDP).
//!
//! ```text
//!  RSDP (rev 2) ──▶ XSDT ──┬─▶ FADT (rev 6, full ACPI, fixed power button) ──┬─▶ DSDT (AML)
//!                          │                                                  └─▶ FACS
//!                          ├─▶ MADT (LAPIC per vCPU, IOAPIC, overrides, NMI)
//!                          └─▶ MCFG (ECAM of bus 0)
//! ```
//!
//! The DSDT describes `\_S5` (soft off, matching `devices::acpi_pm`), the PCI host bridge
//! `\_SB.PCI0`, COM1, and a motherboard-resources device reserving the ECAM window. Reset goes
//! through the FADT reset register, pointed at the i8042 command port (0x64 ← 0xFE).

use vm_memory::{Bytes, GuestAddress};

use super::aml::{self, resource};
use super::layout;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("Cannot describe {count} vCPUs in the MADT (1..={max} supported)")]
    InvalidVcpuCount { count: u32, max: u32 },
    #[error("ACPI tables need {size} bytes but the ACPI area holds {max}")]
    TooLarge { size: usize, max: u64 },
    #[error("Could not write the ACPI tables to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

pub const OEM_ID: &[u8; 6] = b"HUTCH ";
const OEM_TABLE_ID: &[u8; 8] = b"HUTCHPC ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"HTCH";
const CREATOR_REVISION: u32 = 1;
const HEADER_LEN: usize = 36;
pub(super) const RSDP_LEN: usize = 36;
/// IOAPIC ids share the 8-bit APIC id space with the vCPUs; the IOAPIC takes `vcpu_count`.
pub const MAX_VCPUS: u32 = 254;
/// The I/O port and value of the reset register: the i8042's "pulse reset line" command.
pub const RESET_PORT: u16 = 0x64;
pub const RESET_REG_VALUE: u8 = 0xfe;

// FADT field offsets (ACPI 6.x, table 5.9).
pub(crate) mod fadt {
    pub const LEN: usize = 276;
    pub const REVISION: u8 = 6;
    pub const MINOR_REVISION: u8 = 0;
    pub const FIRMWARE_CTRL: usize = 36;
    pub const DSDT: usize = 40;
    pub const PREFERRED_PM_PROFILE: usize = 45;
    pub const SCI_INT: usize = 46;
    pub const SMI_CMD: usize = 48;
    pub const PM1A_EVT_BLK: usize = 56;
    pub const PM1A_CNT_BLK: usize = 64;
    pub const PM_TMR_BLK: usize = 76;
    pub const GPE0_BLK: usize = 80;
    pub const PM1_EVT_LEN: usize = 88;
    pub const PM1_CNT_LEN: usize = 89;
    pub const PM_TMR_LEN: usize = 91;
    pub const GPE0_BLK_LEN: usize = 92;
    pub const P_LVL2_LAT: usize = 96;
    pub const P_LVL3_LAT: usize = 98;
    pub const CENTURY: usize = 108;
    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const MINOR_VERSION: usize = 131;
    pub const X_FIRMWARE_CTRL: usize = 132;
    pub const X_DSDT: usize = 140;
    pub const X_PM1A_EVT_BLK: usize = 148;
    pub const X_PM1A_CNT_BLK: usize = 172;
    pub const X_PM_TMR_BLK: usize = 208;
    pub const X_GPE0_BLK: usize = 220;

    pub const PM_PROFILE_DESKTOP: u8 = 1;
    /// Latencies above 100 / 1000 µs mean "C2 / C3 not supported".
    pub const C2_UNSUPPORTED: u16 = 101;
    pub const C3_UNSUPPORTED: u16 = 1001;
    pub const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
    pub const BOOT_ARCH_8042: u16 = 1 << 1;
    pub const FLAG_WBINVD: u32 = 1 << 0;
    pub const FLAG_PROC_C1: u32 = 1 << 2;
    /// Set = the sleep button is NOT a fixed feature (we have none). PWR_BUTTON (bit 4) stays
    /// clear: the power button is the fixed-feature one.
    pub const FLAG_SLP_BUTTON: u32 = 1 << 5;
    pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;
}

/// Generic Address Structure address space ids and access sizes.
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
const GAS_ACCESS_WORD: u8 = 2;
const GAS_ACCESS_DWORD: u8 = 3;

// MADT entry types and flags.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags: active high (polarity 01), level triggered (trigger mode 11).
const MPS_INTI_ACTIVE_HIGH_LEVEL: u16 = 0x1 | (0x3 << 2);
const MPS_INTI_CONFORMS: u16 = 0;
const ALL_PROCESSORS: u8 = 0xff;

/// What the tables say about the board they describe: the PC for kernel boot
/// ([`AcpiPlatform::PC`]) or a Q35 board behind firmware (`board::q35`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiPlatform {
    /// The PM1 event block; PM1 control is at +4, the PM timer at +8.
    pub pm_base: u16,
    /// GPE0 block (port, length in bytes), if the board has one.
    pub gpe0: Option<(u16, u8)>,
    /// The sleep type `\_S5` names (what the PM block treats as soft off).
    pub s5_sleep_type: u8,
    /// The FADT reset register: an I/O port and the byte written to it.
    pub reset: (u16, u8),
    /// The CMOS index of the century byte; 0: none.
    pub century: u8,
    /// IAPC_BOOT_ARCH flags.
    pub boot_arch: u16,
    /// ECAM base and the number of buses it covers (1 MiB each).
    pub ecam_base: u64,
    pub ecam_buses: u16,
    /// The PCI memory windows `\_SB.PCI0._CRS` hands out: 32-bit (start, size), and 64-bit
    /// (size 0: none).
    pub mmio32: (u64, u64),
    pub mmio64: (u64, u64),
    /// Q35 legacy devices below PCI0 as firmware expects them: the VGA hole, RTC, keyboard
    /// controller and mouse, fw_cfg, and the PM block reserved as a motherboard resource.
    pub q35_devices: bool,
}

impl AcpiPlatform {
    /// The kernel-boot PC (`board::pc`).
    pub const PC: AcpiPlatform = AcpiPlatform {
        pm_base: layout::ACPI_PM_PORT,
        gpe0: None,
        s5_sleep_type: layout::ACPI_S5_SLEEP_TYPE,
        reset: (RESET_PORT, RESET_REG_VALUE),
        century: 0,
        boot_arch: fadt::BOOT_ARCH_8042,
        ecam_base: layout::PCI_ECAM_START,
        ecam_buses: (layout::PCI_ECAM_SIZE >> 20) as u16,
        mmio32: (layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE),
        mmio64: (0, 0),
        q35_devices: false,
    };

    fn pm1_evt(&self) -> u16 {
        self.pm_base
    }
    fn pm1_cnt(&self) -> u16 {
        self.pm_base + 4
    }
    fn pm_tmr(&self) -> u16 {
        self.pm_base + 8
    }
}

/// Writes all tables to `layout::ACPI_START` and returns the RSDP's guest address.
pub fn create_acpi_tables(memory: &GuestMemory, vcpu_count: u32) -> Result<u64, AcpiError> {
    let p = &AcpiPlatform::PC;
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(AcpiError::InvalidVcpuCount { count: vcpu_count, max: MAX_VCPUS });
    }
    let mut area = TableArea::new(layout::ACPI_START);
    // The RSDP goes first, where a scan of 0xE0000.. finds it at once; filled in last.
    area.reserve(RSDP_LEN, 16);
    let dsdt = area.place(&dsdt(p), 16);
    let facs = area.place(&facs(), 64);
    let fadt = area.place(&fadt(p, dsdt, facs), 16);
    let madt = area.place(&madt(vcpu_count), 16);
    let mcfg = area.place(&mcfg(p), 16);
    let xsdt = area.place(&xsdt(&[fadt, madt, mcfg]), 16);
    area.bytes[..RSDP_LEN].copy_from_slice(&rsdp(xsdt));

    if area.bytes.len() as u64 > layout::ACPI_SIZE {
        return Err(AcpiError::TooLarge { size: area.bytes.len(), max: layout::ACPI_SIZE });
    }
    memory
        .write_slice(&area.bytes, GuestAddress(layout::ACPI_START))
        .map_err(AcpiError::GuestMemory)?;
    Ok(layout::ACPI_START)
}

/// The bytes of the ACPI area being assembled, with their guest base address.
pub(super) struct TableArea {
    base: u64,
    pub(super) bytes: Vec<u8>,
}

impl TableArea {
    pub(super) fn new(base: u64) -> Self {
        TableArea { base, bytes: Vec::new() }
    }

    pub(super) fn reserve(&mut self, len: usize, align: usize) -> u64 {
        let offset = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(offset + len, 0);
        self.base + offset as u64
    }

    pub(super) fn place(&mut self, table: &[u8], align: usize) -> u64 {
        let addr = self.reserve(table.len(), align);
        let offset = (addr - self.base) as usize;
        self.bytes[offset..].copy_from_slice(table);
        addr
    }
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b)))
}

fn put32(t: &mut [u8], off: usize, v: u32) {
    t[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(t: &mut [u8], off: usize, v: u64) {
    t[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Builds a system description table: the standard header, then `body`, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; HEADER_LEN];
    t.extend_from_slice(body);
    t[0..4].copy_from_slice(signature);
    let len = t.len() as u32;
    put32(&mut t, 4, len);
    t[8] = revision;
    t[10..16].copy_from_slice(OEM_ID);
    t[16..24].copy_from_slice(OEM_TABLE_ID);
    put32(&mut t, 24, OEM_REVISION);
    t[28..32].copy_from_slice(CREATOR_ID);
    put32(&mut t, 32, CREATOR_REVISION);
    t[9] = checksum(&t);
    t
}

/// RSDP revision 2 (ACPI 2.0+) pointing at the XSDT only.
pub(super) fn rsdp(xsdt: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2;
    put32(&mut r, 20, RSDP_LEN as u32);
    put64(&mut r, 24, xsdt);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

pub(super) fn xsdt(tables: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = tables.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

/// A Generic Address Structure for a system I/O register block.
fn gas_io(port: u16, len_bytes: u8, access: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = len_bytes * 8;
    g[3] = access;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

pub(super) fn fadt(p: &AcpiPlatform, dsdt: u64, facs: u64) -> Vec<u8> {
    use fadt::*;
    let mut f = vec![0u8; LEN - HEADER_LEN];
    // Offsets in the `fadt` module count the header; the body starts after it.
    let mut set = |off: usize, bytes: &[u8]| {
        f[off - HEADER_LEN..off - HEADER_LEN + bytes.len()].copy_from_slice(bytes)
    };
    // The tables live below 1 MiB, so the 32-bit pointers hold them too.
    set(FIRMWARE_CTRL, &(facs as u32).to_le_bytes());
    set(DSDT, &(dsdt as u32).to_le_bytes());
    set(PREFERRED_PM_PROFILE, &[PM_PROFILE_DESKTOP]);
    set(SCI_INT, &(layout::ACPI_SCI_IRQ as u16).to_le_bytes());
    // SMI_CMD 0: no SMI port, ACPI mode is always on (SCI_EN reads 1).
    set(SMI_CMD, &0u32.to_le_bytes());
    set(PM1A_EVT_BLK, &u32::from(p.pm1_evt()).to_le_bytes());
    set(PM1A_CNT_BLK, &u32::from(p.pm1_cnt()).to_le_bytes());
    set(PM_TMR_BLK, &u32::from(p.pm_tmr()).to_le_bytes());
    if let Some((port, len)) = p.gpe0 {
        set(GPE0_BLK, &u32::from(port).to_le_bytes());
        set(GPE0_BLK_LEN, &[len]);
        set(X_GPE0_BLK, &gas_io(port, len, GAS_ACCESS_BYTE));
    }
    set(CENTURY, &[p.century]);
    set(PM1_EVT_LEN, &[layout::ACPI_PM1_EVT_LEN]);
    set(PM1_CNT_LEN, &[layout::ACPI_PM1_CNT_LEN]);
    set(PM_TMR_LEN, &[layout::ACPI_PM_TMR_LEN]);
    set(P_LVL2_LAT, &C2_UNSUPPORTED.to_le_bytes());
    set(P_LVL3_LAT, &C3_UNSUPPORTED.to_le_bytes());
    set(IAPC_BOOT_ARCH, &p.boot_arch.to_le_bytes());
    let flags = FLAG_WBINVD | FLAG_PROC_C1 | FLAG_SLP_BUTTON | FLAG_RESET_REG_SUP;
    set(FLAGS, &flags.to_le_bytes());
    set(RESET_REG, &gas_io(p.reset.0, 1, GAS_ACCESS_BYTE));
    set(RESET_VALUE, &[p.reset.1]);
    set(MINOR_VERSION, &[MINOR_REVISION]);
    set(X_FIRMWARE_CTRL, &facs.to_le_bytes());
    set(X_DSDT, &dsdt.to_le_bytes());
    set(X_PM1A_EVT_BLK, &gas_io(p.pm1_evt(), layout::ACPI_PM1_EVT_LEN, GAS_ACCESS_WORD));
    set(X_PM1A_CNT_BLK, &gas_io(p.pm1_cnt(), layout::ACPI_PM1_CNT_LEN, GAS_ACCESS_WORD));
    set(X_PM_TMR_BLK, &gas_io(p.pm_tmr(), layout::ACPI_PM_TMR_LEN, GAS_ACCESS_DWORD));
    sdt(b"FACP", REVISION, &f)
}

/// The Firmware ACPI Control Structure: no checksum, 64-byte aligned. Linux wants one outside
/// hardware-reduced mode (global lock, waking vector).
pub(super) fn facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"FACS");
    put32(&mut f, 4, 64);
    f[32] = 2; // version
    f
}

pub(super) fn madt(vcpu_count: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend((layout::LAPIC_START as u32).to_le_bytes());
    body.extend(MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpu_count {
        // ACPI processor uid = APIC id = vCPU index (checked to fit a byte).
        body.extend([MADT_LOCAL_APIC, 8, id as u8, id as u8]);
        body.extend(MADT_LAPIC_ENABLED.to_le_bytes());
    }
    body.extend([MADT_IO_APIC, 12, vcpu_count as u8, 0]);
    body.extend((layout::IOAPIC_START as u32).to_le_bytes());
    body.extend(0u32.to_le_bytes()); // GSI base
    let overrides = [
        (0u8, 2u32, MPS_INTI_CONFORMS), // the PIT's IRQ 0 is wired to IOAPIC pin 2
        (layout::ACPI_SCI_IRQ as u8, layout::ACPI_SCI_IRQ, MPS_INTI_ACTIVE_HIGH_LEVEL),
    ];
    for (source, gsi, flags) in overrides {
        body.extend([MADT_INTERRUPT_OVERRIDE, 10, 0, source]);
        body.extend(gsi.to_le_bytes());
        body.extend(flags.to_le_bytes());
    }
    body.extend([MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    body.extend(MPS_INTI_CONFORMS.to_le_bytes());
    body.push(1); // LINT1
    sdt(b"APIC", 4, &body)
}

pub(super) fn mcfg(p: &AcpiPlatform) -> Vec<u8> {
    let mut body = vec![0u8; 8];
    body.extend(p.ecam_base.to_le_bytes());
    body.extend(0u16.to_le_bytes()); // segment
    let last_bus = p.ecam_buses.saturating_sub(1) as u8;
    body.extend([0, last_bus]);
    body.extend(0u32.to_le_bytes());
    sdt(b"MCFG", 1, &body)
}

/// The DSDT's AML.
/// `\_SB.PCI0._PRT`: every slot's INTA#–INTD# to the GSI the board wires it to
/// ([`layout::pci_intx_gsi`]). Source Zero: the index is a GSI, no link device to program.
fn pci_routing_table() -> Vec<u8> {
    let entries: Vec<Vec<u8>> = (0..32u8)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| {
                aml::package(&[
                    aml::integer(u64::from(slot) << 16 | 0xffff),
                    aml::integer(pin.into()),
                    aml::integer(0),
                    aml::integer(layout::pci_intx_gsi(slot, pin).into()),
                ])
            })
        })
        .collect();
    aml::package(&entries)
}

pub(super) fn dsdt(p: &AcpiPlatform) -> Vec<u8> {
    let s5 = aml::name(
        "\\_S5",
        &aml::package(&[
            aml::integer(p.s5_sleep_type.into()),
            aml::integer(p.s5_sleep_type.into()),
            aml::integer(0),
            aml::integer(0),
        ]),
    );
    let (mmio_start, mmio_size) = p.mmio32;
    let mmio_end = mmio_start + mmio_size - 1;
    let cfg_port = layout::PCI_CONFIG_ADDRESS_PORT;
    let last_bus = if p.q35_devices { p.ecam_buses.saturating_sub(1) } else { 0 };
    let mut crs = vec![
        resource::word_bus_number(0, last_bus),
        resource::io(cfg_port, cfg_port, 1, 8),
        resource::word_io(0, cfg_port - 1),
        resource::word_io(0x0d00, 0xffff),
    ];
    if p.q35_devices {
        // The legacy VGA window, as QEMU's q35 hands it to PCI0.
        crs.push(resource::dword_memory(0xa_0000, 0xb_ffff));
    }
    crs.push(resource::dword_memory(mmio_start as u32, mmio_end as u32));
    if p.mmio64.1 != 0 {
        crs.push(resource::qword_memory(p.mmio64.0, p.mmio64.0 + p.mmio64.1 - 1));
    }
    let pci0 = aml::device(
        "PCI0",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0A08")),
            aml::name("_CID", &aml::eisa_id("PNP0A03")),
            aml::name("_SEG", &aml::integer(0)),
            aml::name("_BBN", &aml::integer(0)),
            aml::name("_UID", &aml::integer(0)),
            aml::name("_CRS", &resource::template(&crs)),
            aml::name("_PRT", &pci_routing_table()),
        ],
    );
    let isa = |name: &str, hid: &[u8], resources: &[Vec<u8>]| {
        aml::device(
            name,
            &[aml::name("_HID", hid), aml::name("_CRS", &resource::template(resources))],
        )
    };
    let com1 = aml::device(
        "COM1",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0501")),
            aml::name("_UID", &aml::integer(1)),
            aml::name(
                "_CRS",
                &resource::template(&[
                    resource::io(layout::COM1_PORT, layout::COM1_PORT, 1, 8),
                    resource::irq_no_flags(layout::SERIAL_COM1_IRQ as u8),
                ]),
            ),
        ],
    );
    // Linux trusts MCFG's window only if a motherboard resource (or e820) reserves it.
    let mut reserved =
        vec![resource::memory32_fixed(p.ecam_base as u32, (u64::from(p.ecam_buses) << 20) as u32)];
    if p.q35_devices {
        reserved.push(resource::io(p.pm_base, p.pm_base, 1, Q35_PM_BLOCK_LEN));
    }
    let mres = aml::device(
        "MRES",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0C02")),
            aml::name("_UID", &aml::integer(2)),
            aml::name("_CRS", &resource::template(&reserved)),
        ],
    );
    let mut devices = vec![pci0, com1, mres];
    if p.q35_devices {
        let rtc = layout::RTC_PORT;
        let (kbd_data, kbd_cmd) = (layout::I8042_DATA_PORT, layout::I8042_COMMAND_PORT);
        let fw_cfg = crate::devices::fw_cfg::FW_CFG_PORT_BASE as u16;
        devices.extend([
            isa(
                "RTC",
                &aml::eisa_id("PNP0B00"),
                &[resource::io(rtc, rtc, 1, 2), resource::irq_no_flags(layout::RTC_IRQ as u8)],
            ),
            isa(
                "KBD",
                &aml::eisa_id("PNP0303"),
                &[
                    resource::io(kbd_data, kbd_data, 1, 1),
                    resource::io(kbd_cmd, kbd_cmd, 1, 1),
                    resource::irq_no_flags(layout::KEYBOARD_IRQ as u8),
                ],
            ),
            isa(
                "MOU",
                &aml::eisa_id("PNP0F13"),
                &[resource::irq_no_flags(layout::MOUSE_IRQ as u8)],
            ),
            isa(
                "FWCF",
                &aml::string("QEMU0002"),
                &[resource::io(fw_cfg, fw_cfg, 1, crate::devices::fw_cfg::FW_CFG_PORT_LEN as u8)],
            ),
        ]);
    }
    let sb = aml::scope("\\_SB", &devices);
    sdt(b"DSDT", 2, &[s5, sb].concat())
}

/// Ports the ICH9 PM block decodes (`devices::q35::pm::PM_BLOCK_LEN`).
const Q35_PM_BLOCK_LEN: u8 = 128;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::memory::create_guest_memory;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// Builds the tables for `vcpus` and returns the RSDP bytes and every table reachable from
    /// it, keyed by signature.
    fn build(vcpus: u32) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
        let memory = create_guest_memory(64).expect("guest memory");
        let rsdp_addr = create_acpi_tables(&memory, vcpus).expect("tables");
        assert_eq!(rsdp_addr, layout::ACPI_START);
        let read = |addr: u64, len: usize| {
            let mut v = vec![0u8; len];
            memory.read_slice(&mut v, GuestAddress(addr)).expect("read tables");
            v
        };
        let table = |addr: u64| {
            let len = u32_at(&read(addr, 8), 4) as usize;
            assert!(addr + len as u64 <= layout::ACPI_START + layout::ACPI_SIZE);
            read(addr, len)
        };
        let rsdp = read(rsdp_addr, RSDP_LEN);
        let mut tables = BTreeMap::new();
        let xsdt = table(u64_at(&rsdp, 24));
        for i in 0..(xsdt.len() - HEADER_LEN) / 8 {
            let t = table(u64_at(&xsdt, HEADER_LEN + 8 * i));
            tables.insert(String::from_utf8_lossy(&t[..4]).into_owned(), t);
        }
        let fadt = tables["FACP"].clone();
        let dsdt = table(u64_at(&fadt, fadt::X_DSDT));
        assert_eq!(u64::from(u32_at(&fadt, fadt::DSDT)), u64_at(&fadt, fadt::X_DSDT));
        tables.insert("DSDT".into(), dsdt);
        tables.insert("FACS".into(), table(u64_at(&fadt, fadt::X_FIRMWARE_CTRL)));
        tables.insert("XSDT".into(), xsdt);
        (rsdp, tables)
    }

    #[test]
    fn every_table_checksums_to_zero() {
        let (rsdp, tables) = build(2);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        for (sig, t) in &tables {
            if sig != "FACS" {
                assert_eq!(sum(t), 0, "{sig} checksum");
                assert_eq!(&t[10..16], OEM_ID, "{sig} OEM id");
            }
        }
    }

    #[test]
    fn xsdt_points_to_fadt_madt_and_mcfg_and_fadt_to_dsdt() {
        let (_, tables) = build(1);
        let names: Vec<&str> = tables.keys().map(String::as_str).collect();
        assert_eq!(names, ["APIC", "DSDT", "FACP", "FACS", "MCFG", "XSDT"]);
        assert_eq!(tables["FACP"].len(), fadt::LEN);
        assert_eq!(tables["FACS"].len(), 64);
    }

    #[test]
    fn fadt_describes_the_pm_block_sci_and_fixed_power_button() {
        let (_, tables) = build(1);
        let f = &tables["FACP"];
        assert_eq!(f[fadt::SCI_INT], layout::ACPI_SCI_IRQ as u8);
        assert_eq!(u32_at(f, fadt::SMI_CMD), 0);
        assert_eq!(u32_at(f, fadt::PM1A_EVT_BLK), u32::from(layout::ACPI_PM1_EVT_PORT));
        assert_eq!(u32_at(f, fadt::PM1A_CNT_BLK), u32::from(layout::ACPI_PM1_CNT_PORT));
        assert_eq!(u32_at(f, fadt::PM_TMR_BLK), u32::from(layout::ACPI_PM_TMR_PORT));
        assert_eq!(u64_at(f, fadt::X_PM_TMR_BLK + 4), u64::from(layout::ACPI_PM_TMR_PORT));
        let flags = u32_at(f, fadt::FLAGS);
        assert_eq!(flags & (1 << 4), 0, "PWR_BUTTON set: the fixed power button is disabled");
        assert_eq!(flags & (1 << 20), 0, "hardware-reduced");
        assert_ne!(flags & fadt::FLAG_RESET_REG_SUP, 0);
        assert_eq!(u64_at(f, fadt::RESET_REG + 4), u64::from(RESET_PORT));
        assert_eq!(f[fadt::RESET_VALUE], RESET_REG_VALUE);
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu_and_the_ioapic() {
        for vcpus in [1u32, 4, MAX_VCPUS] {
            let (_, tables) = build(vcpus);
            let m = &tables["APIC"];
            let mut lapics = Vec::new();
            let mut ioapic = None;
            let mut overrides = Vec::new();
            let mut off = HEADER_LEN + 8;
            while off < m.len() {
                let (kind, len) = (m[off], m[off + 1] as usize);
                assert!(len >= 2 && off + len <= m.len(), "bad MADT entry at {off}");
                match kind {
                    MADT_LOCAL_APIC => {
                        assert_eq!(u32_at(m, off + 4), MADT_LAPIC_ENABLED);
                        lapics.push(m[off + 3]);
                    }
                    MADT_IO_APIC => ioapic = Some((m[off + 2], u32_at(m, off + 4))),
                    MADT_INTERRUPT_OVERRIDE => {
                        overrides.push((m[off + 3], u32_at(m, off + 4), m[off + 8]))
                    }
                    _ => {}
                }
                off += len;
            }
            assert_eq!(off, m.len());
            let expected: Vec<u8> = (0..vcpus).map(|i| i as u8).collect();
            assert_eq!(lapics, expected);
            assert_eq!(ioapic, Some((vcpus as u8, layout::IOAPIC_START as u32)));
            assert_eq!(overrides, [(0, 2, 0), (9, 9, 0x0d)]);
        }
    }

    #[test]
    fn mcfg_describes_the_ecam_of_bus_0() {
        let (_, tables) = build(1);
        let m = &tables["MCFG"];
        assert_eq!(m.len(), HEADER_LEN + 8 + 16);
        assert_eq!(u64_at(m, 44), layout::PCI_ECAM_START);
        assert_eq!(&m[52..56], &[0, 0, 0, 0]);
    }

    #[test]
    fn dsdt_has_s5_with_the_pm_devices_sleep_type() {
        let (_, tables) = build(1);
        let d = &tables["DSDT"];
        let pos = d.windows(5).position(|w| w == b"\\_S5_").expect("\\_S5_ in the DSDT");
        let t = layout::ACPI_S5_SLEEP_TYPE;
        assert_eq!(&d[pos + 5..pos + 13], &[0x12, 0x08, 0x04, 0x0a, t, 0x0a, t, 0x00]);
        for name in [&b"PCI0"[..], b"COM1", b"MRES", b"_CRS"] {
            assert!(d.windows(4).any(|w| w == name), "{} missing", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn vcpu_counts_that_do_not_fit_the_madt_are_refused() {
        let memory = create_guest_memory(16).expect("guest memory");
        for count in [0, MAX_VCPUS + 1] {
            let err = create_acpi_tables(&memory, count).expect_err("must fail");
            assert!(matches!(err, AcpiError::InvalidVcpuCount { .. }), "{err:?}");
        }
    }

    /// Runs `iasl` with `args` in `dir`; None when iasl is not installed.
    fn iasl(dir: &Path, args: &[&str]) -> Option<(bool, String)> {
        let out = Command::new("iasl").args(args).current_dir(dir).output().ok()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some((out.status.success(), text))
    }

    /// The real check of the AML and table layouts: ACPICA's own disassembler must read every
    /// table without complaint, and the disassembled DSDT must compile again.
    #[test]
    fn iasl_disassembles_every_table_and_recompiles_the_dsdt() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_, tables) = build(4);
        for (sig, t) in &tables {
            std::fs::write(dir.path().join(format!("{sig}.dat")), t).expect("write table");
        }
        if iasl(dir.path(), &["-v"]).is_none() {
            testkit::skip(
                "iasl",
                "iasl not found (Debian package acpica-tools); AML not validated",
            );
            return;
        }
        for sig in tables.keys() {
            let (ok, text) = iasl(dir.path(), &["-d", &format!("{sig}.dat")]).expect("iasl");
            let lower = text.to_lowercase();
            assert!(ok, "iasl -d {sig} failed:\n{text}");
            for bad in ["error", "warning", "invalid", "incorrect"] {
                assert!(!lower.contains(bad), "iasl -d {sig} says {bad}:\n{text}");
            }
        }
        let dsl = std::fs::read_to_string(dir.path().join("DSDT.dsl")).expect("DSDT.dsl");
        for needle in [
            "Name (\\_S5, Package (0x04)",
            "Device (PCI0)",
            "EisaId (\"PNP0A08\")",
            "WordBusNumber (ResourceProducer",
            "DWordMemory (ResourceProducer",
            "0xC0000000",
            "0xDFFFFFFF",
            "Device (COM1)",
            "IRQNoFlags ()",
            "Memory32Fixed (ReadWrite",
            "0xE0000000",
            // _PRT: 32 slots of 4 pins; slot 3's INTB# on GSI 16 + (3 + 1) % 8 = 20.
            "Name (_PRT, Package (0x80)",
            "0x0003FFFF, \n                    One, \n                    Zero, \n                    0x14",
        ] {
            assert!(dsl.contains(needle), "{needle:?} missing from:\n{dsl}");
        }
        std::fs::rename(dir.path().join("DSDT.dsl"), dir.path().join("again.dsl")).expect("mv");
        let (ok, text) = iasl(dir.path(), &["again.dsl"]).expect("iasl");
        assert!(ok && text.contains("0 Errors"), "recompiling the DSDT failed:\n{text}\n{dsl}");
    }
}
