//! The ACPI table-loader script (`etc/table-loader`): commands that tell the firmware where to
//! put fw_cfg files in guest memory and how to link them, so that the host builds tables
//! without knowing their guest addresses.
//!
//! Each command is a 128-byte entry {u32 type LE, body, zero padding}, as QEMU's
//! `hw/acpi/bios-linker-loader.c` writes them and EDK2's
//! `OvmfPkg/Include/IndustryStandard/QemuLoader.h` and SeaBIOS's `src/fw/romfile_loader.c`
//! read them. All integers little-endian, file names NUL-padded to 56 bytes.
//!
//! ```text
//!  ALLOCATE       file, u32 align, u8 zone            place the file in HIGH or FSEG memory
//!  ADD_POINTER    dest, src, u32 offset, u8 size      dest[offset..+size] += address of src
//!  ADD_CHECKSUM   file, u32 result, u32 start, u32 len  file[result] = -(sum of the range)
//!  WRITE_POINTER  dest, src, u32 offset, u32 src_offset, u8 size
//!                                                     fw_cfg file dest[offset..] = src + src_offset
//! ```

use std::collections::BTreeMap;

use super::FILE_NAME_SIZE;

/// One script entry's size.
pub const LOADER_ENTRY_SIZE: usize = 128;

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
const CMD_WRITE_POINTER: u32 = 4;

/// Where the firmware puts an allocated file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocZone {
    /// Anywhere below 4 GiB (OVMF: ACPI NVS memory).
    High = 1,
    /// The F segment, 0xE0000..0x100000, where a BIOS-era OS scans for the RSDP.
    FSeg = 2,
}

/// One loader command, as the firmware reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoaderCommand {
    Allocate { file: String, align: u32, zone: AllocZone },
    AddPointer { dest_file: String, src_file: String, offset: u32, size: u8 },
    AddChecksum { file: String, result_offset: u32, start: u32, length: u32 },
    WritePointer { dest_file: String, src_file: String, offset: u32, src_offset: u32, size: u8 },
}

#[derive(Debug, thiserror::Error)]
pub enum TableLoaderError {
    #[error("Loader file name {name:?} is empty, has a NUL or is longer than {max} bytes")]
    InvalidName { name: String, max: usize },
    #[error("Loader file {name:?} is allocated twice")]
    DuplicateAllocation { name: String },
    #[error("Loader file {name:?} is referenced before it is allocated")]
    NotAllocated { name: String },
    #[error("Alignment {align} of loader file {name:?} is not a power of two")]
    InvalidAlignment { name: String, align: u32 },
    #[error("Pointer size {size} is not 1, 2, 4 or 8")]
    InvalidPointerSize { size: u8 },
    #[error("Range {start:#x}+{len:#x} lies outside loader file {name:?} of {file_len:#x} bytes")]
    OutOfRange { name: String, start: u64, len: u64, file_len: usize },
}

/// Builds a script, checking each command against the files it names (QEMU asserts the same).
#[derive(Debug, Default)]
pub struct TableLoader {
    commands: Vec<LoaderCommand>,
    /// Allocated files and their lengths.
    allocated: BTreeMap<String, usize>,
}

