//! What the PC's ACPI PM block ([`super::AcpiPm`]) and the Q35 board's ICH9 PM block
//! (`devices::q35::pm`) share: the PM1 event/control registers, the PM timer on an injectable
//! monotonic clock, and the byte-wise register access both blocks allow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{PM_TIMER_HZ, SCI_EN, SLP_EN, SLP_TYP_MASK, SLP_TYP_SHIFT};

/// The visible bits of the 24-bit PM timer.
pub const PM_TIMER_MASK: u32 = 0x00ff_ffff;

/// A monotonic clock: time since some fixed origin. The host's by default; tests inject one
/// they advance by hand, so no test depends on how fast the machine runs.
pub trait MonotonicClock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The host's monotonic clock, counted from when it was made.
pub struct HostClock(Instant);

impl HostClock {
    pub fn new() -> Self {
        HostClock(Instant::now())
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl MonotonicClock for HostClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// The 3.579545 MHz ACPI PM timer, computed from the clock on every read (no thread).
pub struct PmTimer {
    clock: Arc<dyn MonotonicClock>,
    /// Clock time (ns) at which the count was 0; negative after restoring a count larger
    /// than the clock has run.
    start_nanos: i128,
}

impl PmTimer {
    pub fn new(clock: Arc<dyn MonotonicClock>) -> Self {
        let start_nanos = clock.now().as_nanos() as i128;
        PmTimer { clock, start_nanos }
    }

    /// Ticks since the count was 0 (not masked).
    pub fn ticks(&self) -> u128 {
        let elapsed = (self.clock.now().as_nanos() as i128 - self.start_nanos).max(0) as u128;
        elapsed * PM_TIMER_HZ / 1_000_000_000
    }

    /// What the guest reads: the low 24 bits.
    pub fn value(&self) -> u32 {
        (self.ticks() as u32) & PM_TIMER_MASK
    }

    /// The count within the timer's wrap, for saved state.
    pub fn saved_ticks(&self) -> u64 {
        (self.ticks() & u128::from(PM_TIMER_MASK)) as u64
    }

    /// Makes the timer count on from `ticks` (at most [`PM_TIMER_MASK`]).
    pub fn continue_from(&mut self, ticks: u64) {
        let nanos = u128::from(ticks) * 1_000_000_000 / PM_TIMER_HZ;
        self.start_nanos = self.clock.now().as_nanos() as i128 - nanos as i128;
    }

    /// Starts the count at 0 again.
    pub fn reset(&mut self) {
        self.start_nanos = self.clock.now().as_nanos() as i128;
    }
}

/// What a PM1_CNT write asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepRequest {
    /// SLP_EN with the S5 sleep type: soft off.
    PowerOff,
    /// SLP_EN with a sleep type the machine does not implement.
    Unsupported(u16),
}

/// PM1 status (write 1 to clear), enable and control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pm1Registers {
    pub status: u16,
    pub enable: u16,
    /// SLP_TYP and the other read/write bits; SLP_EN is write-only and never stored, SCI_EN
    /// is stored only when the guest controls it.
    pub control: u16,
    /// The SLP_TYP value the board's DSDT gives `_S5`.
    s5_sleep_type: u16,
    /// SCI_EN reads 1 whatever the guest writes (a machine without an SMI port: always ACPI).
    sci_en_fixed: bool,
}

impl Pm1Registers {
    pub fn new(s5_sleep_type: u8, sci_en_fixed: bool) -> Self {
        Pm1Registers {
            status: 0,
            enable: 0,
            control: 0,
            s5_sleep_type: u16::from(s5_sleep_type),
            sci_en_fixed,
        }
    }

    /// PM1_CNT as the guest reads it.
    pub fn control_read(&self) -> u16 {
        if self.sci_en_fixed {
            self.control | SCI_EN
        } else {
            self.control
        }
    }

    /// The control bits a saved or merged value may keep.
    pub fn storable_control(&self, value: u16) -> u16 {
        let mut value = value & !SLP_EN;
        if self.sci_en_fixed {
            value &= !SCI_EN;
        }
        value
    }

    /// Write 1 to clear the `mask`ed status bits set in `value`.
    pub fn write_status(&mut self, value: u16, mask: u16) {
        self.status &= !(value & mask);
    }

    pub fn write_enable(&mut self, value: u16, mask: u16) {
        self.enable = (self.enable & !mask) | (value & mask);
    }

