//! The x86 PC board for direct kernel boot: RAM around a PCI hole at 3 GiB, COM1, the i8042
//! keyboard controller, the CMOS RTC, the ACPI PM block, one PCI root bus (config ports and
//! ECAM) with virtio devices, and a boot framebuffer; ACPI tables and a Linux kernel (bzImage
//! or PVH) loaded by the VMM.
//!
//! Saved device ids: `pc/com1`, `pc/i8042`, `pc/rtc`, `pc/acpi-pm`, `display/boot-fb`,
//! `pci/00:NN.0` (one per PCI device), `pc/pci-config-io`.

pub mod v1;

use std::sync::{Arc, Mutex};

use crate::arch::x86_64::{acpi, boot, layout};
use crate::board::{
    Board, BoardContext, BoardDevices, BoardError, BootSource, IoBuses, SavedDevice, WhenMissing,
};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::{lock, Bus, BusDevice};
use crate::devices::i8042::I8042;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{IrqEdge, SerialDevice};
use crate::hypervisor::{
    ArchVcpu, HypervisorError, InterruptSink, NotifierRegistry, Vm, VmNotifiers, VmSetup, X86Regs,
    X86Sregs,
};
use crate::machine::disks::AttachedDisks;
use crate::machine::display::{DisplayDevices, DisplayHardware, VirtioDisplay};
use crate::memory::GuestMemory;
use crate::pci::{
    Bdf, IntxRouting, PciConfigIo, PciConfigMmio, PciHostBridge, PciIoWindow, PciMmioWindow,
    PciRoot, PciRootConfig, PciWindow,
};
use crate::virtio::gpu::boot_fb::{self, BootFramebuffer};
use crate::virtio::gpu::Gpu;
use crate::virtio::input::{Input, InputHandle, VirtioInputError};
use crate::virtio::net::{NetConfig, VirtioNet};
use crate::virtio::rng::Rng;
use crate::virtio::VirtioPciDevice;
use display::SourceId;

/// Most vCPUs: the MADT's xAPIC ids are 8 bits and the IOAPIC takes one.
pub const MAX_VCPUS: u32 = 254;

/// Device ids of the PC's own devices in saved state.
pub const COM1_ID: &str = "pc/com1";
pub const I8042_ID: &str = "pc/i8042";
pub const RTC_ID: &str = "pc/rtc";
pub const ACPI_PM_ID: &str = "pc/acpi-pm";
pub const PCI_CONFIG_IO_ID: &str = "pc/pci-config-io";
pub const BOOT_FB_ID: &str = "display/boot-fb";

/// The saved-state id of the PCI function at `bdf`.
pub fn pci_id(bdf: Bdf) -> String {
    format!("pci/{bdf}")
}

/// The PC and what it keeps of its devices once built.
#[derive(Default)]
pub struct PcBoard {
    serial: Option<Arc<Mutex<SerialDevice>>>,
    acpi_pm: Option<Arc<Mutex<AcpiPm>>>,
    i8042: Option<Arc<Mutex<I8042>>>,
    framebuffer: Option<boot::BootFramebufferInfo>,
    /// The boot vCPU's entry state, once the kernel is loaded (again after a reset).
    boot_cpu: Mutex<Option<(X86Regs, X86Sregs)>>,
}

impl PcBoard {
    pub fn new() -> PcBoard {
        PcBoard::default()
    }
}

