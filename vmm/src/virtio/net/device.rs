//! The virtio-net device: TX drained on the notifying thread straight into the backend, RX
//! written by the device's own thread from the backend into the guest's receive buffers.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
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
        let Shared { active, backend, tx_buf, warnings, broken, link_up, .. } = self;
        let Some(a) = active.as_mut() else {
            return Ok(false);
        };
        let carry = *link_up && !*broken;
        let mut failure = None;
        let memory = &a.memory;
        let notify = drain_queue(&mut a.txq, memory, |chain| {
            match gather_tx_frame(memory, chain, tx_buf) {
                Ok(len) if carry && failure.is_none() => {
                    if let Err(e) = backend.send(&tx_buf[..len]) {
                        failure = Some(e);
                    }
                }
                // Link down (no cable: frames go nowhere) or the backend already failed.
                Ok(_) => {}
                Err(why) => warnings.warn(format_args!("dropping a TX frame: {why}")),
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
            let Shared { active, rx_buf, warnings, link_up, .. } = self;
            // Not running or no cable: the frame goes nowhere (TCP retransmits).
            let Some(a) = active.as_mut().filter(|_| *link_up) else {
                self.rx_pending = None;
                continue;
            };
            match deliver_frame(a, &rx_buf[..len], mergeable, warnings) {
                Ok(RxOutcome::Delivered) => {
                    used_any = true;
                    self.rx_pending = None;
                }
                Ok(RxOutcome::Dropped { used }) => {
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
    FrameLength(usize),
}

impl std::fmt::Display for TxDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxDrop::Chain(e) => write!(f, "{e}"),
            TxDrop::WritableDescriptor => write!(f, "the chain has a device-writable descriptor"),
            TxDrop::ShorterThanHeader(n) => write!(f, "{n} bytes is less than the header"),
            TxDrop::FrameLength(n) => {
                write!(f, "a {n}-byte frame is outside {MIN_FRAME_LEN}..={MAX_FRAME_LEN}")
            }
        }
    }
}

/// The frame of one TX chain (without its virtio header) copied into `buf`, or why the
/// chain is dropped.
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
    if !(MIN_FRAME_LEN..=MAX_FRAME_LEN.min(buf.len())).contains(&frame_len) {
        return Err(TxDrop::FrameLength(frame_len));
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
) -> Result<RxOutcome, VirtioQueueError> {
    let memory = &a.memory;
    let q = &mut a.rxq;
    if !q.ready() {
        return Ok(RxOutcome::NoBuffers);
    }
    let needed = NET_HDR_LEN + frame.len();
    loop {
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
            write_frame(q, memory, &buffers, frame)?;
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
        // Ask for a notify when more come: with EVENT_IDX, once the driver passes what we saw.
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
/// least that much) and returns them to the used ring in order.
fn write_frame(
    q: &mut Queue,
    memory: &GuestMemory,
    buffers: &[RxBuffer<'_>],
    frame: &[u8],
) -> Result<(), VirtioQueueError> {
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
    Ok(())
}

/// One pass of the RX thread, with the interrupt raised after the lock is let go (the
/// transport's interrupt state is never taken under ours).
fn receive_pass(shared: &Mutex<Shared>) {
    let interrupt = lock(shared).receive();
    if let Some(i) = interrupt {
        i.signal_used_queue(RX_QUEUE as u16);
    }
}

/// Plugs and unplugs the virtual cable from any thread; cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Mutex<Shared>>,
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
}

/// A virtio-net device over a [`NetBackend`], with the thread that receives for the guest.
pub struct VirtioNet {
    config: NetConfig,
    shared: Arc<Mutex<Shared>>,
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
        let shared = Arc::new(Mutex::new(Shared {
            active: None,
            backend,
            acked_features: 0,
            link_up: true,
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            tx_buf: vec![0; MAX_FRAME_LEN],
            broken: false,
            failure_unreported: false,
            warnings: WarnLimit::default(),
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
        Ok(VirtioNet { config, shared, worker })
    }

    /// The handle that sets the link up or down.
    pub fn link_handle(&self) -> LinkHandle {
        LinkHandle { shared: self.shared.clone() }
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
