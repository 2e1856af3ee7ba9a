//! What the GUI shows about a VM: its state derived from the library's files and the VM
//! process's answer, and the summary row of the library view. Pure: the poller (worker.rs)
//! gathers the inputs.

use crate::control::protocol::RunState;

use crate::library::DiskState;

/// A VM's state as the GUI names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    Stopped,
    /// The VM process exists but does not answer yet (building the machine).
    Starting,
    Running,
    Paused,
    ShuttingDown,
    /// The last run ended badly (exit record says so, or the process died without one).
    Crashed {
        error: Option<String>,
    },
    /// A process holds the VM but its control socket does not answer.
    Unresponsive {
        error: String,
    },
    /// `vm.toml` cannot be read.
    Invalid {
        error: String,
    },
}

/// What asking the VM process for its status gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Not asked (no pid file yet).
    NotAsked,
    Answered(RunState),
    /// No answer; `socket_exists` tells "still starting" from "hung".
    Failed {
        socket_exists: bool,
        error: String,
    },
}

/// Combines the files on disk with the VM process's answer.
pub fn derive_state(disk: &DiskState, probe: &Probe) -> VmState {
    match disk {
        DiskState::Stopped => VmState::Stopped,
        DiskState::Crashed { error } => VmState::Crashed { error: error.clone() },
        DiskState::Running { pid: None } => VmState::Starting,
        DiskState::Running { pid: Some(_) } => match probe {
            Probe::NotAsked => VmState::Starting,
            Probe::Answered(RunState::Starting) => VmState::Starting,
            Probe::Answered(RunState::Running) => VmState::Running,
            Probe::Answered(RunState::Paused) => VmState::Paused,
            Probe::Answered(RunState::ShuttingDown) => VmState::ShuttingDown,
            // The machine has stopped; the process is about to release the lock.
            Probe::Answered(RunState::Stopped) => VmState::ShuttingDown,
            Probe::Failed { socket_exists: false, .. } => VmState::Starting,
            Probe::Failed { socket_exists: true, error } => {
                VmState::Unresponsive { error: error.clone() }
            }
        },
    }
}

impl VmState {
    pub fn label(&self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting down",
            VmState::Crashed { .. } => "crashed",
            VmState::Unresponsive { .. } => "unresponsive",
            VmState::Invalid { .. } => "invalid",
        }
    }

    /// A VM process exists (it holds the VM lock).
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Paused
                | VmState::ShuttingDown
                | VmState::Unresponsive { .. }
        )
    }

    /// Settings can be edited and the VM deleted or started.
    pub fn is_down(&self) -> bool {
        matches!(self, VmState::Stopped | VmState::Crashed { .. })
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            VmState::Crashed { error } => error.as_deref(),
            VmState::Unresponsive { error } | VmState::Invalid { error } => Some(error),
            _ => None,
        }
    }
}

/// One VM as the library view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSummary {
    pub name: String,
    pub state: VmState,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The VM process, while one runs and has said who it is.
    pub pid: Option<u32>,
    /// The last lines of `hutch.log` for crashed VMs (why it died).
    pub log_tail: Vec<String>,
    /// Whether the VM has a display device: as the running VM process says, else as its
    /// vm.toml says.
    pub display: bool,
    pub net: NetSummary,
    pub cd: CdSummary,
}

/// A VM's CD drive as the GUI shows it: as the running VM process says, else as vm.toml says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdSummary {
    /// It has a drive (a stopped VM gets one with an ISO in any case).
    pub drive: bool,
    pub iso: Option<std::path::PathBuf>,
}

impl CdSummary {
    /// What the CD menu says the drive holds; a stopped VM gets a drive with its next ISO.
    pub fn label(&self, stopped: bool) -> String {
        match &self.iso {
            Some(iso) => {
                let name = iso.file_name().unwrap_or(iso.as_os_str());
                format!("CD: {}", name.to_string_lossy())
            }
            None if self.drive || stopped => "CD: empty".to_string(),
            None => "No CD drive while it runs".to_string(),
        }
    }
}

/// A VM's network as the GUI shows it: as the running VM process says, else as vm.toml says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetSummary {
    /// `user` or `none`.
    pub mode: String,
    /// The guest's DHCP address, while it runs and has one.
    pub guest_ip: Option<String>,
    pub forwards: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::library::PidFile;

    fn running() -> DiskState {
        DiskState::Running {
            pid: Some(PidFile { pid: 7, socket: PathBuf::from("/s"), started_at: 0 }),
        }
    }

    #[test]
    fn files_alone_decide_stopped_and_crashed() {
        assert_eq!(derive_state(&DiskState::Stopped, &Probe::NotAsked), VmState::Stopped);
        let crashed = DiskState::Crashed { error: Some("vCPU failed".into()) };
        let state = derive_state(&crashed, &Probe::NotAsked);
        assert_eq!(state.label(), "crashed");
        assert_eq!(state.error(), Some("vCPU failed"));
        assert!(state.is_down() && !state.is_live());
    }

    #[test]
    fn a_locked_vm_without_answer_is_starting_until_its_socket_exists() {
        assert_eq!(
            derive_state(&DiskState::Running { pid: None }, &Probe::NotAsked),
            VmState::Starting
        );
        let no_socket = Probe::Failed { socket_exists: false, error: "refused".into() };
        assert_eq!(derive_state(&running(), &no_socket), VmState::Starting);
        let hung = Probe::Failed { socket_exists: true, error: "timed out".into() };
        assert_eq!(
            derive_state(&running(), &hung),
            VmState::Unresponsive { error: "timed out".into() }
        );
    }

    #[test]
    fn the_vm_process_answer_wins_while_it_runs() {
        for (run, want) in [
            (RunState::Running, VmState::Running),
            (RunState::Paused, VmState::Paused),
            (RunState::ShuttingDown, VmState::ShuttingDown),
            (RunState::Starting, VmState::Starting),
        ] {
            let state = derive_state(&running(), &Probe::Answered(run));
            assert_eq!(state, want);
            assert!(state.is_live() && !state.is_down());
        }
    }
}
