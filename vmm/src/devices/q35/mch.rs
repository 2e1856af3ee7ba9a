//! The Q35 memory controller hub's PCI function, the host bridge at 00:00.0 (8086:29C0).
//!
//! ```text
//!  0x60  PCIEXBAR low   bit 0 enable, bits 2:1 length (00 256 MiB, 01 128, 10 64, 11 none),
//!                       bits 31:26 base (bits 27:26 only with the shorter lengths)
//!  0x64  PCIEXBAR high  bits 35:32 of the base
//!  0x90  PAM0..PAM6     0x90–0x96: BIOS-area attributes, storage (PAM0 only bits 5:4)
//!  0x9D  SMRAM          reset 0x02 (C_BASE_SEG hardwired), D_OPEN/D_CLS/D_LCK/G_SMRAME
//!  0x9E  ESMRAMC        reset 0x38, H_SMRAME/TSEG_SZ/T_EN writable
//! ```
//!
//! OVMF and SeaBIOS both write PCIEXBAR = 0xB000_0001 (256 MiB at 0xB000_0000) and then use
//! ECAM; the board learns where to decode it from [`EcamDecode`] or the change hook. Without
//! SMM the SMRAM registers are plain storage, as are the PAMs (0xC0000–0xFFFFF stays RAM).
//! OVMF's non-SMM path reads neither TOLUD nor TSEG (FIRMWARE.md §2.4), so they are absent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{write_overlaps, INTEL_VENDOR_ID, QEMU_SUBSYSTEM_ID, QEMU_SUBSYSTEM_VENDOR_ID};
use crate::pci::config::CLASS_BRIDGE_HOST;
use crate::pci::{Bdf, PciBar, PciConfiguration, PciDevice, PciHeader};
use crate::state::{self, StateError};

use super::persist::MchState;

pub const MCH_BDF: Bdf = match Bdf::new(0, 0, 0) {
    Some(bdf) => bdf,
    None => unreachable!(),
};
pub const MCH_DEVICE_ID: u16 = 0x29c0;

pub const PCIEXBAR_OFFSET: usize = 0x60;
const PCIEXBAR_REG: usize = PCIEXBAR_OFFSET / 4;
/// What QEMU resets PCIEXBAR to: the base both firmwares use, not yet enabled.
pub const PCIEXBAR_DEFAULT: u64 = 0xb000_0000;
pub const PCIEXBAR_ENABLE: u64 = 1;
const PCIEXBAR_LENGTH_SHIFT: u32 = 1;
/// Writable bits: enable, length and base bits 35:26.
const PCIEXBAR_LOW_WRITABLE: u32 = 0xfc00_0007;
const PCIEXBAR_HIGH_WRITABLE: u32 = 0x0000_000f;

pub const PAM0_OFFSET: usize = 0x90;
pub const PAM_COUNT: usize = 7;
/// PAM0 has only the high nibble (0xF0000–0xFFFFF); PAM1–6 cover two 16 KiB areas each.
const PAM0_WRITABLE: u8 = 0x30;
const PAM_WRITABLE: u8 = 0x33;

pub const SMRAM_OFFSET: usize = 0x9d;
pub const SMRAM_DEFAULT: u8 = 0x02;
const SMRAM_WRITABLE: u8 = 0x78;
pub const ESMRAMC_OFFSET: usize = 0x9e;
pub const ESMRAMC_DEFAULT: u8 = 0x38;
const ESMRAMC_WRITABLE: u8 = 0x47;

const NAME: &str = "Q35 MCH";

/// Where ECAM is decoded: `size` bytes (1 MiB per bus) from `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EcamWindow {
    pub base: u64,
    pub size: u64,
}

impl EcamWindow {
    /// What a PCIEXBAR value asks for; None while disabled or with the reserved length.
    pub fn from_pciexbar(pciexbar: u64) -> Option<EcamWindow> {
        if pciexbar & PCIEXBAR_ENABLE == 0 {
            return None;
        }
        let (size, base_mask) = match (pciexbar >> PCIEXBAR_LENGTH_SHIFT) & 0x3 {
            0 => (256 << 20, 0xf_f000_0000),
            1 => (128 << 20, 0xf_f800_0000),
            2 => (64 << 20, 0xf_fc00_0000),
            _ => return None,
        };
        Some(EcamWindow { base: pciexbar & base_mask, size })
    }

