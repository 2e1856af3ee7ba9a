//! Backend conformance tests: generic checks of the `hypervisor` traits that every backend
//! must pass, each running a few hand-assembled instructions on one vCPU of a tiny guest.
//!
//! A backend instantiates them once, e.g. `#[test] fn port_io() { port_io_round_trip(&hv) }`.
//! They are test helpers: they panic with a message that names the broken behaviour. None of
//! them waits forever; anything that could block has a timeout.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout;
use crate::hypervisor::{
    ArchVcpu, ExitHandler, Hypervisor, HypervisorError, Vcpu, VcpuExit, VcpuKicker, VcpuState, Vm,
    VmSetup, VmState, X86Regs, X86Segment,
};
use crate::memory::slots::VmMemory;
use crate::memory::{create_guest_memory, map_into_vm, GuestMemory};

/// Where the test code is loaded and starts.
const CODE_ADDR: u64 = 0x1000;
/// An address with no RAM behind it (PCI MMIO window), so accesses exit to the handler.
const MMIO_ADDR: u64 = 0xd000_0000;
/// The port a guest writes to say "done".
const DONE_PORT: u16 = 0x12;
/// Upper bound on exits a test guest may take; a runaway guest fails instead of spinning.
const MAX_EXITS: usize = 64;
/// How long a vCPU thread may take to report back before the test fails.
const THREAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A one-vCPU VM with 1 MiB of RAM. Field order matters: the VM goes before its memory.
struct TinyGuest {
    vm: Arc<dyn Vm>,
    _memory: GuestMemory,
}

fn tiny_guest(hv: &dyn Hypervisor, code: &[u8]) -> TinyGuest {
    let vm = hv
        .create_vm(&VmSetup { vcpu_count: 1, ioapic_addr: layout::IOAPIC_START })
        .unwrap_or_else(|e| panic!("{}: create_vm failed: {e}", hv.name()));
    let memory = create_guest_memory(1).expect("allocate 1 MiB of guest RAM");
    map_into_vm(&memory, &VmMemory::new(vm.clone()))
        .unwrap_or_else(|e| panic!("map guest RAM: {e}"));
    memory.write_slice(code, GuestAddress(CODE_ADDR)).expect("load test code");
    TinyGuest { vm, _memory: memory }
}

fn create_vcpu(vm: &dyn Vm) -> Box<dyn ArchVcpu> {
    vm.create_vcpu(0).unwrap_or_else(|e| panic!("create_vcpu(0) failed: {e}"))
}

/// Real mode, CS base 0, RIP at the test code, interrupts off.
fn enter_real_mode(vcpu: &mut dyn ArchVcpu, regs: X86Regs) {
    let mut sregs = vcpu.sregs().expect("get sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("set sregs");
    vcpu.set_regs(&X86Regs { rip: CODE_ADDR, rflags: 0x2, ..regs }).expect("set regs");
}

/// Flat 32-bit protected mode straight from the segment caches (no GDT is ever loaded).
fn enter_flat_protected_mode(vcpu: &mut dyn ArchVcpu) {
    let mut sregs = vcpu.sregs().expect("get sregs");
    let flat = |selector: u16, type_: u8| X86Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl: 0,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    };
    sregs.cs = flat(0x8, 0xb);
    for segment in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        *segment = flat(0x10, 0x3);
    }
    sregs.cr0 |= 1; // PE
    vcpu.set_sregs(&sregs).expect("set sregs for protected mode");
    vcpu.set_regs(&X86Regs { rip: CODE_ADDR, rflags: 0x2, ..Default::default() })
        .expect("set regs");
}

/// Records every access; reads are answered with the bytes of `read_value`.
#[derive(Debug, Default)]
struct Recorder {
    read_value: u64,
    pio_writes: Vec<(u16, Vec<u8>)>,
    pio_reads: Vec<(u16, usize)>,
    mmio_writes: Vec<(u64, Vec<u8>)>,
    mmio_reads: Vec<(u64, usize)>,
}

impl Recorder {
    fn answering(read_value: u64) -> Recorder {
        Recorder { read_value, ..Default::default() }
    }

