//! A type-0 PCI configuration header (256 bytes) with BARs and a capability list.
//!
//! Registers are stored as dwords together with a mask of the bits the guest may write, so
//! the BAR sizing protocol (write all-ones, read back the size mask) falls out of the masks.

use super::{IntxPin, PciBar, PciBarKind, PciError, ROM_BAR_INDEX};

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
/// Register index of the header type (byte 2; bit 7: multi-function device).
pub const HEADER_TYPE_REG: usize = 3;
pub const HEADER_TYPE_MULTI_FUNCTION: u32 = 0x80 << 16;
/// Bit 0 of an I/O BAR.
const BAR_IO_SPACE: u32 = 1;
/// Register index of the expansion ROM BAR (offset 0x30): address bits 31..11, enable bit 0.
pub const ROM_BAR_REG: usize = 12;
pub const ROM_ENABLE: u32 = 1;
const ROM_ADDRESS_MASK: u32 = 0xffff_f800;
const CAPABILITIES_POINTER_REG: usize = 13;
/// Interrupt line (byte 0, the OS's scratch) and pin (byte 1, read-only).
pub const INTERRUPT_REG: usize = 15;
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

    /// Declares a BAR (the expansion ROM under [`ROM_BAR_INDEX`]). Its address starts at 0
    /// (unassigned); a ROM starts disabled.
    pub fn add_bar(&mut self, bar: PciBar) -> Result<(), PciError> {
        let index = bar.index as usize;
        let regs = match bar.kind {
            PciBarKind::Memory64 => 2,
            _ => 1,
        };
        let valid_size = bar.size.is_power_of_two()
            && match bar.kind {
                PciBarKind::Memory32 => (16..=1 << 31).contains(&bar.size),
                PciBarKind::Memory64 => bar.size >= 16,
                PciBarKind::Io => (4..=256).contains(&bar.size),
                PciBarKind::Rom => (2048..=16 << 20).contains(&bar.size),
            }
            && bar.ram.as_ref().is_none_or(|m| m.len() <= bar.size);
        if !valid_size {
            return Err(PciError::InvalidBarSize { index: bar.index, size: bar.size });
        }
        let ram_of_wrong_kind =
            bar.ram.is_some() && !matches!(bar.kind, PciBarKind::Memory32 | PciBarKind::Memory64);
        let in_use = |i: usize| {
            self.bars.iter().any(|b| {
                let used = if b.kind == PciBarKind::Memory64 { 2 } else { 1 };
                (b.index as usize..b.index as usize + used).contains(&i)
            })
        };
        let index_fits = if bar.kind == PciBarKind::Rom {
            bar.index == ROM_BAR_INDEX
        } else {
            index + regs <= NUM_BARS
        };
        if ram_of_wrong_kind || !index_fits || (index..index + regs).any(in_use) {
            return Err(PciError::InvalidBarIndex(bar.index));
        }
        let mask = !(bar.size - 1);
        let (reg, low, writable) = match bar.kind {
            PciBarKind::Rom => (ROM_BAR_REG, 0, (mask as u32 & ROM_ADDRESS_MASK) | ROM_ENABLE),
            PciBarKind::Io => (BAR0_REG + index, BAR_IO_SPACE, mask as u32 & !0x3),
            PciBarKind::Memory32 | PciBarKind::Memory64 => {
                let mut low = 0u32;
                if bar.kind == PciBarKind::Memory64 {
                    low |= 0b100;
                }
                if bar.prefetchable {
                    low |= 0b1000;
                }
                (BAR0_REG + index, low, (mask as u32) & !0xf)
            }
        };
        self.registers[reg] = low;
        self.writable[reg] = writable;
        if bar.kind == PciBarKind::Memory64 {
            self.registers[reg + 1] = 0;
            self.writable[reg + 1] = (mask >> 32) as u32;
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
        Some(bar_address(bar.kind, |reg| self.read_reg(reg), index))
    }

    /// Sets the interrupt pin (configuration byte 0x3D, read-only for the guest).
    pub fn set_interrupt_pin(&mut self, pin: Option<IntxPin>) {
        let pin = pin.map_or(0, |p| p as u32);
        self.registers[INTERRUPT_REG] = (self.registers[INTERRUPT_REG] & !0xff00) | pin << 8;
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
        self.registers[reg] = (current & !mask) | (value & mask);
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
    /// write must match.
    pub fn restore_registers(&mut self, saved: &[u32]) -> Result<(), PciError> {
        let saved: [u32; NUM_CONFIG_REGISTERS] =
            saved.try_into().map_err(|_| PciError::ConfigSpaceSize(saved.len()))?;
        for (reg, (&value, &current)) in saved.iter().zip(&self.registers).enumerate() {
            if (value ^ current) & !self.writable[reg] != 0 {
                return Err(PciError::ReadOnlyBitsDiffer(reg));
            }
        }
        self.registers = saved;
        Ok(())
    }

    pub fn command(&self) -> u32 {
        self.registers[COMMAND_REG] & 0xffff
    }

    /// Command bit 10: the function may not assert INTx.
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    pub fn memory_space_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    pub fn io_space_enabled(&self) -> bool {
        self.command() & COMMAND_IO_SPACE != 0
    }

    /// Whether the function may master the bus: touch guest memory, send MSIs.
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }
}

