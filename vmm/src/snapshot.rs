//! The snapshot file: one running machine's state and guest RAM.
//!
//! ```text
//!  0        header page: magic "HUTCHSNP", version, state and RAM offsets, RAM regions,
//!           the board and architecture (format 2), checksums
//!  4 KiB    machine state (bincode: vCPUs, VM, devices), CRC-32 in the header
//!  2 MiB×k  guest RAM, region after region, page for page; zero pages are holes
//! ```
//! RAM sits at its own aligned offset so a restore maps it straight from the file
//! (`MAP_PRIVATE`, copy-on-write): the guest runs again before its memory is read, and pages it
//! never touches are never read. Zero pages are not written (the file is sparse), so a saved
//! guest that used little memory makes a small file. The header and state are checked on
//! open; RAM is not checksummed, as checking it would read it all and defeat the lazy restore.
//! Files are written to a temporary name, fsynced and renamed: a failed save leaves nothing.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemory as _, GuestMemoryRegion};

use crate::memory::GuestMemory;

pub const MAGIC: [u8; 8] = *b"HUTCHSNP";
/// The format this build writes and the newest it reads. Format 1 (no board in the header,
/// one positional machine state of the PC) is still read.
pub const VERSION: u32 = 2;
/// Longest board or architecture name in a header.
const MAX_NAME: usize = 32;
const HEADER_SIZE: u64 = 4096;
/// RAM starts on a 2 MiB boundary (huge-page friendly mappings of the file).
const RAM_ALIGN: u64 = 2 << 20;
const PAGE: usize = 4096;
/// Largest machine-state section accepted (device state incl. the boot framebuffer is ~20 MiB).
pub const MAX_STATE_BYTES: u64 = 512 << 20;
/// Most RAM regions a machine has (below and above the PCI hole).
const MAX_REGIONS: usize = 8;
/// Largest run of non-zero pages written with one call.
const WRITE_CHUNK: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("Cannot {op} snapshot file {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Hutch snapshot (wrong magic)")]
    NotASnapshot { path: PathBuf },
    #[error("{path} is a snapshot of format version {found}; this Hutch reads up to version {supported}")]
    NewerVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("Snapshot {path} is corrupt: the {what} checksum does not match")]
    Checksum { path: PathBuf, what: &'static str },
    #[error("Snapshot {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("Snapshot {path} does not fit this machine: {reason}")]
    Mismatch { path: PathBuf, reason: String },
    #[error("Cannot map the guest memory of snapshot {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// Where a snapshot's parts lie in its file (the checked header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub version: u32,
    state_offset: u64,
    state_len: u64,
    state_crc: u32,
    ram_offset: u64,
    /// (guest address, size) per RAM region, in file order.
    pub regions: Vec<(u64, u64)>,
    /// The board and architecture the machine was (format 1: always the x86_64 PC).
    pub board: String,
    pub arch: String,
}

