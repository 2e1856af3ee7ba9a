//! The root bus: host bridge, slot assignment, BAR allocation, and the three bus adapters
//! (config ports, ECAM, MMIO window) the machine inserts on its buses.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::config::{
    PciConfiguration, PciHeader, BAR0_REG, CLASS_BRIDGE_HOST, COMMAND_BUS_MASTER,
    COMMAND_MEMORY_SPACE, COMMAND_REG,
};
use super::{PciBar, PciBarKind, PciDevice, PciError};
use crate::devices::bus::{lock, BusDevice};
use crate::state::{self, StateError};

/// Slots on bus 0.
const NUM_SLOTS: usize = 32;
/// The host bridge's identity (the id Intel's virtual host bridges use).
const HOST_BRIDGE_VENDOR: u16 = 0x8086;
const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
/// CONFIG_ADDRESS: enable bit, then bus / device / function / register fields.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// Slot 0: the host bridge, which has nothing but its identity.
struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                revision: 0,
                class_code: CLASS_BRIDGE_HOST,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }
    fn bars(&self) -> Vec<PciBar> {
        Vec::new()
    }
    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        state::encode("PCI host bridge", &self.config.registers())
    }
    fn restore_state(&mut self, saved: &[u8]) -> Result<(), StateError> {
        let registers: Vec<u32> = state::decode("PCI host bridge", saved)?;
        self.config
            .restore_registers(&registers)
            .map_err(|reason| StateError::invalid("PCI host bridge", reason))
    }
}

/// Saved state of bus 0: each slot's device state (configuration space included), by slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PciRootState {
    /// Each device's own encoded state (bytes, not a sequence: large states decode fast).
    pub slots: Vec<Option<serde_bytes::ByteBuf>>,
}

/// Saved state of the configuration port adapter: the latched CONFIG_ADDRESS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    pub address: u32,
}

/// A BAR as currently decoded: guest-physical range → (BAR, offset).
#[derive(Debug, Clone, Copy)]
struct Decoded {
    start: u64,
    size: u64,
    bar: u8,
}

/// A device shared between the root (config accesses) and in-flight BAR accesses.
type SharedDevice = Arc<Mutex<Box<dyn PciDevice>>>;

struct Slot {
    device: SharedDevice,
    bars: Vec<PciBar>,
    decoded: Vec<Decoded>,
}

impl Slot {
    /// Recomputes the decoded ranges from the command register and the BAR registers.
    fn refresh(&mut self) {
        let mut device = lock(&self.device);
        self.decoded.clear();
        if device.read_config_register(COMMAND_REG) & COMMAND_MEMORY_SPACE == 0 {
            return;
        }
        for bar in &self.bars {
            let reg = BAR0_REG + bar.index as usize;
            let low = u64::from(device.read_config_register(reg) & !0xf);
            let start = match (bar.fixed_address, bar.kind) {
                // Decodes where the platform put it, even while the guest sizes it.
                (Some(fixed), _) => fixed,
                (None, PciBarKind::Memory32) => low,
                (None, PciBarKind::Memory64) => {
                    u64::from(device.read_config_register(reg + 1)) << 32 | low
                }
            };
            // An unassigned BAR (0) or one wrapping the address space decodes nothing.
            if start != 0 && start.checked_add(bar.size).is_some() {
                self.decoded.push(Decoded { start, size: bar.size, bar: bar.index });
            }
        }
    }
}

/// Bus 0: the host bridge at 00:00.0 and the devices added after it.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    /// Next free address in the MMIO window (a bump allocator, like firmware's).
    next_mmio: u64,
    /// The board's MMIO window, [start, end).
    mmio_start: u64,
    mmio_end: u64,
    /// Ranges [start, end) the allocator skips: fixed BARs live there.
    reserved: Vec<(u64, u64)>,
    /// Fixed BARs placed so far, [start, end).
    fixed: Vec<(u64, u64)>,
}

