//! The guest screen: a watcher thread follows the VM's shared-memory frame
//! (`display::frame`), converts changed rectangles to egui images off the UI thread and
//! leaves them in a mailbox; the UI thread uploads only those rectangles
//! (`TextureHandle::set_partial`). An idle screen costs a sequence-number read every few
//! milliseconds and no repaint. The guest's cursor (virtio-gpu's cursor plane) travels the
//! same way and is drawn over the image ([`cursor_rect`]); its texture is uploaded only when
//! the image changes (its serial), not when it moves.
//!
//! ```text
//!  display.shm ─▶ watcher thread: seq() changed? ─▶ poll() ─▶ Mailbox ─▶ UI: set_partial
//!                                                                  └─▶ request_repaint
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use display::frame::{CursorState, FrameReader, FrameUpdate};
use display::pointer::Viewport;
use egui::{Color32, ColorImage, TextureHandle, TextureOptions};

/// How often the watcher looks at the frame's sequence number.
const WATCH_INTERVAL: Duration = Duration::from_millis(4);
/// How often it retries opening a frame file that is not there (yet).
const OPEN_RETRY: Duration = Duration::from_millis(500);
/// How often it checks that the frame file is still the one it reads: a VM process that
/// restarts (a snapshot restore) puts a new file in its place.
const REPLACED_CHECK: Duration = Duration::from_millis(250);
/// More pending rectangles than this and the UI gets one whole frame instead.
const MAX_PENDING_RECTS: usize = 64;
/// Largest thumbnail side in the library view.
const THUMB_MAX: (u32, u32) = (192, 120);

#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    #[error("Cannot read the VM's screen {path}")]
    Frame {
        path: PathBuf,
        #[source]
        source: display::frame::FrameError,
    },
    #[error("Cannot write {path}")]
    Png {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
    #[error("The VM's screen is empty")]
    Empty,
}

/// Opaque egui pixels from RGBA bytes (the alpha byte is ignored: a screen is opaque).
pub fn color_image(width: u32, height: u32, rgba: &[u8]) -> ColorImage {
    let pixels = rgba.chunks_exact(4).map(|p| Color32::from_rgb(p[0], p[1], p[2])).collect();
    ColorImage::new([width as usize, height as usize], pixels)
}

/// What the watcher left for the UI.
#[derive(Default)]
struct Pending {
    /// A new whole screen (new size, or too many rectangles to bother).
    full: Option<ColorImage>,
    /// Rectangles to apply after `full`, in order.
    rects: Vec<([usize; 2], ColorImage)>,
    /// Why there is no screen (no frame file yet, a bad one).
    status: Option<String>,
    /// The cursor changed (moved, new image, hidden); Some(None): there is none.
    cursor: Option<Option<CursorState>>,
}

/// Where the guest's cursor is and what it looks like, in guest pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorPlace {
    /// Hot spot position on the guest screen.
    pub x: u32,
    pub y: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub width: u32,
    pub height: u32,
}

/// The guest's cursor, ready to draw.
pub struct GuestCursor {
    pub place: CursorPlace,
    pub texture: TextureHandle,
}

/// Where to draw the cursor image (x, y, w, h in window points): scaled like the guest image,
/// its hot spot over the guest pixel (`x`, `y`). The caller clips it to the image.
pub fn cursor_rect(viewport: &Viewport, c: &CursorPlace) -> Option<(f32, f32, f32, f32)> {
    let (gw, gh) = viewport.guest_size();
    let (vx, vy, vw, vh) = viewport.rect();
    if gw == 0 || gh == 0 || c.width == 0 || c.height == 0 {
        return None;
    }
    let (sx, sy) = (vw / gw as f32, vh / gh as f32);
    let left = (c.x as f32 - c.hot_x as f32) * sx;
    let top = (c.y as f32 - c.hot_y as f32) * sy;
    Some((vx + left, vy + top, c.width as f32 * sx, c.height as f32 * sy))
}

