//! One running x86_64 machine: guest memory, devices, vCPU threads and its lifecycle.
//!
//! The app builds a [`Machine`] from a [`MachineConfig`], takes a [`MachineHandle`] (cloneable,
//! `Send`) for control from other threads, and calls [`Machine::run`], which blocks until the
//! guest powers off, resets, is forced off, or fails.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::{acpi, boot, layout};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::{lock, Bus, BusDevice};
use crate::devices::i8042::I8042;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{IrqEdge, SerialDevice};
use crate::hypervisor::{
    ExitHandler, Hypervisor, HypervisorError, InterruptSink, NotifierRegistry, Vcpu, VcpuExit,
    VcpuKicker, Vm, VmNotifiers, VmSetup, X86Regs, X86Sregs,
};
use crate::memory::{self, GuestMemory};
use crate::pci::{PciConfigIo, PciConfigMmio, PciMmioWindow, PciRoot};
use crate::virtio::block::Block;
use crate::virtio::gpu::boot_fb::BootFramebuffer;
use crate::virtio::gpu::{Gpu, GpuHandle};
use crate::virtio::input::{Input, InputHandle};
use crate::virtio::rng::Rng;
use crate::virtio::VirtioPciDevice;
use display::scanout::Screen;
use display::{InputEvent, SourceId};

/// One disk attached as virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

/// What to boot and with how much.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disks: Vec<DiskConfig>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Directory of the decompressed-kernel cache (`arch::x86_64::kernel_cache`); None: off.
    #[serde(default)]
    pub kernel_cache_dir: Option<PathBuf>,
}

/// Coarse state reported over the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Starting,
    Running,
    Paused,
    ShuttingDown,
    Stopped,
}