#[cfg(target_arch = "x86_64")]
impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A root whose BARs are assigned from the PC's 32-bit MMIO window.
    #[cfg(target_arch = "x86_64")]
    pub fn new() -> Self {
        use crate::arch::x86_64::layout;
        Self::with_mmio_window(layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE)
    }

    /// A root whose BARs are assigned from [`start`, `start + size`), the board's window.
    pub fn with_mmio_window(start: u64, size: u64) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(Box::new(HostBridge::new()))),
            bars: Vec::new(),
            decoded: Vec::new(),
        });
        PciRoot {
            slots,
            next_mmio: start,
            mmio_start: start,
            mmio_end: start.saturating_add(size),
            reserved: Vec::new(),
            fixed: Vec::new(),
        }
    }

    /// Puts `device` in the next free slot and programs its BARs inside the MMIO window, with
    /// memory decoding and bus mastering on, as firmware would. Returns the slot number.
    pub fn add_device(&mut self, device: Box<dyn PciDevice>) -> Result<u8, PciError> {
        let slot = self.slots.iter().position(Option::is_none).ok_or(PciError::NoFreeSlot)?;
        let mut device = device;
        let bars = device.bars();
        let window_end = self.mmio_end;
        let mut next = self.next_mmio;
        let mut assigned = Vec::new();
        let mut fixed = Vec::new();
        for bar in &bars {
            if !bar.size.is_power_of_two() {
                return Err(PciError::InvalidBarSize { index: bar.index, size: bar.size });
            }
            if let Some(address) = bar.fixed_address {
                let range = (address, address.saturating_add(bar.size));
                let reserved = self.reserved.iter().any(|r| r.0 <= range.0 && range.1 <= r.1);
                let taken = self.fixed.iter().chain(&fixed).any(|f| overlaps(*f, range));
                if !reserved || taken {
                    return Err(PciError::FixedBarNotReserved { index: bar.index, address });
                }
                fixed.push(range);
                continue;
            }
            let start = self
                .allocate(next, bar.size, window_end)
                .ok_or(PciError::MmioWindowFull { size: bar.size })?;
            assigned.push((*bar, start));
            next = start + bar.size;
        }
        for (bar, start) in assigned {
            let reg = BAR0_REG + bar.index as usize;
            device.write_config_register(reg, 0, &(start as u32).to_le_bytes());
            if bar.kind == PciBarKind::Memory64 {
                device.write_config_register(reg + 1, 0, &((start >> 32) as u32).to_le_bytes());
            }
        }
        let command = device.read_config_register(COMMAND_REG) as u16
            | (COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER) as u16;
        device.write_config_register(COMMAND_REG, 0, &command.to_le_bytes());
        self.next_mmio = next;
        self.fixed.extend(fixed);
        let mut entry = Slot { device: Arc::new(Mutex::new(device)), bars, decoded: Vec::new() };
        entry.refresh();
        self.slots[slot] = Some(entry);
        Ok(slot as u8)
    }

    /// Reserves [`start`, `start + size`) of the MMIO window for fixed BARs (a framebuffer the
    /// machine maps as host memory): the allocator never hands it out. Call it before adding
    /// devices; a range below what was already allocated is refused.
    pub fn reserve_mmio(&mut self, start: u64, size: u64) -> Result<(), PciError> {
        let window_end = self.mmio_end;
        let invalid = PciError::InvalidReservation { start, size };
        let end = start.checked_add(size).ok_or(PciError::InvalidReservation { start, size })?;
        if size == 0 || start < self.next_mmio || end > window_end {
            return Err(invalid);
        }
        if self.reserved.iter().any(|r| overlaps(*r, (start, end))) {
            return Err(invalid);
        }
        self.reserved.push((start, end));
        Ok(())
    }

    /// The first naturally aligned `size` bytes at or after `from` that end by `limit` and
    /// miss every reserved range.
    fn allocate(&self, from: u64, size: u64, limit: u64) -> Option<u64> {
        let mut next = from;
        loop {
            // Natural alignment, as the PCI spec requires of BAR addresses.
            let start = next.checked_add(size - 1)? & !(size - 1);
            let end = start.checked_add(size).filter(|&end| end <= limit)?;
            match self.reserved.iter().find(|r| overlaps(**r, (start, end))) {
                Some(r) => next = r.1,
                None => return Some(start),
            }
        }
    }

    /// Reads configuration dword `reg` of 00:`device`.`function`; absent ones read all-ones.
    pub fn config_read(&mut self, device: u8, function: u8, reg: usize) -> u32 {
        match self.slot(device, function) {
            Some(slot) => lock(&slot.device).read_config_register(reg),
            None => u32::MAX,
        }
    }

    /// Writes bytes into configuration dword `reg` of 00:`device`.`function`.
    pub fn config_write(&mut self, device: u8, function: u8, reg: usize, offset: u64, data: &[u8]) {
        if let Some(slot) = self.slot(device, function) {
            lock(&slot.device).write_config_register(reg, offset, data);
            // Any write may have moved a BAR or toggled decoding.
            slot.refresh();
        }
    }

    fn slot(&mut self, device: u8, function: u8) -> Option<&mut Slot> {
        if function != 0 {
            return None;
        }
        self.slots.get_mut(device as usize)?.as_mut()
    }

    /// Every slot's state. Call it with the vCPUs paused and I/O quiesced
    /// ([`PciRoot::quiesce_io`]), so no queue moves while it is saved.
    pub fn save_state(&self) -> Result<PciRootState, StateError> {
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                slot.as_ref().map(|_| self.save_slot(i as u8).map(Into::into)).transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PciRootState { slots })
    }

    /// Restores every slot of a root built the same way (same devices in the same slots)
    /// and brings the BAR decoding in line with the restored registers. Each device refuses
    /// bad state without changing; a failure part-way leaves earlier slots restored, so a
    /// machine whose restore failed must be discarded.
    pub fn restore_state(&mut self, saved: &PciRootState) -> Result<(), StateError> {
        let same_layout = saved.slots.len() == self.slots.len()
            && saved.slots.iter().zip(&self.slots).all(|(a, b)| a.is_some() == b.is_some());
        if !same_layout {
            return Err(StateError::invalid("PCI bus", "slots differ from this machine's"));
        }
        for (i, bytes) in saved.slots.iter().enumerate() {
            if let Some(bytes) = bytes {
                self.restore_slot(i as u8, bytes)?;
            }
        }
        Ok(())
    }

    /// The MMIO window BARs are assigned from: (start, size).
    pub fn mmio_window(&self) -> (u64, u64) {
        (self.mmio_start, self.mmio_end - self.mmio_start)
    }

    /// The device numbers on bus 0 that hold a device, in order (the host bridge is 0).
    pub fn populated_slots(&self) -> Vec<u8> {
        self.slots.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(i, _)| i as u8).collect()
    }

    /// The saved state of the device in slot `slot` (see [`PciRoot::save_state`]).
    pub fn save_slot(&self, slot: u8) -> Result<Vec<u8>, StateError> {
        match self.slots.get(slot as usize).and_then(Option::as_ref) {
            Some(s) => lock(&s.device).save_state(),
            None => Err(StateError::invalid("PCI bus", format!("no device in slot {slot}"))),
        }
    }

    /// Restores the device in slot `slot` and brings its BAR decoding in line with the
    /// restored registers; a refused state leaves the device as it was.
    pub fn restore_slot(&mut self, slot: u8, bytes: &[u8]) -> Result<(), StateError> {
        match self.slots.get_mut(slot as usize).and_then(Option::as_mut) {
            Some(s) => {
                lock(&s.device).restore_state(bytes)?;
                s.refresh();
                Ok(())
            }
            None => Err(StateError::invalid("PCI bus", format!("no device in slot {slot}"))),
        }
    }

    /// Stops every device's I/O threads and waits for them: an in-flight request finishes
    /// first, and afterwards no device touches guest memory until [`PciRoot::resume_io`].
    pub fn quiesce_io(&mut self) {
        for slot in self.slots.iter().flatten() {
            lock(&slot.device).quiesce();
        }
    }

    /// Restarts the I/O threads and serves what the guest queued while they were stopped.
    pub fn resume_io(&mut self) {
        for slot in self.slots.iter().flatten() {
            lock(&slot.device).resume();
        }
    }

    /// The device, BAR and offset that decode guest-physical `addr`, if any.
    pub fn mmio_target(&self, addr: u64) -> Option<(SharedDevice, u8, u64)> {
        self.slots.iter().flatten().find_map(|slot| {
            slot.decoded
                .iter()
                .find(|d| addr >= d.start && addr - d.start < d.size)
                .map(|d| (slot.device.clone(), d.bar, addr - d.start))
        })
    }
}

