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
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use display::frame::FrameWriter;
use display::scanout::Screen;
use net::slirp::{Forward, UserNet, UserNetConfig};
use vmm::machine::{ExitReason, Machine, MachineHandle, NetAttachment, RunState};

use crate::backend;
use crate::control::protocol::{CdStatus, ControlTarget, NetStatus, StatusReply};
use crate::control::server::{ConsoleTarget, ControlServer};
use crate::library::{
    parse_mac, CdDrive, ExitKind, ExitRecord, Library, NetMode, PidFile, VmConfig, VmDir, VmLock,
};
use crate::runtime;
use crate::serial_hub::{SerialHub, SerialSubscription};
use crate::snapshots::{self, SnapshotInfo, SnapshotList};
use vmm::snapshot::SnapshotFile;

/// A built machine and the user-mode network its card is on (for forwards and the lease).
pub struct BuiltMachine {
    pub machine: Machine,
    pub net: Option<Arc<UserNet>>,
}

/// The user-mode network of a VM with `net = user`, its forwards bound (a busy host port is
/// an error naming it). `HUTCH_DNS` (`ADDR:PORT`) sends the guest's DNS there instead of to
/// the host's resolver, which is how tests keep DNS on a server of their own.
pub fn user_net(config: &VmConfig) -> anyhow::Result<Option<(Arc<UserNet>, NetAttachment)>> {
    if config.net != NetMode::User {
        return Ok(None);
    }
    let mac = match &config.mac {
        Some(mac) => parse_mac(mac)?,
        None => parse_mac(&crate::library::random_mac())?,
    };
    let forwards = config.parsed_forwards()?;
    let dns_server = match std::env::var("HUTCH_DNS") {
        Ok(addr) if !addr.is_empty() => Some(
            addr.parse()
                .with_context(|| format!("HUTCH_DNS={addr} is not an ADDR:PORT socket address"))?,
        ),
        _ => None,
    };
    let net = UserNet::new(UserNetConfig {
        guest_mac: mac,
        dns_server,
        isolate_from_host: config.isolate_from_host,
        forwards,
        mtu: usize::from(config.mtu),
        ..UserNetConfig::default()
    })
    .context("Cannot start the VM's user-mode network")?;
    let net = Arc::new(net);
    Ok(Some((net.clone(), NetAttachment { mac, mtu: config.mtu, backend: Box::new(net) })))
}

/// Checks the files and the host, opens the hypervisor and builds the machine. With `frame`
/// (and the display on in `config`), the machine's screen is shared at that path.
pub fn build_machine(
    config: &VmConfig,
    serial_out: Box<dyn Write + Send>,
    frame: Option<&Path>,
    snapshot: Option<&SnapshotFile>,
) -> anyhow::Result<BuiltMachine> {
    if snapshot.is_none() {
        config.check_files()?;
    }
    backend::check_fits_host(config)?;
    let hypervisor = backend::open_hypervisor(None)?;
    let mut machine_config = config.to_machine_config();
    machine_config.kernel_cache_dir = kernel_cache_dir(|k| std::env::var_os(k));
    let screen = match frame.filter(|_| config.display) {
        Some(path) => {
            let writer = FrameWriter::create(path, display::MAX_WIDTH, display::MAX_HEIGHT)
                .with_context(|| format!("Cannot create the shared screen {}", path.display()))?;
            Some(Arc::new(Screen::new(writer)))
        }
        None => None,
    };
    let (net, attachment) = match user_net(config)? {
        Some((net, attachment)) => (Some(net), Some(attachment)),
        None => (None, None),
    };
    let machine = match snapshot {
        Some(file) => {
            Machine::restore(&*hypervisor, &machine_config, file, serial_out, screen, attachment)
                .with_context(|| format!("Cannot restore the snapshot {}", file.path().display()))?
        }
        None => Machine::new(&*hypervisor, &machine_config, serial_out, screen, attachment)
            .context("Cannot build the virtual machine")?,
    };
    Ok(BuiltMachine { machine, net })
}

