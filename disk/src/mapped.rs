//! What the read-only foreign formats (VMDK, VDI, Parallels, VHD, VHDX, OVA) share: errors at
//! an offset, bounded metadata reads that report truncation as corruption, allocated sizes,
//! extent lists, and [`MappedImage`], a single file cut
//! into equal blocks found through one table (VDI's block map, Parallels' BAT).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::{check_range, DiskError, DiskErrorKind, Extent, ExtentKind};

/// An error of `kind` at `offset` in `path`.
pub(crate) fn err_at(kind: DiskErrorKind, op: &'static str, path: &Path, offset: u64) -> DiskError {
    DiskError::new(kind, op).with_path(path).with_offset(offset)
}

/// What every write to a read-only format returns.
pub(crate) fn read_only(path: &Path, offset: u64) -> DiskError {
    err_at(DiskErrorKind::UnsupportedFeature, "write a read-only format", path, offset)
}

/// Opens `path` read-only and returns it with its length.
pub(crate) fn open_file(path: &Path) -> Result<(File, u64), DiskError> {
    let file = File::open(path).map_err(|e| DiskError::io("open", e).with_path(path))?;
    let len = file.metadata().map_err(|e| DiskError::io("open", e).with_path(path))?.len();
    Ok((file, len))
}

/// Reads `buf.len()` bytes at `offset`; a file too short for them is corrupt, not an I/O error.
pub(crate) fn read_exact(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    op: &'static str,
) -> Result<(), DiskError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            err_at(DiskErrorKind::CorruptImage, op, path, offset)
        } else {
            DiskError::io(op, e).with_path(path).with_offset(offset)
        }
    })
}

/// Reads from `file` at `offset`; a short file is a corrupt image (its tables pointed there).
pub(crate) fn pread(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), DiskError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        let err = if e.kind() == io::ErrorKind::UnexpectedEof {
            DiskError::new(DiskErrorKind::CorruptImage, "read past the end of")
        } else {
            DiskError::io("read", e)
        };
        err.with_path(path).with_offset(offset)
    })
}

/// Bytes the host file system allocated to `file` (0 if it can't say).
pub(crate) fn file_allocated_bytes(file: &File) -> u64 {
    file.metadata().map(|m| m.blocks().saturating_mul(512)).unwrap_or(0)
}

/// Bytes `path` occupies on the host (allocated blocks, so holes don't count).
pub(crate) fn allocated_bytes(path: &Path) -> Result<u64, DiskError> {
    let meta = std::fs::metadata(path).map_err(|e| DiskError::io("stat", e).with_path(path))?;
    Ok(meta.blocks().saturating_mul(512))
}

/// Appends an extent, merging it into the previous one when they continue each other.
pub(crate) fn push_extent(out: &mut Vec<Extent>, offset: u64, len: u64, kind: ExtentKind) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.offset + last.len == offset {
            last.len += len;
            return;
        }
    }
    out.push(Extent { offset, len, kind });
}

/// Where one block of a [`MappedImage`] lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block {
    Unallocated,
    Zero,
    /// Byte offset of the block's data in the file.
    Data(u64),
}

/// A disk made of equal blocks, each stored anywhere in one file or not at all.
#[derive(Debug)]
pub(crate) struct MappedImage {
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u64,
    /// One entry per block: `u64::MAX` unallocated, `u64::MAX - 1` zero, else a file offset.
    map: Vec<u64>,
}

const UNALLOCATED: u64 = u64::MAX;
const ZERO: u64 = u64::MAX - 1;

