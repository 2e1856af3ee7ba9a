//! virtio-gpu, 2D only (virtio 1.2 section 5.7), and the boot framebuffer it owns.
//!
//! ```text
//!  controlq ─▶ Gpu: resources (host copies) ◀─ TRANSFER_TO_HOST_2D ◀─ guest backing pages
//!              scanout 0 = rect of a resource ─ RESOURCE_FLUSH ─▶ ScanoutSink::update(Gpu(0))
//!  cursorq  ─▶ UPDATE_CURSOR / MOVE_CURSOR ─▶ ScanoutSink::set_cursor / move_cursor
//!  GpuHandle::set_display_size ─▶ preferred mode + EVENT_DISPLAY + config interrupt
//!  BAR 0 (fixed, host memory) = boot_fb::BootFramebuffer ─ scan() ─▶ update(BootFramebuffer)
//! ```
//! The PCI function is VGA-class when it carries the boot framebuffer, so Linux's virtio_gpu
//! evicts the firmware framebuffer driver (vesafb/simplefb) that lies inside its BAR.

pub mod boot_fb;
mod device;
pub(crate) mod edid;
mod persist;

/// The recording sink, for other devices' tests that scan out.
#[cfg(test)]
pub(crate) use device::testing;
pub use device::{Gpu, GpuHandle};
pub use persist::{GpuCursorState, GpuResourceState, GpuState};

#[derive(Debug, thiserror::Error)]
pub enum VirtioGpuError {
    #[error("Could not map {size:#x} bytes for the boot framebuffer")]
    Mmap {
        size: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Boot framebuffer mode {width}x{height} (stride {stride}) does not fit {size:#x} bytes"
    )]
    BadMode { width: u32, height: u32, stride: u32, size: usize },
}
