//! The PS/2 mouse behind the i8042's aux port: the standard command set, the IntelliMouse
//! wheel (id 3 after the 200/100/80 sample-rate knock), and movement packets from the host.
//!
//! Packets are 3 bytes (4 with the wheel): buttons, signs and overflow bits, then X and Y as
//! the low bytes of 9-bit signed counts, then the wheel. Motion the guest has not had room
//! for accumulates and goes out in the next packet, clamped.

use std::collections::VecDeque;

const MOUSE_SET_SCALING_1_1: u8 = 0xe6;
const MOUSE_SET_SCALING_2_1: u8 = 0xe7;
const MOUSE_SET_RESOLUTION: u8 = 0xe8;
const MOUSE_STATUS: u8 = 0xe9;
const MOUSE_SET_STREAM: u8 = 0xea;
const MOUSE_READ_DATA: u8 = 0xeb;
const MOUSE_RESET_WRAP: u8 = 0xec;
const MOUSE_SET_WRAP: u8 = 0xee;
const MOUSE_SET_REMOTE: u8 = 0xf0;
const MOUSE_GET_ID: u8 = 0xf2;
const MOUSE_SET_SAMPLE_RATE: u8 = 0xf3;
const MOUSE_ENABLE: u8 = 0xf4;
const MOUSE_DISABLE: u8 = 0xf5;
const MOUSE_DEFAULTS: u8 = 0xf6;
const MOUSE_RESEND: u8 = 0xfe;
const MOUSE_RESET: u8 = 0xff;
const ACK: u8 = 0xfa;
const NAK: u8 = 0xfe;
const BAT_OK: u8 = 0xaa;

pub(super) const MOUSE_ID_STANDARD: u8 = 0x00;
pub(super) const MOUSE_ID_WHEEL: u8 = 0x03;
/// The sample rates, in order, that switch a mouse to IntelliMouse (wheel) mode.
const WHEEL_KNOCK: [u8; 3] = [200, 100, 80];

const DEFAULT_SAMPLE_RATE: u8 = 100;
/// 4 counts/mm.
const DEFAULT_RESOLUTION: u8 = 2;

/// Replies (and 0xD3 bytes) kept for a guest that is not reading.
pub(super) const RESPONSE_CAPACITY: usize = 16;
/// Packet bytes kept for a guest that is not reading; motion beyond that accumulates.
pub(super) const PACKET_CAPACITY: usize = 256;

/// Button bits of [`Mouse::motion`]'s `buttons` and of the packet's first byte.
pub const BUTTON_LEFT: u8 = display::pointer::PS2_BUTTON_LEFT;
pub const BUTTON_RIGHT: u8 = display::pointer::PS2_BUTTON_RIGHT;
pub const BUTTON_MIDDLE: u8 = display::pointer::PS2_BUTTON_MIDDLE;
const BUTTONS: u8 = BUTTON_LEFT | BUTTON_RIGHT | BUTTON_MIDDLE;

// First packet byte.
const PACKET_ALWAYS_ONE: u8 = 0x08;
const PACKET_X_SIGN: u8 = 0x10;
const PACKET_Y_SIGN: u8 = 0x20;
const PACKET_X_OVERFLOW: u8 = 0x40;
const PACKET_Y_OVERFLOW: u8 = 0x80;

// Status byte (0xE9).
const STATUS_REMOTE: u8 = 0x40;
const STATUS_ENABLED: u8 = 0x20;
const STATUS_SCALING_2_1: u8 = 0x10;

/// A 9-bit signed count is -256..=255.
const COUNT_MIN: i32 = -256;
const COUNT_MAX: i32 = 255;

pub(super) struct Mouse {
    pub(super) responses: VecDeque<u8>,
    pub(super) packets: VecDeque<u8>,
    pub(super) pending: Option<u8>,
    pub(super) reporting: bool,
    pub(super) remote: bool,
    pub(super) wrap: bool,
    pub(super) scaling_2_1: bool,
    pub(super) resolution: u8,
    pub(super) sample_rate: u8,
    pub(super) id: u8,
    /// The last three sample rates set, oldest first (the wheel knock).
    pub(super) rates: [u8; 3],
    pub(super) buttons: u8,
    /// Buttons as the last packet reported them.
    pub(super) reported_buttons: u8,
    /// Motion not yet sent: X right, Y up (PS/2's sense), wheel as the packet counts it.
    pub(super) dx: i32,
    pub(super) dy: i32,
    pub(super) dz: i32,
    pub(super) last_sent: u8,
}

