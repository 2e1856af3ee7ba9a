//! The qcow2 header: parsing and validating it (every field is untrusted), its extensions, and
//! building the first cluster of a new image.

use std::path::Path;

use super::{fail, Qcow2Error};
use crate::bytes::Fields;
use crate::{DiskError, DiskErrorKind};

pub(super) const MAGIC: [u8; 4] = crate::magic::QCOW2;
pub(super) const V2_HEADER_LEN: usize = 72;
pub(super) const V3_HEADER_LEN: usize = 104;
/// The header this crate writes: v3 fields plus the compression type byte, padded to 8.
pub(super) const CREATE_HEADER_LEN: usize = 112;

pub(super) const MIN_CLUSTER_BITS: u32 = 9;
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits: 32 MiB of L1 table, 8 MiB of refcount table.
pub(super) const MAX_L1_BYTES: u64 = 32 << 20;
pub(super) const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
const MAX_BACKING_NAME: u32 = 1023;
/// Virtual sizes above this are absurd (the host offset field has 56 bits).
pub(super) const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;

const EXT_END: u32 = 0;
pub(super) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// Byte offsets of header fields (for error offsets and in-place updates).
pub(super) mod field {
    pub const VERSION: u64 = 4;
    pub const BACKING_OFFSET: u64 = 8;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE: u64 = 48;
    pub const INCOMPAT: u64 = 72;
    pub const AUTOCLEAR: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LEN: u64 = 100;
    pub const COMPRESSION: u64 = 104;
}

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    /// Raw deflate (no zlib header), QEMU's default.
    Deflate,
    Zstd,
}

/// The parsed, validated header.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

/// Whether `[offset, offset + len)` lies inside a file of `file_len` bytes.
pub(super) fn inside(offset: u64, len: u64, file_len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= file_len)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses `first` (the first cluster of the file, or all of it if shorter) of a file of
    /// `file_len` bytes.
    pub fn parse(first: &[u8], file_len: u64, path: &Path) -> Result<Header, DiskError> {
        let bad = |kind, offset: u64, e: Qcow2Error| {
            fail(kind, "open", e).with_path(path).with_offset(offset)
        };
        if first.len() < V2_HEADER_LEN {
            return Err(bad(DiskErrorKind::InvalidFormat, 0, Qcow2Error::Truncated));
        }
        if first[..4] != MAGIC {
            return Err(bad(DiskErrorKind::InvalidFormat, 0, Qcow2Error::BadMagic));
        }
        let f = Fields::new(first, "read the qcow2 header").in_file(path, 0);
        let version = f.be32(4)?;
        if version != 2 && version != 3 {
            return Err(bad(
                DiskErrorKind::UnsupportedFeature,
                field::VERSION,
                Qcow2Error::Version(version),
            ));
        }
        let cluster_bits = f.be32(20)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(
                DiskErrorKind::InvalidFormat,
                field::CLUSTER_BITS,
                Qcow2Error::ClusterBits(cluster_bits),
            ));
        }
        let crypt = f.be32(32)?;
        if crypt != 0 {
            return Err(bad(
                DiskErrorKind::UnsupportedFeature,
                field::CRYPT,
                Qcow2Error::Encrypted,
            ));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: f.be64(24)?,
            l1_size: f.be32(36)?,
            l1_table_offset: f.be64(40)?,
            refcount_table_offset: f.be64(48)?,
            refcount_table_clusters: f.be32(56)?,
            nb_snapshots: f.be32(60)?,
            snapshots_offset: f.be64(64)?,
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression: Compression::Deflate,
            backing_file: None,
            backing_format: None,
        };
        let mut header_len = V2_HEADER_LEN;
        if version == 3 {
            if first.len() < V3_HEADER_LEN {
                return Err(bad(DiskErrorKind::InvalidFormat, 0, Qcow2Error::Truncated));
            }
            h.incompatible = f.be64(72)?;
            h.autoclear = f.be64(88)?;
            h.refcount_order = f.be32(96)?;
            let len = f.be32(100)? as usize;
            if len < V3_HEADER_LEN || !len.is_multiple_of(8) || len > first.len() {
                return Err(bad(
                    DiskErrorKind::InvalidFormat,
                    field::HEADER_LEN,
                    Qcow2Error::HeaderLength(len as u64),
                ));
            }
            header_len = len;
            if h.refcount_order > 6 {
                return Err(bad(
                    DiskErrorKind::InvalidFormat,
                    field::REFCOUNT_ORDER,
                    Qcow2Error::RefcountOrder(h.refcount_order),
                ));
            }
            if len > field::COMPRESSION as usize {
                h.compression = match first[field::COMPRESSION as usize] {
                    0 => Compression::Deflate,
                    1 => Compression::Zstd,
                    t => {
                        return Err(bad(
                            DiskErrorKind::UnsupportedFeature,
                            field::COMPRESSION,
                            Qcow2Error::CompressionType(t),
                        ))
                    }
                };
            }
        }
        let names = parse_extensions(&mut h, first, header_len, path)?;
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = match bit as u64 {
                b if 1 << b == INCOMPAT_DATA_FILE => "external data file".to_string(),
                b if 1 << b == INCOMPAT_EXTL2 => "extended L2 entries".to_string(),
                _ => names
                    .iter()
                    .find(|(t, b, _)| *t == 0 && u32::from(*b) == bit)
                    .map(|(_, _, n)| n.clone())
                    .unwrap_or_else(|| "unknown".to_string()),
            };
            return Err(bad(
                DiskErrorKind::UnsupportedFeature,
                field::INCOMPAT,
                Qcow2Error::IncompatibleFeature { bit, name },
            ));
        }
        h.validate(file_len, path)?;
        Ok(h)
    }

    /// Checks sizes and table positions against each other and the file.
    fn validate(&self, file_len: u64, path: &Path) -> Result<(), DiskError> {
        let bad = |kind, offset: u64, e: Qcow2Error| {
            fail(kind, "open", e).with_path(path).with_offset(offset)
        };
        let cs = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(bad(
                DiskErrorKind::InvalidFormat,
                field::SIZE,
                Qcow2Error::VirtualSize(self.size),
            ));
        }
        let needed = l1_entries_for(self.size, self.cluster_bits);
        let l1_bytes = u64::from(self.l1_size) * 8;
        if u64::from(self.l1_size) < needed {
            return Err(bad(
                DiskErrorKind::CorruptImage,
                field::L1_SIZE,
                Qcow2Error::L1TooSmall { entries: self.l1_size, needed },
            ));
        }
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(
                DiskErrorKind::UnsupportedFeature,
                field::L1_SIZE,
                Qcow2Error::L1TooLarge(l1_bytes),
            ));
        }
        if self.l1_size > 0
            && (!self.l1_table_offset.is_multiple_of(cs)
                || self.l1_table_offset == 0
                || !inside(self.l1_table_offset, l1_bytes, file_len))
        {
            return Err(bad(
                DiskErrorKind::CorruptImage,
                self.l1_table_offset,
                Qcow2Error::TableOutsideFile("L1 table"),
            ));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(bad(
                DiskErrorKind::UnsupportedFeature,
                field::REFCOUNT_TABLE,
                Qcow2Error::RefcountTableTooLarge(rt_bytes),
            ));
        }
        if rt_bytes == 0
            || !self.refcount_table_offset.is_multiple_of(cs)
            || self.refcount_table_offset == 0
            || !inside(self.refcount_table_offset, rt_bytes, file_len)
        {
            return Err(bad(
                DiskErrorKind::CorruptImage,
                self.refcount_table_offset,
                Qcow2Error::TableOutsideFile("refcount table"),
            ));
        }
        if self.nb_snapshots > 0
            && (!self.snapshots_offset.is_multiple_of(cs) || self.snapshots_offset >= file_len)
        {
            return Err(bad(
                DiskErrorKind::CorruptImage,
                self.snapshots_offset,
                Qcow2Error::TableOutsideFile("snapshot table"),
            ));
        }
        Ok(())
    }
}

