//! Saved state of the i8042, its PS/2 keyboard and mouse (the snapshot's `pc/i8042`).
//!
//! Two encodings decode: the first form ([`I8042StateV1`], the keyboard-only controller, as
//! snapshots and format-1 machine states hold it) and the current one, which starts with
//! [`FORM_MARKER`] and a version byte. Bincode is not self-describing, so the two are told
//! apart by the second byte: in the first form it is the `Option` tag of the output register
//! (0 or 1), in later forms the version (2, ...).

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Saved state of the PS/2 keyboard behind the controller (the same in both forms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyboardState {
    pub responses: Vec<u8>,
    pub scancodes: Vec<u8>,
    pub pending: Option<u8>,
    pub scanning: bool,
    pub scancode_set: u8,
    pub leds: u8,
    pub last_sent: u8,
}

/// The first form: the i8042 and its keyboard, no mouse. `output` is the latched byte and
/// whether the keyboard (rather than the controller) produced it. Kept to read old snapshots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct I8042StateV1 {
    pub ctr: u8,
    pub output: Option<(u8, bool)>,
    pub last_read: u8,
    pub controller: Vec<u8>,
    pub keyboard: KeyboardState,
    pub pending_command: Option<u8>,
    pub last_was_command: bool,
}

/// Who produced the latched output byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedOrigin {
    Controller,
    Keyboard,
    Aux,
}

/// Saved state of the PS/2 mouse on the aux port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MouseState {
    pub responses: Vec<u8>,
    pub packets: Vec<u8>,
    pub pending: Option<u8>,
    pub reporting: bool,
    pub remote: bool,
    pub wrap: bool,
    pub scaling_2_1: bool,
    pub resolution: u8,
    pub sample_rate: u8,
    pub id: u8,
    pub rates: [u8; 3],
    pub buttons: u8,
    pub reported_buttons: u8,
    pub dx: i32,
    pub dy: i32,
    pub dz: i32,
    pub last_sent: u8,
}

/// Saved state of the i8042, its keyboard and mouse (form 2).
#[derive(Debug, Clone, PartialEq)]
pub struct I8042State {
    pub ctr: u8,
    pub output: Option<(u8, SavedOrigin)>,
    pub last_read: u8,
    pub controller: Vec<u8>,
    pub keyboard: KeyboardState,
    pub mouse: MouseState,
    pub pending_command: Option<u8>,
    pub last_was_command: bool,
    pub output_port: u8,
}

/// First byte of form 2 and later (in the first form, the command byte: any value).
pub const FORM_MARKER: u8 = 0xff;
const FORM_2: u8 = 2;
/// Elements after the marker and version in form 2.
const FORM_2_FIELDS: usize = 9;

impl I8042State {
    /// An old state in the current form: the mouse as after power-on (the guest that saved it
    /// had found no aux port and will not talk to it).
    pub fn from_v1(old: I8042StateV1, mouse: MouseState) -> Self {
        I8042State {
            ctr: old.ctr,
            output: old.output.map(|(b, kbd)| {
                (b, if kbd { SavedOrigin::Keyboard } else { SavedOrigin::Controller })
            }),
            last_read: old.last_read,
            controller: old.controller,
            keyboard: old.keyboard,
            mouse,
            pending_command: old.pending_command,
            last_was_command: old.last_was_command,
            output_port: 0x03,
        }
    }
}

impl MouseState {
    /// The mouse as it powers on.
    pub fn power_on() -> Self {
        MouseState {
            responses: Vec::new(),
            packets: Vec::new(),
            pending: None,
            reporting: false,
            remote: false,
            wrap: false,
            scaling_2_1: false,
            resolution: 2,
            sample_rate: 100,
            id: 0,
            rates: [0; 3],
            buttons: 0,
            reported_buttons: 0,
            dx: 0,
            dy: 0,
            dz: 0,
            last_sent: 0,
        }
    }
}