    fn fill(&self, data: &mut [u8]) {
        let bytes = self.read_value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn done(&self) -> bool {
        self.pio_writes.last().is_some_and(|(port, _)| *port == DONE_PORT)
    }
}

impl ExitHandler for Recorder {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.pio_reads.push((port, data.len()));
        self.fill(data);
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.pio_writes.push((port, data.to_vec()));
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.mmio_reads.push((addr, data.len()));
        self.fill(data);
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.mmio_writes.push((addr, data.to_vec()));
    }
}

/// Runs until the guest writes [`DONE_PORT`]; any other exit or error fails the test.
fn run_until_done(vcpu: &mut dyn Vcpu, handler: &mut Recorder) {
    for _ in 0..MAX_EXITS {
        match vcpu.run(handler) {
            Ok(VcpuExit::Io) if handler.done() => return,
            Ok(VcpuExit::Io) => {}
            Ok(exit) => panic!("guest exited with {exit:?} before writing port {DONE_PORT:#x}"),
            Err(e) => panic!("vCPU run failed: {e}"),
        }
    }
    panic!("guest did not write port {DONE_PORT:#x} within {MAX_EXITS} exits: {handler:?}");
}

/// Real mode: `mov al,0x42; out 0x10,al; in al,0x11; out 0x12,al; hlt`.
const PIO_CODE: [u8; 9] = [0xb0, 0x42, 0xe6, 0x10, 0xe4, 0x11, 0xe6, 0x12, 0xf4];

/// (a) OUT reaches the handler with its data; IN returns what the handler supplied.
pub fn port_io_round_trip(hv: &dyn Hypervisor) {
    let guest = tiny_guest(hv, &PIO_CODE);
    let mut vcpu = create_vcpu(guest.vm.as_ref());
    enter_real_mode(vcpu.as_mut(), X86Regs::default());
    let mut handler = Recorder::answering(0x5a);
    run_until_done(vcpu.as_mut(), &mut handler);
    assert_eq!(
        handler.pio_writes,
        vec![(0x10, vec![0x42]), (DONE_PORT, vec![0x5a])],
        "the guest's OUTs (the second echoes what IN read)"
    );
    assert_eq!(handler.pio_reads, vec![(0x11, 1)], "the guest's IN");
}

/// 32-bit: `mov eax,0x12345678; mov [0xd0000000],eax; mov eax,[0xd0000010]; out 0x12,eax; hlt`.
const MMIO_CODE: [u8; 18] = [
    0xb8, 0x78, 0x56, 0x34, 0x12, // mov eax, 0x12345678
    0xa3, 0x00, 0x00, 0x00, 0xd0, // mov [0xd0000000], eax
    0xa1, 0x10, 0x00, 0x00, 0xd0, // mov eax, [0xd0000010]
    0xe7, 0x12, // out 0x12, eax
    0xf4, // hlt
];

/// (b) A write and a read at an address without RAM go through the handler.
pub fn mmio_round_trip(hv: &dyn Hypervisor) {
    let guest = tiny_guest(hv, &MMIO_CODE);
    let mut vcpu = create_vcpu(guest.vm.as_ref());
    enter_flat_protected_mode(vcpu.as_mut());
    let mut handler = Recorder::answering(0xcafe_f00d);
    run_until_done(vcpu.as_mut(), &mut handler);
    assert_eq!(handler.mmio_writes, vec![(MMIO_ADDR, vec![0x78, 0x56, 0x34, 0x12])], "MMIO write");
    assert_eq!(handler.mmio_reads, vec![(MMIO_ADDR + 0x10, 4)], "MMIO read");
    assert_eq!(
        handler.pio_writes,
        vec![(DONE_PORT, vec![0x0d, 0xf0, 0xfe, 0xca])],
        "the guest echoes the MMIO read value"
    );
}

/// What a vCPU thread reports: the exit that ended its run loop, and RIP afterwards.
type ThreadExit = (Result<VcpuExit, HypervisorError>, u64);