/// L1 entries needed to map `size` bytes with clusters of `1 << cluster_bits` bytes.
pub(super) fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    // One L2 table maps cluster_size / 8 clusters.
    let l2_span_bits = cluster_bits + (cluster_bits - 3);
    size.div_ceil(1u64 << l2_span_bits)
}

/// Reads the header extensions and the backing file name; returns the feature name table.
fn parse_extensions(
    h: &mut Header,
    first: &[u8],
    header_len: usize,
    path: &Path,
) -> Result<Vec<(u8, u8, String)>, DiskError> {
    let corrupt = |offset: usize, e: Qcow2Error| {
        fail(DiskErrorKind::CorruptImage, "open", e).with_path(path).with_offset(offset as u64)
    };
    let f = Fields::new(first, "read the qcow2 header extensions").in_file(path, 0);
    let mut names = Vec::new();
    let backing_off = f.be64(8)?;
    let backing_len = f.be32(16)?;
    // Extensions end at the backing file name when it is in the first cluster.
    let limit = if backing_off > 0 && (backing_off as usize) < first.len() {
        backing_off as usize
    } else {
        first.len()
    };
    let mut pos = header_len;
    while pos + 8 <= limit {
        let kind = f.be32(pos)?;
        let len = f.be32(pos + 4)? as usize;
        if kind == EXT_END {
            break;
        }
        let data_start = pos + 8;
        let Some(data_end) = data_start.checked_add(len).filter(|&e| e <= limit) else {
            return Err(corrupt(pos, Qcow2Error::Extension(kind)));
        };
        let data = &first[data_start..data_end];
        match kind {
            EXT_BACKING_FORMAT => {
                h.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_NAMES => {
                for entry in data.chunks_exact(48) {
                    let name = &entry[2..];
                    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                    names.push((
                        entry[0],
                        entry[1],
                        String::from_utf8_lossy(&name[..end]).into_owned(),
                    ));
                }
            }
            // Unknown extensions (bitmaps, ...) are skipped as the spec allows.
            _ => {}
        }
        pos = data_start + len.div_ceil(8) * 8;
    }
    if backing_off != 0 {
        if backing_len == 0 || backing_len > MAX_BACKING_NAME {
            return Err(corrupt(field::BACKING_OFFSET as usize, Qcow2Error::BackingName));
        }
        let start = backing_off as usize;
        match start
            .checked_add(backing_len as usize)
            .filter(|&e| backing_off < first.len() as u64 && e <= first.len())
        {
            Some(end) => {
                let name = String::from_utf8_lossy(&first[start..end]).into_owned();
                h.backing_file = Some(name);
            }
            None => return Err(corrupt(start.min(first.len()), Qcow2Error::BackingName)),
        }
    }
    Ok(names)
}

/// The first cluster of a new v3 image: header, backing format extension, end marker,
/// backing file name.
pub(super) fn build_first_cluster(
    cluster_bits: u32,
    refcount_table_offset: u64,
    backing: Option<(&str, &str)>,
) -> Vec<u8> {
    let cs = 1usize << cluster_bits;
    let mut b = vec![0u8; cs];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    b[..4].copy_from_slice(&MAGIC);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, cluster_bits);
    // Size, L1 size and offset stay 0: the image is sized afterwards by resize().
    put64(&mut b, 48, refcount_table_offset);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, CREATE_HEADER_LEN as u32);
    let mut pos = CREATE_HEADER_LEN;
    if let Some((name, format)) = backing {
        put32(&mut b, pos, EXT_BACKING_FORMAT);
        put32(&mut b, pos + 4, format.len() as u32);
        b[pos + 8..pos + 8 + format.len()].copy_from_slice(format.as_bytes());
        pos += 8 + format.len().div_ceil(8) * 8;
        // End marker (already zero), then the name.
        pos += 8;
        put64(&mut b, 8, pos as u64);
        put32(&mut b, 16, name.len() as u32);
        b[pos..pos + name.len()].copy_from_slice(name.as_bytes());
    }
    b
}

