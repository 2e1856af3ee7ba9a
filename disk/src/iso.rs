//! ISO 9660 images: raw bytes, always read-only, with the primary volume descriptor's volume
//! identifier for `disk info`.

use std::path::Path;

use crate::magic;
use crate::mapped;
use crate::{BlockBackend, DiskError, DiskErrorKind, Extent, ImageFormat, ImageInfo, RawFile};

const TYPE_PRIMARY: u8 = 1;
const TYPE_TERMINATOR: u8 = 255;
/// Volume descriptors to look through for the primary one.
const MAX_DESCRIPTORS: u64 = 32;

/// An open ISO 9660 image.
#[derive(Debug)]
pub struct Iso {
    raw: RawFile,
    volume_id: String,
}

impl Iso {
    pub fn open(path: &Path) -> Result<Iso, DiskError> {
        let raw = RawFile::open(path, true)?;
        let volume_id = primary_volume_id(&raw)?;
        Ok(Iso { raw, volume_id })
    }

    /// The primary volume descriptor's volume identifier, trailing spaces removed.
    pub fn volume_id(&self) -> &str {
        &self.volume_id
    }

    pub fn info(&self) -> Result<ImageInfo, DiskError> {
        let subformat = if self.volume_id.is_empty() {
            "iso9660".to_string()
        } else {
            format!("iso9660 volume \"{}\"", self.volume_id)
        };
        Ok(ImageInfo {
            path: self.raw.path().to_path_buf(),
            format: ImageFormat::Iso,
            subformat: Some(subformat),
            virtual_size: self.raw.size(),
            allocated_bytes: mapped::allocated_bytes(self.raw.path())?,
            backing: None,
            problems: Vec::new(),
        })
    }
}

fn primary_volume_id(raw: &RawFile) -> Result<String, DiskError> {
    let mut sector = [0u8; 2048];
    for i in 0..MAX_DESCRIPTORS {
        let at = magic::ISO_DESCRIPTORS + i * 2048;
        if raw.read_at(&mut sector, at).is_err() {
            break;
        }
        if &sector[1..6] != magic::ISO_STANDARD_ID {
            break;
        }
        match sector[0] {
            TYPE_PRIMARY => {
                let id = String::from_utf8_lossy(&sector[40..72]);
                return Ok(id.trim_end_matches([' ', '\0']).to_string());
            }
            TYPE_TERMINATOR => break,
            _ => {}
        }
    }
    Err(DiskError::new(DiskErrorKind::InvalidFormat, "find the ISO 9660 primary volume descriptor")
        .with_path(raw.path())
        .with_offset(magic::ISO_DESCRIPTORS))
}

fn read_only(raw: &RawFile, offset: u64) -> DiskError {
    mapped::read_only(raw.path(), offset)
}

impl BlockBackend for Iso {
    fn size(&self) -> u64 {
        self.raw.size()
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.raw.read_at(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], offset: u64) -> Result<(), DiskError> {
        Err(read_only(&self.raw, offset))
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(read_only(&self.raw, offset))
    }

    fn write_zeroes(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(read_only(&self.raw, offset))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        self.raw.extents(offset, len)
    }

    fn read_vectored_at(
        &self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), DiskError> {
        self.raw.read_vectored_at(bufs, offset)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    /// A minimal image: 16 empty sectors, a primary descriptor, a terminator.
    fn minimal_iso(volume_id: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x8000 + 3 * 2048];
        let pvd = &mut img[0x8000..0x8800];
        pvd[0] = TYPE_PRIMARY;
        pvd[1..6].copy_from_slice(magic::ISO_STANDARD_ID);
        pvd[6] = 1;
        pvd[40..72].fill(b' ');
        pvd[40..40 + volume_id.len()].copy_from_slice(volume_id.as_bytes());
        let term = &mut img[0x8800..0x9000];
        term[0] = TYPE_TERMINATOR;
        term[1..6].copy_from_slice(magic::ISO_STANDARD_ID);
        img
    }

    #[test]
    fn volume_id_comes_from_the_primary_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.iso");
        std::fs::write(&path, minimal_iso("HUTCH_CD")).unwrap();
        let iso = Iso::open(&path).unwrap();
        assert_eq!(iso.volume_id(), "HUTCH_CD");
        assert!(!iso.is_writable());
        assert_eq!(iso.write_at(&[0], 0).unwrap_err().kind(), DiskErrorKind::UnsupportedFeature);
        assert_eq!(iso.info().unwrap().format, ImageFormat::Iso);
    }

    #[test]
    fn iso_without_primary_descriptor_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.iso");
        let mut img = minimal_iso("X");
        img[0x8000] = TYPE_TERMINATOR;
        std::fs::write(&path, img).unwrap();
        assert_eq!(Iso::open(&path).unwrap_err().kind(), DiskErrorKind::InvalidFormat);
    }
}
