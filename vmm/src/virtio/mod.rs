//! Virtio devices and the modern virtio-pci transport (virtio 1.2, split virtqueues).
//!
//! ```text
//!  guest ──BAR0──▶ pci_transport::VirtioPciDevice ──▶ dyn VirtioDevice (block::Block, rng::Rng)
//!                   common cfg, ISR, notify, MSI-X      process_queue() on the notifying vCPU
//!                   └─ VirtioInterrupt (MSI-X) ──▶ hypervisor::InterruptSink::signal_msi
//! ```
//! By default a notify write processes the queue on the vCPU thread that wrote it, and the
//! transport then signals the queue's MSI-X vector. A transport given a
//! [`NotifierRegistry`](crate::hypervisor::NotifierRegistry) instead serves each enabled queue
//! on its own I/O thread, woken by a hypervisor notifier (KVM: ioeventfd) so the guest's write
//! completes without a vCPU exit to the VMM; MMIO notifies still work alongside.
//! Work the host starts (input events) runs on the device's own [`worker::Worker`] thread,
//! parked while the machine is quiesced for a snapshot. Each device's saved state lives in
//! `persist.rs` beside it, pinned by a golden-bytes test.

pub mod block;
pub mod gpu;
pub mod input;
pub mod net;
pub mod pci_transport;
pub mod queue;
pub mod rng;
pub mod worker;

use std::sync::Arc;

use virtio_queue::{Queue, QueueState};

use crate::memory::GuestMemory;
use crate::state::StateError;

pub use pci_transport::VirtioPciDevice;

/// Device types (virtio 1.2 section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_GPU: u32 = 16;
pub const TYPE_INPUT: u32 = 18;

/// Feature bits every device handles the same way.
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2 section 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("Device expects {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("Queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("Queue {index} failed")]
    Queue {
        index: usize,
        #[source]
        source: queue::VirtioQueueError,
    },
    /// What the device carries to the host stopped working (a network backend).
    #[error("The backend of {device} failed")]
    Backend {
        device: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Interrupts a device raises; the transport maps them to MSI-X vectors.
pub trait VirtioInterrupt: Send + Sync {
    fn signal_used_queue(&self, queue_index: u16);
    fn signal_config_change(&self);
}

/// A short name for a device type, for errors.
pub fn device_name(device_type: u32) -> String {
    match device_type {
        TYPE_NET => "virtio-net".to_string(),
        TYPE_BLOCK => "virtio-blk".to_string(),
        TYPE_RNG => "virtio-rng".to_string(),
        TYPE_GPU => "virtio-gpu".to_string(),
        TYPE_INPUT => "virtio-input".to_string(),
        other => format!("virtio device type {other}"),
    }
}

/// What an active device is handed back on restore: its memory, interrupt and queues
/// rebuilt from saved state (positions included).
pub struct RestoredQueues {
    pub memory: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<Queue>,
}

/// One virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits, including [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;
    /// Reads the device-specific configuration at `offset`; reads past its end return 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Changes each time the device-specific configuration changes under the driver, so
    /// that a driver reading a multi-byte field twice knows it did not tear.
    fn config_generation(&self) -> u8 {
        0
    }
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]), told
    /// right before [`VirtioDevice::activate`], for devices whose behaviour depends on them.
    fn ack_features(&mut self, _features: u64) {}
    /// The driver set DRIVER_OK: the device takes its queues (one per max size, disabled ones
    /// not ready) and starts serving them.
    fn activate(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), VirtioError>;
    /// Handles everything available on queue `queue_index`. Returns whether the driver must
    /// be interrupted. An error is a device failure (the transport sets DEVICE_NEEDS_RESET).
    fn process_queue(&mut self, queue_index: usize) -> Result<bool, VirtioError>;
    /// Drops the queues and returns to the pre-activation state.
    fn reset(&mut self);
    /// The PCI class code (base class, subclass, interface) this device wants, or None for
    /// the transport's choice by device type.
    fn pci_class_code(&self) -> Option<u32> {
        None
    }
    /// Host memory to expose as a RAM BAR (a boot framebuffer), which the PCI root maps
    /// wherever the BAR points. The transport makes it a 32-bit prefetchable BAR 0 whose
    /// accesses never reach the device.
    fn ram_bar(&self) -> Option<crate::memory::slots::HostMemory> {
        None
    }
    /// The device's own state (not its queues), encoded with [`crate::state::encode`].
    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        Err(StateError::not_snapshottable(
            device_name(self.device_type()),
            "it does not support snapshots",
        ))
    }
    /// The state of the queues an active device holds, in queue order (None when inactive).
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        None
    }
    /// Puts saved state back into a device built the same way, active again with `active`'s
    /// queues when it was active, without the side effects of a reset or an activation.
    /// A refused state leaves the device as it was.
    fn restore_state(
        &mut self,
        _state: &[u8],
        _active: Option<RestoredQueues>,
    ) -> Result<(), StateError> {
        Err(StateError::not_snapshottable(
            device_name(self.device_type()),
            "it does not support snapshots",
        ))
    }
    /// Stop touching guest memory from host threads (input arriving from the host) until
    /// [`VirtioDevice::resume`]; the transport stops its own I/O threads.
    fn quiesce(&mut self) {}
    fn resume(&mut self) {}
}

/// Copies the device-config bytes `config[offset..]` into `data` (zeroes past the end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
