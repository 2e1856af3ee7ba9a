//! VHDX images ([MS-VHDX]), read-only: fixed, dynamic and differencing.
//!
//! ```text
//!   0       64K      128K     192K     256K        1M
//!   [file id][header1][header2][region1][region2]...[log][BAT][metadata][blocks...]
//! ```
//! Fields are little-endian; headers, region tables and log entries carry CRC-32C. The BAT
//! interleaves one sector-bitmap entry after every `chunk_ratio` payload entries. A non-empty
//! log means the metadata on disk may be stale: such images are refused (qemu-img and a
//! cleanly closed Hyper-V leave the log empty).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::bytes::{le64_table, Fields};
use crate::mapped::{err_at, file_allocated_bytes, pread};
use crate::types::{Extent, ImageFormat, ImageInfo, OpenOptions};
use crate::vhd::{
    host_path, pieces_to_extents, push_piece, read_pieces, BitmapCache, Piece, Source,
};
use crate::{chain, magic};
use crate::{check_range, BlockBackend, DiskError, DiskErrorKind};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const HEADER_AT: [u64; 2] = [64 * KIB, 128 * KIB];
const HEADER_SIZE: usize = 4096;
const REGION_TABLE_AT: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_SIZE: usize = 64 * 1024;
const METADATA_TABLE_SIZE: usize = 64 * 1024;
const MAX_TABLE_ENTRIES: usize = 2047;
/// The spec's limit on the virtual disk size.
const MAX_DISK_SIZE: u64 = 64 << 40;
/// Longest parent locator item accepted.
const MAX_LOCATOR_LEN: u32 = 64 * 1024;

/// A GUID as stored on disk (first three fields little-endian).
type Guid = [u8; 16];

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]
}

const BAT_REGION: Guid =
    guid(0x2dc27766, 0xf623, 0x4200, [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08]);
const METADATA_REGION: Guid =
    guid(0x8b7ca206, 0x4790, 0x4b9a, [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e]);
const FILE_PARAMETERS: Guid =
    guid(0xcaa16737, 0xfa36, 0x4d43, [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b]);
const VIRTUAL_DISK_SIZE: Guid =
    guid(0x2fa54224, 0xcd1b, 0x4876, [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8]);
const LOGICAL_SECTOR_SIZE: Guid =
    guid(0x8141bf1d, 0xa96f, 0x4709, [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f]);
const PHYSICAL_SECTOR_SIZE: Guid =
    guid(0xcda348c7, 0x445d, 0x4471, [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56]);
/// The disk's SCSI identity: known, not needed for reading.
const PAGE_83_DATA: Guid =
    guid(0xbeca12ab, 0xb2e6, 0x4523, [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46]);
const PARENT_LOCATOR: Guid =
    guid(0xa8d35f2d, 0xb30b, 0x454d, [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c]);
const VHDX_LOCATOR_TYPE: Guid =
    guid(0xb04aefb7, 0xd19e, 0x4a81, [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13]);

// Payload block states (BAT entry bits 0..3).
const NOT_PRESENT: u64 = 0;
const UNDEFINED: u64 = 1;
const ZERO: u64 = 2;
const UNMAPPED: u64 = 3;
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;
const SB_PRESENT: u64 = 6;

/// CRC-32C (Castagnoli, reflected), as VHDX checksums use.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

/// Checks the CRC-32C of `bytes` whose checksum field is at `field`.
fn crc_ok(bytes: &[u8], field: usize) -> bool {
    let Ok(stored) = Fields::new(bytes, "check a VHDX checksum").le32(field) else {
        return false;
    };
    let mut copy = bytes.to_vec();
    copy[field..field + 4].fill(0);
    crc32c(&copy) == stored
}