/// Runs the loaded code on a vCPU created on its own thread, which sends back its kicker,
/// then the first exit that is not `Io` together with RIP at that point.
fn spawn_vcpu_thread(
    vm: Arc<dyn Vm>,
    kick_before_run: bool,
) -> (Arc<dyn VcpuKicker>, mpsc::Receiver<ThreadExit>) {
    let (kicker_tx, kicker_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut vcpu = create_vcpu(vm.as_ref());
        enter_real_mode(vcpu.as_mut(), X86Regs::default());
        if kick_before_run {
            vcpu.kicker().kick();
        }
        let _ = kicker_tx.send(vcpu.kicker());
        let mut handler = Recorder::default();
        let exit = loop {
            match vcpu.run(&mut handler) {
                Ok(VcpuExit::Io) => continue,
                other => break other,
            }
        };
        let rip = vcpu.regs().map_or(0, |r| r.rip);
        let _ = exit_tx.send((exit, rip));
    });
    let kicker = kicker_rx.recv_timeout(THREAD_TIMEOUT).expect("vCPU thread sends its kicker");
    (kicker, exit_rx)
}

/// (c) `cli; hlt` blocks in the hypervisor (in-kernel irqchip); a kick from another thread
/// makes `run` return `Interrupted`.
pub fn kick_interrupts_halted_vcpu(hv: &dyn Hypervisor) {
    let guest = tiny_guest(hv, &[0xfa, 0xf4]);
    let (kicker, exits) = spawn_vcpu_thread(guest.vm.clone(), false);
    if let Ok(early) = exits.recv_timeout(Duration::from_millis(500)) {
        panic!("run returned {early:?} before any kick; a halted vCPU must block");
    }
    kicker.kick();
    let Ok((exit, rip)) = exits.recv_timeout(THREAD_TIMEOUT) else {
        // The vCPU thread is stuck in the guest; keep its RAM mapped while the process lives.
        std::mem::forget(guest);
        panic!("a kick did not interrupt the halted vCPU within {THREAD_TIMEOUT:?}");
    };
    assert!(matches!(exit, Ok(VcpuExit::Interrupted)), "run after a kick: {exit:?}");
    assert_eq!(rip, CODE_ADDR + 2, "the guest had executed HLT");
}

/// A kick that lands before `run` is entered is not lost: the guest (`jmp $`, which would
/// spin forever) is not even started.
pub fn kick_before_run_is_not_lost(hv: &dyn Hypervisor) {
    let guest = tiny_guest(hv, &[0xeb, 0xfe]);
    let (_kicker, exits) = spawn_vcpu_thread(guest.vm.clone(), true);
    let Ok((exit, _)) = exits.recv_timeout(THREAD_TIMEOUT) else {
        std::mem::forget(guest);
        panic!("a kick before run was lost: the vCPU kept running for {THREAD_TIMEOUT:?}");
    };
    assert!(matches!(exit, Ok(VcpuExit::Interrupted)), "run after an early kick: {exit:?}");
}

/// 32-bit: `lidt [CODE_ADDR + 0x10]` (an empty IDT), `ud2`: #UD → #GP → #DF → shutdown.
const TRIPLE_FAULT_CODE: [u8; 22] = [
    0x0f, 0x01, 0x1d, 0x10, 0x10, 0x00, 0x00, // lidt [0x1010]
    0x0f, 0x0b, // ud2
    0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, // padding up to the IDTR
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // IDTR: limit 0, base 0
];

/// (f) A guest that triple-faults ends its run with `Crash`: a crash, not a reset.
pub fn triple_fault_is_reported(hv: &dyn Hypervisor) {
    assert_eq!(CODE_ADDR, 0x1000, "TRIPLE_FAULT_CODE addresses its IDTR absolutely");
    let guest = tiny_guest(hv, &TRIPLE_FAULT_CODE);
    let mut vcpu = create_vcpu(guest.vm.as_ref());
    enter_flat_protected_mode(vcpu.as_mut());
    let mut handler = Recorder::answering(0);
    for _ in 0..100 {
        match vcpu.run(&mut handler) {
            Ok(VcpuExit::Io | VcpuExit::Interrupted) => continue,
            other => {
                assert!(
                    matches!(other, Ok(VcpuExit::Crash)),
                    "exit of a triple-faulting guest: {other:?}"
                );
                return;
            }
        }
    }
    panic!("the guest kept running after ud2 with an empty IDT");
}

