//! The board-neutral lifecycle on a fake hypervisor and an empty board: pause and resume at
//! safe points, jobs done by paused vCPUs, a guest's reset, and vCPUs that crash or panic.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::board::{Board, BoardContext, BoardDevices, BoardError, BootSource, IoBuses};
use crate::devices::bus::Bus;
use crate::hypervisor::{
    ArchVcpu, ExitHandler, GuestRamMapping, Hypervisor, HypervisorError, InterruptSink, Vcpu,
    VcpuExit, VcpuKicker, VcpuState, Vm, VmSetup, VmState,
};
use crate::pci::PciRoot;

/// What the fake vCPUs do, shared with the test.
#[derive(Default)]
struct Script {
    /// Runs per vCPU (index = id).
    runs: [AtomicU64; 2],
    /// State saves per vCPU.
    saves: [AtomicU64; 2],
    /// The vCPU that panics in its first run.
    panic_vcpu: Option<u32>,
    /// The vCPU that crashes in its first run.
    crash_vcpu: Option<u32>,
    /// How many more runs of vCPU 0 end in a reset request.
    resets_left: AtomicU64,
    /// State restores per vCPU.
    restores: [AtomicU64; 2],
    /// The board's boot loads, and its vCPU inits per vCPU.
    boots: AtomicU64,
    inits: [AtomicU64; 2],
}

struct FakeHypervisor(Arc<Script>);

impl Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn create_vm(&self, _setup: &VmSetup) -> crate::hypervisor::Result<Arc<dyn Vm>> {
        Ok(Arc::new(FakeVm(self.0.clone())))
    }
}

struct FakeVm(Arc<Script>);

impl InterruptSink for FakeVm {
    fn set_irq_line(&self, _gsi: u32, _active: bool) -> crate::hypervisor::Result<()> {
        Ok(())
    }
    fn signal_msi(&self, _address: u64, _data: u32) -> crate::hypervisor::Result<()> {
        Ok(())
    }
}

