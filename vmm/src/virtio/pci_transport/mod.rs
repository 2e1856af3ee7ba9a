//! The modern virtio-pci transport (virtio 1.2 section 4.1): one 64-bit memory BAR holding
//! the common configuration, ISR, device configuration, notify region and MSI-X table + PBA,
//! described by vendor-specific capabilities.
//!
//! ```text
//!  BAR0 (16 KiB)  0x0000 common cfg   0x0800 ISR   0x1000 device cfg
//!                 0x2000 notify (queue n at n * 4)  0x3000 MSI-X table  0x3800 MSI-X PBA
//!
//!  mod.rs            VirtioPciDevice: config space, BAR dispatch, status, activation, ISR
//!  common_config.rs  the common configuration registers and each queue's programmed values
//!  notify.rs         notifies: on the vCPU, or per-queue I/O threads woken by notifiers
//!  persist.rs        saved state (VirtioPciState) and its checks
//!  crate::pci::msix  the MSI-X table and PBA
//! ```
//! Interrupts go through MSI-X while the driver enables it; a vector that is masked (entry or
//! function mask) is recorded in the PBA and sent when unmasked, and an interrupt with no
//! vector assigned only sets the ISR bit. With MSI-X disabled (firmware, `pci=nomsi`, older
//! drivers) the function's INTA# follows the ISR: a level held while any ISR bit is set and
//! the command register's INTx disable bit is clear, dropped by the driver's read of the ISR.
//! The board routes INTA# to a GSI (`_PRT`).
//! The VIRTIO_PCI_CAP_PCI_CFG window (the last capability) reaches the register BAR through
//! configuration space, for firmware that cannot map a BAR placed above 4 GiB (SeaBIOS):
//! the driver selects BAR, offset and length, and a read or write of its data field is that
//! access to the BAR.
//!
//! A device with a [RAM BAR](VirtioDevice::ram_bar) (virtio-gpu's boot framebuffer) gets it
//! as BAR 0, 32-bit prefetchable, and the register BAR above moves to BAR 2, the layout of
//! QEMU's virtio-vga: older Linux kernels only look at BAR 0 when evicting the firmware
//! framebuffer. Accesses that reach the RAM BAR (none should: the root maps memory there)
//! read 0 and are ignored.

mod common_config;
mod notify;
mod persist;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, warn};
use virtio_queue::{Queue, QueueT};

use super::{
    device_name, VirtioDevice, VirtioInterrupt, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, TYPE_BLOCK, TYPE_GPU, TYPE_INPUT, TYPE_NET, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};
use crate::devices::bus::lock;
use crate::error_chain;
use crate::hypervisor::{InterruptSink, NotifierRegistry};
use crate::memory::GuestMemory;
use crate::pci::config::{
    CLASS_DISPLAY_OTHER, CLASS_INPUT_OTHER, CLASS_NETWORK_ETHERNET, CLASS_OTHER,
    CLASS_STORAGE_SCSI, COMMAND_REG,
};
use crate::pci::msix::{self, MsixMessage, MsixTable};
use crate::pci::IntxLine;
use crate::pci::{PciBar, PciBarKind, PciConfiguration, PciDevice, PciError, PciHeader};
use crate::state::{self, StateError};
use common_config::QueueConfig;
use notify::QueueThread;
pub use persist::{MsixSaved, QueueRegisters, VirtioPciState};

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device type.
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// "No MSI-X vector" in msix_config / queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

const BAR0_SIZE: u64 = 0x4000;
const COMMON_CFG_OFFSET: u64 = 0x0000;
const COMMON_CFG_SIZE: u64 = 0x38;
const ISR_CFG_OFFSET: u64 = 0x0800;
const ISR_CFG_SIZE: u64 = 4;
pub(crate) const DEVICE_CFG_OFFSET: u64 = 0x1000;
const DEVICE_CFG_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x2000;
const NOTIFY_SIZE: u64 = 0x1000;
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x3000;
const MSIX_PBA_OFFSET: u64 = 0x3800;
/// Table entries that fit between the table and the PBA.
const MAX_MSIX_VECTORS: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / msix::ENTRY_SIZE) as usize;

