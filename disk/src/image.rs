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
    let format = if crate::qcow2::is_qcow2(path)? { ImageFormat::Qcow2 } else { ImageFormat::Raw };
    match format {
        ImageFormat::Raw => Ok(Box::new(RawFile::open(path, !options.writable)?)),
        ImageFormat::Vhd => Ok(Box::new(crate::vhd::Vhd::open(path, options)?)),
        ImageFormat::Vhdx => Ok(Box::new(crate::vhdx::Vhdx::open(path, options)?)),
        ImageFormat::Qcow2 => Ok(Box::new(crate::qcow2::Qcow2::open(path, options)?)),
        _ => Err(DiskError::new(DiskErrorKind::UnsupportedFeature, "open").with_path(path)),
    }
}