impl Vm for FakeVm {
    unsafe fn map_memory(&self, _mapping: GuestRamMapping) -> crate::hypervisor::Result<()> {
        Ok(())
    }
    fn unmap_memory(&self, _slot: u32, _addr: u64, _size: u64) -> crate::hypervisor::Result<()> {
        Ok(())
    }
    fn create_vcpu(&self, id: u32) -> crate::hypervisor::Result<Box<dyn ArchVcpu>> {
        Ok(Box::new(FakeVcpu {
            id,
            script: self.0.clone(),
            kicker: Arc::new(FakeKicker::default()),
        }))
    }
    fn save_state(&self) -> crate::hypervisor::Result<VmState> {
        Ok(VmState { backend: "fake".into(), blobs: BTreeMap::new() })
    }
    fn restore_state(&self, _state: &VmState) -> crate::hypervisor::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct FakeKicker(AtomicBool);

impl VcpuKicker for FakeKicker {
    fn kick(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct FakeVcpu {
    id: u32,
    script: Arc<Script>,
    kicker: Arc<FakeKicker>,
}

impl Vcpu for FakeVcpu {
    fn id(&self) -> u32 {
        self.id
    }
    fn run(&mut self, _handler: &mut dyn ExitHandler) -> crate::hypervisor::Result<VcpuExit> {
        self.script.runs[self.id as usize].fetch_add(1, Ordering::SeqCst);
        if self.script.panic_vcpu == Some(self.id) {
            panic!("vCPU {} panics on purpose", self.id);
        }
        if self.script.crash_vcpu == Some(self.id) {
            return Ok(VcpuExit::Crash);
        }
        let resets = &self.script.resets_left;
        if self.id == 0 && resets.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Ok(VcpuExit::Reset);
        }
        if self.kicker.0.swap(false, Ordering::SeqCst) {
            return Ok(VcpuExit::Interrupted);
        }
        thread::sleep(Duration::from_millis(1));
        Ok(VcpuExit::Io)
    }
    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }
    fn save_state(&self) -> crate::hypervisor::Result<VcpuState> {
        self.script.saves[self.id as usize].fetch_add(1, Ordering::SeqCst);
        Ok(VcpuState { backend: "fake".into(), ..Default::default() })
    }
    fn restore_state(&mut self, _state: &VcpuState) -> crate::hypervisor::Result<()> {
        self.script.restores[self.id as usize].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
impl crate::hypervisor::VcpuX86_64 for FakeVcpu {
    fn regs(&self) -> crate::hypervisor::Result<crate::hypervisor::X86Regs> {
        Ok(crate::hypervisor::X86Regs { rip: 0x1234, ..Default::default() })
    }
    fn set_regs(&mut self, _regs: &crate::hypervisor::X86Regs) -> crate::hypervisor::Result<()> {
        Ok(())
    }
    fn sregs(&self) -> crate::hypervisor::Result<crate::hypervisor::X86Sregs> {
        Ok(Default::default())
    }
    fn set_sregs(&mut self, _sregs: &crate::hypervisor::X86Sregs) -> crate::hypervisor::Result<()> {
        Ok(())
    }
}

#[cfg(target_arch = "aarch64")]
impl crate::hypervisor::VcpuAarch64 for FakeVcpu {
    fn core_regs(&self) -> crate::hypervisor::Result<crate::hypervisor::Aarch64CoreRegs> {
        Ok(crate::hypervisor::Aarch64CoreRegs { pc: 0x1234, ..Default::default() })
    }
    fn set_core_regs(
        &mut self,
        _regs: &crate::hypervisor::Aarch64CoreRegs,
    ) -> crate::hypervisor::Result<()> {
        Ok(())
    }
}

/// A board with RAM and nothing else; it counts boots in the script.
struct EmptyBoard(Arc<Script>);

impl Board for EmptyBoard {
    fn name(&self) -> &'static str {
        "empty"
    }
    fn arch(&self) -> &'static str {
        "test"
    }
    fn max_vcpus(&self) -> u32 {
        2
    }
    fn max_memory_mib(&self) -> u64 {
        16
    }
    fn ram_regions(&self, ram_bytes: u64) -> Vec<(u64, u64)> {
        vec![(0, ram_bytes)]
    }
    fn vm_setup(&self, vcpu_count: u32) -> VmSetup {
        VmSetup { vcpu_count, ioapic_addr: 0 }
    }
    fn build_devices(&mut self, _context: BoardContext<'_>) -> Result<BoardDevices, BoardError> {
        Ok(BoardDevices {
            io: IoBuses { pio: Bus::new(), mmio: Bus::new() },
            saved: Vec::new(),
            pci: Arc::new(Mutex::new(empty_pci_root())),
            display: None,
            disks: Default::default(),
        })
    }
    fn load_boot(
        &self,
        _memory: &crate::memory::GuestMemory,
        _source: &BootSource,
        _vcpu_count: u32,
    ) -> Result<(), BoardError> {
        self.0.boots.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn init_vcpu(&self, id: u32, _vcpu: &mut dyn ArchVcpu) -> Result<(), HypervisorError> {
        self.0.inits[id as usize].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn press_power_button(&self) {}
    fn serial_input(&self, _bytes: &[u8]) {}
    fn legacy_key(&self, _code: u16, _down: bool) -> bool {
        false
    }
}

fn config() -> MachineConfig {
    MachineConfig {
        kernel: "unused".into(),
        initrd: None,
        cmdline: String::new(),
        disks: Vec::new(),
        cpus: 2,
        memory_mib: 2,
        kernel_cache_dir: None,
        firmware: None,
    }
}

/// Starts a machine on the fake hypervisor; returns its handle and the thread running it.
fn start(
    script: Script,
) -> (Arc<Script>, MachineHandle, thread::JoinHandle<Result<ExitReason, MachineError>>) {
    let script = Arc::new(script);
    let hv = FakeHypervisor(script.clone());
    let board = Box::new(EmptyBoard(script.clone()));
    let machine =
        Machine::build(board, &hv, &config(), Box::new(std::io::sink()), None, None, None).unwrap();
    let handle = machine.handle();
    let runner = thread::spawn(move || machine.run());
    (script, handle, runner)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn runs(script: &Script) -> [u64; 2] {
    [script.runs[0].load(Ordering::SeqCst), script.runs[1].load(Ordering::SeqCst)]
}

#[test]
fn paused_vcpus_stop_running_and_resume_goes_on() {
    let (script, handle, runner) = start(Script::default());
    wait_for("both vCPUs to run", || runs(&script).iter().all(|&n| n > 2));
    wait_for("the machine to count as running", || handle.state() == RunState::Running);
    handle.pause().unwrap();
    assert_eq!(handle.state(), RunState::Paused);
    let before = runs(&script);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(runs(&script), before, "no vCPU may run while paused");
    handle.pause().unwrap();
    handle.resume().unwrap();
    assert_eq!(handle.state(), RunState::Running);
    wait_for("both vCPUs to run again", || {
        runs(&script).iter().zip(before).all(|(&now, then)| now > then + 2)
    });
    handle.poweroff();
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::ForcedOff);
    assert_eq!(handle.state(), RunState::Stopped);
    assert!(matches!(handle.pause(), Err(MachineError::InvalidState(RunState::Stopped))));
}

#[test]
fn every_job_is_done_once_by_every_paused_vcpu() {
    let (script, handle, runner) = start(Script::default());
    wait_for("the machine to count as running", || handle.state() == RunState::Running);
    handle.pause().unwrap();
    // Each vCPU saved its power-on state when it was created.
    // Two jobs while the vCPUs stay paused: the generation makes each vCPU do both.
    for round in 2..=3u64 {
        let states = handle.lifecycle.save_vcpus(2).unwrap();
        assert_eq!(states.len(), 2);
        assert!(states.iter().all(|s| matches!(s, Some(Ok(_)))));
        for saves in &script.saves {
            assert_eq!(saves.load(Ordering::SeqCst), round);
        }
    }
    handle.resume().unwrap();
    handle.poweroff();
    runner.join().unwrap().unwrap();
}

#[test]
fn a_panicking_vcpu_ends_the_machine_with_an_error() {
    let (_script, handle, runner) = start(Script { panic_vcpu: Some(1), ..Default::default() });
    let outcome = runner.join().unwrap();
    assert!(matches!(outcome, Err(MachineError::VcpuPanicked { vcpu: 1 })), "{outcome:?}");
    assert_eq!(handle.state(), RunState::Stopped);
    assert!(handle.pause().is_err(), "pausing a stopped machine fails instead of waiting");
}

#[test]
fn a_crashing_guest_is_an_error_naming_the_vcpu_and_where() {
    let (_script, _handle, runner) = start(Script { crash_vcpu: Some(0), ..Default::default() });
    let err = runner.join().unwrap().unwrap_err();
    assert!(matches!(err, MachineError::GuestCrashed { vcpu: 0, .. }), "{err:?}");
    #[cfg(target_arch = "x86_64")]
    assert_eq!(err.to_string(), "The guest crashed: vCPU 0 triple-faulted near rip 0x1234");
}

#[test]
fn snapshot_of_another_board_is_refused() {
    let script = Arc::new(Script::default());
    let hv = FakeHypervisor(script.clone());
    let board = Box::new(EmptyBoard(script));
    let machine =
        Machine::build(board, &hv, &config(), Box::new(std::io::sink()), None, None, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hsnap");
    let handle = machine.handle();
    let runner = thread::spawn(move || machine.run());
    wait_for("the machine to count as running", || handle.state() == RunState::Running);
    handle.save_snapshot(&path, &mut || Ok(Vec::new()), &mut || Ok(())).unwrap();
    handle.poweroff();
    runner.join().unwrap().unwrap();
    let file = crate::snapshot::SnapshotFile::open(&path).unwrap();
    assert_eq!((file.header.board.as_str(), file.header.arch.as_str()), ("empty", "test"));
    let err = MachineState::read(&file, "pc", "x86_64").unwrap_err().to_string();
    assert!(err.contains("empty machine on test"), "{err}");
    let state = MachineState::read(&file, "empty", "test").unwrap();
    assert_eq!(state.vcpus.len(), 2);
}

/// A bus with nothing but a host bridge, and no windows.
fn empty_pci_root() -> PciRoot {
    let config = crate::pci::PciRootConfig {
        host_bridge: Box::new(crate::pci::PciHostBridge::new(0x8086, 0x0d57)),
        mmio32: crate::pci::PciWindow::EMPTY,
        mmio64: crate::pci::PciWindow::EMPTY,
        io: crate::pci::PciWindow::EMPTY,
        ecam_base: 0xe000_0000,
        bus_count: 1,
        memory: None,
        intx: None,
    };
    PciRoot::new(config).unwrap()
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::SeqCst)
}

#[test]
fn a_guest_reset_reboots_in_place_with_every_vcpu_back_at_power_on() {
    let script = Script { resets_left: AtomicU64::new(2), ..Default::default() };
    let (script, handle, runner) = start(script);
    wait_for("two reboots", || count(&script.boots) == 3);
    wait_for("the machine to run again", || handle.state() == RunState::Running);
    for id in 0..2 {
        assert_eq!(count(&script.inits[id]), 3, "vCPU {id}: boot state at power-on and per reset");
        assert_eq!(count(&script.restores[id]), 2, "vCPU {id}: power-on state per reset");
    }
    let before = runs(&script);
    wait_for("both vCPUs to run after the reboots", || {
        runs(&script).iter().zip(before).all(|(&now, then)| now > then + 2)
    });
    handle.pause().unwrap();
    handle.resume().unwrap();
    handle.poweroff();
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::ForcedOff);
}

#[test]
fn a_reset_loop_ends_the_machine_with_a_clear_error() {
    let (script, _handle, runner) =
        start(Script { resets_left: AtomicU64::new(u64::MAX), ..Default::default() });
    let err = runner.join().unwrap().unwrap_err();
    assert!(matches!(err, MachineError::ResetLoop { count } if count == RESET_LOOP_LIMIT + 1));
    assert!(err.to_string().contains("reset itself 11 times within 60 s"), "{err}");
    assert_eq!(count(&script.boots), 1 + RESET_LOOP_LIMIT as u64, "one boot and ten reboots");
}