impl RunState {
    /// The state's name as the control protocol spells it.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::ShuttingDown => "shutting_down",
            RunState::Stopped => "stopped",
        }
    }
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (reboot, triple fault).
    Reset,
    /// The host forced it off ([`MachineHandle::poweroff`]).
    ForcedOff,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("Invalid machine configuration: {0}")]
    InvalidConfig(String),
    #[error("Could not set up guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("Could not load the guest kernel")]
    Boot(#[from] crate::arch::x86_64::boot::BootError),
    #[error("Could not build the ACPI tables")]
    Acpi(#[from] crate::arch::x86_64::acpi::AcpiError),
    #[error("Could not open disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: disk::DiskError,
    },
    #[error("Could not set up a device: {0}")]
    Device(String),
    #[error("vCPU {vcpu} failed")]
    Vcpu {
        vcpu: u32,
        #[source]
        source: HypervisorError,
    },
    #[error("Hypervisor failure")]
    Hypervisor(#[from] HypervisorError),
    #[error("Could not start a thread")]
    Thread(#[source] std::io::Error),
    #[error("The guest crashed: vCPU {vcpu} triple-faulted near rip {rip:#x}")]
    TripleFault { vcpu: u32, rip: u64 },
    #[error("vCPU {vcpu} crashed (a bug in Hutch; see the log)")]
    VcpuPanicked { vcpu: u32 },
    #[error("The machine is {}", .0.name())]
    InvalidState(RunState),
    #[error("The vCPUs did not pause in time")]
    PauseTimeout,
    #[error("This machine has no display")]
    NoDisplay,
}

/// Most vCPUs a machine may have: the MADT's xAPIC ids are 8 bits and the IOAPIC takes one.
pub const MAX_VCPUS: u32 = 254;

/// How long `pause` waits for every vCPU to reach a safe point.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The machine's run state and its outcome, shared by the vCPU threads and the handles.
struct Control {
    state: RunState,
    outcome: Option<Result<ExitReason, MachineError>>,
    pause_requested: bool,
    paused_vcpus: u32,
    live_vcpus: u32,
}

struct Lifecycle {
    control: Mutex<Control>,
    changed: Condvar,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
    started: Instant,
}

impl Lifecycle {
    fn new() -> Self {
        Self {
            control: Mutex::new(Control {
                state: RunState::Starting,
                outcome: None,
                pause_requested: false,
                paused_vcpus: 0,
                live_vcpus: 0,
            }),
            changed: Condvar::new(),
            kickers: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }

    /// Records how the machine ends (the first outcome wins) and gets every vCPU out.
    fn request_exit(&self, outcome: Result<ExitReason, MachineError>) {
        {
            let mut control = lock(&self.control);
            if control.outcome.is_none() {
                if let Err(e) = &outcome {
                    log::error!("machine stopping: {}", crate::error_chain(e));
                }
                control.outcome = Some(outcome);
                control.state = RunState::ShuttingDown;
            }
        }
        self.changed.notify_all();
        self.kick_all();
    }

    fn kick_all(&self) {
        for kicker in lock(&self.kickers).iter() {
            kicker.kick();
        }
    }

    /// Blocks while the machine is paused; false once the machine is ending.
    fn wait_runnable(&self) -> bool {
        let mut control = lock(&self.control);
        let mut counted_paused = false;
        loop {
            if control.outcome.is_some() {
                if counted_paused {
                    control.paused_vcpus -= 1;
                }
                return false;
            }
            if !control.pause_requested {
                if counted_paused {
                    control.paused_vcpus -= 1;
                }
                return true;
            }
            if !counted_paused {
                control.paused_vcpus += 1;
                counted_paused = true;
                self.changed.notify_all();
            }
            control = self.changed.wait(control).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Control of a machine from any thread.
#[derive(Clone)]
pub struct MachineHandle {
    lifecycle: Arc<Lifecycle>,
    serial: Arc<Mutex<SerialDevice>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    vcpu_count: u32,
    memory_mib: u64,
    display: Option<Arc<DisplayDevices>>,
    // Guest RAM stays mapped while anything can still reach the VM (the devices above hold
    // it through their interrupt sinks), so the backend's memory slots never dangle. Last
    // field: dropped after the VM references.
    _memory: GuestMemory,
}

impl MachineHandle {
    pub fn state(&self) -> RunState {
        lock(&self.lifecycle.control).state
    }

    /// Seconds since the machine was built.
    pub fn uptime(&self) -> Duration {
        self.lifecycle.started.elapsed()
    }

    /// Stops all vCPUs at a safe point (between two exits) and waits until they are there.
    /// The state reads `paused` only once every vCPU has stopped.
    pub fn pause(&self) -> Result<(), MachineError> {
        {
            let mut control = lock(&self.lifecycle.control);
            match control.state {
                RunState::Running => {}
                RunState::Paused => return Ok(()),
                other => return Err(MachineError::InvalidState(other)),
            }
            control.pause_requested = true;
        }
        self.lifecycle.kick_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut control = lock(&self.lifecycle.control);
        loop {
            if control.outcome.is_some() {
                return Err(MachineError::InvalidState(RunState::ShuttingDown));
            }
            if !control.pause_requested {
                // A resume came first.
                return Err(MachineError::InvalidState(RunState::Running));
            }
            if control.paused_vcpus >= control.live_vcpus {
                control.state = RunState::Paused;
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                control.pause_requested = false;
                self.lifecycle.changed.notify_all();
                return Err(MachineError::PauseTimeout);
            }
            control = self
                .lifecycle
                .changed
                .wait_timeout(control, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn resume(&self) -> Result<(), MachineError> {
        let mut control = lock(&self.lifecycle.control);
        match control.state {
            RunState::Paused => {
                control.pause_requested = false;
                control.state = RunState::Running;
                self.lifecycle.changed.notify_all();
                Ok(())
            }
            RunState::Running => {
                // Cancels a pause still waiting for its vCPUs.
                control.pause_requested = false;
                self.lifecycle.changed.notify_all();
                Ok(())
            }
            other => Err(MachineError::InvalidState(other)),
        }
    }

    /// Presses the ACPI power button: the guest shuts down in an orderly way.
    /// A paused machine is resumed so that the guest can act on the button.
    pub fn shutdown(&self) -> Result<(), MachineError> {
        let state = self.state();
        if !matches!(state, RunState::Running | RunState::Starting | RunState::Paused) {
            return Err(MachineError::InvalidState(state));
        }
        lock(&self.acpi_pm).press_power_button();
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
        lock(&self.serial).queue_input(bytes);
    }

    /// Keyboard and pointer events for the guest's input devices. Keys go to the virtio
    /// keyboard once its driver runs, to the PS/2 keyboard (i8042) before that.
    pub fn send_input(&self, events: &[InputEvent]) -> Result<(), MachineError> {
        let display = self.display.as_ref().ok_or(MachineError::NoDisplay)?;
        for event in events {
            match *event {
                InputEvent::Key { code, down } if !display.keyboard.is_ready() => {
                    log::debug!("key {code} {} → PS/2", if down { "down" } else { "up" });
                    if let Some(bytes) = display::keymap::set1_scancode(code, down) {
                        lock(&display.i8042).queue_scancodes(bytes.as_slice());
                    }
                }
                InputEvent::Key { code, down } => {
                    log::debug!("key {code} {} → virtio", if down { "down" } else { "up" });
                    display.keyboard.send(std::slice::from_ref(event))
                }
                InputEvent::PointerRel { .. } => display.mouse.send(std::slice::from_ref(event)),
                InputEvent::PointerAbs { .. }
                | InputEvent::Button { .. }
                | InputEvent::Wheel { .. } => display.tablet.send(std::slice::from_ref(event)),
            }
        }
        Ok(())
    }

    /// Asks the guest to switch its display to `width`×`height` (virtio-gpu display change).
    pub fn set_display_size(&self, width: u32, height: u32) -> Result<(), MachineError> {
        let display = self.display.as_ref().ok_or(MachineError::NoDisplay)?;
        display.gpu.set_display_size(width, height);
        Ok(())
    }

    /// What the screen shows: `boot-framebuffer 1024x768`, `virtio-gpu 1280x800`; None
    /// without a display.
    pub fn display_status(&self) -> Option<String> {
        let screen = &self.display.as_ref()?.screen;
        let source = match screen.live_source() {
            SourceId::BootFramebuffer => "boot-framebuffer".to_string(),
            SourceId::Gpu(0) => "virtio-gpu".to_string(),
            SourceId::Gpu(n) => format!("virtio-gpu:{n}"),
        };
        let (width, height) = screen.size();
        Some(format!("{source} {width}x{height}"))
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }
}

/// The screen and input devices of a machine with a display.
struct DisplayDevices {
    screen: Arc<Screen>,
    gpu: GpuHandle,
    keyboard: InputHandle,
    tablet: InputHandle,
    mouse: InputHandle,
    i8042: Arc<Mutex<I8042>>,
    // Mapped into the VM: dropped last, with the handle that owns the guest RAM too.
    framebuffer: Arc<Mutex<BootFramebuffer>>,
}

/// How often the boot framebuffer is compared with what the screen shows. Guests write it
/// without telling anyone; 30 Hz keeps a console fluid for a fraction of a CPU.
const FRAMEBUFFER_SCAN_INTERVAL: Duration = Duration::from_millis(33);

/// Port I/O and MMIO dispatch shared by all vCPUs.
struct IoBuses {
    pio: Bus,
    mmio: Bus,
}

impl ExitHandler for &IoBuses {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            log::debug!("unclaimed MMIO read at {addr:#x}");
            data.fill(0xff);
        }
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            log::debug!("unclaimed MMIO write at {addr:#x}");
        }
    }
}

/// A built, not yet running machine.
pub struct Machine {
    vm: Arc<dyn Vm>,
    io: Arc<IoBuses>,
    boot_cpu: (X86Regs, X86Sregs),
    handle: MachineHandle,
}

fn host_memory_mib() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages > 0 && page_size > 0).then(|| (pages as u64 * page_size as u64) >> 20)
}

fn validate(config: &MachineConfig) -> Result<(), MachineError> {
    if config.cpus == 0 || config.cpus > MAX_VCPUS {
        return Err(MachineError::InvalidConfig(format!(
            "{} vCPUs requested; Hutch supports 1 to {MAX_VCPUS}",
            config.cpus
        )));
    }
    if config.memory_mib == 0 {
        return Err(MachineError::InvalidConfig("guest memory must be at least 1 MiB".into()));
    }
    if let Some(host) = host_memory_mib() {
        if config.memory_mib > host {
            return Err(MachineError::InvalidConfig(format!(
                "{} MiB of guest memory requested but this host has only {host} MiB",
                config.memory_mib
            )));
        }
    }
    Ok(())
}

impl Machine {
    /// Builds the whole machine; nothing runs yet. Serial output (COM1) goes to `serial_out`.
    /// With a `screen`, the machine gets a display (boot framebuffer, virtio-gpu) and input
    /// devices (virtio keyboard, tablet and mouse) that draw into it.
    pub fn new(
        hypervisor: &dyn Hypervisor,
        config: &MachineConfig,
        serial_out: Box<dyn Write + Send>,
        screen: Option<Arc<Screen>>,
    ) -> Result<Machine, MachineError> {
        validate(config)?;
        let memory = memory::create_guest_memory(config.memory_mib)?;
        let vm = hypervisor
            .create_vm(&VmSetup { vcpu_count: config.cpus, ioapic_addr: layout::IOAPIC_START })?;
        memory::map_into_vm(&memory, vm.as_ref())?;
        let irq: Arc<dyn InterruptSink> = vm.clone();

        let framebuffer = match &screen {
            Some(_) => Some(map_framebuffer(
                vm.as_ref(),
                vm_memory::GuestMemory::num_regions(&memory) as u32,
            )?),
            None => None,
        };

        let rsdp = acpi::create_acpi_tables(&memory, config.cpus)?;
        let entry = boot::load_kernel(
            &memory,
            &boot::KernelBoot {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                ram_mib: config.memory_mib,
                acpi_rsdp: rsdp,
                kernel_cache: config.kernel_cache_dir.as_deref(),
                framebuffer: framebuffer.as_ref().map(|fb| boot_framebuffer_info(&lock(fb))),
            },
        )?;
        let boot_cpu = boot::setup_boot_cpu(&memory, &entry)?;

        let lifecycle = Arc::new(Lifecycle::new());
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqEdge::new(irq.clone(), layout::SERIAL_COM1_IRQ),
            serial_out,
        )));
        let on_poweroff = {
            let lifecycle = lifecycle.clone();
            Box::new(move || lifecycle.request_exit(Ok(ExitReason::PowerOff)))
        };
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(irq.clone(), on_poweroff)));
        let on_reset = {
            let lifecycle = lifecycle.clone();
            Box::new(move || lifecycle.request_exit(Ok(ExitReason::Reset)))
        };
        let i8042 = Arc::new(Mutex::new(
            I8042::new(on_reset).with_keyboard_irq(IrqEdge::new(irq.clone(), layout::KEYBOARD_IRQ)),
        ));

        let mut pci = PciRoot::new();
        let mut display = None;
        if let (Some(screen), Some(framebuffer)) = (screen, framebuffer) {
            // Before any other device: the allocator must never hand this range out.
            pci.reserve_mmio(layout::FRAMEBUFFER_START, layout::FRAMEBUFFER_SIZE)
                .map_err(|e| MachineError::Device(format!("boot framebuffer: {e}")))?;
            let preferred = {
                let fb = lock(&framebuffer);
                (fb.width(), fb.height())
            };
            let sink: Arc<dyn display::ScanoutSink> = screen.clone();
            // The firmware's mode: the screen shows the boot framebuffer from the start.
            sink.set_mode(SourceId::BootFramebuffer, Some(preferred));
            let gpu = Gpu::new(
                sink,
                preferred,
                Some((layout::FRAMEBUFFER_START, layout::FRAMEBUFFER_SIZE)),
            );
            let gpu_handle = gpu.handle();
            add_virtio(&mut pci, Box::new(gpu), &memory, &irq, None)?;
            let mut input = |device: Input| -> Result<InputHandle, MachineError> {
                let handle = device.handle();
                add_virtio(&mut pci, Box::new(device), &memory, &irq, None)?;
                Ok(handle)
            };
            display = Some(Arc::new(DisplayDevices {
                keyboard: input(Input::keyboard())?,
                tablet: input(Input::tablet())?,
                mouse: input(Input::mouse())?,
                screen,
                gpu: gpu_handle,
                i8042: i8042.clone(),
                framebuffer,
            }));
        }
        for (index, disk) in config.disks.iter().enumerate() {
            // Any format (detected by content); foreign formats open read-only, so a VM
            // writes them through a qcow2 overlay (`hutch import --in-place`).
            let options = disk::OpenOptions { writable: !disk.readonly };
            let backend = disk::open_image(&disk.path, options)
                .map_err(|source| MachineError::Disk { path: disk.path.clone(), source })?;
            let block =
                Block::new(backend, disk.readonly, format!("hutch-disk{index}")).map_err(|e| {
                    MachineError::Device(format!("virtio-blk {}: {e}", disk.path.display()))
                })?;
            add_virtio(&mut pci, Box::new(block), &memory, &irq, io_thread_notifiers(&vm))?;
        }
        let rng = Rng::new().map_err(|e| MachineError::Device(format!("virtio-rng: {e}")))?;
        add_virtio(&mut pci, Box::new(rng), &memory, &irq, None)?;
        let pci = Arc::new(Mutex::new(pci));

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let bus_error = |e: crate::devices::bus::BusError| MachineError::Device(e.to_string());
        pio.insert(serial.clone(), u64::from(layout::COM1_PORT), 8).map_err(bus_error)?;
        pio.insert(i8042, u64::from(layout::I8042_DATA_PORT), 5).map_err(bus_error)?;
        pio.insert(Arc::new(Mutex::new(Rtc::new())), u64::from(layout::RTC_PORT), 2)
            .map_err(bus_error)?;
        pio.insert(
            acpi_pm.clone(),
            u64::from(layout::ACPI_PM_PORT),
            u64::from(layout::ACPI_PM_LEN),
        )
        .map_err(bus_error)?;
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            u64::from(layout::PCI_CONFIG_ADDRESS_PORT),
            8,
        )
        .map_err(bus_error)?;
        // Port 0x80 (POST codes) is Linux's I/O delay: swallow it quietly.
        pio.insert(Arc::new(Mutex::new(Sink)), 0x80, 1).map_err(bus_error)?;
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
        )
        .map_err(bus_error)?;
        mmio.insert(
            Arc::new(Mutex::new(PciMmioWindow::new(pci))),
            layout::PCI_MMIO_START,
            layout::PCI_MMIO_SIZE,
        )
        .map_err(bus_error)?;

        let handle = MachineHandle {
            lifecycle,
            serial,
            acpi_pm,
            vcpu_count: config.cpus,
            memory_mib: config.memory_mib,
            display,
            _memory: memory,
        };
        Ok(Machine { vm, io: Arc::new(IoBuses { pio, mmio }), boot_cpu, handle })
    }

    pub fn handle(&self) -> MachineHandle {
        self.handle.clone()
    }

    /// Runs until the guest ends; returns how it ended.
    pub fn run(self) -> Result<ExitReason, MachineError> {
        let lifecycle = self.handle.lifecycle.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut threads = Vec::new();
        for id in 0..self.handle.vcpu_count {
            let vm = self.vm.clone();
            let io = self.io.clone();
            let lifecycle = lifecycle.clone();
            let ready = ready_tx.clone();
            let boot = (id == 0).then_some(self.boot_cpu);
            lock(&lifecycle.control).live_vcpus += 1;
            let spawned = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(id, vm, io, lifecycle, boot, ready));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    lock(&self.handle.lifecycle.control).live_vcpus -= 1;
                    self.handle.lifecycle.request_exit(Err(MachineError::Thread(e)));
                    break;
                }
            }
        }
        drop(ready_tx);
        let scanner = self.handle.display.clone().and_then(|display| {
            let lifecycle = lifecycle.clone();
            thread::Builder::new()
                .name("fb-scan".into())
                .spawn(move || scan_framebuffer(&display, &lifecycle))
                .map_err(|e| log::warn!("no boot framebuffer scanner: {e}"))
                .ok()
        });
        // Every vCPU reports once, created or failed, before the machine counts as running.
        for result in ready_rx.iter().take(threads.len()) {
            if let Err(e) = result {
                lifecycle.request_exit(Err(e));
            }
        }
        {
            let mut control = lock(&lifecycle.control);
            if control.state == RunState::Starting {
                control.state = RunState::Running;
            }
            while control.outcome.is_none() {
                control = lifecycle.changed.wait(control).unwrap_or_else(|p| p.into_inner());
            }
        }
        lifecycle.kick_all();
        for t in threads {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        if let Some(t) = scanner {
            if t.join().is_err() {
                log::error!("the framebuffer scanner panicked");
            }
        }
        let mut control = lock(&lifecycle.control);
        control.state = RunState::Stopped;
        control.outcome.take().unwrap_or(Ok(ExitReason::ForcedOff))
    }
}

