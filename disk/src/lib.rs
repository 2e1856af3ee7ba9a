//! Disk images: the block-backend interface the virtual disk controllers use, and the image
//! formats behind it. Hutch reads and writes raw and qcow2 (its native format); it reads ISO,
//! VMDK, VDI, VHD, VHDX and Parallels images, and OVA appliances for import. It also converts
//! between formats ([`convert`]) and merges qcow2 backing layers ([`pull_backing_layer`]).
//!
//! ```text
//!   virtio-blk, `hutch disk`, import
//!        │
//!        ▼
//!   image: open_image / image_info ──▶ detect (format by content) ──▶ magic
//!        │            ▲
//!        ▼            │ parents of any format (qcow2, VMDK)
//!   raw · iso · qcow2/ · vmdk/ · vdi · parallels · vhd · vhdx · ova   ──▶ dyn BlockBackend
//!        │
//!        ▼  shared pieces, which import no format:
//!   types (ImageFormat, ImageInfo, Extent, OpenOptions) · bytes (checked field reads)
//!   chain (the backing-chain guard) · mapped (file reads, block maps) · sys (holes) · lib
//! ```
//! The modules import each other in one direction, downwards, except for one cycle on
//! purpose: a format whose backing file may be of another format (qcow2, VMDK) opens it
//! through [`open_image`], which dispatches back to the formats; `chain` keeps that
//! recursion finite.
//!
//! Offsets and lengths are bytes. Backends check every access against their size, because the
//! callers pass guest-chosen values straight through. Image metadata is untrusted: its
//! fields are read through `bytes`, so a structure too short for them is a
//! [`DiskErrorKind::CorruptImage`] error, never a panic nor a silent zero.

use std::fmt;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

pub mod boot;
mod bytes;
mod chain;
pub mod convert;
pub mod detect;
pub mod image;
pub mod iso;
mod magic;
mod mapped;
pub mod ova;
pub mod parallels;
pub mod qcow2;
mod raw;
mod sys;
pub mod types;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use boot::{boot_firmware, BootFirmware};
pub use bytes::BytesError;
pub use chain::ChainError;
pub use detect::{detect, detect_bytes};
pub use image::{image_info, open_image};
pub use iso::Iso;
pub use parallels::Parallels;
pub use qcow2::{pull_backing_layer, qcow2_backing, PullReport};
pub use raw::RawFile;
pub use types::{Extent, ExtentKind, ImageFormat, ImageInfo, OpenOptions};
pub use vdi::Vdi;
pub use vmdk::Vmdk;

/// What went wrong, for callers that need to react (the message is in [`DiskError`]).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskErrorKind {
    /// The host file system or device failed (includes a missing file).
    Io,
    /// The file is not an image of the expected format.
    InvalidFormat,
    /// The image uses a feature this backend does not implement.
    UnsupportedFeature,
    /// The image's metadata is inconsistent.
    CorruptImage,
    /// An access reaches past the end of the disk.
    OutOfBounds,
    /// The caller cancelled a long operation (a conversion).
    Cancelled,
}

impl fmt::Display for DiskErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskErrorKind::Io => "I/O error",
            DiskErrorKind::InvalidFormat => "Invalid image format",
            DiskErrorKind::UnsupportedFeature => "Unsupported image feature",
            DiskErrorKind::CorruptImage => "Corrupt image",
            DiskErrorKind::OutOfBounds => "Access out of bounds",
            DiskErrorKind::Cancelled => "Cancelled",
        })
    }
}

/// A disk error: its kind, the operation, and where (image path, byte offset) it happened.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: could not {op} {}{}", path_text(.path), offset_text(.offset))]
pub struct DiskError {
    kind: DiskErrorKind,
    op: &'static str,
    path: Option<PathBuf>,
    offset: Option<u64>,
    #[source]
    source: Option<std::io::Error>,
}

fn path_text(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => "the disk".to_string(),
    }
}

fn offset_text(offset: &Option<u64>) -> String {
    offset.map(|o| format!(" at offset {o:#x}")).unwrap_or_default()
}

impl DiskError {
    /// A new error of `kind` while doing `op` ("read", "open", ...).
    pub fn new(kind: DiskErrorKind, op: &'static str) -> Self {
        DiskError { kind, op, path: None, offset: None, source: None }
    }

    /// An I/O error from the host while doing `op`.
    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        DiskError { source: Some(source), ..DiskError::new(DiskErrorKind::Io, op) }
    }

    pub fn with_path(mut self, path: &Path) -> Self {
        self.path = Some(path.to_path_buf());
        self
    }

    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    pub fn kind(&self) -> DiskErrorKind {
        self.kind
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn offset(&self) -> Option<u64> {
        self.offset
    }
}

/// A disk as a virtual controller sees it: a fixed-size array of bytes.
///
/// The vectored methods move data directly between guest memory and the image; their default
/// implementations bounce through a buffer, formats that can do better override them.
pub trait BlockBackend: Send + Sync {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
    fn is_writable(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError>;
    /// Makes every completed write durable (fsync).
    fn flush(&self) -> Result<(), DiskError>;
    /// Tells the backend `len` bytes at `offset` are unused; they may read back as anything.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Makes `len` bytes at `offset` read back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError>;

    /// How the `len` bytes at `offset` are stored, as consecutive extents covering exactly
    /// that range (converters skip zero and unallocated extents). The default says "all data".
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(self.size(), offset, len, "map")?;
        Ok(vec![Extent { offset, len, kind: ExtentKind::Data }])
    }

    /// Fills `bufs`, in order, from the disk starting at `offset`.
    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<(), DiskError> {
        let mut bounce = Vec::new();
        let mut pos = offset;
        for slice in bufs {
            bounce.resize(slice.len(), 0);
            self.read_at(&mut bounce, pos)?;
            slice.copy_from(&bounce);
            pos += slice.len() as u64;
        }
        Ok(())
    }

    /// Writes `bufs`, in order, to the disk starting at `offset`.
    fn write_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<(), DiskError> {
        let mut bounce = Vec::new();
        let mut pos = offset;
        for slice in bufs {
            bounce.resize(slice.len(), 0);
            slice.copy_to(&mut bounce);
            self.write_at(&bounce, pos)?;
            pos += slice.len() as u64;
        }
        Ok(())
    }
}

/// Checks that `len` bytes at `offset` lie inside a disk of `size` bytes.
pub(crate) fn check_range(
    size: u64,
    offset: u64,
    len: u64,
    op: &'static str,
) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::new(DiskErrorKind::OutOfBounds, op).with_offset(offset)),
    }
}

/// For tests that need a file system feature (holes): says SKIP where it is missing, and fails
/// in CI, whose /tmp (ext4) has it, so that a change of CI machine cannot hide the test.
#[cfg(test)]
pub(crate) fn skip_without(feature: &str) {
    testkit::skip("holes", &format!("this file system {feature}"));
}
