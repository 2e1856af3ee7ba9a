//! A test "driver" that brings a [`VirtioPciDevice`] up through its registers the way
//! Linux's virtio_pci_modern does, with a recording interrupt sink.
#![allow(clippy::unwrap_used)] // Test scaffolding fails loudly on purpose.

use super::*;
use crate::hypervisor::{self, GuestNotifier};
use crate::virtio::queue::testing::{memory, TestQueue};
use crate::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER};

pub const MSI_ADDR: u64 = 0xfee0_0000;
pub const COMMAND_MEMORY: u16 = crate::pci::config::COMMAND_MEMORY_SPACE as u16;
pub const COMMAND_BUS_MASTER: u16 = crate::pci::config::COMMAND_BUS_MASTER as u16;
pub const QUEUE_MSI_DATA: u32 = 0x41;
pub const CONFIG_MSI_DATA: u32 = 0x40;

#[derive(Default)]
pub struct RecordingSink {
    pub msis: Mutex<Vec<(u64, u32)>>,
    /// Every change of an interrupt line: (GSI, level).
    pub lines: Mutex<Vec<(u32, bool)>>,
}

impl InterruptSink for RecordingSink {
    fn set_irq_line(&self, gsi: u32, active: bool) -> hypervisor::Result<()> {
        self.lines.lock().unwrap().push((gsi, active));
        Ok(())
    }
    fn signal_msi(&self, address: u64, data: u32) -> hypervisor::Result<()> {
        self.msis.lock().unwrap().push((address, data));
        Ok(())
    }
}

/// A notifier the test fires by hand, standing in for a hypervisor's (an ioeventfd).
#[derive(Default)]
pub struct TestNotifier {
    pending: Mutex<bool>,
    cond: std::sync::Condvar,
}

impl TestNotifier {
    pub fn fire(&self) {
        *self.pending.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

/// What the registry handed out: address and notifier, dropped ones included.
pub struct Registration {
    pub addr: u64,
    pub notifier: Arc<TestNotifier>,
    pub live: Arc<AtomicBool>,
}

struct Handed(Arc<TestNotifier>, Arc<AtomicBool>);

impl GuestNotifier for Handed {
    fn wait(&self) -> hypervisor::Result<()> {
        let mut pending = self.0.pending.lock().unwrap();
        while !*pending {
            pending = self.0.cond.wait(pending).unwrap();
        }
        *pending = false;
        Ok(())
    }
    fn wake(&self) {
        self.0.fire();
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        self.1.store(false, Ordering::Release);
    }
}

#[derive(Default)]
pub struct TestRegistry {
    pub registrations: Mutex<Vec<Registration>>,
}

impl TestRegistry {
    /// The notifiers still registered, by address.
    pub fn live(&self) -> Vec<(u64, Arc<TestNotifier>)> {
        let regs = self.registrations.lock().unwrap();
        regs.iter()
            .filter(|r| r.live.load(Ordering::Acquire))
            .map(|r| (r.addr, r.notifier.clone()))
            .collect()
    }
}

impl NotifierRegistry for TestRegistry {
    fn register_notifier(
        &self,
        addr: u64,
        _len: u32,
    ) -> hypervisor::Result<Box<dyn GuestNotifier>> {
        let notifier = Arc::new(TestNotifier::default());
        let live = Arc::new(AtomicBool::new(true));
        self.registrations.lock().unwrap().push(Registration {
            addr,
            notifier: notifier.clone(),
            live: live.clone(),
        });
        Ok(Box::new(Handed(notifier, live)))
    }
}

pub struct TestDriver {
    pub dev: VirtioPciDevice,
    pub mem: GuestMemory,
    pub sink: Arc<RecordingSink>,
    pub tq: TestQueue,
}

impl TestDriver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = memory(4);
        let sink = Arc::new(RecordingSink::default());
        let mut dev = VirtioPciDevice::new(device, mem.clone(), sink.clone()).unwrap();
        // Bus mastering on, as the PCI root leaves every function it adds.
        dev.write_config_register(1, 0, &COMMAND_BUS_MASTER.to_le_bytes());
        TestDriver { dev, mem, sink, tq: TestQueue::new(256, 0x10_0000) }
    }

    /// Places the register BAR at `addr` and turns on memory decoding and bus mastering
    /// (what firmware or Linux does), then tells the device it decodes there, as the PCI
    /// root would.
    pub fn place_bar0(&mut self, addr: u64) {
        let bar = self.dev.regs_bar;
        let reg = 4 + usize::from(bar);
        self.dev.write_config_register(reg, 0, &(addr as u32 | 0b100).to_le_bytes());
        self.dev.write_config_register(reg + 1, 0, &((addr >> 32) as u32).to_le_bytes());
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER;
        self.dev.write_config_register(1, 0, &command.to_le_bytes());
        self.dev.bar_decoded(bar, Some(addr));
    }

