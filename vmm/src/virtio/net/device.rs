//! The virtio-net device: TX drained on the notifying thread straight into the backend, RX
//! written by the device's own thread from the backend into the guest's receive buffers.

use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, warn};
use net::{NetBackend, NetError, MAX_FRAME_LEN, MIN_FRAME_LEN};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::VolatileSlice;

use super::{
    NetState, VirtioNetError, DEFAULT_MTU, MAX_MTU, MIN_MTU, NET_HDR_LEN, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use crate::devices::bus::lock;
use crate::memory::GuestMemory;
use crate::state::{self, StateError};
use crate::virtio::queue::{
    copy_from_slices, copy_to_slices, drain_queue, map_chain, split_slices, VirtioQueueError,
};
use crate::virtio::worker::{Worker, WorkerWaker};
use crate::virtio::{
    RestoredQueues, VirtioDevice, VirtioError, VirtioInterrupt, TYPE_NET, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};

const NAME: &str = "virtio-net";
const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// mac (6), status (2), max_virtqueue_pairs (2), mtu (2).
const CONFIG_LEN: usize = 12;
/// Frames the RX thread moves before it lets go of the device (TX waits for the lock
/// meanwhile) and wakes itself for the rest.
const FRAMES_PER_PASS: usize = 64;
/// At most one warning about guest or backend misbehaviour per this long.
const WARN_INTERVAL: Duration = Duration::from_secs(1);
/// Ethernet header (14) plus one 802.1Q tag (4): what a frame may add to the MTU's payload.
const FRAME_OVERHEAD: usize = 18;

/// How the device is set up: what the guest is told in the configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    /// The guest's default and largest MTU, [`MIN_MTU`]..=[`MAX_MTU`].
    pub mtu: u16,
}

impl NetConfig {
    /// `mac` with the Ethernet MTU of 1500.
    pub fn new(mac: [u8; 6]) -> NetConfig {
        NetConfig { mac, mtu: DEFAULT_MTU }
    }
}

/// What the device carried and dropped since it was made, for logs and the GUI.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames from the guest the backend took, and their bytes (without the virtio header).
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames from the guest not sent: malformed chains, frames outside the length limits
    /// (the MTU when the driver accepted it), link down, or a failed backend.
    pub tx_dropped: u64,
    /// Frames written into the guest's receive buffers, and their bytes (without the header).
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the backend the guest never got: link down, no driver, a frame no posted
    /// buffer (or the whole ring) can hold, a length the backend should not have given.
    pub rx_dropped: u64,
    /// The backend returned an error: the device carries nothing more (DEVICE_NEEDS_RESET).
    pub backend_failed: bool,
}

/// The counters behind [`NetStats`], readable without the device's lock.
#[derive(Default)]
struct Counters {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    backend_failed: AtomicBool,
    /// Times the RX path looked at the receive ring: a test sees that a frame waiting for
    /// buffers costs nothing until the guest posts some.
    rx_ring_polls: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            backend_failed: self.backend_failed.load(Ordering::Relaxed),
        }
    }
}

/// Warnings about frames and chains the device drops, at most one per [`WARN_INTERVAL`]
/// with a count of the ones held back, so a hostile guest cannot flood the log.
#[derive(Default)]
struct WarnLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl WarnLimit {
    fn warn(&mut self, what: impl std::fmt::Display) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < WARN_INTERVAL) {
            self.held_back += 1;
            return;
        }
        if self.held_back > 0 {
            warn!("{NAME}: {what} ({} more dropped since the last warning)", self.held_back);
        } else {
            warn!("{NAME}: {what}");
        }
        self.last = Some(now);
        self.held_back = 0;
    }
}

struct Active {
    memory: GuestMemory,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// State shared by the device, its link handles and its RX thread.
struct Shared {
    active: Option<Active>,
    backend: Box<dyn NetBackend>,
    acked_features: u64,
    /// The guest's MTU, which bounds its frames once it accepted VIRTIO_NET_F_MTU.
    mtu: u16,
    link_up: bool,
    /// `rx_buf[..len]` is a frame taken from the backend that no guest buffer held yet.
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// The backend failed: no frames are carried until the device is built again.
    broken: bool,
    /// The failure still has to reach the transport (as a `process_queue` error, which
    /// sets DEVICE_NEEDS_RESET), because the RX thread has no way to report it.
    failure_unreported: bool,
    warnings: WarnLimit,
    counters: Arc<Counters>,
    /// Wakes the RX thread (set once the thread exists).
    waker: Option<WorkerWaker>,
}

/// What became of one frame offered to the receive queue.
enum RxOutcome {
    Delivered,
    /// Dropped; `used` says whether buffers went back to the guest with it.
    Dropped {
        used: bool,
    },
    /// The guest has not posted enough buffers; nothing was consumed.
    NoBuffers,
}

/// A writable receive chain: its head and where its bytes go.
struct RxBuffer<'a> {
    head: u16,
    slices: Vec<VolatileSlice<'a>>,
}

impl Shared {
    fn wake_rx(&self) {
        if let Some(w) = &self.waker {
            w.wake();
        }
    }

    /// Marks the device broken after a backend error (logged once).
    fn fail(&mut self, what: &str, e: &NetError) {
        if !self.broken {
            error!(
                "{NAME}: {what} on backend {} failed, the device stops: {}",
                self.backend.name(),
                crate::error_chain(e)
            );
        }
        self.broken = true;
        self.failure_unreported = true;
        self.counters.backend_failed.store(true, Ordering::Relaxed);
    }

    /// The longest frame the guest may send: MTU-sized once the driver accepted the MTU
    /// (virtio 1.2 section 5.1.6.2: it must not send more), else what any backend carries.
    fn max_tx_frame(&self) -> usize {
        if self.acked_features & VIRTIO_NET_F_MTU != 0 {
            (usize::from(self.mtu) + FRAME_OVERHEAD).min(MAX_FRAME_LEN)
        } else {
            MAX_FRAME_LEN
        }
    }

    fn failure_error(&self) -> VirtioError {
        VirtioError::Backend {
            device: NAME,
            source: Box::new(NetError::Stopped { backend: self.backend.name() }),
        }
    }

    /// Sends every frame on the TX queue to the backend. Returns whether the driver wants an
    /// interrupt; a backend error stops the device.
    fn transmit(&mut self) -> Result<bool, VirtioError> {
        let max_frame = self.max_tx_frame();
        let Shared { active, backend, tx_buf, warnings, broken, link_up, counters, .. } = self;
        let Some(a) = active.as_mut() else {
            return Ok(false);
        };
        let carry = *link_up && !*broken;
        let mut failure = None;
        let memory = &a.memory;
        let notify = drain_queue(&mut a.txq, memory, |chain| {
            match gather_tx_frame(memory, chain, &mut tx_buf[..max_frame]) {
                Ok(len) if carry && failure.is_none() => match backend.send(&tx_buf[..len]) {
                    Ok(()) => {
                        Counters::add(&counters.tx_frames, 1);
                        Counters::add(&counters.tx_bytes, len);
                    }
                    Err(e) => {
                        Counters::add(&counters.tx_dropped, 1);
                        failure = Some(e);
                    }
                },
                // Link down (no cable: frames go nowhere) or the backend already failed.
                Ok(_) => Counters::add(&counters.tx_dropped, 1),
                Err(why) => {
                    Counters::add(&counters.tx_dropped, 1);
                    warnings.warn(format_args!("dropping a TX frame: {why}"));
                }
            }
            // The device writes nothing into a TX chain.
            0
        })
        .map_err(|source| VirtioError::Queue { index: TX_QUEUE, source })?;
        if let Some(e) = failure {
            self.fail("sending a frame", &e);
            self.failure_unreported = false;
            return Err(self.failure_error());
        }
        Ok(notify)
    }

