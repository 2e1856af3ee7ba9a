//! The VM's memory slots: which host memory is mapped where in guest-physical space.
//!
//! ```text
//!  guest RAM (memory.rs) ──┐
//!                          ├─▶ VmMemory ──▶ MemorySlots (slot → region) ──▶ Vm::map_memory
//!  RAM BARs (pci::root) ───┘   (MemoryMapper)                              Vm::unmap_memory
//! ```
//! Every mapping takes the lowest free slot number from the registry and gives it back when it
//! is unmapped, so a region that moves (a boot framebuffer BAR the guest reprograms) is found
//! by its host address, not by a slot number fixed at build time. The registry refuses a
//! region that overlaps one already mapped: guest-programmed BARs must never cover RAM.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::devices::bus::lock;
use crate::hypervisor::{GuestRamMapping, HypervisorError, Vm};

/// Host pages are 4 KiB; slots and their guest addresses must be aligned to them.
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("Guest range {guest_addr:#x}+{size:#x} overlaps mapped memory at {other:#x}")]
    Overlap { guest_addr: u64, size: u64, other: u64 },
    #[error("Guest range {guest_addr:#x}+{size:#x} is empty, unaligned or wraps")]
    InvalidRange { guest_addr: u64, size: u64 },
    #[error("No memory slot {0} is mapped")]
    UnknownSlot(u32),
    #[error("The hypervisor could not map memory slot {slot}")]
    Map {
        slot: u32,
        #[source]
        source: HypervisorError,
    },
    #[error("The hypervisor could not unmap memory slot {slot}")]
    Unmap {
        slot: u32,
        #[source]
        source: HypervisorError,
    },
}

/// One mapped region as the registry remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRegion {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    /// Start of the host mapping (the region's identity while it moves).
    pub host_addr: usize,
    /// Counts mappings: a region mapped again (moved) has a new generation, so a dirty log
    /// taken from its old slot cannot be mistaken for one of the new slot.
    pub generation: u64,
}

#[derive(Debug, Default)]
struct Table {
    regions: BTreeMap<u32, SlotRegion>,
    generations: u64,
}

/// Hands out slot numbers and remembers region → slot.
#[derive(Debug, Default)]
pub struct MemorySlots {
    table: Mutex<Table>,
}

impl MemorySlots {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `[guest_addr, guest_addr + size)` backed by `host_addr` under the lowest free
    /// slot. Refuses an empty, unaligned or wrapping range and one overlapping a region
    /// already recorded.
    pub fn allocate(
        &self,
        guest_addr: u64,
        size: u64,
        host_addr: usize,
    ) -> Result<SlotRegion, SlotError> {
        let invalid = SlotError::InvalidRange { guest_addr, size };
        let end =
            guest_addr.checked_add(size).ok_or(SlotError::InvalidRange { guest_addr, size })?;
        if size == 0 || !guest_addr.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(invalid);
        }
        let mut table = lock(&self.table);
        if let Some(other) = table
            .regions
            .values()
            .find(|r| r.guest_addr < end && guest_addr < r.guest_addr + r.size)
        {
            return Err(SlotError::Overlap { guest_addr, size, other: other.guest_addr });
        }
        let slot = (0..).find(|s| !table.regions.contains_key(s)).unwrap_or(u32::MAX);
        table.generations += 1;
        let region =
            SlotRegion { slot, guest_addr, size, host_addr, generation: table.generations };
        table.regions.insert(slot, region);
        Ok(region)
    }

    /// Forgets slot `slot`; its number is free again.
    pub fn release(&self, slot: u32) -> Option<SlotRegion> {
        lock(&self.table).regions.remove(&slot)
    }

    /// The region currently mapped from host memory starting at `host_addr`, if any.
    pub fn find_host(&self, host_addr: usize) -> Option<SlotRegion> {
        lock(&self.table).regions.values().find(|r| r.host_addr == host_addr).copied()
    }

    /// The region mapped as `slot`, if any.
    pub fn find_slot(&self, slot: u32) -> Option<SlotRegion> {
        lock(&self.table).regions.get(&slot).copied()
    }

    /// Every mapped region, by slot.
    pub fn regions(&self) -> Vec<SlotRegion> {
        lock(&self.table).regions.values().copied().collect()
    }
}

