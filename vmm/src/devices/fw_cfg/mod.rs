//! QEMU's firmware configuration device (fw_cfg), the one channel through which OVMF and
//! SeaBIOS learn the machine: CPU count, memory map (`etc/e820`), ACPI tables (through the
//! table-loader script, [`loader`]) and named files.
//!
//! ```text
//!  port +0  selector  (16-bit LE write: picks an item, rewinds its offset)
//!  port +1  data      (8-bit reads, sequential within the item; past the end: 0)
//!  port +4  DMA address, 64-bit big-endian: high half at +4, low half at +8 (triggers);
//!           reads give the "QEMU CFG" signature
//! ```
//!
//! The interface is QEMU's (`hw/nvram/fw_cfg.c`, `docs/specs/fw_cfg.rst`) as the firmwares'
//! drivers read it (EDK2 `QemuFwCfgLib`, SeaBIOS `src/fw/paravirt.c`). Nothing here is
//! x86-specific: the board picks the base port and the files. Everything the guest sends is
//! untrusted: a DMA transfer that does not fit guest memory ends with the ERROR bit and
//! touches nothing ([`dma`]).

#[cfg(test)]
pub(crate) mod apply;
mod dma;
pub mod loader;
pub mod persist;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

/// Where the PC puts the device (QEMU's `FW_CFG_IO_BASE`) and how many ports it decodes.
pub const FW_CFG_PORT_BASE: u64 = 0x510;
pub const FW_CFG_PORT_LEN: u64 = 0x0c;

/// Register offsets within the port range.
const SELECTOR_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;
const DMA_HIGH_OFFSET: u64 = 4;
const DMA_LOW_OFFSET: u64 = 8;
const DMA_END_OFFSET: u64 = 12;

/// The fixed item keys the firmwares read (QEMU's `FW_CFG_*`).
pub mod keys {
    pub const SIGNATURE: u16 = 0x0000;
    pub const ID: u16 = 0x0001;
    pub const NOGRAPHIC: u16 = 0x0004;
    pub const NB_CPUS: u16 = 0x0005;
    pub const BOOT_MENU: u16 = 0x000e;
    pub const MAX_CPUS: u16 = 0x000f;
    pub const FILE_DIR: u16 = 0x0019;
    /// The first file's key; files take the keys after it in name order.
    pub const FILE_FIRST: u16 = 0x0020;
    /// Set in a selector by a guest that means to write; the item is the same.
    pub const WRITE_CHANNEL: u16 = 0x4000;
    /// The architecture-specific items (SeaBIOS reads e.g. 0x8002 `etc/irq0-override`).
    pub const ARCH_LOCAL: u16 = 0x8000;
}

/// Feature bits of item 0x0001: the port interface and DMA (OVMF requires revision >= 1).
const FEATURE_TRADITIONAL: u32 = 1 << 0;
const FEATURE_DMA: u32 = 1 << 1;

/// What reading the DMA address register returns: "QEMU CFG", big-endian.
pub const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

/// A file name's field in the directory and the loader script, NUL-terminated.
pub const FILE_NAME_SIZE: usize = 56;

/// Files the directory may hold. QEMU's machines have 0x20..0x1000 slots; this bound keeps every
/// file's key below the write-channel bit with room to spare.
pub const MAX_FILES: usize = 0x1000 - keys::FILE_FIRST as usize;

/// e820 entry types (`etc/e820`).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg file name {name:?} is longer than {max} bytes")]
    NameTooLong { name: String, max: usize },
    #[error("fw_cfg file name {name:?} is empty or contains a NUL byte")]
    InvalidName { name: String },
    #[error("fw_cfg already has a file named {name:?}")]
    DuplicateFile { name: String },
    #[error("fw_cfg holds at most {max} files")]
    TooManyFiles { max: usize },
    #[error("fw_cfg file {name:?} of {len} bytes is larger than 4 GiB")]
    FileTooLarge { name: String, len: usize },
    #[error("fw_cfg key {key:#06x} is the directory's or a file's, not a fixed item's")]
    ReservedKey { key: u16 },
}

