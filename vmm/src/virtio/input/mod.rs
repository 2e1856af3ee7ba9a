//! virtio-input (virtio 1.2 section 5.8): a keyboard, an absolute pointer (tablet) or a
//! relative mouse, fed with [`display::InputEvent`]s through an [`InputHandle`].
//!
//! ```text
//!  InputHandle::send ─▶ evdev events + SYN_REPORT ─▶ backlog ─▶ eventq buffers ─▶ guest evdev
//!  statusq (LEDs from the guest) ─▶ consumed and ignored
//! ```

mod device;
mod persist;

pub use device::{Input, InputHandle};
pub use persist::InputState;
