//! The two chipset reset ports firmware uses: the ICH9 reset control register at 0xCF9 and
//! System Control Port A at 0x92. Each is one port, inserted by the board with length 1.
//!
//! 0xCF9 sits inside the PCI configuration-address dword (0xCF8..0xCFB), which
//! [`PciConfigIo`] serves for 32-bit accesses only: [`ConfigPortsWithReset`] takes the ports
//! 0xCF8..0xCFF and sends byte accesses to 0xCF9 here (QEMU does the same by overlap
//! priority).

use super::persist::{Port92State, ResetControlState};
use crate::devices::bus::BusDevice;
use crate::pci::PciConfigIo;
use crate::state::StateError;

pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// RST_CNT bit 2: reset the CPU now (OVMF writes 0x06, Linux 0x06 or 0x0E).
const RST_CPU: u8 = 1 << 2;
/// SYS_RST (bit 1) and FULL_RST (bit 3): kept, as QEMU keeps them; they only choose the kind
/// of reset, which is always a full one here.
const RST_CNT_KEPT: u8 = 0x0a;

pub const PORT92_PORT: u16 = 0x92;
/// Bit 0: fast reset (reads 0, as the pulse is over).
const PORT92_RESET: u8 = 1 << 0;
/// Bit 1: A20 gate. KVM never masks A20, so it reads 1 whatever is written: OVMF's
/// `IoOr8(0x92, BIT1)` reads 0x02 and writes it back, never setting bit 0.
const PORT92_A20: u8 = 1 << 1;
const PORT92_KEPT: u8 = !(PORT92_RESET | PORT92_A20);

/// The reset control register (RST_CNT) at 0xCF9.
pub struct ResetControl {
    value: u8,
    on_reset: Box<dyn Fn() + Send>,
}

impl ResetControl {
    /// `on_reset` runs on the vCPU thread whose write asks for a reset.
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        ResetControl { value: 0, on_reset }
    }

    pub fn reset(&mut self) {
        self.value = 0;
    }

    pub fn save(&self) -> ResetControlState {
        ResetControlState { value: self.value }
    }

    pub fn restore(&mut self, saved: &ResetControlState) -> Result<(), StateError> {
        if saved.value & !RST_CNT_KEPT != 0 {
            return Err(StateError::invalid("ICH9 reset control", "bits it never keeps"));
        }
        self.value = saved.value;
        Ok(())
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let (0, Some(first)) = (offset, data.first_mut()) {
            *first = self.value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        if value & RST_CPU != 0 {
            log::info!("ICH9: reset through 0xCF9 ({value:#04x})");
            (self.on_reset)();
            return;
        }
        self.value = value & RST_CNT_KEPT;
    }
}

/// Ports 0xCF8..0xCFF of a Q35 board: PCI configuration mechanism #1, with the reset control
/// register at 0xCF9 for byte accesses. Insert at 0xCF8, length [`PciConfigIo::LEN`].
pub struct ConfigPortsWithReset {
    pub pci: PciConfigIo,
    pub reset_control: ResetControl,
}

/// 0xCF9 within the ports.
const RESET_CONTROL_OFFSET: u64 = (RESET_CONTROL_PORT - 0xcf8) as u64;

impl BusDevice for ConfigPortsWithReset {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == RESET_CONTROL_OFFSET && data.len() == 1 {
            self.reset_control.read(0, data);
        } else {
            self.pci.read(offset, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == RESET_CONTROL_OFFSET && data.len() == 1 {
            self.reset_control.write(0, data);
        } else {
            self.pci.write(offset, data);
        }
    }
}

/// System Control Port A at 0x92.
pub struct Port92 {
    value: u8,
    on_reset: Box<dyn Fn() + Send>,
}

impl Port92 {
    /// `on_reset` runs on the vCPU thread whose write sets the fast-reset bit.
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Port92 { value: 0, on_reset }
    }

    pub fn reset(&mut self) {
        self.value = 0;
    }

