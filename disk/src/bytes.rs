//! Fixed-layout fields out of metadata bytes (headers, footers, table entries), checked: a
//! field that reaches past the bytes at hand is a [`DiskErrorKind::CorruptImage`] error naming
//! the image and the field's file offset, never a panic nor a silent zero. Every format reads
//! its fields through [`Fields`]; tables of equal entries through the `*_table` functions.

use std::io;
use std::path::Path;

use crate::{DiskError, DiskErrorKind};

/// Why a field could not be read (the source of the [`DiskError`]).
#[derive(Debug, thiserror::Error)]
pub enum BytesError {
    #[error("A {len}-byte field at {at:#x} ends past the {available} bytes read")]
    Short { at: usize, len: usize, available: usize },
}

/// Bytes read from an image, with what they are (for errors) and where they came from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields<'a> {
    bytes: &'a [u8],
    op: &'static str,
    path: Option<&'a Path>,
    /// The file offset of `bytes[0]`.
    base: u64,
}

impl<'a> Fields<'a> {
    /// `bytes` read while doing `op` ("read the VHD footer").
    pub(crate) fn new(bytes: &'a [u8], op: &'static str) -> Self {
        Fields { bytes, op, path: None, base: 0 }
    }

    /// Says the bytes came from offset `base` of the image at `path`.
    pub(crate) fn in_file(self, path: &'a Path, base: u64) -> Self {
        Fields { path: Some(path), base, ..self }
    }

    /// The `len` bytes at `at`.
    pub(crate) fn slice(&self, at: usize, len: usize) -> Result<&'a [u8], DiskError> {
        at.checked_add(len)
            .and_then(|end| self.bytes.get(at..end))
            .ok_or_else(|| self.short(at, len))
    }

    /// The `N` bytes at `at`, as an array.
    pub(crate) fn array<const N: usize>(&self, at: usize) -> Result<[u8; N], DiskError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.slice(at, N)?);
        Ok(out)
    }

    pub(crate) fn le16(&self, at: usize) -> Result<u16, DiskError> {
        self.array(at).map(u16::from_le_bytes)
    }

    pub(crate) fn le32(&self, at: usize) -> Result<u32, DiskError> {
        self.array(at).map(u32::from_le_bytes)
    }

    pub(crate) fn le64(&self, at: usize) -> Result<u64, DiskError> {
        self.array(at).map(u64::from_le_bytes)
    }

    pub(crate) fn be16(&self, at: usize) -> Result<u16, DiskError> {
        self.array(at).map(u16::from_be_bytes)
    }

    pub(crate) fn be32(&self, at: usize) -> Result<u32, DiskError> {
        self.array(at).map(u32::from_be_bytes)
    }

    pub(crate) fn be64(&self, at: usize) -> Result<u64, DiskError> {
        self.array(at).map(u64::from_be_bytes)
    }

    fn short(&self, at: usize, len: usize) -> DiskError {
        let reason = BytesError::Short { at, len, available: self.bytes.len() };
        let mut e = DiskError {
            source: Some(io::Error::other(reason)),
            ..DiskError::new(DiskErrorKind::CorruptImage, self.op)
        };
        if let Some(path) = self.path {
            e = e.with_path(path);
        }
        e.with_offset(self.base.saturating_add(at as u64))
    }
}

/// A table of little-endian `u32` entries; a partial entry at the end is not one.
pub(crate) fn le32_table(raw: &[u8]) -> impl Iterator<Item = u32> + '_ {
    raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// A table of little-endian `u64` entries; a partial entry at the end is not one.
pub(crate) fn le64_table(raw: &[u8]) -> impl Iterator<Item = u64> + '_ {
    raw.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
}

/// A table of big-endian `u32` entries; a partial entry at the end is not one.
pub(crate) fn be32_table(raw: &[u8]) -> impl Iterator<Item = u32> + '_ {
    raw.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

/// A table of big-endian `u64` entries; a partial entry at the end is not one.
pub(crate) fn be64_table(raw: &[u8]) -> impl Iterator<Item = u64> + '_ {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::error::Error;

    use super::*;

    const BYTES: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn fields() -> Fields<'static> {
        Fields::new(&BYTES, "read the test header").in_file(Path::new("/images/t.img"), 0x200)
    }

    /// The error every reader gives for a field past the end: corrupt, at the field's file
    /// offset, naming the image and the operation.
    fn assert_short(e: DiskError, at: u64) {
        assert_eq!(e.kind(), DiskErrorKind::CorruptImage);
        assert_eq!(e.offset(), Some(0x200 + at));
        assert_eq!(e.path(), Some(Path::new("/images/t.img")));
        assert!(e.to_string().contains("read the test header"), "{e}");
        assert!(e.source().unwrap().to_string().contains("past the 8 bytes read"), "{e}");
    }

    #[test]
    fn fields_read_in_both_byte_orders() {
        let f = fields();
        assert_eq!(f.le16(0).unwrap(), 0x0201);
        assert_eq!(f.be16(6).unwrap(), 0x0708);
        assert_eq!(f.le32(4).unwrap(), 0x0807_0605);
        assert_eq!(f.be32(0).unwrap(), 0x0102_0304);
        assert_eq!(f.le64(0).unwrap(), 0x0807_0605_0403_0201);
        assert_eq!(f.be64(0).unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(f.array::<3>(5).unwrap(), [6, 7, 8]);
        assert_eq!(f.slice(8, 0).unwrap(), &[] as &[u8]);
    }

    #[test]
    fn le16_past_the_end_is_corrupt() {
        assert_short(fields().le16(7).unwrap_err(), 7);
    }

    #[test]
    fn le32_past_the_end_is_corrupt() {
        assert_short(fields().le32(5).unwrap_err(), 5);
    }

    #[test]
    fn le64_past_the_end_is_corrupt() {
        assert_short(fields().le64(1).unwrap_err(), 1);
    }

    #[test]
    fn be16_past_the_end_is_corrupt() {
        assert_short(fields().be16(8).unwrap_err(), 8);
    }

    #[test]
    fn be32_past_the_end_is_corrupt() {
        assert_short(fields().be32(6).unwrap_err(), 6);
    }

    #[test]
    fn be64_past_the_end_is_corrupt() {
        assert_short(fields().be64(4).unwrap_err(), 4);
    }

    #[test]
    fn slice_past_the_end_or_overflowing_is_corrupt() {
        assert_short(fields().slice(2, 7).unwrap_err(), 2);
        let e = fields().array::<2>(usize::MAX).unwrap_err();
        assert_eq!((e.kind(), e.offset()), (DiskErrorKind::CorruptImage, Some(u64::MAX)));
    }

    #[test]
    fn tables_ignore_a_partial_last_entry() {
        assert_eq!(le32_table(&BYTES[..7]).collect::<Vec<_>>(), vec![0x0403_0201]);
        assert_eq!(be32_table(&BYTES).collect::<Vec<_>>(), vec![0x0102_0304, 0x0506_0708]);
        assert_eq!(le64_table(&BYTES).collect::<Vec<_>>(), vec![0x0807_0605_0403_0201]);
        assert_eq!(be64_table(&BYTES[..7]).count(), 0);
    }
}
