//! VHD images (Microsoft "Virtual Hard Disk Image Format Specification"), read-only: fixed,
//! dynamic and differencing disks. Also owns the small pieces VHD and VHDX share: the mapping of
//! a virtual range onto file/zero/parent pieces, reading and mapping those pieces, and a bounded
//! cache of per-block sector bitmaps.
//!
//! ```text
//!   fixed:        [ data (current_size) ][ footer ]
//!   dynamic/diff: [ footer copy ][ dynamic header ][ BAT ][ bitmap|block ]...[ footer ]
//! ```
//! All fields are big-endian. The footer's `current_size` is the disk size (qemu-img writes a
//! CHS-rounded size there, or the exact one with `force_size`; either way it is what it reads).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::bytes::{be32_table, Fields};
use crate::mapped::{err_at, file_allocated_bytes, pread, FileHoles};
use crate::types::{Extent, ExtentKind, ImageFormat, ImageInfo, OpenOptions};
use crate::{chain, magic};
use crate::{check_range, BlockBackend, DiskError, DiskErrorKind};

const SECTOR: u64 = 512;
const FOOTER_SIZE: usize = 512;
const DYN_HEADER_SIZE: usize = 1024;
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
const BAT_UNUSED: u32 = 0xffff_ffff;
/// Largest block size accepted (the spec's default is 2 MiB; nothing real uses more).
const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// The VHD format's own limit: 2040 GiB (we allow up to 2 TiB plus rounding).
const MAX_VHD_SIZE: u64 = 2 << 40;
/// Longest parent locator accepted (a path in UTF-16).
const MAX_LOCATOR_LEN: u64 = 64 * 1024;
/// Bytes of sector bitmaps kept in memory per image.
const BITMAP_CACHE_BYTES: usize = 16 << 20;

/// Where the bytes of one piece of a virtual range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// This image's file, at this byte offset.
    File(u64),
    /// Zeroes, as this image says.
    Zero,
    /// Not in this image: the parent's bytes, or unallocated zeroes without a parent.
    Parent,
}

/// `len` bytes of a virtual range and where they come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub len: u64,
    pub source: Source,
}

/// Appends a piece, merging it into the previous one when both are contiguous (so one pread
/// serves a run of adjacent blocks).
pub(crate) fn push_piece(pieces: &mut Vec<Piece>, len: u64, source: Source) {
    if len == 0 {
        return;
    }
    if let Some(last) = pieces.last_mut() {
        let joined = match (last.source, source) {
            (Source::File(a), Source::File(b)) => a.checked_add(last.len) == Some(b),
            (Source::Zero, Source::Zero) | (Source::Parent, Source::Parent) => true,
            _ => false,
        };
        if joined {
            last.len += len;
            return;
        }
    }
    pieces.push(Piece { len, source });
}

