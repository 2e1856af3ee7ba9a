//! VMware VMDK images (read-only), after VMware's "Virtual Disk Format 1.1": a descriptor
//! lists extents (flat files, hosted sparse files, zero stretches) that make up the disk in
//! order; a delta disk names its parent, whose data shows through unallocated grains.
//!
//! ```text
//!   descriptor ──▶ extent 0: FLAT file @ start sector
//!              ──▶ extent 1: SPARSE file: header ─▶ grain directory ─▶ grain tables ─▶ grains
//!              ──▶ extent 2: ZERO                       (streamOptimized: deflated grains)
//!   parentFileNameHint ──▶ parent image (any format), read where a grain is unallocated
//! ```
//! Grain tables are read on demand and cached (bounded); metadata offsets are checked against
//! the file before anything is allocated for them.

mod descriptor;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flate2::{Decompress, FlushDecompress, Status};

use crate::bytes::{le32_table, Fields};
use crate::mapped::{self, err_at, push_extent};
use crate::{chain, detect, magic};
use crate::{
    check_range, BlockBackend, DiskError, DiskErrorKind, Extent, ExtentKind, ImageFormat,
    ImageInfo, OpenOptions,
};
use descriptor::{Descriptor, ExtentType, NO_PARENT};

const SECTOR: u64 = 512;
const GD_AT_END: u64 = u64::MAX;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESS_DEFLATE: u16 = 1;
/// Grains above 1 MiB are unheard of (VMware and qemu use 64 KiB).
const MAX_GRAIN_SECTORS: u64 = 2048;
const MAX_GTES: u64 = 4096;
/// Descriptor files and embedded descriptors are small text.
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Grain tables kept in memory per extent (512 entries each: 2 KiB).
const GT_CACHE: usize = 1024;
/// Inflated grains kept per extent, for small reads walking through one grain.
const GRAIN_CACHE: usize = 8;
/// Size of a grain marker's header (lba, compressed size).
const MARKER_LEN: u64 = 12;

/// An open VMDK image (all its extents, and its parent if it is a delta disk).
pub struct Vmdk {
    path: PathBuf,
    size: u64,
    create_type: String,
    extents: Vec<VmdkExtent>,
    parent: Option<Box<dyn BlockBackend>>,
    parent_path: Option<PathBuf>,
    /// Every host file the image consists of (descriptor and extents).
    files: Vec<PathBuf>,
    problems: Vec<String>,
}

impl std::fmt::Debug for Vmdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmdk")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("create_type", &self.create_type)
            .field("extents", &self.extents.len())
            .field("parent", &self.parent_path)
            .finish()
    }
}

struct VmdkExtent {
    /// Where the extent starts on the virtual disk (bytes).
    start: u64,
    len: u64,
    data: ExtentData,
}

enum ExtentData {
    Zero,
    Flat { file: File, path: PathBuf, base: u64 },
    Sparse(Box<SparseExtent>),
}

/// Where one grain of a sparse extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    Unallocated,
    Zero,
    /// Byte offset of the grain's data.
    Data(u64),
    /// Byte offset of the compressed grain (its marker, when the extent has markers).
    Compressed(u64),
}

/// The fields of a hosted sparse extent header (or footer) that matter here.
#[derive(Debug, Clone, Copy)]
struct SparseHeader {
    flags: u32,
    capacity: u64,
    grain_sectors: u64,
    descriptor_offset: u64,
    descriptor_size: u64,
    gtes: u64,
    gd_offset: u64,
    overhead: u64,
    compression: u16,
}

fn parse_header(h: Fields<'_>) -> Result<SparseHeader, DiskError> {
    Ok(SparseHeader {
        flags: h.le32(8)?,
        capacity: h.le64(12)?,
        grain_sectors: h.le64(20)?,
        descriptor_offset: h.le64(28)?,
        descriptor_size: h.le64(36)?,
        gtes: u64::from(h.le32(44)?),
        gd_offset: h.le64(56)?,
        overhead: h.le64(64)?,
        compression: h.le16(77)?,
    })
}

struct SparseExtent {
    file: File,
    path: PathBuf,
    file_len: u64,
    /// Grain size in bytes.
    grain: u64,
    gtes: u64,
    /// Capacity in bytes.
    capacity: u64,
    /// Grain directory: sector of each grain table, 0 = none.
    gd: Vec<u32>,
    gd_range: (u64, u64),
    compressed: bool,
    markers: bool,
    zero_grain: bool,
    /// Uncompressed grains must start at or after this byte (the metadata ends here).
    data_start: u64,
    tables: Mutex<HashMap<usize, Arc<Vec<u32>>>>,
    grains: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
}

