//! Boards: what a machine is made of. A board knows its address map, builds its devices,
//! loads what it boots and sets the boot vCPU's state; the machine (`crate::machine`) runs
//! whatever board it is given and never names a device.
//!
//! ```text
//!  Machine::build ──▶ Board::ram_regions / vm_setup      (memory, VM)
//!                 ──▶ Board::build_devices ─▶ BoardDevices (buses, saved devices, display, disks)
//!                 ──▶ Board::load_boot                   (kernel or firmware into RAM)
//!  vCPU threads   ──▶ Board::init_vcpu                   (entry state when booting)
//!  handle         ──▶ Board::press_power_button / serial_input
//! ```
//! Saved state is keyed by stable device ids (`pc/com1`, `pci/00:03.0`, ...) that the board
//! chooses ([`SavedDevice`]); the snapshot format (`crate::machine::persist`) stores a map from
//! id to each device's own encoded state.

#[cfg(target_arch = "x86_64")]
pub mod pc;
#[cfg(target_arch = "x86_64")]
pub mod q35;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use display::scanout::Screen;

use crate::devices::bus::Bus;
use crate::hypervisor::{ArchVcpu, HypervisorError, InterruptSink, Vm, VmSetup};
use crate::machine::disks::AttachedDisks;
use crate::machine::display::DisplayDevices;
use crate::memory::slots::VmMemory;
use crate::memory::GuestMemory;
use crate::pci::PciRoot;
use crate::state::StateError;

/// What a machine boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// A Linux kernel loaded by the VMM (no firmware).
    Kernel(KernelBoot),
    /// Firmware images the vCPUs start in at the reset vector.
    Firmware(FirmwareBoot),
}

/// A Linux kernel and what goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Directory of the decompressed-kernel cache; None: off.
    pub cache_dir: Option<PathBuf>,
}

/// Firmware (UEFI or BIOS): its code, a per-VM store for its variables, and the VGA BIOS
/// the board's display serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FirmwareBoot {
    pub code: PathBuf,
    pub vars: Option<PathBuf>,
    /// The option ROM in the display's expansion-ROM BAR when the machine has a screen
    /// (SeaBIOS's `vgabios-bochs-display.bin`: SeaBIOS draws nothing without it). None: no
    /// ROM, as UEFI needs (OVMF drives the display itself).
    #[serde(default)]
    pub vga_bios: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("Could not set up {device}")]
    Device {
        device: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Could not open disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: disk::DiskError,
    },
    #[error("Could not load {what}")]
    Boot {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Board {board} cannot boot {what}")]
    UnsupportedBoot { board: &'static str, what: &'static str },
}

impl BoardError {
    /// A device that could not be built, with the underlying error.
    pub fn device(
        device: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BoardError {
        BoardError::Device { device: device.into(), source: source.into() }
    }
}

/// What a device does when a snapshot holds no state for it (a device added after the
/// snapshot was taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenMissing {
    /// The restore fails, naming the device: its state matters to the guest.
    Refuse,
    /// The device keeps its reset state.
    Reset,
}

/// Encodes a device's current state.
pub type SaveFn = Box<dyn Fn() -> Result<Vec<u8>, StateError> + Send + Sync>;
/// Puts saved state back; a refused state leaves the device as it was.
pub type RestoreFn = Box<dyn Fn(&[u8]) -> Result<(), StateError> + Send + Sync>;

/// One device's saved state, under a stable id. The closures reach the device itself.
pub struct SavedDevice {
    pub id: String,
    pub save: SaveFn,
    pub restore: RestoreFn,
    pub when_missing: WhenMissing,
}

impl SavedDevice {
    /// A device behind a mutex whose state is one serde struct (`save` / `restore` on it),
    /// encoded with [`crate::state::encode`].
    pub fn of<T, S>(
        id: &str,
        device: &Arc<Mutex<T>>,
        save: fn(&T) -> S,
        restore: fn(&mut T, &S) -> Result<(), StateError>,
    ) -> SavedDevice
    where
        T: Send + 'static,
        S: serde::Serialize + serde::de::DeserializeOwned + 'static,
    {
        let (for_save, for_restore) = (device.clone(), device.clone());
        let (save_id, restore_id) = (id.to_string(), id.to_string());
        SavedDevice {
            id: id.to_string(),
            save: Box::new(move || {
                crate::state::encode(&save_id, &save(&crate::devices::bus::lock(&for_save)))
            }),
            restore: Box::new(move |bytes| {
                let state: S = crate::state::decode(&restore_id, bytes)?;
                restore(&mut crate::devices::bus::lock(&for_restore), &state)
            }),
            when_missing: WhenMissing::Refuse,
        }
    }
}

