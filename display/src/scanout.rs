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
