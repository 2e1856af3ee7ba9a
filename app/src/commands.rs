//! One function per subcommand: glue between the CLI, the library, the control client and
//! the machine. Errors carry context; `main` prints the whole chain.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command as Process, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use vmm::machine::ExitReason;

use crate::cli::{Command, MachineArgs, RunArgs, SerialTarget};
use crate::control::client::ControlClient;
use crate::control::protocol::StatusReply;
use crate::library::{DiskState, ExitRecord, Library, VmConfig, VmDir};
use crate::terminal::{pump_input, stdin_kind, InputEnd, RawTerminal, StdinKind};
use crate::{backend, console, fsutil, vm_process};

/// How long `start` waits for the VM process to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `status`/`list` wait for a VM process to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const START_MARKER: &str = "==== hutch start";

pub fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => run(args),
        Command::VmProcess { name, restore } => {
            vm_process::main(&Library::from_env()?, &name, restore.as_deref())
        }
        Command::Disk(cmd) => crate::disk_cmd::run(cmd),
        other => {
            let library = Library::from_env()?;
            match other {
                Command::Create(args) => create(&library, &args.name, &args.machine),
                Command::List { json } => list(&library, json),
                Command::Start { name } => start(&library, &name),
                Command::Console { name } => console(&library, &name),
                Command::Stop { name, force, timeout } => stop(&library, &name, force, timeout),
                Command::Status { name, json } => status(&library, &name, json),
                Command::Delete { name } => delete(&library, &name),
                Command::Screenshot { name, output } => screenshot(&library, &name, &output),
                Command::Import(args) => crate::import::run(&library, &args),
                Command::Snapshot(cmd) => crate::snapshot_cmd::run(&library, cmd).map(drop),
                Command::Gui => crate::gui::run(library),
                Command::Run(_) | Command::VmProcess { .. } | Command::Disk(_) => {
                    unreachable!("handled above")
                }
            }
        }
    }
    .map(|()| ExitCode::SUCCESS)
}

/// Validated configuration from the command line, paths absolute, files checked.
fn checked_config(args: &MachineArgs) -> anyhow::Result<VmConfig> {
    let mut config = args.to_config();
    config.validate()?;
    config.make_paths_absolute()?;
    config.check_files()?;
    Ok(config)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = checked_config(&args.machine)?;
    let stdio = args.serial == SerialTarget::Stdio;
    let serial_out: Box<dyn Write + Send> = match &args.serial {
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
    let machine = vm_process::build_machine(&config, serial_out, None, None)?;
    let handle = machine.handle();

    let kind = if stdio { stdin_kind() } else { StdinKind::Other };
    let raw = if kind == StdinKind::Tty {
        eprintln!("hutch: serial console on this terminal; Ctrl+] powers the VM off");
        Some(
            RawTerminal::enter(libc::STDIN_FILENO)
                .context("Cannot put the terminal in raw mode")?,
        )
    } else {
        None
    };
    if kind != StdinKind::Other {
        let handle = handle.clone();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let end = pump_input(io::stdin().lock(), kind == StdinKind::Tty, |bytes| {
                    handle.serial_input(bytes);
                    true
                });
                if end == InputEnd::Escape {
                    handle.poweroff();
                }
            })
            .context("Cannot start the stdin thread")?;
    }

    let result = machine.run();
    drop(raw);
    match result.context("The virtual machine failed")? {
        ExitReason::PowerOff => {}
        ExitReason::Reset => {
            eprintln!("hutch: the guest rebooted; rebooting is not supported yet, so hutch stops")
        }
        ExitReason::ForcedOff => eprintln!("hutch: the VM was powered off"),
    }
    Ok(())
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

fn create(library: &Library, name: &str, args: &MachineArgs) -> anyhow::Result<()> {
    crate::library::validate_name(name)?;
    let config = checked_config(args)?;
    library.create(name, &config)?;
    println!("Created VM '{name}'");
    Ok(())
}

