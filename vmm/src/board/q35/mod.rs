//! The Q35 board for firmware boot (FIRMWARE.md §5, §6): the shape of QEMU's `q35` machine
//! that Debian's stock OVMF (and later SeaBIOS) expects, built from `devices::q35`.
//!
//! ```text
//!  0x0000_0000  RAM up to min(size, 2816 MiB)          ports  0x0060  i8042 (IRQ 1/12)
//!  0xB000_0000  ECAM, 256 buses, where PCIEXBAR says           0x0070  RTC (IRQ 8)
//!  0xC000_0000  32-bit PCI window (firmware's BARs)            0x0080  POST codes (dropped)
//!  0xFEC0_0000  IOAPIC; LAPIC 0xFEE0_0000                     0x0092  port A (fast reset)
//!  0xFEFF_C000  KVM's TSS / identity-map pages (reserved)      0x03F8  COM1 (IRQ 4)
//!  4G-code-vars VARS: the pflash over the VM's vars.fd         0x0402  firmware debug log
//!  4G - code    CODE: the firmware image, read-only memory     0x0510  fw_cfg (+ DMA 0x514)
//!  0x1_0000_0000 the rest of RAM; then the 64-bit window       0x0600  ICH9 PM (ACPI_EN)
//!  0x000E_0000  RAM, filled with CODE's last 128 KiB at every  0x0CF8  config + 0xCF9 reset
//!               power-on and reset (the BIOS's shadow)         0x6000  PCI I/O window
//!  PCI 00:00.0 MCH 8086:29C0, 00:1f.0 ICH9 LPC 8086:2918, virtio devices from 00:01.0
//!  (disks, rng, then the network card if the VM has one); with a screen, 00:1e.0
//!  bochs-display 1234:1111 (BAR 0 the framebuffer, wherever firmware puts it, scanned out
//!  by the machine's scanner; its ROM the VGA BIOS of `FirmwareBoot::vga_bios`, if any)
//! ```
//!
//! The vCPUs start in their reset state: the BSP at the reset vector inside CODE, the APs
//! waiting for the firmware's INIT-SIPI-SIPI. Firmware learns the machine through fw_cfg
//! (`etc/e820`, CPU counts, and the ACPI tables built when it first reads them, after it has
//! placed the BARs). The ECAM and the PM block decode only at the addresses both firmwares
//! program (0xB000_0000, 0x600); anywhere else they stay off and the first attempt is logged.
//!
//! Saved device ids: `q35/com1`, `q35/i8042`, `q35/rtc`, `q35/pm`, `q35/port92`,
//! `q35/config-ports`, `q35/fw-cfg`, `pci/00:NN.F` (the bochs-display's registers and
//! framebuffer under `pci/00:1e.0`). The pflash is not saved state: its
//! contents are the VM's variable store, which a guest's reset must keep (it is reset to
//! read-array mode by `load_boot`); snapshots of firmware VMs are not supported yet.

use std::sync::{Arc, Mutex};

use crate::arch::x86_64::acpi::{fadt, AcpiPlatform};
use crate::arch::x86_64::{acpi_fw, layout};
use crate::board::{
    Board, BoardContext, BoardDevices, BoardError, BootSource, FirmwareBoot, IoBuses, SavedDevice,
    WhenMissing,
};
use crate::devices::bochs_display::BochsDisplay;
use crate::devices::bus::{lock, Bus, BusDevice};
use crate::devices::fw_cfg::{self, FwCfg, FwCfgConfig, E820_RAM, E820_RESERVED};
use crate::devices::i8042::I8042;
use crate::devices::pflash::{Pflash, PflashAccess};
use crate::devices::q35::{
    pm::PM_BLOCK_LEN, ConfigPortsWithReset, DebugCon, EcamDecode, Ich9Lpc, Ich9Pm, Mch, Port92,
    ResetControl, DEBUG_PORT, LPC_BDF, PORT92_PORT,
};
use crate::devices::rtc::Rtc;
use crate::devices::serial::{IrqEdge, SerialDevice};
use crate::hypervisor::{ArchVcpu, HypervisorError, InterruptSink, VmSetup};
use crate::machine::disks::AttachedDisks;
use crate::machine::display::{DisplayDevices, DisplayHardware};
use crate::memory::GuestMemory;
use crate::pci::{Bdf, PciConfigIo, PciConfigMmio, PciIoWindow, PciMmioWindow, PciRoot};
use crate::pci::{IntxRouting, PciRootConfig, PciWindow};
use crate::virtio::net::{NetConfig, VirtioNet};
use crate::virtio::rng::Rng;
use crate::virtio::VirtioPciDevice;