/// The address a BAR of `kind` at `index` holds, reading registers through `read`
/// (configuration dword index → value). A ROM's enable bit is not part of it.
pub fn bar_address(kind: PciBarKind, mut read: impl FnMut(usize) -> u32, index: u8) -> u64 {
    match kind {
        PciBarKind::Rom => u64::from(read(ROM_BAR_REG) & ROM_ADDRESS_MASK),
        PciBarKind::Io => u64::from(read(BAR0_REG + index as usize) & !0x3),
        PciBarKind::Memory32 => u64::from(read(BAR0_REG + index as usize) & !0xf),
        PciBarKind::Memory64 => {
            let reg = BAR0_REG + index as usize;
            let low = u64::from(read(reg) & !0xf);
            u64::from(read(reg + 1)) << 32 | low
        }
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
            ram: None,
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
        let bar = |index, size, kind| PciBar { index, size, kind, prefetchable: false, ram: None };
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

    fn bar(index: u8, size: u64, kind: PciBarKind, prefetchable: bool) -> PciBar {
        PciBar { index, size, kind, prefetchable, ram: None }
    }

    #[test]
    fn memory32_io_and_rom_bars_size_by_their_masks() {
        let mut c = PciConfiguration::new(header());
        c.add_bar(bar(0, 16 << 20, PciBarKind::Memory32, true)).unwrap();
        c.add_bar(bar(1, 0x20, PciBarKind::Io, false)).unwrap();
        c.add_bar(bar(ROM_BAR_INDEX, 0x8000, PciBarKind::Rom, false)).unwrap();
        assert_eq!(c.read_reg(4), 0x0000_0008, "32-bit prefetchable, unassigned");
        assert_eq!(c.read_reg(5), 0x0000_0001, "I/O space bit");
        assert_eq!(c.read_reg(ROM_BAR_REG), 0, "a ROM starts disabled");
        for reg in [4, 5, ROM_BAR_REG] {
            c.write_reg(reg, 0, &u32::MAX.to_le_bytes());
        }
        assert_eq!(c.read_reg(4), 0xff00_0008);
        assert_eq!(c.read_reg(5), 0xffff_ffe1);
        assert_eq!(c.read_reg(ROM_BAR_REG), 0xffff_8001, "size mask and the enable bit");
        c.write_reg(4, 0, &0xd000_0000u32.to_le_bytes());
        c.write_reg(5, 0, &0xc020u32.to_le_bytes());
        c.write_reg(ROM_BAR_REG, 0, &0xfeb0_0001u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        assert_eq!(c.bar_address(1), Some(0xc020));
        assert_eq!(c.bar_address(ROM_BAR_INDEX), Some(0xfeb0_0000), "without the enable bit");
    }

    #[test]
    fn bad_io_rom_and_ram_bars_are_refused() {
        let mut c = PciConfiguration::new(header());
        assert!(c.add_bar(bar(0, 512, PciBarKind::Io, false)).is_err(), "I/O over 256 bytes");
        assert!(c.add_bar(bar(0, 2, PciBarKind::Io, false)).is_err());
        assert!(c.add_bar(bar(0, 0x1000, PciBarKind::Rom, false)).is_err(), "ROM at index 0");
        assert!(c.add_bar(bar(ROM_BAR_INDEX, 0x400, PciBarKind::Rom, false)).is_err());
        assert!(c.add_bar(bar(ROM_BAR_INDEX, 0x1000, PciBarKind::Io, false)).is_err());
        let owner: std::sync::Arc<dyn std::any::Any + Send + Sync> = std::sync::Arc::new(());
        // SAFETY: never mapped; only declared.
        let memory = unsafe {
            crate::memory::slots::HostMemory::new(0x1000 as *mut u8, 0x2000, false, owner)
        }
        .unwrap();
        let ram = |size, kind| PciBar { ram: Some(memory.clone()), ..bar(0, size, kind, true) };
        assert!(c.add_bar(ram(0x1000, PciBarKind::Memory32)).is_err(), "more memory than BAR");
        assert!(c.add_bar(ram(0x100, PciBarKind::Io)).is_err(), "RAM behind an I/O BAR");
        c.add_bar(ram(0x2000, PciBarKind::Memory32)).unwrap();
    }

    #[test]
    fn the_interrupt_pin_is_read_only_and_the_line_writable() {
        let mut c = PciConfiguration::new(header());
        c.set_interrupt_pin(Some(IntxPin::A));
        c.write_reg(INTERRUPT_REG, 0, &[0x0b, 0x03]);
        assert_eq!(c.read_reg(INTERRUPT_REG), 0x010b);
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
        let fb = || bar(0, 16 << 20, PciBarKind::Memory32, true);
        let mut c = PciConfiguration::new(header());
        c.add_bar(fb()).unwrap();
        c.write_reg(BAR0_REG, 0, &0xc000_0000u32.to_le_bytes());
        c.write_reg(COMMAND_REG, 0, &[0x06]);
        c.write_reg(INTERRUPT_REG, 0, &[0x0b]);
        let saved = c.registers();
        let mut fresh = PciConfiguration::new(header());
        fresh.add_bar(fb()).unwrap();
        fresh.restore_registers(&saved).unwrap();
        assert_eq!(fresh.registers(), saved);
        assert!(fresh.memory_space_enabled());

        let mut foreign = saved.clone();
        foreign[0] = 0x1234_5678;
        assert!(fresh.restore_registers(&foreign).is_err());
        let mut not_prefetchable = saved.clone();
        not_prefetchable[BAR0_REG] = 0xc000_0000;
        assert!(fresh.restore_registers(&not_prefetchable).is_err());
        assert!(fresh.restore_registers(&saved[..10]).is_err());
        assert_eq!(fresh.registers(), saved, "a refused restore changes nothing");
    }
}
