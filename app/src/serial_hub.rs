//! Fan-out of the guest's serial output: every byte goes to `serial.log` (appended, unbuffered)
//! and to each attached console. A slow console never stalls the guest: each has a bounded
//! buffer that drops its oldest bytes when full.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Bytes a console may fall behind before its oldest output is dropped.
const SUBSCRIBER_CAPACITY: usize = 1 << 20;

#[derive(Default)]
struct SubState {
    buf: Vec<u8>,
    closed: bool,
}

#[derive(Default)]
struct Subscriber {
    state: Mutex<SubState>,
    ready: Condvar,
}

impl Subscriber {
    fn lock(&self) -> MutexGuard<'_, SubState> {
        // A panicking holder cannot leave the byte buffer inconsistent; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let mut st = self.lock();
        st.buf.extend_from_slice(bytes);
        if st.buf.len() > SUBSCRIBER_CAPACITY {
            let excess = st.buf.len() - SUBSCRIBER_CAPACITY;
            st.buf.drain(..excess);
        }
        self.ready.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

struct HubInner {
    log: Mutex<Option<File>>,
    subscribers: Mutex<Vec<Arc<Subscriber>>>,
    closed: AtomicBool,
    log_failed: AtomicBool,
}

/// The serial output fan-out of one VM. Cheap to clone.
#[derive(Clone)]
pub struct SerialHub {
    inner: Arc<HubInner>,
}

/// What [`SerialSubscription::recv_timeout`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Data(Vec<u8>),
    Timeout,
    /// The VM has gone: no more output will come.
    Closed,
}

impl SerialHub {
    /// `log` is the already opened (append mode) `serial.log`, if any.
    pub fn new(log: Option<File>) -> SerialHub {
        SerialHub {
            inner: Arc::new(HubInner {
                log: Mutex::new(log),
                subscribers: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                log_failed: AtomicBool::new(false),
            }),
        }
    }

    /// The sink for the machine's serial port.
    pub fn writer(&self) -> SerialWriter {
        SerialWriter { hub: self.clone() }
    }

    /// Sends `bytes` to the log and every console.
    pub fn publish(&self, bytes: &[u8]) {
        if let Some(log) = self.inner.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            if let Err(e) = log.write_all(bytes) {
                // The guest must not notice a full disk; say it once in hutch.log.
                if !self.inner.log_failed.swap(true, Ordering::Relaxed) {
                    log::warn!("Cannot append to serial.log: {e}");
                }
            }
        }
        for sub in self.subscribers().iter() {
            sub.push(bytes);
        }
    }

    /// Attaches a new console; it sees output from now on.
    pub fn subscribe(&self) -> SerialSubscription {
        let sub = Arc::new(Subscriber::default());
        let mut subs = self.subscribers();
        // Checked under the list lock so a concurrent close() cannot miss this one.
        if self.inner.closed.load(Ordering::Acquire) {
            sub.close();
        } else {
            subs.push(sub.clone());
        }
        SerialSubscription { sub, hub: Arc::downgrade(&self.inner) }
    }

    /// The VM ended: every console sees [`Received::Closed`] after its remaining bytes.
    pub fn close(&self) {
        let mut subs = self.subscribers();
        self.inner.closed.store(true, Ordering::Release);
        for sub in subs.drain(..) {
            sub.close();
        }
    }

    fn subscribers(&self) -> MutexGuard<'_, Vec<Arc<Subscriber>>> {
        self.inner.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn subscriber_count(&self) -> usize {
        self.subscribers().len()
    }
}

/// `Write` adapter handed to the machine as its serial output.
pub struct SerialWriter {
    hub: SerialHub,
}

impl Write for SerialWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hub.publish(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One console's view of the output. Detaches on drop.
pub struct SerialSubscription {
    sub: Arc<Subscriber>,
    hub: Weak<HubInner>,
}

impl SerialSubscription {
    /// Everything buffered so far, waiting up to `timeout` for something to arrive.
    pub fn recv_timeout(&self, timeout: Duration) -> Received {
        let mut st = self.sub.lock();
        if st.buf.is_empty() && !st.closed {
            st = self
                .sub
                .ready
                .wait_timeout_while(st, timeout, |s| s.buf.is_empty() && !s.closed)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if !st.buf.is_empty() {
            Received::Data(std::mem::take(&mut st.buf))
        } else if st.closed {
            Received::Closed
        } else {
            Received::Timeout
        }
    }
}

impl Drop for SerialSubscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.subscribers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| !Arc::ptr_eq(s, &self.sub));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use std::io::Read;

    const T: Duration = Duration::from_millis(500);

    #[test]
    fn output_reaches_the_log_and_every_console() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let log = File::options().create(true).append(true).open(&path).unwrap();
        let hub = SerialHub::new(Some(log));
        let (a, b) = (hub.subscribe(), hub.subscribe());
        let mut w = hub.writer();
        w.write_all(b"hel").unwrap();
        w.write_all(b"lo").unwrap();
        assert_eq!(a.recv_timeout(T), Received::Data(b"hello".to_vec()));
        assert_eq!(b.recv_timeout(T), Received::Data(b"hello".to_vec()));
        let mut text = String::new();
        File::open(&path).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello");
    }

    #[test]
    fn consoles_only_see_output_after_they_attach() {
        let hub = SerialHub::new(None);
        hub.publish(b"before");
        let sub = hub.subscribe();
        assert_eq!(sub.recv_timeout(Duration::from_millis(10)), Received::Timeout);
        hub.publish(b"after");
        assert_eq!(sub.recv_timeout(T), Received::Data(b"after".to_vec()));
    }

    #[test]
    fn close_drains_then_reports_closed_even_for_late_subscribers() {
        let hub = SerialHub::new(None);
        let sub = hub.subscribe();
        hub.publish(b"bye");
        hub.close();
        assert_eq!(sub.recv_timeout(T), Received::Data(b"bye".to_vec()));
        assert_eq!(sub.recv_timeout(T), Received::Closed);
        assert_eq!(hub.subscribe().recv_timeout(T), Received::Closed);
    }

    #[test]
    fn a_slow_console_keeps_only_the_newest_bytes() {
        let hub = SerialHub::new(None);
        let sub = hub.subscribe();
        hub.publish(&vec![b'a'; SUBSCRIBER_CAPACITY]);
        hub.publish(b"tail");
        let Received::Data(data) = sub.recv_timeout(T) else { panic!("no data") };
        assert_eq!(data.len(), SUBSCRIBER_CAPACITY);
        assert!(data.ends_with(b"tail"));
    }

    #[test]
    fn dropping_a_subscription_detaches_it() {
        let hub = SerialHub::new(None);
        let sub = hub.subscribe();
        assert_eq!(hub.subscriber_count(), 1);
        drop(sub);
        assert_eq!(hub.subscriber_count(), 0);
    }

    #[test]
    fn a_waiting_console_wakes_on_output_from_another_thread() {
        let hub = SerialHub::new(None);
        let sub = hub.subscribe();
        let h2 = hub.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            h2.publish(b"x");
        });
        assert_eq!(sub.recv_timeout(Duration::from_secs(5)), Received::Data(b"x".to_vec()));
        t.join().unwrap();
    }
}