    /// One pass of the RX thread: frames from the backend into the guest's buffers, at most
    /// [`FRAMES_PER_PASS`]. Returns the interrupt to raise, if the driver wants one.
    fn receive(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        if self.broken {
            return None;
        }
        let mergeable = self.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let mut used_any = false;
        for _ in 0..FRAMES_PER_PASS {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(None) => return self.rx_interrupt(used_any),
                    Ok(Some(len)) if (MIN_FRAME_LEN..=self.rx_buf.len()).contains(&len) => len,
                    Ok(Some(len)) => {
                        Counters::add(&self.counters.rx_dropped, 1);
                        self.warnings.warn(format_args!("backend gave a {len}-byte frame"));
                        continue;
                    }
                    Err(e) => {
                        self.fail("receiving a frame", &e);
                        return self.rx_interrupt(used_any);
                    }
                },
            };
            self.rx_pending = Some(len);
            let Shared { active, rx_buf, warnings, link_up, counters, .. } = self;
            // Not running or no cable: the frame goes nowhere (TCP retransmits).
            let Some(a) = active.as_mut().filter(|_| *link_up) else {
                Counters::add(&counters.rx_dropped, 1);
                self.rx_pending = None;
                continue;
            };
            match deliver_frame(a, &rx_buf[..len], mergeable, warnings, counters) {
                Ok(RxOutcome::Delivered) => {
                    Counters::add(&counters.rx_frames, 1);
                    used_any = true;
                    self.rx_pending = None;
                }
                Ok(RxOutcome::Dropped { used }) => {
                    Counters::add(&counters.rx_dropped, 1);
                    used_any |= used;
                    self.rx_pending = None;
                }
                // Kept until the guest posts buffers (its RX notify wakes the thread).
                Ok(RxOutcome::NoBuffers) => return self.rx_interrupt(used_any),
                Err(e) => {
                    error!("{NAME}: the receive queue failed, the device stops: {e}");
                    self.broken = true;
                    self.failure_unreported = true;
                    return self.rx_interrupt(used_any);
                }
            }
        }
        // More may wait: another pass, after TX had a chance at the lock.
        self.wake_rx();
        self.rx_interrupt(used_any)
    }

    fn rx_interrupt(&mut self, used_any: bool) -> Option<Arc<dyn VirtioInterrupt>> {
        let a = self.active.as_mut()?;
        // A queue error here means no used-event to read: interrupt anyway.
        let wanted = used_any && a.rxq.needs_notification(&a.memory).unwrap_or(true);
        wanted.then(|| a.interrupt.clone())
    }
}

/// Why a TX chain carries no frame (it is still returned to the guest).
enum TxDrop {
    Chain(VirtioQueueError),
    WritableDescriptor,
    ShorterThanHeader(usize),
    FrameLength { len: usize, max: usize },
}

impl std::fmt::Display for TxDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxDrop::Chain(e) => write!(f, "{e}"),
            TxDrop::WritableDescriptor => write!(f, "the chain has a device-writable descriptor"),
            TxDrop::ShorterThanHeader(n) => write!(f, "{n} bytes is less than the header"),
            TxDrop::FrameLength { len, max } => {
                write!(f, "a {len}-byte frame is outside {MIN_FRAME_LEN}..={max}")
            }
        }
    }
}

/// The frame of one TX chain (without its virtio header) copied into `buf`, or why the
/// chain is dropped. A frame longer than `buf` (the guest's limit) is not copied at all.
fn gather_tx_frame(
    memory: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
) -> Result<usize, TxDrop> {
    let b = map_chain(memory, chain).map_err(TxDrop::Chain)?;
    if let Some(fault) = b.fault {
        return Err(TxDrop::Chain(fault));
    }
    if !b.writable.is_empty() {
        return Err(TxDrop::WritableDescriptor);
    }
    let total = b.readable_len();
    let frame_len = total.checked_sub(NET_HDR_LEN).ok_or(TxDrop::ShorterThanHeader(total))?;
    let max = MAX_FRAME_LEN.min(buf.len());
    if !(MIN_FRAME_LEN..=max).contains(&frame_len) {
        return Err(TxDrop::FrameLength { len: frame_len, max });
    }
    let (_, frame) = split_slices(&b.readable, NET_HDR_LEN);
    Ok(copy_from_slices(&frame, &mut buf[..frame_len]))
}

/// Writes `frame` behind a header into the receive queue: into one chain, or with mergeable
/// buffers spread over as many as it takes (`num_buffers`). Unusable chains (outside
/// memory, device-readable, a loop, smaller than the header) go back empty, ahead of the
/// frame's own. Nothing is consumed while the guest has posted too little.
fn deliver_frame(
    a: &mut Active,
    frame: &[u8],
    mergeable: bool,
    warnings: &mut WarnLimit,
    counters: &Counters,
) -> Result<RxOutcome, VirtioQueueError> {
    let memory = &a.memory;
    let q = &mut a.rxq;
    if !q.ready() {
        return Ok(RxOutcome::NoBuffers);
    }
    let needed = NET_HDR_LEN + frame.len();
    loop {
        Counters::add(&counters.rx_ring_polls, 1);
        let start = q.next_avail();
        let avail = q.avail_idx(memory, Ordering::Acquire)?;
        if (avail - Wrapping(start)).0 > q.size() {
            return Err(VirtioQueueError::AvailIndexOutOfRange {
                avail: avail.0,
                next: start,
                size: q.size(),
            });
        }
        let mut unusable: Vec<u16> = Vec::new();
        let mut buffers: Vec<RxBuffer<'_>> = Vec::new();
        let mut capacity = 0usize;
        let mut popped: u16 = 0;
        while capacity < needed {
            let Some(chain) = q.pop_descriptor_chain(memory) else {
                break;
            };
            popped += 1;
            let head = chain.head_index();
            match map_chain(memory, chain) {
                Ok(b)
                    if b.fault.is_none()
                        && b.readable.is_empty()
                        && b.writable_len() >= NET_HDR_LEN =>
                {
                    capacity += b.writable_len();
                    buffers.push(RxBuffer { head, slices: b.writable });
                    if !mergeable {
                        break;
                    }
                }
                Ok(_) | Err(_) => {
                    warnings.warn("returning an unusable RX buffer");
                    unusable.push(head);
                }
            }
        }
        if capacity >= needed {
            for head in unusable {
                q.add_used(memory, head, 0)?;
            }
            let copied = write_frame(q, memory, &buffers, frame)?;
            Counters::add(&counters.rx_bytes, copied);
            return Ok(RxOutcome::Delivered);
        }
        if !mergeable && !buffers.is_empty() {
            // One buffer had to hold it all: the guest set a buffer size too small for the MTU.
            warnings.warn(format_args!("a {}-byte frame does not fit one RX buffer", frame.len()));
            for head in unusable.into_iter().chain(buffers.iter().map(|b| b.head)) {
                q.add_used(memory, head, 0)?;
            }
            return Ok(RxOutcome::Dropped { used: true });
        }
        // Too little posted: take nothing back, so the next try sees the same buffers.
        q.set_next_avail(start);
        if popped >= q.size() {
            // The whole ring cannot hold the frame; waiting would stall receive for good.
            warnings.warn(format_args!("a {}-byte frame does not fit the RX ring", frame.len()));
            return Ok(RxOutcome::Dropped { used: false });
        }
        // Ask for a notify when more come: with EVENT_IDX, once the driver posts past what
        // was seen (the queue writes `avail_event` from `next_avail`). If some came
        // meanwhile, try again with them; otherwise sleep until the notify.
        let seen = start.wrapping_add(popped);
        q.set_next_avail(seen);
        let more = q.enable_notification(memory)?;
        q.set_next_avail(start);
        if !more {
            return Ok(RxOutcome::NoBuffers);
        }
    }
}