/// Whether half-open ranges `a` and `b` share an address.
fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Reads through the root's MMIO dispatch; false when no BAR decodes `addr`. The root is
/// unlocked before the device is entered.
pub fn mmio_read(root: &Mutex<PciRoot>, addr: u64, data: &mut [u8]) -> bool {
    let target = lock(root).mmio_target(addr);
    match target {
        Some((device, bar, offset)) => {
            lock(&device).bar_read(bar, offset, data);
            true
        }
        None => false,
    }
}

/// Writes through the root's MMIO dispatch; false when no BAR decodes `addr`.
pub fn mmio_write(root: &Mutex<PciRoot>, addr: u64, data: &[u8]) -> bool {
    let target = lock(root).mmio_target(addr);
    match target {
        Some((device, bar, offset)) => {
            lock(&device).bar_write(bar, offset, data);
            true
        }
        None => false,
    }
}

/// Splits a configuration access at byte `offset` of a dword; None if it crosses the dword
/// or has an odd size.
fn dword_access(offset: u64, len: usize) -> Option<u64> {
    let byte = offset & 3;
    (matches!(len, 1 | 2 | 4) && byte as usize + len <= 4).then_some(byte)
}

fn extract(value: u32, byte: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    let byte = byte as usize;
    data.copy_from_slice(&bytes[byte..byte + data.len()]);
}

