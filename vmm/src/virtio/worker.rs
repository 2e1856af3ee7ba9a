//! A thread a device owns for work the host starts (input events today; network receive and
//! sound later), as opposed to the guest's notifies, which the transport serves.
//!
//! ```text
//!  WorkerWaker::wake ─▶ sys::Waker ─▶ thread: wait ─▶ parked while quiesced ─▶ work()
//!  Worker::quiesce   ─▶ returns once the thread is parked between two passes
//!  Worker::resume    ─▶ the thread runs a pass (work that came meanwhile), then waits again
//!  drop(Worker)      ─▶ stop flag + wake, joined
//! ```
//! `work` runs once per wake (wakes coalesce), never while quiesced: after
//! [`Worker::quiesce`] returns, the thread touches no guest memory until [`Worker::resume`],
//! which is what a snapshot needs.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use log::error;

use crate::devices::bus::lock;
use crate::sys::Waker;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("Could not create the waker of thread {name}")]
    Waker {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Could not start thread {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct RunState {
    stop: bool,
    quiesce: bool,
    /// The thread sits in its parking loop (set and cleared there, under the lock).
    parked: bool,
    /// The thread has returned (stopped, its waker failed, or `work` panicked).
    exited: bool,
}

struct Control {
    waker: Waker,
    state: Mutex<RunState>,
    changed: Condvar,
}

impl Control {
    fn wait<'a>(&self, guard: MutexGuard<'a, RunState>) -> MutexGuard<'a, RunState> {
        self.changed.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Marks the thread exited however it leaves (a panicking `work` included), so a
/// [`Worker::quiesce`] does not wait for a thread that will never park.
struct ExitGuard<'a>(&'a Control);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).exited = true;
        self.0.changed.notify_all();
    }
}

/// Wakes a [`Worker`]'s thread from any thread; cheap to clone.
#[derive(Clone)]
pub struct WorkerWaker {
    control: Arc<Control>,
}

impl WorkerWaker {
    /// Asks for one more pass of the worker's `work`. Never blocks.
    pub fn wake(&self) {
        self.control.waker.wake();
    }
}

