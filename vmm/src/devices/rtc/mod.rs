//! The CMOS real-time clock (an MC146818) at ports 0x70/0x71, IRQ 8, and the CMOS RAM a PC
//! BIOS reads (memory size, CPU count, century, shutdown status).
//!
//! The time is the host's wall clock plus an offset the guest moves by setting the clock
//! (Windows keeps local time there), read live in the format register B selects (BCD or
//! binary, 12 or 24 hours). Register B's SET bit and a divider reset in register A stop it.
//!
//! Nothing ticks: the update cycle, the periodic rate and the alarm are computed from the host
//! clock when the guest touches a register (`Core::catch_up` sets the register C flags of
//! the events since the last access). Only the interrupts need a thread, and only once the
//! guest enables one: it sleeps until the next event that would raise IRQ 8 (none while an
//! earlier interrupt is unacknowledged, i.e. register C unread) and is woken by writes to
//! registers A and B, reads of C, restores, and the device's drop, which joins it. So the
//! common case (Linux reads the clock and enables no RTC interrupt) runs no thread, and a
//! snapshot sees consistent registers under the one lock.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{error, warn};
use vm_superio::Trigger;

use crate::devices::bus::{lock, BusDevice};
use crate::devices::serial::IrqEdge;
use crate::state::StateError;

mod persist;

pub use persist::{RtcState, RtcStateV1};

