//! PCI: a root complex with a host bridge, functions placed by bus/device/function,
//! configuration space reached through ports 0xCF8/0xCFC and ECAM, and BARs assigned from
//! windows the board gives it.
//!
//! ```text
//!  ports 0xCF8..0xCFF ─▶ PciConfigIo   ┐
//!  ECAM               ─▶ PciConfigMmio │
//!  MMIO windows       ─▶ PciMmioWindow ├─▶ Arc<Mutex<PciRoot>> ─▶ 00:00.0 host bridge
//!  I/O window         ─▶ PciIoWindow   ┘        │                 bb:dd.f Box<dyn PciDevice>
//!                                               └─ RAM BARs ─▶ MemoryMapper (map / unmap)
//! ```
//! BAR dispatch follows the BAR registers the guest last wrote, only while the function's
//! command register enables the space (bit 0 I/O, bit 1 memory) and only inside a window of
//! that space (never at a BAR's all-ones sizing address); the function hears where each BAR
//! decodes ([`PciDevice::bar_decoded`]) so that what it keeps at a guest address (virtio's
//! notifiers) moves with it when firmware sizes and places every BAR. Devices are locked on their
//! own, so a slow BAR access (a virtio notify doing disk I/O) does not hold up the rest of the
//! bus. A RAM BAR (host memory, the boot framebuffer) is not dispatched at all: the root maps
//! it into the guest where the BAR points and moves the mapping when the guest moves the BAR.

pub mod config;
pub mod msix;
pub mod persist;
pub mod root;

pub use config::{PciConfiguration, PciHeader};
pub use persist::{PciConfigIoState, PciRootStateV1};
pub use root::{
    PciConfigIo, PciConfigMmio, PciHostBridge, PciIoWindow, PciMmioWindow, PciRoot, PciRootConfig,
    PciWindow,
};

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::bus::lock;
use crate::hypervisor::InterruptSink;
use crate::memory::slots::HostMemory;
use crate::state::StateError;

/// The BAR index under which a function's expansion ROM is declared and dispatched.
pub const ROM_BAR_INDEX: u8 = 6;

/// Bus, device and function of one PCI function. Shown (and used as a snapshot key) as
/// `00:03.0`: two hex digits of bus and device, one of function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// None unless `device` < 32 and `function` < 8.
    pub const fn new(bus: u8, device: u8, function: u8) -> Option<Bdf> {
        if device < 32 && function < 8 {
            Some(Bdf { bus, device, function })
        } else {
            None
        }
    }

    pub fn bus(self) -> u8 {
        self.bus
    }

    pub fn device(self) -> u8 {
        self.device
    }

    pub fn function(self) -> u8 {
        self.function
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.device, self.function)
    }
}

impl FromStr for Bdf {
    type Err = PciError;

    /// Parses exactly the [`Display`](fmt::Display) form (`00:1f.7`).
    fn from_str(s: &str) -> Result<Bdf, PciError> {
        let invalid = || PciError::InvalidBdf(s.to_string());
        let bytes = s.as_bytes();
        if bytes.len() != 7 || bytes[2] != b':' || bytes[5] != b'.' {
            return Err(invalid());
        }
        let hex = |part: &str| {
            if part.bytes().all(|b| b.is_ascii_hexdigit()) {
                u8::from_str_radix(part, 16).ok()
            } else {
                None
            }
        };
        let (Some(bus), Some(device), Some(function)) =
            (s.get(0..2).and_then(hex), s.get(3..5).and_then(hex), s.get(6..7).and_then(hex))
        else {
            return Err(invalid());
        };
        Bdf::new(bus, device, function).ok_or_else(invalid)
    }
}

/// The kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciBarKind {
    Memory32,
    /// Takes two BAR registers: `index` and `index + 1`.
    Memory64,
    /// Port I/O: 4 to 256 bytes.
    Io,
    /// The expansion ROM (configuration offset 0x30, index [`ROM_BAR_INDEX`]): read-only,
    /// decoded while its enable bit and memory decoding are on; 2 KiB to 16 MiB.
    Rom,
}

