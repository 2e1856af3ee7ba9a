//! qcow2 images (Hutch's native format), read-write: header and extensions, L1/L2 mapping,
//! compressed (deflate, zstd) and zero clusters, backing chains, refcounted allocation,
//! resize, consistency check and extent maps.
//!
//! ```text
//!   guest offset ──▶ L1[i] ──▶ L2 table (cached) ──▶ host cluster | zero | compressed
//!                                               └──▶ unallocated ──▶ backing image / zeroes
//! ```
//! Reads look up their mapping under the metadata lock and do the data I/O outside it, so
//! several threads can read at once. Writes hold the lock. Metadata write ordering (see
//! `meta`) keeps the image consistent (at worst leaked clusters) if the process dies; `flush`
//! writes back the L2 cache and fsyncs.
//!
//! Dirty images (lazy refcounts pending) open read-only only: Hutch does not rebuild
//! refcounts, so a writable open is refused with `UnsupportedFeature` (repair with
//! `qemu-img check -r all`). Images marked corrupt open read-only only. Images with internal
//! snapshots open read-only only (writes would need copy-on-write of shared clusters).

mod check;
mod header;
mod meta;
mod pull;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use check::CheckReport;
use header::{field, Compression, Header};
use meta::{Meta, Refcounts};
pub use pull::{pull_backing_layer, qcow2_backing, PullReport};

use crate::bytes::{be64_table, Fields};
use crate::{
    chain, check_range, open_image, sys, BlockBackend, DiskError, DiskErrorKind, Extent,
    ExtentKind, ImageFormat, ImageInfo, OpenOptions, RawFile,
};

pub(crate) const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// What is wrong with a qcow2 image (carried as the source of a [`DiskError`]).
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("File too short for a qcow2 header")]
    Truncated,
    #[error("No qcow2 magic")]
    BadMagic,
    #[error("Unsupported qcow2 version {0}")]
    Version(u32),
    #[error("Cluster bits {0} outside 9..=21")]
    ClusterBits(u32),
    #[error("Encrypted images are not supported")]
    Encrypted,
    #[error("Invalid header length {0}")]
    HeaderLength(u64),
    #[error("Invalid refcount order {0}")]
    RefcountOrder(u32),
    #[error("Unknown compression type {0}")]
    CompressionType(u8),
    #[error("Incompatible feature bit {bit} ({name})")]
    IncompatibleFeature { bit: u32, name: String },
    #[error("Absurd virtual size {0}")]
    VirtualSize(u64),
    #[error("L1 table has {entries} entries, the virtual size needs {needed}")]
    L1TooSmall { entries: u32, needed: u64 },
    #[error("L1 table of {0} bytes is too large")]
    L1TooLarge(u64),
    #[error("The {0} lies outside the file or is misaligned")]
    TableOutsideFile(&'static str),
    #[error("Refcount table of {0} bytes is too large")]
    RefcountTableTooLarge(u64),
    #[error("Header extension {0:#x} overruns the header cluster")]
    Extension(u32),
    #[error("Invalid backing file name")]
    BackingName,
    #[error("L2 table outside the file or misaligned")]
    L2OutsideFile,
    #[error("L2 entry points outside the file or is misaligned")]
    DataOutsideFile,
    #[error("Refcount block outside the file")]
    RefcountBlockOutsideFile,
    #[error("Refcount block missing for an allocated cluster")]
    RefcountBlockMissing,
    #[error("Refcount of a referenced cluster is already 0")]
    RefcountUnderflow,
    #[error("Image is open read-only")]
    ReadOnly,
    #[error("Image grew past the refcount table limit")]
    ImageTooLarge,
    #[error("Compressed cluster does not decompress to a full cluster")]
    Decompress,
    #[error("Image is dirty (lazy refcounts); repair it with qemu-img check -r all to write")]
    Dirty,
    #[error("Image is marked corrupt")]
    MarkedCorrupt,
    #[error("Images with internal snapshots open read-only")]
    Snapshots,
    #[error("Cannot shrink: the tail of the disk holds data")]
    ShrinkAllocated,
    #[error("Cluster size {0} is not a power of two in 512..=2M")]
    ClusterSize(u32),
    #[error("Image has no backing file")]
    NoBacking,
    #[error("Backing image {0} is not qcow2")]
    BackingNotQcow2(PathBuf),
    #[error("New backing file name does not fit the header cluster")]
    BackingNameTooLong,
}