/// PCI capability ids.
const CAP_ID_VENDOR: u8 = 0x09;
/// virtio_pci_cap.cfg_type values.
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// The PCI_CFG capability's length: a virtio_pci_cap and the 4-byte data field.
const PCI_CFG_CAP_LEN: u8 = 20;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("Device has {0} queues; between 1 and {max} are supported", max = MAX_MSIX_VECTORS - 1)]
    QueueCount(usize),
    #[error("Queue {index} maximum size {size} is not a power of two up to 32768")]
    QueueMaxSize { index: usize, size: u16 },
    #[error("Could not build the PCI configuration space")]
    Pci(#[from] PciError),
}

/// The PCI_CFG capability's fields, as registers after its first: BAR (byte 0), offset,
/// length, data.
const PCI_CFG_BAR: usize = 1;
const PCI_CFG_OFFSET: usize = 2;
const PCI_CFG_LENGTH: usize = 3;
const PCI_CFG_DATA: usize = 4;

/// The PCI_CFG capability after its id and next pointer: the register BAR `bar` (as every
/// capability names it), no access selected (offset 0, length 0), data 0.
fn pci_cfg_cap_body(bar: u8) -> Vec<u8> {
    let mut body = vec![PCI_CFG_CAP_LEN, CAP_PCI_CFG, bar];
    body.resize(usize::from(PCI_CFG_CAP_LEN) - 2, 0);
    body
}

/// The MSI-X table and what virtio maps onto it: the config and per-queue vectors, and the
/// ISR.
struct InterruptState {
    msix: MsixTable,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    isr: u8,
    /// INTA#, when the board routes it.
    intx: Option<IntxLine>,
    /// The command register's INTx disable bit.
    intx_disabled: bool,
}

impl InterruptState {
    /// Drives INTA# from the ISR: the legacy interrupt, used while MSI-X is disabled.
    fn update_intx(&self) {
        if let Some(line) = &self.intx {
            line.set_level(self.isr != 0 && !self.msix.enabled() && !self.intx_disabled);
        }
    }
}

/// The transport's interrupt side, shared with the activated device.
struct PciInterrupt {
    sink: Arc<dyn InterruptSink>,
    state: Mutex<InterruptState>,
}

impl PciInterrupt {
    /// Raises `vector` (and the ISR bit); sends it now, or marks it pending while masked.
    fn trigger(&self, vector: u16, isr_bit: u8) {
        let message = {
            let mut st = lock(&self.state);
            st.isr |= isr_bit;
            if !st.msix.enabled() {
                st.update_intx();
                return;
            }
            if vector == VIRTIO_MSI_NO_VECTOR {
                return;
            }
            st.msix.trigger(vector)
        };
        if let Some(m) = message {
            self.send(m);
        }
    }

    fn send(&self, message: MsixMessage) {
        let MsixMessage { address, data } = message;
        if let Err(e) = self.sink.signal_msi(address, data) {
            warn!("virtio-pci: MSI delivery to {address:#x} failed: {e}");
        }
    }

