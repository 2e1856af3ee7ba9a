//! The ICH9 power-management I/O block, 128 ports the board inserts at PMBASE and gates with
//! ACPI_EN (both from the LPC bridge, [`super::LpcView::pm_decode`]).
//!
//! ```text
//!  +0x00  PM1_STS   16  write 1 to clear; TMR_STS bit 0, PWRBTN_STS bit 8
//!  +0x02  PM1_EN    16  TMR_EN bit 0, PWRBTN_EN bit 8
//!  +0x04  PM1_CNT   32  SCI_EN bit 0 (the guest's), SLP_TYP 12:10, SLP_EN 13 (S5: off)
//!  +0x08  PM1_TMR   32  3.579545 MHz, 24 bits, read-only
//!  +0x20  GPE0_STS  8 bytes, write 1 to clear
//!  +0x28  GPE0_EN   8 bytes
//!  +0x30  SMI_EN    32  resets to 0x20 (APMC_EN): SeaBIOS's bios-256k.bin then skips its SMM
//!                       set-up, which would spin forever on a machine without SMM (§3.4)
//!  +0x34  SMI_STS   32  write 1 to clear (nothing sets it: there is no SMM)
//! ```
//!
//! The PM1 registers and the timer are [`crate::devices::acpi_pm::pm1`]'s, shared with the
//! kernel-boot PC's block. The SCI is level-triggered: high while an enabled PM1 or GPE0
//! status bit is set. TMR_STS (bit 23 of the count toggled since it was last cleared) is
//! computed when read, so with no thread its SCI is raised on the next access, not on time;
//! guests leave TMR_EN off (Linux does).

use std::sync::Arc;

use super::persist::Ich9PmState;
use crate::devices::acpi_pm::pm1::{
    gather_write, le16, le32, read_block, HostClock, MonotonicClock, Pm1Registers, PmTimer,
    SleepRequest, PM_TIMER_MASK,
};
use crate::devices::bus::BusDevice;
use crate::hypervisor::InterruptSink;
use crate::state::StateError;

pub const PM_BLOCK_LEN: u64 = 128;
const LEN: usize = PM_BLOCK_LEN as usize;
const PM1_STS: usize = 0x00;
const PM1_EN: usize = 0x02;
const PM1_CNT: usize = 0x04;
const PM1_TMR: usize = 0x08;
const GPE0_STS: usize = 0x20;
const GPE0_EN: usize = 0x28;
const GPE0_HALF: usize = 8;
const SMI_EN: usize = 0x30;
const SMI_STS: usize = 0x34;

pub const TMR_STS: u16 = 1 << 0;
/// SMI_EN's APMC_EN: set at reset, as QEMU does without SMM.
pub const SMI_EN_APMC_EN: u32 = 1 << 5;
pub const SMI_EN_DEFAULT: u32 = SMI_EN_APMC_EN;
/// The SLP_TYP of `_S5` on Q35 (QEMU's DSDT, and what OVMF's ResetShutdown writes).
pub const Q35_S5_SLEEP_TYPE: u8 = 0;
/// Bit 23: its toggling is the timer's "overflow" TMR_STS reports.
const TMR_CARRY_SHIFT: u32 = 23;

/// The ICH9 PM block.
pub struct Ich9Pm {
    irq: Arc<dyn InterruptSink>,
    sci_gsi: u32,
    on_poweroff: Box<dyn Fn() + Send>,
    pm1: Pm1Registers,
    timer: PmTimer,
    /// TMR_STS was set when the state was saved (and not cleared since).
    tmr_latched: bool,
    /// Count >> 23 when TMR_STS was last cleared.
    tmr_epoch: u128,
    gpe_status: [u8; GPE0_HALF],
    gpe_enable: [u8; GPE0_HALF],
    smi_en: u32,
    smi_sts: u32,
    /// Whether ACPI_EN is on (and PMBASE is where the board inserted the block).
    decoding: bool,
    sci_level: bool,
}

