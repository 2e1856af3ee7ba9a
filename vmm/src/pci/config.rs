//! A type-0 PCI configuration header (256 bytes) with BARs and a capability list.
//!
//! Registers are stored as dwords together with a mask of the bits the guest may write, so
//! the BAR sizing protocol (write all-ones, read back the size mask) falls out of the masks.

use super::{PciBar, PciBarKind, PciError};

/// Dwords in the conventional configuration space.
pub const NUM_CONFIG_REGISTERS: usize = 64;
/// Register index of BAR0.
pub const BAR0_REG: usize = 4;
pub const NUM_BARS: usize = 6;
/// Register index of the command (low half) / status (high half) register.
pub const COMMAND_REG: usize = 1;
pub const COMMAND_IO_SPACE: u32 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u32 = 1 << 1;
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
const COMMAND_INTX_DISABLE: u32 = 1 << 10;
const STATUS_CAPABILITIES_LIST: u32 = 1 << 20;
const CAPABILITIES_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
/// Capabilities live between the header (0x40) and the end of the 256-byte space.
const FIRST_CAPABILITY_OFFSET: usize = 0x40;
const CONFIG_SPACE_SIZE: usize = 0x100;

/// PCI class codes (base class, subclass, programming interface) used here.
pub const CLASS_BRIDGE_HOST: u32 = 0x06_00_00;
pub const CLASS_STORAGE_SCSI: u32 = 0x01_00_00;
pub const CLASS_NETWORK_ETHERNET: u32 = 0x02_00_00;
pub const CLASS_DISPLAY_VGA: u32 = 0x03_00_00;
pub const CLASS_DISPLAY_OTHER: u32 = 0x03_80_00;
pub const CLASS_INPUT_OTHER: u32 = 0x09_80_00;
pub const CLASS_OTHER: u32 = 0xff_00_00;

