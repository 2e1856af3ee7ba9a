//! The CMOS real-time clock at ports 0x70/0x71, reporting the host's current UTC time.
//!
//! Time registers are read live from the host clock (BCD, 24-hour, as a PC BIOS leaves them);
//! a guest that sets the clock moves an offset, so it reads back what it wrote, advancing.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::bus::BusDevice;
use crate::state::StateError;

mod persist;

pub use persist::RtcState;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Register B: 24-hour mode; BCD (DM bit clear).
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
/// Register D: the CMOS battery is good.
const REG_D_VRT: u8 = 0x80;

pub struct Rtc {
    index: u8,
    nvram: [u8; 128],
    /// Seconds added to the host clock, set when the guest writes the time.
    offset_secs: i64,
}

/// Largest guest clock offset accepted from saved state (about 10000 years).
const MAX_OFFSET_SECS: i64 = 10_000 * 366 * 86_400;

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

/// A calendar date and time in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32,
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn datetime_from_unix(secs: i64) -> DateTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    DateTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem / 60 % 60) as u32,
        second: (rem % 60) as u32,
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        weekday: ((days + 4).rem_euclid(7) + 1) as u32,
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

fn host_unix_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Rtc {
    pub fn new() -> Self {
        let mut nvram = [0u8; 128];
        nvram[REG_A as usize] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        nvram[REG_B as usize] = REG_B_24H;
        nvram[REG_D as usize] = REG_D_VRT;
        Self { index: 0, nvram, offset_secs: 0 }
    }

    pub fn save_state(&self) -> RtcState {
        RtcState { index: self.index, nvram: self.nvram.to_vec(), offset_secs: self.offset_secs }
    }

    pub fn restore_state(&mut self, state: &RtcState) -> Result<(), StateError> {
        let nvram: [u8; 128] = state
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| StateError::invalid("rtc", "CMOS is not 128 bytes"))?;
        if state.index > 0x7f {
            return Err(StateError::invalid("rtc", "register index out of range"));
        }
        if !(-MAX_OFFSET_SECS..=MAX_OFFSET_SECS).contains(&state.offset_secs) {
            return Err(StateError::invalid("rtc", "clock offset out of range"));
        }
        self.index = state.index;
        self.nvram = nvram;
        self.offset_secs = state.offset_secs;
        Ok(())
    }

    fn now(&self) -> DateTime {
        datetime_from_unix(host_unix_secs() + self.offset_secs)
    }

    fn encode(&self, v: u32) -> u8 {
        if self.nvram[REG_B as usize] & REG_B_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.nvram[REG_B as usize] & REG_B_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let now = self.now();
        match index {
            REG_SECONDS => self.encode(now.second),
            REG_MINUTES => self.encode(now.minute),
            REG_HOURS => self.encode(now.hour),
            REG_WEEKDAY => self.encode(now.weekday),
            REG_DAY => self.encode(now.day),
            REG_MONTH => self.encode(now.month),
            REG_YEAR => self.encode((now.year % 100) as u32),
            REG_CENTURY => self.encode((now.year / 100) as u32),
            // Register C is cleared by reading it (no interrupts are ever flagged here).
            REG_C => 0,
            _ => self.nvram[usize::from(index & 0x7f)],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        let mut now = self.now();
        let field = self.decode(value);
        match index {
            REG_SECONDS => now.second = field.min(59),
            REG_MINUTES => now.minute = field.min(59),
            REG_HOURS => now.hour = field.min(23),
            REG_DAY => now.day = field.clamp(1, 31),
            REG_MONTH => now.month = field.clamp(1, 12),
            REG_YEAR => now.year = now.year / 100 * 100 + i64::from(field.min(99)),
            REG_CENTURY => now.year = i64::from(field.min(99)) * 100 + now.year % 100,
            REG_C | REG_D => return,
            _ => {
                self.nvram[usize::from(index & 0x7f)] = value;
                return;
            }
        }
        let secs = days_from_civil(now.year, now.month, now.day) * 86_400
            + i64::from(now.hour) * 3600
            + i64::from(now.minute) * 60
            + i64::from(now.second);
        self.offset_secs = secs - host_unix_secs();
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (1, 1) => data[0] = self.read_register(self.index),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            // Bit 7 of the index port is the NMI mask; it does not select a register.
            (0, [v]) => self.index = v & 0x7f,
            (1, [v]) => self.write_register(self.index, *v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn calendar_conversion_matches_known_dates() {
        let d = datetime_from_unix(0);
        assert_eq!((d.year, d.month, d.day, d.weekday), (1970, 1, 1, 5));
        let d = datetime_from_unix(1_795_000_000); // 2026-11-18 11:06:40 UTC, a Wednesday (date -u -d @1795000000)
        assert_eq!((d.year, d.month, d.day, d.hour, d.minute, d.second), (2026, 11, 18, 11, 6, 40));
        assert_eq!(d.weekday, 4);
        assert_eq!(days_from_civil(2026, 11, 18), 1_795_000_000 / 86_400);
    }

    #[test]
    fn time_registers_report_the_host_clock_in_bcd() {
        let mut rtc = Rtc::new();
        let expected = datetime_from_unix(host_unix_secs());
        let year = from_bcd(read(&mut rtc, REG_YEAR)) + 100 * from_bcd(read(&mut rtc, REG_CENTURY));
        assert_eq!(i64::from(year), expected.year);
        assert_eq!(from_bcd(read(&mut rtc, REG_MONTH)), expected.month);
        assert_eq!(read(&mut rtc, REG_B) & REG_B_BINARY, 0);
        assert_eq!(read(&mut rtc, REG_D), REG_D_VRT);
    }

    #[test]
    fn a_guest_that_sets_the_year_reads_it_back() {
        let mut rtc = Rtc::new();
        rtc.write(0, &[REG_YEAR]);
        rtc.write(1, &[0x31]);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x31);
    }

    #[test]
    fn guest_set_clock_and_cmos_survive_a_restore() {
        let mut rtc = Rtc::new();
        rtc.write(0, &[REG_YEAR]);
        rtc.write(1, &[0x31]);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        let saved = rtc.save_state();
        let bytes = crate::state::encode("rtc", &saved).unwrap();
        let mut fresh = Rtc::new();
        fresh.restore_state(&crate::state::decode("rtc", &bytes).unwrap()).unwrap();
        assert_eq!(fresh.save_state(), saved);
        assert_eq!(read(&mut fresh, REG_YEAR), 0x31);
        assert_eq!(read(&mut fresh, 0x40), 0xab);
    }

    #[test]
    fn hostile_rtc_state_is_refused_and_the_clock_is_unchanged() {
        let mut rtc = Rtc::new();
        let before = rtc.save_state();
        let bad = RtcState { nvram: vec![0; 12], ..before.clone() };
        assert!(matches!(rtc.restore_state(&bad), Err(StateError::Invalid { .. })));
        let bad = RtcState { offset_secs: i64::MAX, ..before.clone() };
        assert!(matches!(rtc.restore_state(&bad), Err(StateError::Invalid { .. })));
        assert_eq!(rtc.save_state(), before);
    }
}
