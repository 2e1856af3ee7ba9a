//! The screen the VM shows: which source is live (the boot framebuffer or virtio-gpu scanout
//! 0), and forwarding the live source's pixels and the cursor into the shared frame.
//!
//! Like virtio-vga, the boot framebuffer is live until the guest's virtio-gpu driver gives
//! scanout 0 a mode, and is live again if the driver disables that scanout. Updates from a
//! source that isn't live are dropped. Every switch (and every resize of the live source)
//! clears the frame and bumps [`Screen::epoch`], so a source that only sends changes (the boot
//! framebuffer scanner) knows to resend everything.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use crate::frame::FrameWriter;
use crate::pixel::convert_rect_to_rgba;
use crate::{CursorImage, Image, Rect, ScanoutSink, SourceId};

pub struct Screen {
    state: Mutex<State>,
    path: PathBuf,
}

struct State {
    writer: FrameWriter,
    boot_mode: Option<(u32, u32)>,
    gpu_mode: Option<(u32, u32)>,
    live: SourceId,
    epoch: u64,
}

impl State {
    fn live_mode(&self) -> Option<(u32, u32)> {
        match self.live {
            SourceId::BootFramebuffer => self.boot_mode,
            SourceId::Gpu(_) => self.gpu_mode,
        }
    }
}

