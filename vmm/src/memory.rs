//! Guest RAM: allocated and owned by the VMM, mapped into the VM by the backend.

use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryRegion};

use crate::arch::x86_64::layout;
use crate::hypervisor::{GuestRamMapping, HypervisorError, Vm};

/// The guest's RAM as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Guest memory size {mib} MiB is out of range (1..={max} MiB)")]
    InvalidSize { mib: u64, max: u64 },
    #[error("Could not allocate {mib} MiB of guest memory")]
    Allocate {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("Could not map guest memory into the VM")]
    Map(#[source] HypervisorError),
}

/// Allocates `mib` MiB of anonymous guest RAM laid out around the PCI hole.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemory, MemoryError> {
    if mib == 0 || mib > layout::MAX_GUEST_RAM_MIB {
        return Err(MemoryError::InvalidSize { mib, max: layout::MAX_GUEST_RAM_MIB });
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mib << 20)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Allocate { mib, source })
}

/// Maps every region of `memory` into `vm`, one slot per region.
pub fn map_into_vm(memory: &GuestMemory, vm: &dyn Vm) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let mapping = GuestRamMapping {
            slot: slot as u32,
            guest_addr: region.start_addr().0,
            size: region.len(),
            host_addr: region.as_ptr(),
            readonly: false,
        };
        // SAFETY: the mapping is a live mmap owned by `memory`. Callers keep a clone of
        // `memory` for as long as the VM can run (the machine's handle drops it only after
        // its own references to the VM).
        unsafe { vm.map_memory(mapping) }.map_err(MemoryError::Map)?;
    }
    Ok(())
}
