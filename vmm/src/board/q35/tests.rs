#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::fw_cfg::apply::{FakeFirmware, FSEG_END, FSEG_START};
use crate::devices::fw_cfg::keys;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn memory_for(ram: u64) -> GuestMemory {
    // Only the low part is needed for the fake firmware's allocations.
    let low = ram.min(64 * MIB);
    GuestMemory::from_ranges(&[(GuestAddress(0), low as usize)]).unwrap()
}

/// Reads fixed item `key` through the port interface, as OVMF's first probe does.
fn pio_item(fw_cfg: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
    fw_cfg.write(0, &key.to_le_bytes());
    let mut out = vec![0u8; len];
    for b in &mut out {
        let mut byte = [0u8];
        fw_cfg.read(1, &mut byte);
        *b = byte[0];
    }
    out
}

fn read_file(fw: &mut FakeFirmware<'_>, name: &str) -> Vec<u8> {
    let (key, size) = fw.find_file(name).unwrap_or_else(|| panic!("no {name}"));
    fw.fw_cfg.write(0, &key.to_le_bytes());
    let mut out = vec![0u8; size];
    for b in &mut out {
        let mut byte = [0u8];
        fw.fw_cfg.read(1, &mut byte);
        *b = byte[0];
    }
    out
}

#[test]
fn small_ram_lies_below_the_ecam_in_one_region() {
    assert_eq!(ram_regions(512 * MIB), vec![(0, 512 * MIB)]);
    assert_eq!(ram_regions(LOW_RAM_MAX), vec![(0, LOW_RAM_MAX)]);
}

#[test]
fn ram_beyond_2816_mib_continues_at_4_gib() {
    let regions = ram_regions(4 * GIB);
    assert_eq!(regions, vec![(0, 0xb000_0000), (4 * GIB, 4 * GIB - 0xb000_0000)]);
    let total: u64 = regions.iter().map(|r| r.1).sum();
    assert_eq!(total, 4 * GIB);
}

#[test]
fn e820_lists_the_ram_and_reserves_the_kvm_pages() {
    assert_eq!(
        e820_entries(512 * MIB),
        vec![(0, 512 * MIB, E820_RAM), (0xfeff_c000, 0x4000, E820_RESERVED)]
    );
    assert_eq!(
        e820_entries(6 * GIB),
        vec![
            (0, 0xb000_0000, E820_RAM),
            (0xfeff_c000, 0x4000, E820_RESERVED),
            (4 * GIB, 6 * GIB - 0xb000_0000, E820_RAM),
        ]
    );
}

#[test]
fn nothing_of_the_layout_overlaps() {
    for ram in [128 * MIB, 2816 * MIB, 3 * GIB, 40 * GIB] {
        let high_end = ram_regions(ram).last().map(|r| r.0 + r.1).unwrap();
        let mmio64 = mmio64_window(ram);
        assert!(mmio64.start >= high_end.max(4 * GIB), "{ram:#x}: 64-bit window over RAM");
        assert_eq!(mmio64.start % GIB, 0);
        assert_eq!(mmio64.start + mmio64.size, MMIO64_END);
        let low_end = ram_regions(ram)[0].1;
        assert!(low_end <= ECAM_BASE);
    }
    // The firmware area lies above KVM's pages and ends at 4 GiB.
    assert_eq!(FIRMWARE_AREA_START, 0xff00_0000);
    assert_eq!(FIRMWARE_AREA_START + MAX_FIRMWARE_BYTES, FOUR_GIB);
}

#[test]
fn fw_cfg_carries_the_signature_dma_and_cpu_counts() {
    let mut fw_cfg = new_fw_cfg(memory_for(512 * MIB), 512 * MIB, 3, true).unwrap();
    assert_eq!(pio_item(&mut fw_cfg, keys::SIGNATURE, 4), b"QEMU");
    let id = u32::from_le_bytes(pio_item(&mut fw_cfg, keys::ID, 4).try_into().unwrap());
    assert_eq!(id & 0b11, 0b11, "traditional interface and DMA");
    assert_eq!(pio_item(&mut fw_cfg, keys::NB_CPUS, 2), 3u16.to_le_bytes());
    assert_eq!(pio_item(&mut fw_cfg, keys::MAX_CPUS, 2), 3u16.to_le_bytes());
    assert_eq!(pio_item(&mut fw_cfg, keys::NOGRAPHIC, 2), 1u16.to_le_bytes());
    assert_eq!(pio_item(&mut fw_cfg, keys::BOOT_MENU, 2), 0u16.to_le_bytes());
}