/// One BAR a function decodes.
#[derive(Debug, Clone, PartialEq)]
pub struct PciBar {
    /// BAR register 0..6, or [`ROM_BAR_INDEX`] for the expansion ROM.
    pub index: u8,
    /// Power of two.
    pub size: u64,
    pub kind: PciBarKind,
    pub prefetchable: bool,
    /// A RAM BAR (memory kinds only): host memory the hypervisor maps where the BAR points,
    /// so guest accesses never exit. At most `size` bytes.
    pub ram: Option<HostMemory>,
}

/// An INTx pin, as configuration byte 0x3D numbers it (1 = INTA#).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntxPin {
    A = 1,
    B = 2,
    C = 3,
    D = 4,
}

impl IntxPin {
    /// The pin configuration byte 0x3D names; None for 0 (no pin) and invalid values.
    pub fn from_config(value: u8) -> Option<IntxPin> {
        match value {
            1 => Some(IntxPin::A),
            2 => Some(IntxPin::B),
            3 => Some(IntxPin::C),
            4 => Some(IntxPin::D),
            _ => None,
        }
    }
}

/// The board's INTx routing: which interrupt line (GSI) a function's pin drives.
pub trait IntxRouter: Send + Sync {
    /// None leaves the pin unconnected.
    fn route(&self, bdf: Bdf, pin: IntxPin) -> Option<u32>;
}

/// What the root needs to wire INTx pins: the board's routing and where lines go.
#[derive(Clone)]
pub struct IntxRouting {
    pub router: Arc<dyn IntxRouter>,
    pub sink: Arc<dyn InterruptSink>,
}

/// Level-triggered lines that several pins may share: a GSI is high while any pin on it is.
#[derive(Default)]
struct SharedLines {
    asserted: Mutex<std::collections::BTreeMap<u32, u32>>,
}

/// A function's INTx line to its GSI.
#[derive(Clone)]
pub struct IntxLine {
    gsi: u32,
    sink: Arc<dyn InterruptSink>,
    shared: Arc<SharedLines>,
    level: Arc<AtomicBool>,
}

impl IntxLine {
    fn new(gsi: u32, sink: Arc<dyn InterruptSink>, shared: Arc<SharedLines>) -> Self {
        IntxLine { gsi, sink, shared, level: Arc::new(AtomicBool::new(false)) }
    }

