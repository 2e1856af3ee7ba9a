//! Split-virtqueue helpers shared by the devices: draining a queue with notification
//! suppression, and turning an untrusted descriptor chain into guest-memory slices.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory as _, VolatileSlice};

use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VirtioQueueError {
    #[error("Virtqueue access failed: {0}")]
    Queue(virtio_queue::Error),
    #[error("Available index {avail} is more than a queue ({size}) ahead of {next}")]
    AvailIndexOutOfRange { avail: u16, next: u16, size: u16 },
    #[error("Descriptor chain is cut short (loop, bad next index or unreadable descriptor)")]
    TruncatedChain,
    #[error("Descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    BadBuffer { addr: u64, len: u32 },
    #[error("Device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("Saved queue state is invalid")]
    SavedState(#[source] virtio_queue::Error),
    #[error("Saved queue's rings are outside guest memory")]
    SavedRingsOutsideMemory,
    #[error("Saved queue has {in_flight} buffers in flight; it holds {size}")]
    SavedInFlight { in_flight: u16, size: u16 },
}

impl From<virtio_queue::Error> for VirtioQueueError {
    fn from(e: virtio_queue::Error) -> Self {
        VirtioQueueError::Queue(e)
    }
}

/// A queue's saved state (virtio-queue's `QueueState`, which is not serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for SavedQueue {
    fn from(q: virtio_queue::QueueState) -> SavedQueue {
        SavedQueue {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl SavedQueue {
    /// The queue again, checked like guest input: sizes, alignment, rings inside `memory`
    /// (when ready), and no more buffers in flight than the queue holds.
    pub fn to_queue(&self, memory: &GuestMemory) -> Result<Queue, VirtioQueueError> {
        let state = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        let queue = Queue::try_from(state).map_err(VirtioQueueError::SavedState)?;
        if self.ready && !queue.is_valid(memory) {
            return Err(VirtioQueueError::SavedRingsOutsideMemory);
        }
        let in_flight = self.next_avail.wrapping_sub(self.next_used);
        if in_flight > self.size {
            return Err(VirtioQueueError::SavedInFlight { in_flight, size: self.size });
        }
        Ok(queue)
    }
}

/// Pops every available chain, hands it to `handle` (which returns the number of bytes it
/// wrote into the chain), and returns it to the used ring. Keeps going while the driver adds
/// more, re-arming notifications (or `avail_event` with EVENT_IDX) before it stops. Returns
/// whether the driver wants an interrupt.
/// The one queue of a single-queue device, from the queues the transport activates it with.
pub fn single_queue(queues: Vec<Queue>) -> Result<Queue, crate::virtio::VirtioError> {
    let got = queues.len();
    queues
        .into_iter()
        .next()
        .filter(|_| got == 1)
        .ok_or(crate::virtio::VirtioError::QueueCount { expected: 1, got })
}

pub fn drain_queue<F>(
    queue: &mut Queue,
    memory: &GuestMemory,
    mut handle: F,
) -> Result<bool, VirtioQueueError>
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> u32,
{
    if !queue.ready() {
        return Ok(false);
    }
    let mut used_any = false;
    loop {
        queue.disable_notification(memory)?;
        let avail = queue.avail_idx(memory, Ordering::Acquire)?;
        let next = Wrapping(queue.next_avail());
        if (avail - next).0 > queue.size() {
            return Err(VirtioQueueError::AvailIndexOutOfRange {
                avail: avail.0,
                next: next.0,
                size: queue.size(),
            });
        }
        // The index was checked above, so popping only stops when the ring is drained.
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let len = handle(chain);
            queue.add_used(memory, head, len)?;
            used_any = true;
        }
        if !queue.enable_notification(memory)? {
            break;
        }
    }
    Ok(used_any && queue.needs_notification(memory)?)
}

/// A descriptor chain mapped to guest memory: device-readable slices, then device-writable.
pub struct ChainBuffers<'a> {
    pub readable: Vec<VolatileSlice<'a>>,
    pub writable: Vec<VolatileSlice<'a>>,
    /// A descriptor that could not be used; the request must fail (but may still get a status).
    pub fault: Option<VirtioQueueError>,
    /// The last descriptor is device-writable, mapped and non-empty (where a status byte goes).
    pub ends_writable: bool,
}

impl ChainBuffers<'_> {
    pub fn readable_len(&self) -> usize {
        total_len(&self.readable)
    }
    pub fn writable_len(&self) -> usize {
        total_len(&self.writable)
    }
}

