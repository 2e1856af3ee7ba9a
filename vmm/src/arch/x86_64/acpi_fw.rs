//! The same ACPI tables as [`super::acpi`], handed to firmware instead of written to guest
//! memory: two fw_cfg files and the table-loader script that places and links them
//! (QEMU's `acpi_build()`; FIRMWARE.md §2.7, §6 step 9).
//!
//! ```text
//!  etc/acpi/rsdp    FSEG, align 16   RSDP ──ADD_POINTER──▶ XSDT
//!  etc/acpi/tables  HIGH, align 64   DSDT | FACS | FADT | MADT | MCFG | XSDT
//!                                    pointers hold offsets into the blob; the firmware adds
//!                                    the blob's address (ADD_POINTER), then checksums
//! ```
//!
//! Both OVMF and SeaBIOS run one script. Checksum bytes are left 0 because OVMF computes the
//! checksum over a range that includes them.

use super::acpi::{self, fadt, AcpiPlatform, TableArea, RSDP_LEN};
use crate::devices::fw_cfg::loader::{AllocZone, TableLoader, TableLoaderError};

pub const TABLE_LOADER_FILE: &str = "etc/table-loader";
pub const ACPI_TABLES_FILE: &str = "etc/acpi/tables";
pub const ACPI_RSDP_FILE: &str = "etc/acpi/rsdp";

/// Offset of a table header's checksum byte.
const SDT_CHECKSUM: usize = 9;
/// RSDP fields (ACPI 6.x, 5.2.5.3).
const RSDP_CHECKSUM: u32 = 8;
const RSDP_V1_LEN: u32 = 20;
const RSDP_XSDT: u32 = 24;
const RSDP_EXT_CHECKSUM: u32 = 32;
/// XSDT entries start after the header.
const XSDT_ENTRIES: usize = 36;

#[derive(Debug, thiserror::Error)]
pub enum AcpiFwError {
    #[error("Cannot describe {count} vCPUs in the MADT (1..={max} supported)")]
    InvalidVcpuCount { count: u32, max: u32 },
    #[error("Could not build the ACPI table-loader script")]
    Loader(#[source] TableLoaderError),
}

/// The three fw_cfg files that carry ACPI to firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareAcpi {
    /// `etc/acpi/tables`
    pub tables: Vec<u8>,
    /// `etc/acpi/rsdp`
    pub rsdp: Vec<u8>,
    /// `etc/table-loader`
    pub loader: Vec<u8>,
}

/// Builds the kernel-boot tables for `vcpu_count` as firmware files. Their lengths depend on
/// `vcpu_count` only, so a rebuild after a reset keeps the directory's sizes.
pub fn build_firmware_acpi(vcpu_count: u32) -> Result<FirmwareAcpi, AcpiFwError> {
    build_firmware_acpi_for(&AcpiPlatform::PC, vcpu_count)
}

/// Builds `platform`'s tables for `vcpu_count` as firmware files; their lengths depend on the
/// platform and `vcpu_count` only.
pub fn build_firmware_acpi_for(
    platform: &AcpiPlatform,
    vcpu_count: u32,
) -> Result<FirmwareAcpi, AcpiFwError> {
    if vcpu_count == 0 || vcpu_count > acpi::MAX_VCPUS {
        return Err(AcpiFwError::InvalidVcpuCount { count: vcpu_count, max: acpi::MAX_VCPUS });
    }
    // Addresses below are offsets into the blob (its base is 0), the same layout as kernel
    // boot's area without the RSDP.
    let mut area = TableArea::new(0);
    let dsdt = area.place(&unchecksummed(acpi::dsdt(platform)), 16);
    let facs = area.place(&acpi::facs(), 64);
    let fadt = area.place(&unchecksummed(acpi::fadt(platform, dsdt, facs)), 16);
    let madt = area.place(&unchecksummed(acpi::madt(vcpu_count)), 16);
    let mcfg = area.place(&unchecksummed(acpi::mcfg(platform)), 16);
    let xsdt_entries = [fadt, madt, mcfg];
    let xsdt = area.place(&unchecksummed(acpi::xsdt(&xsdt_entries)), 16);
    let tables = area.bytes;

    let mut rsdp = acpi::rsdp(xsdt).to_vec();
    rsdp[RSDP_CHECKSUM as usize] = 0;
    rsdp[RSDP_EXT_CHECKSUM as usize] = 0;

    let mut loader = TableLoader::new();
    link(&mut loader, &tables, &rsdp, [dsdt, fadt, madt, mcfg, xsdt], fadt, xsdt, &xsdt_entries)
        .map_err(AcpiFwError::Loader)?;
    Ok(FirmwareAcpi { tables, rsdp, loader: loader.script() })
}

