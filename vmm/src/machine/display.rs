//! The display of a machine: its screen, the display hardware behind it (the PC's virtio-gpu
//! with its boot framebuffer and virtio input devices, or the Q35 board's bochs-display), and
//! the thread that copies what the guest draws in a framebuffer to the screen.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use display::scanout::Screen;
use display::SourceId;

use super::lifecycle::Lifecycle;
use crate::devices::bochs_display::BochsDisplayScanout;
use crate::devices::bus::lock;
use crate::hypervisor::Vm;
use crate::memory::slots::MemorySlots;
use crate::virtio::gpu::boot_fb::BootFramebuffer;
use crate::virtio::gpu::GpuHandle;
use crate::virtio::input::InputHandle;

/// The screen and display hardware of a machine with a display.
pub struct DisplayDevices {
    pub screen: Arc<Screen>,
    pub hardware: DisplayHardware,
    /// Where the framebuffer is mapped now (the guest may move its BAR); its slot's dirty log
    /// says which rows to compare.
    pub memory_slots: Arc<MemorySlots>,
}

/// What draws on the screen and takes input.
pub enum DisplayHardware {
    /// The PC: virtio-gpu with its boot framebuffer, virtio keyboard, tablet and mouse.
    VirtioGpu(VirtioDisplay),
    /// A firmware board's bochs-display: BAR 0 is the framebuffer; keys and the pointer reach
    /// the board's own PS/2 keyboard and mouse ([`crate::board::Board::legacy_key`],
    /// [`crate::board::Board::legacy_pointer`], through a [`display::pointer::Ps2Pointer`]).
    BochsDisplay(BochsDisplayScanout),
}

/// The PC's virtio display devices.
pub struct VirtioDisplay {
    pub gpu: GpuHandle,
    pub keyboard: InputHandle,
    pub tablet: InputHandle,
    pub mouse: InputHandle,
    // Mapped into the VM: dropped last, with the handle that owns the guest RAM too.
    pub framebuffer: Arc<Mutex<BootFramebuffer>>,
}

impl DisplayHardware {
    /// The framebuffer the scanner copies from while the boot framebuffer is the live source.
    pub fn framebuffer(&self) -> &Arc<Mutex<BootFramebuffer>> {
        match self {
            DisplayHardware::VirtioGpu(virtio) => &virtio.framebuffer,
            DisplayHardware::BochsDisplay(scanout) => scanout.framebuffer(),
        }
    }

    /// Whether the framebuffer holds a mode to show (the boot framebuffer always does; a
    /// bochs-display only while the guest's registers describe one). Read it under the
    /// framebuffer's lock, which the device changes its mode under.
    pub fn shows_framebuffer(&self) -> bool {
        match self {
            DisplayHardware::VirtioGpu(_) => true,
            DisplayHardware::BochsDisplay(scanout) => scanout.is_live(),
        }
    }

    /// The virtio devices, None on a bochs-display.
    pub fn virtio(&self) -> Option<&VirtioDisplay> {
        match self {
            DisplayHardware::VirtioGpu(virtio) => Some(virtio),
            DisplayHardware::BochsDisplay(_) => None,
        }
    }
}

/// How often the boot framebuffer is checked for what the guest drew. Guests write it without
/// telling anyone; 30 Hz keeps a console fluid, and with the hypervisor's dirty log an idle
/// check costs one call, not a comparison of megabytes.
const FRAMEBUFFER_SCAN_INTERVAL: Duration = Duration::from_millis(33);

/// Copies what the guest drew on the boot framebuffer to the screen while it is the live
/// source, until the machine ends. Only pages in the hypervisor's dirty log are compared;
/// without one (a backend that has none, or a failing call) every row is, and so they are
/// once after the guest moved the framebuffer (a new slot's log misses earlier writes).
pub(crate) fn scan_framebuffer(display: &DisplayDevices, vm: &dyn Vm, lifecycle: &Lifecycle) {
    let mut last_epoch = None;
    let mut use_log = true;
    let mut last_mapping = None;
    loop {
        {
            let control = lock(&lifecycle.control);
            if control.outcome.is_some() {
                return;
            }
            let _ = lifecycle.changed.wait_timeout(control, FRAMEBUFFER_SCAN_INTERVAL);
        }
        if display.screen.live_source() != SourceId::BootFramebuffer {
            continue;
        }
        // A switch back to the boot framebuffer (or a resize) cleared the screen.
        let epoch = display.screen.epoch();
        let force = last_epoch != Some(epoch);
        last_epoch = Some(epoch);
        let mut framebuffer = lock(display.hardware.framebuffer());
        let host = framebuffer.host_addr() as usize;
        let mapping = display.memory_slots.find_host(host);
        let moved = mapping.map(|m| m.generation) != last_mapping;
        last_mapping = mapping.map(|m| m.generation);
        if mapping.is_none() && !moved && !force {
            continue; // Unmapped: the guest cannot change it.
        }
        let written = match mapping.filter(|_| use_log) {
            Some(region) => {
                let pages = vm.take_dirty_pages(region.slot, region.size);
                if display.memory_slots.find_host(host) != Some(region) {
                    last_mapping = None; // Moved meanwhile: compare everything next time.
                }
                match pages {
                    Ok(pages) => Some(pages),
                    Err(_) if last_mapping.is_none() => None,
                    Err(e) => {
                        if !matches!(e, crate::hypervisor::HypervisorError::Unsupported(_)) {
                            log::warn!("boot framebuffer: no dirty log ({e}); comparing all of it");
                        }
                        use_log = false;
                        None
                    }
                }
            }
            None => None,
        };
        let written = written.filter(|_| !moved);
        if display.hardware.shows_framebuffer() {
            framebuffer.scan_written(&*display.screen, force, written.as_deref());
        }
    }
}
