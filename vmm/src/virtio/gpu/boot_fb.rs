//! The boot framebuffer: host memory mapped into the guest as the GPU's RAM BAR 0 (wherever
//! the guest puts that BAR) and described at boot as a linear framebuffer, scanned for
//! changes into a shadow copy and sent to the [`ScanoutSink`] as [`SourceId::BootFramebuffer`].
//!
//! The guest writes the framebuffer while [`BootFramebuffer::scan`] reads it: every read goes
//! through a `VolatileSlice` (volatile copies), and a torn pixel is simply seen as changed
//! again on the next scan.

use std::sync::{Arc, Mutex};

use display::{Image, PixelFormat, Rect, ScanoutSink, SourceId};
use vm_memory::VolatileSlice;

use super::VirtioGpuError;
use crate::devices::bus::lock;
use crate::memory::slots::HostMemory;
use crate::state::StateError;

pub const DEFAULT_WIDTH: u32 = 1024;
pub const DEFAULT_HEIGHT: u32 = 768;
const BYTES_PER_PIXEL: u32 = 4;
/// Tile size of the change detection, in pixels.
const TILE_WIDTH: u32 = 64;
const TILE_HEIGHT: u32 = 16;
/// Beyond this many rectangles one bounding rectangle is sent instead.
const MAX_RECTS: usize = 32;

/// An anonymous host mapping holding the guest-visible framebuffer, and its mode.
pub struct BootFramebuffer {
    ptr: *mut u8,
    size: usize,
    width: u32,
    height: u32,
    stride: u32,
    /// Where the first row starts in the mapping (a guest panning its view).
    offset: usize,
    format: PixelFormat,
    /// What the sink was last sent, `stride * height` bytes.
    shadow: Vec<u8>,
    row: Vec<u8>,
    /// Dirty flags of the last scan, one per tile.
    dirty: Vec<bool>,
    /// The next scan sends everything (after a restore replaced the contents).
    rescan: bool,
}

// SAFETY: the mapping is owned by this value alone (the guest's view of it is memory, not a
// Rust reference); the raw pointer is only used through volatile accesses.
unsafe impl Send for BootFramebuffer {}