/// Configuration mechanism #1: CONFIG_ADDRESS at port 0xCF8 (dword only), CONFIG_DATA at
/// 0xCFC..0xCFF (any size). Insert at [`layout::PCI_CONFIG_ADDRESS_PORT`], length 8.
///
/// Byte accesses to 0xCF8..0xCFB are not config cycles; they read all-ones and are ignored
/// (0xCF9 is the PC reset-control register, which this adapter does not implement).
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub const LEN: u64 = 8;

    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    pub fn save_state(&self) -> PciConfigIoState {
        PciConfigIoState { address: self.address }
    }

    pub fn restore_state(&mut self, state: &PciConfigIoState) {
        self.address = state.address & CONFIG_ADDRESS_MASK;
    }

    /// (device, function, register) selected by CONFIG_ADDRESS, if enabled and on bus 0.
    fn target(&self) -> Option<(u8, u8, usize)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        (a & CONFIG_ADDRESS_ENABLE != 0 && bus == 0).then_some((
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            ((a >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let (Some(byte), Some((dev, func, reg))) =
                    (dword_access(offset - 4, data.len()), self.target())
                else {
                    return;
                };
                let value = lock(&self.root).config_read(dev, func, reg);
                extract(value, byte, data);
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_MASK;
                }
            }
            4..=7 => {
                let (Some(byte), Some((dev, func, reg))) =
                    (dword_access(offset - 4, data.len()), self.target())
                else {
                    return;
                };
                lock(&self.root).config_write(dev, func, reg, byte, data);
            }
            _ => {}
        }
    }
}

/// ECAM for bus 0. Insert at [`layout::PCI_ECAM_START`], length [`layout::PCI_ECAM_SIZE`].
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn target(offset: u64, len: usize) -> Option<(u8, u8, usize, u64)> {
        let byte = dword_access(offset, len)?;
        if offset >> 20 != 0 {
            return None;
        }
        Some((
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            ((offset & 0xfff) >> 2) as usize,
            byte,
        ))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some((dev, func, reg, byte)) = Self::target(offset, data.len()) {
            let value = lock(&self.root).config_read(dev, func, reg);
            extract(value, byte, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, func, reg, byte)) = Self::target(offset, data.len()) {
            lock(&self.root).config_write(dev, func, reg, byte, data);
        }
    }
}

/// The PCI MMIO window: routes accesses to the BAR that decodes them; unclaimed reads return
/// all-ones. Insert at the root's window ([`PciRoot::mmio_window`]).
pub struct PciMmioWindow {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
}

