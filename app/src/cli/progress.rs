//! Ctrl+C and the progress bar of the long-running commands (convert, compact, import).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // Second Ctrl+C: the user does not want to wait for the clean-up.
        // SAFETY: _exit is async-signal-safe and takes a plain integer.
        unsafe { libc::_exit(130) };
    }
}

/// Makes Ctrl+C set a flag that long operations poll (so they can clean up) instead of
/// killing the process; a second Ctrl+C exits at once.
pub fn catch_interrupt() {
    // SAFETY: installs a handler that only touches an atomic and calls _exit, both
    // async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as usize) };
}

/// True once Ctrl+C was pressed (after [`catch_interrupt`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A byte progress bar on stderr when it is a terminal; silent otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new(message: &str) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(message.to_string());
        Progress { bar: Some(bar) }
    }

    /// The service's progress callback: updates the bar, `false` (cancel) after Ctrl+C.
    pub fn update(&self, done: u64, total: u64) -> bool {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        }
        !interrupted()
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
