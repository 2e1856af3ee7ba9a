//! Linux: the waker is an eventfd (one descriptor, wakes coalesce in its counter).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::unix::{read_retrying, wait_readable};

/// A waker on an eventfd: `wake` adds to its counter, `wait` sleeps until it is non-zero and
/// resets it.
#[derive(Debug)]
pub struct EventFdWaker {
    fd: OwnedFd,
}

impl EventFdWaker {
    pub fn new() -> io::Result<EventFdWaker> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(EventFdWaker { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Makes the next (or a current) [`EventFdWaker::wait`] return. Never blocks.
    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our own descriptor. A full counter
        // (EAGAIN) means a wake is already pending, which is all a wake asks for.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Sleeps until woken, then consumes every wake so far.
    pub fn wait(&self) -> io::Result<()> {
        wait_readable(self.fd.as_fd())?;
        let mut counter = [0u8; 8];
        read_retrying(self.fd.as_fd(), &mut counter).map(drop)
    }
}

impl AsFd for EventFdWaker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFdWaker {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    #[test]
    fn eventfd_waker_wakes_a_waiting_thread_and_coalesces_wakes() {
        super::super::unix::tests::check_waker(
            EventFdWaker::new().unwrap(),
            EventFdWaker::wake,
            EventFdWaker::wait,
        );
    }
}