    pub fn save(&self) -> Port92State {
        Port92State { value: self.value }
    }

    pub fn restore(&mut self, saved: &Port92State) -> Result<(), StateError> {
        if saved.value & !PORT92_KEPT != 0 {
            return Err(StateError::invalid("port 0x92", "bits it never keeps"));
        }
        self.value = saved.value;
        Ok(())
    }
}

impl BusDevice for Port92 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let (0, Some(first)) = (offset, data.first_mut()) {
            *first = self.value | PORT92_A20;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        self.value = value & PORT92_KEPT;
        if value & PORT92_A20 == 0 {
            log::debug!("port 0x92: the guest disabled A20, which stays enabled");
        }
        if value & PORT92_RESET != 0 {
            log::info!("port 0x92: fast reset");
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn counter() -> (Arc<AtomicUsize>, Box<dyn Fn() + Send>) {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        (
            count,
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    fn read_byte(dev: &mut dyn BusDevice) -> u8 {
        let mut b = [0u8];
        dev.read(0, &mut b);
        b[0]
    }

    #[test]
    fn cf9_writes_of_06_and_0e_reset() {
        let (resets, on_reset) = counter();
        let mut rcr = ResetControl::new(on_reset);
        rcr.write(0, &[0x06]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        rcr.write(0, &[0x0e]);
        assert_eq!(resets.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn cf9_keeps_the_reset_kind_bits_without_resetting() {
        let (resets, on_reset) = counter();
        let mut rcr = ResetControl::new(on_reset);
        assert_eq!(read_byte(&mut rcr), 0);
        // Linux's reboot=pci: 0x02 first (the kind), then 0x06.
        rcr.write(0, &[0x02]);
        assert_eq!(read_byte(&mut rcr), 0x02);
        rcr.write(0, &[0xfb]);
        assert_eq!(read_byte(&mut rcr), 0x0a, "only SYS_RST and FULL_RST are kept");
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        rcr.reset();
        assert_eq!(read_byte(&mut rcr), 0);
    }

    #[test]
    fn port_92_reads_0x02_when_idle_so_oring_a20_never_resets() {
        let (resets, on_reset) = counter();
        let mut port = Port92::new(on_reset);
        assert_eq!(read_byte(&mut port), 0x02);
        // OVMF: IoOr8(0x92, BIT1).
        let value = read_byte(&mut port) | 0x02;
        port.write(0, &[value]);
        assert_eq!(read_byte(&mut port), 0x02);
        port.write(0, &[0x00]);
        assert_eq!(read_byte(&mut port), 0x02, "A20 stays enabled");
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn port_92_bit_0_resets_and_reads_back_clear() {
        let (resets, on_reset) = counter();
        let mut port = Port92::new(on_reset);
        port.write(0, &[0x03]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(read_byte(&mut port) & 0x01, 0);
        port.write(0, &[0xf0]);
        assert_eq!(read_byte(&mut port), 0xf2, "the other bits are storage");
    }

    #[test]
    fn hostile_widths_and_offsets_never_panic_or_reset() {
        let (resets, on_reset) = counter();
        let (resets92, on_reset92) = counter();
        let mut rcr = ResetControl::new(on_reset);
        let mut port = Port92::new(on_reset92);
        for dev in [&mut rcr as &mut dyn BusDevice, &mut port] {
            for offset in [1, 2, 3, u64::MAX] {
                for len in [0, 1, 2, 4] {
                    let mut data = vec![0xff; len];
                    dev.read(offset, &mut data);
                    assert!(data.iter().all(|&b| b == 0xff));
                    dev.write(offset, &data);
                }
            }
            dev.write(0, &[]);
            dev.read(0, &mut []);
        }
        assert_eq!(resets.load(Ordering::SeqCst) + resets92.load(Ordering::SeqCst), 0);
        let mut wide = [0u8; 4];
        rcr.read(0, &mut wide);
        assert_eq!(wide, [0, 0xff, 0xff, 0xff], "a wide read spills into unassigned ports");
    }
}