#[cfg(test)]
mod tests;

/// Most vCPUs: as the PC (8-bit xAPIC ids, one taken by the IOAPIC).
pub const MAX_VCPUS: u32 = 254;

/// Highest end of RAM below 4 GiB: QEMU's q35 never goes above 2816 MiB, and OVMF asserts
/// it (the ECAM follows).
pub const LOW_RAM_MAX: u64 = 0xb000_0000;
/// Where both firmwares put PCIEXBAR, and the only place this board decodes it.
pub const ECAM_BASE: u64 = 0xb000_0000;
pub const ECAM_BUSES: u16 = 256;
/// The 32-bit PCI window: from the ECAM's end to the IOAPIC, as QEMU's q35 `_CRS` says.
/// OVMF places BARs up to 0xFC00_0000; SeaBIOS fills it top-down from 0xFEC0_0000.
pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_END: u64 = 0xfec0_0000;
/// The 64-bit window starts at the first GiB above RAM and ends at 2^47 (OVMF's cap), which
/// holds both its default 32 GiB window and the one it puts in the top eighth of a
/// phys-bits-sized address space.
pub const MMIO64_ALIGN: u64 = 1 << 30;
pub const MMIO64_END: u64 = 1 << 47;
/// OVMF's PCI I/O window on Q35.
pub const IO_WINDOW_START: u64 = 0x6000;
pub const IO_WINDOW_END: u64 = 0x1_0000;
/// The PM block's base as both firmwares program PMBASE.
pub const PM_BASE: u16 = 0x600;
/// GPE0 inside the PM block.
pub const GPE0_OFFSET: u16 = 0x20;
pub const GPE0_LEN: u8 = 16;
/// The CMOS index of the century (the FADT names it).
pub const CENTURY_CMOS_INDEX: u8 = 0x32;
/// The ICH9 reset register and the value that resets the system (OVMF's `ResetCold`).
pub const RESET_VALUE: u8 = 0x06;
/// KVM's TSS and identity-map pages (backend-kvm puts them here, as QEMU does): reserved.
pub const KVM_PRIVATE_START: u64 = 0xfeff_c000;
pub const KVM_PRIVATE_SIZE: u64 = 0x4000;
const FOUR_GIB: u64 = 1 << 32;

// The fixed parts of the map follow each other without overlap: ECAM, the 32-bit window, the
// IOAPIC and LAPIC, KVM's pages, the firmware.
const _: () = {
    assert!(ECAM_BASE + ((ECAM_BUSES as u64) << 20) == MMIO32_START);
    assert!(MMIO32_END == layout::IOAPIC_START);
    assert!(layout::LAPIC_START + (1 << 20) <= KVM_PRIVATE_START);
};

/// Saved-state ids.
pub const COM1_ID: &str = "q35/com1";
pub const I8042_ID: &str = "q35/i8042";
pub const RTC_ID: &str = "q35/rtc";
pub const PM_ID: &str = "q35/pm";
pub const PORT92_ID: &str = "q35/port92";
pub const CONFIG_PORTS_ID: &str = "q35/config-ports";
pub const FW_CFG_ID: &str = "q35/fw-cfg";

