//! The host terminal: what stdin is, raw mode that is always undone (drop, panic unwind, or a
//! terminating signal), and the keystroke pump shared by `run` and `console`.

use std::cell::UnsafeCell;
use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Ctrl+], the detach key (as in virsh and telnet).
pub const ESCAPE_BYTE: u8 = 0x1d;

/// What stdin is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinKind {
    Tty,
    /// A pipe or socket: read it to EOF.
    Stream,
    /// A file, /dev/null, closed: not for typing.
    Other,
}

pub fn stdin_kind() -> StdinKind {
    // SAFETY: isatty only inspects descriptor 0.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
        return StdinKind::Tty;
    }
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a full stat into `st` on success, which we check before reading.
    if unsafe { libc::fstat(libc::STDIN_FILENO, st.as_mut_ptr()) } != 0 {
        return StdinKind::Other;
    }
    // SAFETY: fstat succeeded, so `st` is initialized.
    let mode = unsafe { st.assume_init() }.st_mode & libc::S_IFMT;
    if mode == libc::S_IFIFO || mode == libc::S_IFSOCK {
        StdinKind::Stream
    } else {
        StdinKind::Other
    }
}

/// The termios to restore from a signal handler, which can only read plain statics.
struct SavedTermios(UnsafeCell<MaybeUninit<libc::termios>>);
// SAFETY: written only by `RawTerminal::enter` before SAVED_VALID is set (Release), read only
// after SAVED_VALID is seen set (Acquire); one RawTerminal exists at a time (ACTIVE).
unsafe impl Sync for SavedTermios {}

static SAVED: SavedTermios = SavedTermios(UnsafeCell::new(MaybeUninit::uninit()));
static SAVED_VALID: AtomicBool = AtomicBool::new(false);
static SAVED_FD: AtomicI32 = AtomicI32::new(-1);
static ACTIVE: AtomicBool = AtomicBool::new(false);

const RESTORE_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];

extern "C" fn restore_and_reraise(sig: libc::c_int) {
    if SAVED_VALID.load(Ordering::Acquire) {
        // SAFETY: tcsetattr, signal and raise are async-signal-safe; SAVED is initialized
        // whenever SAVED_VALID is set.
        unsafe {
            libc::tcsetattr(
                SAVED_FD.load(Ordering::Relaxed),
                libc::TCSANOW,
                (*SAVED.0.get()).as_ptr(),
            );
        }
    }
    // SAFETY: as above; re-raising with the default action ends the process as the sender
    // intended.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// The terminal on `fd` in raw mode until dropped.
pub struct RawTerminal {
    fd: libc::c_int,
    saved: libc::termios,
    old_actions: Vec<(libc::c_int, libc::sigaction)>,
}

impl RawTerminal {
    pub fn enter(fd: libc::c_int) -> io::Result<RawTerminal> {
        if ACTIVE.swap(true, Ordering::AcqRel) {
            return Err(io::Error::other("The terminal is already in raw mode"));
        }
        match Self::enter_inner(fd) {
            Ok(t) => Ok(t),
            Err(e) => {
                ACTIVE.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    fn enter_inner(fd: libc::c_int) -> io::Result<RawTerminal> {
        let mut saved = MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills `saved` on success, checked before use.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: initialized by the successful tcgetattr.
        let saved = unsafe { saved.assume_init() };
        // SAFETY: ACTIVE guarantees no other RawTerminal and the handler is not installed
        // yet, so nobody reads SAVED while it is written.
        unsafe { (*SAVED.0.get()).write(saved) };
        SAVED_FD.store(fd, Ordering::Relaxed);
        SAVED_VALID.store(true, Ordering::Release);

        let mut old_actions = Vec::new();
        for sig in RESTORE_SIGNALS {
            // SAFETY: a zeroed sigaction is valid; we set the handler and an empty mask.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = restore_and_reraise as extern "C" fn(libc::c_int) as usize;
            // SAFETY: sa_mask is a valid sigset_t inside `act`.
            unsafe { libc::sigemptyset(&mut act.sa_mask) };
            // SAFETY: a zeroed sigaction is a valid out-parameter.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are valid sigaction structs.
            if unsafe { libc::sigaction(sig, &act, &mut old) } == 0 {
                old_actions.push((sig, old));
            }
        }

        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = io::Error::last_os_error();
            drop(RawTerminal { fd, saved, old_actions });
            return Err(err);
        }
        Ok(RawTerminal { fd, saved, old_actions })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios read in enter().
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
        SAVED_VALID.store(false, Ordering::Release);
        for (sig, old) in self.old_actions.drain(..) {
            // SAFETY: `old` came from sigaction() for this signal.
            unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
        }
        ACTIVE.store(false, Ordering::Release);
    }
}

/// Why [`pump_input`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEnd {
    /// The user pressed Ctrl+].
    Escape,
    /// End of input.
    Eof,
    /// The sink refused more bytes (the other end is gone).
    SinkClosed,
}

/// Copies `input` to `sink` until EOF, until the sink returns false, or (when `escape` is
/// set) until Ctrl+], whose preceding bytes are still delivered.
pub fn pump_input<R: Read>(
    mut input: R,
    escape: bool,
    mut sink: impl FnMut(&[u8]) -> bool,
) -> InputEnd {
    let mut buf = [0u8; 4096];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return InputEnd::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return InputEnd::Eof,
        };
        let chunk = &buf[..n];
        let cut = if escape { chunk.iter().position(|&b| b == ESCAPE_BYTE) } else { None };
        let data = &chunk[..cut.unwrap_or(n)];
        if !data.is_empty() && !sink(data) {
            return InputEnd::SinkClosed;
        }
        if cut.is_some() {
            return InputEnd::Escape;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn escape_stops_the_pump_after_delivering_what_came_before() {
        let mut got = Vec::new();
        let end = pump_input(&b"ls\n\x1dnever"[..], true, |b| {
            got.extend_from_slice(b);
            true
        });
        assert_eq!(end, InputEnd::Escape);
        assert_eq!(got, b"ls\n");
    }

    #[test]
    fn without_escape_handling_ctrl_bracket_is_just_a_byte() {
        let mut got = Vec::new();
        let end = pump_input(&b"a\x1db"[..], false, |b| {
            got.extend_from_slice(b);
            true
        });
        assert_eq!(end, InputEnd::Eof);
        assert_eq!(got, b"a\x1db");
    }

    #[test]
    fn a_closed_sink_ends_the_pump() {
        assert_eq!(pump_input(&b"x"[..], true, |_| false), InputEnd::SinkClosed);
    }

    #[test]
    fn raw_mode_on_a_non_terminal_fails_and_can_be_retried() {
        let file = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        assert!(RawTerminal::enter(file.as_raw_fd()).is_err());
        // The failed attempt released the single-instance guard.
        assert!(RawTerminal::enter(file.as_raw_fd()).is_err());
        assert!(!ACTIVE.load(Ordering::Acquire));
    }
}
