//! The modern virtio-pci transport (virtio 1.2 section 4.1): one 64-bit memory BAR holding
//! the common configuration, ISR, device configuration, notify region and MSI-X table + PBA,
//! described by vendor-specific capabilities.
//!
//! ```text
//!  BAR0 (16 KiB)  0x0000 common cfg   0x0800 ISR   0x1000 device cfg
//!                 0x2000 notify (queue n at n * 4)  0x3000 MSI-X table  0x3800 MSI-X PBA
//! ```
//! Interrupts are MSI-X only: INTx is not wired (interrupt pin 0). A vector that is masked
//! (entry or function mask) is recorded in the PBA and sent when unmasked; an interrupt with
//! MSI-X disabled or with no vector assigned only sets the ISR bit.
//! The VIRTIO_PCI_CAP_PCI_CFG access window is not offered (Linux does not use it).
//!
//! A device with a [fixed memory BAR](VirtioDevice::fixed_memory_bar) (virtio-gpu's boot
//! framebuffer) gets it as BAR 0, 32-bit prefetchable at the machine's address, and the
//! register BAR above moves to BAR 2, the layout of QEMU's virtio-vga: older Linux kernels
//! only look at BAR 0 when evicting the firmware framebuffer. Accesses that reach the fixed
//! BAR (none should: the machine maps memory there) read 0 and are ignored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use log::{error, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::queue::SavedQueue;
use super::{
    device_name, RestoredQueues, VirtioDevice, VirtioInterrupt, STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK, STATUS_FEATURES_OK, TYPE_BLOCK, TYPE_GPU, TYPE_INPUT, TYPE_NET,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::lock;
use crate::hypervisor::{GuestNotifier, InterruptSink, NotifierRegistry};
use crate::memory::GuestMemory;
use crate::pci::config::{
    CLASS_DISPLAY_OTHER, CLASS_INPUT_OTHER, CLASS_NETWORK_ETHERNET, CLASS_OTHER, CLASS_STORAGE_SCSI,
};
use crate::pci::{PciBar, PciBarKind, PciConfiguration, PciDevice, PciError, PciHeader};
use crate::state::{self, StateError};

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
const MSIX_ENTRY_SIZE: u64 = 16;
/// Table entries that fit between the table and the PBA.
const MAX_MSIX_VECTORS: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / MSIX_ENTRY_SIZE) as usize;

/// PCI capability ids.
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;
/// virtio_pci_cap.cfg_type values.
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;

const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_ENTRY_MASKED: u32 = 1;

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

#[derive(Debug, Clone, Copy, Default)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

struct MsixState {
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_mask: bool,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    isr: u8,
}

/// The transport's interrupt side, shared with the activated device.
struct PciInterrupt {
    sink: Arc<dyn InterruptSink>,
    state: Mutex<MsixState>,
}

impl PciInterrupt {
    /// Raises `vector` (and the ISR bit); sends it now, or marks it pending while masked.
    fn trigger(&self, vector: u16, isr_bit: u8) {
        let mut st = lock(&self.state);
        st.isr |= isr_bit;
        if vector == VIRTIO_MSI_NO_VECTOR || !st.enabled {
            return;
        }
        let v = vector as usize;
        let Some(entry) = st.entries.get(v).copied() else {
            return;
        };
        if st.function_mask || entry.control & MSIX_ENTRY_MASKED != 0 {
            st.pending[v] = true;
            return;
        }
        drop(st);
        self.send(entry);
    }

    fn send(&self, entry: MsixEntry) {
        let address = u64::from(entry.addr_hi) << 32 | u64::from(entry.addr_lo);
        if let Err(e) = self.sink.signal_msi(address, entry.data) {
            warn!("virtio-pci: MSI delivery to {address:#x} failed: {e}");
        }
    }

