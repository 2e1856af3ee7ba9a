//! Saved state of the i8042 and its PS/2 keyboard (the snapshot's `pc/i8042`).

use serde::{Deserialize, Serialize};

/// Saved state of the PS/2 keyboard behind the controller.
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

/// Saved state of the i8042 and its keyboard. `output` is the latched byte and whether the
/// keyboard (rather than the controller) produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct I8042State {
    pub ctr: u8,
    pub output: Option<(u8, bool)>,
    pub last_read: u8,
    pub controller: Vec<u8>,
    pub keyboard: KeyboardState,
    pub pending_command: Option<u8>,
    pub last_was_command: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::{I8042State, KeyboardState};
    use crate::devices::bus::BusDevice;
    use crate::devices::i8042::I8042;
    use crate::state::{self, StateError};
    use crate::testing::{assert_golden, assert_hostile_state_is_refused_or_runs};

    const I8042_STATE_HEX: &str = concat!(
        "47011e01fa0100000000000000550200000000000000faab02000000000000009e",
        "3001ed010202fa016001",
    );

    fn sample_i8042_state() -> I8042State {
        I8042State {
            ctr: 0x47,
            output: Some((0x1e, true)),
            last_read: 0xfa,
            controller: vec![0x55],
            keyboard: KeyboardState {
                responses: vec![0xfa, 0xab],
                scancodes: vec![0x9e, 0x30],
                pending: Some(0xed),
                scanning: true,
                scancode_set: 2,
                leds: 0x02,
                last_sent: 0xfa,
            },
            pending_command: Some(0x60),
            last_was_command: true,
        }
    }

    #[test]
    fn i8042_state_bytes_are_unchanged() {
        assert_golden(&sample_i8042_state(), I8042_STATE_HEX);
    }

    fn device() -> I8042 {
        I8042::new(Box::new(|| {}))
    }

    /// What restoring the snapshot's `pc/i8042` bytes does.
    fn restore(dev: &mut I8042, bytes: &[u8]) -> Result<(), StateError> {
        dev.restore_state(&state::decode("i8042", bytes)?)
    }

    #[test]
    fn truncated_or_garbled_i8042_state_is_an_error_not_a_panic() {
        let bytes = state::encode("i8042", &sample_i8042_state()).unwrap();
        // What the checks let through must still run: keyboard and controller I/O.
        let exercise = |dev: &mut I8042| {
            let mut b = [0u8];
            for value in [0xf2, 0x00, 0xed, 0xff] {
                dev.write(0, &[value]);
                dev.read(0, &mut b);
                dev.read(4, &mut b);
            }
            dev.write(4, &[0x20]);
            dev.read(0, &mut b);
        };
        assert_hostile_state_is_refused_or_runs(
            &bytes,
            device,
            I8042::save_state,
            restore,
            exercise,
        );
    }
}