/// A [`DiskError`] of `kind` with a qcow2 reason.
pub(crate) fn fail(kind: DiskErrorKind, op: &'static str, e: Qcow2Error) -> DiskError {
    DiskError { source: Some(io::Error::other(e)), ..DiskError::new(kind, op) }
}

/// Host file I/O for one image, with errors naming it.
pub(crate) struct Io<'a> {
    file: &'a File,
    path: &'a Path,
}

impl Io<'_> {
    /// Reads exactly `buf.len()` bytes (metadata: a short file is an error).
    fn read_exact(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
                DiskErrorKind::CorruptImage
            } else {
                DiskErrorKind::Io
            };
            DiskError { kind, ..DiskError::io("read", e) }.with_path(self.path).with_offset(offset)
        })
    }

    /// Reads data; bytes past the end of the file read as zeroes.
    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(DiskError::io("read", e)
                        .with_path(self.path)
                        .with_offset(offset + done as u64))
                }
            }
        }
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| DiskError::io("write", e).with_path(self.path).with_offset(offset))
    }

    /// Gives a freed cluster's space back to the host; only a hint.
    fn punch(&self, offset: u64, len: u64) {
        let _ = sys::punch_hole(self.file, offset, len);
    }
}

/// How one stretch of guest data is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Host(u64),
    Zero,
    Backing,
    /// A compressed cluster: its L2 entry.
    Compressed(u64),
}

/// What an L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Unallocated,
    /// Reads as zeroes; maybe with a preallocated host cluster.
    Zero(Option<u64>),
    Data {
        host: u64,
        copied: bool,
    },
    Compressed {
        offset: u64,
        end: u64,
    },
}

struct Backing {
    path: PathBuf,
    format: Option<String>,
    disk: Box<dyn BlockBackend>,
}

/// A qcow2 image file.
pub struct Qcow2 {
    file: File,
    path: PathBuf,
    writable: bool,
    header: Header,
    size: AtomicU64,
    backing: Option<Backing>,
    meta: Mutex<Meta>,
    /// The last decompressed cluster (keyed by its L2 entry): small sequential reads of a
    /// compressed image would otherwise decompress each cluster many times.
    last_decompressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.path)
            .field("size", &self.size())
            .field("writable", &self.writable)
            .finish()
    }
}

/// Whether the file at `path` starts with the qcow2 magic.
pub fn is_qcow2(path: &Path) -> Result<bool, DiskError> {
    let mut file = File::open(path).map_err(|e| DiskError::io("open", e).with_path(path))?;
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == header::MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(DiskError::io("open", e).with_path(path)),
    }
}

/// Reads and parses the header of the qcow2 image in `file`; also returns the header
/// cluster's bytes and the file's length.
fn read_header(file: &File, path: &Path) -> Result<(Header, Vec<u8>, u64), DiskError> {
    let file_len = file.metadata().map_err(|e| DiskError::io("open", e).with_path(path))?.len();
    let io = Io { file, path };
    // The header and its extensions live in the first cluster (at most 2 MiB).
    let mut first = vec![0u8; file_len.min(1 << header::MAX_CLUSTER_BITS) as usize];
    io.read_exact(&mut first, 0)?;
    if let Ok(bits) =
        Fields::new(&first, "read the qcow2 header").be32(header::field::CLUSTER_BITS as usize)
    {
        let bits = bits.clamp(header::MIN_CLUSTER_BITS, header::MAX_CLUSTER_BITS);
        first.truncate(1 << bits);
    }
    let header = Header::parse(&first, file_len, path)?;
    Ok((header, first, file_len))
}

fn with_path(e: DiskError, path: &Path) -> DiskError {
    if e.path().is_none() {
        e.with_path(path)
    } else {
        e
    }
}

