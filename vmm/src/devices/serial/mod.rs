//! COM1: a 16550A UART (vm-superio) on port 0x3F8, IRQ 4.
//!
//! vm-superio holds a 64-byte receive FIFO; bytes typed faster than the guest reads them wait
//! in `pending` and are moved into the FIFO as the guest drains it, so no input is lost.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::devices::bus::{lock, BusDevice};
use crate::hypervisor::InterruptSink;
use crate::state::StateError;

mod persist;

pub use persist::{SerialDeviceState, UartState};

/// Raises an edge on one ISA interrupt line.
#[derive(Clone)]
pub struct IrqEdge {
    sink: Arc<dyn InterruptSink>,
    gsi: u32,
}

impl IrqEdge {
    pub fn new(sink: Arc<dyn InterruptSink>, gsi: u32) -> Self {
        Self { sink, gsi }
    }
}

impl Trigger for IrqEdge {
    type E = crate::hypervisor::HypervisorError;

    fn trigger(&self) -> Result<(), Self::E> {
        self.sink.set_irq_line(self.gsi, true)?;
        self.sink.set_irq_line(self.gsi, false)
    }
}

/// Upper bound on typed-ahead input we keep for a guest that is not reading its console.
const MAX_PENDING_INPUT: usize = 1 << 20;

/// The host side of the output, shared so a restore can rebuild the UART around it.
#[derive(Clone)]
struct Output(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// Bytes vm-superio's receive FIFO holds.
const UART_FIFO_SIZE: usize = 64;

pub struct SerialDevice {
    uart: Serial<IrqEdge, NoEvents, Output>,
    irq: IrqEdge,
    output: Output,
    pending: VecDeque<u8>,
}

impl SerialDevice {
    pub fn new(irq: IrqEdge, output: Box<dyn Write + Send>) -> Self {
        let output = Output(Arc::new(Mutex::new(output)));
        Self {
            uart: Serial::new(irq.clone(), output.clone()),
            irq,
            output,
            pending: VecDeque::new(),
        }
    }

    pub fn save_state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            uart: UartState {
                baud_divisor_low: s.baud_divisor_low,
                baud_divisor_high: s.baud_divisor_high,
                interrupt_enable: s.interrupt_enable,
                interrupt_identification: s.interrupt_identification,
                line_control: s.line_control,
                line_status: s.line_status,
                modem_control: s.modem_control,
                modem_status: s.modem_status,
                scratch: s.scratch,
                in_buffer: s.in_buffer,
            },
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// Puts the UART back as saved; an interrupt the saved registers show pending is raised.
    pub fn restore_state(&mut self, state: &SerialDeviceState) -> Result<(), StateError> {
        let u = &state.uart;
        if u.in_buffer.len() > UART_FIFO_SIZE {
            return Err(StateError::invalid("serial", "receive FIFO longer than 64 bytes"));
        }
        if state.pending.len() > MAX_PENDING_INPUT {
            return Err(StateError::invalid("serial", "too much pending input"));
        }
        let saved = SerialState {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            in_buffer: u.in_buffer.clone(),
        };
        let uart = Serial::from_state(&saved, self.irq.clone(), NoEvents, self.output.clone())
            .map_err(|e| StateError::invalid("serial", format!("raising its interrupt: {e:?}")))?;
        self.uart = uart;
        self.pending = state.pending.iter().copied().collect();
        Ok(())
    }

    /// Queues bytes for the guest to read; drops the oldest beyond a generous limit.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        let excess = self.pending.len().saturating_sub(MAX_PENDING_INPUT);
        self.pending.drain(..excess);
        self.refill();
    }

    fn refill(&mut self) {
        let room = self.uart.fifo_capacity();
        if room == 0 || self.pending.is_empty() {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..room.min(self.pending.len())).collect();
        if let Err(e) = self.uart.enqueue_raw_bytes(&chunk) {
            log::warn!("serial: could not queue input: {e:?}");
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
        self.refill();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log::warn!("serial: write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::IrqLog;

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);
    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_writes_reach_the_output() {
        let out = Out::default();
        let mut dev =
            SerialDevice::new(IrqEdge::new(Arc::new(IrqLog::default()), 4), Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_beyond_the_fifo_is_delivered_as_the_guest_reads() {
        let lines = Arc::new(IrqLog::default());
        let mut dev = SerialDevice::new(IrqEdge::new(lines.clone(), 4), Box::new(Out::default()));
        dev.write(1, &[0x01]); // IER: received-data interrupt on
        let input: Vec<u8> = (0..200u8).collect();
        dev.queue_input(&input);
        let mut got = Vec::new();
        for _ in 0..200 {
            let mut lsr = [0u8];
            dev.read(5, &mut lsr);
            assert_eq!(lsr[0] & 1, 1, "data ready after {} bytes", got.len());
            let mut b = [0u8];
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert!(lines.lines().contains(&(4, true)));
    }

    #[test]
    fn saved_registers_fifo_and_pending_input_survive_a_restore() {
        let lines = Arc::new(IrqLog::default());
        let mut dev = SerialDevice::new(IrqEdge::new(lines.clone(), 4), Box::new(Out::default()));
        dev.write(3, &[0x80]); // DLAB on
        dev.write(0, &[0x0c]); // divisor 12: 9600 baud
        dev.write(3, &[0x03]); // 8N1, DLAB off
        dev.write(7, &[0x5a]); // scratch
        dev.write(1, &[0x01]);
        dev.queue_input(&(0..100u8).collect::<Vec<_>>());
        let saved = dev.save_state();
        let bytes = crate::state::encode("serial", &saved).unwrap();
        let decoded: SerialDeviceState = crate::state::decode("serial", &bytes).unwrap();

        let out = Out::default();
        let fresh_lines = Arc::new(IrqLog::default());
        let mut fresh =
            SerialDevice::new(IrqEdge::new(fresh_lines.clone(), 4), Box::new(out.clone()));
        fresh.restore_state(&decoded).unwrap();
        assert_eq!(fresh.save_state(), saved);
        assert!(fresh_lines.lines().contains(&(4, true)), "pending RX interrupt");
        let mut b = [0u8];
        fresh.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        let mut got = Vec::new();
        for _ in 0..100 {
            fresh.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, (0..100u8).collect::<Vec<_>>());
        fresh.write(0, b"x");
        assert_eq!(&*out.0.lock().unwrap(), b"x", "output still reaches the host");
    }

    #[test]
    fn oversized_fifo_is_refused_and_the_device_is_unchanged() {
        let mut dev = SerialDevice::new(
            IrqEdge::new(Arc::new(IrqLog::default()), 4),
            Box::new(Out::default()),
        );
        dev.write(7, &[0x11]);
        let before = dev.save_state();
        let mut bad = before.clone();
        bad.uart.in_buffer = vec![0; 65];
        assert!(matches!(dev.restore_state(&bad), Err(StateError::Invalid { .. })));
        assert_eq!(dev.save_state(), before);
    }
}
