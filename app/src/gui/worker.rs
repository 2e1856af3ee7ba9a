//! Everything that may block runs here, never on the UI thread: the library poller (states
//! every second, thumbnails of running VMs) and one thread per job (start, stop, delete...).
//! Results come back as [`Event`]s on a channel, each followed by a repaint request.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::model::{derive_state, CdSummary, NetSummary, Probe, VmState, VmSummary};
use super::screen::Thumbnailer;
use super::snapshot_panel::{self, SnapshotRef};
use crate::library::{DiskState, Library, VmConfig};
use crate::runtime;
use crate::service::{snapshot, vm as service};
use crate::snapshots::{SnapshotInfo, SnapshotList};

/// How long a snapshot waits for the input sent before it to reach the guest.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the poller looks at the library when nothing pokes it.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long the poller waits for a VM process's status answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Something the UI asked for.
#[derive(Debug, Clone)]
pub enum Job {
    Start(String),
    /// ACPI power button.
    Shutdown(String),
    PowerOff(String),
    Pause(String),
    Resume(String),
    Delete(String),
    Create {
        name: String,
        config: VmConfig,
        /// A new blank disk of this many bytes, made in the VM's directory as its first.
        new_disk: Option<u64>,
    },
    SaveSettings {
        name: String,
        config: VmConfig,
    },
    Screenshot {
        name: String,
    },
    /// Adds a port forward (to the running VM at once) and keeps it in vm.toml.
    ForwardAdd {
        name: String,
        spec: String,
    },
    ForwardRemove {
        name: String,
        spec: String,
    },
    /// Puts an ISO in the CD drive (None: ejects), at once in a running VM.
    Media {
        name: String,
        iso: Option<PathBuf>,
    },
}

impl Job {
    /// What failed, for the error dialog's title.
    pub fn failure_title(&self) -> String {
        match self {
            Job::Start(n) => format!("Cannot start VM '{n}'"),
            Job::Shutdown(n) => format!("Cannot shut down VM '{n}'"),
            Job::PowerOff(n) => format!("Cannot power off VM '{n}'"),
            Job::Pause(n) => format!("Cannot pause VM '{n}'"),
            Job::Resume(n) => format!("Cannot resume VM '{n}'"),
            Job::Delete(n) => format!("Cannot delete VM '{n}'"),
            Job::Create { name, .. } => format!("Cannot create VM '{name}'"),
            Job::SaveSettings { name, .. } => format!("Cannot save the settings of VM '{name}'"),
            Job::Screenshot { name } => format!("Cannot take a screenshot of VM '{name}'"),
            Job::ForwardAdd { name, spec } => format!("Cannot forward {spec} to VM '{name}'"),
            Job::ForwardRemove { name, spec } => {
                format!("Cannot remove the forward {spec} of VM '{name}'")
            }
            Job::Media { name, .. } => format!("Cannot change the CD of VM '{name}'"),
        }
    }

    pub fn vm_name(&self) -> &str {
        match self {
            Job::Start(n)
            | Job::Shutdown(n)
            | Job::PowerOff(n)
            | Job::Pause(n)
            | Job::Resume(n)
            | Job::Delete(n) => n,
            Job::Create { name, .. }
            | Job::SaveSettings { name, .. }
            | Job::Screenshot { name }
            | Job::ForwardAdd { name, .. }
            | Job::ForwardRemove { name, .. }
            | Job::Media { name, .. } => name,
        }
    }
}

/// What the workers report.
#[derive(Debug)]
pub enum Event {
    Library(Vec<VmSummary>),
    Thumbnail {
        name: String,
        image: egui::ColorImage,
    },
    /// A job ended; the error is the whole cause chain, outermost first.
    JobDone {
        job: Job,
        result: Result<String, Vec<String>>,
    },
    /// From the import sheet's worker.
    Import(super::import_sheet::ImportEvent),
    /// A snapshot job ended; the error is the whole cause chain, outermost first.
    Snapshot {
        job: SnapshotJob,
        result: Result<SnapshotDone, Vec<String>>,
    },
}