impl SparseExtent {
    /// Opens a hosted sparse extent file; returns it with its header (for the descriptor).
    fn open(path: &Path) -> Result<(SparseExtent, SparseHeader), DiskError> {
        let (file, file_len) = mapped::open_file(path)?;
        let invalid = |op, at| err_at(DiskErrorKind::InvalidFormat, op, path, at);
        let corrupt = |op, at| err_at(DiskErrorKind::CorruptImage, op, path, at);
        let unsupported = |op, at| err_at(DiskErrorKind::UnsupportedFeature, op, path, at);
        if file_len < SECTOR {
            return Err(invalid("read the VMDK sparse header (file too short)", 0));
        }
        let mut h = [0u8; SECTOR as usize];
        mapped::read_exact(&file, path, &mut h, 0, "read the VMDK sparse header")?;
        if &h[..4] != magic::VMDK_SPARSE {
            return Err(invalid("find the VMDK sparse magic", 0));
        }
        let fields = Fields::new(&h, "read the VMDK sparse header").in_file(path, 0);
        let version = fields.le32(4)?;
        if !(1..=3).contains(&version) {
            return Err(unsupported("open this VMDK sparse version", 4));
        }
        let mut header = parse_header(fields)?;
        let mut header_at = 0;
        if header.gd_offset == GD_AT_END {
            // streamOptimized written in one pass: the real header is the footer, just before
            // the end-of-stream marker.
            if file_len < 3 * SECTOR {
                return Err(corrupt("read the VMDK footer (file too short)", 56));
            }
            header_at = file_len - 2 * SECTOR;
            mapped::read_exact(&file, path, &mut h, header_at, "read the VMDK footer")?;
            if &h[..4] != magic::VMDK_SPARSE {
                return Err(corrupt("find the VMDK footer", header_at));
            }
            header =
                parse_header(Fields::new(&h, "read the VMDK footer").in_file(path, header_at))?;
            if header.gd_offset == GD_AT_END {
                return Err(corrupt("find the VMDK grain directory", header_at + 56));
            }
        }
        let compressed = header.flags & FLAG_COMPRESSED != 0;
        if compressed && header.compression != COMPRESS_DEFLATE {
            return Err(unsupported("use this VMDK compression", header_at + 77));
        }
        let g = header.grain_sectors;
        if !g.is_power_of_two() || g > MAX_GRAIN_SECTORS {
            return Err(unsupported("use this VMDK grain size", header_at + 20));
        }
        if header.gtes == 0 || header.gtes > MAX_GTES {
            return Err(corrupt("use the VMDK grain table size", header_at + 44));
        }
        let capacity = header
            .capacity
            .checked_mul(SECTOR)
            .ok_or_else(|| corrupt("use the VMDK capacity", header_at + 12))?;
        let grain = g * SECTOR;
        let span = grain * header.gtes;
        let gd_entries = capacity.div_ceil(span);
        let gd_offset = header
            .gd_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| corrupt("use the VMDK grain directory offset", header_at + 56))?;
        let gd_end = gd_offset.checked_add(gd_entries * 4);
        if gd_offset < SECTOR || gd_end.is_none_or(|end| end > file_len) {
            let op = "read the VMDK grain directory (outside the file)";
            return Err(corrupt(op, header_at + 56));
        }
        // The directory lies inside the file (checked), so its size is bounded by the file's.
        let mut raw = vec![0u8; (gd_entries * 4) as usize];
        mapped::read_exact(&file, path, &mut raw, gd_offset, "read the VMDK grain directory")?;
        let gd = le32_table(&raw).collect();
        let data_start = if compressed { SECTOR } else { header.overhead.saturating_mul(SECTOR) };
        let extent = SparseExtent {
            file,
            path: path.to_path_buf(),
            file_len,
            grain,
            gtes: header.gtes,
            capacity,
            gd,
            gd_range: (gd_offset, gd_offset + gd_entries * 4),
            compressed,
            markers: header.flags & FLAG_MARKERS != 0,
            zero_grain: header.flags & FLAG_ZERO_GRAIN != 0,
            data_start,
            tables: Mutex::new(HashMap::new()),
            grains: Mutex::new(VecDeque::new()),
        };
        Ok((extent, header))
    }

    fn corrupt(&self, op: &'static str, at: u64) -> DiskError {
        err_at(DiskErrorKind::CorruptImage, op, &self.path, at)
    }

    /// The grain table `index` of the directory, or `None` when it is not allocated.
    fn table(&self, index: usize) -> Result<Option<Arc<Vec<u32>>>, DiskError> {
        let Some(&sector) = self.gd.get(index) else { return Ok(None) };
        if sector == 0 {
            return Ok(None);
        }
        if let Some(t) = self.tables.lock().ok().and_then(|c| c.get(&index).cloned()) {
            return Ok(Some(t));
        }
        let entry_at = self.gd_range.0 + index as u64 * 4;
        let at = u64::from(sector) * SECTOR;
        let len = self.gtes * 4;
        let overlaps_gd = at < self.gd_range.1 && at + len > self.gd_range.0;
        if at < SECTOR || at + len > self.file_len || overlaps_gd {
            return Err(
                self.corrupt("read a VMDK grain table (it points outside the file)", entry_at)
            );
        }
        let mut raw = vec![0u8; len as usize];
        mapped::read_exact(&self.file, &self.path, &mut raw, at, "read a VMDK grain table")?;
        let table: Arc<Vec<u32>> = Arc::new(le32_table(&raw).collect());
        if let Ok(mut cache) = self.tables.lock() {
            if cache.len() >= GT_CACHE {
                cache.clear();
            }
            cache.insert(index, table.clone());
        }
        Ok(Some(table))
    }

    fn grain_at(&self, index: u64) -> Result<Grain, DiskError> {
        let Some(table) = self.table((index / self.gtes) as usize)? else {
            return Ok(Grain::Unallocated);
        };
        let entry = table.get((index % self.gtes) as usize).copied().unwrap_or(0);
        let at = u64::from(entry) * SECTOR;
        Ok(match entry {
            0 => Grain::Unallocated,
            1 if self.zero_grain => Grain::Zero,
            _ if self.compressed => Grain::Compressed(at),
            _ => Grain::Data(at),
        })
    }

    /// Checks that the part of grain `index` inside the extent lies in the data area.
    fn check_grain(&self, index: u64, at: u64) -> Result<(), DiskError> {
        let needed = self.grain.min(self.capacity - index * self.grain);
        let in_file = at.checked_add(needed).is_some_and(|end| end <= self.file_len);
        let in_gd = at < self.gd_range.1 && at + needed > self.gd_range.0;
        if at < self.data_start || !in_file || in_gd {
            return Err(self.corrupt("read a VMDK grain (it points outside the data area)", at));
        }
        Ok(())
    }

    /// Inflates the compressed grain `index` stored at byte `at`.
    fn inflate(&self, index: u64, at: u64) -> Result<Arc<Vec<u8>>, DiskError> {
        if let Some(hit) = self
            .grains
            .lock()
            .ok()
            .and_then(|c| c.iter().find(|(i, _)| *i == index).map(|(_, g)| g.clone()))
        {
            return Ok(hit);
        }
        let grain_sectors = self.grain / SECTOR;
        // Deflate never grows data by more than a few bytes per block.
        let max_compressed = 2 * self.grain + 1024;
        if at < SECTOR || at >= self.file_len {
            return Err(self.corrupt("read a VMDK grain (it points outside the file)", at));
        }
        let (data_at, len) = if self.markers {
            let mut m = [0u8; MARKER_LEN as usize];
            mapped::read_exact(&self.file, &self.path, &mut m, at, "read a VMDK grain marker")?;
            let marker = Fields::new(&m, "read a VMDK grain marker").in_file(&self.path, at);
            let lba = marker.le64(0)?;
            let size = u64::from(marker.le32(8)?);
            if lba != index * grain_sectors {
                return Err(self.corrupt("match a VMDK grain marker to its grain", at));
            }
            let fits = at + MARKER_LEN + size <= self.file_len;
            if size == 0 || size > max_compressed || !fits {
                return Err(self.corrupt("read a compressed VMDK grain (bad size)", at + 8));
            }
            (at + MARKER_LEN, size)
        } else {
            (at, max_compressed.min(self.file_len - at))
        };
        let mut packed = vec![0u8; len as usize];
        mapped::read_exact(&self.file, &self.path, &mut packed, data_at, "read a VMDK grain")?;
        let mut out = vec![0u8; self.grain as usize];
        let mut z = Decompress::new(true);
        let status = z
            .decompress(&packed, &mut out, FlushDecompress::Finish)
            .map_err(|_| self.corrupt("inflate a VMDK grain", at))?;
        let produced = z.total_out();
        let ended = match status {
            Status::StreamEnd => true,
            // A full buffer: the stream must end right here, not expand past the grain.
            _ if produced == self.grain => {
                let mut probe = [0u8; 1];
                let rest = &packed[z.total_in() as usize..];
                matches!(
                    z.decompress(rest, &mut probe, FlushDecompress::Finish),
                    Ok(Status::StreamEnd)
                ) && z.total_out() == produced
            }
            _ => false,
        };
        let needed = self.grain.min(self.capacity - index * self.grain);
        if !ended || produced < needed {
            return Err(self.corrupt("inflate a VMDK grain (wrong size)", at));
        }
        let grain = Arc::new(out);
        if let Ok(mut cache) = self.grains.lock() {
            if cache.len() >= GRAIN_CACHE {
                cache.pop_front();
            }
            cache.push_back((index, grain.clone()));
        }
        Ok(grain)
    }

    /// Fills `buf` from `offset` within the extent; unallocated stretches go to `backing`
    /// (with their offset within the extent).
    fn read<F>(&self, buf: &mut [u8], offset: u64, mut backing: F) -> Result<(), DiskError>
    where
        F: FnMut(&mut [u8], u64) -> Result<(), DiskError>,
    {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / self.grain;
            let within = pos % self.grain;
            let first = self.grain_at(index)?;
            let mut len = (self.grain - within).min((buf.len() - done) as u64);
            // Coalesce following grains that continue this one (in the file, or as holes).
            let mut next = index + 1;
            while done as u64 + len < buf.len() as u64 {
                let follows = match (first, self.grain_at(next)?) {
                    (Grain::Data(a), Grain::Data(b)) => b == a + (next - index) * self.grain,
                    (Grain::Zero, Grain::Zero) | (Grain::Unallocated, Grain::Unallocated) => true,
                    _ => false,
                };
                if !follows {
                    break;
                }
                len = (len + self.grain).min((buf.len() - done) as u64);
                next += 1;
            }
            let out = &mut buf[done..done + len as usize];
            match first {
                Grain::Unallocated => backing(out, pos)?,
                Grain::Zero => out.fill(0),
                Grain::Data(at) => {
                    for i in index..next {
                        self.check_grain(i, at + (i - index) * self.grain)?;
                    }
                    mapped::read_exact(&self.file, &self.path, out, at + within, "read")?;
                }
                Grain::Compressed(at) => {
                    let grain = self.inflate(index, at)?;
                    let w = within as usize;
                    out.copy_from_slice(&grain[w..w + out.len()]);
                }
            }
            done += len as usize;
        }
        Ok(())
    }

    /// Appends the extents of `len` bytes at `offset` within the extent, shifted by `base`.
    fn map(
        &self,
        offset: u64,
        len: u64,
        base: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), DiskError> {
        let end = offset + len;
        let mut pos = offset;
        let span = self.grain * self.gtes;
        let mut holes = mapped::FileHoles::new(&self.file);
        while pos < end {
            let table_index = (pos / span) as usize;
            if self.table(table_index)?.is_none() {
                let stop = ((table_index as u64 + 1) * span).min(end);
                push_extent(out, base + pos, stop - pos, ExtentKind::Unallocated);
                pos = stop;
                continue;
            }
            let index = pos / self.grain;
            let stop = ((index + 1) * self.grain).min(end);
            match self.grain_at(index)? {
                Grain::Unallocated => {
                    push_extent(out, base + pos, stop - pos, ExtentKind::Unallocated)
                }
                Grain::Zero => push_extent(out, base + pos, stop - pos, ExtentKind::Zero),
                Grain::Data(at) => holes.push(out, base + pos, at + pos % self.grain, stop - pos),
                Grain::Compressed(_) => push_extent(out, base + pos, stop - pos, ExtentKind::Data),
            }
            pos = stop;
        }
        Ok(())
    }
}