/// Reads `buf.len()` bytes at `offset` from a parent, zeroes past its end (a smaller parent)
/// or without one.
fn read_parent(
    parent: Option<&dyn BlockBackend>,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), DiskError> {
    let Some(parent) = parent else {
        buf.fill(0);
        return Ok(());
    };
    let n = parent.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    if n > 0 {
        parent.read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// Fills `buf` (the virtual range at `offset`) from `pieces`, which cover exactly that range.
pub(crate) fn read_pieces(
    file: &File,
    path: &Path,
    parent: Option<&dyn BlockBackend>,
    pieces: &[Piece],
    buf: &mut [u8],
    offset: u64,
) -> Result<(), DiskError> {
    let mut done = 0usize;
    for piece in pieces {
        let len = piece.len as usize;
        let Some(chunk) = buf.get_mut(done..done + len) else {
            return Err(DiskError::new(DiskErrorKind::CorruptImage, "map").with_path(path));
        };
        match piece.source {
            Source::File(at) => pread(file, path, chunk, at)?,
            Source::Zero => chunk.fill(0),
            Source::Parent => read_parent(parent, chunk, offset + done as u64)?,
        }
        done += len;
    }
    Ok(())
}

fn push_extent(extents: &mut Vec<Extent>, offset: u64, len: u64, kind: ExtentKind) {
    if len == 0 {
        return;
    }
    if let Some(last) = extents.last_mut() {
        if last.kind == kind && last.offset + last.len == offset {
            last.len += len;
            return;
        }
    }
    extents.push(Extent { offset, len, kind });
}

/// Turns `pieces` (covering the range at `offset`) into merged extents, asking the parent
/// about the pieces it provides.
pub(crate) fn pieces_to_extents(
    file: &File,
    pieces: &[Piece],
    offset: u64,
    parent: Option<&dyn BlockBackend>,
) -> Result<Vec<Extent>, DiskError> {
    let mut extents = Vec::new();
    let mut holes = FileHoles::new(file);
    let mut pos = offset;
    for piece in pieces {
        match (piece.source, parent) {
            (Source::File(at), _) => holes.push(&mut extents, pos, at, piece.len),
            (Source::Zero, _) => push_extent(&mut extents, pos, piece.len, ExtentKind::Zero),
            (Source::Parent, None) => {
                push_extent(&mut extents, pos, piece.len, ExtentKind::Unallocated)
            }
            (Source::Parent, Some(p)) => {
                let inside = p.size().saturating_sub(pos).min(piece.len);
                if inside > 0 {
                    for e in p.extents(pos, inside)? {
                        push_extent(&mut extents, e.offset, e.len, e.kind);
                    }
                }
                push_extent(
                    &mut extents,
                    pos + inside,
                    piece.len - inside,
                    ExtentKind::Unallocated,
                );
            }
        }
        pos += piece.len;
    }
    Ok(extents)
}

/// A bounded cache of sector bitmaps keyed by block number. Loads happen outside the lock so
/// parallel readers don't serialize on I/O; when full, the cache starts over.
#[derive(Default)]
pub(crate) struct BitmapCache {
    inner: Mutex<CachedBitmaps>,
}

/// The cached bitmaps and their total size in bytes.
type CachedBitmaps = (HashMap<u64, Arc<Vec<u8>>>, usize);

impl BitmapCache {
    pub(crate) fn get_or_load(
        &self,
        key: u64,
        load: impl FnOnce() -> Result<Vec<u8>, DiskError>,
    ) -> Result<Arc<Vec<u8>>, DiskError> {
        if let Some(hit) = self.lock().0.get(&key) {
            return Ok(hit.clone());
        }
        let bitmap = Arc::new(load()?);
        let mut guard = self.lock();
        if guard.1 + bitmap.len() > BITMAP_CACHE_BYTES {
            guard.0.clear();
            guard.1 = 0;
        }
        guard.1 += bitmap.len();
        guard.0.insert(key, bitmap.clone());
        Ok(bitmap)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CachedBitmaps> {
        // A panic elsewhere can't leave the map inconsistent (inserts are single calls).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Turns a path written by Windows (or a Unix host) into a host path: backslashes become
/// slashes, a relative path is taken from `base_dir`, and a drive letter is dropped when the
/// remaining path doesn't exist so the file is looked for next to the child.
pub(crate) fn host_path(raw: &str, base_dir: &Path) -> Vec<PathBuf> {
    let raw = raw.trim_end_matches('\0').trim();
    if raw.is_empty() {
        return Vec::new();
    }
    let unix = raw.replace('\\', "/");
    let mut out = Vec::new();
    let has_drive = unix.len() >= 2 && unix.as_bytes()[1] == b':';
    if has_drive {
        let rest = &unix[2..];
        out.push(PathBuf::from(rest));
    } else if unix.starts_with('/') {
        out.push(PathBuf::from(&unix));
    } else {
        out.push(base_dir.join(unix.trim_start_matches("./")));
    }
    // Last resort: the same file name next to the child (images moved together).
    if let Some(name) = Path::new(&unix).file_name() {
        out.push(base_dir.join(name));
    }
    out
}

/// The VHD checksum: one's complement of the byte sum, skipping the checksum field itself.
fn vhd_checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// The parsed footer fields Hutch uses.
struct Footer {
    data_offset: u64,
    current_size: u64,
    disk_type: u32,
    unique_id: [u8; 16],
}

fn parse_footer(bytes: &[u8; FOOTER_SIZE], path: &Path, at: u64) -> Result<Footer, DiskError> {
    if &bytes[0..8] != magic::VHD_FOOTER {
        return Err(err_at(DiskErrorKind::InvalidFormat, "find the VHD footer in", path, at));
    }
    let f = Fields::new(bytes, "read the VHD footer in").in_file(path, at);
    if f.be32(64)? != vhd_checksum(bytes, 64) {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "verify the VHD footer checksum of",
            path,
            at,
        ));
    }
    if f.be16(12)? != 1 {
        return Err(err_at(
            DiskErrorKind::UnsupportedFeature,
            "read this VHD format version in",
            path,
            at + 12,
        ));
    }
    Ok(Footer {
        data_offset: f.be64(16)?,
        current_size: f.be64(48)?,
        disk_type: f.be32(60)?,
        unique_id: f.array(68)?,
    })
}

/// The block table of a dynamic or differencing VHD.
struct Dynamic {
    block_size: u64,
    /// Sector bitmap bytes in front of each block (rounded up to whole sectors).
    bitmap_size: u64,
    /// Sector offset of each block's bitmap, or BAT_UNUSED.
    bat: Vec<u32>,
}

/// A VHD image, read-only. Safe to read from several threads at once.
pub struct Vhd {
    file: File,
    path: PathBuf,
    size: u64,
    disk_type: u32,
    unique_id: [u8; 16],
    dynamic: Option<Dynamic>,
    parent: Option<Box<Vhd>>,
    bitmaps: BitmapCache,
    problems: Vec<String>,
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("disk_type", &self.disk_type)
            .field("parent", &self.parent)
            .finish()
    }
}

impl Vhd {
    /// Opens the VHD at `path` and, for a differencing disk, its parent chain. VHD is read-only
    /// in Hutch: `options.writable` is refused.
    pub fn open(path: &Path, options: OpenOptions) -> Result<Vhd, DiskError> {
        if options.writable {
            return Err(DiskError::new(
                DiskErrorKind::UnsupportedFeature,
                "open read-only format VHD for writing",
            )
            .with_path(path));
        }
        Vhd::open_chain(path)
    }

    /// Opens the image at `path` (read-only) with its parents, as one link of a chain.
    fn open_chain(path: &Path) -> Result<Vhd, DiskError> {
        let _chain = chain::enter(path)?;
        let file = File::open(path).map_err(|e| DiskError::io("open", e).with_path(path))?;
        let file_size =
            file.metadata().map_err(|e| DiskError::io("open", e).with_path(path))?.len();
        let mut problems = Vec::new();
        let (footer, footer_at) = find_footer(&file, path, file_size, &mut problems)?;
        let mut vhd = Vhd {
            file,
            path: path.to_path_buf(),
            size: footer.current_size,
            disk_type: footer.disk_type,
            unique_id: footer.unique_id,
            dynamic: None,
            parent: None,
            bitmaps: BitmapCache::default(),
            problems,
        };
        match footer.disk_type {
            TYPE_FIXED => {
                if footer.current_size > footer_at {
                    return Err(err_at(
                        DiskErrorKind::CorruptImage,
                        "fit the disk size in",
                        path,
                        48,
                    ));
                }
            }
            TYPE_DYNAMIC | TYPE_DIFFERENCING => {
                if footer.current_size > MAX_VHD_SIZE {
                    return Err(err_at(
                        DiskErrorKind::UnsupportedFeature,
                        "open a VHD this large at",
                        path,
                        48,
                    ));
                }
                let (dynamic, header) = read_dynamic(&vhd.file, path, &footer, file_size)?;
                vhd.dynamic = Some(dynamic);
                if footer.disk_type == TYPE_DIFFERENCING {
                    let header = Fields::new(&header, "read the VHD dynamic header in")
                        .in_file(path, footer.data_offset);
                    let parent = open_parent(&vhd.file, path, header, file_size)?;
                    vhd.parent = Some(Box::new(parent));
                }
            }
            _ => {
                return Err(err_at(
                    DiskErrorKind::UnsupportedFeature,
                    "read this VHD disk type in",
                    path,
                    60,
                ));
            }
        }
        Ok(vhd)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The footer's unique id (a differencing child names its parent by it).
    pub fn unique_id(&self) -> [u8; 16] {
        self.unique_id
    }

    /// What `hutch disk info` shows.
    pub fn info(&self) -> ImageInfo {
        let subformat = match self.disk_type {
            TYPE_FIXED => "fixed",
            TYPE_DYNAMIC => "dynamic",
            _ => "differencing",
        };
        let mut allocated = file_allocated_bytes(&self.file);
        let mut problems = self.problems.clone();
        if let Some(parent) = &self.parent {
            let pinfo = parent.info();
            allocated += pinfo.allocated_bytes;
            problems.extend(pinfo.problems.into_iter().map(|p| format!("parent: {p}")));
        }
        ImageInfo {
            path: self.path.clone(),
            format: ImageFormat::Vhd,
            subformat: Some(subformat.to_string()),
            virtual_size: self.size,
            allocated_bytes: allocated,
            backing: self.parent.as_ref().map(|p| p.path.clone()),
            problems,
        }
    }

    fn parent_backend(&self) -> Option<&dyn BlockBackend> {
        self.parent.as_deref().map(|p| p as &dyn BlockBackend)
    }

    /// Where the `len` bytes at `offset` (inside the disk) come from.
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Piece>, DiskError> {
        let mut pieces = Vec::new();
        let Some(dynamic) = &self.dynamic else {
            push_piece(&mut pieces, len, Source::File(offset));
            return Ok(pieces);
        };
        let differencing = self.disk_type == TYPE_DIFFERENCING;
        let bs = dynamic.block_size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            let entry = dynamic.bat.get(block as usize).copied().unwrap_or(BAT_UNUSED);
            if entry == BAT_UNUSED {
                push_piece(&mut pieces, n, Source::Parent);
                pos += n;
                continue;
            }
            let bitmap_at = u64::from(entry) * SECTOR;
            let data_at = bitmap_at + dynamic.bitmap_size;
            let bitmap = self.bitmaps.get_or_load(block, || {
                let mut b = vec![0u8; dynamic.bitmap_size as usize];
                pread(&self.file, &self.path, &mut b, bitmap_at)?;
                Ok(b)
            })?;
            // Runs of sectors with the same bitmap bit (most significant bit first).
            let mut p = in_block;
            let stop = in_block + n;
            while p < stop {
                let sector = p / SECTOR;
                let present = bit_msb(&bitmap, sector);
                let mut s = sector + 1;
                while s * SECTOR < stop && bit_msb(&bitmap, s) == present {
                    s += 1;
                }
                let run_end = (s * SECTOR).min(stop);
                let source = if present {
                    Source::File(data_at + p)
                } else if differencing {
                    Source::Parent
                } else {
                    Source::Zero
                };
                push_piece(&mut pieces, run_end - p, source);
                p = run_end;
            }
            pos += n;
        }
        Ok(pieces)
    }

    fn read_only(&self, op: &'static str, offset: u64) -> DiskError {
        err_at(DiskErrorKind::UnsupportedFeature, op, &self.path, offset)
    }
}

fn bit_msb(bitmap: &[u8], index: u64) -> bool {
    bitmap.get((index / 8) as usize).is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
}

/// Finds and checks the footer: at the end (512 bytes, or 511 from old Virtual PC), else the
/// copy a dynamic disk keeps at offset 0. Returns it and where the disk's data area ends.
fn find_footer(
    file: &File,
    path: &Path,
    file_size: u64,
    problems: &mut Vec<String>,
) -> Result<(Footer, u64), DiskError> {
    if file_size < FOOTER_SIZE as u64 {
        return Err(err_at(DiskErrorKind::InvalidFormat, "find the VHD footer in", path, 0));
    }
    let mut tail = [0u8; FOOTER_SIZE];
    let at = file_size - FOOTER_SIZE as u64;
    pread(file, path, &mut tail, at)?;
    if &tail[0..8] == magic::VHD_FOOTER {
        return Ok((parse_footer(&tail, path, at)?, at));
    }
    if &tail[1..9] == magic::VHD_FOOTER {
        let mut short = [0u8; FOOTER_SIZE];
        short[..FOOTER_SIZE - 1].copy_from_slice(&tail[1..]);
        return Ok((parse_footer(&short, path, at + 1)?, at + 1));
    }
    let mut head = [0u8; FOOTER_SIZE];
    pread(file, path, &mut head, 0)?;
    if &head[0..8] == magic::VHD_FOOTER {
        let footer = parse_footer(&head, path, 0)?;
        if footer.disk_type == TYPE_DYNAMIC || footer.disk_type == TYPE_DIFFERENCING {
            problems
                .push("footer at the end of the file is missing; used the copy at offset 0".into());
            return Ok((footer, file_size));
        }
    }
    Err(err_at(DiskErrorKind::InvalidFormat, "find the VHD footer in", path, at))
}

/// Reads and checks the dynamic header and the BAT. Returns the table and the raw header
/// (the parent locators live there).
fn read_dynamic(
    file: &File,
    path: &Path,
    footer: &Footer,
    file_size: u64,
) -> Result<(Dynamic, Vec<u8>), DiskError> {
    let at = footer.data_offset;
    if at < FOOTER_SIZE as u64
        || at.checked_add(DYN_HEADER_SIZE as u64).is_none_or(|e| e > file_size)
    {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "find the VHD dynamic header in",
            path,
            16,
        ));
    }
    let mut header = vec![0u8; DYN_HEADER_SIZE];
    pread(file, path, &mut header, at)?;
    if &header[0..8] != DYN_COOKIE {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "find the VHD dynamic header in",
            path,
            at,
        ));
    }
    let f = Fields::new(&header, "read the VHD dynamic header in").in_file(path, at);
    if f.be32(36)? != vhd_checksum(&header, 36) {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "verify the VHD dynamic header checksum of",
            path,
            at + 36,
        ));
    }
    if f.be16(24)? != 1 {
        return Err(err_at(
            DiskErrorKind::UnsupportedFeature,
            "read this VHD dynamic header version in",
            path,
            at + 24,
        ));
    }
    let table_at = f.be64(16)?;
    let entries = u64::from(f.be32(28)?);
    let block_size = u64::from(f.be32(32)?);
    if !block_size.is_power_of_two() || !(SECTOR..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "use the VHD block size in",
            path,
            at + 32,
        ));
    }
    if footer.current_size.div_ceil(block_size) > entries {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "cover the disk size with the BAT in",
            path,
            at + 28,
        ));
    }
    let bat_bytes = entries * 4;
    if table_at < FOOTER_SIZE as u64
        || table_at.checked_add(bat_bytes).is_none_or(|e| e > file_size)
    {
        return Err(err_at(DiskErrorKind::CorruptImage, "find the VHD BAT in", path, at + 16));
    }
    // Only the entries that cover the disk matter; the rest may be garbage.
    let used = footer.current_size.div_ceil(block_size) as usize;
    let mut raw = vec![0u8; used * 4];
    pread(file, path, &mut raw, table_at)?;
    let bat: Vec<u32> = be32_table(&raw).collect();
    let bitmap_size = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
    let reserved = [(0, FOOTER_SIZE as u64), (at, DYN_HEADER_SIZE as u64), (table_at, bat_bytes)];
    for (i, &entry) in bat.iter().enumerate() {
        if entry == BAT_UNUSED {
            continue;
        }
        let start = u64::from(entry) * SECTOR;
        // The part of the block the disk uses must be in the file, clear of the metadata.
        let used_len = block_size.min(footer.current_size - i as u64 * block_size);
        let end = start + bitmap_size + used_len;
        let overlaps = reserved.iter().any(|&(s, l)| start < s + l && s < end);
        if end > file_size || overlaps {
            return Err(err_at(
                DiskErrorKind::CorruptImage,
                "use the VHD BAT entry in",
                path,
                table_at + 4 * i as u64,
            ));
        }
    }
    Ok((Dynamic { block_size, bitmap_size, bat }, header))
}