impl Ich9Pm {
    /// `on_poweroff` runs on the vCPU thread whose PM1_CNT write enters S5; the SCI goes to
    /// `sci_gsi` (9, as the FADT says).
    pub fn new(
        irq: Arc<dyn InterruptSink>,
        sci_gsi: u32,
        on_poweroff: Box<dyn Fn() + Send>,
    ) -> Self {
        Self::with_clock(irq, sci_gsi, on_poweroff, Arc::new(HostClock::new()))
    }

    /// As [`Ich9Pm::new`], with the timer on `clock`.
    pub fn with_clock(
        irq: Arc<dyn InterruptSink>,
        sci_gsi: u32,
        on_poweroff: Box<dyn Fn() + Send>,
        clock: Arc<dyn MonotonicClock>,
    ) -> Self {
        Ich9Pm {
            irq,
            sci_gsi,
            on_poweroff,
            pm1: Pm1Registers::new(Q35_S5_SLEEP_TYPE, false),
            timer: PmTimer::new(clock),
            tmr_latched: false,
            tmr_epoch: 0,
            gpe_status: [0; GPE0_HALF],
            gpe_enable: [0; GPE0_HALF],
            smi_en: SMI_EN_DEFAULT,
            smi_sts: 0,
            decoding: false,
            sci_level: false,
        }
    }

    /// Gates the block: while off (ACPI_EN clear at reset) reads are all-ones and writes are
    /// dropped, as for unassigned ports. The board calls it from the LPC's hook.
    pub fn set_decoding(&mut self, on: bool) {
        self.decoding = on;
    }

    pub fn decoding(&self) -> bool {
        self.decoding
    }

    /// The host pressed the power button: latch PWRBTN_STS; SCI fires if the guest enabled it.
    pub fn press_power_button(&mut self) {
        self.pm1.status |= crate::devices::acpi_pm::PWRBTN;
        self.update_sci();
    }

    /// Sets GPE0 status bit `bit` (0..64), for a device that signals a general-purpose event.
    pub fn raise_gpe(&mut self, bit: usize) {
        if let Some(byte) = self.gpe_status.get_mut(bit / 8) {
            *byte |= 1 << (bit % 8);
        }
        self.update_sci();
    }

    /// Back to the power-on registers (a platform reset); the timer restarts at 0, decoding
    /// stays as the board set it (the LPC's reset tells it).
    pub fn reset(&mut self) {
        self.pm1.reset();
        self.timer.reset();
        self.tmr_latched = false;
        self.tmr_epoch = 0;
        self.gpe_status = [0; GPE0_HALF];
        self.gpe_enable = [0; GPE0_HALF];
        self.smi_en = SMI_EN_DEFAULT;
        self.smi_sts = 0;
        self.update_sci();
    }

    fn tmr_sts(&self) -> bool {
        self.tmr_latched || self.timer.ticks() >> TMR_CARRY_SHIFT != self.tmr_epoch
    }

    fn pm1_status(&self) -> u16 {
        self.pm1.status | if self.tmr_sts() { TMR_STS } else { 0 }
    }

    fn clear_tmr_sts(&mut self) {
        self.tmr_latched = false;
        self.tmr_epoch = self.timer.ticks() >> TMR_CARRY_SHIFT;
    }

    fn sci_wanted(&self) -> bool {
        let gpe = self.gpe_status.iter().zip(&self.gpe_enable).any(|(s, e)| s & e != 0);
        self.pm1_status() & self.pm1.enable != 0 || gpe
    }

    fn update_sci(&mut self) {
        let level = self.sci_wanted();
        if level == self.sci_level {
            return;
        }
        self.sci_level = level;
        if let Err(e) = self.irq.set_irq_line(self.sci_gsi, level) {
            log::error!("ICH9 PM: could not set SCI line to {level}: {e}");
        }
    }

