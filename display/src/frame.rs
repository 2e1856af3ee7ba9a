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
//! rects whose copy was torn are retried on the next poll. A reader that fell more than
//! [`RING_LEN`] rects behind catches up from the stamps too (the tiles written since its last
//! poll), so falling behind never costs a whole frame.
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
use crate::{CursorImage, Image, Rect, MAX_HEIGHT, MAX_WIDTH};

pub const MAGIC: [u8; 8] = *b"HUTCHFB1";
pub const VERSION: u32 = 1;
/// Dirty rects kept in the header; a reader further behind catches up from the tile stamps.
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
    /// The writer's seq this update brings the reader up to.
    pub seq: u64,
    pub width: u32,
    pub height: u32,
    /// First poll or a new size: the whole frame is being sent, start from scratch. Parts the
    /// writer kept changing during the copy may follow in the next polls.
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
    pending: Vec<Rect>,
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
            pending: Vec::new(),
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
        let mut region = Vec::new();
        match self.last {
            Some((last_seq, last_total)) if !full => {
                // Exact rects from the ring; a reader too far behind for it falls back to the
                // tiles written since, which is never more than what changed.
                let rects = self.ring_since(last_seq, last_total, total);
                let rects = rects.unwrap_or_else(|| self.tiles_since(last_seq, width, height));
                for r in rects.iter().chain(&std::mem::take(&mut self.pending)) {
                    add_disjoint(&mut region, r.clip(width, height));
                }
            }
            _ => {
                region.push(Rect::full(width, height));
                self.pending.clear();
            }
        }

        let mut rects = Vec::new();
        for rect in region {
            for piece in bands(rect) {
                match self.copy_rect(piece) {
                    Some(rgba) => rects.push(RectPixels { rect: piece, rgba }),
                    None => add_disjoint(&mut self.pending, piece),
                }
            }
        }
        // A resize we raced with (it would also have stamped every tile, but a resize that
        // completed before a copy leaves no trace there): drop everything, retry next poll.
        if self.size()? != (width, height) {
            self.pending.clear();
            return Ok(None);
        }
        self.last = Some((s1, total));
        self.last_size = (width, height);
        if rects.is_empty() && !full {
            return Ok(None);
        }
        Ok(Some(FrameUpdate { seq: s1, width, height, full, rects }))
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

    /// Runs of tiles (inside `width`×`height`) stamped by writes after `last_seq`.
    fn tiles_since(&self, last_seq: u64, width: u32, height: u32) -> Vec<Rect> {
        let across = tiles_across(self.max_width) as usize;
        let mut rects = Vec::new();
        for ty in 0..height.div_ceil(TILE) {
            let mut run: Option<u32> = None;
            for tx in 0..=width.div_ceil(TILE) {
                let dirty = tx < width.div_ceil(TILE) && {
                    let t = TILES_OFFSET + (ty as usize * across + tx as usize) * 8;
                    self.map.u64_at(t).load(Ordering::Relaxed) > last_seq
                };
                match (dirty, run) {
                    (true, None) => run = Some(tx),
                    (false, Some(start)) => {
                        let r = Rect::new(start * TILE, ty * TILE, (tx - start) * TILE, TILE);
                        rects.push(r.clip(width, height));
                        run = None;
                    }
                    _ => {}
                }
            }
        }
        rects
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

/// Adds `rect` to a set of disjoint rects, merging it with those it overlaps so no pixel is
/// copied twice. Unlike [`crate::rect::DirtyRegion`] there is no cap: merging distant rects
/// would copy the screen between them.
fn add_disjoint(rects: &mut Vec<Rect>, rect: Rect) {
    if rect.is_empty() || rects.iter().any(|r| r.contains(&rect)) {
        return;
    }
    let mut rect = rect;
    while let Some(i) = rects.iter().position(|r| !r.intersect(&rect).is_empty()) {
        rect = rect.union(&rects.swap_remove(i));
    }
    rects.push(rect);
}

/// `rect` cut into bands of at most [`BAND_ROWS`] rows.
fn bands(rect: Rect) -> impl Iterator<Item = Rect> {
    (0..rect.height.div_ceil(BAND_ROWS)).map(move |i| {
        let y = i * BAND_ROWS;
        Rect::new(rect.x, rect.y + y, rect.width, (rect.height - y).min(BAND_ROWS))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PixelFormat;

    fn frame(max_w: u32, max_h: u32) -> (tempfile::TempDir, FrameWriter) {
        let dir = tempfile::tempdir().unwrap();
        let writer = FrameWriter::create(&dir.path().join("frame"), max_w, max_h).unwrap();
        (dir, writer)
    }

    /// Fills `rect` with a pixel derived from its position and `salt`.
    fn paint(writer: &mut FrameWriter, rect: Rect, salt: u8) {
        writer.update(&[rect], |f| {
            let stride = f.stride();
            for y in rect.y..rect.y + rect.height {
                for x in rect.x..rect.x + rect.width {
                    let o = y as usize * stride + x as usize * 4;
                    f.pixels_mut()[o..o + 4].copy_from_slice(&expected(x, y, salt));
                }
            }
        });
    }

    fn expected(x: u32, y: u32, salt: u8) -> [u8; 4] {
        [x as u8, y as u8, salt, 0xff]
    }

    fn assert_pixels(rp: &RectPixels, salt: u8) {
        let r = rp.rect;
        assert_eq!(rp.rgba.len(), r.area() as usize * 4);
        for (i, px) in rp.rgba.chunks_exact(4).enumerate() {
            let (x, y) = (r.x + i as u32 % r.width, r.y + i as u32 / r.width);
            assert_eq!(px, expected(x, y, salt), "pixel ({x}, {y})");
        }
    }

    fn covered(update: &FrameUpdate) -> u64 {
        update.rects.iter().map(|r| r.rect.area()).sum()
    }

    #[test]
    fn first_poll_is_full_then_only_dirty_rects() {
        let (_dir, mut w) = frame(128, 96);
        w.resize(64, 48).unwrap();
        let mut r = FrameReader::open(w.path()).unwrap();
        let first = r.poll().unwrap().unwrap();
        assert!(first.full);
        assert_eq!((first.width, first.height), (64, 48));
        assert_eq!(covered(&first), 64 * 48);
        assert!(first.rects.iter().all(|rp| rp.rgba.chunks_exact(4).all(|p| p == [0, 0, 0, 0xff])));
        assert_eq!(r.poll().unwrap(), None);

        paint(&mut w, Rect::new(3, 4, 5, 6), 7);
        paint(&mut w, Rect::new(40, 30, 2, 2), 9);
        let update = r.poll().unwrap().unwrap();
        assert!(!update.full);
        assert_eq!(update.rects.len(), 2);
        for rp in &update.rects {
            assert_pixels(rp, if rp.rect.x == 3 { 7 } else { 9 });
        }
        assert_eq!(r.poll().unwrap(), None);
    }

    #[test]
    fn dirty_rects_are_clipped_to_the_visible_frame() {
        let (_dir, mut w) = frame(128, 96);
        w.resize(64, 48).unwrap();
        let mut r = FrameReader::open(w.path()).unwrap();
        r.poll().unwrap();
        paint(&mut w, Rect::new(60, 40, 100, u32::MAX).clip(64, 48), 1);
        w.update(&[Rect::new(u32::MAX, u32::MAX, 5, 5)], |_| ());
        let update = r.poll().unwrap().unwrap();
        assert_eq!(update.rects.len(), 1);
        assert_eq!(update.rects[0].rect, Rect::new(60, 40, 4, 8));
        assert_pixels(&update.rects[0], 1);
    }

    #[test]
    fn reader_behind_the_ring_catches_up_from_the_changed_tiles() {
        let (_dir, mut w) = frame(256, 256);
        w.resize(256, 200).unwrap();
        let mut r = FrameReader::open(w.path()).unwrap();
        r.poll().unwrap();
        for i in 0..RING_LEN as u32 {
            paint(&mut w, Rect::new(i % 8, i / 8, 1, 1), 3);
        }
        paint(&mut w, Rect::new(250, 199, 1, 1), 3);
        let update = r.poll().unwrap().unwrap();
        assert!(!update.full);
        // Only the two tiles written to, clipped to the frame, with correct pixels.
        let tiles = [Rect::new(0, 0, 64, 64), Rect::new(192, 192, 64, 8)];
        assert!(update.rects.iter().all(|rp| tiles.iter().any(|t| t.contains(&rp.rect))));
        assert_eq!(covered(&update), 64 * 64 + 64 * 8);
        let painted = &update.rects.iter().find(|rp| rp.rect.x == 0).unwrap().rgba;
        assert_eq!(&painted[..4], &expected(0, 0, 3));
        assert_eq!(&painted[8 * 4..8 * 4 + 4], &[0, 0, 0, 0xff]);
        // Exactly RING_LEN behind is still served from the ring, rect by rect.
        for i in 0..RING_LEN as u32 {
            paint(&mut w, Rect::new(i * 2, 100, 1, 1), 4);
        }
        let update = r.poll().unwrap().unwrap();
        assert!(!update.full);
        assert_eq!(covered(&update), RING_LEN as u64);
    }

    #[test]
    fn too_many_rects_in_one_write_become_full_screen() {
        let (_dir, mut w) = frame(64, 64);
        w.resize(64, 64).unwrap();
        let mut r = FrameReader::open(w.path()).unwrap();
        r.poll().unwrap();
        let rects: Vec<Rect> =
            (0..RING_LEN as u32 + 1).map(|i| Rect::new(i % 64, 0, 1, 1)).collect();
        w.update(&rects, |_| ());
        let update = r.poll().unwrap().unwrap();
        assert_eq!(covered(&update), 64 * 64);
    }

    #[test]
    fn resize_sends_a_full_black_frame() {
        let (_dir, mut w) = frame(128, 96);
        w.resize(64, 48).unwrap();
        paint(&mut w, Rect::full(64, 48), 5);
        let mut r = FrameReader::open(w.path()).unwrap();
        r.poll().unwrap();
        w.resize(100, 20).unwrap();
        let update = r.poll().unwrap().unwrap();
        assert!(update.full);
        assert_eq!((update.width, update.height), (100, 20));
        assert_eq!(covered(&update), 100 * 20);
        assert!(update
            .rects
            .iter()
            .all(|rp| rp.rgba.chunks_exact(4).all(|p| p == [0, 0, 0, 0xff])));
        assert!(matches!(w.resize(129, 1), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn copy_torn_by_a_write_is_delivered_after_it() {
        let (_dir, mut w) = frame(64, 64);
        w.resize(64, 64).unwrap();
        let mut r = FrameReader::open(w.path()).unwrap();
        r.poll().unwrap();
        paint(&mut w, Rect::new(0, 40, 8, 8), 1);
        let rect = Rect::new(0, 0, 8, 8);
        // Poll from inside a write: the rect is declared, its pixels half written.
        let during = w.update(&[rect], |f| {
            f.pixels_mut()[..16].copy_from_slice(&[9; 16]);
            r.poll().unwrap()
        });
        // The finished rect from before may come through; the torn one must not.
        if let Some(u) = &during {
            assert!(u.rects.iter().all(|rp| rp.rect.intersect(&rect).is_empty()));
        }
        let after = r.poll().unwrap().unwrap();
        let rp = after.rects.iter().find(|rp| rp.rect == rect).unwrap();
        assert_eq!(&rp.rgba[..16], &[9; 16]);
        assert_eq!(r.poll().unwrap(), None);
    }

    #[test]
    fn snapshot_is_the_whole_visible_frame() {
        let (_dir, mut w) = frame(128, 96);
        w.resize(30, 20).unwrap();
        paint(&mut w, Rect::full(30, 20), 6);
        let r = FrameReader::open(w.path()).unwrap();
        let snap = r.snapshot().unwrap();
        assert_eq!((snap.width, snap.height), (30, 20));
        assert_pixels(&RectPixels { rect: Rect::full(30, 20), rgba: snap.rgba }, 6);
    }

    #[test]
    fn cursor_serial_changes_only_with_the_image() {
        let (_dir, mut w) = frame(64, 64);
        let r = FrameReader::open(w.path()).unwrap();
        assert_eq!(r.cursor(), None);
        let img = CursorImage {
            width: 2,
            height: 1,
            hot_x: 5,
            hot_y: 0,
            format: PixelFormat::B8G8R8A8,
            data: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        w.set_cursor(Some(&img)).unwrap();
        let c = r.cursor().unwrap();
        assert!(c.visible);
        assert_eq!((c.width, c.height, c.hot_x, c.hot_y), (2, 1, 1, 0));
        assert_eq!(c.rgba, vec![3, 2, 1, 4, 7, 6, 5, 8]);
        let seq = r.cursor_seq();
        w.move_cursor(10, 20);
        assert_ne!(r.cursor_seq(), seq);
        let moved = r.cursor().unwrap();
        assert_eq!((moved.x, moved.y, moved.serial), (10, 20, c.serial));
        w.set_cursor(None).unwrap();
        assert!(!r.cursor().unwrap().visible);
        // A short image is refused and hides the cursor.
        let bad = CursorImage { data: vec![0; 3], ..img.clone() };
        assert!(matches!(w.set_cursor(Some(&bad)), Err(FrameError::Cursor(_))));
        assert!(!r.cursor().unwrap().visible);
        // A huge one is clipped.
        let big = CursorImage { width: 100, height: 70, data: vec![0xff; 100 * 70 * 4], ..img };
        w.set_cursor(Some(&big)).unwrap();
        let c = r.cursor().unwrap();
        assert_eq!((c.width, c.height), (CURSOR_MAX, CURSOR_MAX));
        assert!(c.serial > moved.serial);
    }

    #[test]
    fn create_replaces_a_stale_file_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frame");
        std::fs::write(&path, b"stale").unwrap();
        let w = FrameWriter::create(&path, 16, 16).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), file_len(16, 16));
        FrameReader::open(w.path()).unwrap();
        assert!(FrameWriter::create(&path, 0, 16).is_err());
        assert!(FrameWriter::create(&path, MAX_WIDTH + 1, 16).is_err());
    }

    #[test]
    fn bad_files_are_rejected_with_clear_errors() {
        let (dir, w) = frame(16, 16);
        let good = std::fs::read(w.path()).unwrap();
        let bad = dir.path().join("bad");
        let open = |bytes: &[u8]| {
            std::fs::write(&bad, bytes).unwrap();
            FrameReader::open(&bad).err()
        };
        let patch = |off: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(bytes);
            b
        };
        assert!(matches!(open(&good[..100]), Some(FrameError::Truncated { .. })));
        assert!(matches!(open(&[]), Some(FrameError::Truncated { .. })));
        assert!(matches!(open(&good[..good.len() - 1]), Some(FrameError::Truncated { .. })));
        assert!(matches!(open(&patch(0, b"HUTCHFB0")), Some(FrameError::BadMagic)));
        assert!(matches!(
            open(&patch(H_VERSION, &2u32.to_ne_bytes())),
            Some(FrameError::BadVersion(2))
        ));
        assert!(matches!(
            open(&patch(H_MAX_WIDTH, &u32::MAX.to_ne_bytes())),
            Some(FrameError::Corrupt(_))
        ));
        // Claims a bigger screen than the file holds.
        let mut bigger = patch(H_MAX_WIDTH, &32u32.to_ne_bytes());
        bigger[H_STRIDE..H_STRIDE + 4].copy_from_slice(&128u32.to_ne_bytes());
        assert!(matches!(open(&bigger), Some(FrameError::Truncated { .. })));
        assert!(matches!(
            open(&patch(H_PIXELS_OFFSET, &0u32.to_ne_bytes())),
            Some(FrameError::Corrupt(_))
        ));
        // A size past the maximum, written after open, fails the poll instead of reading past.
        std::fs::write(&bad, &good).unwrap();
        let mut r = FrameReader::open(&bad).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
        use std::io::{Seek, SeekFrom, Write};
        f.seek(SeekFrom::Start(H_WIDTH as u64)).unwrap();
        f.write_all(&1000u32.to_ne_bytes()).unwrap();
        f.seek(SeekFrom::Start(H_SEQ as u64)).unwrap();
        f.write_all(&2u64.to_ne_bytes()).unwrap();
        assert!(matches!(r.poll(), Err(FrameError::Corrupt(_))));
        assert!(r.snapshot().is_err());
    }

    #[test]
    fn hostile_ring_entries_are_clipped() {
        let (dir, mut w) = frame(16, 16);
        w.resize(16, 16).unwrap();
        let path = dir.path().join("frame");
        let mut r = FrameReader::open(&path).unwrap();
        r.poll().unwrap();
        w.update(&[Rect::new(0, 0, 1, 1)], |_| ());
        // Rewrite the entry as a rect far outside the frame.
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start((H_RING + RING_ENTRY + 8) as u64)).unwrap();
        for v in [u32::MAX - 1, 3, u32::MAX, u32::MAX] {
            f.write_all(&v.to_ne_bytes()).unwrap();
        }
        f.flush().unwrap();
        assert_eq!(r.poll().unwrap(), None);
    }

    #[test]
    fn concurrent_reader_converges_to_the_writers_frame() {
        let (_dir, mut w) = frame(256, 128);
        w.resize(200, 100).unwrap();
        let mut r = FrameReader::open(w.path()).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut texture = vec![0u8; 200 * 100 * 4];
                let mut apply = |r: &mut FrameReader| {
                    let Some(u) = r.poll().unwrap() else {
                        return false;
                    };
                    for rp in u.rects {
                        let row = rp.rect.width as usize * 4;
                        for (i, src) in rp.rgba.chunks_exact(row).enumerate() {
                            let o = (rp.rect.y as usize + i) * 800 + rp.rect.x as usize * 4;
                            texture[o..o + row].copy_from_slice(src);
                        }
                    }
                    true
                };
                while !done.load(Ordering::Acquire) {
                    apply(&mut r);
                }
                while apply(&mut r) {}
                (texture, r)
            })
        };
        // Overlapping rects of varied sizes (some past the edge), some multi-rect writes.
        let mut x: u32 = 12345;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for n in 0..3000u32 {
            let rects: Vec<Rect> = (0..1 + next() % 3)
                .map(|_| Rect::new(next() % 210, next() % 110, 1 + next() % 90, 1 + next() % 60))
                .collect();
            w.update(&rects, |f| {
                let stride = f.stride();
                for r in &rects {
                    let r = r.clip(200, 100);
                    for y in r.y..r.bottom() as u32 {
                        let o = y as usize * stride + r.x as usize * 4;
                        for p in f.pixels_mut()[o..o + r.width as usize * 4].chunks_exact_mut(4) {
                            p.copy_from_slice(&n.to_le_bytes());
                        }
                    }
                }
            });
        }
        done.store(true, Ordering::Release);
        let (texture, r) = reader.join().unwrap();
        let snap = r.snapshot().unwrap();
        assert!(texture == snap.rgba, "the reader's copy differs from the frame");
    }
}