/// Parses "{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}" (braces optional) into on-disk order.
fn parse_guid(text: &str) -> Option<Guid> {
    let t = text.trim().trim_start_matches('{').trim_end_matches('}');
    let parts: Vec<&str> = t.split('-').collect();
    if parts.len() != 5
        || [8, 4, 4, 4, 12]
            != [parts[0].len(), parts[1].len(), parts[2].len(), parts[3].len(), parts[4].len()]
    {
        return None;
    }
    let a = u32::from_str_radix(parts[0], 16).ok()?;
    let b = u16::from_str_radix(parts[1], 16).ok()?;
    let c = u16::from_str_radix(parts[2], 16).ok()?;
    let tail = format!("{}{}", parts[3], parts[4]);
    let mut d = [0u8; 8];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(tail.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(guid(a, b, c, d))
}

/// The header fields Hutch uses.
struct Header {
    sequence: u64,
    data_write_guid: Guid,
    log_guid: Guid,
}

fn read_header(file: &File, path: &Path, at: u64) -> Result<Option<Header>, DiskError> {
    let mut b = vec![0u8; HEADER_SIZE];
    pread(file, path, &mut b, at)?;
    let f = Fields::new(&b, "read the VHDX header").in_file(path, at);
    if &b[0..4] != b"head" || !crc_ok(&b, 4) || f.le16(66)? != 1 {
        return Ok(None);
    }
    Ok(Some(Header { sequence: f.le64(8)?, data_write_guid: f.array(32)?, log_guid: f.array(48)? }))
}

/// A region (BAT or metadata): byte offset and length in the file.
#[derive(Clone, Copy)]
struct Region {
    at: u64,
    len: u64,
}

fn read_regions(file: &File, path: &Path, file_size: u64) -> Result<(Region, Region), DiskError> {
    let mut table = None;
    for at in REGION_TABLE_AT {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        pread(file, path, &mut b, at)?;
        if &b[0..4] == b"regi" && crc_ok(&b, 4) {
            table = Some((b, at));
            break;
        }
    }
    let Some((b, table_at)) = table else {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "find a valid VHDX region table in",
            path,
            REGION_TABLE_AT[0],
        ));
    };
    let f = Fields::new(&b, "read the VHDX region table").in_file(path, table_at);
    let count = f.le32(8)? as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "read the VHDX region table in",
            path,
            table_at + 8,
        ));
    }
    let (mut bat, mut meta) = (None, None);
    let mut seen: Vec<Region> = Vec::new();
    for i in 0..count {
        let e = 16 + i * 32;
        let entry_at = table_at + e as u64;
        let id: Guid = f.array(e)?;
        let region = Region { at: f.le64(e + 16)?, len: u64::from(f.le32(e + 24)?) };
        let required = f.le32(e + 28)? & 1 != 0;
        let valid = region.at >= MIB
            && region.at.is_multiple_of(MIB)
            && region.len.is_multiple_of(MIB)
            && region.len > 0
            && region.at.checked_add(region.len).is_some_and(|end| end <= file_size)
            && !seen.iter().any(|r| region.at < r.at + r.len && r.at < region.at + region.len);
        if !valid {
            return Err(err_at(
                DiskErrorKind::CorruptImage,
                "use the VHDX region in",
                path,
                entry_at,
            ));
        }
        seen.push(region);
        match id {
            BAT_REGION if bat.is_none() => bat = Some(region),
            METADATA_REGION if meta.is_none() => meta = Some(region),
            BAT_REGION | METADATA_REGION => {
                return Err(err_at(
                    DiskErrorKind::CorruptImage,
                    "use the duplicate VHDX region in",
                    path,
                    entry_at,
                ));
            }
            _ if required => {
                return Err(err_at(
                    DiskErrorKind::UnsupportedFeature,
                    "use the unknown required VHDX region in",
                    path,
                    entry_at,
                ));
            }
            _ => {}
        }
    }
    match (bat, meta) {
        (Some(bat), Some(meta)) => Ok((bat, meta)),
        _ => Err(err_at(
            DiskErrorKind::CorruptImage,
            "find the VHDX BAT and metadata regions in",
            path,
            table_at,
        )),
    }
}

/// The metadata items Hutch uses.
struct Metadata {
    block_size: u64,
    leave_allocated: bool,
    has_parent: bool,
    disk_size: u64,
    logical_sector: u64,
    /// Raw parent locator item (differencing only).
    locator: Option<(Vec<u8>, u64)>,
}