    fn registers(&self) -> [u8; LEN] {
        let mut regs = [0u8; LEN];
        let mut put = |at: usize, bytes: &[u8]| regs[at..at + bytes.len()].copy_from_slice(bytes);
        put(PM1_STS, &self.pm1_status().to_le_bytes());
        put(PM1_EN, &self.pm1.enable.to_le_bytes());
        put(PM1_CNT, &u32::from(self.pm1.control_read()).to_le_bytes());
        put(PM1_TMR, &self.timer.value().to_le_bytes());
        put(GPE0_STS, &self.gpe_status);
        put(GPE0_EN, &self.gpe_enable);
        put(SMI_EN, &self.smi_en.to_le_bytes());
        put(SMI_STS, &self.smi_sts.to_le_bytes());
        regs
    }

    pub fn save(&self) -> Ich9PmState {
        Ich9PmState {
            status: self.pm1.status,
            enable: self.pm1.enable,
            control: self.pm1.control,
            timer_ticks: self.timer.saved_ticks(),
            tmr_sts: self.tmr_sts(),
            gpe_status: self.gpe_status,
            gpe_enable: self.gpe_enable,
            smi_en: self.smi_en,
            smi_sts: self.smi_sts,
        }
    }

    /// Puts the registers back, the timer counting on from the saved count, and drives the
    /// SCI line to what they say. Decoding is the board's (from the LPC) and stays as it is.
    pub fn restore(&mut self, saved: &Ich9PmState) -> Result<(), StateError> {
        if saved.timer_ticks > u64::from(PM_TIMER_MASK) {
            return Err(StateError::invalid("ICH9 PM", "timer count wider than 24 bits"));
        }
        self.pm1.status = saved.status & !TMR_STS;
        self.pm1.enable = saved.enable;
        self.pm1.control = self.pm1.storable_control(saved.control);
        self.timer.continue_from(saved.timer_ticks);
        self.tmr_latched = saved.tmr_sts;
        self.tmr_epoch = self.timer.ticks() >> TMR_CARRY_SHIFT;
        self.gpe_status = saved.gpe_status;
        self.gpe_enable = saved.gpe_enable;
        self.smi_en = saved.smi_en;
        self.smi_sts = saved.smi_sts;
        // Force the line to be driven: a fresh device's notion of it may not match.
        self.sci_level = !self.sci_wanted();
        self.update_sci();
        Ok(())
    }
}