impl Vmdk {
    /// Opens a VMDK: a descriptor file, or a sparse extent (with its embedded descriptor).
    pub fn open(path: &Path, options: OpenOptions) -> Result<Vmdk, DiskError> {
        if options.writable {
            return Err(mapped::read_only(path, 0));
        }
        let _chain = chain::enter(path)?;
        let (file, file_len) = mapped::open_file(path)?;
        let mut head = [0u8; 4];
        let n = (file_len as usize).min(4);
        mapped::read_exact(&file, path, &mut head[..n], 0, "read the VMDK header")?;
        let (text, text_at) = if &head == magic::VMDK_SPARSE {
            let (_, header) = SparseExtent::open(path)?;
            let (at, sectors) = (header.descriptor_offset, header.descriptor_size);
            if at == 0 || sectors == 0 {
                // A bare sparse extent: it is the whole disk.
                return Vmdk::single_sparse(path);
            }
            let len = sectors.saturating_mul(SECTOR).min(MAX_DESCRIPTOR);
            let start = at.saturating_mul(SECTOR);
            if start.checked_add(len).is_none_or(|end| end > file_len) {
                let e = DiskErrorKind::CorruptImage;
                return Err(err_at(e, "read the embedded VMDK descriptor", path, 28));
            }
            let mut text = vec![0u8; len as usize];
            mapped::read_exact(&file, path, &mut text, start, "read the VMDK descriptor")?;
            (text, start)
        } else {
            if file_len > MAX_DESCRIPTOR {
                let e = DiskErrorKind::InvalidFormat;
                return Err(err_at(e, "read the VMDK descriptor (too large)", path, 0));
            }
            let mut text = vec![0u8; file_len as usize];
            mapped::read_exact(&file, path, &mut text, 0, "read the VMDK descriptor")?;
            (text, 0)
        };
        drop(file);
        let d =
            descriptor::parse(&text).map_err(|e| err_at(e.kind, e.op, path, text_at + e.offset))?;
        Vmdk::from_descriptor(path, &d, text_at)
    }

