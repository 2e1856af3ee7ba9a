//! COM1: a 16550A UART (vm-superio) on port 0x3F8, IRQ 4.
//!
//! vm-superio holds a 64-byte receive FIFO; bytes typed faster than the guest reads them wait
//! in `pending` and are moved into the FIFO as the guest drains it, so no input is lost.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::devices::bus::BusDevice;
use crate::hypervisor::InterruptSink;

/// Raises an edge on one ISA interrupt line.
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

pub struct SerialDevice {
    uart: Serial<IrqEdge, NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
}

impl SerialDevice {
    pub fn new(irq: IrqEdge, output: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(irq, output), pending: VecDeque::new() }
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
    use std::sync::Mutex;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(u32, bool)>>);
    impl InterruptSink for Lines {
        fn set_irq_line(&self, gsi: u32, active: bool) -> crate::hypervisor::Result<()> {
            self.0.lock().unwrap().push((gsi, active));
            Ok(())
        }
        fn signal_msi(&self, _: u64, _: u32) -> crate::hypervisor::Result<()> {
            Ok(())
        }
    }

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
            SerialDevice::new(IrqEdge::new(Arc::new(Lines::default()), 4), Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_beyond_the_fifo_is_delivered_as_the_guest_reads() {
        let lines = Arc::new(Lines::default());
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
        assert!(lines.0.lock().unwrap().contains(&(4, true)));
    }
}
