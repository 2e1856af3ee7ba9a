//! PCI: one root bus (bus 0) with a host bridge, configuration space reached through ports
//! 0xCF8/0xCFC and ECAM, and memory BARs assigned from the PCI MMIO window.
//!
//! ```text
//!  ports 0xCF8..0xCFF ─▶ PciConfigIo   ┐
//!  ECAM (bus 0)       ─▶ PciConfigMmio ├─▶ Arc<Mutex<PciRoot>> ─▶ slot 0: host bridge
//!  PCI MMIO window    ─▶ PciMmioWindow ┘                         slot n: Box<dyn PciDevice>
//! ```
//! BAR dispatch follows the BAR registers the guest last wrote, and only while the device's
//! command register enables memory decoding. Devices are locked on their own, so a slow BAR
//! access (a virtio notify doing disk I/O) does not hold up the rest of the bus.
//! A fixed BAR (the boot framebuffer, host memory the machine maps into the guest) lives in a
//! range the machine reserves with [`PciRoot::reserve_mmio`]; the allocator skips it.

pub mod config;
pub mod msix;
pub mod root;

pub use config::{PciConfiguration, PciHeader};
pub use root::{PciConfigIo, PciConfigMmio, PciMmioWindow, PciRoot, PciRootState};

use crate::state::StateError;

/// The kind of a memory BAR (I/O BARs are not supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciBarKind {
    Memory32,
    /// Takes two BAR registers: `index` and `index + 1`.
    Memory64,
}

/// One memory BAR a device decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    pub index: u8,
    /// Power of two, at least 16 bytes.
    pub size: u64,
    pub kind: PciBarKind,
    pub prefetchable: bool,
    /// A BAR the platform placed (32-bit only): it decodes this address whatever the guest
    /// writes, reads back its size mask while being sized, and must lie inside a range
    /// reserved with [`PciRoot::reserve_mmio`].
    pub fixed_address: Option<u64>,
}

/// One PCI function on bus 0 (function 0 of its slot).
pub trait PciDevice: Send {
    /// Reads configuration dword `reg` (byte offset `reg * 4`; up to 1024 for ECAM).
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Writes 1, 2 or 4 bytes at byte `offset` (0..4) within configuration dword `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// The memory BARs the device decodes.
    fn bars(&self) -> Vec<PciBar>;
    /// A read of `data.len()` bytes at `offset` inside BAR `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A write at `offset` inside BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// The device's saved state (configuration space included), encoded with
    /// [`crate::state::encode`]. A device that cannot be saved fails, naming itself.
    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        Err(StateError::not_snapshottable("PCI device", "it has no saved state"))
    }
    /// Puts saved state back into a device built the same way; a refused state leaves the
    /// device as it was.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), StateError> {
        Err(StateError::not_snapshottable("PCI device", "it has no saved state"))
    }
    /// Stops the device's own threads; afterwards it touches no guest memory until
    /// [`PciDevice::resume`].
    fn quiesce(&mut self) {}
    /// Undoes [`PciDevice::quiesce`] and serves whatever the guest queued meanwhile.
    fn resume(&mut self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("No free PCI slot on bus 0")]
    NoFreeSlot,
    #[error("BAR {index} has an invalid size {size:#x}")]
    InvalidBarSize { index: u8, size: u64 },
    #[error("BAR index {0} is out of range or already used")]
    InvalidBarIndex(u8),
    #[error("The PCI MMIO window has no room for a {size:#x}-byte BAR")]
    MmioWindowFull { size: u64 },
    #[error("No room left for capabilities in configuration space")]
    CapabilitySpaceFull,
    #[error(
        "Fixed BAR {index} at {address:#x} is not 32-bit, aligned and inside a reserved range"
    )]
    FixedBarNotReserved { index: u8, address: u64 },
    #[error("MMIO reservation {start:#x}+{size:#x} is outside the window, overlaps or was already allocated")]
    InvalidReservation { start: u64, size: u64 },
}
