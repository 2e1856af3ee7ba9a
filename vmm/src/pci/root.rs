//! The root complex: the host bridge, functions placed by address, BAR allocation from the
//! board's windows, RAM BAR mapping, INTx wiring, and the bus adapters (config ports, ECAM,
//! MMIO and I/O windows) the machine inserts on its buses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::config::{
    self, PciConfiguration, PciHeader, CLASS_BRIDGE_HOST, COMMAND_BUS_MASTER, COMMAND_IO_SPACE,
    COMMAND_MEMORY_SPACE, COMMAND_REG, HEADER_TYPE_MULTI_FUNCTION, HEADER_TYPE_REG, INTERRUPT_REG,
    ROM_BAR_REG, ROM_ENABLE,
};
pub use super::persist::PciConfigIoState;
use super::{
    Bdf, IntxLine, IntxPin, IntxRouting, PciBar, PciBarKind, PciDevice, PciError, SharedLines,
    ROM_BAR_INDEX,
};
use crate::devices::bus::{lock, BusDevice};
use crate::memory::slots::{HostMemory, MemoryMapper, SlotError};
use crate::state::{self, StateError};

/// CONFIG_ADDRESS: enable bit, then bus / device / function / register fields.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
/// ECAM gives each bus 1 MiB: 32 devices × 8 functions × 4 KiB.
const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Port I/O space ends here.
const IO_SPACE_END: u64 = 1 << 16;
const DEVICES_PER_BUS: u8 = 32;