/// The identity fields of a type-0 header.
#[derive(Debug, Clone, Copy)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// 24 bits: base class, subclass, programming interface.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// The configuration space of one PCI function.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    registers: [u32; NUM_CONFIG_REGISTERS],
    writable: [u32; NUM_CONFIG_REGISTERS],
    bars: Vec<PciBar>,
    /// Offset of the last capability, whose next pointer a new one is linked from.
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    pub fn new(header: PciHeader) -> Self {
        let mut registers = [0u32; NUM_CONFIG_REGISTERS];
        let mut writable = [0u32; NUM_CONFIG_REGISTERS];
        registers[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        registers[2] = (header.class_code & 0xff_ffff) << 8 | u32::from(header.revision);
        // Header type 0, single function: byte 2 of register 3 stays 0.
        registers[11] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        writable[COMMAND_REG] =
            COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        // Interrupt line is scratch space for the OS; interrupt pin 0: no INTx.
        writable[INTERRUPT_REG] = 0xff;
        PciConfiguration {
            registers,
            writable,
            bars: Vec::new(),
            last_capability: None,
            next_capability: FIRST_CAPABILITY_OFFSET,
        }
    }

    /// Declares a memory BAR. Its address starts at 0 (unassigned).
    pub fn add_bar(&mut self, bar: PciBar) -> Result<(), PciError> {
        let index = bar.index as usize;
        let regs = match bar.kind {
            PciBarKind::Memory32 => 1,
            PciBarKind::Memory64 => 2,
        };
        let valid_size = bar.size.is_power_of_two()
            && bar.size >= 16
            && (bar.kind == PciBarKind::Memory64 || bar.size <= 1 << 31);
        if !valid_size {
            return Err(PciError::InvalidBarSize { index: bar.index, size: bar.size });
        }
        let in_use = |i: usize| {
            self.bars.iter().any(|b| {
                let used = if b.kind == PciBarKind::Memory64 { 2 } else { 1 };
                (b.index as usize..b.index as usize + used).contains(&i)
            })
        };
        if index + regs > NUM_BARS || (index..index + regs).any(in_use) {
            return Err(PciError::InvalidBarIndex(bar.index));
        }
        if let Some(address) = bar.fixed_address {
            let fits_32 = address.checked_add(bar.size).is_some_and(|end| end <= 1 << 32);
            if bar.kind != PciBarKind::Memory32 || address & (bar.size - 1) != 0 || !fits_32 {
                return Err(PciError::FixedBarNotReserved { index: bar.index, address });
            }
        }
        let mask = !(bar.size - 1);
        let mut low = 0u32;
        if bar.kind == PciBarKind::Memory64 {
            low |= 0b100;
        }
        if bar.prefetchable {
            low |= 0b1000;
        }
        self.registers[BAR0_REG + index] = low | bar.fixed_address.unwrap_or(0) as u32;
        self.writable[BAR0_REG + index] = (mask as u32) & !0xf;
        if bar.kind == PciBarKind::Memory64 {
            self.registers[BAR0_REG + index + 1] = 0;
            self.writable[BAR0_REG + index + 1] = (mask >> 32) as u32;
        }
        self.bars.push(bar);
        Ok(())
    }

    /// The BARs this function declared.
    pub fn bars(&self) -> &[PciBar] {
        &self.bars
    }

    /// The address BAR `index` currently holds (whatever the guest last wrote).
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let bar = self.bars.iter().find(|b| b.index == index)?;
        let reg = BAR0_REG + index as usize;
        let low = u64::from(self.registers[reg] & !0xf);
        Some(match bar.kind {
            PciBarKind::Memory32 => low,
            PciBarKind::Memory64 => u64::from(self.registers[reg + 1]) << 32 | low,
        })
    }

    /// Appends a capability: `body` is everything after the ID and next-pointer bytes.
    /// Returns the capability's offset in configuration space.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciError> {
        let offset = self.next_capability;
        let len = body.len() + 2;
        let end = offset + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpaceFull);
        }
        self.write_byte(offset, id);
        self.write_byte(offset + 1, 0);
        for (i, &b) in body.iter().enumerate() {
            self.write_byte(offset + 2 + i, b);
        }
        match self.last_capability {
            Some(last) => self.write_byte(last + 1, offset as u8),
            None => {
                self.registers[CAPABILITIES_POINTER_REG] = offset as u32;
                self.registers[COMMAND_REG] |= STATUS_CAPABILITIES_LIST;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (end + 3) & !3;
        Ok(offset)
    }

    /// Lets the guest write `mask` bits of register `reg` (for capability fields).
    pub fn set_writable_bits(&mut self, reg: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(reg) {
            *w |= mask;
        }
    }

    fn write_byte(&mut self, offset: usize, value: u8) {
        let reg = offset / 4;
        let shift = (offset % 4) * 8;
        self.registers[reg] = (self.registers[reg] & !(0xff << shift)) | u32::from(value) << shift;
    }

    /// Reads dword register `reg`; beyond the 256-byte space (ECAM extended space) reads 0.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.registers.get(reg).copied().unwrap_or(0)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within register `reg`, honouring the
    /// writable masks. Misaligned or oversized accesses are ignored.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let Some(current) = self.registers.get(reg).copied() else {
            return;
        };
        let offset = offset as usize;
        if !matches!(data.len(), 1 | 2 | 4) || offset + data.len() > 4 {
            return;
        }
        let mut value_bytes = current.to_le_bytes();
        value_bytes[offset..offset + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(value_bytes);
        let mut mask = self.writable[reg];
        let width_mask = if data.len() == 4 {
            u32::MAX
        } else {
            ((1u32 << (data.len() * 8)) - 1) << (offset * 8)
        };
        mask &= width_mask;
        let mut new = (current & !mask) | (value & mask);
        if let Some(address) = self.fixed_bar_address(reg) {
            // Only the sizing probe (all address bits set) is taken; any other value puts the
            // platform's address back.
            let address_bits = self.writable[reg];
            if new & address_bits != address_bits {
                new = (new & !address_bits) | address as u32;
            }
        }
        self.registers[reg] = new;
    }

    /// The fixed address of the BAR held in register `reg`, if it is a fixed BAR.
    fn fixed_bar_address(&self, reg: usize) -> Option<u64> {
        let index = reg.checked_sub(BAR0_REG)?;
        self.bars.iter().find(|b| b.index as usize == index).and_then(|b| b.fixed_address)
    }

    /// Stores `value` in register `reg` regardless of the writable mask (device-side updates).
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.registers.get_mut(reg) {
            *r = value;
        }
    }

    /// Every register, for saved state.
    pub fn registers(&self) -> Vec<u32> {
        self.registers.to_vec()
    }

    /// Puts saved registers back. They must belong to this function: bits the guest cannot
    /// write must match, and a fixed BAR holds its address or the sizing probe.
    pub fn restore_registers(&mut self, saved: &[u32]) -> Result<(), String> {
        let saved: [u32; NUM_CONFIG_REGISTERS] = saved
            .try_into()
            .map_err(|_| format!("{} configuration registers, not 64", saved.len()))?;
        for (reg, (&value, &current)) in saved.iter().zip(&self.registers).enumerate() {
            if (value ^ current) & !self.writable[reg] != 0 {
                return Err(format!("read-only bits of configuration register {reg} differ"));
            }
            if let Some(address) = self.fixed_bar_address(reg) {
                let address_bits = self.writable[reg];
                let held = value & address_bits;
                if held != address as u32 & address_bits && held != address_bits {
                    return Err(format!("fixed BAR register {reg} holds another address"));
                }
            }
        }
        self.registers = saved;
        Ok(())
    }

    pub fn command(&self) -> u32 {
        self.registers[COMMAND_REG] & 0xffff
    }

    pub fn memory_space_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: CLASS_STORAGE_SCSI,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    #[test]
    fn identity_registers_are_laid_out_and_read_only() {
        let mut c = PciConfiguration::new(header());
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2), 0x0100_0001);
        assert_eq!(c.read_reg(11), 0x1100_1af4);
        c.write_reg(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = PciConfiguration::new(header());
        c.add_bar(PciBar {
            index: 0,
            size: 0x4000,
            kind: PciBarKind::Memory64,
            prefetchable: false,
            fixed_address: None,
        })
        .unwrap();
        c.write_reg(4, 0, &u32::MAX.to_le_bytes());
        c.write_reg(5, 0, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xffff_c004);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        c.write_reg(4, 0, &0xc000_4000u32.to_le_bytes());
        c.write_reg(5, 0, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x1_c000_4000));
    }

    #[test]
    fn overlapping_or_bad_bars_are_refused() {
        let mut c = PciConfiguration::new(header());
        let bar = |index, size, kind| PciBar {
            index,
            size,
            kind,
            prefetchable: false,
            fixed_address: None,
        };
        c.add_bar(bar(0, 0x1000, PciBarKind::Memory64)).unwrap();
        assert!(c.add_bar(bar(1, 0x1000, PciBarKind::Memory32)).is_err());
        assert!(c.add_bar(bar(2, 0x1001, PciBarKind::Memory32)).is_err());
        assert!(c.add_bar(bar(5, 0x1000, PciBarKind::Memory64)).is_err());
        c.add_bar(bar(2, 0x1000, PciBarKind::Memory32)).unwrap();
    }

    #[test]
    fn capabilities_are_chained_from_the_pointer() {
        let mut c = PciConfiguration::new(header());
        let a = c.add_capability(0x09, &[1, 2, 3]).unwrap();
        let b = c.add_capability(0x11, &[0; 10]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(c.read_reg(13) & 0xff, 0x40);
        assert_ne!(c.read_reg(1) & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.read_reg(0x40 / 4) & 0xffff, 0x4809);
        assert_eq!(c.read_reg(0x48 / 4) & 0xffff, 0x0011);
    }

    fn fixed_bar() -> PciBar {
        PciBar {
            index: 0,
            size: 16 << 20,
            kind: PciBarKind::Memory32,
            prefetchable: true,
            fixed_address: Some(0xc000_0000),
        }
    }

    #[test]
    fn fixed_bar_sizes_like_any_bar_but_keeps_its_address() {
        let mut c = PciConfiguration::new(header());
        c.add_bar(fixed_bar()).unwrap();
        assert_eq!(c.read_reg(4), 0xc000_0008);
        c.write_reg(4, 0, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xff00_0008, "size mask while sizing");
        c.write_reg(4, 0, &0xc000_0008u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        c.write_reg(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_0000), "the guest cannot move it");
        c.write_reg(4, 2, &0x1234u16.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xc000_0008);
    }

    #[test]
    fn fixed_bar_must_be_32_bit_and_aligned() {
        let mut c = PciConfiguration::new(header());
        let misaligned = PciBar { fixed_address: Some(0xc010_0000), ..fixed_bar() };
        assert!(c.add_bar(misaligned).is_err());
        let wide = PciBar { kind: PciBarKind::Memory64, ..fixed_bar() };
        assert!(c.add_bar(wide).is_err());
    }

    #[test]
    fn byte_writes_only_touch_their_bytes() {
        let mut c = PciConfiguration::new(header());
        c.write_reg(COMMAND_REG, 0, &[0x06]);
        assert!(c.memory_space_enabled());
        c.write_reg(INTERRUPT_REG, 0, &[0x0b]);
        c.write_reg(INTERRUPT_REG, 1, &[0x0c]);
        assert_eq!(c.read_reg(INTERRUPT_REG), 0x0b);
    }

    #[test]
    fn saved_registers_restore_and_foreign_ones_are_refused() {
        let mut c = PciConfiguration::new(header());
        c.add_bar(fixed_bar()).unwrap();
        c.write_reg(COMMAND_REG, 0, &[0x06]);
        c.write_reg(INTERRUPT_REG, 0, &[0x0b]);
        let saved = c.registers();
        let mut fresh = PciConfiguration::new(header());
        fresh.add_bar(fixed_bar()).unwrap();
        fresh.restore_registers(&saved).unwrap();
        assert_eq!(fresh.registers(), saved);
        assert!(fresh.memory_space_enabled());

        let mut foreign = saved.clone();
        foreign[0] = 0x1234_5678;
        assert!(fresh.restore_registers(&foreign).is_err());
        let mut moved = saved.clone();
        moved[BAR0_REG] = 0xd000_0008;
        assert!(fresh.restore_registers(&moved).is_err());
        assert!(fresh.restore_registers(&saved[..10]).is_err());
        assert_eq!(fresh.registers(), saved, "a refused restore changes nothing");
    }
}
