//! The virtio-blk device: one request queue, served synchronously by whichever thread the
//! transport calls `process_queue` on (the notifying vCPU, or the queue's I/O thread).
//! Data moves straight between guest memory and the disk (preadv/pwritev on the guest
//! buffers), never through a per-request copy.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueState};
use vm_memory::VolatileSlice;

use super::*;
use crate::devices::bus::lock;
use crate::memory::GuestMemory;
use crate::state::{self, StateError};
use crate::virtio::queue::{
    copy_from_slices, copy_to_slices, drain_queue, map_chain, single_queue, split_slices, total_len,
};
use crate::virtio::{
    read_config_bytes, RestoredQueues, VirtioDevice, VirtioError, VirtioInterrupt, TYPE_BLOCK,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data segments per request (the queue minus header and status descriptors, as QEMU does).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest discard / write-zeroes request, in sectors (2 GiB), and one segment per request.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Discard granularity in sectors (4 KiB).
const DISCARD_ALIGNMENT: u32 = 8;
const REQUEST_HEADER_SIZE: usize = 16;
const DISCARD_SEGMENT_SIZE: usize = 16;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// struct virtio_blk_config up to write_zeroes_may_unmap and its padding.
const CONFIG_SIZE: usize = 0x3c;

struct Active {
    memory: GuestMemory,
    queue: Queue,
}

/// The medium's size as the guest reads it, shared with a removable drive's [`MediaHandle`].
struct Medium {
    capacity_sectors: AtomicU64,
    /// The config-space generation: a changed medium makes the driver read the capacity again.
    generation: AtomicU8,
    /// The active driver's interrupt, for the configuration change a new medium raises.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
}

/// Tells the guest that a removable drive's medium changed (a CD inserted or ejected). The
/// host swaps the backend under the device first (the device reads through a backend that
/// can be switched, see `machine::disks`), then calls [`MediaHandle::changed`].
#[derive(Clone)]
pub struct MediaHandle(Arc<Medium>);

impl MediaHandle {
    /// The drive now holds `size` bytes (0: empty): the guest reads the new capacity after
    /// a configuration-change interrupt. Requests past the new end fail from now on.
    pub fn changed(&self, size: u64) {
        self.0.capacity_sectors.store(size / SECTOR_SIZE, Ordering::Release);
        self.0.generation.fetch_add(1, Ordering::AcqRel);
        let interrupt = lock(&self.0.interrupt).clone();
        if let Some(interrupt) = interrupt {
            interrupt.signal_config_change();
        }
    }

    /// The size the guest is told, in bytes.
    pub fn size(&self) -> u64 {
        self.0.capacity_sectors.load(Ordering::Acquire) * SECTOR_SIZE
    }
}

/// Request counters, logged at debug level: what sizes the guest's driver really sends.
#[derive(Default)]
struct Stats {
    queue_runs: Cell<u64>,
    reads: Cell<u64>,
    read_bytes: Cell<u64>,
    read_max: Cell<u64>,
    writes: Cell<u64>,
    write_bytes: Cell<u64>,
}

impl Stats {
    fn add(counter: &Cell<u64>, n: u64) {
        counter.set(counter.get().wrapping_add(n));
    }

    fn log(&self) {
        log::debug!(
            "virtio-blk: {} queue runs; {} reads of {} bytes (largest {}); {} writes of {} bytes",
            self.queue_runs.get(),
            self.reads.get(),
            self.read_bytes.get(),
            self.read_max.get(),
            self.writes.get(),
            self.write_bytes.get()
        );
    }
}

/// Every how many reads the counters are logged.
const STATS_EVERY: u64 = 256;

/// A virtio block device over one disk backend.
pub struct Block {
    stats: Stats,
    disk: Box<dyn disk::BlockBackend>,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    medium: Arc<Medium>,
    config: [u8; CONFIG_SIZE],
    active: Option<Active>,
}

/// Outcome of one request: status byte and data bytes written into the chain.
struct Completion {
    status: u8,
    written: usize,
}

impl Completion {
    fn status(status: u8) -> Self {
        Completion { status, written: 0 }
    }
}

impl Block {
    /// A block device over `disk`. `id` (the serial the guest reads with GET_ID) is cut to
    /// 20 bytes. A disk whose size is not a multiple of 512 loses its partial last sector.
    pub fn new(
        disk: Box<dyn disk::BlockBackend>,
        read_only: bool,
        id: String,
    ) -> Result<Block, VirtioBlockError> {
        if disk.size() / SECTOR_SIZE == 0 {
            return Err(VirtioBlockError::Empty);
        }
        Self::build(disk, read_only, id)
    }

    /// A read-only drive whose medium the host can change while the guest runs (a CD),
    /// possibly empty (`disk` of size 0), and the handle that tells the guest of a change.
    pub fn removable(
        disk: Box<dyn disk::BlockBackend>,
        id: String,
    ) -> Result<(Block, MediaHandle), VirtioBlockError> {
        let block = Self::build(disk, true, id)?;
        let handle = MediaHandle(block.medium.clone());
        Ok((block, handle))
    }

    fn build(
        disk: Box<dyn disk::BlockBackend>,
        read_only: bool,
        id: String,
    ) -> Result<Block, VirtioBlockError> {
        if !read_only && !disk.is_writable() {
            return Err(VirtioBlockError::BackendReadOnly);
        }
        let capacity_sectors = disk.size() / SECTOR_SIZE;
        if disk.size() & (SECTOR_SIZE - 1) != 0 {
            warn!("virtio-blk: disk size {} is not a multiple of 512", disk.size());
        }
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);

        let mut config = [0u8; CONFIG_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0x0c, &SEG_MAX.to_le_bytes());
        put(0x14, &(SECTOR_SIZE as u32).to_le_bytes());
        put(0x22, &1u16.to_le_bytes()); // num_queues
        put(0x24, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x28, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(0x2c, &DISCARD_ALIGNMENT.to_le_bytes());
        put(0x30, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x34, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(0x38, &[1]); // write_zeroes_may_unmap
        Ok(Block {
            stats: Stats::default(),
            disk,
            read_only,
            id: id_bytes,
            medium: Arc::new(Medium {
                capacity_sectors: AtomicU64::new(capacity_sectors),
                generation: AtomicU8::new(0),
                interrupt: Mutex::new(None),
            }),
            config,
            active: None,
        })
    }

    fn capacity_sectors(&self) -> u64 {
        self.medium.capacity_sectors.load(Ordering::Acquire)
    }

    /// Handles one chain; returns the number of bytes written into it (data + status).
    fn handle_chain(&self, memory: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let buffers = match map_chain(memory, chain) {
            Ok(b) => b,
            Err(e) => {
                error!("virtio-blk: dropping request: {e}");
                return 0;
            }
        };
        let writable_len = buffers.writable_len();
        if writable_len == 0 || !buffers.ends_writable {
            error!("virtio-blk: dropping request without a status byte");
            return 0;
        }
        let (data_in, status_slot) = split_slices(&buffers.writable, writable_len - 1);
        let completion = match &buffers.fault {
            Some(fault) => {
                warn!("virtio-blk: bad request: {fault}");
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
            None => self.execute(&buffers.readable, &data_in),
        };
        copy_to_slices(&status_slot, &[completion.status]);
        (completion.written + 1) as u32
    }

    fn execute(&self, readable: &[VolatileSlice<'_>], data_in: &[VolatileSlice<'_>]) -> Completion {
        let mut header = [0u8; REQUEST_HEADER_SIZE];
        if copy_from_slices(readable, &mut header) < REQUEST_HEADER_SIZE {
            warn!("virtio-blk: request header too short");
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let (_, data_out) = split_slices(readable, REQUEST_HEADER_SIZE);

        match request_type {
            VIRTIO_BLK_T_IN => {
                if total_len(&data_out) != 0 {
                    warn!("virtio-blk: read request with a device-readable data buffer");
                    return Completion::status(VIRTIO_BLK_S_IOERR);
                }
                let len = total_len(data_in);
                let Some(offset) = self.checked_range(sector, len as u64) else {
                    return Completion::status(VIRTIO_BLK_S_IOERR);
                };
                Stats::add(&self.stats.reads, 1);
                Stats::add(&self.stats.read_bytes, len as u64);
                self.stats.read_max.set(self.stats.read_max.get().max(len as u64));
                if self.stats.reads.get().is_multiple_of(STATS_EVERY) {
                    self.stats.log();
                }
                match self.disk.read_vectored_at(data_in, offset) {
                    Ok(()) => Completion { status: VIRTIO_BLK_S_OK, written: len },
                    Err(e) => {
                        error!("virtio-blk: {e}");
                        Completion::status(VIRTIO_BLK_S_IOERR)
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Completion::status(VIRTIO_BLK_S_IOERR);
                }
                if total_len(data_in) != 0 {
                    warn!("virtio-blk: write request with a device-writable data buffer");
                    return Completion::status(VIRTIO_BLK_S_IOERR);
                }
                let Some(offset) = self.checked_range(sector, total_len(&data_out) as u64) else {
                    return Completion::status(VIRTIO_BLK_S_IOERR);
                };
                Stats::add(&self.stats.writes, 1);
                Stats::add(&self.stats.write_bytes, total_len(&data_out) as u64);
                self.result(self.disk.write_vectored_at(&data_out, offset))
            }
            VIRTIO_BLK_T_FLUSH => self.result(self.disk.flush()),
            VIRTIO_BLK_T_GET_ID => {
                let written = copy_to_slices(data_in, &self.id);
                Completion { status: VIRTIO_BLK_S_OK, written }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return Completion::status(VIRTIO_BLK_S_IOERR);
                }
                self.discard_or_zero(request_type, &data_out)
            }
            other => {
                warn!("virtio-blk: unsupported request type {other}");
                Completion::status(VIRTIO_BLK_S_UNSUPP)
            }
        }
    }

    /// Byte offset of `len` bytes at `sector`, if the range is whole sectors inside the disk.
    fn checked_range(&self, sector: u64, len: u64) -> Option<u64> {
        let end_ok =
            sector.checked_add(len / SECTOR_SIZE).is_some_and(|end| end <= self.capacity_sectors());
        if len & (SECTOR_SIZE - 1) != 0 || !end_ok {
            warn!("virtio-blk: request of {len} bytes at sector {sector} is out of range");
            return None;
        }
        Some(sector * SECTOR_SIZE)
    }

    fn result(&self, r: Result<(), disk::DiskError>) -> Completion {
        match r {
            Ok(()) => Completion::status(VIRTIO_BLK_S_OK),
            Err(e) => {
                error!("virtio-blk: {e}");
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    fn discard_or_zero(&self, request_type: u32, data_out: &[VolatileSlice<'_>]) -> Completion {
        let len = total_len(data_out);
        let count = len / DISCARD_SEGMENT_SIZE;
        if len & (DISCARD_SEGMENT_SIZE - 1) != 0
            || count == 0
            || count > MAX_DISCARD_SEGMENTS as usize
        {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        let mut segment = [0u8; DISCARD_SEGMENT_SIZE];
        copy_from_slices(data_out, &mut segment);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&segment[0..8]);
        let sector = u64::from_le_bytes(sector_bytes);
        let num_sectors = u32::from_le_bytes([segment[8], segment[9], segment[10], segment[11]]);
        let flags = u32::from_le_bytes([segment[12], segment[13], segment[14], segment[15]]);
        // Discard must refuse the unmap flag; write-zeroes knows only that flag.
        let bad_flags = if request_type == VIRTIO_BLK_T_DISCARD {
            flags != 0
        } else {
            flags & !WRITE_ZEROES_FLAG_UNMAP != 0
        };
        if bad_flags {
            return Completion::status(VIRTIO_BLK_S_UNSUPP);
        }
        if num_sectors > MAX_DISCARD_SECTORS {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        let bytes = u64::from(num_sectors) * SECTOR_SIZE;
        let Some(offset) = self.checked_range(sector, bytes) else {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        };
        if request_type == VIRTIO_BLK_T_DISCARD {
            self.result(self.disk.discard(offset, bytes))
        } else {
            self.result(self.disk.write_zeroes(offset, bytes))
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = self.config;
        // The capacity changes with a removable drive's medium; the rest never does.
        config[..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn config_generation(&self) -> u8 {
        self.medium.generation.load(Ordering::Acquire)
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
        warn!("virtio-blk: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), VirtioError> {
        let queue = single_queue(queues)?;
        self.active = Some(Active { memory, queue });
        *lock(&self.medium.interrupt) = Some(interrupt);
        Ok(())
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<bool, VirtioError> {
        if queue_index != 0 {
            return Err(VirtioError::NoSuchQueue(queue_index));
        }
        // Not activated: nothing to do.
        let Some(mut active) = self.active.take() else {
            return Ok(false);
        };
        Stats::add(&self.stats.queue_runs, 1);
        let Active { memory, queue, .. } = &mut active;
        let result = drain_queue(queue, memory, |chain| self.handle_chain(memory, chain));
        self.active = Some(active);
        result.map_err(|source| VirtioError::Queue { index: queue_index, source })
    }

    fn reset(&mut self) {
        self.stats.log();
        self.active = None;
        *lock(&self.medium.interrupt) = None;
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        state::encode(
            "virtio-blk",
            &BlockState {
                capacity_sectors: self.capacity_sectors(),
                read_only: self.read_only,
                id: self.id.to_vec(),
                active: self.active.is_some(),
            },
        )
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

    fn restore_state(
        &mut self,
        saved: &[u8],
        active: Option<RestoredQueues>,
    ) -> Result<(), StateError> {
        let saved: BlockState = state::decode("virtio-blk", saved)?;
        if saved.capacity_sectors != self.capacity_sectors()
            || saved.read_only != self.read_only
            || saved.id != self.id
        {
            return Err(StateError::invalid("virtio-blk", "the disk differs from the saved one"));
        }
        if saved.active != active.is_some() {
            return Err(StateError::invalid("virtio-blk", "activity differs from the transport's"));
        }
        self.active = match active {
            Some(a) => {
                let queue = single_queue(a.queues)
                    .map_err(|e| StateError::invalid("virtio-blk", e.to_string()))?;
                *lock(&self.medium.interrupt) = Some(a.interrupt);
                Some(Active { memory: a.memory, queue })
            }
            None => None,
        };
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stats.log();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::pci::PciDevice;
    use crate::virtio::pci_transport::testing::{
        TestDriver, CONFIG_MSI_DATA, MSI_ADDR, QUEUE_MSI_DATA,
    };
    use crate::virtio::queue::testing::{DESC_F_NEXT, DESC_F_WRITE};

    const HEADER: u64 = 0x20_0000;
    const DATA: u64 = 0x21_0000;
    const STATUS: u64 = 0x30_0000;
    const DISK_SECTORS: u64 = 64;

    struct Setup {
        d: TestDriver,
        file: tempfile::NamedTempFile,
        next_head: u16,
    }

    fn setup(read_only: bool) -> Setup {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let contents: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
        file.write_all(&contents).unwrap();
        let raw = disk::RawFile::open(file.path(), read_only).unwrap();
        let block = Block::new(Box::new(raw), read_only, "hutch-test-disk".into()).unwrap();
        let mut d = TestDriver::new(Box::new(block));
        d.bring_up();
        Setup { d, file, next_head: 0 }
    }

    impl Setup {
        /// Submits header + optional data descriptor + status descriptor; returns the status
        /// byte and the used length.
        fn submit(
            &mut self,
            req_type: u32,
            sector: u64,
            data: Option<(u64, u32, u16)>,
        ) -> (u8, u32) {
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&req_type.to_le_bytes());
            header[8..16].copy_from_slice(&sector.to_le_bytes());
            self.d.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
            self.d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let h = self.next_head;
            self.next_head = (h + 3) % 255;
            self.d.tq.set_desc(&self.d.mem, h, HEADER, 16, DESC_F_NEXT, h + 1);
            let status_index = match data {
                Some((addr, len, flags)) => {
                    self.d.tq.set_desc(&self.d.mem, h + 1, addr, len, flags | DESC_F_NEXT, h + 2);
                    h + 2
                }
                None => h + 1,
            };
            if status_index == h + 1 {
                self.d.tq.set_desc(&self.d.mem, h, HEADER, 16, DESC_F_NEXT, status_index);
            }
            self.d.tq.set_desc(&self.d.mem, status_index, STATUS, 1, DESC_F_WRITE, 0);
            self.run(h)
        }

        fn run(&mut self, head: u16) -> (u8, u32) {
            let before = self.d.tq.used_idx(&self.d.mem);
            self.d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            self.d.tq.push(&self.d.mem, head);
            self.d.notify(0);
            assert_eq!(self.d.tq.used_idx(&self.d.mem), before.wrapping_add(1), "not completed");
            let (id, len) = self.d.tq.used_elem(&self.d.mem, before);
            assert_eq!(id, u32::from(head));
            (self.d.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }

        fn file_bytes(&self) -> Vec<u8> {
            std::fs::read(self.file.path()).unwrap()
        }
    }

    #[test]
    fn read_request_returns_file_bytes_and_signals_msi() {
        let mut s = setup(false);
        let (status, len) = s.submit(VIRTIO_BLK_T_IN, 2, Some((DATA, 1024, DESC_F_WRITE)));
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(len, 1025);
        let mut got = vec![0u8; 1024];
        s.d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, s.file_bytes()[1024..2048]);
        assert_eq!(s.d.msis(), vec![(MSI_ADDR, QUEUE_MSI_DATA)]);
    }

    #[test]
    fn write_request_reaches_the_file() {
        let mut s = setup(false);
        s.d.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        let (status, len) = s.submit(VIRTIO_BLK_T_OUT, 3, Some((DATA, 512, 0)));
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
        let bytes = s.file_bytes();
        assert!(bytes[1536..2048].iter().all(|&b| b == 0x5a));
        assert_eq!(bytes[2048], (2048 % 251) as u8);
    }

    #[test]
    fn flush_succeeds() {
        let mut s = setup(false);
        assert_eq!(s.submit(VIRTIO_BLK_T_FLUSH, 0, None).0, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mut s = setup(false);
        let (status, len) = s.submit(VIRTIO_BLK_T_GET_ID, 0, Some((DATA, 20, DESC_F_WRITE)));
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        s.d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..15], b"hutch-test-disk");
    }

    #[test]
    fn read_only_disk_refuses_writes_with_an_error_status() {
        let mut s = setup(true);
        let (status, _) = s.submit(VIRTIO_BLK_T_OUT, 0, Some((DATA, 512, 0)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert_eq!(s.file_bytes()[0..4], [0, 1, 2, 3]);
    }

    #[test]
    fn read_only_disk_offers_ro_and_no_discard() {
        let raw = |ro| {
            let file = tempfile::NamedTempFile::new().unwrap();
            file.as_file().set_len(4096).unwrap();
            let b =
                Block::new(Box::new(disk::RawFile::open(file.path(), ro).unwrap()), ro, "x".into());
            b.unwrap().features()
        };
        let ro = raw(true);
        assert_ne!(ro & VIRTIO_BLK_F_RO, 0);
        assert_eq!(ro & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(raw(false) & VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn sector_past_the_end_is_an_io_error() {
        let mut s = setup(false);
        let (status, _) =
            s.submit(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, Some((DATA, 1024, DESC_F_WRITE)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        let (status, _) = s.submit(VIRTIO_BLK_T_IN, u64::MAX, Some((DATA, 512, DESC_F_WRITE)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn header_too_short_is_an_io_error() {
        let mut s = setup(false);
        s.d.tq.set_desc(&s.d.mem, 0, HEADER, 8, DESC_F_NEXT, 1);
        s.d.tq.set_desc(&s.d.mem, 1, STATUS, 1, DESC_F_WRITE, 0);
        assert_eq!(s.run(0).0, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn buffer_outside_guest_ram_is_an_io_error() {
        let mut s = setup(false);
        let (status, len) = s.submit(VIRTIO_BLK_T_IN, 0, Some((0x7000_0000, 512, DESC_F_WRITE)));
        assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1));
    }

    #[test]
    fn length_past_guest_memory_is_an_io_error() {
        let mut s = setup(false);
        let (status, _) = s.submit(VIRTIO_BLK_T_IN, 0, Some((DATA, 0x1000_0000, DESC_F_WRITE)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn chain_longer_than_4_gib_is_dropped_without_panic() {
        let mut s = setup(false);
        let (status, len) = s.submit(VIRTIO_BLK_T_IN, 0, Some((DATA, u32::MAX, DESC_F_WRITE)));
        assert_eq!((status, len), (0xff, 0));
    }

    #[test]
    fn data_buffer_with_wrong_direction_is_an_io_error() {
        let mut s = setup(false);
        let (status, len) = s.submit(VIRTIO_BLK_T_IN, 0, Some((DATA, 512, 0)));
        assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1));
        let before = s.file_bytes();
        let (status, _) = s.submit(VIRTIO_BLK_T_OUT, 0, Some((DATA, 512, DESC_F_WRITE)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert_eq!(s.file_bytes(), before);
    }

    #[test]
    fn event_idx_rearms_avail_event_and_suppresses_interrupts() {
        let mut s = setup(false);
        s.submit(VIRTIO_BLK_T_FLUSH, 0, None);
        s.submit(VIRTIO_BLK_T_FLUSH, 0, None);
        // avail_event (after the used ring) tells the driver to notify for the next entry.
        let avail_event_addr = s.d.tq.used + 4 + 8 * u64::from(s.d.tq.size);
        let avail_event: u16 = s.d.mem.read_obj(GuestAddress(avail_event_addr)).unwrap();
        assert_eq!(avail_event, 2);
        // used_event stayed 0: only the first completion interrupts.
        assert_eq!(s.d.msis().len(), 1);
        // The driver asks to hear about the completion after used index 2.
        let used_event_addr = s.d.tq.avail + 4 + 2 * u64::from(s.d.tq.size);
        s.d.mem.write_obj(2u16, GuestAddress(used_event_addr)).unwrap();
        s.submit(VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(s.d.msis().len(), 2);
    }

    #[test]
    fn descriptor_loop_is_dropped_without_panic() {
        let mut s = setup(false);
        s.d.tq.set_desc(&s.d.mem, 0, HEADER, 16, DESC_F_NEXT, 1);
        s.d.tq.set_desc(&s.d.mem, 1, STATUS, 1, DESC_F_WRITE | DESC_F_NEXT, 0);
        let (status, len) = s.run(0);
        assert_eq!((status, len), (0xff, 0), "no status written, nothing used");
    }

    #[test]
    fn next_index_out_of_range_is_dropped_without_panic() {
        let mut s = setup(false);
        s.d.tq.set_desc(&s.d.mem, 0, HEADER, 16, DESC_F_NEXT, 9999);
        assert_eq!(s.run(0), (0xff, 0));
    }

    #[test]
    fn chain_without_status_byte_is_dropped() {
        let mut s = setup(false);
        s.d.tq.set_desc(&s.d.mem, 0, HEADER, 16, 0, 0);
        assert_eq!(s.run(0), (0xff, 0));
    }

    #[test]
    fn write_zeroes_and_discard_clear_the_range() {
        let mut s = setup(false);
        let segment = |sector: u64, n: u32, flags: u32| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&sector.to_le_bytes());
            b[8..12].copy_from_slice(&n.to_le_bytes());
            b[12..16].copy_from_slice(&flags.to_le_bytes());
            b
        };
        s.d.mem.write_slice(&segment(8, 8, 0), GuestAddress(DATA)).unwrap();
        assert_eq!(s.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((DATA, 16, 0))).0, VIRTIO_BLK_S_OK);
        let bytes = s.file_bytes();
        assert!(bytes[4096..8192].iter().all(|&b| b == 0));
        assert_ne!(bytes[8192], 0);
        s.d.mem.write_slice(&segment(0, 8, 1), GuestAddress(DATA)).unwrap();
        assert_eq!(s.submit(VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16, 0))).0, VIRTIO_BLK_S_UNSUPP);
        s.d.mem.write_slice(&segment(60, 8, 0), GuestAddress(DATA)).unwrap();
        assert_eq!(s.submit(VIRTIO_BLK_T_DISCARD, 0, Some((DATA, 16, 0))).0, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn unknown_request_is_unsupported() {
        let mut s = setup(false);
        assert_eq!(s.submit(99, 0, None).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let mut s = setup(false);
        assert_eq!(s.d.read(0x1000, 8), DISK_SECTORS);
        assert_eq!(s.d.read(0x1000 + 0x0c, 4), u64::from(SEG_MAX));
        assert_eq!(s.d.read(0x1000 + 0x14, 4), 512);
    }

    #[test]
    fn restored_block_device_serves_the_next_request_on_the_saved_queue() {
        let mut s = setup(false);
        s.submit(VIRTIO_BLK_T_IN, 2, Some((DATA, 512, DESC_F_WRITE)));
        s.submit(VIRTIO_BLK_T_FLUSH, 0, None);
        let saved = s.d.dev.save_state().unwrap();

        let raw = disk::RawFile::open(s.file.path(), false).unwrap();
        let block = Block::new(Box::new(raw), false, "hutch-test-disk".into()).unwrap();
        let mut fresh =
            crate::virtio::VirtioPciDevice::new(Box::new(block), s.d.mem.clone(), s.d.sink.clone())
                .unwrap();
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state().unwrap(), saved);
        s.d.dev = fresh;
        assert_eq!(s.d.status(), 0xf);
        let (status, _) = s.submit(VIRTIO_BLK_T_IN, 5, Some((DATA, 512, DESC_F_WRITE)));
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(s.d.tq.used_idx(&s.d.mem), 3, "the used index continues from the saved one");
        let mut got = vec![0u8; 512];
        s.d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, s.file_bytes()[5 * 512..6 * 512]);
    }

    /// An empty removable drive brought up by the test driver, its switchable backend and
    /// its media handle.
    fn empty_drive() -> (Setup, crate::machine::disks::SwitchableDisk, MediaHandle) {
        use crate::machine::disks::{EmptyMedium, SwitchableDisk};
        let switchable = SwitchableDisk::new(Box::new(EmptyMedium));
        let (block, media) =
            Block::removable(Box::new(switchable.clone()), "hutch-disk1".into()).unwrap();
        let mut d = TestDriver::new(Box::new(block));
        d.bring_up();
        let unused = tempfile::NamedTempFile::new().unwrap();
        (Setup { d, file: unused, next_head: 0 }, switchable, media)
    }

    #[test]
    fn a_medium_put_in_an_empty_drive_shows_its_size_after_a_config_interrupt() {
        let (mut s, switchable, media) = empty_drive();
        let read = |s: &mut Setup, sector| {
            s.submit(VIRTIO_BLK_T_IN, sector, Some((DATA, 512, DESC_F_WRITE))).0
        };
        assert_eq!(s.d.read(0x1000, 8), 0, "an empty drive has no sectors");
        assert_eq!(read(&mut s, 0), VIRTIO_BLK_S_IOERR);
        let generation = s.d.read(0x15, 1);
        let config_irqs =
            |d: &TestDriver| d.msis().iter().filter(|(_, data)| *data == CONFIG_MSI_DATA).count();
        assert_eq!(config_irqs(&s.d), 0);

        let mut file = tempfile::NamedTempFile::new().unwrap();
        let contents: Vec<u8> = (0..8 * 512).map(|i| (i % 253) as u8).collect();
        file.write_all(&contents).unwrap();
        let iso = disk::RawFile::open(file.path(), true).unwrap();
        switchable.replace(Box::new(iso));
        media.changed(8 * 512);

        assert_eq!(config_irqs(&s.d), 1, "the driver hears of the change");
        assert_ne!(s.d.read(0x15, 1), generation, "the config generation moved");
        assert_eq!(s.d.read(0x1000, 8), 8);
        assert_eq!(read(&mut s, 3), VIRTIO_BLK_S_OK);
        let mut got = vec![0u8; 512];
        s.d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, contents[3 * 512..4 * 512]);
        let (status, _) = s.submit(VIRTIO_BLK_T_OUT, 0, Some((DATA, 512, 0)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "a CD stays read-only");

        switchable.replace(Box::new(crate::machine::disks::EmptyMedium));
        media.changed(0);
        assert_eq!((config_irqs(&s.d), s.d.read(0x1000, 8)), (2, 0), "ejected");
        assert_eq!(read(&mut s, 0), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn a_fixed_disk_refuses_to_be_empty_but_a_removable_drive_may_be() {
        use crate::machine::disks::EmptyMedium;
        assert!(matches!(
            Block::new(Box::new(EmptyMedium), true, "x".into()),
            Err(VirtioBlockError::Empty)
        ));
        assert!(Block::removable(Box::new(EmptyMedium), "x".into()).is_ok());
    }

    #[test]
    fn a_drive_changed_before_the_driver_runs_raises_no_interrupt() {
        use crate::machine::disks::{EmptyMedium, SwitchableDisk};
        let switchable = SwitchableDisk::new(Box::new(EmptyMedium));
        let (block, media) = Block::removable(Box::new(switchable), "x".into()).unwrap();
        let mut d = TestDriver::new(Box::new(block));
        media.changed(4096);
        assert!(d.msis().is_empty());
        assert_eq!(d.read(0x1000, 8), 8, "the driver reads the new size when it comes");
    }

    #[test]
    fn block_state_of_another_disk_is_refused() {
        let s = setup(false);
        let saved = s.d.dev.save_state().unwrap();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0u8; 4096]).unwrap();
        let raw = disk::RawFile::open(file.path(), false).unwrap();
        let block = Block::new(Box::new(raw), false, "hutch-test-disk".into()).unwrap();
        let mut fresh =
            crate::virtio::VirtioPciDevice::new(Box::new(block), s.d.mem.clone(), s.d.sink.clone())
                .unwrap();
        let before = fresh.save_state().unwrap();
        assert!(matches!(fresh.restore_state(&saved), Err(StateError::Invalid { .. })));
        assert_eq!(fresh.save_state().unwrap(), before);
    }
}
