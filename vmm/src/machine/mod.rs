//! One running machine: guest memory, the board's devices, vCPU threads and its lifecycle.
//! Board-neutral: what the machine is made of comes from a [`Board`] (today the x86 PC,
//! `board::pc`).
//!
//! The app builds a [`Machine`] from a [`MachineConfig`], takes a [`MachineHandle`] (cloneable,
//! `Send`) for control from other threads, and calls [`Machine::run`], which blocks until the
//! guest powers off, resets, is forced off, or fails.
//!
//! ```text
//!  mod.rs        config, errors, build (memory → VM → board devices → boot or restore), run
//!  lifecycle.rs  run state, pause/resume at safe points, jobs for paused vCPUs
//!  vcpu.rs       one thread per vCPU (created there, never leaves it), exit dispatch
//!  handle.rs     MachineHandle: control from any thread
//!  snapshot.rs   save_snapshot: pause, quiesce, save vCPUs/VM/devices/RAM, switch disks
//!  persist.rs    the saved machine state (format 2: devices keyed by id)
//!  display.rs    screen, input handles, boot framebuffer scanner
//!  disks.rs      disks switchable to new layers
//! ```

pub mod disks;
pub(crate) mod display;
mod handle;
mod lifecycle;
pub mod persist;
mod snapshot;
#[cfg(test)]
mod tests;
mod vcpu;
mod watchdog;

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::display::DisplayDevices;
pub use self::handle::MachineHandle;
use self::lifecycle::Lifecycle;
pub use self::persist::MachineState;
pub use self::snapshot::{HostError, SnapshotTimes};
use self::vcpu::{vcpu_thread, VcpuContext, VcpuStart};
pub use crate::board::NetAttachment;
use crate::board::{
    Board, BoardContext, BoardError, BootSource, FirmwareBoot, IoBuses, KernelBoot,
};
use crate::devices::bus::lock;
use crate::hypervisor::{Hypervisor, HypervisorError, VcpuState, Vm};
use crate::memory::{self, slots::VmMemory};
use crate::snapshot::{SnapshotError, SnapshotFile};
use crate::state::StateError;
use ::display::scanout::Screen;

/// Most vCPUs the PC board takes (the MADT's xAPIC ids are 8 bits and the IOAPIC takes one).
#[cfg(target_arch = "x86_64")]
pub const MAX_VCPUS: u32 = crate::board::pc::MAX_VCPUS;

/// One disk attached as virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The image; empty for a removable drive with nothing in it.
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// A read-only drive whose medium can change while the guest runs (the CD).
    #[serde(default)]
    pub removable: bool,
}

impl DiskConfig {
    /// A removable drive (read-only) holding `medium`, or empty.
    pub fn removable(medium: Option<PathBuf>) -> Self {
        DiskConfig { path: medium.unwrap_or_default(), readonly: true, removable: true }
    }

    /// A removable drive with no medium.
    pub fn is_empty_drive(&self) -> bool {
        self.removable && self.path.as_os_str().is_empty()
    }
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
    /// Boot this firmware (on the Q35 board) instead of `kernel`.
    #[serde(default)]
    pub firmware: Option<FirmwareBoot>,
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
    /// The host forced it off ([`MachineHandle::poweroff`]).
    ForcedOff,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("Invalid machine configuration: {0}")]
    InvalidConfig(String),
    #[error("Could not set up guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Board(#[from] BoardError),
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
    #[error("The guest crashed: vCPU {vcpu} {detail}")]
    GuestCrashed { vcpu: u32, detail: String },
    #[error("vCPU {vcpu} crashed (a bug in Hutch; see the log)")]
    VcpuPanicked { vcpu: u32 },
    #[error("The machine is {}", .0.name())]
    InvalidState(RunState),
    #[error("The vCPUs did not pause in time")]
    PauseTimeout,
    #[error("This machine has no display")]
    NoDisplay,
    #[error("This machine has no CD drive")]
    NoRemovableDrive,
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
    #[error("Cannot switch the disks to their new layers")]
    DiskSwitch(#[source] HostError),
    #[error(
        "The guest reset itself {count} times within {} s; stopped it (it resets again and \
         again, e.g. after a crash early in boot)",
        RESET_LOOP_WINDOW.as_secs()
    )]
    ResetLoop { count: usize },
}

/// More resets than [`RESET_LOOP_LIMIT`] within this window end the machine: a guest that
/// crashes during boot would otherwise reboot for ever.
pub const RESET_LOOP_WINDOW: Duration = Duration::from_secs(60);
pub const RESET_LOOP_LIMIT: usize = 10;

