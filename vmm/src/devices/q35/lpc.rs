//! The ICH9 LPC bridge at 00:1f.0 (8086:2918, class 06/01: OVMF's SioBusDxe binds to an ISA
//! bridge with I/O and memory decoding on).
//!
//! ```text
//!  0x40  PMBASE       bits 15:7 base of the 128-port PM block; bit 0 reads 1; reset 0x1
//!  0x44  ACPI_CNTL    bit 7 ACPI_EN (the PM block decodes only while set), bits 2:0 SCI IRQ
//!  0x60  PIRQA–D_ROUT bit 7 IRQEN (1 = not routed), bits 3:0 ISA IRQ; reset 0x80
//!  0x68  PIRQE–H_ROUT as PIRQA–D
//!  0xA0  GEN_PMCON_1  16-bit storage
//!  0xF0  RCBA         bits 31:14 base, bit 0 enable: storage (nobody touches the RCRB)
//! ```
//!
//! Both firmwares write PMBASE = 0x601, ACPI_CNTL = 0x80, PIRQx = 0x0A/0x0B and RCBA =
//! 0xFED1C001. The board learns where the PM block decodes from [`LpcView`] or the hook.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::mch::config_byte;
use super::persist::Ich9LpcState;
use super::{write_overlaps, INTEL_VENDOR_ID, QEMU_SUBSYSTEM_ID, QEMU_SUBSYSTEM_VENDOR_ID};
use crate::pci::{Bdf, PciBar, PciConfiguration, PciDevice, PciHeader};
use crate::state::{self, StateError};

pub const LPC_BDF: Bdf = match Bdf::new(0, 0x1f, 0) {
    Some(bdf) => bdf,
    None => unreachable!(),
};
pub const LPC_DEVICE_ID: u16 = 0x2918;
const LPC_REVISION: u8 = 0x02;
const CLASS_BRIDGE_ISA: u32 = 0x06_01_00;

pub const PMBASE_OFFSET: usize = 0x40;
const PMBASE_REG: usize = PMBASE_OFFSET / 4;
/// Bit 0 (resource type: I/O) is hardwired to 1.
pub const PMBASE_DEFAULT: u32 = 0x1;
pub const PMBASE_ADDRESS_MASK: u32 = 0xff80;
pub const ACPI_CNTL_OFFSET: usize = 0x44;
const ACPI_CNTL_REG: usize = ACPI_CNTL_OFFSET / 4;
pub const ACPI_EN: u8 = 0x80;
const SCI_IRQ_SELECT: u8 = 0x07;
pub const PIRQA_OFFSET: usize = 0x60;
pub const PIRQE_OFFSET: usize = 0x68;
/// Bit 7 set: the PIRQ is not routed to an ISA IRQ.
pub const PIRQ_ROUTE_DISABLED: u8 = 0x80;
const PIRQ_IRQ_MASK: u8 = 0x0f;
const PIRQ_WRITABLE: u32 = 0x8f8f_8f8f;
const PIRQ_DEFAULT: u32 = 0x8080_8080;
pub const GEN_PMCON_1_OFFSET: usize = 0xa0;
pub const RCBA_OFFSET: usize = 0xf0;
const RCBA_WRITABLE: u32 = 0xffff_c001;

const NAME: &str = "ICH9 LPC";

/// Where the PM I/O block decodes: 128 ports from `base`, only while `enabled` (ACPI_EN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmDecode {
    pub base: u16,
    pub enabled: bool,
}

/// Told the new decode whenever PMBASE or ACPI_EN changes it.
pub type PmDecodeHook = Box<dyn FnMut(PmDecode) + Send>;

#[derive(Debug, Default)]
struct Shared {
    /// PMBASE (low 16 bits) and ACPI_CNTL (bits 23:16).
    pm: AtomicU32,
    /// PIRQA..H routing bytes, A in the low byte.
    pirq: AtomicU64,
}

/// What the board reads of the LPC's routing without locking it.
#[derive(Debug, Clone, Default)]
pub struct LpcView(Arc<Shared>);