impl TableLoader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the firmware to place `file` (`len` bytes) in `zone`, aligned to `align`.
    pub fn allocate(
        &mut self,
        file: &str,
        len: usize,
        align: u32,
        zone: AllocZone,
    ) -> Result<(), TableLoaderError> {
        check_name(file)?;
        if !align.is_power_of_two() {
            return Err(TableLoaderError::InvalidAlignment { name: file.to_string(), align });
        }
        if self.allocated.contains_key(file) {
            return Err(TableLoaderError::DuplicateAllocation { name: file.to_string() });
        }
        self.allocated.insert(file.to_string(), len);
        self.commands.push(LoaderCommand::Allocate { file: file.to_string(), align, zone });
        Ok(())
    }

    /// Adds `src_file`'s guest address to the `size`-byte value at `offset` in `dest_file`
    /// (which holds the offset into `src_file` the pointer should end at).
    pub fn add_pointer(
        &mut self,
        dest_file: &str,
        offset: u32,
        size: u8,
        src_file: &str,
    ) -> Result<(), TableLoaderError> {
        check_pointer_size(size)?;
        self.check_range(dest_file, u64::from(offset), u64::from(size))?;
        self.check_allocated(src_file)?;
        self.commands.push(LoaderCommand::AddPointer {
            dest_file: dest_file.to_string(),
            src_file: src_file.to_string(),
            offset,
            size,
        });
        Ok(())
    }

    /// Stores at `result_offset` the byte that makes `file[start..start + length]` sum to 0;
    /// that byte must be 0 in the file (it is part of the range).
    pub fn add_checksum(
        &mut self,
        file: &str,
        result_offset: u32,
        start: u32,
        length: u32,
    ) -> Result<(), TableLoaderError> {
        self.check_range(file, u64::from(result_offset), 1)?;
        self.check_range(file, u64::from(start), u64::from(length))?;
        self.commands.push(LoaderCommand::AddChecksum {
            file: file.to_string(),
            result_offset,
            start,
            length,
        });
        Ok(())
    }

    /// Asks the firmware to write `src_file`'s address plus `src_offset` into the writable
    /// fw_cfg file `dest_file` at `offset` (by fw_cfg DMA; `dest_file` is not allocated, so
    /// its bounds are the device's to check).
    pub fn write_pointer(
        &mut self,
        dest_file: &str,
        offset: u32,
        size: u8,
        src_file: &str,
        src_offset: u32,
    ) -> Result<(), TableLoaderError> {
        check_name(dest_file)?;
        check_pointer_size(size)?;
        self.check_range(src_file, u64::from(src_offset), 1)?;
        self.commands.push(LoaderCommand::WritePointer {
            dest_file: dest_file.to_string(),
            src_file: src_file.to_string(),
            offset,
            src_offset,
            size,
        });
        Ok(())
    }

    pub fn commands(&self) -> &[LoaderCommand] {
        &self.commands
    }

    /// The script's bytes: the content of `etc/table-loader`.
    pub fn script(&self) -> Vec<u8> {
        self.commands.iter().flat_map(|c| c.encode()).collect()
    }

    fn check_allocated(&self, name: &str) -> Result<usize, TableLoaderError> {
        self.allocated
            .get(name)
            .copied()
            .ok_or_else(|| TableLoaderError::NotAllocated { name: name.to_string() })
    }

    fn check_range(&self, name: &str, start: u64, len: u64) -> Result<(), TableLoaderError> {
        let file_len = self.check_allocated(name)?;
        if start.checked_add(len).is_none_or(|end| end > file_len as u64) {
            return Err(TableLoaderError::OutOfRange {
                name: name.to_string(),
                start,
                len,
                file_len,
            });
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), TableLoaderError> {
    if name.is_empty() || name.contains('\0') || name.len() >= FILE_NAME_SIZE {
        return Err(TableLoaderError::InvalidName {
            name: name.to_string(),
            max: FILE_NAME_SIZE - 1,
        });
    }
    Ok(())
}

fn check_pointer_size(size: u8) -> Result<(), TableLoaderError> {
    match size {
        1 | 2 | 4 | 8 => Ok(()),
        _ => Err(TableLoaderError::InvalidPointerSize { size }),
    }
}

/// A little-endian writer over one entry's bytes.
struct Entry {
    bytes: [u8; LOADER_ENTRY_SIZE],
    at: usize,
}

impl Entry {
    fn new(command: u32) -> Self {
        let mut entry = Entry { bytes: [0; LOADER_ENTRY_SIZE], at: 0 };
        entry.put(&command.to_le_bytes());
        entry
    }

    fn put(&mut self, bytes: &[u8]) {
        self.bytes[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }

    /// A name, NUL-padded to the field (names are checked shorter than it).
    fn name(&mut self, name: &str) {
        let mut field = [0u8; FILE_NAME_SIZE];
        let len = name.len().min(FILE_NAME_SIZE - 1);
        field[..len].copy_from_slice(&name.as_bytes()[..len]);
        self.put(&field);
    }
}

impl LoaderCommand {
    /// The command's 128-byte entry.
    pub fn encode(&self) -> [u8; LOADER_ENTRY_SIZE] {
        let entry = match self {
            LoaderCommand::Allocate { file, align, zone } => {
                let mut e = Entry::new(CMD_ALLOCATE);
                e.name(file);
                e.put(&align.to_le_bytes());
                e.put(&[*zone as u8]);
                e
            }
            LoaderCommand::AddPointer { dest_file, src_file, offset, size } => {
                let mut e = Entry::new(CMD_ADD_POINTER);
                e.name(dest_file);
                e.name(src_file);
                e.put(&offset.to_le_bytes());
                e.put(&[*size]);
                e
            }
            LoaderCommand::AddChecksum { file, result_offset, start, length } => {
                let mut e = Entry::new(CMD_ADD_CHECKSUM);
                e.name(file);
                e.put(&result_offset.to_le_bytes());
                e.put(&start.to_le_bytes());
                e.put(&length.to_le_bytes());
                e
            }
            LoaderCommand::WritePointer { dest_file, src_file, offset, src_offset, size } => {
                let mut e = Entry::new(CMD_WRITE_POINTER);
                e.name(dest_file);
                e.name(src_file);
                e.put(&offset.to_le_bytes());
                e.put(&src_offset.to_le_bytes());
                e.put(&[*size]);
                e
            }
        };
        entry.bytes
    }

    /// Reads an entry back the way the firmware does; `None` for a type it skips (QEMU
    /// documents that unknown commands are ignored) or an entry that is not valid.
    pub fn decode(entry: &[u8; LOADER_ENTRY_SIZE]) -> Option<LoaderCommand> {
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&entry[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let name_at = |at: usize| {
            let field = &entry[at..at + FILE_NAME_SIZE];
            // The firmware requires the NUL within the field.
            let len = field.iter().position(|&b| b == 0)?;
            String::from_utf8(field[..len].to_vec()).ok()
        };
        const BODY: usize = 4;
        const SECOND_NAME: usize = BODY + FILE_NAME_SIZE;
        const AFTER_TWO_NAMES: usize = BODY + 2 * FILE_NAME_SIZE;
        match u32_at(0) {
            CMD_ALLOCATE => Some(LoaderCommand::Allocate {
                file: name_at(BODY)?,
                align: u32_at(SECOND_NAME),
                zone: match entry[SECOND_NAME + 4] {
                    1 => AllocZone::High,
                    2 => AllocZone::FSeg,
                    _ => return None,
                },
            }),
            CMD_ADD_POINTER => Some(LoaderCommand::AddPointer {
                dest_file: name_at(BODY)?,
                src_file: name_at(SECOND_NAME)?,
                offset: u32_at(AFTER_TWO_NAMES),
                size: entry[AFTER_TWO_NAMES + 4],
            }),
            CMD_ADD_CHECKSUM => Some(LoaderCommand::AddChecksum {
                file: name_at(BODY)?,
                result_offset: u32_at(SECOND_NAME),
                start: u32_at(SECOND_NAME + 4),
                length: u32_at(SECOND_NAME + 8),
            }),
            CMD_WRITE_POINTER => Some(LoaderCommand::WritePointer {
                dest_file: name_at(BODY)?,
                src_file: name_at(SECOND_NAME)?,
                offset: u32_at(AFTER_TWO_NAMES),
                src_offset: u32_at(AFTER_TWO_NAMES + 4),
                size: entry[AFTER_TWO_NAMES + 8],
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    /// An entry as hex: the bytes given, then zeros up to 128.
    fn entry_hex(parts: &[&[u8]]) -> [u8; LOADER_ENTRY_SIZE] {
        let mut out = [0u8; LOADER_ENTRY_SIZE];
        let mut at = 0;
        for p in parts {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        out
    }

    fn name56(name: &str) -> [u8; 56] {
        let mut f = [0u8; 56];
        f[..name.len()].copy_from_slice(name.as_bytes());
        f
    }

    #[test]
    fn allocate_entry_layout_matches_qemu() {
        let cmd = LoaderCommand::Allocate {
            file: "etc/acpi/rsdp".into(),
            align: 16,
            zone: AllocZone::FSeg,
        };
        let want = entry_hex(&[&[1, 0, 0, 0], &name56("etc/acpi/rsdp"), &[16, 0, 0, 0], &[2]]);
        assert_eq!(cmd.encode(), want);
        // Fixed offsets, as QemuLoader.h packs them: align at 60, zone at 64.
        assert_eq!(&want[60..65], &[16, 0, 0, 0, 2]);
        assert_eq!(LoaderCommand::decode(&want), Some(cmd));
    }

    #[test]
    fn add_pointer_entry_layout_matches_qemu() {
        let cmd = LoaderCommand::AddPointer {
            dest_file: "etc/acpi/rsdp".into(),
            src_file: "etc/acpi/tables".into(),
            offset: 0x18,
            size: 8,
        };
        let bytes = cmd.encode();
        let want = entry_hex(&[
            &[2, 0, 0, 0],
            &name56("etc/acpi/rsdp"),
            &name56("etc/acpi/tables"),
            &[0x18, 0, 0, 0],
            &[8],
        ]);
        assert_eq!(bytes, want);
        assert_eq!(&bytes[116..121], &[0x18, 0, 0, 0, 8]);
        assert_eq!(LoaderCommand::decode(&bytes), Some(cmd));
    }

    #[test]
    fn add_checksum_entry_layout_matches_qemu() {
        let cmd = LoaderCommand::AddChecksum {
            file: "etc/acpi/tables".into(),
            result_offset: 0x109,
            start: 0x100,
            length: 0x24,
        };
        let bytes = cmd.encode();
        let want = entry_hex(&[
            &[3, 0, 0, 0],
            &name56("etc/acpi/tables"),
            &[0x09, 0x01, 0, 0],
            &[0, 0x01, 0, 0],
            &[0x24, 0, 0, 0],
        ]);
        assert_eq!(bytes, want);
        assert_eq!(LoaderCommand::decode(&bytes), Some(cmd));
    }

    #[test]
    fn write_pointer_entry_layout_matches_edk2() {
        let cmd = LoaderCommand::WritePointer {
            dest_file: "etc/vmgenid_addr".into(),
            src_file: "etc/vmgenid_guid".into(),
            offset: 0,
            src_offset: 40,
            size: 8,
        };
        let bytes = cmd.encode();
        let want = entry_hex(&[
            &[4, 0, 0, 0],
            &name56("etc/vmgenid_addr"),
            &name56("etc/vmgenid_guid"),
            &[0, 0, 0, 0],
            &[40, 0, 0, 0],
            &[8],
        ]);
        assert_eq!(bytes, want);
        assert_eq!(&bytes[116..125], &[0, 0, 0, 0, 40, 0, 0, 0, 8]);
        assert_eq!(LoaderCommand::decode(&bytes), Some(cmd));
    }

    #[test]
    fn script_is_the_entries_in_order() {
        let mut loader = TableLoader::new();
        loader.allocate("etc/acpi/tables", 64, 64, AllocZone::High).unwrap();
        loader.add_checksum("etc/acpi/tables", 9, 0, 36).unwrap();
        let script = loader.script();
        assert_eq!(script.len(), 2 * LOADER_ENTRY_SIZE);
        assert_eq!(&script[..4], &[1, 0, 0, 0]);
        assert_eq!(&script[128..132], &[3, 0, 0, 0]);
    }

    #[test]
    fn builder_refuses_commands_the_firmware_would_reject() {
        let mut l = TableLoader::new();
        assert!(matches!(
            l.add_checksum("etc/acpi/tables", 0, 0, 1),
            Err(TableLoaderError::NotAllocated { .. })
        ));
        l.allocate("etc/acpi/tables", 100, 64, AllocZone::High).unwrap();
        assert!(matches!(
            l.allocate("etc/acpi/tables", 100, 64, AllocZone::High),
            Err(TableLoaderError::DuplicateAllocation { .. })
        ));
        assert!(matches!(
            l.allocate("etc/acpi/rsdp", 36, 12, AllocZone::FSeg),
            Err(TableLoaderError::InvalidAlignment { .. })
        ));
        assert!(matches!(
            l.allocate(&"x".repeat(56), 1, 1, AllocZone::High),
            Err(TableLoaderError::InvalidName { .. })
        ));
        assert!(matches!(
            l.add_pointer("etc/acpi/tables", 96, 8, "etc/acpi/tables"),
            Err(TableLoaderError::OutOfRange { .. })
        ));
        assert!(matches!(
            l.add_pointer("etc/acpi/tables", 0, 3, "etc/acpi/tables"),
            Err(TableLoaderError::InvalidPointerSize { size: 3 })
        ));
        assert!(matches!(
            l.add_checksum("etc/acpi/tables", 0, u32::MAX, 2),
            Err(TableLoaderError::OutOfRange { .. })
        ));
        l.add_pointer("etc/acpi/tables", 92, 8, "etc/acpi/tables").unwrap();
        assert_eq!(l.commands().len(), 2);
    }

    #[test]
    fn unknown_command_types_decode_as_skipped() {
        let mut entry = [0u8; LOADER_ENTRY_SIZE];
        entry[0] = 9;
        assert_eq!(LoaderCommand::decode(&entry), None);
        // A name without its NUL inside the field is refused.
        let mut entry =
            LoaderCommand::Allocate { file: "a".into(), align: 1, zone: AllocZone::High }.encode();
        entry[4..60].fill(b'a');
        assert_eq!(LoaderCommand::decode(&entry), None);
    }
}
