//! The PS/2 keyboard behind the i8042's first port: its command set, and host keys turned into
//! the scan code set the guest selected.
//!
//! Host keys arrive as scan code set 1 (what `display::keymap::set1_scancode` gives). The
//! keyboard "speaks" set 2, its default; the controller's translation (command byte bit 6, on
//! by default) turns set 2 back into set 1, so with translation on the guest gets the host's
//! bytes unchanged. With translation off it gets the set-2 codes, converted here.

use std::collections::VecDeque;

use log::warn;

// Keyboard commands and replies.
pub(super) const KBD_SET_LEDS: u8 = 0xed;
pub(super) const KBD_ECHO: u8 = 0xee;
pub(super) const KBD_SCANCODE_SET: u8 = 0xf0;
pub(super) const KBD_IDENTIFY: u8 = 0xf2;
pub(super) const KBD_TYPEMATIC: u8 = 0xf3;
pub(super) const KBD_ENABLE: u8 = 0xf4;
pub(super) const KBD_DISABLE: u8 = 0xf5;
pub(super) const KBD_DEFAULTS: u8 = 0xf6;
pub(super) const KBD_RESEND: u8 = 0xfe;
pub(super) const KBD_RESET: u8 = 0xff;
pub(super) const KBD_ACK: u8 = 0xfa;
pub(super) const KBD_BAT_OK: u8 = 0xaa;
pub(super) const KBD_NAK: u8 = 0xfe;
/// MF2 keyboard id, raw and as the controller translates it.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_ID_TRANSLATED: [u8; 2] = [0xab, 0x41];

/// Replies (and 0xD2 bytes) kept for a guest that is not reading: a reply is a few bytes.
pub(super) const RESPONSE_CAPACITY: usize = 16;
/// Typed-ahead scancodes kept for a guest that is not reading; newer keys are dropped.
pub(super) const SCANCODE_CAPACITY: usize = 256;

/// The scan code sets the keyboard supports (set 3 is refused, as its layout is not mapped).
pub(super) fn is_supported_set(set: u8) -> bool {
    matches!(set, 1 | 2)
}

pub(super) struct Keyboard {
    /// Replies to commands, delivered before any scancode.
    pub(super) responses: VecDeque<u8>,
    /// Key bytes as the guest will read them (already in the selected set, translated or not).
    pub(super) scancodes: VecDeque<u8>,
    /// A command waiting for its argument byte.
    pub(super) pending: Option<u8>,
    pub(super) scanning: bool,
    pub(super) scancode_set: u8,
    pub(super) leds: u8,
    pub(super) last_sent: u8,
}