#[derive(Debug, thiserror::Error)]
pub enum Q35Error {
    #[error("Cannot read the firmware {path}")]
    ReadFirmware {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "The firmware {path} is {size} bytes; it must be a non-empty multiple of 4 KiB and at \
         most {max} bytes"
    )]
    FirmwareSize { path: std::path::PathBuf, size: u64, max: u64 },
    #[error(
        "The firmware {code} and its variable store {vars} do not fit in the 16 MiB below \
         4 GiB together"
    )]
    FirmwareTooLarge { code: std::path::PathBuf, vars: std::path::PathBuf },
    #[error("Cannot allocate memory for the firmware image")]
    Allocate(#[source] vm_memory::mmap::MmapRegionError),
    #[error("Cannot read the VGA BIOS {path}")]
    ReadVgaBios {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the bochs-display sits when the machine has a screen: a fixed slot, the last free
/// one before the LPC bridge, which the virtio devices (numbered up from 00:01.0) do not
/// reach, so a VM with a screen has every other device at the BDF it has without one.
pub const DISPLAY_BDF: Bdf = match Bdf::new(0, 0x1e, 0) {
    Some(bdf) => bdf,
    None => panic!("device 0x1e is a valid slot"),
};
/// The mode the display's EDID prefers (OVMF's and Linux's first choice).
pub const DISPLAY_PREFERRED_MODE: (u32, u32) = (1024, 768);

/// Where the firmware area (CODE, and VARS below it) may start at the lowest: the 16 MiB
/// below 4 GiB, right above KVM's pages and clear of the LAPIC and IOAPIC.
pub const FIRMWARE_AREA_START: u64 = KVM_PRIVATE_START + KVM_PRIVATE_SIZE;
/// Largest firmware image: the whole area.
pub const MAX_FIRMWARE_BYTES: u64 = FOUR_GIB - FIRMWARE_AREA_START;
/// How much of CODE's end is also seen below 1 MiB (ending at 0x10_0000), as QEMU's
/// `isa-bios` alias: the BIOS's reset vector jumps into F000:xxxx. Here it is plain RAM,
/// refilled at every power-on and reset, and the PAM registers are storage only
/// (FIRMWARE.md §3.1): SeaBIOS copies itself into it whatever PAM reads, and OVMF never
/// runs from it.
pub const ISA_BIOS_MAX: usize = 128 << 10;
const ISA_BIOS_END: u64 = 0x10_0000;

/// Guest RAM regions for `ram_bytes`: below [`LOW_RAM_MAX`], the rest from 4 GiB.
pub fn ram_regions(ram_bytes: u64) -> Vec<(u64, u64)> {
    if ram_bytes <= LOW_RAM_MAX {
        vec![(0, ram_bytes)]
    } else {
        vec![(0, LOW_RAM_MAX), (FOUR_GIB, ram_bytes - LOW_RAM_MAX)]
    }
}

/// `etc/e820` for `ram_bytes`, as QEMU's q35 gives it: RAM, and KVM's private pages.
pub fn e820_entries(ram_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut entries: Vec<_> =
        ram_regions(ram_bytes).into_iter().map(|(base, len)| (base, len, E820_RAM)).collect();
    entries.push((KVM_PRIVATE_START, KVM_PRIVATE_SIZE, E820_RESERVED));
    entries.sort_by_key(|e| e.0);
    entries
}

/// The 64-bit PCI window for `ram_bytes` of RAM.
pub fn mmio64_window(ram_bytes: u64) -> PciWindow {
    let ram_end = ram_regions(ram_bytes).last().map_or(FOUR_GIB, |&(base, len)| base + len);
    let start = ram_end.max(FOUR_GIB).next_multiple_of(MMIO64_ALIGN);
    PciWindow::new(start, MMIO64_END.saturating_sub(start))
}

/// What the ACPI tables say about this board with `ram_bytes` of RAM.
pub fn acpi_platform(ram_bytes: u64) -> AcpiPlatform {
    let mmio64 = mmio64_window(ram_bytes);
    AcpiPlatform {
        pm_base: PM_BASE,
        gpe0: Some((PM_BASE + GPE0_OFFSET, GPE0_LEN)),
        s5_sleep_type: crate::devices::q35::pm::Q35_S5_SLEEP_TYPE,
        reset: (crate::devices::q35::RESET_CONTROL_PORT, RESET_VALUE),
        century: CENTURY_CMOS_INDEX,
        boot_arch: fadt::BOOT_ARCH_LEGACY_DEVICES | fadt::BOOT_ARCH_8042,
        ecam_base: ECAM_BASE,
        ecam_buses: ECAM_BUSES,
        mmio32: (MMIO32_START, MMIO32_END - MMIO32_START),
        mmio64: (mmio64.start, mmio64.size),
        q35_devices: true,
    }
}

/// The fw_cfg device firmware reads for `ram_bytes` of RAM and `vcpus` vCPUs.
pub fn new_fw_cfg(
    memory: GuestMemory,
    ram_bytes: u64,
    vcpus: u32,
    nographic: bool,
) -> Result<FwCfg, BoardError> {
    let cpus = u16::try_from(vcpus).map_err(|e| BoardError::device("fw_cfg", e))?;
    let mut fw_cfg =
        FwCfg::new(memory, &FwCfgConfig { cpus, max_cpus: cpus, nographic, boot_menu: false });
    let fail = |e| BoardError::device("fw_cfg", e);
    fw_cfg.add_file("etc/e820", fw_cfg::e820_file(&e820_entries(ram_bytes))).map_err(fail)?;
    let platform = acpi_platform(ram_bytes);
    let build = move || acpi_fw::build_firmware_acpi_for(&platform, vcpus);
    let acpi = build().map_err(|e| BoardError::device("the ACPI tables", e))?;
    fw_cfg
        .add_generated_files(
            vec![
                (acpi_fw::TABLE_LOADER_FILE, acpi.loader),
                (acpi_fw::ACPI_TABLES_FILE, acpi.tables),
                (acpi_fw::ACPI_RSDP_FILE, acpi.rsdp),
            ],
            // The same inputs build the same lengths; a failure keeps the first build.
            Box::new(move || match build() {
                Ok(acpi) => vec![acpi.loader, acpi.tables, acpi.rsdp],
                Err(e) => {
                    log::error!("ACPI tables: {e}");
                    Vec::new()
                }
            }),
        )
        .map_err(fail)?;
    Ok(fw_cfg)
}

/// The firmware code in host memory, mapped read-only ending at 4 GiB.
struct FirmwareRom {
    /// Never read: the guest's read-only slot points into it, so it must outlive the VM.
    _region: vm_memory::MmapRegion<()>,
    base: u64,
}

/// The Q35 board and what it keeps of its devices once built.
#[derive(Default)]
pub struct Q35Board {
    serial: Option<Arc<Mutex<SerialDevice>>>,
    pm: Option<Arc<Mutex<Ich9Pm>>>,
    i8042: Option<Arc<Mutex<I8042>>>,
    fw_cfg: Option<Arc<Mutex<FwCfg>>>,
    pflash: Option<Arc<Mutex<Pflash>>>,
    /// Kept alive while the VM may run: its slot points into it.
    rom: Option<FirmwareRom>,
    /// The firmware the board was built for (a reset must boot the same).
    firmware: Option<FirmwareBoot>,
    /// The last [`ISA_BIOS_MAX`] bytes of CODE, copied to RAM below 1 MiB at power-on and
    /// on every reset.
    isa_bios: Vec<u8>,
}

impl Q35Board {
    pub fn new() -> Q35Board {
        Q35Board::default()
    }

    /// Where the firmware code starts in guest memory, once built.
    pub fn firmware_base(&self) -> Option<u64> {
        self.rom.as_ref().map(|r| r.base)
    }
}

/// Reads the firmware image into fresh host memory.
fn load_rom(path: &std::path::Path) -> Result<(vm_memory::MmapRegion<()>, u64), Q35Error> {
    let bytes = std::fs::read(path)
        .map_err(|source| Q35Error::ReadFirmware { path: path.to_path_buf(), source })?;
    let size = bytes.len() as u64;
    if size == 0 || !size.is_multiple_of(0x1000) || size > MAX_FIRMWARE_BYTES {
        return Err(Q35Error::FirmwareSize {
            path: path.to_path_buf(),
            size,
            max: MAX_FIRMWARE_BYTES,
        });
    }
    let region = vm_memory::MmapRegion::<()>::new(bytes.len()).map_err(Q35Error::Allocate)?;
    // SAFETY: the region is a fresh private mapping of exactly `bytes.len()` bytes that
    // nothing else references yet.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.as_ptr(), bytes.len()) };
    Ok((region, size))
}

/// ECAM that decodes only while PCIEXBAR puts it at [`ECAM_BASE`].
struct GatedEcam {
    ecam: PciConfigMmio,
    decode: EcamDecode,
}

impl GatedEcam {
    fn decodes(&self, offset: u64) -> bool {
        self.decode.window().is_some_and(|w| w.base == ECAM_BASE && offset < w.size)
    }
}

impl BusDevice for GatedEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.decodes(offset) {
            self.ecam.read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.decodes(offset) {
            self.ecam.write(offset, data);
        }
    }
}

/// Accepts and discards accesses (POST codes).
struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

fn ram_bytes(memory: &GuestMemory) -> u64 {
    vm_memory::GuestMemory::iter(memory).map(vm_memory::GuestMemoryRegion::len).sum()
}

impl Board for Q35Board {
    fn name(&self) -> &'static str {
        "q35"
    }

    fn arch(&self) -> &'static str {
        "x86_64"
    }

    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }

    fn max_memory_mib(&self) -> u64 {
        layout::MAX_GUEST_RAM_MIB
    }

    fn ram_regions(&self, ram_bytes: u64) -> Vec<(u64, u64)> {
        ram_regions(ram_bytes)
    }

    fn vm_setup(&self, vcpu_count: u32) -> VmSetup {
        VmSetup { vcpu_count, ioapic_addr: layout::IOAPIC_START }
    }

    fn build_devices(&mut self, context: BoardContext<'_>) -> Result<BoardDevices, BoardError> {
        let BoardContext {
            vm,
            memory,
            irq,
            serial_out,
            screen,
            disks: disk_configs,
            on_poweroff,
            on_reset,
            guest_map,
            vcpu_count,
            boot,
            net,
        } = context;
        let BootSource::Firmware(firmware) = boot else {
            return Err(BoardError::UnsupportedBoot { board: "q35", what: "a kernel" });
        };
        let ram = ram_bytes(memory);
        let firmware_error =
            |e: Q35Error| BoardError::Boot { what: "the firmware", source: e.into() };

        // CODE ends at 4 GiB, read-only; VARS right below it as trapped MMIO.
        let (region, code_size) = load_rom(&firmware.code).map_err(firmware_error)?;
        let code_base = FOUR_GIB - code_size;
        let isa_bios = {
            // SAFETY: the region holds `code_size` initialised bytes and nothing writes to it.
            let code = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.size()) };
            code[code.len().saturating_sub(ISA_BIOS_MAX)..].to_vec()
        };
        // SAFETY: the region is a live mapping the board keeps (in `self.rom`) as long as it
        // lives, and the machine keeps the board for as long as the VM can run.
        unsafe { guest_map.map_readonly(code_base, code_size, region.as_ptr()) }
            .map_err(|e| BoardError::device("the firmware ROM", e))?;
        self.rom = Some(FirmwareRom { _region: region, base: code_base });
        let pflash = match &firmware.vars {
            Some(path) => {
                let flash = Pflash::open(path, PflashAccess::ReadWrite)
                    .map_err(|e| BoardError::device("the UEFI variable store", e))?;
                let base =
                    code_base.checked_sub(flash.size()).filter(|&b| b >= FIRMWARE_AREA_START);
                let Some(base) = base else {
                    return Err(firmware_error(Q35Error::FirmwareTooLarge {
                        code: firmware.code.clone(),
                        vars: path.clone(),
                    }));
                };
                Some((base, Arc::new(Mutex::new(flash))))
            }
            None => None,
        };

        let on_reset: Arc<dyn Fn() + Send + Sync> = Arc::from(on_reset);
        let reset_callback = || -> Box<dyn Fn() + Send> {
            let on_reset = on_reset.clone();
            Box::new(move || on_reset())
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqEdge::new(irq.clone(), layout::SERIAL_COM1_IRQ),
            serial_out,
        )));
        let i8042 = Arc::new(Mutex::new(
            I8042::new(reset_callback())
                .with_keyboard_irq(IrqEdge::new(irq.clone(), layout::KEYBOARD_IRQ))
                .with_aux_irq(IrqEdge::new(irq.clone(), layout::MOUSE_IRQ)),
        ));
        let mut rtc = Rtc::new().with_irq(IrqEdge::new(irq.clone(), layout::RTC_IRQ));
        let low = ram.min(LOW_RAM_MAX);
        rtc.set_memory_and_cpus(low, ram - low, vcpu_count);
        let rtc = Arc::new(Mutex::new(rtc));
        let pm = Arc::new(Mutex::new(Ich9Pm::new(irq.clone(), layout::ACPI_SCI_IRQ, on_poweroff)));
        let port92 = Arc::new(Mutex::new(Port92::new(reset_callback())));
        let fw_cfg = Arc::new(Mutex::new(new_fw_cfg(memory.clone(), ram, vcpu_count, true)?));

        let mch = Mch::new(Box::new(|window| {
            if let Some(w) = window.filter(|w| w.base != ECAM_BASE) {
                log::warn!(
                    "q35: ECAM moved to {:#x}; this board decodes it only at {ECAM_BASE:#x}",
                    w.base
                );
            }
        }));
        let ecam_decode = mch.ecam_decode();
        let pm_for_hook = pm.clone();
        let lpc = Ich9Lpc::new(Box::new(move |decode| {
            if decode.enabled && decode.base != PM_BASE {
                log::warn!(
                    "q35: PMBASE {:#x}; this board decodes the PM block only at {PM_BASE:#x}",
                    decode.base
                );
            }
            // The PM block never locks the PCI root, so this is safe under its lock.
            lock(&pm_for_hook).set_decoding(decode.enabled && decode.base == PM_BASE);
        }));
        let mmio64 = mmio64_window(ram);
        let mut pci = PciRoot::new(PciRootConfig {
            host_bridge: Box::new(mch),
            mmio32: PciWindow::new(MMIO32_START, MMIO32_END - MMIO32_START),
            mmio64,
            io: PciWindow::new(IO_WINDOW_START, IO_WINDOW_END - IO_WINDOW_START),
            ecam_base: ECAM_BASE,
            bus_count: ECAM_BUSES,
            memory: Some(guest_map.clone()),
            intx: Some(IntxRouting { router: Arc::new(layout::PciIntxSwizzle), sink: irq.clone() }),
        })
        .map_err(|e| BoardError::device("the PCI root", e))?;
        pci.add_device_at(LPC_BDF, Box::new(lpc))
            .map_err(|e| BoardError::device("the ICH9 LPC bridge", e))?;
        let mut disks = AttachedDisks::default();
        for (index, disk) in disk_configs.iter().enumerate() {
            let (name, block) = disks.open(index, disk)?;
            let notifiers = crate::board::pc::io_thread_notifiers(vm);
            add_virtio(&mut pci, &name, Box::new(block), memory, &irq, notifiers)?;
        }
        let rng = Rng::new().map_err(|e| BoardError::device("virtio-rng", e))?;
        add_virtio(&mut pci, "virtio-rng", Box::new(rng), memory, &irq, None)?;
        // Last, as on the PC: the devices before it keep their BDFs with or without a card.
        if let Some(nic) = net {
            let device = VirtioNet::new(NetConfig { mac: nic.mac, mtu: nic.mtu }, nic.backend)
                .map_err(|e| BoardError::device("virtio-net", e))?;
            let notifiers = crate::board::pc::io_thread_notifiers(vm);
            add_virtio(&mut pci, "virtio-net", Box::new(device), memory, &irq, notifiers)?;
        }
        // After every other device, so their first BAR addresses stay as they were too.
        let display = match screen {
            Some(screen) => {
                let vga_bios = match &firmware.vga_bios {
                    Some(path) => Some(std::fs::read(path).map_err(|source| {
                        firmware_error(Q35Error::ReadVgaBios { path: path.clone(), source })
                    })?),
                    None => None,
                };
                let vga_bios = vga_bios.as_deref().unwrap_or_default();
                Some(add_display(&mut pci, screen, vga_bios, guest_map.slots())?)
            }
            None => None,
        };
        let pci_functions = pci.functions();
        let pci = Arc::new(Mutex::new(pci));

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let on_bus = |what: &'static str| move |e| BoardError::device(what, e);
        pio.insert(serial.clone(), u64::from(layout::COM1_PORT), 8).map_err(on_bus("COM1"))?;
        pio.insert(i8042.clone(), u64::from(layout::I8042_DATA_PORT), 5)
            .map_err(on_bus("the i8042"))?;
        pio.insert(rtc.clone(), u64::from(layout::RTC_PORT), 2).map_err(on_bus("the RTC"))?;
        pio.insert(port92.clone(), u64::from(PORT92_PORT), 1).map_err(on_bus("port 0x92"))?;
        pio.insert(pm.clone(), u64::from(PM_BASE), PM_BLOCK_LEN).map_err(on_bus("the PM block"))?;
        pio.insert(fw_cfg.clone(), fw_cfg::FW_CFG_PORT_BASE, fw_cfg::FW_CFG_PORT_LEN)
            .map_err(on_bus("fw_cfg"))?;
        let config_ports = Arc::new(Mutex::new(ConfigPortsWithReset {
            pci: PciConfigIo::new(pci.clone()),
            reset_control: ResetControl::new(reset_callback()),
        }));
        pio.insert(config_ports.clone(), u64::from(layout::PCI_CONFIG_ADDRESS_PORT), 8)
            .map_err(on_bus("the PCI configuration ports"))?;
        pio.insert(Arc::new(Mutex::new(Sink)), 0x80, 1).map_err(on_bus("port 0x80"))?;
        pio.insert(Arc::new(Mutex::new(DebugCon::new())), u64::from(DEBUG_PORT), 1)
            .map_err(on_bus("the firmware debug port"))?;
        let ecam = GatedEcam { ecam: PciConfigMmio::new(pci.clone()), decode: ecam_decode };
        mmio.insert(Arc::new(Mutex::new(ecam)), ECAM_BASE, u64::from(ECAM_BUSES) << 20)
            .map_err(on_bus("PCI ECAM"))?;
        let (windows, io_window) = {
            let root = lock(&pci);
            (root.mmio_windows(), root.io_window())
        };
        for w in windows {
            let window = Arc::new(Mutex::new(PciMmioWindow::new(pci.clone(), w.start)));
            mmio.insert(window, w.start, w.size).map_err(on_bus("a PCI MMIO window"))?;
        }
        let window = Arc::new(Mutex::new(PciIoWindow::new(pci.clone(), io_window.start)));
        pio.insert(window, io_window.start, io_window.size)
            .map_err(on_bus("the PCI I/O window"))?;
        if let Some((base, flash)) = &pflash {
            let size = lock(flash).size();
            mmio.insert(flash.clone(), *base, size).map_err(on_bus("the UEFI variable store"))?;
        }

        // Restore order: the board's own devices, PCI functions (the LPC's restore gates the
        // PM block), the config-port latch.
        let mut saved = vec![
            SavedDevice::of(
                COM1_ID,
                &serial,
                SerialDevice::save_state,
                SerialDevice::restore_state,
            ),
            SavedDevice::of(I8042_ID, &i8042, I8042::save_state, I8042::restore_state),
            SavedDevice::of(RTC_ID, &rtc, Rtc::save_state, Rtc::restore_state),
            SavedDevice::of(PM_ID, &pm, Ich9Pm::save, Ich9Pm::restore),
            SavedDevice::of(PORT92_ID, &port92, Port92::save, Port92::restore),
            SavedDevice::of(FW_CFG_ID, &fw_cfg, FwCfg::save_state, FwCfg::restore_state),
        ];
        for bdf in pci_functions {
            saved.push(pci_function_state(&pci, bdf));
        }
        saved.push(SavedDevice::of(
            CONFIG_PORTS_ID,
            &config_ports,
            |ports| (ports.pci.save_state(), ports.reset_control.save()),
            |ports, (latch, reset_control)| {
                ports.reset_control.restore(reset_control)?;
                ports.pci.restore_state(latch);
                Ok(())
            },
        ));

        self.serial = Some(serial);
        self.pm = Some(pm);
        self.i8042 = Some(i8042);
        self.fw_cfg = Some(fw_cfg);
        self.pflash = pflash.map(|(_, flash)| flash);
        self.firmware = Some(firmware.clone());
        self.isa_bios = isa_bios;
        Ok(BoardDevices { io: IoBuses { pio, mmio }, saved, pci, display, disks })
    }

    fn load_boot(
        &self,
        memory: &GuestMemory,
        source: &BootSource,
        _vcpu_count: u32,
    ) -> Result<(), BoardError> {
        // The images were mapped when the board was built and the guest cannot change CODE;
        // a reset refills the BIOS's shadow, puts the flash back in read-array mode and
        // re-arms fw_cfg's tables.
        match source {
            BootSource::Firmware(firmware) if self.firmware.as_ref() == Some(firmware) => {}
            BootSource::Firmware(_) => {
                return Err(BoardError::UnsupportedBoot {
                    board: "q35",
                    what: "a firmware other than the one it was built with",
                })
            }
            BootSource::Kernel(_) => {
                return Err(BoardError::UnsupportedBoot { board: "q35", what: "a kernel" })
            }
        }
        let shadow = ISA_BIOS_END - self.isa_bios.len() as u64;
        vm_memory::Bytes::write_slice(memory, &self.isa_bios, vm_memory::GuestAddress(shadow))
            .map_err(|e| BoardError::device("the BIOS shadow below 1 MiB", e))?;
        if let Some(flash) = &self.pflash {
            lock(flash).reset();
        }
        if let Some(fw_cfg) = &self.fw_cfg {
            lock(fw_cfg).reset();
        }
        Ok(())
    }

    fn init_vcpu(&self, _id: u32, _vcpu: &mut dyn ArchVcpu) -> Result<(), HypervisorError> {
        // Every vCPU stays in its reset state: the BSP at the reset vector (in CODE), the APs
        // waiting for the firmware's SIPI.
        Ok(())
    }

    fn press_power_button(&self) {
        if let Some(pm) = &self.pm {
            lock(pm).press_power_button();
        }
    }

    fn serial_input(&self, bytes: &[u8]) {
        if let Some(serial) = &self.serial {
            lock(serial).queue_input(bytes);
        }
    }

    fn legacy_key(&self, code: u16, down: bool) -> bool {
        let Some(i8042) = &self.i8042 else {
            return false;
        };
        if let Some(bytes) = display::keymap::set1_scancode(code, down) {
            lock(i8042).queue_scancodes(bytes.as_slice());
        }
        true
    }

    fn legacy_pointer(&self, dx: i32, dy: i32, wheel: i32, buttons: u8) -> bool {
        let Some(i8042) = &self.i8042 else {
            return false;
        };
        lock(i8042).pointer_motion(dx, dy, wheel, buttons);
        true
    }
}

