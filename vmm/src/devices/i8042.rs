//! The i8042 keyboard controller at ports 0x60/0x64: enough of it for Linux to probe it and,
//! above all, to reset the machine (command 0xFE), which is how `reboot=k` reboots.

use std::collections::VecDeque;

use crate::devices::bus::BusDevice;

/// Offsets within the device's range starting at port 0x60.
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
/// Set when the keyboard is NOT inhibited by the key lock (Linux warns otherwise).
const STATUS_UNLOCKED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

/// A real 8042 has a one-byte output buffer; a few bytes of slack, never unbounded growth
/// from a guest that writes commands and never reads.
const OUTPUT_CAPACITY: usize = 16;

pub struct I8042 {
    ctr: u8,
    output: VecDeque<u8>,
    pending_command: Option<u8>,
    last_was_command: bool,
    on_reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Self {
            ctr: 0x45,
            output: VecDeque::new(),
            pending_command: None,
            last_was_command: false,
            on_reset,
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYSTEM_FLAG | STATUS_UNLOCKED;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            s |= STATUS_COMMAND;
        }
        s
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.push_output(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending_command = Some(cmd),
            CMD_SELF_TEST => self.push_output(0x55),
            CMD_KBD_TEST => self.push_output(0x00),
            // A20 enabled, reset line not asserted.
            CMD_READ_OUTPUT_PORT => self.push_output(0x03),
            CMD_PULSE_RESET => (self.on_reset)(),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            // Bit 0 low on the output port asserts the CPU reset line.
            Some(CMD_WRITE_OUTPUT_PORT) if value & 1 == 0 => (self.on_reset)(),
            // No keyboard is attached yet: a byte sent to it is acknowledged with "resend".
            Some(_) => {}
            None => self.push_output(0xfe),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn device() -> (I8042, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        (I8042::new(Box::new(move || _ = r.fetch_add(1, Ordering::SeqCst))), resets)
    }

    #[test]
    fn pulse_reset_command_resets_the_machine() {
        let (mut dev, resets) = device();
        dev.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn self_test_answers_0x55_through_the_output_buffer() {
        let (mut dev, _) = device();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        let mut s = [0];
        dev.read(COMMAND_OFFSET, &mut s);
        assert_eq!(s[0] & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        let mut d = [0];
        dev.read(DATA_OFFSET, &mut d);
        assert_eq!(d[0], 0x55);
        dev.read(COMMAND_OFFSET, &mut s);
        assert_eq!(s[0] & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn output_buffer_does_not_grow_for_a_guest_that_never_reads() {
        let (mut dev, _) = device();
        for _ in 0..10_000 {
            dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        }
        assert_eq!(dev.output.len(), OUTPUT_CAPACITY);
    }

    #[test]
    fn controller_configuration_byte_round_trips() {
        let (mut dev, resets) = device();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        let mut d = [0];
        dev.read(DATA_OFFSET, &mut d);
        assert_eq!(d[0], 0x47);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }
}
