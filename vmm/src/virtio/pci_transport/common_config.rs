//! The common configuration structure (virtio 1.2 section 4.1.4.3): feature negotiation,
//! queue selection and each queue's size, vector, rings and enable; and the values the
//! driver programmed for a queue, turned into a ready [`Queue`] when they are usable.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{VirtioPciDevice, VIRTIO_MSI_NO_VECTOR};
use crate::devices::bus::lock;
use crate::error_chain;
use crate::memory::GuestMemory;
use crate::virtio::STATUS_FEATURES_OK;

/// Why the values the driver programmed for a queue are unusable.
#[derive(Debug, thiserror::Error)]
pub(super) enum QueueConfigError {
    #[error("Maximum size {0} is invalid")]
    MaxSize(u16, #[source] virtio_queue::Error),
    #[error("Size {0} is invalid")]
    Size(u16),
    #[error("Descriptor table {0:#x} is misaligned")]
    DescriptorTable(u64),
    #[error("Driver area {0:#x} is misaligned")]
    DriverArea(u64),
    #[error("Device area {0:#x} is misaligned")]
    DeviceArea(u64),
    #[error("Rings are outside guest memory")]
    OutsideMemory,
}

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueConfig {
    pub(super) max_size: u16,
    pub(super) size: u16,
    pub(super) enabled: bool,
    pub(super) desc: u64,
    pub(super) driver: u64,
    pub(super) device: u64,
}

impl QueueConfig {
    pub(super) fn new(max_size: u16) -> Self {
        QueueConfig { max_size, size: max_size, enabled: false, desc: 0, driver: 0, device: 0 }
    }

    /// A ready `Queue` from the driver's values, or why they are unusable.
    pub(super) fn build(
        &self,
        memory: &GuestMemory,
        event_idx: bool,
    ) -> Result<Queue, QueueConfigError> {
        let mut q =
            Queue::new(self.max_size).map_err(|e| QueueConfigError::MaxSize(self.max_size, e))?;
        // virtio-queue's error for each of these says only "invalid": the value says more.
        q.try_set_size(self.size).map_err(|_| QueueConfigError::Size(self.size))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| QueueConfigError::DescriptorTable(self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| QueueConfigError::DriverArea(self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| QueueConfigError::DeviceArea(self.device))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(memory) {
            return Err(QueueConfigError::OutsideMemory);
        }
        Ok(q)
    }
}

impl VirtioPciDevice {
    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        let count = lock(&self.interrupt.state).msix.len();
        if (vector as usize) < count {
            vector
        } else {
            // Reading back NO_VECTOR tells the driver the vector was refused.
            VIRTIO_MSI_NO_VECTOR
        }
    }

    pub(super) fn common_read(&mut self, offset: u64, data: &mut [u8]) {
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
            (0x15, 1) => u64::from(lock(&self.device).config_generation()),
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

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
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
            Err(e) => self.device_failure(&format!("queue {index}: {}", error_chain(&e))),
        }
    }
}