/// A host bridge with nothing but its identity (function 00:00.0).
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    pub fn new(vendor_id: u16, device_id: u16) -> Self {
        PciHostBridge {
            config: PciConfiguration::new(PciHeader {
                vendor_id,
                device_id,
                revision: 0,
                class_code: CLASS_BRIDGE_HOST,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl PciDevice for PciHostBridge {
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
            .map_err(|e| StateError::rejected("PCI host bridge", e))
    }
}

/// A range of guest-physical (or port) addresses the root decodes; size 0 is no window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciWindow {
    pub start: u64,
    pub size: u64,
}

impl PciWindow {
    pub const EMPTY: PciWindow = PciWindow { start: 0, size: 0 };

    pub const fn new(start: u64, size: u64) -> Self {
        PciWindow { start, size }
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Whether `[start, start + size)` lies inside the window.
    fn contains(&self, start: u64, size: u64) -> bool {
        let end = start.checked_add(size);
        !self.is_empty()
            && start >= self.start
            && end.is_some_and(|end| end <= self.start + self.size)
    }

    fn overlaps(&self, other: &PciWindow) -> bool {
        !self.is_empty()
            && !other.is_empty()
            && self.start < other.start + other.size
            && other.start < self.start + self.size
    }
}

/// What the board gives its PCI root.
pub struct PciRootConfig {
    /// Function 00:00.0.
    pub host_bridge: Box<dyn PciDevice>,
    /// Where 32-bit memory BARs and expansion ROMs are placed.
    pub mmio32: PciWindow,
    /// Where 64-bit memory BARs are placed; empty: in `mmio32`, below 4 GiB.
    pub mmio64: PciWindow,
    /// Where I/O BARs are placed (port addresses).
    pub io: PciWindow,
    /// ECAM: `bus_count` MiB from `ecam_base`, bus 0 first.
    pub ecam_base: u64,
    pub bus_count: u16,
    /// Maps RAM BARs into the guest; None: functions with RAM BARs are refused.
    pub memory: Option<Arc<dyn MemoryMapper>>,
    /// Wires INTx pins; None: pins stay unconnected.
    pub intx: Option<IntxRouting>,
}

/// Which address space a decoded BAR lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Space {
    Memory,
    Io,
}

/// A BAR as currently decoded: address range → (BAR, offset).
#[derive(Debug, Clone, Copy)]
struct Decoded {
    space: Space,
    start: u64,
    size: u64,
    bar: u8,
}

/// A RAM BAR and where it is mapped now.
struct RamBar {
    index: u8,
    kind: PciBarKind,
    memory: HostMemory,
    /// (guest address, memory slot) while mapped.
    mapped: Option<(u64, u32)>,
    /// A refused mapping was logged already (the guest may retry it endlessly).
    refusal_logged: bool,
}

/// A device shared between the root (config accesses) and in-flight BAR accesses.
type SharedDevice = Arc<Mutex<Box<dyn PciDevice>>>;

struct Function {
    device: SharedDevice,
    /// BARs dispatched to the device.
    bars: Vec<PciBar>,
    decoded: Vec<Decoded>,
    ram: Vec<RamBar>,
}

/// What a refresh needs from the root besides the function.
struct Decoding {
    memory: Option<Arc<dyn MemoryMapper>>,
    windows: [PciWindow; 2],
    io_window: PciWindow,
}

impl Decoding {
    /// Whether a BAR of `kind` may decode at `start`: whole inside a window of its space, and
    /// not the all-ones address a guest reads back while sizing it. Firmware sizes BARs with
    /// decoding on, and writes a 64-bit BAR one half at a time: none of those in-between
    /// addresses may reach a device (a notifier registered there would swallow writes meant
    /// for whatever lives at that address).
    fn decodes(&self, kind: PciBarKind, start: u64, size: u64) -> bool {
        if start == 0 || is_sizing_address(kind, start, size) {
            return false;
        }
        match kind {
            PciBarKind::Io => self.io_window.contains(start, size),
            _ => self.windows.iter().any(|w| w.contains(start, size)),
        }
    }
}

/// Whether `start` is what a BAR of `kind` holds after all-ones was written to its register
/// (for a 64-bit BAR: to its high half, or to its low half while the high half is 0).
fn is_sizing_address(kind: PciBarKind, start: u64, size: u64) -> bool {
    let low_all_ones = (1u64 << 32) - size.min(1 << 32);
    match kind {
        PciBarKind::Memory64 => start >= 0xffff_ffff_0000_0000 || start == low_all_ones,
        _ => start == low_all_ones,
    }
}

/// A RAM BAR the refresh could not map: (BAR index, address, why).
type RamRefusal = (u8, u64, SlotError);

/// Whether a refresh tells the device about every BAR or only the ones that changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    Changes,
    /// After a restore replaced the registers the device had been told about.
    All,
}

impl Function {
    /// Recomputes the decoded ranges from the command register and the BAR registers, tells
    /// the device where its dispatched BARs decode now ([`PciDevice::bar_decoded`]), and
    /// moves RAM BAR mappings to where their registers point. Returns the first RAM BAR it
    /// could not map (already logged once).
    fn refresh(&mut self, bdf: Bdf, ctx: &Decoding, report: Report) -> Result<(), RamRefusal> {
        let mut device = lock(&self.device);
        let command = device.read_config_register(COMMAND_REG);
        let memory_on = command & COMMAND_MEMORY_SPACE != 0;
        let io_on = command & COMMAND_IO_SPACE != 0;
        let rom_on = device.read_config_register(ROM_BAR_REG) & ROM_ENABLE != 0;
        let before = std::mem::take(&mut self.decoded);
        for bar in &self.bars {
            let (space, on) = match bar.kind {
                PciBarKind::Io => (Space::Io, io_on),
                PciBarKind::Rom => (Space::Memory, memory_on && rom_on),
                PciBarKind::Memory32 | PciBarKind::Memory64 => (Space::Memory, memory_on),
            };
            if !on {
                continue;
            }
            let start =
                config::bar_address(bar.kind, |reg| device.read_config_register(reg), bar.index);
            if ctx.decodes(bar.kind, start, bar.size) {
                self.decoded.push(Decoded { space, start, size: bar.size, bar: bar.index });
            }
        }
        let at = |decoded: &[Decoded], index: u8| {
            decoded.iter().find(|d| d.bar == index).map(|d| d.start)
        };
        for bar in &self.bars {
            let now = at(&self.decoded, bar.index);
            if report == Report::All || now != at(&before, bar.index) {
                device.bar_decoded(bar.index, now);
            }
        }
        let mut refused = Ok(());
        for ram in &mut self.ram {
            let address =
                config::bar_address(ram.kind, |reg| device.read_config_register(reg), ram.index);
            // Only inside a memory window: never over RAM or the platform's own devices.
            let wanted = (memory_on
                && ctx.windows.iter().any(|w| w.contains(address, ram.memory.len())))
            .then_some(address);
            if wanted == ram.mapped.map(|(at, _)| at) {
                continue;
            }
            let Some(mapper) = ctx.memory.as_deref() else { continue };
            if let Some((at, slot)) = ram.mapped {
                if let Err(e) = mapper.unmap(slot) {
                    log::error!("PCI {bdf} BAR {}: cannot unmap it from {at:#x}: {e}", ram.index);
                    continue;
                }
                ram.mapped = None;
            }
            let Some(address) = wanted else { continue };
            match mapper.map(address, &ram.memory) {
                Ok(slot) => ram.mapped = Some((address, slot)),
                Err(e) => {
                    if !ram.refusal_logged {
                        log::warn!(
                            "PCI {bdf} BAR {} not decoded at {address:#x}: {}",
                            ram.index,
                            crate::error_chain(&e)
                        );
                        ram.refusal_logged = true;
                    }
                    if refused.is_ok() {
                        refused = Err((ram.index, address, e));
                    }
                }
            }
        }
        refused
    }

    /// Removes every RAM BAR mapping.
    fn unmap_ram(&mut self, bdf: Bdf, memory: Option<&dyn MemoryMapper>) {
        for ram in &mut self.ram {
            if let (Some((at, slot)), Some(mapper)) = (ram.mapped, memory) {
                match mapper.unmap(slot) {
                    Ok(()) => ram.mapped = None,
                    Err(e) => log::error!("PCI {bdf} BAR {}: cannot unmap {at:#x}: {e}", ram.index),
                }
            }
        }
    }
}

/// A bump allocator over one window (as firmware assigns BARs).
#[derive(Debug, Clone, Copy)]
struct Allocator {
    window: PciWindow,
    next: u64,
}

impl Allocator {
    fn new(window: PciWindow) -> Self {
        Allocator { window, next: window.start }
    }

    /// The first naturally aligned `size` bytes at or after the allocator's next address
    /// that end inside the window; the allocator moves past them.
    fn allocate(&mut self, size: u64) -> Option<u64> {
        let start = self.next.checked_add(size - 1)? & !(size - 1);
        if !self.window.contains(start, size) {
            return None;
        }
        self.next = start + size;
        Some(start)
    }
}

/// The root complex: the host bridge at 00:00.0 and the functions added after it.
pub struct PciRoot {
    functions: BTreeMap<Bdf, Function>,
    mmio32: Allocator,
    mmio64: Allocator,
    io: Allocator,
    ecam_base: u64,
    bus_count: u16,
    memory: Option<Arc<dyn MemoryMapper>>,
    intx: Option<IntxRouting>,
    intx_lines: Arc<SharedLines>,
}

impl PciRoot {
    /// A root with the board's host bridge and windows. Windows must not wrap or overlap
    /// each other or ECAM; the I/O window lies in port space and the 32-bit one below 4 GiB.
    pub fn new(config: PciRootConfig) -> Result<PciRoot, PciError> {
        let PciRootConfig { host_bridge, mmio32, mmio64, io, ecam_base, bus_count, memory, intx } =
            config;
        if bus_count == 0 || bus_count > 256 {
            return Err(PciError::InvalidBusCount(bus_count));
        }
        let ecam = PciWindow::new(ecam_base, u64::from(bus_count) * ECAM_BUS_SIZE);
        let wraps = |w: &PciWindow| w.start.checked_add(w.size).is_none();
        let invalid = |w: &PciWindow| PciError::InvalidWindow { start: w.start, size: w.size };
        for window in [&mmio32, &mmio64, &io, &ecam] {
            if wraps(window) {
                return Err(invalid(window));
            }
        }
        if io.start + io.size > IO_SPACE_END {
            return Err(invalid(&io));
        }
        if mmio32.start + mmio32.size > 1 << 32 {
            return Err(invalid(&mmio32));
        }
        if ecam_base % ECAM_BUS_SIZE != 0 || ecam.overlaps(&mmio32) || ecam.overlaps(&mmio64) {
            return Err(invalid(&ecam));
        }
        if mmio32.overlaps(&mmio64) {
            return Err(invalid(&mmio64));
        }
        let mut functions = BTreeMap::new();
        functions.insert(
            Bdf { bus: 0, device: 0, function: 0 },
            Function {
                device: Arc::new(Mutex::new(host_bridge)),
                bars: Vec::new(),
                decoded: Vec::new(),
                ram: Vec::new(),
            },
        );
        Ok(PciRoot {
            functions,
            mmio32: Allocator::new(mmio32),
            mmio64: Allocator::new(mmio64),
            io: Allocator::new(io),
            ecam_base,
            bus_count,
            memory,
            intx,
            intx_lines: Arc::new(SharedLines::default()),
        })
    }

    /// Where the machine inserts [`PciConfigMmio`].
    pub fn ecam_base(&self) -> u64 {
        self.ecam_base
    }

    pub fn ecam_size(&self) -> u64 {
        u64::from(self.bus_count) * ECAM_BUS_SIZE
    }

    /// The memory windows, where the machine inserts a [`PciMmioWindow`] each (empty ones
    /// left out).
    pub fn mmio_windows(&self) -> Vec<PciWindow> {
        [self.mmio32.window, self.mmio64.window].into_iter().filter(|w| !w.is_empty()).collect()
    }

    /// The I/O window, where the machine inserts a [`PciIoWindow`] (unless empty).
    pub fn io_window(&self) -> PciWindow {
        self.io.window
    }

    /// Puts `device` at the next free device number on bus 0 (function 0), as
    /// [`PciRoot::add_device_at`] does.
    pub fn add_device(&mut self, device: Box<dyn PciDevice>) -> Result<Bdf, PciError> {
        let bdf = (0..DEVICES_PER_BUS)
            .filter_map(|d| Bdf::new(0, d, 0))
            .find(|b| !self.functions.keys().any(|f| f.bus == 0 && f.device == b.device))
            .ok_or(PciError::NoFreeSlot)?;
        self.add_device_at(bdf, device)?;
        Ok(bdf)
    }

    /// Puts `device` at `bdf` and programs its BARs inside the windows, with memory decoding
    /// (I/O decoding too if it has I/O BARs) and bus mastering on, as firmware would; a ROM
    /// gets an address but stays disabled. RAM BARs are mapped where they land. A function
    /// with an interrupt pin gets the line the board routes it to. Guests look for function
    /// 0 of a device before its others.
    pub fn add_device_at(&mut self, bdf: Bdf, device: Box<dyn PciDevice>) -> Result<(), PciError> {
        if u16::from(bdf.bus) >= self.bus_count {
            return Err(PciError::BusOutOfRange(bdf));
        }
        if self.functions.contains_key(&bdf) {
            return Err(PciError::FunctionTaken(bdf));
        }
        let mut device = device;
        let declared = device.bars();
        let (mut mmio32, mut mmio64, mut io) = (self.mmio32, self.mmio64, self.io);
        let mut assigned = Vec::new();
        for bar in &declared {
            if !bar.size.is_power_of_two() {
                return Err(PciError::InvalidBarSize { index: bar.index, size: bar.size });
            }
            if bar.ram.is_some() && self.memory.is_none() {
                return Err(PciError::NoMemoryMapper { index: bar.index });
            }
            let allocator = match bar.kind {
                PciBarKind::Io => &mut io,
                PciBarKind::Memory64 if !mmio64.window.is_empty() => &mut mmio64,
                _ => &mut mmio32,
            };
            let start =
                allocator.allocate(bar.size).ok_or(PciError::WindowFull { size: bar.size })?;
            assigned.push((bar.clone(), start));
        }
        let mut has_io = false;
        for (bar, start) in &assigned {
            let write = |device: &mut Box<dyn PciDevice>, reg: usize, value: u32| {
                device.write_config_register(reg, 0, &value.to_le_bytes());
            };
            match bar.kind {
                PciBarKind::Rom => write(&mut device, ROM_BAR_REG, *start as u32),
                kind => {
                    let reg = config::BAR0_REG + bar.index as usize;
                    write(&mut device, reg, *start as u32);
                    if kind == PciBarKind::Memory64 {
                        write(&mut device, reg + 1, (*start >> 32) as u32);
                    }
                    has_io |= kind == PciBarKind::Io;
                }
            }
        }
        let mut command = device.read_config_register(COMMAND_REG) as u16
            | (COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER) as u16;
        if has_io {
            command |= COMMAND_IO_SPACE as u16;
        }
        device.write_config_register(COMMAND_REG, 0, &command.to_le_bytes());
        self.connect_intx(bdf, device.as_mut());
        let (ram, bars): (Vec<_>, Vec<_>) = declared.into_iter().partition(|b| b.ram.is_some());
        let ram = ram
            .into_iter()
            .filter_map(|bar| {
                Some(RamBar {
                    index: bar.index,
                    kind: bar.kind,
                    memory: bar.ram?,
                    mapped: None,
                    refusal_logged: false,
                })
            })
            .collect();
        let mut function =
            Function { device: Arc::new(Mutex::new(device)), bars, decoded: Vec::new(), ram };
        if let Err((index, address, source)) =
            function.refresh(bdf, &self.decoding(), Report::Changes)
        {
            function.unmap_ram(bdf, self.memory.as_deref());
            return Err(PciError::RamBarMap { bdf, index, address, source });
        }
        self.functions.insert(bdf, function);
        (self.mmio32, self.mmio64, self.io) = (mmio32, mmio64, io);
        Ok(())
    }

    fn decoding(&self) -> Decoding {
        Decoding {
            memory: self.memory.clone(),
            windows: [self.mmio32.window, self.mmio64.window],
            io_window: self.io.window,
        }
    }

    /// Gives a function with an interrupt pin the line the board routes it to, and writes
    /// the interrupt line register as firmware would.
    fn connect_intx(&self, bdf: Bdf, device: &mut dyn PciDevice) {
        let pin = (device.read_config_register(INTERRUPT_REG) >> 8) as u8;
        let Some(pin) = IntxPin::from_config(pin) else { return };
        let Some(routing) = &self.intx else {
            log::debug!("PCI {bdf}: INT{pin:?} has no routing");
            return;
        };
        let Some(gsi) = routing.router.route(bdf, pin) else { return };
        // 0xff: "unknown or not connected" for lines beyond the register.
        let line = u8::try_from(gsi).unwrap_or(0xff);
        device.write_config_register(INTERRUPT_REG, 0, &[line]);
        device.set_intx_line(IntxLine::new(gsi, routing.sink.clone(), self.intx_lines.clone()));
    }

    /// The address BAR `index` of `bdf` holds now (what the guest last wrote).
    pub fn bar_address(&self, bdf: Bdf, index: u8) -> Option<u64> {
        let function = self.functions.get(&bdf)?;
        let kind = function
            .bars
            .iter()
            .map(|b| (b.index, b.kind))
            .chain(function.ram.iter().map(|r| (r.index, r.kind)))
            .find(|(i, _)| *i == index)?
            .1;
        let mut device = lock(&function.device);
        Some(config::bar_address(kind, |reg| device.read_config_register(reg), index))
    }

    /// Reads configuration dword `reg` of `bdf`; absent functions read all-ones. Function 0
    /// of a device with other functions reports itself multi-function.
    pub fn config_read(&mut self, bdf: Bdf, reg: usize) -> u32 {
        let Some(function) = self.functions.get(&bdf) else {
            return u32::MAX;
        };
        let value = lock(&function.device).read_config_register(reg);
        if reg == HEADER_TYPE_REG && bdf.function == 0 && self.has_other_functions(bdf) {
            value | HEADER_TYPE_MULTI_FUNCTION
        } else {
            value
        }
    }

    fn has_other_functions(&self, bdf: Bdf) -> bool {
        self.functions.keys().any(|f| f.bus == bdf.bus && f.device == bdf.device && f.function != 0)
    }

    /// Writes bytes into configuration dword `reg` of `bdf`.
    pub fn config_write(&mut self, bdf: Bdf, reg: usize, offset: u64, data: &[u8]) {
        let ctx = self.decoding();
        if let Some(function) = self.functions.get_mut(&bdf) {
            lock(&function.device).write_config_register(reg, offset, data);
            // Any write may have moved a BAR or toggled decoding; a refused RAM BAR is
            // logged and stays unmapped.
            let _ = function.refresh(bdf, &ctx, Report::Changes);
        }
    }

    /// The address of every function, the host bridge first.
    pub fn functions(&self) -> Vec<Bdf> {
        self.functions.keys().copied().collect()
    }

    /// The state of the function at `bdf` (its configuration space included). Call it with
    /// the vCPUs paused and I/O quiesced ([`PciRoot::quiesce_io`]), so no queue moves while
    /// it is saved.
    pub fn save_function(&self, bdf: Bdf) -> Result<Vec<u8>, StateError> {
        match self.functions.get(&bdf) {
            Some(function) => lock(&function.device).save_state(),
            None => Err(StateError::invalid("PCI bus", format!("no function at {bdf}"))),
        }
    }

    /// Restores the function at `bdf` and brings its BAR decoding and RAM BAR mappings in
    /// line with the restored registers; a refused state leaves the function as it was.
    pub fn restore_function(&mut self, bdf: Bdf, bytes: &[u8]) -> Result<(), StateError> {
        let ctx = self.decoding();
        let Some(function) = self.functions.get_mut(&bdf) else {
            return Err(StateError::invalid("PCI bus", format!("no function at {bdf}")));
        };
        lock(&function.device).restore_state(bytes)?;
        // A RAM BAR the restored registers put where it cannot go is logged and stays
        // unmapped, as after a guest's own write. The device hears where every BAR decodes:
        // what it was told before belonged to the registers it just replaced.
        let _ = function.refresh(bdf, &ctx, Report::All);
        Ok(())
    }

    /// Stops every device's I/O threads and waits for them: an in-flight request finishes
    /// first, and afterwards no device touches guest memory until [`PciRoot::resume_io`].
    pub fn quiesce_io(&mut self) {
        for function in self.functions.values() {
            lock(&function.device).quiesce();
        }
    }

    /// Restarts the I/O threads and serves what the guest queued while they were stopped.
    pub fn resume_io(&mut self) {
        for function in self.functions.values() {
            lock(&function.device).resume();
        }
    }

    fn target(&self, space: Space, addr: u64) -> Option<(SharedDevice, u8, u64)> {
        self.functions.values().find_map(|function| {
            function
                .decoded
                .iter()
                .find(|d| d.space == space && addr >= d.start && addr - d.start < d.size)
                .map(|d| (function.device.clone(), d.bar, addr - d.start))
        })
    }

    /// The device, BAR and offset that decode guest-physical `addr`, if any.
    pub fn mmio_target(&self, addr: u64) -> Option<(SharedDevice, u8, u64)> {
        self.target(Space::Memory, addr)
    }

    /// The device, BAR and offset that decode port `port`, if any.
    pub fn io_target(&self, port: u64) -> Option<(SharedDevice, u8, u64)> {
        self.target(Space::Io, port)
    }
}

impl Drop for PciRoot {
    /// RAM BARs leave the guest before their host memory can go.
    fn drop(&mut self) {
        for (bdf, function) in &mut self.functions {
            function.unmap_ram(*bdf, self.memory.as_deref());
        }
    }
}

/// Reads through the root's dispatch in `space`; false when no BAR decodes `addr`. The root
/// is unlocked before the device is entered.
fn dispatch_read(root: &Mutex<PciRoot>, space: Space, addr: u64, data: &mut [u8]) -> bool {
    let target = lock(root).target(space, addr);
    match target {
        Some((device, bar, offset)) => {
            lock(&device).bar_read(bar, offset, data);
            true
        }
        None => false,
    }
}

/// Writes through the root's dispatch; false when no BAR decodes `addr`. ROM writes are
/// claimed and dropped.
fn dispatch_write(root: &Mutex<PciRoot>, space: Space, addr: u64, data: &[u8]) -> bool {
    let target = lock(root).target(space, addr);
    match target {
        Some((_, ROM_BAR_INDEX, _)) => true,
        Some((device, bar, offset)) => {
            lock(&device).bar_write(bar, offset, data);
            true
        }
        None => false,
    }
}

/// Reads through the root's MMIO dispatch; false when no BAR decodes `addr`.
pub fn mmio_read(root: &Mutex<PciRoot>, addr: u64, data: &mut [u8]) -> bool {
    dispatch_read(root, Space::Memory, addr, data)
}

/// Writes through the root's MMIO dispatch; false when no BAR decodes `addr`.
pub fn mmio_write(root: &Mutex<PciRoot>, addr: u64, data: &[u8]) -> bool {
    dispatch_write(root, Space::Memory, addr, data)
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
/// 0xCFC..0xCFF (any size). Insert at port 0xCF8, length [`PciConfigIo::LEN`].
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

    /// (function, register) selected by CONFIG_ADDRESS, if enabled.
    fn target(&self) -> Option<(Bdf, usize)> {
        let a = self.address;
        if a & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bdf = Bdf::new((a >> 16) as u8, ((a >> 11) & 0x1f) as u8, ((a >> 8) & 0x7) as u8)?;
        Some((bdf, ((a >> 2) & 0x3f) as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let (Some(byte), Some((bdf, reg))) =
                    (dword_access(offset - 4, data.len()), self.target())
                else {
                    return;
                };
                let value = lock(&self.root).config_read(bdf, reg);
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
                let (Some(byte), Some((bdf, reg))) =
                    (dword_access(offset - 4, data.len()), self.target())
                else {
                    return;
                };
                lock(&self.root).config_write(bdf, reg, byte, data);
            }
            _ => {}
        }
    }
}

/// ECAM. Insert at [`PciRoot::ecam_base`], length [`PciRoot::ecam_size`].
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn target(offset: u64, len: usize) -> Option<(Bdf, usize, u64)> {
        let byte = dword_access(offset, len)?;
        let bus = u8::try_from(offset >> 20).ok()?;
        let bdf = Bdf::new(bus, ((offset >> 15) & 0x1f) as u8, ((offset >> 12) & 0x7) as u8)?;
        Some((bdf, ((offset & 0xfff) >> 2) as usize, byte))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some((bdf, reg, byte)) = Self::target(offset, data.len()) {
            let value = lock(&self.root).config_read(bdf, reg);
            extract(value, byte, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bdf, reg, byte)) = Self::target(offset, data.len()) {
            lock(&self.root).config_write(bdf, reg, byte, data);
        }
    }
}

