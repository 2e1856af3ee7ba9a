//! bochs-display: QEMU's PCI display without legacy VGA (1234:1111, class 03/80), the display
//! OVMF's QemuVideoDxe and SeaBIOS's vgabios-bochs-display drive, and Linux's `bochs` DRM.
//!
//! ```text
//!  BAR 0  16 MiB RAM BAR = BootFramebuffer (guest writes never exit) ─ scan() ─▶ ScanoutSink
//!  BAR 2  4 KiB MMIO: 0x000 EDID │ 0x400 VGA ports (ignored) │ 0x500 DISPI │ 0x600 QEMU ext
//!  ROM    the VGA BIOS image the board gives
//!  DISPI write ─▶ mode (dispi::DispiRegisters::mode) ─▶ framebuffer mode + sink.set_mode
//! ```
//! Only 32 bits a pixel is scanned out (little-endian XRGB, or big-endian when the QEMU
//! extension register asks for it); other depths and invalid modes show nothing new: like
//! QEMU, the sink keeps the last frame while the display is disabled or its mode is invalid.

pub mod dispi;
mod persist;

pub use persist::BochsDisplayState;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use display::{ScanoutSink, SourceId};

use crate::devices::bus::lock;
use crate::pci::config::CLASS_DISPLAY_OTHER;
use crate::pci::{
    PciBar, PciBarKind, PciConfiguration, PciDevice, PciError, PciHeader, ROM_BAR_INDEX,
};
use crate::state::StateError;
use crate::virtio::gpu::boot_fb::{self, BootFramebuffer};
use crate::virtio::gpu::{edid, VirtioGpuError};
use dispi::{DispiRegisters, DisplayMode};

pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0x1111;
/// Revision 2: the QEMU extension registers exist.
pub const REVISION: u8 = 2;
/// QEMU's default subsystem (Red Hat, QEMU).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
pub const SUBSYSTEM_ID: u16 = 0x1100;

pub const FRAMEBUFFER_BAR: u8 = 0;
pub const FRAMEBUFFER_SIZE: u64 = 16 << 20;
pub const MMIO_BAR: u8 = 2;
pub const MMIO_SIZE: u64 = 0x1000;