impl Mouse {
    pub(super) fn new() -> Self {
        Mouse {
            responses: VecDeque::new(),
            packets: VecDeque::new(),
            pending: None,
            reporting: false,
            remote: false,
            wrap: false,
            scaling_2_1: false,
            resolution: DEFAULT_RESOLUTION,
            sample_rate: DEFAULT_SAMPLE_RATE,
            id: MOUSE_ID_STANDARD,
            rates: [0; 3],
            buttons: 0,
            reported_buttons: 0,
            dx: 0,
            dy: 0,
            dz: 0,
            last_sent: 0,
        }
    }

    /// Defaults (0xF6 and reset): stream mode, reporting off, 100/s, 4 counts/mm, 1:1, no wheel.
    fn set_defaults(&mut self) {
        let buttons = self.buttons;
        *self = Mouse { buttons, reported_buttons: buttons, ..Mouse::new() };
    }

    /// A command's reply replaces anything unread: the mouse flushes its output on a command.
    fn reply(&mut self, bytes: &[u8]) {
        self.responses.clear();
        self.packets.clear();
        self.responses.extend(bytes);
    }

    /// A byte the controller puts in the mouse's stream (command 0xD3).
    pub(super) fn push_response(&mut self, byte: u8) {
        if self.responses.len() < RESPONSE_CAPACITY {
            self.responses.push_back(byte);
        }
    }

    pub(super) fn next_byte(&mut self) -> Option<u8> {
        let b = self.responses.pop_front().or_else(|| self.packets.pop_front())?;
        self.last_sent = b;
        self.flush_motion();
        Some(b)
    }

    /// Host pointer motion: `dx` right, `dy` down (screen sense), `wheel` positive away from
    /// the user (scroll up); `buttons` is the set of buttons now held ([`BUTTON_LEFT`] ...).
    pub(super) fn motion(&mut self, dx: i32, dy: i32, wheel: i32, buttons: u8) {
        self.dx = self.dx.saturating_add(dx);
        self.dy = self.dy.saturating_sub(dy);
        // IntelliMouse counts the wheel positive toward the user.
        self.dz = self.dz.saturating_sub(wheel);
        self.buttons = buttons & BUTTONS;
        self.flush_motion();
    }

    fn packet_len(&self) -> usize {
        if self.id == MOUSE_ID_WHEEL {
            4
        } else {
            3
        }
    }

    /// Queues one packet with the accumulated motion when streaming and there is room.
    fn flush_motion(&mut self) {
        if !self.reporting || self.remote || self.wrap {
            return;
        }
        let changed = self.dx != 0
            || self.dy != 0
            || (self.id == MOUSE_ID_WHEEL && self.dz != 0)
            || self.buttons != self.reported_buttons;
        if !changed || self.packets.len() + self.packet_len() > PACKET_CAPACITY {
            return;
        }
        let packet = self.take_packet();
        self.packets.extend(&packet[..self.packet_len()]);
    }

    /// The packet for the accumulated motion, which it then clears (excess is lost, flagged
    /// by the overflow bits, as on a real mouse whose counters overflowed).
    fn take_packet(&mut self) -> [u8; 4] {
        let scale = |d: i32| if self.scaling_2_1 { scale_2_1(d) } else { d };
        let (dx, dy) = (scale(self.dx), scale(self.dy));
        let x = dx.clamp(COUNT_MIN, COUNT_MAX);
        let y = dy.clamp(COUNT_MIN, COUNT_MAX);
        let mut first = PACKET_ALWAYS_ONE | self.buttons;
        if x < 0 {
            first |= PACKET_X_SIGN;
        }
        if y < 0 {
            first |= PACKET_Y_SIGN;
        }
        if x != dx {
            first |= PACKET_X_OVERFLOW;
        }
        if y != dy {
            first |= PACKET_Y_OVERFLOW;
        }
        let z = self.dz.clamp(-8, 7);
        self.dx = 0;
        self.dy = 0;
        self.dz = 0;
        self.reported_buttons = self.buttons;
        // The low bytes of the 9-bit and 4-bit two's-complement counts.
        [first, (x & 0xff) as u8, (y & 0xff) as u8, (z & 0xff) as u8]
    }

