#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::thread;

use super::testing::*;
use super::*;
use crate::devices::bus::BusDevice;
use crate::pci::root::{mmio_read, mmio_write};
use crate::pci::{
    Bdf, PciConfigIo, PciConfigMmio, PciHostBridge, PciRoot, PciRootConfig, PciWindow,
};
use crate::state::StateError;
use crate::virtio::rng::Rng;
use crate::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER};

fn driver() -> TestDriver {
    TestDriver::new(Box::new(Rng::new().unwrap()))
}

#[test]
fn identity_is_modern_virtio() {
    let mut d = driver();
    assert_eq!(d.dev.read_config_register(0), 0x1044_1af4);
    assert_eq!(d.dev.read_config_register(2) & 0xff, 1);
    assert_eq!(d.dev.read_config_register(11), 0x1100_1af4);
    assert_eq!(d.dev.read_config_register(15) >> 8 & 0xff, 1, "INTA#");
}

#[test]
fn capability_list_walks_to_virtio_and_msix_caps() {
    let mut d = driver();
    let mut found = Vec::new();
    let mut ptr = d.dev.read_config_register(13) as usize & 0xff;
    while ptr != 0 && found.len() < 16 {
        let dword = d.dev.read_config_register(ptr / 4);
        let id = dword as u8;
        if id == CAP_ID_VENDOR {
            let cfg_type = (dword >> 24) as u8;
            let bar = d.dev.read_config_register(ptr / 4 + 1) as u8;
            let offset = d.dev.read_config_register(ptr / 4 + 2);
            let length = d.dev.read_config_register(ptr / 4 + 3);
            assert_eq!(bar, 0);
            assert!(u64::from(offset) + u64::from(length) <= BAR0_SIZE);
            if cfg_type == CAP_NOTIFY_CFG {
                assert_eq!(d.dev.read_config_register(ptr / 4 + 4), NOTIFY_OFF_MULTIPLIER);
            }
            found.push(cfg_type);
        } else if id == msix::CAP_ID_MSIX {
            let table_size = ((dword >> 16) & 0x7ff) + 1;
            assert_eq!(table_size, 2, "one queue + config");
            assert_eq!(d.dev.read_config_register(ptr / 4 + 1), MSIX_TABLE_OFFSET as u32);
            assert_eq!(d.dev.read_config_register(ptr / 4 + 2), MSIX_PBA_OFFSET as u32);
            found.push(0x11);
        }
        ptr = (dword >> 8) as usize & 0xff;
    }
    found.sort();
    assert_eq!(found, vec![1, 2, 3, 4, 5, 0x11]);
}

