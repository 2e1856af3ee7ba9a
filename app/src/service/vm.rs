//! A VM's lifecycle over the library and its VM process: create, start (spawn the detached
//! process and wait for its answer), stop, pause, resume, delete, status, console, screenshot,
//! and `hutch run`'s machine in this process. The CLI and the GUI both call these.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use vmm::machine::{ExitReason, MachineHandle};

use crate::control::client::{ConsoleStream, ControlClient, ControlClientError};
use crate::control::protocol::StatusReply;
use crate::library::{DiskState, ExitKind, ExitRecord, Library, PidFile, VmConfig, VmDir};
use crate::{backend, fsutil, vm_process};

/// How long `start` waits for the VM process to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `status`/`list` wait for a VM process to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const START_MARKER: &str = "==== hutch start";

/// `config` validated, its paths absolute, its files checked.
pub fn checked_config(mut config: VmConfig) -> anyhow::Result<VmConfig> {
    config.validate()?;
    config.make_paths_absolute()?;
    config.check_files()?;
    Ok(config)
}

/// Where `hutch run` sends the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    File(PathBuf),
}

/// What drives a machine running in this process while it runs: its serial input and its
/// plug. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ForegroundControl(MachineHandle);

impl ForegroundControl {
    pub fn serial_input(&self, bytes: &[u8]) {
        self.0.serial_input(bytes);
    }

    pub fn poweroff(&self) {
        self.0.poweroff();
    }
}

/// Runs a VM in this process until it ends (`hutch run`). `attach` is called once the
/// machine is built, before it runs; what it returns (a raw terminal, say) is dropped when
/// the machine has stopped.
pub fn run_foreground<G>(
    config: VmConfig,
    serial: &SerialTarget,
    attach: impl FnOnce(ForegroundControl) -> anyhow::Result<G>,
) -> anyhow::Result<ExitKind> {
    let config = checked_config(config)?;
    let serial_out: Box<dyn Write + Send> = match serial {
        SerialTarget::Stdio => Box::new(FlushingStdout),
        SerialTarget::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("Cannot open serial output {}", path.display()))?,
        ),
    };
    let built = vm_process::build_machine(&config, serial_out, None, None)?;
    let guard = attach(ForegroundControl(built.machine.handle()))?;
    let result = built.machine.run();
    drop(guard);
    Ok(match result.context("The virtual machine failed")? {
        ExitReason::PowerOff => ExitKind::PowerOff,
        ExitReason::ForcedOff => ExitKind::ForcedOff,
    })
}

/// Serial output on stdout, flushed per write so a terminal shows it at once.
struct FlushingStdout;

impl Write for FlushingStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Creates VM `name` from a configuration given by the user (checked first).
pub fn create(library: &Library, name: &str, config: VmConfig) -> anyhow::Result<()> {
    crate::library::validate_name(name)?;
    let config = checked_config(config)?;
    library.create(name, &config)?;
    Ok(())
}

/// The file name of the disk `create_with_new_disk` makes in the VM's directory.
pub const NEW_DISK_FILE: &str = "disk.qcow2";