const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// Candidate parent paths from the locators (relative first: images usually move together),
/// then the parent's name from the header.
fn parent_candidates(
    file: &File,
    path: &Path,
    header: Fields<'_>,
    file_size: u64,
) -> Result<Vec<PathBuf>, DiskError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut relative = Vec::new();
    let mut absolute = Vec::new();
    for i in 0..8 {
        let e = 576 + i * 24;
        let code = header.be32(e)?;
        if code == 0 {
            continue;
        }
        let len = u64::from(header.be32(e + 8)?);
        let at = header.be64(e + 16)?;
        if len == 0
            || len > MAX_LOCATOR_LEN
            || at.checked_add(len).is_none_or(|end| end > file_size)
        {
            return Err(err_at(
                DiskErrorKind::CorruptImage,
                "find the VHD parent locator in",
                path,
                at,
            ));
        }
        let mut raw = vec![0u8; len as usize];
        pread(file, path, &mut raw, at)?;
        match code {
            PLAT_W2RU => relative.extend(host_path(&utf16(&raw, false), base)),
            PLAT_W2KU => absolute.extend(host_path(&utf16(&raw, false), base)),
            PLAT_MACX => {
                let text = String::from_utf8_lossy(&raw);
                let text = text.trim_end_matches('\0');
                let text = text.strip_prefix("file://").unwrap_or(text);
                let text = text.strip_prefix("localhost").unwrap_or(text);
                absolute.extend(host_path(text, base));
            }
            _ => {} // "Mac " aliases and the deprecated Wi2r/Wi2k: nothing portable to read.
        }
    }
    relative.extend(absolute);
    relative.extend(host_path(&utf16(header.slice(64, 512)?, true), base));
    Ok(relative)
}