/// Writes header and frame across `buffers` (the header is all in the first: each holds at
/// least that much) and returns them to the used ring in order. This is the only place the
/// RX path writes guest memory: each frame byte is copied once, from the buffer the backend
/// filled straight into the guest's. Returns the frame bytes copied.
fn write_frame(
    q: &mut Queue,
    memory: &GuestMemory,
    buffers: &[RxBuffer<'_>],
    frame: &[u8],
) -> Result<usize, VirtioQueueError> {
    let mut header = [0u8; NET_HDR_LEN];
    // num_buffers: at most a ring's worth, so it fits; 1 without mergeable buffers.
    let num_buffers = u16::try_from(buffers.len()).unwrap_or(u16::MAX);
    header[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    let mut done = 0;
    for (i, b) in buffers.iter().enumerate() {
        let (written_header, body) = if i == 0 {
            copy_to_slices(&b.slices, &header);
            (NET_HDR_LEN, split_slices(&b.slices, NET_HDR_LEN).1)
        } else {
            (0, b.slices.clone())
        };
        let n = copy_to_slices(&body, &frame[done..]);
        done += n;
        let len = u32::try_from(written_header + n).unwrap_or(u32::MAX);
        q.add_used(memory, b.head, len)?;
    }
    debug_assert_eq!(done, frame.len());
    Ok(done)
}

/// One pass of the RX thread, with the interrupt raised after the lock is let go (the
/// transport's interrupt state is never taken under ours).
fn receive_pass(shared: &Mutex<Shared>) {
    let interrupt = lock(shared).receive();
    if let Some(i) = interrupt {
        i.signal_used_queue(RX_QUEUE as u16);
    }
}

/// Plugs and unplugs the virtual cable and reads the counters from any thread; cheap to
/// clone.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Mutex<Shared>>,
    counters: Arc<Counters>,
}

impl LinkHandle {
    /// Sets the link status the guest reads, raising a configuration-change interrupt when
    /// it changes while the driver runs. While down, frames in both directions are dropped.
    pub fn set_link_up(&self, up: bool) {
        let interrupt = {
            let mut s = lock(&self.shared);
            if s.link_up == up {
                return;
            }
            s.link_up = up;
            s.wake_rx();
            s.active.as_ref().map(|a| a.interrupt.clone())
        };
        if let Some(i) = interrupt {
            i.signal_config_change();
        }
    }

    pub fn is_link_up(&self) -> bool {
        lock(&self.shared).link_up
    }

    /// What the device carried and dropped so far (without taking the device's lock).
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }
}

/// A virtio-net device over a [`NetBackend`], with the thread that receives for the guest.
pub struct VirtioNet {
    config: NetConfig,
    shared: Arc<Mutex<Shared>>,
    counters: Arc<Counters>,
    /// Receives when the backend or the guest's RX notify wakes it; parked while quiesced.
    worker: Worker,
}