#[test]
fn features_not_offered_are_refused() {
    let mut d = driver();
    d.negotiate(u64::MAX);
    // Sneak in an extra feature bit before FEATURES_OK.
    d.write(0x14, 1, 0);
    d.write(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
    d.write(0x08, 4, 0);
    d.write(0x0c, 4, 1 << 3);
    d.write(0x08, 4, 1);
    d.write(0x0c, 4, 1);
    d.write(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
    assert_eq!(d.status() & STATUS_FEATURES_OK, 0);
}

#[test]
fn missing_version_1_is_refused() {
    let mut d = driver();
    let status = d.negotiate(!VIRTIO_F_VERSION_1);
    assert_eq!(status & STATUS_FEATURES_OK, 0);
}

#[test]
fn queue_size_not_a_power_of_two_is_refused() {
    let mut d = driver();
    d.negotiate(u64::MAX);
    d.setup_msix();
    d.setup_queue(100);
    assert_eq!(d.read(0x1c, 2), 0, "queue must not be enabled");
    assert_ne!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.msis(), vec![(MSI_ADDR, CONFIG_MSI_DATA)]);
}

#[test]
fn rings_outside_guest_memory_are_refused() {
    let mut d = driver();
    d.negotiate(u64::MAX);
    d.tq.desc = 0xffff_0000_0000;
    d.setup_queue(256);
    assert_ne!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn invalid_msix_vector_reads_back_no_vector() {
    let mut d = driver();
    d.negotiate(u64::MAX);
    d.write(0x1a, 2, 7);
    assert_eq!(d.read(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    d.write(0x10, 2, 2);
    assert_eq!(d.read(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
}

#[test]
fn reset_clears_status_and_queue_state() {
    let mut d = driver();
    d.bring_up();
    d.write(0x14, 1, 0);
    assert_eq!(d.status(), 0);
    d.write(0x16, 2, 0);
    assert_eq!(d.read(0x1c, 2), 0);
    assert_eq!(d.read(0x20, 8), 0);
    assert_eq!(d.read(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
}

#[test]
fn masked_vector_is_pending_until_unmasked() {
    let mut d = driver();
    d.bring_up();
    let entry1 = MSIX_TABLE_OFFSET + msix::ENTRY_SIZE;
    d.write(entry1 + 12, 4, 1);
    d.dev.interrupt.signal_used_queue(0);
    assert!(d.msis().is_empty());
    assert_eq!(d.read(MSIX_PBA_OFFSET, 8), 0b10);
    d.write(entry1 + 12, 4, 0);
    assert_eq!(d.msis(), vec![(MSI_ADDR, QUEUE_MSI_DATA)]);
    assert_eq!(d.read(MSIX_PBA_OFFSET, 8), 0);
}

const BAR0_ADDR: u64 = 0xe000_0000;

/// A driver whose device serves queue notifies on an I/O thread.
fn threaded_driver() -> (TestDriver, Arc<TestRegistry>) {
    let mut d = driver();
    let registry = Arc::new(TestRegistry::default());
    let dev = std::mem::replace(
        &mut d.dev,
        VirtioPciDevice::new(Box::new(Rng::new().unwrap()), d.mem.clone(), d.sink.clone()).unwrap(),
    );
    d.dev = dev.with_notifiers(registry.clone());
    d.place_bar0(BAR0_ADDR);
    (d, registry)
}

fn wait_used(d: &TestDriver, want: u16) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if d.tq.used_idx(&d.mem) == want {
            return true;
        }
        thread::sleep(std::time::Duration::from_millis(1));
    }
    false
}

#[test]
fn notifier_is_registered_only_while_active() {
    let (mut d, registry) = threaded_driver();
    assert!(registry.live().is_empty(), "nothing before DRIVER_OK");
    d.bring_up();
    let live: Vec<u64> = registry.live().iter().map(|(a, _)| *a).collect();
    assert_eq!(live, vec![BAR0_ADDR + NOTIFY_OFFSET]);
    d.write(0x14, 1, 0);
    assert!(registry.live().is_empty(), "reset unregisters");
}

#[test]
fn notifier_wakes_the_io_thread_which_completes_and_interrupts() {
    let (mut d, registry) = threaded_driver();
    d.bring_up();
    d.tq.set_desc(&d.mem, 0, 0x20_0000, 64, crate::virtio::queue::testing::DESC_F_WRITE, 0);
    d.tq.push(&d.mem, 0);
    let (_, notifier) = registry.live().remove(0);
    notifier.fire();
    assert!(wait_used(&d, 1), "the I/O thread did not complete the request");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.msis().is_empty() && std::time::Instant::now() < deadline {
        thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(d.msis(), vec![(MSI_ADDR, QUEUE_MSI_DATA)]);
}

#[test]
fn mmio_notify_still_works_with_an_io_thread() {
    let (mut d, _registry) = threaded_driver();
    d.bring_up();
    d.tq.set_desc(&d.mem, 0, 0x20_0000, 64, crate::virtio::queue::testing::DESC_F_WRITE, 0);
    d.tq.push(&d.mem, 0);
    d.notify(0);
    assert_eq!(d.tq.used_idx(&d.mem), 1);
}

#[test]
fn isr_is_set_and_cleared_by_reading() {
    let mut d = driver();
    d.bring_up();
    d.dev.interrupt.signal_config_change();
    assert_eq!(d.read(ISR_CFG_OFFSET, 1), u64::from(ISR_CONFIG));
    assert_eq!(d.read(ISR_CFG_OFFSET, 1), 0);
}

/// The driver's bring-up with MSI-X left disabled, as `pci=nomsi` or firmware does it.
fn bring_up_without_msix(d: &mut TestDriver) -> Arc<RecordingSink> {
    let sink = d.sink.clone();
    d.dev.set_intx_line(IntxLine::unshared(17, sink.clone()));
    assert_ne!(d.negotiate(u64::MAX) & crate::virtio::STATUS_FEATURES_OK, 0);
    d.setup_queue(256);
    d.write(0x14, 1, 0xf);
    sink
}

#[test]
fn without_msix_a_used_buffer_holds_inta_until_the_driver_reads_the_isr() {
    let mut d = driver();
    let sink = bring_up_without_msix(&mut d);
    serve_one(&mut d, 0);
    assert_eq!(*sink.lines.lock().unwrap(), [(17, true)]);
    assert!(sink.msis.lock().unwrap().is_empty(), "no MSI while MSI-X is disabled");
    // A second interrupt before the read keeps the one level.
    serve_one(&mut d, 1);
    assert_eq!(*sink.lines.lock().unwrap(), [(17, true)]);
    assert_eq!(d.read(ISR_CFG_OFFSET, 1), u64::from(ISR_QUEUE));
    assert_eq!(*sink.lines.lock().unwrap(), [(17, true), (17, false)]);
}

#[test]
fn intx_disable_holds_the_line_low_and_enabling_msix_drops_it() {
    let mut d = driver();
    let sink = bring_up_without_msix(&mut d);
    let command = |d: &mut TestDriver, extra: u16| {
        let value = COMMAND_MEMORY | COMMAND_BUS_MASTER | extra;
        d.dev.write_config_register(1, 0, &value.to_le_bytes());
    };
    command(&mut d, 1 << 10);
    d.dev.interrupt.signal_config_change();
    assert!(sink.lines.lock().unwrap().is_empty(), "INTx disabled");
    command(&mut d, 0);
    assert_eq!(*sink.lines.lock().unwrap(), [(17, true)], "the pending ISR asserts");
    d.setup_msix();
    assert_eq!(*sink.lines.lock().unwrap(), [(17, true), (17, false)], "MSI-X took over");
    d.dev.interrupt.signal_config_change();
    assert_eq!(sink.lines.lock().unwrap().len(), 2, "interrupts go through MSI-X now");
}

#[test]
fn a_reset_drops_inta() {
    let mut d = driver();
    let sink = bring_up_without_msix(&mut d);
    d.dev.interrupt.signal_config_change();
    d.write(0x14, 1, 0);
    assert_eq!(*sink.lines.lock().unwrap(), [(17, true), (17, false)]);
}

#[test]
fn a_snapshot_from_before_intx_restores_with_inta_and_an_isr_bit_left_raises_it() {
    let mut d = driver();
    d.bring_up();
    let mut saved: VirtioPciState = state::decode("t", &d.dev.save_state().unwrap()).unwrap();
    saved.config[15] &= !0xff00; // what devices without a pin saved
    saved.msix.isr = ISR_CONFIG;
    let mut fresh = fresh_rng(&d);
    let sink = Arc::new(RecordingSink::default());
    fresh.set_intx_line(IntxLine::unshared(19, sink.clone()));
    let msix_reg = fresh.msix_control_reg;
    saved.config[msix_reg] &= !(u32::from(msix::CONTROL_ENABLE) << 16);
    saved.msix.table.enabled = false;
    fresh.restore_state(&state::encode("t", &saved).unwrap()).unwrap();
    assert_eq!(fresh.read_config_register(15) >> 8 & 0xff, 1, "INTA#");
    assert_eq!(*sink.lines.lock().unwrap(), [(19, true)], "the saved ISR bit, MSI-X off");
}

fn fresh_rng(d: &TestDriver) -> VirtioPciDevice {
    VirtioPciDevice::new(Box::new(Rng::new().unwrap()), d.mem.clone(), d.sink.clone()).unwrap()
}

fn serve_one(d: &mut TestDriver, head: u16) {
    d.tq.set_desc(&d.mem, head, 0x20_0000, 64, crate::virtio::queue::testing::DESC_F_WRITE, 0);
    d.tq.push(&d.mem, head);
    d.notify(0);
}

#[test]
fn transport_registers_msix_and_queue_positions_survive_a_restore() {
    let mut d = driver();
    d.bring_up();
    serve_one(&mut d, 0);
    serve_one(&mut d, 1);
    let entry1 = MSIX_TABLE_OFFSET + msix::ENTRY_SIZE;
    serve_one(&mut d, 2);
    d.write(entry1 + 12, 4, 1); // mask the queue vector: the next interrupt is pending
    d.dev.interrupt.signal_used_queue(0);
    let saved = d.dev.save_state().unwrap();
    let decoded: VirtioPciState = state::decode("t", &saved).unwrap();
    assert_eq!(decoded.live_queues[0].next_used, 3);
    assert!(decoded.msix.table.pending[1]);

    let mut fresh = fresh_rng(&d);
    fresh.restore_state(&saved).unwrap();
    assert_eq!(fresh.save_state().unwrap(), saved);
    d.dev = fresh;
    d.sink.msis.lock().unwrap().clear();
    assert_eq!(d.status(), 0xf);
    assert_eq!(d.read(MSIX_PBA_OFFSET, 8), 0b10);
    d.write(entry1 + 12, 4, 0);
    assert_eq!(d.msis(), vec![(MSI_ADDR, QUEUE_MSI_DATA)], "pending vector sent on unmask");
    serve_one(&mut d, 3);
    assert_eq!(d.tq.used_idx(&d.mem), 4);
    assert_eq!(d.tq.used_elem(&d.mem, 3).0, 3);
}

#[test]
fn hostile_transport_state_is_refused_and_the_device_is_unchanged() {
    let mut d = driver();
    d.bring_up();
    serve_one(&mut d, 0);
    let good: VirtioPciState = state::decode("t", &d.dev.save_state().unwrap()).unwrap();
    let mut fresh = fresh_rng(&d);
    let before = fresh.save_state().unwrap();
    // Each case with what the error must name (in any case: a message is not an API).
    let mut cases = Vec::new();
    let mut s = good.clone();
    s.queues[0].size = 100;
    s.live_queues[0].size = 100;
    cases.push((s, "Queue 0 registers are unusable: Size 100 is invalid"));
    let mut s = good.clone();
    s.queues[0].desc = 0xffff_0000_0000;
    s.live_queues[0].desc_table = 0xffff_0000_0000;
    cases.push((s, "Queue 0 registers are unusable: Rings are outside guest memory"));
    let mut s = good.clone();
    s.live_queues[0].next_avail = 300;
    cases.push((s, "Queue 0 cannot be restored: Saved queue has 299 buffers in flight"));
    let mut s = good.clone();
    s.msix.queue_vectors[0] = 9;
    cases.push((s, "MSI-X vector out of range"));
    let mut s = good.clone();
    s.msix.table.entries.push([0; 4]);
    // The reason after the colon is pci::msix's.
    cases.push((s, "MSI-X table is invalid: "));
    let mut s = good.clone();
    s.device_type = crate::virtio::TYPE_BLOCK;
    cases.push((s, "saved from another kind of device"));
    let mut s = good.clone();
    s.config[0] = 0x1234_5678;
    cases.push((s, "configuration register 0"));
    for (i, (case, names)) in cases.into_iter().enumerate() {
        let bytes = state::encode("t", &case).unwrap();
        let r = fresh.restore_state(&bytes);
        assert!(
            matches!(r, Err(StateError::Invalid { .. } | StateError::Rejected { .. })),
            "case {i}: {r:?}"
        );
        let message = crate::error_chain(&r.unwrap_err()).to_lowercase();
        assert!(
            message.contains(&names.to_lowercase()),
            "case {i} does not say {names:?}: {message}"
        );
        assert_eq!(fresh.save_state().unwrap(), before, "case {i} changed the device");
    }
    assert!(matches!(fresh.restore_state(&[1, 2, 3]), Err(StateError::Codec { .. })));
}

#[test]
fn requests_notified_while_quiesced_complete_after_resume() {
    let (mut d, registry) = threaded_driver();
    d.bring_up();
    d.dev.quiesce();
    assert!(registry.live().is_empty(), "quiesce stops and unregisters the I/O threads");
    d.tq.set_desc(&d.mem, 0, 0x20_0000, 64, crate::virtio::queue::testing::DESC_F_WRITE, 0);
    d.tq.push(&d.mem, 0);
    d.notify(0); // an MMIO notify while quiesced is not served either
    thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(d.tq.used_idx(&d.mem), 0, "nothing touched guest memory while quiesced");
    d.dev.resume();
    assert!(wait_used(&d, 1), "the request completes after resume");
    assert_eq!(registry.live().len(), 1, "the I/O thread is back");
}

const MMIO32: PciWindow = PciWindow::new(0xc000_0000, 0x2000_0000);
/// A 64-bit window from 1 TiB up to a guest physical-address limit of 46 bits.
const PHYS_LIMIT: u64 = 1 << 46;
const MMIO64: PciWindow = PciWindow::new(0x100_0000_0000, PHYS_LIMIT - 0x100_0000_0000);

fn pci_root(mmio64: PciWindow) -> Arc<Mutex<PciRoot>> {
    let root = PciRoot::new(PciRootConfig {
        host_bridge: Box::new(PciHostBridge::new(0x8086, 0x29c0)),
        mmio32: MMIO32,
        mmio64,
        io: PciWindow::EMPTY,
        ecam_base: 0xe000_0000,
        bus_count: 1,
        memory: None,
        intx: None,
    })
    .unwrap();
    Arc::new(Mutex::new(root))
}

/// A virtio-rng function, brought up with notifiers and MSI-X, then put on a PCI root that
/// places its register BAR at the start of a window; the test plays the firmware.
struct OnRoot {
    d: TestDriver,
    registry: Arc<TestRegistry>,
    root: Arc<Mutex<PciRoot>>,
    bdf: Bdf,
}

impl OnRoot {
    fn new(mmio64: PciWindow) -> OnRoot {
        let (mut d, registry) = threaded_driver();
        d.bring_up();
        let stand_in = fresh_rng(&d);
        let dev = std::mem::replace(&mut d.dev, stand_in);
        let root = pci_root(mmio64);
        let bdf = root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        OnRoot { d, registry, root, bdf }
    }

    fn config_write(&self, reg: usize, value: u32) {
        self.root.lock().unwrap().config_write(self.bdf, reg, 0, &value.to_le_bytes());
    }

    fn config_read(&self, reg: usize) -> u32 {
        self.root.lock().unwrap().config_read(self.bdf, reg)
    }

    fn command(&self, value: u16) {
        self.root.lock().unwrap().config_write(self.bdf, 1, 0, &value.to_le_bytes());
    }

    /// Writes the 64-bit register BAR as firmware does: low half, then high half.
    fn move_bar(&self, addr: u64) {
        self.config_write(4, addr as u32);
        self.config_write(5, (addr >> 32) as u32);
    }

    /// Addresses of the notifiers registered now.
    fn notifiers(&self) -> Vec<u64> {
        self.registry.live().iter().map(|(a, _)| *a).collect()
    }

    /// Every address a notifier was ever registered at, dropped ones included.
    fn every_registration(&self) -> Vec<u64> {
        self.registry.registrations.lock().unwrap().iter().map(|r| r.addr).collect()
    }

    /// A guest read at `addr`: None when no BAR decodes it.
    fn read(&self, addr: u64, len: usize) -> Option<u64> {
        let mut d = [0u8; 8];
        mmio_read(&self.root, addr, &mut d[..len]).then(|| u64::from_le_bytes(d))
    }

    /// A guest write at `addr`: false when no BAR decodes it.
    fn write(&self, addr: u64, len: usize, value: u64) -> bool {
        mmio_write(&self.root, addr, &value.to_le_bytes()[..len])
    }

    /// Queues one request on queue 0 (not notified).
    fn push_request(&mut self, head: u16) {
        let d = &mut self.d;
        d.tq.set_desc(&d.mem, head, 0x20_0000, 64, crate::virtio::queue::testing::DESC_F_WRITE, 0);
        d.tq.push(&d.mem, head);
    }
}

const SEEN_BY_ROOT: u64 = MMIO64.start;

#[test]
fn moving_the_notify_bar_moves_the_guest_notifiers() {
    let mut r = OnRoot::new(MMIO64);
    assert_eq!(r.notifiers(), [SEEN_BY_ROOT + NOTIFY_OFFSET], "where the root placed the BAR");
    assert_eq!(r.every_registration()[0], BAR0_ADDR + NOTIFY_OFFSET, "before the root");
    // SeaBIOS puts 64-bit BARs below 4 GiB while the 32-bit window has room.
    r.move_bar(0xc000_0000);
    assert_eq!(r.notifiers(), [0xc000_0000 + NOTIFY_OFFSET], "the old address is unregistered");
    assert!(!r.write(SEEN_BY_ROOT + NOTIFY_OFFSET, 2, 0), "the old notify address is gone");
    r.push_request(0);
    r.registry.live()[0].1.fire();
    assert!(wait_used(&r.d, 1), "the notifier at the new address serves the queue");
    r.push_request(1);
    assert!(r.write(0xc000_0000 + NOTIFY_OFFSET, 2, 0), "a notify exit there reaches it too");
    assert!(wait_used(&r.d, 2));
    for addr in r.every_registration().into_iter().skip(1) {
        assert!(
            [MMIO32, MMIO64].iter().any(|w| addr >= w.start && addr < w.start + w.size),
            "a notifier was registered outside the windows at {addr:#x}"
        );
    }
}

#[test]
fn decoding_off_takes_the_notifiers_away_until_it_is_on_again_at_the_new_address() {
    let r = OnRoot::new(MMIO64);
    r.command(COMMAND_BUS_MASTER);
    assert!(r.notifiers().is_empty(), "memory decoding off: no notifier");
    assert!(!r.write(SEEN_BY_ROOT + NOTIFY_OFFSET, 2, 0), "nor a notify exit");
    // Linux and OVMF move a BAR with decoding off, then turn it on.
    r.move_bar(0x180_0000_0000);
    assert!(r.notifiers().is_empty(), "still off");
    r.command(COMMAND_BUS_MASTER | COMMAND_MEMORY);
    assert_eq!(r.notifiers(), [0x180_0000_0000 + NOTIFY_OFFSET]);
    assert_eq!(
        r.every_registration(),
        [BAR0_ADDR, SEEN_BY_ROOT, 0x180_0000_0000].map(|a| a + NOTIFY_OFFSET),
        "before the root, the root's place, the new place: none in between"
    );
}

#[test]
fn sizing_the_register_bar_with_decoding_on_registers_nothing_at_the_sizing_address() {
    // The BAR in the 32-bit window, as SeaBIOS finds it when it sizes without turning
    // decoding off.
    let r = OnRoot::new(PciWindow::EMPTY);
    assert_eq!(r.notifiers(), [MMIO32.start + NOTIFY_OFFSET]);
    let old_low = r.config_read(4);
    r.config_write(4, u32::MAX);
    assert_eq!(r.config_read(4), 0xffff_c004, "16 KiB, 64-bit");
    assert!(r.notifiers().is_empty(), "0xffffc000 is no place for a notifier");
    r.config_write(4, old_low);
    r.config_write(5, u32::MAX);
    assert_eq!(r.config_read(5), u32::MAX);
    assert!(r.notifiers().is_empty(), "nor is 0xffffffff_c0000000");
    r.config_write(5, 0);
    assert_eq!(r.notifiers(), [MMIO32.start + NOTIFY_OFFSET], "back where it was");
    // Both halves sized, then the firmware's own address written.
    r.config_write(4, u32::MAX);
    r.config_write(5, u32::MAX);
    assert_eq!(r.read(0xffff_ffff_ffff_c000 + MSIX_TABLE_OFFSET, 4), None);
    r.move_bar(0xd000_0000);
    assert_eq!(r.notifiers(), [0xd000_0000 + NOTIFY_OFFSET]);
    assert_eq!(
        r.every_registration(),
        [BAR0_ADDR, MMIO32.start, MMIO32.start, MMIO32.start, 0xd000_0000]
            .map(|a| a + NOTIFY_OFFSET),
        "before the root, the root's place, after each half was sized, the new place"
    );
}

#[test]
fn msix_table_and_pba_answer_at_the_moved_bar_and_not_at_the_old_one() {
    let r = OnRoot::new(MMIO64);
    let data_of_vector_1 = MSIX_TABLE_OFFSET + msix::ENTRY_SIZE + 8;
    assert_eq!(r.read(SEEN_BY_ROOT + data_of_vector_1, 4), Some(u64::from(QUEUE_MSI_DATA)));
    let moved = 0x3f00_0000_0000;
    r.move_bar(moved);
    assert_eq!(r.read(SEEN_BY_ROOT + data_of_vector_1, 4), None, "the old table is gone");
    assert_eq!(r.read(moved + data_of_vector_1, 4), Some(u64::from(QUEUE_MSI_DATA)));
    assert!(r.write(moved + data_of_vector_1, 4, 0x52), "the guest reprograms the vector");
    let mask_of_vector_1 = MSIX_TABLE_OFFSET + msix::ENTRY_SIZE + 12;
    assert!(r.write(moved + mask_of_vector_1, 4, 1));
    r.d.sink.msis.lock().unwrap().clear();
    r.d.dev.interrupt.signal_used_queue(0); // the old transport: not on the root
    assert_eq!(r.read(moved + MSIX_PBA_OFFSET, 8), Some(0), "this PBA belongs to the moved one");
    assert_eq!(r.read(SEEN_BY_ROOT + MSIX_PBA_OFFSET, 8), None);
    // A queue interrupt on the moved function: masked, so pending in the PBA at the new
    // place; unmasked through the new place, it is sent with the new data.
    let mut r = r;
    r.push_request(0);
    assert!(r.write(moved + NOTIFY_OFFSET, 2, 0));
    assert!(wait_used(&r.d, 1));
    assert_eq!(r.read(moved + MSIX_PBA_OFFSET, 8), Some(0b10));
    assert!(r.d.msis().is_empty(), "masked");
    assert!(r.write(moved + mask_of_vector_1, 4, 0));
    assert_eq!(r.d.msis(), [(MSI_ADDR, 0x52)]);
}

#[test]
fn a_64_bit_bar_just_below_the_physical_address_limit_keeps_notifiers_and_msix() {
    let r = OnRoot::new(MMIO64);
    let top = PHYS_LIMIT - BAR0_SIZE;
    r.move_bar(top);
    assert_eq!(r.notifiers(), [top + NOTIFY_OFFSET]);
    assert_eq!(r.read(top + MSIX_TABLE_OFFSET + 8, 4), Some(u64::from(CONFIG_MSI_DATA)));
    r.move_bar(PHYS_LIMIT);
    assert!(r.notifiers().is_empty(), "beyond the limit (outside every window)");
    assert_eq!(r.read(PHYS_LIMIT + MSIX_TABLE_OFFSET, 4), None);
}

#[test]
fn restore_through_the_root_registers_the_notifiers_at_the_saved_bar_address() {
    for saved_at in [SEEN_BY_ROOT, 0x180_0000_0000] {
        let mut r = OnRoot::new(MMIO64);
        r.move_bar(saved_at);
        let saved = r.root.lock().unwrap().save_function(r.bdf).unwrap();
        let registry = Arc::new(TestRegistry::default());
        let fresh = pci_root(MMIO64);
        let dev = fresh_rng(&r.d).with_notifiers(registry.clone());
        let bdf = fresh.lock().unwrap().add_device(Box::new(dev)).unwrap();
        assert!(registry.live().is_empty(), "a fresh device is not active");
        fresh.lock().unwrap().restore_function(bdf, &saved).unwrap();
        let live: Vec<u64> = registry.live().iter().map(|(a, _)| *a).collect();
        assert_eq!(live, [saved_at + NOTIFY_OFFSET], "saved at {saved_at:#x}");
        r.push_request(0);
        registry.live()[0].1.fire();
        assert!(wait_used(&r.d, 1), "the restored I/O thread serves the queue");
    }
}

/// Every kind of virtio function Hutch builds.
fn every_virtio_function() -> Vec<(&'static str, VirtioPciDevice)> {
    use crate::virtio::input::Input;
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let raw = disk::RawFile::open(file.path(), true).unwrap();
    let block = crate::virtio::block::Block::new(Box::new(raw), true, "ids".into()).unwrap();
    let devices: Vec<(&str, Box<dyn VirtioDevice>)> = vec![
        ("rng", Box::new(Rng::new().unwrap())),
        ("block", Box::new(block)),
        ("keyboard", Box::new(Input::keyboard().unwrap())),
        ("tablet", Box::new(Input::tablet().unwrap())),
        ("mouse", Box::new(Input::mouse().unwrap())),
    ];
    let d = driver();
    devices
        .into_iter()
        .map(|(name, dev)| {
            (name, VirtioPciDevice::new(dev, d.mem.clone(), d.sink.clone()).unwrap())
        })
        .collect()
}

#[test]
fn every_virtio_function_has_the_ids_ovmf_virtio10_binds_to() {
    for (name, mut dev) in every_virtio_function() {
        let ids = dev.read_config_register(0);
        assert_eq!(ids as u16, 0x1af4, "{name}: vendor");
        assert!((0x1040..=0x107f).contains(&(ids >> 16)), "{name}: a modern device id");
        assert!(dev.read_config_register(2) & 0xff >= 1, "{name}: RevisionID >= 1");
        let subsystem = dev.read_config_register(11);
        assert_eq!(subsystem as u16, 0x1af4, "{name}: subsystem vendor");
        assert!(subsystem >> 16 >= 0x40, "{name}: SubsystemID >= 0x40");
        assert_ne!(dev.read_config_register(1) & 1 << 20, 0, "{name}: a capability list");
    }
}

#[test]
fn without_a_rom_the_rom_bar_reads_0_and_the_interrupt_line_is_storage_under_a_fixed_pin() {
    for (name, mut dev) in every_virtio_function() {
        dev.write_config_register(12, 0, &u32::MAX.to_le_bytes());
        assert_eq!(dev.read_config_register(12), 0, "{name}: no ROM, nothing to size");
        dev.write_config_register(15, 0, &[0x0b, 0x01]);
        assert_eq!(dev.read_config_register(15) & 0xffff, 0x010b, "{name}: line kept, pin A");
    }
}

#[test]
fn with_bus_mastering_off_no_queue_is_processed_until_it_is_on_again() {
    let mut r = OnRoot::new(MMIO64);
    r.command(COMMAND_MEMORY);
    assert!(r.notifiers().is_empty(), "no I/O thread may touch guest memory");
    r.push_request(0);
    assert!(r.write(SEEN_BY_ROOT + NOTIFY_OFFSET, 2, 0), "the notify still decodes");
    thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(r.d.tq.used_idx(&r.d.mem), 0, "but the queue is left alone");
    r.d.sink.msis.lock().unwrap().clear();
    r.command(COMMAND_MEMORY | COMMAND_BUS_MASTER);
    assert_eq!(r.d.tq.used_idx(&r.d.mem), 1, "served once bus mastering is back");
    assert_eq!(r.d.msis(), [(MSI_ADDR, QUEUE_MSI_DATA)]);
    assert_eq!(r.notifiers(), [SEEN_BY_ROOT + NOTIFY_OFFSET], "the I/O thread is back");
    r.push_request(1);
    r.registry.live()[0].1.fire();
    assert!(wait_used(&r.d, 2));
}

#[test]
fn an_interrupt_raised_with_bus_mastering_off_pends_and_is_sent_once_it_is_on() {
    let mut d = driver();
    d.bring_up();
    d.dev.write_config_register(1, 0, &COMMAND_MEMORY.to_le_bytes());
    d.dev.interrupt.signal_config_change();
    assert!(d.msis().is_empty(), "an MSI is a memory write: not without bus mastering");
    assert_eq!(d.read(MSIX_PBA_OFFSET, 8), 0b01, "the config vector pends");
    d.dev.write_config_register(1, 0, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
    assert_eq!(d.msis(), [(MSI_ADDR, CONFIG_MSI_DATA)]);
    assert_eq!(d.read(MSIX_PBA_OFFSET, 8), 0);
}

#[test]
fn a_function_saved_with_bus_mastering_off_serves_its_queues_only_once_it_is_on() {
    let (mut d, _) = threaded_driver();
    d.bring_up();
    d.dev.write_config_register(1, 0, &COMMAND_MEMORY.to_le_bytes());
    d.tq.set_desc(&d.mem, 0, 0x20_0000, 64, crate::virtio::queue::testing::DESC_F_WRITE, 0);
    d.tq.push(&d.mem, 0);
    d.notify(0);
    let saved = d.dev.save_state().unwrap();
    let registry = Arc::new(TestRegistry::default());
    d.dev = fresh_rng(&d).with_notifiers(registry.clone());
    d.dev.restore_state(&saved).unwrap();
    d.dev.bar_decoded(0, Some(BAR0_ADDR));
    d.dev.resume();
    thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(d.tq.used_idx(&d.mem), 0, "restored without bus mastering: left alone");
    assert!(registry.live().is_empty());
    d.dev.write_config_register(1, 0, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
    assert_eq!(d.tq.used_idx(&d.mem), 1);
    assert_eq!(registry.live().len(), 1);
}

/// The offset of capability `id` in `r`'s configuration space, walking the list.
fn capability(r: &OnRoot, id: u8) -> Option<usize> {
    let mut ptr = r.config_read(13) as usize & 0xfc;
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        let dword = r.config_read(ptr / 4);
        if dword as u8 == id {
            return Some(ptr);
        }
        ptr = (dword >> 8) as usize & 0xfc;
    }
    None
}

#[test]
fn hostile_config_accesses_do_not_panic_or_change_read_only_fields() {
    let r = OnRoot::new(MMIO64);
    let msix_control_reg = capability(&r, msix::CAP_ID_MSIX).unwrap() / 4;
    let pci_cfg = r.d.dev.pci_cfg_reg;
    // What a guest may change: command (I/O, memory, bus master, INTx disable), the BAR's
    // address bits, the interrupt line, MSI-X enable and function mask, and the PCI_CFG
    // capability's BAR, offset, length and data. No ROM to place.
    let writable = |reg: usize| match reg {
        1 => 0x0000_0407,
        4 => 0xffff_c000,
        5 => u32::MAX,
        15 => 0xff,
        r if r == msix_control_reg => 0xc000_0000,
        r if r == pci_cfg + 1 => 0xff,
        r if (pci_cfg + 2..pci_cfg + 5).contains(&r) => u32::MAX,
        _ => 0,
    };
    let before: Vec<u32> = (0..64).map(|reg| r.config_read(reg)).collect();
    let mut ports = PciConfigIo::new(r.root.clone());
    let mut ecam = PciConfigMmio::new(r.root.clone());
    let function = u64::from(r.bdf.device()) << 15;
    let cf8 = |reg: u64| (0x8000_0000 | function >> 4 | reg << 2) as u32;
    let mut sink = [0u8; 8];
    // Every byte offset with every length, odd and oversized ones too; all-ones, a pattern,
    // then zeroes; reads in between. ECAM's extended space and the 0xCF8 latch too.
    for value in [u64::MAX, 0xa55a_5aa5_1234_8765, 0] {
        let bytes = value.to_le_bytes();
        for offset in 0..0x100u64 {
            for len in [1, 2, 3, 4, 8] {
                ports.write(0, &cf8(offset / 4).to_le_bytes());
                ports.write(4 + offset % 4, &bytes[..len]);
                ports.read(4 + offset % 4, &mut sink[..len]);
                ports.write(offset % 8, &bytes[..len]);
                ecam.write(function + offset, &bytes[..len]);
                ecam.read(function + offset, &mut sink[..len]);
            }
        }
        for offset in (0x100..0x1000).step_by(0x3d) {
            ecam.write(function + offset, &bytes[..4]);
            ecam.read(function + offset, &mut sink[..4]);
            // A dword across a dword boundary is no configuration access at all.
            let expected = if offset % 4 == 0 { 0 } else { 0xff };
            assert_eq!(sink[..4], [expected; 4], "extended space at {offset:#x}");
        }
    }
    let after: Vec<u32> = (0..64).map(|reg| r.config_read(reg)).collect();
    for reg in 0..64 {
        let changed = before[reg] ^ after[reg];
        assert_eq!(changed & !writable(reg), 0, "read-only bits of register {reg:#x} changed");
    }
    assert_eq!(after[0], 0x1044_1af4, "vendor and device");
    assert_eq!(after[4] & 0xf, 0b0100, "a 64-bit memory BAR still");
    assert_eq!(after[12], 0, "no ROM");
    // Zeroes were written last: nothing decodes; placed again, the function answers.
    assert_eq!(r.read(SEEN_BY_ROOT, 4), None);
    r.move_bar(SEEN_BY_ROOT);
    r.command(COMMAND_MEMORY | COMMAND_BUS_MASTER);
    assert_eq!(r.read(SEEN_BY_ROOT + 0x12, 2), Some(1), "num_queues: virtio-rng has one");
}

/// The PCI_CFG capability's register, and the driver's selection of an access through it.
fn select_pci_cfg(d: &mut TestDriver, bar: u8, offset: u32, length: u32) -> usize {
    let cap = d.dev.pci_cfg_reg;
    d.dev.write_config_register(cap + 1, 0, &[bar]);
    d.dev.write_config_register(cap + 2, 0, &offset.to_le_bytes());
    d.dev.write_config_register(cap + 3, 0, &length.to_le_bytes());
    cap + 4
}

#[test]
fn the_pci_cfg_capability_reads_writes_and_notifies_through_configuration_space() {
    let mut d = driver();
    let cap = d.dev.pci_cfg_reg;
    let header = d.dev.read_config_register(cap);
    assert_eq!((header as u8, header >> 16), (CAP_ID_VENDOR, 0x0514), "20 bytes, type 5");
    let data = select_pci_cfg(&mut d, 0, 0x12, 2);
    assert_eq!(d.dev.read_config_register(data), 1, "num_queues");
    // SeaBIOS's bring-up through it: status bytes, one at a time.
    let data = select_pci_cfg(&mut d, 0, 0x14, 1);
    d.dev.write_config_register(data, 0, &[STATUS_ACKNOWLEDGE]);
    assert_eq!(d.status(), STATUS_ACKNOWLEDGE);
    assert_eq!(d.dev.read_config_register(data), u32::from(STATUS_ACKNOWLEDGE));
    d.bring_up();
    d.tq.set_desc(&d.mem, 0, 0x20_0000, 64, crate::virtio::queue::testing::DESC_F_WRITE, 0);
    d.tq.push(&d.mem, 0);
    let data = select_pci_cfg(&mut d, 0, NOTIFY_OFFSET as u32, 2);
    d.dev.write_config_register(data, 0, &0u16.to_le_bytes());
    assert_eq!(d.tq.used_idx(&d.mem), 1, "a notify through configuration space");
}

#[test]
fn pci_cfg_selections_a_driver_may_not_make_are_ignored() {
    let mut d = driver();
    d.bring_up();
    let bad = [
        (2, 0x14, 1),
        (0, 0x14, 3),
        (0, 0x13, 2),
        (0, 0x12, 8),
        (0, BAR0_SIZE as u32, 1),
        (0, BAR0_SIZE as u32 - 2, 4),
        (0, u32::MAX, 1),
        (0xff, 0x14, 0),
    ];
    for (bar, offset, length) in bad {
        let data = select_pci_cfg(&mut d, bar, offset, length);
        assert_eq!(d.dev.read_config_register(data), 0, "{bar} {offset:#x} {length}");
        d.dev.write_config_register(data, 0, &0u32.to_le_bytes());
        assert_eq!(d.status(), 0xf, "no reset through {bar} {offset:#x} {length}");
    }
}

#[test]
fn state_saved_before_the_pci_cfg_capability_restores_with_it() {
    let mut d = driver();
    d.bring_up();
    let mut old: VirtioPciState = state::decode("t", &d.dev.save_state().unwrap()).unwrap();
    let cap = d.dev.pci_cfg_reg;
    let msix = d.dev.msix_control_reg;
    old.config[cap..cap + 5].fill(0);
    old.config[msix] &= !0xff00;
    let mut fresh = fresh_rng(&d);
    fresh.restore_state(&state::encode("t", &old).unwrap()).unwrap();
    assert_eq!(fresh.read_config_register(msix) >> 8 & 0xff, cap as u32 * 4, "linked");
    assert_eq!(fresh.read_config_register(cap) >> 24, u32::from(CAP_PCI_CFG));
    d.dev = fresh;
    assert_eq!(d.status(), 0xf);
    serve_one(&mut d, 0);
    assert_eq!(d.tq.used_idx(&d.mem), 1);
}

#[test]
fn a_device_with_its_own_thread_delivers_nothing_without_bus_mastering() {
    use crate::virtio::input::Input;
    use crate::virtio::queue::testing::{TestQueue, DESC_F_WRITE};
    let input = Input::keyboard().unwrap();
    let keys = input.handle();
    let mut d = TestDriver::new(Box::new(input));
    d.tq = TestQueue::new(64, 0x10_0000);
    d.bring_up_queues(&[&TestQueue::new(64, 0x18_0000)]);
    for i in 0..4 {
        d.tq.set_desc(&d.mem, i, 0x20_0000 + 8 * u64::from(i), 8, DESC_F_WRITE, 0);
        d.tq.push(&d.mem, i);
    }
    d.notify(0);
    d.dev.write_config_register(1, 0, &COMMAND_MEMORY.to_le_bytes());
    keys.send(&[display::InputEvent::Key { code: 30, down: true }]);
    thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(d.tq.used_idx(&d.mem), 0, "the event thread wrote into guest memory");
    d.dev.write_config_register(1, 0, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
    assert!(wait_used(&d, 2), "the key and its SYN_REPORT once bus mastering is back");
}
