//! ACPI fixed-hardware registers (PM1a event and control blocks, PM timer) at
//! `layout::ACPI_PM_PORT`: the power button the host presses, the soft-off (S5) the guest
//! requests, and the 3.579545 MHz timer. The FADT in `arch::x86_64::acpi` points here.
//!
//! ```text
//!  offset 0  PM1a_STS  16 bit  write 1 to clear; PWRBTN_STS = bit 8
//!  offset 2  PM1a_EN   16 bit  PWRBTN_EN = bit 8
//!  offset 4  PM1a_CNT  16 bit  SCI_EN (bit 0) reads 1; SLP_TYP bits 10..12; SLP_EN bit 13
//!  offset 8  PM_TMR    32 bit  24-bit free-running counter, read-only
//! ```
//!
//! The SCI is level-triggered: its line is high while `status & enable` is non-zero. Every
//! register may be accessed with any width at any offset (Linux's ACPICA reads bytes too).

use std::sync::Arc;

use crate::arch::x86_64::layout;
use crate::devices::bus::BusDevice;
use crate::hypervisor::InterruptSink;
use crate::state::StateError;

mod persist;
pub mod pm1;

pub use persist::AcpiPmState;
use pm1::{gather_write, le16, read_block, HostClock, Pm1Registers, PmTimer, SleepRequest};
pub use pm1::{MonotonicClock, PM_TIMER_MASK};

/// PM1 status / enable: the power button.
pub const PWRBTN: u16 = 1 << 8;
/// PM1 control bits.
pub const SCI_EN: u16 = 1 << 0;
pub const SLP_TYP_SHIFT: u16 = 10;
pub const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
pub const SLP_EN: u16 = 1 << 13;
/// PM timer frequency (ACPI spec: 3.579545 MHz).
pub const PM_TIMER_HZ: u128 = 3_579_545;

const STATUS_OFFSET: usize = 0;
const ENABLE_OFFSET: usize = 2;
const CONTROL_OFFSET: usize = 4;
const TIMER_OFFSET: usize = (layout::ACPI_PM_TMR_PORT - layout::ACPI_PM_PORT) as usize;
const BLOCK_LEN: usize = layout::ACPI_PM_LEN as usize;

/// The PM1a event/control registers and the PM timer.
pub struct AcpiPm {
    irq: Arc<dyn InterruptSink>,
    on_poweroff: Box<dyn Fn() + Send>,
    pm1: Pm1Registers,
    timer: PmTimer,
    sci_level: bool,
}

impl AcpiPm {
    /// `on_poweroff` runs (on the vCPU thread doing the write) when the guest enters S5.
    pub fn new(irq: Arc<dyn InterruptSink>, on_poweroff: Box<dyn Fn() + Send>) -> AcpiPm {
        AcpiPm {
            irq,
            on_poweroff,
            // No SMI port: the machine is always in ACPI mode, SCI_EN reads 1.
            pm1: Pm1Registers::new(layout::ACPI_S5_SLEEP_TYPE, true),
            timer: PmTimer::new(Arc::new(HostClock::new())),
            sci_level: false,
        }
    }

    /// The host pressed the power button: latch PWRBTN_STS; SCI fires if the guest enabled it.
    pub fn press_power_button(&mut self) {
        self.pm1.status |= PWRBTN;
        self.update_sci();
    }

