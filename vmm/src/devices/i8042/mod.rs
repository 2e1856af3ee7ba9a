//! The i8042 keyboard controller at ports 0x60/0x64, a PS/2 keyboard on its first port and a
//! PS/2 mouse on its aux port: what firmware (OVMF's Ps2KeyboardDxe, SeaBIOS), boot loaders
//! and Linux's i8042/atkbd/psmouse drivers need to take keys (IRQ 1) and mouse packets
//! (IRQ 12), and to reset the machine (command 0xFE, how `reboot=k` reboots).
//!
//! ```text
//!  controller replies ──────────────────────────┐
//!  queue_scancodes ─▶ keyboard: replies, keys ──┼─▶ output register (1 byte) ─▶ 0x60
//!  pointer_motion  ─▶ mouse: replies, packets ──┘      (status AUXB: from the mouse)
//! ```
//! One byte is latched in the output register at a time; the next is latched (and IRQ 1 or 12
//! pulsed, when the command byte enables it) once the guest reads it. Controller replies go
//! first, then the keyboard, then the mouse; a port whose clock the command byte disables
//! holds its bytes. Keys come from the host as set 1; the keyboard sends set 2 (its default)
//! which the controller translates back to set 1 when command byte bit 6 is set, as on real
//! hardware (see `keyboard`).

use std::collections::VecDeque;

use log::{trace, warn};
use vm_superio::Trigger;

use crate::devices::bus::BusDevice;
use crate::devices::serial::IrqEdge;
use crate::state::StateError;

mod keyboard;
mod mouse;
mod persist;

use keyboard::Keyboard;
use mouse::Mouse;
pub use mouse::{BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT};
pub use persist::{I8042State, I8042StateV1, KeyboardState, MouseState, SavedOrigin};

/// Offsets within the device's range starting at port 0x60.
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
/// Set when the keyboard is NOT inhibited by the key lock (Linux warns otherwise).
const STATUS_UNLOCKED: u8 = 0x10;
/// The output byte came from the aux (mouse) port.
const STATUS_AUX_DATA: u8 = 0x20;

/// Command byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
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
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_TEST_OK: u8 = 0x00;
/// Input port: bit 7 set, the keyboard is not inhibited by the key lock.
const INPUT_PORT: u8 = 0x80;

// Output port bits.
const OUTPUT_PORT_RESET: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;
const OUTPUT_PORT_KBD_FULL: u8 = 0x10;
const OUTPUT_PORT_AUX_FULL: u8 = 0x20;
/// Power-on: reset line high (not asserted), A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = OUTPUT_PORT_RESET | OUTPUT_PORT_A20;

/// A real 8042 has a one-byte output buffer; a few bytes of slack, never unbounded growth
/// from a guest that writes commands and never reads.
const OUTPUT_CAPACITY: usize = 16;

/// Where the latched output byte came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Controller,
    Keyboard,
    Aux,
}

