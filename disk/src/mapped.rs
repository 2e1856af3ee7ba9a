//! What the read-only foreign formats (VMDK, VDI, Parallels) share: little-endian field
//! reads, bounded metadata reads that report truncation as corruption, extent lists, and
//! [`MappedImage`], a single file cut into equal blocks found through one table (VDI's block
//! map, Parallels' BAT).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::{check_range, DiskError, DiskErrorKind, Extent, ExtentKind};

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

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
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let index = pos / self.block_size;
            let stop = ((index + 1) * self.block_size).min(end);
            let kind = match self.block(index) {
                Block::Data(_) => ExtentKind::Data,
                Block::Zero => ExtentKind::Zero,
                Block::Unallocated => ExtentKind::Unallocated,
            };
            push_extent(&mut out, pos, stop - pos, kind);
            pos = stop;
        }
        Ok(out)
    }
}
