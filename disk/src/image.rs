//! Image formats as a whole: which format a file is (by content), what `hutch disk info`
//! reports about it, and opening any image as a [`BlockBackend`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{BlockBackend, DiskError, DiskErrorKind, RawFile};

/// The image formats Hutch knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Raw,
    Iso,
    Qcow2,
    Vmdk,
    Vdi,
    Vhd,
    Vhdx,
    Parallels,
    Ova,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Iso => "iso",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Parallels => "parallels",
            ImageFormat::Ova => "ova",
        }
    }
}

/// What `hutch disk info` shows about one image (the first of a backing chain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: ImageFormat,
    /// e.g. "v3", "monolithicSparse", "dynamic", "fixed", "differencing".
    pub subformat: Option<String>,
    pub virtual_size: u64,
    /// Bytes the image occupies on the host (all its files).
    pub allocated_bytes: u64,
    /// The parent image, for formats with backing files.
    pub backing: Option<PathBuf>,
    /// Inconsistencies found while opening (leaked clusters, ...): the image still opened.
    pub problems: Vec<String>,
}

/// How a stretch of the disk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentKind {
    /// Stored data (may happen to be zeroes).
    Data,
    /// Known to read as zeroes.
    Zero,
    /// Not allocated in this image nor its backing chain: reads as zeroes.
    Unallocated,
}

/// `len` bytes at `offset` stored as `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// How to open an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    /// Open for writing (only formats Hutch writes: raw, qcow2).
    pub writable: bool,
}

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