impl PciMmioWindow {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        let base = lock(&root).mmio_start;
        PciMmioWindow { root, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !mmio_read(&self.root, self.base + offset, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        mmio_write(&self.root, self.base + offset, data);
    }
}

#[cfg(test)]
#[cfg(target_arch = "x86_64")]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use crate::arch::x86_64::layout;
    use crate::pci::config::CLASS_OTHER;

    type WriteLog = Arc<Mutex<Vec<(u8, u64, Vec<u8>)>>>;

    /// A device with one 64-bit BAR that remembers writes and reads back a pattern.
    struct TestDevice {
        config: PciConfiguration,
        writes: WriteLog,
    }

    impl TestDevice {
        fn new(bar_size: u64) -> (Self, WriteLog) {
            let mut config = PciConfiguration::new(PciHeader {
                vendor_id: 0x1234,
                device_id: 0x5678,
                revision: 0,
                class_code: CLASS_OTHER,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            config
                .add_bar(PciBar {
                    index: 0,
                    size: bar_size,
                    kind: PciBarKind::Memory64,
                    prefetchable: false,
                    fixed_address: None,
                })
                .unwrap();
            let writes = Arc::new(Mutex::new(Vec::new()));
            (TestDevice { config, writes: writes.clone() }, writes)
        }
    }

    impl PciDevice for TestDevice {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg, offset, data);
        }
        fn bars(&self) -> Vec<PciBar> {
            self.config.bars().to_vec()
        }
        fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(bar + offset as u8);
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((bar, offset, data.to_vec()));
        }
        fn save_state(&self) -> Result<Vec<u8>, StateError> {
            state::encode("test", &self.config.registers())
        }
        fn restore_state(&mut self, saved: &[u8]) -> Result<(), StateError> {
            let regs: Vec<u32> = state::decode("test", saved)?;
            self.config.restore_registers(&regs).map_err(|r| StateError::invalid("test", r))
        }
    }

    fn cf8(io: &mut PciConfigIo, dev: u32, reg: u32) {
        io.write(0, &(0x8000_0000 | dev << 11 | reg << 2).to_le_bytes());
    }

    fn cfc_read(io: &mut PciConfigIo, dev: u32, reg: u32) -> u32 {
        cf8(io, dev, reg);
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn setup() -> (Arc<Mutex<PciRoot>>, WriteLog) {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let (dev, writes) = TestDevice::new(0x4000);
        assert_eq!(root.lock().unwrap().add_device(Box::new(dev)).unwrap(), 1);
        (root, writes)
    }

    #[test]
    fn config_reads_through_cf8_reach_the_right_device() {
        let (root, _) = setup();
        let mut io = PciConfigIo::new(root);
        assert_eq!(cfc_read(&mut io, 0, 0), 0x0d57_8086);
        assert_eq!(cfc_read(&mut io, 0, 2) >> 8, 0x06_00_00);
        assert_eq!(cfc_read(&mut io, 1, 0), 0x5678_1234);
        // A 16-bit read of the device id at 0xCFE.
        cf8(&mut io, 1, 0);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);
        let mut a = [0u8; 4];
        io.read(0, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0x8000_0800);
    }

    #[test]
    fn absent_slots_and_functions_read_all_ones() {
        let (root, _) = setup();
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(cfc_read(&mut io, 7, 0), u32::MAX);
        io.write(0, &(0x8000_0000u32 | 1 << 11 | 1 << 8).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut ecam = PciConfigMmio::new(root);
        ecam.read(3 << 15, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
    }

    #[test]
    fn bars_are_preprogrammed_aligned_and_decoding() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let (small, _) = TestDevice::new(0x1000);
        let (big, _) = TestDevice::new(0x10_0000);
        root.lock().unwrap().add_device(Box::new(small)).unwrap();
        root.lock().unwrap().add_device(Box::new(big)).unwrap();
        let mut io = PciConfigIo::new(root);
        assert_eq!(cfc_read(&mut io, 1, 4), 0xc000_0004);
        assert_eq!(cfc_read(&mut io, 2, 4), 0xc010_0004);
        assert_eq!(cfc_read(&mut io, 2, 5), 0);
        assert_eq!(cfc_read(&mut io, 2, 1) & 0x6, 0x6);
    }

    #[test]
    fn bar_sizing_through_config_ports() {
        let (root, _) = setup();
        let mut io = PciConfigIo::new(root);
        cf8(&mut io, 1, 4);
        io.write(4, &u32::MAX.to_le_bytes());
        assert_eq!(cfc_read(&mut io, 1, 4), 0xffff_c004);
        cf8(&mut io, 1, 5);
        io.write(4, &u32::MAX.to_le_bytes());
        assert_eq!(cfc_read(&mut io, 1, 5), u32::MAX);
    }

    #[test]
    fn moving_a_bar_moves_dispatch() {
        let (root, writes) = setup();
        let mut window = PciMmioWindow::new(root.clone());
        let mut d = [0u8; 4];
        window.read(0x10, &mut d);
        assert_eq!(d, [0x10; 4]);
        let mut io = PciConfigIo::new(root.clone());
        cf8(&mut io, 1, 4);
        io.write(4, &0xc080_0000u32.to_le_bytes());
        window.read(0x10, &mut d);
        assert_eq!(d, [0xff; 4], "old address must no longer decode");
        window.write(0x80_0020, &[1, 2]);
        assert_eq!(writes.lock().unwrap().as_slice(), &[(0, 0x20, vec![1, 2])]);
        // Memory decoding off: nothing decodes.
        cf8(&mut io, 1, 1);
        io.write(4, &[0, 0]);
        window.read(0x80_0020, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn unclaimed_window_reads_all_ones() {
        let (root, _) = setup();
        let mut window = PciMmioWindow::new(root);
        let mut d = [0u8; 8];
        window.read(0x100_0000, &mut d);
        assert_eq!(d, [0xff; 8]);
    }

    #[test]
    fn full_bus_is_refused() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        for _ in 1..NUM_SLOTS {
            root.lock().unwrap().add_device(Box::new(TestDevice::new(0x1000).0)).unwrap();
        }
        let err = root.lock().unwrap().add_device(Box::new(TestDevice::new(0x1000).0));
        assert!(matches!(err, Err(PciError::NoFreeSlot)));
    }

    /// A device with a fixed 16 MiB BAR 0 at `addr` and a 64-bit BAR 2.
    struct FixedDevice(PciConfiguration);

    impl FixedDevice {
        fn new(addr: u64) -> Self {
            let mut c = PciConfiguration::new(PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1050,
                revision: 1,
                class_code: 0x03_00_00,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            c.add_bar(PciBar {
                index: 0,
                size: 16 << 20,
                kind: PciBarKind::Memory32,
                prefetchable: true,
                fixed_address: Some(addr),
            })
            .unwrap();
            c.add_bar(PciBar {
                index: 2,
                size: 0x4000,
                kind: PciBarKind::Memory64,
                prefetchable: false,
                fixed_address: None,
            })
            .unwrap();
            FixedDevice(c)
        }
    }

    impl PciDevice for FixedDevice {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.0.read_reg(reg)
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.0.write_reg(reg, offset, data);
        }
        fn bars(&self) -> Vec<PciBar> {
            self.0.bars().to_vec()
        }
        fn bar_read(&mut self, bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(bar);
        }
        fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
    }

    const FB: u64 = layout::PCI_MMIO_START;

    #[test]
    fn reserved_range_is_never_allocated_and_holds_the_fixed_bar() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        root.lock().unwrap().reserve_mmio(FB, 16 << 20).unwrap();
        root.lock().unwrap().add_device(Box::new(FixedDevice::new(FB))).unwrap();
        root.lock().unwrap().add_device(Box::new(TestDevice::new(0x1000).0)).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(cfc_read(&mut io, 1, 4), FB as u32 | 0x8);
        assert_eq!(cfc_read(&mut io, 1, 6), (FB as u32 + (16 << 20)) | 0x4, "BAR 2 after it");
        assert_eq!(cfc_read(&mut io, 2, 4), (FB as u32 + (16 << 20) + 0x4000) | 0x4);
        // Sizing and restoring through the config ports; the BAR stays where it was.
        cf8(&mut io, 1, 4);
        io.write(4, &u32::MAX.to_le_bytes());
        assert_eq!(cfc_read(&mut io, 1, 4), 0xff00_0008);
        io.write(4, &0xd000_0000u32.to_le_bytes());
        assert_eq!(cfc_read(&mut io, 1, 4), FB as u32 | 0x8);
        let mut window = PciMmioWindow::new(root);
        let mut d = [0u8; 2];
        window.read(0x10, &mut d);
        assert_eq!(d, [0, 0], "BAR 0 of the fixed device decodes at the window start");
    }

    #[test]
    fn fixed_bar_outside_a_reservation_is_refused() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let err = root.lock().unwrap().add_device(Box::new(FixedDevice::new(FB)));
        assert!(matches!(err, Err(PciError::FixedBarNotReserved { .. })));
        root.lock().unwrap().reserve_mmio(FB, 16 << 20).unwrap();
        root.lock().unwrap().add_device(Box::new(FixedDevice::new(FB))).unwrap();
        let twice = root.lock().unwrap().add_device(Box::new(FixedDevice::new(FB)));
        assert!(matches!(twice, Err(PciError::FixedBarNotReserved { .. })), "already taken");
    }

    #[test]
    fn bad_reservations_are_refused() {
        let mut root = PciRoot::new();
        assert!(root.reserve_mmio(0x1000, 0x1000).is_err(), "outside the window");
        assert!(root.reserve_mmio(FB, 0).is_err());
        assert!(root.reserve_mmio(u64::MAX - 10, 100).is_err());
        root.reserve_mmio(FB + (16 << 20), 16 << 20).unwrap();
        assert!(root.reserve_mmio(FB + (20 << 20), 1 << 20).is_err(), "overlap");
        root.add_device(Box::new(TestDevice::new(0x1000).0)).unwrap();
        assert!(root.reserve_mmio(FB, 0x1000).is_err(), "already allocated");
    }

    #[test]
    fn bar_larger_than_the_window_is_refused() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let huge = TestDevice::new(layout::PCI_MMIO_SIZE * 2).0;
        let err = root.lock().unwrap().add_device(Box::new(huge));
        assert!(matches!(err, Err(PciError::MmioWindowFull { .. })));
    }

    #[test]
    fn restore_moves_bar_dispatch_and_config_address_to_the_saved_state() {
        let (root, _) = setup();
        let mut io = PciConfigIo::new(root.clone());
        cf8(&mut io, 1, 4);
        io.write(4, &0xc080_0000u32.to_le_bytes());
        cf8(&mut io, 1, 15);
        io.write(4, &[0x0b]);
        let saved = root.lock().unwrap().save_state().unwrap();
        let io_saved = io.save_state();
        let bytes = state::encode("pci", &saved).unwrap();
        let decoded: PciRootState = state::decode("pci", &bytes).unwrap();

        let (fresh, writes) = setup();
        fresh.lock().unwrap().restore_state(&decoded).unwrap();
        assert_eq!(fresh.lock().unwrap().save_state().unwrap(), saved);
        let mut window = PciMmioWindow::new(fresh.clone());
        let mut d = [0u8; 4];
        window.read(0x10, &mut d);
        assert_eq!(d, [0xff; 4], "the fresh root's original BAR address must not decode");
        window.write(0x80_0020, &[7]);
        assert_eq!(writes.lock().unwrap().as_slice(), &[(0, 0x20, vec![7])]);
        let mut fresh_io = PciConfigIo::new(fresh);
        fresh_io.restore_state(&io_saved);
        let mut v = [0u8; 4];
        fresh_io.read(4, &mut v);
        assert_eq!(v[0], 0x0b, "CONFIG_ADDRESS still selects 01.0 register 15");
    }

    #[test]
    fn restore_into_a_differently_populated_bus_is_refused() {
        let (root, _) = setup();
        let saved = root.lock().unwrap().save_state().unwrap();
        let empty = PciRoot::new();
        let mut empty = empty;
        assert!(matches!(empty.restore_state(&saved), Err(StateError::Invalid { .. })));
        let mut foreign = saved.clone();
        foreign.slots[1] = Some(state::encode("x", &vec![0u32; 64]).unwrap().into());
        let (other, _) = setup();
        assert!(matches!(
            other.lock().unwrap().restore_state(&foreign),
            Err(StateError::Invalid { .. })
        ));
    }
}
