//! CFI parallel flash (Intel command set, x8) holding a VM's UEFI variable store: OVMF's
//! `OVMF_VARS_4M.fd`, copied per VM to `vars.fd`, mapped as trapped MMIO directly below the
//! firmware code (every read and write exits here).
//!
//! Only the command subset OVMF's `QemuFlashFvbServicesRuntimeDxe` uses, with the status
//! semantics of QEMU's `pflash_cfi01`, which is what OVMF is tested against:
//!
//! ```text
//!   0xFF / 0x00 / 0xF0  read array            0x70  read status (0x80 = ready)
//!   0x50                clear status (to 0x00, ready bit too: OVMF's probe needs that)
//!   0x10 / 0x40, data   program (new = old & data, as NOR flash; status mode after)
//!   0x20, 0xD0          erase the 4 KiB block to 0xFF (status mode after)
//!   anything else       back to read array (0x90 read-ID and 0x98 CFI query are not
//!                       implemented: OVMF never sends them)
//! ```
//!
//! QEMU stores programmed data as written; a real NOR part ANDs it in. Both give the same
//! bytes for OVMF, whose variable and fault-tolerant-write drivers are written for NOR flash
//! (erase polarity 1: they only ever clear bits between erases); the AND also keeps a guest
//! from rewriting a byte without erasing, as on real flash.
//!
//! Durability: the contents live in memory. When the guest returns the device to read-array
//! mode after changing bytes (OVMF writes 0xFF after every program run), the whole image is
//! written to a temp file, fsynced and renamed over the file (`file.rs`). The file is then
//! always the flash as it was after some prefix of the guest's operations, which is the state
//! a power loss on real flash leaves, and which edk2's fault-tolerant write recovers from. An
//! erase is flushed with the program run that follows it (OVMF always programs after erasing),
//! so a reclaim does not rewrite the file once per block. [`Pflash::flush`] (the board at
//! power-off) and `Drop` write anything still pending.
//!
//! In read-only mode ([`PflashAccess::ReadOnly`]) the guest's writes change only the copy in
//! memory, like OVMF's emulated store: the guest boots normally and its changes are gone at
//! power-off; the file is never written.

mod file;
pub mod persist;
#[cfg(test)]
mod tests;

use std::fs::Permissions;
use std::path::{Path, PathBuf};

use crate::devices::bus::BusDevice;
use crate::state::StateError;
pub use persist::{PflashMode, PflashState};

/// Erase block size: `PcdOvmfFirmwareBlockSize` of every OVMF build.
pub const BLOCK_SIZE: u64 = 0x1000;
/// Largest image accepted: OVMF's whole 4 MiB flash device, with room to spare.
pub const MAX_FLASH_BYTES: u64 = 64 << 20;

const CMD_PROGRAM: u8 = 0x10;
const CMD_PROGRAM_ALT: u8 = 0x40;
const CMD_ERASE_SETUP: u8 = 0x20;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_ERASE_CONFIRM: u8 = 0xd0;
const CMD_READ_ARRAY: u8 = 0xff;
/// Not CFI, but QEMU's model and AMD-style probes treat them as read array.
const CMD_READ_ARRAY_QEMU: u8 = 0x00;
const CMD_READ_ARRAY_AMD: u8 = 0xf0;

/// Status register: the write state machine is ready.
pub const STATUS_READY: u8 = 0x80;
/// Status register: a program failed (here: the access left the device).
pub const STATUS_PROGRAM_ERROR: u8 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum PflashError {
    #[error("UEFI variable store {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("Cannot open UEFI variable store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read UEFI variable store {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("UEFI variable store {path} is empty")]
    Empty { path: PathBuf },
    #[error("UEFI variable store {path} is {size} bytes, not a multiple of the {block}-byte flash block")]
    NotWholeBlocks { path: PathBuf, size: u64, block: u64 },
    #[error("UEFI variable store {path} is {size} bytes, more than the {max} a flash may hold")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("Cannot write UEFI variable store {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the guest's changes reach the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PflashAccess {
    /// Changes are flushed to the file (see the module doc for when).
    ReadWrite,
    /// Changes stay in memory and are lost at power-off; the file is only read.
    ReadOnly,
}

/// The flash device. Offsets are relative to its base; its size is the file's.
pub struct Pflash {
    path: PathBuf,
    /// `Some` (the file's permissions, kept across replacements) when changes are flushed.
    writeback: Option<Permissions>,
    contents: Vec<u8>,
    mode: PflashMode,
    status: u8,
    /// Contents changed since the last flush.
    dirty: bool,
    /// An unsupported command was already logged (a guest must not flood the log).
    warned_unsupported: bool,
}

impl Pflash {
    /// Opens the VM's variable store.
    pub fn open(path: &Path, access: PflashAccess) -> Result<Pflash, PflashError> {
        let (contents, permissions) = file::load(path, access == PflashAccess::ReadWrite)?;
        Ok(Pflash {
            path: path.to_path_buf(),
            writeback: permissions,
            contents,
            mode: PflashMode::ReadArray,
            status: STATUS_READY,
            dirty: false,
            warned_unsupported: false,
        })
    }

    /// Copies the firmware's variable template to `dest` (the VM's `vars.fd`) if `dest` does
    /// not exist yet; true when it made the copy. An existing store is never touched.
    pub fn create_vars(template: &Path, dest: &Path) -> Result<bool, PflashError> {
        file::create_from_template(template, dest)
    }