/// Whether a backing name fits the first cluster of a new image.
pub(super) fn backing_fits(cluster_bits: u32, name: &str, format: &str) -> bool {
    let need = CREATE_HEADER_LEN + 8 + format.len().div_ceil(8) * 8 + 8 + name.len();
    !name.is_empty() && name.len() as u32 <= MAX_BACKING_NAME && need <= 1 << cluster_bits
}

/// The start of header cluster `first` (header `h`, already parsed from it) with the backing
/// file switched to `backing` (name, format; None: no backing file). Other extensions are
/// kept. The result covers at least the old header, extensions and name (the tail zeroed), so
/// one write replaces them; None when the new name does not fit the cluster.
pub(super) fn with_backing(
    first: &[u8],
    h: &Header,
    backing: Option<(&str, Option<&str>)>,
) -> Option<Vec<u8>> {
    let f = Fields::new(first, "read the qcow2 header");
    let header_len = if h.version >= 3 { f.be32(100).ok()? as usize } else { V2_HEADER_LEN };
    let backing_off = f.be64(8).ok()? as usize;
    let backing_len = f.be32(16).ok()? as usize;
    let limit =
        if backing_off > 0 && backing_off < first.len() { backing_off } else { first.len() };
    let mut kept = Vec::new();
    let mut pos = header_len;
    let mut old_end = header_len;
    while pos + 8 <= limit {
        let kind = f.be32(pos).ok()?;
        let len = f.be32(pos + 4).ok()? as usize;
        old_end = pos + 8;
        if kind == EXT_END {
            break;
        }
        // Header::parse checked the data lies inside the cluster; padding may not.
        let end = (pos + 8 + len.div_ceil(8) * 8).min(limit);
        if kind != EXT_BACKING_FORMAT {
            kept.extend_from_slice(&first[pos..end]);
            kept.resize(kept.len().div_ceil(8) * 8, 0);
        }
        old_end = end;
        pos = end;
    }
    if backing_off > 0 {
        old_end = old_end.max(backing_off.saturating_add(backing_len));
    }
    let mut out = first.get(..header_len)?.to_vec();
    let put32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_be_bytes());
    if let Some((_, Some(format))) = backing {
        put32(&mut out, EXT_BACKING_FORMAT);
        put32(&mut out, format.len() as u32);
        out.extend_from_slice(format.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out.extend_from_slice(&kept);
    out.extend_from_slice(&[0u8; 8]);
    let (offset, len) = match backing {
        Some((name, _)) => {
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
                return None;
            }
            let at = out.len();
            out.extend_from_slice(name.as_bytes());
            (at as u64, name.len() as u32)
        }
        None => (0, 0),
    };
    if out.len() > first.len() {
        return None;
    }
    out[8..16].copy_from_slice(&offset.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out.resize(out.len().max(old_end.min(first.len())), 0);
    Some(out)
}