impl MappedImage {
    /// Builds the image; `blocks` must cover `size`. Every data block's part inside the disk
    /// must lie in the file at or after `data_start` (so it can't alias the metadata).
    pub(crate) fn new(
        file: File,
        path: &Path,
        file_len: u64,
        size: u64,
        block_size: u64,
        data_start: u64,
        blocks: impl Iterator<Item = (u64, Block)>,
    ) -> Result<MappedImage, DiskError> {
        let count = size.div_ceil(block_size);
        let mut map = Vec::new();
        for (i, (entry_offset, block)) in blocks.enumerate() {
            let i = i as u64;
            if i >= count {
                break;
            }
            let value = match block {
                Block::Unallocated => UNALLOCATED,
                Block::Zero => ZERO,
                Block::Data(at) => {
                    let needed = block_size.min(size - i * block_size);
                    let fits = at.checked_add(needed).is_some_and(|end| end <= file_len);
                    if at < data_start || !fits {
                        return Err(err_at(
                            DiskErrorKind::CorruptImage,
                            "map a block (its entry points outside the data area)",
                            path,
                            entry_offset,
                        ));
                    }
                    at
                }
            };
            map.push(value);
        }
        if (map.len() as u64) < count {
            return Err(err_at(DiskErrorKind::CorruptImage, "read the block map", path, 0));
        }
        Ok(MappedImage { file, path: path.to_path_buf(), size, block_size, map })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn allocated_blocks(&self) -> usize {
        self.map.iter().filter(|&&v| v < ZERO).count()
    }

    fn block(&self, index: u64) -> Block {
        match self.map.get(index as usize).copied().unwrap_or(UNALLOCATED) {
            UNALLOCATED => Block::Unallocated,
            ZERO => Block::Zero,
            at => Block::Data(at),
        }
    }

    /// Reads, coalescing runs of blocks that are also consecutive in the file into one pread.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(self.size, offset, buf.len() as u64, "read")
            .map_err(|e| e.with_path(&self.path))?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / self.block_size;
            let within = pos % self.block_size;
            let mut len = (self.block_size - within).min((buf.len() - done) as u64);
            let block = self.block(index);
            // Extend over following blocks that continue this one.
            let mut next = index + 1;
            while done as u64 + len < buf.len() as u64 {
                let follows = match (block, self.block(next)) {
                    (Block::Data(a), Block::Data(b)) => b == a + (next - index) * self.block_size,
                    (Block::Data(_), _) | (_, Block::Data(_)) => false,
                    _ => true,
                };
                if !follows {
                    break;
                }
                len = (len + self.block_size).min((buf.len() - done) as u64);
                next += 1;
            }
            let out = &mut buf[done..done + len as usize];
            match block {
                Block::Data(at) => read_exact(&self.file, &self.path, out, at + within, "read")?,
                Block::Zero | Block::Unallocated => out.fill(0),
            }
            done += len as usize;
        }
        Ok(())
    }

    pub(crate) fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(self.size, offset, len, "map").map_err(|e| e.with_path(&self.path))?;
        let mut out = Vec::new();
        let mut holes = FileHoles::new(&self.file);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let index = pos / self.block_size;
            let stop = ((index + 1) * self.block_size).min(end);
            match self.block(index) {
                Block::Data(at) => {
                    holes.push(&mut out, pos, at + pos % self.block_size, stop - pos);
                }
                Block::Zero => push_extent(&mut out, pos, stop - pos, ExtentKind::Zero),
                Block::Unallocated => {
                    push_extent(&mut out, pos, stop - pos, ExtentKind::Unallocated)
                }
            }
            pos = stop;
        }
        Ok(out)
    }
}

/// Holes shorter than this (or their unaligned edges, on the disk) stay data: splitting a
/// data run for a few KiB costs the converter more than it saves.
const HOLE_GRAIN: u64 = 64 * 1024;

/// Which byte ranges of a host file are holes (SEEK_DATA/SEEK_HOLE), remembering the last
/// answer so that walking an image's blocks in order costs a few `lseek`s per data run.
/// Meant to live for one `extents` call: the file may change between calls.
pub(crate) struct FileHoles<'a> {
    file: &'a File,
    /// `(start, end, is_data)`: the last run found.
    run: Option<(u64, u64, bool)>,
}

impl<'a> FileHoles<'a> {
    pub(crate) fn new(file: &'a File) -> Self {
        FileHoles { file, run: None }
    }

    /// Whether file offset `at` holds data, and where that stays true (exclusive).
    fn probe(&mut self, at: u64) -> (bool, u64) {
        if let Some((s, e, data)) = self.run {
            if s <= at && at < e {
                return (data, e);
            }
        }
        let run = seek_run(self.file, at);
        self.run = Some((at, run.1, run.0));
        run
    }