/// A named thread running `work` once per wake, with quiesce/resume; stopped and joined on
/// drop.
pub struct Worker {
    name: String,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name`, which sleeps until woken and then calls `work`.
    pub fn spawn<F>(name: &str, mut work: F) -> Result<Worker, WorkerError>
    where
        F: FnMut() + Send + 'static,
    {
        let waker =
            Waker::new().map_err(|source| WorkerError::Waker { name: name.to_string(), source })?;
        let control = Arc::new(Control {
            waker,
            state: Mutex::new(RunState::default()),
            changed: Condvar::new(),
        });
        let thread = {
            let control = control.clone();
            let thread_name = name.to_string();
            thread::Builder::new()
                .name(name.to_string())
                .spawn(move || run(&thread_name, &control, &mut work))
                .map_err(|source| WorkerError::Spawn { name: name.to_string(), source })?
        };
        Ok(Worker { name: name.to_string(), control, thread: Some(thread) })
    }

    pub fn waker(&self) -> WorkerWaker {
        WorkerWaker { control: self.control.clone() }
    }

    /// Asks for one more pass of `work`.
    pub fn wake(&self) {
        self.control.waker.wake();
    }

    /// Returns once the thread is parked between two passes (or gone); until
    /// [`Worker::resume`] it runs no `work`, however often it is woken.
    pub fn quiesce(&self) {
        let mut st = lock(&self.control.state);
        st.quiesce = true;
        self.control.waker.wake();
        while !st.parked && !st.exited {
            st = self.control.wait(st);
        }
    }

    /// Lets the thread go on; it makes one pass for whatever came while it was parked.
    pub fn resume(&self) {
        lock(&self.control.state).quiesce = false;
        self.control.changed.notify_all();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        lock(&self.control.state).stop = true;
        self.control.changed.notify_all();
        self.control.waker.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("{}: the thread panicked", self.name);
            }
        }
    }
}

fn run(name: &str, control: &Control, work: &mut dyn FnMut()) {
    let _exit = ExitGuard(control);
    loop {
        if let Err(e) = control.waker.wait() {
            error!("{name}: waiting for work failed: {e}");
            return;
        }
        {
            let mut st = lock(&control.state);
            while st.quiesce && !st.stop {
                st.parked = true;
                control.changed.notify_all();
                st = control.wait(st);
            }
            st.parked = false;
            if st.stop {
                return;
            }
        }
        work();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    const LONG: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(50);

    /// A worker that reports each pass on a channel.
    fn reporting() -> (Worker, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn("test-worker", move || tx.send(()).unwrap()).unwrap();
        (worker, rx)
    }

    #[test]
    fn a_wake_runs_one_pass_on_the_named_thread() {
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn("named-worker", move || {
            tx.send(thread::current().name().map(str::to_string)).unwrap()
        })
        .unwrap();
        assert!(rx.recv_timeout(SHORT).is_err(), "no pass before a wake");
        worker.waker().wake();
        assert_eq!(rx.recv_timeout(LONG).unwrap().as_deref(), Some("named-worker"));
    }

    #[test]
    fn dropping_the_worker_stops_and_joins_its_thread() {
        let held = Arc::new(());
        let in_closure = held.clone();
        let worker = Worker::spawn("test-worker", move || drop(in_closure.clone())).unwrap();
        worker.wake();
        drop(worker);
        // The closure (and its clone of `held`) is gone only once the thread has returned.
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[test]
    fn no_pass_runs_while_quiesced_and_resume_runs_one() {
        let (worker, rx) = reporting();
        worker.quiesce();
        // The quiesce's own wake may not run a pass either.
        for _ in 0..10 {
            worker.wake();
        }
        assert!(rx.recv_timeout(SHORT).is_err(), "work ran while quiesced");
        worker.resume();
        rx.recv_timeout(LONG).expect("resume did not run the pending work");
        worker.wake();
        rx.recv_timeout(LONG).expect("wakes after resume run work again");
    }

    #[test]
    fn quiesce_waits_for_the_pass_in_progress() {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let passes = Arc::new(AtomicUsize::new(0));
        let counted = passes.clone();
        let worker = Worker::spawn("test-worker", move || {
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        worker.wake();
        entered_rx.recv_timeout(LONG).unwrap();
        let (quiesced_tx, quiesced_rx) = mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                worker.quiesce();
                quiesced_tx.send(passes.load(Ordering::SeqCst)).unwrap();
            });
            assert!(quiesced_rx.recv_timeout(SHORT).is_err(), "quiesce returned mid-pass");
            release_tx.send(()).unwrap();
            assert_eq!(quiesced_rx.recv_timeout(LONG).unwrap(), 1, "the pass had finished");
        });
        assert!(entered_rx.recv_timeout(SHORT).is_err(), "a pass began while quiesced");
        worker.resume();
        entered_rx.recv_timeout(LONG).expect("resume ran a pass");
        release_tx.send(()).unwrap();
    }

    #[test]
    fn quiesce_of_a_thread_that_died_returns() {
        let worker = Worker::spawn("test-worker", || panic!("work failed")).unwrap();
        worker.wake();
        let deadline = std::time::Instant::now() + LONG;
        while !lock(&worker.control.state).exited {
            assert!(std::time::Instant::now() < deadline, "the thread did not die");
            thread::sleep(Duration::from_millis(1));
        }
        worker.quiesce();
        worker.resume();
    }

    #[test]
    fn a_worker_dropped_while_quiesced_stops() {
        let (worker, rx) = reporting();
        worker.quiesce();
        worker.wake();
        drop(worker);
        assert!(rx.try_recv().is_err(), "no pass on the way out");
    }
}