impl Screen {
    pub fn new(writer: FrameWriter) -> Screen {
        let path = writer.path().to_path_buf();
        Screen {
            state: Mutex::new(State {
                writer,
                boot_mode: None,
                gpu_mode: None,
                live: SourceId::BootFramebuffer,
                epoch: 0,
            }),
            path,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (the frame publishes on unwind).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The source whose image is on screen.
    pub fn live_source(&self) -> SourceId {
        self.lock().live
    }

    /// Increments whenever the frame is cleared (a source switch or a resize of the live one).
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// The frame's current size.
    pub fn size(&self) -> (u32, u32) {
        let state = self.lock();
        (state.writer.width(), state.writer.height())
    }

    /// The shared frame file the GUI opens with [`crate::frame::FrameReader::open`].
    pub fn frame_path(&self) -> PathBuf {
        self.path.clone()
    }
}

impl ScanoutSink for Screen {
    fn set_mode(&self, source: SourceId, mode: Option<(u32, u32)>) {
        let mode = mode.filter(|&(w, h)| w > 0 && h > 0);
        let mut state = self.lock();
        match source {
            SourceId::BootFramebuffer => state.boot_mode = mode,
            SourceId::Gpu(0) => state.gpu_mode = mode,
            // Only scanout 0 is shown.
            SourceId::Gpu(_) => return,
        }
        let live =
            if state.gpu_mode.is_some() { SourceId::Gpu(0) } else { SourceId::BootFramebuffer };
        let (max_w, max_h) = (state.writer.max_width(), state.writer.max_height());
        let switched = live != state.live;
        state.live = live;
        let (w, h) = state.live_mode().unwrap_or((0, 0));
        let (w, h) = (w.min(max_w), h.min(max_h));
        // Guests re-set the same mode on every page flip: only a real change clears the frame.
        if switched || (w, h) != (state.writer.width(), state.writer.height()) {
            state.epoch += 1;
            if let Err(e) = state.writer.resize(w, h) {
                log::warn!("Screen resize to {w}x{h}: {e}");
            }
        }
    }

    fn update(&self, source: SourceId, image: &Image<'_>, rect: Rect) {
        let mut state = self.lock();
        if source != state.live {
            return;
        }
        let (w, h) = (state.writer.width(), state.writer.height());
        let rect = rect.clip(image.width, image.height).clip(w, h);
        if rect.is_empty() {
            return;
        }
        let result = state.writer.update(&[rect], |frame| {
            let stride = frame.stride();
            convert_rect_to_rgba(image, rect, frame.pixels_mut(), stride, rect.x, rect.y)
        });
        if let Err(e) = result {
            log::debug!("Dropped {source:?} update {rect:?}: {e}");
        }
    }

    fn set_cursor(&self, cursor: Option<CursorImage>) {
        if let Err(e) = self.lock().writer.set_cursor(cursor.as_ref()) {
            log::debug!("Cursor hidden: {e}");
        }
    }

    fn move_cursor(&self, x: u32, y: u32) {
        self.lock().writer.move_cursor(x, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameReader, FrameUpdate};
    use crate::PixelFormat;

    fn screen() -> (tempfile::TempDir, Screen, FrameReader) {
        let dir = tempfile::tempdir().unwrap();
        let writer = FrameWriter::create(&dir.path().join("frame"), 256, 256).unwrap();
        let screen = Screen::new(writer);
        let reader = FrameReader::open(&screen.frame_path()).unwrap();
        (dir, screen, reader)
    }

    /// A `w`×`h` B8G8R8X8 image filled with one colour (B, G, R bytes).
    fn solid(w: u32, h: u32, bgr: [u8; 3]) -> Vec<u8> {
        [bgr[0], bgr[1], bgr[2], 0].repeat((w * h) as usize)
    }

    fn image(data: &[u8], w: u32, h: u32) -> Image<'_> {
        Image { data, width: w, height: h, stride: w * 4, format: PixelFormat::B8G8R8X8 }
    }

    fn only_rect(update: Option<FrameUpdate>) -> (Rect, Vec<u8>) {
        let update = update.expect("an update");
        assert_eq!(update.rects.len(), 1);
        let rp = update.rects.into_iter().next().unwrap();
        (rp.rect, rp.rgba)
    }

    #[test]
    fn boot_framebuffer_gives_way_to_gpu_and_comes_back() {
        let (_dir, screen, mut reader) = screen();
        assert_eq!(screen.live_source(), SourceId::BootFramebuffer);
        screen.set_mode(SourceId::BootFramebuffer, Some((64, 32)));
        assert_eq!((screen.size(), screen.epoch()), ((64, 32), 1));
        reader.poll().unwrap();

        let boot = solid(64, 32, [1, 2, 3]);
        screen.update(SourceId::BootFramebuffer, &image(&boot, 64, 32), Rect::new(0, 0, 4, 4));
        let (rect, rgba) = only_rect(reader.poll().unwrap());
        assert_eq!(rect, Rect::new(0, 0, 4, 4));
        assert_eq!(&rgba[..4], &[3, 2, 1, 0xff]);

        screen.set_mode(SourceId::Gpu(0), Some((100, 50)));
        assert_eq!(screen.live_source(), SourceId::Gpu(0));
        assert_eq!((screen.size(), screen.epoch()), ((100, 50), 2));
        assert!(reader.poll().unwrap().unwrap().full);
        // The boot framebuffer is no longer shown.
        screen.update(SourceId::BootFramebuffer, &image(&boot, 64, 32), Rect::full(64, 32));
        assert_eq!(reader.poll().unwrap(), None);
        let gpu = solid(100, 50, [7, 8, 9]);
        screen.update(SourceId::Gpu(0), &image(&gpu, 100, 50), Rect::new(90, 45, 20, 20));
        let (rect, rgba) = only_rect(reader.poll().unwrap());
        assert_eq!(rect, Rect::new(90, 45, 10, 5));
        assert!(rgba.chunks_exact(4).all(|p| p == [9, 8, 7, 0xff]));

        // Re-setting the same mode (a page flip) clears nothing.
        screen.set_mode(SourceId::Gpu(0), Some((100, 50)));
        assert_eq!(screen.epoch(), 2);
        assert_eq!(reader.poll().unwrap(), None);
        // Other scanouts are not shown.
        screen.set_mode(SourceId::Gpu(1), Some((10, 10)));
        screen.update(SourceId::Gpu(1), &image(&gpu, 10, 10), Rect::full(10, 10));
        assert_eq!((screen.live_source(), screen.epoch()), (SourceId::Gpu(0), 2));
        assert_eq!(reader.poll().unwrap(), None);

        screen.set_mode(SourceId::Gpu(0), None);
        assert_eq!(screen.live_source(), SourceId::BootFramebuffer);
        assert_eq!((screen.size(), screen.epoch()), ((64, 32), 3));
        let update = reader.poll().unwrap().unwrap();
        assert!(update.full);
        assert_eq!((update.width, update.height), (64, 32));
        screen.update(SourceId::Gpu(0), &image(&gpu, 100, 50), Rect::full(100, 50));
        assert_eq!(reader.poll().unwrap(), None);
    }

    #[test]
    fn live_resize_bumps_epoch_and_modes_are_capped() {
        let (_dir, screen, _reader) = screen();
        screen.set_mode(SourceId::BootFramebuffer, Some((64, 32)));
        screen.set_mode(SourceId::BootFramebuffer, Some((1000, 20)));
        assert_eq!((screen.size(), screen.epoch()), ((256, 20), 2));
        screen.set_mode(SourceId::BootFramebuffer, Some((0, 20)));
        assert_eq!((screen.size(), screen.epoch()), ((0, 0), 3));
    }

    #[test]
    fn hostile_updates_change_nothing() {
        let (_dir, screen, mut reader) = screen();
        screen.set_mode(SourceId::BootFramebuffer, Some((64, 32)));
        reader.poll().unwrap();
        let short = vec![0u8; 100];
        screen.update(SourceId::BootFramebuffer, &image(&short, 64, 32), Rect::full(64, 32));
        screen.update(
            SourceId::BootFramebuffer,
            &image(&short, 64, 32),
            Rect::new(u32::MAX, u32::MAX, u32::MAX, u32::MAX),
        );
        // The short image's update may be published, but its pixels stay black.
        if let Some(update) = reader.poll().unwrap() {
            for rp in update.rects {
                assert!(rp.rgba.chunks_exact(4).all(|p| p == [0, 0, 0, 0xff]));
            }
        }
    }

    #[test]
    fn cursor_goes_to_the_frame() {
        let (_dir, screen, reader) = screen();
        screen.set_cursor(Some(CursorImage {
            width: 1,
            height: 1,
            hot_x: 0,
            hot_y: 0,
            format: PixelFormat::R8G8B8A8,
            data: vec![1, 2, 3, 4],
        }));
        screen.move_cursor(5, 6);
        let c = reader.cursor().unwrap();
        assert_eq!((c.visible, c.x, c.y, c.rgba.clone()), (true, 5, 6, vec![1, 2, 3, 4]));
        screen.set_cursor(None);
        assert!(!reader.cursor().unwrap().visible);
    }
}
