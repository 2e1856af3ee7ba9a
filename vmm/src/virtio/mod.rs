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

pub mod block;
pub mod gpu;
pub mod input;
pub mod pci_transport;
pub mod queue;
pub mod rng;

use std::sync::Arc;

use virtio_queue::Queue;

use crate::memory::GuestMemory;

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
}

/// Interrupts a device raises; the transport maps them to MSI-X vectors.
pub trait VirtioInterrupt: Send + Sync {
    fn signal_used_queue(&self, queue_index: u16);
    fn signal_config_change(&self);
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
    /// A memory BAR at a fixed guest-physical address, backed by host memory the machine maps
    /// there (a boot framebuffer), as (address, size). The transport exposes it as a 32-bit
    /// prefetchable BAR 0 whose accesses never reach the device.
    fn fixed_memory_bar(&self) -> Option<(u64, u64)> {
        None
    }
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
