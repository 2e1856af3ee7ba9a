//! The decompressed-kernel cache: a bzImage's compressed payload (the kernel's own ELF vmlinux)
//! decompressed once on the host and kept, so later boots enter the ELF through its PVH note
//! and the guest skips decompressing itself (seconds per boot under nested virtualization).
//!
//! ```text
//!  bzImage ──sha256──▶ DIR/<key>.vmlinux exists? ──yes──▶ hit: open it (mtime = last use)
//!                                     │no
//!                                     ▼
//!  payload (0x248/0x24c) ─▶ gzip/xz/zstd decoder ─▶ DIR/.<key>.<pid>.tmp ─check ELF+PVH,
//!                                         fsync, rename─▶ DIR/<key>.vmlinux; evict LRU
//! ```
//!
//! The key is the SHA-256 of the whole bzImage file (and a format version): content-addressed,
//! so a kernel replaced in place, copied or touched can never be confused with another, at the
//! price of hashing a few MiB per boot (far cheaper than decompressing them). Every error here
//! is a [`KernelCacheError`] for the caller to log before it boots the bzImage itself.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// Largest decompressed kernel accepted (a real vmlinux is tens of MiB).
pub const MAX_DECOMPRESSED_SIZE: u64 = 512 << 20;
/// Most kernels kept; the least recently used beyond that are deleted.
pub const MAX_ENTRIES: usize = 3;
/// Bumped when what is stored for a given bzImage changes, so old entries are never used.
const FORMAT_VERSION: &[u8] = b"hutch-kernel-cache-v1\0";
const ENTRY_SUFFIX: &str = ".vmlinux";
const TEMP_SUFFIX: &str = ".tmp";
/// A temporary file older than this was left by a crashed writer.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// Setup header fields (offsets in the bzImage file, Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
/// payload_offset/payload_length exist since boot protocol 2.08.
const MIN_PAYLOAD_VERSION: u16 = 0x0208;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELF64_EHDR_LEN: usize = 64;
const ELF64_PHDR_LEN: usize = 56;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
/// XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry note, owner "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Most bytes of notes read while looking for the PVH note (a vmlinux has a few hundred).
const MAX_NOTES_LEN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KernelCacheError {
    #[error("Could not {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The bzImage header has no usable payload location: {0}")]
    BadPayload(String),
    #[error("The kernel payload uses {0} compression, which the cache does not decompress")]
    UnsupportedCompression(&'static str),
    #[error("The kernel payload does not decompress")]
    Decompress(#[source] io::Error),
    #[error("The decompressed kernel is larger than {} MiB", MAX_DECOMPRESSED_SIZE >> 20)]
    TooBig,
    #[error("The kernel decompressed to {actual} bytes, but its payload says {declared}")]
    SizeMismatch { declared: u64, actual: u64 },
    #[error("The decompressed kernel is not an x86_64 ELF executable: {0}")]
    NotElf(&'static str),
    #[error("The decompressed kernel has no PVH entry note")]
    NoPvhNote,
}

/// A cached kernel ready to load: the open ELF vmlinux (open, so eviction by another process
/// can't pull it away) and whether it was already there.
#[derive(Debug)]
pub struct CachedKernel {
    pub path: PathBuf,
    pub file: File,
    pub hit: bool,
}

/// The compression of a bzImage payload, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    /// Recognized but not decompressed here (bzip2, lzma, lzo, lz4) or unknown.
    Other(&'static str),
}

impl Compression {
    pub fn detect(magic: &[u8]) -> Compression {
        const MAGICS: &[(&[u8], Compression)] = &[
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Compression::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (b"BZh", Compression::Other("bzip2")),
            (&[0x5d, 0, 0], Compression::Other("lzma")),
            (&[0x89, b'L', b'Z', b'O'], Compression::Other("lzo")),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Other("lz4")),
        ];
        MAGICS
            .iter()
            .find(|(m, _)| magic.starts_with(m))
            .map_or(Compression::Other("unknown"), |&(_, c)| c)
    }
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> KernelCacheError + 'a {
    move |source| KernelCacheError::Io { what, path: path.to_path_buf(), source }
}

/// Where the compressed payload lies in a bzImage: (file offset, length), the length including
/// the 4-byte little-endian decompressed size that the kernel build appends to every payload
/// (x86's mkpiggy reads it there). `header` holds the file's first bytes (at least up to
/// 0x250), `file_len` its size; nothing is trusted.
pub fn payload_range(header: &[u8], file_len: u64) -> Result<(u64, u64), KernelCacheError> {
    let bad = |reason: &str| KernelCacheError::BadPayload(reason.into());
    let field = |off: usize, len: usize| header.get(off..off + len).ok_or_else(|| bad("truncated"));
    if field(HEADER_MAGIC, 4)? != HDRS_MAGIC {
        return Err(bad("no HdrS magic"));
    }
    let version = u16::from_le_bytes(field(VERSION, 2)?.try_into().map_err(|_| bad("version"))?);
    if version < MIN_PAYLOAD_VERSION {
        return Err(bad("boot protocol older than 2.08"));
    }
    let le32 = |off| -> Result<u64, KernelCacheError> {
        let b: [u8; 4] = field(off, 4)?.try_into().map_err(|_| bad("field"))?;
        Ok(u64::from(u32::from_le_bytes(b)))
    };
    let setup_sects = match field(SETUP_SECTS, 1)?[0] {
        0 => 4,
        n => u64::from(n),
    };
    // payload_offset counts from the protected-mode code, which follows the setup sectors.
    let start = (setup_sects + 1) * 512 + le32(PAYLOAD_OFFSET)?;
    let len = le32(PAYLOAD_LENGTH)?;
    if len <= 4 || start.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(bad("payload outside the file"));
    }
    Ok((start, len))
}

/// Decompresses `input` (exactly one compressed stream) into `out`, failing past `limit`
/// bytes; returns the size written.
pub fn decompress(
    compression: Compression,
    input: impl Read,
    out: &mut impl Write,
    limit: u64,
) -> Result<u64, KernelCacheError> {
    let input = BufReader::with_capacity(1 << 16, input);
    let decoder: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::bufread::GzDecoder::new(input)),
        Compression::Xz => Box::new(xz2::bufread::XzDecoder::new(input)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| KernelCacheError::Decompress(io::Error::other(e.to_string())))?,
        ),
        Compression::Other(name) => return Err(KernelCacheError::UnsupportedCompression(name)),
    };
    // One byte more than allowed tells "exactly at the limit" from "over it".
    let mut limited = decoder.take(limit + 1);
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(KernelCacheError::Decompress(e)),
        };
        total += n as u64;
        if total > limit {
            return Err(KernelCacheError::TooBig);
        }
        out.write_all(&buf[..n]).map_err(|e| KernelCacheError::Io {
            what: "write the decompressed kernel to",
            path: PathBuf::from("the cache"),
            source: e,
        })?;
    }
    if total == 0 {
        return Err(KernelCacheError::Decompress(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(total)
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Checks that `file` is an x86_64 ELF executable with a PVH entry note: what the boot code
/// needs to enter it without the bzImage's decompressor. All offsets are bounds-checked.
pub fn check_pvh_elf(file: &mut File) -> Result<(), KernelCacheError> {
    use KernelCacheError::NotElf;
    let len = file.metadata().map_err(|_| NotElf("unreadable"))?.len();
    let mut ehdr = [0u8; ELF64_EHDR_LEN];
    read_at(file, 0, &mut ehdr).map_err(|_| NotElf("truncated ELF header"))?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32);
    // 64-bit, little-endian, executable, x86_64.
    if &ehdr[..4] != ELF_MAGIC || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(NotElf("not a 64-bit little-endian ELF"));
    }
    if u16_at(&ehdr, 16) != 2 || u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(NotElf("not an x86_64 executable"));
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = usize::from(u16_at(&ehdr, 54));
    let phnum = usize::from(u16_at(&ehdr, 56));
    if phentsize != ELF64_PHDR_LEN || phnum == 0 {
        return Err(NotElf("bad program header table"));
    }
    let table_len = (phnum * ELF64_PHDR_LEN) as u64;
    if phoff.checked_add(table_len).is_none_or(|end| end > len) {
        return Err(NotElf("program header table outside the file"));
    }
    let mut table = vec![0u8; phnum * ELF64_PHDR_LEN];
    read_at(file, phoff, &mut table).map_err(|_| NotElf("unreadable program headers"))?;
    let mut notes_read = 0u64;
    for ph in table.chunks_exact(ELF64_PHDR_LEN) {
        if u32_at(ph, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(ph, 8), u64_at(ph, 32));
        notes_read = notes_read.saturating_add(size);
        if notes_read > MAX_NOTES_LEN || offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(NotElf("note segment outside the file"));
        }
        let mut notes = vec![0u8; size as usize];
        read_at(file, offset, &mut notes).map_err(|_| NotElf("unreadable notes"))?;
        if has_pvh_note(&notes) {
            return Ok(());
        }
    }
    Err(KernelCacheError::NoPvhNote)
}

