//! The format-neutral vocabulary every image format shares: which format ([`ImageFormat`]),
//! what `hutch disk info` reports ([`ImageInfo`]), how a stretch of a disk is stored
//! ([`Extent`]) and how to open an image ([`OpenOptions`]). It depends on nothing else in
//! the crate, so the formats and the dispatch in `image` can all use it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