/// 0x400..0x420 mirrors VGA ports 0x3C0..0x3E0; there is no VGA behind them.
const EDID_END: u64 = 0x400;
const DISPI_START: u64 = 0x500;
/// ID through VIDEO_MEMORY_64K, 16 bits each.
const DISPI_END: u64 = DISPI_START + 2 * (dispi::INDEX_VIDEO_MEMORY_64K as u64 + 1);
const QEXT_START: u64 = 0x600;
const QEXT_SIZE_REG: u64 = QEXT_START;
const QEXT_BYTEORDER_REG: u64 = QEXT_START + 4;
const QEXT_SIZE: u32 = 8;
const QEXT_LITTLE_ENDIAN: u32 = 0x1e1e_1e1e;
const QEXT_BIG_ENDIAN: u32 = 0xbebe_bebe;
const MIN_ROM_SIZE: u64 = 2048;
const MAX_ROM_SIZE: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BochsDisplayError {
    #[error("Could not create the bochs-display framebuffer")]
    Framebuffer(#[source] VirtioGpuError),
    #[error("The bochs-display framebuffer cannot back a BAR")]
    FramebufferMemory,
    #[error("A {0}-byte VGA BIOS does not fit an expansion ROM (16 MiB at most)")]
    RomTooLarge(usize),
    #[error("Could not declare the bochs-display BARs")]
    Bar(#[source] PciError),
}

/// What the board's scanner thread holds: the framebuffer and whether the guest's mode is
/// live. Cloned from [`BochsDisplay::scanout`].
#[derive(Clone)]
pub struct BochsDisplayScanout {
    framebuffer: Arc<Mutex<BootFramebuffer>>,
    live: Arc<AtomicBool>,
}

impl BochsDisplayScanout {
    /// The framebuffer, whose host address finds BAR 0's memory slot (for its dirty log).
    pub fn framebuffer(&self) -> &Arc<Mutex<BootFramebuffer>> {
        &self.framebuffer
    }

    /// Whether the guest's registers describe a mode that is being shown.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// Sends the rows of the live mode that changed (all when `force_full`) to `sink` as
    /// [`SourceId::BootFramebuffer`]; `written` is the dirty log of BAR 0's pages, as for
    /// [`BootFramebuffer::scan_written`]. Nothing while no mode is live.
    pub fn scan_written(&self, sink: &dyn ScanoutSink, force_full: bool, written: Option<&[u64]>) {
        let mut framebuffer = lock(&self.framebuffer);
        // Read under the lock the device changes it under: a mode and its flag agree.
        if self.is_live() {
            framebuffer.scan_written(sink, force_full, written);
        }
    }

    /// Like [`BochsDisplayScanout::scan_written`] without a dirty log: compares every row.
    pub fn scan(&self, sink: &dyn ScanoutSink, force_full: bool) {
        self.scan_written(sink, force_full, None);
    }
}

/// The bochs-display PCI function.
pub struct BochsDisplay {
    config: PciConfiguration,
    dispi: DispiRegisters,
    big_endian_framebuffer: bool,
    edid: [u8; 128],
    /// The VGA BIOS, padded with zeroes to the ROM BAR's size (empty: no ROM BAR).
    rom: Vec<u8>,
    scanout: BochsDisplayScanout,
    sink: Arc<dyn ScanoutSink>,
    /// The mode the framebuffer and the sink were last given.
    shown: Option<DisplayMode>,
}

impl BochsDisplay {
    /// A display whose EDID prefers `preferred` (width, height; each clamped below 4096, as
    /// the EDID's fields are), serving `vga_bios` from its expansion ROM (none if empty) and
    /// reporting modes and pixels to `sink`.
    pub fn new(
        preferred: (u32, u32),
        vga_bios: &[u8],
        sink: Arc<dyn ScanoutSink>,
    ) -> Result<BochsDisplay, BochsDisplayError> {
        let framebuffer = BootFramebuffer::new(FRAMEBUFFER_SIZE as usize)
            .map_err(BochsDisplayError::Framebuffer)?;
        let framebuffer = Arc::new(Mutex::new(framebuffer));
        let ram = boot_fb::host_memory(&framebuffer).ok_or(BochsDisplayError::FramebufferMemory)?;
        let mut config = PciConfiguration::new(PciHeader {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            revision: REVISION,
            class_code: CLASS_DISPLAY_OTHER,
            subsystem_vendor_id: SUBSYSTEM_VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
        });
        config
            .add_bar(PciBar {
                index: FRAMEBUFFER_BAR,
                size: FRAMEBUFFER_SIZE,
                kind: PciBarKind::Memory32,
                prefetchable: true,
                ram: Some(ram),
            })
            .map_err(BochsDisplayError::Bar)?;
        config
            .add_bar(PciBar {
                index: MMIO_BAR,
                size: MMIO_SIZE,
                kind: PciBarKind::Memory32,
                prefetchable: false,
                ram: None,
            })
            .map_err(BochsDisplayError::Bar)?;
        let mut rom = Vec::new();
        if !vga_bios.is_empty() {
            let size = (vga_bios.len() as u64).next_power_of_two().max(MIN_ROM_SIZE);
            if size > MAX_ROM_SIZE {
                return Err(BochsDisplayError::RomTooLarge(vga_bios.len()));
            }
            config
                .add_bar(PciBar {
                    index: ROM_BAR_INDEX,
                    size,
                    kind: PciBarKind::Rom,
                    prefetchable: false,
                    ram: None,
                })
                .map_err(BochsDisplayError::Bar)?;
            rom = vga_bios.to_vec();
            rom.resize(size as usize, 0);
        }
        let (width, height) = preferred;
        Ok(BochsDisplay {
            config,
            dispi: DispiRegisters::default(),
            big_endian_framebuffer: false,
            edid: edid::edid(width.clamp(1, 4095), height.clamp(1, 4095)),
            rom,
            scanout: BochsDisplayScanout { framebuffer, live: Arc::new(AtomicBool::new(false)) },
            sink,
            shown: None,
        })
    }

    /// The handle the board's scanner thread scans BAR 0 through.
    pub fn scanout(&self) -> BochsDisplayScanout {
        self.scanout.clone()
    }

    fn video_memory(&self) -> u64 {
        FRAMEBUFFER_SIZE
    }

    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < EDID_END => {
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = self.edid.get(o as usize + i).copied().unwrap_or(0);
                }
            }
            o if (DISPI_START..DISPI_END).contains(&o) => {
                for (i, byte) in data.iter_mut().enumerate() {
                    let at = o + i as u64 - DISPI_START;
                    let value = self.dispi.read((at / 2) as usize, self.video_memory());
                    *byte = (value >> (8 * (at % 2))) as u8;
                }
            }
            QEXT_SIZE_REG if data.len() == 4 => data.copy_from_slice(&QEXT_SIZE.to_le_bytes()),
            QEXT_BYTEORDER_REG if data.len() == 4 => {
                let order =
                    if self.big_endian_framebuffer { QEXT_BIG_ENDIAN } else { QEXT_LITTLE_ENDIAN };
                data.copy_from_slice(&order.to_le_bytes());
            }
            // The VGA port mirror (nothing behind it here), holes and odd-sized extension
            // register reads: all-ones, as QEMU's unassigned space reads.
            _ => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if (DISPI_START..DISPI_END).contains(&o) => {
                // Each register touched takes the bytes written and keeps the others.
                let first = (o - DISPI_START) / 2;
                let last = (o + data.len() as u64 - 1 - DISPI_START) / 2;
                for index in first..=last {
                    let mut value = self.dispi.read(index as usize, self.video_memory());
                    for (i, &byte) in data.iter().enumerate() {
                        let at = o + i as u64 - DISPI_START;
                        if at / 2 == index {
                            let shift = 8 * (at % 2);
                            value = (value & !(0xff << shift)) | u16::from(byte) << shift;
                        }
                    }
                    self.dispi_write(index as usize, value);
                }
            }
            QEXT_BYTEORDER_REG if data.len() == 4 => {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                match value {
                    QEXT_BIG_ENDIAN => self.big_endian_framebuffer = true,
                    QEXT_LITTLE_ENDIAN => self.big_endian_framebuffer = false,
                    _ => return,
                }
                self.update_mode();
            }
            // EDID, the VGA port mirror (OVMF's palette and blanking writes), the read-only
            // size register and holes.
            _ => {}
        }
    }

    fn dispi_write(&mut self, index: usize, value: u16) {
        let was_enabled = self.dispi.enabled();
        self.dispi.write(index, value);
        if index == dispi::INDEX_ENABLE
            && !was_enabled
            && self.dispi.enabled()
            && value & dispi::NOCLEARMEM == 0
        {
            let len = self.dispi.clear_len().min(self.video_memory());
            lock(&self.scanout.framebuffer).clear(len as usize);
        }
        self.update_mode();
    }

    /// Gives the framebuffer and the sink the mode the registers now describe, if it changed.
    /// No mode (disabled, invalid): scanning stops and the sink keeps its last frame.
    fn update_mode(&mut self) {
        let mode = self.dispi.mode(self.video_memory(), self.big_endian_framebuffer);
        if mode == self.shown {
            return;
        }
        let mut framebuffer = lock(&self.scanout.framebuffer);
        let live = match mode {
            Some(m) => {
                let set = framebuffer.set_mode_at(m.width, m.height, m.stride, m.offset, m.format);
                // Checked to fit by `DispiRegisters::mode`; a refusal would only stop the scan.
                if let Err(e) = &set {
                    log::warn!("bochs-display: {e}");
                }
                set.is_ok()
            }
            None => false,
        };
        self.scanout.live.store(live, Ordering::SeqCst);
        if let Some(m) = mode.filter(|_| live) {
            // Under the framebuffer lock, as the scanner sends: a scan of the new mode never
            // reaches the sink before the mode itself.
            self.sink.set_mode(SourceId::BootFramebuffer, Some((m.width, m.height)));
        }
        drop(framebuffer);
        self.shown = mode;
    }
}

impl PciDevice for BochsDisplay {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }

    fn bars(&self) -> Vec<PciBar> {
        self.config.bars().to_vec()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            MMIO_BAR if offset.saturating_add(data.len() as u64) <= MMIO_SIZE => {
                self.mmio_read(offset, data)
            }
            ROM_BAR_INDEX => {
                for (i, byte) in data.iter_mut().enumerate() {
                    let at = offset.saturating_add(i as u64);
                    *byte = usize::try_from(at)
                        .ok()
                        .and_then(|at| self.rom.get(at))
                        .copied()
                        .unwrap_or(0xff);
                }
            }
            // BAR 0 is host memory the root maps; it is never dispatched here.
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == MMIO_BAR
            && !data.is_empty()
            && offset.saturating_add(data.len() as u64) <= MMIO_SIZE
        {
            self.mmio_write(offset, data);
        }
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        crate::state::encode(persist::DEVICE, &self.save())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        let saved: BochsDisplayState = crate::state::decode(persist::DEVICE, state)?;
        self.restore(&saved)
    }
}

#[cfg(test)]
mod tests;