impl MachineConfig {
    /// What this configuration boots.
    pub fn boot_source(&self) -> BootSource {
        if let Some(firmware) = &self.firmware {
            return BootSource::Firmware(firmware.clone());
        }
        BootSource::Kernel(KernelBoot {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cache_dir: self.kernel_cache_dir.clone(),
        })
    }
}

/// A built, not yet running machine.
pub struct Machine {
    vm: Arc<dyn Vm>,
    io: Arc<IoBuses>,
    start: Start,
    handle: MachineHandle,
    power_on: PowerOnState,
    /// When the guest last printed on serial (the silent-firmware watchdog reads it).
    silence: Arc<watchdog::Silence>,
}

/// What a guest's reset puts back: the devices and the VM (interrupt controllers, timers) as
/// they were built, before the first boot or a snapshot's restore, and the boot to load
/// again. Guest RAM stays (firmware keeps its variables there across a reboot); each vCPU
/// keeps its own power-on state.
struct PowerOnState {
    devices: std::collections::BTreeMap<String, serde_bytes::ByteBuf>,
    vm: crate::hypervisor::VmState,
    boot: BootSource,
}

/// How the vCPUs begin: where the board's boot puts them, or where a snapshot left them.
enum Start {
    Boot,
    Restore(Vec<VcpuState>),
}

/// The board a configuration runs on: the PC for a kernel, Q35 for firmware.
#[cfg(target_arch = "x86_64")]
fn default_board(config: &MachineConfig) -> Box<dyn Board> {
    match config.firmware {
        Some(_) => Box::new(crate::board::q35::Q35Board::new()),
        None => Box::new(crate::board::pc::PcBoard::new()),
    }
}