const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The shutdown status byte: plain storage (firmware's reset and S3-resume reason).
pub const CMOS_SHUTDOWN_STATUS: u8 = 0x0f;
const REG_CENTURY: u8 = 0x32;

/// Register A: update in progress (read only).
const REG_A_UIP: u8 = 0x80;
/// Register A: divider select, bits 6:4; 010 is the 32.768 kHz time base running.
const REG_A_DV_MASK: u8 = 0x70;
const REG_A_DV_RUNNING: u8 = 0x20;
/// Register A: rate select, bits 3:0 (the periodic interrupt's rate).
const REG_A_RS_MASK: u8 = 0x0f;
/// Register B: updates stopped, so the guest can set the time.
const REG_B_SET: u8 = 0x80;
const REG_B_PIE: u8 = 0x40;
const REG_B_AIE: u8 = 0x20;
const REG_B_UIE: u8 = 0x10;
/// Register B: binary (DM set) rather than BCD.
const REG_B_BINARY: u8 = 0x04;
/// Register B: 24-hour mode.
const REG_B_24H: u8 = 0x02;
/// Register C: an enabled interrupt flag is set (IRQ 8 raised).
const REG_C_IRQF: u8 = 0x80;
const REG_C_PF: u8 = 0x40;
const REG_C_AF: u8 = 0x20;
const REG_C_UF: u8 = 0x10;
/// Register D: the CMOS battery is good.
const REG_D_VRT: u8 = 0x80;
/// Alarm register values at or above this match any value ("don't care").
const ALARM_DONT_CARE: u8 = 0xc0;
/// 12-hour mode: the PM bit of the hours registers.
const HOURS_PM: u8 = 0x80;

const NS_PER_SEC: i128 = 1_000_000_000;
/// The time base: 32.768 kHz.
const BASE_HZ: i128 = 32_768;
/// UIP is set this long before each update: 8 cycles of the time base (the MC146818's
/// t_BUC, 244 µs), so a guest polling UIP sees the window and reads a stable time outside it.
const UIP_NS: i128 = 8 * NS_PER_SEC / BASE_HZ;
/// After the divider leaves reset the first update comes half a second later, as on the
/// MC146818 (Linux times its clock writes for that).
const DIVIDER_RELEASE_PHASE_NS: i128 = NS_PER_SEC / 2;
/// The timer thread re-reads the clock at least this often (the host clock may be stepped).
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(1);

/// Largest guest clock offset accepted from saved state (about 10000 years).
const MAX_OFFSET_SECS: i64 = 10_000 * 366 * 86_400;

/// The host's wall clock, in nanoseconds since the Unix epoch: injectable so tests move time
/// by hand.
trait Clock: Send + Sync {
    fn now_ns(&self) -> i128;
}

/// The real host clock.
struct HostClock;

impl Clock for HostClock {
    fn now_ns(&self) -> i128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i128::try_from(d.as_nanos()).unwrap_or(0))
            .unwrap_or(0)
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

fn unix_from_datetime(t: &DateTime) -> i64 {
    days_from_civil(t.year, t.month, t.day) * 86_400
        + i64::from(t.hour) * 3600
        + i64::from(t.minute) * 60
        + i64::from(t.second)
}

/// The periodic interrupt's period in time-base cycles for rate select `rs` (none for 0).
fn periodic_cycles(rs: u8) -> Option<i128> {
    match rs & REG_A_RS_MASK {
        0 => None,
        // Rates 1 and 2 repeat 8 and 9 (256 and 128 Hz) with the 32.768 kHz base.
        rs @ 1..=2 => Some(1 << (rs + 6)),
        rs => Some(1 << (rs - 1)),
    }
}

fn divider_in_reset(reg_a: u8) -> bool {
    reg_a & 0x60 == 0x60
}

/// The registers, shared between the bus side and the timer thread.
struct Core {
    clock: Arc<dyn Clock>,
    irq: Option<IrqEdge>,
    index: u8,
    /// Bit 7 of the index port: kept, not acted on (there is no NMI source to mask).
    nmi_masked: bool,
    /// The CMOS bytes; the time registers and the century are computed instead, C is
    /// `flags` and D is constant.
    nvram: [u8; 128],
    /// Register C: events since the guest last read it.
    flags: u8,
    /// Guest time minus host time, in ns; its sub-second part is the divider's phase.
    offset_ns: i128,
    /// The time shown while SET or a divider reset stops updates (Unix seconds).
    frozen_secs: Option<i64>,
    /// Host time up to which events are in `flags` (not saved: a restore starts afresh).
    accounted_ns: i128,
    /// The device is being dropped: the timer thread ends.
    stop: bool,
}

impl Core {
    fn reg_a(&self) -> u8 {
        self.nvram[usize::from(REG_A)]
    }

    fn reg_b(&self) -> u8 {
        self.nvram[usize::from(REG_B)]
    }

    fn binary(&self) -> bool {
        self.reg_b() & REG_B_BINARY != 0
    }

    fn guest_ns(&self, now: i128) -> i128 {
        now + self.offset_ns
    }

    /// Nanoseconds into the current guest second (the divider's phase).
    fn phase_ns(&self, now: i128) -> i128 {
        self.guest_ns(now).rem_euclid(NS_PER_SEC)
    }

    /// The time the registers show, in Unix seconds.
    fn shown_secs(&self, now: i128) -> i64 {
        match self.frozen_secs {
            Some(secs) => secs,
            None => i64::try_from(self.guest_ns(now).div_euclid(NS_PER_SEC)).unwrap_or(0),
        }
    }

    fn wants_frozen(&self) -> bool {
        self.reg_b() & REG_B_SET != 0 || divider_in_reset(self.reg_a())
    }

    fn periodic_cycles(&self) -> Option<i128> {
        if self.reg_a() & REG_A_DV_MASK != REG_A_DV_RUNNING {
            return None;
        }
        periodic_cycles(self.reg_a())
    }

    fn encode(&self, v: u32) -> u8 {
        if self.binary() {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary() {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hours(&self, hour: u32) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hours(&self, v: u8) -> u32 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.decode(v).min(23);
        }
        let pm = if v & HOURS_PM != 0 { 12 } else { 0 };
        self.decode(v & !HOURS_PM).min(12) % 12 + pm
    }

    /// Whether the alarm registers match the time of day `secs` (Unix seconds).
    fn alarm_matches(&self, secs: i64) -> bool {
        let day = secs.rem_euclid(86_400) as u32;
        let field = |reg: u8, value: u8| {
            let alarm = self.nvram[usize::from(reg)];
            alarm >= ALARM_DONT_CARE || alarm == value
        };
        field(REG_SECONDS_ALARM, self.encode(day % 60))
            && field(REG_MINUTES_ALARM, self.encode(day / 60 % 60))
            && field(REG_HOURS_ALARM, self.encode_hours(day / 3600))
    }

    /// Sets the register C flags of the events between the last access and `now`, and
    /// raises IRQ 8 if that sets IRQF.
    fn catch_up(&mut self, now: i128) {
        let (from, to) = (self.guest_ns(self.accounted_ns), self.guest_ns(now));
        self.accounted_ns = now;
        if to <= from {
            return; // no time passed, or the host clock stepped back
        }
        if let Some(cycles) = self.periodic_cycles() {
            let period = |t: i128| (t * BASE_HZ).div_euclid(cycles * NS_PER_SEC);
            if period(to) > period(from) {
                self.flags |= REG_C_PF;
            }
        }
        if self.frozen_secs.is_none() {
            let (first, last) = (from.div_euclid(NS_PER_SEC), to.div_euclid(NS_PER_SEC));
            if last > first {
                self.flags |= REG_C_UF;
                // The alarm compares the time of day only, so one day of updates covers all.
                let first = first.max(last - 86_400);
                if self.flags & REG_C_AF == 0
                    && (first + 1..=last).any(|s| self.alarm_matches(s as i64))
                {
                    self.flags |= REG_C_AF;
                }
            }
        }
        self.update_irq();
    }

    /// IRQF follows the flags the guest enabled; IRQ 8 gets an edge when IRQF goes up.
    fn update_irq(&mut self) {
        let enabled = self.flags & self.reg_b() & (REG_C_PF | REG_C_AF | REG_C_UF) != 0;
        if !enabled {
            self.flags &= !REG_C_IRQF;
        } else if self.flags & REG_C_IRQF == 0 {
            self.flags |= REG_C_IRQF;
            if let Some(irq) = &self.irq {
                if let Err(e) = irq.trigger() {
                    warn!("rtc: raising IRQ 8 failed: {e}");
                }
            }
        }
    }

    /// Host time of the next event that would raise IRQ 8, if one can.
    fn next_interrupt_ns(&self, now: i128) -> Option<i128> {
        if self.irq.is_none() || self.flags & REG_C_IRQF != 0 {
            return None; // no edge until the guest reads register C
        }
        let b = self.reg_b();
        let guest = self.guest_ns(now);
        let periodic = match self.periodic_cycles() {
            Some(cycles) if b & REG_B_PIE != 0 => {
                let next = (guest * BASE_HZ).div_euclid(cycles * NS_PER_SEC) + 1;
                // The first nanosecond at or after the period boundary.
                let span = next * cycles * NS_PER_SEC;
                Some(span / BASE_HZ + i128::from(span % BASE_HZ != 0))
            }
            _ => None,
        };
        let update = (b & (REG_B_AIE | REG_B_UIE) != 0 && self.frozen_secs.is_none())
            .then(|| (guest.div_euclid(NS_PER_SEC) + 1) * NS_PER_SEC);
        let next = match (periodic, update) {
            (Some(p), Some(u)) => p.min(u),
            (p, u) => p.or(u)?,
        };
        Some(next - self.offset_ns)
    }

    fn read(&mut self, index: u8) -> u8 {
        let now = self.clock.now_ns();
        self.catch_up(now);
        let t = datetime_from_unix(self.shown_secs(now));
        match index {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hours(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u32),
            REG_A => {
                let uip = self.frozen_secs.is_none() && NS_PER_SEC - self.phase_ns(now) <= UIP_NS;
                self.reg_a() | if uip { REG_A_UIP } else { 0 }
            }
            REG_C => std::mem::take(&mut self.flags),
            REG_D => REG_D_VRT,
            _ => self.nvram[usize::from(index & 0x7f)],
        }
    }

    fn write(&mut self, index: u8, value: u8) {
        let now = self.clock.now_ns();
        self.catch_up(now);
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => self.set_time_field(index, value, now),
            REG_A | REG_B => {
                let was_reset = divider_in_reset(self.reg_a());
                let value = match index {
                    REG_A => value & !REG_A_UIP,
                    // Setting SET clears UIE, as on the MC146818.
                    _ if value & REG_B_SET != 0 => value & !REG_B_UIE,
                    _ => value,
                };
                self.nvram[usize::from(index)] = value;
                if was_reset && !divider_in_reset(self.reg_a()) {
                    self.offset_ns += DIVIDER_RELEASE_PHASE_NS - self.phase_ns(now);
                }
                match (self.frozen_secs, self.wants_frozen()) {
                    (None, true) => self.frozen_secs = Some(self.shown_secs(now)),
                    (Some(secs), false) => {
                        // Updates resume from the shown time, in the divider's phase.
                        let phase = self.phase_ns(now);
                        self.offset_ns = i128::from(secs) * NS_PER_SEC + phase - now;
                        self.frozen_secs = None;
                    }
                    _ => {}
                }
                self.update_irq();
            }
            REG_C | REG_D => {}
            _ => self.nvram[usize::from(index & 0x7f)] = value,
        }
    }

    /// A guest write to one time register, in the format register B selects.
    fn set_time_field(&mut self, index: u8, value: u8, now: i128) {
        let mut t = datetime_from_unix(self.shown_secs(now));
        let field = self.decode(value);
        match index {
            REG_SECONDS => t.second = field.min(59),
            REG_MINUTES => t.minute = field.min(59),
            REG_HOURS => t.hour = self.decode_hours(value),
            REG_DAY => t.day = field.clamp(1, 31),
            REG_MONTH => t.month = field.clamp(1, 12),
            REG_YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(field.min(99)),
            _ => t.year = i64::from(field.min(99)) * 100 + t.year.rem_euclid(100),
        }
        let secs = unix_from_datetime(&t);
        match &mut self.frozen_secs {
            Some(frozen) => *frozen = secs,
            None => {
                let phase = self.phase_ns(now);
                self.offset_ns = i128::from(secs) * NS_PER_SEC + phase - now;
            }
        }
    }
}

struct Shared {
    core: Mutex<Core>,
    /// Wakes the timer thread: its next deadline may have changed, or it must stop.
    wake: Condvar,
}

pub struct Rtc {
    shared: Arc<Shared>,
    /// Whether interrupts get a timer thread (tests drive [`Rtc::service`] by hand instead).
    timer_thread: bool,
    thread: Option<JoinHandle<()>>,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC on the host clock, raising no interrupt until given one ([`Rtc::with_irq`]).
    pub fn new() -> Self {
        Self::with_clock(Arc::new(HostClock), true)
    }

    /// An RTC on `clock`; without `timer_thread` interrupts are only raised on register
    /// accesses and [`Rtc::service`] calls.
    fn with_clock(clock: Arc<dyn Clock>, timer_thread: bool) -> Self {
        let mut nvram = [0u8; 128];
        nvram[usize::from(REG_A)] = REG_A_DV_RUNNING | 0x06; // 32.768 kHz base, 1024 Hz
        nvram[usize::from(REG_B)] = REG_B_24H;
        let now = clock.now_ns();
        let core = Core {
            clock,
            irq: None,
            index: 0,
            nmi_masked: false,
            nvram,
            flags: 0,
            offset_ns: 0,
            frozen_secs: None,
            accounted_ns: now,
            stop: false,
        };
        Self {
            shared: Arc::new(Shared { core: Mutex::new(core), wake: Condvar::new() }),
            timer_thread,
            thread: None,
        }
    }

    /// Raises `irq` (IRQ 8) for the periodic, alarm and update-ended interrupts.
    pub fn with_irq(self, irq: IrqEdge) -> Self {
        lock(&self.shared.core).irq = Some(irq);
        self
    }

    /// Fills the CMOS bytes a PC BIOS reads for the memory size and the CPU count, laid out
    /// as QEMU's `pc_cmos_init` does: base memory (KiB, at most 640) at 0x15/0x16, memory from
    /// 1 MiB (KiB, at most 65535) at 0x17/0x18 and 0x30/0x31, memory from 16 MiB below 4 GiB
    /// (64 KiB units, at most 65535) at 0x34/0x35, memory above 4 GiB (64 KiB units) at
    /// 0x5B–0x5D, and CPUs − 1 at 0x5F (0 beyond 256 CPUs, which firmware counts by ACPI).
    pub fn set_memory_and_cpus(&mut self, below_4g: u64, above_4g: u64, cpus: u32) {
        const KIB: u64 = 1 << 10;
        const MIB: u64 = 1 << 20;
        let base = (below_4g / KIB).min(640);
        let extended = (below_4g.saturating_sub(MIB) / KIB).min(0xffff);
        let above_16m = (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff);
        let high = above_4g / (64 * KIB);
        let cpus_byte = if cpus <= 256 { cpus.saturating_sub(1) as u8 } else { 0 };
        let mut core = lock(&self.shared.core);
        let mut put = |at: usize, value: u64, len: usize| {
            for i in 0..len {
                core.nvram[at + i] = (value >> (8 * i)) as u8;
            }
        };
        put(0x15, base, 2);
        put(0x17, extended, 2);
        put(0x30, extended, 2);
        put(0x34, above_16m, 2);
        put(0x5b, high, 3);
        put(0x5f, u64::from(cpus_byte), 1);
    }

    /// Brings register C up to the current time and raises IRQ 8 if an enabled event has
    /// happened: what the timer thread does at each deadline.
    pub fn service(&self) {
        let mut core = lock(&self.shared.core);
        let now = core.clock.now_ns();
        core.catch_up(now);
    }

    /// Starts the timer thread once the guest enables an interrupt, and wakes it to re-plan.
    fn rearm_timer(&mut self) {
        self.shared.wake.notify_all();
        if !self.timer_thread || self.thread.is_some() {
            return;
        }
        {
            let core = lock(&self.shared.core);
            if core.irq.is_none() || core.reg_b() & (REG_B_PIE | REG_B_AIE | REG_B_UIE) == 0 {
                return;
            }
        }
        let shared = self.shared.clone();
        match std::thread::Builder::new().name("rtc".into()).spawn(move || run_timer(&shared)) {
            Ok(handle) => self.thread = Some(handle),
            Err(e) => error!("rtc: no timer thread, so no RTC interrupts: {e}"),
        }
    }

    pub fn save_state(&self) -> RtcState {
        let mut core = lock(&self.shared.core);
        let now = core.clock.now_ns();
        core.catch_up(now);
        RtcState {
            index: core.index,
            nmi_masked: core.nmi_masked,
            nvram: core.nvram.to_vec(),
            flags: core.flags,
            offset_ns: core.offset_ns,
            frozen_secs: core.frozen_secs,
        }
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
        let max_ns = i128::from(MAX_OFFSET_SECS) * NS_PER_SEC;
        if !(-max_ns..=max_ns).contains(&state.offset_ns) {
            return Err(StateError::invalid("rtc", "clock offset out of range"));
        }
        if let Some(secs) = state.frozen_secs {
            if !(-MAX_OFFSET_SECS..=MAX_OFFSET_SECS).contains(&secs) {
                return Err(StateError::invalid("rtc", "stopped clock out of range"));
            }
        }
        {
            let mut core = lock(&self.shared.core);
            let now = core.clock.now_ns();
            core.index = state.index;
            core.nmi_masked = state.nmi_masked;
            core.nvram = nvram;
            core.flags = state.flags & (REG_C_PF | REG_C_AF | REG_C_UF);
            core.offset_ns = state.offset_ns;
            core.frozen_secs = None;
            // A state from before SET stopped the clock shows the time as it was restored.
            if core.wants_frozen() {
                core.frozen_secs = Some(state.frozen_secs.unwrap_or_else(|| core.shown_secs(now)));
            }
            // Events between the save and now are not replayed.
            core.accounted_ns = now;
            // An unacknowledged interrupt is raised again: the timer thread may have raised
            // it after the interrupt controller was saved, and if the guest never saw it, it
            // would never read C and IRQ 8 would stay silent. If it did, it sees one spurious
            // interrupt, which an RTC handler tolerates (it reads C and finds nothing new).
            core.update_irq();
        }
        self.rearm_timer();
        Ok(())
    }
}

/// The timer thread: sleeps until the next event that raises IRQ 8, or until woken.
fn run_timer(shared: &Shared) {
    let mut core = lock(&shared.core);
    while !core.stop {
        let now = core.clock.now_ns();
        core.catch_up(now);
        core = match core.next_interrupt_ns(now) {
            Some(at) => {
                let wait = u64::try_from((at - now).max(0)).unwrap_or(u64::MAX);
                let wait = Duration::from_nanos(wait).min(MAX_TIMER_SLEEP);
                match shared.wake.wait_timeout(core, wait) {
                    Ok((guard, _)) => guard,
                    Err(poisoned) => poisoned.into_inner().0,
                }
            }
            None => shared.wake.wait(core).unwrap_or_else(|poisoned| poisoned.into_inner()),
        };
    }
}

impl Drop for Rtc {
    fn drop(&mut self) {
        lock(&self.shared.core).stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("rtc: the timer thread panicked");
            }
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (1, 1) => {
                let mut core = lock(&self.shared.core);
                let index = core.index;
                data[0] = core.read(index);
                if index == REG_C {
                    drop(core);
                    self.shared.wake.notify_all(); // interrupts can be raised again
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            // Bit 7 of the index port is the NMI mask; it does not select a register.
            (0, [v]) => {
                let mut core = lock(&self.shared.core);
                core.index = v & 0x7f;
                core.nmi_masked = v & 0x80 != 0;
            }
            (1, [v]) => {
                let index = {
                    let mut core = lock(&self.shared.core);
                    let index = core.index;
                    core.write(index, *v);
                    index
                };
                if index == REG_B || index == REG_A {
                    self.rearm_timer();
                }
            }
            _ => {}
        }
    }
}
#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::testing::IrqLog;

    /// A host clock that moves only when the test says so.
    pub(crate) struct FakeClock(Mutex<i128>);

    impl FakeClock {
        /// 2026-11-18 11:06:40 UTC (a Wednesday), 0.1 s into the second.
        pub(crate) fn new() -> Arc<FakeClock> {
            Arc::new(FakeClock(Mutex::new(1_795_000_000 * NS_PER_SEC + 100_000_000)))
        }
        pub(crate) fn advance_ns(&self, ns: i128) {
            *self.0.lock().unwrap() += ns;
        }
    }

    impl Clock for FakeClock {
        fn now_ns(&self) -> i128 {
            *self.0.lock().unwrap()
        }
    }

    /// An RTC on a fake clock whose interrupts the test services by hand.
    pub(crate) fn fake_rtc() -> (Rtc, Arc<FakeClock>) {
        let clock = FakeClock::new();
        (Rtc::with_clock(clock.clone(), false), clock)
    }

    fn with_irq_log(rtc: Rtc) -> (Rtc, Arc<IrqLog>) {
        let log = Arc::new(IrqLog::default());
        (rtc.with_irq(IrqEdge::new(log.clone(), 8)), log)
    }

    /// Raised edges (line going active) on IRQ 8.
    fn edges(log: &IrqLog) -> usize {
        log.lines().iter().filter(|&&(gsi, active)| gsi == 8 && active).count()
    }

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    fn write(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.write(0, &[index]);
        rtc.write(1, &[value]);
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
        let host_secs = i64::try_from(HostClock.now_ns() / NS_PER_SEC).unwrap();
        let expected = datetime_from_unix(host_secs);
        let year = from_bcd(read(&mut rtc, REG_YEAR)) + 100 * from_bcd(read(&mut rtc, REG_CENTURY));
        assert_eq!(i64::from(year), expected.year);
        assert_eq!(from_bcd(read(&mut rtc, REG_MONTH)), expected.month);
        assert_eq!(read(&mut rtc, REG_B) & REG_B_BINARY, 0);
        assert_eq!(read(&mut rtc, REG_D), REG_D_VRT);
    }

    #[test]
    fn fake_clock_time_reads_in_bcd_24_hour_by_default() {
        let (mut rtc, _) = fake_rtc();
        let got: Vec<u8> = [REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY]
            .into_iter()
            .chain([REG_MONTH, REG_YEAR, REG_CENTURY])
            .map(|r| read(&mut rtc, r))
            .collect();
        assert_eq!(got, [0x40, 0x06, 0x11, 0x04, 0x18, 0x11, 0x26, 0x20]);
    }

    #[test]
    fn binary_mode_reads_plain_numbers() {
        let (mut rtc, _) = fake_rtc();
        write(&mut rtc, REG_B, REG_B_24H | REG_B_BINARY);
        assert_eq!(read(&mut rtc, REG_SECONDS), 40);
        assert_eq!(read(&mut rtc, REG_YEAR), 26);
        assert_eq!(read(&mut rtc, REG_CENTURY), 20);
    }

    #[test]
    fn twelve_hour_mode_reads_and_writes_the_pm_bit() {
        let (mut rtc, _) = fake_rtc();
        write(&mut rtc, REG_B, 0); // 12-hour, BCD
        assert_eq!(read(&mut rtc, REG_HOURS), 0x11); // 11 AM
        write(&mut rtc, REG_HOURS, HOURS_PM | 0x12); // 12 PM is noon
        write(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x12);
        write(&mut rtc, REG_B, REG_B_BINARY); // 12-hour, binary
        write(&mut rtc, REG_HOURS, 12); // 12 AM is midnight
        write(&mut rtc, REG_B, REG_B_24H | REG_B_BINARY);
        assert_eq!(read(&mut rtc, REG_HOURS), 0);
        write(&mut rtc, REG_HOURS, 23);
        write(&mut rtc, REG_B, REG_B_BINARY);
        assert_eq!(read(&mut rtc, REG_HOURS), HOURS_PM | 11);
    }

    #[test]
    fn guest_writes_follow_the_data_mode() {
        let (mut rtc, _) = fake_rtc();
        write(&mut rtc, REG_B, REG_B_24H | REG_B_BINARY);
        write(&mut rtc, REG_MINUTES, 45);
        write(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(read(&mut rtc, REG_MINUTES), 0x45);
        write(&mut rtc, REG_MINUTES, 0x21);
        write(&mut rtc, REG_B, REG_B_24H | REG_B_BINARY);
        assert_eq!(read(&mut rtc, REG_MINUTES), 21);
    }

    #[test]
    fn register_d_reads_vrt_whatever_is_written() {
        let (mut rtc, _) = fake_rtc();
        write(&mut rtc, REG_D, 0);
        assert_eq!(read(&mut rtc, REG_D), REG_D_VRT);
        write(&mut rtc, REG_D, 0x7f);
        assert_eq!(read(&mut rtc, REG_D), REG_D_VRT);
    }

    #[test]
    fn uip_is_set_only_in_the_244_us_before_each_update() {
        let (mut rtc, clock) = fake_rtc();
        assert_eq!(read(&mut rtc, REG_A), 0x26); // 0.1 s into the second
        clock.advance_ns(NS_PER_SEC - 100_000_000 - UIP_NS - 1);
        assert_eq!(read(&mut rtc, REG_A) & REG_A_UIP, 0, "just before the window");
        clock.advance_ns(2);
        assert_eq!(read(&mut rtc, REG_A), REG_A_UIP | 0x26);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x40, "the old second until the update");
        clock.advance_ns(UIP_NS);
        assert_eq!(read(&mut rtc, REG_A) & REG_A_UIP, 0, "the update happened");
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x41);
    }

    #[test]
    fn register_a_rate_and_divider_are_writable_but_uip_is_not() {
        let (mut rtc, _) = fake_rtc();
        write(&mut rtc, REG_A, 0xaf);
        assert_eq!(read(&mut rtc, REG_A), 0x2f);
    }

    #[test]
    fn set_freezes_the_clock_until_cleared() {
        let (mut rtc, clock) = fake_rtc();
        write(&mut rtc, REG_B, REG_B_SET | REG_B_24H);
        clock.advance_ns(5 * NS_PER_SEC);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x40, "frozen");
        assert_eq!(read(&mut rtc, REG_A) & REG_A_UIP, 0);
        write(&mut rtc, REG_SECONDS, 0x10);
        clock.advance_ns(3 * NS_PER_SEC);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x10, "the written time, still frozen");
        write(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x10);
        clock.advance_ns(2 * NS_PER_SEC);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x12, "running again");
    }

    #[test]
    fn releasing_a_divider_reset_updates_half_a_second_later() {
        let (mut rtc, clock) = fake_rtc();
        write(&mut rtc, REG_A, 0x76); // divider in reset: frozen
        clock.advance_ns(3 * NS_PER_SEC);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x40);
        write(&mut rtc, REG_A, 0x26);
        clock.advance_ns(NS_PER_SEC / 2 - 1);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x40);
        clock.advance_ns(1);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x41);
    }

    #[test]
    fn register_c_reports_the_update_flag_once_and_clears_on_read() {
        let (mut rtc, clock) = fake_rtc();
        assert_eq!(read(&mut rtc, REG_C), 0);
        clock.advance_ns(NS_PER_SEC);
        // Flags are set even with the interrupts disabled; IRQF only for enabled ones.
        assert_eq!(read(&mut rtc, REG_C), REG_C_UF | REG_C_PF);
        assert_eq!(read(&mut rtc, REG_C), 0);
    }

    #[test]
    fn the_alarm_flags_and_interrupts_when_the_time_matches() {
        let (rtc, clock) = fake_rtc();
        let (mut rtc, log) = with_irq_log(rtc);
        write(&mut rtc, REG_SECONDS_ALARM, 0x43);
        write(&mut rtc, REG_MINUTES_ALARM, 0x06);
        write(&mut rtc, REG_HOURS_ALARM, ALARM_DONT_CARE);
        write(&mut rtc, REG_B, REG_B_24H | REG_B_AIE);
        clock.advance_ns(2 * NS_PER_SEC); // 11:06:42
        rtc.service();
        assert_eq!(edges(&log), 0);
        assert_eq!(read(&mut rtc, REG_C) & REG_C_AF, 0);
        clock.advance_ns(NS_PER_SEC); // 11:06:43
        rtc.service();
        assert_eq!(edges(&log), 1);
        assert_eq!(read(&mut rtc, REG_C), REG_C_IRQF | REG_C_AF | REG_C_UF | REG_C_PF);
    }

    #[test]
    fn the_update_interrupt_fires_once_a_second() {
        let (rtc, clock) = fake_rtc();
        let (mut rtc, log) = with_irq_log(rtc);
        write(&mut rtc, REG_B, REG_B_24H | REG_B_UIE);
        for _ in 0..40 {
            clock.advance_ns(NS_PER_SEC / 8);
            rtc.service();
            read(&mut rtc, REG_C); // the guest's handler acknowledges
        }
        assert_eq!(edges(&log), 5);
    }

    #[test]
    fn periodic_interrupt_follows_the_rate_register_a_selects() {
        let rates = [(0x06u8, 1024), (0x0f, 2), (0x03, 8192), (0x01, 256), (0x02, 128)];
        for (rate, hz) in rates {
            let (rtc, clock) = fake_rtc();
            let (mut rtc, log) = with_irq_log(rtc);
            write(&mut rtc, REG_A, REG_A_DV_RUNNING | rate);
            write(&mut rtc, REG_B, REG_B_24H | REG_B_PIE);
            // One second exactly, in steps of a quarter period; the guest acknowledges each
            // interrupt by reading register C, as a handler does.
            let steps = 4 * hz;
            let at = |i: i128| i * NS_PER_SEC / steps;
            for i in 1..=steps {
                clock.advance_ns(at(i) - at(i - 1));
                rtc.service();
                read(&mut rtc, REG_C);
            }
            assert_eq!(edges(&log) as i128, hz, "rate select {rate:#x}");
        }
    }

    #[test]
    fn no_periodic_interrupt_without_pie_or_with_rate_zero() {
        let (rtc, clock) = fake_rtc();
        let (mut rtc, log) = with_irq_log(rtc);
        clock.advance_ns(NS_PER_SEC);
        rtc.service();
        write(&mut rtc, REG_A, REG_A_DV_RUNNING);
        read(&mut rtc, REG_C);
        write(&mut rtc, REG_B, REG_B_24H | REG_B_PIE);
        clock.advance_ns(NS_PER_SEC);
        rtc.service();
        assert_eq!(edges(&log), 0);
        assert_eq!(read(&mut rtc, REG_C) & REG_C_PF, 0);
    }

    #[test]
    fn enabling_an_interrupt_whose_flag_is_pending_raises_it() {
        let (rtc, clock) = fake_rtc();
        let (mut rtc, log) = with_irq_log(rtc);
        clock.advance_ns(NS_PER_SEC);
        rtc.service();
        assert_eq!(edges(&log), 0);
        write(&mut rtc, REG_B, REG_B_24H | REG_B_UIE);
        assert_eq!(edges(&log), 1);
    }

    #[test]
    fn the_timer_thread_raises_the_update_interrupt_and_stops_on_drop() {
        let (mut rtc, log) = with_irq_log(Rtc::new());
        write(&mut rtc, REG_B, REG_B_24H | REG_B_UIE);
        // Waits for the event, not for a time: an update comes within a second.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while edges(&log) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(edges(&log), 1, "IRQ 8 was raised once (register C not read)");
        let shared = Arc::downgrade(&rtc.shared);
        drop(rtc);
        assert!(shared.upgrade().is_none(), "the thread let go of the registers");
    }

    #[test]
    fn a_guest_that_sets_the_year_reads_it_back() {
        let mut rtc = Rtc::new();
        write(&mut rtc, REG_YEAR, 0x31);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x31);
    }

    #[test]
    fn century_byte_is_read_and_set_in_the_data_mode() {
        let (mut rtc, _) = fake_rtc();
        assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
        write(&mut rtc, REG_CENTURY, 0x21);
        assert_eq!((read(&mut rtc, REG_CENTURY), read(&mut rtc, REG_YEAR)), (0x21, 0x26));
        write(&mut rtc, REG_B, REG_B_24H | REG_B_BINARY);
        assert_eq!(read(&mut rtc, REG_CENTURY), 21);
    }

    #[test]
    fn guest_time_follows_the_host_clock_from_the_offset_it_set() {
        let (mut rtc, clock) = fake_rtc();
        write(&mut rtc, REG_HOURS, 0x13); // as Windows sets local time two hours ahead
        clock.advance_ns(3600 * NS_PER_SEC);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x14);
        assert_eq!(rtc.save_state().offset_ns, 2 * 3600 * NS_PER_SEC);
    }

    #[test]
    fn guest_set_clock_flags_and_cmos_survive_a_restore() {
        let (mut rtc, clock) = fake_rtc();
        write(&mut rtc, REG_YEAR, 0x31);
        write(&mut rtc, CMOS_SHUTDOWN_STATUS, 0xfe);
        write(&mut rtc, 0x40, 0xab);
        clock.advance_ns(NS_PER_SEC); // an unread update flag
        rtc.write(0, &[0x80 | REG_C]); // NMI masked, register C selected
        let saved = rtc.save_state();
        let bytes = crate::state::encode("rtc", &saved).unwrap();
        let mut fresh = Rtc::with_clock(clock.clone(), false);
        fresh.restore_state(&crate::state::decode("rtc", &bytes).unwrap()).unwrap();
        assert_eq!(fresh.save_state(), saved);
        assert!(saved.nmi_masked);
        let mut c = [0];
        fresh.read(1, &mut c);
        assert_eq!(c[0], REG_C_UF | REG_C_PF);
        assert_eq!(read(&mut fresh, REG_YEAR), 0x31);
        assert_eq!(read(&mut fresh, CMOS_SHUTDOWN_STATUS), 0xfe);
        assert_eq!(read(&mut fresh, 0x40), 0xab);
    }

    #[test]
    fn an_unacknowledged_interrupt_is_raised_again_after_a_restore() {
        let (rtc, clock) = fake_rtc();
        let (mut rtc, _) = with_irq_log(rtc);
        write(&mut rtc, REG_B, REG_B_24H | REG_B_UIE);
        clock.advance_ns(NS_PER_SEC);
        rtc.service();
        let saved = rtc.save_state();
        assert_eq!(saved.flags & REG_C_IRQF, REG_C_IRQF);
        let (mut fresh, log) = with_irq_log(Rtc::with_clock(clock.clone(), false));
        fresh.restore_state(&saved).unwrap();
        assert_eq!(edges(&log), 1);
        assert_eq!(fresh.save_state(), saved);
    }

    #[test]
    fn a_clock_stopped_by_set_stays_stopped_across_a_restore() {
        let (mut rtc, clock) = fake_rtc();
        write(&mut rtc, REG_B, REG_B_SET | REG_B_24H);
        write(&mut rtc, REG_MINUTES, 0x30);
        let bytes = crate::state::encode("rtc", &rtc.save_state()).unwrap();
        let mut fresh = Rtc::with_clock(clock.clone(), false);
        fresh.restore_state(&crate::state::decode("rtc", &bytes).unwrap()).unwrap();
        clock.advance_ns(10 * NS_PER_SEC);
        assert_eq!((read(&mut fresh, REG_MINUTES), read(&mut fresh, REG_SECONDS)), (0x30, 0x40));
    }

    #[test]
    fn hostile_rtc_state_is_refused_and_the_clock_is_unchanged() {
        let (mut rtc, _) = fake_rtc();
        let before = rtc.save_state();
        let bad = RtcState { nvram: vec![0; 12], ..before.clone() };
        assert!(matches!(rtc.restore_state(&bad), Err(StateError::Invalid { .. })));
        let bad = RtcState { offset_ns: i128::MAX, ..before.clone() };
        assert!(matches!(rtc.restore_state(&bad), Err(StateError::Invalid { .. })));
        let bad = RtcState { frozen_secs: Some(i64::MIN), ..before.clone() };
        assert!(matches!(rtc.restore_state(&bad), Err(StateError::Invalid { .. })));
        assert_eq!(rtc.save_state(), before);
    }

    fn cmos(rtc: &mut Rtc, at: u8, len: u8) -> u64 {
        (0..len).map(|i| u64::from(read(rtc, at + i)) << (8 * i)).sum()
    }

    #[test]
    fn cmos_memory_bytes_describe_the_ram_as_qemu_lays_them_out() {
        const MIB: u64 = 1 << 20;
        // (below 4 GiB, above 4 GiB, CPUs) -> (0x15, 0x17, 0x30, 0x34, 0x5b, 0x5f)
        let cases = [
            ((64 * MIB, 0, 1), (640, 63 * 1024, 63 * 1024, 48 * 16, 0, 0)),
            ((512 * MIB, 0, 2), (640, 0xffff, 0xffff, 496 * 16, 0, 1)),
            (
                (3 * 1024 * MIB, 5 * 1024 * MIB, 4),
                (640, 0xffff, 0xffff, 3056 * 16, 5 * 1024 * 16, 3),
            ),
            ((512 * 1024, 0, 300), (512, 0, 0, 0, 0, 0)),
        ];
        for ((below, above, cpus), want) in cases {
            let (mut rtc, _) = fake_rtc();
            rtc.set_memory_and_cpus(below, above, cpus);
            let got = (
                cmos(&mut rtc, 0x15, 2),
                cmos(&mut rtc, 0x17, 2),
                cmos(&mut rtc, 0x30, 2),
                cmos(&mut rtc, 0x34, 2),
                cmos(&mut rtc, 0x5b, 3),
                cmos(&mut rtc, 0x5f, 1),
            );
            assert_eq!(got, want, "{below:#x} below 4 GiB, {above:#x} above, {cpus} CPUs");
        }
    }

    #[test]
    fn the_index_port_nmi_bit_does_not_change_the_register() {
        let (mut rtc, _) = fake_rtc();
        write(&mut rtc, 0x40, 0x5a);
        rtc.write(0, &[0x80 | 0x40]);
        let mut b = [0];
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
    }
}