impl Board for PcBoard {
    fn name(&self) -> &'static str {
        "pc"
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
        layout::ram_regions(ram_bytes)
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
            vcpu_count: _,
            boot: _,
            net,
        } = context;
        let framebuffer = match &screen {
            Some(_) => Some(new_framebuffer()?),
            None => None,
        };
        self.framebuffer = framebuffer.as_ref().map(|fb| boot_framebuffer_info(&lock(fb)));

        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqEdge::new(irq.clone(), layout::SERIAL_COM1_IRQ),
            serial_out,
        )));
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(irq.clone(), on_poweroff)));
        let i8042 = Arc::new(Mutex::new(
            I8042::new(on_reset)
                .with_keyboard_irq(IrqEdge::new(irq.clone(), layout::KEYBOARD_IRQ))
                .with_aux_irq(IrqEdge::new(irq.clone(), layout::MOUSE_IRQ)),
        ));
        let rtc =
            Arc::new(Mutex::new(Rtc::new().with_irq(IrqEdge::new(irq.clone(), layout::RTC_IRQ))));

        let mut pci = PciRoot::new(PciRootConfig {
            // The id Intel's virtual host bridges use.
            host_bridge: Box::new(PciHostBridge::new(0x8086, 0x0d57)),
            mmio32: PciWindow::new(layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE),
            mmio64: PciWindow::EMPTY,
            io: PciWindow::EMPTY,
            ecam_base: layout::PCI_ECAM_START,
            bus_count: (layout::PCI_ECAM_SIZE >> 20) as u16,
            memory: Some(guest_map.clone()),
            intx: Some(IntxRouting { router: Arc::new(layout::PciIntxSwizzle), sink: irq.clone() }),
        })
        .map_err(|e| BoardError::device("the PCI root", e))?;
        let mut display = None;
        if let (Some(screen), Some(framebuffer)) = (screen, framebuffer) {
            let preferred = {
                let fb = lock(&framebuffer);
                (fb.width(), fb.height())
            };
            let sink: Arc<dyn display::ScanoutSink> = screen.clone();
            // The firmware's mode: the screen shows the boot framebuffer from the start.
            sink.set_mode(SourceId::BootFramebuffer, Some(preferred));
            let fb_memory = boot_fb::host_memory(&framebuffer).ok_or_else(|| {
                BoardError::device("the boot framebuffer", "its memory is not page-aligned")
            })?;
            let gpu = Gpu::new(sink, preferred, Some(fb_memory));
            let gpu_handle = gpu.handle();
            // The first device, so its framebuffer BAR is the first placed, at the address
            // the kernel's screen_info names.
            let gpu_bdf = add_virtio(&mut pci, "virtio-gpu", Box::new(gpu), memory, &irq, None)?;
            if pci.bar_address(gpu_bdf, 0) != Some(layout::FRAMEBUFFER_START) {
                return Err(BoardError::device(
                    "the boot framebuffer",
                    format!("its BAR is not at {:#x}", layout::FRAMEBUFFER_START),
                ));
            }
            let mut input = |name: &str,
                             device: Result<Input, VirtioInputError>|
             -> Result<InputHandle, BoardError> {
                let device = device.map_err(|e| BoardError::device(name, e))?;
                let handle = device.handle();
                add_virtio(&mut pci, name, Box::new(device), memory, &irq, None)?;
                Ok(handle)
            };
            display = Some(DisplayDevices {
                hardware: DisplayHardware::VirtioGpu(VirtioDisplay {
                    keyboard: input("the virtio keyboard", Input::keyboard())?,
                    tablet: input("the virtio tablet", Input::tablet())?,
                    mouse: input("the virtio mouse", Input::mouse())?,
                    gpu: gpu_handle,
                    framebuffer,
                }),
                screen,
                memory_slots: guest_map.slots().clone(),
            });
        }
        let mut disks = AttachedDisks::default();
        for (index, disk) in disk_configs.iter().enumerate() {
            let (name, block) = disks.open(index, disk)?;
            add_virtio(&mut pci, &name, Box::new(block), memory, &irq, io_thread_notifiers(vm))?;
        }
        let rng = Rng::new().map_err(|e| BoardError::device("virtio-rng", e))?;
        add_virtio(&mut pci, "virtio-rng", Box::new(rng), memory, &irq, None)?;
        // After the devices every machine had before networking, so their BDFs (and the
        // snapshots that name them) stay.
        if let Some(nic) = net {
            let device = VirtioNet::new(NetConfig { mac: nic.mac, mtu: nic.mtu }, nic.backend)
                .map_err(|e| BoardError::device("virtio-net", e))?;
            add_virtio(
                &mut pci,
                "virtio-net",
                Box::new(device),
                memory,
                &irq,
                io_thread_notifiers(vm),
            )?;
        }
        let pci_functions = pci.functions();
        let pci = Arc::new(Mutex::new(pci));

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let on_bus = |what: &'static str| move |e| BoardError::device(what, e);
        pio.insert(serial.clone(), u64::from(layout::COM1_PORT), 8).map_err(on_bus("COM1"))?;
        pio.insert(i8042.clone(), u64::from(layout::I8042_DATA_PORT), 5)
            .map_err(on_bus("the i8042"))?;
        pio.insert(rtc.clone(), u64::from(layout::RTC_PORT), 2).map_err(on_bus("the RTC"))?;
        pio.insert(
            acpi_pm.clone(),
            u64::from(layout::ACPI_PM_PORT),
            u64::from(layout::ACPI_PM_LEN),
        )
        .map_err(on_bus("the ACPI PM block"))?;
        let pci_config_io = Arc::new(Mutex::new(PciConfigIo::new(pci.clone())));
        pio.insert(pci_config_io.clone(), u64::from(layout::PCI_CONFIG_ADDRESS_PORT), 8)
            .map_err(on_bus("the PCI configuration ports"))?;
        // Port 0x80 (POST codes) is Linux's I/O delay: swallow it quietly.
        pio.insert(Arc::new(Mutex::new(Sink)), 0x80, 1).map_err(on_bus("port 0x80"))?;
        let (ecam, ecam_size, windows, io_window) = {
            let root = lock(&pci);
            (root.ecam_base(), root.ecam_size(), root.mmio_windows(), root.io_window())
        };
        mmio.insert(Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))), ecam, ecam_size)
            .map_err(on_bus("PCI ECAM"))?;
        for w in windows {
            let window = Arc::new(Mutex::new(PciMmioWindow::new(pci.clone(), w.start)));
            mmio.insert(window, w.start, w.size).map_err(on_bus("a PCI MMIO window"))?;
        }
        if !io_window.is_empty() {
            let window = Arc::new(Mutex::new(PciIoWindow::new(pci.clone(), io_window.start)));
            pio.insert(window, io_window.start, io_window.size)
                .map_err(on_bus("the PCI I/O window"))?;
        }

        // Restore order: the PC's devices, the framebuffer's memory, PCI devices (their BAR
        // decoding follows their restored registers), the config-port latch.
        let mut saved = vec![
            SavedDevice::of(
                COM1_ID,
                &serial,
                SerialDevice::save_state,
                SerialDevice::restore_state,
            ),
            SavedDevice::of(I8042_ID, &i8042, I8042::save_state, I8042::restore_state),
            SavedDevice::of(RTC_ID, &rtc, Rtc::save_state, Rtc::restore_state),
            SavedDevice::of(ACPI_PM_ID, &acpi_pm, AcpiPm::save_state, AcpiPm::restore_state),
        ];
        if let Some(display) = &display {
            saved.push(boot_framebuffer_state(display.hardware.framebuffer()));
        }
        for bdf in pci_functions {
            saved.push(pci_function_state(&pci, bdf));
        }
        saved.push(SavedDevice::of(
            PCI_CONFIG_IO_ID,
            &pci_config_io,
            PciConfigIo::save_state,
            |io, state| {
                io.restore_state(state);
                Ok(())
            },
        ));

        self.serial = Some(serial);
        self.acpi_pm = Some(acpi_pm);
        self.i8042 = Some(i8042);
        Ok(BoardDevices { io: IoBuses { pio, mmio }, saved, pci, display, disks })
    }

    fn load_boot(
        &self,
        memory: &GuestMemory,
        source: &BootSource,
        vcpu_count: u32,
    ) -> Result<(), BoardError> {
        let BootSource::Kernel(kernel) = source else {
            return Err(BoardError::UnsupportedBoot { board: "pc", what: "firmware" });
        };
        let kernel_error =
            |e: boot::BootError| BoardError::Boot { what: "the guest kernel", source: Box::new(e) };
        let rsdp = acpi::create_acpi_tables(memory, vcpu_count)
            .map_err(|e| BoardError::device("the ACPI tables", e))?;
        let entry = boot::load_kernel(
            memory,
            &boot::KernelBoot {
                kernel: &kernel.kernel,
                initrd: kernel.initrd.as_deref(),
                cmdline: &kernel.cmdline,
                ram_mib: memory_mib(memory),
                acpi_rsdp: rsdp,
                kernel_cache: kernel.cache_dir.as_deref(),
                framebuffer: self.framebuffer,
            },
        )
        .map_err(kernel_error)?;
        *lock(&self.boot_cpu) = Some(boot::setup_boot_cpu(memory, &entry).map_err(kernel_error)?);
        Ok(())
    }

    fn init_vcpu(&self, id: u32, vcpu: &mut dyn ArchVcpu) -> Result<(), HypervisorError> {
        // The boot CPU starts at the kernel's entry; the others wait for its INIT/SIPI.
        if let (0, Some((regs, sregs))) = (id, &*lock(&self.boot_cpu)) {
            vcpu.set_sregs(sregs)?;
            vcpu.set_regs(regs)?;
        }
        Ok(())
    }

    fn press_power_button(&self) {
        if let Some(acpi_pm) = &self.acpi_pm {
            lock(acpi_pm).press_power_button();
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
}

/// Guest RAM in MiB, as the kernel's e820 map describes it.
fn memory_mib(memory: &GuestMemory) -> u64 {
    let bytes: u64 =
        vm_memory::GuestMemory::iter(memory).map(vm_memory::GuestMemoryRegion::len).sum();
    bytes >> 20
}

/// The boot framebuffer's memory in saved state: its used part, raw.
fn boot_framebuffer_state(framebuffer: &Arc<Mutex<BootFramebuffer>>) -> SavedDevice {
    let (for_save, for_restore) = (framebuffer.clone(), framebuffer.clone());
    SavedDevice {
        id: BOOT_FB_ID.to_string(),
        save: Box::new(move || Ok(lock(&for_save).used_contents().to_vec())),
        restore: Box::new(move |bytes| lock(&for_restore).restore_contents(bytes)),
        when_missing: WhenMissing::Refuse,
    }
}

/// The PCI function at `bdf`, saved under its address.
fn pci_function_state(pci: &Arc<Mutex<PciRoot>>, bdf: Bdf) -> SavedDevice {
    let (for_save, for_restore) = (pci.clone(), pci.clone());
    SavedDevice {
        id: pci_id(bdf),
        save: Box::new(move || lock(&for_save).save_function(bdf)),
        restore: Box::new(move |bytes| lock(&for_restore).restore_function(bdf, bytes)),
        when_missing: WhenMissing::Refuse,
    }
}

/// A fresh boot framebuffer; the PCI root maps it wherever the GPU's BAR 0 points.
fn new_framebuffer() -> Result<Arc<Mutex<BootFramebuffer>>, BoardError> {
    let fb = BootFramebuffer::new(layout::FRAMEBUFFER_SIZE as usize)
        .map_err(|e| BoardError::device("the boot framebuffer", e))?;
    Ok(Arc::new(Mutex::new(fb)))
}

fn boot_framebuffer_info(fb: &BootFramebuffer) -> boot::BootFramebufferInfo {
    // The mode is ours (1024×768, stride 4096) and the region 16 MiB: all fit their fields.
    boot::BootFramebufferInfo {
        base: layout::FRAMEBUFFER_START as u32,
        size: fb.len() as u32,
        width: fb.width() as u16,
        height: fb.height() as u16,
        stride: fb.stride() as u16,
    }
}

fn add_virtio(
    pci: &mut PciRoot,
    name: &str,
    device: Box<dyn crate::virtio::VirtioDevice>,
    memory: &GuestMemory,
    irq: &Arc<dyn InterruptSink>,
    notifiers: Option<Arc<dyn NotifierRegistry>>,
) -> Result<Bdf, BoardError> {
    let mut transport = VirtioPciDevice::new(device, memory.clone(), irq.clone())
        .map_err(|e| BoardError::device(name, e))?;
    if let Some(n) = notifiers {
        transport = transport.with_notifiers(n);
    }
    pci.add_device(Box::new(transport)).map_err(|e| BoardError::device(name, e))
}

/// Notifiers for devices that serve their queues on I/O threads, or None to serve them on the
/// notifying vCPU. With a single host CPU the hand-off to another thread cannot overlap
/// anything; in the lab (1 CPU, 5 interleaved runs) ddread medians were 106 MB/s with threads
/// and 99 without, within the noise, so a one-CPU host keeps the simpler synchronous path.
pub(crate) fn io_thread_notifiers(vm: &Arc<dyn Vm>) -> Option<Arc<dyn NotifierRegistry>> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cpus > 1).then(|| Arc::new(VmNotifiers(vm.clone())) as Arc<dyn NotifierRegistry>)
}

/// Accepts and discards accesses.
struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
