//! Guest RAM: allocated and owned by the VMM, mapped into the VM by the backend, in slots
//! handed out by [`slots`].

pub mod slots;

use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryRegion};

use slots::{SlotError, VmMemory};

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
    Map(#[source] SlotError),
}

/// Allocates `mib` MiB of anonymous guest RAM laid out around the PCI hole of the x86 PC.
#[cfg(target_arch = "x86_64")]
pub fn create_guest_memory(mib: u64) -> Result<GuestMemory, MemoryError> {
    use crate::arch::x86_64::layout;
    if mib == 0 || mib > layout::MAX_GUEST_RAM_MIB {
        return Err(MemoryError::InvalidSize { mib, max: layout::MAX_GUEST_RAM_MIB });
    }
    create_guest_memory_in(mib, &layout::ram_regions(mib << 20))
}

/// Allocates `mib` MiB of anonymous guest RAM as the given (address, size) regions.
pub fn create_guest_memory_in(
    mib: u64,
    regions: &[(u64, u64)],
) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> =
        regions.iter().copied().map(|(start, size)| (GuestAddress(start), size as usize)).collect();
    let memory = GuestMemory::from_ranges(&ranges)
        .map_err(|source| MemoryError::Allocate { mib, source })?;
    // Transparent huge pages on guest RAM (as QEMU does): far fewer page faults while the
    // guest first touches its memory, and 2 MiB nested page-table entries.
    for region in memory.iter() {
        crate::sys::advise_huge_pages(region.as_ptr(), region.len());
    }
    Ok(memory)
}

/// Maps every region of `memory` into the VM, one slot (from its registry) per region.
pub fn map_into_vm(memory: &GuestMemory, vm: &VmMemory) -> Result<(), MemoryError> {
    for region in memory.iter() {
        // SAFETY: the mapping is a live mmap owned by `memory`. Callers keep a clone of
        // `memory` for as long as the VM can run (the machine's handle drops it only after
        // its own references to the VM).
        unsafe { vm.map_raw(region.start_addr().0, region.len(), region.as_ptr(), false) }
            .map_err(MemoryError::Map)?;
    }
    Ok(())
}

#[cfg(test)]
#[cfg(target_arch = "x86_64")]
mod tests {
    use super::*;

    /// VmFlags of the mapping that starts at `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut in_mapping = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, _)) = range.split_once('-') {
                    if let Ok(start) = usize::from_str_radix(start, 16) {
                        in_mapping = start == addr;
                        continue;
                    }
                }
            }
            if in_mapping {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.to_string());
                }
            }
        }
        None
    }

    #[test]
    fn guest_ram_asks_for_huge_pages() {
        let memory = create_guest_memory(8).unwrap();
        let region = memory.iter().next().unwrap();
        let flags = vm_flags(region.as_ptr() as usize).expect("guest RAM mapping in smaps");
        assert!(flags.split_whitespace().any(|f| f == "hg"), "VmFlags:{flags}");
    }

    #[test]
    fn zero_or_absurd_sizes_are_refused() {
        assert!(matches!(create_guest_memory(0), Err(MemoryError::InvalidSize { .. })));
        assert!(matches!(
            create_guest_memory(crate::arch::x86_64::layout::MAX_GUEST_RAM_MIB + 1),
            Err(MemoryError::InvalidSize { .. })
        ));
    }
}