/// The decompressed-kernel cache directory: `$HUTCH_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/hutch/kernels`, else `~/.cache/hutch/kernels`; None when
/// `HUTCH_KERNEL_CACHE=0` or no home is known. `var` reads the environment.
pub fn kernel_cache_dir(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<std::path::PathBuf> {
    let var = |k| var(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    if var("HUTCH_KERNEL_CACHE").is_some_and(|v| v.as_os_str() == "0") {
        return None;
    }
    if let Some(dir) = var("HUTCH_CACHE_DIR") {
        Some(dir)
    } else if let Some(cache) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        Some(cache.join("hutch/kernels"))
    } else {
        var("HOME").map(|home| home.join(".cache/hutch/kernels"))
    }
}

/// What the VM process needs from a running machine's handle: [`MachineHandle`] in
/// production, a fake in tests.
pub trait MachineControl: Clone + Send + Sync + 'static {
    fn state(&self) -> RunState;
    fn pause(&self) -> anyhow::Result<()>;
    fn resume(&self) -> anyhow::Result<()>;
    fn shutdown(&self) -> anyhow::Result<()>;
    fn poweroff(&self);
    fn serial_input(&self, bytes: &[u8]);
    fn vcpu_count(&self) -> u32;
    fn memory_mib(&self) -> u64;
    fn input(&self, events: &[display::InputEvent]) -> anyhow::Result<()>;
    fn display_size(&self, width: u32, height: u32) -> anyhow::Result<()>;
    fn display_status(&self) -> Option<String>;
    /// Saves the machine as a snapshot of `vm` (fakes cannot).
    fn snapshot_take(
        &self,
        _vm: &VmDir,
        _name: Option<&str>,
        _screen: Option<&Path>,
        _cd: &CdDrive,
    ) -> anyhow::Result<SnapshotInfo> {
        Err(anyhow!("This machine cannot be saved"))
    }
    /// Puts the ISO at `iso` in the machine's CD drive (None: ejects).
    fn change_media(&self, _iso: Option<&Path>) -> anyhow::Result<()> {
        Err(anyhow!("This machine has no CD drive"))
    }
}

impl MachineControl for MachineHandle {
    fn state(&self) -> RunState {
        MachineHandle::state(self)
    }
    fn pause(&self) -> anyhow::Result<()> {
        Ok(MachineHandle::pause(self)?)
    }
    fn resume(&self) -> anyhow::Result<()> {
        Ok(MachineHandle::resume(self)?)
    }
    fn shutdown(&self) -> anyhow::Result<()> {
        Ok(MachineHandle::shutdown(self)?)
    }
    fn poweroff(&self) {
        MachineHandle::poweroff(self)
    }
    fn serial_input(&self, bytes: &[u8]) {
        MachineHandle::serial_input(self, bytes)
    }
    fn vcpu_count(&self) -> u32 {
        MachineHandle::vcpu_count(self)
    }
    fn memory_mib(&self) -> u64 {
        MachineHandle::memory_mib(self)
    }
    fn input(&self, events: &[display::InputEvent]) -> anyhow::Result<()> {
        Ok(MachineHandle::send_input(self, events)?)
    }
    fn display_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
        Ok(MachineHandle::set_display_size(self, width, height)?)
    }
    fn display_status(&self) -> Option<String> {
        MachineHandle::display_status(self)
    }
    fn snapshot_take(
        &self,
        vm: &VmDir,
        name: Option<&str>,
        screen: Option<&Path>,
        cd: &CdDrive,
    ) -> anyhow::Result<SnapshotInfo> {
        snapshots::take(vm, self, name, screen, cd)
    }
    fn change_media(&self, iso: Option<&Path>) -> anyhow::Result<()> {
        let medium = match iso {
            Some(path) => {
                let drive = vmm::machine::DiskConfig::removable(Some(path.to_path_buf()));
                let opened = vmm::machine::disks::open_disk(&drive)
                    .with_context(|| format!("Cannot open the ISO {}", path.display()))?;
                Some(opened)
            }
            None => None,
        };
        Ok(MachineHandle::change_media(self, medium)?)
    }
}