/// Walks `chain` (virtio-queue stops it at loops, out-of-range indices and the 4 GiB limit;
/// a chain whose last descriptor still says NEXT was cut short that way) and maps every
/// buffer. Only a cut-short chain is an error; other faults are recorded in the result.
pub fn map_chain<'a>(
    memory: &'a GuestMemory,
    chain: DescriptorChain<&'a GuestMemory>,
) -> Result<ChainBuffers<'a>, VirtioQueueError> {
    let mut buffers = ChainBuffers {
        readable: Vec::new(),
        writable: Vec::new(),
        fault: None,
        ends_writable: false,
    };
    let mut last_has_next = false;
    for desc in chain {
        last_has_next = desc.has_next();
        let write = desc.is_write_only();
        buffers.ends_writable = false;
        if !write && !buffers.writable.is_empty() && buffers.fault.is_none() {
            buffers.fault = Some(VirtioQueueError::ReadableAfterWritable);
        }
        let slices = guest_slices(memory, desc.addr(), desc.len());
        let Some(slices) = slices else {
            if buffers.fault.is_none() {
                buffers.fault =
                    Some(VirtioQueueError::BadBuffer { addr: desc.addr().0, len: desc.len() });
            }
            continue;
        };
        if write {
            buffers.ends_writable = desc.len() > 0;
            buffers.writable.extend(slices);
        } else {
            buffers.readable.extend(slices);
        }
    }
    if last_has_next {
        return Err(VirtioQueueError::TruncatedChain);
    }
    Ok(buffers)
}

/// The host slices backing `len` bytes at `addr`, or None if any byte is not guest RAM.
fn guest_slices(
    memory: &GuestMemory,
    addr: GuestAddress,
    len: u32,
) -> Option<Vec<VolatileSlice<'_>>> {
    memory.get_slices(addr, len as usize).collect::<Result<Vec<_>, _>>().ok()
}