/// Walks one note segment (name and descriptor each padded to 4 bytes).
fn has_pvh_note(mut notes: &[u8]) -> bool {
    let pad4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let word =
            |o: usize| u32::from_le_bytes([notes[o], notes[o + 1], notes[o + 2], notes[o + 3]]);
        let (namesz, descsz, kind) = (word(0) as usize, word(4) as usize, word(8));
        let Some(name_end) = pad4(namesz).and_then(|n| n.checked_add(12)) else { return false };
        let Some(end) = pad4(descsz).and_then(|d| d.checked_add(name_end)) else { return false };
        if end > notes.len() {
            return false;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes[12..12 + namesz] == *b"Xen\0" && descsz >= 4 {
            return true;
        }
        notes = &notes[end..];
    }
    false
}

/// The cache key of a bzImage: hex SHA-256 of the format version and the whole file.
pub fn cache_key(file: &mut File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(FORMAT_VERSION);
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A temporary file that is deleted unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Returns the decompressed kernel of the bzImage `bzimage` (open, any position) from the
/// cache in `dir`, decompressing and storing it first on a miss. `dir` is created if needed.
pub fn lookup_or_insert(dir: &Path, bzimage: &mut File) -> Result<CachedKernel, KernelCacheError> {
    let key = cache_key(bzimage).map_err(io_err("read", Path::new("the bzImage")))?;
    let path = dir.join(format!("{key}{ENTRY_SUFFIX}"));
    if let Ok(mut file) = File::open(&path) {
        if check_pvh_elf(&mut file).is_ok() {
            // The modification time records the last use, for eviction; failing to set it
            // only makes eviction less fair.
            let _ = file.set_modified(SystemTime::now());
            return Ok(CachedKernel { path, file, hit: true });
        }
        log::warn!("kernel cache: dropping the unusable entry {}", path.display());
        let _ = fs::remove_file(&path);
    }

    let len = bzimage.metadata().map_err(io_err("read", Path::new("the bzImage")))?.len();
    let mut header = [0u8; 0x250];
    read_at(bzimage, 0, &mut header)
        .map_err(|_| KernelCacheError::BadPayload("truncated setup header".into()))?;
    let (offset, payload_len) = payload_range(&header, len)?;
    let mut size_trailer = [0u8; 4];
    read_at(bzimage, offset + payload_len - 4, &mut size_trailer)
        .map_err(io_err("read", Path::new("the bzImage")))?;
    let declared = u64::from(u32::from_le_bytes(size_trailer));
    let mut magic = [0u8; 6];
    let magic_len = payload_len.min(6) as usize;
    read_at(bzimage, offset, &mut magic[..magic_len])
        .map_err(io_err("read", Path::new("the bzImage")))?;
    let compression = Compression::detect(&magic[..magic_len]);
    if let Compression::Other(name) = compression {
        return Err(KernelCacheError::UnsupportedCompression(name));
    }

    fs::create_dir_all(dir).map_err(io_err("create the cache directory", dir))?;
    let temp = TempFile {
        path: dir.join(format!(".{key}.{}{TEMP_SUFFIX}", std::process::id())),
        keep: false,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp.path)
        .map_err(io_err("create", &temp.path))?;
    bzimage.seek(SeekFrom::Start(offset)).map_err(io_err("read", Path::new("the bzImage")))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let stream = bzimage.take(payload_len - 4);
    let size =
        decompress(compression, stream, &mut out, MAX_DECOMPRESSED_SIZE).map_err(|e| match e {
            KernelCacheError::Io { what, source, .. } => {
                KernelCacheError::Io { what, path: temp.path.clone(), source }
            }
            other => other,
        })?;
    let mut file = out.into_inner().map_err(|e| KernelCacheError::Io {
        what: "write",
        path: temp.path.clone(),
        source: e.into_error(),
    })?;
    if size != declared {
        return Err(KernelCacheError::SizeMismatch { declared, actual: size });
    }
    check_pvh_elf(&mut file)?;
    file.sync_all().map_err(io_err("sync", &temp.path))?;
    fs::rename(&temp.path, &path).map_err(io_err("rename into", &path))?;
    let mut temp = temp;
    temp.keep = true;
    // Make the rename itself durable; a failure only risks a miss after a crash.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    log::info!("kernel cache: stored {size} bytes as {}", path.display());
    evict(dir, MAX_ENTRIES, &path);
    Ok(CachedKernel { path, file, hit: false })
}

/// Deletes the least recently used entries beyond `keep` (never `current`) and stale temporary
/// files. Best effort: the cache only grows a little if it fails.
pub fn evict(dir: &Path, keep: usize, current: &Path) {
    let Ok(read) = fs::read_dir(dir) else { return };
    let now = SystemTime::now();
    let mut entries = Vec::new();
    for entry in read.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(now);
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
            if now.duration_since(modified).is_ok_and(|age| age > STALE_TEMP_AGE) {
                let _ = fs::remove_file(&path);
            }
        } else if name.ends_with(ENTRY_SUFFIX) && path != current {
            entries.push((modified, path));
        }
    }
    // Newest first; everything past the newest `keep - 1` others goes.
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, path) in entries.into_iter().skip(keep.saturating_sub(1)) {
        log::info!("kernel cache: evicting {}", path.display());
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use std::io::Write;

    use super::*;
    use crate::arch::x86_64::boot::tests::{synthetic_bzimage, synthetic_elf, RAM_MIB};
    use crate::arch::x86_64::boot::{load_kernel, BootError, BootProtocol, KernelBoot};
    use crate::memory::create_guest_memory;

    const SETUP_SIZE: usize = 2 * 512;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    /// The synthetic bzImage of the boot tests with `payload` as its compressed kernel,
    /// followed (as the kernel build does) by the 4-byte decompressed size.
    fn bzimage_with(payload: &[u8], decompressed_len: u32) -> Vec<u8> {
        let mut img = synthetic_bzimage()[..SETUP_SIZE].to_vec();
        img.extend_from_slice(payload);
        img.extend_from_slice(&decompressed_len.to_le_bytes());
        let payload_area = (img.len() - SETUP_SIZE) as u32;
        img[0x1f4..0x1f8].copy_from_slice(&(payload_area / 16).to_le_bytes()); // syssize
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&0u32.to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        img
    }

    fn pvh_bzimage(compress: fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        let elf = synthetic_elf(true);
        bzimage_with(&compress(&elf), elf.len() as u32)
    }

    fn temp_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    fn lookup(dir: &Path, image: &Path) -> Result<CachedKernel, KernelCacheError> {
        lookup_or_insert(dir, &mut File::open(image).unwrap())
    }

    /// Names in the cache directory, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = match fs::read_dir(dir) {
            Ok(read) => read.map(|e| e.unwrap().file_name().to_string_lossy().into()).collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    #[test]
    fn payload_range_follows_the_setup_header() {
        let img = pvh_bzimage(gzip);
        let (offset, len) = payload_range(&img[..0x250], img.len() as u64).unwrap();
        assert_eq!(offset, SETUP_SIZE as u64);
        assert_eq!(len as usize, img.len() - SETUP_SIZE);
        assert_eq!(&img[offset as usize..offset as usize + 2], &[0x1f, 0x8b]);

        // setup_sects 0 means 4, and payload_offset counts from the protected-mode code.
        let mut moved = img.clone();
        moved[SETUP_SECTS] = 0;
        moved[PAYLOAD_OFFSET] = 0x10;
        assert_eq!(payload_range(&moved[..0x250], 1 << 20).unwrap().0, 5 * 512 + 0x10);
    }

    #[test]
    fn payload_outside_the_file_or_old_protocol_is_refused() {
        let img = pvh_bzimage(gzip);
        let len = img.len() as u64;
        let mut too_long = img.clone();
        too_long[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut empty = img.clone();
        empty[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&0u32.to_le_bytes());
        let mut old = img.clone();
        old[VERSION..VERSION + 2].copy_from_slice(&0x0207u16.to_le_bytes());
        let mut magic = img.clone();
        magic[HEADER_MAGIC] = b'X';
        for (name, bytes) in
            [("too long", &too_long[..]), ("empty", &empty), ("old", &old), ("magic", &magic)]
        {
            let result = payload_range(&bytes[..0x250], len);
            assert!(matches!(result, Err(KernelCacheError::BadPayload(_))), "{name}: {result:?}");
        }
        assert!(payload_range(&img[..0x240], len).is_err(), "short header");
    }

    #[test]
    fn compression_is_told_by_magic() {
        assert_eq!(Compression::detect(&gzip(b"x")), Compression::Gzip);
        assert_eq!(Compression::detect(&xz(b"x")), Compression::Xz);
        assert_eq!(Compression::detect(&zstd(b"x")), Compression::Zstd);
        assert_eq!(Compression::detect(b"BZh91AY"), Compression::Other("bzip2"));
        assert_eq!(Compression::detect(&[0x02, 0x21, 0x4c, 0x18]), Compression::Other("lz4"));
        assert_eq!(Compression::detect(b""), Compression::Other("unknown"));
    }

    #[test]
    fn each_supported_compression_is_decompressed_then_hit() {
        let elf = synthetic_elf(true);
        for (name, compress) in [("gzip", gzip as fn(&[u8]) -> Vec<u8>), ("xz", xz), ("zstd", zstd)]
        {
            let dir = tempfile::tempdir().unwrap();
            let cache = dir.path().join("cache/kernels");
            let image = temp_file(dir.path(), "bzImage", &pvh_bzimage(compress));
            let first = lookup(&cache, &image).unwrap();
            assert!(!first.hit, "{name}: first lookup must miss");
            assert_eq!(fs::read(&first.path).unwrap(), elf, "{name}");
            let second = lookup(&cache, &image).unwrap();
            assert!(second.hit, "{name}: second lookup must hit");
            assert_eq!(second.path, first.path);
            // Only the entry is left: no temporary file.
            assert_eq!(listing(&cache).len(), 1, "{name}: {:?}", listing(&cache));
            assert!(listing(&cache)[0].ends_with(ENTRY_SUFFIX));
        }
    }

    #[test]
    fn the_key_is_the_content_not_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let img = pvh_bzimage(gzip);
        let a = temp_file(dir.path(), "a", &img);
        let b = temp_file(dir.path(), "b", &img);
        assert!(!lookup(&cache, &a).unwrap().hit);
        assert!(lookup(&cache, &b).unwrap().hit, "same bytes elsewhere must hit");
        // One changed byte anywhere (here in the setup) is another kernel.
        let mut changed = img.clone();
        changed[0x10] ^= 1;
        fs::write(&a, &changed).unwrap();
        assert!(!lookup(&cache, &a).unwrap().hit);
    }

    #[test]
    fn failures_leave_nothing_in_the_cache() {
        let elf_no_pvh = synthetic_elf(false);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("bzip2", bzimage_with(b"BZh91AY&SY0000000000", 100)),
            ("corrupt xz", {
                let mut payload = xz(&synthetic_elf(true));
                let mid = payload.len() / 2;
                payload[mid] ^= 0xff;
                bzimage_with(&payload, 1)
            }),
            ("truncated gzip", {
                let payload = gzip(&synthetic_elf(true));
                bzimage_with(&payload[..payload.len() / 2], 1)
            }),
            ("not an ELF", bzimage_with(&gzip(&[0xabu8; 4096]), 4096)),
            ("wrong size trailer", {
                let elf = synthetic_elf(true);
                bzimage_with(&xz(&elf), elf.len() as u32 + 1)
            }),
            ("no PVH note", bzimage_with(&gzip(&elf_no_pvh), elf_no_pvh.len() as u32)),
        ];
        for (name, img) in cases {
            let dir = tempfile::tempdir().unwrap();
            let cache = dir.path().join("cache");
            let image = temp_file(dir.path(), "bzImage", &img);
            let err = lookup(&cache, &image).expect_err(name);
            let expected = match name {
                "bzip2" => matches!(err, KernelCacheError::UnsupportedCompression("bzip2")),
                "corrupt xz" | "truncated gzip" => matches!(err, KernelCacheError::Decompress(_)),
                "not an ELF" => matches!(err, KernelCacheError::NotElf(_)),
                "wrong size trailer" => matches!(err, KernelCacheError::SizeMismatch { .. }),
                _ => matches!(err, KernelCacheError::NoPvhNote),
            };
            assert!(expected, "{name}: {err:?}");
            assert!(listing(&cache).is_empty(), "{name}: left {:?}", listing(&cache));
        }
    }

    #[test]
    fn decompression_stops_at_the_size_limit() {
        let data = vec![0u8; 100_000];
        let mut out = Vec::new();
        let err = decompress(Compression::Gzip, &gzip(&data)[..], &mut out, 99_999);
        assert!(matches!(err, Err(KernelCacheError::TooBig)), "{err:?}");
        assert!(out.len() <= 99_999);
        let mut out = Vec::new();
        assert_eq!(
            decompress(Compression::Gzip, &gzip(&data)[..], &mut out, 100_000).unwrap(),
            100_000
        );
        assert_eq!(out, data);
    }

    #[test]
    fn unwritable_cache_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let image = temp_file(dir.path(), "bzImage", &pvh_bzimage(gzip));
        // A directory below a regular file can't be created, even by root.
        let cache = image.join("kernels");
        let err = lookup(&cache, &image).expect_err("must fail");
        assert!(matches!(err, KernelCacheError::Io { .. }), "{err:?}");
    }

    #[test]
    fn least_recently_used_entries_are_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let base = SystemTime::now() - Duration::from_secs(1000);
        // Four different kernels (one setup byte differs), used in order 0..4.
        let mut entries = Vec::new();
        for i in 0..4u8 {
            let mut img = pvh_bzimage(gzip);
            img[0x10] = i;
            let image = temp_file(dir.path(), &format!("k{i}"), &img);
            let cached = lookup(&cache, &image).unwrap();
            cached.file.set_modified(base + Duration::from_secs(u64::from(i) * 10)).unwrap();
            entries.push((image, cached.path));
            if i == 0 {
                // A hit refreshes the entry's last use.
                let hit = lookup(&cache, &entries[0].0).unwrap();
                assert!(hit.hit);
                assert!(
                    hit.file.metadata().unwrap().modified().unwrap()
                        > base + Duration::from_secs(100)
                );
                hit.file.set_modified(base).unwrap();
            }
        }
        // After the fourth insertion, the least recently used (k0) is gone.
        let names = listing(&cache);
        assert_eq!(names.len(), MAX_ENTRIES, "{names:?}");
        assert!(!entries[0].1.exists());
        assert!(entries[1..].iter().all(|(_, p)| p.exists()));

        // Using k1 makes k2 the oldest: inserting k0 again evicts k2.
        assert!(lookup(&cache, &entries[1].0).unwrap().hit);
        assert!(!lookup(&cache, &entries[0].0).unwrap().hit);
        assert!(entries[1].1.exists() && entries[0].1.exists() && entries[3].1.exists());
        assert!(!entries[2].1.exists());
    }

    #[test]
    fn stale_temporary_files_are_removed_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let stale = temp_file(dir.path(), ".abc.1.tmp", b"x");
        let fresh = temp_file(dir.path(), ".def.2.tmp", b"x");
        let other = temp_file(dir.path(), "README", b"x");
        let old = SystemTime::now() - STALE_TEMP_AGE - Duration::from_secs(60);
        File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
        evict(dir.path(), MAX_ENTRIES, Path::new("/none"));
        assert!(!stale.exists());
        assert!(fresh.exists() && other.exists());
    }

    #[test]
    fn damaged_entry_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let image = temp_file(dir.path(), "bzImage", &pvh_bzimage(xz));
        let path = lookup(&cache, &image).unwrap().path;
        fs::write(&path, b"garbage").unwrap();
        let again = lookup(&cache, &image).unwrap();
        assert!(!again.hit);
        assert_eq!(fs::read(&path).unwrap(), synthetic_elf(true));
    }

    #[test]
    fn mutated_elf_headers_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        let base = synthetic_elf(true);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut img = base.clone();
            for _ in 0..1 + x % 4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % 0x120) as usize;
                img[at] = (x >> 32) as u8;
            }
            fs::write(&path, &img).unwrap();
            // Any result is fine; a panic fails the test.
            let _ = check_pvh_elf(&mut File::open(&path).unwrap());
        }
        fs::write(&path, &base).unwrap();
        check_pvh_elf(&mut File::open(&path).unwrap()).unwrap();
    }

    fn boot(image: &[u8], cache: Option<&Path>) -> Result<BootProtocol, BootError> {
        let memory = create_guest_memory(RAM_MIB).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kernel = temp_file(dir.path(), "bzImage", image);
        let boot = KernelBoot {
            kernel: &kernel,
            initrd: None,
            cmdline: "console=ttyS0",
            ram_mib: RAM_MIB,
            acpi_rsdp: 0,
            kernel_cache: cache,
            framebuffer: None,
        };
        load_kernel(&memory, &boot).map(|e| e.protocol)
    }

    #[test]
    fn cached_bzimage_boots_through_pvh() {
        let dir = tempfile::tempdir().unwrap();
        let img = pvh_bzimage(xz);
        assert_eq!(boot(&img, None).unwrap(), BootProtocol::LinuxBoot64);
        assert_eq!(boot(&img, Some(dir.path())).unwrap(), BootProtocol::Pvh);
        assert_eq!(boot(&img, Some(dir.path())).unwrap(), BootProtocol::Pvh);
        assert_eq!(listing(dir.path()).len(), 1);
    }

    #[test]
    fn cache_failures_fall_back_to_the_bzimage() {
        let dir = tempfile::tempdir().unwrap();
        let unwritable = temp_file(dir.path(), "file", b"x").join("kernels");
        let no_pvh = synthetic_elf(false);
        for (name, img, cache) in [
            ("bzip2", bzimage_with(b"BZh91AY&SY0000000000", 100), dir.path().to_path_buf()),
            (
                "no PVH note",
                bzimage_with(&gzip(&no_pvh), no_pvh.len() as u32),
                dir.path().to_path_buf(),
            ),
            ("unwritable dir", pvh_bzimage(gzip), unwritable),
        ] {
            let result = boot(&img, Some(&cache));
            assert_eq!(result.unwrap(), BootProtocol::LinuxBoot64, "{name}");
        }
    }

    #[test]
    fn corrupt_bzimage_fails_the_same_with_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let img = pvh_bzimage(gzip);
        let truncated = &img[..0x300];
        let mut bad_magic = img.clone();
        bad_magic[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"XXXX");
        for bytes in [truncated, &bad_magic[..]] {
            let without = boot(bytes, None).expect_err("must fail").to_string();
            let with = boot(bytes, Some(dir.path())).expect_err("must fail").to_string();
            // The temporary kernel path differs between the runs; the message does not.
            let strip = |s: &str| {
                s.split_whitespace().filter(|w| !w.contains('/')).collect::<Vec<_>>().join(" ")
            };
            assert_eq!(strip(&without), strip(&with));
        }
        assert!(listing(dir.path()).is_empty());
    }
}