    fn single_sparse(path: &Path) -> Result<Vmdk, DiskError> {
        let (extent, _) = SparseExtent::open(path)?;
        let len = extent.capacity;
        Ok(Vmdk {
            path: path.to_path_buf(),
            size: len,
            create_type: "monolithicSparse".to_string(),
            extents: vec![VmdkExtent { start: 0, len, data: ExtentData::Sparse(Box::new(extent)) }],
            parent: None,
            parent_path: None,
            files: vec![path.to_path_buf()],
            problems: Vec::new(),
        })
    }

    fn from_descriptor(path: &Path, d: &Descriptor, text_at: u64) -> Result<Vmdk, DiskError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files = vec![path.to_path_buf()];
        let mut extents = Vec::with_capacity(d.extents.len());
        let mut start = 0u64;
        for line in &d.extents {
            let at = text_at + line.offset;
            let corrupt = |op| err_at(DiskErrorKind::CorruptImage, op, path, at);
            let len = line
                .sectors
                .checked_mul(SECTOR)
                .filter(|len| start.checked_add(*len).is_some_and(|end| end <= i64::MAX as u64))
                .ok_or_else(|| corrupt("add up the VMDK extent sizes (too large)"))?;
            // An embedded descriptor (in a sparse file) describes that file itself, whatever
            // the name it was written with: the image may have been renamed since.
            let file_path = if text_at > 0 && line.kind == ExtentType::Sparse {
                Some(path.to_path_buf())
            } else {
                line.file.as_deref().map(|f| dir.join(f))
            };
            if let Some(p) = &file_path {
                if !files.contains(p) {
                    files.push(p.clone());
                }
            }
            let data = match (line.kind, file_path) {
                (ExtentType::Zero, _) => ExtentData::Zero,
                (ExtentType::Flat, Some(p)) => {
                    let (file, file_len) = mapped::open_file(&p)?;
                    let base = line.start.checked_mul(SECTOR);
                    let fits = base.and_then(|b| b.checked_add(len)).is_some_and(|e| e <= file_len);
                    if !fits {
                        return Err(corrupt("fit a VMDK flat extent in its file (too short)"));
                    }
                    ExtentData::Flat { file, path: p, base: base.unwrap_or(0) }
                }
                (ExtentType::Sparse, Some(p)) => {
                    let (extent, _) = SparseExtent::open(&p)?;
                    if extent.capacity < len {
                        return Err(corrupt("fit a VMDK sparse extent in its capacity"));
                    }
                    ExtentData::Sparse(Box::new(extent))
                }
                (_, None) => return Err(corrupt("find the VMDK extent's file name")),
            };
            if len > 0 {
                extents.push(VmdkExtent { start, len, data });
            }
            start += len;
        }
        let mut vmdk = Vmdk {
            path: path.to_path_buf(),
            size: start,
            create_type: d.create_type.clone().unwrap_or_else(|| "custom".to_string()),
            extents,
            parent: None,
            parent_path: None,
            files,
            problems: Vec::new(),
        };
        let wants_parent = d.parent_cid.is_some_and(|c| c != NO_PARENT);
        if let Some(hint) = d.parent_hint.as_deref().filter(|_| wants_parent) {
            let parent_path = dir.join(hint);
            let parent: Box<dyn BlockBackend> =
                if detect::detect(&parent_path)? == ImageFormat::Vmdk {
                    let parent = Vmdk::open(&parent_path, OpenOptions::default())?;
                    let cid = parent_cid(&parent_path);
                    if cid.is_some() && cid != d.parent_cid {
                        vmdk.problems.push(format!(
                            "parent {} has CID {:08x}, the image expects {:08x}",
                            parent_path.display(),
                            cid.unwrap_or(0),
                            d.parent_cid.unwrap_or(0)
                        ));
                    }
                    Box::new(parent)
                } else {
                    crate::open_image(&parent_path, OpenOptions::default())?
                };
            vmdk.parent = Some(parent);
            vmdk.parent_path = Some(parent_path);
        }
        Ok(vmdk)
    }

    pub fn info(&self) -> Result<ImageInfo, DiskError> {
        let mut allocated = 0u64;
        for f in &self.files {
            allocated += mapped::allocated_bytes(f)?;
        }
        Ok(ImageInfo {
            path: self.path.clone(),
            format: ImageFormat::Vmdk,
            subformat: Some(self.create_type.clone()),
            virtual_size: self.size,
            allocated_bytes: allocated,
            backing: self.parent_path.clone(),
            problems: self.problems.clone(),
        })
    }

    /// The index of the extent holding byte `offset`.
    fn extent_index(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.start + e.len <= offset)
    }

    /// Reads from the parent, zeroes past its end (or with no parent).
    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let Some(parent) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        let avail = parent.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        if !inside.is_empty() {
            parent.read_at(inside, offset)?;
        }
        past.fill(0);
        Ok(())
    }

    fn map_parent(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), DiskError> {
        let avail = match &self.parent {
            Some(p) => p.size().saturating_sub(offset).min(len),
            None => 0,
        };
        if let (Some(parent), true) = (&self.parent, avail > 0) {
            for e in parent.extents(offset, avail)? {
                push_extent(out, e.offset, e.len, e.kind);
            }
        }
        push_extent(out, offset + avail, len - avail, ExtentKind::Unallocated);
        Ok(())
    }
}