fn read_metadata(file: &File, path: &Path, region: Region) -> Result<Metadata, DiskError> {
    let mut table = vec![0u8; METADATA_TABLE_SIZE];
    pread(file, path, &mut table, region.at)?;
    if &table[0..8] != b"metadata" {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "find the VHDX metadata table in",
            path,
            region.at,
        ));
    }
    let t = Fields::new(&table, "read the VHDX metadata table").in_file(path, region.at);
    let count = t.le16(10)? as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "read the VHDX metadata table in",
            path,
            region.at + 10,
        ));
    }
    let mut params = None;
    let mut disk_size = None;
    let mut logical = None;
    let mut physical = None;
    let mut locator = None;
    for i in 0..count {
        let e = 32 + i * 32;
        let entry_at = region.at + e as u64;
        let id: Guid = t.array(e)?;
        let off = u64::from(t.le32(e + 16)?);
        let len = t.le32(e + 20)?;
        let flags = t.le32(e + 24)?;
        let required = flags & 4 != 0;
        let in_region = if len == 0 {
            off == 0
        } else {
            off >= METADATA_TABLE_SIZE as u64 && off + u64::from(len) <= region.len
        };
        if !in_region {
            return Err(err_at(
                DiskErrorKind::CorruptImage,
                "use the VHDX metadata item in",
                path,
                entry_at,
            ));
        }
        let item_op = "read a VHDX metadata item";
        let read_item = |want: u32| -> Result<Vec<u8>, DiskError> {
            if len < want {
                return Err(err_at(
                    DiskErrorKind::CorruptImage,
                    "use the VHDX metadata item in",
                    path,
                    entry_at,
                ));
            }
            let mut v = vec![0u8; want as usize];
            pread(file, path, &mut v, region.at + off)?;
            Ok(v)
        };
        match id {
            FILE_PARAMETERS => params = Some((read_item(8)?, region.at + off)),
            VIRTUAL_DISK_SIZE => disk_size = Some(Fields::new(&read_item(8)?, item_op).le64(0)?),
            LOGICAL_SECTOR_SIZE => logical = Some(Fields::new(&read_item(4)?, item_op).le32(0)?),
            PHYSICAL_SECTOR_SIZE => physical = Some(Fields::new(&read_item(4)?, item_op).le32(0)?),
            PAGE_83_DATA => {}
            PARENT_LOCATOR => {
                if len > MAX_LOCATOR_LEN {
                    return Err(err_at(
                        DiskErrorKind::CorruptImage,
                        "use the VHDX parent locator in",
                        path,
                        entry_at,
                    ));
                }
                locator = Some((read_item(len)?, region.at + off));
            }
            _ if required => {
                return Err(err_at(
                    DiskErrorKind::UnsupportedFeature,
                    "use the unknown required VHDX metadata item in",
                    path,
                    entry_at,
                ));
            }
            _ => {}
        }
    }
    let (Some(params), Some(disk_size), Some(logical)) = (params, disk_size, logical) else {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "find the required VHDX metadata in",
            path,
            region.at,
        ));
    };
    let (params, params_at) = params;
    let params = Fields::new(&params, "read the VHDX file parameters").in_file(path, params_at);
    let block_size = u64::from(params.le32(0)?);
    let flags = params.le32(4)?;
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "use the VHDX block size in",
            path,
            region.at,
        ));
    }
    if logical != 512 && logical != 4096 {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "use the VHDX logical sector size in",
            path,
            region.at,
        ));
    }
    if physical.is_some_and(|p| p != 512 && p != 4096) {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "use the VHDX physical sector size in",
            path,
            region.at,
        ));
    }
    if disk_size > MAX_DISK_SIZE || !disk_size.is_multiple_of(u64::from(logical)) {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "use the VHDX virtual disk size in",
            path,
            region.at,
        ));
    }
    let has_parent = flags & 2 != 0;
    if has_parent && locator.is_none() {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "find the VHDX parent locator in",
            path,
            region.at,
        ));
    }
    Ok(Metadata {
        block_size,
        leave_allocated: flags & 1 != 0,
        has_parent,
        disk_size,
        logical_sector: u64::from(logical),
        locator: if has_parent { locator } else { None },
    })
}

/// The parent locator's key/value pairs (UTF-16LE), bounds-checked.
fn locator_entries(item: &[u8], path: &Path, at: u64) -> Result<Vec<(String, String)>, DiskError> {
    let bad = || err_at(DiskErrorKind::CorruptImage, "read the VHDX parent locator in", path, at);
    if item.len() < 20 {
        return Err(bad());
    }
    let f = Fields::new(item, "read the VHDX parent locator in").in_file(path, at);
    if f.array::<16>(0)? != VHDX_LOCATOR_TYPE {
        return Err(err_at(
            DiskErrorKind::UnsupportedFeature,
            "use this VHDX parent locator type in",
            path,
            at,
        ));
    }
    let count = f.le16(18)? as usize;
    if 20 + count * 12 > item.len() {
        return Err(bad());
    }
    let text = |off: u32, len: u16| -> Result<String, DiskError> {
        let (off, len) = (off as usize, len as usize);
        let raw = item.get(off..off + len).ok_or_else(bad)?;
        Ok(crate::vhd::utf16(raw, false))
    };
    (0..count)
        .map(|i| {
            let e = 20 + i * 12;
            Ok((text(f.le32(e)?, f.le16(e + 8)?)?, text(f.le32(e + 4)?, f.le16(e + 10)?)?))
        })
        .collect()
}

/// A VHDX image, read-only. Safe to read from several threads at once.
pub struct Vhdx {
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u64,
    logical_sector: u64,
    chunk_ratio: u64,
    leave_allocated: bool,
    data_write_guid: Guid,
    bat: Vec<u64>,
    parent: Option<Box<Vhdx>>,
    bitmaps: BitmapCache,
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("parent", &self.parent)
            .finish()
    }
}

impl Vhdx {
    /// Opens the VHDX at `path` and, for a differencing disk, its parent chain. VHDX is
    /// read-only in Hutch: `options.writable` is refused.
    pub fn open(path: &Path, options: OpenOptions) -> Result<Vhdx, DiskError> {
        if options.writable {
            return Err(DiskError::new(
                DiskErrorKind::UnsupportedFeature,
                "open read-only format VHDX for writing",
            )
            .with_path(path));
        }
        Vhdx::open_chain(path)
    }

