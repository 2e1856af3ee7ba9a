//! A firmware that prints nothing for a long time gets a diagnostic instead of a silent spin:
//! each vCPU keeps its last port and MMIO accesses, the serial console marks when the guest
//! last printed, and a watchdog logs the accesses once the guest has been quiet for
//! [`SILENT_AFTER`] with nothing on its screen either.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::board::IoBuses;
use crate::devices::bus::lock;
use crate::hypervisor::ExitHandler;

/// Accesses kept per vCPU.
pub(crate) const TRACE_LEN: usize = 16;
/// How long a firmware may print nothing (and show nothing) before the diagnostic.
pub const SILENT_AFTER: Duration = Duration::from_secs(60);

/// One port or MMIO access as the vCPU made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    mmio: bool,
    write: bool,
    addr: u64,
    len: usize,
    /// The bytes written or read, little-endian (the first 8).
    value: u64,
}

impl Access {
    fn new(mmio: bool, write: bool, addr: u64, data: &[u8]) -> Access {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        Access { mmio, write, addr, len: data.len(), value: u64::from_le_bytes(bytes) }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.mmio { "mmio" } else { "pio" };
        let width = (self.len.min(8) * 2).max(2);
        if self.write {
            write!(
                f,
                "{kind} write {:#x}/{} = {:#0w$x}",
                self.addr,
                self.len,
                self.value,
                w = width + 2
            )
        } else {
            write!(
                f,
                "{kind} read {:#x}/{} -> {:#0w$x}",
                self.addr,
                self.len,
                self.value,
                w = width + 2
            )
        }
    }
}

/// The last [`TRACE_LEN`] accesses of one vCPU, and how many it made in all.
#[derive(Debug, Default)]
pub(crate) struct ExitTrace {
    ring: [Option<Access>; TRACE_LEN],
    next: usize,
    count: u64,
}

impl ExitTrace {
    fn record(&mut self, access: Access) {
        // `RUST_LOG=vmm::exits=trace` lists every access: a histogram of them shows what a slow
        // guest spends its exits on.
        log::trace!(target: "vmm::exits", "{access}");
        self.ring[self.next] = Some(access);
        self.next = (self.next + 1) % TRACE_LEN;
        self.count += 1;
    }

    /// Oldest first.
    pub(crate) fn recent(&self) -> Vec<Access> {
        let (newer, older) = self.ring.split_at(self.next);
        older.iter().chain(newer).flatten().copied().collect()
    }
}

/// The vCPU's exit handler: the machine's buses, each access recorded on the way.
pub(crate) struct TracedIo<'a> {
    pub io: &'a IoBuses,
    pub trace: &'a Mutex<ExitTrace>,
}

impl ExitHandler for TracedIo<'_> {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let mut io = self.io;
        io.pio_read(port, data);
        lock(self.trace).record(Access::new(false, false, u64::from(port), data));
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        lock(self.trace).record(Access::new(false, true, u64::from(port), data));
        let mut io = self.io;
        io.pio_write(port, data);
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        let mut io = self.io;
        io.mmio_read(addr, data);
        lock(self.trace).record(Access::new(true, false, addr, data));
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        lock(self.trace).record(Access::new(true, true, addr, data));
        let mut io = self.io;
        io.mmio_write(addr, data);
    }
}

/// When the guest last printed on its serial console.
#[derive(Debug)]
pub(crate) struct Silence {
    start: Instant,
    last_output_ms: AtomicU64,
}

