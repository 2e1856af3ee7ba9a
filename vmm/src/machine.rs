//! One running x86_64 machine: guest memory, devices, vCPU threads and its lifecycle.
//!
//! The app builds a [`Machine`] from a [`MachineConfig`], takes a [`MachineHandle`] (cloneable,
//! `Send`) for control from other threads, and calls [`Machine::run`], which blocks until the
//! guest powers off, resets, is forced off, or fails.

use std::io::Write;
use std::path::{Path, PathBuf};
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
    VcpuKicker, VcpuState, Vm, VmNotifiers, VmSetup, VmState, X86Regs, X86Sregs,
};
use crate::memory::{self, GuestMemory};
use crate::pci::{PciConfigIo, PciConfigMmio, PciMmioWindow, PciRoot};
use crate::snapshot::{SnapshotError, SnapshotFile};
use crate::state::StateError;
use crate::virtio::block::Block;
use crate::virtio::gpu::boot_fb::BootFramebuffer;
use crate::virtio::gpu::{Gpu, GpuHandle};
use crate::virtio::input::{Input, InputHandle, VirtioInputError};
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
    #[error("Cannot save or restore the machine state")]
    State(#[from] StateError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("vCPU {vcpu} state cannot be saved or restored")]
    VcpuState {
        vcpu: u32,
        #[source]
        source: HypervisorError,
    },
    #[error("Snapshot does not fit this machine: {0}")]
    SnapshotMismatch(String),
    #[error("Cannot switch the disks to their new layers: {0}")]
    DiskSwitch(String),
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
    /// Work every paused vCPU does on its own thread (a vCPU is bound to it): saving state.
    job: Option<Arc<VcpuJob>>,
    /// Counts jobs, so a vCPU that stays paused across two jobs does both.
    job_generation: u64,
}

/// Saves each paused vCPU's state on its own thread.
struct VcpuJob {
    states: Mutex<Vec<Option<Result<VcpuState, HypervisorError>>>>,
}

impl VcpuJob {
    fn run(&self, id: u32, vcpu: &dyn Vcpu) {
        let state = vcpu.save_state();
        if let Some(slot) = lock(&self.states).get_mut(id as usize) {
            *slot = Some(state);
        }
    }

    fn done(&self) -> bool {
        lock(&self.states).iter().all(Option::is_some)
    }
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
                job: None,
                job_generation: 0,
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