/// The CID in a VMDK's descriptor, if it has one that can be read.
fn parent_cid(path: &Path) -> Option<u32> {
    let (file, len) = mapped::open_file(path).ok()?;
    let mut head = [0u8; SECTOR as usize];
    let n = len.min(SECTOR) as usize;
    mapped::read_exact(&file, path, &mut head[..n], 0, "read").ok()?;
    let (at, size) = if &head[..4] == magic::VMDK_SPARSE {
        let h = parse_header(Fields::new(&head, "read the VMDK sparse header")).ok()?;
        let size = h.descriptor_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR);
        (h.descriptor_offset.saturating_mul(SECTOR), size)
    } else {
        (0, len.min(MAX_DESCRIPTOR))
    };
    let mut text = vec![0u8; size.min(len.saturating_sub(at)) as usize];
    mapped::read_exact(&file, path, &mut text, at, "read").ok()?;
    descriptor::parse(&text).ok()?.cid
}

impl BlockBackend for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(self.size, offset, buf.len() as u64, "read")
            .map_err(|e| e.with_path(&self.path))?;
        let mut done = 0usize;
        let mut i = self.extent_index(offset);
        while done < buf.len() {
            let pos = offset + done as u64;
            let Some(extent) = self.extents.get(i) else { break };
            let within = pos - extent.start;
            let len = (extent.len - within).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + len];
            match &extent.data {
                ExtentData::Zero => out.fill(0),
                ExtentData::Flat { file, path, base } => {
                    mapped::read_exact(file, path, out, base + within, "read")?;
                }
                ExtentData::Sparse(sparse) => {
                    let start = extent.start;
                    sparse.read(out, within, |b, at| self.read_parent(b, start + at))?;
                }
            }
            done += len;
            i += 1;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], offset: u64) -> Result<(), DiskError> {
        Err(mapped::read_only(&self.path, offset))
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }

    fn discard(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(mapped::read_only(&self.path, offset))
    }

    fn write_zeroes(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(mapped::read_only(&self.path, offset))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(self.size, offset, len, "map").map_err(|e| e.with_path(&self.path))?;
        let mut out = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        let mut i = self.extent_index(offset);
        while pos < end {
            let Some(extent) = self.extents.get(i) else { break };
            let within = pos - extent.start;
            let n = (extent.len - within).min(end - pos);
            match &extent.data {
                ExtentData::Zero => push_extent(&mut out, pos, n, ExtentKind::Zero),
                ExtentData::Flat { .. } => push_extent(&mut out, pos, n, ExtentKind::Data),
                ExtentData::Sparse(sparse) => {
                    let mut own = Vec::new();
                    sparse.map(within, n, extent.start, &mut own)?;
                    for e in own {
                        if e.kind == ExtentKind::Unallocated {
                            self.map_parent(e.offset, e.len, &mut out)?;
                        } else {
                            push_extent(&mut out, e.offset, e.len, e.kind);
                        }
                    }
                }
            }
            pos += n;
            i += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use std::io::Write;

    const S: usize = SECTOR as usize;

    fn put32(img: &mut [u8], at: usize, v: u32) {
        img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put64(img: &mut [u8], at: usize, v: u64) {
        img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A header: 64-sector capacity, 8-sector grains, 4 entries per grain table.
    fn header(flags: u32, gd_sector: u64, overhead: u64) -> [u8; S] {
        let mut h = [0u8; S];
        h[..4].copy_from_slice(magic::VMDK_SPARSE);
        put32(&mut h, 4, 1);
        put32(&mut h, 8, flags);
        put64(&mut h, 12, 64);
        put64(&mut h, 20, 8);
        put32(&mut h, 44, 4);
        put64(&mut h, 56, gd_sector);
        put64(&mut h, 64, overhead);
        h[73..77].copy_from_slice(b"\n \r\n");
        h
    }

    /// A bare sparse extent: GD at sector 1 → GTs at 2 and 3; grain 0 at sector 8 (0x11s),
    /// grain 5 at sector 16 (0x55s), the rest unallocated.
    fn sparse() -> Vec<u8> {
        let mut img = vec![0u8; 24 * S];
        img[..S].copy_from_slice(&header(1, 1, 8));
        put32(&mut img, S, 2);
        put32(&mut img, S + 4, 3);
        put32(&mut img, 2 * S, 8);
        put32(&mut img, 3 * S + 4, 16);
        img[8 * S..16 * S].fill(0x11);
        img[16 * S..24 * S].fill(0x55);
        img
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn open_bytes(bytes: &[u8]) -> Result<Vmdk, DiskError> {
        let dir = tempfile::tempdir().unwrap();
        Vmdk::open(&write(dir.path(), "x.vmdk", bytes), OpenOptions::default())
    }

    fn read_all(disk: &Vmdk) -> Result<Vec<u8>, DiskError> {
        let mut buf = vec![0u8; disk.size() as usize];
        disk.read_at(&mut buf, 0).map(|_| buf)
    }

    #[test]
    fn bare_sparse_extent_reads_its_grains_and_holes() {
        let disk = open_bytes(&sparse()).unwrap();
        assert_eq!(disk.size(), 64 * SECTOR);
        let data = read_all(&disk).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0x11));
        assert!(data[4096..5 * 4096].iter().all(|&b| b == 0));
        assert!(data[5 * 4096..6 * 4096].iter().all(|&b| b == 0x55));
        let map = disk.extents(0, disk.size()).unwrap();
        let kinds: Vec<_> = map.iter().map(|e| (e.offset, e.kind)).collect();
        assert_eq!(
            kinds,
            [
                (0, ExtentKind::Data),
                (4096, ExtentKind::Unallocated),
                (5 * 4096, ExtentKind::Data),
                (6 * 4096, ExtentKind::Unallocated)
            ]
        );
        assert_eq!(disk.write_at(&[0], 0).unwrap_err().kind(), DiskErrorKind::UnsupportedFeature);
    }

    #[test]
    fn truncated_header_is_invalid() {
        let err = open_bytes(&sparse()[..100]).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::InvalidFormat);
    }

    #[test]
    fn grain_directory_past_the_end_is_corrupt() {
        let mut img = sparse();
        put64(&mut img, 56, 1000);
        let err = open_bytes(&img).unwrap_err();
        assert_eq!((err.kind(), err.offset()), (DiskErrorKind::CorruptImage, Some(56)));
    }

    #[test]
    fn absurd_capacity_is_refused_before_allocating() {
        for capacity in [u64::MAX, 1 << 50] {
            let mut img = sparse();
            put64(&mut img, 12, capacity);
            let err = open_bytes(&img).unwrap_err();
            assert_eq!(err.kind(), DiskErrorKind::CorruptImage, "capacity {capacity}");
        }
    }

    #[test]
    fn grain_table_past_the_end_is_corrupt_at_its_directory_entry() {
        let mut img = sparse();
        put32(&mut img, S + 4, 0x00ff_ffff);
        let disk = open_bytes(&img).unwrap();
        let err = read_all(&disk).unwrap_err();
        assert_eq!((err.kind(), err.offset()), (DiskErrorKind::CorruptImage, Some(S as u64 + 4)));
        assert!(disk.extents(0, disk.size()).is_err());
    }

    #[test]
    fn grain_table_on_top_of_the_directory_is_corrupt() {
        let mut img = sparse();
        put32(&mut img, S, 1);
        let err = read_all(&open_bytes(&img).unwrap()).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn grain_pointing_into_metadata_or_past_the_end_is_corrupt() {
        for sector in [0u32, 2, 3, 23, 0x7fff_ffff] {
            let mut img = sparse();
            put32(&mut img, 2 * S, sector);
            let disk = open_bytes(&img).unwrap();
            let mut buf = [0u8; 16];
            let err = disk.read_at(&mut buf, 0);
            if sector == 0 {
                assert!(err.is_ok(), "sector 0 means unallocated");
            } else {
                assert_eq!(err.unwrap_err().kind(), DiskErrorKind::CorruptImage, "{sector}");
            }
        }
    }

    #[test]
    fn huge_grain_size_is_unsupported() {
        let mut img = sparse();
        put64(&mut img, 20, 1 << 30);
        assert_eq!(open_bytes(&img).unwrap_err().kind(), DiskErrorKind::UnsupportedFeature);
    }

    /// A one-pass streamOptimized extent: header says "GD at end", grain 0 deflated at
    /// sector 1, GTs at 3 and 4, GD at 6, footer at 8, end-of-stream marker at 9.
    fn stream(grain_size_claim: Option<u32>) -> Vec<u8> {
        let flags = 1 | FLAG_COMPRESSED | FLAG_MARKERS;
        let mut h = header(flags, GD_AT_END, 1);
        h[77..79].copy_from_slice(&COMPRESS_DEFLATE.to_le_bytes());
        let mut img = vec![0u8; 10 * S];
        img[..S].copy_from_slice(&h);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&[0x77u8; 4096]).unwrap();
        let packed = z.finish().unwrap();
        put64(&mut img, S, 0);
        put32(&mut img, S + 8, grain_size_claim.unwrap_or(packed.len() as u32));
        img[S + 12..S + 12 + packed.len()].copy_from_slice(&packed);
        put32(&mut img, 3 * S, 1);
        put32(&mut img, 6 * S, 3);
        put32(&mut img, 6 * S + 4, 4);
        h[56..64].copy_from_slice(&6u64.to_le_bytes());
        img[8 * S..9 * S].copy_from_slice(&h);
        img
    }

    #[test]
    fn stream_optimized_with_footer_directory_inflates_grains() {
        let disk = open_bytes(&stream(None)).unwrap();
        let data = read_all(&disk).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0x77));
        assert!(data[4096..].iter().all(|&b| b == 0));
        let mut mid = [0u8; 10];
        disk.read_at(&mut mid, 4090).unwrap();
        assert_eq!(mid, [0x77, 0x77, 0x77, 0x77, 0x77, 0x77, 0, 0, 0, 0]);
    }

    #[test]
    fn compressed_grain_claiming_a_huge_size_is_corrupt() {
        let disk = open_bytes(&stream(Some(u32::MAX))).unwrap();
        let err = read_all(&disk).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn compressed_garbage_is_corrupt_not_a_panic() {
        let mut img = stream(None);
        img[S + 12..S + 40].fill(0xa5);
        let err = read_all(&open_bytes(&img).unwrap()).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn missing_footer_is_corrupt() {
        let mut img = stream(None);
        img[8 * S..9 * S].fill(0);
        assert_eq!(open_bytes(&img).unwrap_err().kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn descriptor_extents_concatenate_flat_zero_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a b-flat.vmdk", &[0xabu8; 2048]);
        write(dir.path(), "s.vmdk", &sparse());
        let text = "# Disk DescriptorFile\r\nversion=1\r\nCID=00000001\r\nparentCID=ffffffff\r\n\
            createType=\"custom\"\r\nRW 2 FLAT \"a b-flat.vmdk\" 1\r\nRW 4 ZERO\r\n\
            RDONLY 16 SPARSE \"s.vmdk\"\r\n";
        let path = write(dir.path(), "d.vmdk", text.as_bytes());
        let disk = Vmdk::open(&path, OpenOptions::default()).unwrap();
        assert_eq!(disk.size(), 22 * SECTOR);
        let data = read_all(&disk).unwrap();
        assert!(data[..1024].iter().all(|&b| b == 0xab));
        assert!(data[1024..3072].iter().all(|&b| b == 0));
        assert!(data[3072..3072 + 4096].iter().all(|&b| b == 0x11));
        assert!(data[3072 + 4096..].iter().all(|&b| b == 0));
        let map = disk.extents(0, disk.size()).unwrap();
        assert_eq!(map[1], Extent { offset: 1024, len: 2048, kind: ExtentKind::Zero });
        let info = disk.info().unwrap();
        assert_eq!(info.subformat.as_deref(), Some("custom"));
    }

    #[test]
    fn flat_extent_longer_than_its_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "f.vmdk", &[0u8; 1024]);
        let path = write(dir.path(), "d.vmdk", b"# Disk DescriptorFile\nRW 4 FLAT \"f.vmdk\" 0\n");
        let err = Vmdk::open(&path, OpenOptions::default()).unwrap_err();
        assert_eq!((err.kind(), err.offset()), (DiskErrorKind::CorruptImage, Some(22)));
    }

    #[test]
    fn sparse_extent_smaller_than_its_descriptor_line_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.vmdk", &sparse());
        let path = write(dir.path(), "d.vmdk", b"RW 65 SPARSE \"s.vmdk\"\n");
        let err = Vmdk::open(&path, OpenOptions::default()).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn parent_loop_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let desc = |parent: &str| {
            format!("# Disk DescriptorFile\nCID=1\nparentCID=1\nparentFileNameHint=\"{parent}\"\nRW 8 ZERO\n")
        };
        let a = write(dir.path(), "a.vmdk", desc("b.vmdk").as_bytes());
        write(dir.path(), "b.vmdk", desc("a.vmdk").as_bytes());
        let err = Vmdk::open(&a, OpenOptions::default()).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        let self_loop = write(dir.path(), "c.vmdk", desc("c.vmdk").as_bytes());
        assert!(Vmdk::open(&self_loop, OpenOptions::default()).is_err());
    }

    #[test]
    fn unallocated_grains_read_the_parent_and_cid_mismatch_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base-flat.vmdk", &[0x42u8; 64 * S]);
        write(
            dir.path(),
            "base.vmdk",
            b"# Disk DescriptorFile\nCID=0000000a\nRW 64 FLAT \"base-flat.vmdk\" 0\n",
        );
        write(dir.path(), "s.vmdk", &sparse());
        let text =
            "# Disk DescriptorFile\nCID=2\nparentCID=0000000b\nparentFileNameHint=\"base.vmdk\"\n\
            RW 64 SPARSE \"s.vmdk\"\n";
        let child = write(dir.path(), "child.vmdk", text.as_bytes());
        let disk = Vmdk::open(&child, OpenOptions::default()).unwrap();
        let data = read_all(&disk).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0x11));
        assert!(data[4096..5 * 4096].iter().all(|&b| b == 0x42));
        let map = disk.extents(0, disk.size()).unwrap();
        assert!(map.iter().all(|e| e.kind == ExtentKind::Data), "{map:?}");
        let info = disk.info().unwrap();
        assert_eq!(info.backing, Some(dir.path().join("base.vmdk")));
        assert_eq!(info.problems.len(), 1, "{:?}", info.problems);
    }

    #[test]
    fn writable_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "x.vmdk", &sparse());
        let err = Vmdk::open(&path, OpenOptions { writable: true }).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::UnsupportedFeature);
    }
}
