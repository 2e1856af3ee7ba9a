//! Opening any image: the dispatch from the format [`detect`](crate::detect()) finds by
//! content to that format's opener, as a [`BlockBackend`] ([`open_image`]) or as what
//! `hutch disk info` reports ([`image_info`]).
//!
//! Formats with backing files open their parents through [`open_image`] (a parent may be of
//! any format), so this module and those formats import each other: the crate's one import
//! cycle, on purpose.

use std::path::Path;

use crate::{BlockBackend, DiskError, DiskErrorKind, RawFile};
// The types lived here before `types`; `disk::image::ImageFormat` and friends still resolve.
pub use crate::types::{Extent, ExtentKind, ImageFormat, ImageInfo, OpenOptions};

/// Opens `path` as whatever format its content says, following backing chains.
pub fn open_image(path: &Path, options: OpenOptions) -> Result<Box<dyn BlockBackend>, DiskError> {
    let format = crate::detect::detect(path)?;
    match format {
        ImageFormat::Raw => Ok(Box::new(RawFile::open(path, !options.writable)?)),
        ImageFormat::Iso => Ok(Box::new(open_iso(path, options)?)),
        ImageFormat::Vmdk => Ok(Box::new(crate::Vmdk::open(path, options)?)),
        ImageFormat::Vdi => Ok(Box::new(crate::Vdi::open(path, options)?)),
        ImageFormat::Parallels => Ok(Box::new(crate::Parallels::open(path, options)?)),
        ImageFormat::Vhd => Ok(Box::new(crate::vhd::Vhd::open(path, options)?)),
        ImageFormat::Vhdx => Ok(Box::new(crate::vhdx::Vhdx::open(path, options)?)),
        ImageFormat::Qcow2 => Ok(Box::new(crate::qcow2::Qcow2::open(path, options)?)),
        other => Err(unsupported(other, path)),
    }
}

/// What `hutch disk info` reports about the image at `path` (format by content).
pub fn image_info(path: &Path) -> Result<ImageInfo, DiskError> {
    let format = crate::detect::detect(path)?;
    let read_only = OpenOptions { writable: false };
    match format {
        ImageFormat::Raw => raw_info(path),
        ImageFormat::Iso => crate::Iso::open(path)?.info(),
        ImageFormat::Vmdk => crate::Vmdk::open(path, read_only)?.info(),
        ImageFormat::Vdi => crate::Vdi::open(path, read_only)?.info(),
        ImageFormat::Parallels => crate::Parallels::open(path, read_only)?.info(),
        ImageFormat::Vhd => Ok(crate::vhd::Vhd::open(path, read_only)?.info()),
        ImageFormat::Vhdx => Ok(crate::vhdx::Vhdx::open(path, read_only)?.info()),
        ImageFormat::Qcow2 => Ok(crate::qcow2::Qcow2::open(path, read_only)?.info()),
        ImageFormat::Ova => Ok(crate::ova::Ova::open(path)?.info()),
    }
}

/// The error for a format that is not a disk by itself (an OVA holds disks: import it).
fn unsupported(format: ImageFormat, path: &Path) -> DiskError {
    let op = match format {
        ImageFormat::Ova => "use an OVA appliance as a disk (import it)",
        _ => "open this image format",
    };
    DiskError::new(DiskErrorKind::UnsupportedFeature, op).with_path(path)
}

/// ISO images are read-only media.
fn open_iso(path: &Path, options: OpenOptions) -> Result<crate::Iso, DiskError> {
    if options.writable {
        let e = DiskErrorKind::UnsupportedFeature;
        return Err(DiskError::new(e, "open an ISO image for writing").with_path(path));
    }
    crate::Iso::open(path)
}

fn raw_info(path: &Path) -> Result<ImageInfo, DiskError> {
    let raw = RawFile::open(path, true)?;
    let meta = std::fs::metadata(path).map_err(|e| DiskError::io("stat", e).with_path(path))?;
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format: ImageFormat::Raw,
        subformat: None,
        virtual_size: raw.size(),
        allocated_bytes: std::os::unix::fs::MetadataExt::blocks(&meta).saturating_mul(512),
        backing: None,
        problems: Vec::new(),
    })
}