    /// Blocks while the machine is paused, doing any job asked of paused vCPUs; false once
    /// the machine is ending.
    fn wait_runnable(&self, id: u32, vcpu: &dyn Vcpu) -> bool {
        let mut control = lock(&self.control);
        let mut counted_paused = false;
        let mut last_job = None;
        loop {
            if let Some(job) = control.job.clone().filter(|_| counted_paused) {
                if last_job != Some(control.job_generation) {
                    last_job = Some(control.job_generation);
                    drop(control);
                    job.run(id, vcpu);
                    self.changed.notify_all();
                    control = lock(&self.control);
                    continue;
                }
            }
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
    devices: Arc<SavedDevices>,
    vm: Arc<dyn Vm>,
    /// Held while a snapshot is taken: host-side input waits instead of changing devices.
    snapshot_gate: Arc<Mutex<()>>,
    // Guest RAM stays mapped while anything can still reach the VM (the devices above hold
    // it through their interrupt sinks), so the backend's memory slots never dangle. Last
    // field: dropped after the VM references.
    memory: GuestMemory,
}

/// The devices whose state a snapshot holds, besides the display's.
struct SavedDevices {
    i8042: Arc<Mutex<I8042>>,
    rtc: Arc<Mutex<Rtc>>,
    pci: Arc<Mutex<PciRoot>>,
    pci_config_io: Arc<Mutex<PciConfigIo>>,
    disks: Vec<SwitchableDisk>,
}

/// A disk whose image can be swapped while the machine is paused (a snapshot freezes the
/// current layer and continues on a new overlay).
#[derive(Clone)]
struct SwitchableDisk(Arc<std::sync::RwLock<Box<dyn disk::BlockBackend>>>);

impl SwitchableDisk {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Box<dyn disk::BlockBackend>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn replace(&self, new: Box<dyn disk::BlockBackend>) -> Box<dyn disk::BlockBackend> {
        let mut guard = self.0.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *guard, new)
    }
}

impl disk::BlockBackend for SwitchableDisk {
    fn size(&self) -> u64 {
        self.read().size()
    }
    fn is_writable(&self) -> bool {
        self.read().is_writable()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), disk::DiskError> {
        self.read().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), disk::DiskError> {
        self.read().write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), disk::DiskError> {
        self.read().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), disk::DiskError> {
        self.read().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), disk::DiskError> {
        self.read().write_zeroes(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<disk::Extent>, disk::DiskError> {
        self.read().extents(offset, len)
    }
    fn read_vectored_at(
        &self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), disk::DiskError> {
        self.read().read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(
        &self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), disk::DiskError> {
        self.read().write_vectored_at(bufs, offset)
    }
}

/// Everything a snapshot holds besides guest RAM (encoded with `state::encode`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    pub cpus: u32,
    pub memory_mib: u64,
    pub display: bool,
    pub disks: usize,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: crate::devices::serial::SerialDeviceState,
    pub i8042: crate::devices::i8042::I8042State,
    pub rtc: crate::devices::rtc::RtcState,
    pub acpi_pm: crate::devices::acpi_pm::AcpiPmState,
    pub pci: crate::pci::PciRootState,
    pub pci_config_io: crate::pci::root::PciConfigIoState,
    /// The boot framebuffer's memory, when the machine has a display.
    #[serde(with = "serde_bytes")]
    pub framebuffer: Option<Vec<u8>>,
}

/// How long the parts of a snapshot took, for the log and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotTimes {
    /// From the pause request until every vCPU stopped.
    pub pause: Duration,
    /// vCPU, VM and device state.
    pub state: Duration,
    /// Writing guest RAM and fsyncing the file.
    pub memory: Duration,
    /// The guest was stopped this long in all.
    pub stopped: Duration,
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
        let _gate = lock(&self.snapshot_gate);
        lock(&self.serial).queue_input(bytes);
    }