impl SnapshotHeader {
    fn ram_len(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for v in [self.state_offset, self.state_len, self.ram_offset] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.state_crc.to_le_bytes());
        for (addr, size) in &self.regions {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        if self.version >= 2 {
            for name in [&self.board, &self.arch] {
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.resize(HEADER_SIZE as usize, 0);
        out
    }

    fn decode(page: &[u8], file_len: u64, path: &Path) -> Result<SnapshotHeader, SnapshotError> {
        let corrupt = |reason: String| SnapshotError::Corrupt { path: path.to_owned(), reason };
        if page.len() < 48 || page[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot { path: path.to_owned() });
        }
        // A short page reads as zeros past its end: the checksum then fails, never a panic.
        let u32_at = |o: usize| {
            u32::from_le_bytes(
                page.get(o..o + 4).and_then(|b| b.try_into().ok()).unwrap_or_default(),
            )
        };
        let u64_at = |o: usize| {
            u64::from_le_bytes(
                page.get(o..o + 8).and_then(|b| b.try_into().ok()).unwrap_or_default(),
            )
        };
        let version = u32_at(8);
        if version > VERSION {
            return Err(SnapshotError::NewerVersion {
                path: path.to_owned(),
                found: version,
                supported: VERSION,
            });
        }
        if version == 0 {
            return Err(corrupt("format version 0".into()));
        }
        let count = u32_at(12) as usize;
        if count == 0 || count > MAX_REGIONS {
            return Err(corrupt(format!("{count} RAM regions")));
        }
        let mut crc_at = 44 + count * 16;
        let mut names = Vec::new();
        if version >= 2 {
            for _ in 0..2 {
                let len = usize::from(page.get(crc_at).copied().unwrap_or_default());
                let name = page
                    .get(crc_at + 1..crc_at + 1 + len)
                    .filter(|_| len <= MAX_NAME)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or_else(|| corrupt("a board or architecture name".into()))?;
                names.push(name.to_string());
                crc_at += 1 + len;
            }
        } else {
            names = vec!["pc".to_string(), "x86_64".to_string()];
        }
        if crc32fast::hash(&page[..crc_at]) != u32_at(crc_at) {
            return Err(SnapshotError::Checksum { path: path.to_owned(), what: "header" });
        }
        let arch = names.pop().unwrap_or_default();
        let board = names.pop().unwrap_or_default();
        let header = SnapshotHeader {
            version,
            state_offset: u64_at(16),
            state_len: u64_at(24),
            ram_offset: u64_at(32),
            state_crc: u32_at(40),
            regions: (0..count).map(|i| (u64_at(44 + i * 16), u64_at(52 + i * 16))).collect(),
            board,
            arch,
        };
        if header.state_offset < HEADER_SIZE || header.state_len > MAX_STATE_BYTES {
            return Err(corrupt(format!(
                "state of {} bytes at {}",
                header.state_len, header.state_offset
            )));
        }
        let state_end = header.state_offset + header.state_len;
        if !header.ram_offset.is_multiple_of(RAM_ALIGN) || header.ram_offset < state_end {
            return Err(corrupt(format!("guest memory at offset {}", header.ram_offset)));
        }
        for &(addr, size) in &header.regions {
            if size == 0 || !size.is_multiple_of(PAGE as u64) || !addr.is_multiple_of(PAGE as u64) {
                return Err(corrupt(format!("RAM region of {size} bytes at {addr:#x}")));
            }
        }
        let end = header
            .regions
            .iter()
            .try_fold(header.ram_offset, |acc, r| acc.checked_add(r.1))
            .ok_or_else(|| corrupt("guest memory size overflows".into()))?;
        if end > file_len {
            return Err(corrupt(format!(
                "the file is {file_len} bytes, its guest memory ends at {end} (truncated?)"
            )));
        }
        Ok(header)
    }
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { op, path: path.to_owned(), source }
}

/// Writes a snapshot of `state` (the encoded machine state) and `memory` of a `board` machine
/// on `arch` to `path`, through a temporary file that is fsynced and renamed. The guest must
/// not run meanwhile.
pub fn write(
    path: &Path,
    state: &[u8],
    memory: &GuestMemory,
    board: &str,
    arch: &str,
) -> Result<(), SnapshotError> {
    let tmp = temp_path(path);
    let result = write_to(&tmp, state, memory, board, arch).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(io_err("rename", path))?;
        sync_dir(path)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync the directory of", path))
}

fn write_to(
    path: &Path,
    state: &[u8],
    memory: &GuestMemory,
    board: &str,
    arch: &str,
) -> Result<(), SnapshotError> {
    if board.len() > MAX_NAME || arch.len() > MAX_NAME {
        return Err(SnapshotError::Corrupt {
            path: path.to_owned(),
            reason: format!("board {board} or architecture {arch} is too long a name"),
        });
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create", path))?;
    let state_len = state.len() as u64;
    let ram_offset = (HEADER_SIZE + state_len).div_ceil(RAM_ALIGN) * RAM_ALIGN;
    let header = SnapshotHeader {
        version: VERSION,
        state_offset: HEADER_SIZE,
        state_len,
        state_crc: crc32fast::hash(state),
        ram_offset,
        regions: memory.iter().map(|r| (r.start_addr().0, r.len())).collect(),
        board: board.to_string(),
        arch: arch.to_string(),
    };
    file.write_all(&header.encode()).map_err(io_err("write", path))?;
    file.write_all(state).map_err(io_err("write", path))?;
    // Holes read as zeros: size the file first, then write only the non-zero pages.
    file.set_len(ram_offset + header.ram_len()).map_err(io_err("size", path))?;
    let mut offset = ram_offset;
    for region in memory.iter() {
        // SAFETY: the region is a live mapping of `len` bytes owned by `memory`; the caller
        // has stopped the guest and every device, so nothing writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        write_nonzero_pages(&file, bytes, offset, path)?;
        offset += region.len();
    }
    file.sync_all().map_err(io_err("sync", path))
}

/// Writes the runs of non-zero pages of `bytes` at `base + their offset`.
fn write_nonzero_pages(
    file: &File,
    bytes: &[u8],
    base: u64,
    path: &Path,
) -> Result<(), SnapshotError> {
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at < bytes.len() {
        let end = (at + PAGE).min(bytes.len());
        let zero = is_zero(&bytes[at..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(start)) => {
                file.write_all_at(&bytes[start..at], base + start as u64)
                    .map_err(io_err("write", path))?;
                run_start = None;
            }
            (false, Some(start)) if at - start >= WRITE_CHUNK => {
                file.write_all_at(&bytes[start..at], base + start as u64)
                    .map_err(io_err("write", path))?;
                run_start = Some(at);
            }
            _ => {}
        }
        at = end;
    }
    if let Some(start) = run_start {
        file.write_all_at(&bytes[start..], base + start as u64).map_err(io_err("write", path))?;
    }
    Ok(())
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the compiler vectorizes it; a page of data usually fails in the first words.
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits at aligned bounds.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// An opened, checked snapshot: its machine state, ready to map its RAM.
pub struct SnapshotFile {
    path: PathBuf,
    file: File,
    pub header: SnapshotHeader,
    state: Vec<u8>,
}

impl SnapshotFile {
    /// Opens `path` and checks the header and the state's checksum; RAM is not read.
    pub fn open(path: &Path) -> Result<SnapshotFile, SnapshotError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let file_len = file.metadata().map_err(io_err("read", path))?.len();
        let mut page = vec![0u8; HEADER_SIZE as usize];
        let n = read_up_to(&file, &mut page, 0).map_err(io_err("read", path))?;
        if n < 48 {
            return Err(if n >= 8 && page[..8] != MAGIC {
                SnapshotError::NotASnapshot { path: path.to_owned() }
            } else {
                SnapshotError::Corrupt {
                    path: path.to_owned(),
                    reason: format!("the file is only {n} bytes"),
                }
            });
        }
        let header = SnapshotHeader::decode(&page[..n], file_len, path)?;
        let mut state = vec![0u8; header.state_len as usize];
        file.read_exact_at(&mut state, header.state_offset).map_err(io_err("read", path))?;
        if crc32fast::hash(&state) != header.state_crc {
            return Err(SnapshotError::Checksum { path: path.to_owned(), what: "machine state" });
        }
        Ok(SnapshotFile { path: path.to_owned(), file, header, state })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The encoded machine state.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Guest RAM mapped copy-on-write from the file: reads fault pages in lazily, writes
    /// stay private to this process. `regions` are the machine's expected (address, size).
    pub fn map_memory(&self, regions: &[(u64, u64)]) -> Result<GuestMemory, SnapshotError> {
        if regions != self.header.regions.as_slice() {
            return Err(SnapshotError::Mismatch {
                path: self.path.clone(),
                reason: format!(
                    "RAM regions {:x?} in the file, the machine has {regions:x?}",
                    self.header.regions
                ),
            });
        }
        let mut offset = self.header.ram_offset;
        let mut mapped = Vec::with_capacity(regions.len());
        for &(addr, size) in regions {
            let file = self.file.try_clone().map_err(io_err("map", &self.path))?;
            let (prot, flags) = crate::sys::private_file_mapping();
            let region = MmapRegionBuilder::new_with_bitmap(size as usize, ())
                .with_file_offset(FileOffset::new(file, offset))
                .with_mmap_prot(prot)
                .with_mmap_flags(flags)
                .build()
                .map_err(|source| SnapshotError::Map { path: self.path.clone(), source })?;
            let region =
                vm_memory::GuestRegionMmap::new(region, GuestAddress(addr)).ok_or_else(|| {
                    SnapshotError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("RAM region at {addr:#x} overflows"),
                    }
                })?;
            mapped.push(region);
            offset += size;
        }
        GuestMemory::from_regions(mapped).map_err(|e| SnapshotError::Corrupt {
            path: self.path.clone(),
            reason: format!("RAM regions overlap: {e}"),
        })
    }
}

fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
#[cfg(target_arch = "x86_64")]
mod tests {
    use vm_memory::{Bytes, GuestMemory as _};

    use super::*;

    fn memory_with_pattern(mib: u64) -> GuestMemory {
        let memory = crate::memory::create_guest_memory(mib).unwrap();
        memory.write_slice(b"hello snapshot", GuestAddress(0x1000)).unwrap();
        memory.write_slice(&[0xab; 8192], GuestAddress(0x20_0000)).unwrap();
        memory
    }

    fn regions(memory: &GuestMemory) -> Vec<(u64, u64)> {
        memory.iter().map(|r| (r.start_addr().0, r.len())).collect()
    }

    #[test]
    fn saved_memory_maps_back_lazily_and_writes_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.hsnap");
        let memory = memory_with_pattern(8);
        write(&path, b"machine state", &memory, "pc", "x86_64").unwrap();
        // Only the two written ranges take space: zero pages are holes.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        assert!(blocks * 512 < 1 << 20, "{} bytes allocated", blocks * 512);

        let snap = SnapshotFile::open(&path).unwrap();
        assert_eq!(snap.state(), b"machine state");
        let restored = snap.map_memory(&regions(&memory)).unwrap();
        let mut buf = [0u8; 14];
        restored.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"hello snapshot");
        let mut big = [0u8; 8192];
        restored.read_slice(&mut big, GuestAddress(0x20_0000)).unwrap();
        assert!(big.iter().all(|&b| b == 0xab));
        restored.write_slice(b"changed", GuestAddress(0x1000)).unwrap();
        // The file keeps the saved bytes.
        let again = SnapshotFile::open(&path).unwrap().map_memory(&regions(&memory)).unwrap();
        again.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"hello snapshot");
    }

    #[test]
    fn bad_files_get_specific_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.hsnap");
        let memory = memory_with_pattern(4);
        write(&path, b"state", &memory, "pc", "x86_64").unwrap();
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8]| {
            let p = dir.path().join("bad.hsnap");
            std::fs::write(&p, bytes).unwrap();
            SnapshotFile::open(&p).err().expect("a bad file must not open")
        };

        let mut wrong_magic = good.clone();
        wrong_magic[0] = b'X';
        assert!(matches!(check(&wrong_magic), SnapshotError::NotASnapshot { .. }));

        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        assert!(
            matches!(check(&newer), SnapshotError::NewerVersion { found, .. } if found == VERSION + 1)
        );

        let mut header_flip = good.clone();
        header_flip[20] ^= 1;
        assert!(matches!(check(&header_flip), SnapshotError::Checksum { what: "header", .. }));

        let mut state_flip = good.clone();
        state_flip[HEADER_SIZE as usize] ^= 1;
        assert!(matches!(
            check(&state_flip),
            SnapshotError::Checksum { what: "machine state", .. }
        ));

        let truncated = &good[..good.len() - 4096];
        assert!(matches!(check(truncated), SnapshotError::Corrupt { .. }), "{}", check(truncated));
        assert!(matches!(check(&good[..10]), SnapshotError::Corrupt { .. }));
        assert!(matches!(check(b""), SnapshotError::Corrupt { .. }));

        // A machine of another size.
        let snap = SnapshotFile::open(&path).unwrap();
        assert!(matches!(snap.map_memory(&[(0, 8 << 20)]), Err(SnapshotError::Mismatch { .. })));
    }

    #[test]
    fn failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("s.hsnap");
        let memory = memory_with_pattern(4);
        assert!(write(&path, b"state", &memory, "pc", "x86_64").is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