/// A VM as `status` and `list` show it.
#[derive(Debug, Serialize)]
struct VmView {
    name: String,
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    cpus: u32,
    memory_mib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    uptime_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_exit: Option<ExitRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// What a running VM's screen shows (`virtio-gpu 1280x800`).
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<String>,
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
    };
    match vm.disk_state()? {
        DiskState::Running { pid: None } => v.state = "starting".into(),
        DiskState::Running { pid: Some(pidfile) } => {
            v.pid = Some(pidfile.pid);
            let reply = ControlClient::connect_with_timeout(&pidfile.socket, QUERY_TIMEOUT)
                .and_then(|mut c| c.status());
            match reply {
                Ok(st) => {
                    v.state = wire_name(&st.state);
                    v.uptime_secs = Some(st.uptime_secs);
                    v.display = st.display;
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

fn list(library: &Library, json: bool) -> anyhow::Result<()> {
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
            }),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    let w = views.iter().map(|v| v.name.len()).max().unwrap_or(0).max(4);
    println!("{:<w$}  {:<12}  {:>4}  {:>10}", "NAME", "STATE", "CPUS", "MEMORY");
    for v in &views {
        let mem = format!("{} MiB", v.memory_mib);
        println!("{:<w$}  {:<12}  {:>4}  {:>10}", v.name, v.state, v.cpus, mem);
    }
    Ok(())
}

fn status(library: &Library, name: &str, json: bool) -> anyhow::Result<()> {
    let vm = library.existing(name)?;
    let v = view(&vm)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("name:    {}", v.name);
    println!("state:   {}", v.state);
    if let Some(pid) = v.pid {
        println!("pid:     {pid}");
    }
    println!("cpus:    {}", v.cpus);
    println!("memory:  {} MiB", v.memory_mib);
    if let Some(up) = v.uptime_secs {
        println!("uptime:  {}", format_duration(up));
    }
    if let Some(display) = &v.display {
        println!("display: {display}");
    }
    if let Some(rec) = &v.last_exit {
        let reason = wire_name(&rec.reason);
        println!("last exit: {reason}");
    }
    if let Some(err) = &v.error {
        println!("error:   {err}");
    }
    Ok(())
}

/// The name an enum has on the wire (`RunState::ShuttingDown` → "shutting_down").
fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

fn format_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

fn start(library: &Library, name: &str) -> anyhow::Result<()> {
    let st = start_vm(library, name)?;
    println!("VM '{name}' started (pid {}): {}", st.pid, wire_name(&st.state));
    Ok(())
}

/// Starts VM `name` as a detached process and waits until it answers (also used by the GUI,
/// from a worker thread).
pub fn start_vm(library: &Library, name: &str) -> anyhow::Result<StatusReply> {
    spawn_vm(library, name, None)
}

/// Starts the VM process, booting or (with `restore`, a snapshot id) restoring.
pub fn spawn_vm(
    library: &Library,
    name: &str,
    restore: Option<&str>,
) -> anyhow::Result<StatusReply> {
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
            let reply = ControlClient::connect_with_timeout(&pidfile.socket, QUERY_TIMEOUT)
                .and_then(|mut c| c.status());
            if let Ok(st) = reply {
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
pub fn running(vm: &VmDir) -> anyhow::Result<crate::library::PidFile> {
    match vm.disk_state()? {
        DiskState::Running { pid: Some(p) } => Ok(p),
        DiskState::Running { pid: None } => bail!("VM '{}' is still starting", vm.name()),
        _ => bail!("VM '{}' is not running", vm.name()),
    }
}

fn stop(library: &Library, name: &str, force: bool, timeout: u64) -> anyhow::Result<()> {
    let vm = library.existing(name)?;
    let pidfile = running(&vm)?;
    let mut client = ControlClient::connect(&pidfile.socket)
        .with_context(|| format!("Cannot reach VM '{name}'"))?;
    if force { client.poweroff() } else { client.shutdown() }
        .with_context(|| format!("Cannot stop VM '{name}'"))?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    while vm.is_locked()? {
        if Instant::now() >= deadline {
            let hint =
                if force { "" } else { " (the guest may ignore the power button; try --force)" };
            bail!("VM '{name}' did not stop within {timeout} s{hint}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("VM '{name}' stopped");
    Ok(())
}

fn console(library: &Library, name: &str) -> anyhow::Result<()> {
    let vm = library.existing(name)?;
    let pidfile = running(&vm)?;
    let stream = ControlClient::connect(&pidfile.socket)
        .and_then(ControlClient::into_console)
        .with_context(|| format!("Cannot attach to VM '{name}'"))?;
    console::attach(stream, name)?;
    Ok(())
}

fn screenshot(library: &Library, name: &str, output: &Path) -> anyhow::Result<()> {
    let vm = library.existing(name)?;
    let pidfile = running(&vm)?;
    let frame = crate::runtime::frame_path_for_socket(&pidfile.socket);
    let reader = display::frame::FrameReader::open(&frame)
        .with_context(|| format!("VM '{name}' has no screen (display off?)"))?;
    let image = reader.snapshot().with_context(|| format!("Cannot read VM '{name}''s screen"))?;
    crate::screenshot::write_png(&image, output)?;
    println!("Saved {}x{} screenshot to {}", image.width, image.height, output.display());
    Ok(())
}

fn delete(library: &Library, name: &str) -> anyhow::Result<()> {
    library.delete(name)?;
    println!("Deleted VM '{name}'");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn durations_are_human_readable() {
        assert_eq!(format_duration(5), "5s");
        assert_eq!(format_duration(65), "1m 5s");
        assert_eq!(format_duration(3725), "1h 2m 5s");
    }
}
