//! VirtualBox VDI images (read-only): the v1.1 header, then a block map of 32-bit entries
//! (block index in the data area, `0xffffffff` unallocated, `0xfffffffe` zero).
//!
//! ```text
//!   0x000 "<<< ... VirtualBox Disk Image >>>"   0x040 signature 0xbeda107f, version 1.1
//!   offBlocks: u32 block map (cBlocks entries)   offData: the blocks, cbBlock bytes each
//! ```

use std::path::Path;

use crate::bytes::{le32_table, Fields};
use crate::magic;
use crate::mapped::{self, err_at, Block, MappedImage};
use crate::{BlockBackend, DiskError, DiskErrorKind, Extent, ImageFormat, ImageInfo, OpenOptions};

const HEADER_LEN: usize = 0x200;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_UNDO: u32 = 3;
const TYPE_DIFF: u32 = 4;
const BLOCK_FREE: u32 = 0xffff_ffff;
const BLOCK_ZERO: u32 = 0xffff_fffe;
/// VirtualBox uses 1 MiB; allow powers of two up to 64 MiB.
const MAX_BLOCK: u64 = 64 << 20;

/// An open VDI image.
#[derive(Debug)]
pub struct Vdi {
    image: MappedImage,
    fixed: bool,
    problems: Vec<String>,
}

impl Vdi {
    pub fn open(path: &Path, options: OpenOptions) -> Result<Vdi, DiskError> {
        if options.writable {
            return Err(mapped::read_only(path, 0));
        }
        let (file, file_len) = mapped::open_file(path)?;
        let invalid = |op, at| err_at(DiskErrorKind::InvalidFormat, op, path, at);
        let corrupt = |op, at| err_at(DiskErrorKind::CorruptImage, op, path, at);
        let unsupported = |op, at| err_at(DiskErrorKind::UnsupportedFeature, op, path, at);
        let mut h = [0u8; HEADER_LEN];
        if file_len < 0x1c8 {
            return Err(invalid("read the VDI header (file too short)", 0));
        }
        let n = (file_len as usize).min(HEADER_LEN);
        mapped::read_exact(&file, path, &mut h[..n], 0, "read the VDI header")?;
        let h = Fields::new(&h, "read the VDI header").in_file(path, 0);
        if h.le32(0x40)? != magic::VDI_SIGNATURE {
            return Err(invalid("find the VDI signature", 0x40));
        }
        let version = h.le32(0x44)?;
        if version >> 16 != 1 {
            return Err(unsupported("open this VDI version", 0x44));
        }
        let image_type = h.le32(0x4c)?;
        let fixed = match image_type {
            TYPE_DYNAMIC => false,
            TYPE_FIXED => true,
            TYPE_UNDO | TYPE_DIFF => {
                return Err(unsupported("open a differencing VDI (parent images)", 0x4c))
            }
            _ => return Err(invalid("read the VDI image type", 0x4c)),
        };
        let off_blocks = u64::from(h.le32(0x154)?);
        let off_data = u64::from(h.le32(0x158)?);
        let sector_size = h.le32(0x168)?;
        let disk_size = h.le64(0x170)?;
        let block_size = u64::from(h.le32(0x178)?);
        let block_extra = u64::from(h.le32(0x17c)?);
        let blocks = u64::from(h.le32(0x180)?);
        if sector_size != 0 && sector_size != 512 {
            return Err(unsupported("open a VDI with non-512-byte sectors", 0x168));
        }
        if !block_size.is_power_of_two() || !(512..=MAX_BLOCK).contains(&block_size) {
            return Err(unsupported("use the VDI block size", 0x178));
        }
        if block_extra != 0 {
            return Err(unsupported("use VDI per-block extra data", 0x17c));
        }
        if disk_size.div_ceil(block_size) > blocks {
            return Err(corrupt("fit the VDI disk size in its blocks", 0x170));
        }
        let map_len = blocks * 4;
        if off_blocks < 0x1c8 || off_blocks.saturating_add(map_len) > file_len {
            return Err(corrupt("read the VDI block map (past the end of the file)", 0x154));
        }
        if off_data < off_blocks + map_len.min(disk_size.div_ceil(block_size) * 4) {
            return Err(corrupt("place the VDI data area (it overlaps the block map)", 0x158));
        }
        // Only the entries covering the disk matter; the table fits in the file (checked).
        let used = disk_size.div_ceil(block_size);
        let mut table = vec![0u8; (used * 4) as usize];
        mapped::read_exact(&file, path, &mut table, off_blocks, "read the VDI block map")?;
        let entries = le32_table(&table).enumerate().map(|(i, entry)| {
            let at = off_blocks + i as u64 * 4;
            let block = match entry {
                BLOCK_FREE => Block::Unallocated,
                BLOCK_ZERO => Block::Zero,
                index => Block::Data(off_data + u64::from(index) * block_size),
            };
            (at, block)
        });
        let image =
            MappedImage::new(file, path, file_len, disk_size, block_size, off_data, entries)?;
        let mut problems = Vec::new();
        let claimed = h.le32(0x184)? as usize;
        if claimed != image.allocated_blocks() {
            problems.push(format!(
                "header says {claimed} blocks are allocated, the block map has {}",
                image.allocated_blocks()
            ));
        }
        Ok(Vdi { image, fixed, problems })
    }