pub struct I8042 {
    ctr: u8,
    /// The output register: the byte port 0x60 reads next.
    output: Option<(u8, Origin)>,
    /// The last byte read, which port 0x60 keeps returning when empty.
    last_read: u8,
    /// Controller command replies waiting behind the output register.
    controller: VecDeque<u8>,
    keyboard: Keyboard,
    mouse: Mouse,
    pending_command: Option<u8>,
    last_was_command: bool,
    /// The output port as last written (0xD1): only A20 is kept; the reset line acts at once.
    output_port: u8,
    on_reset: Box<dyn Fn() + Send>,
    irq: Option<IrqEdge>,
    aux_irq: Option<IrqEdge>,
}

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Self {
            ctr: CTR_XLATE | CTR_SYSTEM_FLAG | CTR_KBD_INT,
            output: None,
            last_read: 0,
            controller: VecDeque::new(),
            keyboard: Keyboard::new(),
            mouse: Mouse::new(),
            pending_command: None,
            last_was_command: false,
            output_port: OUTPUT_PORT_DEFAULT,
            on_reset,
            irq: None,
            aux_irq: None,
        }
    }

    /// Raises `irq` (IRQ 1) when a keyboard or controller byte is latched and the command byte
    /// enables it.
    pub fn with_keyboard_irq(mut self, irq: IrqEdge) -> Self {
        self.irq = Some(irq);
        self
    }

    /// Raises `irq` (IRQ 12) when a mouse byte is latched and the command byte enables it.
    /// Without it the aux port still works for a polling guest, but Linux's probe, which
    /// waits for IRQ 12, gives up on it.
    pub fn with_aux_irq(mut self, irq: IrqEdge) -> Self {
        self.aux_irq = Some(irq);
        self
    }

    /// Queues one key transition as set-1 scancode bytes (`display::keymap::set1_scancode`);
    /// the guest gets them in its selected set, one byte at a time as it reads. Dropped while
    /// the guest has the keyboard disabled (0xF5) or when the guest has not read the last few
    /// hundred bytes.
    pub fn queue_scancodes(&mut self, bytes: &[u8]) {
        let translated = self.ctr & CTR_XLATE != 0;
        self.keyboard.queue_key(bytes, translated);
        self.refill();
    }

    /// Host mouse motion for the PS/2 mouse: `dx` right and `dy` down in counts (screen sense),
    /// `wheel` in detents, positive away from the user; `buttons` is the set held now
    /// ([`BUTTON_LEFT`] | [`BUTTON_RIGHT`] | [`BUTTON_MIDDLE`]). Ignored until the guest
    /// enables reporting (0xF4), as a real mouse does.
    pub fn pointer_motion(&mut self, dx: i32, dy: i32, wheel: i32, buttons: u8) {
        self.mouse.motion(dx, dy, wheel, buttons);
        self.refill();
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if self.ctr & CTR_SYSTEM_FLAG != 0 {
            s |= STATUS_SYSTEM_FLAG;
        }
        match self.output {
            Some((_, Origin::Aux)) => s |= STATUS_OUTPUT_FULL | STATUS_AUX_DATA,
            Some(_) => s |= STATUS_OUTPUT_FULL,
            None => {}
        }
        if self.last_was_command {
            s |= STATUS_COMMAND;
        }
        s
    }

    /// A controller reply: it replaces an unread earlier reply (a device byte in the output
    /// register goes back to the head of its queue).
    fn reply(&mut self, byte: u8) {
        match self.output.take() {
            Some((b, Origin::Keyboard)) => self.keyboard.responses.push_front(b),
            Some((b, Origin::Aux)) => self.mouse.responses.push_front(b),
            Some((_, Origin::Controller)) | None => {}
        }
        if self.controller.len() < OUTPUT_CAPACITY {
            self.controller.push_back(byte);
        }
        self.refill();
    }

    /// Latches the next byte into an empty output register and pulses its IRQ.
    fn refill(&mut self) {
        if self.output.is_some() {
            return;
        }
        let next = if let Some(b) = self.controller.pop_front() {
            Some((b, Origin::Controller))
        } else if let Some(b) =
            (self.ctr & CTR_KBD_DISABLE == 0).then(|| self.keyboard.next_byte()).flatten()
        {
            Some((b, Origin::Keyboard))
        } else {
            (self.ctr & CTR_AUX_DISABLE == 0)
                .then(|| self.mouse.next_byte())
                .flatten()
                .map(|b| (b, Origin::Aux))
        };
        if let Some((_, origin)) = next {
            self.output = next;
            self.raise_irq(origin);
        }
    }

    fn raise_irq(&self, origin: Origin) {
        let (enable, irq, name) = match origin {
            Origin::Controller | Origin::Keyboard => (CTR_KBD_INT, &self.irq, "IRQ 1"),
            Origin::Aux => (CTR_AUX_INT, &self.aux_irq, "IRQ 12"),
        };
        if self.ctr & enable == 0 {
            return;
        }
        if let Some(irq) = irq {
            if let Err(e) = irq.trigger() {
                warn!("i8042: raising {name} failed: {e}");
            }
        }
    }

    fn read_output_port(&self) -> u8 {
        let mut port = self.output_port | OUTPUT_PORT_RESET;
        match self.output {
            Some((_, Origin::Aux)) => port |= OUTPUT_PORT_AUX_FULL,
            Some(_) => port |= OUTPUT_PORT_KBD_FULL,
            None => {}
        }
        port
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_AUX_SEND => self.pending_command = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => {
                self.ctr &= !CTR_AUX_DISABLE;
                self.refill();
            }
            CMD_AUX_TEST | CMD_KBD_TEST => self.reply(INTERFACE_TEST_OK),
            CMD_SELF_TEST => {
                // A passed self-test sets the system flag.
                self.ctr |= CTR_SYSTEM_FLAG;
                self.reply(SELF_TEST_OK);
            }
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => {
                self.ctr &= !CTR_KBD_DISABLE;
                self.refill();
            }
            CMD_READ_INPUT_PORT => self.reply(INPUT_PORT),
            CMD_READ_OUTPUT_PORT => self.reply(self.read_output_port()),
            // 0xF0..=0xFF pulse output port bits low for the clear bits of the low nibble;
            // bit 0 is the CPU reset line (0xFE is the usual one).
            CMD_PULSE_RESET => (self.on_reset)(),
            0xf0..=0xff if cmd & 0x01 == 0 => (self.on_reset)(),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => {
                let before = self.ctr;
                self.ctr = value;
                // Edge-triggered: a byte already waiting needs its pulse when its interrupt
                // is switched on.
                if let Some((_, origin)) = self.output {
                    let enable = match origin {
                        Origin::Aux => CTR_AUX_INT,
                        Origin::Controller | Origin::Keyboard => CTR_KBD_INT,
                    };
                    if before & enable == 0 && value & enable != 0 {
                        self.raise_irq(origin);
                    }
                }
                self.refill();
            }
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = (value & OUTPUT_PORT_A20) | OUTPUT_PORT_RESET;
                // Bit 0 low on the output port asserts the CPU reset line.
                if value & OUTPUT_PORT_RESET == 0 {
                    (self.on_reset)();
                }
            }
            Some(CMD_WRITE_KBD_OUTPUT) => {
                self.keyboard.push_response(value);
                self.refill();
            }
            Some(CMD_WRITE_AUX_OUTPUT) => {
                self.mouse.push_response(value);
                self.refill();
            }
            Some(CMD_AUX_SEND) => {
                self.mouse.write(value);
                self.refill();
            }
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
        trace!("i8042: read {offset:#x} = {value:#04x}");
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        trace!("i8042: write {offset:#x} = {value:#04x}");
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

