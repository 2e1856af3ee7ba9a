#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::thread;

use super::testing::*;
use super::*;
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
    assert_eq!(d.dev.read_config_register(15) >> 8 & 0xff, 0, "no INTx pin");
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
    assert_eq!(found, vec![1, 2, 3, 4, 0x11]);
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
fn moving_or_disabling_the_bar_moves_the_notifier() {
    let (mut d, registry) = threaded_driver();
    d.bring_up();
    d.place_bar0(0xd000_0000);
    let live: Vec<u64> = registry.live().iter().map(|(a, _)| *a).collect();
    assert_eq!(live, vec![0xd000_0000 + NOTIFY_OFFSET]);
    d.dev.write_config_register(1, 0, &0u16.to_le_bytes());
    assert!(registry.live().is_empty(), "no memory decoding, no notifier");
}

#[test]
fn isr_is_set_and_cleared_by_reading() {
    let mut d = driver();
    d.bring_up();
    d.dev.interrupt.signal_config_change();
    assert_eq!(d.read(ISR_CFG_OFFSET, 1), u64::from(ISR_CONFIG));
    assert_eq!(d.read(ISR_CFG_OFFSET, 1), 0);
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
fn restore_registers_the_notifier_at_the_saved_bar_address() {
    let (mut d, _) = threaded_driver();
    d.bring_up();
    let saved = d.dev.save_state().unwrap();
    let registry = Arc::new(TestRegistry::default());
    let fresh = fresh_rng(&d).with_notifiers(registry.clone());
    d.dev = fresh;
    d.dev.restore_state(&saved).unwrap();
    let live: Vec<u64> = registry.live().iter().map(|(a, _)| *a).collect();
    assert_eq!(live, vec![BAR0_ADDR + NOTIFY_OFFSET]);
    d.tq.set_desc(&d.mem, 0, 0x20_0000, 64, crate::virtio::queue::testing::DESC_F_WRITE, 0);
    d.tq.push(&d.mem, 0);
    registry.live()[0].1.fire();
    assert!(wait_used(&d, 1), "the restored I/O thread serves the queue");
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