impl VirtioNet {
    /// A device with `config` (MTU [`MIN_MTU`]..=[`MAX_MTU`], a unicast MAC) over `backend`,
    /// link up. The backend's RX notify is set to wake the device's receive thread.
    pub fn new(config: NetConfig, backend: Box<dyn NetBackend>) -> Result<Self, VirtioNetError> {
        if !(MIN_MTU..=MAX_MTU).contains(&config.mtu) {
            return Err(VirtioNetError::Mtu(config.mtu));
        }
        if config.mac[0] & 1 != 0 {
            return Err(VirtioNetError::MulticastMac(config.mac));
        }
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Mutex::new(Shared {
            active: None,
            backend,
            acked_features: 0,
            mtu: config.mtu,
            link_up: true,
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            tx_buf: vec![0; MAX_FRAME_LEN],
            broken: false,
            failure_unreported: false,
            warnings: WarnLimit::default(),
            counters: counters.clone(),
            waker: None,
        }));
        let worker = {
            let shared = shared.clone();
            Worker::spawn("net-rx", move || receive_pass(&shared))?
        };
        {
            let mut s = lock(&shared);
            s.waker = Some(worker.waker());
            let waker = worker.waker();
            s.backend.set_rx_notify(Box::new(move || waker.wake()));
        }
        Ok(VirtioNet { config, shared, counters, worker })
    }

    /// The handle that sets the link up or down and reads the counters.
    pub fn link_handle(&self) -> LinkHandle {
        LinkHandle { shared: self.shared.clone(), counters: self.counters.clone() }
    }

    /// What the device carried and dropped so far.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let status = if lock(&self.shared).link_up { VIRTIO_NET_S_LINK_UP } else { 0 };
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.config.mac);
        c[6..8].copy_from_slice(&status.to_le_bytes());
        // max_virtqueue_pairs: one (there is no MQ).
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        c
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_MTU
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_bytes(), offset, data);
    }

    /// The MAC is read-only in virtio 1.x (there is no CTRL_MAC_ADDR) and nothing else is
    /// writable.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn ack_features(&mut self, features: u64) {
        lock(&self.shared).acked_features = features & self.features();
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), VirtioError> {
        let got = queues.len();
        let mut queues = queues.into_iter();
        let (Some(rxq), Some(txq), None) = (queues.next(), queues.next(), queues.next()) else {
            return Err(VirtioError::QueueCount { expected: QUEUE_SIZES.len(), got });
        };
        let mut s = lock(&self.shared);
        s.rx_pending = None;
        s.active = Some(Active { memory, rxq, txq, interrupt });
        // A failed backend stays failed: the new driver hears of it at its first notify.
        s.failure_unreported = s.broken;
        s.wake_rx();
        Ok(())
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<bool, VirtioError> {
        let mut s = lock(&self.shared);
        if s.failure_unreported {
            s.failure_unreported = false;
            return Err(s.failure_error());
        }
        match queue_index {
            // Buffers were posted: the RX thread fills them (it owns receive).
            RX_QUEUE => {
                s.wake_rx();
                Ok(false)
            }
            TX_QUEUE => s.transmit(),
            _ => Err(VirtioError::NoSuchQueue(queue_index)),
        }
    }

    fn reset(&mut self) {
        let mut s = lock(&self.shared);
        s.active = None;
        s.acked_features = 0;
        s.rx_pending = None;
        s.failure_unreported = false;
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        let mut s = lock(&self.shared);
        let backend_state = s.backend.save_state().map_err(|e| StateError::rejected(NAME, e))?;
        let pending_rx = s.rx_pending.map(|len| s.rx_buf[..len].to_vec()).unwrap_or_default();
        state::encode(
            NAME,
            &NetState {
                mac: self.config.mac,
                mtu: self.config.mtu,
                link_up: s.link_up,
                acked_features: s.acked_features,
                active: s.active.is_some(),
                pending_rx,
                backend_state,
            },
        )
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        let s = lock(&self.shared);
        s.active.as_ref().map(|a| vec![a.rxq.state(), a.txq.state()])
    }

    fn restore_state(
        &mut self,
        saved: &[u8],
        active: Option<RestoredQueues>,
    ) -> Result<(), StateError> {
        let saved: NetState = state::decode(NAME, saved)?;
        let invalid = |reason: &str| Err(StateError::invalid(NAME, reason));
        if saved.mac != self.config.mac {
            return invalid("saved with another MAC address");
        }
        if saved.mtu != self.config.mtu {
            return invalid("saved with another MTU");
        }
        if saved.acked_features & !self.features() != 0 {
            return invalid("accepted features the device does not offer");
        }
        if saved.active != active.is_some() {
            return invalid("activity differs from the transport's");
        }
        if !saved.pending_rx.is_empty() {
            if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&saved.pending_rx.len()) {
                return invalid("pending frame length out of range");
            }
            if !saved.active {
                return invalid("a pending frame while inactive");
            }
        }
        let active = match active {
            Some(a) => {
                let got = a.queues.len();
                let mut queues = a.queues.into_iter();
                let (Some(rxq), Some(txq), None) = (queues.next(), queues.next(), queues.next())
                else {
                    return invalid(&format!("{got} queues, not 2"));
                };
                Some(Active { memory: a.memory, rxq, txq, interrupt: a.interrupt })
            }
            None => None,
        };
        let mut s = lock(&self.shared);
        s.backend.restore_state(&saved.backend_state).map_err(|e| StateError::rejected(NAME, e))?;
        s.active = active;
        s.acked_features = saved.acked_features;
        s.link_up = saved.link_up;
        s.rx_pending = if saved.pending_rx.is_empty() {
            None
        } else {
            s.rx_buf[..saved.pending_rx.len()].copy_from_slice(&saved.pending_rx);
            Some(saved.pending_rx.len())
        };
        s.wake_rx();
        Ok(())
    }

    /// Parks the RX thread between two passes: frames wait in the backend (or pending).
    fn quiesce(&mut self) {
        self.worker.quiesce();
    }

    /// The RX thread receives what came while quiesced, then goes on.
    fn resume(&mut self) {
        self.worker.resume();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    use net::RxNotify;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::pci::PciDevice;
    use crate::virtio::pci_transport::testing::{
        TestDriver, CONFIG_MSI_DATA, MSI_ADDR, QUEUE_MSI_DATA,
    };
    use crate::virtio::pci_transport::DEVICE_CFG_OFFSET;
    use crate::virtio::queue::testing::{TestQueue, DESC_F_NEXT, DESC_F_WRITE};
    use crate::virtio::{STATUS_DEVICE_NEEDS_RESET, STATUS_FEATURES_OK};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const ALL: u64 = u64::MAX;
    const NO_MRG: u64 = !VIRTIO_NET_F_MRG_RXBUF;
    /// RX buffer `i` lives at `RX_BUFS + i * 0x1000`.
    const RX_BUFS: u64 = 0x20_0000;
    /// TX chain `i` (one descriptor) lives at `TX_BUFS + i * 0x2000`.
    const TX_BUFS: u64 = 0x30_0000;
    /// Room for one frame of more than 64 KiB.
    const BIG: u64 = 0x38_0000;
    const LONG: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(50);

    /// The host end of a [`ChannelBackend`]: what a NAT or a passt socket would be.
    struct Peer {
        to_guest: mpsc::Sender<Vec<u8>>,
        from_guest: mpsc::Receiver<Vec<u8>>,
        notify: Arc<Mutex<Option<RxNotify>>>,
        /// Frames the device took with `recv`.
        taken: Arc<AtomicUsize>,
        /// Where each `recv` was told to put its frame.
        recv_bufs: Arc<Mutex<Vec<usize>>>,
        restored: Arc<Mutex<Option<Vec<u8>>>>,
    }

    impl Peer {
        /// Queues a frame for the guest and rings the device, as a backend does.
        fn send(&self, frame: &[u8]) {
            self.to_guest.send(frame.to_vec()).unwrap();
            self.ring();
        }

        fn ring(&self) {
            if let Some(notify) = &*self.notify.lock().unwrap() {
                notify();
            }
        }

        fn sent(&self) -> Vec<u8> {
            self.from_guest.recv_timeout(LONG).expect("no frame from the guest")
        }

        fn nothing_sent(&self) -> bool {
            self.from_guest.try_recv().is_err()
        }

        fn taken(&self) -> usize {
            self.taken.load(Ordering::SeqCst)
        }

        /// The host side goes away for frames from the guest: the backend's `send` fails.
        fn stop_taking_frames(&mut self) {
            self.from_guest = mpsc::channel().1;
        }

        /// The host side goes away for frames to the guest: the backend's `recv` fails.
        fn stop_giving_frames(&mut self) {
            self.to_guest = mpsc::channel().0;
            self.ring();
        }
    }

    /// Frames in and out through channels to a [`Peer`]; a peer that hangs up makes the
    /// backend fail as a real one whose socket closed.
    struct ChannelBackend {
        to_guest: mpsc::Receiver<Vec<u8>>,
        from_guest: mpsc::Sender<Vec<u8>>,
        notify: Arc<Mutex<Option<RxNotify>>>,
        taken: Arc<AtomicUsize>,
        recv_bufs: Arc<Mutex<Vec<usize>>>,
        state: Vec<u8>,
        restored: Arc<Mutex<Option<Vec<u8>>>>,
    }

    impl std::fmt::Debug for ChannelBackend {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ChannelBackend").finish_non_exhaustive()
        }
    }

    impl NetBackend for ChannelBackend {
        fn name(&self) -> &'static str {
            "channel"
        }

        fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
            net::check_frame_len(frame.len())?;
            self.from_guest
                .send(frame.to_vec())
                .map_err(|_| NetError::Stopped { backend: "channel" })
        }

        fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
            self.recv_bufs.lock().unwrap().push(buf.as_ptr() as usize);
            let frame = match self.to_guest.try_recv() {
                Ok(frame) => frame,
                Err(mpsc::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(NetError::Stopped { backend: "channel" })
                }
            };
            buf[..frame.len()].copy_from_slice(&frame);
            self.taken.fetch_add(1, Ordering::SeqCst);
            Ok(Some(frame.len()))
        }

        fn set_rx_notify(&mut self, notify: RxNotify) {
            *self.notify.lock().unwrap() = Some(notify);
        }

        fn save_state(&mut self) -> Result<Vec<u8>, NetError> {
            Ok(self.state.clone())
        }

        fn restore_state(&mut self, state: &[u8]) -> Result<(), NetError> {
            if state.first() == Some(&0xff) {
                return Err(NetError::State { backend: "channel", why: "garbled".into() });
            }
            self.state = state.to_vec();
            *self.restored.lock().unwrap() = Some(state.to_vec());
            Ok(())
        }
    }

    fn channel_backend(state: &[u8]) -> (Box<dyn NetBackend>, Peer) {
        let (to_guest_tx, to_guest_rx) = mpsc::channel();
        let (from_guest_tx, from_guest_rx) = mpsc::channel();
        let notify = Arc::new(Mutex::new(None));
        let taken = Arc::new(AtomicUsize::new(0));
        let recv_bufs = Arc::new(Mutex::new(Vec::new()));
        let restored = Arc::new(Mutex::new(None));
        let backend = ChannelBackend {
            to_guest: to_guest_rx,
            from_guest: from_guest_tx,
            notify: notify.clone(),
            taken: taken.clone(),
            recv_bufs: recv_bufs.clone(),
            state: state.to_vec(),
            restored: restored.clone(),
        };
        let peer = Peer {
            to_guest: to_guest_tx,
            from_guest: from_guest_rx,
            notify,
            taken,
            recv_bufs,
            restored,
        };
        (Box::new(backend), peer)
    }

    fn device(config: NetConfig, state: &[u8]) -> (VirtioNet, Peer) {
        let (backend, peer) = channel_backend(state);
        (VirtioNet::new(config, backend).unwrap(), peer)
    }

    /// A network device on the test transport with its queues, backend peer and link.
    struct Net {
        d: TestDriver,
        peer: Peer,
        link: LinkHandle,
        rx: TestQueue,
        tx: TestQueue,
    }

    fn rx_queue() -> TestQueue {
        TestQueue::new(256, 0x10_0000)
    }

    fn tx_queue() -> TestQueue {
        TestQueue::new(256, 0x11_0000)
    }

    /// The driver's bring-up with the offered features masked by `accept`.
    fn bring_up(d: &mut TestDriver, accept: u64) {
        assert_ne!(d.negotiate(accept) & STATUS_FEATURES_OK, 0);
        d.setup_msix();
        d.setup_queue_at(0, &rx_queue());
        d.setup_queue_at(1, &tx_queue());
        d.write(0x14, 1, 0xf);
        assert_eq!(d.status(), 0xf);
    }

    fn running(dev: VirtioNet, peer: Peer, accept: u64) -> Net {
        let link = dev.link_handle();
        let mut d = TestDriver::new(Box::new(dev));
        bring_up(&mut d, accept);
        Net { d, peer, link, rx: rx_queue(), tx: tx_queue() }
    }

    fn net(accept: u64) -> Net {
        let (dev, peer) = device(NetConfig::new(MAC), b"");
        running(dev, peer, accept)
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Waits (up to 5 s) until `check` holds: receive runs on the device's thread.
    fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + LONG;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn rx_addr(i: u16) -> u64 {
        RX_BUFS + 0x1000 * u64::from(i)
    }

    impl Net {
        /// Posts RX buffer `i` of `len` bytes (one write-only descriptor) and notifies.
        fn post_rx(&mut self, i: u16, len: u32) {
            self.rx.set_desc(&self.d.mem, i, rx_addr(i), len, DESC_F_WRITE, 0);
            self.rx.push(&self.d.mem, i);
            self.d.notify(0);
        }

        /// Sends `frame` behind a zero header as TX chain `i` (one descriptor).
        fn transmit(&mut self, i: u16, frame: &[u8]) {
            let addr = TX_BUFS + 0x2000 * u64::from(i);
            let mut bytes = vec![0u8; NET_HDR_LEN];
            bytes.extend_from_slice(frame);
            self.d.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            self.tx.set_desc(&self.d.mem, i, addr, bytes.len() as u32, 0, 0);
            self.tx.push(&self.d.mem, i);
            self.d.notify(1);
        }

        fn rx_used(&self) -> u16 {
            self.rx.used_idx(&self.d.mem)
        }

        /// The frame starting at used RX element `n`: (num_buffers, frame), gathered over
        /// as many used buffers as the header says.
        fn received(&self, n: u16) -> (u16, Vec<u8>) {
            eventually(&format!("used RX element {n}"), || self.rx_used() > n);
            let read = |n: u16| {
                let (id, len) = self.rx.used_elem(&self.d.mem, n);
                let mut bytes = vec![0u8; len as usize];
                self.d.mem.read_slice(&mut bytes, GuestAddress(rx_addr(id as u16))).unwrap();
                bytes
            };
            let first = read(n);
            assert!(first.len() >= NET_HDR_LEN, "used length {} holds no header", first.len());
            assert_eq!(first[..10], [0; 10], "no offload fields are set");
            let num_buffers = u16::from_le_bytes([first[10], first[11]]);
            let mut frame = first[NET_HDR_LEN..].to_vec();
            for k in 1..num_buffers {
                eventually("the rest of the frame", || self.rx_used() > n + k);
                frame.extend(read(n + k));
            }
            (num_buffers, frame)
        }

        /// The RX queue's avail_event (after the used ring): where the driver next notifies.
        fn avail_event(&self) -> u16 {
            let at = self.rx.used + 4 + 8 * u64::from(self.rx.size);
            self.d.mem.read_obj(GuestAddress(at)).unwrap()
        }

        /// No busy loop: while a frame waits for buffers the receive ring is not looked at
        /// again until the guest posts some (read without the device's lock, which a
        /// spinning receive would hold).
        fn assert_rx_idle(&self) {
            let polls = || self.link.counters.rx_ring_polls.load(Ordering::Relaxed);
            std::thread::sleep(SHORT);
            let before = polls();
            std::thread::sleep(SHORT);
            assert_eq!(polls(), before, "the RX path keeps polling the ring");
        }

        fn msis_with(&self, data: u32) -> usize {
            self.d.msis().iter().filter(|&&m| m == (MSI_ADDR, data)).count()
        }

        fn config(&mut self, offset: u64, len: usize) -> u64 {
            self.d.read(DEVICE_CFG_OFFSET + offset, len)
        }
    }

    #[test]
    fn frames_cross_both_ways_with_and_without_mergeable_buffers() {
        for accept in [ALL, NO_MRG] {
            let mut n = net(accept);
            let out = frame(60, 1);
            n.transmit(0, &out);
            assert_eq!(n.peer.sent(), out, "the header is not part of the frame");
            assert_eq!(n.tx.used_idx(&n.d.mem), 1);
            assert_eq!(n.tx.used_elem(&n.d.mem, 0), (0, 0));
            assert!(n.msis_with(QUEUE_MSI_DATA) >= 1, "TX completion interrupt");

            n.post_rx(0, 4096);
            let back = frame(1514, 2);
            n.peer.send(&back);
            assert_eq!(n.received(0), (1, back));
            assert_eq!(n.rx.used_elem(&n.d.mem, 0), (0, (NET_HDR_LEN + 1514) as u32));
            eventually("the RX interrupt", || n.msis_with(QUEUE_MSI_DATA) >= 2);
        }
    }

    #[test]
    fn a_frame_spreads_over_several_mergeable_buffers_with_num_buffers() {
        let mut n = net(ALL);
        n.post_rx(0, 2048);
        let big = frame(5000, 3);
        n.peer.send(&big);
        // One buffer is too little: nothing is consumed while the frame waits.
        eventually("the frame taken", || n.peer.taken() == 1);
        n.assert_rx_idle();
        assert_eq!(n.rx_used(), 0);
        // EVENT_IDX: the driver is asked to notify when it posts past the buffer seen.
        assert_eq!(n.avail_event(), 1);
        n.post_rx(1, 2048);
        n.post_rx(2, 2048);
        assert_eq!(n.received(0), (3, big));
        let lens: Vec<u32> = (0..3).map(|i| n.rx.used_elem(&n.d.mem, i).1).collect();
        assert_eq!(lens, [2048, 2048, 5012 - 4096]);
        assert_eq!(n.rx_used(), 3);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_larger_than_its_buffer_is_dropped() {
        let mut n = net(NO_MRG);
        n.post_rx(0, 2048);
        n.post_rx(1, 2048);
        n.peer.send(&frame(3000, 4));
        eventually("the buffer back", || n.rx_used() == 1);
        assert_eq!(n.rx.used_elem(&n.d.mem, 0), (0, 0), "returned empty");
        let small = frame(100, 5);
        n.peer.send(&small);
        assert_eq!(n.received(1), (1, small));
    }

    #[test]
    fn hostile_tx_chains_are_returned_unsent_and_the_device_keeps_running() {
        let mut n = net(ALL);
        let mem = n.d.mem.clone();
        // Outside guest memory.
        n.tx.set_desc(&mem, 0, 0xffff_0000_0000, 100, 0, 0);
        // Address plus length overflows.
        n.tx.set_desc(&mem, 1, u64::MAX - 10, 100, 0, 0);
        // Header readable, frame device-writable.
        n.tx.set_desc(&mem, 2, TX_BUFS, 12, DESC_F_NEXT, 3);
        n.tx.set_desc(&mem, 3, TX_BUFS + 0x100, 60, DESC_F_WRITE, 0);
        // A loop.
        n.tx.set_desc(&mem, 4, TX_BUFS, 12, DESC_F_NEXT, 5);
        n.tx.set_desc(&mem, 5, TX_BUFS + 0x100, 60, DESC_F_NEXT, 4);
        // Shorter than the header.
        n.tx.set_desc(&mem, 6, TX_BUFS, 8, 0, 0);
        // Zero bytes.
        n.tx.set_desc(&mem, 7, TX_BUFS, 0, 0, 0);
        for head in [0, 1, 2, 4, 6, 7] {
            n.tx.push(&mem, head);
        }
        n.d.notify(1);
        assert_eq!(n.tx.used_idx(&mem), 6, "every chain goes back");
        assert!(n.peer.nothing_sent());
        assert_eq!(n.link.stats().tx_dropped, 6);
        assert_eq!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        // A chain through every descriptor of the queue and on: longer than the queue.
        let size = n.tx.size;
        for i in 0..size {
            n.tx.set_desc(&mem, i, TX_BUFS, 12, DESC_F_NEXT, (i + 1) % size);
        }
        n.tx.push(&mem, 0);
        n.d.notify(1);
        assert_eq!(n.tx.used_idx(&mem), 7);
        assert!(n.peer.nothing_sent());
        assert_eq!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        let good = frame(60, 6);
        n.transmit(10, &good);
        assert_eq!(n.peer.sent(), good);
        assert!(n.peer.nothing_sent());
        assert_eq!((n.link.stats().tx_frames, n.link.stats().tx_dropped), (1, 7));
    }

    #[test]
    fn a_tx_frame_over_several_descriptors_reaches_the_backend_without_its_header() {
        let mut n = net(ALL);
        let mem = n.d.mem.clone();
        let f = frame(1400, 23);
        let mut header = [0u8; NET_HDR_LEN];
        header[0] = 0xee;
        // Header split 4 + 8, an empty descriptor, then the frame in two pieces.
        mem.write_slice(&header[..4], GuestAddress(TX_BUFS)).unwrap();
        mem.write_slice(&header[4..], GuestAddress(TX_BUFS + 0x100)).unwrap();
        mem.write_slice(&f[..1000], GuestAddress(TX_BUFS + 0x1000)).unwrap();
        mem.write_slice(&f[1000..], GuestAddress(TX_BUFS + 0x1800)).unwrap();
        n.tx.set_desc(&mem, 0, TX_BUFS, 4, DESC_F_NEXT, 1);
        n.tx.set_desc(&mem, 1, TX_BUFS + 0x100, 8, DESC_F_NEXT, 2);
        n.tx.set_desc(&mem, 2, TX_BUFS + 0x200, 0, DESC_F_NEXT, 3);
        n.tx.set_desc(&mem, 3, TX_BUFS + 0x1000, 1000, DESC_F_NEXT, 4);
        n.tx.set_desc(&mem, 4, TX_BUFS + 0x1800, 400, 0, 0);
        n.tx.push(&mem, 0);
        n.d.notify(1);
        assert_eq!(n.peer.sent(), f);
        assert_eq!(n.tx.used_elem(&mem, 0), (0, 0));
    }

    /// Offers TX chains (one descriptor each, from `BIG`) with frames of `lens` bytes and
    /// returns the lengths the backend got.
    fn transmit_lengths(n: &mut Net, lens: &[usize]) -> Vec<usize> {
        let mem = n.d.mem.clone();
        let seed = 7;
        mem.write_slice(&frame(NET_HDR_LEN + MAX_FRAME_LEN + 1, seed), GuestAddress(BIG)).unwrap();
        for (i, &len) in lens.iter().enumerate() {
            n.tx.set_desc(&mem, i as u16, BIG, (NET_HDR_LEN + len) as u32, 0, 0);
            n.tx.push(&mem, i as u16);
        }
        n.d.notify(1);
        assert_eq!(n.tx.used_idx(&mem), lens.len() as u16, "every chain goes back");
        let mut got = Vec::new();
        while let Ok(f) = n.peer.from_guest.try_recv() {
            let whole = frame(NET_HDR_LEN + f.len(), seed);
            assert_eq!(f, whole[NET_HDR_LEN..], "the frame without its header");
            got.push(f.len());
        }
        got
    }

    #[test]
    fn tx_frames_longer_than_the_accepted_mtu_are_dropped_and_counted_not_sent() {
        let mut n = net(ALL);
        // MTU 1500: the payload plus an Ethernet header and one VLAN tag.
        let got = transmit_lengths(&mut n, &[1518, 1519, 9000, MIN_FRAME_LEN - 1, 60]);
        assert_eq!(got, [1518, 60]);
        let stats = n.link.stats();
        assert_eq!((stats.tx_frames, stats.tx_bytes, stats.tx_dropped), (2, 1578, 3));
        assert_eq!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn without_the_mtu_feature_tx_frames_longer_than_max_frame_len_are_dropped_and_counted() {
        let mut n = net(!VIRTIO_NET_F_MTU);
        let got = transmit_lengths(&mut n, &[MAX_FRAME_LEN + 1, MAX_FRAME_LEN, 9000]);
        assert_eq!(got, [MAX_FRAME_LEN, 9000]);
        assert_eq!(n.link.stats().tx_dropped, 1);
    }

    #[test]
    fn hostile_rx_buffers_are_returned_empty_and_the_frame_takes_the_next_good_one() {
        for accept in [ALL, NO_MRG] {
            let mut n = net(accept);
            let mem = n.d.mem.clone();
            // Device-readable.
            n.rx.set_desc(&mem, 0, rx_addr(0), 2048, 0, 0);
            // Outside guest memory.
            n.rx.set_desc(&mem, 1, 0xffff_0000_0000, 2048, DESC_F_WRITE, 0);
            // A loop.
            n.rx.set_desc(&mem, 2, rx_addr(2), 2048, DESC_F_WRITE | DESC_F_NEXT, 3);
            n.rx.set_desc(&mem, 3, rx_addr(3), 2048, DESC_F_WRITE | DESC_F_NEXT, 2);
            // Smaller than the header.
            n.rx.set_desc(&mem, 4, rx_addr(4), 4, DESC_F_WRITE, 0);
            // Address plus length overflows.
            n.rx.set_desc(&mem, 5, u64::MAX - 10, 2048, DESC_F_WRITE, 0);
            // Zero bytes.
            n.rx.set_desc(&mem, 6, rx_addr(6), 0, DESC_F_WRITE, 0);
            n.rx.set_desc(&mem, 7, rx_addr(7), 2048, DESC_F_WRITE, 0);
            for head in [0, 1, 2, 4, 5, 6, 7] {
                n.rx.push(&mem, head);
            }
            n.d.notify(0);
            let f = frame(200, 8);
            n.peer.send(&f);
            assert_eq!(n.received(6), (1, f));
            assert_eq!((n.link.stats().rx_frames, n.link.stats().rx_dropped), (1, 0));
            for (k, head) in [0, 1, 2, 4, 5, 6].into_iter().enumerate() {
                assert_eq!(n.rx.used_elem(&mem, k as u16), (head, 0), "accept {accept:#x}");
            }
            assert_eq!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn an_rx_chain_longer_than_the_queue_goes_back_empty_and_receive_goes_on() {
        for accept in [ALL, NO_MRG] {
            let mut n = net(accept);
            let mem = n.d.mem.clone();
            // 0, 2, 3, ..., 255, 0, ...: more descriptors than the queue has, 1 left out.
            let size = n.rx.size;
            for i in (0..size).filter(|&i| i != 1) {
                let next = match i {
                    0 => 2,
                    i => (i + 1) % size,
                };
                n.rx.set_desc(&mem, i, rx_addr(0), 16, DESC_F_WRITE | DESC_F_NEXT, next);
            }
            n.rx.push(&mem, 0);
            n.d.notify(0);
            let f = frame(300, 24);
            n.peer.send(&f);
            eventually("the frame taken", || n.peer.taken() == 1);
            n.rx.set_desc(&mem, 1, rx_addr(1), 2048, DESC_F_WRITE, 0);
            n.rx.push(&mem, 1);
            n.d.notify(0);
            assert_eq!(n.received(1), (1, f), "accept {accept:#x}");
            assert_eq!(n.rx.used_elem(&mem, 0), (0, 0));
            assert_eq!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn an_rx_chain_of_several_descriptors_gets_header_and_frame_scattered_over_them() {
        let mut n = net(NO_MRG);
        let mem = n.d.mem.clone();
        // Header alone, then the frame over two descriptors in other pages.
        n.rx.set_desc(&mem, 0, rx_addr(0), NET_HDR_LEN as u32, DESC_F_WRITE | DESC_F_NEXT, 1);
        n.rx.set_desc(&mem, 1, rx_addr(1), 1000, DESC_F_WRITE | DESC_F_NEXT, 2);
        n.rx.set_desc(&mem, 2, rx_addr(2), 1000, DESC_F_WRITE, 0);
        n.rx.push(&mem, 0);
        n.d.notify(0);
        let f = frame(1514, 25);
        n.peer.send(&f);
        eventually("the frame", || n.rx_used() == 1);
        assert_eq!(n.rx.used_elem(&mem, 0), (0, (NET_HDR_LEN + 1514) as u32));
        let mut header = [0u8; NET_HDR_LEN];
        mem.read_slice(&mut header, GuestAddress(rx_addr(0))).unwrap();
        let mut want_header = [0u8; NET_HDR_LEN];
        want_header[10] = 1;
        assert_eq!(header, want_header, "no offloads, num_buffers 1");
        let mut got = vec![0u8; 1514];
        mem.read_slice(&mut got[..1000], GuestAddress(rx_addr(1))).unwrap();
        mem.read_slice(&mut got[1000..], GuestAddress(rx_addr(2))).unwrap();
        assert_eq!(got, f);
    }

    /// The RX path's copy budget, a property that holds for any workload: each frame byte is
    /// written into guest memory exactly once (also when the frame waits for buffers, is
    /// retried, or spans several), and the backend fills one reused device buffer, one
    /// `recv` per frame, so there is no staging copy in between.
    #[test]
    fn rx_copies_each_frame_once_from_the_backend_buffer_into_guest_memory() {
        let mut n = net(ALL);
        let mut rng = testkit::Rng(0x6e65_7464);
        let mut sent = Vec::new();
        let mut next_buf = 0u16;
        for round in 0..40u8 {
            let len = MIN_FRAME_LEN + rng.below(9000) as usize;
            let f = frame(len, round);
            // Sometimes the frame comes first and waits for buffers posted one by one.
            let early = rng.below(2) == 0;
            if early {
                n.peer.send(&f);
            }
            let mut posted = 0;
            while posted < NET_HDR_LEN + len {
                n.post_rx(next_buf % 256, 2048);
                next_buf += 1;
                posted += 2048;
            }
            if !early {
                n.peer.send(&f);
            }
            sent.push(f);
            eventually("the frame delivered", || n.link.stats().rx_frames == sent.len() as u64);
        }
        let mut at = 0;
        for f in &sent {
            let (buffers, got) = n.received(at);
            assert_eq!(&got, f);
            at += buffers;
        }
        let stats = n.link.stats();
        let bytes: usize = sent.iter().map(Vec::len).sum();
        assert_eq!(stats.rx_bytes, bytes as u64, "one copy into the guest per frame byte");
        assert_eq!(n.peer.taken(), sent.len());
        let bufs = n.peer.recv_bufs.lock().unwrap();
        assert!(bufs.iter().all(|&p| p == bufs[0]), "one device buffer, reused for every frame");
    }

    #[test]
    fn frames_wait_while_the_guest_has_no_rx_buffers_then_arrive_in_order() {
        let mut n = net(ALL);
        n.post_rx(0, 2048);
        let frames: Vec<_> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
        for f in &frames {
            n.peer.send(f);
        }
        assert_eq!(n.received(0), (1, frames[0].clone()));
        // The second is held; the third stays with the backend until buffers come.
        eventually("the second frame taken", || n.peer.taken() == 2);
        n.assert_rx_idle();
        assert_eq!(n.peer.taken(), 2, "recv is not called while a frame is held");
        assert_eq!(n.rx_used(), 1);
        // With EVENT_IDX the driver is asked to notify once it posts past what was seen.
        assert_eq!(n.avail_event(), 1);
        n.post_rx(1, 2048);
        n.post_rx(2, 2048);
        assert_eq!(n.received(1), (1, frames[1].clone()));
        assert_eq!(n.received(2), (1, frames[2].clone()));
    }

    #[test]
    fn event_idx_holds_the_rx_interrupt_until_the_used_event_passes() {
        let mut n = net(ALL);
        // used_event = 1: interrupt once the second buffer is used.
        let used_event = GuestAddress(n.rx.avail + 4 + 2 * u64::from(n.rx.size));
        n.d.mem.write_obj(1u16, used_event).unwrap();
        n.post_rx(0, 2048);
        n.post_rx(1, 2048);
        let before = n.msis_with(QUEUE_MSI_DATA);
        n.peer.send(&frame(64, 9));
        n.received(0);
        std::thread::sleep(SHORT);
        assert_eq!(n.msis_with(QUEUE_MSI_DATA), before, "suppressed by used_event");
        n.peer.send(&frame(64, 10));
        n.received(1);
        eventually("the interrupt", || n.msis_with(QUEUE_MSI_DATA) == before + 1);
    }

    #[test]
    fn event_idx_holds_the_tx_interrupt_until_the_used_event_passes() {
        let mut n = net(ALL);
        let used_event = GuestAddress(n.tx.avail + 4 + 2 * u64::from(n.tx.size));
        n.d.mem.write_obj(1u16, used_event).unwrap();
        n.transmit(0, &frame(60, 26));
        n.peer.sent();
        assert_eq!(n.msis_with(QUEUE_MSI_DATA), 0, "suppressed by used_event");
        n.transmit(1, &frame(60, 27));
        n.peer.sent();
        assert_eq!(n.msis_with(QUEUE_MSI_DATA), 1);
    }

    #[test]
    fn without_event_idx_every_used_rx_buffer_interrupts() {
        let mut n = net(!VIRTIO_F_RING_EVENT_IDX);
        for i in 0..3u16 {
            n.post_rx(i, 2048);
            n.peer.send(&frame(64, 28 + i as u8));
            n.received(i);
            eventually("the interrupt", || n.msis_with(QUEUE_MSI_DATA) == usize::from(i) + 1);
        }
    }

    #[test]
    fn frames_from_the_host_while_quiesced_wait_for_resume() {
        let mut n = net(ALL);
        n.post_rx(0, 2048);
        n.d.dev.quiesce();
        let f = frame(80, 11);
        n.peer.send(&f);
        std::thread::sleep(SHORT);
        assert_eq!((n.peer.taken(), n.rx_used()), (0, 0), "guest memory untouched");
        n.d.dev.resume();
        assert_eq!(n.received(0), (1, f));
    }

    #[test]
    fn a_backend_whose_send_fails_is_reported_with_device_needs_reset_and_the_device_survives() {
        let mut n = net(ALL);
        let first = frame(60, 12);
        n.transmit(0, &first);
        assert_eq!(n.peer.sent(), first);
        n.peer.stop_taking_frames();
        n.transmit(1, &frame(60, 13));
        assert_ne!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0, "reported to the driver");
        assert_eq!(n.tx.used_idx(&n.d.mem), 2, "the failed frame's chain still goes back");
        let stats = n.link.stats();
        assert!(stats.backend_failed);
        assert_eq!((stats.tx_frames, stats.tx_dropped), (1, 1));
        // Nothing is received from a failed backend either.
        n.post_rx(0, 2048);
        n.peer.send(&frame(60, 14));
        std::thread::sleep(SHORT);
        assert_eq!((n.peer.taken(), n.rx_used()), (0, 0), "no receive once failed");
        // The device lives on: config space, the link, and a driver reset all work, and the
        // new driver hears of the failure at its first notify instead of a silent device.
        let mac: Vec<u8> = (0..6).map(|i| n.config(i, 1) as u8).collect();
        assert_eq!(mac, MAC);
        n.link.set_link_up(false);
        n.link.set_link_up(true);
        n.d.mem.write_slice(&[0; 0x5000], GuestAddress(n.tx.desc)).unwrap();
        n.d.mem.write_slice(&[0; 0x5000], GuestAddress(n.rx.desc)).unwrap();
        bring_up(&mut n.d, ALL);
        n.tx = tx_queue();
        assert_eq!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0, "a reset clears it");
        n.transmit(0, &frame(60, 15));
        assert_ne!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0, "reported again");
    }

    #[test]
    fn a_backend_whose_recv_fails_is_reported_at_the_next_notify() {
        let mut n = net(ALL);
        n.post_rx(0, 2048);
        let f = frame(60, 22);
        n.peer.send(&f);
        assert_eq!(n.received(0), (1, f));
        n.peer.stop_giving_frames();
        eventually("the failure noticed", || n.link.stats().backend_failed);
        assert_eq!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        n.post_rx(1, 2048);
        assert_ne!(n.d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn link_down_and_up_change_status_with_a_config_interrupt() {
        let mut n = net(ALL);
        assert_eq!(n.config(6, 2), u64::from(VIRTIO_NET_S_LINK_UP));
        assert!(n.link.is_link_up());
        n.link.set_link_up(false);
        assert_eq!(n.config(6, 2), 0);
        assert_eq!(n.msis_with(CONFIG_MSI_DATA), 1);
        n.link.set_link_up(false);
        assert_eq!(n.msis_with(CONFIG_MSI_DATA), 1, "no change, no interrupt");
        // No cable: frames go nowhere either way.
        n.transmit(0, &frame(60, 15));
        assert!(n.peer.nothing_sent());
        n.post_rx(0, 2048);
        n.peer.send(&frame(60, 16));
        eventually("the frame dropped", || n.peer.taken() == 1);
        std::thread::sleep(SHORT);
        assert_eq!(n.rx_used(), 0);
        n.link.clone().set_link_up(true);
        assert_eq!(n.config(6, 2), u64::from(VIRTIO_NET_S_LINK_UP));
        assert_eq!(n.msis_with(CONFIG_MSI_DATA), 2);
        let f = frame(60, 17);
        n.peer.send(&f);
        assert_eq!(n.received(0), (1, f));
    }

    #[test]
    fn config_space_holds_mac_link_status_one_queue_pair_and_the_mtu() {
        let (dev, peer) = device(NetConfig { mac: MAC, mtu: 9000 }, b"");
        let mut n = running(dev, peer, ALL);
        let bytes: Vec<u8> = (0..16).map(|i| n.config(i, 1) as u8).collect();
        let mut want = MAC.to_vec();
        want.extend([1, 0, 1, 0]);
        want.extend(9000u16.to_le_bytes());
        want.extend([0; 4]);
        assert_eq!(bytes, want);
        n.d.write(DEVICE_CFG_OFFSET, 1, 0xff);
        assert_eq!(n.config(0, 1), u64::from(MAC[0]), "the MAC is read-only");
    }

    #[test]
    fn offered_features_have_no_offloads_control_queue_or_multiqueue() {
        let (dev, _peer) = device(NetConfig::new(MAC), b"");
        let f = dev.features();
        let wanted = VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_MTU
            | VIRTIO_F_RING_EVENT_IDX;
        assert_eq!(f & wanted, wanted);
        // CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_UFO, HOST_TSO4/6, CTRL_VQ, MQ.
        for bit in [0, 1, 7, 8, 10, 11, 12, 17, 22] {
            assert_eq!(f & (1 << bit), 0, "feature bit {bit}");
        }
        assert_eq!(dev.queue_max_sizes(), [256, 256]);
        assert_eq!(dev.device_type(), TYPE_NET);
    }

    #[test]
    fn construction_refuses_an_mtu_outside_68_to_65521_and_a_multicast_mac() {
        for (config, ok) in [
            (NetConfig { mac: MAC, mtu: MIN_MTU }, true),
            (NetConfig { mac: MAC, mtu: MAX_MTU }, true),
            (NetConfig { mac: MAC, mtu: MIN_MTU - 1 }, false),
            (NetConfig { mac: MAC, mtu: MAX_MTU + 1 }, false),
            (NetConfig::new([0x01, 0, 0x5e, 0, 0, 1]), false),
        ] {
            let (backend, _peer) = channel_backend(b"");
            assert_eq!(VirtioNet::new(config, backend).is_ok(), ok, "{config:?}");
        }
    }

    /// A running device holding one frame for the guest (no RX buffers), quiesced and saved
    /// at the transport: (saved bytes, the held frame).
    fn saved_with_a_pending_frame() -> (Net, Vec<u8>, Vec<u8>) {
        let (dev, peer) = device(NetConfig::new(MAC), b"slirp-blob");
        let n = running(dev, peer, ALL);
        let held = frame(90, 18);
        n.peer.send(&held);
        eventually("the frame taken", || n.peer.taken() == 1);
        let mut n = n;
        n.d.dev.quiesce();
        let saved = n.d.dev.save_state().unwrap();
        (n, saved, held)
    }

    /// A fresh device on a fresh transport (not brought up), as a restore starts from.
    fn fresh(mac: [u8; 6]) -> (TestDriver, Peer) {
        let (dev, peer) = device(NetConfig::new(mac), b"");
        (TestDriver::new(Box::new(dev)), peer)
    }

    #[test]
    fn save_and_restore_keep_the_pending_frame_features_and_backend_state() {
        let (old, saved, held) = saved_with_a_pending_frame();
        let (mut d, peer) = fresh(MAC);
        d.dev.restore_state(&saved).unwrap();
        assert_eq!(d.dev.save_state().unwrap(), saved);
        assert_eq!(peer.restored.lock().unwrap().as_deref(), Some(&b"slirp-blob"[..]));
        drop(old.d);
        let mut n = Net { d, peer, link: old.link, rx: old.rx, tx: old.tx };
        n.d.dev.resume();
        n.post_rx(0, 1024);
        assert_eq!(n.received(0), (1, held), "the held frame survives");
        let f = frame(3000, 19);
        n.post_rx(1, 2048);
        n.post_rx(2, 2048);
        n.peer.send(&f);
        assert_eq!(n.received(1), (2, f), "mergeable buffers are still accepted");
        let out = frame(70, 20);
        n.transmit(0, &out);
        assert_eq!(n.peer.sent(), out);
    }

    #[test]
    fn restore_refuses_a_state_saved_with_another_mac_and_changes_nothing() {
        let (_old, saved, _) = saved_with_a_pending_frame();
        let (mut d, peer) = fresh([0x52, 0x54, 0, 0, 0, 1]);
        let before = d.dev.save_state().unwrap();
        assert!(matches!(d.dev.restore_state(&saved), Err(StateError::Invalid { .. })));
        assert_eq!(d.dev.save_state().unwrap(), before);
        assert!(peer.restored.lock().unwrap().is_none(), "the backend was not touched");
    }

    #[test]
    fn hostile_saved_state_is_refused_or_leaves_a_device_that_runs() {
        let (_old, saved, _) = saved_with_a_pending_frame();
        crate::testing::assert_hostile_state_is_refused_or_runs(
            &saved,
            || fresh(MAC),
            |(d, _)| d.dev.save_state().unwrap(),
            |(d, _), bytes| d.dev.restore_state(bytes),
            |(d, peer)| {
                d.dev.resume();
                peer.send(&frame(60, 21));
                d.notify(0);
                d.notify(1);
                let _ = d.status();
                // Let the RX thread make its pass on whatever the rings now say.
                d.dev.quiesce();
                d.dev.resume();
            },
        );
    }
}
