//! CPU use of a VM process from `/proc/PID/stat` deltas.

use std::time::Instant;

/// utime + stime of a `/proc/PID/stat` line, in clock ticks. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last ')'.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime(14) stime(15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Percent of one CPU used by a process between two samples (100% = one CPU busy).
#[derive(Debug)]
pub struct CpuMeter {
    pid: u32,
    last: Option<(u64, Instant)>,
    hz: f64,
}

impl CpuMeter {
    pub fn new(pid: u32) -> CpuMeter {
        CpuMeter { pid, last: None, hz: clock_ticks_per_sec() }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes a sample; None for the first one or when the process is gone.
    pub fn sample(&mut self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let ticks = cpu_ticks(&stat)?;
        let now = Instant::now();
        let previous = self.last.replace((ticks, now));
        let (t0, i0) = previous?;
        percent(ticks.saturating_sub(t0), now.duration_since(i0).as_secs_f64(), self.hz)
    }
}

fn percent(ticks: u64, secs: f64, hz: f64) -> Option<f64> {
    (secs > 0.0).then(|| ticks as f64 / hz / secs * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_read_after_a_tricky_command_name() {
        let stat = "4242 (hutch (vm) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 130 70 0 0 20 0 9";
        assert_eq!(cpu_ticks(stat), Some(200));
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn percent_is_of_one_cpu() {
        assert_eq!(percent(100, 1.0, 100.0), Some(100.0));
        assert_eq!(percent(50, 2.0, 100.0), Some(25.0));
        assert_eq!(percent(10, 0.0, 100.0), None);
    }

    #[test]
    fn our_own_process_can_be_sampled() {
        let mut m = CpuMeter::new(std::process::id());
        assert_eq!(m.sample(), None);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(m.sample().is_some());
    }
}