/// A snapshot operation the UI asked for (one VM at a time; they block on its process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotJob {
    /// Read the list; decode the thumbnails not in `known` (paths the UI already has).
    List {
        vm: String,
        known: HashSet<PathBuf>,
    },
    Take {
        vm: String,
    },
    /// Restore `snapshot`, or the newest one when None.
    Restore {
        vm: String,
        snapshot: Option<SnapshotRef>,
    },
    Delete {
        vm: String,
        snapshot: SnapshotRef,
    },
}

impl SnapshotJob {
    pub fn vm(&self) -> &str {
        match self {
            SnapshotJob::List { vm, .. }
            | SnapshotJob::Take { vm }
            | SnapshotJob::Restore { vm, .. }
            | SnapshotJob::Delete { vm, .. } => vm,
        }
    }

    /// What failed, for the error toast.
    pub fn failure_title(&self) -> String {
        match self {
            SnapshotJob::List { vm, .. } => format!("Cannot list the snapshots of VM '{vm}'"),
            SnapshotJob::Take { vm } => format!("Cannot take a snapshot of VM '{vm}'"),
            SnapshotJob::Restore { vm, snapshot: Some(s) } => {
                format!("Cannot restore snapshot '{}' of VM '{vm}'", s.name)
            }
            SnapshotJob::Restore { vm, snapshot: None } => {
                format!("Cannot restore the latest snapshot of VM '{vm}'")
            }
            SnapshotJob::Delete { vm, snapshot } => {
                format!("Cannot delete snapshot '{}' of VM '{vm}'", snapshot.name)
            }
        }
    }

    /// What the in-flight indicator says (None: nothing worth showing).
    pub fn progress_text(&self) -> Option<&'static str> {
        match self {
            SnapshotJob::List { .. } => None,
            SnapshotJob::Take { .. } => Some("Saving snapshot…"),
            SnapshotJob::Restore { .. } => Some("Restoring…"),
            SnapshotJob::Delete { .. } => Some("Deleting snapshot…"),
        }
    }
}

/// What a snapshot job did.
#[derive(Debug)]
pub enum SnapshotDone {
    /// The list and the newly decoded thumbnails (None: the file did not decode).
    Listed {
        list: SnapshotList,
        thumbnails: Vec<(PathBuf, Option<egui::ColorImage>)>,
    },
    Taken {
        info: SnapshotInfo,
        took: Duration,
    },
    Restored {
        name: String,
        took: Duration,
    },
    Deleted {
        info: SnapshotInfo,
    },
}

impl SnapshotDone {
    /// The toast for it (None for a list).
    pub fn message(&self) -> Option<String> {
        let ms = |d: &Duration| d.as_millis();
        match self {
            SnapshotDone::Listed { .. } => None,
            SnapshotDone::Taken { info, took } => {
                Some(format!("Snapshot '{}' taken in {} ms", info.name, ms(took)))
            }
            SnapshotDone::Restored { name, took } => {
                Some(format!("Snapshot '{name}' restored in {} ms", ms(took)))
            }
            SnapshotDone::Deleted { info } => Some(format!("Snapshot '{}' deleted", info.name)),
        }
    }
}

/// Sends events to the UI and wakes it.
#[derive(Clone)]
pub struct EventSender {
    tx: Sender<Event>,
    ctx: egui::Context,
}

impl EventSender {
    pub fn new(ctx: egui::Context) -> (EventSender, Receiver<Event>) {
        let (tx, rx) = mpsc::channel();
        (EventSender { tx, ctx }, rx)
    }

    /// False once the UI is gone.
    pub fn send(&self, event: Event) -> bool {
        let ok = self.tx.send(event).is_ok();
        self.ctx.request_repaint();
        ok
    }
}

