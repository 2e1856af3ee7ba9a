//! The i8042 keyboard controller at ports 0x60/0x64 with a PS/2 keyboard behind it: what
//! Linux's i8042 and atkbd drivers need to find a keyboard, take keys from it (IRQ 1) before
//! virtio-input is up, and reset the machine (command 0xFE, how `reboot=k` reboots).
//!
//! ```text
//!  queue_scancodes ─▶ keyboard: responses, then scancodes ─┐
//!  controller command responses ───────────────────────────┴─▶ output register (1 byte) ─▶ 0x60
//! ```
//! One byte is latched in the output register at a time; the next is latched (and IRQ 1
//! pulsed, when the command byte enables it) once the guest reads it. There is no aux (mouse)
//! port: its loopback comes back without the aux flag and its interface test reports the
//! clock line stuck, which Linux takes as "no aux port" without waiting for timeouts.
//! Scancodes are passed as given (set 1, what the guest sees with translation on, the
//! default); with translation off they are still set 1.

use std::collections::VecDeque;

use log::warn;
use vm_superio::Trigger;

use crate::devices::bus::BusDevice;
use crate::devices::serial::IrqEdge;
use crate::state::StateError;

mod persist;

pub use persist::{I8042State, KeyboardState};

/// Offsets within the device's range starting at port 0x60.
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
/// Set when the keyboard is NOT inhibited by the key lock (Linux warns otherwise).
const STATUS_UNLOCKED: u8 = 0x10;

/// Command byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

/// Aux interface test result: "clock line stuck low", i.e. no usable aux port.
const AUX_TEST_NO_PORT: u8 = 0x01;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_NAK: u8 = 0xfe;
/// MF2 keyboard id, raw and as the controller translates it.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ID_TRANSLATED: [u8; 2] = [0xab, 0x41];

/// A real 8042 has a one-byte output buffer; a few bytes of slack, never unbounded growth
/// from a guest that writes commands and never reads.
const OUTPUT_CAPACITY: usize = 16;
/// Typed-ahead scancodes kept for a guest that is not reading; newer ones are dropped.
const SCANCODE_CAPACITY: usize = 256;

/// The PS/2 keyboard behind the controller.
struct Keyboard {
    /// Replies to commands, delivered before any scancode.
    responses: VecDeque<u8>,
    scancodes: VecDeque<u8>,
    /// A command waiting for its argument byte.
    pending: Option<u8>,
    scanning: bool,
    scancode_set: u8,
    leds: u8,
    last_sent: u8,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard {
            responses: VecDeque::new(),
            scancodes: VecDeque::new(),
            pending: None,
            scanning: true,
            scancode_set: 2,
            leds: 0,
            last_sent: 0,
        }
    }

    fn reply(&mut self, bytes: &[u8]) {
        self.responses.clear();
        self.responses.extend(bytes);
    }

    fn next_byte(&mut self) -> Option<u8> {
        let b = self.responses.pop_front().or_else(|| self.scancodes.pop_front())?;
        self.last_sent = b;
        Some(b)
    }

    /// A byte the guest sent to the keyboard. `translated`: the controller translates.
    fn write(&mut self, value: u8, translated: bool) {
        if let Some(cmd) = self.pending.take() {
            match cmd {
                KBD_SET_LEDS => {
                    self.leds = value & 0x07;
                    self.reply(&[KBD_ACK]);
                }
                KBD_SCANCODE_SET => match value {
                    0 => {
                        let id = if translated {
                            [0, 0x43, 0x41, 0x3f][usize::from(self.scancode_set)]
                        } else {
                            self.scancode_set
                        };
                        self.reply(&[KBD_ACK, id]);
                    }
                    1..=3 => {
                        self.scancode_set = value;
                        self.reply(&[KBD_ACK]);
                    }
                    _ => self.reply(&[KBD_NAK]),
                },
                // Typematic rate: repeat is the guest's business (keys arrive as make/break).
                _ => self.reply(&[KBD_ACK]),
            }
            return;
        }
        match value {
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_TYPEMATIC => {
                self.pending = Some(value);
                self.reply(&[KBD_ACK]);
            }
            KBD_ECHO => self.reply(&[KBD_ECHO]),
            KBD_IDENTIFY => {
                let id = if translated { KBD_ID_TRANSLATED } else { KBD_ID };
                self.reply(&[KBD_ACK, id[0], id[1]]);
            }
            KBD_ENABLE => {
                self.scanning = true;
                self.reply(&[KBD_ACK]);
            }
            KBD_DISABLE | KBD_DEFAULTS => {
                // Both restore defaults; disable also stops scanning.
                self.scanning = value == KBD_DEFAULTS;
                self.scancodes.clear();
                self.scancode_set = 2;
                self.reply(&[KBD_ACK]);
            }
            KBD_RESEND => {
                let last = self.last_sent;
                self.reply(&[last]);
            }
            KBD_RESET => {
                *self = Keyboard::new();
                self.reply(&[KBD_ACK, KBD_BAT_OK]);
            }
            // Scancode set 3 key-type commands: accepted and ignored.
            0xf7..=0xfd => self.reply(&[KBD_ACK]),
            _ => self.reply(&[KBD_NAK]),
        }
    }
}

