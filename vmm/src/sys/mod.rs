//! Platform code the shared logic needs, one file per platform (crosvm's rule: no
//! `#[cfg(target_os)]` outside `sys/`).
//!
//! ```text
//!  memory.rs: host RAM size, huge-page advice, private file mappings (Unix)
//!  Waker  ─ linux.rs: eventfd            (Linux)
//!         └ unix.rs:  non-blocking pipe  (other Unix: macOS)
//! ```
//! A [`Waker`] is a file descriptor that becomes readable when woken, so a thread can sleep
//! on it together with other descriptors (a tap device, an audio stream) later.

#[cfg(target_os = "linux")]
mod linux;
mod memory;
#[cfg(unix)]
mod unix;

#[cfg(target_os = "linux")]
pub use linux::EventFdWaker as Waker;
#[cfg(all(unix, not(target_os = "linux")))]
pub use unix::PipeWaker as Waker;

pub use memory::{advise_huge_pages, host_memory_mib, private_file_mapping};