/// Starts the poller; poke the returned sender for an immediate refresh, drop it to stop.
pub fn spawn_poller(library: Library, events: EventSender) -> std::io::Result<Sender<()>> {
    let (poke, poked) = mpsc::channel::<()>();
    std::thread::Builder::new().name("gui-poller".into()).spawn(move || {
        let mut thumbs: HashMap<String, Thumbnailer> = HashMap::new();
        loop {
            let vms = scan(&library);
            let live: Vec<&VmSummary> = vms.iter().filter(|v| v.state.is_live()).collect();
            thumbs.retain(|name, _| live.iter().any(|v| &v.name == name));
            let mut images = Vec::new();
            for vm in live {
                let Ok(dir) = library.vm(&vm.name) else { continue };
                let Ok(path) = runtime::frame_path(dir.dir(), &vm.name) else { continue };
                let t = thumbs.entry(vm.name.clone()).or_insert_with(|| Thumbnailer::new(path));
                if let Some(image) = t.refresh() {
                    images.push(Event::Thumbnail { name: vm.name.clone(), image });
                }
            }
            if !events.send(Event::Library(vms)) {
                return;
            }
            for image in images {
                events.send(image);
            }
            match poked.recv_timeout(POLL_INTERVAL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    })?;
    Ok(poke)
}

/// The library's VMs and their states, one broken VM never hiding the others.
pub fn scan(library: &Library) -> Vec<VmSummary> {
    let names = library.names().unwrap_or_default();
    names.into_iter().map(|name| summarize(library, name)).collect()
}

fn summarize(library: &Library, name: String) -> VmSummary {
    let invalid = |name: String, e: anyhow::Error| VmSummary {
        name,
        state: VmState::Invalid { error: format!("{e:#}") },
        cpus: 0,
        memory_mib: 0,
        pid: None,
        log_tail: Vec::new(),
        display: true,
        net: NetSummary::default(),
        cd: CdSummary::default(),
    };
    let vm = match library.existing(&name) {
        Ok(vm) => vm,
        Err(e) => return invalid(name, e.into()),
    };
    let config = match vm.load_config() {
        Ok(c) => c,
        Err(e) => return invalid(name, e.into()),
    };
    let disk = match vm.disk_state() {
        Ok(d) => d,
        Err(e) => return invalid(name, e.into()),
    };
    let mut pid = None;
    let mut display = config.display;
    let mut net = NetSummary {
        mode: config.net.name().to_string(),
        guest_ip: None,
        forwards: config.forwards.clone(),
    };
    let mut cd = CdSummary { drive: config.has_cd_drive(), iso: config.iso.clone() };
    let probe = match &disk {
        DiskState::Running { pid: Some(p) } => {
            pid = Some(p.pid);
            match service::probe(&p.socket, PROBE_TIMEOUT) {
                Ok(st) => {
                    display = st.display.is_some();
                    cd = st
                        .cd
                        .map_or_else(CdSummary::default, |c| CdSummary { drive: true, iso: c.iso });
                    if let Some(live) = st.net {
                        net = NetSummary {
                            mode: live.mode,
                            guest_ip: live.guest_ip,
                            forwards: live.forwards,
                        };
                    }
                    Probe::Answered(st.state)
                }
                Err(e) => Probe::Failed {
                    socket_exists: p.socket.exists(),
                    error: format!("{:#}", anyhow::Error::from(e)),
                },
            }
        }
        _ => Probe::NotAsked,
    };
    let state = derive_state(&disk, &probe);
    let log_tail = if matches!(state, VmState::Crashed { .. }) {
        service::start_log_tail(&vm)
    } else {
        Vec::new()
    };
    VmSummary {
        name,
        state,
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        pid,
        log_tail,
        display,
        net,
        cd,
    }
}

/// Runs `job` on its own thread; its result comes back as [`Event::JobDone`].
pub fn spawn_job(library: Library, job: Job, events: EventSender, poke: Sender<()>) {
    let spawned = std::thread::Builder::new().name("gui-job".into()).spawn({
        let job = job.clone();
        let events = events.clone();
        move || {
            let result = run_job(&library, &job)
                .map_err(|e| e.chain().map(|c| c.to_string()).collect::<Vec<_>>());
            events.send(Event::JobDone { job, result });
            let _ = poke.send(());
        }
    });
    if let Err(e) = spawned {
        events.send(Event::JobDone {
            job,
            result: Err(vec!["Cannot start a worker thread".into(), e.to_string()]),
        });
    }
}

/// Does the job; Ok carries a short message for the status line.
fn run_job(library: &Library, job: &Job) -> anyhow::Result<String> {
    Ok(match job {
        Job::Start(name) => {
            let st = service::start(library, name)?;
            format!("VM '{name}' started (pid {})", st.pid)
        }
        Job::Shutdown(name) => {
            service::shutdown(library, name)?;
            format!("Pressed the power button of VM '{name}'")
        }
        Job::PowerOff(name) => {
            service::poweroff(library, name)?;
            format!("VM '{name}' powered off")
        }
        Job::Pause(name) => {
            service::pause(library, name)?;
            format!("VM '{name}' paused")
        }
        Job::Resume(name) => {
            service::resume(library, name)?;
            format!("VM '{name}' resumed")
        }
        Job::Delete(name) => {
            service::delete(library, name)?;
            format!("VM '{name}' deleted")
        }
        Job::Create { name, config, new_disk: None } => {
            library.create(name, config)?;
            format!("VM '{name}' created")
        }
        Job::Create { name, config, new_disk: Some(bytes) } => {
            service::create_with_new_disk(library, name, config.clone(), *bytes)?;
            format!(
                "VM '{name}' created with a new {} disk",
                crate::gui::capacity::format_mib(bytes >> 20)
            )
        }
        Job::SaveSettings { name, config } => {
            service::save_settings(library, name, config)?;
            format!("Settings of VM '{name}' saved")
        }
        Job::Screenshot { name } => {
            let vm = library.existing(name)?;
            let frame = runtime::frame_path(vm.dir(), name)?;
            let path = vm.dir().join(format!("screenshot-{}.png", crate::library::unix_now()));
            super::screen::save_screenshot(&frame, &path)?;
            format!("Screenshot saved to {}", path.display())
        }
        Job::ForwardAdd { name, spec } => {
            let added = crate::service::net::add(library, name, spec)?;
            format!("VM '{name}' forwards {added}")
        }
        Job::ForwardRemove { name, spec } => {
            let removed = crate::service::net::remove(library, name, spec)?;
            format!("VM '{name}' no longer forwards {removed}")
        }
        Job::Media { name, iso } => {
            let before = service::change_media(library, name, iso.as_deref())?;
            match (iso, before) {
                (Some(iso), _) => format!("VM '{name}': {} is in the CD drive", iso.display()),
                (None, Some(old)) => format!("VM '{name}': ejected {}", old.display()),
                (None, None) => format!("VM '{name}' had no CD"),
            }
        }
    })
}

/// Runs a snapshot job on its own thread; its result comes back as [`Event::Snapshot`]. A
/// `barrier` (from the VM link) is waited for first, so that the key-ups sent just before
/// a snapshot are in it.
pub fn spawn_snapshot(
    library: Library,
    job: SnapshotJob,
    barrier: Option<Receiver<()>>,
    events: EventSender,
    poke: Option<Sender<()>>,
) {
    let spawned = std::thread::Builder::new().name("gui-snapshot".into()).spawn({
        let job = job.clone();
        let events = events.clone();
        move || {
            if let Some(b) = barrier {
                let _ = b.recv_timeout(BARRIER_TIMEOUT);
            }
            let result = run_snapshot(&library, &job)
                .map_err(|e| e.chain().map(|c| c.to_string()).collect::<Vec<_>>());
            events.send(Event::Snapshot { job, result });
            if let Some(poke) = poke {
                let _ = poke.send(());
            }
        }
    });
    if let Err(e) = spawned {
        events.send(Event::Snapshot {
            job,
            result: Err(vec!["Cannot start a worker thread".into(), e.to_string()]),
        });
    }
}

fn run_snapshot(library: &Library, job: &SnapshotJob) -> anyhow::Result<SnapshotDone> {
    let started = Instant::now();
    Ok(match job {
        SnapshotJob::List { vm, known } => {
            let list = snapshot::list(library, vm)?;
            let thumbnails = list
                .snapshots
                .iter()
                .filter_map(|s| s.thumbnail.clone())
                .filter(|p| !known.contains(p))
                .collect::<HashSet<_>>()
                .into_iter()
                .map(|p| {
                    let image = snapshot_panel::decode_thumbnail(&p)
                        .map_err(|e| log::debug!("{}", vmm::error_chain(&e)))
                        .ok();
                    (p, image)
                })
                .collect();
            SnapshotDone::Listed { list, thumbnails }
        }
        SnapshotJob::Take { vm } => {
            let info = snapshot::take(library, vm, None)?;
            SnapshotDone::Taken { info, took: started.elapsed() }
        }
        SnapshotJob::Restore { vm, snapshot } => {
            let target = match snapshot {
                Some(s) => s.clone(),
                None => {
                    let list = snapshot::list(library, vm)?;
                    let newest = snapshot_panel::latest(&list)
                        .ok_or_else(|| anyhow::anyhow!("VM '{vm}' has no snapshots"))?;
                    SnapshotRef::of(newest)
                }
            };
            let started = Instant::now();
            snapshot::restore(library, vm, &target.id)?;
            SnapshotDone::Restored { name: target.name, took: started.elapsed() }
        }
        SnapshotJob::Delete { vm, snapshot } => {
            let info = snapshot::delete(library, vm, &snapshot.id)?;
            SnapshotDone::Deleted { info }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config() -> VmConfig {
        VmConfig::new(PathBuf::from("/k"), None, "c".into(), Vec::new(), 2, 256)
    }

    #[test]
    fn scan_shows_every_vm_and_marks_broken_ones_invalid() {
        let home = tempfile::tempdir().unwrap();
        let lib = Library::at(home.path().to_path_buf());
        lib.create("good", &config()).unwrap();
        let bad = lib.create("bad", &config()).unwrap();
        std::fs::write(bad.config_path(), "cpus = \"many\"").unwrap();
        let vms = scan(&lib);
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].name, "bad");
        assert_eq!(vms[0].state.label(), "invalid");
        assert_eq!(
            (vms[1].state.clone(), vms[1].cpus, vms[1].memory_mib),
            (VmState::Stopped, 2, 256)
        );
    }

    #[test]
    fn a_crashed_vm_carries_its_log_tail() {
        let home = tempfile::tempdir().unwrap();
        let lib = Library::at(home.path().to_path_buf());
        let vm = lib.create("vm", &config()).unwrap();
        std::fs::write(vm.log_path(), "==== hutch start at 1 ====\nvCPU 0 failed: boom\n").unwrap();
        vm.write_last_exit(&crate::library::ExitRecord::new(
            crate::library::ExitKind::Failed,
            Some("boom".into()),
        ))
        .unwrap();
        let s = &scan(&lib)[0];
        assert_eq!(s.state, VmState::Crashed { error: Some("boom".into()) });
        assert_eq!(s.log_tail, vec!["vCPU 0 failed: boom".to_string()]);
    }

    #[test]
    fn settings_of_a_running_vm_are_not_saved() {
        let home = tempfile::tempdir().unwrap();
        let lib = Library::at(home.path().to_path_buf());
        let vm = lib.create("vm", &config()).unwrap();
        let _running = vm.try_lock().unwrap().unwrap();
        let mut changed = config();
        changed.cpus = 4;
        let job = Job::SaveSettings { name: "vm".into(), config: changed };
        let err = format!("{:#}", run_job(&lib, &job).unwrap_err());
        assert!(err.contains("running"), "{err}");
        assert_eq!(vm.load_config().unwrap().cpus, 2);
    }
}