    /// Keyboard and pointer events for the guest's input devices. Keys go to the virtio
    /// keyboard once its driver runs, to the PS/2 keyboard (i8042) before that.
    pub fn send_input(&self, events: &[InputEvent]) -> Result<(), MachineError> {
        let display = self.display.as_ref().ok_or(MachineError::NoDisplay)?;
        let _gate = lock(&self.snapshot_gate);
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
        let _gate = lock(&self.snapshot_gate);
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

    /// Saves the running machine to `path` (see [`crate::snapshot`]) and lets it run on.
    ///
    /// The guest stops at a safe point, the devices' I/O threads are joined, and the disks are
    /// flushed; then vCPU, VM and device state and guest RAM are written. While the guest is
    /// still stopped, `open_new_disks` (given the flushed, now frozen images) opens the layers
    /// the machine continues on — one per disk, in order; `commit` records the snapshot
    /// wherever the caller keeps it. If either fails, the machine keeps its old disks, the
    /// file is removed, and the guest runs on as if nothing happened. A machine paused by
    /// its user stays paused.
    pub fn save_snapshot(
        &self,
        path: &Path,
        open_new_disks: &mut dyn FnMut() -> Result<Vec<Box<dyn disk::BlockBackend>>, String>,
        commit: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<SnapshotTimes, MachineError> {
        let _gate = lock(&self.snapshot_gate);
        let begin = Instant::now();
        let was_paused = self.state() == RunState::Paused;
        self.pause()?;
        let paused = Instant::now();
        let mut times = SnapshotTimes { pause: paused - begin, ..Default::default() };
        lock(&self.devices.pci).quiesce_io();
        let result = self.save_paused(path, open_new_disks, commit, &mut times);
        lock(&self.devices.pci).resume_io();
        if !was_paused {
            self.resume()?;
        }
        times.stopped = paused.elapsed();
        result.map(|()| times)
    }

    fn save_paused(
        &self,
        path: &Path,
        open_new_disks: &mut dyn FnMut() -> Result<Vec<Box<dyn disk::BlockBackend>>, String>,
        commit: &mut dyn FnMut() -> Result<(), String>,
        times: &mut SnapshotTimes,
    ) -> Result<(), MachineError> {
        let started = Instant::now();
        let state = self.collect_state()?;
        for disk in &self.devices.disks {
            disk::BlockBackend::flush(disk)
                .map_err(|e| MachineError::DiskSwitch(format!("flush: {e}")))?;
        }
        let bytes = crate::state::encode("machine", &state)?;
        times.state = started.elapsed();
        let started = Instant::now();
        crate::snapshot::write(path, &bytes, &self.memory)?;
        times.memory = started.elapsed();
        let undo = |e: MachineError| {
            let _ = std::fs::remove_file(path);
            e
        };
        let new_disks = open_new_disks().map_err(MachineError::DiskSwitch).map_err(undo)?;
        if new_disks.len() != self.devices.disks.len() {
            return Err(undo(MachineError::DiskSwitch(format!(
                "{} new layers for {} disks",
                new_disks.len(),
                self.devices.disks.len()
            ))));
        }
        for (new, disk) in new_disks.iter().zip(&self.devices.disks) {
            if new.size() != disk::BlockBackend::size(disk) {
                return Err(undo(MachineError::DiskSwitch(format!(
                    "a new layer of {} bytes for a disk of {}",
                    new.size(),
                    disk::BlockBackend::size(disk)
                ))));
            }
        }
        let old: Vec<_> =
            new_disks.into_iter().zip(&self.devices.disks).map(|(n, d)| d.replace(n)).collect();
        if let Err(e) = commit() {
            for (old, disk) in old.into_iter().zip(&self.devices.disks) {
                disk.replace(old);
            }
            return Err(undo(MachineError::DiskSwitch(e)));
        }
        Ok(())
    }

    /// Every part of the machine's state but RAM. The machine must be paused and quiesced.
    fn collect_state(&self) -> Result<MachineState, MachineError> {
        let job =
            Arc::new(VcpuJob { states: Mutex::new((0..self.vcpu_count).map(|_| None).collect()) });
        {
            let mut control = lock(&self.lifecycle.control);
            control.job = Some(job.clone());
            control.job_generation += 1;
            self.lifecycle.changed.notify_all();
            let deadline = Instant::now() + PAUSE_TIMEOUT;
            while !job.done() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || control.outcome.is_some() {
                    control.job = None;
                    return Err(MachineError::PauseTimeout);
                }
                control = self
                    .lifecycle
                    .changed
                    .wait_timeout(control, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            control.job = None;
        }
        let mut vcpus = Vec::with_capacity(self.vcpu_count as usize);
        for (vcpu, state) in lock(&job.states).drain(..).enumerate() {
            let state = state.ok_or(MachineError::PauseTimeout)?;
            vcpus.push(
                state.map_err(|source| MachineError::VcpuState { vcpu: vcpu as u32, source })?,
            );
        }
        Ok(MachineState {
            cpus: self.vcpu_count,
            memory_mib: self.memory_mib,
            display: self.display.is_some(),
            disks: self.devices.disks.len(),
            vcpus,
            vm: self.vm.save_state()?,
            serial: lock(&self.serial).save_state(),
            i8042: lock(&self.devices.i8042).save_state(),
            rtc: lock(&self.devices.rtc).save_state(),
            acpi_pm: lock(&self.acpi_pm).save_state(),
            pci: lock(&self.devices.pci).save_state()?,
            pci_config_io: lock(&self.devices.pci_config_io).save_state(),
            framebuffer: self
                .display
                .as_ref()
                .map(|d| lock(&d.framebuffer).used_contents().to_vec()),
        })
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
    /// The framebuffer's memory slot, whose dirty log says which rows to compare.
    framebuffer_slot: u32,
}

/// How often the boot framebuffer is checked for what the guest drew. Guests write it without
/// telling anyone; 30 Hz keeps a console fluid, and with the hypervisor's dirty log an idle
/// check costs one call, not a comparison of megabytes.
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
    start: Start,
    handle: MachineHandle,
}

/// How the vCPUs begin: at the kernel's entry point, or where a snapshot left them.
enum Start {
    Boot(Box<(X86Regs, X86Sregs)>),
    Restore(Vec<VcpuState>),
}

/// What one vCPU thread loads before it first runs.
enum VcpuStart {
    Boot(Box<(X86Regs, X86Sregs)>),
    Restore(Box<VcpuState>),
    /// A secondary vCPU of a booting machine: it waits for the boot CPU's INIT/SIPI.
    Reset,
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
        Self::build(hypervisor, config, serial_out, screen, None)
    }

    /// Builds the machine a snapshot holds: the same devices as [`Machine::new`] for
    /// `config` (its CPUs, memory, disks and display must be the snapshot's), guest RAM mapped
    /// copy-on-write from the file, and every vCPU and device where the snapshot left it.
    /// The kernel in `config` is not loaded. `run` continues the guest.
    pub fn restore(
        hypervisor: &dyn Hypervisor,
        config: &MachineConfig,
        snapshot: &SnapshotFile,
        serial_out: Box<dyn Write + Send>,
        screen: Option<Arc<Screen>>,
    ) -> Result<Machine, MachineError> {
        Self::build(hypervisor, config, serial_out, screen, Some(snapshot))
    }

    /// Checks that `snapshot` can be restored into a machine built from `config` (with or
    /// without a display), without building anything.
    pub fn check_snapshot(
        snapshot: &SnapshotFile,
        config: &MachineConfig,
        display: bool,
    ) -> Result<(), MachineError> {
        Self::snapshot_state(snapshot, config, display).map(drop)
    }

    /// The saved machine's state, checked against `config` and the display before anything
    /// is built.
    fn snapshot_state(
        snapshot: &SnapshotFile,
        config: &MachineConfig,
        display: bool,
    ) -> Result<MachineState, MachineError> {
        let state: MachineState = crate::state::decode("machine", snapshot.state())?;
        let mismatch = |what: &str, saved: String, now: String| {
            Err(MachineError::SnapshotMismatch(format!(
                "the snapshot was taken with {saved} {what}, this machine has {now}"
            )))
        };
        if state.cpus != config.cpus || state.vcpus.len() != config.cpus as usize {
            return mismatch("vCPUs", state.vcpus.len().to_string(), config.cpus.to_string());
        }
        if state.memory_mib != config.memory_mib {
            return mismatch(
                "MiB of memory",
                state.memory_mib.to_string(),
                config.memory_mib.to_string(),
            );
        }
        if state.disks != config.disks.len() {
            return mismatch("disks", state.disks.to_string(), config.disks.len().to_string());
        }
        if state.display != display || state.framebuffer.is_some() != display {
            let word = |d: bool| if d { "a display" } else { "no display" }.to_string();
            return mismatch("", word(state.display), word(display));
        }
        Ok(state)
    }

    fn build(
        hypervisor: &dyn Hypervisor,
        config: &MachineConfig,
        serial_out: Box<dyn Write + Send>,
        screen: Option<Arc<Screen>>,
        snapshot: Option<&SnapshotFile>,
    ) -> Result<Machine, MachineError> {
        validate(config)?;
        let saved = match snapshot {
            Some(s) => Some((s, Self::snapshot_state(s, config, screen.is_some())?)),
            None => None,
        };
        let memory = match &saved {
            Some((file, _)) => file.map_memory(&layout::ram_regions(config.memory_mib << 20))?,
            None => memory::create_guest_memory(config.memory_mib)?,
        };
        let vm = hypervisor
            .create_vm(&VmSetup { vcpu_count: config.cpus, ioapic_addr: layout::IOAPIC_START })?;
        memory::map_into_vm(&memory, vm.as_ref())?;
        let irq: Arc<dyn InterruptSink> = vm.clone();

        let framebuffer_slot = vm_memory::GuestMemory::num_regions(&memory) as u32;
        let framebuffer = match &screen {
            Some(_) => Some(map_framebuffer(vm.as_ref(), framebuffer_slot)?),
            None => None,
        };

        // A restored guest's RAM already holds its tables and kernel.
        let boot_cpu = match saved {
            Some(_) => None,
            None => {
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
                        framebuffer: framebuffer
                            .as_ref()
                            .map(|fb| boot_framebuffer_info(&lock(fb))),
                    },
                )?;
                Some(boot::setup_boot_cpu(&memory, &entry)?)
            }
        };

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
        let rtc = Arc::new(Mutex::new(Rtc::new()));

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
            let mut input = |device: Result<Input, VirtioInputError>| {
                let device = device.map_err(|e| MachineError::Device(crate::error_chain(&e)))?;
                let handle = device.handle();
                add_virtio(&mut pci, Box::new(device), &memory, &irq, None)?;
                Ok::<_, MachineError>(handle)
            };
            display = Some(Arc::new(DisplayDevices {
                keyboard: input(Input::keyboard())?,
                tablet: input(Input::tablet())?,
                mouse: input(Input::mouse())?,
                screen,
                gpu: gpu_handle,
                i8042: i8042.clone(),
                framebuffer,
                framebuffer_slot,
            }));
        }
        let mut disks = Vec::with_capacity(config.disks.len());
        for (index, disk) in config.disks.iter().enumerate() {
            // Any format (detected by content); foreign formats open read-only, so a VM
            // writes them through a qcow2 overlay (`hutch import --in-place`).
            let options = disk::OpenOptions { writable: !disk.readonly };
            let backend = disk::open_image(&disk.path, options)
                .map_err(|source| MachineError::Disk { path: disk.path.clone(), source })?;
            let switchable = SwitchableDisk(Arc::new(std::sync::RwLock::new(backend)));
            disks.push(switchable.clone());
            let block =
                Block::new(Box::new(switchable), disk.readonly, format!("hutch-disk{index}"))
                    .map_err(|e| {
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
        pio.insert(i8042.clone(), u64::from(layout::I8042_DATA_PORT), 5).map_err(bus_error)?;
        pio.insert(rtc.clone(), u64::from(layout::RTC_PORT), 2).map_err(bus_error)?;
        pio.insert(
            acpi_pm.clone(),
            u64::from(layout::ACPI_PM_PORT),
            u64::from(layout::ACPI_PM_LEN),
        )
        .map_err(bus_error)?;
        let pci_config_io = Arc::new(Mutex::new(PciConfigIo::new(pci.clone())));
        pio.insert(pci_config_io.clone(), u64::from(layout::PCI_CONFIG_ADDRESS_PORT), 8)
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
            Arc::new(Mutex::new(PciMmioWindow::new(pci.clone()))),
            layout::PCI_MMIO_START,
            layout::PCI_MMIO_SIZE,
        )
        .map_err(bus_error)?;

        let devices = Arc::new(SavedDevices { i8042, rtc, pci, pci_config_io, disks });
        let start = match (boot_cpu, saved) {
            (Some(cpu), _) => Start::Boot(Box::new(cpu)),
            (None, Some((_, state))) => {
                restore_devices(&state, &devices, &serial, &acpi_pm, display.as_deref())?;
                vm.restore_state(&state.vm)?;
                // No queue is served until the vCPUs (and their LAPICs) are back: `run`
                // restarts the I/O.
                lock(&devices.pci).quiesce_io();
                Start::Restore(state.vcpus)
            }
            (None, None) => unreachable!("a machine either boots or restores"),
        };
        let handle = MachineHandle {
            lifecycle,
            serial,
            acpi_pm,
            vcpu_count: config.cpus,
            memory_mib: config.memory_mib,
            display,
            devices,
            vm: vm.clone(),
            snapshot_gate: Arc::new(Mutex::new(())),
            memory,
        };
        Ok(Machine { vm, io: Arc::new(IoBuses { pio, mmio }), start, handle })
    }

    pub fn handle(&self) -> MachineHandle {
        self.handle.clone()
    }

    /// Runs until the guest ends; returns how it ended.
    pub fn run(self) -> Result<ExitReason, MachineError> {
        let lifecycle = self.handle.lifecycle.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut threads = Vec::new();
        let restoring = matches!(self.start, Start::Restore(_));
        let mut starts: Vec<VcpuStart> = match self.start {
            Start::Boot(cpu) => (0..self.handle.vcpu_count)
                .map(|id| if id == 0 { VcpuStart::Boot(cpu.clone()) } else { VcpuStart::Reset })
                .collect(),
            Start::Restore(states) => {
                states.into_iter().map(|s| VcpuStart::Restore(Box::new(s))).collect()
            }
        };
        for id in 0..self.handle.vcpu_count {
            let vm = self.vm.clone();
            let io = self.io.clone();
            let lifecycle = lifecycle.clone();
            let ready = ready_tx.clone();
            let boot = std::mem::replace(&mut starts[id as usize], VcpuStart::Reset);
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
            let vm = self.vm.clone();
            thread::Builder::new()
                .name("fb-scan".into())
                .spawn(move || scan_framebuffer(&display, vm.as_ref(), &lifecycle))
                .map_err(|e| log::warn!("no boot framebuffer scanner: {e}"))
                .ok()
        });
        // Every vCPU reports once, created or failed, before the machine counts as running.
        for result in ready_rx.iter().take(threads.len()) {
            if let Err(e) = result {
                lifecycle.request_exit(Err(e));
            }
        }
        if restoring {
            lock(&self.handle.devices.pci).resume_io();
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
        track_dirty: true,
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
/// source, until the machine ends. Only pages in the hypervisor's dirty log are compared;
/// without one (a backend that has none, or a failing call) every row is.
fn scan_framebuffer(display: &DisplayDevices, vm: &dyn Vm, lifecycle: &Lifecycle) {
    let mut last_epoch = None;
    let mut use_log = true;
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
        let mut framebuffer = lock(&display.framebuffer);
        let written = if use_log {
            match vm.take_dirty_pages(display.framebuffer_slot, framebuffer.len() as u64) {
                Ok(pages) => Some(pages),
                Err(e) => {
                    if !matches!(e, crate::hypervisor::HypervisorError::Unsupported(_)) {
                        log::warn!("boot framebuffer: no dirty log ({e}); comparing all of it");
                    }
                    use_log = false;
                    None
                }
            }
        } else {
            None
        };
        framebuffer.scan_written(&*display.screen, force, written.as_deref());
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
    boot: VcpuStart,
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
    while lifecycle.wait_runnable(id, vcpu.as_ref()) {
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

fn prepare_vcpu(id: u32, vm: &dyn Vm, start: VcpuStart) -> Result<Box<dyn Vcpu>, MachineError> {
    let wrap = |source| MachineError::Vcpu { vcpu: id, source };
    let mut vcpu = vm.create_vcpu(id).map_err(wrap)?;
    match start {
        VcpuStart::Boot(cpu) => {
            let (regs, sregs) = *cpu;
            vcpu.set_sregs(&sregs).map_err(wrap)?;
            vcpu.set_regs(&regs).map_err(wrap)?;
        }
        VcpuStart::Restore(state) => vcpu
            .restore_state(&state)
            .map_err(|source| MachineError::VcpuState { vcpu: id, source })?,
        VcpuStart::Reset => {}
    }
    Ok(vcpu)
}

/// Puts every device back where the snapshot left it (before any vCPU runs).
fn restore_devices(
    state: &MachineState,
    devices: &SavedDevices,
    serial: &Mutex<SerialDevice>,
    acpi_pm: &Mutex<AcpiPm>,
    display: Option<&DisplayDevices>,
) -> Result<(), MachineError> {
    lock(serial).restore_state(&state.serial)?;
    lock(&devices.i8042).restore_state(&state.i8042)?;
    lock(&devices.rtc).restore_state(&state.rtc)?;
    lock(acpi_pm).restore_state(&state.acpi_pm)?;
    if let (Some(display), Some(bytes)) = (display, &state.framebuffer) {
        lock(&display.framebuffer).restore_contents(bytes)?;
    }
    lock(&devices.pci).restore_state(&state.pci)?;
    lock(&devices.pci_config_io).restore_state(&state.pci_config_io);
    Ok(())
}
