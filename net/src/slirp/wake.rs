//! Wakes the net thread out of `poll` when frames or commands wait for it: a non-blocking pipe
//! (portable to macOS, where there is no eventfd), written at most once per wake-up.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug)]
pub struct Waker {
    read: OwnedFd,
    write: OwnedFd,
    /// Set by `wake` until the thread drains: later wakes skip the write.
    pending: AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe() to fill.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe() succeeded, so both are fresh descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            set_flags(fd.as_raw_fd())?;
        }
        Ok(Waker { read, write, pending: AtomicBool::new(false) })
    }

    /// The descriptor the net thread polls for reading.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Makes the thread's next (or current) `poll` return. Callable from any thread.
    pub fn wake(&self) {
        if self.pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let byte = 1u8;
        // SAFETY: writes one byte from a valid local to a descriptor we own. A full pipe
        // (EAGAIN) already means a wake-up is pending, so the result is not needed.
        let _ = unsafe { libc::write(self.write.as_raw_fd(), (&byte as *const u8).cast(), 1) };
    }

    /// Called by the net thread before it looks at its queues: what is queued after this
    /// wakes it again. The pipe is emptied first and `pending` cleared after: the other
    /// order could eat the byte of a wake that set `pending` in between, and every later
    /// wake would skip its write while nothing is left in the pipe to poll.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reads into a valid local buffer of the given length from a descriptor
            // we own; it is non-blocking, so this ends at EAGAIN.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
        }
        self.pending.store(false, Ordering::SeqCst);
    }
}

fn set_flags(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let ok = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0
            && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
            && libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn a_wake_makes_the_fd_readable_until_drained() {
        let waker = Waker::new().expect("pipe");
        assert!(!readable(waker.fd()));
        waker.wake();
        waker.wake();
        assert!(readable(waker.fd()));
        waker.drain();
        assert!(!readable(waker.fd()));
        waker.wake();
        assert!(readable(waker.fd()), "a wake after a drain must write again");
    }
}
