//! Host capacity (RAM, CPUs) against what the library's VMs would use, and the over-commit
//! check made before a start.

use super::model::VmSummary;

/// What the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    pub memory_mib: u64,
    pub cpus: u32,
}

impl HostCapacity {
    /// Reads `/proc/meminfo` and the available parallelism; unknown values are 0.
    pub fn probe() -> HostCapacity {
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_total_mib(&text))
            .unwrap_or(0);
        let cpus = std::thread::available_parallelism()
            .map_or(0, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        HostCapacity { memory_mib, cpus }
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in MiB.
pub fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value / 1024),
        _ => None,
    }
}

/// Sums over the library: all configured VMs, and the ones with a live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub configured_memory_mib: u64,
    pub configured_cpus: u32,
    pub running_memory_mib: u64,
    pub running_cpus: u32,
}

pub fn usage(vms: &[VmSummary]) -> Usage {
    let mut u = Usage::default();
    for vm in vms {
        u.configured_memory_mib += vm.memory_mib;
        u.configured_cpus += vm.cpus;
        if vm.state.is_live() {
            u.running_memory_mib += vm.memory_mib;
            u.running_cpus += vm.cpus;
        }
    }
    u
}

/// True when starting a VM of `memory_mib` would need more RAM than the host has, counting
/// the VMs already running. An unknown host size (0) never warns.
pub fn would_overcommit(host: HostCapacity, running_memory_mib: u64, memory_mib: u64) -> bool {
    host.memory_mib != 0 && running_memory_mib.saturating_add(memory_mib) > host.memory_mib
}

/// The status-bar line: "Host: 15.5 GiB RAM, 8 CPUs · VMs: 3.0 GiB, 5 CPUs configured; 1.0 GiB, 2 CPUs running".
pub fn capacity_line(host: HostCapacity, u: Usage) -> String {
    format!(
        "Host: {} RAM, {} CPUs  ·  VMs: {}, {} vCPUs configured; {}, {} vCPUs running",
        format_mib(host.memory_mib),
        host.cpus,
        format_mib(u.configured_memory_mib),
        u.configured_cpus,
        format_mib(u.running_memory_mib),
        u.running_cpus
    )
}

pub fn format_mib(mib: u64) -> String {
    if mib >= 1024 {
        format!("{:.1} GiB", mib as f64 / 1024.0)
    } else {
        format!("{mib} MiB")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::gui::model::VmState;

    fn vm(memory_mib: u64, cpus: u32, state: VmState) -> VmSummary {
        VmSummary {
            name: "x".into(),
            state,
            cpus,
            memory_mib,
            pid: None,
            log_tail: Vec::new(),
            display: true,
            net: Default::default(),
            cd: Default::default(),
        }
    }

    #[test]
    fn meminfo_total_is_read_in_mib() {
        let text = "MemTotal:       16310716 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total_mib(text), Some(15928));
        assert_eq!(mem_total_mib("MemFree: 5 kB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn usage_counts_live_vms_as_running() {
        let vms = [
            vm(512, 1, VmState::Stopped),
            vm(1024, 2, VmState::Running),
            vm(2048, 4, VmState::Paused),
            vm(256, 1, VmState::Crashed { error: None }),
        ];
        let u = usage(&vms);
        assert_eq!((u.configured_memory_mib, u.configured_cpus), (3840, 8));
        assert_eq!((u.running_memory_mib, u.running_cpus), (3072, 6));
    }

    #[test]
    fn overcommit_counts_running_vms_plus_the_new_one() {
        let host = HostCapacity { memory_mib: 4096, cpus: 2 };
        assert!(!would_overcommit(host, 0, 4096));
        assert!(!would_overcommit(host, 2048, 2048));
        assert!(would_overcommit(host, 2048, 2049));
        assert!(would_overcommit(host, 0, 8192));
        // Unknown host RAM: no warning rather than a false one.
        assert!(!would_overcommit(HostCapacity { memory_mib: 0, cpus: 1 }, 0, 1 << 20));
    }

    #[test]
    fn capacity_line_names_host_and_vm_totals() {
        let line = capacity_line(
            HostCapacity { memory_mib: 16384, cpus: 8 },
            Usage {
                configured_memory_mib: 1536,
                configured_cpus: 3,
                running_memory_mib: 512,
                running_cpus: 1,
            },
        );
        assert!(line.contains("16.0 GiB RAM, 8 CPUs"), "{line}");
        assert!(line.contains("1.5 GiB, 3 vCPUs configured"), "{line}");
        assert!(line.contains("512 MiB, 1 vCPUs running"), "{line}");
    }
}