    /// A line of its own to `gsi`, for tests of a device's INTx.
    #[cfg(test)]
    pub(crate) fn unshared(gsi: u32, sink: Arc<dyn InterruptSink>) -> Self {
        IntxLine::new(gsi, sink, Arc::new(SharedLines::default()))
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Drives the pin; the GSI follows the OR of every pin sharing it.
    pub fn set_level(&self, high: bool) {
        let mut asserted = lock(&self.shared.asserted);
        if self.level.swap(high, Ordering::SeqCst) == high {
            return;
        }
        let count = asserted.entry(self.gsi).or_insert(0);
        let was_high = *count > 0;
        *count = if high { *count + 1 } else { count.saturating_sub(1) };
        let is_high = *count > 0;
        if was_high != is_high {
            if let Err(e) = self.sink.set_irq_line(self.gsi, is_high) {
                log::warn!("INTx line {}: {e}", self.gsi);
            }
        }
    }

    pub fn assert(&self) {
        self.set_level(true);
    }

    pub fn deassert(&self) {
        self.set_level(false);
    }
}

/// One PCI function.
pub trait PciDevice: Send {
    /// Reads configuration dword `reg` (byte offset `reg * 4`; up to 1024 for ECAM).
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Writes 1, 2 or 4 bytes at byte `offset` (0..4) within configuration dword `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// The BARs the function decodes (the expansion ROM under [`ROM_BAR_INDEX`]).
    fn bars(&self) -> Vec<PciBar>;
    /// A read of `data.len()` bytes at `offset` inside BAR `bar` (memory, I/O or ROM).
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A write at `offset` inside BAR `bar` (never the ROM: it is read-only).
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// Where BAR `index` (a dispatched one: not a RAM BAR) decodes now, told by the root
    /// whenever that changes: the command register, the BAR registers or a restore moved it.
    /// None while it decodes nothing: decoding off, unassigned, being sized, half-written or
    /// outside every window. A device with resources at a BAR's guest address (virtio-pci's
    /// queue notifiers) keeps them here, never where its own registers point: the root alone
    /// knows which addresses reach the function.
    fn bar_decoded(&mut self, _index: u8, _address: Option<u64>) {}
    /// The line its interrupt pin (configuration byte 0x3D) drives, given once when the
    /// function is added, if it has a pin and the board routes it.
    fn set_intx_line(&mut self, _line: IntxLine) {}
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
    #[error("PCI function {0} is already present")]
    FunctionTaken(Bdf),
    #[error("PCI function {0} is on a bus beyond the root's ECAM")]
    BusOutOfRange(Bdf),
    #[error("{0:?} is not a PCI address (bb:dd.f)")]
    InvalidBdf(String),
    #[error("BAR {index} has an invalid size {size:#x}")]
    InvalidBarSize { index: u8, size: u64 },
    #[error("BAR index {0} is out of range or already used")]
    InvalidBarIndex(u8),
    #[error("No PCI window has room for a {size:#x}-byte BAR")]
    WindowFull { size: u64 },
    #[error("No room left for capabilities in configuration space")]
    CapabilitySpaceFull,
    #[error("PCI window {start:#x}+{size:#x} is invalid or overlaps another")]
    InvalidWindow { start: u64, size: u64 },
    #[error("{0} PCI buses do not fit ECAM (1 to 256)")]
    InvalidBusCount(u16),
    #[error("BAR {index} is host memory but the root has no way to map memory")]
    NoMemoryMapper { index: u8 },
    #[error("BAR {index} of {bdf} could not be mapped at {address:#x}")]
    RamBarMap {
        bdf: Bdf,
        index: u8,
        address: u64,
        #[source]
        source: crate::memory::slots::SlotError,
    },
    #[error("Saved configuration space has {0} registers, not 64")]
    ConfigSpaceSize(usize),
    #[error("Saved configuration register {0} differs from this function's in read-only bits")]
    ReadOnlyBitsDiffer(usize),
    #[error("Saved MSI-X state is for {saved} vectors, this function has {ours}")]
    MsixTableSize { saved: usize, ours: usize },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    #[test]
    fn bdf_shows_and_parses_as_bus_device_function() {
        let bdf = Bdf::new(0, 3, 0).unwrap();
        assert_eq!(bdf.to_string(), "00:03.0");
        assert_eq!(Bdf::new(0xab, 0x1f, 7).unwrap().to_string(), "ab:1f.7");
        assert_eq!("00:03.0".parse::<Bdf>().unwrap(), bdf);
        assert_eq!("ab:1f.7".parse::<Bdf>().unwrap(), Bdf::new(0xab, 0x1f, 7).unwrap());
        for bad in ["00:20.0", "00:03.8", "0:03.0", "00:03.00", "00-03.0", "+0:03.0", "0g:03.0"] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad}");
        }
        assert!(Bdf::new(0, 32, 0).is_none());
        assert!(Bdf::new(0, 0, 8).is_none());
    }

    #[test]
    fn a_shared_intx_line_is_high_while_any_pin_on_it_is() {
        let sink = Arc::new(crate::testing::IrqLog::default());
        let shared = Arc::new(SharedLines::default());
        let a = IntxLine::new(16, sink.clone(), shared.clone());
        let b = IntxLine::new(16, sink.clone(), shared);
        a.assert();
        a.assert();
        b.assert();
        a.deassert();
        assert_eq!(sink.lines(), [(16, true)], "b still holds it high");
        b.deassert();
        b.deassert();
        assert_eq!(sink.lines(), [(16, true), (16, false)]);
    }
}
