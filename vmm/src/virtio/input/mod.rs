//! virtio-input (virtio 1.2 section 5.8): a keyboard, an absolute pointer (tablet) or a
//! relative mouse, fed with [`display::InputEvent`]s through an [`InputHandle`].
//!
//! ```text
//!  InputHandle::send ─▶ evdev events + SYN_REPORT ─▶ backlog ─▶ wake the event thread
//!  event thread (virtio::worker) ─▶ backlog ─▶ eventq buffers ─▶ interrupt ─▶ guest evdev
//!  eventq notify (buffers added) ─▶ backlog ─▶ eventq buffers, on the notifying thread
//!  statusq (LEDs from the guest) ─▶ consumed and ignored
//! ```

mod device;
mod persist;

pub use device::{Input, InputHandle};
pub use persist::InputState;

#[derive(Debug, thiserror::Error)]
pub enum VirtioInputError {
    #[error("Could not start the input event thread")]
    Worker(#[from] crate::virtio::worker::WorkerError),
}