    /// Opens the image at `path` (read-only) with its parents, as one link of a chain.
    fn open_chain(path: &Path) -> Result<Vhdx, DiskError> {
        let _chain = chain::enter(path)?;
        let file = File::open(path).map_err(|e| DiskError::io("open", e).with_path(path))?;
        let file_size =
            file.metadata().map_err(|e| DiskError::io("open", e).with_path(path))?.len();
        if file_size < MIB {
            return Err(err_at(DiskErrorKind::InvalidFormat, "find the VHDX headers in", path, 0));
        }
        let mut sig = [0u8; 8];
        pread(&file, path, &mut sig, 0)?;
        if &sig != magic::VHDX {
            return Err(err_at(
                DiskErrorKind::InvalidFormat,
                "find the VHDX signature in",
                path,
                0,
            ));
        }
        let h1 = read_header(&file, path, HEADER_AT[0])?;
        let h2 = read_header(&file, path, HEADER_AT[1])?;
        let header = match (h1, h2) {
            (Some(a), Some(b)) => {
                if b.sequence > a.sequence {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => {
                return Err(err_at(
                    DiskErrorKind::CorruptImage,
                    "find a valid VHDX header in",
                    path,
                    HEADER_AT[0],
                ));
            }
        };
        if header.log_guid != [0u8; 16] {
            return Err(err_at(
                DiskErrorKind::UnsupportedFeature,
                "open a VHDX whose log needs replay",
                path,
                HEADER_AT[0],
            ));
        }
        let (bat_region, meta_region) = read_regions(&file, path, file_size)?;
        let meta = read_metadata(&file, path, meta_region)?;
        let chunk_ratio = ((1u64 << 23) * meta.logical_sector) / meta.block_size;
        let data_blocks = meta.disk_size.div_ceil(meta.block_size);
        let entries = if meta.has_parent {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
        };
        if entries * 8 > bat_region.len {
            return Err(err_at(
                DiskErrorKind::CorruptImage,
                "fit the VHDX BAT in its region in",
                path,
                bat_region.at,
            ));
        }
        let mut raw = vec![0u8; (entries * 8) as usize];
        pread(&file, path, &mut raw, bat_region.at)?;
        let bat: Vec<u64> = le64_table(&raw).collect();
        let mut vhdx = Vhdx {
            file,
            path: path.to_path_buf(),
            size: meta.disk_size,
            block_size: meta.block_size,
            logical_sector: meta.logical_sector,
            chunk_ratio,
            leave_allocated: meta.leave_allocated,
            data_write_guid: header.data_write_guid,
            bat,
            parent: None,
            bitmaps: BitmapCache::default(),
        };
        vhdx.check_bat(bat_region, meta_region, file_size, meta.has_parent)?;
        if let Some((item, at)) = &meta.locator {
            vhdx.parent = Some(Box::new(open_parent(path, item, *at)?));
        }
        Ok(vhdx)
    }

    /// Checks every allocated block lies in the file, past the headers and clear of the BAT
    /// and metadata regions.
    fn check_bat(
        &self,
        bat: Region,
        meta: Region,
        file_size: u64,
        has_parent: bool,
    ) -> Result<(), DiskError> {
        let reserved = [(0, MIB), (bat.at, bat.len), (meta.at, meta.len)];
        for (i, &entry) in self.bat.iter().enumerate() {
            let i = i as u64;
            let entry_at = bat.at + 8 * i;
            let state = entry & 7;
            let is_bitmap = (i + 1).is_multiple_of(self.chunk_ratio + 1);
            let len = if is_bitmap {
                if state == NOT_PRESENT {
                    continue;
                }
                if state != SB_PRESENT || !has_parent {
                    return Err(err_at(
                        DiskErrorKind::CorruptImage,
                        "use the VHDX sector bitmap entry in",
                        path_of(self),
                        entry_at,
                    ));
                }
                MIB
            } else {
                match state {
                    NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED => continue,
                    FULLY_PRESENT => {}
                    PARTIALLY_PRESENT if has_parent => {}
                    _ => {
                        return Err(err_at(
                            DiskErrorKind::CorruptImage,
                            "use the VHDX block state in",
                            path_of(self),
                            entry_at,
                        ));
                    }
                }
                // Only the part of the block inside the disk has to be in the file.
                let block = i - i / (self.chunk_ratio + 1);
                self.block_size.min(self.size.saturating_sub(block * self.block_size))
            };
            let start = (entry >> 20) * MIB;
            let end = start.checked_add(len);
            let bad = end.is_none_or(|end| {
                end > file_size || reserved.iter().any(|&(s, l)| start < s + l && s < end)
            });
            if bad {
                return Err(err_at(
                    DiskErrorKind::CorruptImage,
                    "use the VHDX BAT entry in",
                    path_of(self),
                    entry_at,
                ));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's DataWriteGuid (a differencing child names its parent by it).
    pub fn data_write_guid(&self) -> [u8; 16] {
        self.data_write_guid
    }

    /// What `hutch disk info` shows.
    pub fn info(&self) -> ImageInfo {
        let subformat = if self.parent.is_some() {
            "differencing"
        } else if self.leave_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        let mut allocated = file_allocated_bytes(&self.file);
        let mut problems = Vec::new();
        if let Some(parent) = &self.parent {
            let pinfo = parent.info();
            allocated += pinfo.allocated_bytes;
            problems.extend(pinfo.problems.into_iter().map(|p| format!("parent: {p}")));
        }
        ImageInfo {
            path: self.path.clone(),
            format: ImageFormat::Vhdx,
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

    /// The sector bitmap bits for payload `block` (one bit per logical sector, LSB first).
    fn block_bitmap(&self, block: u64) -> Result<std::sync::Arc<Vec<u8>>, DiskError> {
        let chunk = block / self.chunk_ratio;
        let sb_index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio;
        let entry = self.bat.get(sb_index as usize).copied().unwrap_or(0);
        if entry & 7 != SB_PRESENT {
            return Err(err_at(
                DiskErrorKind::CorruptImage,
                "find the VHDX sector bitmap of",
                &self.path,
                block * self.block_size,
            ));
        }
        let bytes_per_block = self.block_size / self.logical_sector / 8;
        let at = (entry >> 20) * MIB + (block % self.chunk_ratio) * bytes_per_block;
        self.bitmaps.get_or_load(block, || {
            let mut b = vec![0u8; bytes_per_block as usize];
            pread(&self.file, &self.path, &mut b, at)?;
            Ok(b)
        })
    }

    /// Where the `len` bytes at `offset` (inside the disk) come from.
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Piece>, DiskError> {
        let mut pieces = Vec::new();
        let bs = self.block_size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            let index = block + block / self.chunk_ratio;
            let entry = self.bat.get(index as usize).copied().unwrap_or(NOT_PRESENT);
            let data_at = (entry >> 20) * MIB;
            match entry & 7 {
                FULLY_PRESENT => push_piece(&mut pieces, n, Source::File(data_at + in_block)),
                PARTIALLY_PRESENT => {
                    let bitmap = self.block_bitmap(block)?;
                    let ss = self.logical_sector;
                    let bit = |s: u64| {
                        bitmap.get((s / 8) as usize).is_some_and(|b| b & (1 << (s % 8)) != 0)
                    };
                    let stop = in_block + n;
                    let mut p = in_block;
                    while p < stop {
                        let present = bit(p / ss);
                        let mut s = p / ss + 1;
                        while s * ss < stop && bit(s) == present {
                            s += 1;
                        }
                        let run_end = (s * ss).min(stop);
                        let source =
                            if present { Source::File(data_at + p) } else { Source::Parent };
                        push_piece(&mut pieces, run_end - p, source);
                        p = run_end;
                    }
                }
                // Unmapped and undefined contents may be anything: zeroes leak nothing.
                ZERO | UNMAPPED | UNDEFINED => push_piece(&mut pieces, n, Source::Zero),
                _ => push_piece(&mut pieces, n, Source::Parent),
            }
            pos += n;
        }
        Ok(pieces)
    }

    fn read_only(&self, op: &'static str, offset: u64) -> DiskError {
        err_at(DiskErrorKind::UnsupportedFeature, op, &self.path, offset)
    }
}

fn path_of(v: &Vhdx) -> &Path {
    &v.path
}

/// Finds and opens the parent a differencing VHDX names, checking its DataWriteGuid.
fn open_parent(path: &Path, item: &[u8], at: u64) -> Result<Vhdx, DiskError> {
    let entries = locator_entries(item, path, at)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let mut candidates = Vec::new();
    for key in ["relative_path", "absolute_win32_path", "volume_path"] {
        if let Some(v) = get(key) {
            candidates.extend(host_path(v, base));
        }
    }
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        let e = io::Error::from(io::ErrorKind::NotFound);
        return Err(DiskError::io("find the VHDX parent of", e).with_path(path));
    };
    let parent = Vhdx::open_chain(found)?;
    let linkage = get("parent_linkage").and_then(parse_guid).ok_or_else(|| {
        err_at(DiskErrorKind::CorruptImage, "read the VHDX parent linkage in", path, at)
    })?;
    let linkage2 = get("parent_linkage2").and_then(parse_guid);
    if linkage != parent.data_write_guid && linkage2 != Some(parent.data_write_guid) {
        return Err(err_at(
            DiskErrorKind::CorruptImage,
            "match the VHDX parent's DataWriteGuid in",
            path,
            at,
        ));
    }
    Ok(parent)
}

impl BlockBackend for Vhdx {
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
    use crate::ExtentKind;

    const M: usize = MIB as usize;
    const BAT_AT: usize = 2 * M;
    const META_AT: usize = M;
    const SB_INDEX: usize = 4096; // chunk ratio for 1 MiB blocks and 512-byte sectors

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn seal(b: &mut [u8], at: usize, len: usize) {
        put32(b, at + 4, 0);
        let crc = crc32c(&b[at..at + len]);
        put32(b, at + 4, crc);
    }

    /// A hand-built VHDX: 1 MiB blocks, 512-byte sectors, metadata at 1 MiB, BAT at 2 MiB,
    /// payload from 3 MiB. `bat` lists (index, raw entry); `data` (offset, bytes) is placed as is.
    struct Fixture {
        size: u64,
        bat: Vec<(usize, u64)>,
        data: Vec<(usize, Vec<u8>)>,
        /// (parent_linkage text, relative_path).
        parent: Option<(String, String)>,
        data_write_guid: Guid,
        log_guid: Guid,
    }

    impl Fixture {
        fn new(size_mib: u64) -> Fixture {
            Fixture {
                size: size_mib * MIB,
                bat: Vec::new(),
                data: Vec::new(),
                parent: None,
                data_write_guid: [1; 16],
                log_guid: [0; 16],
            }
        }

        fn block(mut self, index: usize, state: u64, file_mib: u64, fill: Option<u8>) -> Fixture {
            self.bat.push((index, state | (file_mib << 20)));
            if let Some(byte) = fill {
                self.data.push((file_mib as usize * M, vec![byte; M]));
            }
            self
        }

        fn bytes(&self) -> Vec<u8> {
            let mut img = vec![0u8; 3 * M];
            img[0..8].copy_from_slice(magic::VHDX);
            for (i, at) in HEADER_AT.iter().enumerate() {
                let at = *at as usize;
                img[at..at + 4].copy_from_slice(b"head");
                put64(&mut img, at + 8, i as u64 + 1);
                img[at + 32..at + 48].copy_from_slice(&self.data_write_guid);
                img[at + 48..at + 64].copy_from_slice(&self.log_guid);
                put16(&mut img, at + 66, 1);
                put32(&mut img, at + 68, M as u32);
                put64(&mut img, at + 72, M as u64);
                seal(&mut img, at, HEADER_SIZE);
            }
            for at in REGION_TABLE_AT {
                let at = at as usize;
                img[at..at + 4].copy_from_slice(b"regi");
                put32(&mut img, at + 8, 2);
                for (i, (id, off)) in
                    [(BAT_REGION, BAT_AT), (METADATA_REGION, META_AT)].iter().enumerate()
                {
                    let e = at + 16 + 32 * i;
                    img[e..e + 16].copy_from_slice(id);
                    put64(&mut img, e + 16, *off as u64);
                    put32(&mut img, e + 24, M as u32);
                    put32(&mut img, e + 28, 1);
                }
                seal(&mut img, at, REGION_TABLE_SIZE);
            }
            let m = META_AT;
            img[m..m + 8].copy_from_slice(b"metadata");
            let items_at = 64 * 1024;
            let mut items: Vec<(Guid, Vec<u8>)> = vec![
                (
                    FILE_PARAMETERS,
                    [
                        (M as u32).to_le_bytes(),
                        (if self.parent.is_some() { 2u32 } else { 0 }).to_le_bytes(),
                    ]
                    .concat(),
                ),
                (VIRTUAL_DISK_SIZE, self.size.to_le_bytes().to_vec()),
                (LOGICAL_SECTOR_SIZE, 512u32.to_le_bytes().to_vec()),
                (PHYSICAL_SECTOR_SIZE, 4096u32.to_le_bytes().to_vec()),
            ];
            if let Some((linkage, rel)) = &self.parent {
                items.push((
                    PARENT_LOCATOR,
                    locator(&[("parent_linkage", linkage), ("relative_path", rel)]),
                ));
            }
            put16(&mut img, m + 10, items.len() as u16);
            let mut off = items_at;
            for (i, (id, data)) in items.iter().enumerate() {
                let e = m + 32 + 32 * i;
                img[e..e + 16].copy_from_slice(id);
                put32(&mut img, e + 16, off as u32);
                put32(&mut img, e + 20, data.len() as u32);
                put32(&mut img, e + 24, 4);
                img[m + off..m + off + data.len()].copy_from_slice(data);
                off += data.len().next_multiple_of(8);
            }
            for &(index, entry) in &self.bat {
                put64(&mut img, BAT_AT + 8 * index, entry);
            }
            for (at, bytes) in &self.data {
                if img.len() < at + bytes.len() {
                    img.resize(at + bytes.len(), 0);
                }
                img[*at..at + bytes.len()].copy_from_slice(bytes);
            }
            img
        }
    }

    fn locator(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut item = vec![0u8; 20 + 12 * pairs.len()];
        item[0..16].copy_from_slice(&VHDX_LOCATOR_TYPE);
        put16(&mut item, 18, pairs.len() as u16);
        for (i, (k, v)) in pairs.iter().enumerate() {
            let k: Vec<u8> = k.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let v: Vec<u8> = v.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let e = 20 + 12 * i;
            let end = item.len();
            put32(&mut item, e, end as u32);
            put32(&mut item, e + 4, (end + k.len()) as u32);
            put16(&mut item, e + 8, k.len() as u16);
            put16(&mut item, e + 10, v.len() as u16);
            item.extend(k);
            item.extend(v);
        }
        item
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn open_err(path: &Path) -> DiskError {
        Vhdx::open(path, OpenOptions::default()).unwrap_err()
    }

    const GUID_TEXT: &str = "{01010101-0101-0101-0101-010101010101}";

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn guid_text_parses_into_disk_order() {
        let g = parse_guid("{2DC27766-F623-4200-9D64-115E9BFD4A08}").unwrap();
        assert_eq!(g, BAT_REGION);
        assert!(parse_guid("{2DC27766-F623-4200-9D64}").is_none());
    }

    #[test]
    fn dynamic_vhdx_maps_block_states() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture::new(4)
            .block(0, FULLY_PRESENT, 3, Some(0x11))
            .block(1, ZERO, 0, None)
            .block(2, UNMAPPED, 0, None);
        let disk =
            Vhdx::open(&write(dir.path(), "d.vhdx", &f.bytes()), OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 4 * M];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..M].iter().all(|&b| b == 0x11) && buf[M..].iter().all(|&b| b == 0));
        let kinds: Vec<_> =
            disk.extents(0, 4 * MIB).unwrap().iter().map(|e| (e.len, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (MIB, ExtentKind::Data),
                (2 * MIB, ExtentKind::Zero),
                (MIB, ExtentKind::Unallocated)
            ]
        );
        assert_eq!(disk.info().subformat.as_deref(), Some("dynamic"));
    }

    #[test]
    fn differencing_vhdx_reads_partial_blocks_through_the_sector_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let parent = Fixture::new(4).block(0, FULLY_PRESENT, 3, Some(0x11)).block(2, ZERO, 0, None);
        write(dir.path(), "base.vhdx", &parent.bytes());
        let mut child = Fixture::new(4)
            .block(0, PARTIALLY_PRESENT, 3, Some(0x22))
            .block(1, FULLY_PRESENT, 4, Some(0x33))
            .block(SB_INDEX, SB_PRESENT, 5, None);
        child.data_write_guid = [2; 16];
        let mut bitmap = vec![0u8; M];
        bitmap[0] = 0b110; // sectors 1 and 2 of block 0
        child.data.push((5 * M, bitmap));
        child.parent = Some((GUID_TEXT.into(), ".\\base.vhdx".into()));
        let path = write(dir.path(), "child.vhdx", &child.bytes());
        let disk = Vhdx::open(&path, OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 4 * M];
        disk.read_at(&mut buf, 0).unwrap();
        let mut want = vec![0x11u8; M];
        want[512..1536].fill(0x22);
        want.extend(std::iter::repeat_n(0x33, M));
        want.resize(4 * M, 0);
        assert!(buf == want);
        let kinds: Vec<_> =
            disk.extents(0, 4 * MIB).unwrap().iter().map(|e| (e.len, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (2 * MIB, ExtentKind::Data),
                (MIB, ExtentKind::Zero),
                (MIB, ExtentKind::Unallocated)
            ]
        );
        let info = disk.info();
        assert_eq!(info.subformat.as_deref(), Some("differencing"));
        assert_eq!(info.backing.as_deref(), Some(dir.path().join("base.vhdx").as_path()));
    }

    #[test]
    fn parent_with_another_data_write_guid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.vhdx", &Fixture::new(1).bytes());
        let mut child = Fixture::new(1);
        child.parent = Some(("{02020202-0202-0202-0202-020202020202}".into(), "base.vhdx".into()));
        assert_eq!(
            open_err(&write(dir.path(), "c.vhdx", &child.bytes())).kind(),
            DiskErrorKind::CorruptImage
        );
    }

    #[test]
    fn parent_loop_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Fixture::new(1);
        child.parent = Some((GUID_TEXT.into(), "self.vhdx".into()));
        let err = open_err(&write(dir.path(), "self.vhdx", &child.bytes()));
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        assert!(err.to_string().contains("loop"), "{err}");
    }