/// Maps a fresh boot framebuffer at `layout::FRAMEBUFFER_START` as memory slot `slot`.
fn map_framebuffer(vm: &dyn Vm, slot: u32) -> Result<Arc<Mutex<BootFramebuffer>>, MachineError> {
    let fb = BootFramebuffer::new(layout::FRAMEBUFFER_SIZE as usize)
        .map_err(|e| MachineError::Device(format!("boot framebuffer: {e}")))?;
    let mapping = crate::hypervisor::GuestRamMapping {
        slot,
        guest_addr: layout::FRAMEBUFFER_START,
        size: fb.len() as u64,
        host_addr: fb.host_addr(),
        readonly: false,
    };
    // SAFETY: the mapping is owned by `fb`, which the machine handle keeps (next to guest
    // RAM) for as long as anything can reach the VM.
    unsafe { vm.map_memory(mapping) }?;
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

/// Copies what the guest drew on the boot framebuffer to the screen while it is the live
/// source, until the machine ends.
fn scan_framebuffer(display: &DisplayDevices, lifecycle: &Lifecycle) {
    let mut last_epoch = None;
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
        lock(&display.framebuffer).scan(&*display.screen, force);
    }
}

fn add_virtio(
    pci: &mut PciRoot,
    device: Box<dyn crate::virtio::VirtioDevice>,
    memory: &GuestMemory,
    irq: &Arc<dyn InterruptSink>,
    notifiers: Option<Arc<dyn NotifierRegistry>>,
) -> Result<(), MachineError> {
    let mut transport = VirtioPciDevice::new(device, memory.clone(), irq.clone())
        .map_err(|e| MachineError::Device(format!("virtio-pci: {e}")))?;
    if let Some(n) = notifiers {
        transport = transport.with_notifiers(n);
    }
    pci.add_device(Box::new(transport)).map_err(|e| MachineError::Device(format!("PCI: {e}")))?;
    Ok(())
}

