//! The shared-memory frame: how the VM process (one [`FrameWriter`]) hands the screen to the GUI
//! process (any number of [`FrameReader`]s) without pushing whole frames through a socket.
//!
//! File layout (native endianness: both processes run on the same host):
//! ```text
//!  0      header page: magic "HUTCHFB1", version, max size, stride, region offsets,
//!         seq (seqlock: odd while the writer writes), ring_total, width, height,
//!         cursor fields + cursor_seq (its own seqlock), ring of the last RING_LEN dirty rects
//!         (each tagged with the seq that publishes it)
//!  4096   cursor image: CURSOR_MAX×CURSOR_MAX RGBA8, tightly packed rows (cursor_w wide)
//!  20480  tile stamps: one u64 per TILE×TILE tile of the max-size screen: the seq of the last
//!         write declared over that tile
//!  36864  pixels: RGBA8, stride = max_width * 4 (fixed, so a resize never moves a row)
//! ```
//! A write goes: seq odd → declare the dirty rects in the ring and stamp their tiles → write
//! pixels → seq even. A reader learns *what* changed from the ring (exact rects) and checks
//! *that its copy is untorn* with the tile stamps: a copy is good when no tile under it was
//! stamped after the seq read before the copy. So a reader never needs the writer to pause
//! (a plain seqlock starves a reader copying a large area while the guest draws all the time);
//! rects whose copy was torn are retried on the next poll.
//!
//! The reader treats the whole file as untrusted: sizes and offsets are checked at open, and
//! sizes and rects read later are checked again before use. The file is replaced, never
//! truncated, by the writer; a hostile process truncating it could still SIGBUS a reader.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use crate::pixel::{convert_rect_to_rgba, PixelError};
use crate::rect::DirtyRegion;
use crate::{CursorImage, Image, Rect, MAX_HEIGHT, MAX_WIDTH};

pub const MAGIC: [u8; 8] = *b"HUTCHFB1";
pub const VERSION: u32 = 1;
/// Dirty rects kept in the header; a reader further behind gets a full frame.
pub const RING_LEN: usize = 64;
/// Largest cursor image; bigger ones are clipped.
pub const CURSOR_MAX: u32 = 64;
/// Side of the square tiles whose stamps validate readers' copies.
pub const TILE: u32 = 64;

const PAGE: usize = 4096;
const CURSOR_OFFSET: usize = PAGE;
const CURSOR_BYTES: usize = (CURSOR_MAX * CURSOR_MAX * 4) as usize;
const TILES_OFFSET: usize = CURSOR_OFFSET + CURSOR_BYTES;
const TILES_BYTES: usize = 4 * PAGE;
const PIXELS_OFFSET: usize = TILES_OFFSET + TILES_BYTES;

// Header fields (byte offsets).
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_MAX_WIDTH: usize = 12;
const H_MAX_HEIGHT: usize = 16;
const H_STRIDE: usize = 20;
const H_CURSOR_OFFSET: usize = 24;
const H_TILES_OFFSET: usize = 28;
const H_PIXELS_OFFSET: usize = 32;
const H_TILE: usize = 36;
const H_SEQ: usize = 40;
const H_RING_TOTAL: usize = 48;
const H_WIDTH: usize = 56;
const H_HEIGHT: usize = 60;
const H_CURSOR_SEQ: usize = 64;
const H_CURSOR_SERIAL: usize = 72;
const H_CURSOR_VISIBLE: usize = 80;
const H_CURSOR_X: usize = 84;
const H_CURSOR_Y: usize = 88;
const H_CURSOR_HOT_X: usize = 92;
const H_CURSOR_HOT_Y: usize = 96;
const H_CURSOR_W: usize = 100;
const H_CURSOR_H: usize = 104;
const H_RING: usize = 128;
const RING_ENTRY: usize = 24;
const _: () = assert!(H_RING + RING_LEN * RING_ENTRY <= PAGE);
const _: () =
    assert!((MAX_WIDTH.div_ceil(TILE) * MAX_HEIGHT.div_ceil(TILE)) as usize * 8 <= TILES_BYTES);