    /// Sends every pending vector that is no longer masked.
    fn deliver_pending(&self) {
        let ready = lock(&self.state).msix.take_ready();
        for message in ready {
            self.send(message);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_used_queue(&self, queue_index: u16) {
        let vector = lock(&self.state)
            .queue_vectors
            .get(queue_index as usize)
            .copied()
            .unwrap_or(VIRTIO_MSI_NO_VECTOR);
        self.trigger(vector, ISR_QUEUE);
    }

    fn signal_config_change(&self) {
        let vector = lock(&self.state).config_vector;
        self.trigger(vector, ISR_CONFIG);
    }
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Arc<Mutex<Box<dyn VirtioDevice>>>,
    memory: GuestMemory,
    /// Where queue notifiers come from; None keeps every notify on the vCPU (synchronous).
    notifiers: Option<Arc<dyn NotifierRegistry>>,
    /// One I/O thread per enabled queue while the device is active and its BAR decoded.
    queue_threads: Vec<QueueThread>,
    /// Set by an I/O thread whose queue failed: reads back as DEVICE_NEEDS_RESET.
    failed: Arc<AtomicBool>,
    interrupt: Arc<PciInterrupt>,
    /// Configuration register whose high half is the MSI-X message control word.
    msix_control_reg: usize,
    /// The PCI_CFG capability's first register: the BAR, offset, length and data fields
    /// are the four after it.
    pci_cfg_reg: usize,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    active: bool,
    /// I/O threads stopped for a snapshot; notifies wait for [`PciDevice::resume`].
    quiesced: bool,
    /// The device's own threads are parked ([`VirtioDevice::quiesce`]): quiesced, or bus
    /// mastering off.
    parked: bool,
    /// The BAR holding the virtio registers (0, or 2 when BAR 0 is a RAM BAR).
    regs_bar: u8,
    /// Where the PCI root decodes that BAR ([`PciDevice::bar_decoded`]): the notifiers'
    /// base. None until the root says, and while it decodes nothing.
    regs_decoded: Option<u64>,
}

impl VirtioPciDevice {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemory,
        interrupt: Arc<dyn InterruptSink>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        let num_queues = max_sizes.len();
        if num_queues == 0 || num_queues >= MAX_MSIX_VECTORS {
            return Err(VirtioPciError::QueueCount(num_queues));
        }
        for (index, &size) in max_sizes.iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(VirtioPciError::QueueMaxSize { index, size });
            }
        }
        let device_type = device.device_type();
        let class_code = device.pci_class_code().unwrap_or(match device_type {
            TYPE_BLOCK => CLASS_STORAGE_SCSI,
            TYPE_NET => CLASS_NETWORK_ETHERNET,
            TYPE_GPU => CLASS_DISPLAY_OTHER,
            TYPE_INPUT => CLASS_INPUT_OTHER,
            _ => CLASS_OTHER,
        });
        let mut config = PciConfiguration::new(PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class_code,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config.set_interrupt_pin(Some(crate::pci::IntxPin::A));
        let regs_bar = match device.ram_bar() {
            Some(memory) => {
                config.add_bar(PciBar {
                    index: 0,
                    size: memory.len(),
                    kind: PciBarKind::Memory32,
                    prefetchable: true,
                    ram: Some(memory),
                })?;
                2
            }
            None => 0,
        };
        config.add_bar(PciBar {
            index: regs_bar,
            size: BAR0_SIZE,
            kind: PciBarKind::Memory64,
            prefetchable: false,
            ram: None,
        })?;
        let virtio_cap = |cfg_type: u8, offset: u64, length: u64, extra: Option<u32>| {
            let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
            let mut body = vec![cap_len, cfg_type, regs_bar, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(length as u32).to_le_bytes());
            if let Some(x) = extra {
                body.extend_from_slice(&x.to_le_bytes());
            }
            body
        };
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_SIZE, None),
        )?;
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_SIZE, Some(NOTIFY_OFF_MULTIPLIER)),
        )?;
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CAP_ISR_CFG, ISR_CFG_OFFSET, ISR_CFG_SIZE, None),
        )?;
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, None),
        )?;
        let vectors = num_queues + 1;
        let msix = msix::capability_body(
            vectors as u16,
            regs_bar,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_offset = config.add_capability(msix::CAP_ID_MSIX, &msix)?;
        let msix_control_reg = msix_offset / 4;
        config.set_writable_bits(
            msix_control_reg,
            u32::from(msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK) << 16,
        );
        // Last, so that the capabilities before it keep the offsets snapshots saved them at.
        let pci_cfg_reg = config.add_capability(CAP_ID_VENDOR, &pci_cfg_cap_body(regs_bar))? / 4;
        for (field, mask) in [(PCI_CFG_BAR, 0xff), (PCI_CFG_OFFSET, !0), (PCI_CFG_LENGTH, !0)] {
            config.set_writable_bits(pci_cfg_reg + field, mask);
        }
        config.set_writable_bits(pci_cfg_reg + PCI_CFG_DATA, !0);
        let interrupt = Arc::new(PciInterrupt {
            sink: interrupt,
            state: Mutex::new(InterruptState {
                msix: MsixTable::new(vectors),
                config_vector: VIRTIO_MSI_NO_VECTOR,
                queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; num_queues],
                isr: 0,
                intx: None,
                intx_disabled: false,
            }),
        });
        Ok(VirtioPciDevice {
            config,
            device: Arc::new(Mutex::new(device)),
            memory,
            notifiers: None,
            queue_threads: Vec::new(),
            failed: Arc::new(AtomicBool::new(false)),
            interrupt,
            msix_control_reg,
            pci_cfg_reg,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
            active: false,
            quiesced: false,
            parked: false,
            regs_bar,
            regs_decoded: None,
        })
    }

    /// Serves queue notifies on per-queue I/O threads woken by notifiers from `registry`
    /// (KVM: ioeventfds) instead of on the notifying vCPU. Where a notifier can't be had the
    /// notify stays synchronous.
    pub fn with_notifiers(mut self, registry: Arc<dyn NotifierRegistry>) -> Self {
        self.notifiers = Some(registry);
        self
    }

    /// The current device status byte.
    pub fn status(&self) -> u8 {
        if self.failed.load(Ordering::Acquire) {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Marks the device broken: DEVICE_NEEDS_RESET plus a configuration-change interrupt.
    fn device_failure(&mut self, reason: &str) {
        error!("virtio-pci device type {}: {reason}", lock(&self.device).device_type());
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        self.stop_queue_threads();
        if self.active {
            lock(&self.device).reset();
        }
        self.failed.store(false, Ordering::Release);
        self.active = false;
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        let mut st = lock(&self.interrupt.state);
        st.config_vector = VIRTIO_MSI_NO_VECTOR;
        st.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        st.msix.clear_pending();
        st.isr = 0;
        st.update_intx();
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = value & !STATUS_DEVICE_NEEDS_RESET;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = lock(&self.device).features();
            let extra = self.driver_features & !offered;
            if extra != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                warn!(
                    "virtio-pci: refusing features {:#x} (offered {offered:#x})",
                    self.driver_features
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        self.status = new | (old & STATUS_DEVICE_NEEDS_RESET);
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 && !self.active {
            if new & STATUS_FEATURES_OK == 0 {
                self.device_failure("DRIVER_OK without FEATURES_OK");
            } else {
                self.activate();
            }
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, qc) in self.queues.iter().enumerate() {
            let q = if qc.enabled {
                match qc.build(&self.memory, event_idx) {
                    Ok(q) => q,
                    Err(e) => {
                        return self.device_failure(&format!("queue {i}: {}", error_chain(&e)))
                    }
                }
            } else {
                match Queue::new(qc.max_size) {
                    Ok(q) => q,
                    Err(e) => return self.device_failure(&format!("queue {i}: {e}")),
                }
            };
            queues.push(q);
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let result = {
            let mut device = lock(&self.device);
            device.ack_features(self.driver_features);
            device.activate(self.memory.clone(), interrupt, queues)
        };
        match result {
            Ok(()) => {
                self.active = true;
                self.update_queue_threads();
            }
            Err(e) => self.device_failure(&format!("activation failed: {e}")),
        }
    }

    fn msix_table_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.interrupt.state).msix.read_table(offset, data);
    }

    fn msix_table_write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.interrupt.state).msix.write_table(offset, data);
        self.interrupt.deliver_pending();
    }

    fn msix_pba_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.interrupt.state).msix.read_pba(offset, data);
    }

    fn name(&self) -> String {
        device_name(lock(&self.device).device_type())
    }

    /// The register-BAR access the PCI_CFG capability selects: (offset, length), if it is
    /// one a driver may make (virtio 1.2, "PCI configuration access capability": length 1, 2
    /// or 4, aligned to it, inside the BAR). Anything else is ignored.
    fn pci_cfg_access(&self) -> Option<(u64, usize)> {
        let field = |f| self.config.read_reg(self.pci_cfg_reg + f);
        let bar = field(PCI_CFG_BAR) as u8;
        let offset = u64::from(field(PCI_CFG_OFFSET));
        let length = field(PCI_CFG_LENGTH);
        let fits = bar == self.regs_bar
            && matches!(length, 1 | 2 | 4)
            && offset % u64::from(length) == 0
            && offset + u64::from(length) <= BAR0_SIZE;
        fits.then_some((offset, length as usize))
    }

    /// A read of the PCI_CFG data field: the selected access, its bytes first.
    fn pci_cfg_read(&mut self) -> u32 {
        let mut data = [0u8; 4];
        if let Some((offset, length)) = self.pci_cfg_access() {
            let bar = self.regs_bar;
            self.bar_read(bar, offset, &mut data[..length]);
        }
        u32::from_le_bytes(data)
    }

    /// After a write of the PCI_CFG data field: the selected access with its first bytes.
    fn pci_cfg_write(&mut self) {
        if let Some((offset, length)) = self.pci_cfg_access() {
            let data = self.config.read_reg(self.pci_cfg_reg + PCI_CFG_DATA).to_le_bytes();
            let bar = self.regs_bar;
            self.bar_write(bar, offset, &data[..length]);
        }
    }

    /// Whether the device may touch guest memory: not quiesced for a snapshot, and bus
    /// mastering (command bit 2) on. Otherwise no queue is processed and no MSI is sent: a
    /// function without bus mastering may not do DMA, and firmware turns it off around
    /// enumeration and hand-over. Notifies wait and are served once it may again.
    fn may_dma(&self) -> bool {
        !self.quiesced && self.config.bus_master_enabled()
    }

    /// Brings the I/O threads, the device's own threads and MSI delivery in line with
    /// [`Self::may_dma`] after the command register changed or a quiesce.
    fn follow_dma(&mut self) {
        {
            let mut st = lock(&self.interrupt.state);
            st.msix.set_bus_master(self.config.bus_master_enabled());
            st.intx_disabled = self.config.intx_disabled();
            st.update_intx();
        }
        if !self.may_dma() {
            self.update_queue_threads();
            self.park();
        } else if self.parked {
            self.unpark();
        } else {
            self.update_queue_threads();
        }
    }

    fn park(&mut self) {
        if !self.parked {
            self.parked = true;
            lock(&self.device).quiesce();
        }
    }

    /// The device's threads and the I/O threads back, a pass over every queue for the
    /// notifies that came meanwhile, and the MSIs that pended.
    fn unpark(&mut self) {
        self.parked = false;
        lock(&self.device).resume();
        self.update_queue_threads();
        for index in 0..self.queues.len() {
            if self.queues[index].enabled {
                self.notify(index);
            }
        }
        self.interrupt.deliver_pending();
    }

    /// Picks up MSI-X enable / function-mask changes from the capability.
    fn update_msix_control(&mut self) {
        let control = (self.config.read_reg(self.msix_control_reg) >> 16) as u16;
        {
            let mut st = lock(&self.interrupt.state);
            st.msix.set_control(control);
            st.update_intx();
        }
        self.interrupt.deliver_pending();
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_reg + PCI_CFG_DATA {
            return self.pci_cfg_read();
        }
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        if reg == self.msix_control_reg {
            self.update_msix_control();
        }
        if reg == self.pci_cfg_reg + PCI_CFG_DATA {
            self.pci_cfg_write();
        }
        if reg == COMMAND_REG {
            self.follow_dma();
        }
        // A moved BAR or a decoding change reaches the notifiers through the root's
        // `bar_decoded`, never from the registers here: mid-sizing they hold garbage.
    }

    fn set_intx_line(&mut self, line: IntxLine) {
        let mut st = lock(&self.interrupt.state);
        st.intx = Some(line);
        st.update_intx();
    }

    fn bar_decoded(&mut self, index: u8, address: Option<u64>) {
        if index == self.regs_bar {
            self.regs_decoded = address;
            self.update_queue_threads();
        }
    }

    fn bars(&self) -> Vec<PciBar> {
        self.config.bars().to_vec()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != self.regs_bar || data.len() > 8 {
            return;
        }
        match offset {
            o if o < COMMON_CFG_SIZE => self.common_read(o, data),
            o if (ISR_CFG_OFFSET..ISR_CFG_OFFSET + ISR_CFG_SIZE).contains(&o) => {
                // Reading the ISR acknowledges it.
                let mut st = lock(&self.interrupt.state);
                if o == ISR_CFG_OFFSET {
                    data[0] = st.isr;
                    st.isr = 0;
                    st.update_intx();
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                lock(&self.device).read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix_table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR0_SIZE).contains(&o) => {
                self.msix_pba_read(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != self.regs_bar || data.len() > 8 {
            return;
        }
        match offset {
            o if o < COMMON_CFG_SIZE => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                lock(&self.device).write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                self.notify(((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix_table_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        let saved = self.save()?;
        state::encode(&device_name(saved.device_type), &saved)
    }

    fn restore_state(&mut self, saved: &[u8]) -> Result<(), StateError> {
        self.restore(saved)
    }

    fn quiesce(&mut self) {
        self.quiesced = true;
        self.follow_dma();
    }

    /// Also right after a restore: a notify the saved machine's I/O thread had not served
    /// yet is served by this pass (unless bus mastering is off: then when it is on).
    fn resume(&mut self) {
        self.quiesced = false;
        if self.may_dma() {
            self.unpark();
        } else {
            self.follow_dma();
        }
    }
}
