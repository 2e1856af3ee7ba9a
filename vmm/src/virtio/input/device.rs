//! The virtio-input device: configuration space answering select/subsel queries, an event
//! queue filled from a bounded backlog, and a status queue that is drained and ignored.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use display::{InputEvent, PointerButton};
use log::warn;
use virtio_queue::{Queue, QueueState, QueueT};

use super::{InputState, VirtioInputError};
use crate::devices::bus::lock;
use crate::memory::GuestMemory;
use crate::state::{self, StateError};
use crate::virtio::queue::{copy_to_slices, drain_queue, map_chain};
use crate::virtio::worker::{Worker, WorkerWaker};
use crate::virtio::{
    RestoredQueues, VirtioDevice, VirtioError, VirtioInterrupt, TYPE_INPUT, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZES: [u16; 2] = [64, 64];
const EVENT_QUEUE: usize = 0;
const STATUS_QUEUE: usize = 1;

// Configuration selectors (virtio 1.2 section 5.8.5).
const CFG_ID_NAME: u8 = 0x01;
const CFG_ID_SERIAL: u8 = 0x02;
const CFG_ID_DEVIDS: u8 = 0x03;
const CFG_PROP_BITS: u8 = 0x10;
const CFG_EV_BITS: u8 = 0x11;
const CFG_ABS_INFO: u8 = 0x12;
const CFG_UNION_OFFSET: usize = 8;
const CFG_UNION_SIZE: usize = 128;

// evdev event types and codes (linux/input-event-codes.h).
const EV_SYN: u16 = 0x00;
const EV_KEY: u16 = 0x01;
const EV_REL: u16 = 0x02;
const EV_ABS: u16 = 0x03;
const EV_LED: u16 = 0x11;
const EV_REP: u16 = 0x14;
const SYN_REPORT: u16 = 0;
const REL_X: u16 = 0x00;
const REL_Y: u16 = 0x01;
const REL_HWHEEL: u16 = 0x06;
const REL_WHEEL: u16 = 0x08;
const ABS_X: u16 = 0x00;
const ABS_Y: u16 = 0x01;
const LED_NUML: u16 = 0;
const LED_CAPSL: u16 = 1;
const LED_SCROLLL: u16 = 2;
const BTN_LEFT: u16 = 0x110;
const BTN_RIGHT: u16 = 0x111;
const BTN_MIDDLE: u16 = 0x112;
const BTN_SIDE: u16 = 0x113;
const BTN_EXTRA: u16 = 0x114;
/// Keyboard keys offered: KEY_ESC (1) to KEY_MICMUTE (248), the range a PC keyboard has.
const KEYS: std::ops::RangeInclusive<u16> = 1..=248;
const BUTTONS: [u16; 5] = [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA];

const BUS_VIRTUAL: u16 = 0x06;
/// The ids QEMU's virtio-input devices use, which guests already know.
const VENDOR_ID: u16 = 0x0627;
const VERSION: u16 = 1;
pub(super) const EVENT_SIZE: usize = 8;
/// Events kept for a driver that has not supplied buffers yet; the oldest go beyond this.
const MAX_BACKLOG: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Keyboard,
    Tablet,
    Mouse,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Keyboard => "Hutch Keyboard",
            Kind::Tablet => "Hutch Tablet",
            Kind::Mouse => "Hutch Mouse",
        }
    }

    /// The name of the device's event thread (Linux keeps 15 bytes).
    fn thread_name(self) -> &'static str {
        match self {
            Kind::Keyboard => "input-keyboard",
            Kind::Tablet => "input-tablet",
            Kind::Mouse => "input-mouse",
        }
    }

    fn serial(self) -> &'static str {
        match self {
            Kind::Keyboard => "hutch-keyboard-0",
            Kind::Tablet => "hutch-tablet-0",
            Kind::Mouse => "hutch-mouse-0",
        }
    }

    fn product(self) -> u16 {
        match self {
            Kind::Keyboard => 1,
            Kind::Mouse => 2,
            Kind::Tablet => 3,
        }
    }

    /// The codes this device reports for event type `ev`.
    fn codes(self, ev: u16) -> Vec<u16> {
        match (self, ev) {
            (Kind::Keyboard, EV_KEY) => KEYS.collect(),
            (Kind::Keyboard, EV_LED) => vec![LED_NUML, LED_CAPSL, LED_SCROLLL],
            (Kind::Tablet | Kind::Mouse, EV_KEY) => BUTTONS.to_vec(),
            (Kind::Tablet, EV_REL) => vec![REL_HWHEEL, REL_WHEEL],
            (Kind::Mouse, EV_REL) => vec![REL_X, REL_Y, REL_HWHEEL, REL_WHEEL],
            (Kind::Tablet, EV_ABS) => vec![ABS_X, ABS_Y],
            _ => Vec::new(),
        }
    }

    /// The answer to a configuration query: the union bytes (their count is `size`).
    fn config(self, select: u8, subsel: u8) -> Vec<u8> {
        match select {
            CFG_ID_NAME if subsel == 0 => self.name().as_bytes().to_vec(),
            CFG_ID_SERIAL if subsel == 0 => self.serial().as_bytes().to_vec(),
            CFG_ID_DEVIDS if subsel == 0 => [BUS_VIRTUAL, VENDOR_ID, self.product(), VERSION]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            // No input properties: in particular not INPUT_PROP_DIRECT (not a touchscreen).
            CFG_PROP_BITS => Vec::new(),
            // Key repeat is the guest's: a present (empty) EV_REP bitmap turns it on.
            CFG_EV_BITS if self == Kind::Keyboard && u16::from(subsel) == EV_REP => vec![0],
            CFG_EV_BITS => bitmap(&self.codes(u16::from(subsel))),
            CFG_ABS_INFO if self == Kind::Tablet && matches!(u16::from(subsel), ABS_X | ABS_Y) => {
                let max = u32::from(display::pointer::ABS_MAX);
                // min, max, fuzz, flat, res
                [0u32, max, 0, 0, 0].iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The evdev events for one input event (without the SYN_REPORT), or none if this kind
    /// of device does not report it.
    fn convert(self, event: &InputEvent) -> Vec<(u16, u16, u32)> {
        let mut out = Vec::new();
        let pointer = matches!(self, Kind::Tablet | Kind::Mouse);
        match *event {
            InputEvent::Key { code, down } if self == Kind::Keyboard && KEYS.contains(&code) => {
                out.push((EV_KEY, code, u32::from(down)));
            }
            InputEvent::PointerAbs { x, y } if self == Kind::Tablet => {
                let max = display::pointer::ABS_MAX;
                out.push((EV_ABS, ABS_X, u32::from(x.min(max))));
                out.push((EV_ABS, ABS_Y, u32::from(y.min(max))));
            }
            InputEvent::PointerRel { dx, dy } if self == Kind::Mouse => {
                if dx != 0 {
                    out.push((EV_REL, REL_X, dx as u32));
                }
                if dy != 0 {
                    out.push((EV_REL, REL_Y, dy as u32));
                }
            }
            InputEvent::Button { button, down } if pointer => {
                let code = match button {
                    PointerButton::Left => BTN_LEFT,
                    PointerButton::Right => BTN_RIGHT,
                    PointerButton::Middle => BTN_MIDDLE,
                    PointerButton::Side => BTN_SIDE,
                    PointerButton::Extra => BTN_EXTRA,
                };
                out.push((EV_KEY, code, u32::from(down)));
            }
            InputEvent::Wheel { dx, dy } if pointer => {
                if dy != 0 {
                    out.push((EV_REL, REL_WHEEL, dy as u32));
                }
                if dx != 0 {
                    out.push((EV_REL, REL_HWHEEL, dx as u32));
                }
            }
            _ => {}
        }
        out
    }
}

/// A little-endian bitmap with `codes` set, trimmed after the last non-zero byte.
fn bitmap(codes: &[u16]) -> Vec<u8> {
    let mut bits = vec![0u8; CFG_UNION_SIZE];
    for &c in codes {
        if let Some(b) = bits.get_mut(usize::from(c) / 8) {
            *b |= 1 << (c % 8);
        }
    }
    let len = bits.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bits.truncate(len);
    bits
}

fn encode(ev_type: u16, code: u16, value: u32) -> [u8; EVENT_SIZE] {
    let mut e = [0u8; EVENT_SIZE];
    e[0..2].copy_from_slice(&ev_type.to_le_bytes());
    e[2..4].copy_from_slice(&code.to_le_bytes());
    e[4..8].copy_from_slice(&value.to_le_bytes());
    e
}

struct Active {
    memory: GuestMemory,
    eventq: Queue,
    statusq: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// State shared by the device, its handles and its event thread.
#[derive(Default)]
struct Shared {
    active: Option<Active>,
    backlog: VecDeque<[u8; EVENT_SIZE]>,
    warned_overflow: bool,
}

impl Shared {
    /// Moves backlog events into available eventq buffers, one event per buffer. Returns
    /// whether the driver wants an interrupt.
    fn deliver(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let memory = &active.memory;
        let mut used_any = false;
        while let Some(event) = self.backlog.front().copied() {
            let Some(chain) = active.eventq.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let written = match map_chain(memory, chain) {
                Ok(b) if b.fault.is_none() && b.writable_len() >= EVENT_SIZE => {
                    copy_to_slices(&b.writable, &event)
                }
                Ok(_) | Err(_) => {
                    warn!("virtio-input: unusable event buffer");
                    0
                }
            };
            if written == EVENT_SIZE {
                self.backlog.pop_front();
            }
            if let Err(e) = active.eventq.add_used(memory, head, written as u32) {
                warn!("virtio-input: event queue failed: {e}");
                break;
            }
            used_any = true;
        }
        used_any && active.eventq.needs_notification(memory).unwrap_or(true)
    }
}

/// One pass of the event thread: the backlog into the guest's buffers, then the interrupt.
fn deliver_backlog(shared: &Mutex<Shared>) {
    let interrupt = {
        let mut s = lock(shared);
        let notify = s.deliver();
        s.active.as_ref().filter(|_| notify).map(|a| a.interrupt.clone())
    };
    // Signalled unlocked: the transport's interrupt state is never taken under ours.
    if let Some(i) = interrupt {
        i.signal_used_queue(EVENT_QUEUE as u16);
    }
}

/// Sends input to the guest through the device, from any thread.
#[derive(Clone)]
pub struct InputHandle {
    kind: Kind,
    shared: Arc<Mutex<Shared>>,
    worker: WorkerWaker,
}

impl InputHandle {
    /// Converts `events` to evdev events, each followed by SYN_REPORT, and queues them for
    /// the device's event thread, which delivers them in order (or keeps them until the
    /// driver supplies buffers); the caller's thread never touches guest memory. Events this
    /// kind of device does not report are ignored; while the driver is not active
    /// everything is dropped.
    pub fn send(&self, events: &[InputEvent]) {
        let mut encoded = Vec::new();
        for e in events {
            let converted = self.kind.convert(e);
            if converted.is_empty() {
                continue;
            }
            encoded.extend(converted.into_iter().map(|(t, c, v)| encode(t, c, v)));
            encoded.push(encode(EV_SYN, SYN_REPORT, 0));
        }
        if encoded.is_empty() {
            return;
        }
        {
            let mut s = lock(&self.shared);
            if s.active.is_none() {
                return;
            }
            s.backlog.extend(encoded);
            let excess = s.backlog.len().saturating_sub(MAX_BACKLOG);
            if excess > 0 {
                s.backlog.drain(..excess);
                if !s.warned_overflow {
                    s.warned_overflow = true;
                    warn!("virtio-input: the guest is not taking events; dropping the oldest");
                }
            }
        }
        self.worker.wake();
    }

    /// Whether the guest driver has the device running.
    pub fn is_ready(&self) -> bool {
        lock(&self.shared).active.is_some()
    }
}

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Keyboard => 0,
        Kind::Tablet => 1,
        Kind::Mouse => 2,
    }
}

/// A virtio-input device: keyboard, tablet or mouse, with the thread that writes host
/// input into the guest's event queue.
pub struct Input {
    kind: Kind,
    shared: Arc<Mutex<Shared>>,
    select: u8,
    subsel: u8,
    /// Delivers the backlog when a handle sends; parked while quiesced.
    worker: Worker,
}

impl Input {
    fn new(kind: Kind) -> Result<Input, VirtioInputError> {
        let shared: Arc<Mutex<Shared>> = Arc::default();
        let worker = {
            let shared = shared.clone();
            Worker::spawn(kind.thread_name(), move || deliver_backlog(&shared))?
        };
        Ok(Input { kind, shared, select: 0, subsel: 0, worker })
    }

    /// A keyboard reporting evdev keys 1..=248, with key repeat and LEDs.
    pub fn keyboard() -> Result<Input, VirtioInputError> {
        Input::new(Kind::Keyboard)
    }

    /// An absolute pointer (0..=0x7fff on both axes) with five buttons and two wheels.
    pub fn tablet() -> Result<Input, VirtioInputError> {
        Input::new(Kind::Tablet)
    }

    /// A relative mouse with five buttons and two wheels.
    pub fn mouse() -> Result<Input, VirtioInputError> {
        Input::new(Kind::Mouse)
    }

    pub fn handle(&self) -> InputHandle {
        InputHandle { kind: self.kind, shared: self.shared.clone(), worker: self.worker.waker() }
    }
}

impl VirtioDevice for Input {
    fn device_type(&self) -> u32 {
        TYPE_INPUT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        // No EVENT_IDX: the event queue is filled from outside the notify path, and plain
        // notifications keep every buffer the driver adds visible to us.
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let union = self.kind.config(self.select, self.subsel);
        let mut config = [0u8; CFG_UNION_OFFSET + CFG_UNION_SIZE];
        config[0] = self.select;
        config[1] = self.subsel;
        let n = union.len().min(CFG_UNION_SIZE);
        config[2] = n as u8;
        config[CFG_UNION_OFFSET..CFG_UNION_OFFSET + n].copy_from_slice(&union[..n]);
        crate::virtio::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => self.select = b,
                Some(1) => self.subsel = b,
                _ => {}
            }
        }
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), VirtioError> {
        let got = queues.len();
        let mut queues = queues.into_iter();
        let (Some(eventq), Some(statusq), None) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(VirtioError::QueueCount { expected: QUEUE_SIZES.len(), got });
        };
        let mut s = lock(&self.shared);
        s.backlog.clear();
        s.active = Some(Active { memory, eventq, statusq, interrupt });
        Ok(())
    }

    fn process_queue(&mut self, queue_index: usize) -> Result<bool, VirtioError> {
        let mut s = lock(&self.shared);
        match queue_index {
            EVENT_QUEUE => Ok(s.deliver()),
            STATUS_QUEUE => {
                let Some(a) = s.active.as_mut() else {
                    return Ok(false);
                };
                // LED state from the guest: nothing on the host shows it.
                drain_queue(&mut a.statusq, &a.memory, |_| 0)
                    .map_err(|source| VirtioError::Queue { index: queue_index, source })
            }
            _ => Err(VirtioError::NoSuchQueue(queue_index)),
        }
    }

    fn reset(&mut self) {
        let mut s = lock(&self.shared);
        s.active = None;
        s.backlog.clear();
        self.select = 0;
        self.subsel = 0;
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        let s = lock(&self.shared);
        state::encode(
            "virtio-input",
            &InputState {
                kind: kind_code(self.kind),
                select: self.select,
                subsel: self.subsel,
                backlog: s.backlog.iter().copied().collect(),
                active: s.active.is_some(),
            },
        )
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        let s = lock(&self.shared);
        s.active.as_ref().map(|a| vec![a.eventq.state(), a.statusq.state()])
    }

    fn restore_state(
        &mut self,
        saved: &[u8],
        active: Option<RestoredQueues>,
    ) -> Result<(), StateError> {
        let saved: InputState = state::decode("virtio-input", saved)?;
        let invalid = |reason: &str| Err(StateError::invalid("virtio-input", reason));
        if saved.kind != kind_code(self.kind) {
            return invalid("saved from another kind of input device");
        }
        if saved.backlog.len() > MAX_BACKLOG {
            return invalid("event backlog too long");
        }
        if saved.active != active.is_some() {
            return invalid("activity differs from the transport's");
        }
        let active = match active {
            Some(a) => {
                let got = a.queues.len();
                let mut queues = a.queues.into_iter();
                let (Some(eventq), Some(statusq), None) =
                    (queues.next(), queues.next(), queues.next())
                else {
                    return invalid(&format!("{got} queues, not 2"));
                };
                Some(Active { memory: a.memory, eventq, statusq, interrupt: a.interrupt })
            }
            None => None,
        };
        let mut s = lock(&self.shared);
        s.active = active;
        s.backlog = saved.backlog.into_iter().collect();
        self.select = saved.select;
        self.subsel = saved.subsel;
        Ok(())
    }

    /// Parks the event thread between two deliveries: events sent meanwhile wait in the
    /// backlog.
    fn quiesce(&mut self) {
        self.worker.quiesce();
    }

    /// The event thread delivers what came while quiesced, then goes on.
    fn resume(&mut self) {
        self.worker.resume();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::pci_transport::testing::{TestDriver, MSI_ADDR, QUEUE_MSI_DATA};
    use crate::virtio::pci_transport::DEVICE_CFG_OFFSET;
    use crate::virtio::queue::testing::{TestQueue, DESC_F_WRITE};

    const BUFFERS: u64 = 0x20_0000;

    fn driver(input: Input) -> (TestDriver, InputHandle, TestQueue) {
        let handle = input.handle();
        let mut d = TestDriver::new(Box::new(input));
        d.tq = TestQueue::new(64, 0x10_0000);
        let statusq = TestQueue::new(64, 0x18_0000);
        d.bring_up_queues(&[&statusq]);
        (d, handle, statusq)
    }

    /// Makes `n` 8-byte event buffers available, starting at descriptor `first`.
    fn add_buffers(d: &mut TestDriver, first: u16, n: u16) {
        for i in first..first + n {
            d.tq.set_desc(&d.mem, i, BUFFERS + 8 * u64::from(i), 8, DESC_F_WRITE, 0);
            d.tq.push(&d.mem, i);
        }
        d.notify(0);
    }

    /// Waits (up to 5 s) until `check` holds: host events arrive on the device's thread.
    fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn wait_used(d: &TestDriver, want: u16) {
        eventually(&format!("used index {want}"), || d.tq.used_idx(&d.mem) == want);
    }

    /// Events in used buffers `from..to`, as (type, code, value).
    fn used_events(d: &TestDriver, from: u16, to: u16) -> Vec<(u16, u16, u32)> {
        (from..to)
            .map(|n| {
                let (id, len) = d.tq.used_elem(&d.mem, n);
                assert_eq!(len, 8);
                let mut e = [0u8; 8];
                d.mem.read_slice(&mut e, GuestAddress(BUFFERS + 8 * u64::from(id))).unwrap();
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect()
    }

    /// (size, union bytes) of a select/subsel query.
    fn query(d: &mut TestDriver, select: u8, subsel: u8) -> (u8, Vec<u8>) {
        d.write(DEVICE_CFG_OFFSET, 1, u64::from(select));
        d.write(DEVICE_CFG_OFFSET + 1, 1, u64::from(subsel));
        let size = d.read(DEVICE_CFG_OFFSET + 2, 1) as u8;
        let bytes = (0..u64::from(size)).map(|i| d.read(DEVICE_CFG_OFFSET + 8 + i, 1) as u8);
        (size, bytes.collect())
    }

    #[test]
    fn keyboard_config_answers_each_select() {
        let (mut d, _, _) = driver(Input::keyboard().unwrap());
        assert_eq!(query(&mut d, CFG_ID_NAME, 0).1, b"Hutch Keyboard");
        assert_eq!(query(&mut d, CFG_ID_SERIAL, 0).1, b"hutch-keyboard-0");
        assert_eq!(query(&mut d, CFG_ID_DEVIDS, 0).1, [6, 0, 0x27, 6, 1, 0, 1, 0]);
        assert_eq!(query(&mut d, CFG_PROP_BITS, 0).0, 0);
        let (size, keys) = query(&mut d, CFG_EV_BITS, EV_KEY as u8);
        assert_eq!(size, 32, "keys up to 248");
        assert_eq!(keys[0], 0xfe, "KEY_RESERVED (0) is not a key");
        assert!(keys[1..31].iter().all(|&b| b == 0xff));
        assert_eq!(keys[31], 0x01, "KEY_MICMUTE (248) is the last");
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_REP as u8).0, 1);
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_LED as u8).1, [0x07]);
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_REL as u8).0, 0);
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_ABS as u8).0, 0);
        assert_eq!(query(&mut d, CFG_ABS_INFO, 0).0, 0);
        assert_eq!(query(&mut d, 0, 0).0, 0, "unset");
        assert_eq!(query(&mut d, CFG_ID_NAME, 1).0, 0);
    }

    #[test]
    fn tablet_config_has_absolute_axes_buttons_and_wheels() {
        let (mut d, _, _) = driver(Input::tablet().unwrap());
        assert_eq!(query(&mut d, CFG_ID_NAME, 0).1, b"Hutch Tablet");
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_ABS as u8).1, [0x03]);
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_REL as u8).1, [0x40, 0x01]);
        let (size, keys) = query(&mut d, CFG_EV_BITS, EV_KEY as u8);
        assert_eq!(size, 35);
        assert_eq!(keys[34], 0x1f, "BTN_LEFT..BTN_EXTRA");
        assert!(keys[..34].iter().all(|&b| b == 0));
        let (size, abs) = query(&mut d, CFG_ABS_INFO, ABS_Y as u8);
        assert_eq!(size, 20);
        assert_eq!(abs[4..8], 0x7fffu32.to_le_bytes());
        assert_eq!(query(&mut d, CFG_ABS_INFO, 2).0, 0);
        assert_eq!(query(&mut d, CFG_PROP_BITS, 0).0, 0, "not INPUT_PROP_DIRECT");
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_REP as u8).0, 0);
    }

    #[test]
    fn mouse_config_has_relative_axes() {
        let (mut d, _, _) = driver(Input::mouse().unwrap());
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_REL as u8).1, [0x43, 0x01]);
        assert_eq!(query(&mut d, CFG_EV_BITS, EV_ABS as u8).0, 0);
        assert_eq!(query(&mut d, CFG_ID_DEVIDS, 0).1[4], 2);
    }

    #[test]
    fn key_events_are_delivered_with_syn_and_an_interrupt() {
        let (mut d, handle, _) = driver(Input::keyboard().unwrap());
        assert!(handle.is_ready());
        add_buffers(&mut d, 0, 8);
        handle.send(&[
            InputEvent::Key { code: 30, down: true },
            InputEvent::Key { code: 30, down: false },
            InputEvent::Key { code: 0x110, down: true }, // not a keyboard key
            InputEvent::PointerRel { dx: 1, dy: 1 },     // not a keyboard event
        ]);
        wait_used(&d, 4);
        assert_eq!(
            used_events(&d, 0, 4),
            vec![(EV_KEY, 30, 1), (EV_SYN, 0, 0), (EV_KEY, 30, 0), (EV_SYN, 0, 0)]
        );
        eventually("the interrupt", || !d.msis().is_empty());
        assert_eq!(d.msis(), vec![(MSI_ADDR, QUEUE_MSI_DATA)]);
    }

    #[test]
    fn pointer_events_convert_per_flavour() {
        let (mut d, handle, _) = driver(Input::tablet().unwrap());
        add_buffers(&mut d, 0, 16);
        handle.send(&[
            InputEvent::PointerAbs { x: 100, y: 0xffff },
            InputEvent::Button { button: PointerButton::Right, down: true },
            InputEvent::Wheel { dx: -1, dy: 2 },
            InputEvent::PointerRel { dx: 5, dy: 5 },
        ]);
        wait_used(&d, 8);
        assert_eq!(
            used_events(&d, 0, 8),
            vec![
                (EV_ABS, ABS_X, 100),
                (EV_ABS, ABS_Y, 0x7fff),
                (EV_SYN, 0, 0),
                (EV_KEY, BTN_RIGHT, 1),
                (EV_SYN, 0, 0),
                (EV_REL, REL_WHEEL, 2),
                (EV_REL, REL_HWHEEL, u32::MAX),
                (EV_SYN, 0, 0),
            ]
        );
        assert_eq!(d.tq.used_idx(&d.mem), 8);
        let (mut d, handle, _) = driver(Input::mouse().unwrap());
        add_buffers(&mut d, 0, 4);
        handle.send(&[
            InputEvent::PointerRel { dx: -3, dy: 0 },
            InputEvent::PointerAbs { x: 1, y: 1 },
        ]);
        wait_used(&d, 2);
        assert_eq!(used_events(&d, 0, 2), vec![(EV_REL, REL_X, (-3i32) as u32), (EV_SYN, 0, 0)]);
        assert_eq!(d.tq.used_idx(&d.mem), 2);
    }

    #[test]
    fn events_wait_in_the_backlog_until_buffers_arrive() {
        let (mut d, handle, _) = driver(Input::keyboard().unwrap());
        handle.send(&[InputEvent::Key { code: 2, down: true }]);
        assert_eq!(d.tq.used_idx(&d.mem), 0);
        add_buffers(&mut d, 0, 1);
        assert_eq!(used_events(&d, 0, 1), vec![(EV_KEY, 2, 1)]);
        add_buffers(&mut d, 1, 4);
        assert_eq!(d.tq.used_idx(&d.mem), 2);
        assert_eq!(used_events(&d, 1, 2), vec![(EV_SYN, 0, 0)]);
    }

    #[test]
    fn backlog_drops_the_oldest_beyond_its_limit() {
        let (mut d, handle, _) = driver(Input::keyboard().unwrap());
        for i in 0..1000 {
            handle.send(&[InputEvent::Key { code: 1 + (i % 200) as u16, down: true }]);
        }
        add_buffers(&mut d, 0, 1);
        // 2000 events were sent; the first kept is event 976, the key of send 488.
        assert_eq!(used_events(&d, 0, 1), vec![(EV_KEY, 1 + 488 % 200, 1)]);
    }

    #[test]
    fn inactive_device_drops_events_and_status_queue_is_consumed() {
        let input = Input::keyboard().unwrap();
        let handle = input.handle();
        assert!(!handle.is_ready());
        handle.send(&[InputEvent::Key { code: 2, down: true }]);
        let (mut d, _, mut statusq) = driver(input);
        add_buffers(&mut d, 0, 2);
        assert_eq!(d.tq.used_idx(&d.mem), 0, "nothing kept from before activation");
        d.mem.write_slice(&encode(EV_LED, LED_CAPSL, 1), GuestAddress(0x30_0000)).unwrap();
        statusq.set_desc(&d.mem, 0, 0x30_0000, 8, 0, 0);
        statusq.push(&d.mem, 0);
        d.notify(1);
        assert_eq!(statusq.used_idx(&d.mem), 1);
        d.write(0x14, 1, 0);
        assert!(!handle.is_ready(), "reset deactivates");
    }

    #[test]
    fn too_small_event_buffer_is_returned_empty() {
        let (mut d, handle, _) = driver(Input::keyboard().unwrap());
        d.tq.set_desc(&d.mem, 0, BUFFERS, 4, DESC_F_WRITE, 0);
        d.tq.push(&d.mem, 0);
        d.notify(0);
        handle.send(&[InputEvent::Key { code: 2, down: true }]);
        wait_used(&d, 1);
        assert_eq!(d.tq.used_elem(&d.mem, 0), (0, 0));
        add_buffers(&mut d, 1, 1);
        assert_eq!(used_events(&d, 1, 2), vec![(EV_KEY, 2, 1)]);
    }

    #[test]
    fn restored_input_delivers_its_backlog_and_keeps_its_selector() {
        let (mut d, handle, _) = driver(Input::keyboard().unwrap());
        add_buffers(&mut d, 0, 1);
        handle.send(&[InputEvent::Key { code: 2, down: true }]);
        handle.send(&[InputEvent::Key { code: 3, down: true }]);
        d.write(DEVICE_CFG_OFFSET, 1, u64::from(CFG_ID_NAME));
        use crate::pci::PciDevice;
        // As a snapshot does: the event thread is parked before the state is read.
        d.dev.quiesce();
        let saved = d.dev.save_state().unwrap();

        let fresh_input = Input::keyboard().unwrap();
        let fresh_handle = fresh_input.handle();
        let mut fresh = crate::virtio::VirtioPciDevice::new(
            Box::new(fresh_input),
            d.mem.clone(),
            d.sink.clone(),
        )
        .unwrap();
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state().unwrap(), saved);
        d.dev = fresh;
        assert!(fresh_handle.is_ready());
        assert_eq!(d.read(DEVICE_CFG_OFFSET, 1), u64::from(CFG_ID_NAME));
        add_buffers(&mut d, 1, 3);
        assert_eq!(
            used_events(&d, 0, 4),
            vec![(EV_KEY, 2, 1), (EV_SYN, 0, 0), (EV_KEY, 3, 1), (EV_SYN, 0, 0)]
        );

        let mouse = Input::mouse().unwrap();
        let mut other =
            crate::virtio::VirtioPciDevice::new(Box::new(mouse), d.mem.clone(), d.sink.clone())
                .unwrap();
        let before = other.save_state().unwrap();
        assert!(matches!(other.restore_state(&saved), Err(StateError::Invalid { .. })));
        assert_eq!(other.save_state().unwrap(), before);
    }

    #[test]
    fn events_sent_while_quiesced_are_delivered_in_order_after_resume() {
        let (mut d, handle, _) = driver(Input::keyboard().unwrap());
        add_buffers(&mut d, 0, 8);
        use crate::pci::PciDevice;
        d.dev.quiesce();
        for code in 2..6 {
            handle.send(&[InputEvent::Key { code, down: true }]);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(d.tq.used_idx(&d.mem), 0, "no guest memory written while quiesced");
        d.dev.resume();
        wait_used(&d, 8);
        let keys: Vec<_> = (2..6).flat_map(|code| [(EV_KEY, code, 1), (EV_SYN, 0, 0)]).collect();
        assert_eq!(used_events(&d, 0, 8), keys);
    }

    /// Records which thread raised each interrupt.
    #[derive(Default)]
    struct ThreadRecorder(Mutex<Vec<Option<String>>>);

    impl VirtioInterrupt for ThreadRecorder {
        fn signal_used_queue(&self, _queue_index: u16) {
            self.0.lock().unwrap().push(std::thread::current().name().map(str::to_string));
        }
        fn signal_config_change(&self) {}
    }

    #[test]
    fn the_event_thread_not_the_sender_writes_host_events_into_the_guest() {
        let mem = crate::virtio::queue::testing::memory(4);
        let mut eventq = TestQueue::new(64, 0x10_0000);
        let statusq = TestQueue::new(64, 0x18_0000);
        let ready = |tq: &TestQueue| {
            let saved = crate::virtio::queue::SavedQueue {
                max_size: 64,
                next_avail: 0,
                next_used: 0,
                event_idx_enabled: false,
                size: 64,
                ready: true,
                desc_table: tq.desc,
                avail_ring: tq.avail,
                used_ring: tq.used,
            };
            saved.to_queue(&mem).unwrap()
        };
        let recorder = Arc::new(ThreadRecorder::default());
        let mut input = Input::keyboard().unwrap();
        let handle = input.handle();
        input
            .activate(mem.clone(), recorder.clone(), vec![ready(&eventq), ready(&statusq)])
            .unwrap();
        for i in 0..4 {
            eventq.set_desc(&mem, i, BUFFERS + 8 * u64::from(i), 8, DESC_F_WRITE, 0);
            eventq.push(&mem, i);
        }
        input.quiesce();
        handle.send(&[InputEvent::Key { code: 7, down: true }]);
        handle.send(&[InputEvent::Key { code: 7, down: false }]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(eventq.used_idx(&mem), 0, "send wrote guest memory, or the parked thread did");
        input.resume();
        eventually("the events", || eventq.used_idx(&mem) == 4);
        let mut got = Vec::new();
        for n in 0..4 {
            let (id, len) = eventq.used_elem(&mem, n);
            assert_eq!(len, 8);
            let mut e = [0u8; 8];
            mem.read_slice(&mut e, GuestAddress(BUFFERS + 8 * u64::from(id))).unwrap();
            got.push(e);
        }
        let want: Vec<_> = [encode(EV_KEY, 7, 1), encode(EV_SYN, SYN_REPORT, 0)]
            .into_iter()
            .chain([encode(EV_KEY, 7, 0), encode(EV_SYN, SYN_REPORT, 0)])
            .collect();
        assert_eq!(got, want);
        eventually("the interrupt", || !recorder.0.lock().unwrap().is_empty());
        assert!(recorder.0.lock().unwrap().iter().all(|t| t.as_deref() == Some("input-keyboard")));
    }
}