/// Decodes UTF-16 (big- or little-endian), stopping at the first NUL.
pub(crate) fn utf16(raw: &[u8], big_endian: bool) -> String {
    let units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| {
            if big_endian {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

fn open_parent(
    file: &File,
    path: &Path,
    header: Fields<'_>,
    file_size: u64,
) -> Result<Vhd, DiskError> {
    let candidates = parent_candidates(file, path, header, file_size)?;
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        let e = io::Error::from(io::ErrorKind::NotFound);
        return Err(DiskError::io("find the VHD parent of", e).with_path(path));
    };
    // A VHD's parent is always a VHD (the spec has no other kind).
    let parent = Vhd::open_chain(found)?;
    let expected: [u8; 16] = header.array(40)?;
    if expected != [0u8; 16] && expected != parent.unique_id {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "match the VHD parent's unique id in",
            path,
            40,
        ));
    }
    Ok(parent)
}

impl BlockBackend for Vhd {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(self.size, offset, buf.len() as u64, "read")
            .map_err(|e| e.with_path(&self.path))?;
        let pieces = self.map(offset, buf.len() as u64)?;
        read_pieces(&self.file, &self.path, self.parent_backend(), &pieces, buf, offset)
    }

    fn write_at(&self, _buf: &[u8], offset: u64) -> Result<(), DiskError> {
        Err(self.read_only("write read-only format", offset))
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(self.read_only("discard in read-only format", offset))
    }

    fn write_zeroes(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(self.read_only("write zeroes to read-only format", offset))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(self.size, offset, len, "map").map_err(|e| e.with_path(&self.path))?;
        let pieces = self.map(offset, len)?;
        pieces_to_extents(&self.file, &pieces, offset, self.parent_backend())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    const BS: usize = 4096; // small blocks keep fixtures small
    const BITMAP: usize = 512;

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn footer(size: u64, disk_type: u32, data_offset: u64, uid: u8) -> [u8; 512] {
        let mut f = [0u8; 512];
        f[0..8].copy_from_slice(magic::VHD_FOOTER);
        put32(&mut f, 8, 2);
        put32(&mut f, 12, 0x0001_0000);
        put64(&mut f, 16, data_offset);
        f[28..32].copy_from_slice(b"test");
        put64(&mut f, 40, size);
        put64(&mut f, 48, size);
        put32(&mut f, 60, disk_type);
        f[68..84].fill(uid);
        let sum = vhd_checksum(&f, 64);
        put32(&mut f, 64, sum);
        f
    }

    /// One allocated block: its index, sector bitmap and data.
    struct Block {
        index: usize,
        bitmap: Vec<u8>,
        data: Vec<u8>,
    }

    /// A dynamic (or, with `parent` = (uid, relative path), differencing) VHD of `blocks`
    /// blocks: footer copy, header at 512, BAT at 1536, blocks, footer.
    fn dynamic(blocks: usize, allocated: &[Block], uid: u8, parent: Option<(u8, &str)>) -> Vec<u8> {
        let size = (blocks * BS) as u64;
        let bat_at = 1536usize;
        let blocks_at = bat_at + (blocks * 4).next_multiple_of(512) + 512;
        let mut out = vec![0u8; blocks_at];
        let mut header = vec![0u8; DYN_HEADER_SIZE];
        header[0..8].copy_from_slice(DYN_COOKIE);
        put64(&mut header, 8, u64::MAX);
        put64(&mut header, 16, bat_at as u64);
        put32(&mut header, 24, 0x0001_0000);
        put32(&mut header, 28, blocks as u32);
        put32(&mut header, 32, BS as u32);
        if let Some((puid, rel)) = parent {
            header[40..56].fill(puid);
            let locator: Vec<u8> = rel.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let e = 576;
            header[e..e + 4].copy_from_slice(b"W2ru");
            put32(&mut header, e + 4, 1);
            put32(&mut header, e + 8, locator.len() as u32);
            put64(&mut header, e + 16, (blocks_at - 512) as u64);
            out[blocks_at - 512..blocks_at - 512 + locator.len()].copy_from_slice(&locator);
        }
        let sum = vhd_checksum(&header, 36);
        put32(&mut header, 36, sum);
        let disk_type = if parent.is_some() { TYPE_DIFFERENCING } else { TYPE_DYNAMIC };
        let f = footer(size, disk_type, 512, uid);
        out[0..512].copy_from_slice(&f);
        out[512..1536].copy_from_slice(&header);
        let mut bat = vec![0xffu8; blocks * 4];
        for b in allocated {
            let at = out.len();
            put32(&mut bat, b.index * 4, (at / 512) as u32);
            let mut bm = b.bitmap.clone();
            bm.resize(BITMAP, 0);
            out.extend_from_slice(&bm);
            out.extend_from_slice(&b.data);
        }
        out[bat_at..bat_at + bat.len()].copy_from_slice(&bat);
        out.extend_from_slice(&f);
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn open_err(path: &Path) -> DiskError {
        Vhd::open(path, OpenOptions::default()).unwrap_err()
    }

    fn full(index: usize, byte: u8) -> Block {
        Block { index, bitmap: vec![0xff; BITMAP], data: vec![byte; BS] }
    }

    #[test]
    fn differencing_vhd_reads_its_sectors_and_the_parents_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dynamic(3, &[full(0, 0x11)], 7, None);
        write(dir.path(), "base.vhd", &parent);
        // Sectors 1 and 2 of block 0, and sector 0 of block 1, are the child's.
        let mut bitmap = vec![0u8; BITMAP];
        bitmap[0] = 0x60;
        let b0 = Block { index: 0, bitmap, data: vec![0x22; BS] };
        let mut bitmap = vec![0u8; BITMAP];
        bitmap[0] = 0x80;
        let b1 = Block { index: 1, bitmap, data: vec![0x33; BS] };
        let child =
            write(dir.path(), "child.vhd", &dynamic(3, &[b0, b1], 8, Some((7, ".\\base.vhd"))));
        let disk = Vhd::open(&child, OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 3 * BS];
        disk.read_at(&mut buf, 0).unwrap();
        let mut want = vec![0x11u8; BS];
        want[512..1536].fill(0x22);
        want.extend(std::iter::repeat_n(0x33, 512));
        want.resize(3 * BS, 0);
        assert!(buf == want);
        let extents = disk.extents(0, 3 * BS as u64).unwrap();
        assert_eq!(
            extents,
            vec![
                Extent { offset: 0, len: (BS + 512) as u64, kind: ExtentKind::Data },
                Extent {
                    offset: (BS + 512) as u64,
                    len: (2 * BS - 512) as u64,
                    kind: ExtentKind::Unallocated
                },
            ]
        );
        let info = disk.info();
        assert_eq!(info.subformat.as_deref(), Some("differencing"));
        assert_eq!(info.backing.as_deref(), Some(dir.path().join("base.vhd").as_path()));
    }

    #[test]
    fn dynamic_vhd_bitmap_zero_sectors_read_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut bitmap = vec![0xffu8; BITMAP];
        bitmap[0] = 0x7f; // sector 0 unused
        let p = write(
            dir.path(),
            "d.vhd",
            &dynamic(2, &[Block { index: 1, bitmap, data: vec![5; BS] }], 1, None),
        );
        let disk = Vhd::open(&p, OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 1024];
        disk.read_at(&mut buf, BS as u64).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0) && buf[512..].iter().all(|&b| b == 5));
        let kinds: Vec<_> =
            disk.extents(0, 2 * BS as u64).unwrap().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![ExtentKind::Unallocated, ExtentKind::Zero, ExtentKind::Data]);
    }

    #[test]
    fn parent_with_another_unique_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.vhd", &dynamic(1, &[], 7, None));
        let child = write(dir.path(), "child.vhd", &dynamic(1, &[], 8, Some((9, "base.vhd"))));
        let err = open_err(&child);
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        assert_eq!(err.offset(), Some(40));
    }

    #[test]
    fn parent_loop_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let child = write(dir.path(), "self.vhd", &dynamic(1, &[], 8, Some((8, "self.vhd"))));
        let err = open_err(&child);
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        assert!(err.to_string().contains("loop"), "{err}");
    }

    #[test]
    fn missing_parent_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let child = write(dir.path(), "child.vhd", &dynamic(1, &[], 8, Some((7, "gone.vhd"))));
        assert_eq!(open_err(&child).kind(), DiskErrorKind::Io);
    }

    #[test]
    fn bad_footer_checksum_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = vec![0u8; 4096];
        img.extend_from_slice(&footer(4096, TYPE_FIXED, u64::MAX, 1));
        img[4096 + 48] ^= 1;
        let err = open_err(&write(dir.path(), "f.vhd", &img));
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        assert_eq!(err.offset(), Some(4096));
    }

    #[test]
    fn short_and_foreign_files_are_not_vhd() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            open_err(&write(dir.path(), "a", &[0; 100])).kind(),
            DiskErrorKind::InvalidFormat
        );
        assert_eq!(
            open_err(&write(dir.path(), "b", &[7; 4096])).kind(),
            DiskErrorKind::InvalidFormat
        );
    }

    #[test]
    fn old_511_byte_footer_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = vec![9u8; 4096];
        img.extend_from_slice(&footer(4096, TYPE_FIXED, u64::MAX, 1)[..511]);
        let disk = Vhd::open(&write(dir.path(), "old.vhd", &img), OpenOptions::default()).unwrap();
        assert_eq!(disk.size(), 4096);
        let mut buf = [0u8; 16];
        disk.read_at(&mut buf, 4080).unwrap();
        assert_eq!(buf, [9; 16]);
    }

    #[test]
    fn fixed_disk_larger_than_its_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = vec![0u8; 4096];
        img.extend_from_slice(&footer(1 << 40, TYPE_FIXED, u64::MAX, 1));
        assert_eq!(open_err(&write(dir.path(), "f.vhd", &img)).kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn damaged_end_footer_falls_back_to_the_copy_at_offset_0() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = dynamic(2, &[full(0, 3)], 1, None);
        let n = img.len();
        img[n - 512..n - 504].copy_from_slice(b"garbage!");
        let disk = Vhd::open(&write(dir.path(), "d.vhd", &img), OpenOptions::default()).unwrap();
        assert_eq!(disk.info().problems.len(), 1);
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [3; 4]);
    }

    /// Rewrites the dynamic header field at `at` (big-endian u32) and fixes the checksum.
    fn patch_header(img: &mut [u8], at: usize, value: u32) {
        put32(img, 512 + at, value);
        let sum = vhd_checksum(&img[512..1536], 36);
        put32(img, 512 + 36, sum);
    }

    #[test]
    fn huge_bat_claim_is_checked_against_the_file_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = dynamic(2, &[], 1, None);
        patch_header(&mut img, 28, 0xffff_fff0);
        let err = open_err(&write(dir.path(), "d.vhd", &img));
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        assert_eq!(err.offset(), Some(512 + 16));
    }

    #[test]
    fn absurd_block_size_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        for bs in [3000, 1 << 30, 0] {
            let mut img = dynamic(2, &[], 1, None);
            patch_header(&mut img, 32, bs);
            let err = open_err(&write(dir.path(), "d.vhd", &img));
            assert_eq!(err.kind(), DiskErrorKind::CorruptImage, "{bs}");
            assert_eq!(err.offset(), Some(512 + 32));
        }
    }

    #[test]
    fn bat_entries_past_eof_or_over_the_headers_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        for sector in [0x00ff_ffffu32, 1, 3] {
            let mut img = dynamic(2, &[], 1, None);
            put32(&mut img, 1536 + 4, sector);
            let err = open_err(&write(dir.path(), "d.vhd", &img));
            assert_eq!(err.kind(), DiskErrorKind::CorruptImage, "{sector}");
            assert_eq!(err.offset(), Some(1536 + 4));
        }
    }

    #[test]
    fn bad_dynamic_header_checksum_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = dynamic(2, &[], 1, None);
        img[512 + 33] ^= 1;
        let err = open_err(&write(dir.path(), "d.vhd", &img));
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        assert_eq!(err.offset(), Some(512 + 36));
    }

    #[test]
    fn reads_past_the_end_are_out_of_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Vhd::open(
            &write(dir.path(), "d.vhd", &dynamic(2, &[], 1, None)),
            OpenOptions::default(),
        )
        .unwrap();
        let mut buf = [0u8; 2];
        assert_eq!(
            disk.read_at(&mut buf, 2 * BS as u64 - 1).unwrap_err().kind(),
            DiskErrorKind::OutOfBounds
        );
        assert_eq!(disk.extents(u64::MAX, 2).unwrap_err().kind(), DiskErrorKind::OutOfBounds);
    }
}