    /// The buses the window covers.
    pub fn bus_count(&self) -> u16 {
        (self.size >> 20) as u16
    }
}

/// The PCIEXBAR value the MCH holds, shared with the board (which keeps a clone for its ECAM
/// dispatch) without locking the MCH.
#[derive(Debug, Clone, Default)]
pub struct EcamDecode(Arc<AtomicU64>);

impl EcamDecode {
    pub fn window(&self) -> Option<EcamWindow> {
        EcamWindow::from_pciexbar(self.0.load(Ordering::Acquire))
    }

    fn store(&self, pciexbar: u64) {
        self.0.store(pciexbar, Ordering::Release);
    }
}

/// Told the new window whenever what PCIEXBAR decodes changes.
pub type EcamHook = Box<dyn FnMut(Option<EcamWindow>) + Send>;

/// The MCH host bridge.
pub struct Mch {
    config: PciConfiguration,
    decode: EcamDecode,
    on_ecam_change: EcamHook,
}

fn reset_config() -> PciConfiguration {
    let mut config = PciConfiguration::new(PciHeader {
        vendor_id: INTEL_VENDOR_ID,
        device_id: MCH_DEVICE_ID,
        revision: 0,
        class_code: CLASS_BRIDGE_HOST,
        subsystem_vendor_id: QEMU_SUBSYSTEM_VENDOR_ID,
        subsystem_id: QEMU_SUBSYSTEM_ID,
    });
    config.set_reg(PCIEXBAR_REG, PCIEXBAR_DEFAULT as u32);
    config.set_reg(PCIEXBAR_REG + 1, (PCIEXBAR_DEFAULT >> 32) as u32);
    config.set_writable_bits(PCIEXBAR_REG, PCIEXBAR_LOW_WRITABLE);
    config.set_writable_bits(PCIEXBAR_REG + 1, PCIEXBAR_HIGH_WRITABLE);
    let mut byte_masks = [0u8; 0x100];
    byte_masks[PAM0_OFFSET] = PAM0_WRITABLE;
    byte_masks[PAM0_OFFSET + 1..PAM0_OFFSET + PAM_COUNT].fill(PAM_WRITABLE);
    byte_masks[SMRAM_OFFSET] = SMRAM_WRITABLE;
    byte_masks[ESMRAMC_OFFSET] = ESMRAMC_WRITABLE;
    for (reg, mask) in byte_masks.chunks_exact(4).enumerate() {
        let mask = u32::from_le_bytes([mask[0], mask[1], mask[2], mask[3]]);
        if mask != 0 {
            config.set_writable_bits(reg, mask);
        }
    }
    let smram_reg = SMRAM_OFFSET / 4;
    let defaults = u32::from(SMRAM_DEFAULT) << ((SMRAM_OFFSET % 4) * 8)
        | u32::from(ESMRAMC_DEFAULT) << ((ESMRAMC_OFFSET % 4) * 8);
    config.set_reg(smram_reg, config.read_reg(smram_reg) | defaults);
    config
}

impl Mch {
    /// `on_ecam_change` is told each change of the decoded window (see the module's note on
    /// what a hook may lock).
    pub fn new(on_ecam_change: EcamHook) -> Self {
        let config = reset_config();
        let decode = EcamDecode::default();
        decode.store(pciexbar(&config));
        Mch { config, decode, on_ecam_change }
    }

    /// A handle on the decoded window for the board to keep.
    pub fn ecam_decode(&self) -> EcamDecode {
        self.decode.clone()
    }

    pub fn ecam_window(&self) -> Option<EcamWindow> {
        self.decode.window()
    }

    /// PAM0..PAM6 as the guest last wrote them.
    pub fn pam(&self) -> [u8; PAM_COUNT] {
        let mut pam = [0u8; PAM_COUNT];
        for (i, b) in pam.iter_mut().enumerate() {
            *b = config_byte(&self.config, PAM0_OFFSET + i);
        }
        pam
    }

    /// Back to the power-on registers (a platform reset); the hook hears of a window that
    /// goes away.
    pub fn reset(&mut self) {
        self.config = reset_config();
        self.publish();
    }