pub fn total_len(slices: &[VolatileSlice<'_>]) -> usize {
    slices.iter().map(|s| s.len()).sum()
}

/// Splits `slices` after `at` bytes (clamped to their total length).
pub fn split_slices<'a>(
    slices: &[VolatileSlice<'a>],
    at: usize,
) -> (Vec<VolatileSlice<'a>>, Vec<VolatileSlice<'a>>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = at;
    for s in slices {
        if left >= s.len() {
            left -= s.len();
            head.push(*s);
        } else if left == 0 {
            tail.push(*s);
        } else {
            // `0 < left < s.len()`, so both halves are in bounds.
            if let Ok((a, b)) = s.split_at(left) {
                head.push(a);
                tail.push(b);
            }
            left = 0;
        }
    }
    (head, tail)
}

/// Copies the first bytes of `slices` into `buf`; returns how many were available.
pub fn copy_from_slices(slices: &[VolatileSlice<'_>], buf: &mut [u8]) -> usize {
    let mut done = 0;
    for s in slices {
        if done == buf.len() {
            break;
        }
        done += s.copy_to(&mut buf[done..]);
    }
    done
}

/// Copies `buf` into the start of `slices`; returns how many bytes fit.
pub fn copy_to_slices(slices: &[VolatileSlice<'_>], buf: &[u8]) -> usize {
    let mut done = 0;
    for s in slices {
        if done == buf.len() {
            break;
        }
        let n = s.len().min(buf.len() - done);
        s.copy_from(&buf[done..done + n]);
        done += n;
    }
    done
}

#[cfg(test)]
pub(crate) mod testing {
    //! A hand-laid split virtqueue in a test guest memory, driven the way a driver does.
    #![allow(clippy::unwrap_used)] // Test scaffolding fails loudly on purpose.

    use vm_memory::{Bytes, GuestAddress};

    use crate::memory::GuestMemory;

    pub const DESC_F_NEXT: u16 = 1;
    pub const DESC_F_WRITE: u16 = 2;

    /// Descriptor table, avail ring and used ring at fixed addresses.
    pub struct TestQueue {
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        avail_idx: u16,
    }

    impl TestQueue {
        pub fn new(size: u16, base: u64) -> Self {
            TestQueue {
                size,
                desc: base,
                avail: base + 16 * u64::from(size),
                used: base + 0x4000,
                avail_idx: 0,
            }
        }

        pub fn set_desc(
            &self,
            mem: &GuestMemory,
            i: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let at = GuestAddress(self.desc + 16 * u64::from(i));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, at).unwrap();
        }

        /// Publishes chain `head` in the avail ring.
        pub fn push(&mut self, mem: &GuestMemory, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
        }

        /// Forces the avail index (for hostile-driver tests).
        pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
            self.avail_idx = idx;
            mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
        }

        pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
            mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// (id, len) of used element `n`.
        pub fn used_elem(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * u64::from(n % self.size);
            (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
        }
    }

    pub fn memory(mib: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::testing::*;
    use super::*;
    use virtio_queue::QueueOwnedT;

    fn ready_queue(tq: &TestQueue, mem: &GuestMemory) -> Queue {
        let mut q = Queue::new(tq.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(tq.desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(tq.avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(tq.used)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    fn map_first(
        q: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<(usize, usize, bool, bool), VirtioQueueError> {
        let chain = q.iter(mem).unwrap().next().unwrap();
        map_chain(mem, chain)
            .map(|b| (b.readable_len(), b.writable_len(), b.fault.is_some(), b.ends_writable))
    }

    #[test]
    fn chain_maps_readable_then_writable_buffers() {
        let mem = memory(1);
        let mut tq = TestQueue::new(8, 0x1000);
        tq.set_desc(&mem, 0, 0x10000, 16, DESC_F_NEXT, 1);
        tq.set_desc(&mem, 1, 0x11000, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
        tq.set_desc(&mem, 2, 0x12000, 1, DESC_F_WRITE, 0);
        tq.push(&mem, 0);
        let mut q = ready_queue(&tq, &mem);
        assert_eq!(map_first(&mut q, &mem).unwrap(), (16, 513, false, true));
    }

    #[test]
    fn descriptor_chain_loop_is_rejected() {
        let mem = memory(1);
        let mut tq = TestQueue::new(8, 0x1000);
        tq.set_desc(&mem, 0, 0x10000, 16, DESC_F_NEXT, 1);
        tq.set_desc(&mem, 1, 0x11000, 16, DESC_F_NEXT, 0);
        tq.push(&mem, 0);
        let mut q = ready_queue(&tq, &mem);
        assert!(matches!(map_first(&mut q, &mem), Err(VirtioQueueError::TruncatedChain)));
    }

    #[test]
    fn next_index_out_of_range_is_rejected() {
        let mem = memory(1);
        let mut tq = TestQueue::new(8, 0x1000);
        tq.set_desc(&mem, 0, 0x10000, 16, DESC_F_NEXT, 200);
        tq.push(&mem, 0);
        let mut q = ready_queue(&tq, &mem);
        assert!(matches!(map_first(&mut q, &mem), Err(VirtioQueueError::TruncatedChain)));
    }

    #[test]
    fn buffer_outside_guest_memory_is_a_fault() {
        let mem = memory(1);
        let mut tq = TestQueue::new(8, 0x1000);
        tq.set_desc(&mem, 0, 0xffff_0000, 16, DESC_F_NEXT, 1);
        tq.set_desc(&mem, 1, 0x11000, 1, DESC_F_WRITE, 0);
        tq.push(&mem, 0);
        let mut q = ready_queue(&tq, &mem);
        assert_eq!(map_first(&mut q, &mem).unwrap(), (0, 1, true, true));
    }

    #[test]
    fn readable_after_writable_is_a_fault() {
        let mem = memory(1);
        let mut tq = TestQueue::new(8, 0x1000);
        tq.set_desc(&mem, 0, 0x11000, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
        tq.set_desc(&mem, 1, 0x10000, 16, 0, 0);
        tq.push(&mem, 0);
        let mut q = ready_queue(&tq, &mem);
        assert_eq!(map_first(&mut q, &mem).unwrap(), (16, 1, true, false));
    }

    #[test]
    fn avail_index_too_far_ahead_is_a_queue_error() {
        let mem = memory(1);
        let mut tq = TestQueue::new(8, 0x1000);
        tq.set_avail_idx(&mem, 100);
        let mut q = ready_queue(&tq, &mem);
        let r = drain_queue(&mut q, &mem, |_| 0);
        assert!(matches!(r, Err(VirtioQueueError::AvailIndexOutOfRange { .. })));
    }

    #[test]
    fn split_and_copy_helpers_respect_boundaries() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let slices = [VolatileSlice::from(&mut a[..]), VolatileSlice::from(&mut b[..])];
        let (head, tail) = split_slices(&slices, 4);
        assert_eq!((total_len(&head), total_len(&tail)), (4, 4));
        assert_eq!(copy_to_slices(&tail, &[9; 10]), 4);
        let mut out = [0u8; 8];
        assert_eq!(copy_from_slices(&slices, &mut out), 8);
        assert_eq!(out, [0, 0, 0, 0, 9, 9, 9, 9]);
    }
}
