//! Parallels disk images (read-only): a 64-byte header, then the BAT, one 32-bit entry per
//! cluster (0 = unallocated). "WithoutFreeSpace" images count BAT offsets in sectors,
//! "WithouFreSpacExt" ones in clusters. A bundle directory (`*.hdd/` with
//! `DiskDescriptor.xml`) is opened through the one image file its descriptor names.

use std::path::{Path, PathBuf};

use crate::bytes::{le32_table, Fields};
use crate::magic;
use crate::mapped::{self, err_at, Block, MappedImage};
use crate::{BlockBackend, DiskError, DiskErrorKind, Extent, ImageFormat, ImageInfo, OpenOptions};

const HEADER_LEN: u64 = 64;
const SECTOR: u64 = 512;
/// qemu defaults to 1 MiB clusters; allow up to 64 MiB.
const MAX_CLUSTER: u64 = 64 << 20;
/// A descriptor larger than this is not a Parallels bundle descriptor.
const MAX_DESCRIPTOR: u64 = 1 << 20;

/// An open Parallels image.
#[derive(Debug)]
pub struct Parallels {
    image: MappedImage,
    /// The bundle directory, when opened through one.
    bundle: Option<PathBuf>,
    problems: Vec<String>,
}

impl Parallels {
    /// Opens an image file, or a bundle directory holding `DiskDescriptor.xml`.
    pub fn open(path: &Path, options: OpenOptions) -> Result<Parallels, DiskError> {
        if options.writable {
            return Err(mapped::read_only(path, 0));
        }
        if path.is_dir() {
            let image_path = bundle_image(path)?;
            let mut disk = Parallels::open_file(&image_path)?;
            disk.bundle = Some(path.to_path_buf());
            return Ok(disk);
        }
        Parallels::open_file(path)
    }

    fn open_file(path: &Path) -> Result<Parallels, DiskError> {
        let (file, file_len) = mapped::open_file(path)?;
        let corrupt = |op, at| err_at(DiskErrorKind::CorruptImage, op, path, at);
        let mut h = [0u8; HEADER_LEN as usize];
        if file_len < HEADER_LEN {
            return Err(err_at(DiskErrorKind::InvalidFormat, "read the Parallels header", path, 0));
        }
        mapped::read_exact(&file, path, &mut h, 0, "read the Parallels header")?;
        let h = Fields::new(&h, "read the Parallels header").in_file(path, 0);
        let extended = match h.slice(0, 16)? {
            m if m == magic::PARALLELS_OLD => false,
            m if m == magic::PARALLELS_EXT => true,
            _ => {
                let e = DiskErrorKind::InvalidFormat;
                return Err(err_at(e, "find the Parallels magic", path, 0));
            }
        };
        if h.le32(16)? != 2 {
            let e = DiskErrorKind::UnsupportedFeature;
            return Err(err_at(e, "open this Parallels version", path, 16));
        }
        let cluster = u64::from(h.le32(28)?) * SECTOR;
        if cluster == 0 || cluster > MAX_CLUSTER {
            return Err(corrupt("use the Parallels cluster size", 28));
        }
        let bat_entries = u64::from(h.le32(32)?);
        // Old images only have a 32-bit sector count.
        let sectors = if extended { h.le64(36)? } else { u64::from(h.le32(36)?) };
        let size = sectors.checked_mul(SECTOR).ok_or_else(|| corrupt("use the disk size", 36))?;
        if size.div_ceil(cluster) > bat_entries {
            return Err(corrupt("fit the disk size in the BAT", 36));
        }
        let used = size.div_ceil(cluster);
        let bat_end = HEADER_LEN + used * 4;
        if bat_end > file_len {
            return Err(corrupt("read the Parallels BAT (past the end of the file)", 32));
        }
        let data_off = u64::from(h.le32(48)?) * SECTOR;
        let data_start = if data_off == 0 { bat_end } else { data_off.max(bat_end) };
        let mut bat = vec![0u8; (used * 4) as usize];
        mapped::read_exact(&file, path, &mut bat, HEADER_LEN, "read the Parallels BAT")?;
        let unit = if extended { cluster } else { SECTOR };
        let entries = le32_table(&bat).enumerate().map(|(i, entry)| {
            let at = HEADER_LEN + i as u64 * 4;
            match entry {
                0 => (at, Block::Unallocated),
                n => (at, Block::Data(u64::from(n) * unit)),
            }
        });
        let image = MappedImage::new(file, path, file_len, size, cluster, data_start, entries)?;
        let mut problems = Vec::new();
        if h.le32(44)? == 0x746f_6e59 {
            problems.push("image was not closed cleanly (in-use flag set)".to_string());
        }
        Ok(Parallels { image, bundle: None, problems })
    }

