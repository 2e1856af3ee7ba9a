//! Which firmware boots a disk, read from its partition table: a GPT with an EFI System
//! Partition is UEFI's, an MBR with boot code is BIOS's. `hutch import` picks the VM's
//! firmware this way when the user does not say.
//!
//! ```text
//!  LBA 0  MBR: 440 bytes boot code │ 4 partition entries at 446 │ 0x55AA at 510
//!         an entry of type 0xEE ─▶ protective MBR: the GPT is the table
//!  LBA 1  GPT header "EFI PART": entries' LBA (72), count (80), entry size (84)
//!         an entry whose type GUID is C12A7328-F81F-11D2-BA4B-00A0C93EC93B ─▶ an ESP
//! ```
//! Everything read is untrusted: counts and sizes are bounded before use, and a table that
//! does not parse boots with nothing (the caller falls back to its default).

use crate::{BlockBackend, DiskError};

const SECTOR: u64 = 512;
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xaa];
const MBR_BOOT_CODE: usize = 440;
const MBR_ENTRIES: usize = 446;
const MBR_ENTRY_SIZE: usize = 16;
const MBR_TYPE_GPT_PROTECTIVE: u8 = 0xee;
const MBR_TYPE_EFI: u8 = 0xef;
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// The EFI System Partition's type GUID as the GPT stores it (mixed-endian).
const ESP_TYPE_GUID: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];
/// More entries than any real table has (the usual is 128): a hostile count stops here.
const MAX_GPT_ENTRIES: u32 = 1024;
const MIN_GPT_ENTRY_SIZE: u32 = 128;
const MAX_GPT_ENTRY_SIZE: u32 = 4096;

/// The firmware a disk's partition table asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFirmware {
    Uefi,
    Bios,
}

/// What `disk` boots with, or `None` when its partition table names no boot loader (a blank
/// or data disk, or a table that does not parse). GPT with an ESP wins over MBR boot code:
/// a hybrid image boots either way and UEFI is the modern choice.
pub fn boot_firmware(disk: &dyn BlockBackend) -> Result<Option<BootFirmware>, DiskError> {
    if disk.size() < 2 * SECTOR {
        return Ok(None);
    }
    let mut mbr = [0u8; SECTOR as usize];
    disk.read_at(&mut mbr, 0)?;
    if mbr[510..512] != MBR_SIGNATURE {
        return Ok(None);
    }
    let types: Vec<u8> = (0..4).map(|i| mbr[MBR_ENTRIES + i * MBR_ENTRY_SIZE + 4]).collect();
    if types.contains(&MBR_TYPE_GPT_PROTECTIVE) && gpt_has_esp(disk)? {
        return Ok(Some(BootFirmware::Uefi));
    }
    let boot_code = mbr[..MBR_BOOT_CODE].iter().any(|&b| b != 0);
    if boot_code {
        return Ok(Some(BootFirmware::Bios));
    }
    // A FAT partition of type EF in a plain MBR is an ESP too (some installers make those).
    if types.contains(&MBR_TYPE_EFI) {
        return Ok(Some(BootFirmware::Uefi));
    }
    Ok(None)
}

fn gpt_has_esp(disk: &dyn BlockBackend) -> Result<bool, DiskError> {
    let mut header = [0u8; SECTOR as usize];
    disk.read_at(&mut header, SECTOR)?;
    if &header[..8] != GPT_SIGNATURE {
        return Ok(false);
    }
    let u32_at = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let entries_lba = u64::from_le_bytes(header[72..80].try_into().unwrap_or_default());
    let count = u32_at(80).min(MAX_GPT_ENTRIES);
    let entry_size = u32_at(84);
    if !(MIN_GPT_ENTRY_SIZE..=MAX_GPT_ENTRY_SIZE).contains(&entry_size) {
        return Ok(false);
    }
    let Some(start) = entries_lba.checked_mul(SECTOR) else {
        return Ok(false);
    };
    let len = u64::from(count) * u64::from(entry_size);
    if start.checked_add(len).is_none_or(|end| end > disk.size()) {
        return Ok(false);
    }
    let mut entries = vec![0u8; len as usize];
    disk.read_at(&mut entries, start)?;
    Ok(entries.chunks_exact(entry_size as usize).any(|entry| entry[..16] == ESP_TYPE_GUID))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use crate::RawFile;

    const MIB: usize = 1 << 20;

    fn disk(bytes: &[u8]) -> (tempfile::NamedTempFile, RawFile) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        let raw = RawFile::open(file.path(), true).unwrap();
        (file, raw)
    }

    fn mbr(boot_code: bool, first_type: u8) -> Vec<u8> {
        let mut image = vec![0u8; MIB];
        if boot_code {
            image[..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        }
        image[MBR_ENTRIES + 4] = first_type;
        image[510..512].copy_from_slice(&MBR_SIGNATURE);
        image
    }

    fn gpt(types: &[[u8; 16]], count: u32, entry_size: u32) -> Vec<u8> {
        let mut image = mbr(false, MBR_TYPE_GPT_PROTECTIVE);
        let header = &mut image[512..1024];
        header[..8].copy_from_slice(GPT_SIGNATURE);
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&count.to_le_bytes());
        header[84..88].copy_from_slice(&entry_size.to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            let at = 1024 + i * entry_size as usize;
            image[at..at + 16].copy_from_slice(t);
        }
        image
    }

    fn firmware_of(image: &[u8]) -> Option<BootFirmware> {
        let (_file, raw) = disk(image);
        boot_firmware(&raw).unwrap()
    }

    #[test]
    fn a_gpt_with_an_esp_boots_uefi() {
        let linux = [0xafu8; 16];
        assert_eq!(firmware_of(&gpt(&[linux, ESP_TYPE_GUID], 128, 128)), Some(BootFirmware::Uefi));
    }

    #[test]
    fn a_gpt_without_an_esp_names_no_firmware() {
        assert_eq!(firmware_of(&gpt(&[[0xafu8; 16]], 128, 128)), None);
    }

    #[test]
    fn an_mbr_with_boot_code_boots_bios() {
        assert_eq!(firmware_of(&mbr(true, 0x83)), Some(BootFirmware::Bios));
    }

    #[test]
    fn a_blank_disk_or_an_mbr_without_boot_code_names_no_firmware() {
        assert_eq!(firmware_of(&vec![0u8; MIB]), None);
        assert_eq!(firmware_of(&mbr(false, 0x83)), None);
        assert_eq!(firmware_of(&[0u8; 100]), None);
    }

    #[test]
    fn hostile_gpt_counts_and_sizes_are_bounded_not_trusted() {
        // An absurd count is cut to what a table can hold; absurd sizes or entries past the
        // disk's end are no table.
        assert_eq!(firmware_of(&gpt(&[ESP_TYPE_GUID], u32::MAX, 128)), Some(BootFirmware::Uefi));
        assert_eq!(firmware_of(&gpt(&[ESP_TYPE_GUID], 4, u32::MAX)), None);
        assert_eq!(firmware_of(&gpt(&[ESP_TYPE_GUID], 4, 0)), None);
        let mut far = gpt(&[ESP_TYPE_GUID], 4, 128);
        far[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(firmware_of(&far), None);
    }
}