/// Where the latched output byte came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Controller,
    Keyboard,
}

/// Most keyboard replies a saved state may carry.
const MAX_SAVED_RESPONSES: usize = 1 << 16;

pub struct I8042 {
    ctr: u8,
    /// The output register: the byte port 0x60 reads next.
    output: Option<(u8, Origin)>,
    /// The last byte read, which port 0x60 keeps returning when empty.
    last_read: u8,
    /// Controller command replies waiting behind the output register.
    controller: VecDeque<u8>,
    keyboard: Keyboard,
    pending_command: Option<u8>,
    last_was_command: bool,
    on_reset: Box<dyn Fn() + Send>,
    irq: Option<IrqEdge>,
}

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Self {
            ctr: CTR_XLATE | CTR_SYSTEM_FLAG | CTR_KBD_INT,
            output: None,
            last_read: 0,
            controller: VecDeque::new(),
            keyboard: Keyboard::new(),
            pending_command: None,
            last_was_command: false,
            on_reset,
            irq: None,
        }
    }

    pub fn save_state(&self) -> I8042State {
        let k = &self.keyboard;
        I8042State {
            ctr: self.ctr,
            output: self.output.map(|(b, o)| (b, o == Origin::Keyboard)),
            last_read: self.last_read,
            controller: self.controller.iter().copied().collect(),
            keyboard: KeyboardState {
                responses: k.responses.iter().copied().collect(),
                scancodes: k.scancodes.iter().copied().collect(),
                pending: k.pending,
                scanning: k.scanning,
                scancode_set: k.scancode_set,
                leds: k.leds,
                last_sent: k.last_sent,
            },
            pending_command: self.pending_command,
            last_was_command: self.last_was_command,
        }
    }

    /// Puts the controller back as saved. No interrupt is raised: a latched byte already had
    /// its IRQ 1 edge before the snapshot.
    pub fn restore_state(&mut self, state: &I8042State) -> Result<(), StateError> {
        let k = &state.keyboard;
        let invalid = |reason: &str| Err(StateError::invalid("i8042", reason));
        if state.controller.len() > OUTPUT_CAPACITY {
            return invalid("too many controller replies");
        }
        // Replies are a few bytes, but a guest can pile up 0xD2 writes it never reads.
        if k.responses.len() > MAX_SAVED_RESPONSES || k.scancodes.len() > SCANCODE_CAPACITY {
            return invalid("too many queued keyboard bytes");
        }
        if !(1..=3).contains(&k.scancode_set) {
            return invalid("scancode set out of range");
        }
        self.ctr = state.ctr;
        self.output = state
            .output
            .map(|(b, kbd)| (b, if kbd { Origin::Keyboard } else { Origin::Controller }));
        self.last_read = state.last_read;
        self.controller = state.controller.iter().copied().collect();
        self.keyboard = Keyboard {
            responses: k.responses.iter().copied().collect(),
            scancodes: k.scancodes.iter().copied().collect(),
            pending: k.pending,
            scanning: k.scanning,
            scancode_set: k.scancode_set,
            leds: k.leds & 0x07,
            last_sent: k.last_sent,
        };
        self.pending_command = state.pending_command;
        self.last_was_command = state.last_was_command;
        Ok(())
    }

    /// Raises `irq` (IRQ 1) when a byte is latched and the command byte enables it.
    pub fn with_keyboard_irq(mut self, irq: IrqEdge) -> Self {
        self.irq = Some(irq);
        self
    }

    /// Queues set-1 scancode bytes from the keyboard; they are delivered one at a time as the
    /// guest reads them. Dropped while the guest has the keyboard disabled (0xF5) or when the
    /// guest has not read the last few hundred.
    pub fn queue_scancodes(&mut self, bytes: &[u8]) {
        if !self.keyboard.scanning {
            return;
        }
        let room = SCANCODE_CAPACITY.saturating_sub(self.keyboard.scancodes.len());
        if bytes.len() > room {
            warn!("i8042: the guest is not reading the keyboard; dropping keys");
        }
        self.keyboard.scancodes.extend(bytes.iter().take(room));
        self.refill();
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYSTEM_FLAG | STATUS_UNLOCKED;
        if self.output.is_some() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            s |= STATUS_COMMAND;
        }
        s
    }

    /// A controller reply: it replaces an unread earlier reply (a keyboard byte in the output
    /// register goes back to the head of its queue).
    fn reply(&mut self, byte: u8) {
        match self.output.take() {
            Some((b, Origin::Keyboard)) => self.keyboard.responses.push_front(b),
            Some((_, Origin::Controller)) | None => {}
        }
        if self.controller.len() < OUTPUT_CAPACITY {
            self.controller.push_back(byte);
        }
        self.refill();
    }

    /// Latches the next byte into an empty output register and pulses IRQ 1 for it.
    fn refill(&mut self) {
        if self.output.is_some() {
            return;
        }
        let next = match self.controller.pop_front() {
            Some(b) => Some((b, Origin::Controller)),
            None if self.ctr & CTR_KBD_DISABLE == 0 => {
                self.keyboard.next_byte().map(|b| (b, Origin::Keyboard))
            }
            None => None,
        };
        if next.is_some() {
            self.output = next;
            self.raise_irq();
        }
    }

    fn raise_irq(&self) {
        if self.ctr & CTR_KBD_INT == 0 {
            return;
        }
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.trigger() {
                warn!("i8042: raising IRQ 1 failed: {e}");
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_AUX_LOOP
            | CMD_AUX_SEND => self.pending_command = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.reply(AUX_TEST_NO_PORT),
            CMD_SELF_TEST => self.reply(0x55),
            CMD_KBD_TEST => self.reply(0x00),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => {
                self.ctr &= !CTR_KBD_DISABLE;
                self.refill();
            }
            // A20 enabled, reset line not asserted.
            CMD_READ_OUTPUT_PORT => self.reply(0x03),
            CMD_PULSE_RESET => (self.on_reset)(),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => {
                let was_enabled = self.ctr & CTR_KBD_INT != 0;
                self.ctr = value;
                if !was_enabled && self.output.is_some() {
                    // Edge-triggered: a byte already waiting needs its pulse now.
                    self.raise_irq();
                }
                self.refill();
            }
            // Bit 0 low on the output port asserts the CPU reset line.
            Some(CMD_WRITE_OUTPUT_PORT) if value & 1 == 0 => (self.on_reset)(),
            Some(CMD_WRITE_KBD_OUTPUT) => {
                self.keyboard.responses.push_back(value);
                self.refill();
            }
            // Loopback without the aux flag in the status: no aux port.
            Some(CMD_AUX_LOOP) => self.reply(value),
            // Bytes for the absent aux device go nowhere.
            Some(_) => {}
            None => {
                // Sending to the keyboard re-enables its interface, as on real controllers.
                self.ctr &= !CTR_KBD_DISABLE;
                let translated = self.ctr & CTR_XLATE != 0;
                self.keyboard.write(value, translated);
                self.refill();
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                if let Some((b, _)) = self.output.take() {
                    self.last_read = b;
                    self.refill();
                }
                self.last_read
            }
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA_OFFSET => {
                self.last_was_command = false;
                self.data(value);
            }
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{self, InterruptSink};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Irqs(Mutex<Vec<(u32, bool)>>);

    impl InterruptSink for Irqs {
        fn set_irq_line(&self, gsi: u32, active: bool) -> hypervisor::Result<()> {
            self.0.lock().expect("irq log").push((gsi, active));
            Ok(())
        }
        fn signal_msi(&self, _address: u64, _data: u32) -> hypervisor::Result<()> {
            Ok(())
        }
    }

    impl Irqs {
        fn pulses(&self) -> usize {
            self.0.lock().expect("irq log").iter().filter(|(g, a)| *g == 1 && *a).count()
        }
    }

    fn device() -> (I8042, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        (I8042::new(Box::new(move || _ = r.fetch_add(1, Ordering::SeqCst))), resets)
    }

    fn with_irq() -> (I8042, Arc<Irqs>) {
        let irqs = Arc::new(Irqs::default());
        let dev = device().0.with_keyboard_irq(IrqEdge::new(irqs.clone(), 1));
        (dev, irqs)
    }

    fn status(dev: &mut I8042) -> u8 {
        let mut s = [0];
        dev.read(COMMAND_OFFSET, &mut s);
        s[0]
    }

    /// Everything in the output buffer, read the way a driver polls it.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while status(dev) & STATUS_OUTPUT_FULL != 0 && out.len() < 64 {
            let mut d = [0];
            dev.read(DATA_OFFSET, &mut d);
            out.push(d[0]);
        }
        out
    }

    fn kbd(dev: &mut I8042, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            dev.write(DATA_OFFSET, &[b]);
            out.extend(drain(dev));
        }
        out
    }

    #[test]
    fn pulse_reset_command_resets_the_machine() {
        let (mut dev, resets) = device();
        dev.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA_OFFSET, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn self_test_answers_0x55_through_the_output_buffer() {
        let (mut dev, _) = device();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(drain(&mut dev), [0x55]);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_KBD_TEST]);
        assert_eq!(drain(&mut dev), [0x00]);
    }

    #[test]
    fn output_buffer_does_not_grow_for_a_guest_that_never_reads() {
        let (mut dev, _) = device();
        for _ in 0..10_000 {
            dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
            dev.write(DATA_OFFSET, &[KBD_ECHO]);
        }
        dev.queue_scancodes(&[0x1e; 10_000]);
        assert!(dev.controller.len() <= OUTPUT_CAPACITY);
        assert!(dev.keyboard.responses.len() <= OUTPUT_CAPACITY);
        assert_eq!(dev.keyboard.scancodes.len(), SCANCODE_CAPACITY);
    }

    #[test]
    fn controller_configuration_byte_round_trips() {
        let (mut dev, resets) = device();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut dev), [0x47]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn keyboard_reset_identify_and_echo() {
        let (mut dev, _) = device();
        assert_eq!(kbd(&mut dev, &[KBD_RESET]), [KBD_ACK, KBD_BAT_OK]);
        assert_eq!(kbd(&mut dev, &[KBD_IDENTIFY]), [KBD_ACK, 0xab, 0x41], "translated");
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x05]);
        assert_eq!(kbd(&mut dev, &[KBD_IDENTIFY]), [KBD_ACK, 0xab, 0x83], "raw");
        assert_eq!(kbd(&mut dev, &[KBD_ECHO]), [KBD_ECHO]);
        assert_eq!(kbd(&mut dev, &[0x42]), [KBD_NAK], "unknown command");
    }

    #[test]
    fn keyboard_leds_typematic_and_scancode_set() {
        let (mut dev, _) = device();
        assert_eq!(kbd(&mut dev, &[KBD_SET_LEDS, 0x04]), [KBD_ACK, KBD_ACK]);
        assert_eq!(dev.keyboard.leds, 0x04);
        assert_eq!(kbd(&mut dev, &[KBD_TYPEMATIC, 0x20]), [KBD_ACK, KBD_ACK]);
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 0x41]);
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 1]), [KBD_ACK, KBD_ACK]);
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 0x43]);
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 9]), [KBD_ACK, KBD_NAK]);
        assert_eq!(kbd(&mut dev, &[KBD_RESEND]), [KBD_NAK], "resends the last byte");
    }

    #[test]
    fn scancodes_arrive_one_at_a_time_each_with_an_irq() {
        let (mut dev, irqs) = with_irq();
        dev.queue_scancodes(&[0x1e, 0x9e]);
        assert_eq!(irqs.pulses(), 1, "one byte latched");
        let mut d = [0];
        dev.read(DATA_OFFSET, &mut d);
        assert_eq!(d[0], 0x1e);
        assert_eq!(irqs.pulses(), 2);
        dev.read(DATA_OFFSET, &mut d);
        assert_eq!(d[0], 0x9e);
        assert_eq!(status(&mut dev) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(irqs.pulses(), 2);
    }

    #[test]
    fn interrupt_disabled_or_keyboard_disabled_holds_scancodes() {
        let (mut dev, irqs) = with_irq();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[CTR_XLATE]);
        dev.queue_scancodes(&[0x1e]);
        assert_eq!(irqs.pulses(), 0);
        assert_eq!(drain(&mut dev), [0x1e], "pollable without interrupts");
        dev.write(COMMAND_OFFSET, &[CMD_KBD_DISABLE]);
        dev.queue_scancodes(&[0x30]);
        assert!(drain(&mut dev).is_empty());
        dev.write(COMMAND_OFFSET, &[CMD_KBD_ENABLE]);
        assert_eq!(drain(&mut dev), [0x30]);
        assert_eq!(kbd(&mut dev, &[KBD_DISABLE]), [KBD_ACK]);
        dev.queue_scancodes(&[0x1e]);
        assert!(drain(&mut dev).is_empty(), "a disabled keyboard does not scan");
        assert_eq!(kbd(&mut dev, &[KBD_ENABLE]), [KBD_ACK]);
        dev.queue_scancodes(&[0x1e]);
        assert_eq!(drain(&mut dev), [0x1e]);
    }

    #[test]
    fn controller_reply_goes_before_an_unread_scancode() {
        let (mut dev, _) = device();
        dev.queue_scancodes(&[0x1e]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut dev), [0x45, 0x1e]);
    }

    #[test]
    fn aux_port_is_reported_absent_without_timeouts() {
        let (mut dev, _) = device();
        // Linux's i8042_check_aux: loopback, then the interface test.
        dev.write(COMMAND_OFFSET, &[CMD_AUX_LOOP]);
        dev.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(status(&mut dev) & (STATUS_OUTPUT_FULL | 0x20), STATUS_OUTPUT_FULL);
        dev.write(COMMAND_OFFSET, &[CMD_AUX_TEST]);
        assert_eq!(drain(&mut dev), [AUX_TEST_NO_PORT], "the reply replaces the stale loopback");
        dev.write(COMMAND_OFFSET, &[CMD_AUX_SEND]);
        dev.write(DATA_OFFSET, &[0xff]);
        assert!(drain(&mut dev).is_empty());
    }

    #[test]
    fn saved_controller_and_keyboard_survive_a_restore() {
        let (mut dev, _) = with_irq();
        dev.write(DATA_OFFSET, &[KBD_SET_LEDS]);
        dev.write(DATA_OFFSET, &[0x02]);
        dev.queue_scancodes(&[0x1e, 0x9e, 0x30]);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        let saved = dev.save_state();
        let bytes = crate::state::encode("i8042", &saved).unwrap();
        let decoded: I8042State = crate::state::decode("i8042", &bytes).unwrap();
        let (mut fresh, _) = with_irq();
        fresh.restore_state(&decoded).unwrap();
        assert_eq!(fresh.save_state(), saved);
        // The pending WRITE_CTR takes its argument; then the queued bytes come out in order.
        fresh.write(DATA_OFFSET, &[CTR_XLATE | CTR_SYSTEM_FLAG | CTR_KBD_INT]);
        let mut got = Vec::new();
        for _ in 0..5 {
            let mut b = [0u8];
            fresh.read(DATA_OFFSET, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, vec![KBD_ACK, KBD_ACK, 0x1e, 0x9e, 0x30]);
    }

    #[test]
    fn hostile_i8042_state_is_refused_and_the_device_is_unchanged() {
        let (mut dev, _) = with_irq();
        dev.queue_scancodes(&[0x1e]);
        let before = dev.save_state();
        let mut bad = before.clone();
        bad.keyboard.scancodes = vec![0; SCANCODE_CAPACITY + 1];
        assert!(matches!(dev.restore_state(&bad), Err(StateError::Invalid { .. })));
        let mut bad = before.clone();
        bad.keyboard.scancode_set = 7;
        assert!(matches!(dev.restore_state(&bad), Err(StateError::Invalid { .. })));
        assert_eq!(dev.save_state(), before);
    }
}