/// Where the UI shows the screen from.
pub struct GuestScreen {
    mailbox: Arc<Mutex<Pending>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    texture: Option<TextureHandle>,
    status: String,
    /// The guest's visible cursor, if any; its texture is kept while the guest hides it.
    cursor: Option<CursorPlace>,
    cursor_texture: Option<(u64, TextureHandle)>,
}

impl GuestScreen {
    /// Starts following the frame file at `path` (which may not exist yet).
    pub fn open(path: PathBuf, ctx: egui::Context) -> GuestScreen {
        let mailbox = Arc::new(Mutex::new(Pending::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("gui-screen".into())
            .spawn({
                let (mailbox, stop) = (mailbox.clone(), stop.clone());
                move || watch(&path, &mailbox, &stop, &ctx)
            })
            .map_err(|e| log::warn!("Cannot start the screen thread: {e}"))
            .ok();
        GuestScreen {
            mailbox,
            stop,
            thread,
            texture: None,
            status: "Waiting for the screen".into(),
            cursor: None,
            cursor_texture: None,
        }
    }

    /// Applies what the watcher left: the texture, or None while there is no screen.
    pub fn update(&mut self, ctx: &egui::Context) -> Option<&TextureHandle> {
        let pending = match self.mailbox.lock() {
            Ok(mut m) => std::mem::take(&mut *m),
            Err(_) => Pending::default(),
        };
        if let Some(status) = pending.status {
            self.status = status;
        }
        if let Some(cursor) = pending.cursor {
            self.set_cursor(ctx, cursor);
        }
        let options = TextureOptions::LINEAR;
        if let Some(full) = pending.full {
            match &mut self.texture {
                Some(t) => t.set(full, options),
                None => self.texture = Some(ctx.load_texture("guest-screen", full, options)),
            }
        }
        if let Some(texture) = &mut self.texture {
            let [tw, th] = texture.size();
            for (pos, image) in pending.rects {
                // A rectangle from before a resize may not fit the new texture.
                if pos[0] + image.width() <= tw && pos[1] + image.height() <= th {
                    texture.set_partial(pos, image, options);
                }
            }
        }
        self.texture.as_ref()
    }

    /// Why nothing is shown yet.
    pub fn status(&self) -> &str {
        &self.status
    }

    /// The guest's cursor, while it shows one.
    pub fn cursor(&self) -> Option<GuestCursor> {
        let place = self.cursor?;
        let (_, texture) = self.cursor_texture.as_ref()?;
        Some(GuestCursor { place, texture: texture.clone() })
    }

    fn set_cursor(&mut self, ctx: &egui::Context, cursor: Option<CursorState>) {
        let Some(c) = cursor.filter(|c| c.visible && c.width > 0 && c.height > 0) else {
            self.cursor = None;
            return;
        };
        let size = [c.width as usize, c.height as usize];
        if c.rgba.len() != size[0] * size[1] * 4 {
            self.cursor = None;
            return;
        }
        if self.cursor_texture.as_ref().is_none_or(|(serial, _)| *serial != c.serial) {
            // Cursors are small: a whole upload, and only when the image changes.
            let image = ColorImage::from_rgba_unmultiplied(size, &c.rgba);
            let options = TextureOptions::LINEAR;
            match &mut self.cursor_texture {
                Some((serial, t)) => {
                    t.set(image, options);
                    *serial = c.serial;
                }
                None => {
                    let t = ctx.load_texture("guest-cursor", image, options);
                    self.cursor_texture = Some((c.serial, t));
                }
            }
        }
        self.cursor = Some(CursorPlace {
            x: c.x,
            y: c.y,
            hot_x: c.hot_x,
            hot_y: c.hot_y,
            width: c.width,
            height: c.height,
        });
    }
}

impl Drop for GuestScreen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn post(mailbox: &Mutex<Pending>, f: impl FnOnce(&mut Pending)) {
    if let Ok(mut m) = mailbox.lock() {
        f(&mut m);
    }
}

/// The identity (device, inode) of the file at `path`, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether the file at `path` is a new one, not `opened`: a missing file is not (the old
/// screen stays until a new one comes).
fn replaced(path: &Path, opened: Option<(u64, u64)>) -> bool {
    file_id(path).is_some_and(|id| Some(id) != opened)
}

fn watch(path: &Path, mailbox: &Mutex<Pending>, stop: &AtomicBool, ctx: &egui::Context) {
    while !stop.load(Ordering::Relaxed) {
        // Looked at before opening: a file replaced in between is then seen as replaced.
        let opened = file_id(path);
        let mut reader = match FrameReader::open(path) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("No screen yet ({})", vmm::error_chain(&e));
                post(mailbox, |m| m.status = Some(why));
                ctx.request_repaint();
                std::thread::sleep(OPEN_RETRY);
                continue;
            }
        };
        let (mut seen, mut seen_cursor) = (None, None);
        let mut checked = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if checked.elapsed() >= REPLACED_CHECK {
                checked = std::time::Instant::now();
                if replaced(path, opened) {
                    log::debug!("{} was replaced; reopening it", path.display());
                    break;
                }
            }
            let cursor_seq = reader.cursor_seq();
            if seen_cursor != Some(cursor_seq) {
                seen_cursor = Some(cursor_seq);
                let cursor = reader.cursor();
                post(mailbox, |m| m.cursor = Some(cursor));
                ctx.request_repaint();
            }
            let seq = reader.seq();
            if seen == Some(seq) {
                std::thread::sleep(WATCH_INTERVAL);
                continue;
            }
            seen = Some(seq);
            match reader.poll() {
                Ok(Some(update)) => {
                    let status = format!("{}×{}", update.width, update.height);
                    let (full, rects) = convert(update);
                    post(mailbox, |m| {
                        m.status = Some(status);
                        if full.is_some() {
                            m.full = full;
                            m.rects.clear();
                        }
                        m.rects.extend(rects);
                        if m.rects.len() > MAX_PENDING_RECTS {
                            // The UI is far behind: one whole frame is cheaper.
                            if let Ok(s) = reader.snapshot() {
                                m.full = Some(color_image(s.width, s.height, &s.rgba));
                                m.rects.clear();
                            }
                        }
                    });
                    ctx.request_repaint();
                }
                Ok(None) => {}
                // The writer was mid-update for a long time: look again next tick.
                Err(display::frame::FrameError::Busy) => seen = None,
                Err(e) => {
                    let why = format!("Screen lost ({})", vmm::error_chain(&e));
                    post(mailbox, |m| m.status = Some(why));
                    ctx.request_repaint();
                    // Reopen: the VM may have restarted with a new file.
                    std::thread::sleep(OPEN_RETRY);
                    break;
                }
            }
        }
    }
}