fn validate(config: &MachineConfig, board: &dyn Board) -> Result<(), MachineError> {
    let max_vcpus = board.max_vcpus();
    if config.cpus == 0 || config.cpus > max_vcpus {
        return Err(MachineError::InvalidConfig(format!(
            "{} vCPUs requested; Hutch supports 1 to {max_vcpus}",
            config.cpus
        )));
    }
    if config.memory_mib == 0 {
        return Err(MachineError::InvalidConfig("guest memory must be at least 1 MiB".into()));
    }
    if config.memory_mib > board.max_memory_mib() {
        return Err(MachineError::Memory(memory::MemoryError::InvalidSize {
            mib: config.memory_mib,
            max: board.max_memory_mib(),
        }));
    }
    if let Some(host) = crate::sys::host_memory_mib() {
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
    /// devices (virtio keyboard, tablet and mouse) that draw into it; with `net`, a network
    /// card (virtio-net).
    #[cfg(target_arch = "x86_64")]
    pub fn new(
        hypervisor: &dyn Hypervisor,
        config: &MachineConfig,
        serial_out: Box<dyn Write + Send>,
        screen: Option<Arc<Screen>>,
        net: Option<NetAttachment>,
    ) -> Result<Machine, MachineError> {
        Self::build(default_board(config), hypervisor, config, serial_out, screen, net, None)
    }

    /// Builds the machine a snapshot holds: the same devices as [`Machine::new`] for
    /// `config` (its CPUs, memory, disks and display must be the snapshot's), guest RAM mapped
    /// copy-on-write from the file, and every vCPU and device where the snapshot left it.
    /// The kernel in `config` is not loaded. `run` continues the guest.
    #[cfg(target_arch = "x86_64")]
    pub fn restore(
        hypervisor: &dyn Hypervisor,
        config: &MachineConfig,
        snapshot: &SnapshotFile,
        serial_out: Box<dyn Write + Send>,
        screen: Option<Arc<Screen>>,
        net: Option<NetAttachment>,
    ) -> Result<Machine, MachineError> {
        Self::build(
            default_board(config),
            hypervisor,
            config,
            serial_out,
            screen,
            net,
            Some(snapshot),
        )
    }

    /// Checks that `snapshot` can be restored into a machine built from `config` (with or
    /// without a display), without building anything.
    #[cfg(target_arch = "x86_64")]
    pub fn check_snapshot(
        snapshot: &SnapshotFile,
        config: &MachineConfig,
        display: bool,
    ) -> Result<(), MachineError> {
        Self::snapshot_state(snapshot, default_board(config).as_ref(), config, display).map(drop)
    }

    /// The saved machine's state, checked against `config` and the display before anything
    /// is built.
    fn snapshot_state(
        snapshot: &SnapshotFile,
        board: &dyn Board,
        config: &MachineConfig,
        display: bool,
    ) -> Result<MachineState, MachineError> {
        let state = MachineState::read(snapshot, board.name(), board.arch())?;
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
        if state.display != display {
            let word = |d: bool| if d { "a display" } else { "no display" }.to_string();
            return mismatch("", word(state.display), word(display));
        }
        Ok(state)
    }

    /// Builds a machine on `board`: memory, the VM, the board's devices, then either the
    /// board's boot or the snapshot's state.
    pub fn build(
        mut board: Box<dyn Board>,
        hypervisor: &dyn Hypervisor,
        config: &MachineConfig,
        serial_out: Box<dyn Write + Send>,
        screen: Option<Arc<Screen>>,
        net: Option<NetAttachment>,
        snapshot: Option<&SnapshotFile>,
    ) -> Result<Machine, MachineError> {
        validate(config, board.as_ref())?;
        let saved = match snapshot {
            Some(s) => {
                Some((s, Self::snapshot_state(s, board.as_ref(), config, screen.is_some())?))
            }
            None => None,
        };
        let regions = board.ram_regions(config.memory_mib << 20);
        let memory = match &saved {
            Some((file, _)) => file.map_memory(&regions)?,
            None => memory::create_guest_memory_in(config.memory_mib, &regions)?,
        };
        let vm = hypervisor.create_vm(&board.vm_setup(config.cpus))?;
        let guest_map = Arc::new(VmMemory::new(vm.clone()));
        memory::map_into_vm(&memory, &guest_map)?;

        let lifecycle = Arc::new(Lifecycle::new());
        let on_poweroff = {
            let lifecycle = lifecycle.clone();
            Box::new(move || lifecycle.request_exit(Ok(ExitReason::PowerOff)))
        };
        let on_reset = {
            let lifecycle = lifecycle.clone();
            Box::new(move || lifecycle.request_reset())
        };
        let boot = config.boot_source();
        let silence = Arc::new(watchdog::Silence::new());
        let devices = board.build_devices(BoardContext {
            vm: &vm,
            memory: &memory,
            irq: vm.clone(),
            serial_out: Box::new(watchdog::StampedWriter::new(serial_out, silence.clone())),
            screen,
            disks: &config.disks,
            on_poweroff,
            on_reset,
            guest_map: &guest_map,
            vcpu_count: config.cpus,
            boot: &boot,
            net,
        })?;
        let power_on = PowerOnState {
            devices: persist::save_devices(&devices.saved)?,
            vm: vm.save_state()?,
            boot,
        };
        let start = match saved {
            // A restored guest's RAM already holds its tables and kernel.
            None => {
                board.load_boot(&memory, &power_on.boot, config.cpus)?;
                Start::Boot
            }
            Some((_, state)) => {
                persist::restore_devices(&devices.saved, &state.devices)?;
                vm.restore_state(&state.vm)?;
                // No queue is served until the vCPUs (and their LAPICs) are back: `run`
                // restarts the I/O.
                lock(&devices.pci).quiesce_io();
                Start::Restore(state.vcpus)
            }
        };
        let handle = MachineHandle {
            lifecycle,
            board: Arc::from(board),
            vcpu_count: config.cpus,
            memory_mib: config.memory_mib,
            display: devices.display.map(Arc::new),
            saved: Arc::new(devices.saved),
            pci: devices.pci,
            disks: Arc::new(devices.disks.disks),
            removable: devices.disks.removable,
            vm: vm.clone(),
            snapshot_gate: Arc::new(Mutex::new(())),
            ps2_pointer: Arc::default(),
            memory,
        };
        Ok(Machine { vm, io: Arc::new(devices.io), start, handle, power_on, silence })
    }

    pub fn handle(&self) -> MachineHandle {
        self.handle.clone()
    }

    /// Runs until the guest ends; returns how it ended.
    pub fn run(mut self) -> Result<ExitReason, MachineError> {
        let lifecycle = self.handle.lifecycle.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut threads = Vec::new();
        let restoring = matches!(self.start, Start::Restore(_));
        let mut starts: Vec<VcpuStart> = match std::mem::replace(&mut self.start, Start::Boot) {
            Start::Boot => (0..self.handle.vcpu_count).map(|_| VcpuStart::Boot).collect(),
            Start::Restore(states) => {
                states.into_iter().map(|s| VcpuStart::Restore(Box::new(s))).collect()
            }
        };
        let traces: Vec<Arc<Mutex<watchdog::ExitTrace>>> =
            (0..self.handle.vcpu_count).map(|_| Arc::default()).collect();
        for id in 0..self.handle.vcpu_count {
            let context = VcpuContext {
                vm: self.vm.clone(),
                io: self.io.clone(),
                board: self.handle.board.clone(),
                lifecycle: lifecycle.clone(),
                trace: traces[id as usize].clone(),
            };
            let ready = ready_tx.clone();
            let start = std::mem::replace(&mut starts[id as usize], VcpuStart::Boot);
            lock(&lifecycle.control).live_vcpus += 1;
            let spawned = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_thread(id, context, start, ready));
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
                .spawn(move || display::scan_framebuffer(&display, vm.as_ref(), &lifecycle))
                .map_err(|e| log::warn!("no boot framebuffer scanner: {e}"))
                .ok()
        });
        // Firmware that goes quiet gets a diagnostic (a kernel boot prints at once, or means to
        // be quiet).
        let silence_watch = matches!(self.power_on.boot, BootSource::Firmware(_)).then(|| {
            let (lifecycle, silence) = (lifecycle.clone(), self.silence.clone());
            let display = self.handle.display.clone();
            thread::Builder::new()
                .name("fw-watch".into())
                .spawn(move || watch_silence(&lifecycle, &silence, &traces, display.as_deref()))
                .map_err(|e| log::warn!("no silent-firmware watchdog: {e}"))
                .ok()
        });
        // Every vCPU reports once, created or failed, before the machine counts as running.
        for result in ready_rx.iter().take(threads.len()) {
            if let Err(e) = result {
                lifecycle.request_exit(Err(e));
            }
        }
        if restoring {
            lock(&self.handle.pci).resume_io();
        }
        {
            let mut control = lock(&lifecycle.control);
            if control.state == RunState::Starting {
                control.state = RunState::Running;
            }
        }
        let mut resets = Vec::new();
        loop {
            {
                let mut control = lock(&lifecycle.control);
                while control.outcome.is_none() && !control.reset_requested {
                    control = lifecycle.changed.wait(control).unwrap_or_else(|p| p.into_inner());
                }
                if control.outcome.is_some() {
                    break;
                }
            }
            if let Err(e) = self.reboot(&mut resets) {
                lifecycle.request_exit(Err(e));
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
        if let Some(t) = silence_watch.flatten() {
            if t.join().is_err() {
                log::error!("the silent-firmware watchdog panicked");
            }
        }
        let mut control = lock(&lifecycle.control);
        control.state = RunState::Stopped;
        control.outcome.take().unwrap_or(Ok(ExitReason::ForcedOff))
    }

    /// A guest's reset, with the vCPUs parked: the devices and the VM back to their power-on
    /// state, the board's boot loaded again, every vCPU reset on its own thread; the serial
    /// console and the disks carry on. `resets` holds when the recent ones were.
    fn reboot(&self, resets: &mut Vec<std::time::Instant>) -> Result<(), MachineError> {
        let handle = &self.handle;
        let _no_snapshot = lock(&handle.snapshot_gate);
        if !handle.lifecycle.wait_all_parked() {
            return Err(MachineError::PauseTimeout);
        }
        let now = std::time::Instant::now();
        resets.retain(|t| now.duration_since(*t) < RESET_LOOP_WINDOW);
        resets.push(now);
        if resets.len() > RESET_LOOP_LIMIT {
            return Err(MachineError::ResetLoop { count: resets.len() });
        }
        log::info!("the guest reset itself: rebooting");
        lock(&handle.pci).quiesce_io();
        persist::restore_devices(&handle.saved, &self.power_on.devices)?;
        self.vm.restore_state(&self.power_on.vm)?;
        handle.board.load_boot(&handle.memory, &self.power_on.boot, handle.vcpu_count)?;
        handle.lifecycle.reset_vcpus(handle.vcpu_count)?;
        lock(&handle.pci).resume_io();
        handle.lifecycle.finish_reset();
        Ok(())
    }
}

/// Until the machine ends: logs [`watchdog::silence_report`] once per spell of
/// [`watchdog::SILENT_AFTER`] without serial output while the screen (if any) shows nothing.
fn watch_silence(
    lifecycle: &Lifecycle,
    silence: &watchdog::Silence,
    traces: &[Arc<Mutex<watchdog::ExitTrace>>],
    display: Option<&DisplayDevices>,
) {
    let mut watch = watchdog::SilenceWatch::default();
    loop {
        {
            let control = lock(&lifecycle.control);
            let (control, _) = lifecycle
                .changed
                .wait_timeout(control, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner());
            if control.outcome.is_some() {
                return;
            }
            if control.state != RunState::Running {
                continue;
            }
        }
        // Not under the lifecycle's lock: waiting here for the framebuffer's (a vCPU holds it
        // while it changes the mode) or a trace's must not hold up pause, resume or exit.
        let screen_live = display.is_some_and(|d| {
            let _mode = lock(d.hardware.framebuffer());
            d.hardware.shows_framebuffer()
        });
        let quiet = silence.quiet_for();
        if watch.due(quiet, screen_live) {
            log::warn!("{}", watchdog::silence_report(quiet, traces));
        }
    }
}