    /// Pushes the `len` bytes at disk offset `disk`, stored at file offset `at`, as Data
    /// extents, except for holes in the file, which read as zeroes and are pushed as Zero.
    pub(crate) fn push(&mut self, out: &mut Vec<Extent>, disk: u64, at: u64, len: u64) {
        let mut done = 0;
        while done < len {
            let (data, end) = self.probe(at + done);
            let n = (end - (at + done)).min(len - done);
            let (d0, d1) = (disk + done, disk + done + n);
            // Only whole aligned grains of a hole become Zero.
            let (z0, z1) = (d0.next_multiple_of(HOLE_GRAIN), d1 / HOLE_GRAIN * HOLE_GRAIN);
            if data || z1 <= z0 {
                push_extent(out, d0, n, ExtentKind::Data);
            } else {
                push_extent(out, d0, z0 - d0, ExtentKind::Data);
                push_extent(out, z0, z1 - z0, ExtentKind::Zero);
                push_extent(out, z1, d1 - z1, ExtentKind::Data);
            }
            done += n;
        }
    }
}

/// Whether file offset `at` holds data, and the end of that data or hole run. Hosts or file
/// systems without SEEK_DATA say "data to the end".
fn seek_run(file: &File, at: u64) -> (bool, u64) {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        use std::os::fd::AsRawFd;
        let seek = |whence, at: u64| -> Option<u64> {
            let at = libc::off_t::try_from(at).ok()?;
            // SAFETY: lseek only reads its scalar arguments; the fd is owned by `file`,
            // which outlives the call. It moves the file position, which nothing here uses
            // (all image I/O is positioned).
            let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
            u64::try_from(r).ok()
        };
        match seek(libc::SEEK_DATA, at) {
            Some(d) if d == at => {
                let end = seek(libc::SEEK_HOLE, at).filter(|&h| h > at).unwrap_or(u64::MAX);
                return (true, end);
            }
            Some(d) if d > at => return (false, d),
            Some(_) => {}
            None => {
                // ENXIO: only holes from `at` to the end of the file.
                if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    return (false, u64::MAX);
                }
            }
        }
    }
    let _ = (file, at);
    (true, u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    const K: u64 = 1024;

    /// A 1 MiB file: 64 KiB of data at 0 and at 960 KiB, a hole between. None when the
    /// host file system does not report holes.
    fn holey() -> Option<(tempfile::TempDir, File)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::options().create_new(true).read(true).write(true).open(&path).unwrap();
        file.set_len(1024 * K).unwrap();
        file.write_all_at(&[1; 64 * 1024], 0).unwrap();
        file.write_all_at(&[2; 64 * 1024], 960 * K).unwrap();
        if seek_run(&file, 64 * K).0 {
            crate::skip_without("does not report holes");
            return None;
        }
        Some((dir, file))
    }

    #[test]
    fn holes_in_the_host_file_map_as_zero() {
        let Some((_dir, file)) = holey() else { return };
        let mut out = Vec::new();
        // Disk offset 1 MiB, file offset 0.
        FileHoles::new(&file).push(&mut out, 1024 * K, 0, 1024 * K);
        let e = |o: u64, l: u64, kind| Extent { offset: (1024 + o) * K, len: l * K, kind };
        assert_eq!(
            out,
            vec![
                e(0, 64, ExtentKind::Data),
                e(64, 896, ExtentKind::Zero),
                e(960, 64, ExtentKind::Data)
            ]
        );
    }

    #[test]
    fn unaligned_hole_edges_stay_data() {
        let Some((_dir, file)) = holey() else { return };
        let mut out = Vec::new();
        // Disk offset 4 KiB past a grain: the hole's first and last partial grains are data.
        FileHoles::new(&file).push(&mut out, 4 * K, 0, 1024 * K);
        let e = |o: u64, l: u64, kind| Extent { offset: o * K, len: l * K, kind };
        assert_eq!(
            out,
            vec![
                e(4, 124, ExtentKind::Data),
                e(128, 832, ExtentKind::Zero),
                e(960, 68, ExtentKind::Data)
            ]
        );
    }
}