/// Host memory that can be mapped into the guest (a RAM BAR's backing), together with what
/// keeps it alive.
#[derive(Clone)]
pub struct HostMemory {
    addr: usize,
    len: u64,
    track_dirty: bool,
    _owner: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMemory")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("track_dirty", &self.track_dirty)
            .finish_non_exhaustive()
    }
}

impl PartialEq for HostMemory {
    fn eq(&self, other: &Self) -> bool {
        (self.addr, self.len, self.track_dirty) == (other.addr, other.len, other.track_dirty)
    }
}

impl HostMemory {
    /// `len` bytes at `addr`, kept alive by `owner`; `track_dirty` asks for a dirty-page log
    /// wherever it is mapped. None unless `addr` and `len` are page-aligned and `len` is not 0.
    ///
    /// # Safety
    /// `addr .. addr + len` must be a live, readable and writable host mapping for as long as
    /// `owner` lives, and nothing may hold Rust references into it (the guest writes it).
    pub unsafe fn new(
        addr: *mut u8,
        len: u64,
        track_dirty: bool,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Option<HostMemory> {
        let addr = addr as usize;
        let aligned =
            (addr as u64).is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE) && len != 0;
        aligned.then_some(HostMemory { addr, len, track_dirty, _owner: owner })
    }

    pub fn host_addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn track_dirty(&self) -> bool {
        self.track_dirty
    }
}

/// Maps and unmaps host memory in the guest. A narrow view of the [`Vm`] the PCI root holds
/// to move RAM BARs (like [`crate::hypervisor::NotifierRegistry`] for notifiers).
pub trait MemoryMapper: Send + Sync {
    /// Maps `memory` at guest-physical `guest_addr`; returns its slot.
    fn map(&self, guest_addr: u64, memory: &HostMemory) -> Result<u32, SlotError>;
    /// Unmaps what [`MemoryMapper::map`] mapped as `slot`.
    fn unmap(&self, slot: u32) -> Result<(), SlotError>;
}

/// A VM's memory map: every mapping goes through the slot registry.
pub struct VmMemory {
    vm: Arc<dyn Vm>,
    slots: Arc<MemorySlots>,
}

impl VmMemory {
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        VmMemory { vm, slots: Arc::new(MemorySlots::new()) }
    }

    /// The registry, for readers that look a region up by its host address (the framebuffer
    /// scanner's dirty log).
    pub fn slots(&self) -> &Arc<MemorySlots> {
        &self.slots
    }

    /// Maps `size` bytes of host memory at `host_addr` to guest-physical `guest_addr` in a
    /// fresh slot.
    ///
    /// # Safety
    /// As [`Vm::map_memory`]: the host range must be a live, page-aligned mapping that stays
    /// valid until it is unmapped or the VM is gone.
    pub unsafe fn map_raw(
        &self,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
        track_dirty: bool,
    ) -> Result<SlotRegion, SlotError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.map_slot(guest_addr, size, host_addr, track_dirty, false) }
    }

    /// As [`VmMemory::map_raw`], read-only for the guest: its writes exit as MMIO (and are
    /// dropped unless a device claims them). Firmware ROM.
    ///
    /// # Safety
    /// As [`VmMemory::map_raw`].
    pub unsafe fn map_readonly(
        &self,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<SlotRegion, SlotError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.map_slot(guest_addr, size, host_addr, false, true) }
    }

    /// # Safety
    /// As [`VmMemory::map_raw`].
    unsafe fn map_slot(
        &self,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
        track_dirty: bool,
        readonly: bool,
    ) -> Result<SlotRegion, SlotError> {
        let region = self.slots.allocate(guest_addr, size, host_addr as usize)?;
        let mapping = GuestRamMapping {
            slot: region.slot,
            guest_addr,
            size,
            host_addr,
            readonly,
            track_dirty,
        };
        // SAFETY: forwarded from the caller.
        if let Err(source) = unsafe { self.vm.map_memory(mapping) } {
            self.slots.release(region.slot);
            return Err(SlotError::Map { slot: region.slot, source });
        }
        Ok(region)
    }
}