fn distinct_regs() -> X86Regs {
    let mut regs = X86Regs::default();
    for (i, reg) in [
        &mut regs.rax,
        &mut regs.rbx,
        &mut regs.rcx,
        &mut regs.rdx,
        &mut regs.rsi,
        &mut regs.rdi,
        &mut regs.rsp,
        &mut regs.rbp,
        &mut regs.r8,
        &mut regs.r9,
        &mut regs.r10,
        &mut regs.r11,
        &mut regs.r12,
        &mut regs.r13,
        &mut regs.r14,
        &mut regs.r15,
    ]
    .into_iter()
    .enumerate()
    {
        *reg = 0x0102_0304_0000_0000 * (i as u64 + 1) + 0x100 * i as u64 + 0xef;
    }
    regs.rbx = 0x1122_3344_5566_beef;
    regs
}

/// Real mode: `mov ax,bx; out 0x12,ax; hlt`.
const REGS_CODE: [u8; 5] = [0x89, 0xd8, 0xe7, 0x12, 0xf4];

/// (d) Registers read back as set, and the guest sees a value set from outside.
pub fn register_round_trip(hv: &dyn Hypervisor) {
    let guest = tiny_guest(hv, &REGS_CODE);
    let mut vcpu = create_vcpu(guest.vm.as_ref());
    enter_real_mode(vcpu.as_mut(), distinct_regs());
    let expected = X86Regs { rip: CODE_ADDR, rflags: 0x2, ..distinct_regs() };
    assert_eq!(vcpu.regs().expect("get regs"), expected, "regs read back as set");

    let sregs = vcpu.sregs().expect("get sregs");
    vcpu.set_sregs(&sregs).expect("set sregs");
    assert_eq!(vcpu.sregs().expect("get sregs"), sregs, "sregs read back as set");

    let mut handler = Recorder::default();
    run_until_done(vcpu.as_mut(), &mut handler);
    assert_eq!(handler.pio_writes, vec![(DONE_PORT, vec![0xef, 0xbe])], "guest wrote BX");
    let after = vcpu.regs().expect("get regs after run");
    assert_eq!(after.rbx, expected.rbx, "RBX survives the run");
    assert_eq!(after.rax & 0xffff, 0xbeef, "the guest's mov ax,bx is visible");
}

fn json_round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let text = serde_json::to_string(value).expect("serialize state");
    serde_json::from_str(&text).expect("deserialize state")
}

fn assert_invalid_state(result: crate::hypervisor::Result<()>, what: &str) {
    match result {
        Err(HypervisorError::InvalidState(_)) => {}
        other => panic!("restoring {what} must be InvalidState, got {other:?}"),
    }
}