#[test]
fn fw_cfg_e820_file_is_the_layout() {
    let ram = 5 * GIB;
    let memory = memory_for(ram);
    let mut fw_cfg = new_fw_cfg(memory.clone(), ram, 1, true).unwrap();
    let mut fw = FakeFirmware::new(&mut fw_cfg, memory, 8 * MIB, 0x10000);
    let e820 = read_file(&mut fw, "etc/e820");
    let entries: Vec<(u64, u64, u32)> = e820
        .chunks_exact(20)
        .map(|e| {
            (
                u64::from_le_bytes(e[0..8].try_into().unwrap()),
                u64::from_le_bytes(e[8..16].try_into().unwrap()),
                u32::from_le_bytes(e[16..20].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(entries, e820_entries(ram));
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Runs the table-loader as firmware would and returns the tables, keyed by signature.
fn linked_tables(ram: u64, vcpus: u32) -> std::collections::BTreeMap<String, Vec<u8>> {
    let memory = memory_for(ram);
    let mut fw_cfg = new_fw_cfg(memory.clone(), ram, vcpus, true).unwrap();
    FakeFirmware::new(&mut fw_cfg, memory.clone(), 8 * MIB, 0x10000).run_table_loader();
    let read = |addr: u64, len: usize| {
        let mut v = vec![0u8; len];
        memory.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    };
    let rsdp = (FSEG_START..FSEG_END)
        .step_by(16)
        .find(|&a| read(a, 8) == b"RSD PTR ")
        .expect("RSDP in the F segment");
    let table = |addr: u64| {
        let len = u32_at(&read(addr, 8), 4) as usize;
        let t = read(addr, len);
        assert_eq!(t.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0, "checksum");
        t
    };
    let xsdt = table(u64_at(&read(rsdp, 36), 24));
    let mut tables = std::collections::BTreeMap::new();
    for i in (36..xsdt.len()).step_by(8) {
        let t = table(u64_at(&xsdt, i));
        if &t[..4] == b"FACP" {
            tables.insert("DSDT".to_string(), table(u64_at(&t, fadt::X_DSDT)));
        }
        tables.insert(String::from_utf8_lossy(&t[..4]).into_owned(), t);
    }
    tables
}

#[test]
fn fadt_describes_the_ich9_pm_block_reset_register_and_century() {
    let tables = linked_tables(512 * MIB, 2);
    let f = &tables["FACP"];
    assert_eq!(u32_at(f, fadt::PM1A_EVT_BLK), 0x600);
    assert_eq!(u32_at(f, fadt::PM1A_CNT_BLK), 0x604);
    assert_eq!(u32_at(f, fadt::PM_TMR_BLK), 0x608);
    assert_eq!(u32_at(f, fadt::GPE0_BLK), 0x620);
    assert_eq!(f[fadt::GPE0_BLK_LEN], 16);
    assert_eq!(u64_at(f, fadt::X_PM_TMR_BLK + 4), 0x608);
    assert_eq!(u64_at(f, fadt::RESET_REG + 4), 0xcf9);
    assert_eq!(f[fadt::RESET_VALUE], 0x06);
    assert_eq!(f[fadt::CENTURY], 0x32);
    let boot_arch = u16::from_le_bytes([f[fadt::IAPC_BOOT_ARCH], f[fadt::IAPC_BOOT_ARCH + 1]]);
    assert_eq!(boot_arch, fadt::BOOT_ARCH_LEGACY_DEVICES | fadt::BOOT_ARCH_8042);
}

#[test]
fn mcfg_names_the_ecam_at_0xb0000000_for_256_buses() {
    let tables = linked_tables(512 * MIB, 1);
    let m = &tables["MCFG"];
    assert_eq!(u64_at(m, 44), ECAM_BASE);
    assert_eq!(&m[52..56], &[0, 0, 0, 255]);
}

#[test]
fn dsdt_has_the_windows_and_the_lpc_devices() {
    let ram = 6 * GIB;
    let tables = linked_tables(ram, 1);
    let d = &tables["DSDT"];
    let has = |bytes: &[u8]| d.windows(bytes.len()).any(|w| w == bytes);
    for name in [&b"PCI0"[..], b"COM1", b"RTC_", b"KBD_", b"MOU_", b"FWCF", b"MRES", b"QEMU0002"] {
        assert!(has(name), "{} missing", String::from_utf8_lossy(name));
    }
    // The windows' bounds, as the DWord and QWord descriptors hold them.
    assert!(has(&(MMIO32_START as u32).to_le_bytes()));
    assert!(has(&((MMIO32_END - 1) as u32).to_le_bytes()));
    let mmio64 = mmio64_window(ram);
    assert!(has(&mmio64.start.to_le_bytes()));
    assert!(has(&(mmio64.start + mmio64.size - 1).to_le_bytes()));
}

#[test]
fn the_acpi_files_keep_their_lengths_when_built_again_after_a_reset() {
    let memory = memory_for(512 * MIB);
    let mut fw_cfg = new_fw_cfg(memory.clone(), 512 * MIB, 4, true).unwrap();
    let sizes = |fw_cfg: &mut FwCfg| {
        let mut fw = FakeFirmware::new(fw_cfg, memory.clone(), 8 * MIB, 0x10000);
        [acpi_fw::TABLE_LOADER_FILE, acpi_fw::ACPI_TABLES_FILE, acpi_fw::ACPI_RSDP_FILE]
            .map(|name| fw.find_file(name).unwrap().1)
    };
    let before = sizes(&mut fw_cfg);
    FakeFirmware::new(&mut fw_cfg, memory.clone(), 8 * MIB, 0x10000).run_table_loader();
    fw_cfg.reset();
    assert_eq!(sizes(&mut fw_cfg), before);
}

#[test]
fn a_firmware_image_that_is_not_whole_pages_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.fd");
    std::fs::write(&path, vec![0u8; 4097]).unwrap();
    let err = load_rom(&path).err().unwrap();
    assert!(matches!(err, Q35Error::FirmwareSize { size: 4097, .. }), "{err:?}");
    assert!(err.to_string().contains("odd.fd"));
    let missing = dir.path().join("missing.fd");
    let err = load_rom(&missing).err().unwrap();
    assert!(err.to_string().contains("missing.fd"), "{err}");
}

#[test]
fn a_firmware_image_is_loaded_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("code.fd");
    let bytes: Vec<u8> = (0..0x2000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let (region, size) = load_rom(&path).unwrap();
    assert_eq!(size, 0x2000);
    // SAFETY: the region is 0x2000 bytes and nothing writes it meanwhile.
    let loaded = unsafe { std::slice::from_raw_parts(region.as_ptr(), 0x2000) };
    assert_eq!(loaded, &bytes[..]);
}