    pub fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        let bar = self.dev.regs_bar;
        self.dev.bar_read(bar, offset, &mut d[..len]);
        u64::from_le_bytes(d)
    }

    pub fn write(&mut self, offset: u64, len: usize, value: u64) {
        let bar = self.dev.regs_bar;
        self.dev.bar_write(bar, offset, &value.to_le_bytes()[..len]);
    }

    pub fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }

    pub fn msis(&self) -> Vec<(u64, u32)> {
        self.sink.msis.lock().unwrap().clone()
    }

    /// Reset, ACK, DRIVER, feature negotiation (`accept` masks the offered features),
    /// FEATURES_OK; returns the status read back after FEATURES_OK.
    pub fn negotiate(&mut self, accept: u64) -> u8 {
        self.write(0x14, 1, 0);
        assert_eq!(self.status(), 0);
        self.write(0x14, 1, u64::from(STATUS_ACKNOWLEDGE));
        self.write(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        self.write(0x00, 4, 0);
        let low = self.read(0x04, 4);
        self.write(0x00, 4, 1);
        let high = self.read(0x04, 4);
        let offered = high << 32 | low;
        let wanted = offered & accept;
        self.write(0x08, 4, 0);
        self.write(0x0c, 4, wanted & 0xffff_ffff);
        self.write(0x08, 4, 1);
        self.write(0x0c, 4, wanted >> 32);
        self.write(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
        self.status()
    }

    /// Enables MSI-X in the capability and programs vector 0 (config) and 1 (queue 0).
    pub fn setup_msix(&mut self) {
        let reg = self.dev.msix_control_reg;
        self.dev.write_config_register(reg, 2, &msix::CONTROL_ENABLE.to_le_bytes());
        for (v, data) in [(0u64, CONFIG_MSI_DATA), (1, QUEUE_MSI_DATA)] {
            let base = MSIX_TABLE_OFFSET + v * msix::ENTRY_SIZE;
            self.write(base, 4, MSI_ADDR & 0xffff_ffff);
            self.write(base + 4, 4, MSI_ADDR >> 32);
            self.write(base + 8, 4, u64::from(data));
            self.write(base + 12, 4, 0);
        }
        self.write(0x10, 2, 0);
        assert_eq!(self.read(0x10, 2), 0);
    }

    /// Programs queue 0 with `size` at the test queue's rings and enables it.
    pub fn setup_queue(&mut self, size: u16) {
        self.write(0x16, 2, 0);
        assert_eq!(self.read(0x18, 2), 256);
        self.write(0x18, 2, u64::from(size));
        self.write(0x1a, 2, 1);
        assert_eq!(self.read(0x1a, 2), 1);
        for (off, addr) in [(0x20, self.tq.desc), (0x28, self.tq.avail), (0x30, self.tq.used)] {
            self.write(off, 4, addr & 0xffff_ffff);
            self.write(off + 4, 4, addr >> 32);
        }
        self.write(0x1c, 2, 1);
    }

    /// Programs queue `index` at `tq`'s rings (its size) on vector 1 and enables it.
    pub fn setup_queue_at(&mut self, index: u16, tq: &TestQueue) {
        self.write(0x16, 2, u64::from(index));
        assert!(self.read(0x18, 2) >= u64::from(tq.size));
        self.write(0x18, 2, u64::from(tq.size));
        self.write(0x1a, 2, 1);
        for (off, addr) in [(0x20, tq.desc), (0x28, tq.avail), (0x30, tq.used)] {
            self.write(off, 4, addr & 0xffff_ffff);
            self.write(off + 4, 4, addr >> 32);
        }
        self.write(0x1c, 2, 1);
    }

    /// Bring-up of a multi-queue device: queue 0 at `self.tq`, queue n at `extra[n - 1]`.
    pub fn bring_up_queues(&mut self, extra: &[&TestQueue]) {
        assert_ne!(self.negotiate(u64::MAX) & STATUS_FEATURES_OK, 0);
        self.setup_msix();
        let tq0 = TestQueue::new(self.tq.size, self.tq.desc);
        self.setup_queue_at(0, &tq0);
        for (i, tq) in extra.iter().enumerate() {
            self.setup_queue_at(i as u16 + 1, tq);
        }
        self.write(0x14, 1, 0xf);
        assert_eq!(self.status(), 0xf);
    }

    /// The whole bring-up with every offered feature; panics unless DRIVER_OK sticks.
    pub fn bring_up(&mut self) {
        assert_ne!(self.negotiate(u64::MAX) & STATUS_FEATURES_OK, 0);
        self.setup_msix();
        self.setup_queue(256);
        self.write(0x14, 1, 0xf);
        assert_eq!(self.status(), 0xf);
    }

    pub fn notify(&mut self, queue: u64) {
        self.write(0x16, 2, queue);
        let off = self.read(0x1e, 2) * u64::from(NOTIFY_OFF_MULTIPLIER);
        self.write(NOTIFY_OFFSET + off, 2, queue);
    }
}