impl BootFramebuffer {
    /// Maps `size` bytes (rounded up to a page) of zeroed memory, in the default mode
    /// 1024×768, 32 bpp XRGB8888 (bytes B, G, R, X).
    pub fn new(size: usize) -> Result<BootFramebuffer, VirtioGpuError> {
        let len = size.max(1).next_multiple_of(4096);
        // SAFETY: an anonymous private mapping at an address the kernel chooses touches no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VirtioGpuError::Mmap { size, source: std::io::Error::last_os_error() });
        }
        let mut fb = BootFramebuffer {
            ptr: ptr.cast(),
            size: len,
            width: 0,
            height: 0,
            stride: 0,
            offset: 0,
            format: PixelFormat::B8G8R8X8,
            shadow: Vec::new(),
            row: Vec::new(),
            dirty: Vec::new(),
            rescan: false,
        };
        fb.set_mode(DEFAULT_WIDTH, DEFAULT_HEIGHT, DEFAULT_WIDTH * BYTES_PER_PIXEL)?;
        // Nothing was shown yet: the first scan sends only what the guest changed.
        fb.rescan = false;
        Ok(fb)
    }

    /// Changes the mode (what the boot parameters will describe); the next scan is full.
    pub fn set_mode(&mut self, width: u32, height: u32, stride: u32) -> Result<(), VirtioGpuError> {
        self.set_mode_at(width, height, stride, 0, PixelFormat::B8G8R8X8)
    }

    /// Changes the mode to `width`×`height` rows of `stride` bytes starting `offset` bytes
    /// into the mapping, in `format` (32 bits a pixel); the next scan is full.
    pub fn set_mode_at(
        &mut self,
        width: u32,
        height: u32,
        stride: u32,
        offset: usize,
        format: PixelFormat,
    ) -> Result<(), VirtioGpuError> {
        let bad = || VirtioGpuError::BadMode { width, height, stride, size: self.size };
        let row = width.checked_mul(BYTES_PER_PIXEL).ok_or_else(bad)?;
        let total = u64::from(stride) * u64::from(height);
        if width == 0
            || height == 0
            || stride < row
            || (offset as u64).saturating_add(total) > self.size as u64
        {
            return Err(bad());
        }
        self.width = width;
        self.height = height;
        self.stride = stride;
        self.offset = offset;
        self.format = format;
        self.rescan = true;
        self.shadow = vec![0; total as usize];
        self.row = vec![0; stride as usize];
        self.dirty = vec![false; (self.tiles_x() * self.tiles_y()) as usize];
        Ok(())
    }

    /// Start of the mapping, for the machine to map into the guest at the BAR address. Valid
    /// as long as this value lives: the VM's memory slot must be removed before dropping it.
    pub fn host_addr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length of the mapping in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Bytes per row.
    pub fn stride(&self) -> u32 {
        self.stride
    }

    /// Where the first row starts in the mapping.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The pixel format: Linux's XRGB8888 (bytes B, G, R, X in memory) unless
    /// [`BootFramebuffer::set_mode_at`] chose another.
    pub fn format(&self) -> PixelFormat {
        self.format
    }

    fn tiles_x(&self) -> u32 {
        self.width.div_ceil(TILE_WIDTH)
    }

    fn tiles_y(&self) -> u32 {
        self.height.div_ceil(TILE_HEIGHT)
    }

    fn memory(&self) -> VolatileSlice<'_> {
        // SAFETY: `ptr` is a live mapping of `size` bytes owned by `self`, which the borrow
        // keeps alive; other writers (the guest) are why accesses must be volatile.
        unsafe { VolatileSlice::new(self.ptr, self.size) }
    }

    /// The whole mapping, for a snapshot. Read it only while the guest is paused: vCPUs
    /// write it without any lock.
    pub fn contents(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `size` bytes owned by `self` for the borrow's
        // life; the caller keeps the guest (the only other writer) paused while reading.
        unsafe { std::slice::from_raw_parts(self.ptr, self.size) }
    }

    /// The mapping up to its last page that is not all zero: what a snapshot keeps (a 16 MiB
    /// region of which a console uses 3 MiB, or nothing).
    pub fn used_contents(&self) -> &[u8] {
        let all = self.contents();
        let pages = all.chunks(4096).rposition(|page| page.iter().any(|&b| b != 0));
        &all[..pages.map_or(0, |last| ((last + 1) * 4096).min(all.len()))]
    }

    /// Puts saved contents back (at most the mapping's length; the rest reads as zero); the
    /// next scan is full.
    pub fn restore_contents(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        if bytes.len() > self.size {
            return Err(StateError::invalid(
                "boot framebuffer",
                format!("{} bytes saved, the mapping has {}", bytes.len(), self.size),
            ));
        }
        // In range: `bytes.len() <= self.size` was checked above.
        if let Ok(used) = self.memory().subslice(0, bytes.len()) {
            used.copy_from(bytes);
        }
        self.zero(bytes.len(), self.size);
        Ok(())
    }

    /// Zeroes the first `len` bytes of the mapping (at most all of it), as a display
    /// clears its memory on a mode set; the next scan is full (the hypervisor's dirty log
    /// does not see the host's writes).
    pub fn clear(&mut self, len: usize) {
        self.zero(0, len.min(self.size));
    }

    fn zero(&mut self, from: usize, to: usize) {
        const ZEROES: [u8; 4096] = [0; 4096];
        let memory = self.memory();
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROES.len());
            if let Ok(piece) = memory.subslice(at, n) {
                piece.copy_from(&ZEROES[..n]);
            }
            at += n;
        }
        self.rescan = true;
    }

    /// Sends what changed since the last scan (everything when `force_full`) to `sink`.
    pub fn scan(&mut self, sink: &dyn ScanoutSink, force_full: bool) {
        self.scan_written(sink, force_full, None);
    }

    /// Like [`BootFramebuffer::scan`], comparing only the rows on pages marked in `written`
    /// (the hypervisor's dirty log of this mapping: bit `i % 64` of word `i / 64` for 4 KiB
    /// page `i`); None compares every row.
    pub fn scan_written(
        &mut self,
        sink: &dyn ScanoutSink,
        force_full: bool,
        written: Option<&[u64]>,
    ) {
        let force_full = force_full || std::mem::take(&mut self.rescan);
        let covered = self.offset + self.stride as usize * self.height as usize;
        if !force_full
            && written.is_some_and(|pages| {
                pages.len() * 64 * 4096 >= covered && pages.iter().all(|&word| word == 0)
            })
        {
            return;
        }
        let rects = if force_full {
            let len = self.shadow.len();
            let mut shadow = std::mem::take(&mut self.shadow);
            if let Ok(src) = self.memory().subslice(self.offset, len) {
                src.copy_to(&mut shadow[..]);
            }
            self.shadow = shadow;
            vec![Rect::new(0, 0, self.width, self.height)]
        } else {
            self.find_changes(written);
            self.dirty_rects()
        };
        let image = Image {
            data: &self.shadow,
            width: self.width,
            height: self.height,
            stride: self.stride,
            format: self.format(),
        };
        for r in rects {
            sink.update(SourceId::BootFramebuffer, &image, r);
        }
    }

    /// Compares the framebuffer with the shadow row by row (only rows on `written` pages,
    /// when given), copying changed tile segments into the shadow and marking their tiles
    /// dirty.
    fn find_changes(&mut self, written: Option<&[u64]>) {
        self.dirty.fill(false);
        let stride = self.stride as usize;
        let tiles_x = self.tiles_x() as usize;
        let seg = (TILE_WIDTH * BYTES_PER_PIXEL) as usize;
        let row_len = (self.width * BYTES_PER_PIXEL) as usize;
        let offset = self.offset;
        let mut row = std::mem::take(&mut self.row);
        for y in 0..self.height as usize {
            if let Some(pages) = written {
                if !any_page_written(pages, offset + y * stride, row_len) {
                    continue;
                }
            }
            let Ok(src) = self.memory().subslice(offset + y * stride, row_len) else {
                break;
            };
            src.copy_to(&mut row[..row_len]);
            let shadow_row = &mut self.shadow[y * stride..y * stride + row_len];
            let tile_row = y / TILE_HEIGHT as usize;
            for tx in 0..tiles_x {
                let a = tx * seg;
                let b = (a + seg).min(row_len);
                if row[a..b] != shadow_row[a..b] {
                    shadow_row[a..b].copy_from_slice(&row[a..b]);
                    self.dirty[tile_row * tiles_x + tx] = true;
                }
            }
        }
        self.row = row;
    }

    /// Dirty tiles merged into rectangles: runs along each tile row, then runs with the same
    /// horizontal span stacked across tile rows.
    fn dirty_rects(&self) -> Vec<Rect> {
        let tiles_x = self.tiles_x() as usize;
        // (x0, x1, y0, y1) in tiles, half-open.
        let mut open: Vec<(usize, usize, usize, usize)> = Vec::new();
        let mut done = Vec::new();
        for ty in 0..self.tiles_y() as usize {
            let mut runs = Vec::new();
            let mut tx = 0;
            while tx < tiles_x {
                if self.dirty[ty * tiles_x + tx] {
                    let start = tx;
                    while tx < tiles_x && self.dirty[ty * tiles_x + tx] {
                        tx += 1;
                    }
                    runs.push((start, tx));
                } else {
                    tx += 1;
                }
            }
            let mut next_open = Vec::new();
            for (x0, x1) in runs {
                match open.iter().position(|o| o.0 == x0 && o.1 == x1 && o.3 == ty) {
                    Some(i) => {
                        let mut o = open.swap_remove(i);
                        o.3 = ty + 1;
                        next_open.push(o);
                    }
                    None => next_open.push((x0, x1, ty, ty + 1)),
                }
            }
            done.append(&mut open);
            open = next_open;
        }
        done.append(&mut open);
        let to_rect = |(x0, x1, y0, y1): (usize, usize, usize, usize)| {
            let x = x0 as u32 * TILE_WIDTH;
            let y = y0 as u32 * TILE_HEIGHT;
            let right = (x1 as u32 * TILE_WIDTH).min(self.width);
            let bottom = (y1 as u32 * TILE_HEIGHT).min(self.height);
            Rect::new(x, y, right - x, bottom - y)
        };
        if done.len() > MAX_RECTS {
            let x0 = done.iter().map(|d| d.0).min().unwrap_or(0);
            let x1 = done.iter().map(|d| d.1).max().unwrap_or(0);
            let y0 = done.iter().map(|d| d.2).min().unwrap_or(0);
            let y1 = done.iter().map(|d| d.3).max().unwrap_or(0);
            return vec![to_rect((x0, x1, y0, y1))];
        }
        done.into_iter().map(to_rect).collect()
    }
}