    /// A byte the guest sent to the mouse (through controller command 0xD4).
    pub(super) fn write(&mut self, value: u8) {
        if let Some(cmd) = self.pending.take() {
            self.argument(cmd, value);
            return;
        }
        if self.wrap && value != MOUSE_RESET_WRAP && value != MOUSE_RESET {
            // Wrap mode echoes everything but its way out.
            self.reply(&[value]);
            return;
        }
        match value {
            MOUSE_SET_SCALING_1_1 | MOUSE_SET_SCALING_2_1 => {
                self.scaling_2_1 = value == MOUSE_SET_SCALING_2_1;
                self.reply(&[ACK]);
            }
            MOUSE_SET_RESOLUTION | MOUSE_SET_SAMPLE_RATE => {
                self.pending = Some(value);
                self.reply(&[ACK]);
            }
            MOUSE_STATUS => {
                let mut status = self.status_buttons();
                if self.remote {
                    status |= STATUS_REMOTE;
                }
                if self.reporting {
                    status |= STATUS_ENABLED;
                }
                if self.scaling_2_1 {
                    status |= STATUS_SCALING_2_1;
                }
                self.reply(&[ACK, status, self.resolution, self.sample_rate]);
            }
            MOUSE_SET_STREAM | MOUSE_SET_REMOTE => {
                self.remote = value == MOUSE_SET_REMOTE;
                self.reply(&[ACK]);
            }
            MOUSE_READ_DATA => {
                let packet = self.take_packet();
                let len = self.packet_len();
                self.reply(&[ACK]);
                self.responses.extend(&packet[..len]);
            }
            MOUSE_SET_WRAP | MOUSE_RESET_WRAP => {
                self.wrap = value == MOUSE_SET_WRAP;
                self.reply(&[ACK]);
            }
            MOUSE_GET_ID => {
                let id = self.id;
                self.reply(&[ACK, id]);
            }
            MOUSE_ENABLE | MOUSE_DISABLE => {
                self.reporting = value == MOUSE_ENABLE;
                self.dx = 0;
                self.dy = 0;
                self.dz = 0;
                self.reply(&[ACK]);
            }
            MOUSE_DEFAULTS => {
                self.set_defaults();
                self.reply(&[ACK]);
            }
            MOUSE_RESEND => {
                let last = self.last_sent;
                self.reply(&[last]);
            }
            MOUSE_RESET => {
                self.set_defaults();
                self.reply(&[ACK, BAT_OK, MOUSE_ID_STANDARD]);
            }
            _ => self.reply(&[NAK]),
        }
    }

    fn argument(&mut self, cmd: u8, value: u8) {
        match cmd {
            MOUSE_SET_RESOLUTION => self.resolution = value & 0x03,
            _ => {
                self.sample_rate = value;
                self.rates = [self.rates[1], self.rates[2], value];
                if self.rates == WHEEL_KNOCK {
                    self.id = MOUSE_ID_WHEEL;
                }
            }
        }
        self.reply(&[ACK]);
    }

    /// The buttons as the status byte orders them: left bit 2, middle bit 1, right bit 0.
    fn status_buttons(&self) -> u8 {
        let mut s = 0;
        if self.buttons & BUTTON_LEFT != 0 {
            s |= 0x04;
        }
        if self.buttons & BUTTON_MIDDLE != 0 {
            s |= 0x02;
        }
        if self.buttons & BUTTON_RIGHT != 0 {
            s |= 0x01;
        }
        s
    }
}