/// Notifiers for devices that serve their queues on I/O threads, or None to serve them on the
/// notifying vCPU. With a single host CPU the hand-off to another thread cannot overlap
/// anything; in the lab (1 CPU, 5 interleaved runs) ddread medians were 106 MB/s with threads
/// and 99 without, within the noise, so a one-CPU host keeps the simpler synchronous path.
fn io_thread_notifiers(vm: &Arc<dyn Vm>) -> Option<Arc<dyn NotifierRegistry>> {
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
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

fn vcpu_thread(
    id: u32,
    vm: Arc<dyn Vm>,
    io: Arc<IoBuses>,
    lifecycle: Arc<Lifecycle>,
    boot: Option<(X86Regs, X86Sregs)>,
    ready: mpsc::Sender<Result<(), MachineError>>,
) {
    let _guard = VcpuThreadGuard { lifecycle: &lifecycle, id };
    let vcpu = prepare_vcpu(id, vm.as_ref(), boot);
    let mut vcpu = match vcpu {
        Ok(vcpu) => {
            lock(&lifecycle.kickers).push(vcpu.kicker());
            let _ = ready.send(Ok(()));
            vcpu
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut handler: &IoBuses = &io;
    while lifecycle.wait_runnable() {
        match vcpu.run(&mut handler) {
            Ok(VcpuExit::Io | VcpuExit::Interrupted) => {}
            // Only seen without an in-kernel irqchip, where nothing could wake the vCPU.
            Ok(VcpuExit::Halt) => thread::sleep(Duration::from_millis(1)),
            Ok(VcpuExit::Reset) => lifecycle.request_exit(Ok(ExitReason::Reset)),
            Ok(VcpuExit::Shutdown) => lifecycle.request_exit(Ok(ExitReason::PowerOff)),
            Ok(VcpuExit::TripleFault) => {
                let rip = vcpu.regs().map(|r| r.rip).unwrap_or_default();
                lifecycle.request_exit(Err(MachineError::TripleFault { vcpu: id, rip }));
            }
            Err(source) => lifecycle.request_exit(Err(MachineError::Vcpu { vcpu: id, source })),
        }
    }
}

/// Accounts for a vCPU thread's end however it ends: a panic ends the machine with an error
/// instead of leaving `run` and `pause` waiting for a thread that is gone.
struct VcpuThreadGuard<'a> {
    lifecycle: &'a Lifecycle,
    id: u32,
}

impl Drop for VcpuThreadGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.lifecycle.request_exit(Err(MachineError::VcpuPanicked { vcpu: self.id }));
        }
        let mut control = lock(&self.lifecycle.control);
        control.live_vcpus -= 1;
        self.lifecycle.changed.notify_all();
    }
}

fn prepare_vcpu(
    id: u32,
    vm: &dyn Vm,
    boot: Option<(X86Regs, X86Sregs)>,
) -> Result<Box<dyn Vcpu>, MachineError> {
    let wrap = |source| MachineError::Vcpu { vcpu: id, source };
    let mut vcpu = vm.create_vcpu(id).map_err(wrap)?;
    if let Some((regs, sregs)) = boot {
        vcpu.set_sregs(&sregs).map_err(wrap)?;
        vcpu.set_regs(&regs).map_err(wrap)?;
    }
    Ok(vcpu)
}