type Rects = Vec<([usize; 2], ColorImage)>;

/// A frame update as egui images: a whole new screen when `full` (its rects drawn into a
/// black image of the new size), else the changed rectangles.
fn convert(update: FrameUpdate) -> (Option<ColorImage>, Rects) {
    let (w, h) = (update.width as usize, update.height as usize);
    if !update.full {
        let rects = update
            .rects
            .into_iter()
            .filter(|r| r.rgba.len() >= r.rect.width as usize * r.rect.height as usize * 4)
            .map(|r| {
                let pos = [r.rect.x as usize, r.rect.y as usize];
                (pos, color_image(r.rect.width, r.rect.height, &r.rgba))
            })
            .collect();
        return (None, rects);
    }
    let mut image = ColorImage::filled([w, h], Color32::BLACK);
    for r in &update.rects {
        let (rx, ry, rw) = (r.rect.x as usize, r.rect.y as usize, r.rect.width as usize);
        for (row, line) in r.rgba.chunks_exact(rw * 4).take(r.rect.height as usize).enumerate() {
            let y = ry + row;
            if y >= h {
                break;
            }
            for (col, p) in line.chunks_exact(4).enumerate() {
                let x = rx + col;
                if x < w {
                    image.pixels[y * w + x] = Color32::from_rgb(p[0], p[1], p[2]);
                }
            }
        }
    }
    (Some(image), Vec::new())
}