impl MemoryMapper for VmMemory {
    fn map(&self, guest_addr: u64, memory: &HostMemory) -> Result<u32, SlotError> {
        // SAFETY: `HostMemory::new`'s contract: the range is a live mapping while its owner
        // lives; the PCI root holds the `HostMemory` (and so the owner) until it unmaps it.
        let region = unsafe {
            self.map_raw(guest_addr, memory.len(), memory.addr as *mut u8, memory.track_dirty)
        }?;
        Ok(region.slot)
    }

    fn unmap(&self, slot: u32) -> Result<(), SlotError> {
        let region = self.slots.find_slot(slot).ok_or(SlotError::UnknownSlot(slot))?;
        self.vm
            .unmap_memory(slot, region.guest_addr, region.size)
            .map_err(|source| SlotError::Unmap { slot, source })?;
        self.slots.release(slot);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_lowest_free_numbers_and_come_back_on_release() {
        let slots = MemorySlots::new();
        let a = slots.allocate(0, 0x10_0000, 0x1000_0000).unwrap();
        let b = slots.allocate(0x1_0000_0000, 0x10_0000, 0x2000_0000).unwrap();
        let fb = slots.allocate(0xc000_0000, 0x1000, 0x3000_0000).unwrap();
        assert_eq!((a.slot, b.slot, fb.slot), (0, 1, 2));
        assert_eq!(slots.release(1), Some(b));
        let moved = slots.allocate(0xd000_0000, 0x1000, 0x2000_0000).unwrap();
        assert_eq!(moved.slot, 1, "the freed number is reused");
        assert_ne!(moved.generation, b.generation, "a new mapping is a new generation");
        assert_eq!(slots.find_host(0x3000_0000), Some(fb));
        assert_eq!(slots.find_host(0x4000_0000), None);
        assert_eq!(slots.regions().len(), 3);
    }

    #[test]
    fn overlapping_empty_unaligned_or_wrapping_ranges_are_refused() {
        let slots = MemorySlots::new();
        slots.allocate(0, 0x10_0000, 0x1000_0000).unwrap();
        assert!(matches!(
            slots.allocate(0xf_f000, 0x2000, 0x2000_0000),
            Err(SlotError::Overlap { other: 0, .. })
        ));
        for (addr, size) in [(0x20_0000, 0), (0x20_0800, 0x1000), (0x20_0000, 0x800)] {
            assert!(matches!(
                slots.allocate(addr, size, 0x2000_0000),
                Err(SlotError::InvalidRange { .. })
            ));
        }
        assert!(slots.allocate(u64::MAX - 0xfff, 0x2000, 0).is_err());
        assert_eq!(slots.regions().len(), 1, "refusals record nothing");
        slots.allocate(0x10_0000, 0x1000, 0x2000_0000).unwrap();
    }

    #[test]
    fn host_memory_must_be_page_aligned_and_not_empty() {
        let owner: Arc<dyn Any + Send + Sync> = Arc::new(());
        // SAFETY: never mapped or dereferenced; only the alignment checks run.
        unsafe {
            assert!(HostMemory::new(0x1000 as *mut u8, 0x1000, false, owner.clone()).is_some());
            assert!(HostMemory::new(0x1800 as *mut u8, 0x1000, false, owner.clone()).is_none());
            assert!(HostMemory::new(0x1000 as *mut u8, 0x1001, false, owner.clone()).is_none());
            assert!(HostMemory::new(0x1000 as *mut u8, 0, false, owner).is_none());
        }
    }
}