/// A PCI memory window: routes accesses to the BAR that decodes them; unclaimed reads return
/// all-ones. Insert at `base` (one of [`PciRoot::mmio_windows`]) with the window's size.
pub struct PciMmioWindow {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
}

impl PciMmioWindow {
    pub fn new(root: Arc<Mutex<PciRoot>>, base: u64) -> Self {
        PciMmioWindow { root, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !dispatch_read(&self.root, Space::Memory, self.base + offset, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        dispatch_write(&self.root, Space::Memory, self.base + offset, data);
    }
}

/// The PCI I/O window on the port bus: routes port accesses to the I/O BAR that decodes
/// them; unclaimed reads return all-ones. Insert at [`PciRoot::io_window`].
pub struct PciIoWindow {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
}

impl PciIoWindow {
    pub fn new(root: Arc<Mutex<PciRoot>>, base: u64) -> Self {
        PciIoWindow { root, base }
    }
}

impl BusDevice for PciIoWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !dispatch_read(&self.root, Space::Io, self.base + offset, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        dispatch_write(&self.root, Space::Io, self.base + offset, data);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use crate::memory::slots::MemorySlots;
    use crate::pci::config::CLASS_OTHER;
    use crate::pci::IntxRouter;

    const MMIO32: PciWindow = PciWindow::new(0xc000_0000, 0x2000_0000);
    const IO: PciWindow = PciWindow::new(0xc000, 0x4000);
    const ECAM: u64 = 0xe000_0000;

    fn config() -> PciRootConfig {
        PciRootConfig {
            host_bridge: Box::new(PciHostBridge::new(0x8086, 0x0d57)),
            mmio32: MMIO32,
            mmio64: PciWindow::EMPTY,
            io: IO,
            ecam_base: ECAM,
            bus_count: 1,
            memory: None,
            intx: None,
        }
    }

    fn root_with(config: PciRootConfig) -> Arc<Mutex<PciRoot>> {
        Arc::new(Mutex::new(PciRoot::new(config).unwrap()))
    }

    type WriteLog = Arc<Mutex<Vec<(u8, u64, Vec<u8>)>>>;

    /// What the root told a function: (BAR, where it decodes).
    type DecodeLog = Arc<Mutex<Vec<(u8, Option<u64>)>>>;

    /// A function with the given BARs that remembers BAR writes and where the root said its
    /// BARs decode, and reads back a pattern.
    struct TestDevice {
        config: PciConfiguration,
        writes: WriteLog,
        decoded: DecodeLog,
        line: Option<IntxLine>,
    }

    impl TestDevice {
        fn with_bars(bars: Vec<PciBar>) -> (Self, WriteLog) {
            let mut config = PciConfiguration::new(PciHeader {
                vendor_id: 0x1234,
                device_id: 0x5678,
                revision: 0,
                class_code: CLASS_OTHER,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            for bar in bars {
                config.add_bar(bar).unwrap();
            }
            let writes = Arc::new(Mutex::new(Vec::new()));
            let decoded = Arc::default();
            (TestDevice { config, writes: writes.clone(), decoded, line: None }, writes)
        }

        /// One 64-bit memory BAR 0 of `bar_size` bytes.
        fn new(bar_size: u64) -> (Self, WriteLog) {
            Self::with_bars(vec![bar(0, bar_size, PciBarKind::Memory64)])
        }
    }

    fn bar(index: u8, size: u64, kind: PciBarKind) -> PciBar {
        PciBar { index, size, kind, prefetchable: false, ram: None }
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
            if let Some(line) = &self.line {
                line.set_level(data.first() == Some(&1));
            }
        }
        fn set_intx_line(&mut self, line: IntxLine) {
            self.line = Some(line);
        }
        fn bar_decoded(&mut self, index: u8, address: Option<u64>) {
            self.decoded.lock().unwrap().push((index, address));
        }
        fn save_state(&self) -> Result<Vec<u8>, StateError> {
            state::encode("test", &self.config.registers())
        }
        fn restore_state(&mut self, saved: &[u8]) -> Result<(), StateError> {
            let regs: Vec<u32> = state::decode("test", saved)?;
            self.config.restore_registers(&regs).map_err(|e| StateError::rejected("test", e))
        }
    }

    /// A function that cannot be saved.
    struct Stateless(PciConfiguration);

    impl PciDevice for Stateless {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.0.read_reg(reg)
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.0.write_reg(reg, offset, data);
        }
        fn bars(&self) -> Vec<PciBar> {
            Vec::new()
        }
        fn bar_read(&mut self, _bar: u8, _offset: u64, _data: &mut [u8]) {}
        fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
    }

    fn cf8_bdf(io: &mut PciConfigIo, bdf: Bdf, reg: u32) {
        let address = 0x8000_0000
            | u32::from(bdf.bus()) << 16
            | u32::from(bdf.device()) << 11
            | u32::from(bdf.function()) << 8
            | reg << 2;
        io.write(0, &address.to_le_bytes());
    }

    fn cf8(io: &mut PciConfigIo, dev: u8, reg: u32) {
        cf8_bdf(io, Bdf::new(0, dev, 0).unwrap(), reg);
    }

    fn cfc_read(io: &mut PciConfigIo, dev: u8, reg: u32) -> u32 {
        cf8(io, dev, reg);
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn cfc_write(io: &mut PciConfigIo, dev: u8, reg: u32, value: u32) {
        cf8(io, dev, reg);
        io.write(4, &value.to_le_bytes());
    }

    fn setup() -> (Arc<Mutex<PciRoot>>, WriteLog) {
        let root = root_with(config());
        let (dev, writes) = TestDevice::new(0x4000);
        let bdf = root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        assert_eq!(bdf.to_string(), "00:01.0");
        (root, writes)
    }

    fn window(root: &Arc<Mutex<PciRoot>>) -> PciMmioWindow {
        PciMmioWindow::new(root.clone(), MMIO32.start)
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
    fn absent_slots_functions_and_buses_read_all_ones() {
        let (root, _) = setup();
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(cfc_read(&mut io, 7, 0), u32::MAX);
        io.write(0, &(0x8000_0000u32 | 1 << 11 | 1 << 8).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        cf8_bdf(&mut io, Bdf::new(1, 1, 0).unwrap(), 0);
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1 does not exist");
        let mut ecam = PciConfigMmio::new(root);
        ecam.read(3 << 15, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
    }

    #[test]
    fn bars_are_preprogrammed_aligned_and_decoding() {
        let root = root_with(config());
        let (small, _) = TestDevice::new(0x1000);
        let (big, _) = TestDevice::new(0x10_0000);
        root.lock().unwrap().add_device(Box::new(small)).unwrap();
        root.lock().unwrap().add_device(Box::new(big)).unwrap();
        let mut io = PciConfigIo::new(root);
        assert_eq!(cfc_read(&mut io, 1, 4), 0xc000_0004);
        assert_eq!(cfc_read(&mut io, 2, 4), 0xc010_0004);
        assert_eq!(cfc_read(&mut io, 2, 5), 0);
        assert_eq!(cfc_read(&mut io, 2, 1) & 0x7, 0x6, "memory and bus master, no I/O");
    }

    #[test]
    fn a_64_bit_window_takes_64_bit_bars() {
        let root = root_with(PciRootConfig {
            mmio64: PciWindow::new(0x80_0000_0000, 0x10_0000_0000),
            ..config()
        });
        let (dev, _) = TestDevice::with_bars(vec![
            bar(0, 0x4000, PciBarKind::Memory64),
            bar(2, 0x1000, PciBarKind::Memory32),
        ]);
        let bdf = root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        assert_eq!(root.lock().unwrap().bar_address(bdf, 0), Some(0x80_0000_0000));
        assert_eq!(root.lock().unwrap().bar_address(bdf, 2), Some(0xc000_0000));
        assert_eq!(root.lock().unwrap().mmio_windows().len(), 2);
        let mut d = [0u8; 1];
        assert!(mmio_read(&root, 0x80_0000_0010, &mut d));
        assert_eq!(d, [0x10]);
    }

    #[test]
    fn bar_sizing_through_config_ports_for_each_kind() {
        let root = root_with(config());
        let (dev, _) = TestDevice::with_bars(vec![
            bar(0, 0x4000, PciBarKind::Memory64),
            bar(2, 0x1000, PciBarKind::Memory32),
            bar(3, 0x40, PciBarKind::Io),
            bar(ROM_BAR_INDEX, 0x10000, PciBarKind::Rom),
        ]);
        root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        let mut io = PciConfigIo::new(root);
        for (reg, mask) in
            [(4, 0xffff_c004), (5, u32::MAX), (6, 0xffff_f000), (7, 0xffff_ffc1), (12, 0xffff_0001)]
        {
            cfc_write(&mut io, 1, reg, u32::MAX);
            assert_eq!(cfc_read(&mut io, 1, reg), mask, "register {reg}");
        }
    }

    #[test]
    fn io_and_rom_bars_are_assigned_and_gated_by_their_enable_bits() {
        let root = root_with(config());
        let (dev, writes) = TestDevice::with_bars(vec![
            bar(0, 0x1000, PciBarKind::Memory32),
            bar(1, 0x20, PciBarKind::Io),
            bar(ROM_BAR_INDEX, 0x8000, PciBarKind::Rom),
        ]);
        root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(cfc_read(&mut io, 1, 5), 0xc001, "I/O BAR at the I/O window's start");
        assert_eq!(cfc_read(&mut io, 1, 12), 0xc000_8000, "ROM placed, not enabled");
        assert_eq!(cfc_read(&mut io, 1, 1) & 0x7, 0x7, "I/O decoding on too");

        let mut ports = PciIoWindow::new(root.clone(), IO.start);
        let mut d = [0u8; 2];
        ports.read(0x4, &mut d);
        assert_eq!(d, [5, 5], "BAR 1, offset 4");
        ports.write(0x6, &[9]);
        assert_eq!(writes.lock().unwrap().as_slice(), &[(1, 6, vec![9])]);

        let mut mmio = window(&root);
        mmio.read(0x8010, &mut d);
        assert_eq!(d, [0xff; 2], "a disabled ROM decodes nothing");
        cfc_write(&mut io, 1, 12, 0xc000_8001);
        mmio.read(0x8010, &mut d);
        assert_eq!(d, [ROM_BAR_INDEX + 0x10; 2], "contents come from the device");
        mmio.write(0x8010, &[1]);
        assert_eq!(writes.lock().unwrap().len(), 1, "ROM writes never reach the device");

        // I/O decoding off: the port reads all-ones; memory decoding off: the ROM goes too.
        cfc_write(&mut io, 1, 1, 0x6);
        ports.read(0x4, &mut d);
        assert_eq!(d, [0xff; 2]);
        cfc_write(&mut io, 1, 1, 0x5);
        mmio.read(0x8010, &mut d);
        assert_eq!(d, [0xff; 2]);
    }

    #[test]
    fn moving_a_bar_moves_dispatch() {
        let (root, writes) = setup();
        let mut window = window(&root);
        let mut d = [0u8; 4];
        window.read(0x10, &mut d);
        assert_eq!(d, [0x10; 4]);
        let mut io = PciConfigIo::new(root.clone());
        cfc_write(&mut io, 1, 4, 0xc080_0000);
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
    fn moving_an_io_bar_moves_port_dispatch() {
        let root = root_with(config());
        let (dev, writes) = TestDevice::with_bars(vec![bar(0, 0x10, PciBarKind::Io)]);
        root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        cfc_write(&mut io, 1, 4, 0xd000);
        let mut ports = PciIoWindow::new(root, IO.start);
        let mut d = [0u8; 1];
        ports.read(0, &mut d);
        assert_eq!(d, [0xff], "the old port no longer decodes");
        ports.write(0x1002, &[3]);
        assert_eq!(writes.lock().unwrap().as_slice(), &[(0, 2, vec![3])]);
    }

    #[test]
    fn unclaimed_window_reads_all_ones() {
        let (root, _) = setup();
        let mut window = window(&root);
        let mut d = [0u8; 8];
        window.read(0x100_0000, &mut d);
        assert_eq!(d, [0xff; 8]);
    }

    #[test]
    fn full_bus_is_refused() {
        let root = root_with(config());
        for _ in 1..32 {
            root.lock().unwrap().add_device(Box::new(TestDevice::new(0x1000).0)).unwrap();
        }
        let err = root.lock().unwrap().add_device(Box::new(TestDevice::new(0x1000).0));
        assert!(matches!(err, Err(PciError::NoFreeSlot)));
    }

    #[test]
    fn bar_larger_than_the_window_is_refused() {
        let root = root_with(config());
        let huge = TestDevice::new(MMIO32.size * 2).0;
        let err = root.lock().unwrap().add_device(Box::new(huge));
        assert!(matches!(err, Err(PciError::WindowFull { .. })));
    }

    #[test]
    fn bad_windows_and_places_are_refused() {
        let bad = |config: PciRootConfig| PciRoot::new(config).is_err();
        assert!(bad(PciRootConfig { bus_count: 0, ..config() }));
        assert!(bad(PciRootConfig { io: PciWindow::new(0xf000, 0x2000), ..config() }));
        assert!(bad(PciRootConfig { mmio32: PciWindow::new(0xf000_0000, 1 << 30), ..config() }));
        assert!(bad(PciRootConfig { ecam_base: 0xd000_0000, ..config() }), "ECAM in the window");
        assert!(bad(PciRootConfig { mmio64: PciWindow::new(u64::MAX, 2), ..config() }));
        let root = root_with(config());
        let mut root = root.lock().unwrap();
        let taken = root.add_device_at(Bdf::new(0, 0, 0).unwrap(), Box::new(TestDevice::new(16).0));
        assert!(matches!(taken, Err(PciError::FunctionTaken(_))));
        let far = root.add_device_at(Bdf::new(1, 0, 0).unwrap(), Box::new(TestDevice::new(16).0));
        assert!(matches!(far, Err(PciError::BusOutOfRange(_))));
    }

    #[test]
    fn other_functions_make_function_0_multi_function_and_answer_on_both_paths() {
        let root = root_with(config());
        let at = |d, f| Bdf::new(0, d, f).unwrap();
        root.lock().unwrap().add_device_at(at(3, 0), Box::new(TestDevice::new(0x1000).0)).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(cfc_read(&mut io, 3, 3) & HEADER_TYPE_MULTI_FUNCTION, 0, "single function");
        let (second, _) = TestDevice::with_bars(vec![bar(0, 0x1000, PciBarKind::Memory32)]);
        root.lock().unwrap().add_device_at(at(3, 2), Box::new(second)).unwrap();
        assert_ne!(cfc_read(&mut io, 3, 3) & HEADER_TYPE_MULTI_FUNCTION, 0);
        cf8_bdf(&mut io, at(3, 2), 0);
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234, "00:03.2 through 0xCF8");
        cf8_bdf(&mut io, at(3, 2), 3);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d) & HEADER_TYPE_MULTI_FUNCTION, 0, "only function 0");
        let mut ecam = PciConfigMmio::new(root.clone());
        ecam.read(3 << 15 | 2 << 12 | 0x10, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xc000_1000, "00:03.2's BAR through ECAM");
        assert_eq!(
            root.lock().unwrap().add_device(Box::new(TestDevice::new(16).0)).unwrap(),
            at(1, 0)
        );
        assert_eq!(
            root.lock().unwrap().add_device(Box::new(TestDevice::new(16).0)).unwrap(),
            at(2, 0)
        );
        assert_eq!(
            root.lock().unwrap().add_device(Box::new(TestDevice::new(16).0)).unwrap(),
            at(4, 0),
            "device 3 is taken by its functions"
        );
    }

    /// Every function's state, by address.
    fn save_all(root: &Mutex<PciRoot>) -> Vec<(Bdf, Vec<u8>)> {
        let root = root.lock().unwrap();
        root.functions().into_iter().map(|bdf| (bdf, root.save_function(bdf).unwrap())).collect()
    }

    #[test]
    fn restore_moves_bar_dispatch_and_config_address_to_the_saved_state() {
        let (root, _) = setup();
        let mut io = PciConfigIo::new(root.clone());
        cfc_write(&mut io, 1, 4, 0xc080_0000);
        cf8(&mut io, 1, 15);
        io.write(4, &[0x0b]);
        let saved = save_all(&root);
        let addresses: Vec<String> = saved.iter().map(|(bdf, _)| bdf.to_string()).collect();
        assert_eq!(addresses, ["00:00.0", "00:01.0"]);
        let io_saved = io.save_state();

        let (fresh, writes) = setup();
        for (bdf, bytes) in &saved {
            fresh.lock().unwrap().restore_function(*bdf, bytes).unwrap();
        }
        assert_eq!(save_all(&fresh), saved);
        let mut window = window(&fresh);
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
    fn state_for_a_missing_function_or_one_it_refuses_changes_nothing() {
        let (root, _) = setup();
        let mut io = PciConfigIo::new(root.clone());
        let before = save_all(&root);
        let device_1 = Bdf::new(0, 1, 0).unwrap();
        let absent = Bdf::new(0, 5, 0).unwrap();
        assert!(root.lock().unwrap().save_function(absent).is_err());
        let bytes = root.lock().unwrap().save_function(device_1).unwrap();
        assert!(matches!(
            root.lock().unwrap().restore_function(absent, &bytes),
            Err(StateError::Invalid { .. })
        ));
        let wrong = state::encode("x", &vec![0u32; 3]).unwrap();
        assert!(root.lock().unwrap().restore_function(device_1, &wrong).is_err());
        assert!(root.lock().unwrap().restore_function(device_1, &[1, 2]).is_err());
        assert_eq!(save_all(&root), before, "nothing changed");
        assert_eq!(cfc_read(&mut io, 1, 4), 0xc000_0004, "00:01.0 is where it was");
        let mut d = [0u8; 1];
        assert!(mmio_read(&root, 0xc000_0000, &mut d), "and decodes there");

        // A function without state says so.
        let with_stateless = root_with(config());
        let header = PciHeader {
            vendor_id: 1,
            device_id: 2,
            revision: 0,
            class_code: CLASS_OTHER,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        };
        let stateless = Stateless(PciConfiguration::new(header));
        let bdf = with_stateless.lock().unwrap().add_device(Box::new(stateless)).unwrap();
        assert!(with_stateless.lock().unwrap().save_function(bdf).is_err());
        assert!(with_stateless.lock().unwrap().restore_function(bdf, &bytes).is_err());
    }

    /// Records map and unmap calls; refuses what the slot registry refuses.
    #[derive(Default)]
    struct RecordingMapper {
        slots: MemorySlots,
        calls: Mutex<Vec<String>>,
    }

    impl MemoryMapper for RecordingMapper {
        fn map(&self, guest_addr: u64, memory: &HostMemory) -> Result<u32, SlotError> {
            let region = self.slots.allocate(guest_addr, memory.len(), memory.host_addr())?;
            self.calls.lock().unwrap().push(format!("map {guest_addr:#x} slot {}", region.slot));
            Ok(region.slot)
        }
        fn unmap(&self, slot: u32) -> Result<(), SlotError> {
            self.slots.release(slot).ok_or(SlotError::UnknownSlot(slot))?;
            self.calls.lock().unwrap().push(format!("unmap slot {slot}"));
            Ok(())
        }
    }

    impl RecordingMapper {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    /// 16 MiB of host memory for a RAM BAR (never touched: the recording mapper maps nothing).
    fn host_memory() -> HostMemory {
        let region = Arc::new(vm_memory::MmapRegion::<()>::new(16 << 20).unwrap());
        let addr = region.as_ptr();
        // SAFETY: `region` is a live anonymous mapping kept alive by the `HostMemory`.
        unsafe { HostMemory::new(addr, 16 << 20, true, region) }.unwrap()
    }

    fn ram_device() -> TestDevice {
        TestDevice::with_bars(vec![
            PciBar {
                index: 0,
                size: 16 << 20,
                kind: PciBarKind::Memory32,
                prefetchable: true,
                ram: Some(host_memory()),
            },
            bar(2, 0x4000, PciBarKind::Memory64),
        ])
        .0
    }

    fn ram_setup() -> (Arc<Mutex<PciRoot>>, Arc<RecordingMapper>) {
        let mapper = Arc::new(RecordingMapper::default());
        // Guest RAM below the window, as the machine maps it first.
        mapper.slots.allocate(0, 0x4000_0000, 0x7000_0000_0000).unwrap();
        let root = root_with(PciRootConfig { memory: Some(mapper.clone()), ..config() });
        root.lock().unwrap().add_device(Box::new(ram_device())).unwrap();
        (root, mapper)
    }

    #[test]
    fn a_ram_bar_is_mapped_where_it_lands_and_moves_when_the_guest_moves_it() {
        let (root, mapper) = ram_setup();
        assert_eq!(mapper.take(), ["map 0xc0000000 slot 1"], "first BAR at the window start");
        let bdf = Bdf::new(0, 1, 0).unwrap();
        assert_eq!(root.lock().unwrap().bar_address(bdf, 2), Some(0xc100_0000), "BAR 2 after it");
        let mut d = [0u8; 1];
        assert!(!mmio_read(&root, 0xc000_0010, &mut d), "RAM BAR accesses are not dispatched");

        let mut io = PciConfigIo::new(root.clone());
        cfc_write(&mut io, 1, 4, 0xd000_0000);
        assert_eq!(mapper.take(), ["unmap slot 1", "map 0xd0000000 slot 1"]);
        // Sizing with decoding off (as Linux does): unmapped, then back where it was.
        cfc_write(&mut io, 1, 1, 0x4);
        cfc_write(&mut io, 1, 4, u32::MAX);
        assert_eq!(cfc_read(&mut io, 1, 4), 0xff00_0008);
        cfc_write(&mut io, 1, 4, 0xd000_0000);
        cfc_write(&mut io, 1, 1, 0x6);
        assert_eq!(mapper.take(), ["unmap slot 1", "map 0xd0000000 slot 1"]);
        cfc_write(&mut io, 1, 15, 0x0b);
        assert!(mapper.take().is_empty(), "unrelated writes leave the mapping alone");

        drop(io);
        drop(root);
        assert_eq!(mapper.take(), ["unmap slot 1"], "dropping the root unmaps it");
    }

    #[test]
    fn a_ram_bar_over_ram_another_mapping_or_outside_the_windows_is_not_mapped() {
        let (root, mapper) = ram_setup();
        root.lock().unwrap().add_device(Box::new(ram_device())).unwrap();
        mapper.take();
        let mut io = PciConfigIo::new(root.clone());
        // Onto the other RAM BAR: refused by the registry, logged, left unmapped.
        cfc_write(&mut io, 2, 4, 0xc000_0000);
        assert_eq!(mapper.take(), ["unmap slot 2"]);
        // Over guest RAM or the ECAM (outside every window), or wrapping: never mapped.
        for address in [0x1000_0000, 0xe000_0000, 0xff00_0000] {
            cfc_write(&mut io, 2, 4, address);
            assert!(mapper.take().is_empty(), "{address:#x}");
        }
        cfc_write(&mut io, 2, 4, 0xd000_0000);
        assert_eq!(mapper.take(), ["map 0xd0000000 slot 2"], "a free place maps again");
        let regions = mapper.slots.regions();
        assert_eq!(regions.len(), 3, "RAM and two BARs: {regions:?}");
    }

    #[test]
    fn a_ram_bar_needs_a_mapper_and_restore_maps_it_at_the_saved_address() {
        let root = root_with(config());
        let err = root.lock().unwrap().add_device(Box::new(ram_device()));
        assert!(matches!(err, Err(PciError::NoMemoryMapper { index: 0 })));

        let (root, _) = ram_setup();
        cfc_write(&mut PciConfigIo::new(root.clone()), 1, 4, 0xd000_0000);
        let saved = save_all(&root);
        let (fresh, mapper) = ram_setup();
        mapper.take();
        for (bdf, bytes) in &saved {
            fresh.lock().unwrap().restore_function(*bdf, bytes).unwrap();
        }
        assert_eq!(mapper.take(), ["unmap slot 1", "map 0xd0000000 slot 1"]);
    }

    struct Router;

    impl IntxRouter for Router {
        fn route(&self, bdf: Bdf, pin: IntxPin) -> Option<u32> {
            // The PC swizzle onto GSIs 16..19.
            Some(16 + (u32::from(bdf.device()) + pin as u32 - 1) % 4)
        }
    }

    #[test]
    fn a_function_with_a_pin_gets_the_routed_line_and_drives_it() {
        let lines = Arc::new(crate::testing::IrqLog::default());
        let routing = IntxRouting { router: Arc::new(Router), sink: lines.clone() };
        let root = root_with(PciRootConfig { intx: Some(routing), ..config() });
        let (mut dev, _) = TestDevice::new(0x1000);
        dev.config.set_interrupt_pin(Some(IntxPin::B));
        let bdf = root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        let no_pin = root.lock().unwrap().add_device(Box::new(TestDevice::new(0x1000).0)).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(cfc_read(&mut io, bdf.device(), 15), 0x0212, "pin B, line 18");
        assert_eq!(cfc_read(&mut io, no_pin.device(), 15), 0, "no pin, no line");
        cfc_write(&mut io, bdf.device(), 15, 0x0400);
        assert_eq!(cfc_read(&mut io, bdf.device(), 15), 0x0200, "the pin is read-only");
        assert!(mmio_write(&root, 0xc000_0000, &[1]));
        assert!(mmio_write(&root, 0xc000_0000, &[0]));
        assert_eq!(lines.lines(), [(18, true), (18, false)]);
    }

    /// 00:01.0 with a 64-bit memory BAR 0, a 32-bit one at 2 and an I/O BAR at 3, on a root
    /// with a 64-bit window up to a 46-bit physical-address limit; returns what it was told.
    fn reporting_setup() -> (Arc<Mutex<PciRoot>>, DecodeLog, WriteLog) {
        let root = root_with(PciRootConfig {
            mmio64: PciWindow::new(0x100_0000_0000, (1 << 46) - 0x100_0000_0000),
            ..config()
        });
        let (dev, writes) = TestDevice::with_bars(vec![
            bar(0, 0x4000, PciBarKind::Memory64),
            bar(2, 0x1000, PciBarKind::Memory32),
            bar(3, 0x20, PciBarKind::Io),
        ]);
        let decoded = dev.decoded.clone();
        root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        (root, decoded, writes)
    }

    fn told(log: &DecodeLog) -> Vec<(u8, Option<u64>)> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn the_root_tells_a_function_where_each_bar_decodes_whenever_that_changes() {
        let (root, decoded, _) = reporting_setup();
        assert_eq!(
            told(&decoded),
            [(0, Some(0x100_0000_0000)), (2, Some(0xc000_0000)), (3, Some(0xc000))],
            "where the root placed them"
        );
        let mut io = PciConfigIo::new(root.clone());
        cfc_write(&mut io, 1, 15, 0x0b);
        assert!(told(&decoded).is_empty(), "unrelated writes tell nothing");
        cfc_write(&mut io, 1, 6, 0xd000_0000);
        assert_eq!(told(&decoded), [(2, Some(0xd000_0000))]);
        cfc_write(&mut io, 1, 1, 0x5);
        assert_eq!(told(&decoded), [(0, None), (2, None)], "memory decoding off");
        cfc_write(&mut io, 1, 1, 0x6);
        assert_eq!(told(&decoded), [(0, Some(0x100_0000_0000)), (2, Some(0xd000_0000)), (3, None)]);
        // Moved outside every window (onto guest RAM, the ECAM, beyond the limit): nowhere.
        for (reg, value) in [(6, 0x1000_0000), (6, ECAM as u32), (5, 0x4000), (5, 0x100)] {
            cfc_write(&mut io, 1, reg, value);
        }
        assert_eq!(told(&decoded), [(2, None), (0, None), (0, Some(0x100_0000_0000))]);
        let saved = root.lock().unwrap().save_function(Bdf::new(0, 1, 0).unwrap()).unwrap();
        root.lock().unwrap().restore_function(Bdf::new(0, 1, 0).unwrap(), &saved).unwrap();
        assert_eq!(
            told(&decoded),
            [(0, Some(0x100_0000_0000)), (2, None), (3, None)],
            "after a restore every BAR, changed or not"
        );
    }

    #[test]
    fn sizing_then_relocating_a_32_bit_bar_with_decoding_on_decodes_only_at_the_new_place() {
        let (root, decoded, writes) = reporting_setup();
        told(&decoded);
        let mut io = PciConfigIo::new(root.clone());
        cfc_write(&mut io, 1, 6, u32::MAX);
        assert_eq!(cfc_read(&mut io, 1, 6), 0xffff_f000, "4 KiB");
        assert_eq!(told(&decoded), [(2, None)], "the sizing address decodes nothing");
        let mut d = [0u8; 4];
        assert!(!mmio_read(&root, 0xc000_0000, &mut d), "nor does the old place");
        assert!(!mmio_read(&root, 0xffff_f000, &mut d));
        cfc_write(&mut io, 1, 6, 0xd100_0000);
        assert_eq!(told(&decoded), [(2, Some(0xd100_0000))]);
        assert!(mmio_write(&root, 0xd100_0010, &[5]));
        assert_eq!(writes.lock().unwrap().as_slice(), &[(2, 0x10, vec![5])]);
        // The I/O BAR the same way.
        cfc_write(&mut io, 1, 7, u32::MAX);
        assert_eq!(cfc_read(&mut io, 1, 7), 0xffff_ffe1);
        cfc_write(&mut io, 1, 7, 0xd040);
        assert_eq!(told(&decoded), [(3, None), (3, Some(0xd040))]);
    }

    #[test]
    fn sizing_then_relocating_a_64_bit_bar_reaches_the_top_of_the_64_bit_window() {
        let (root, decoded, writes) = reporting_setup();
        told(&decoded);
        let mut io = PciConfigIo::new(root.clone());
        // Firmware sizes each half; the low half with the high half still 0x100 is an
        // address inside the window (as real hardware would decode it), the high half
        // all-ones is not.
        cfc_write(&mut io, 1, 4, u32::MAX);
        cfc_write(&mut io, 1, 5, u32::MAX);
        assert_eq!((cfc_read(&mut io, 1, 4), cfc_read(&mut io, 1, 5)), (0xffff_c004, u32::MAX));
        assert_eq!(told(&decoded), [(0, Some(0x100_ffff_c000)), (0, None)]);
        let top = (1u64 << 46) - 0x4000;
        cfc_write(&mut io, 1, 4, top as u32);
        assert!(told(&decoded).is_empty(), "the high half is still being sized");
        cfc_write(&mut io, 1, 5, (top >> 32) as u32);
        assert_eq!(told(&decoded), [(0, Some(top))], "low half 0xffffc000, yet no sizing");
        let mut d = [0u8; 1];
        assert!(mmio_read(&root, top + 0x3fff, &mut d));
        assert_eq!(d, [0xff], "BAR 0, offset 0x3fff: the pattern's low byte");
        assert!(!mmio_read(&root, 0x100_0000_0000, &mut d), "the old place is gone");
        assert!(mmio_write(&root, top + 8, &[1]));
        assert_eq!(writes.lock().unwrap().as_slice(), &[(0, 8, vec![1])]);
        // Below 4 GiB too, as SeaBIOS puts them while the 32-bit window has room.
        cfc_write(&mut io, 1, 4, 0xd800_0000);
        cfc_write(&mut io, 1, 5, 0);
        assert_eq!(
            told(&decoded),
            [(0, Some(0x3fff_d800_0000)), (0, Some(0xd800_0000))],
            "in between, the new low half under the old high half"
        );
    }

    #[test]
    fn bars_moved_onto_another_or_to_garbage_decode_nothing_new_and_come_back() {
        let root = root_with(PciRootConfig {
            mmio64: PciWindow::new(0x100_0000_0000, 0x100_0000_0000),
            ..config()
        });
        let bars = || {
            vec![
                bar(0, 0x1000, PciBarKind::Memory32),
                bar(1, 0x20, PciBarKind::Io),
                bar(2, 0x4000, PciBarKind::Memory64),
            ]
        };
        let (first, first_writes) = TestDevice::with_bars(bars());
        let (second, second_writes) = TestDevice::with_bars(bars());
        root.lock().unwrap().add_device(Box::new(first)).unwrap();
        root.lock().unwrap().add_device(Box::new(second)).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        let first_bar0 = cfc_read(&mut io, 1, 4);
        let (second_bar0, second_bar1) = (cfc_read(&mut io, 2, 4), cfc_read(&mut io, 2, 5));
        let second_bar2 = (cfc_read(&mut io, 2, 6), cfc_read(&mut io, 2, 7));

        // Onto the other function's BAR: one of them takes the access, never both.
        cfc_write(&mut io, 2, 4, first_bar0);
        assert!(mmio_write(&root, u64::from(first_bar0) + 4, &[7]));
        let taken = first_writes.lock().unwrap().len() + second_writes.lock().unwrap().len();
        assert_eq!(taken, 1);
        assert!(!mmio_write(&root, u64::from(second_bar0), &[7]), "its old place is gone");

        // Garbage: over RAM, the ECAM, the LAPIC, across 4 GiB or the end of port space,
        // wrapping the 64-bit space, sizing addresses, unaligned values.
        let garbage = [
            (4, 0x0010_0000),
            (4, ECAM as u32),
            (4, 0xfee0_0000),
            (4, 0xffff_f000),
            (4, 0xffff_ffff),
            (4, 0x1234_5678),
            (5, 0xfff0),
            (5, 0xffff_ffff),
            (5, 0x0001_0000),
            (5, 0x3),
        ];
        for (reg, value) in garbage {
            cfc_write(&mut io, 2, reg, value);
        }
        for (low, high) in [(0xffff_c000, u32::MAX), (0, 0x8000_0000), (0xffff_fff0, 0x0fff_ffff)] {
            cfc_write(&mut io, 2, 6, low);
            cfc_write(&mut io, 2, 7, high);
        }
        let mut d = [0u8; 4];
        for addr in [0x0010_0000, ECAM, 0xfee0_0000, 0xffff_f000, 0xffff_ffff_ffff_c000] {
            assert!(!mmio_read(&root, addr, &mut d), "{addr:#x} decodes");
        }
        let mut ports = PciIoWindow::new(root.clone(), IO.start);
        ports.read(IO.size - 4, &mut d);
        assert_eq!(d, [0xff; 4], "nothing at the top of the I/O window");
        assert!(!mmio_write(&root, u64::from(second_bar2.0) + 8, &[1]), "the 64-bit BAR left");
        let total = first_writes.lock().unwrap().len() + second_writes.lock().unwrap().len();
        assert_eq!(total, 1, "no garbage address reached a function");

        // Put back where they were, they decode again.
        for (reg, value) in
            [(4, second_bar0), (5, second_bar1), (6, second_bar2.0), (7, second_bar2.1)]
        {
            cfc_write(&mut io, 2, reg, value);
        }
        second_writes.lock().unwrap().clear();
        assert!(mmio_write(&root, u64::from(second_bar0) + 1, &[1]));
        let bar2 = u64::from(second_bar2.1) << 32 | u64::from(second_bar2.0 & !0xf);
        assert!(mmio_write(&root, bar2 + 2, &[2]));
        ports.write(u64::from(second_bar1 & !3) - IO.start + 3, &[3]);
        assert_eq!(
            second_writes.lock().unwrap().as_slice(),
            &[(0, 1, vec![1]), (2, 2, vec![2]), (1, 3, vec![3])]
        );
    }

    #[test]
    fn a_rom_sized_with_decoding_on_decodes_nothing_there_and_moved_answers_at_its_new_place() {
        let root = root_with(config());
        let (dev, writes) =
            TestDevice::with_bars(vec![bar(ROM_BAR_INDEX, 0x8000, PciBarKind::Rom)]);
        root.lock().unwrap().add_device(Box::new(dev)).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        let placed = cfc_read(&mut io, 1, 12);
        // SeaBIOS sizes with the enable bit written too: all-ones.
        cfc_write(&mut io, 1, 12, u32::MAX);
        assert_eq!(cfc_read(&mut io, 1, 12), 0xffff_8001, "32 KiB, enabled");
        let mut d = [0u8; 2];
        assert!(!mmio_read(&root, 0xffff_8000, &mut d), "the sizing address decodes nothing");
        let moved = u64::from(placed) + 0x10_0000;
        cfc_write(&mut io, 1, 12, moved as u32 | ROM_ENABLE);
        assert!(mmio_read(&root, moved + 2, &mut d));
        assert_eq!(d, [ROM_BAR_INDEX + 2; 2], "the device's ROM bytes at offset 2");
        assert!(!mmio_read(&root, u64::from(placed) + 2, &mut d), "not at the old place");
        assert!(mmio_write(&root, moved + 2, &[1]), "a ROM write is claimed");
        assert!(writes.lock().unwrap().is_empty(), "and dropped");
    }
}
