//! The display side of Hutch (not written yet): the scanout model (boot framebuffer or a
//! virtio-gpu scanout), dirty rectangles, pixel-format conversion, the cursor, frame transport
//! between the VM process and the GUI, and the mapping from host keys and pointer events to
//! guest codes.
#![forbid(unsafe_code)]