/// A built machine the VM process can run: [`BuiltMachine`] in production.
pub trait RunnableMachine {
    type Handle: MachineControl;
    fn handle(&self) -> Self::Handle;
    /// The user-mode network its card is on, if it has one.
    fn user_net(&self) -> Option<Arc<UserNet>> {
        None
    }
    fn run(self) -> anyhow::Result<ExitReason>;
}

impl RunnableMachine for BuiltMachine {
    type Handle = MachineHandle;
    fn handle(&self) -> MachineHandle {
        self.machine.handle()
    }
    fn user_net(&self) -> Option<Arc<UserNet>> {
        self.net.clone()
    }
    fn run(self) -> anyhow::Result<ExitReason> {
        Ok(self.machine.run()?)
    }
}

/// The machine as seen by the control server.
struct MachineTarget<H> {
    name: String,
    handle: H,
    hub: SerialHub,
    started: Instant,
    instance: u64,
    vm: VmDir,
    screen: Option<PathBuf>,
    /// One snapshot operation at a time (they all rewrite the index).
    snapshot_lock: Mutex<()>,
    net: Option<Arc<UserNet>>,
    /// The machine's CD drive and what it holds now (a snapshot records it). Held across a
    /// media change and a snapshot, so a snapshot never records another ISO than the drive's.
    cd: Mutex<CdDrive>,
}

/// The snapshot the VM process restarts into once its machine has stopped.
static RESTORE_REQUEST: Mutex<Option<String>> = Mutex::new(None);

fn instance_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
        ^ u64::from(std::process::id())
}

impl<H: MachineControl> ControlTarget for MachineTarget<H> {
    fn status(&self) -> anyhow::Result<StatusReply> {
        Ok(StatusReply {
            name: self.name.clone(),
            state: self.handle.state(),
            pid: std::process::id(),
            cpus: self.handle.vcpu_count(),
            memory_mib: self.handle.memory_mib(),
            uptime_secs: self.started.elapsed().as_secs(),
            instance: self.instance,
            display: self.handle.display_status(),
            net: self.net.as_ref().map(|net| {
                Box::new(NetStatus {
                    mode: NetMode::User.name().to_string(),
                    guest_ip: net.lease().map(|ip| ip.to_string()),
                    forwards: net.forwards().iter().map(ToString::to_string).collect(),
                })
            }),
            cd: {
                let cd = self.cd.lock().unwrap_or_else(|p| p.into_inner());
                cd.present.then(|| CdStatus { iso: cd.iso.clone() })
            },
        })
    }
    fn forward_add(&self, spec: String) -> anyhow::Result<()> {
        let net = self.net.as_ref().ok_or_else(|| anyhow!("This VM has no user-mode network"))?;
        let forward = spec.parse::<Forward>()?;
        Ok(net.add_forward(forward)?)
    }
    fn forward_remove(&self, spec: String) -> anyhow::Result<()> {
        let net = self.net.as_ref().ok_or_else(|| anyhow!("This VM has no user-mode network"))?;
        let forward = spec.parse::<Forward>()?;
        Ok(net.remove_forward(forward)?)
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
    fn input(&self, events: Vec<display::InputEvent>) -> anyhow::Result<()> {
        self.handle.input(&events).context("Cannot send input to the guest")
    }
    fn display_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.handle.display_size(width, height).context("Cannot resize the guest display")
    }
    fn snapshot_take(&self, name: Option<String>) -> anyhow::Result<SnapshotInfo> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        let cd = self.cd.lock().unwrap_or_else(|p| p.into_inner());
        self.handle.snapshot_take(&self.vm, name.as_deref(), self.screen.as_deref(), &cd)
    }
    fn media(&self, iso: Option<PathBuf>) -> anyhow::Result<()> {
        let mut cd = self.cd.lock().unwrap_or_else(|p| p.into_inner());
        if !cd.present {
            bail!(
                "This VM has no CD drive (a kernel-boot VM started without an ISO has none); \
                 stop it to insert one"
            );
        }
        if let Some(iso) = iso.as_deref().filter(|p| !p.is_absolute()) {
            bail!("The ISO path must be absolute: {}", iso.display());
        }
        self.handle.change_media(iso.as_deref())?;
        match &iso {
            Some(iso) => log::info!("CD drive: inserted {}", iso.display()),
            None => log::info!("CD drive: ejected"),
        }
        cd.iso = iso;
        Ok(())
    }
    fn snapshot_list(&self) -> anyhow::Result<SnapshotList> {
        snapshots::list(&self.vm)
    }
    fn snapshot_restore(&self, snapshot: String) -> anyhow::Result<()> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        let id = snapshots::check_restore(&self.vm, &snapshot)
            .with_context(|| format!("Cannot restore snapshot '{snapshot}'"))?;
        *RESTORE_REQUEST.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
        self.handle.poweroff();
        Ok(())
    }
    fn snapshot_delete(&self, snapshot: String) -> anyhow::Result<()> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        let config = self.vm.load_config()?;
        snapshots::delete(&self.vm, &snapshot, Some(&config))?;
        Ok(())
    }
}