/// The fixed items a board sets from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfgConfig {
    /// vCPUs at boot: SeaBIOS waits until exactly this many have checked in.
    pub cpus: u16,
    pub max_cpus: u16,
    /// No display: SeaBIOS then adds its serial console on its own (sercon).
    pub nographic: bool,
    /// Whether the firmware shows its boot menu.
    pub boot_menu: bool,
}

/// Builds a file's content when the guest first selects it: QEMU's `select_cb`, with which
/// the ACPI tables are built after the firmware has placed the BARs.
pub type FileGenerator = Box<dyn FnMut() -> Vec<u8> + Send>;

/// Builds several files at once, in the order they were added with it (the ACPI tables, their
/// RSDP and the loader script must come from one build: QEMU's `acpi_build_update`).
pub type FilesGenerator = Box<dyn FnMut() -> Vec<Vec<u8>> + Send>;

/// Files built together, and whether they were built since the last reset.
struct GeneratedGroup {
    names: Vec<String>,
    generate: FilesGenerator,
    generated: bool,
}

struct FwCfgFile {
    name: String,
    data: Vec<u8>,
    /// A guest DMA WRITE may change its bytes (WRITE_POINTER targets).
    writable: bool,
    /// The [`GeneratedGroup`] that builds it.
    group: Option<usize>,
}

/// The fw_cfg device: fixed items, files in name order, the guest's selection, and the DMA
/// engine on guest memory.
pub struct FwCfg {
    memory: GuestMemory,
    items: BTreeMap<u16, Vec<u8>>,
    /// Sorted by name, as QEMU sorts them: file `i` has key `FILE_FIRST + i`.
    files: Vec<FwCfgFile>,
    groups: Vec<GeneratedGroup>,
    /// The directory's bytes, rebuilt whenever a file is added or changes length.
    directory: Vec<u8>,
    selector: u16,
    /// Next byte of the selected item; never advances past its end.
    offset: u32,
    /// The DMA address latch: the high half written at +4 waits here for the low half.
    dma_address: u64,
}

impl FwCfg {
    pub fn new(memory: GuestMemory, config: &FwCfgConfig) -> FwCfg {
        let mut items = BTreeMap::new();
        items.insert(keys::SIGNATURE, b"QEMU".to_vec());
        items.insert(keys::ID, (FEATURE_TRADITIONAL | FEATURE_DMA).to_le_bytes().to_vec());
        items.insert(keys::NOGRAPHIC, u16::from(config.nographic).to_le_bytes().to_vec());
        items.insert(keys::NB_CPUS, config.cpus.to_le_bytes().to_vec());
        items.insert(keys::MAX_CPUS, config.max_cpus.to_le_bytes().to_vec());
        items.insert(keys::BOOT_MENU, u16::from(config.boot_menu).to_le_bytes().to_vec());
        let mut fw_cfg = FwCfg {
            memory,
            items,
            files: Vec::new(),
            groups: Vec::new(),
            directory: Vec::new(),
            selector: keys::SIGNATURE,
            offset: 0,
            dma_address: 0,
        };
        fw_cfg.rebuild_directory();
        fw_cfg
    }