impl LpcView {
    pub fn pm_decode(&self) -> PmDecode {
        let pm = self.0.pm.load(Ordering::Acquire);
        PmDecode {
            base: (pm & PMBASE_ADDRESS_MASK) as u16,
            enabled: (pm >> 16) as u8 & ACPI_EN != 0,
        }
    }

    /// The GSI the SCI goes to, as ACPI_CNTL selects it; None for a reserved selection.
    pub fn sci_irq(&self) -> Option<u32> {
        match (self.0.pm.load(Ordering::Acquire) >> 16) as u8 & SCI_IRQ_SELECT {
            0 => Some(9),
            1 => Some(10),
            2 => Some(11),
            4 => Some(20),
            5 => Some(21),
            _ => None,
        }
    }

    /// The ISA IRQ PIRQ `index` (0 = A .. 7 = H) is routed to, None while not routed.
    pub fn pirq_route(&self, index: usize) -> Option<u8> {
        let routes = self.0.pirq.load(Ordering::Acquire).to_le_bytes();
        let route = *routes.get(index)?;
        (route & PIRQ_ROUTE_DISABLED == 0).then_some(route & PIRQ_IRQ_MASK)
    }

    /// All eight, PIRQA first.
    pub fn pirq_routes(&self) -> [Option<u8>; 8] {
        std::array::from_fn(|i| self.pirq_route(i))
    }
}

/// The LPC bridge's configuration space.
pub struct Ich9Lpc {
    config: PciConfiguration,
    view: LpcView,
    on_pm_change: PmDecodeHook,
}

/// Header type 0: the PCI root reports function 0 multi-function when 00:1f.x siblings exist.
fn reset_config() -> PciConfiguration {
    let mut config = PciConfiguration::new(PciHeader {
        vendor_id: INTEL_VENDOR_ID,
        device_id: LPC_DEVICE_ID,
        revision: LPC_REVISION,
        class_code: CLASS_BRIDGE_ISA,
        subsystem_vendor_id: QEMU_SUBSYSTEM_VENDOR_ID,
        subsystem_id: QEMU_SUBSYSTEM_ID,
    });
    config.set_reg(PMBASE_REG, PMBASE_DEFAULT);
    config.set_writable_bits(PMBASE_REG, PMBASE_ADDRESS_MASK);
    config.set_writable_bits(ACPI_CNTL_REG, u32::from(ACPI_EN | SCI_IRQ_SELECT));
    for offset in [PIRQA_OFFSET, PIRQE_OFFSET] {
        config.set_reg(offset / 4, PIRQ_DEFAULT);
        config.set_writable_bits(offset / 4, PIRQ_WRITABLE);
    }
    config.set_writable_bits(GEN_PMCON_1_OFFSET / 4, 0xffff);
    config.set_writable_bits(RCBA_OFFSET / 4, RCBA_WRITABLE);
    config
}

impl Ich9Lpc {
    /// `on_pm_change` hears each change of the PM block's decode (see the module's note on
    /// what a hook may lock).
    pub fn new(on_pm_change: PmDecodeHook) -> Self {
        let lpc = Ich9Lpc { config: reset_config(), view: LpcView::default(), on_pm_change };
        lpc.share();
        lpc
    }

    /// A handle on the routing registers for the board to keep.
    pub fn view(&self) -> LpcView {
        self.view.clone()
    }

    pub fn pm_decode(&self) -> PmDecode {
        self.view.pm_decode()
    }

    /// RCBA as the guest last wrote it.
    pub fn rcba(&self) -> u32 {
        self.config.read_reg(RCBA_OFFSET / 4)
    }

    /// Back to the power-on registers (a platform reset): the PM block stops decoding.
    pub fn reset(&mut self) {
        self.config = reset_config();
        self.publish();
    }

    pub fn save(&self) -> Ich9LpcState {
        Ich9LpcState { registers: self.config.registers() }
    }

    /// Puts saved registers back (refused unless they belong to this function) and tells the
    /// hook where the PM block decodes now.
    pub fn restore(&mut self, saved: &Ich9LpcState) -> Result<(), StateError> {
        self.config
            .restore_registers(&saved.registers)
            .map_err(|e| StateError::rejected(NAME, e))?;
        self.publish();
        Ok(())
    }

