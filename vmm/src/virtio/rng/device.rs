//! The entropy device: one request queue of device-writable buffers, each filled (up to a
//! cap) with random bytes read straight into guest memory.

use std::fs::File;
use std::sync::Arc;

use log::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueState};
use vm_memory::ReadVolatile;

use super::{RngState, VirtioRngError};
use crate::memory::GuestMemory;
use crate::state::{self, StateError};
use crate::virtio::queue::{drain_queue, map_chain, single_queue};
use crate::virtio::{
    RestoredQueues, VirtioDevice, VirtioError, VirtioInterrupt, TYPE_RNG, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};

const RANDOM_SOURCE: &str = "/dev/urandom";
const QUEUE_SIZES: [u16; 1] = [256];
/// Most bytes one request gets, so a guest cannot keep a vCPU busy reading entropy.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

struct Active {
    memory: GuestMemory,
    queue: Queue,
    _interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio entropy device.
pub struct Rng {
    source: File,
    active: Option<Active>,
}

impl Rng {
    pub fn new() -> Result<Rng, VirtioRngError> {
        let source = File::open(RANDOM_SOURCE)
            .map_err(|source| VirtioRngError::Open { path: RANDOM_SOURCE, source })?;
        Ok(Rng { source, active: None })
    }

    /// Fills the chain's writable buffers; returns the bytes written.
    fn handle_chain(
        source: &mut File,
        memory: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let buffers = match map_chain(memory, chain) {
            Ok(b) => b,
            Err(e) => {
                error!("virtio-rng: dropping request: {e}");
                return 0;
            }
        };
        if let Some(fault) = &buffers.fault {
            warn!("virtio-rng: bad request: {fault}");
            return 0;
        }
        let mut written = 0;
        for slice in &buffers.writable {
            let want = slice.len().min(MAX_BYTES_PER_REQUEST - written);
            if want == 0 {
                break;
            }
            let Ok(mut part) = slice.subslice(0, want) else {
                break;
            };
            while !part.is_empty() {
                match source.read_volatile(&mut part) {
                    Ok(0) => break,
                    Ok(n) => {
                        written += n;
                        match part.offset(n) {
                            Ok(rest) => part = rest,
                            Err(_) => break,
                        }
                    }
                    Err(vm_memory::VolatileMemoryError::IOError(e))
                        if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        error!("virtio-rng: reading {RANDOM_SOURCE} failed: {e}");
                        return written as u32;
                    }
                }
            }
        }
        written as u32
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // The entropy device has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), VirtioError> {
        let queue = single_queue(queues)?;
        self.active = Some(Active { memory, queue, _interrupt: interrupt });
        Ok(())
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<bool, VirtioError> {
        if queue_index != 0 {
            return Err(VirtioError::NoSuchQueue(queue_index));
        }
        let Some(Active { memory, queue, .. }) = self.active.as_mut() else {
            return Ok(false);
        };
        let source = &mut self.source;
        drain_queue(queue, memory, |chain| Self::handle_chain(source, memory, chain))
            .map_err(|source| VirtioError::Queue { index: queue_index, source })
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        state::encode("virtio-rng", &RngState { active: self.active.is_some() })
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    fn restore_state(
        &mut self,
        saved: &[u8],
        active: Option<RestoredQueues>,
    ) -> Result<(), StateError> {
        let saved: RngState = state::decode("virtio-rng", saved)?;
        if saved.active != active.is_some() {
            return Err(StateError::invalid("virtio-rng", "activity differs from the transport's"));
        }
        self.active = match active {
            Some(a) => {
                let queue = single_queue(a.queues)
                    .map_err(|e| StateError::invalid("virtio-rng", e.to_string()))?;
                Some(Active { memory: a.memory, queue, _interrupt: a.interrupt })
            }
            None => None,
        };
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::pci_transport::testing::{TestDriver, MSI_ADDR, QUEUE_MSI_DATA};
    use crate::virtio::queue::testing::DESC_F_WRITE;

    #[test]
    fn writable_buffer_is_filled_with_random_bytes() {
        let mut d = TestDriver::new(Box::new(Rng::new().unwrap()));
        d.bring_up();
        d.tq.set_desc(&d.mem, 0, 0x20_0000, 256, DESC_F_WRITE, 0);
        d.tq.push(&d.mem, 0);
        d.notify(0);
        assert_eq!(d.tq.used_idx(&d.mem), 1);
        assert_eq!(d.tq.used_elem(&d.mem, 0), (0, 256));
        let mut buf = [0u8; 256];
        d.mem.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert!(buf.iter().any(|&b| b != 0));
        assert_eq!(d.msis(), vec![(MSI_ADDR, QUEUE_MSI_DATA)]);
    }

    #[test]
    fn huge_request_is_capped() {
        let mut d = TestDriver::new(Box::new(Rng::new().unwrap()));
        d.bring_up();
        d.tq.set_desc(&d.mem, 0, 0x20_0000, 1 << 20, DESC_F_WRITE, 0);
        d.tq.push(&d.mem, 0);
        d.notify(0);
        assert_eq!(d.tq.used_elem(&d.mem, 0), (0, MAX_BYTES_PER_REQUEST as u32));
    }
}