impl<H: MachineControl> ConsoleTarget for MachineTarget<H> {
    fn console_output(&self) -> SerialSubscription {
        self.hub.subscribe()
    }
    fn console_input(&self, bytes: &[u8]) {
        self.handle.serial_input(bytes);
    }
}

/// Entry point of `hutch __vm-process NAME`. Returns when the VM has ended.
pub fn main(library: &Library, name: &str, restore: Option<&str>) -> anyhow::Result<()> {
    let vm = library.existing(name)?;
    let signals = block_termination_signals();
    let reason = lifecycle(&vm, &runtime::runtime_root(), signals, restore, build_machine)?;
    if let Some(id) = RESTORE_REQUEST.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return restart_into(library, name, &id);
    }
    match reason {
        ExitReason::PowerOff => log::info!("The guest powered off"),
        ExitReason::ForcedOff => log::info!("The VM was powered off"),
    }
    Ok(())
}

/// Replaces this process with a fresh VM process that restores snapshot `id` (same pid, so
/// the library still sees one VM process; serial.log is appended to).
fn restart_into(library: &Library, name: &str, id: &str) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    log::info!("restarting into snapshot {id}");
    let exe = std::env::current_exe().context("Cannot find the hutch executable")?;
    let err = std::process::Command::new(exe)
        .arg("__vm-process")
        .arg(name)
        .arg("--restore")
        .arg(id)
        .env("HUTCH_HOME", library.root())
        .exec();
    Err(anyhow::Error::new(err).context("Cannot restart the VM process into the snapshot"))
}

/// How a VM process builds its machine: config, serial output, shared screen, snapshot.
type BuildFn<'a, M> = dyn FnOnce(
        &VmConfig,
        Box<dyn Write + Send>,
        Option<&Path>,
        Option<&SnapshotFile>,
    ) -> anyhow::Result<M>
    + 'a;