impl Drop for BootFramebuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are exactly the mapping made in `new`, unmapped once here.
        unsafe {
            libc::munmap(self.ptr.cast(), self.size);
        }
    }
}

/// The framebuffer's memory as a RAM BAR's backing, kept alive by `fb` itself (so it outlives
/// every mapping the PCI root makes of it), with a dirty-page log for the scanner. (None only
/// if the mapping were not page-aligned, which mmap rules out.)
pub fn host_memory(fb: &Arc<Mutex<BootFramebuffer>>) -> Option<HostMemory> {
    let (addr, len) = {
        let fb = lock(fb);
        (fb.ptr, fb.size as u64)
    };
    // SAFETY: `ptr .. ptr + size` is the page-aligned anonymous mapping the framebuffer made
    // in `new` (its length a multiple of the page size) and unmaps only when dropped; the
    // `HostMemory` holds `fb`, so it lives at least as long. Rust only reads it through
    // volatile slices.
    unsafe { HostMemory::new(addr, len, true, fb.clone()) }
}

/// Whether a page of `start .. start + len` is marked in the dirty-page bitmap `pages`; a
/// page past the bitmap's end counts as written (a short log must not hide a change).
fn any_page_written(pages: &[u64], start: usize, len: usize) -> bool {
    const PAGE: usize = 4096;
    let first = start / PAGE;
    let last = (start + len.max(1) - 1) / PAGE;
    (first..=last).any(|page| pages.get(page / 64).is_none_or(|word| word >> (page % 64) & 1 == 1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use crate::virtio::gpu::device::testing::RecordingScreen;

    fn poke(fb: &BootFramebuffer, x: u32, y: u32, pixel: u32) {
        let at = (y * fb.stride() + x * 4) as usize;
        fb.memory().subslice(at, 4).unwrap().copy_from(&pixel.to_le_bytes());
    }

    #[test]
    fn unchanged_framebuffer_sends_nothing_and_full_scan_sends_everything() {
        let mut fb = BootFramebuffer::new(4 << 20).unwrap();
        let screen = RecordingScreen::default();
        fb.scan(&screen, false);
        assert!(screen.updates().is_empty());
        fb.scan(&screen, true);
        assert_eq!(screen.updates(), vec![(SourceId::BootFramebuffer, Rect::new(0, 0, 1024, 768))]);
    }

    #[test]
    fn changed_pixels_are_sent_as_their_tiles_with_the_new_pixels() {
        let mut fb = BootFramebuffer::new(4 << 20).unwrap();
        let screen = RecordingScreen::default();
        poke(&fb, 70, 20, 0x00ff_0000);
        poke(&fb, 1000, 760, 0x0000_ff00);
        fb.scan(&screen, false);
        let mut got = screen.updates();
        got.sort_by_key(|u| (u.1.y, u.1.x));
        assert_eq!(
            got,
            vec![
                (SourceId::BootFramebuffer, Rect::new(64, 16, 64, 16)),
                (SourceId::BootFramebuffer, Rect::new(960, 752, 64, 16)),
            ]
        );
        assert_eq!(screen.pixel(70, 20), Some(0x00ff_0000));
        fb.scan(&screen, false);
        assert_eq!(screen.updates().len(), 2, "nothing new on a second scan");
    }

    #[test]
    fn guest_writes_reach_a_shared_frame_reader_through_the_screen() {
        use display::frame::{FrameReader, FrameWriter};
        use display::scanout::Screen;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("display.shm");
        let screen = Screen::new(FrameWriter::create(&path, 1920, 1080).unwrap());
        screen.set_mode(SourceId::BootFramebuffer, Some((1024, 768)));
        let mut fb = BootFramebuffer::new(16 << 20).unwrap();
        fb.scan(&screen, true);
        poke(&fb, 100, 200, 0x00ff_8040);
        fb.scan(&screen, false);
        let image = FrameReader::open(&path).unwrap().snapshot().unwrap();
        assert_eq!((image.width, image.height), (1024, 768));
        let at = (200 * 1024 + 100) * 4;
        assert_eq!(&image.rgba[at..at + 4], &[0xff, 0x80, 0x40, 0xff]);
    }

    #[test]
    fn a_scan_with_a_dirty_log_compares_only_the_rows_on_written_pages() {
        let mut fb = BootFramebuffer::new(4 << 20).unwrap();
        let screen = RecordingScreen::default();
        // Stride 4096: row y is page y. Rows 20 and 100 change; the log names page 20 only.
        poke(&fb, 70, 20, 0x00ff_0000);
        poke(&fb, 70, 100, 0x0000_ff00);
        let mut log = vec![0u64; 1024 / 64];
        log[0] = 1 << 20;
        fb.scan_written(&screen, false, Some(&log));
        assert_eq!(screen.updates(), vec![(SourceId::BootFramebuffer, Rect::new(64, 16, 64, 16))]);
        fb.scan_written(&screen, false, Some(&[0; 16]));
        assert_eq!(screen.updates().len(), 1, "an empty log means nothing to compare");
        // A log too short to cover a row counts that row as written.
        fb.scan_written(&screen, false, Some(&[0]));
        assert_eq!(screen.updates().len(), 2);
        assert_eq!(screen.pixel(70, 100), Some(0x0000_ff00));
    }

    #[test]
    fn adjacent_dirty_tiles_merge() {
        let mut fb = BootFramebuffer::new(4 << 20).unwrap();
        let screen = RecordingScreen::default();
        for y in 0..40 {
            for x in 0..200 {
                poke(&fb, x, y, 0xffff_ffff);
            }
        }
        fb.scan(&screen, false);
        assert_eq!(screen.updates(), vec![(SourceId::BootFramebuffer, Rect::new(0, 0, 256, 48))]);
    }

    #[test]
    fn mode_larger_than_the_mapping_is_refused() {
        let mut fb = BootFramebuffer::new(4 << 20).unwrap();
        assert!(fb.set_mode(2048, 1024, 8192).is_err());
        assert!(BootFramebuffer::new(1 << 20).is_err(), "the default mode must fit");
        assert!(fb.set_mode(100, 100, 399).is_err());
        fb.set_mode(320, 200, 1280).unwrap();
        assert_eq!((fb.width(), fb.height(), fb.stride()), (320, 200, 1280));
    }

    #[test]
    fn a_mode_at_an_offset_scans_rows_from_there_and_a_mode_change_rescans() {
        let mut fb = BootFramebuffer::new(4 << 20).unwrap();
        let screen = RecordingScreen::default();
        // 640×480 rows of 800 pixels, panned to (16, 2).
        let stride = 800 * 4;
        let offset = 2 * stride as usize + 16 * 4;
        fb.set_mode_at(640, 480, stride, offset, PixelFormat::B8G8R8X8).unwrap();
        assert_eq!((fb.width(), fb.offset()), (640, offset));
        let at = offset + 10 * stride as usize + 5 * 4;
        fb.memory().subslice(at, 4).unwrap().copy_from(&0x00ab_cdefu32.to_le_bytes());
        fb.scan_written(&screen, false, Some(&[0; 16]));
        assert_eq!(
            screen.updates(),
            vec![(SourceId::BootFramebuffer, Rect::new(0, 0, 640, 480))],
            "a new mode is sent in full even when the dirty log is empty"
        );
        assert_eq!(screen.pixel(5, 10), Some(0x00ab_cdef));
        assert!(fb.set_mode_at(640, 480, stride, (4 << 20) - 100, PixelFormat::B8G8R8X8).is_err());
        assert_eq!(fb.offset(), offset, "a refused mode changes nothing");
    }

    #[test]
    fn clearing_zeroes_the_start_and_the_next_scan_sends_everything() {
        let mut fb = BootFramebuffer::new(4 << 20).unwrap();
        let screen = RecordingScreen::default();
        poke(&fb, 10, 20, 0x00ff_8040);
        poke(&fb, 10, 700, 0x0000_ff00);
        fb.scan(&screen, false);
        let sent = screen.updates().len();
        fb.clear(100 * 4096);
        fb.scan_written(&screen, false, Some(&[0; 16]));
        assert_eq!(screen.updates().len(), sent + 1);
        assert_eq!(screen.pixel(10, 20), Some(0), "cleared");
        assert_eq!(screen.pixel(10, 700), Some(0x0000_ff00), "beyond the cleared part");
    }

    #[test]
    fn restored_contents_are_sent_in_full_and_a_too_long_save_is_refused() {
        let fb = BootFramebuffer::new(1024 * 768 * 4).unwrap();
        poke(&fb, 10, 20, 0x00ff_8040);
        let saved = fb.used_contents().to_vec();
        assert_eq!(saved.len(), 21 * 4096, "saved up to the last written page (row 20)");
        let mut fresh = BootFramebuffer::new(1024 * 768 * 4).unwrap();
        poke(&fresh, 500, 700, 0x0000_00ff);
        let screen = RecordingScreen::default();
        let mut too_long = saved.clone();
        too_long.resize(fresh.len() + 1, 0);
        assert!(matches!(fresh.restore_contents(&too_long), Err(StateError::Invalid { .. })));
        assert_eq!(fresh.used_contents().len(), 701 * 4096, "a refused restore changes nothing");
        fresh.restore_contents(&saved).unwrap();
        assert_eq!(&fresh.contents()[..saved.len()], &saved[..]);
        assert!(fresh.contents()[saved.len()..].iter().all(|&b| b == 0), "the rest is cleared");
        fresh.scan(&screen, false);
        assert_eq!(screen.updates(), vec![(SourceId::BootFramebuffer, Rect::new(0, 0, 1024, 768))]);
        assert_eq!(screen.pixel(10, 20), Some(0x00ff_8040));
        assert_eq!(screen.pixel(500, 700), Some(0));
        let blank = BootFramebuffer::new(1024 * 768 * 4).unwrap();
        assert!(blank.used_contents().is_empty(), "an unused framebuffer saves nothing");
    }
}