    #[test]
    fn newest_valid_header_wins_and_a_bad_crc_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = Fixture::new(1).bytes();
        let h2 = HEADER_AT[1] as usize;
        img[h2 + 32..h2 + 48].fill(9);
        seal(&mut img, h2, HEADER_SIZE);
        let p = write(dir.path(), "a.vhdx", &img);
        assert_eq!(Vhdx::open(&p, OpenOptions::default()).unwrap().data_write_guid(), [9; 16]);
        img[h2 + 40] ^= 1; // now header 2's CRC is wrong: header 1 is used
        let p = write(dir.path(), "b.vhdx", &img);
        assert_eq!(Vhdx::open(&p, OpenOptions::default()).unwrap().data_write_guid(), [1; 16]);
        let h1 = HEADER_AT[0] as usize;
        img[h1 + 40] ^= 1;
        let err = open_err(&write(dir.path(), "c.vhdx", &img));
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn pending_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fixture::new(1);
        f.log_guid = [5; 16];
        let err = open_err(&write(dir.path(), "l.vhdx", &f.bytes()));
        assert_eq!(err.kind(), DiskErrorKind::UnsupportedFeature);
        assert!(err.to_string().contains("log"), "{err}");
    }

    #[test]
    fn unknown_required_region_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = Fixture::new(1).bytes();
        let t = REGION_TABLE_AT[0] as usize;
        put32(&mut img, t + 8, 3);
        let e = t + 16 + 64;
        img[e..e + 16].fill(0xee);
        img.resize(4 * M, 0); // a free megabyte for the unknown region
        put64(&mut img, e + 16, 3 * MIB);
        put32(&mut img, e + 24, M as u32);
        put32(&mut img, e + 28, 1);
        seal(&mut img, t, REGION_TABLE_SIZE);
        let err = open_err(&write(dir.path(), "r.vhdx", &img));
        assert_eq!(err.kind(), DiskErrorKind::UnsupportedFeature);
        assert_eq!(err.offset(), Some(e as u64));
    }

    #[test]
    fn region_past_eof_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = Fixture::new(1).bytes();
        for t in REGION_TABLE_AT {
            let t = t as usize;
            put64(&mut img, t + 16 + 16, 1 << 40);
            seal(&mut img, t, REGION_TABLE_SIZE);
        }
        let err = open_err(&write(dir.path(), "r.vhdx", &img));
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        assert_eq!(err.offset(), Some(REGION_TABLE_AT[0] + 16));
    }

    #[test]
    fn bat_entries_past_eof_or_in_the_headers_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        for mib in [0, 2, 1000] {
            let f = Fixture::new(2).block(1, FULLY_PRESENT, mib, None);
            let err = open_err(&write(dir.path(), "b.vhdx", &f.bytes()));
            assert_eq!(err.kind(), DiskErrorKind::CorruptImage, "{mib}");
            assert_eq!(err.offset(), Some(BAT_AT as u64 + 8), "{mib}");
        }
    }

    #[test]
    fn partially_present_block_without_parent_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture::new(2).block(0, PARTIALLY_PRESENT, 3, Some(1));
        assert_eq!(
            open_err(&write(dir.path(), "p.vhdx", &f.bytes())).kind(),
            DiskErrorKind::CorruptImage
        );
    }

    #[test]
    fn absurd_metadata_values_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let items = META_AT + 64 * 1024;
        for (at, value) in
            [(items, 3 * MIB), (items, 1 << 31), (items + 8, 1u64 << 60), (items + 8, 1000)]
        {
            let mut img = Fixture::new(1).bytes();
            put64(&mut img, at, value);
            if at == items {
                put32(&mut img, at + 4, 0); // keep flags clean: only the block size changes
                put32(&mut img, at, value as u32);
            }
            let err = open_err(&write(dir.path(), "m.vhdx", &img));
            assert_eq!(err.kind(), DiskErrorKind::CorruptImage, "{at:#x} {value}");
        }
    }

    #[test]
    fn truncated_or_foreign_files_are_not_vhdx() {
        let dir = tempfile::tempdir().unwrap();
        let img = Fixture::new(1).bytes();
        assert_eq!(
            open_err(&write(dir.path(), "t", &img[..300 * 1024])).kind(),
            DiskErrorKind::InvalidFormat
        );
        assert_eq!(
            open_err(&write(dir.path(), "z", &vec![0; 2 * M])).kind(),
            DiskErrorKind::InvalidFormat
        );
    }

    #[test]
    fn data_cut_off_by_truncation_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let img = Fixture::new(2).block(0, FULLY_PRESENT, 3, Some(7)).bytes();
        let err = open_err(&write(dir.path(), "t.vhdx", &img[..3 * M + 4096]));
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
    }
}