/// The table-loader commands for the blob: allocate, point, checksum (QEMU's order).
fn link(
    loader: &mut TableLoader,
    tables: &[u8],
    rsdp: &[u8],
    checksummed: [u64; 5],
    fadt_at: u64,
    xsdt_at: u64,
    xsdt_entries: &[u64],
) -> Result<(), TableLoaderError> {
    let t = ACPI_TABLES_FILE;
    loader.allocate(ACPI_RSDP_FILE, rsdp.len(), 16, AllocZone::FSeg)?;
    loader.allocate(t, tables.len(), 64, AllocZone::High)?;
    let fadt_field = |off: usize| (fadt_at as usize + off) as u32;
    loader.add_pointer(t, fadt_field(fadt::FIRMWARE_CTRL), 4, t)?;
    loader.add_pointer(t, fadt_field(fadt::DSDT), 4, t)?;
    loader.add_pointer(t, fadt_field(fadt::X_FIRMWARE_CTRL), 8, t)?;
    loader.add_pointer(t, fadt_field(fadt::X_DSDT), 8, t)?;
    for i in 0..xsdt_entries.len() {
        loader.add_pointer(t, (xsdt_at as usize + XSDT_ENTRIES + 8 * i) as u32, 8, t)?;
    }
    for at in checksummed {
        let at = at as usize;
        let len =
            u32::from_le_bytes([tables[at + 4], tables[at + 5], tables[at + 6], tables[at + 7]]);
        loader.add_checksum(t, (at + SDT_CHECKSUM) as u32, at as u32, len)?;
    }
    loader.add_pointer(ACPI_RSDP_FILE, RSDP_XSDT, 8, t)?;
    loader.add_checksum(ACPI_RSDP_FILE, RSDP_CHECKSUM, 0, RSDP_V1_LEN)?;
    loader.add_checksum(ACPI_RSDP_FILE, RSDP_EXT_CHECKSUM, 0, RSDP_LEN as u32)?;
    Ok(())
}