    /// Writes the `mask`ed bits of PM1_CNT; SLP_EN asks for the sleep state SLP_TYP names.
    pub fn write_control(&mut self, value: u16, mask: u16) -> Option<SleepRequest> {
        let merged = (self.control & !mask) | (value & mask);
        self.control = self.storable_control(merged);
        if merged & SLP_EN == 0 {
            return None;
        }
        let sleep_type = (merged & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if sleep_type == self.s5_sleep_type {
            Some(SleepRequest::PowerOff)
        } else {
            Some(SleepRequest::Unsupported(sleep_type))
        }
    }

    /// Back to the power-on values.
    pub fn reset(&mut self) {
        self.status = 0;
        self.enable = 0;
        self.control = 0;
    }
}

/// Serves a read of `data.len()` bytes at `offset` from a register block laid out in `regs`;
/// bytes past the block read `outside`.
pub fn read_block(regs: &[u8], offset: u64, data: &mut [u8], outside: u8) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| regs.get(o).copied())
            .unwrap_or(outside);
    }
}

/// The bytes a write of `data` at `offset` sets within an `N`-byte block, and a mask of which
/// bytes it wrote: each register is then applied once, so a 16-bit write and two byte writes
/// behave the same. Bytes past the block are dropped.
pub fn gather_write<const N: usize>(offset: u64, data: &[u8]) -> ([u8; N], [u8; N]) {
    let mut value = [0u8; N];
    let mut mask = [0u8; N];
    for (i, &byte) in data.iter().enumerate() {
        let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
            break;
        };
        if o < N {
            value[o] = byte;
            mask[o] = 0xff;
        }
    }
    (value, mask)
}

/// Little-endian u16 at `offset` of `bytes`.
pub fn le16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

/// Little-endian u32 at `offset` of `bytes`.
pub fn le32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([bytes[offset], bytes[offset + 1], bytes[offset + 2], bytes[offset + 3]])
}

/// A clock for tests, advanced by hand.
#[cfg(test)]
#[derive(Default)]
pub struct ManualClock(std::sync::Mutex<Duration>);

#[cfg(test)]
impl ManualClock {
    pub fn advance(&self, by: Duration) {
        *crate::devices::bus::lock(&self.0) += by;
    }
}

#[cfg(test)]
impl MonotonicClock for ManualClock {
    fn now(&self) -> Duration {
        *crate::devices::bus::lock(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_counts_3579545_ticks_a_second_and_wraps_at_24_bits() {
        let clock = Arc::new(ManualClock::default());
        let timer = PmTimer::new(clock.clone());
        assert_eq!(timer.value(), 0);
        clock.advance(Duration::from_secs(1));
        assert_eq!(timer.ticks(), 3_579_545);
        assert_eq!(timer.value(), 3_579_545);
        clock.advance(Duration::from_secs(4));
        assert_eq!(timer.ticks(), 5 * 3_579_545);
        assert_eq!(timer.value(), (5 * 3_579_545) & PM_TIMER_MASK, "wrapped");
    }

    #[test]
    fn a_restored_count_continues_even_when_larger_than_the_clock_has_run() {
        let clock = Arc::new(ManualClock::default());
        let mut timer = PmTimer::new(clock.clone());
        timer.continue_from(0x12_3456);
        assert!(timer.value().abs_diff(0x12_3456) <= 1, "{:#x}", timer.value());
        let before = timer.ticks();
        clock.advance(Duration::from_millis(1));
        let ticks = timer.ticks() - before;
        assert!((3579..=3580).contains(&ticks), "1 ms later (rounding either way): {ticks}");
    }

    #[test]
    fn pm1_status_is_write_one_to_clear() {
        let mut pm1 = Pm1Registers::new(0, false);
        pm1.status = 0x0101;
        pm1.write_status(0x0100, 0xffff);
        assert_eq!(pm1.status, 0x0001);
        pm1.write_status(0x0001, 0xff00);
        assert_eq!(pm1.status, 0x0001, "outside the written bytes nothing is cleared");
    }

    #[test]
    fn sci_en_is_stored_only_when_the_guest_controls_it() {
        let mut fixed = Pm1Registers::new(5, true);
        fixed.write_control(0, 0xffff);
        assert_eq!(fixed.control_read() & SCI_EN, SCI_EN);
        let mut guest = Pm1Registers::new(0, false);
        assert_eq!(guest.control_read() & SCI_EN, 0);
        guest.write_control(SCI_EN, 0xffff);
        assert_eq!(guest.control_read(), SCI_EN);
    }
}