impl Serialize for I8042State {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(2 + FORM_2_FIELDS)?;
        t.serialize_element(&FORM_MARKER)?;
        t.serialize_element(&FORM_2)?;
        t.serialize_element(&self.ctr)?;
        t.serialize_element(&self.output)?;
        t.serialize_element(&self.last_read)?;
        t.serialize_element(&self.controller)?;
        t.serialize_element(&self.keyboard)?;
        t.serialize_element(&self.mouse)?;
        t.serialize_element(&self.pending_command)?;
        t.serialize_element(&self.last_was_command)?;
        t.serialize_element(&self.output_port)?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for I8042State {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // The longest form, element by element (bincode reads only what the visitor asks for).
        deserializer.deserialize_tuple(2 + FORM_2_FIELDS, FormVisitor)
    }
}

struct FormVisitor;

fn next<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(seq: &mut A) -> Result<T, A::Error> {
    seq.next_element()?.ok_or_else(|| de::Error::custom("i8042 state is truncated"))
}

impl<'de> Visitor<'de> for FormVisitor {
    type Value = I8042State;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an i8042 state (form 1 or 2)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<I8042State, A::Error> {
        let first: u8 = next(&mut seq)?;
        let second: u8 = next(&mut seq)?;
        match (first, second) {
            // Form 1: the command byte, then the output register's Option tag.
            (ctr, tag @ (0 | 1)) => {
                let output = if tag == 1 { Some((next(&mut seq)?, next(&mut seq)?)) } else { None };
                let old = I8042StateV1 {
                    ctr,
                    output,
                    last_read: next(&mut seq)?,
                    controller: next(&mut seq)?,
                    keyboard: next(&mut seq)?,
                    pending_command: next(&mut seq)?,
                    last_was_command: next(&mut seq)?,
                };
                Ok(I8042State::from_v1(old, MouseState::power_on()))
            }
            (FORM_MARKER, FORM_2) => Ok(I8042State {
                ctr: next(&mut seq)?,
                output: next(&mut seq)?,
                last_read: next(&mut seq)?,
                controller: next(&mut seq)?,
                keyboard: next(&mut seq)?,
                mouse: next(&mut seq)?,
                pending_command: next(&mut seq)?,
                last_was_command: next(&mut seq)?,
                output_port: next(&mut seq)?,
            }),
            (_, version) => {
                Err(de::Error::custom(format!("i8042 state form {version} is not known")))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::{I8042State, I8042StateV1, KeyboardState, MouseState, SavedOrigin};
    use crate::devices::bus::BusDevice;
    use crate::devices::i8042::I8042;
    use crate::state::{self, StateError};
    use crate::testing::{assert_golden, assert_hostile_state_is_refused_or_runs};

    /// The first form, as the keyboard-only controller saved it.
    const I8042_STATE_V1_HEX: &str = concat!(
        "47011e01fa0100000000000000550200000000000000faab02000000000000009e",
        "3001ed010202fa016001",
    );

    const I8042_STATE_HEX: &str = concat!(
        "ff0247011e02000000c00100000000000000550200000000000000faab020000",
        "00000000009e3001ed010202fa0100000000000000fa0400000000000000080c",
        "000101f30100000102640350c864010105000000fdffffff02000000fa000103",
    );

    fn sample_keyboard() -> KeyboardState {
        KeyboardState {
            responses: vec![0xfa, 0xab],
            scancodes: vec![0x9e, 0x30],
            pending: Some(0xed),
            scanning: true,
            scancode_set: 2,
            leds: 0x02,
            last_sent: 0xfa,
        }
    }

    fn sample_v1_state() -> I8042StateV1 {
        I8042StateV1 {
            ctr: 0x47,
            output: Some((0x1e, true)),
            last_read: 0xfa,
            controller: vec![0x55],
            keyboard: sample_keyboard(),
            pending_command: Some(0x60),
            last_was_command: true,
        }
    }

    fn sample_i8042_state() -> I8042State {
        I8042State {
            ctr: 0x47,
            output: Some((0x1e, SavedOrigin::Aux)),
            last_read: 0xc0,
            controller: vec![0x55],
            keyboard: sample_keyboard(),
            mouse: MouseState {
                responses: vec![0xfa],
                packets: vec![0x08, 0x0c, 0x00, 0x01],
                pending: Some(0xf3),
                reporting: true,
                remote: false,
                wrap: false,
                scaling_2_1: true,
                resolution: 2,
                sample_rate: 100,
                id: 3,
                rates: [0x50, 0xc8, 0x64],
                buttons: 1,
                reported_buttons: 1,
                dx: 5,
                dy: -3,
                dz: 2,
                last_sent: 0xfa,
            },
            pending_command: None,
            last_was_command: true,
            output_port: 0x03,
        }
    }

    #[test]
    fn i8042_state_v1_bytes_are_unchanged() {
        assert_golden(&sample_v1_state(), I8042_STATE_V1_HEX);
    }

    #[test]
    fn i8042_state_bytes_are_unchanged() {
        assert_golden(&sample_i8042_state(), I8042_STATE_HEX);
    }

    #[test]
    fn first_form_bytes_decode_as_the_current_state_with_a_fresh_mouse() {
        let bytes = state::encode("i8042", &sample_v1_state()).unwrap();
        let got: I8042State = state::decode("i8042", &bytes).unwrap();
        assert_eq!(got, I8042State::from_v1(sample_v1_state(), MouseState::power_on()));
        assert_eq!(got.output, Some((0x1e, SavedOrigin::Keyboard)));
        assert_eq!(got.mouse, MouseState::power_on());
        // And the old form with nothing latched.
        let empty = I8042StateV1 { output: None, ..sample_v1_state() };
        let got: I8042State =
            state::decode("i8042", &state::encode("i8042", &empty).unwrap()).unwrap();
        assert_eq!(got.output, None);
    }

    #[test]
    fn an_unknown_form_is_an_error() {
        let mut bytes = state::encode("i8042", &sample_i8042_state()).unwrap();
        bytes[1] = 3;
        assert!(state::decode::<I8042State>("i8042", &bytes).is_err());
    }

    #[test]
    fn the_power_on_mouse_state_is_the_devices() {
        let dev = I8042::new(Box::new(|| {}));
        assert_eq!(dev.save_state().mouse, MouseState::power_on());
    }

    fn device() -> I8042 {
        I8042::new(Box::new(|| {}))
    }

    /// What restoring the snapshot's `pc/i8042` bytes does.
    fn restore(dev: &mut I8042, bytes: &[u8]) -> Result<(), StateError> {
        dev.restore_state(&state::decode("i8042", bytes)?)
    }

    /// What the checks let through must still run: keyboard, mouse and controller I/O.
    fn exercise(dev: &mut I8042) {
        let mut b = [0u8];
        for value in [0xf2, 0x00, 0xed, 0xff] {
            dev.write(0, &[value]);
            dev.read(0, &mut b);
            dev.read(4, &mut b);
        }
        for value in [0xf4, 0xe9, 0xf3, 0xeb] {
            dev.write(4, &[0xd4]);
            dev.write(0, &[value]);
            dev.read(0, &mut b);
        }
        dev.pointer_motion(1000, -1000, 3, 7);
        dev.queue_scancodes(&[0x1e, 0x9e]);
        for _ in 0..8 {
            dev.read(0, &mut b);
        }
        dev.write(4, &[0x20]);
        dev.read(0, &mut b);
    }

    #[test]
    fn truncated_or_garbled_i8042_state_is_an_error_not_a_panic() {
        let bytes = state::encode("i8042", &sample_i8042_state()).unwrap();
        assert_hostile_state_is_refused_or_runs(
            &bytes,
            device,
            I8042::save_state,
            restore,
            exercise,
        );
    }

    #[test]
    fn truncated_or_garbled_first_form_state_is_an_error_not_a_panic() {
        let bytes = state::encode("i8042", &sample_v1_state()).unwrap();
        assert_hostile_state_is_refused_or_runs(
            &bytes,
            device,
            I8042::save_state,
            restore,
            exercise,
        );
    }
}