/// A table with its checksum byte cleared, for the firmware to compute.
fn unchecksummed(mut table: Vec<u8>) -> Vec<u8> {
    table[SDT_CHECKSUM] = 0;
    table
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::collections::BTreeMap;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::fw_cfg::apply::{FakeFirmware, FSEG_END, FSEG_START};
    use crate::devices::fw_cfg::{FwCfg, FwCfgConfig};
    use crate::memory::GuestMemory;

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// The tables a guest finds after the firmware ran the script, keyed by signature.
    fn linked_by_firmware(vcpus: u32) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
        let acpi = build_firmware_acpi(vcpus).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let config = FwCfgConfig {
            cpus: vcpus as u16,
            max_cpus: vcpus as u16,
            nographic: true,
            boot_menu: false,
        };
        let mut fw_cfg = FwCfg::new(mem.clone(), &config);
        // As a board adds them: built again when the firmware first selects one of them.
        let files = vec![
            (TABLE_LOADER_FILE, acpi.loader),
            (ACPI_TABLES_FILE, acpi.tables),
            (ACPI_RSDP_FILE, acpi.rsdp),
        ];
        let rebuild = Box::new(move || {
            let acpi = build_firmware_acpi(vcpus).unwrap();
            vec![acpi.loader, acpi.tables, acpi.rsdp]
        });
        fw_cfg.add_generated_files(files, rebuild).unwrap();
        FakeFirmware::new(&mut fw_cfg, mem.clone(), 8 << 20, 0x10000).run_table_loader();

        let rsdp_at = (FSEG_START..FSEG_END)
            .step_by(16)
            .find(|&a| read(&mem, a, 8) == b"RSD PTR ")
            .expect("RSDP in the F segment");
        let rsdp = read(&mem, rsdp_at, 36);
        let mut tables = BTreeMap::new();
        let mut table = |addr: u64| {
            let len = u32_at(&read(&mem, addr, 8), 4) as usize;
            let t = read(&mem, addr, len);
            assert_eq!(sum(&t), 0, "checksum of {}", String::from_utf8_lossy(&t[..4]));
            tables.insert(String::from_utf8_lossy(&t[..4]).into_owned(), t.clone());
            t
        };
        let xsdt = table(u64_at(&rsdp, 24));
        let mut facs_found = None;
        for i in (36..xsdt.len()).step_by(8) {
            let t = table(u64_at(&xsdt, i));
            if &t[..4] == b"FACP" {
                let dsdt = u64_at(&t, fadt::X_DSDT);
                assert_eq!(u64::from(u32_at(&t, fadt::DSDT)), dsdt);
                table(dsdt);
                let facs = u64_at(&t, fadt::X_FIRMWARE_CTRL);
                assert_eq!(u64::from(u32_at(&t, fadt::FIRMWARE_CTRL)), facs);
                assert_eq!(facs % 64, 0, "FACS alignment");
                facs_found = Some(read(&mem, facs, 64));
            }
        }
        let bytes = facs_found.expect("FADT → FACS");
        assert_eq!(&bytes[..4], b"FACS");
        tables.insert("FACS".into(), bytes);
        (rsdp, tables)
    }

    #[test]
    fn firmware_links_the_kernel_boot_tables_into_a_valid_chain() {
        let (rsdp, tables) = linked_by_firmware(4);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let names: Vec<_> = tables.keys().cloned().collect();
        assert_eq!(names, ["APIC", "DSDT", "FACP", "FACS", "MCFG", "XSDT"]);
    }

    #[test]
    fn tables_without_pointers_are_the_kernel_boot_bytes() {
        // The kernel-boot builder writes the same tables at fixed addresses; the ones with no
        // pointers in them must come out byte for byte the same after the firmware's checksums.
        let memory = crate::memory::create_guest_memory(64).unwrap();
        let rsdp_addr = acpi::create_acpi_tables(&memory, 4).unwrap();
        let kernel_rsdp = read(&memory, rsdp_addr, 36);
        let xsdt_addr = u64_at(&kernel_rsdp, 24);
        let xsdt_len = u32_at(&read(&memory, xsdt_addr, 8), 4) as usize;
        let xsdt = read(&memory, xsdt_addr, xsdt_len);
        let mut kernel = BTreeMap::new();
        for i in (36..xsdt.len()).step_by(8) {
            let addr = u64_at(&xsdt, i);
            let len = u32_at(&read(&memory, addr, 8), 4) as usize;
            let t = read(&memory, addr, len);
            if &t[..4] == b"FACP" {
                let dsdt = u64_at(&t, fadt::X_DSDT);
                let len = u32_at(&read(&memory, dsdt, 8), 4) as usize;
                kernel.insert("DSDT".to_string(), read(&memory, dsdt, len));
            }
            kernel.insert(String::from_utf8_lossy(&t[..4]).into_owned(), t);
        }
        let (_, linked) = linked_by_firmware(4);
        for name in ["APIC", "MCFG", "DSDT"] {
            assert_eq!(linked[name], kernel[name], "{name}");
        }
        // The FADT differs only in its pointers and checksum.
        let mut fw_fadt = linked["FACP"].clone();
        let mut k_fadt = kernel["FACP"].clone();
        for t in [&mut fw_fadt, &mut k_fadt] {
            t[SDT_CHECKSUM] = 0;
            for (off, len) in [
                (fadt::FIRMWARE_CTRL, 4),
                (fadt::DSDT, 4),
                (fadt::X_FIRMWARE_CTRL, 8),
                (fadt::X_DSDT, 8),
            ] {
                t[off..off + len].fill(0);
            }
        }
        assert_eq!(fw_fadt, k_fadt);
    }

    #[test]
    fn vcpu_counts_the_madt_cannot_hold_are_refused() {
        assert!(matches!(build_firmware_acpi(0), Err(AcpiFwError::InvalidVcpuCount { .. })));
        assert!(matches!(
            build_firmware_acpi(acpi::MAX_VCPUS + 1),
            Err(AcpiFwError::InvalidVcpuCount { .. })
        ));
        build_firmware_acpi(acpi::MAX_VCPUS).unwrap();
    }
}