/// (e) vCPU and VM state survive save → JSON → restore into a fresh VM → save, and the
/// restored vCPU carries on with the guest where the saved one stopped. Foreign, incomplete
/// or garbled state is `InvalidState`.
pub fn save_restore_round_trip(hv: &dyn Hypervisor) {
    // Stop the guest after its first OUT: the saved state must hold the IN still to come.
    let guest = tiny_guest(hv, &PIO_CODE);
    let mut vcpu = create_vcpu(guest.vm.as_ref());
    enter_real_mode(vcpu.as_mut(), distinct_regs());
    let mut handler = Recorder::answering(0x5a);
    assert_eq!(vcpu.run(&mut handler).expect("first run"), VcpuExit::Io);
    assert_eq!(handler.pio_writes, vec![(0x10, vec![0x42])], "first OUT before saving");

    let vcpu_state: VcpuState = vcpu.save_state().expect("save vCPU state");
    let vm_state: VmState = guest.vm.save_state().expect("save VM state");
    assert_eq!(vcpu_state.backend, vm_state.backend, "one backend name for both states");
    assert_eq!(
        vcpu_state.regs.regs.rip,
        CODE_ADDR + 4,
        "saved between instructions, after the OUT"
    );
    let vcpu_loaded = json_round_trip(&vcpu_state);
    let vm_loaded = json_round_trip(&vm_state);
    assert_eq!(vcpu_loaded, vcpu_state, "vCPU state survives JSON");
    assert_eq!(vm_loaded, vm_state, "VM state survives JSON");

    let restored = tiny_guest(hv, &PIO_CODE);
    restored.vm.restore_state(&vm_loaded).expect("restore VM state");
    let mut restored_vcpu = create_vcpu(restored.vm.as_ref());
    restored_vcpu.restore_state(&vcpu_loaded).expect("restore vCPU state");

    let vcpu_again = restored_vcpu.save_state().expect("save restored vCPU");
    assert_eq!(vcpu_again.regs.regs, vcpu_state.regs.regs, "regs after restore");
    assert_eq!(vcpu_again.regs.sregs, vcpu_state.regs.sregs, "sregs after restore");
    assert_eq!(
        vcpu_again.blobs.keys().collect::<Vec<_>>(),
        vcpu_state.blobs.keys().collect::<Vec<_>>(),
        "vCPU blob keys after restore"
    );
    let vm_again = restored.vm.save_state().expect("save restored VM");
    assert_eq!(
        vm_again.blobs.keys().collect::<Vec<_>>(),
        vm_state.blobs.keys().collect::<Vec<_>>(),
        "VM blob keys after restore"
    );

    let mut handler = Recorder::answering(0x77);
    run_until_done(restored_vcpu.as_mut(), &mut handler);
    assert_eq!(handler.pio_reads, vec![(0x11, 1)], "the restored guest resumes with its IN");
    assert_eq!(handler.pio_writes, vec![(DONE_PORT, vec![0x77])], "and then its last OUT");

    let foreign = VcpuState { backend: "no-such-backend".to_string(), ..vcpu_state.clone() };
    assert_invalid_state(restored_vcpu.restore_state(&foreign), "a foreign vCPU state");
    let foreign_vm = VmState { backend: "no-such-backend".to_string(), ..vm_state.clone() };
    assert_invalid_state(restored.vm.restore_state(&foreign_vm), "a foreign VM state");
    for key in vcpu_state.blobs.keys() {
        let mut garbled = vcpu_state.clone();
        garbled.blobs.insert(key.clone(), vec![1, 2, 3]);
        assert_invalid_state(restored_vcpu.restore_state(&garbled), &format!("garbled vCPU {key}"));
        garbled.blobs.remove(key);
        assert_invalid_state(restored_vcpu.restore_state(&garbled), &format!("vCPU without {key}"));
    }
    for key in vm_state.blobs.keys() {
        let mut garbled = vm_state.clone();
        garbled.blobs.insert(key.clone(), vec![1, 2, 3]);
        assert_invalid_state(restored.vm.restore_state(&garbled), &format!("garbled VM {key}"));
        garbled.blobs.remove(key);
        assert_invalid_state(restored.vm.restore_state(&garbled), &format!("VM without {key}"));
    }
}