/// Tries at a seqlock section (header, cursor, snapshot) before reporting "busy".
const SEQLOCK_TRIES: u32 = 64;
/// Rows per piece when a large rect is copied, so one piece is short next to a guest's writes.
const BAND_ROWS: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("Cannot create frame file {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open frame file {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot map frame file {}", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Frame file is {len} bytes, {needed} needed")]
    Truncated { len: u64, needed: u64 },
    #[error("Not a Hutch frame file (bad magic)")]
    BadMagic,
    #[error("Frame file version {0} is not supported")]
    BadVersion(u32),
    #[error("Corrupt frame header: {0}")]
    Corrupt(&'static str),
    #[error("Frame size {width}x{height} exceeds {max_width}x{max_height}")]
    TooLarge { width: u32, height: u32, max_width: u32, max_height: u32 },
    #[error("Bad cursor image")]
    Cursor(#[source] PixelError),
    #[error("Frame is busy (the writer kept changing it)")]
    Busy,
}

/// A shared mapping of the frame file.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all shared access goes through
// atomics or seqlock-validated byte copies, and mutation needs `&mut`.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only allows atomic loads/stores and copies out.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize, writable: bool) -> io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh shared mapping of `len` bytes of an open file at a kernel-chosen
        // address; it aliases no Rust object. The result is checked below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(io::ErrorKind::InvalidData)?;
        Ok(Mapping { ptr, len })
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off + 4 <= self.len, "frame offset {off}");
        // SAFETY: in bounds and aligned (the mapping is page-aligned, `off` a multiple of 4);
        // the memory lives as long as `self`, and every access to it is atomic.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= self.len, "frame offset {off}");
        // SAFETY: as in `u32_at`, with 8-byte alignment.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// Copies bytes out. They may be changing under us (the writer is another process): the
    /// caller validates them with the seqlock or tile stamps and throws away torn copies.
    fn copy_out(&self, off: usize, dst: &mut [u8]) {
        assert!(
            off.checked_add(dst.len()).is_some_and(|end| end <= self.len),
            "frame range {off}+{}",
            dst.len()
        );
        // SAFETY: the source range is inside the mapping (checked above) and `dst` is a
        // distinct Rust buffer. Concurrent writes from the other process only make the bytes
        // stale or mixed, never invalid (u8 has no invalid values); see the module docs.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Writable bytes; only the writer (which maps read-write and has `&mut`) calls this.
    fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len), "frame range {off}+{len}");
        // SAFETY: in bounds; `&mut self` means no other reference into this mapping exists in
        // this process (atomics are only borrowed briefly through `&self`). Readers in other
        // processes only copy bytes out and validate them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no references outlive `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn tiles_across(max_width: u32) -> u32 {
    max_width.div_ceil(TILE)
}

fn file_len(max_width: u32, max_height: u32) -> u64 {
    PIXELS_OFFSET as u64 + max_width as u64 * 4 * max_height as u64
}

/// The VM side: owns the frame file and is its only writer.
pub struct FrameWriter {
    map: Mapping,
    path: PathBuf,
    max_width: u32,
    max_height: u32,
    width: u32,
    height: u32,
    seq: u64,
    ring_total: u64,
    cursor_seq: u64,
    cursor_serial: u64,
}

/// The visible frame while a write is in progress (see [`FrameWriter::update`]).
pub struct FrameMut<'a> {
    pixels: &'a mut [u8],
    width: u32,
    height: u32,
    stride: usize,
}

impl FrameMut<'_> {
    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Bytes per row (`max_width * 4`, wider than the visible `width * 4`).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The visible rows, RGBA8. Only pixels inside the rects passed to `update` may change.
    pub fn pixels_mut(&mut self) -> &mut [u8] {
        self.pixels
    }
}