impl Keyboard {
    pub(super) fn new() -> Self {
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

    /// A byte the controller puts in the keyboard's stream (command 0xD2).
    pub(super) fn push_response(&mut self, byte: u8) {
        if self.responses.len() < RESPONSE_CAPACITY {
            self.responses.push_back(byte);
        }
    }

    pub(super) fn next_byte(&mut self) -> Option<u8> {
        let b = self.responses.pop_front().or_else(|| self.scancodes.pop_front())?;
        self.last_sent = b;
        Some(b)
    }

    /// One host key transition as set-1 bytes; `translated`: the controller translates.
    /// A key is queued whole or not at all, so a full queue never leaves half a sequence.
    pub(super) fn queue_key(&mut self, set1: &[u8], translated: bool) {
        if !self.scanning || set1.is_empty() {
            return;
        }
        let converted;
        let bytes = if self.scancode_set == 2 && !translated {
            converted = set1_to_set2(set1);
            converted.as_slice()
        } else {
            // Set 2 translated is set 1; set 1 is sent as is (translating it again would
            // garble it, and no guest asks for that).
            set1
        };
        if self.scancodes.len() + bytes.len() > SCANCODE_CAPACITY {
            warn!("i8042: the guest is not reading the keyboard; dropping keys");
            return;
        }
        self.scancodes.extend(bytes);
    }

    /// A byte the guest sent to the keyboard. `translated`: the controller translates.
    pub(super) fn write(&mut self, value: u8, translated: bool) {
        // An argument has bit 7 clear; a command byte in its place starts a new command, as
        // real keyboards do.
        if let Some(cmd) = self.pending.take() {
            if value & 0x80 == 0 {
                self.argument(cmd, value, translated);
                return;
            }
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

    fn argument(&mut self, cmd: u8, value: u8, translated: bool) {
        match cmd {
            KBD_SET_LEDS => {
                self.leds = value & 0x07;
                self.reply(&[KBD_ACK]);
            }
            KBD_SCANCODE_SET => match value {
                0 => {
                    // The set number as the controller hands it over (translated: a set-2 code).
                    let id = match (translated, self.scancode_set) {
                        (false, set) => set,
                        (true, 1) => 0x43,
                        (true, _) => 0x41,
                    };
                    self.reply(&[KBD_ACK, id]);
                }
                set if is_supported_set(set) => {
                    self.scancode_set = set;
                    self.scancodes.clear();
                    self.reply(&[KBD_ACK]);
                }
                _ => self.reply(&[KBD_NAK]),
            },
            // Typematic rate: repeat is the guest's business (keys arrive as make/break).
            _ => self.reply(&[KBD_ACK]),
        }
    }
}

/// Set-2 make code for each set-1 make code 0x00..=0x7f (0 where set 1 has none): the inverse
/// of the 8042's translation. E0-prefixed keys use the same code after the prefix.
const SET1_TO_SET2: [u8; 128] = [
    0x00, 0x76, 0x16, 0x1e, 0x26, 0x25, 0x2e, 0x36, // 00
    0x3d, 0x3e, 0x46, 0x45, 0x4e, 0x55, 0x66, 0x0d, // 08
    0x15, 0x1d, 0x24, 0x2d, 0x2c, 0x35, 0x3c, 0x43, // 10
    0x44, 0x4d, 0x54, 0x5b, 0x5a, 0x14, 0x1c, 0x1b, // 18
    0x23, 0x2b, 0x34, 0x33, 0x3b, 0x42, 0x4b, 0x4c, // 20
    0x52, 0x0e, 0x12, 0x5d, 0x1a, 0x22, 0x21, 0x2a, // 28
    0x32, 0x31, 0x3a, 0x41, 0x49, 0x4a, 0x59, 0x7c, // 30
    0x11, 0x29, 0x58, 0x05, 0x06, 0x04, 0x0c, 0x03, // 38
    0x0b, 0x83, 0x0a, 0x01, 0x09, 0x77, 0x7e, 0x6c, // 40
    0x75, 0x7d, 0x7b, 0x6b, 0x73, 0x74, 0x79, 0x69, // 48
    0x72, 0x7a, 0x70, 0x71, 0x84, 0x60, 0x61, 0x78, // 50
    0x07, 0x0f, 0x17, 0x1f, 0x27, 0x2f, 0x37, 0x3f, // 58
    0x47, 0x4f, 0x56, 0x5e, 0x08, 0x10, 0x18, 0x20, // 60
    0x28, 0x30, 0x38, 0x40, 0x48, 0x50, 0x57, 0x6f, // 68
    0x13, 0x19, 0x39, 0x51, 0x53, 0x5c, 0x5f, 0x62, // 70
    0x63, 0x64, 0x65, 0x67, 0x68, 0x6a, 0x6d, 0x6e, // 78
];

const SET2_BREAK: u8 = 0xf0;

/// Converts set-1 bytes to set 2: a break (bit 7) becomes F0 before the make code; the E0/E1
/// prefixes and the single-byte Hangeul/Hanja codes pass unchanged.
pub(super) fn set1_to_set2(set1: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(set1.len() * 2);
    for &b in set1 {
        match b {
            0xe0 | 0xe1 | 0xf1 | 0xf2 => out.push(b),
            _ => {
                if b & 0x80 != 0 {
                    out.push(SET2_BREAK);
                }
                out.push(SET1_TO_SET2[usize::from(b & 0x7f)]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set2(set1: &[u8]) -> Vec<u8> {
        set1_to_set2(set1)
    }

    #[test]
    fn set_1_keys_convert_to_their_set_2_codes() {
        assert_eq!(set2(&[0x1e]), [0x1c], "A make");
        assert_eq!(set2(&[0x9e]), [0xf0, 0x1c], "A break");
        assert_eq!(set2(&[0x01]), [0x76], "Escape");
        assert_eq!(set2(&[0x41]), [0x83], "F7 has the odd set-2 code");
        assert_eq!(set2(&[0xe0, 0x48]), [0xe0, 0x75], "Up");
        assert_eq!(set2(&[0xe0, 0xc8]), [0xe0, 0xf0, 0x75], "Up break");
        assert_eq!(set2(&[0xe0, 0x1d]), [0xe0, 0x14], "Right Ctrl");
        // PrintScreen with its fake shift.
        assert_eq!(set2(&[0xe0, 0x2a, 0xe0, 0x37]), [0xe0, 0x12, 0xe0, 0x7c]);
        assert_eq!(set2(&[0xe0, 0xb7, 0xe0, 0xaa]), [0xe0, 0xf0, 0x7c, 0xe0, 0xf0, 0x12]);
        // Pause.
        assert_eq!(
            set2(&[0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5]),
            [0xe1, 0x14, 0x77, 0xe1, 0xf0, 0x14, 0xf0, 0x77]
        );
        assert_eq!(set2(&[0xf2]), [0xf2], "Hangeul");
    }

    #[test]
    fn set_1_to_set_2_is_one_to_one_over_the_mapped_codes() {
        let mut seen = std::collections::HashSet::new();
        for code in 1..0x80u8 {
            let make = SET1_TO_SET2[usize::from(code)];
            assert_ne!(make, 0, "set-1 {code:#04x} has no set-2 code");
            assert!(make != 0xe0 && make != 0xf0 && make != 0xe1, "{code:#04x} maps to a prefix");
            assert!(seen.insert(make), "set-2 {make:#04x} used twice");
        }
    }

    #[test]
    fn every_host_key_converts_to_at_most_8_set_2_bytes() {
        for code in 0..=0x2ffu16 {
            for down in [true, false] {
                if let Some(s1) = display::keymap::set1_scancode(code, down) {
                    let n = set1_to_set2(s1.as_slice()).len();
                    assert!(n <= 8, "key {code} converts to {n} bytes");
                }
            }
        }
    }

    #[test]
    fn a_key_that_does_not_fit_is_dropped_whole() {
        let mut k = Keyboard::new();
        for _ in 0..SCANCODE_CAPACITY - 1 {
            k.queue_key(&[0x1e], true);
        }
        k.queue_key(&[0xe0, 0x48], true);
        assert_eq!(k.scancodes.len(), SCANCODE_CAPACITY - 1, "no half an Up key");
        k.queue_key(&[0x1e], true);
        assert_eq!(k.scancodes.len(), SCANCODE_CAPACITY);
    }
}