    /// Shares the PCIEXBAR value and tells the hook if the window changed.
    fn publish(&mut self) {
        let before = self.decode.window();
        self.decode.store(pciexbar(&self.config));
        let after = self.decode.window();
        if before != after {
            match after {
                Some(w) => log::debug!("MCH: ECAM at {:#x}+{:#x}", w.base, w.size),
                None => log::debug!("MCH: ECAM off"),
            }
            (self.on_ecam_change)(after);
        }
    }

    pub fn save(&self) -> MchState {
        MchState { registers: self.config.registers() }
    }

    /// Puts saved registers back (refused unless they belong to this function) and publishes
    /// the window they decode.
    pub fn restore(&mut self, saved: &MchState) -> Result<(), StateError> {
        self.config
            .restore_registers(&saved.registers)
            .map_err(|e| StateError::rejected(NAME, e))?;
        self.publish();
        Ok(())
    }
}

fn pciexbar(config: &PciConfiguration) -> u64 {
    u64::from(config.read_reg(PCIEXBAR_REG + 1)) << 32 | u64::from(config.read_reg(PCIEXBAR_REG))
}

pub(super) fn config_byte(config: &PciConfiguration, offset: usize) -> u8 {
    (config.read_reg(offset / 4) >> ((offset % 4) * 8)) as u8
}