impl BusDevice for Ich9Pm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !self.decoding {
            data.fill(0xff);
            return;
        }
        read_block(&self.registers(), offset, data, 0);
        self.update_sci();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !self.decoding {
            return;
        }
        let (value, mask) = gather_write::<LEN>(offset, data);
        let status_clear = le16(&value, PM1_STS) & le16(&mask, PM1_STS);
        if status_clear & TMR_STS != 0 {
            self.clear_tmr_sts();
        }
        self.pm1.write_status(status_clear, 0xffff);
        self.pm1.write_enable(le16(&value, PM1_EN), le16(&mask, PM1_EN));
        // PM1_CNT is 32 bits wide; only its low half has bits.
        let control_mask = le16(&mask, PM1_CNT);
        if control_mask != 0 {
            match self.pm1.write_control(le16(&value, PM1_CNT), control_mask) {
                Some(SleepRequest::PowerOff) => {
                    log::info!("ICH9 PM: guest entered S5 (soft off)");
                    (self.on_poweroff)();
                }
                Some(SleepRequest::Unsupported(sleep_type)) => {
                    log::warn!("ICH9 PM: guest asked for unsupported sleep type {sleep_type}");
                }
                None => {}
            }
        }
        for i in 0..GPE0_HALF {
            self.gpe_status[i] &= !(value[GPE0_STS + i] & mask[GPE0_STS + i]);
            let m = mask[GPE0_EN + i];
            self.gpe_enable[i] = (self.gpe_enable[i] & !m) | (value[GPE0_EN + i] & m);
        }
        let m = le32(&mask, SMI_EN);
        self.smi_en = (self.smi_en & !m) | (le32(&value, SMI_EN) & m);
        self.smi_sts &= !(le32(&value, SMI_STS) & le32(&mask, SMI_STS));
        // The timer and reserved bytes ignore writes.
        self.update_sci();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::devices::acpi_pm::pm1::ManualClock;
    use crate::devices::acpi_pm::{PWRBTN, SCI_EN, SLP_EN, SLP_TYP_SHIFT};
    use crate::testing::IrqLog;

    struct Rig {
        pm: Ich9Pm,
        irq: Arc<IrqLog>,
        clock: Arc<ManualClock>,
        poweroffs: Arc<AtomicUsize>,
    }

    fn rig() -> Rig {
        let irq = Arc::new(IrqLog::default());
        let clock = Arc::new(ManualClock::default());
        let poweroffs = Arc::new(AtomicUsize::new(0));
        let counter = poweroffs.clone();
        let on_poweroff = Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let mut pm = Ich9Pm::with_clock(irq.clone(), 9, on_poweroff, clock.clone());
        pm.set_decoding(true);
        Rig { pm, irq, clock, poweroffs }
    }

    fn read<const N: usize>(pm: &mut Ich9Pm, offset: usize) -> [u8; N] {
        let mut b = [0u8; N];
        pm.read(offset as u64, &mut b);
        b
    }

    fn read16(pm: &mut Ich9Pm, offset: usize) -> u16 {
        u16::from_le_bytes(read(pm, offset))
    }

    fn read32(pm: &mut Ich9Pm, offset: usize) -> u32 {
        u32::from_le_bytes(read(pm, offset))
    }

    #[test]
    fn registers_reset_like_qemu_without_smm() {
        let mut r = rig();
        assert_eq!(read16(&mut r.pm, PM1_STS), 0);
        assert_eq!(read16(&mut r.pm, PM1_EN), 0);
        assert_eq!(read32(&mut r.pm, PM1_CNT), 0, "SCI_EN is the guest's to set");
        assert_eq!(read::<16>(&mut r.pm, GPE0_STS), [0; 16]);
        assert_eq!(read32(&mut r.pm, SMI_EN), 0x20, "APMC_EN disarms SeaBIOS's SMM set-up");
        assert_eq!(read32(&mut r.pm, SMI_STS), 0);
    }

    #[test]
    fn smi_en_resets_to_0x20_after_the_guest_changed_it() {
        let mut r = rig();
        r.pm.write(SMI_EN as u64, &0u32.to_le_bytes());
        assert_eq!(read32(&mut r.pm, SMI_EN), 0);
        r.pm.write(SMI_EN as u64 + 1, &[0x20]);
        assert_eq!(read32(&mut r.pm, SMI_EN), 0x2000, "byte-wise");
        r.pm.reset();
        assert_eq!(read32(&mut r.pm, SMI_EN), 0x20);
    }

    #[test]
    fn without_acpi_en_the_block_reads_all_ones_and_ignores_writes() {
        let mut r = rig();
        r.pm.set_decoding(false);
        assert_eq!(read32(&mut r.pm, SMI_EN), u32::MAX);
        r.pm.write(PM1_CNT as u64, &SLP_EN.to_le_bytes());
        r.pm.write(SMI_EN as u64, &0u32.to_le_bytes());
        assert_eq!(r.poweroffs.load(Ordering::SeqCst), 0);
        r.pm.set_decoding(true);
        assert_eq!(read32(&mut r.pm, SMI_EN), 0x20, "the write did not land");
    }

    #[test]
    fn pm1_status_is_write_one_to_clear_and_drives_the_sci() {
        let mut r = rig();
        r.pm.write(PM1_EN as u64, &PWRBTN.to_le_bytes());
        r.pm.press_power_button();
        assert_eq!(read16(&mut r.pm, PM1_STS), PWRBTN);
        assert_eq!(r.irq.lines(), [(9, true)]);
        r.pm.write(PM1_STS as u64, &0u16.to_le_bytes());
        assert_eq!(read16(&mut r.pm, PM1_STS), PWRBTN, "writing 0 clears nothing");
        r.pm.write(PM1_STS as u64 + 1, &[0x01]);
        assert_eq!(read16(&mut r.pm, PM1_STS), 0);
        assert_eq!(r.irq.lines(), [(9, true), (9, false)]);
    }

    #[test]
    fn slp_en_with_slp_typ_0_powers_off() {
        let mut r = rig();
        // OVMF's ResetShutdown: SLP_TYP = 0, then SLP_EN, keeping SCI_EN.
        r.pm.write(PM1_CNT as u64, &SCI_EN.to_le_bytes());
        r.pm.write(PM1_CNT as u64, &(SCI_EN | SLP_EN).to_le_bytes());
        assert_eq!(r.poweroffs.load(Ordering::SeqCst), 1);
        assert_eq!(read16(&mut r.pm, PM1_CNT), SCI_EN, "SLP_EN is write-only");
        r.pm.write(PM1_CNT as u64, &((1 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        assert_eq!(r.poweroffs.load(Ordering::SeqCst), 1, "S1 is not implemented");
        r.pm.write(PM1_CNT as u64 + 1, &[(SLP_EN >> 8) as u8]);
        assert_eq!(r.poweroffs.load(Ordering::SeqCst), 2, "a byte write at +5 with SLP_TYP 0");
    }

    #[test]
    fn pm_timer_runs_at_3_58_mhz_on_the_clock_and_ignores_writes() {
        let mut r = rig();
        let t0 = read32(&mut r.pm, PM1_TMR);
        r.clock.advance(Duration::from_millis(10));
        r.pm.write(PM1_TMR as u64, &[0; 4]);
        let t1 = read32(&mut r.pm, PM1_TMR);
        assert_eq!(t1 - t0, 35_795);
        let mut last = t1;
        for _ in 0..100 {
            r.clock.advance(Duration::from_micros(7));
            let t = read32(&mut r.pm, PM1_TMR);
            assert!(t > last, "monotonic: {t} after {last}");
            last = t;
        }
        r.clock.advance(Duration::from_secs(5));
        assert!(read32(&mut r.pm, PM1_TMR) <= 0x00ff_ffff, "24 bits");
    }

    #[test]
    fn tmr_sts_sets_when_bit_23_toggles_and_clears_by_writing_1() {
        let mut r = rig();
        assert_eq!(read16(&mut r.pm, PM1_STS) & TMR_STS, 0);
        // 2^23 ticks at 3.579545 MHz: 2.34 s.
        r.clock.advance(Duration::from_millis(2344));
        assert_eq!(read16(&mut r.pm, PM1_STS) & TMR_STS, TMR_STS);
        r.pm.write(PM1_EN as u64, &TMR_STS.to_le_bytes());
        assert_eq!(r.irq.lines(), [(9, true)], "TMR_EN raises the SCI on access");
        r.pm.write(PM1_STS as u64, &TMR_STS.to_le_bytes());
        assert_eq!(read16(&mut r.pm, PM1_STS) & TMR_STS, 0);
        assert_eq!(r.irq.lines(), [(9, true), (9, false)]);
    }

    #[test]
    fn gpe0_status_is_write_one_to_clear_and_enabled_events_raise_the_sci() {
        let mut r = rig();
        r.pm.raise_gpe(9);
        assert!(r.irq.lines().is_empty(), "not enabled");
        assert_eq!(read::<2>(&mut r.pm, GPE0_STS), [0, 0x02]);
        r.pm.write(GPE0_EN as u64 + 1, &[0x02]);
        assert_eq!(r.irq.lines(), [(9, true)]);
        r.pm.write(GPE0_STS as u64, &0xffffu16.to_le_bytes());
        assert_eq!(read::<2>(&mut r.pm, GPE0_STS), [0, 0]);
        assert_eq!(read::<2>(&mut r.pm, GPE0_EN), [0, 0x02]);
        assert_eq!(r.irq.lines(), [(9, true), (9, false)]);
        r.pm.raise_gpe(64);
        assert_eq!(read::<8>(&mut r.pm, GPE0_STS), [0; 8], "beyond GPE0: ignored");
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let mut r = rig();
        for offset in (0..140).chain([u64::MAX - 2, u64::MAX]) {
            for len in [1, 2, 3, 4, 8] {
                let mut data = vec![0xff; len];
                r.pm.read(offset, &mut data);
                r.pm.write(offset, &data);
            }
        }
        assert!(read32(&mut r.pm, PM1_TMR) <= 0x00ff_ffff, "still serving");
    }
}