/// Everything the VM process does between taking the lock and recording the exit; `build`
/// makes the machine (the real one, or a fake in tests). With `restore` (a snapshot id)
/// the disks and config are first put at the snapshot and the machine is restored.
fn lifecycle<M: RunnableMachine>(
    vm: &VmDir,
    runtime_root: &Path,
    signals: Option<libc::sigset_t>,
    restore: Option<&str>,
    build: impl FnOnce(
        &VmConfig,
        Box<dyn Write + Send>,
        Option<&Path>,
        Option<&SnapshotFile>,
    ) -> anyhow::Result<M>,
) -> anyhow::Result<ExitReason> {
    let _lock = lock_with_retry(vm)?;
    vm.remove_last_exit()?;
    let build: Box<BuildFn<'_, M>> = Box::new(build);
    let result = run_locked(vm, runtime_root, signals, restore, build);
    let record = match &result {
        Ok(ExitReason::PowerOff) => ExitRecord::new(ExitKind::PowerOff, None),
        Ok(ExitReason::ForcedOff) => ExitRecord::new(ExitKind::ForcedOff, None),
        Err(e) => ExitRecord::new(ExitKind::Failed, Some(format!("{e:#}"))),
    };
    vm.write_last_exit(&record).context("Cannot record how the VM ended")?;
    vm.remove_pid_file();
    result
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

fn run_locked<M: RunnableMachine>(
    vm: &VmDir,
    runtime_root: &Path,
    signals: Option<libc::sigset_t>,
    restore: Option<&str>,
    build: Box<BuildFn<'_, M>>,
) -> anyhow::Result<ExitReason> {
    let socket = runtime::socket_path_in(runtime_root, vm.dir(), vm.name())?;
    runtime::prepare_socket_dir(&socket)?;
    vm.write_pid_file(&PidFile {
        pid: std::process::id(),
        socket: socket.clone(),
        started_at: crate::library::unix_now(),
    })?;
    // Layers of deleted snapshots that waited for the VM to stop.
    let merged = vm
        .load_config()
        .map_err(anyhow::Error::from)
        .and_then(|c| snapshots::merge_pending(vm, &c, false));
    if let Err(e) = merged {
        log::warn!("Cannot merge the layers of deleted snapshots yet: {e:#}");
    }
    let restored = match restore {
        Some(id) => Some(snapshots::apply_restore(vm, id)?),
        None => None,
    };
    let mut config = vm.load_config()?;
    config.resolve_firmware(&vm.nvram_path())?;
    // Fixed once: the guest may write a boot loader while it runs, and the snapshot must
    // record the drive the machine was built with.
    let cd = restored.as_ref().map_or_else(|| config.cd(), |r| r.cd.clone());
    config.set_cd(&cd);
    let snapshot = restored.map(|r| r.file);

    let serial_path = vm.serial_log_path();
    let serial_log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&serial_path)
        .with_context(|| format!("Cannot open {}", serial_path.display()))?;
    let hub = SerialHub::new(Some(serial_log));
    let frame = runtime::frame_path_for_socket(&socket);
    let machine = build(&config, Box::new(hub.writer()), Some(&frame), snapshot.as_ref())?;
    let handle = machine.handle();
    let net = machine.user_net();
    let target = Arc::new(MachineTarget {
        name: vm.name().to_string(),
        handle: handle.clone(),
        hub: hub.clone(),
        started: Instant::now(),
        instance: instance_id(),
        vm: vm.clone(),
        screen: config.display.then_some(frame),
        snapshot_lock: Mutex::new(()),
        net,
        cd: Mutex::new(cd),
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

fn spawn_signal_thread(set: libc::sigset_t, handle: impl MachineControl) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::control::client::ControlClient;
    use crate::library::{DiskState, Library, DEFAULT_CMDLINE};
    use std::io::Read;
    use std::path::PathBuf;
    use std::sync::mpsc;
    use std::sync::Mutex;

    fn env<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).into())
    }

    #[test]
    fn kernel_cache_dir_follows_the_environment_in_order() {
        let all =
            [("HUTCH_CACHE_DIR", "/c/hutch"), ("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")];
        assert_eq!(kernel_cache_dir(env(&all)), Some(PathBuf::from("/c/hutch")));
        assert_eq!(kernel_cache_dir(env(&all[1..])), Some(PathBuf::from("/xdg/hutch/kernels")));
        // A relative XDG_CACHE_HOME is invalid by the XDG spec and ignored.
        let relative = [("XDG_CACHE_HOME", "rel"), ("HOME", "/home/u")];
        assert_eq!(
            kernel_cache_dir(env(&relative)),
            Some(PathBuf::from("/home/u/.cache/hutch/kernels"))
        );
        assert_eq!(kernel_cache_dir(env(&[])), None);
    }

    #[test]
    fn kernel_cache_can_be_switched_off() {
        let off = [("HUTCH_KERNEL_CACHE", "0"), ("HUTCH_CACHE_DIR", "/c")];
        assert_eq!(kernel_cache_dir(env(&off)), None);
        let on = [("HUTCH_KERNEL_CACHE", "1"), ("HUTCH_CACHE_DIR", "/c")];
        assert_eq!(kernel_cache_dir(env(&on)), Some(PathBuf::from("/c")));
    }

    enum Cmd {
        Shutdown,
        Poweroff,
        Input(Vec<u8>),
    }

    /// A machine that prints a banner, echoes serial input, and ends on shutdown/poweroff.
    #[derive(Clone)]
    struct FakeHandle {
        tx: mpsc::Sender<Cmd>,
        paused: Arc<Mutex<bool>>,
        /// What each media change put in the CD drive.
        media: Arc<Mutex<Vec<Option<PathBuf>>>>,
    }

    impl MachineControl for FakeHandle {
        fn state(&self) -> RunState {
            if *self.paused.lock().unwrap() {
                RunState::Paused
            } else {
                RunState::Running
            }
        }
        fn pause(&self) -> anyhow::Result<()> {
            *self.paused.lock().unwrap() = true;
            Ok(())
        }
        fn resume(&self) -> anyhow::Result<()> {
            *self.paused.lock().unwrap() = false;
            Ok(())
        }
        fn shutdown(&self) -> anyhow::Result<()> {
            Ok(self.tx.send(Cmd::Shutdown)?)
        }
        fn poweroff(&self) {
            let _ = self.tx.send(Cmd::Poweroff);
        }
        fn serial_input(&self, bytes: &[u8]) {
            let _ = self.tx.send(Cmd::Input(bytes.to_vec()));
        }
        fn vcpu_count(&self) -> u32 {
            2
        }
        fn memory_mib(&self) -> u64 {
            128
        }
        fn input(&self, _events: &[display::InputEvent]) -> anyhow::Result<()> {
            Ok(())
        }
        fn display_size(&self, _width: u32, _height: u32) -> anyhow::Result<()> {
            Ok(())
        }
        fn display_status(&self) -> Option<String> {
            None
        }
        fn change_media(&self, iso: Option<&Path>) -> anyhow::Result<()> {
            self.media.lock().unwrap().push(iso.map(Path::to_path_buf));
            Ok(())
        }
    }

    struct FakeMachine {
        handle: FakeHandle,
        rx: mpsc::Receiver<Cmd>,
        serial: Box<dyn Write + Send>,
    }

    impl RunnableMachine for FakeMachine {
        type Handle = FakeHandle;
        fn handle(&self) -> FakeHandle {
            self.handle.clone()
        }
        fn run(mut self) -> anyhow::Result<ExitReason> {
            self.serial.write_all(b"Booting fake\r\n")?;
            loop {
                match self.rx.recv()? {
                    Cmd::Shutdown => return Ok(ExitReason::PowerOff),
                    Cmd::Poweroff => return Ok(ExitReason::ForcedOff),
                    Cmd::Input(bytes) => self.serial.write_all(&bytes)?,
                }
            }
        }
    }

    fn fake_build(
        _: &VmConfig,
        serial: Box<dyn Write + Send>,
        _: Option<&Path>,
        _: Option<&SnapshotFile>,
    ) -> anyhow::Result<FakeMachine> {
        let (tx, rx) = mpsc::channel();
        let handle = FakeHandle { tx, paused: Arc::default(), media: Arc::default() };
        Ok(FakeMachine { handle, rx, serial })
    }

    struct Setup {
        _home: tempfile::TempDir,
        runtime: tempfile::TempDir,
        vm: VmDir,
    }

    fn setup() -> Setup {
        let home = tempfile::tempdir().unwrap();
        let runtime = tempfile::tempdir().unwrap();
        let lib = Library::at(home.path().to_path_buf());
        let config =
            VmConfig::new(PathBuf::from("/k"), None, DEFAULT_CMDLINE.into(), Vec::new(), 2, 128);
        let vm = lib.create("vm", &config).unwrap();
        Setup { _home: home, runtime, vm }
    }

    /// Waits for the VM process to answer on the socket named in its pid file.
    fn wait_for_socket(vm: &VmDir) -> PathBuf {
        for _ in 0..500 {
            if let Some(pid) = vm.read_pid_file() {
                if ControlClient::connect(&pid.socket).and_then(|mut c| c.status()).is_ok() {
                    return pid.socket;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the VM process never answered");
    }

    #[test]
    fn a_run_serves_control_and_console_then_records_a_clean_exit() {
        let s = setup();
        let (vm, root) = (s.vm.clone(), s.runtime.path().to_path_buf());
        let run = std::thread::spawn(move || lifecycle(&vm, &root, None, None, fake_build));
        let socket = wait_for_socket(&s.vm);
        assert!(socket.starts_with(s.runtime.path()));
        assert!(matches!(s.vm.disk_state().unwrap(), DiskState::Running { pid: Some(_) }));

        let mut c = ControlClient::connect(&socket).unwrap();
        let st = c.status().unwrap();
        assert_eq!((st.name.as_str(), st.cpus, st.memory_mib), ("vm", 2, 128));
        assert_eq!(st.pid, std::process::id());
        c.pause().unwrap();
        assert_eq!(c.status().unwrap().state, RunState::Paused);
        c.resume().unwrap();

        let mut console = ControlClient::connect(&socket).unwrap().into_console().unwrap();
        console.writer.write_all(b"echo me").unwrap();
        let mut echoed = [0u8; 7];
        console.reader.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"echo me");

        c.shutdown().unwrap();
        assert_eq!(run.join().unwrap().unwrap(), ExitReason::PowerOff);
        // The console was hung up when the VM ended.
        let mut rest = Vec::new();
        console.reader.read_to_end(&mut rest).unwrap();

        let rec = s.vm.read_last_exit().unwrap();
        assert_eq!((rec.reason, rec.clean), (ExitKind::PowerOff, true));
        assert_eq!(s.vm.disk_state().unwrap(), DiskState::Stopped);
        assert!(s.vm.read_pid_file().is_none());
        assert!(!socket.exists() && !socket.parent().unwrap().exists());
        let log = std::fs::read_to_string(s.vm.serial_log_path()).unwrap();
        assert_eq!(log, "Booting fake\r\necho me");
    }

    #[test]
    fn the_cd_of_a_running_vm_changes_in_its_drive_and_in_vm_toml() {
        let s = setup();
        let lib = Library::at(s._home.path().to_path_buf());
        let iso = s._home.path().join("inst.iso");
        std::fs::write(&iso, [0u8; 4096]).unwrap();
        let other = s._home.path().join("other.iso");
        std::fs::write(&other, [0u8; 4096]).unwrap();
        let mut config = s.vm.load_config().unwrap();
        config.iso = Some(iso.clone());
        s.vm.write_config(&config).unwrap();
        let media = Arc::new(Mutex::new(Vec::new()));
        let seen = media.clone();
        let build = move |c: &VmConfig,
                          serial: Box<dyn Write + Send>,
                          f: Option<&Path>,
                          r: Option<&SnapshotFile>|
              -> anyhow::Result<FakeMachine> {
            let mut m = fake_build(c, serial, f, r)?;
            m.handle.media = seen.clone();
            Ok(m)
        };
        let (vm, root) = (s.vm.clone(), s.runtime.path().to_path_buf());
        let run = std::thread::spawn(move || lifecycle(&vm, &root, None, None, build));
        let socket = wait_for_socket(&s.vm);

        assert_eq!(crate::service::vm::change_media(&lib, "vm", None).unwrap(), Some(iso.clone()));
        assert_eq!(s.vm.load_config().unwrap().iso, None);
        crate::service::vm::change_media(&lib, "vm", Some(&other)).unwrap();
        assert_eq!(s.vm.load_config().unwrap().iso, Some(other.clone()));
        assert_eq!(*media.lock().unwrap(), vec![None, Some(other.clone())]);
        // A hostile client's relative path is refused; the drive keeps its ISO.
        let mut c = ControlClient::connect(&socket).unwrap();
        let err = c.media(Some(PathBuf::from("inst.iso"))).unwrap_err();
        assert!(format!("{err:#}").contains("must be absolute"), "{err:#}");
        assert_eq!(media.lock().unwrap().len(), 2);

        c.poweroff().unwrap();
        run.join().unwrap().unwrap();
    }

    #[test]
    fn a_running_vm_without_a_cd_drive_refuses_an_iso_and_vm_toml_keeps_none() {
        let s = setup();
        let lib = Library::at(s._home.path().to_path_buf());
        let iso = s._home.path().join("inst.iso");
        std::fs::write(&iso, [0u8; 4096]).unwrap();
        let (vm, root) = (s.vm.clone(), s.runtime.path().to_path_buf());
        let run = std::thread::spawn(move || lifecycle(&vm, &root, None, None, fake_build));
        let socket = wait_for_socket(&s.vm);
        let err = crate::service::vm::change_media(&lib, "vm", Some(&iso)).unwrap_err();
        assert!(format!("{err:#}").contains("no CD drive"), "{err:#}");
        assert_eq!(s.vm.load_config().unwrap().iso, None);
        ControlClient::connect(&socket).unwrap().poweroff().unwrap();
        run.join().unwrap().unwrap();
    }

    #[test]
    fn poweroff_is_recorded_as_forced_off() {
        let s = setup();
        let (vm, root) = (s.vm.clone(), s.runtime.path().to_path_buf());
        let run = std::thread::spawn(move || lifecycle(&vm, &root, None, None, fake_build));
        let socket = wait_for_socket(&s.vm);
        ControlClient::connect(&socket).unwrap().poweroff().unwrap();
        assert_eq!(run.join().unwrap().unwrap(), ExitReason::ForcedOff);
        assert_eq!(s.vm.read_last_exit().unwrap().reason, ExitKind::ForcedOff);
    }

    #[test]
    fn a_machine_that_cannot_be_built_is_recorded_as_crashed() {
        let s = setup();
        let err = lifecycle(
            &s.vm,
            s.runtime.path(),
            None,
            None,
            |_, _, _, _| -> anyhow::Result<FakeMachine> {
                Err(anyhow!("no hypervisor")).context("Cannot build")
            },
        )
        .unwrap_err();
        assert_eq!(format!("{err:#}"), "Cannot build: no hypervisor");
        assert_eq!(
            s.vm.disk_state().unwrap(),
            DiskState::Crashed { error: Some("Cannot build: no hypervisor".into()) }
        );
        assert!(s.vm.read_pid_file().is_none());
    }

    #[test]
    fn a_second_vm_process_for_a_running_vm_is_refused_without_touching_its_records() {
        let s = setup();
        let (vm, root) = (s.vm.clone(), s.runtime.path().to_path_buf());
        let run = std::thread::spawn(move || lifecycle(&vm, &root, None, None, fake_build));
        let socket = wait_for_socket(&s.vm);
        let pid_before = s.vm.read_pid_file();
        let err = lifecycle(&s.vm, s.runtime.path(), None, None, fake_build).unwrap_err();
        assert!(err.to_string().contains("already running"), "{err}");
        assert_eq!(s.vm.read_pid_file(), pid_before);
        assert!(s.vm.read_last_exit().is_none());
        ControlClient::connect(&socket).unwrap().shutdown().unwrap();
        run.join().unwrap().unwrap();
    }
}