    fn share(&self) {
        let pmbase = self.config.read_reg(PMBASE_REG) & 0xffff;
        let acpi_cntl = u32::from(config_byte(&self.config, ACPI_CNTL_OFFSET));
        self.view.0.pm.store(acpi_cntl << 16 | pmbase, Ordering::Release);
        let pirq = u64::from(self.config.read_reg(PIRQE_OFFSET / 4)) << 32
            | u64::from(self.config.read_reg(PIRQA_OFFSET / 4));
        self.view.0.pirq.store(pirq, Ordering::Release);
    }

    fn publish(&mut self) {
        let before = self.view.pm_decode();
        self.share();
        let after = self.view.pm_decode();
        if before != after {
            log::debug!("ICH9 LPC: PM block at {:#x}, decoding {}", after.base, after.enabled);
            (self.on_pm_change)(after);
        }
    }
}

impl PciDevice for Ich9Lpc {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        let touches = |start, size| write_overlaps(reg, offset, data.len(), start, size);
        if touches(PMBASE_OFFSET, 8) || touches(PIRQA_OFFSET, 4) || touches(PIRQE_OFFSET, 4) {
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

    type Seen = Arc<Mutex<Vec<PmDecode>>>;

    fn lpc() -> (Ich9Lpc, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        (Ich9Lpc::new(Box::new(move |d| log.lock().unwrap().push(d))), seen)
    }

    fn write(dev: &mut Ich9Lpc, offset: usize, data: &[u8]) {
        dev.write_config_register(offset / 4, (offset % 4) as u64, data);
    }

    fn byte(dev: &mut Ich9Lpc, offset: usize) -> u8 {
        (dev.read_config_register(offset / 4) >> ((offset % 4) * 8)) as u8
    }

    #[test]
    fn identity_is_the_ich9_lpc_isa_bridge() {
        let (mut dev, _) = lpc();
        assert_eq!(dev.read_config_register(0), 0x2918_8086);
        assert_eq!(dev.read_config_register(2), 0x0601_0002, "class 06/01, revision 2");
        assert_eq!(dev.read_config_register(11), 0x1100_1af4);
        assert_eq!(byte(&mut dev, 0x0e), 0, "type 0 (the root adds the multi-function bit)");
    }

    #[test]
    fn command_register_takes_io_and_memory_for_siobusdxe() {
        let (mut dev, _) = lpc();
        assert_eq!(dev.read_config_register(1) & 0xffff, 0);
        write(&mut dev, 0x04, &[0x03]);
        assert_eq!(dev.read_config_register(1) & 0x3, 0x3);
    }

    #[test]
    fn pmbase_resets_to_1_and_takes_only_bits_15_to_7() {
        let (mut dev, seen) = lpc();
        assert_eq!(dev.read_config_register(0x40 / 4), 0x1);
        write(&mut dev, 0x40, &u32::MAX.to_le_bytes());
        assert_eq!(dev.read_config_register(0x40 / 4), 0xff81, "bit 0 reads 1");
        write(&mut dev, 0x40, &0u32.to_le_bytes());
        assert_eq!(dev.read_config_register(0x40 / 4), 0x1);
        assert_eq!(dev.pm_decode(), PmDecode { base: 0, enabled: false });
        assert_eq!(seen.lock().unwrap().len(), 2, "moved there and back");
    }

    #[test]
    fn firmware_pmbase_and_acpi_en_are_reported_in_order() {
        let (mut dev, seen) = lpc();
        let view = dev.view();
        // SeaBIOS / OVMF: PMBASE = 0x600 | 1, then ACPI_CNTL |= ACPI_EN.
        write(&mut dev, 0x40, &0x601u32.to_le_bytes());
        write(&mut dev, 0x44, &[0x80]);
        assert_eq!(
            *seen.lock().unwrap(),
            [PmDecode { base: 0x600, enabled: false }, PmDecode { base: 0x600, enabled: true }]
        );
        assert_eq!(view.pm_decode(), PmDecode { base: 0x600, enabled: true });
        assert_eq!(view.sci_irq(), Some(9));
        // A write that changes nothing is not reported.
        write(&mut dev, 0x44, &[0x80]);
        assert_eq!(seen.lock().unwrap().len(), 2);
        write(&mut dev, 0x40, &0xb001u32.to_le_bytes());
        assert_eq!(seen.lock().unwrap().last(), Some(&PmDecode { base: 0xb000, enabled: true }));
        write(&mut dev, 0x44, &[0x00]);
        assert_eq!(seen.lock().unwrap().last(), Some(&PmDecode { base: 0xb000, enabled: false }));
    }

    #[test]
    fn acpi_cntl_keeps_acpi_en_and_the_sci_select() {
        let (mut dev, _) = lpc();
        assert_eq!(byte(&mut dev, 0x44), 0);
        write(&mut dev, 0x44, &[0xff]);
        assert_eq!(byte(&mut dev, 0x44), 0x87);
        assert_eq!(dev.view().sci_irq(), None, "select 7 is reserved");
        write(&mut dev, 0x44, &[0x82]);
        assert_eq!(dev.view().sci_irq(), Some(11));
    }

    #[test]
    fn pirq_routes_reset_unrouted_and_follow_firmware_writes() {
        let (mut dev, _) = lpc();
        let view = dev.view();
        for offset in [0x60, 0x61, 0x62, 0x63, 0x68, 0x69, 0x6a, 0x6b] {
            assert_eq!(byte(&mut dev, offset), 0x80, "{offset:#x}");
        }
        assert_eq!(view.pirq_routes(), [None; 8]);
        write(&mut dev, 0x60, &[0x0a, 0x0a, 0x0b, 0x0b]);
        write(&mut dev, 0x68, &0x0b0b_0a0au32.to_le_bytes());
        let a = Some(10);
        let b = Some(11);
        assert_eq!(view.pirq_routes(), [a, a, b, b, a, a, b, b]);
        write(&mut dev, 0x6b, &[0xff]);
        assert_eq!(byte(&mut dev, 0x6b), 0x8f, "bits 6:4 are reserved");
        assert_eq!(view.pirq_route(7), None);
        assert_eq!(view.pirq_route(8), None, "there is no PIRQI");
        assert_eq!(byte(&mut dev, 0x64), 0, "0x64..0x67 are not PIRQs");
    }

    #[test]
    fn gen_pmcon_1_and_rcba_are_storage() {
        let (mut dev, _) = lpc();
        assert_eq!(dev.read_config_register(0xa0 / 4), 0);
        assert_eq!(dev.rcba(), 0);
        write(&mut dev, 0xa0, &u32::MAX.to_le_bytes());
        assert_eq!(dev.read_config_register(0xa0 / 4), 0xffff, "GEN_PMCON_1 is 16 bits");
        write(&mut dev, 0xf0, &0xfed1_c001u32.to_le_bytes());
        assert_eq!(dev.rcba(), 0xfed1_c001);
        write(&mut dev, 0xf0, &u32::MAX.to_le_bytes());
        assert_eq!(dev.rcba(), 0xffff_c001, "16 KiB aligned");
    }

    #[test]
    fn reset_stops_the_pm_block_decoding() {
        let (mut dev, seen) = lpc();
        write(&mut dev, 0x40, &0x601u32.to_le_bytes());
        write(&mut dev, 0x44, &[0x80]);
        write(&mut dev, 0x60, &[0x0a]);
        dev.reset();
        assert_eq!(seen.lock().unwrap().last(), Some(&PmDecode { base: 0, enabled: false }));
        assert_eq!(dev.view().pirq_route(0), None);
        assert_eq!(dev.read_config_register(0x40 / 4), 0x1);
    }

    #[test]
    fn hostile_config_writes_never_panic() {
        let (mut dev, _) = lpc();
        for reg in (0..300).chain([usize::MAX / 4, usize::MAX]) {
            for offset in [0u64, 1, 2, 3, 4, 7] {
                for len in [0, 1, 2, 3, 4, 5, 8] {
                    dev.write_config_register(reg, offset, &vec![0xff; len]);
                    dev.read_config_register(reg);
                }
            }
        }
        assert_eq!(dev.read_config_register(0), 0x2918_8086, "identity survives");
        assert_eq!(dev.pm_decode(), PmDecode { base: 0xff80, enabled: true });
    }
}