/// Most keyboard replies a first-form saved state may carry (a guest could pile up 0xD2
/// writes there); beyond what the device now keeps they are dropped on restore.
const MAX_V1_RESPONSES: usize = 1 << 16;

impl I8042 {
    pub fn save_state(&self) -> I8042State {
        let k = &self.keyboard;
        let m = &self.mouse;
        I8042State {
            ctr: self.ctr,
            output: self.output.map(|(b, o)| {
                let origin = match o {
                    Origin::Controller => SavedOrigin::Controller,
                    Origin::Keyboard => SavedOrigin::Keyboard,
                    Origin::Aux => SavedOrigin::Aux,
                };
                (b, origin)
            }),
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
            mouse: MouseState {
                responses: m.responses.iter().copied().collect(),
                packets: m.packets.iter().copied().collect(),
                pending: m.pending,
                reporting: m.reporting,
                remote: m.remote,
                wrap: m.wrap,
                scaling_2_1: m.scaling_2_1,
                resolution: m.resolution,
                sample_rate: m.sample_rate,
                id: m.id,
                rates: m.rates,
                buttons: m.buttons,
                reported_buttons: m.reported_buttons,
                dx: m.dx,
                dy: m.dy,
                dz: m.dz,
                last_sent: m.last_sent,
            },
            pending_command: self.pending_command,
            last_was_command: self.last_was_command,
            output_port: self.output_port,
        }
    }