/// 2:1 scaling as the mouse applies it in stream mode: small moves damped, larger doubled.
fn scale_2_1(d: i32) -> i32 {
    let magnitude = match d.unsigned_abs() {
        0 => 0,
        1 | 2 => 1,
        3 => 3,
        4 => 6,
        5 => 9,
        m => m.saturating_mul(2),
    };
    let magnitude = i32::try_from(magnitude).unwrap_or(i32::MAX);
    if d < 0 {
        -magnitude
    } else {
        magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(m: &mut Mouse) -> Vec<u8> {
        std::iter::from_fn(|| m.next_byte()).take(1024).collect()
    }

    fn send(m: &mut Mouse, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            m.write(b);
            out.extend(drain(m));
        }
        out
    }

    #[test]
    fn reset_answers_ack_bat_and_id_and_disables_reporting() {
        let mut m = Mouse::new();
        assert_eq!(send(&mut m, &[MOUSE_ENABLE]), [ACK]);
        assert_eq!(send(&mut m, &[MOUSE_RESET]), [ACK, BAT_OK, 0x00]);
        m.motion(5, 5, 0, 0);
        assert!(drain(&mut m).is_empty(), "reset leaves reporting off");
    }

    #[test]
    fn the_wheel_knock_turns_id_0_into_id_3_and_4_byte_packets() {
        let mut m = Mouse::new();
        assert_eq!(send(&mut m, &[MOUSE_GET_ID]), [ACK, 0x00]);
        let knock = [MOUSE_SET_SAMPLE_RATE, 200, MOUSE_SET_SAMPLE_RATE, 100];
        assert_eq!(send(&mut m, &knock), [ACK; 4]);
        assert_eq!(send(&mut m, &[MOUSE_SET_SAMPLE_RATE, 80]), [ACK, ACK]);
        assert_eq!(send(&mut m, &[MOUSE_GET_ID]), [ACK, 0x03]);
        send(&mut m, &[MOUSE_ENABLE]);
        m.motion(1, 0, 1, 0);
        assert_eq!(drain(&mut m), [0x08, 0x01, 0x00, 0xff], "wheel up counts -1");
        assert_eq!(send(&mut m, &[MOUSE_RESET]), [ACK, BAT_OK, 0x00]);
        assert_eq!(send(&mut m, &[MOUSE_GET_ID]), [ACK, 0x00], "reset forgets the wheel");
    }

    #[test]
    fn packets_carry_buttons_signs_and_9_bit_counts() {
        let mut m = Mouse::new();
        send(&mut m, &[MOUSE_ENABLE]);
        m.motion(3, 2, 0, BUTTON_LEFT);
        // Down on the screen is negative Y for PS/2.
        assert_eq!(drain(&mut m), [0x08 | 0x01 | PACKET_Y_SIGN, 0x03, 0xfe]);
        m.motion(-1, -1, 0, BUTTON_LEFT | BUTTON_RIGHT);
        assert_eq!(drain(&mut m), [0x08 | 0x03 | PACKET_X_SIGN, 0xff, 0x01]);
        m.motion(0, 0, 0, 0);
        assert_eq!(drain(&mut m), [0x08, 0, 0], "a button release alone is reported");
        m.motion(0, 0, 0, 0);
        assert!(drain(&mut m).is_empty(), "no change, no packet");
    }

    #[test]
    fn large_motion_is_clamped_with_the_overflow_bits() {
        let mut m = Mouse::new();
        send(&mut m, &[MOUSE_ENABLE]);
        m.motion(1000, 1000, 0, 0);
        let p = drain(&mut m);
        assert_eq!(p, [0x08 | PACKET_Y_SIGN | PACKET_X_OVERFLOW | PACKET_Y_OVERFLOW, 0xff, 0x00]);
        m.motion(-256, -255, 0, 0);
        assert_eq!(drain(&mut m), [0x08 | PACKET_X_SIGN, 0x00, 0xff], "-256 fits in 9 bits");
        m.motion(i32::MAX, i32::MIN, i32::MAX, 0);
        assert_eq!(drain(&mut m).len(), 3);
    }

    #[test]
    fn status_request_reports_mode_settings_and_buttons() {
        let mut m = Mouse::new();
        assert_eq!(send(&mut m, &[MOUSE_STATUS]), [ACK, 0x00, 2, 100]);
        send(&mut m, &[MOUSE_SET_RESOLUTION, 3, MOUSE_SET_SCALING_2_1, MOUSE_ENABLE]);
        m.motion(0, 0, 0, BUTTON_LEFT);
        assert_eq!(send(&mut m, &[MOUSE_STATUS]), [ACK, 0x20 | 0x10 | 0x04, 3, 100]);
    }

    #[test]
    fn remote_mode_holds_motion_until_read_data() {
        let mut m = Mouse::new();
        send(&mut m, &[MOUSE_ENABLE, MOUSE_SET_REMOTE]);
        m.motion(4, 0, 0, 0);
        assert!(drain(&mut m).is_empty());
        assert_eq!(send(&mut m, &[MOUSE_READ_DATA]), [ACK, 0x08, 0x04, 0x00]);
        assert_eq!(send(&mut m, &[MOUSE_READ_DATA]), [ACK, 0x08, 0x00, 0x00]);
    }

    #[test]
    fn wrap_mode_echoes_until_reset_wrap() {
        let mut m = Mouse::new();
        assert_eq!(send(&mut m, &[MOUSE_SET_WRAP, 0x12, 0xf4]), [ACK, 0x12, 0xf4]);
        assert_eq!(send(&mut m, &[MOUSE_RESET_WRAP, MOUSE_GET_ID]), [ACK, ACK, 0x00]);
    }

    #[test]
    fn a_mouse_nobody_reads_keeps_a_bounded_queue_and_accumulates() {
        let mut m = Mouse::new();
        send(&mut m, &[MOUSE_ENABLE]);
        for _ in 0..10_000 {
            m.motion(1, 0, 0, 0);
        }
        assert!(m.packets.len() <= PACKET_CAPACITY);
        assert!(m.dx > 0, "motion beyond the queue accumulates");
        let bytes = drain(&mut m);
        assert!(bytes.len() > PACKET_CAPACITY, "the held motion follows once read");
        assert_eq!(m.dx, 0);
    }

    #[test]
    fn scaling_2_1_damps_small_moves_and_doubles_large_ones() {
        assert_eq!([1, 2, 3, 4, 5, 6, -6].map(scale_2_1), [1, 1, 3, 6, 9, 12, -12]);
    }

    #[test]
    fn unknown_commands_are_refused() {
        let mut m = Mouse::new();
        assert_eq!(send(&mut m, &[0x00]), [NAK]);
        assert_eq!(send(&mut m, &[MOUSE_RESEND]), [NAK], "resend repeats the last byte");
    }
}
