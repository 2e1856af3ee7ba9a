//! [`MachineHandle`]: control of a running machine from any thread (the control server, the
//! GUI link, signal handlers). It knows the board only through [`Board`], never a device.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::disks::{RemovableDrive, SwitchableDisk};
use super::display::{DisplayDevices, DisplayHardware};
use super::lifecycle::Lifecycle;
use super::{ExitReason, MachineError, RunState};
use crate::board::{Board, SavedDevice};
use crate::devices::bus::lock;
use crate::hypervisor::Vm;
use crate::memory::GuestMemory;
use crate::pci::PciRoot;
use display::pointer::Ps2Pointer;
use display::{InputEvent, SourceId};

/// Control of a machine from any thread.
#[derive(Clone)]
pub struct MachineHandle {
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) board: Arc<dyn Board>,
    pub(crate) vcpu_count: u32,
    pub(crate) memory_mib: u64,
    pub(crate) display: Option<Arc<DisplayDevices>>,
    /// Every device a snapshot holds, in restore order.
    pub(crate) saved: Arc<Vec<SavedDevice>>,
    pub(crate) pci: Arc<Mutex<PciRoot>>,
    pub(crate) disks: Arc<Vec<SwitchableDisk>>,
    /// The CD drive, whose medium changes while the guest runs.
    pub(crate) removable: Option<RemovableDrive>,
    pub(crate) vm: Arc<dyn Vm>,
    /// Held while a snapshot is taken: host-side input waits instead of changing devices.
    pub(crate) snapshot_gate: Arc<Mutex<()>>,
    /// The pointer's buttons and last position, for a board's PS/2 mouse.
    pub(crate) ps2_pointer: Arc<Mutex<Ps2Pointer>>,
    // Guest RAM stays mapped while anything can still reach the VM (the devices above hold
    // it through their interrupt sinks), so the backend's memory slots never dangle. Last
    // field: dropped after the VM references.
    pub(crate) memory: GuestMemory,
}

impl MachineHandle {
    pub fn state(&self) -> RunState {
        self.lifecycle.state()
    }

    /// Seconds since the machine was built.
    pub fn uptime(&self) -> Duration {
        self.lifecycle.started.elapsed()
    }

    /// Stops all vCPUs at a safe point (between two exits) and waits until they are there.
    /// The state reads `paused` only once every vCPU has stopped.
    pub fn pause(&self) -> Result<(), MachineError> {
        self.lifecycle.pause()
    }

    pub fn resume(&self) -> Result<(), MachineError> {
        self.lifecycle.resume()
    }

    /// Presses the power button (ACPI on the PC): the guest shuts down in an orderly way.
    /// A paused machine is resumed so that the guest can act on the button.
    pub fn shutdown(&self) -> Result<(), MachineError> {
        let state = self.state();
        if !matches!(state, RunState::Running | RunState::Starting | RunState::Paused) {
            return Err(MachineError::InvalidState(state));
        }
        self.board.press_power_button();
        if state == RunState::Paused {
            self.resume()?;
        }
        Ok(())
    }

    /// Pulls the plug: `run` returns [`ExitReason::ForcedOff`].
    pub fn poweroff(&self) {
        self.lifecycle.request_exit(Ok(ExitReason::ForcedOff));
    }

    /// Bytes typed on the guest's serial console (COM1).
    pub fn serial_input(&self, bytes: &[u8]) {
        let _gate = lock(&self.snapshot_gate);
        self.board.serial_input(bytes);
    }

    /// Keyboard and pointer events for the guest's input devices. Keys go to the virtio
    /// keyboard once its driver runs, to the board's PS/2 keyboard (i8042) before that and
    /// on a display without virtio input (a firmware board's bochs-display), whose pointer
    /// events go to the board's PS/2 mouse.
    pub fn send_input(&self, events: &[InputEvent]) -> Result<(), MachineError> {
        let display = self.display.as_ref().ok_or(MachineError::NoDisplay)?;
        let virtio = display.hardware.virtio();
        let _gate = lock(&self.snapshot_gate);
        for event in events {
            match (*event, virtio) {
                (InputEvent::Key { code, down }, _)
                    if !virtio.is_some_and(|v| v.keyboard.is_ready())
                        && self.board.legacy_key(code, down) =>
                {
                    log::debug!("key {code} {} → board keyboard", if down { "down" } else { "up" });
                }
                (InputEvent::Key { code, down }, Some(virtio)) => {
                    log::debug!("key {code} {} → virtio", if down { "down" } else { "up" });
                    virtio.keyboard.send(std::slice::from_ref(event))
                }
                (InputEvent::PointerRel { .. }, Some(virtio)) => {
                    virtio.mouse.send(std::slice::from_ref(event))
                }
                (
                    InputEvent::PointerAbs { .. }
                    | InputEvent::Button { .. }
                    | InputEvent::Wheel { .. },
                    Some(virtio),
                ) => virtio.tablet.send(std::slice::from_ref(event)),
                (_, None) => {
                    let taken =
                        lock(&self.ps2_pointer).motion(event).is_some_and(|(dx, dy, wheel, b)| {
                            self.board.legacy_pointer(dx, dy, wheel, b)
                        });
                    if !taken {
                        log::debug!("{event:?} dropped: no device takes it");
                    }
                }
            }
        }
        Ok(())
    }

    /// Asks the guest to switch its display to `width`×`height` (virtio-gpu display change).
    /// A bochs-display has no such request: its mode is the guest's choice alone.
    pub fn set_display_size(&self, width: u32, height: u32) -> Result<(), MachineError> {
        let display = self.display.as_ref().ok_or(MachineError::NoDisplay)?;
        let _gate = lock(&self.snapshot_gate);
        if let Some(virtio) = display.hardware.virtio() {
            virtio.gpu.set_display_size(width, height);
        }
        Ok(())
    }

    /// What the screen shows: `boot-framebuffer 1024x768`, `virtio-gpu 1280x800`,
    /// `bochs-display 720x400`; None without a display.
    pub fn display_status(&self) -> Option<String> {
        let display = self.display.as_ref()?;
        let screen = &display.screen;
        let source = match (screen.live_source(), &display.hardware) {
            (SourceId::BootFramebuffer, DisplayHardware::BochsDisplay(_)) => {
                "bochs-display".to_string()
            }
            (SourceId::BootFramebuffer, _) => "boot-framebuffer".to_string(),
            (SourceId::Gpu(0), _) => "virtio-gpu".to_string(),
            (SourceId::Gpu(n), _) => format!("virtio-gpu:{n}"),
        };
        let (width, height) = screen.size();
        Some(format!("{source} {width}x{height}"))
    }

    /// Puts `medium` in the machine's CD drive (None: ejects it) and tells the guest, which
    /// sees the drive's new size. Waits for a snapshot being taken.
    pub fn change_media(
        &self,
        medium: Option<Box<dyn disk::BlockBackend>>,
    ) -> Result<(), MachineError> {
        let drive = self.removable.as_ref().ok_or(MachineError::NoRemovableDrive)?;
        let _gate = lock(&self.snapshot_gate);
        drive.change(medium);
        Ok(())
    }

    pub fn has_removable_drive(&self) -> bool {
        self.removable.is_some()
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }
}