    pub fn info(&self) -> Result<ImageInfo, DiskError> {
        Ok(ImageInfo {
            path: self.image.path().to_path_buf(),
            format: ImageFormat::Vdi,
            subformat: Some(if self.fixed { "fixed" } else { "dynamic" }.to_string()),
            virtual_size: self.image.size(),
            allocated_bytes: mapped::allocated_bytes(self.image.path())?,
            backing: None,
            problems: self.problems.clone(),
        })
    }
}

impl BlockBackend for Vdi {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.image.read_at(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], offset: u64) -> Result<(), DiskError> {
        Err(mapped::read_only(self.image.path(), offset))
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(mapped::read_only(self.image.path(), offset))
    }

    fn write_zeroes(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(mapped::read_only(self.image.path(), offset))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        self.image.extents(offset, len)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use crate::ExtentKind;

    fn put32(img: &mut [u8], at: usize, v: u32) {
        img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Four 4 KiB blocks: block 0 stored first (0x11s), 1 unallocated, 2 zero, 3 stored
    /// second (0x33s). Map at 0x200, data at 0x400.
    fn vdi() -> Vec<u8> {
        let mut img = vec![0u8; 0x400 + 2 * 4096];
        img[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        put32(&mut img, 0x40, magic::VDI_SIGNATURE);
        put32(&mut img, 0x44, 0x0001_0001);
        put32(&mut img, 0x48, 0x190);
        put32(&mut img, 0x4c, TYPE_DYNAMIC);
        put32(&mut img, 0x154, 0x200);
        put32(&mut img, 0x158, 0x400);
        put32(&mut img, 0x168, 512);
        img[0x170..0x178].copy_from_slice(&16384u64.to_le_bytes());
        put32(&mut img, 0x178, 4096);
        put32(&mut img, 0x180, 4);
        put32(&mut img, 0x184, 2);
        for (i, e) in [0, BLOCK_FREE, BLOCK_ZERO, 1].into_iter().enumerate() {
            put32(&mut img, 0x200 + 4 * i, e);
        }
        img[0x400..0x1400].fill(0x11);
        img[0x1400..].fill(0x33);
        img
    }

    fn open_bytes(bytes: &[u8]) -> Result<Vdi, DiskError> {
        open_kept(bytes).1
    }

    /// Also returns the directory, for tests that stat the image after opening it.
    fn open_kept(bytes: &[u8]) -> (tempfile::TempDir, Result<Vdi, DiskError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.vdi");
        std::fs::write(&path, bytes).unwrap();
        let vdi = Vdi::open(&path, OpenOptions::default());
        (dir, vdi)
    }

    #[test]
    fn dynamic_vdi_reads_blocks_and_maps_holes() {
        let (_dir, disk) = open_kept(&vdi());
        let disk = disk.unwrap();
        let mut data = vec![0u8; 16384];
        disk.read_at(&mut data, 0).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0x11));
        assert!(data[4096..12288].iter().all(|&b| b == 0));
        assert!(data[12288..].iter().all(|&b| b == 0x33));
        let kinds: Vec<_> = disk.extents(0, 16384).unwrap().iter().map(|e| e.kind).collect();
        use ExtentKind::*;
        assert_eq!(kinds, [Data, Unallocated, Zero, Data]);
        assert_eq!(disk.info().unwrap().subformat.as_deref(), Some("dynamic"));
        assert!(disk.info().unwrap().problems.is_empty());
        assert!(disk.discard(0, 512).is_err());
    }

    #[test]
    fn differencing_vdi_is_unsupported() {
        let mut img = vdi();
        put32(&mut img, 0x4c, TYPE_DIFF);
        assert_eq!(open_bytes(&img).unwrap_err().kind(), DiskErrorKind::UnsupportedFeature);
    }

    #[test]
    fn truncated_vdi_is_invalid() {
        assert_eq!(open_bytes(&vdi()[..0x100]).unwrap_err().kind(), DiskErrorKind::InvalidFormat);
    }

    #[test]
    fn disk_size_beyond_the_blocks_is_corrupt() {
        let mut img = vdi();
        img[0x170..0x178].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = open_bytes(&img).unwrap_err();
        assert_eq!((err.kind(), err.offset()), (DiskErrorKind::CorruptImage, Some(0x170)));
    }

    #[test]
    fn huge_block_map_past_the_end_is_refused_before_allocating() {
        let mut img = vdi();
        put32(&mut img, 0x180, u32::MAX);
        img[0x170..0x178].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = open_bytes(&img).unwrap_err();
        assert_eq!((err.kind(), err.offset()), (DiskErrorKind::CorruptImage, Some(0x154)));
    }

    #[test]
    fn block_entry_past_the_end_is_corrupt_at_its_entry() {
        let mut img = vdi();
        put32(&mut img, 0x20c, 7);
        let err = open_bytes(&img).unwrap_err();
        assert_eq!((err.kind(), err.offset()), (DiskErrorKind::CorruptImage, Some(0x20c)));
    }

    #[test]
    fn data_area_overlapping_the_map_is_corrupt() {
        let mut img = vdi();
        put32(&mut img, 0x158, 0x204);
        assert_eq!(open_bytes(&img).unwrap_err().kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn odd_block_size_is_unsupported() {
        let mut img = vdi();
        put32(&mut img, 0x178, 3000);
        assert_eq!(open_bytes(&img).unwrap_err().kind(), DiskErrorKind::UnsupportedFeature);
    }

    #[test]
    fn wrong_allocated_count_is_a_problem_not_an_error() {
        let mut img = vdi();
        put32(&mut img, 0x184, 3);
        let (_dir, disk) = open_kept(&img);
        assert_eq!(disk.unwrap().info().unwrap().problems.len(), 1);
    }
}