    /// Puts the controller back as saved. No interrupt is raised: a latched byte already had
    /// its edge before the snapshot.
    pub fn restore_state(&mut self, state: &I8042State) -> Result<(), StateError> {
        let (k, m) = (&state.keyboard, &state.mouse);
        let invalid = |reason: &str| Err(StateError::invalid("i8042", reason));
        if state.controller.len() > OUTPUT_CAPACITY {
            return invalid("too many controller replies");
        }
        // A first-form state may carry more replies than the device keeps (see below).
        if k.responses.len() > MAX_V1_RESPONSES || k.scancodes.len() > keyboard::SCANCODE_CAPACITY {
            return invalid("too many queued keyboard bytes");
        }
        if m.responses.len() > mouse::RESPONSE_CAPACITY || m.packets.len() > mouse::PACKET_CAPACITY
        {
            return invalid("too many queued mouse bytes");
        }
        // Set 3 was accepted by the first form (which still sent set 1): it is set 2 now.
        let scancode_set = match k.scancode_set {
            3 => 2,
            set if keyboard::is_supported_set(set) => set,
            _ => return invalid("scancode set out of range"),
        };
        if ![mouse::MOUSE_ID_STANDARD, mouse::MOUSE_ID_WHEEL].contains(&m.id) {
            return invalid("unknown mouse id");
        }
        self.ctr = state.ctr;
        self.output = state.output.map(|(b, o)| {
            let origin = match o {
                SavedOrigin::Controller => Origin::Controller,
                SavedOrigin::Keyboard => Origin::Keyboard,
                SavedOrigin::Aux => Origin::Aux,
            };
            (b, origin)
        });
        self.last_read = state.last_read;
        self.controller = state.controller.iter().copied().collect();
        self.keyboard = Keyboard {
            responses: k.responses.iter().copied().take(keyboard::RESPONSE_CAPACITY).collect(),
            scancodes: k.scancodes.iter().copied().collect(),
            pending: k.pending,
            scanning: k.scanning,
            scancode_set,
            leds: k.leds & 0x07,
            last_sent: k.last_sent,
        };
        self.mouse = Mouse {
            responses: m.responses.iter().copied().collect(),
            packets: m.packets.iter().copied().collect(),
            pending: m.pending,
            reporting: m.reporting,
            remote: m.remote,
            wrap: m.wrap,
            scaling_2_1: m.scaling_2_1,
            resolution: m.resolution & 0x03,
            sample_rate: m.sample_rate,
            id: m.id,
            rates: m.rates,
            buttons: m.buttons & 0x07,
            reported_buttons: m.reported_buttons & 0x07,
            dx: m.dx,
            dy: m.dy,
            dz: m.dz,
            last_sent: m.last_sent,
        };
        self.pending_command = state.pending_command;
        self.last_was_command = state.last_was_command;
        self.output_port = (state.output_port & OUTPUT_PORT_A20) | OUTPUT_PORT_RESET;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::keyboard::*;
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
            self.pulses_on(1)
        }
        fn pulses_on(&self, gsi: u32) -> usize {
            self.0.lock().expect("irq log").iter().filter(|(g, a)| *g == gsi && *a).count()
        }
    }

    fn device() -> (I8042, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        (I8042::new(Box::new(move || _ = r.fetch_add(1, Ordering::SeqCst))), resets)
    }

    fn with_irq() -> (I8042, Arc<Irqs>) {
        let irqs = Arc::new(Irqs::default());
        let dev = device()
            .0
            .with_keyboard_irq(IrqEdge::new(irqs.clone(), 1))
            .with_aux_irq(IrqEdge::new(irqs.clone(), 12));
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
        for _ in 0..10_000 {
            dev.queue_scancodes(&[0x1e]);
        }
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
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 3]), [KBD_ACK, KBD_NAK], "set 3 unmapped");
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

    /// A controller command with its argument bytes; the replies it waits for.
    fn ctl(dev: &mut I8042, cmd: u8, args: &[u8], replies: usize) -> Vec<u8> {
        dev.write(COMMAND_OFFSET, &[cmd]);
        for &a in args {
            dev.write(DATA_OFFSET, &[a]);
        }
        (0..replies)
            .map(|_| {
                assert_ne!(status(dev) & STATUS_OUTPUT_FULL, 0, "reply to {cmd:#04x} missing");
                let mut d = [0];
                dev.read(DATA_OFFSET, &mut d);
                d[0]
            })
            .collect()
    }

    /// One byte from the port `aux` names, discarding the other port's, as SeaBIOS's
    /// ps2_recvbyte does.
    fn recv(dev: &mut I8042, aux: bool) -> Option<u8> {
        for _ in 0..64 {
            let s = status(dev);
            if s & STATUS_OUTPUT_FULL == 0 {
                return None;
            }
            let mut d = [0];
            dev.read(DATA_OFFSET, &mut d);
            if (s & STATUS_AUX_DATA != 0) == aux {
                return Some(d[0]);
            }
        }
        None
    }

    /// SeaBIOS's __ps2_command for the keyboard: both ports off and no interrupts, the
    /// keyboard's port on, the command and its argument each ACKed, the replies, then the
    /// command byte put back.
    fn seabios_kbd_command(dev: &mut I8042, ps2ctr: u8, bytes: &[u8], replies: usize) -> Vec<u8> {
        let quiet = (ps2ctr | CTR_AUX_DISABLE | CTR_KBD_DISABLE) & !(CTR_KBD_INT | CTR_AUX_INT);
        ctl(dev, CMD_WRITE_CTR, &[quiet], 0);
        ctl(dev, CMD_WRITE_CTR, &[quiet & !CTR_KBD_DISABLE], 0);
        for &b in bytes {
            dev.write(DATA_OFFSET, &[b]);
            assert_eq!(recv(dev, false), Some(KBD_ACK), "ACK for {b:#04x}");
        }
        let got = (0..replies).filter_map(|_| recv(dev, false)).collect();
        ctl(dev, CMD_WRITE_CTR, &[ps2ctr], 0);
        got
    }

    #[test]
    fn seabios_keyboard_setup_succeeds_and_keys_then_arrive_as_set_1() {
        let (mut dev, irqs) = with_irq();
        dev.queue_scancodes(&[0x1e]);
        assert_eq!(drain(&mut dev), [0x1e], "i8042_flush");
        ctl(&mut dev, CMD_KBD_DISABLE, &[], 0);
        ctl(&mut dev, CMD_AUX_DISABLE, &[], 0);
        assert!(drain(&mut dev).is_empty());
        assert_eq!(ctl(&mut dev, CMD_SELF_TEST, &[], 1), [SELF_TEST_OK]);
        assert_eq!(ctl(&mut dev, CMD_KBD_TEST, &[], 1), [INTERFACE_TEST_OK]);
        let boot_ctr = CTR_KBD_DISABLE | CTR_AUX_DISABLE;
        assert_eq!(seabios_kbd_command(&mut dev, boot_ctr, &[KBD_RESET], 1), [KBD_BAT_OK]);
        assert!(seabios_kbd_command(&mut dev, boot_ctr, &[KBD_DISABLE], 0).is_empty());
        assert!(seabios_kbd_command(&mut dev, boot_ctr, &[KBD_SCANCODE_SET, 2], 0).is_empty());
        let ps2ctr = CTR_AUX_DISABLE | CTR_XLATE | CTR_KBD_INT;
        assert!(seabios_kbd_command(&mut dev, ps2ctr, &[KBD_ENABLE], 0).is_empty());
        assert!(drain(&mut dev).is_empty(), "nothing left over");
        let before = irqs.pulses();
        dev.queue_scancodes(&[0xe0, 0x48]);
        assert_eq!(irqs.pulses(), before + 1);
        assert_eq!(drain(&mut dev), [0xe0, 0x48], "Up, translated to set 1");
        assert_eq!(irqs.pulses(), before + 2, "one IRQ 1 edge per byte");
    }

    #[test]
    fn ovmf_keyboard_init_succeeds_and_keys_then_arrive_as_set_1() {
        let (mut dev, irqs) = with_irq();
        assert!(drain(&mut dev).is_empty());
        assert_ne!(status(&mut dev) & STATUS_SYSTEM_FLAG, 0);
        assert_eq!(ctl(&mut dev, CMD_SELF_TEST, &[], 1), [SELF_TEST_OK]);
        // Translation, mouse off, system flag, both interrupts.
        ctl(&mut dev, CMD_WRITE_CTR, &[0x67], 0);
        assert_eq!(ctl(&mut dev, CMD_KBD_TEST, &[], 1), [INTERFACE_TEST_OK]);
        ctl(&mut dev, CMD_KBD_ENABLE, &[], 0);
        assert_eq!(kbd(&mut dev, &[KBD_RESET]), [KBD_ACK, KBD_BAT_OK]);
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 2]), [KBD_ACK, KBD_ACK]);
        assert_eq!(kbd(&mut dev, &[KBD_SET_LEDS, 0x02]), [KBD_ACK, KBD_ACK]);
        assert_eq!(dev.keyboard.leds, 0x02);
        assert_eq!(ctl(&mut dev, CMD_READ_CTR, &[], 1), [0x67]);
        dev.queue_scancodes(&[0x1c]);
        dev.queue_scancodes(&[0x9c]);
        assert_eq!(drain(&mut dev), [0x1c, 0x9c], "Enter make and break, set 1");
        assert_eq!(irqs.pulses_on(12), 0, "no mouse traffic");
    }

    #[test]
    fn translation_off_gives_the_keyboards_set_2_or_set_1_codes() {
        let (mut dev, _) = device();
        ctl(&mut dev, CMD_WRITE_CTR, &[CTR_SYSTEM_FLAG | CTR_KBD_INT], 0);
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 2]);
        dev.queue_scancodes(&[0x1e]);
        dev.queue_scancodes(&[0x9e]);
        dev.queue_scancodes(&[0xe0, 0xcb]);
        assert_eq!(drain(&mut dev), [0x1c, 0xf0, 0x1c, 0xe0, 0xf0, 0x6b]);
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 1]), [KBD_ACK, KBD_ACK]);
        dev.queue_scancodes(&[0x9e]);
        assert_eq!(drain(&mut dev), [0x9e], "set 1 raw");
        assert_eq!(kbd(&mut dev, &[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 1]);
    }

    #[test]
    fn a_command_byte_in_place_of_an_argument_starts_a_new_command() {
        let (mut dev, _) = device();
        assert_eq!(kbd(&mut dev, &[KBD_SET_LEDS, KBD_ENABLE]), [KBD_ACK, KBD_ACK]);
        assert_eq!(kbd(&mut dev, &[0x01]), [KBD_NAK], "no argument pending any more");
    }

    #[test]
    fn linux_aux_probe_finds_a_port_with_irq_12_and_no_multiplexer() {
        let (mut dev, irqs) = with_irq();
        // i8042_check_aux: loopback answered from the aux side.
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_AUX_OUTPUT]);
        dev.write(DATA_OFFSET, &[0x5a]);
        let s = status(&mut dev);
        assert_eq!(
            s & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            STATUS_OUTPUT_FULL | STATUS_AUX_DATA
        );
        assert_eq!(drain(&mut dev), [0x5a]);
        assert_eq!(ctl(&mut dev, CMD_AUX_TEST, &[], 1), [INTERFACE_TEST_OK]);
        ctl(&mut dev, CMD_AUX_DISABLE, &[], 0);
        assert_ne!(ctl(&mut dev, CMD_READ_CTR, &[], 1)[0] & CTR_AUX_DISABLE, 0);
        ctl(&mut dev, CMD_AUX_ENABLE, &[], 0);
        let ctr = ctl(&mut dev, CMD_READ_CTR, &[], 1)[0];
        assert_eq!(ctr & CTR_AUX_DISABLE, 0);
        // The IRQ test: loopback with the aux interrupt on must raise IRQ 12.
        ctl(&mut dev, CMD_WRITE_CTR, &[ctr | CTR_AUX_INT], 0);
        assert_eq!(irqs.pulses_on(12), 0);
        ctl(&mut dev, CMD_WRITE_AUX_OUTPUT, &[0xa5], 0);
        assert_eq!(irqs.pulses_on(12), 1);
        assert_ne!(status(&mut dev) & STATUS_AUX_DATA, 0);
        assert_eq!(drain(&mut dev), [0xa5]);
        // i8042_set_mux_mode: a plain controller echoes 0xA4, so there is no multiplexer.
        let echoes: Vec<u8> = [0xf0, 0x56, 0xa4]
            .iter()
            .flat_map(|&b| ctl(&mut dev, CMD_WRITE_AUX_OUTPUT, &[b], 1))
            .collect();
        assert_eq!(echoes, [0xf0, 0x56, 0xa4]);
    }

    fn mouse(dev: &mut I8042, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            dev.write(COMMAND_OFFSET, &[CMD_AUX_SEND]);
            dev.write(DATA_OFFSET, &[b]);
            while let Some(r) = recv(dev, true) {
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn mouse_reset_id_and_wheel_packets_come_through_the_aux_port_with_irq_12() {
        let (mut dev, irqs) = with_irq();
        ctl(&mut dev, CMD_WRITE_CTR, &[CTR_XLATE | CTR_SYSTEM_FLAG | CTR_KBD_INT | CTR_AUX_INT], 0);
        assert_eq!(mouse(&mut dev, &[0xff]), [0xfa, 0xaa, 0x00]);
        assert_eq!(mouse(&mut dev, &[0xf2]), [0xfa, 0x00]);
        assert_eq!(mouse(&mut dev, &[0xf3, 200, 0xf3, 100, 0xf3, 80]), [0xfa; 6]);
        assert_eq!(mouse(&mut dev, &[0xf2]), [0xfa, 0x03]);
        assert_eq!(mouse(&mut dev, &[0xf4]), [0xfa]);
        let before = irqs.pulses_on(12);
        dev.pointer_motion(10, -4, -1, BUTTON_RIGHT);
        assert_eq!(irqs.pulses_on(12), before + 1);
        let mut packet = Vec::new();
        while let Some(b) = recv(&mut dev, true) {
            packet.push(b);
        }
        assert_eq!(packet, [0x08 | 0x02, 10, 4, 1]);
        assert_eq!(irqs.pulses_on(12), before + 4, "an IRQ 12 edge per byte");
        assert_eq!(irqs.pulses(), 0, "mouse bytes never raise IRQ 1");
    }

    #[test]
    fn a_disabled_aux_port_holds_mouse_bytes_and_keys_go_first() {
        let (mut dev, _) = with_irq();
        assert_eq!(mouse(&mut dev, &[0xf4]), [0xfa]);
        ctl(&mut dev, CMD_AUX_DISABLE, &[], 0);
        dev.pointer_motion(1, 0, 0, 0);
        dev.queue_scancodes(&[0x1e]);
        assert_eq!(drain(&mut dev), [0x1e], "keys pass, the mouse packet waits");
        ctl(&mut dev, CMD_AUX_ENABLE, &[], 0);
        dev.queue_scancodes(&[0x9e]);
        // The mouse's first byte was latched when the port came on; the key follows it.
        assert_eq!(drain(&mut dev), [0x08, 0x9e, 0x01, 0x00]);
    }

    #[test]
    fn enabling_the_aux_interrupt_pulses_irq_12_for_a_waiting_mouse_byte() {
        let (mut dev, irqs) = with_irq();
        ctl(&mut dev, CMD_WRITE_AUX_OUTPUT, &[0x42], 0);
        assert_eq!(irqs.pulses_on(12), 0, "the aux interrupt is off at power-on");
        ctl(&mut dev, CMD_WRITE_CTR, &[CTR_XLATE | CTR_KBD_INT | CTR_AUX_INT], 0);
        assert_eq!(irqs.pulses_on(12), 1);
        assert_eq!(drain(&mut dev), [0x42]);
    }

    #[test]
    fn output_and_input_ports_keep_a20_and_reset_only_on_bit_0_low() {
        let (mut dev, resets) = device();
        assert_eq!(ctl(&mut dev, CMD_READ_OUTPUT_PORT, &[], 1), [0x03]);
        ctl(&mut dev, CMD_WRITE_OUTPUT_PORT, &[0x01], 0);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        assert_eq!(ctl(&mut dev, CMD_READ_OUTPUT_PORT, &[], 1), [0x01], "A20 off");
        dev.queue_scancodes(&[0x1e]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_OUTPUT_PORT]);
        assert_eq!(drain(&mut dev), [0x01 | OUTPUT_PORT_KBD_FULL, 0x1e]);
        assert_eq!(ctl(&mut dev, CMD_READ_INPUT_PORT, &[], 1), [INPUT_PORT]);
        dev.write(COMMAND_OFFSET, &[0xff]);
        assert_eq!(resets.load(Ordering::SeqCst), 0, "0xFF pulses nothing");
        dev.write(COMMAND_OFFSET, &[0xf0]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_guest_piling_up_d2_and_d3_bytes_gets_bounded_queues() {
        let (mut dev, _) = device();
        for i in 0..10_000u32 {
            ctl(&mut dev, CMD_WRITE_KBD_OUTPUT, &[i as u8], 0);
            ctl(&mut dev, CMD_WRITE_AUX_OUTPUT, &[i as u8], 0);
            dev.write(COMMAND_OFFSET, &[CMD_AUX_SEND]);
            dev.write(DATA_OFFSET, &[0xf4]);
            dev.pointer_motion(3, 3, 1, 1);
        }
        assert!(dev.keyboard.responses.len() <= keyboard::RESPONSE_CAPACITY);
        assert!(dev.mouse.responses.len() <= mouse::RESPONSE_CAPACITY);
        assert!(dev.mouse.packets.len() <= mouse::PACKET_CAPACITY);
        assert!(dev.controller.len() <= OUTPUT_CAPACITY);
    }

    #[test]
    fn hostile_byte_sequences_never_panic_and_keep_queues_bounded() {
        let (mut dev, _) = with_irq();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let [a, b, c, _] = x.to_le_bytes();
            match a % 8 {
                0 | 1 => dev.write(DATA_OFFSET, &[b]),
                2 => dev.write(COMMAND_OFFSET, &[b | 0x80]),
                3 => dev.write(COMMAND_OFFSET, &[b]),
                4 => dev.write(u64::from(c % 8), &[b]),
                5 => dev.queue_scancodes(&[b, c]),
                6 => dev.pointer_motion(i32::from(b as i8) * 100, i32::from(c as i8), 1, b),
                _ => {
                    let mut d = [0u8; 2];
                    dev.read(u64::from(c % 8), &mut d);
                }
            }
        }
        assert!(dev.controller.len() <= OUTPUT_CAPACITY);
        assert!(dev.keyboard.responses.len() <= keyboard::RESPONSE_CAPACITY);
        assert!(dev.keyboard.scancodes.len() <= keyboard::SCANCODE_CAPACITY);
        assert!(dev.mouse.responses.len() <= mouse::RESPONSE_CAPACITY);
        assert!(dev.mouse.packets.len() <= mouse::PACKET_CAPACITY);
        // Whatever it did, the state saves and restores.
        let saved = dev.save_state();
        let (mut fresh, _) = device();
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state(), saved);
    }

    #[test]
    fn a_first_form_state_restores_with_a_fresh_mouse() {
        let old = I8042StateV1 {
            ctr: 0x47,
            output: Some((0x1e, true)),
            last_read: 0,
            controller: vec![],
            keyboard: KeyboardState {
                responses: vec![0xfa; 100],
                scancodes: vec![0x9e],
                pending: None,
                scanning: true,
                scancode_set: 3,
                leds: 0,
                last_sent: 0xfa,
            },
            pending_command: None,
            last_was_command: false,
        };
        let bytes = crate::state::encode("i8042", &old).unwrap();
        let state: I8042State = crate::state::decode("i8042", &bytes).unwrap();
        let (mut dev, _) = device();
        dev.restore_state(&state).unwrap();
        assert_eq!(dev.keyboard.scancode_set, 2);
        assert_eq!(dev.keyboard.responses.len(), keyboard::RESPONSE_CAPACITY);
        let got = drain(&mut dev);
        assert_eq!(got[0], 0x1e);
        assert_eq!(got.last(), Some(&0x9e));
    }
}
