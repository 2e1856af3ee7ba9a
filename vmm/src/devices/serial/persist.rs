//! Saved state of COM1 (the snapshot's `pc/com1`): the 16550A registers, its receive FIFO and
//! the typed-ahead input not yet in it.

use serde::{Deserialize, Serialize};

/// The 16550A registers and receive FIFO (vm-superio's `SerialState`, which is not serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Saved state of COM1: the UART and the typed-ahead input not yet in its FIFO.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub uart: UartState,
    pub pending: Vec<u8>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::Arc;

    use super::{SerialDeviceState, UartState};
    use crate::devices::bus::BusDevice;
    use crate::devices::serial::{IrqEdge, SerialDevice};
    use crate::state::{self, StateError};
    use crate::testing::{assert_golden, assert_hostile_state_is_refused_or_runs, IrqLog};

    const SERIAL_STATE_HEX: &str = "0c0103c403610bb05a020000000000000068690200000000000000210a";

    fn sample_serial_state() -> SerialDeviceState {
        SerialDeviceState {
            uart: UartState {
                baud_divisor_low: 0x0c,
                baud_divisor_high: 0x01,
                interrupt_enable: 0x03,
                interrupt_identification: 0xc4,
                line_control: 0x03,
                line_status: 0x61,
                modem_control: 0x0b,
                modem_status: 0xb0,
                scratch: 0x5a,
                in_buffer: vec![b'h', b'i'],
            },
            pending: vec![b'!', b'\n'],
        }
    }

    #[test]
    fn serial_state_bytes_are_unchanged() {
        assert_golden(&sample_serial_state(), SERIAL_STATE_HEX);
    }

    fn device() -> SerialDevice {
        SerialDevice::new(IrqEdge::new(Arc::new(IrqLog::default()), 4), Box::new(std::io::sink()))
    }

    /// What restoring the snapshot's `pc/com1` bytes does.
    fn restore(dev: &mut SerialDevice, bytes: &[u8]) -> Result<(), StateError> {
        dev.restore_state(&state::decode("serial", bytes)?)
    }

    #[test]
    fn truncated_or_garbled_serial_state_is_an_error_not_a_panic() {
        let bytes = state::encode("serial", &sample_serial_state()).unwrap();
        // What the checks let through must still run: every register, and input.
        let exercise = |dev: &mut SerialDevice| {
            let mut b = [0u8];
            for offset in 0..8 {
                dev.read(offset, &mut b);
                dev.write(offset, &b);
            }
            dev.queue_input(&[0; 100]);
            for _ in 0..100 {
                dev.read(0, &mut b);
            }
        };
        assert_hostile_state_is_refused_or_runs(
            &bytes,
            device,
            SerialDevice::save_state,
            restore,
            exercise,
        );
    }
}
