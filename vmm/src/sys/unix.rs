//! Unix without eventfd (macOS): the waker is a non-blocking pipe. Also the poll/read
//! helpers both wakers use.
// On Linux the eventfd waker is used; the pipe waker is still built and tested there.
#![cfg_attr(target_os = "linux", allow(dead_code))]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Sleeps until `fd` is readable (or hung up), retrying on signals.
pub(super) fn wait_readable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one valid pollfd, count 1; no timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One read into `buf`, retrying on signals; a non-blocking descriptor with nothing to read
/// yields 0.
pub(super) fn read_retrying(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: reads at most `buf.len()` bytes into a live, writable buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// Sets O_NONBLOCK and FD_CLOEXEC on a descriptor we own.
fn set_nonblocking_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on our own descriptor with integer arguments only; results checked.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd_flags = libc::fcntl(raw, libc::F_GETFD);
        if fd_flags < 0 || libc::fcntl(raw, libc::F_SETFD, fd_flags | libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A waker on a pipe: `wake` writes a byte, `wait` sleeps until there is one and drains the
/// pipe. A full pipe already holds a wake.
#[derive(Debug)]
pub struct PipeWaker {
    read: OwnedFd,
    write: OwnedFd,
}

impl PipeWaker {
    pub fn new() -> io::Result<PipeWaker> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes; result checked.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        set_nonblocking_cloexec(read.as_fd())?;
        set_nonblocking_cloexec(write.as_fd())?;
        Ok(PipeWaker { read, write })
    }

    /// Makes the next (or a current) [`PipeWaker::wait`] return. Never blocks.
    pub fn wake(&self) {
        let byte = [1u8];
        // SAFETY: writes one byte from a live buffer to our own descriptor; EAGAIN (a full
        // pipe) means wakes are already pending.
        let _ = unsafe { libc::write(self.write.as_raw_fd(), byte.as_ptr().cast(), 1) };
    }

    /// Sleeps until woken, then consumes every wake so far.
    pub fn wait(&self) -> io::Result<()> {
        wait_readable(self.read.as_fd())?;
        let mut buf = [0u8; 64];
        while read_retrying(self.read.as_fd(), &mut buf)? == buf.len() {}
        Ok(())
    }
}

impl AsFd for PipeWaker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl AsRawFd for PipeWaker {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
pub(super) mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Whether `fd` is readable right now.
    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, count 1, no waiting.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    /// The behaviour every waker has: a wait sleeps until a wake from another thread, many
    /// wakes are consumed by one wait, and the descriptor is readable exactly while a wake
    /// is pending.
    pub fn check_waker<W: AsFd + Send + Sync + 'static>(
        waker: W,
        wake: fn(&W),
        wait: fn(&W) -> io::Result<()>,
    ) {
        let waker = Arc::new(waker);
        assert!(!readable(waker.as_fd()), "no wake yet");
        let (done_tx, done_rx) = mpsc::channel();
        let w = waker.clone();
        let waiter = std::thread::spawn(move || {
            wait(&w).unwrap();
            done_tx.send(()).unwrap();
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(50)).is_err(), "woke by itself");
        wake(&waker);
        done_rx.recv_timeout(Duration::from_secs(5)).expect("the wake did not arrive");
        waiter.join().unwrap();
        for _ in 0..1000 {
            wake(&waker);
        }
        assert!(readable(waker.as_fd()));
        wait(&waker).unwrap();
        assert!(!readable(waker.as_fd()), "one wait consumes every wake");
    }

    #[test]
    fn pipe_waker_wakes_a_waiting_thread_and_coalesces_wakes() {
        check_waker(PipeWaker::new().unwrap(), PipeWaker::wake, PipeWaker::wait);
    }
}