impl PciDevice for Mch {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        if write_overlaps(reg, offset, data.len(), PCIEXBAR_OFFSET, 8) {
            self.publish();
        }
    }

    fn bars(&self) -> Vec<PciBar> {
        Vec::new()
    }

    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        state::encode(NAME, &self.save())
    }

    fn restore_state(&mut self, saved: &[u8]) -> Result<(), StateError> {
        self.restore(&state::decode(NAME, saved)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::Mutex;

    use super::*;

    type Seen = Arc<Mutex<Vec<Option<EcamWindow>>>>;

    pub(crate) fn mch() -> (Mch, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        (Mch::new(Box::new(move |w| log.lock().unwrap().push(w))), seen)
    }

    fn write32(dev: &mut Mch, offset: usize, value: u32) {
        dev.write_config_register(offset / 4, 0, &value.to_le_bytes());
    }

    fn byte(dev: &mut Mch, offset: usize) -> u8 {
        (dev.read_config_register(offset / 4) >> ((offset % 4) * 8)) as u8
    }

    #[test]
    fn identity_is_the_q35_mch_with_qemus_subsystem() {
        let (mut dev, _) = mch();
        assert_eq!(dev.read_config_register(0), 0x29c0_8086);
        assert_eq!(dev.read_config_register(2) >> 8, 0x06_00_00, "host bridge class");
        assert_eq!(dev.read_config_register(11), 0x1100_1af4);
        assert_eq!(dev.read_config_register(3) & 0x00ff_0000, 0, "single function, type 0");
    }

    #[test]
    fn pciexbar_resets_to_the_firmware_base_disabled() {
        let (mut dev, seen) = mch();
        assert_eq!(dev.read_config_register(0x60 / 4), 0xb000_0000);
        assert_eq!(dev.read_config_register(0x64 / 4), 0);
        assert_eq!(dev.ecam_window(), None);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn firmware_sequence_enables_256_mib_ecam_at_0xb0000000_through_the_hook() {
        let (mut dev, seen) = mch();
        let decode = dev.ecam_decode();
        // OVMF's PciExBarInitialization: low 0, high 0, then base | enable.
        write32(&mut dev, 0x60, 0);
        write32(&mut dev, 0x64, 0);
        write32(&mut dev, 0x60, 0xb000_0001);
        let window = EcamWindow { base: 0xb000_0000, size: 256 << 20 };
        assert_eq!(dev.ecam_window(), Some(window));
        assert_eq!(decode.window(), Some(window), "the board's handle sees it too");
        assert_eq!(window.bus_count(), 256);
        assert_eq!(*seen.lock().unwrap(), [Some(window)], "told once, when it changed");
        write32(&mut dev, 0x60, 0xb000_0000);
        assert_eq!(dev.ecam_window(), None);
        assert_eq!(seen.lock().unwrap().last(), Some(&None), "disabling is reported");
    }

    #[test]
    fn pciexbar_length_bits_and_high_base_select_the_window() {
        let (mut dev, _) = mch();
        write32(&mut dev, 0x64, 0xffff_ffff);
        assert_eq!(dev.read_config_register(0x64 / 4), 0xf, "bits 35:32 only");
        write32(&mut dev, 0x60, 0xffff_ffff);
        assert_eq!(dev.read_config_register(0x60 / 4), 0xfc00_0007, "reserved bits stay 0");
        assert_eq!(dev.ecam_window(), None, "length 11 is reserved");
        write32(&mut dev, 0x60, 0xe800_0003);
        assert_eq!(
            dev.ecam_window(),
            Some(EcamWindow { base: 0xf_e800_0000, size: 128 << 20 }),
            "128 MiB keeps base bit 27"
        );
        write32(&mut dev, 0x60, 0xe400_0005);
        assert_eq!(dev.ecam_window(), Some(EcamWindow { base: 0xf_e400_0000, size: 64 << 20 }));
        write32(&mut dev, 0x60, 0xec00_0001);
        assert_eq!(
            dev.ecam_window(),
            Some(EcamWindow { base: 0xf_e000_0000, size: 256 << 20 }),
            "256 MiB ignores base bits 27:26"
        );
    }

    #[test]
    fn byte_writes_to_pciexbar_are_reported_too() {
        let (mut dev, seen) = mch();
        dev.write_config_register(0x60 / 4, 0, &[0x01]);
        assert_eq!(dev.ecam_window(), Some(EcamWindow { base: 0xb000_0000, size: 256 << 20 }));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn pam_registers_reset_to_0_and_store_their_attribute_bits() {
        let (mut dev, _) = mch();
        assert_eq!(dev.pam(), [0; 7]);
        for i in 0..7 {
            dev.write_config_register((0x90 + i) / 4, ((0x90 + i) % 4) as u64, &[0xff]);
        }
        assert_eq!(dev.pam(), [0x30, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33]);
        // QemuVideoDxe's VbeShim: PAM1 |= 3, then (& !2) | 1.
        dev.write_config_register(0x91 / 4, 1, &[0x31]);
        assert_eq!(dev.pam()[1], 0x31);
        assert_eq!(byte(&mut dev, 0x97), 0, "0x97 is not a PAM");
    }

    #[test]
    fn smram_and_esmramc_reset_like_qemu_and_keep_their_writable_bits() {
        let (mut dev, _) = mch();
        assert_eq!(byte(&mut dev, 0x9d), 0x02);
        assert_eq!(byte(&mut dev, 0x9e), 0x38);
        dev.write_config_register(0x9c / 4, 1, &[0xff, 0xff]);
        assert_eq!(byte(&mut dev, 0x9d), 0x7a, "C_BASE_SEG stays 010");
        assert_eq!(byte(&mut dev, 0x9e), 0x7f);
        dev.write_config_register(0x9c / 4, 1, &[0x00, 0x00]);
        assert_eq!(byte(&mut dev, 0x9d), 0x02);
        assert_eq!(byte(&mut dev, 0x9e), 0x38, "the cache bits are read-only");
    }

    #[test]
    fn reset_restores_power_on_values_and_reports_ecam_off() {
        let (mut dev, seen) = mch();
        write32(&mut dev, 0x60, 0xc000_0001);
        dev.write_config_register(0x90 / 4, 1, &[0x33]);
        dev.reset();
        assert_eq!(dev.read_config_register(0x60 / 4), 0xb000_0000);
        assert_eq!(dev.pam(), [0; 7]);
        assert_eq!(seen.lock().unwrap().last(), Some(&None));
    }

    #[test]
    fn hostile_config_writes_never_panic() {
        let (mut dev, _) = mch();
        for reg in (0..300).chain([usize::MAX / 4, usize::MAX]) {
            for offset in [0u64, 1, 2, 3, 4, 7] {
                for len in [0, 1, 2, 3, 4, 5, 8] {
                    dev.write_config_register(reg, offset, &vec![0xff; len]);
                    dev.read_config_register(reg);
                }
            }
        }
        assert_eq!(dev.read_config_register(0), 0x29c0_8086, "identity survives");
    }
}
