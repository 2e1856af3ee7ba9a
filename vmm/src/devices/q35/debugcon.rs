//! QEMU's firmware debug port at 0x402 (FIRMWARE.md §3.10): SeaBIOS (and debug builds of
//! OVMF) print their log there once a read of the port answers 0xE9. Each line goes to the
//! VMM's log under the `firmware` target, the first tool when a firmware hangs silently.

use crate::devices::bus::BusDevice;

/// The port firmware writes its debug log to.
pub const DEBUG_PORT: u16 = 0x402;
/// What a read answers: the Bochs/QEMU "debugcon present" byte.
pub const DEBUG_PORT_PRESENT: u8 = 0xe9;
/// A line longer than this is logged in pieces: the guest decides what it writes.
const MAX_LINE: usize = 512;

#[derive(Default)]
pub struct DebugCon {
    line: Vec<u8>,
    lines: u64,
}

impl DebugCon {
    pub fn new() -> DebugCon {
        DebugCon::default()
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    fn flush(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        log::info!(target: "firmware", "{}", text.trim_end());
        self.line.clear();
        self.lines += 1;
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = DEBUG_PORT_PRESENT;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &byte in data {
            match byte {
                b'\n' => self.flush(),
                b'\r' => {}
                _ => {
                    self.line.push(byte);
                    if self.line.len() >= MAX_LINE {
                        self.flush();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    #[test]
    fn a_read_says_the_port_is_there() {
        let mut port = DebugCon::new();
        let mut byte = [0u8];
        port.read(0, &mut byte);
        assert_eq!(byte, [0xe9]);
    }

    #[test]
    fn bytes_become_lines_and_an_endless_line_is_cut() {
        let mut port = DebugCon::new();
        port.write(0, b"SeaBIOS (version 1.16.2)\r\n");
        port.write(0, b"no newline yet");
        assert_eq!(port.lines(), 1);
        port.write(0, &vec![b'x'; 3 * MAX_LINE]);
        assert_eq!(port.lines(), 4);
    }
}