    pub fn info(&self) -> Result<ImageInfo, DiskError> {
        let mut allocated = mapped::allocated_bytes(self.image.path())?;
        if let Some(bundle) = &self.bundle {
            allocated += mapped::allocated_bytes(&bundle.join(magic::PARALLELS_BUNDLE_DESCRIPTOR))
                .unwrap_or(0);
        }
        Ok(ImageInfo {
            path: self.bundle.clone().unwrap_or_else(|| self.image.path().to_path_buf()),
            format: ImageFormat::Parallels,
            subformat: Some(if self.bundle.is_some() { "bundle" } else { "image" }.to_string()),
            virtual_size: self.image.size(),
            allocated_bytes: allocated,
            backing: None,
            problems: self.problems.clone(),
        })
    }
}

/// The image file a bundle's `DiskDescriptor.xml` names (only single-image bundles: no
/// snapshots).
fn bundle_image(dir: &Path) -> Result<PathBuf, DiskError> {
    let xml_path = dir.join(magic::PARALLELS_BUNDLE_DESCRIPTOR);
    let (_, len) = mapped::open_file(&xml_path)?;
    if len > MAX_DESCRIPTOR {
        let e = DiskErrorKind::InvalidFormat;
        return Err(err_at(e, "read the bundle descriptor (too large)", &xml_path, 0));
    }
    let xml =
        std::fs::read(&xml_path).map_err(|e| DiskError::io("read", e).with_path(&xml_path))?;
    let xml = String::from_utf8_lossy(&xml);
    let mut files = Vec::new();
    let mut rest = xml.as_ref();
    while let Some(start) = rest.find("<File>") {
        rest = &rest[start + "<File>".len()..];
        let Some(end) = rest.find("</File>") else { break };
        files.push(rest[..end].trim().to_string());
        rest = &rest[end..];
    }
    match files.as_slice() {
        [one] if !one.is_empty() => Ok(dir.join(one)),
        [] | [_] => {
            let e = DiskErrorKind::InvalidFormat;
            Err(err_at(e, "find the image file in the bundle descriptor", &xml_path, 0))
        }
        _ => {
            let e = DiskErrorKind::UnsupportedFeature;
            Err(err_at(e, "open a Parallels bundle with snapshots", &xml_path, 0))
        }
    }
}

impl BlockBackend for Parallels {
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

    /// Three 4 KiB clusters (8 sectors): cluster 0 stored at 4 KiB (0x11s), 1 unallocated,
    /// 2 stored at 8 KiB (0x22s); the disk ends 512 bytes into cluster 2.
    fn image(magic: &[u8; 16]) -> Vec<u8> {
        let mut img = vec![0u8; 3 * 4096];
        img[..16].copy_from_slice(magic);
        put32(&mut img, 16, 2);
        put32(&mut img, 28, 8);
        put32(&mut img, 32, 3);
        put32(&mut img, 36, 17);
        put32(&mut img, 48, 8);
        let unit = if magic == magic::PARALLELS_EXT { 1 } else { 8 };
        put32(&mut img, 64, unit);
        put32(&mut img, 72, 2 * unit);
        img[4096..8192].fill(0x11);
        img[8192..].fill(0x22);
        img
    }