/// What the machine gives a board to build its devices with.
pub struct BoardContext<'a> {
    pub vm: &'a Arc<dyn Vm>,
    pub memory: &'a GuestMemory,
    pub irq: Arc<dyn InterruptSink>,
    /// Serial console output (the board's first UART).
    pub serial_out: Box<dyn Write + Send>,
    /// With a screen, the machine gets a display and input devices that draw into it.
    pub screen: Option<Arc<Screen>>,
    pub disks: &'a [crate::machine::DiskConfig],
    /// The guest turned itself off (ACPI S5 and kin).
    pub on_poweroff: Box<dyn Fn() + Send + Sync>,
    /// The guest asked for a reset (keyboard controller, reset register).
    pub on_reset: Box<dyn Fn() + Send + Sync>,
    /// The VM's memory-slot registry, guest RAM already in it: RAM BARs map through it.
    pub guest_map: &'a Arc<VmMemory>,
    /// vCPUs at boot (firmware is told how many to expect).
    pub vcpu_count: u32,
    /// What the machine boots (a firmware board maps its images while building).
    pub boot: &'a BootSource,
    /// A network card and the host side it talks to; None: no card.
    pub net: Option<NetAttachment>,
}

/// One network card: its MAC and the backend that carries its frames on the host.
pub struct NetAttachment {
    pub mac: [u8; 6],
    /// What the guest is told to use (virtio-net's MTU feature); the backend must carry it.
    pub mtu: u16,
    pub backend: Box<dyn net::NetBackend>,
}

/// Port I/O and MMIO dispatch shared by all vCPUs.
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// The devices a board built, as the board-neutral machine needs them.
pub struct BoardDevices {
    pub io: IoBuses,
    /// Every device whose state a snapshot holds, in restore order.
    pub saved: Vec<SavedDevice>,
    /// The PCI root, whose devices' I/O threads stop while a snapshot is taken.
    pub pci: Arc<Mutex<PciRoot>>,
    pub display: Option<DisplayDevices>,
    /// The disks in the configuration's order, switchable to new layers, and the CD drive.
    pub disks: AttachedDisks,
}

/// One kind of machine.
pub trait Board: Send + Sync {
    /// The board's name, stored in snapshots ("pc").
    fn name(&self) -> &'static str;
    /// The architecture it runs on ("x86_64").
    fn arch(&self) -> &'static str;
    /// Most vCPUs and most guest RAM this board takes.
    fn max_vcpus(&self) -> u32;
    fn max_memory_mib(&self) -> u64;
    /// Guest RAM regions (address, size) for `ram_bytes` of memory.
    fn ram_regions(&self, ram_bytes: u64) -> Vec<(u64, u64)>;
    /// What the hypervisor needs to create the VM.
    fn vm_setup(&self, vcpu_count: u32) -> VmSetup;
    /// Builds every device. The board keeps what it needs later (the power button, the
    /// serial console's input).
    fn build_devices(&mut self, context: BoardContext<'_>) -> Result<BoardDevices, BoardError>;
    /// Loads what the machine boots into RAM: at power-on (not when restoring), and again
    /// when the guest resets itself.
    fn load_boot(
        &self,
        memory: &GuestMemory,
        source: &BootSource,
        vcpu_count: u32,
    ) -> Result<(), BoardError>;
    /// Sets a vCPU's boot state when the machine boots, and again after a guest's reset.
    fn init_vcpu(&self, id: u32, vcpu: &mut dyn ArchVcpu) -> Result<(), HypervisorError>;
    /// Presses the power button: the guest shuts down in an orderly way.
    fn press_power_button(&self);
    /// Bytes typed on the guest's serial console.
    fn serial_input(&self, bytes: &[u8]);
    /// A key for the board's own keyboard (before the guest drives a virtio keyboard);
    /// false when the board has none.
    fn legacy_key(&self, code: u16, down: bool) -> bool;
    /// Motion for the board's own PS/2 mouse, for a display without virtio input: `dx`
    /// right and `dy` down in counts, `wheel` in detents away from the user, `buttons` held
    /// (the i8042's `BUTTON_*` bits). False when the board has no such mouse.
    fn legacy_pointer(&self, _dx: i32, _dy: i32, _wheel: i32, _buttons: u8) -> bool {
        false
    }
}