/// Follows a running VM's frame for the library view's thumbnail.
pub struct Thumbnailer {
    path: PathBuf,
    reader: Option<FrameReader>,
    /// The identity of the file `reader` reads.
    opened: Option<(u64, u64)>,
    seen: Option<u64>,
}

impl Thumbnailer {
    pub fn new(path: PathBuf) -> Thumbnailer {
        Thumbnailer { path, reader: None, opened: None, seen: None }
    }

    /// A new thumbnail when the screen changed since the last call.
    pub fn refresh(&mut self) -> Option<ColorImage> {
        if self.reader.is_some() && replaced(&self.path, self.opened) {
            self.reader = None;
            self.seen = None;
        }
        if self.reader.is_none() {
            self.opened = file_id(&self.path);
            self.reader = FrameReader::open(&self.path).ok();
        }
        let reader = self.reader.as_mut()?;
        let seq = reader.seq();
        if self.seen == Some(seq) {
            return None;
        }
        self.seen = Some(seq);
        let Ok(image) = reader.snapshot() else {
            self.reader = None;
            return None;
        };
        let (w, h, rgba) = scale_to_fit(image.width, image.height, &image.rgba, THUMB_MAX)?;
        Some(color_image(w, h, &rgba))
    }
}

/// Nearest-neighbour downscale of an RGBA image to fit `max`, aspect kept.
pub fn scale_to_fit(
    width: u32,
    height: u32,
    rgba: &[u8],
    max: (u32, u32),
) -> Option<(u32, u32, Vec<u8>)> {
    if width == 0 || height == 0 || rgba.len() < width as usize * height as usize * 4 {
        return None;
    }
    let scale =
        (f64::from(max.0) / f64::from(width)).min(f64::from(max.1) / f64::from(height)).min(1.0);
    let w = ((f64::from(width) * scale) as u32).max(1);
    let h = ((f64::from(height) * scale) as u32).max(1);
    let mut out = Vec::with_capacity(w as usize * h as usize * 4);
    for y in 0..h {
        let sy = (u64::from(y) * u64::from(height) / u64::from(h)) as usize;
        for x in 0..w {
            let sx = (u64::from(x) * u64::from(width) / u64::from(w)) as usize;
            let i = (sy * width as usize + sx) * 4;
            out.extend_from_slice(&rgba[i..i + 4]);
        }
    }
    Some((w, h, out))
}