/// (g) A registered guest notifier catches the guest's MMIO write inside the hypervisor: the
/// write never reaches the handler and wakes the notifier; other accesses still exit. Dropping
/// the notifier gives the address back to the handler. A backend without notifiers must say
/// [`HypervisorError::Unsupported`] and keep exiting as before.
pub fn notifier_catches_guest_write(hv: &dyn Hypervisor) {
    let guest = tiny_guest(hv, &MMIO_CODE);
    let mut vcpu = create_vcpu(guest.vm.as_ref());
    let notifier = match guest.vm.register_notifier(MMIO_ADDR, 4) {
        Ok(n) => n,
        Err(HypervisorError::Unsupported(_)) => {
            enter_flat_protected_mode(vcpu.as_mut());
            let mut handler = Recorder::answering(0);
            run_until_done(vcpu.as_mut(), &mut handler);
            assert_eq!(handler.mmio_writes.len(), 1, "without notifiers the write exits");
            return;
        }
        Err(e) => panic!("{}: register_notifier failed: {e}", hv.name()),
    };
    let notifier: Arc<dyn crate::hypervisor::GuestNotifier> = Arc::from(notifier);
    enter_flat_protected_mode(vcpu.as_mut());
    let mut handler = Recorder::answering(0x1234_5678);
    run_until_done(vcpu.as_mut(), &mut handler);
    assert!(handler.mmio_writes.is_empty(), "the notifier's write exited: {handler:?}");
    assert_eq!(handler.mmio_reads, vec![(MMIO_ADDR + 0x10, 4)], "the MMIO read still exits");
    let (tx, rx) = mpsc::channel();
    let waiter = notifier.clone();
    let first = std::thread::spawn(move || {
        let _ = tx.send(waiter.wait().map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(THREAD_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("notifier wait failed: {e}"),
        Err(_) => panic!("the guest's write did not wake the notifier"),
    }

    // A wake from the host side ends a wait too (how device threads are stopped).
    let waiter = notifier.clone();
    let (tx, rx) = mpsc::channel();
    let second = std::thread::spawn(move || {
        let _ = tx.send(waiter.wait().is_ok());
    });
    notifier.wake();
    assert_eq!(rx.recv_timeout(THREAD_TIMEOUT), Ok(true), "wake did not end the wait");

    // Both waiters returned, so joining is quick; then this is the last reference.
    let _ = first.join();
    let _ = second.join();
    drop(notifier);
    enter_flat_protected_mode(vcpu.as_mut());
    let mut handler = Recorder::answering(0);
    run_until_done(vcpu.as_mut(), &mut handler);
    assert_eq!(
        handler.mmio_writes,
        vec![(MMIO_ADDR, vec![0x78, 0x56, 0x34, 0x12])],
        "after the notifier is dropped the write exits again"
    );
}

/// 32-bit: `mov eax,0x12345678; mov [0xd0001000],eax; mov eax,[0xd0001000]; out 0x12,eax;
/// hlt` — a write to the second page of a dirty-logged slot, read back from it.
const DIRTY_CODE: [u8; 18] = [
    0xb8, 0x78, 0x56, 0x34, 0x12, // mov eax, 0x12345678
    0xa3, 0x00, 0x10, 0x00, 0xd0, // mov [0xd0001000], eax
    0xa1, 0x00, 0x10, 0x00, 0xd0, // mov eax, [0xd0001000]
    0xe7, 0x12, // out 0x12, eax
    0xf4, // hlt
];

/// (h) A slot mapped with `track_dirty` reports exactly the page the guest wrote, once.
pub fn dirty_log_names_the_written_page(hv: &dyn Hypervisor) {
    const SLOT: u32 = 1;
    const SIZE: usize = 4 * 4096;
    // Declared before the guest, so dropped after its VM.
    let region = vm_memory::MmapRegion::<()>::new(SIZE).expect("allocate the logged region");
    let guest = tiny_guest(hv, &DIRTY_CODE);
    let mapping = crate::hypervisor::GuestRamMapping {
        slot: SLOT,
        guest_addr: MMIO_ADDR,
        size: SIZE as u64,
        host_addr: region.as_ptr(),
        readonly: false,
        track_dirty: true,
    };
    // SAFETY: `region` is a live anonymous mapping, dropped only after `guest` and its VM.
    unsafe { guest.vm.map_memory(mapping) }
        .unwrap_or_else(|e| panic!("{}: map a dirty-logged slot: {e}", hv.name()));
    let take = || guest.vm.take_dirty_pages(SLOT, SIZE as u64);
    let mut vcpu = create_vcpu(guest.vm.as_ref());
    match take() {
        Ok(pages) => assert!(pages.iter().all(|&w| w == 0), "a fresh slot is clean: {pages:?}"),
        Err(HypervisorError::Unsupported(_)) => return,
        Err(e) => panic!("{}: take_dirty_pages failed: {e}", hv.name()),
    }
    enter_flat_protected_mode(vcpu.as_mut());
    let mut handler = Recorder::answering(0);
    run_until_done(vcpu.as_mut(), &mut handler);
    assert!(handler.mmio_writes.is_empty() && handler.mmio_reads.is_empty(), "{handler:?}");
    assert_eq!(
        handler.pio_writes,
        vec![(DONE_PORT, vec![0x78, 0x56, 0x34, 0x12])],
        "the guest reads back what it wrote to the slot's RAM"
    );
    let pages = take().expect("take the dirty log");
    assert_eq!(pages.first().copied(), Some(0b10), "only page 1 was written: {pages:?}");
    let pages = take().expect("take the dirty log again");
    assert!(pages.iter().all(|&w| w == 0), "taking the log starts a clean round: {pages:?}");
}

/// 32-bit: `mov eax,[0xd0000000]; out 0x10,eax; mov eax,[0xd0000000]; out 0x11,eax;
/// mov eax,[0xd0100000]; out 0x12,eax; hlt` — one address read while mapped and after the
/// unmap, then the new address.
const MOVE_CODE: [u8; 22] = [
    0xa1, 0x00, 0x00, 0x00, 0xd0, // mov eax, [0xd0000000]
    0xe7, 0x10, // out 0x10, eax
    0xa1, 0x00, 0x00, 0x00, 0xd0, // mov eax, [0xd0000000]
    0xe7, 0x11, // out 0x11, eax
    0xa1, 0x00, 0x00, 0x10, 0xd0, // mov eax, [0xd0100000]
    0xe7, 0x12, // out 0x12, eax
    0xf4, // hlt
];

/// Runs until the guest's next port write; MMIO reads are answered by `handler`.
fn run_until_port_write(vcpu: &mut dyn Vcpu, handler: &mut Recorder) -> (u16, Vec<u8>) {
    let before = handler.pio_writes.len();
    for _ in 0..MAX_EXITS {
        match vcpu.run(handler) {
            Ok(VcpuExit::Io) if handler.pio_writes.len() > before => {
                return handler.pio_writes[before].clone();
            }
            Ok(VcpuExit::Io) => {}
            Ok(exit) => panic!("guest exited with {exit:?} before its next port write"),
            Err(e) => panic!("vCPU run failed: {e}"),
        }
    }
    panic!("guest made no port write within {MAX_EXITS} exits: {handler:?}");
}

/// (i) Host memory mapped, unmapped and mapped again elsewhere (a RAM BAR the guest moves):
/// the guest reads it at the first address, then that address exits as MMIO, then the same
/// memory answers at the new address, from the same slot.
pub fn unmapped_memory_exits_and_maps_again_elsewhere(hv: &dyn Hypervisor) {
    const SLOT: u32 = 1;
    const SIZE: usize = 4096;
    const OLD: u64 = MMIO_ADDR;
    const NEW: u64 = MMIO_ADDR + 0x10_0000;
    // Declared before the guest, so dropped after its VM.
    let region = vm_memory::MmapRegion::<()>::new(SIZE).expect("allocate the moving region");
    // SAFETY: `region` is a live anonymous mapping of SIZE bytes nothing else references.
    unsafe { std::ptr::write_volatile(region.as_ptr().cast::<u32>(), 0xcafe_f00d) };
    let guest = tiny_guest(hv, &MOVE_CODE);
    let map = |guest_addr| {
        let mapping = crate::hypervisor::GuestRamMapping {
            slot: SLOT,
            guest_addr,
            size: SIZE as u64,
            host_addr: region.as_ptr(),
            readonly: false,
            track_dirty: false,
        };
        // SAFETY: `region` is a live anonymous mapping, dropped only after `guest` and its VM.
        unsafe { guest.vm.map_memory(mapping) }
            .unwrap_or_else(|e| panic!("{}: map slot {SLOT} at {guest_addr:#x}: {e}", hv.name()));
    };
    map(OLD);
    let mut vcpu = create_vcpu(guest.vm.as_ref());
    enter_flat_protected_mode(vcpu.as_mut());
    let mut handler = Recorder::answering(0x1111_1111);
    let first = run_until_port_write(vcpu.as_mut(), &mut handler);
    assert_eq!(first, (0x10, 0xcafe_f00du32.to_le_bytes().to_vec()), "read while mapped");
    assert!(handler.mmio_reads.is_empty(), "mapped memory does not exit: {handler:?}");

    guest
        .vm
        .unmap_memory(SLOT, OLD, SIZE as u64)
        .unwrap_or_else(|e| panic!("{}: unmap slot {SLOT}: {e}", hv.name()));
    let second = run_until_port_write(vcpu.as_mut(), &mut handler);
    assert_eq!(second, (0x11, vec![0x11; 4]), "after the unmap the handler answers");
    assert_eq!(handler.mmio_reads, vec![(OLD, 4)], "the old address exits as MMIO");

    map(NEW);
    let third = run_until_port_write(vcpu.as_mut(), &mut handler);
    assert_eq!(
        third,
        (DONE_PORT, 0xcafe_f00du32.to_le_bytes().to_vec()),
        "read at the new address"
    );
    assert_eq!(handler.mmio_reads.len(), 1, "the new address does not exit: {handler:?}");
}