impl Silence {
    pub(crate) fn new() -> Silence {
        Silence { start: Instant::now(), last_output_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_output_ms.store(now, Ordering::Relaxed);
    }

    /// How long the guest has printed nothing (since the machine was built, at first).
    pub(crate) fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_output_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// The serial console's output, marking each write in [`Silence`].
pub(crate) struct StampedWriter {
    inner: Box<dyn Write + Send>,
    silence: Arc<Silence>,
}

impl StampedWriter {
    pub(crate) fn new(inner: Box<dyn Write + Send>, silence: Arc<Silence>) -> StampedWriter {
        StampedWriter { inner, silence }
    }
}

impl Write for StampedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            self.silence.touch();
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Decides when to report: once per quiet spell of [`SILENT_AFTER`] with the screen off.
#[derive(Debug, Default)]
pub(crate) struct SilenceWatch {
    reported: bool,
}

impl SilenceWatch {
    /// True when the diagnostic is due now.
    pub(crate) fn due(&mut self, quiet: Duration, screen_live: bool) -> bool {
        if quiet < SILENT_AFTER || screen_live {
            self.reported = false;
            return false;
        }
        !std::mem::replace(&mut self.reported, true)
    }
}

/// The diagnostic: how long the guest has been quiet and each vCPU's last accesses.
pub(crate) fn silence_report(quiet: Duration, traces: &[Arc<Mutex<ExitTrace>>]) -> String {
    let mut report = format!(
        "the guest has printed nothing on its serial console for {} s, with nothing on a \
         screen either: the firmware may be stuck. Last port and MMIO accesses:",
        quiet.as_secs()
    );
    for (id, trace) in traces.iter().enumerate() {
        let trace = lock(trace);
        report.push_str(&format!("\n  vcpu{id} ({} accesses in all):", trace.count));
        let recent = trace.recent();
        if recent.is_empty() {
            report.push_str(" none");
        }
        for access in recent {
            report.push_str(&format!("\n    {access}"));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_keeps_the_last_accesses_oldest_first() {
        let mut trace = ExitTrace::default();
        for port in 0..(TRACE_LEN as u64 + 3) {
            trace.record(Access::new(false, true, port, &[port as u8]));
        }
        let recent = trace.recent();
        assert_eq!(recent.len(), TRACE_LEN);
        assert_eq!(recent[0].addr, 3, "the three oldest were overwritten");
        assert_eq!(recent[TRACE_LEN - 1].addr, TRACE_LEN as u64 + 2);
        assert_eq!(trace.count, TRACE_LEN as u64 + 3);
    }

    #[test]
    fn accesses_read_as_port_or_address_width_and_value() {
        let write = Access::new(false, true, 0x402, b"S");
        assert_eq!(write.to_string(), "pio write 0x402/1 = 0x53");
        let read = Access::new(true, false, 0xfed4_0000, &[0xff; 4]);
        assert_eq!(read.to_string(), "mmio read 0xfed40000/4 -> 0xffffffff");
        // Longer than 8 bytes (a string I/O burst): the first 8 are shown.
        let long = Access::new(false, true, 0x3f8, &[1u8; 16]);
        assert!(long.to_string().starts_with("pio write 0x3f8/16 = 0x0101"), "{long}");
    }

    #[test]
    fn the_report_is_due_once_per_quiet_spell_with_the_screen_off() {
        let mut watch = SilenceWatch::default();
        let quiet = SILENT_AFTER + Duration::from_secs(1);
        assert!(!watch.due(Duration::from_secs(5), false), "not quiet long enough");
        assert!(!watch.due(quiet, true), "the screen shows something");
        assert!(watch.due(quiet, false));
        assert!(!watch.due(quiet + Duration::from_secs(30), false), "said once");
        assert!(!watch.due(Duration::ZERO, false), "it printed again");
        assert!(watch.due(quiet, false), "a new quiet spell is reported again");
    }

    #[test]
    fn serial_output_marks_when_the_guest_last_printed() {
        let silence = Arc::new(Silence::new());
        std::thread::sleep(Duration::from_millis(5));
        assert!(silence.quiet_for() >= Duration::from_millis(5), "quiet since it was built");
        let mut out = StampedWriter::new(Box::new(std::io::sink()), silence.clone());
        out.write_all(b"").unwrap();
        assert_eq!(silence.last_output_ms.load(Ordering::Relaxed), 0, "nothing printed");
        out.write_all(b"SeaBIOS").unwrap();
        assert!(silence.last_output_ms.load(Ordering::Relaxed) >= 5, "printed just now");
    }

    #[test]
    fn the_report_names_each_vcpus_accesses() {
        let traces: Vec<Arc<Mutex<ExitTrace>>> = (0..2).map(|_| Arc::default()).collect();
        lock(&traces[0]).record(Access::new(false, false, 0x64, &[0x1c]));
        let report = silence_report(Duration::from_secs(61), &traces);
        assert!(report.contains("for 61 s"), "{report}");
        assert!(
            report.contains("vcpu0 (1 accesses in all):\n    pio read 0x64/1 -> 0x1c"),
            "{report}"
        );
        assert!(report.contains("vcpu1 (0 accesses in all): none"), "{report}");
    }
}
