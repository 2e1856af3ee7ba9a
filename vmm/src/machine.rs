//! One running x86_64 machine: guest memory, devices, vCPU threads and its lifecycle.
//!
//! The app builds a [`Machine`] from a [`MachineConfig`], takes a [`MachineHandle`] (cloneable,
//! `Send`) for control from other threads, and calls [`Machine::run`], which blocks until the
//! guest powers off, resets, is forced off, or fails.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::hypervisor::{Hypervisor, HypervisorError};

/// One disk attached as virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

/// What to boot and with how much.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disks: Vec<DiskConfig>,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// Coarse state reported over the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Starting,
    Running,
    Paused,
    ShuttingDown,
    Stopped,
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (reboot, triple fault).
    Reset,
    /// The host forced it off ([`MachineHandle::poweroff`]).
    ForcedOff,
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("Invalid machine configuration: {0}")]
    InvalidConfig(String),
    #[error("Could not set up guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("Could not load the guest kernel")]
    Boot(#[from] crate::arch::x86_64::boot::BootError),
    #[error("Could not build the ACPI tables")]
    Acpi(#[from] crate::arch::x86_64::acpi::AcpiError),
    #[error("Could not open disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: disk::DiskError,
    },
    #[error("Could not set up a device: {0}")]
    Device(String),
    #[error("vCPU {vcpu} failed")]
    Vcpu {
        vcpu: u32,
        #[source]
        source: HypervisorError,
    },
    #[error("Hypervisor failure")]
    Hypervisor(#[from] HypervisorError),
    #[error("Could not start a thread")]
    Thread(#[source] std::io::Error),
}

/// Control of a machine from any thread.
#[derive(Clone)]
pub struct MachineHandle {
    inner: Arc<()>,
}

impl MachineHandle {
    pub fn state(&self) -> RunState {
        let _ = &self.inner;
        RunState::Starting
    }
    /// Stops all vCPUs at a safe point.
    pub fn pause(&self) -> Result<(), MachineError> {
        Err(MachineError::Device("not yet".into()))
    }
    pub fn resume(&self) -> Result<(), MachineError> {
        Err(MachineError::Device("not yet".into()))
    }
    /// Presses the ACPI power button: the guest shuts down in an orderly way.
    pub fn shutdown(&self) -> Result<(), MachineError> {
        Err(MachineError::Device("not yet".into()))
    }
    /// Pulls the plug: `run` returns [`ExitReason::ForcedOff`].
    pub fn poweroff(&self) {}
    /// Bytes typed on the guest's serial console (COM1).
    pub fn serial_input(&self, _bytes: &[u8]) {}
    pub fn vcpu_count(&self) -> u32 {
        0
    }
    pub fn memory_mib(&self) -> u64 {
        0
    }
}

/// A built, not yet running machine.
pub struct Machine {
    handle: MachineHandle,
}

impl Machine {
    /// Builds the whole machine; nothing runs yet. Serial output (COM1) goes to `serial_out`.
    pub fn new(
        _hypervisor: &dyn Hypervisor,
        _config: &MachineConfig,
        _serial_out: Box<dyn Write + Send>,
    ) -> Result<Machine, MachineError> {
        Err(MachineError::Device("not yet".into()))
    }

    pub fn handle(&self) -> MachineHandle {
        self.handle.clone()
    }

    /// Runs until the guest ends; returns how it ended.
    pub fn run(self) -> Result<ExitReason, MachineError> {
        Err(MachineError::Device("not yet".into()))
    }
}