/// The PCI function at `bdf`, saved under its address.
fn pci_function_state(pci: &Arc<Mutex<PciRoot>>, bdf: Bdf) -> SavedDevice {
    let (for_save, for_restore) = (pci.clone(), pci.clone());
    SavedDevice {
        id: crate::board::pc::pci_id(bdf),
        save: Box::new(move || lock(&for_save).save_function(bdf)),
        restore: Box::new(move |bytes| lock(&for_restore).restore_function(bdf, bytes)),
        when_missing: WhenMissing::Refuse,
    }
}

/// Puts a bochs-display serving `vga_bios` (no ROM if empty) at [`DISPLAY_BDF`], drawing on
/// `screen`. Its framebuffer is found in `memory_slots` wherever firmware maps BAR 0.
fn add_display(
    pci: &mut PciRoot,
    screen: Arc<display::scanout::Screen>,
    vga_bios: &[u8],
    memory_slots: &Arc<crate::memory::slots::MemorySlots>,
) -> Result<DisplayDevices, BoardError> {
    let sink: Arc<dyn display::ScanoutSink> = screen.clone();
    let device = BochsDisplay::new(DISPLAY_PREFERRED_MODE, vga_bios, sink)
        .map_err(|e| BoardError::device("the bochs-display", e))?;
    let scanout = device.scanout();
    pci.add_device_at(DISPLAY_BDF, Box::new(device))
        .map_err(|e| BoardError::device("the bochs-display", e))?;
    Ok(DisplayDevices {
        screen,
        hardware: DisplayHardware::BochsDisplay(scanout),
        memory_slots: memory_slots.clone(),
    })
}

fn add_virtio(
    pci: &mut PciRoot,
    name: &str,
    device: Box<dyn crate::virtio::VirtioDevice>,
    memory: &GuestMemory,
    irq: &Arc<dyn InterruptSink>,
    notifiers: Option<Arc<dyn crate::hypervisor::NotifierRegistry>>,
) -> Result<Bdf, BoardError> {
    let mut transport = VirtioPciDevice::new(device, memory.clone(), irq.clone())
        .map_err(|e| BoardError::device(name, e))?;
    if let Some(n) = notifiers {
        transport = transport.with_notifiers(n);
    }
    pci.add_device(Box::new(transport)).map_err(|e| BoardError::device(name, e))
}