    /// Sets a fixed (non-file) item, e.g. an arch-local key (0x8000 and up).
    pub fn set_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        let key = key & !keys::WRITE_CHANNEL;
        if key == keys::FILE_DIR || (key & keys::ARCH_LOCAL == 0 && key >= keys::FILE_FIRST) {
            return Err(FwCfgError::ReservedKey { key });
        }
        self.items.insert(key, data);
        Ok(())
    }

    /// Adds a read-only file.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        self.insert_file(FwCfgFile::new(name, data, false, None))
    }

    /// Adds a file the guest may overwrite by DMA (in place: its length stays).
    pub fn add_writable_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        self.insert_file(FwCfgFile::new(name, data, true, None))
    }

    /// Adds a read-only file whose content `generate` builds again on the first selection
    /// after each reset. The directory lists `initial`'s length until then and the generated
    /// length after, so a generator should keep the length (QEMU pads its ACPI blobs for that
    /// reason): firmware sizes its buffer from the directory it read before selecting.
    pub fn add_generated_file(
        &mut self,
        name: &str,
        initial: Vec<u8>,
        mut generate: FileGenerator,
    ) -> Result<(), FwCfgError> {
        self.add_generated_files(vec![(name, initial)], Box::new(move || vec![generate()]))
    }

    /// Adds read-only files built together: the first selection of any of them after a reset
    /// runs `generate` once, which returns their contents in this order. As for one file, the
    /// lengths should stay those of the initial contents. Nothing is added on an error.
    pub fn add_generated_files(
        &mut self,
        files: Vec<(&str, Vec<u8>)>,
        generate: FilesGenerator,
    ) -> Result<(), FwCfgError> {
        if self.files.len() + files.len() > MAX_FILES {
            return Err(FwCfgError::TooManyFiles { max: MAX_FILES });
        }
        for (i, (name, data)) in files.iter().enumerate() {
            check_new_file(name, data)?;
            if self.find_file(name).is_some() || files[..i].iter().any(|(n, _)| n == name) {
                return Err(FwCfgError::DuplicateFile { name: name.to_string() });
            }
        }
        let group = self.groups.len();
        let names = files.iter().map(|(n, _)| n.to_string()).collect();
        self.groups.push(GeneratedGroup { names, generate, generated: false });
        for (name, data) in files {
            self.insert_file(FwCfgFile::new(name, data, false, Some(group)))?;
        }
        Ok(())
    }

    /// A file's current bytes (e.g. what the guest wrote into a WRITE_POINTER target).
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.find_file(name).map(|i| self.files[i].data.as_slice())
    }

    /// Back to power-on: item 0 selected, generators re-armed (QEMU's `fw_cfg_reset` and
    /// `acpi_build_reset`). Files keep their bytes.
    pub fn reset(&mut self) {
        for group in &mut self.groups {
            group.generated = false;
        }
        self.dma_address = 0;
        self.select(keys::SIGNATURE);
    }

    fn insert_file(&mut self, file: FwCfgFile) -> Result<(), FwCfgError> {
        check_new_file(&file.name, &file.data)?;
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles { max: MAX_FILES });
        }
        match self.files.binary_search_by(|f| f.name.as_str().cmp(&file.name)) {
            Ok(_) => Err(FwCfgError::DuplicateFile { name: file.name }),
            Err(at) => {
                self.files.insert(at, file);
                self.rebuild_directory();
                Ok(())
            }
        }
    }

    fn find_file(&self, name: &str) -> Option<usize> {
        self.files.binary_search_by(|f| f.name.as_str().cmp(name)).ok()
    }

    /// The directory item: BE u32 count, then per file {BE u32 size, BE u16 key, u16 0, name}.
    fn rebuild_directory(&mut self) {
        let mut dir = Vec::with_capacity(4 + self.files.len() * (8 + FILE_NAME_SIZE));
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (i, file) in self.files.iter().enumerate() {
            dir.extend_from_slice(&(file.data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&(keys::FILE_FIRST + i as u16).to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut name = [0u8; FILE_NAME_SIZE];
            name[..file.name.len()].copy_from_slice(file.name.as_bytes());
            dir.extend_from_slice(&name);
        }
        self.directory = dir;
    }

    /// Index of the file a key names, if it names one.
    fn file_index(key: u16) -> Option<usize> {
        let key = key & !keys::WRITE_CHANNEL;
        (key & keys::ARCH_LOCAL == 0 && key >= keys::FILE_FIRST)
            .then(|| usize::from(key - keys::FILE_FIRST))
    }

    /// Selects an item and rewinds to its start; a generated file is built here.
    fn select(&mut self, key: u16) {
        self.selector = key;
        self.offset = 0;
        let Some(g) = Self::file_index(key).and_then(|i| self.files.get(i)?.group) else {
            return;
        };
        let group = &mut self.groups[g];
        if group.generated {
            return;
        }
        group.generated = true;
        let contents = (group.generate)();
        if contents.len() != group.names.len()
            || contents.iter().any(|c| u32::try_from(c.len()).is_err())
        {
            log::error!(
                "fw_cfg: the generator of {:?} failed; the files keep their bytes",
                group.names
            );
            return;
        }
        let mut resized = false;
        for (name, data) in group.names.iter().zip(contents) {
            if let Ok(i) = self.files.binary_search_by(|f| f.name.as_str().cmp(name)) {
                let file = &mut self.files[i];
                resized |= data.len() != file.data.len();
                file.data = data;
            }
        }
        if resized {
            self.rebuild_directory();
        }
    }

    /// The selected item's bytes; `None` for a key that names nothing.
    fn selected(&self) -> Option<&[u8]> {
        if let Some(i) = Self::file_index(self.selector) {
            return self.files.get(i).map(|f| f.data.as_slice());
        }
        match self.selector & !keys::WRITE_CHANNEL {
            keys::FILE_DIR => Some(&self.directory),
            key => self.items.get(&key).map(Vec::as_slice),
        }
    }

    fn read_data_byte(&mut self) -> u8 {
        let offset = self.offset;
        match self.selected().and_then(|d| d.get(offset as usize)).copied() {
            Some(byte) => {
                self.offset += 1;
                byte
            }
            None => 0,
        }
    }
}

impl FwCfgFile {
    fn new(name: &str, data: Vec<u8>, writable: bool, group: Option<usize>) -> Self {
        FwCfgFile { name: name.to_string(), data, writable, group }
    }
}

/// A name fits the directory's 56-byte field with its NUL, a length its 32-bit size field.
fn check_new_file(name: &str, data: &[u8]) -> Result<(), FwCfgError> {
    if u32::try_from(data.len()).is_err() {
        return Err(FwCfgError::FileTooLarge { name: name.to_string(), len: data.len() });
    }
    if name.is_empty() || name.contains('\0') {
        return Err(FwCfgError::InvalidName { name: name.to_string() });
    }
    if name.len() >= FILE_NAME_SIZE {
        return Err(FwCfgError::NameTooLong { name: name.to_string(), max: FILE_NAME_SIZE - 1 });
    }
    Ok(())
}

/// The content of `etc/e820`: packed little-endian {u64 base, u64 length, u32 type} entries.
pub fn e820_file(entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(entries.len() * 20);
    for &(base, len, kind) in entries {
        bytes.extend_from_slice(&base.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&kind.to_le_bytes());
    }
    bytes
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // QEMU's x86 port decodes a data read at either port; wider reads (valid on the
            // MMIO variant) give successive bytes.
            SELECTOR_OFFSET | DATA_OFFSET => {
                data.iter_mut().for_each(|b| *b = self.read_data_byte())
            }
            DMA_HIGH_OFFSET..DMA_END_OFFSET => {
                let signature = DMA_SIGNATURE.to_be_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    let at = (offset - DMA_HIGH_OFFSET) as usize + i;
                    *b = signature.get(at).copied().unwrap_or(0xff);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (SELECTOR_OFFSET, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            // Data-port writes: QEMU has ignored them since v2.4 (writes go through DMA), and
            // OVMF only falls back to them when DMA is missing, which it never is here.
            (SELECTOR_OFFSET | DATA_OFFSET, 1) => {}
            (DMA_HIGH_OFFSET, 4) => {
                let high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                self.dma_address = u64::from(high) << 32;
            }
            (DMA_LOW_OFFSET, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                self.dma_address |= u64::from(low);
                self.dma_transfer();
            }
            (DMA_HIGH_OFFSET, 8) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(data);
                self.dma_address = u64::from_be_bytes(be);
                self.dma_transfer();
            }
            _ => log::debug!("fw_cfg: ignored {}-byte write at +{offset:#x}", data.len()),
        }
    }
}