/// [`create`], with an empty qcow2 disk of `size` bytes in the VM's directory as its first
/// disk (to install on). A failure leaves no VM behind.
pub fn create_with_new_disk(
    library: &Library,
    name: &str,
    config: VmConfig,
    size: u64,
) -> anyhow::Result<()> {
    crate::library::validate_name(name)?;
    check_new_disk_size(size)?;
    let mut config = checked_config(config)?;
    let vm = library.create(name, &config)?;
    let path = vm.dir().join(NEW_DISK_FILE);
    let made = (|| -> anyhow::Result<()> {
        create_blank_disk(&path, size)?;
        config.disks.insert(0, crate::library::DiskEntry { path, readonly: false });
        vm.write_config(&config)?;
        Ok(())
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(vm.dir());
    }
    made
}

fn check_new_disk_size(size: u64) -> anyhow::Result<()> {
    if size == 0 || !size.is_multiple_of(512) {
        bail!("A new disk of {size} bytes: the size must be a non-zero multiple of 512 bytes");
    }
    Ok(())
}

/// An empty qcow2 image of `size` bytes at `path`, which must not exist (it appears whole).
pub fn create_blank_disk(path: &Path, size: u64) -> anyhow::Result<()> {
    check_new_disk_size(size)?;
    let image = disk::convert::NewImage::create(path, disk::ImageFormat::Qcow2, size)
        .with_context(|| format!("Cannot create the disk {}", path.display()))?;
    image.commit(false)?;
    Ok(())
}

/// Puts `iso` in VM `name`'s CD drive, or with None ejects it; returns what was there. A
/// running VM changes its drive before `vm.toml` keeps the change, so an ISO the VM cannot
/// open is never saved. The firmware boots the CD first while the VM's first disk has no
/// boot loader.
pub fn change_media(
    library: &Library,
    name: &str,
    iso: Option<&Path>,
) -> anyhow::Result<Option<PathBuf>> {
    let vm = library.existing(name)?;
    let _edit = vm.edit_lock()?;
    // Held while the VM is stopped, so it cannot start meanwhile; None: it runs.
    let stopped = vm.try_lock()?;
    let mut config = vm.load_config()?;
    let before = config.iso.clone();
    config.set_iso(iso)?;
    if stopped.is_none() {
        let what = if iso.is_some() { "insert the ISO" } else { "eject its CD" };
        control_of(&vm)?
            .media(config.iso.clone())
            .with_context(|| format!("VM '{name}' cannot {what}"))?;
    }
    vm.write_config(&config)?;
    Ok(before)
}

/// Replaces a stopped VM's configuration (the lock keeps it from starting meanwhile).
pub fn save_settings(library: &Library, name: &str, config: &VmConfig) -> anyhow::Result<()> {
    let vm = library.existing(name)?;
    let _lock = vm.try_lock()?.ok_or_else(|| anyhow!("VM '{name}' is running; stop it first"))?;
    vm.write_config(config)?;
    Ok(())
}

/// A VM as `status` and `list` show it.
#[derive(Debug, Serialize)]
pub struct VmView {
    pub name: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What a running VM's screen shows (`virtio-gpu 1280x800`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// The network card (`user` or `none`).
    pub net: String,
    /// The address a running guest leased from the NAT's DHCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    /// Port forwards (a running VM's active ones, else vm.toml's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<String>,
}

/// Asks the VM process at `socket` for its status, waiting at most `timeout`.
pub fn probe(socket: &Path, timeout: Duration) -> Result<StatusReply, ControlClientError> {
    ControlClient::connect_with_timeout(socket, timeout).and_then(|mut c| c.status())
}

/// VM `name` as `status` shows it.
pub fn status(library: &Library, name: &str) -> anyhow::Result<VmView> {
    view(&library.existing(name)?)
}

fn view(vm: &VmDir) -> anyhow::Result<VmView> {
    let config = vm.load_config()?;
    let mut v = VmView {
        name: vm.name().to_string(),
        state: String::new(),
        pid: None,
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        uptime_secs: None,
        last_exit: vm.read_last_exit(),
        error: None,
        display: None,
        net: config.net.name().to_string(),
        guest_ip: None,
        forwards: config.forwards.clone(),
    };
    match vm.disk_state()? {
        DiskState::Running { pid: None } => v.state = "starting".into(),
        DiskState::Running { pid: Some(pidfile) } => {
            v.pid = Some(pidfile.pid);
            match probe(&pidfile.socket, QUERY_TIMEOUT) {
                Ok(st) => {
                    v.state = wire_name(&st.state);
                    v.uptime_secs = Some(st.uptime_secs);
                    v.display = st.display;
                    if let Some(net) = st.net {
                        v.guest_ip = net.guest_ip;
                        v.forwards = net.forwards;
                    }
                    // The machine's own numbers win once it reports them.
                    if st.cpus > 0 {
                        v.cpus = st.cpus;
                    }
                    if st.memory_mib > 0 {
                        v.memory_mib = st.memory_mib;
                    }
                }
                // Alive (it holds the lock) but no socket yet: still building the machine.
                Err(_) if !pidfile.socket.exists() => v.state = "starting".into(),
                // A socket that does not answer: hung.
                Err(e) => {
                    v.state = "unresponsive".into();
                    v.error = Some(format!("{:#}", anyhow::Error::from(e)));
                }
            }
        }
        DiskState::Stopped => v.state = "stopped".into(),
        DiskState::Crashed { error } => {
            v.state = "crashed".into();
            v.error = error;
        }
    }
    Ok(v)
}

/// Every VM of the library, a broken one shown as "invalid" rather than hiding the others.
pub fn list(library: &Library) -> anyhow::Result<Vec<VmView>> {
    let mut views = Vec::new();
    for name in library.names()? {
        match library.existing(&name).map_err(anyhow::Error::from).and_then(|vm| view(&vm)) {
            Ok(v) => views.push(v),
            // One broken vm.toml must not hide the others.
            Err(e) => views.push(VmView {
                name,
                state: "invalid".into(),
                pid: None,
                cpus: 0,
                memory_mib: 0,
                uptime_secs: None,
                last_exit: None,
                error: Some(format!("{e:#}")),
                display: None,
                net: String::new(),
                guest_ip: None,
                forwards: Vec::new(),
            }),
        }
    }
    Ok(views)
}

/// The name an enum has on the wire (`RunState::ShuttingDown` → "shutting_down").
pub fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// Starts VM `name` as a detached process and waits until it answers.
pub fn start(library: &Library, name: &str) -> anyhow::Result<StatusReply> {
    spawn(library, name, None)
}

/// Starts the VM process, booting or (with `restore`, a snapshot id) restoring.
pub fn spawn(library: &Library, name: &str, restore: Option<&str>) -> anyhow::Result<StatusReply> {
    let vm = library.existing(name)?;
    let config = vm.load_config()?;
    if vm.is_locked()? {
        bail!("VM '{name}' is already running");
    }
    // Fail here, with the path, rather than in the detached process.
    config.check_files().with_context(|| format!("Cannot start VM '{name}'"))?;
    backend::check_fits_host(&config).with_context(|| format!("Cannot start VM '{name}'"))?;

    let log_path = vm.log_path();
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("Cannot open {}", log_path.display()))?;
    writeln!(log, "{START_MARKER} at {} ====", crate::library::unix_now())?;
    let exe = std::env::current_exe().context("Cannot find the hutch executable")?;
    let mut cmd = Process::new(exe);
    cmd.arg("__vm-process").arg(name);
    if let Some(id) = restore {
        cmd.arg("--restore").arg(id);
    }
    cmd
        // The child must find the same library whatever its environment resolves to.
        .env("HUTCH_HOME", library.root())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: the closure runs between fork and exec and only calls setsid, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("Cannot start the VM process")?;

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(exit) = child.try_wait()? {
            let tail = start_log_tail(&vm);
            return Err(anyhow!(
                "VM '{name}' failed to start ({exit}); last lines of {}:\n    {}",
                log_path.display(),
                tail.join("\n    ")
            ));
        }
        if let Some(pidfile) = vm.read_pid_file().filter(|p| p.pid == child.id()) {
            if let Ok(st) = probe(&pidfile.socket, QUERY_TIMEOUT) {
                return Ok(st);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "VM '{name}' did not answer within {} s (pid {}); see {}",
                START_TIMEOUT.as_secs(),
                child.id(),
                log_path.display()
            );
        }
        // Short: a restored VM answers within a few hundred milliseconds of its start.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lines this start wrote to hutch.log (after the last start marker).
pub fn start_log_tail(vm: &VmDir) -> Vec<String> {
    let lines = fsutil::tail_lines(&vm.log_path(), 40).unwrap_or_default();
    let from = lines.iter().rposition(|l| l.starts_with(START_MARKER)).map_or(0, |i| i + 1);
    let mine = &lines[from..];
    let keep = mine.len().saturating_sub(10);
    let tail: Vec<String> = mine[keep..].to_vec();
    if tail.is_empty() {
        vec!["(nothing)".into()]
    } else {
        tail
    }
}

/// The pid file of a running VM, or a clear error.
pub fn running(vm: &VmDir) -> anyhow::Result<PidFile> {
    match vm.disk_state()? {
        DiskState::Running { pid: Some(p) } => Ok(p),
        DiskState::Running { pid: None } => bail!("VM '{}' is still starting", vm.name()),
        _ => bail!("VM '{}' is not running", vm.name()),
    }
}

/// The control connection of running VM `name`.
pub fn control(library: &Library, name: &str) -> anyhow::Result<ControlClient> {
    control_of(&library.existing(name)?)
}

/// The control connection of running VM `vm`.
pub fn control_of(vm: &VmDir) -> anyhow::Result<ControlClient> {
    let pidfile = running(vm)?;
    ControlClient::connect(&pidfile.socket)
        .with_context(|| format!("Cannot reach VM '{}'", vm.name()))
}

/// Presses the ACPI power button (the guest decides what to do).
pub fn shutdown(library: &Library, name: &str) -> anyhow::Result<()> {
    Ok(control(library, name)?.shutdown()?)
}

/// Pulls the plug.
pub fn poweroff(library: &Library, name: &str) -> anyhow::Result<()> {
    Ok(control(library, name)?.poweroff()?)
}

pub fn pause(library: &Library, name: &str) -> anyhow::Result<()> {
    Ok(control(library, name)?.pause()?)
}

pub fn resume(library: &Library, name: &str) -> anyhow::Result<()> {
    Ok(control(library, name)?.resume()?)
}

/// Shuts VM `name` down (or with `force` powers it off) and waits up to `timeout` seconds
/// for its process to end.
pub fn stop(library: &Library, name: &str, force: bool, timeout: u64) -> anyhow::Result<()> {
    let vm = library.existing(name)?;
    let mut client = control(library, name)?;
    match if force { client.poweroff() } else { client.shutdown() } {
        // A VM that powers off at once may end before its reply is written: the lock tells.
        Ok(()) | Err(ControlClientError::Closed) => {}
        Err(e) => return Err(e).with_context(|| format!("Cannot stop VM '{name}'")),
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    while vm.is_locked()? {
        if Instant::now() >= deadline {
            let hint =
                if force { "" } else { " (the guest may ignore the power button; try --force)" };
            bail!("VM '{name}' did not stop within {timeout} s{hint}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Running VM `name`'s serial console, as a raw stream.
pub fn console(library: &Library, name: &str) -> anyhow::Result<ConsoleStream> {
    let pidfile = running(&library.existing(name)?)?;
    ControlClient::connect(&pidfile.socket)
        .and_then(ControlClient::into_console)
        .with_context(|| format!("Cannot attach to VM '{name}'"))
}

/// Saves running VM `name`'s screen as a PNG at `output`; returns its size.
pub fn screenshot(library: &Library, name: &str, output: &Path) -> anyhow::Result<(u32, u32)> {
    let vm = library.existing(name)?;
    let pidfile = running(&vm)?;
    let frame = crate::runtime::frame_path_for_socket(&pidfile.socket);
    let reader = display::frame::FrameReader::open(&frame)
        .with_context(|| format!("VM '{name}' has no screen (display off?)"))?;
    let image = reader.snapshot().with_context(|| format!("Cannot read VM '{name}''s screen"))?;
    crate::screenshot::write_png(&image, output)?;
    Ok((image.width, image.height))
}

pub fn delete(library: &Library, name: &str) -> anyhow::Result<()> {
    Ok(library.delete(name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::service::library_with_vm;

    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    use crate::control::protocol::{Response, VERSION};

    /// A fake VM process for `vm`: holds its lock, answers the hello, reads one request, then
    /// lets the lock go and answers `reply`, or hangs up without a word when `reply` is None
    /// (a VM process that ends before it writes its reply).
    fn fake_vm_process(
        home: &Path,
        lib: &Library,
        reply: Option<Response>,
    ) -> std::thread::JoinHandle<String> {
        let vm = lib.existing("vm").unwrap();
        let lock = vm.try_lock().unwrap().unwrap();
        let socket = home.join("control.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        vm.write_pid_file(&PidFile { pid: std::process::id(), socket, started_at: 0 }).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            writer.write_all(Response::Hello { version: VERSION }.to_line().as_bytes()).unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            drop(lock);
            if let Some(reply) = reply {
                writer.write_all(reply.to_line().as_bytes()).unwrap();
            }
            line
        })
    }

    #[test]
    fn forced_stop_of_a_vm_that_ends_before_its_reply_succeeds() {
        let (home, lib) = library_with_vm();
        let server = fake_vm_process(home.path(), &lib, None);
        stop(&lib, "vm", true, 5).unwrap();
        assert!(server.join().unwrap().contains("poweroff"));
    }

    #[test]
    fn a_refused_stop_is_still_an_error() {
        let (home, lib) = library_with_vm();
        let server = fake_vm_process(home.path(), &lib, Some(Response::error("no power button")));
        let err = stop(&lib, "vm", false, 5).unwrap_err();
        assert!(format!("{err:#}").contains("no power button"), "{err:#}");
        assert!(server.join().unwrap().contains("shutdown"));
    }

    #[test]
    fn a_cd_is_inserted_with_its_absolute_path_and_ejected() {
        let (home, lib) = library_with_vm();
        let iso = home.path().join("inst.iso");
        std::fs::write(&iso, [0u8; 2048]).unwrap();
        assert_eq!(change_media(&lib, "vm", Some(&iso)).unwrap(), None);
        assert_eq!(lib.existing("vm").unwrap().load_config().unwrap().iso, Some(iso.clone()));
        assert_eq!(change_media(&lib, "vm", None).unwrap(), Some(iso));
        assert_eq!(lib.existing("vm").unwrap().load_config().unwrap().iso, None);
    }

    #[test]
    fn a_missing_iso_is_refused_naming_it_and_vm_toml_keeps_its_cd() {
        let (home, lib) = library_with_vm();
        let iso = home.path().join("inst.iso");
        std::fs::write(&iso, [0u8; 2048]).unwrap();
        change_media(&lib, "vm", Some(&iso)).unwrap();
        let missing = home.path().join("gone.iso");
        let err = format!("{:#}", change_media(&lib, "vm", Some(&missing)).unwrap_err());
        assert!(err.contains("gone.iso"), "{err}");
        assert_eq!(lib.existing("vm").unwrap().load_config().unwrap().iso, Some(iso));
    }

    #[test]
    fn the_cd_of_a_vm_whose_process_cannot_be_reached_is_not_saved() {
        let (home, lib) = library_with_vm();
        let iso = home.path().join("inst.iso");
        std::fs::write(&iso, [0u8; 2048]).unwrap();
        let vm = lib.existing("vm").unwrap();
        let _running = vm.try_lock().unwrap().expect("the VM lock, as a VM process holds it");
        let err = format!("{:#}", change_media(&lib, "vm", Some(&iso)).unwrap_err());
        assert!(err.contains("starting") || err.contains("not running"), "{err}");
        assert_eq!(vm.load_config().unwrap().iso, None);
    }
}