    pub fn save_state(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.pm1.status,
            enable: self.pm1.enable,
            control: self.pm1.control,
            // Only the low 24 bits are visible; keep the count within the timer's wrap.
            timer_ticks: self.timer.saved_ticks(),
        }
    }

    /// Puts the registers back and makes the timer continue from the saved count; the SCI
    /// line is set to what status and enable say.
    pub fn restore_state(&mut self, state: &AcpiPmState) -> Result<(), StateError> {
        if state.timer_ticks > u64::from(PM_TIMER_MASK) {
            return Err(StateError::invalid("ACPI PM", "timer count wider than 24 bits"));
        }
        self.pm1.status = state.status;
        self.pm1.enable = state.enable;
        self.pm1.control = self.pm1.storable_control(state.control);
        self.timer.continue_from(state.timer_ticks);
        // Force the line to be driven: a fresh device's notion of it may not match.
        self.sci_level = self.pm1.status & self.pm1.enable == 0;
        self.update_sci();
        Ok(())
    }

    /// The whole register block as the guest sees it right now.
    fn snapshot(&self) -> [u8; BLOCK_LEN] {
        let mut regs = [0u8; BLOCK_LEN];
        regs[STATUS_OFFSET..STATUS_OFFSET + 2].copy_from_slice(&self.pm1.status.to_le_bytes());
        regs[ENABLE_OFFSET..ENABLE_OFFSET + 2].copy_from_slice(&self.pm1.enable.to_le_bytes());
        let control = self.pm1.control_read();
        regs[CONTROL_OFFSET..CONTROL_OFFSET + 2].copy_from_slice(&control.to_le_bytes());
        regs[TIMER_OFFSET..TIMER_OFFSET + 4].copy_from_slice(&self.timer.value().to_le_bytes());
        regs
    }

    fn update_sci(&mut self) {
        let level = self.pm1.status & self.pm1.enable != 0;
        if level == self.sci_level {
            return;
        }
        self.sci_level = level;
        if let Err(e) = self.irq.set_irq_line(layout::ACPI_SCI_IRQ, level) {
            log::error!("ACPI PM: could not set SCI line to {level}: {e}");
        }
    }

    fn write_control(&mut self, value: u16, mask: u16) {
        match self.pm1.write_control(value, mask) {
            Some(SleepRequest::PowerOff) => {
                log::info!("ACPI PM: guest entered S5 (soft off)");
                (self.on_poweroff)();
            }
            Some(SleepRequest::Unsupported(sleep_type)) => {
                log::warn!("ACPI PM: guest asked for unsupported sleep type {sleep_type}");
            }
            None => {}
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_block(&self.snapshot(), offset, data, 0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (value, mask) = gather_write::<BLOCK_LEN>(offset, data);
        self.pm1.write_status(le16(&value, STATUS_OFFSET), le16(&mask, STATUS_OFFSET));
        self.pm1.write_enable(le16(&value, ENABLE_OFFSET), le16(&mask, ENABLE_OFFSET));
        let control_mask = le16(&mask, CONTROL_OFFSET);
        if control_mask != 0 {
            self.write_control(le16(&value, CONTROL_OFFSET), control_mask);
        }
        // The timer and reserved bytes ignore writes.
        self.update_sci();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::hypervisor::Result as HvResult;

    #[derive(Default)]
    struct RecordingIrq(Mutex<Vec<(u32, bool)>>);

    impl InterruptSink for RecordingIrq {
        fn set_irq_line(&self, gsi: u32, active: bool) -> HvResult<()> {
            self.0.lock().expect("irq log").push((gsi, active));
            Ok(())
        }
        fn signal_msi(&self, _address: u64, _data: u32) -> HvResult<()> {
            panic!("the ACPI PM block never sends MSIs");
        }
    }

    impl RecordingIrq {
        fn take(&self) -> Vec<(u32, bool)> {
            std::mem::take(&mut *self.0.lock().expect("irq log"))
        }
    }

    fn device() -> (AcpiPm, Arc<RecordingIrq>, Arc<AtomicUsize>) {
        let irq = Arc::new(RecordingIrq::default());
        let poweroffs = Arc::new(AtomicUsize::new(0));
        let counter = poweroffs.clone();
        let pm = AcpiPm::new(
            irq.clone(),
            Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (pm, irq, poweroffs)
    }

    fn read16(pm: &mut AcpiPm, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    fn read_timer(pm: &mut AcpiPm) -> u32 {
        let mut b = [0u8; 4];
        pm.read(TIMER_OFFSET as u64, &mut b);
        u32::from_le_bytes(b)
    }

    const SCI: u32 = layout::ACPI_SCI_IRQ;

    #[test]
    fn power_button_without_enable_latches_status_but_no_sci() {
        let (mut pm, irq, _) = device();
        pm.press_power_button();
        assert_eq!(read16(&mut pm, 0), PWRBTN);
        assert!(irq.take().is_empty());
    }

    #[test]
    fn power_button_raises_sci_when_enabled_and_clearing_lowers_it() {
        let (mut pm, irq, _) = device();
        pm.write(2, &PWRBTN.to_le_bytes());
        assert!(irq.take().is_empty());
        pm.press_power_button();
        assert_eq!(irq.take(), [(SCI, true)]);
        // Writing 0 bits clears nothing.
        pm.write(0, &0u16.to_le_bytes());
        assert!(irq.take().is_empty());
        pm.write(0, &PWRBTN.to_le_bytes());
        assert_eq!(irq.take(), [(SCI, false)]);
        assert_eq!(read16(&mut pm, 0), 0);
    }

    #[test]
    fn enabling_a_latched_button_raises_sci_and_disabling_lowers_it() {
        let (mut pm, irq, _) = device();
        pm.press_power_button();
        pm.write(2, &PWRBTN.to_le_bytes());
        assert_eq!(irq.take(), [(SCI, true)]);
        pm.write(2, &0u16.to_le_bytes());
        assert_eq!(irq.take(), [(SCI, false)]);
    }

    #[test]
    fn registers_work_bytewise() {
        let (mut pm, irq, _) = device();
        // PWRBTN_EN is bit 0 of the enable register's high byte (offset 3).
        pm.write(3, &[0x01]);
        pm.press_power_button();
        assert_eq!(irq.take(), [(SCI, true)]);
        let mut b = [0u8; 1];
        pm.read(1, &mut b);
        assert_eq!(b, [0x01]);
        pm.read(0, &mut b);
        assert_eq!(b, [0x00]);
        // A 4-byte read at 0 returns status and enable together.
        let mut w = [0u8; 4];
        pm.read(0, &mut w);
        assert_eq!(w, [0x00, 0x01, 0x00, 0x01]);
        pm.write(1, &[0x01]);
        assert_eq!(irq.take(), [(SCI, false)]);
    }

    #[test]
    fn sci_en_always_reads_set() {
        let (mut pm, _, _) = device();
        assert_eq!(read16(&mut pm, 4) & SCI_EN, SCI_EN);
        pm.write(4, &0u16.to_le_bytes());
        assert_eq!(read16(&mut pm, 4) & SCI_EN, SCI_EN);
        let mut b = [0u8; 1];
        pm.read(4, &mut b);
        assert_eq!(b[0] & 1, 1);
    }

    #[test]
    fn s5_sleep_request_powers_off() {
        let (mut pm, _, poweroffs) = device();
        let s5 = (u16::from(layout::ACPI_S5_SLEEP_TYPE) << SLP_TYP_SHIFT) | SLP_EN;
        pm.write(4, &s5.to_le_bytes());
        assert_eq!(poweroffs.load(Ordering::SeqCst), 1);
        // SLP_EN is write-only; SLP_TYP keeps its value.
        assert_eq!(read16(&mut pm, 4), (s5 & !SLP_EN) | SCI_EN);
    }

    #[test]
    fn s5_written_as_single_high_byte_powers_off() {
        let (mut pm, _, poweroffs) = device();
        let s5 = (u16::from(layout::ACPI_S5_SLEEP_TYPE) << SLP_TYP_SHIFT) | SLP_EN;
        pm.write(5, &[(s5 >> 8) as u8]);
        assert_eq!(poweroffs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn other_sleep_types_or_missing_slp_en_do_not_power_off() {
        let (mut pm, _, poweroffs) = device();
        for slp_typ in (0..8u16).filter(|&t| t != u16::from(layout::ACPI_S5_SLEEP_TYPE)) {
            pm.write(4, &((slp_typ << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        }
        let s5_without_enable = u16::from(layout::ACPI_S5_SLEEP_TYPE) << SLP_TYP_SHIFT;
        pm.write(4, &s5_without_enable.to_le_bytes());
        assert_eq!(poweroffs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn timer_advances_at_about_3_58_mhz_and_ignores_writes() {
        let (mut pm, _, _) = device();
        let start = Instant::now();
        let t0 = read_timer(&mut pm);
        std::thread::sleep(Duration::from_millis(20));
        pm.write(TIMER_OFFSET as u64, &[0, 0, 0, 0]);
        let t1 = read_timer(&mut pm);
        let elapsed = start.elapsed();
        assert!(t1 <= PM_TIMER_MASK);
        let ticks = t1.wrapping_sub(t0) & PM_TIMER_MASK;
        // At least the 20 ms slept, at most what really passed (plus one tick of rounding).
        let max = elapsed.as_nanos() * PM_TIMER_HZ / 1_000_000_000 + 2;
        assert!(u128::from(ticks) >= 20 * 3579 && u128::from(ticks) <= max, "{ticks} ticks");
    }

    #[test]
    fn accesses_past_the_block_are_harmless() {
        let (mut pm, irq, poweroffs) = device();
        let mut b = [0xaau8; 4];
        pm.read(14, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
        pm.read(u64::MAX, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
        pm.write(15, &[0xff; 4]);
        pm.write(u64::MAX, &[0xff; 4]);
        assert!(irq.take().is_empty());
        assert_eq!(poweroffs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn registers_and_timer_continue_after_a_restore() {
        let (mut pm, _, _) = device();
        pm.write(2, &PWRBTN.to_le_bytes());
        pm.write(4, &(3u16 << SLP_TYP_SHIFT).to_le_bytes());
        std::thread::sleep(Duration::from_millis(5));
        let saved = pm.save_state();
        let t_saved = saved.timer_ticks as u32;
        let bytes = crate::state::encode("acpi", &saved).unwrap();
        let (mut fresh, irq, _) = device();
        fresh.restore_state(&crate::state::decode("acpi", &bytes).unwrap()).unwrap();
        assert_eq!(irq.take(), [(SCI, false)], "the line is driven to the saved level");
        let again = fresh.save_state();
        assert_eq!((again.status, again.enable, again.control), (0, PWRBTN, 3 << SLP_TYP_SHIFT));
        let t = read_timer(&mut fresh);
        assert!(
            t.wrapping_sub(t_saved) & PM_TIMER_MASK < 3_579_545,
            "timer jumped: {t} vs {t_saved}"
        );
        assert!(t >= t_saved || t_saved - t > 0x00f0_0000, "timer went backwards");
        fresh.press_power_button();
        assert_eq!(irq.take(), [(SCI, true)]);
    }

    #[test]
    fn timer_wider_than_24_bits_is_refused() {
        let (mut pm, _, _) = device();
        pm.write(2, &PWRBTN.to_le_bytes());
        let bad = AcpiPmState { status: 0, enable: 0, control: 0, timer_ticks: 1 << 30 };
        assert!(matches!(pm.restore_state(&bad), Err(StateError::Invalid { .. })));
        assert_eq!(pm.save_state().enable, PWRBTN);
    }
}
