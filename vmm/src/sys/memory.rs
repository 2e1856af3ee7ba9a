//! Host memory facts and advice: physical memory, huge pages, private file mappings.

/// The host's physical memory in MiB, if it can be read.
pub fn host_memory_mib() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages > 0 && page_size > 0).then(|| (pages as u64 * page_size as u64) >> 20)
}

/// Asks for transparent huge pages on `len` bytes at `addr` (only advice: where the host has
/// none, nothing changes). Only Linux has the advice.
pub fn advise_huge_pages(addr: *mut u8, len: u64) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: madvise only changes paging advice for a range; it reads or writes no
        // memory, and a range that is not a mapping fails with ENOMEM.
        let rc = unsafe { libc::madvise(addr.cast(), len as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            log::debug!("madvise(MADV_HUGEPAGE): {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (addr, len);
}

/// Protection and flags of a private, copy-on-write mapping of a file read and written in
/// place (snapshot RAM): (prot, flags) for mmap.
pub fn private_file_mapping() -> (i32, i32) {
    (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_NORESERVE)
}