impl FrameWriter {
    /// Creates the frame file at `path` (mode 0600), replacing a stale one atomically, at
    /// size 0×0 until the first [`resize`](Self::resize).
    pub fn create(path: &Path, max_width: u32, max_height: u32) -> Result<FrameWriter, FrameError> {
        if max_width == 0 || max_height == 0 || max_width > MAX_WIDTH || max_height > MAX_HEIGHT {
            return Err(FrameError::TooLarge {
                width: max_width,
                height: max_height,
                max_width: MAX_WIDTH,
                max_height: MAX_HEIGHT,
            });
        }
        let create_err = |source| FrameError::Create { path: path.to_path_buf(), source };
        // Build the file beside its final name and rename it into place, so a reader never
        // sees a half-written header and a reader of the old file keeps a consistent one.
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(create_err)?;
        let len = file_len(max_width, max_height);
        let result = file
            .set_len(len)
            .map_err(create_err)
            .and_then(|()| {
                Mapping::new(&file, len as usize, true)
                    .map_err(|source| FrameError::Map { path: path.to_path_buf(), source })
            })
            .and_then(|mut map| {
                map.slice_mut(H_MAGIC, 8).copy_from_slice(&MAGIC);
                let h = |off, v| map.u32_at(off).store(v, Ordering::Relaxed);
                h(H_VERSION, VERSION);
                h(H_MAX_WIDTH, max_width);
                h(H_MAX_HEIGHT, max_height);
                h(H_STRIDE, max_width * 4);
                h(H_CURSOR_OFFSET, CURSOR_OFFSET as u32);
                h(H_TILES_OFFSET, TILES_OFFSET as u32);
                h(H_PIXELS_OFFSET, PIXELS_OFFSET as u32);
                h(H_TILE, TILE);
                std::fs::rename(&tmp, path).map_err(create_err)?;
                Ok(map)
            });
        let map = match result {
            Ok(map) => map,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        Ok(FrameWriter {
            map,
            path: path.to_path_buf(),
            max_width,
            max_height,
            width: 0,
            height: 0,
            seq: 0,
            ring_total: 0,
            cursor_seq: 0,
            cursor_serial: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn max_width(&self) -> u32 {
        self.max_width
    }

    pub fn max_height(&self) -> u32 {
        self.max_height
    }

    /// The sequence number of the last published write.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Changes the visible size, clears it to opaque black and publishes it as fully dirty.
    pub fn resize(&mut self, width: u32, height: u32) -> Result<(), FrameError> {
        if width > self.max_width || height > self.max_height {
            return Err(FrameError::TooLarge {
                width,
                height,
                max_width: self.max_width,
                max_height: self.max_height,
            });
        }
        // Declared over the whole max area: a reader copying anywhere sees its copy as torn.
        let stride = self.max_width as usize * 4;
        self.write(&[Rect::full(self.max_width, self.max_height)], |map| {
            map.u32_at(H_WIDTH).store(width, Ordering::Relaxed);
            map.u32_at(H_HEIGHT).store(height, Ordering::Relaxed);
            let px = map.slice_mut(PIXELS_OFFSET, stride * height as usize);
            for row in px.chunks_exact_mut(stride) {
                for p in row[..width as usize * 4].chunks_exact_mut(4) {
                    p.copy_from_slice(&[0, 0, 0, 0xff]);
                }
            }
        });
        self.width = width;
        self.height = height;
        Ok(())
    }

    /// One write: declares `dirty` (clipped to the visible size; more than [`RING_LEN`] rects
    /// become one full-screen rect), lets `f` change pixels inside them, then publishes.
    pub fn update<R>(&mut self, dirty: &[Rect], f: impl FnOnce(&mut FrameMut<'_>) -> R) -> R {
        let (width, height) = (self.width, self.height);
        let mut rects: Vec<Rect> =
            dirty.iter().map(|r| r.clip(width, height)).filter(|r| !r.is_empty()).collect();
        if rects.len() > RING_LEN {
            rects = vec![Rect::full(width, height)];
        }
        let stride = self.max_width as usize * 4;
        let mut out = None;
        self.write(&rects, |map| {
            let mut frame = FrameMut {
                pixels: map.slice_mut(PIXELS_OFFSET, stride * height as usize),
                width,
                height,
                stride,
            };
            out = Some(f(&mut frame));
        });
        match out {
            Some(out) => out,
            None => unreachable!("write always runs its closure"),
        }
    }

    /// The write protocol (see the module docs). `body` runs with seq odd, after the rects are
    /// declared; if it panics, the guard still publishes so readers don't wait forever.
    fn write(&mut self, rects: &[Rect], body: impl FnOnce(&mut Mapping)) {
        struct Publish {
            seq: *const AtomicU64,
            tag: u64,
        }
        impl Drop for Publish {
            fn drop(&mut self) {
                // SAFETY: `seq` points at the header's seq field inside the writer's mapping,
                // which outlives this guard (both live in `write`); it is only used atomically.
                unsafe { &*self.seq }.store(self.tag, Ordering::Release);
            }
        }

        let tag = self.seq + 2;
        // An RMW, so a reader that acquires the odd value also sees the previous publish.
        self.map.u64_at(H_SEQ).fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        let across = tiles_across(self.max_width) as usize;
        for (i, r) in rects.iter().enumerate() {
            let slot = (self.ring_total as usize + i) % RING_LEN;
            let e = H_RING + slot * RING_ENTRY;
            self.map.u64_at(e).store(tag, Ordering::Relaxed);
            self.map.u32_at(e + 8).store(r.x, Ordering::Relaxed);
            self.map.u32_at(e + 12).store(r.y, Ordering::Relaxed);
            self.map.u32_at(e + 16).store(r.width, Ordering::Relaxed);
            self.map.u32_at(e + 20).store(r.height, Ordering::Relaxed);
            let r = r.clip(self.max_width, self.max_height);
            if r.is_empty() {
                continue;
            }
            for ty in r.y / TILE..=(r.bottom() as u32 - 1) / TILE {
                for tx in r.x / TILE..=(r.right() as u32 - 1) / TILE {
                    let t = TILES_OFFSET + (ty as usize * across + tx as usize) * 8;
                    self.map.u64_at(t).store(tag, Ordering::Relaxed);
                }
            }
        }
        self.ring_total += rects.len() as u64;
        self.map.u64_at(H_RING_TOTAL).store(self.ring_total, Ordering::Release);
        // Declarations before pixels: a reader that sees any pixel of this write sees them.
        fence(Ordering::Release);
        self.seq = tag;
        let _publish = Publish { seq: self.map.u64_at(H_SEQ), tag };
        body(&mut self.map);
    }

    /// Shows `cursor` (converted to RGBA8, clipped to [`CURSOR_MAX`]²) or hides the cursor.
    /// A bad image hides the cursor and is an error.
    pub fn set_cursor(&mut self, cursor: Option<&CursorImage>) -> Result<(), FrameError> {
        let Some(c) = cursor else {
            self.write_cursor(|map| map.u32_at(H_CURSOR_VISIBLE).store(0, Ordering::Relaxed));
            return Ok(());
        };
        let (w, h) = (c.width.min(CURSOR_MAX), c.height.min(CURSOR_MAX));
        let mut rgba = vec![0u8; (w * h * 4) as usize];
        let image = Image {
            data: &c.data,
            width: c.width,
            height: c.height,
            stride: c.width.saturating_mul(4),
            format: c.format,
        };
        if let Err(e) =
            convert_rect_to_rgba(&image, Rect::full(w, h), &mut rgba, w as usize * 4, 0, 0)
        {
            self.set_cursor(None)?;
            return Err(FrameError::Cursor(e));
        }
        self.cursor_serial += 1;
        let serial = self.cursor_serial;
        let (hot_x, hot_y) = (c.hot_x.min(w.saturating_sub(1)), c.hot_y.min(h.saturating_sub(1)));
        self.write_cursor(|map| {
            map.slice_mut(CURSOR_OFFSET, rgba.len()).copy_from_slice(&rgba);
            let s = |off, v| map.u32_at(off).store(v, Ordering::Relaxed);
            s(H_CURSOR_W, w);
            s(H_CURSOR_H, h);
            s(H_CURSOR_HOT_X, hot_x);
            s(H_CURSOR_HOT_Y, hot_y);
            s(H_CURSOR_VISIBLE, 1);
            map.u64_at(H_CURSOR_SERIAL).store(serial, Ordering::Relaxed);
        });
        Ok(())
    }

    /// Moves the cursor's hot spot to (`x`, `y`).
    pub fn move_cursor(&mut self, x: u32, y: u32) {
        self.write_cursor(|map| {
            map.u32_at(H_CURSOR_X).store(x, Ordering::Relaxed);
            map.u32_at(H_CURSOR_Y).store(y, Ordering::Relaxed);
        });
    }

    /// The cursor's own seqlock, so pointer motion never disturbs frame readers.
    fn write_cursor(&mut self, body: impl FnOnce(&mut Mapping)) {
        self.map.u64_at(H_CURSOR_SEQ).fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        body(&mut self.map);
        self.cursor_seq += 2;
        self.map.u64_at(H_CURSOR_SEQ).store(self.cursor_seq, Ordering::Release);
    }
}

/// What changed since the last [`FrameReader::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameUpdate {
    pub width: u32,
    pub height: u32,
    /// The size may have changed and the whole frame is being sent: start from scratch. Parts
    /// the writer kept changing during the copy may follow in the next polls.
    pub full: bool,
    pub rects: Vec<RectPixels>,
}

/// One changed rect and its pixels, RGBA8, rows tightly packed (`rect.width * 4` bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RectPixels {
    pub rect: Rect,
    pub rgba: Vec<u8>,
}

/// A whole frame, RGBA8, rows tightly packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameImage {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
}

/// The cursor as last set by the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorState {
    pub visible: bool,
    /// Hot spot position on the screen.
    pub x: u32,
    pub y: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub width: u32,
    pub height: u32,
    /// Changes only when the image changes (re-upload the cursor texture then).
    pub serial: u64,
    /// `width`×`height` RGBA8, tightly packed.
    pub rgba: Vec<u8>,
}

/// The GUI side: maps the frame file read-only and copies out what changed.
pub struct FrameReader {
    map: Mapping,
    path: PathBuf,
    max_width: u32,
    max_height: u32,
    stride: usize,
    /// Seq and ring position up to which changes were delivered; None before the first poll.
    last: Option<(u64, u64)>,
    last_size: (u32, u32),
    /// Rects whose copy was torn, to be delivered next time.
    pending: DirtyRegion,
}

impl FrameReader {
    pub fn open(path: &Path) -> Result<FrameReader, FrameError> {
        let file = File::open(path)
            .map_err(|source| FrameError::Open { path: path.to_path_buf(), source })?;
        let len = file
            .metadata()
            .map_err(|source| FrameError::Open { path: path.to_path_buf(), source })?
            .len();
        if len < PIXELS_OFFSET as u64 {
            return Err(FrameError::Truncated { len, needed: PIXELS_OFFSET as u64 });
        }
        let map_len = usize::try_from(len).map_err(|_| FrameError::Corrupt("file too large"))?;
        let map = Mapping::new(&file, map_len, false)
            .map_err(|source| FrameError::Map { path: path.to_path_buf(), source })?;
        let mut magic = [0u8; 8];
        map.copy_out(H_MAGIC, &mut magic);
        if magic != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let h = |off| map.u32_at(off).load(Ordering::Relaxed);
        if h(H_VERSION) != VERSION {
            return Err(FrameError::BadVersion(h(H_VERSION)));
        }
        let (max_width, max_height) = (h(H_MAX_WIDTH), h(H_MAX_HEIGHT));
        if max_width == 0 || max_height == 0 || max_width > MAX_WIDTH || max_height > MAX_HEIGHT {
            return Err(FrameError::Corrupt("max size"));
        }
        if h(H_STRIDE) != max_width * 4
            || h(H_CURSOR_OFFSET) as usize != CURSOR_OFFSET
            || h(H_TILES_OFFSET) as usize != TILES_OFFSET
            || h(H_PIXELS_OFFSET) as usize != PIXELS_OFFSET
            || h(H_TILE) != TILE
        {
            return Err(FrameError::Corrupt("layout"));
        }
        let needed = file_len(max_width, max_height);
        if len < needed {
            return Err(FrameError::Truncated { len, needed });
        }
        Ok(FrameReader {
            map,
            path: path.to_path_buf(),
            max_width,
            max_height,
            stride: max_width as usize * 4,
            last: None,
            last_size: (0, 0),
            pending: DirtyRegion::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn max_width(&self) -> u32 {
        self.max_width
    }

    pub fn max_height(&self) -> u32 {
        self.max_height
    }

    /// The writer's sequence number: a cheap check for "anything new?" (odd while writing).
    pub fn seq(&self) -> u64 {
        self.map.u64_at(H_SEQ).load(Ordering::Acquire)
    }

    /// The changes since the last poll (the whole frame on the first). None when nothing
    /// changed, or when the writer kept the changed area busy (try again next poll).
    pub fn poll(&mut self) -> Result<Option<FrameUpdate>, FrameError> {
        let s1 = self.seq();
        if self.last.is_some_and(|(seq, _)| seq == s1) && self.pending.is_empty() {
            return Ok(None);
        }
        let (width, height) = self.size()?;
        let total = self.map.u64_at(H_RING_TOTAL).load(Ordering::Acquire);
        let full = self.last.is_none() || (width, height) != self.last_size;
        let mut region = DirtyRegion::new();
        let mut behind = full;
        if let (false, Some((last_seq, last_total))) = (full, self.last) {
            match self.ring_since(last_seq, last_total, total) {
                Some(rects) => region.extend(rects.iter().map(|r| r.clip(width, height))),
                None => behind = true,
            }
            region.extend(self.pending.take());
        }
        if behind {
            region = DirtyRegion::new();
            region.add(Rect::full(width, height));
            self.pending.take();
        }

        let mut rects = Vec::new();
        for rect in region.take() {
            for piece in bands(rect) {
                match self.copy_rect(piece) {
                    Some(rgba) => rects.push(RectPixels { rect: piece, rgba }),
                    None => self.pending.add(piece),
                }
            }
        }
        // A resize we raced with (it would also have stamped every tile, but a resize that
        // completed before a copy leaves no trace there): drop everything, retry next poll.
        if self.size()? != (width, height) {
            self.pending.take();
            return Ok(None);
        }
        self.last = Some((s1, total));
        self.last_size = (width, height);
        if rects.is_empty() && !behind {
            return Ok(None);
        }
        Ok(Some(FrameUpdate { width, height, full: behind, rects }))
    }

    fn size(&self) -> Result<(u32, u32), FrameError> {
        let width = self.map.u32_at(H_WIDTH).load(Ordering::Relaxed);
        let height = self.map.u32_at(H_HEIGHT).load(Ordering::Relaxed);
        if width > self.max_width || height > self.max_height {
            return Err(FrameError::Corrupt("size past the maximum"));
        }
        Ok((width, height))
    }

    /// The ring entries from `from` to `to`, or None when the ring no longer reaches back.
    fn ring_since(&self, last_seq: u64, from: u64, to: u64) -> Option<Vec<Rect>> {
        if to < from || to - from > RING_LEN as u64 {
            return None;
        }
        let mut rects = Vec::with_capacity((to - from) as usize);
        for i in from..to {
            let e = H_RING + (i % RING_LEN as u64) as usize * RING_ENTRY;
            let tag = self.map.u64_at(e).load(Ordering::Relaxed);
            if tag <= last_seq {
                return None;
            }
            let v = |off| self.map.u32_at(e + off).load(Ordering::Relaxed);
            rects.push(Rect::new(v(8), v(12), v(16), v(20)));
        }
        // If the writer went round the ring while we read, some entries may be newer ones.
        fence(Ordering::Acquire);
        let now = self.map.u64_at(H_RING_TOTAL).load(Ordering::Relaxed);
        (now.saturating_sub(from) <= RING_LEN as u64).then_some(rects)
    }

    /// Copies `rect` (inside the visible size) out, or None if a write touched it meanwhile.
    fn copy_rect(&self, rect: Rect) -> Option<Vec<u8>> {
        let before = self.seq();
        let row = rect.width as usize * 4;
        let mut rgba = vec![0u8; row * rect.height as usize];
        for (i, dst) in rgba.chunks_exact_mut(row).enumerate() {
            let off = PIXELS_OFFSET + (rect.y as usize + i) * self.stride + rect.x as usize * 4;
            self.map.copy_out(off, dst);
        }
        fence(Ordering::Acquire);
        (self.max_stamp(rect) <= before).then_some(rgba)
    }

    /// The newest write declared over any tile under `rect`.
    fn max_stamp(&self, rect: Rect) -> u64 {
        let across = tiles_across(self.max_width) as usize;
        let mut max = 0;
        if rect.is_empty() {
            return max;
        }
        for ty in rect.y / TILE..=(rect.bottom() as u32 - 1) / TILE {
            for tx in rect.x / TILE..=(rect.right() as u32 - 1) / TILE {
                let t = TILES_OFFSET + (ty as usize * across + tx as usize) * 8;
                max = max.max(self.map.u64_at(t).load(Ordering::Relaxed));
            }
        }
        max
    }

    /// A consistent copy of the whole visible frame (for screenshots).
    pub fn snapshot(&self) -> Result<FrameImage, FrameError> {
        for _ in 0..SEQLOCK_TRIES {
            let s1 = self.seq();
            if s1 % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let (width, height) = self.size()?;
            let full = Rect::full(width, height);
            let rgba = if full.is_empty() {
                Vec::new()
            } else {
                match self.copy_rect(full) {
                    Some(rgba) => rgba,
                    None => continue,
                }
            };
            fence(Ordering::Acquire);
            if self.map.u64_at(H_SEQ).load(Ordering::Relaxed) == s1 {
                return Ok(FrameImage { width, height, rgba });
            }
        }
        Err(FrameError::Busy)
    }

    /// The cursor's seqlock value: changes whenever the cursor moves or changes (cheap poll).
    pub fn cursor_seq(&self) -> u64 {
        self.map.u64_at(H_CURSOR_SEQ).load(Ordering::Acquire)
    }

    /// The cursor, or None if none was ever set, the header is corrupt, or it was being
    /// changed throughout.
    pub fn cursor(&self) -> Option<CursorState> {
        for _ in 0..SEQLOCK_TRIES {
            let s1 = self.cursor_seq();
            if s1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let v = |off| self.map.u32_at(off).load(Ordering::Relaxed);
            let serial = self.map.u64_at(H_CURSOR_SERIAL).load(Ordering::Relaxed);
            let (width, height) = (v(H_CURSOR_W), v(H_CURSOR_H));
            if width > CURSOR_MAX || height > CURSOR_MAX {
                return None;
            }
            let mut rgba = vec![0u8; (width * height * 4) as usize];
            self.map.copy_out(CURSOR_OFFSET, &mut rgba);
            let state = CursorState {
                visible: v(H_CURSOR_VISIBLE) != 0,
                x: v(H_CURSOR_X),
                y: v(H_CURSOR_Y),
                hot_x: v(H_CURSOR_HOT_X),
                hot_y: v(H_CURSOR_HOT_Y),
                width,
                height,
                serial,
                rgba,
            };
            fence(Ordering::Acquire);
            if self.map.u64_at(H_CURSOR_SEQ).load(Ordering::Relaxed) == s1 {
                return (serial != 0).then_some(state);
            }
        }
        None
    }
}

/// `rect` cut into bands of at most [`BAND_ROWS`] rows.
fn bands(rect: Rect) -> impl Iterator<Item = Rect> {
    (0..rect.height.div_ceil(BAND_ROWS)).map(move |i| {
        let y = i * BAND_ROWS;
        Rect::new(rect.x, rect.y + y, rect.width, (rect.height - y).min(BAND_ROWS))
    })
}
