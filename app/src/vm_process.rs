//! The detached VM process (`hutch __vm-process NAME`, started by `hutch start`): owns the
//! VM lock, builds and runs the machine, fans serial output to `serial.log` and consoles,
//! serves the control socket, and records how the run ended in `last-exit.json`.
//!
//! ```text
//!   hutch start ──spawn (setsid)──▶ __vm-process ──┬─ vm.lock (held until exit)
//!                                                  ├─ pid.json, control.sock
//!                                                  ├─ Machine::run (main thread)
//!                                                  ├─ SerialHub ─▶ serial.log + consoles
//!                                                  └─ last-exit.json (last act)
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use vmm::machine::{ExitReason, Machine, MachineHandle};

use crate::backend;
use crate::control::protocol::StatusReply;
use crate::control::server::{ControlServer, ControlTarget};
use crate::library::{ExitKind, ExitRecord, Library, PidFile, VmConfig, VmDir, VmLock};
use crate::runtime;
use crate::serial_hub::{SerialHub, SerialSubscription};

/// Checks the files and the host, opens the hypervisor and builds the machine.
pub fn build_machine(
    config: &VmConfig,
    serial_out: Box<dyn Write + Send>,
) -> anyhow::Result<Machine> {
    config.check_files()?;
    backend::check_fits_host(config)?;
    let hypervisor = backend::open_hypervisor(None)?;
    Machine::new(&*hypervisor, &config.to_machine_config(), serial_out)
        .context("Cannot build the virtual machine")
}

/// The machine as seen by the control server.
struct MachineTarget {
    name: String,
    handle: MachineHandle,
    hub: SerialHub,
    started: Instant,
}

impl ControlTarget for MachineTarget {
    fn status(&self) -> StatusReply {
        StatusReply {
            name: self.name.clone(),
            state: self.handle.state(),
            pid: std::process::id(),
            cpus: self.handle.vcpu_count(),
            memory_mib: self.handle.memory_mib(),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }
    fn pause(&self) -> anyhow::Result<()> {
        self.handle.pause().context("Cannot pause")
    }
    fn resume(&self) -> anyhow::Result<()> {
        self.handle.resume().context("Cannot resume")
    }
    fn shutdown(&self) -> anyhow::Result<()> {
        self.handle.shutdown().context("Cannot press the power button")
    }
    fn poweroff(&self) -> anyhow::Result<()> {
        self.handle.poweroff();
        Ok(())
    }
    fn console_output(&self) -> SerialSubscription {
        self.hub.subscribe()
    }
    fn console_input(&self, bytes: &[u8]) {
        self.handle.serial_input(bytes);
    }
}

/// Entry point of `hutch __vm-process NAME`. Returns when the VM has ended.
pub fn main(library: &Library, name: &str) -> anyhow::Result<()> {
    let vm = library.existing(name)?;
    let signals = block_termination_signals();
    let _lock = lock_with_retry(&vm)?;
    vm.remove_last_exit()?;
    let result = run_locked(&vm, signals);
    let record = match &result {
        Ok(ExitReason::PowerOff) => ExitRecord::new(ExitKind::PowerOff, None),
        Ok(ExitReason::Reset) => ExitRecord::new(ExitKind::Reset, None),
        Ok(ExitReason::ForcedOff) => ExitRecord::new(ExitKind::ForcedOff, None),
        Err(e) => ExitRecord::new(ExitKind::Failed, Some(format!("{e:#}"))),
    };
    vm.write_last_exit(&record).context("Cannot record how the VM ended")?;
    vm.remove_pid_file();
    match result? {
        ExitReason::PowerOff => log::info!("The guest powered off"),
        ExitReason::Reset => {
            log::warn!("The guest rebooted; rebooting is not supported yet, so the VM stopped")
        }
        ExitReason::ForcedOff => log::info!("The VM was powered off"),
    }
    Ok(())
}

/// A concurrent `hutch status` holds the lock for an instant; only a lock that stays held
/// means another VM process (or a delete).
fn lock_with_retry(vm: &VmDir) -> anyhow::Result<VmLock> {
    for _ in 0..20 {
        if let Some(lock) = vm.try_lock()? {
            return Ok(lock);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(anyhow!("VM '{}' is already running (or being deleted)", vm.name()))
}

fn run_locked(vm: &VmDir, signals: Option<libc::sigset_t>) -> anyhow::Result<ExitReason> {
    let socket = runtime::socket_path(vm.dir(), vm.name())?;
    runtime::prepare_socket_dir(&socket)?;
    vm.write_pid_file(&PidFile {
        pid: std::process::id(),
        socket: socket.clone(),
        started_at: crate::library::unix_now(),
    })?;
    let config = vm.load_config()?;

    let serial_path = vm.serial_log_path();
    let serial_log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&serial_path)
        .with_context(|| format!("Cannot open {}", serial_path.display()))?;
    let hub = SerialHub::new(Some(serial_log));
    let machine = build_machine(&config, Box::new(hub.writer()))?;
    let handle = machine.handle();
    let target = Arc::new(MachineTarget {
        name: vm.name().to_string(),
        handle: handle.clone(),
        hub: hub.clone(),
        started: Instant::now(),
    });
    let server = ControlServer::bind(&socket, target)?;
    if let Some(set) = signals {
        spawn_signal_thread(set, handle);
    }
    log::info!(
        "VM '{}' running (pid {}), control socket {}",
        vm.name(),
        std::process::id(),
        socket.display()
    );

    let result = machine.run().context("The virtual machine failed");
    hub.close();
    server.stop();
    runtime::remove_socket(&socket);
    result
}

const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks SIGTERM/SIGINT/SIGHUP in this thread (and so in every thread started later) so
/// one thread can take them with sigwait and power the VM off cleanly.
fn block_termination_signals() -> Option<libc::sigset_t> {
    // SAFETY: sigemptyset/sigaddset initialize and edit the set we own; pthread_sigmask
    // only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return None;
        }
        Some(set)
    }
}

fn spawn_signal_thread(set: libc::sigset_t, handle: MachineHandle) {
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialized sigset and `sig` a valid out-parameter.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            log::warn!("Got signal {sig}: powering the VM off");
            handle.poweroff();
        }
    });
    if let Err(e) = spawned {
        log::warn!("Cannot start the signal thread: {e}");
    }
}
