//! The display side of Hutch, shared by the VM process and the GUI:
//!
//! ```text
//!  guest ─▶ boot framebuffer / virtio-gpu ─▶ dyn ScanoutSink ─▶ scanout::Screen ─▶ frame (shared memory)
//!                                                                                      │ dirty rects, seq
//!  GUI ◀─ texture upload ◀─ frame::FrameReader ◀───────────────────────────────────────┘
//!  GUI ─▶ keymap / pointer ─▶ InputEvent ─▶ control protocol ─▶ VM process ─▶ virtio-input / i8042
//! ```
//! - [`rect`]: rectangles and dirty regions; [`pixel`]: guest pixel formats and conversion;
//! - [`frame`]: the shared-memory frame transport between processes;
//! - [`scanout`]: which source is live (boot framebuffer or a virtio-gpu scanout), the cursor;
//! - [`keymap`]: host physical keys → evdev codes → PS/2 set-1 scancodes;
//! - [`pointer`]: window coordinates → guest coordinates.

pub mod frame;
pub mod keymap;
pub mod pixel;
pub mod pointer;
pub mod rect;
pub mod scanout;

use serde::{Deserialize, Serialize};

pub use pixel::PixelFormat;
pub use rect::Rect;

/// Where an image on the guest screen comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SourceId {
    /// The linear framebuffer the platform describes to the guest at boot (VESA/VLFB).
    BootFramebuffer,
    /// virtio-gpu scanout N.
    Gpu(u32),
}

/// A source's whole current image, borrowed: rows of `stride` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    pub data: &'a [u8],
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub format: PixelFormat,
}

/// A cursor image: `width`×`height` pixels in `format`, hot spot inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorImage {
    pub width: u32,
    pub height: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub format: PixelFormat,
    pub data: Vec<u8>,
}

/// What display devices draw into. Implemented by [`scanout::Screen`]; devices hold an
/// `Arc<dyn ScanoutSink>` and never know where the pixels go.
pub trait ScanoutSink: Send + Sync {
    /// `source` now shows a `width`×`height` image, or (None) was disabled.
    fn set_mode(&self, source: SourceId, mode: Option<(u32, u32)>);
    /// `rect` of `image` (the source's whole image) changed. The sink clips `rect`.
    fn update(&self, source: SourceId, image: &Image<'_>, rect: Rect);
    /// A new cursor image, or None to hide the cursor.
    fn set_cursor(&self, cursor: Option<CursorImage>);
    /// The cursor's hot spot moved to (`x`, `y`) on the screen.
    fn move_cursor(&self, x: u32, y: u32);
}

/// Largest screen the platform offers (virtio-gpu modes and the shared frame are capped here).
pub const MAX_WIDTH: u32 = 3840;
pub const MAX_HEIGHT: u32 = 2160;

/// Pointer buttons, as the guest's input devices name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointerButton {
    Left,
    Right,
    Middle,
    Side,
    Extra,
}

/// An input event for the guest, as it travels over the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputEvent {
    /// A key by its Linux evdev code (`KEY_A` = 30), pressed or released.
    Key {
        code: u16,
        down: bool,
    },
    /// Absolute pointer position as a fraction of the guest screen: 0..=[`pointer::ABS_MAX`].
    PointerAbs {
        x: u16,
        y: u16,
    },
    /// Relative pointer motion (grabbed mode).
    PointerRel {
        dx: i32,
        dy: i32,
    },
    Button {
        button: PointerButton,
        down: bool,
    },
    /// Wheel clicks: positive `dy` scrolls up, positive `dx` right.
    Wheel {
        dx: i32,
        dy: i32,
    },
}