/// Writes the VM's current screen as a PNG.
pub fn save_screenshot(frame: &Path, png_path: &Path) -> Result<(), ScreenError> {
    let frame_err = |source| ScreenError::Frame { path: frame.to_path_buf(), source };
    let image = FrameReader::open(frame).and_then(|r| r.snapshot()).map_err(frame_err)?;
    if image.width == 0 || image.height == 0 {
        return Err(ScreenError::Empty);
    }
    let png_err = |source| ScreenError::Png { path: png_path.to_path_buf(), source };
    crate::fsutil::write_atomic_with(png_path, |file| {
        let mut encoder =
            png::Encoder::new(std::io::BufWriter::new(file), image.width, image.height);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
        // The screen is opaque whatever the alpha bytes say.
        let opaque: Vec<u8> =
            image.rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2], 0xff]).collect();
        writer.write_image_data(&opaque).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })
    .map_err(|e| png_err(png::EncodingError::IoError(e)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn scaling_keeps_the_aspect_and_samples_pixels() {
        let (w, h) = (400u32, 100u32);
        let mut rgba = vec![0u8; (w * h * 4) as usize];
        // Right half red.
        for y in 0..h {
            for x in w / 2..w {
                rgba[((y * w + x) * 4) as usize] = 255;
            }
        }
        let (tw, th, out) = scale_to_fit(w, h, &rgba, (192, 120)).unwrap();
        assert_eq!((tw, th), (192, 48));
        assert_eq!(out[0], 0);
        assert_eq!(out[((tw - 1) * 4) as usize], 255);
        assert_eq!(scale_to_fit(0, 10, &[], (1, 1)), None);
        assert_eq!(scale_to_fit(2, 2, &[0; 4], (1, 1)), None, "short buffer");
        // Small images are not enlarged.
        assert_eq!(scale_to_fit(2, 1, &[1; 8], (192, 120)).unwrap().0, 2);
    }

    #[test]
    fn a_full_update_becomes_one_image_and_others_stay_rects() {
        use display::frame::RectPixels;
        use display::Rect;
        let rect = RectPixels { rect: Rect::new(1, 0, 1, 1), rgba: vec![9, 8, 7, 0] };
        let update =
            |full| FrameUpdate { seq: 2, width: 2, height: 2, full, rects: vec![rect.clone()] };
        let (full, rects) = convert(update(true));
        let image = full.unwrap();
        assert!(rects.is_empty());
        assert_eq!(image.size, [2, 2]);
        assert_eq!(image.pixels[1], Color32::from_rgb(9, 8, 7));
        assert_eq!(image.pixels[0], Color32::BLACK);
        let (full, rects) = convert(update(false));
        assert!(full.is_none());
        assert_eq!(rects.len(), 1);
        assert_eq!(rects[0].0, [1, 0]);
    }

    const ARROW: CursorPlace =
        CursorPlace { x: 100, y: 50, hot_x: 4, hot_y: 2, width: 32, height: 32 };

    #[test]
    fn the_cursor_scales_with_a_fitted_image_around_its_hot_spot() {
        // 800×600 guest fitted into 1600×1300 points: scale 2, bars of 50 above and below.
        let vp = Viewport::fit((0.0, 0.0, 1600.0, 1300.0), (800, 600));
        let (x, y, w, h) = cursor_rect(&vp, &ARROW).unwrap();
        assert_eq!((x, y, w, h), ((100.0 - 4.0) * 2.0, 50.0 + (50.0 - 2.0) * 2.0, 64.0, 64.0));
        // The hot spot lands where the pointer mapping puts guest pixel (100, 50).
        assert_eq!(vp.window_to_guest(x + 4.0 * 2.0, y + 2.0 * 2.0), Some((100, 50)));
    }

    #[test]
    fn the_cursor_is_one_guest_pixel_per_physical_pixel_at_one_to_one() {
        let vp = Viewport::one_to_one((10.0, 20.0), (800, 600), 2.0);
        let (x, y, w, h) = cursor_rect(&vp, &ARROW).unwrap();
        assert_eq!((x, y, w, h), (10.0 + 48.0, 20.0 + 24.0, 16.0, 16.0));
        // A hot spot at the screen's corner puts the image partly off the screen.
        let corner = CursorPlace { x: 0, y: 0, ..ARROW };
        assert_eq!(cursor_rect(&vp, &corner).unwrap().0, 10.0 - 2.0);
    }

    #[test]
    fn no_cursor_rect_for_empty_images_or_screens() {
        let vp = Viewport::fit((0.0, 0.0, 100.0, 100.0), (0, 0));
        assert_eq!(cursor_rect(&vp, &ARROW), None);
        let vp = Viewport::fit((0.0, 0.0, 100.0, 100.0), (10, 10));
        assert_eq!(cursor_rect(&vp, &CursorPlace { width: 0, ..ARROW }), None);
    }

    #[test]
    fn a_frame_file_put_in_place_of_the_old_one_is_seen_as_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("display.shm");
        std::fs::write(&path, b"old").unwrap();
        let opened = file_id(&path);
        assert!(!replaced(&path, opened));
        // As FrameWriter::create does: a new file renamed over the old one.
        let tmp = dir.path().join("display.shm.tmp");
        std::fs::write(&tmp, b"new").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(replaced(&path, opened));
        // Gone (the process is restarting) is not replaced: the old screen stays meanwhile.
        std::fs::remove_file(&path).unwrap();
        assert!(!replaced(&path, opened));
    }

    #[test]
    fn screen_pixels_are_opaque() {
        let image = color_image(1, 1, &[10, 20, 30, 0]);
        assert_eq!(image.pixels[0], Color32::from_rgb(10, 20, 30));
    }
}