    /// Sends every pending vector that is no longer masked.
    fn deliver_pending(&self) {
        let mut st = lock(&self.state);
        if !st.enabled || st.function_mask {
            return;
        }
        let mut ready = Vec::new();
        for v in 0..st.entries.len() {
            if st.pending[v] && st.entries[v].control & MSIX_ENTRY_MASKED == 0 {
                st.pending[v] = false;
                ready.push(st.entries[v]);
            }
        }
        drop(st);
        for entry in ready {
            self.send(entry);
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

/// An I/O thread serving one queue: it sleeps on the queue's notifier (the guest's notify
/// write completes in the hypervisor), processes the queue and raises its interrupt.
struct QueueWorker {
    /// The notify region's address the notifier was registered under.
    base: u64,
    notifier: Arc<dyn GuestNotifier>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl QueueWorker {
    fn start(
        index: usize,
        base: u64,
        notifier: crate::hypervisor::Result<Box<dyn GuestNotifier>>,
        device: Arc<Mutex<Box<dyn VirtioDevice>>>,
        interrupt: Arc<PciInterrupt>,
        failed: Arc<AtomicBool>,
    ) -> Result<QueueWorker, String> {
        let notifier: Arc<dyn GuestNotifier> = Arc::from(notifier.map_err(|e| e.to_string())?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let notifier = notifier.clone();
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("virtio-q{index}"))
                .spawn(move || worker_loop(index, &*notifier, &stop, &device, &interrupt, &failed))
                .map_err(|e| format!("could not start the I/O thread: {e}"))?
        };
        // Notifies written before the notifier existed went to the MMIO path; a first pass
        // here would only find an empty ring, so nothing is lost.
        Ok(QueueWorker { base, notifier, stop, thread: Some(thread) })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        self.notifier.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("virtio-pci: an I/O thread panicked");
            }
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::Release);
            self.notifier.wake();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn worker_loop(
    index: usize,
    notifier: &dyn GuestNotifier,
    stop: &AtomicBool,
    device: &Mutex<Box<dyn VirtioDevice>>,
    interrupt: &PciInterrupt,
    failed: &AtomicBool,
) {
    loop {
        if let Err(e) = notifier.wait() {
            error!("virtio-pci: queue {index} notifier failed: {e}");
            return;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        if failed.load(Ordering::Acquire) {
            continue;
        }
        let result = lock(device).process_queue(index);
        match result {
            Ok(true) => interrupt.signal_used_queue(index as u16),
            Ok(false) => {}
            Err(e) => {
                error!("virtio-pci: queue {index}: {e}");
                failed.store(true, Ordering::Release);
                interrupt.signal_config_change();
            }
        }
    }
}

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig { max_size, size: max_size, enabled: false, desc: 0, driver: 0, device: 0 }
    }

    /// A ready `Queue` from the driver's values, or why they are unusable.
    fn build(&self, memory: &GuestMemory, event_idx: bool) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| format!("max size: {e}"))?;
        q.try_set_size(self.size).map_err(|_| format!("size {} is invalid", self.size))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| format!("descriptor table {:#x} is misaligned", self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| format!("driver area {:#x} is misaligned", self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| format!("device area {:#x} is misaligned", self.device))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(memory) {
            return Err("rings are outside guest memory".to_string());
        }
        Ok(q)
    }
}

/// What the driver programmed for one queue, saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegisters {
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The MSI-X table, PBA and vectors, and the ISR, saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixSaved {
    /// Per vector: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_mask: bool,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub isr: u8,
}

/// Saved state of a virtio-pci function: configuration space, transport registers, the
/// live queues (when active) and the device's own bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub device_type: u32,
    pub config: Vec<u32>,
    pub status: u8,
    /// DEVICE_NEEDS_RESET raised by an I/O thread.
    pub failed: bool,
    pub active: bool,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub queues: Vec<QueueRegisters>,
    /// The device's queues (positions included) while active; empty otherwise.
    pub live_queues: Vec<SavedQueue>,
    pub msix: MsixSaved,
    #[serde(with = "serde_bytes")]
    pub device: Vec<u8>,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Arc<Mutex<Box<dyn VirtioDevice>>>,
    memory: GuestMemory,
    /// Where queue notifiers come from; None keeps every notify on the vCPU (synchronous).
    notifiers: Option<Arc<dyn NotifierRegistry>>,
    /// One I/O thread per enabled queue while the device is active and its BAR decoded.
    workers: Vec<QueueWorker>,
    /// Set by an I/O thread whose queue failed: reads back as DEVICE_NEEDS_RESET.
    failed: Arc<AtomicBool>,
    interrupt: Arc<PciInterrupt>,
    /// Configuration register whose high half is the MSI-X message control word.
    msix_control_reg: usize,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    active: bool,
    /// I/O threads stopped for a snapshot; notifies wait for [`PciDevice::resume`].
    quiesced: bool,
    /// The BAR holding the virtio registers (0, or 2 when BAR 0 is a fixed framebuffer).
    regs_bar: u8,
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
        let regs_bar = match device.fixed_memory_bar() {
            Some((address, size)) => {
                config.add_bar(PciBar {
                    index: 0,
                    size,
                    kind: PciBarKind::Memory32,
                    prefetchable: true,
                    fixed_address: Some(address),
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
            fixed_address: None,
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
        let mut msix = Vec::new();
        msix.extend_from_slice(&((vectors - 1) as u16).to_le_bytes());
        // Offsets are 8-aligned; the low three bits name the BAR (BIR).
        msix.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | u32::from(regs_bar)).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | u32::from(regs_bar)).to_le_bytes());
        let msix_offset = config.add_capability(CAP_ID_MSIX, &msix)?;
        let msix_control_reg = msix_offset / 4;
        config.set_writable_bits(
            msix_control_reg,
            u32::from(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) << 16,
        );
        let interrupt = Arc::new(PciInterrupt {
            sink: interrupt,
            state: Mutex::new(MsixState {
                entries: vec![
                    MsixEntry { control: MSIX_ENTRY_MASKED, ..Default::default() };
                    vectors
                ],
                pending: vec![false; vectors],
                enabled: false,
                function_mask: false,
                config_vector: VIRTIO_MSI_NO_VECTOR,
                queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; num_queues],
                isr: 0,
            }),
        });
        Ok(VirtioPciDevice {
            config,
            device: Arc::new(Mutex::new(device)),
            memory,
            notifiers: None,
            workers: Vec::new(),
            failed: Arc::new(AtomicBool::new(false)),
            interrupt,
            msix_control_reg,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
            active: false,
            quiesced: false,
            regs_bar,
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

    /// Guest-physical address of the notify region while notifiers should be registered.
    fn notify_base(&self) -> Option<u64> {
        if !self.active || self.notifiers.is_none() || !self.config.memory_space_enabled() {
            return None;
        }
        self.config
            .bar_address(self.regs_bar)
            .filter(|&a| a != 0)
            .and_then(|a| a.checked_add(NOTIFY_OFFSET))
    }

    /// Brings the I/O threads in line with the device state and BAR address.
    fn update_workers(&mut self) {
        let want = if self.quiesced { None } else { self.notify_base() };
        if self.workers.first().map(|w| w.base) == want {
            return;
        }
        self.stop_workers();
        let (Some(base), Some(registry)) = (want, self.notifiers.clone()) else {
            return;
        };
        for (index, q) in self.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let addr = base + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            match QueueWorker::start(
                index,
                base,
                registry.register_notifier(addr, 2),
                self.device.clone(),
                self.interrupt.clone(),
                self.failed.clone(),
            ) {
                Ok(w) => self.workers.push(w),
                Err(e) => {
                    // The notify still works, through the MMIO exit.
                    log::debug!("virtio-pci: queue {index} notifies stay synchronous: {e}");
                }
            }
        }
    }

    fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            w.stop();
        }
    }

    /// Marks the device broken: DEVICE_NEEDS_RESET plus a configuration-change interrupt.
    fn device_failure(&mut self, reason: &str) {
        error!("virtio-pci device type {}: {reason}", lock(&self.device).device_type());
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        self.stop_workers();
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
        st.pending.fill(false);
        st.isr = 0;
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
                    Err(reason) => return self.device_failure(&format!("queue {i}: {reason}")),
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
        let result = lock(&self.device).activate(self.memory.clone(), interrupt, queues);
        match result {
            Ok(()) => {
                self.active = true;
                self.update_workers();
            }
            Err(e) => self.device_failure(&format!("activation failed: {e}")),
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        let count = lock(&self.interrupt.state).entries.len();
        if (vector as usize) < count {
            vector
        } else {
            // Reading back NO_VECTOR tells the driver the vector was refused.
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(self.queue_select as usize).copied();
        let st = lock(&self.interrupt.state);
        let qvec = st.queue_vectors.get(self.queue_select as usize).copied();
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => lock(&self.device).features() & 0xffff_ffff,
                1 => lock(&self.device).features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(st.config_vector),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status()),
            (0x15, 1) => 0, // config_generation: device configs never change under the driver
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => u64::from(qvec.unwrap_or(VIRTIO_MSI_NO_VECTOR)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (0x1e, 2) => u64::from(self.queue_select), // queue_notify_off
            (0x20 | 0x28 | 0x30, 8) => q.map_or(0, |q| Self::queue_addr(&q, offset)),
            (0x20..=0x37, 4) if offset & 3 == 0 => {
                let full = q.map_or(0, |q| Self::queue_addr(&q, offset & !7));
                if offset & 7 == 0 {
                    full & 0xffff_ffff
                } else {
                    full >> 32
                }
            }
            _ => 0,
        };
        drop(st);
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn queue_addr(q: &QueueConfig, offset: u64) -> u64 {
        match offset {
            0x20 => q.desc,
            0x28 => q.driver,
            _ => q.device,
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        raw[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(raw);
        let features_locked = self.status & STATUS_FEATURES_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if !features_locked => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
                _ => {}
            },
            (0x10, 2) => {
                let v = self.valid_vector(value as u16);
                lock(&self.interrupt.state).config_vector = v;
            }
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) => {
                if let Some(q) = self.selected_queue().filter(|q| !q.enabled) {
                    // Checked when the queue is enabled.
                    q.size = value as u16;
                }
            }
            (0x1a, 2) => {
                let v = self.valid_vector(value as u16);
                let sel = self.queue_select as usize;
                if let Some(slot) = lock(&self.interrupt.state).queue_vectors.get_mut(sel) {
                    *slot = v;
                }
            }
            (0x1c, 2) => self.enable_queue(value as u16),
            (0x20 | 0x28 | 0x30, 8) => self.set_queue_addr(offset, value, u64::MAX),
            (0x20..=0x37, 4) if offset & 3 == 0 => {
                let (shifted, mask) = if offset & 7 == 0 {
                    (value, 0xffff_ffff)
                } else {
                    (value << 32, !0xffff_ffff)
                };
                self.set_queue_addr(offset & !7, shifted, mask);
            }
            _ => {}
        }
    }

    fn set_queue_addr(&mut self, offset: u64, value: u64, mask: u64) {
        let Some(q) = self.selected_queue().filter(|q| !q.enabled) else {
            return;
        };
        let field = match offset {
            0x20 => &mut q.desc,
            0x28 => &mut q.driver,
            _ => &mut q.device,
        };
        *field = (*field & !mask) | (value & mask);
    }

    fn enable_queue(&mut self, value: u16) {
        // Writing 0 is not allowed to the driver; a queue is disabled only by reset.
        if value != 1 {
            return;
        }
        let index = self.queue_select;
        let Some(q) = self.queues.get(index as usize) else {
            return;
        };
        match q.build(&self.memory, false) {
            Ok(_) => self.queues[index as usize].enabled = true,
            Err(reason) => self.device_failure(&format!("queue {index}: {reason}")),
        }
    }

    fn notify(&mut self, queue_index: usize) {
        if !self.active
            || queue_index >= self.queues.len()
            || self.status & STATUS_DRIVER_OK == 0
            || self.status & STATUS_DEVICE_NEEDS_RESET != 0
        {
            return;
        }
        if self.failed.load(Ordering::Acquire) || self.quiesced {
            // While quiesced the notify is served by the pass resume makes.
            return;
        }
        let result = lock(&self.device).process_queue(queue_index);
        match result {
            Ok(true) => self.interrupt.signal_used_queue(queue_index as u16),
            Ok(false) => {}
            Err(e) => self.device_failure(&format!("queue {queue_index}: {e}")),
        }
    }

    fn msix_table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let st = lock(&self.interrupt.state);
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(e) = st.entries.get(index) else {
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let word = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        match data.len() {
            4 if offset & 3 == 0 => data.copy_from_slice(&words[word].to_le_bytes()),
            8 if offset & 7 == 0 => {
                data[..4].copy_from_slice(&words[word].to_le_bytes());
                data[4..].copy_from_slice(&words[word + 1].to_le_bytes());
            }
            _ => {}
        }
    }

    fn msix_table_write(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        let word = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        let values: Vec<u32> = match data.len() {
            4 if offset & 3 == 0 => vec![u32::from_le_bytes([data[0], data[1], data[2], data[3]])],
            8 if offset & 7 == 0 => vec![
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                u32::from_le_bytes([data[4], data[5], data[6], data[7]]),
            ],
            _ => return,
        };
        {
            let mut st = lock(&self.interrupt.state);
            let Some(e) = st.entries.get_mut(index) else {
                return;
            };
            for (i, v) in values.into_iter().enumerate() {
                match word + i {
                    0 => e.addr_lo = v,
                    1 => e.addr_hi = v,
                    2 => e.data = v,
                    _ => e.control = v & MSIX_ENTRY_MASKED,
                }
            }
        }
        self.interrupt.deliver_pending();
    }

    fn msix_pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let st = lock(&self.interrupt.state);
        for (i, byte) in data.iter_mut().enumerate() {
            for bit in 0..8 {
                let v = (offset as usize + i) * 8 + bit;
                if st.pending.get(v).copied().unwrap_or(false) {
                    *byte |= 1 << bit;
                }
            }
        }
    }

    fn name(&self) -> String {
        device_name(lock(&self.device).device_type())
    }

    fn save(&self) -> Result<VirtioPciState, StateError> {
        let device = lock(&self.device);
        let name = device_name(device.device_type());
        let live_queues = if self.active {
            let states = device.queue_states().ok_or_else(|| {
                StateError::not_snapshottable(&name, "its queues cannot be saved")
            })?;
            if states.len() != self.queues.len() {
                return Err(StateError::not_snapshottable(&name, "it reports the wrong queues"));
            }
            states.into_iter().map(SavedQueue::from).collect()
        } else {
            Vec::new()
        };
        let device_bytes = device.save_state()?;
        let device_type = device.device_type();
        drop(device);
        let st = lock(&self.interrupt.state);
        Ok(VirtioPciState {
            device_type,
            config: self.config.registers(),
            status: self.status,
            failed: self.failed.load(Ordering::Acquire),
            active: self.active,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegisters {
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            live_queues,
            msix: MsixSaved {
                entries: st
                    .entries
                    .iter()
                    .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                    .collect(),
                pending: st.pending.clone(),
                enabled: st.enabled,
                function_mask: st.function_mask,
                config_vector: st.config_vector,
                queue_vectors: st.queue_vectors.clone(),
                isr: st.isr,
            },
            device: device_bytes,
        })
    }

    /// Checks saved transport state against this function; returns the configured queues
    /// and, when active, the live queues rebuilt.
    fn check(
        &self,
        saved: &VirtioPciState,
    ) -> Result<(Vec<QueueConfig>, Option<Vec<Queue>>), String> {
        let entries = lock(&self.interrupt.state).entries.len();
        if saved.queues.len() != self.queues.len() {
            return Err(format!("{} queues, not {}", saved.queues.len(), self.queues.len()));
        }
        let m = &saved.msix;
        if m.entries.len() != entries
            || m.pending.len() != entries
            || m.queue_vectors.len() != self.queues.len()
        {
            return Err("MSI-X table of another size".to_string());
        }
        let valid_vector = |v: u16| v == VIRTIO_MSI_NO_VECTOR || usize::from(v) < entries;
        if !valid_vector(m.config_vector) || !m.queue_vectors.iter().all(|&v| valid_vector(v)) {
            return Err("MSI-X vector out of range".to_string());
        }
        let mut configs = Vec::with_capacity(self.queues.len());
        for (i, (r, current)) in saved.queues.iter().zip(&self.queues).enumerate() {
            let qc = QueueConfig {
                max_size: current.max_size,
                size: r.size,
                enabled: r.enabled,
                desc: r.desc,
                driver: r.driver,
                device: r.device,
            };
            if qc.enabled {
                qc.build(&self.memory, false).map_err(|e| format!("queue {i}: {e}"))?;
            }
            configs.push(qc);
        }
        if !saved.active {
            if !saved.live_queues.is_empty() {
                return Err("queues saved for an inactive device".to_string());
            }
            return Ok((configs, None));
        }
        if saved.status & STATUS_DRIVER_OK == 0 || saved.live_queues.len() != configs.len() {
            return Err("active without DRIVER_OK or with the wrong queues".to_string());
        }
        let mut queues = Vec::with_capacity(configs.len());
        for (i, (live, qc)) in saved.live_queues.iter().zip(&configs).enumerate() {
            let matches = live.max_size == qc.max_size
                && live.ready == qc.enabled
                && (!qc.enabled
                    || (live.size == qc.size
                        && live.desc_table == qc.desc
                        && live.avail_ring == qc.driver
                        && live.used_ring == qc.device));
            if !matches {
                return Err(format!("queue {i} differs from its registers"));
            }
            queues.push(live.to_queue(&self.memory).map_err(|e| format!("queue {i}: {e}"))?);
        }
        Ok((configs, Some(queues)))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let name = self.name();
        let saved: VirtioPciState = state::decode(&name, bytes)?;
        if saved.device_type != lock(&self.device).device_type() {
            return Err(StateError::invalid(&name, "saved from another kind of device"));
        }
        let (configs, queues) = self.check(&saved).map_err(|r| StateError::invalid(&name, r))?;
        // Checked before anything changes; applied only once the device took its state.
        let mut config = self.config.clone();
        config.restore_registers(&saved.config).map_err(|r| StateError::invalid(&name, r))?;
        self.stop_workers();
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let restored =
            queues.map(|queues| RestoredQueues { memory: self.memory.clone(), interrupt, queues });
        let result = lock(&self.device).restore_state(&saved.device, restored);
        if let Err(e) = result {
            self.update_workers();
            return Err(e);
        }
        self.config = config;
        {
            let m = &saved.msix;
            let mut st = lock(&self.interrupt.state);
            st.entries = m
                .entries
                .iter()
                .map(|e| MsixEntry {
                    addr_lo: e[0],
                    addr_hi: e[1],
                    data: e[2],
                    control: e[3] & MSIX_ENTRY_MASKED,
                })
                .collect();
            st.pending = m.pending.clone();
            st.enabled = m.enabled;
            st.function_mask = m.function_mask;
            st.config_vector = m.config_vector;
            st.queue_vectors = m.queue_vectors.clone();
            st.isr = m.isr;
        }
        self.status = saved.status;
        self.failed.store(saved.failed, Ordering::Release);
        self.active = saved.active;
        self.device_feature_select = saved.device_feature_select;
        self.driver_feature_select = saved.driver_feature_select;
        self.driver_features = saved.driver_features;
        self.queue_select = saved.queue_select;
        self.queues = configs;
        self.update_workers();
        Ok(())
    }

    /// Picks up MSI-X enable / function-mask changes from the capability.
    fn update_msix_control(&mut self) {
        let control = (self.config.read_reg(self.msix_control_reg) >> 16) as u16;
        {
            let mut st = lock(&self.interrupt.state);
            st.enabled = control & MSIX_CONTROL_ENABLE != 0;
            st.function_mask = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        }
        self.interrupt.deliver_pending();
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        if reg == self.msix_control_reg {
            self.update_msix_control();
        }
        // The command register or a BAR may have moved the notify region.
        self.update_workers();
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
        self.update_workers();
        lock(&self.device).quiesce();
    }

    /// Also right after a restore: a notify the saved machine's I/O thread had not served
    /// yet is served by this pass.
    fn resume(&mut self) {
        self.quiesced = false;
        lock(&self.device).resume();
        self.update_workers();
        // A notify may have come while the threads were stopped: serve every queue once.
        for index in 0..self.queues.len() {
            if self.queues[index].enabled {
                self.notify(index);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A test "driver" that brings a [`VirtioPciDevice`] up through its registers the way
    //! Linux's virtio_pci_modern does, with a recording interrupt sink.
    #![allow(clippy::unwrap_used)] // Test scaffolding fails loudly on purpose.

    use super::*;
    use crate::hypervisor;
    use crate::virtio::queue::testing::{memory, TestQueue};
    use crate::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER};

    pub const MSI_ADDR: u64 = 0xfee0_0000;
    pub const QUEUE_MSI_DATA: u32 = 0x41;
    pub const CONFIG_MSI_DATA: u32 = 0x40;

    #[derive(Default)]
    pub struct RecordingSink {
        pub msis: Mutex<Vec<(u64, u32)>>,
    }

    impl InterruptSink for RecordingSink {
        fn set_irq_line(&self, _gsi: u32, _active: bool) -> hypervisor::Result<()> {
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
            let dev = VirtioPciDevice::new(device, mem.clone(), sink.clone()).unwrap();
            TestDriver { dev, mem, sink, tq: TestQueue::new(256, 0x10_0000) }
        }

        /// Places the register BAR at `addr` and turns on memory decoding (what firmware or
        /// Linux does).
        pub fn place_bar0(&mut self, addr: u64) {
            let reg = 4 + usize::from(self.dev.regs_bar);
            self.dev.write_config_register(reg, 0, &(addr as u32 | 0b100).to_le_bytes());
            self.dev.write_config_register(reg + 1, 0, &((addr >> 32) as u32).to_le_bytes());
            self.dev.write_config_register(1, 0, &2u16.to_le_bytes());
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
            self.dev.write_config_register(reg, 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
            for (v, data) in [(0u64, CONFIG_MSI_DATA), (1, QUEUE_MSI_DATA)] {
                let base = MSIX_TABLE_OFFSET + v * MSIX_ENTRY_SIZE;
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
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
            } else if id == CAP_ID_MSIX {
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
        let entry1 = MSIX_TABLE_OFFSET + MSIX_ENTRY_SIZE;
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
            VirtioPciDevice::new(Box::new(Rng::new().unwrap()), d.mem.clone(), d.sink.clone())
                .unwrap(),
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
        let entry1 = MSIX_TABLE_OFFSET + MSIX_ENTRY_SIZE;
        serve_one(&mut d, 2);
        d.write(entry1 + 12, 4, 1); // mask the queue vector: the next interrupt is pending
        d.dev.interrupt.signal_used_queue(0);
        let saved = d.dev.save_state().unwrap();
        let decoded: VirtioPciState = state::decode("t", &saved).unwrap();
        assert_eq!(decoded.live_queues[0].next_used, 3);
        assert!(decoded.msix.pending[1]);

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
        let mut cases = Vec::new();
        let mut s = good.clone();
        s.queues[0].size = 100;
        s.live_queues[0].size = 100;
        cases.push(s);
        let mut s = good.clone();
        s.queues[0].desc = 0xffff_0000_0000;
        s.live_queues[0].desc_table = 0xffff_0000_0000;
        cases.push(s);
        let mut s = good.clone();
        s.live_queues[0].next_avail = 300;
        cases.push(s);
        let mut s = good.clone();
        s.msix.queue_vectors[0] = 9;
        cases.push(s);
        let mut s = good.clone();
        s.msix.entries.push([0; 4]);
        cases.push(s);
        let mut s = good.clone();
        s.device_type = crate::virtio::TYPE_BLOCK;
        cases.push(s);
        let mut s = good.clone();
        s.config[0] = 0x1234_5678;
        cases.push(s);
        for (i, case) in cases.into_iter().enumerate() {
            let bytes = state::encode("t", &case).unwrap();
            let r = fresh.restore_state(&bytes);
            assert!(matches!(r, Err(StateError::Invalid { .. })), "case {i}: {r:?}");
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
}

#[cfg(test)]
mod golden {
    use super::{MsixSaved, QueueRegisters, VirtioPciState};
    use crate::virtio::golden::assert_golden;
    use crate::virtio::queue::SavedQueue;

    const VIRTIO_PCI_STATE_HEX: &str = concat!(
        "020000000300000000000000f41a4210060010000000e0fe0f01010100000001",
        "0000006402003001000000000001000000000000000001010000100000000000",
        "0010100000000000002010000000000001000000000000000001050004000100",
        "0101000010000000000000101000000000000020100000000000020000000000",
        "00000000e0fe0000000040000000000000000010e0fe01000000410000000100",
        "0000020000000000000000010100000001000000000000000100030300000000",
        "000000090807",
    );

    #[test]
    fn virtio_pci_state_bytes_are_unchanged() {
        let state = VirtioPciState {
            device_type: 2,
            config: vec![0x1042_1af4, 0x0010_0006, 0xfee0_0000],
            status: 0x0f,
            failed: true,
            active: true,
            device_feature_select: 1,
            driver_feature_select: 1,
            driver_features: 0x1_3000_0264,
            queue_select: 0,
            queues: vec![QueueRegisters {
                size: 256,
                enabled: true,
                desc: 0x10_0000,
                driver: 0x10_1000,
                device: 0x10_2000,
            }],
            live_queues: vec![SavedQueue {
                max_size: 256,
                next_avail: 5,
                next_used: 4,
                event_idx_enabled: true,
                size: 256,
                ready: true,
                desc_table: 0x10_0000,
                avail_ring: 0x10_1000,
                used_ring: 0x10_2000,
            }],
            msix: MsixSaved {
                entries: vec![[0xfee0_0000, 0, 0x40, 0], [0xfee0_1000, 1, 0x41, 1]],
                pending: vec![false, true],
                enabled: true,
                function_mask: false,
                config_vector: 0,
                queue_vectors: vec![1],
                isr: 3,
            },
            device: vec![9, 8, 7],
        };
        assert_golden(&state, VIRTIO_PCI_STATE_HEX);
    }
}