    /// Size of the MMIO region the board maps for it.
    pub fn size(&self) -> u64 {
        self.contents.len() as u64
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes pending changes to the file (a no-op when there are none or in read-only mode).
    /// On failure the changes stay pending and the file keeps its previous contents.
    pub fn flush(&mut self) -> Result<(), PflashError> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(permissions) = &self.writeback {
            file::replace(&self.path, &self.contents, Some(permissions))?;
        }
        self.dirty = false;
        Ok(())
    }

    /// A system reset: read-array mode, status ready (QEMU's cfi01 reset); contents stay.
    pub fn reset(&mut self) {
        self.enter_read_array();
        self.status = STATUS_READY;
    }

    pub fn save_state(&self) -> PflashState {
        PflashState { mode: self.mode, status: self.status, contents: self.contents.clone() }
    }

    /// Restores a snapshot's state and writes its contents to the file (see `persist.rs` for
    /// why). Refused state, or a failed write, leaves the device and the file as they were.
    pub fn restore_state(&mut self, state: &PflashState) -> Result<(), StateError> {
        if state.contents.len() != self.contents.len() {
            return Err(StateError::invalid(
                "pflash",
                format!(
                    "saved flash is {} bytes, {} is {}",
                    state.contents.len(),
                    self.path.display(),
                    self.contents.len()
                ),
            ));
        }
        if let PflashMode::EraseSetup { block } = state.mode {
            if !block.is_multiple_of(BLOCK_SIZE) || block >= self.size() {
                return Err(StateError::invalid("pflash", "erase block out of range"));
            }
        }
        if let Some(permissions) = &self.writeback {
            file::replace(&self.path, &state.contents, Some(permissions))
                .map_err(|e| StateError::rejected("pflash", e))?;
        }
        self.contents.clone_from(&state.contents);
        self.mode = state.mode;
        self.status = state.status;
        self.dirty = false;
        Ok(())
    }

    /// `offset..offset+len` as an index range when the access is a whole CPU access (1, 2, 4
    /// or 8 bytes) inside the device.
    fn access_range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return None;
        }
        let end = offset.checked_add(len as u64)?;
        (end <= self.size()).then_some(offset as usize..end as usize)
    }

    /// Back to read array, flushing what the finished operation changed.
    fn enter_read_array(&mut self) {
        self.mode = PflashMode::ReadArray;
        if let Err(e) = self.flush() {
            log::error!("pflash: {}", describe(&e));
        }
    }

    fn command(&mut self, offset: u64, cmd: u8) {
        match cmd {
            CMD_READ_ARRAY | CMD_READ_ARRAY_QEMU | CMD_READ_ARRAY_AMD => self.enter_read_array(),
            CMD_CLEAR_STATUS => {
                self.status = 0;
                self.enter_read_array();
            }
            CMD_READ_STATUS => self.mode = PflashMode::ReadStatus,
            CMD_PROGRAM | CMD_PROGRAM_ALT => self.mode = PflashMode::Program,
            CMD_ERASE_SETUP => {
                self.mode = PflashMode::EraseSetup { block: offset & !(BLOCK_SIZE - 1) };
            }
            _ => {
                if !self.warned_unsupported {
                    self.warned_unsupported = true;
                    log::warn!("pflash: unsupported command {cmd:#04x} at {offset:#x}, back to read array (logged once)");
                }
                self.enter_read_array();
            }
        }
    }

    fn program(&mut self, offset: u64, data: &[u8]) {
        self.mode = PflashMode::ReadStatus;
        self.status |= STATUS_READY;
        let Some(range) = self.access_range(offset, data.len()) else {
            self.status |= STATUS_PROGRAM_ERROR;
            return;
        };
        for (cell, &byte) in self.contents[range].iter_mut().zip(data) {
            let new = *cell & byte;
            if new != *cell {
                *cell = new;
                self.dirty = true;
            }
        }
    }

    fn erase(&mut self, block: u64) {
        self.mode = PflashMode::ReadStatus;
        self.status |= STATUS_READY;
        let start = block as usize;
        let Some(cells) = self.contents.get_mut(start..start + BLOCK_SIZE as usize) else {
            return;
        };
        if cells.iter().any(|&b| b != 0xff) {
            cells.fill(0xff);
            self.dirty = true;
        }
    }
}

impl BusDevice for Pflash {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.mode {
            PflashMode::ReadArray => match self.access_range(offset, data.len()) {
                Some(range) => data.copy_from_slice(&self.contents[range]),
                None => data.fill(0xff),
            },
            // An x8 part on a wider access: every byte lane shows the status.
            PflashMode::ReadStatus | PflashMode::Program | PflashMode::EraseSetup { .. } => {
                data.fill(self.status)
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.access_range(offset, data.len()).is_none() && self.mode != PflashMode::Program {
            return;
        }
        // Commands are the low byte of the access (the x8 part's data lines).
        let Some(&low) = data.first() else { return };
        match self.mode {
            PflashMode::ReadArray | PflashMode::ReadStatus => self.command(offset, low),
            PflashMode::Program => self.program(offset, data),
            PflashMode::EraseSetup { block } => match low {
                CMD_ERASE_CONFIRM => self.erase(block),
                // Read array cancels the erase; anything else is a sequence error, which QEMU
                // also answers with read array.
                _ => self.enter_read_array(),
            },
        }
    }
}

impl Drop for Pflash {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::error!("pflash: {}; the guest's last variable changes are lost", describe(&e));
        }
    }
}

/// The error and its sources on one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}