impl Qcow2 {
    /// Opens the qcow2 image at `path` and its backing chain (read-only).
    pub fn open(path: &Path, options: OpenOptions) -> Result<Qcow2, DiskError> {
        let _chain = chain::enter(path)?;
        let writable = options.writable;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| DiskError::io("open", e).with_path(path))?;
        let (header, _, file_len) = read_header(&file, path)?;
        let io = Io { file: &file, path };
        let refuse = |kind, e| Err(fail(kind, "open for writing", e).with_path(path));
        if writable {
            if header.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return refuse(DiskErrorKind::CorruptImage, Qcow2Error::MarkedCorrupt);
            }
            if header.incompatible & header::INCOMPAT_DIRTY != 0 {
                return refuse(DiskErrorKind::UnsupportedFeature, Qcow2Error::Dirty);
            }
            if header.nb_snapshots > 0 {
                return refuse(DiskErrorKind::UnsupportedFeature, Qcow2Error::Snapshots);
            }
        }
        let cs = header.cluster_size();
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        io.read_exact(&mut raw, header.l1_table_offset)?;
        let l1 = be64_table(&raw).collect();
        let mut meta = Meta::new(header.cluster_bits, l1, header.l1_table_offset, file_len);
        if writable {
            let clusters = u64::from(header.refcount_table_clusters);
            let mut raw = vec![0u8; (clusters * cs) as usize];
            io.read_exact(&mut raw, header.refcount_table_offset)?;
            meta.rc = Some(Refcounts::new(
                be64_table(&raw).collect(),
                header.refcount_table_offset,
                clusters,
                header.refcount_order,
                file_len.div_ceil(cs) * cs,
            ));
            if header.autoclear != 0 {
                // We keep no autoclear feature (bitmaps) up to date: clear them all first.
                io.write(&[0u8; 8], field::AUTOCLEAR)?;
            }
        }
        let backing = match &header.backing_file {
            Some(name) => {
                let bpath = resolve_backing(path, name);
                let disk = open_backing(&bpath, header.backing_format.as_deref())
                    .map_err(|e| with_path(e, &bpath))?;
                Some(Backing { path: bpath, format: header.backing_format.clone(), disk })
            }
            None => None,
        };
        Ok(Qcow2 {
            size: AtomicU64::new(header.size),
            file,
            path: path.to_path_buf(),
            writable,
            header,
            backing,
            meta: Mutex::new(meta),
            last_decompressed: Mutex::new(None),
        })
    }

    /// Creates a new, empty v3 image of `virtual_size` bytes at `path` (overwriting it),
    /// optionally over `backing` (stored as given: a relative name resolves against the new
    /// image's directory), and opens it for writing.
    pub fn create(
        path: &Path,
        virtual_size: u64,
        backing: Option<(&Path, ImageFormat)>,
        cluster_size: u32,
    ) -> Result<Qcow2, DiskError> {
        let bits = cluster_size.trailing_zeros();
        if !cluster_size.is_power_of_two()
            || !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits)
        {
            return Err(fail(
                DiskErrorKind::InvalidFormat,
                "create",
                Qcow2Error::ClusterSize(cluster_size),
            )
            .with_path(path));
        }
        let cs = u64::from(cluster_size);
        let backing_names = match backing {
            Some((p, format)) => {
                let name = p.to_str().unwrap_or_default().to_string();
                if !header::backing_fits(bits, &name, format.name()) {
                    return Err(fail(
                        DiskErrorKind::InvalidFormat,
                        "create",
                        Qcow2Error::BackingName,
                    )
                    .with_path(path));
                }
                Some((name, format.name()))
            }
            None => None,
        };
        let first = header::build_first_cluster(
            bits,
            cs,
            backing_names.as_ref().map(|(n, f)| (n.as_str(), *f)),
        );
        // Cluster 1: refcount table; cluster 2: its first block, counting clusters 0..=2.
        let mut table = vec![0u8; cs as usize];
        table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
        let mut block = vec![0u8; cs as usize];
        for i in 0..3 {
            block[i * 2 + 1] = 1;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| DiskError::io("create", e).with_path(path))?;
        let io = Io { file: &file, path };
        io.write(&first, 0)?;
        io.write(&table, cs)?;
        io.write(&block, 2 * cs)?;
        drop(file);
        let image = Qcow2::open(path, OpenOptions { writable: true })?;
        image.resize(virtual_size)?;
        Ok(image)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The backing image's path, if any.
    pub fn backing_path(&self) -> Option<&Path> {
        self.backing.as_ref().map(|b| b.path.as_path())
    }

    /// The backing image's format name from the header, if stored.
    pub fn backing_format(&self) -> Option<&str> {
        self.backing.as_ref().and_then(|b| b.format.as_deref())
    }

    /// What `hutch disk info` shows. `problems` holds the header's dirty/corrupt flags;
    /// [`Qcow2::check`] finds the rest.
    pub fn info(&self) -> ImageInfo {
        // Blocks, not length: a preallocated image's clusters may be holes in its file.
        let allocated_bytes = crate::mapped::allocated_bytes(&self.path).unwrap_or(0);
        let mut problems = Vec::new();
        if self.header.incompatible & header::INCOMPAT_DIRTY != 0 {
            problems.push("dirty: refcounts may be stale (lazy refcounts)".to_string());
        }
        if self.header.incompatible & header::INCOMPAT_CORRUPT != 0 {
            problems.push("marked corrupt".to_string());
        }
        ImageInfo {
            path: self.path.clone(),
            format: ImageFormat::Qcow2,
            subformat: Some(format!("v{}", self.header.version)),
            virtual_size: self.size(),
            allocated_bytes,
            backing: self.backing_path().map(Path::to_path_buf),
            problems,
        }
    }

    fn io(&self) -> Io<'_> {
        Io { file: &self.file, path: &self.path }
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock leaves metadata as consistent as a crash would.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    fn decode(&self, entry: u64, file_len: u64) -> Result<Mapping, DiskError> {
        decode_entry(entry, self.header.cluster_bits, self.header.version, file_len).map_err(
            |offset| {
                fail(DiskErrorKind::CorruptImage, "read", Qcow2Error::DataOutsideFile)
                    .with_path(&self.path)
                    .with_offset(offset)
            },
        )
    }

    /// Maps `len` bytes at guest `offset` to read segments, merging neighbours.
    fn plan_read(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(Seg, u64, u64)>, DiskError> {
        let io = self.io();
        let cs = self.cs();
        let mut segs: Vec<(Seg, u64, u64)> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let gc = pos / cs;
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let entry = meta.l2_entry(&io, gc).map_err(|e| with_path(e, &self.path))?;
            let seg = match self.decode(entry, meta.file_len)? {
                Mapping::Unallocated if self.backing.is_some() => Seg::Backing,
                Mapping::Unallocated | Mapping::Zero(_) => Seg::Zero,
                Mapping::Data { host, .. } => Seg::Host(host + within),
                Mapping::Compressed { .. } => Seg::Compressed(entry),
            };
            match (segs.last_mut(), seg) {
                (Some((Seg::Host(h), _, l)), Seg::Host(h2)) if *h + *l == h2 => *l += n,
                (Some((Seg::Zero, _, l)), Seg::Zero)
                | (Some((Seg::Backing, _, l)), Seg::Backing) => *l += n,
                _ => segs.push((seg, pos, n)),
            }
            pos += n;
        }
        Ok(segs)
    }

    /// Reads from the backing image; past its end (or without one) reads zeroes.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.disk.size();
        let avail = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.disk.read_at(&mut buf[..avail], offset)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// The decompressed cluster of compressed L2 entry `entry`.
    fn decompress(&self, entry: u64, file_len: u64) -> Result<Arc<Vec<u8>>, DiskError> {
        if let Some((e, data)) = &*self.last_decompressed.lock().unwrap_or_else(|p| p.into_inner())
        {
            if *e == entry {
                return Ok(data.clone());
            }
        }
        let Mapping::Compressed { offset, end } = self.decode(entry, file_len)? else {
            return Err(fail(DiskErrorKind::CorruptImage, "read", Qcow2Error::Decompress)
                .with_path(&self.path));
        };
        let mut input = vec![0u8; end.saturating_sub(offset) as usize];
        self.io().read_data(&mut input, offset)?;
        let mut out = vec![0u8; self.cs() as usize];
        let ok = match self.header.compression {
            Compression::Deflate => {
                let mut d = flate2::Decompress::new(false);
                d.decompress(&input, &mut out, flate2::FlushDecompress::Finish).is_ok()
                    && d.total_out() == out.len() as u64
            }
            Compression::Zstd => match ruzstd::decoding::StreamingDecoder::new(&input[..]) {
                Ok(mut dec) => dec.read_exact(&mut out).is_ok(),
                Err(_) => false,
            },
        };
        if !ok {
            return Err(fail(DiskErrorKind::CorruptImage, "read", Qcow2Error::Decompress)
                .with_path(&self.path)
                .with_offset(offset));
        }
        let out = Arc::new(out);
        *self.last_decompressed.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((entry, out.clone()));
        Ok(out)
    }

    fn check_writable(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DiskError> {
        if !self.writable {
            let e = io::Error::from(io::ErrorKind::PermissionDenied);
            return Err(DiskError::io(op, e).with_path(&self.path).with_offset(offset));
        }
        check_range(self.size(), offset, len, op).map_err(|e| e.with_path(&self.path))
    }

    /// Writes `buf` at guest `offset` with the metadata lock held.
    fn write_locked(&self, meta: &mut Meta, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let io = self.io();
        let cs = self.cs();
        let per = cs / 8;
        /// One guest cluster's part of the write.
        struct Part {
            gc: u64,
            lo: u64,
            hi: u64,
            buf_at: usize,
            /// Existing host cluster written in place, or None for a new one.
            host: Option<u64>,
            old: u64,
        }
        let mut parts = Vec::new();
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let gc = pos / cs;
            let lo = pos % cs;
            let hi = (lo + (end - pos)).min(cs);
            // Allocate missing L2 tables now, so new data clusters come out contiguous.
            meta.l2_for_write(&io, gc / per)?;
            let entry = meta.l2_entry(&io, gc)?;
            let host = match self.decode(entry, meta.file_len)? {
                Mapping::Data { host, copied: true } => Some(host),
                _ => None,
            };
            parts.push(Part { gc, lo, hi, buf_at: (pos - offset) as usize, host, old: entry });
            pos += hi - lo;
        }
        let new = parts.iter().filter(|p| p.host.is_none()).count() as u64;
        let mut next = if new > 0 { meta.alloc(&io, new)? } else { 0 };
        // Data first: coalesce runs contiguous in both the buffer and the file.
        let mut run: Option<(u64, usize, usize)> = None;
        let flush_run = |run: &mut Option<(u64, usize, usize)>| -> Result<(), DiskError> {
            if let Some((host, a, b)) = run.take() {
                io.write(&buf[a..b], host)?;
            }
            Ok(())
        };
        let mut assigned = Vec::with_capacity(parts.len());
        for p in &parts {
            let len = (p.hi - p.lo) as usize;
            let data = &buf[p.buf_at..p.buf_at + len];
            let (host, fresh) = match p.host {
                Some(h) => (h, false),
                None => {
                    let h = next;
                    next += cs;
                    (h, true)
                }
            };
            assigned.push((host, fresh));
            if fresh && len as u64 != cs {
                // A partial new cluster: fill the rest from what the guest saw before.
                flush_run(&mut run)?;
                let mut cluster = vec![0u8; cs as usize];
                self.read_old_cluster(meta, p.gc, p.old, &mut cluster)?;
                cluster[p.lo as usize..p.hi as usize].copy_from_slice(data);
                io.write(&cluster, host)?;
                continue;
            }
            let at = host + p.lo;
            match &mut run {
                Some((h, a, b)) if *h + (*b - *a) as u64 == at && *b == p.buf_at => *b += len,
                _ => {
                    flush_run(&mut run)?;
                    run = Some((at, p.buf_at, p.buf_at + len));
                }
            }
        }
        flush_run(&mut run)?;
        // Then the L2 entries; old references are dropped only once those are on disk.
        let mut to_free = Vec::new();
        let mut tables = Vec::new();
        for (p, &(host, fresh)) in parts.iter().zip(&assigned) {
            if !fresh {
                continue;
            }
            let table = meta.set_l2_entry(&io, p.gc, host | COPIED)?;
            if self.holds_clusters(p.old, meta.file_len) {
                to_free.push(p.old);
                tables.push(table);
            }
        }
        self.free_after(meta, &tables, &to_free)
    }

    /// Whether L2 entry `entry` references host clusters.
    fn holds_clusters(&self, entry: u64, file_len: u64) -> bool {
        matches!(
            self.decode(entry, file_len),
            Ok(Mapping::Data { .. } | Mapping::Zero(Some(_)) | Mapping::Compressed { .. })
        )
    }

    /// Writes the L2 `tables` that dropped references, then drops the references of the old
    /// entries `old`.
    fn free_after(&self, meta: &mut Meta, tables: &[u64], old: &[u64]) -> Result<(), DiskError> {
        if old.is_empty() {
            return Ok(());
        }
        let io = self.io();
        let mut tables = tables.to_vec();
        tables.sort_unstable();
        tables.dedup();
        for t in tables {
            meta.write_l2(&io, t)?;
        }
        let cs = self.cs();
        for &entry in old {
            match self.decode(entry, meta.file_len)? {
                Mapping::Data { host, .. } | Mapping::Zero(Some(host)) => {
                    meta.decref(&io, host, true)?
                }
                Mapping::Compressed { offset, end } => {
                    let mut c = offset & !(cs - 1);
                    while c < end.max(offset + 1) {
                        meta.decref(&io, c, false)?;
                        c += cs;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The current contents of guest cluster `gc` (whose L2 entry is `entry`).
    fn read_old_cluster(
        &self,
        meta: &Meta,
        gc: u64,
        entry: u64,
        out: &mut [u8],
    ) -> Result<(), DiskError> {
        match self.decode(entry, meta.file_len)? {
            Mapping::Unallocated => self.read_backing(out, gc * self.cs()),
            Mapping::Zero(_) => {
                out.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => self.io().read_data(out, host),
            Mapping::Compressed { .. } => {
                out.copy_from_slice(&self.decompress(entry, meta.file_len)?);
                Ok(())
            }
        }
    }

    /// Replaces the L2 entries of the whole clusters in `[offset, offset + len)` with
    /// `value`, dropping their references. Partial clusters at the edges are left to the
    /// caller. With `skip_unmapped`, clusters without an L2 table are left alone.
    fn replace_entries(
        &self,
        meta: &mut Meta,
        first: u64,
        last: u64,
        value: u64,
        skip_unmapped: bool,
    ) -> Result<(), DiskError> {
        let io = self.io();
        let per = self.cs() / 8;
        let mut tables = Vec::new();
        let mut old = Vec::new();
        let mut gc = first;
        while gc < last {
            let index = gc / per;
            let table_end = ((index + 1) * per).min(last);
            if skip_unmapped && meta.l2_offset(index)?.is_none() {
                gc = table_end;
                continue;
            }
            while gc < table_end {
                let entry = meta.l2_entry(&io, gc)?;
                if entry != value {
                    let table = meta.set_l2_entry(&io, gc, value)?;
                    if self.holds_clusters(entry, meta.file_len) {
                        old.push(entry);
                        tables.push(table);
                    }
                }
                gc += 1;
            }
            // Keep the list of pending frees bounded on huge ranges.
            if old.len() > 4096 {
                self.free_after(meta, &tables, &old)?;
                tables.clear();
                old.clear();
            }
        }
        self.free_after(meta, &tables, &old)
    }

    /// Resizes the disk. Growing may move the L1 table; shrinking is refused unless the
    /// dropped tail holds no clusters.
    pub fn resize(&self, new_size: u64) -> Result<(), DiskError> {
        if !self.writable {
            let e = io::Error::from(io::ErrorKind::PermissionDenied);
            return Err(DiskError::io("resize", e).with_path(&self.path));
        }
        if new_size > header::MAX_VIRTUAL_SIZE {
            return Err(fail(
                DiskErrorKind::OutOfBounds,
                "resize",
                Qcow2Error::VirtualSize(new_size),
            )
            .with_path(&self.path));
        }
        let mut meta = self.lock();
        let io = self.io();
        let cs = self.cs();
        let old_size = self.size();
        if new_size < old_size {
            let first = new_size.div_ceil(cs);
            let last = old_size.div_ceil(cs);
            for gc in first..last {
                if meta.l2_entry(&io, gc)? != 0 {
                    return Err(fail(
                        DiskErrorKind::UnsupportedFeature,
                        "resize",
                        Qcow2Error::ShrinkAllocated,
                    )
                    .with_path(&self.path)
                    .with_offset(gc * cs));
                }
            }
            io.write(&new_size.to_be_bytes(), field::SIZE)?;
            self.size.store(new_size, Ordering::Release);
            return Ok(());
        }
        let needed = header::l1_entries_for(new_size, self.header.cluster_bits);
        if needed * 8 > header::MAX_L1_BYTES {
            return Err(fail(
                DiskErrorKind::UnsupportedFeature,
                "resize",
                Qcow2Error::L1TooLarge(needed * 8),
            )
            .with_path(&self.path));
        }
        let old_entries = meta.l1.len() as u64;
        let capacity = (old_entries * 8).div_ceil(cs) * cs / 8;
        if needed <= old_entries {
            io.write(&new_size.to_be_bytes(), field::SIZE)?;
        } else if needed <= capacity && meta.l1_offset != 0 {
            // The new entries fit the L1 table's last cluster: zero them, then publish.
            io.write(
                &vec![0u8; ((needed - old_entries) * 8) as usize],
                meta.l1_offset + old_entries * 8,
            )?;
            meta.l1.resize(needed as usize, 0);
            let mut hdr = [0u8; 16];
            hdr[..8].copy_from_slice(&new_size.to_be_bytes());
            hdr[12..].copy_from_slice(&(needed as u32).to_be_bytes());
            io.write(&hdr, field::SIZE)?;
        } else {
            let clusters = (needed * 8).div_ceil(cs);
            let new_offset = meta.alloc(&io, clusters)?;
            let mut l1 = meta.l1.clone();
            l1.resize((clusters * cs / 8) as usize, 0);
            let raw: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            io.write(&raw, new_offset)?;
            // Size, crypt method (0), L1 size and offset in one write.
            let at = |f: u64| (f - field::SIZE) as usize;
            let mut hdr = [0u8; 24];
            hdr[..8].copy_from_slice(&new_size.to_be_bytes());
            hdr[at(field::L1_SIZE)..at(field::L1_OFFSET)]
                .copy_from_slice(&(needed as u32).to_be_bytes());
            hdr[at(field::L1_OFFSET)..].copy_from_slice(&new_offset.to_be_bytes());
            io.write(&hdr, field::SIZE)?;
            let old_offset = meta.l1_offset;
            let old_clusters = (old_entries * 8).div_ceil(cs);
            l1.truncate(needed as usize);
            meta.l1 = l1;
            meta.l1_offset = new_offset;
            if old_offset != 0 {
                for i in 0..old_clusters {
                    meta.decref(&io, old_offset + i * cs, true)?;
                }
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Rebuilds the refcounts from the tables and compares them with the stored ones.
    pub fn check(&self) -> Result<CheckReport, DiskError> {
        let mut meta = self.lock();
        if self.writable {
            meta.write_all_l2(&self.io())?;
        }
        check::check(&self.file, &self.path)
    }
}

/// What L2 entry `entry` maps to; Err(host offset) when it points outside the file or at a
/// misaligned cluster.
fn decode_entry(
    entry: u64,
    cluster_bits: u32,
    version: u32,
    file_len: u64,
) -> Result<Mapping, u64> {
    let cs = 1u64 << cluster_bits;
    if entry & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = (entry & !(COPIED | COMPRESSED)) >> x;
        let end = (offset & !511) + (sectors + 1) * 512;
        if offset >= file_len {
            return Err(offset);
        }
        return Ok(Mapping::Compressed { offset, end: end.min(file_len) });
    }
    let host = entry & L2_OFFSET_MASK;
    let zero = version >= 3 && entry & ZERO != 0;
    if host == 0 {
        return Ok(if zero { Mapping::Zero(None) } else { Mapping::Unallocated });
    }
    if !host.is_multiple_of(cs) || host >= file_len {
        return Err(host);
    }
    if zero {
        return Ok(Mapping::Zero(Some(host)));
    }
    Ok(Mapping::Data { host, copied: entry & COPIED != 0 })
}

/// A backing file name, relative to the directory of the image that names it.
fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Opens a backing image read-only: the stated format when there is one, else by content.
fn open_backing(path: &Path, format: Option<&str>) -> Result<Box<dyn BlockBackend>, DiskError> {
    let ro = OpenOptions { writable: false };
    let qcow2 = match format {
        Some("qcow2") => true,
        // A stated raw format is trusted over content that looks like another format.
        Some("raw") => return Ok(Box::new(RawFile::open(path, true)?)),
        Some(_) => false,
        None => is_qcow2(path)?,
    };
    if qcow2 {
        Ok(Box::new(Qcow2::open(path, ro)?))
    } else {
        open_image(path, ro)
    }
}

impl BlockBackend for Qcow2 {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(self.size(), offset, buf.len() as u64, "read")
            .map_err(|e| e.with_path(&self.path))?;
        let (segs, file_len) = {
            let mut meta = self.lock();
            (self.plan_read(&mut meta, offset, buf.len() as u64)?, meta.file_len)
        };
        let io = self.io();
        let cs = self.cs();
        for (seg, at, len) in segs {
            let dst = &mut buf[(at - offset) as usize..(at - offset + len) as usize];
            match seg {
                Seg::Host(h) => io.read_data(dst, h)?,
                Seg::Zero => dst.fill(0),
                Seg::Backing => self.read_backing(dst, at)?,
                Seg::Compressed(entry) => {
                    let cluster = self.decompress(entry, file_len)?;
                    let within = (at % cs) as usize;
                    dst.copy_from_slice(&cluster[within..within + dst.len()]);
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_writable("write", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut meta = self.lock();
        self.write_locked(&mut meta, buf, offset).map_err(|e| with_path(e, &self.path))
    }

    fn flush(&self) -> Result<(), DiskError> {
        if !self.writable {
            return Ok(());
        }
        let mut meta = self.lock();
        meta.write_all_l2(&self.io()).map_err(|e| with_path(e, &self.path))?;
        self.file.sync_all().map_err(|e| DiskError::io("flush", e).with_path(&self.path))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable("discard", offset, len)?;
        let cs = self.cs();
        let first = offset.div_ceil(cs);
        let last = (offset + len) / cs;
        // A discard ending at the disk's end covers its partial last cluster too.
        let last = if offset + len == self.size() { (offset + len).div_ceil(cs) } else { last };
        if first >= last {
            return Ok(());
        }
        let mut meta = self.lock();
        self.replace_entries(&mut meta, first, last, 0, true).map_err(|e| with_path(e, &self.path))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable("write zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.cs();
        let end = offset + len;
        let first = offset.div_ceil(cs);
        // Zeroing up to the disk's end covers its partial last cluster too.
        let last = if end == self.size() { end.div_ceil(cs) } else { end / cs };
        let mut meta = self.lock();
        let mut zero_bytes = |a: u64, b: u64| -> Result<(), DiskError> {
            if a < b {
                let zeroes = vec![0u8; (b - a) as usize];
                self.write_locked(&mut meta, &zeroes, a).map_err(|e| with_path(e, &self.path))?;
            }
            Ok(())
        };
        if first >= last {
            return zero_bytes(offset, end);
        }
        zero_bytes(offset, first * cs)?;
        zero_bytes(last * cs, end)?;
        let res = if self.header.version >= 3 {
            // Without a backing file, unmapped clusters already read as zeroes.
            self.replace_entries(&mut meta, first, last, ZERO, self.backing.is_none())
        } else if self.backing.is_none() {
            self.replace_entries(&mut meta, first, last, 0, true)
        } else {
            // v2 over a backing file has no zero flag: write real zeroes.
            let chunk = vec![0u8; (cs * 16).min((last - first) * cs) as usize];
            let mut pos = first * cs;
            let stop = (last * cs).min(self.size());
            while pos < stop {
                let n = (stop - pos).min(chunk.len() as u64) as usize;
                self.write_locked(&mut meta, &chunk[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        };
        res.map_err(|e| with_path(e, &self.path))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        check_range(self.size(), offset, len, "map").map_err(|e| e.with_path(&self.path))?;
        let io = self.io();
        let cs = self.cs();
        let mut raw: Vec<Extent> = Vec::new();
        {
            let mut meta = self.lock();
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let n = (cs - pos % cs).min(end - pos);
                let entry = meta.l2_entry(&io, pos / cs).map_err(|e| with_path(e, &self.path))?;
                let kind = match self.decode(entry, meta.file_len)? {
                    Mapping::Unallocated => ExtentKind::Unallocated,
                    Mapping::Zero(_) => ExtentKind::Zero,
                    Mapping::Data { .. } | Mapping::Compressed { .. } => ExtentKind::Data,
                };
                push_extent(&mut raw, Extent { offset: pos, len: n, kind });
                pos += n;
            }
        }
        let Some(b) = &self.backing else {
            return Ok(raw);
        };
        // Unallocated here means "whatever the backing chain says".
        let bsize = b.disk.size();
        let mut out = Vec::new();
        for e in raw {
            if e.kind != ExtentKind::Unallocated || e.offset >= bsize {
                push_extent(&mut out, e);
                continue;
            }
            let inside = (bsize - e.offset).min(e.len);
            for be in b.disk.extents(e.offset, inside)? {
                push_extent(&mut out, be);
            }
            if inside < e.len {
                push_extent(
                    &mut out,
                    Extent { offset: e.offset + inside, len: e.len - inside, kind: e.kind },
                );
            }
        }
        Ok(out)
    }
}

fn push_extent(list: &mut Vec<Extent>, e: Extent) {
    match list.last_mut() {
        Some(last) if last.kind == e.kind && last.offset + last.len == e.offset => {
            last.len += e.len
        }
        _ => list.push(e),
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.writable {
            // Keep what was written even without a final flush (no fsync: that is flush's).
            let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            let io = Io { file: &self.file, path: &self.path };
            if let Err(e) = meta.write_all_l2(&io) {
                log::error!("qcow2: {e}");
            }
        }
    }
}