    fn open_bytes(bytes: &[u8]) -> Result<Parallels, DiskError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.hds");
        std::fs::write(&path, bytes).unwrap();
        Parallels::open(&path, OpenOptions::default())
    }

    #[test]
    fn both_magics_read_their_clusters() {
        for magic in [magic::PARALLELS_OLD, magic::PARALLELS_EXT] {
            let disk = open_bytes(&image(magic)).unwrap();
            assert_eq!(disk.size(), 17 * 512);
            let mut data = vec![0u8; 17 * 512];
            disk.read_at(&mut data, 0).unwrap();
            assert!(data[..4096].iter().all(|&b| b == 0x11));
            assert!(data[4096..8192].iter().all(|&b| b == 0));
            assert!(data[8192..].iter().all(|&b| b == 0x22));
            let kinds: Vec<_> =
                disk.extents(0, disk.size()).unwrap().iter().map(|e| e.kind).collect();
            assert_eq!(kinds, [ExtentKind::Data, ExtentKind::Unallocated, ExtentKind::Data]);
        }
    }

    #[test]
    fn bat_entry_into_the_header_or_past_the_end_is_corrupt() {
        for entry in [0u32, 100] {
            let mut img = image(magic::PARALLELS_EXT);
            put32(&mut img, 72, entry);
            let result = open_bytes(&img);
            if entry == 0 {
                assert!(result.is_ok());
                continue;
            }
            let err = result.unwrap_err();
            assert_eq!((err.kind(), err.offset()), (DiskErrorKind::CorruptImage, Some(72)));
        }
        let mut img = image(magic::PARALLELS_OLD);
        put32(&mut img, 64, 0);
        put32(&mut img, 72, 1);
        assert_eq!(open_bytes(&img).unwrap_err().kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn absurd_sizes_are_refused_before_allocating() {
        let mut img = image(magic::PARALLELS_EXT);
        img[36..44].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(open_bytes(&img).unwrap_err().kind(), DiskErrorKind::CorruptImage);
        let mut img = image(magic::PARALLELS_EXT);
        put32(&mut img, 32, u32::MAX);
        img[36..44].copy_from_slice(&(1u64 << 34).to_le_bytes());
        let err = open_bytes(&img).unwrap_err();
        assert_eq!((err.kind(), err.offset()), (DiskErrorKind::CorruptImage, Some(32)));
        let mut img = image(magic::PARALLELS_EXT);
        put32(&mut img, 28, 0);
        assert_eq!(open_bytes(&img).unwrap_err().kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn truncated_header_is_invalid() {
        let err = open_bytes(&image(magic::PARALLELS_OLD)[..40]).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::InvalidFormat);
    }

    #[test]
    fn bundle_directory_opens_the_image_its_descriptor_names() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("disk.hdd");
        std::fs::create_dir(&bundle).unwrap();
        std::fs::write(bundle.join("disk.hdd.0.{guid}.hds"), image(magic::PARALLELS_EXT)).unwrap();
        let xml = "<Parallels_disk_image><StorageData><Storage><Image><GUID>{g}</GUID>\
            <File>disk.hdd.0.{guid}.hds</File></Image></Storage></StorageData></Parallels_disk_image>";
        std::fs::write(bundle.join(magic::PARALLELS_BUNDLE_DESCRIPTOR), xml).unwrap();
        assert_eq!(crate::detect::detect(&bundle).unwrap(), ImageFormat::Parallels);
        let disk = Parallels::open(&bundle, OpenOptions::default()).unwrap();
        assert_eq!(disk.size(), 17 * 512);
        let info = disk.info().unwrap();
        assert_eq!((info.path, info.subformat.as_deref()), (bundle.clone(), Some("bundle")));
        let two = xml.replace("</Image>", "</Image><Image><File>b.hds</File></Image>");
        std::fs::write(bundle.join(magic::PARALLELS_BUNDLE_DESCRIPTOR), two).unwrap();
        let err = Parallels::open(&bundle, OpenOptions::default()).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::UnsupportedFeature);
    }
}
