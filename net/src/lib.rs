//! The host side of a VM's network card: backends that exchange Ethernet frames with the guest's
//! virtio-net device (`vmm::virtio::net`), which sees only this trait.
//!
//! ```text
//!  guest ─ virtio-net (vmm) ─ NetBackend::send ─▶ backend (user-mode NAT, later passt, vmnet)
//!                           ◀─ NetBackend::recv ─  ◀─ RxNotify (any thread) wakes the device
//! ```

use std::fmt;

pub mod slirp;

/// The largest Ethernet frame (without the virtio header) any backend exchanges: a 65535-byte
/// IP packet plus its 14-byte Ethernet header, which is what an MTU of 65521 (libslirp's
/// maximum) fits in and passt's stream format can carry.
pub const MAX_FRAME_LEN: usize = 65535 + 14;

/// The smallest Ethernet frame a backend accepts: the header alone.
pub const MIN_FRAME_LEN: usize = 14;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("frame of {len} bytes is outside {MIN_FRAME_LEN}..={max}")]
    FrameLength { len: usize, max: usize },
    #[error("network backend {backend} stopped")]
    Stopped { backend: &'static str },
    #[error("network backend {backend}: {what}")]
    Io {
        backend: &'static str,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("network backend {backend} refused the saved state: {why}")]
    State { backend: &'static str, why: String },
    /// A backend's own error, its chain kept.
    #[error("network backend {backend} failed")]
    Backend {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Called by a backend, from any thread, when [`NetBackend::recv`] may have a frame again.
/// Calls may coalesce; the device drains `recv` until it returns `None`.
pub type RxNotify = Box<dyn Fn() + Send + Sync>;

/// A frame exchange with the host side of one NIC. The device calls it from its own threads
/// (TX from the queue's thread, RX from its worker), never concurrently: it owns the backend
/// behind a lock.
pub trait NetBackend: Send + fmt::Debug {
    /// A short name for errors and logs ("user", "passt").
    fn name(&self) -> &'static str;

    /// Hands one frame from the guest to the host side. A backend that is momentarily full may
    /// drop the frame (TCP retransmits); an error means it cannot carry frames any more.
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError>;

    /// Takes the next frame for the guest into `buf` (sized [`MAX_FRAME_LEN`]) and returns its
    /// length, or `None` when no frame waits.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError>;

    /// Registers what to call when frames for the guest arrive. Replaces an earlier one.
    fn set_rx_notify(&mut self, notify: RxNotify);

    /// The backend's own state for a snapshot (opaque bytes; empty when it keeps none).
    fn save_state(&mut self) -> Result<Vec<u8>, NetError> {
        Ok(Vec::new())
    }

    /// Puts back what [`NetBackend::save_state`] returned, on a freshly made backend.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), NetError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(NetError::State { backend: self.name(), why: "it keeps no state".into() })
        }
    }
}

/// Checks a frame's length against the limits every backend shares.
pub fn check_frame_len(len: usize) -> Result<(), NetError> {
    if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
        Ok(())
    } else {
        Err(NetError::FrameLength { len, max: MAX_FRAME_LEN })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths_outside_the_ethernet_limits_are_refused() {
        assert!(check_frame_len(MIN_FRAME_LEN).is_ok());
        assert!(check_frame_len(MAX_FRAME_LEN).is_ok());
        assert!(matches!(check_frame_len(MIN_FRAME_LEN - 1), Err(NetError::FrameLength { .. })));
        assert!(matches!(check_frame_len(MAX_FRAME_LEN + 1), Err(NetError::FrameLength { .. })));
    }
}
