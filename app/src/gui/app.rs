//! The GUI's state and the order of a frame: events from the workers, host shortcuts, then
//! the view ([`super::views`]: the library, one VM, the dialogs), the import sheet and the
//! toasts. It talks to VMs only through worker jobs ([`super::worker`]) and the VM link;
//! window events reach [`GuiApp::on_window_event`] (in `views/vm.rs`) before egui.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use egui::{TextureHandle, Ui};

use super::capacity::{self, HostCapacity};
use super::demo;
use super::import_sheet::{self, ImportSheet, SheetAction};
use super::input::{
    HostCommand, KeyRouter, PointerRouter, FULLSCREEN, RESTORE_LATEST, TAKE_SNAPSHOT,
};
use super::model::{VmState, VmSummary};
use super::net_panel::{self, NetPanel, NetPanelAction};
use super::persist::GuiState;
use super::screen::GuestScreen;
use super::snapshot_panel::{self, PanelAction, SnapshotPanel, ThumbCache};
use super::toast::Toasts;
use super::views::{error_dialog, Dialog, VmView};
use super::vm_link::VmLink;
use super::worker::{self, Event, EventSender, Job, SnapshotDone, SnapshotJob};
use crate::library::Library;
use crate::runtime;

pub(super) enum View {
    Library,
    Vm(Box<VmView>),
}

pub struct GuiApp {
    pub(super) library: Library,
    pub(super) ctx: egui::Context,
    pub(super) events: EventSender,
    pub(super) events_rx: Receiver<Event>,
    pub(super) poke: Option<Sender<()>>,
    pub(super) host: HostCapacity,
    pub(super) vms: Vec<VmSummary>,
    pub(super) thumbnails: HashMap<String, TextureHandle>,
    pub(super) view: View,
    pub(super) dialog: Option<Dialog>,
    /// Files dropped on the window, being imported.
    pub(super) import: Option<ImportSheet>,
    /// VMs with a job in flight (their buttons are disabled).
    pub(super) busy: HashSet<String>,
    pub(super) message: String,
    pub(super) state: GuiState,
    /// A host shortcut fired while the guest had the keyboard; applied in the next frame.
    pub(super) pending_host: Option<HostCommand>,
    pub(super) pixels_per_point: f32,
    pub(super) toasts: Toasts,
    /// The snapshots panel, when open (in the VM view and the library view alike).
    pub(super) snapshots: Option<SnapshotPanel>,
    pub(super) snapshot_thumbs: ThumbCache,
    /// Snapshot operations in flight (not lists), one per VM at most.
    pub(super) snapshot_busy: HashMap<String, SnapshotJob>,
    /// The network panel of the open VM, when open.
    pub(super) network: Option<NetPanel>,
}

impl GuiApp {
    pub fn new(library: Library, ctx: egui::Context, saved: Option<GuiState>) -> GuiApp {
        let (events, events_rx) = EventSender::new(ctx.clone());
        let poke = worker::spawn_poller(library.clone(), events.clone())
            .map_err(|e| log::error!("Cannot start the library poller: {e}"))
            .ok();
        let first_run = saved.is_none();
        let state = saved.unwrap_or_default();
        let mut app = GuiApp {
            library,
            ctx,
            events,
            events_rx,
            poke,
            host: HostCapacity::probe(),
            vms: Vec::new(),
            thumbnails: HashMap::new(),
            view: View::Library,
            dialog: None,
            import: None,
            busy: HashSet::new(),
            message: String::new(),
            state,
            pending_host: None,
            pixels_per_point: 1.0,
            toasts: Toasts::default(),
            snapshots: None,
            snapshot_thumbs: ThumbCache::default(),
            snapshot_busy: HashMap::new(),
            network: None,
        };
        if first_run {
            app.first_run();
        } else if let Some(name) = app.state.open_vm.clone() {
            if app.library.existing(&name).is_ok() {
                app.open_vm(&name);
            }
        }
        app
    }

    pub fn state(&self) -> &GuiState {
        &self.state
    }

    /// Remembers the window size for the next run.
    pub fn set_window_size(&mut self, width: f32, height: f32) {
        self.state.window_width = width;
        self.state.window_height = height;
    }

    pub fn save_state(&mut self) {
        self.state.open_vm = match &self.view {
            View::Library => None,
            View::Vm(v) => Some(v.name.clone()),
        };
        if let View::Vm(v) = &self.view {
            self.state.one_to_one = v.one_to_one;
            self.state.pointer_mode = v.mouse.mode();
        }
        if let Err(e) = self.state.save(self.library.root()) {
            log::warn!("Cannot save the GUI state: {e}");
        }
    }

    /// An empty library on the first run gets the demo VM, if its guest was built.
    fn first_run(&mut self) {
        // Written now so that the demo is offered once, whatever happens next.
        if let Err(e) = self.state.save(self.library.root()) {
            log::warn!("Cannot save the GUI state: {e}");
        }
        if !self.library.names().unwrap_or_default().is_empty() {
            return;
        }
        if let Some(guest) = demo::find_demo(&demo::default_candidates()) {
            self.run(Job::Create {
                name: demo::DEMO_NAME.into(),
                config: guest.config(),
                new_disk: None,
            });
        }
    }

    pub(super) fn run(&mut self, job: Job) {
        self.busy.insert(job.vm_name().to_string());
        let Some(poke) = self.poke.clone() else {
            self.dialog = Some(Dialog::Error {
                title: job.failure_title(),
                chain: vec!["The library poller is not running".into()],
            });
            return;
        };
        worker::spawn_job(self.library.clone(), job, self.events.clone(), poke);
    }

    /// Starts a snapshot job; a second take/restore/delete of a VM while one runs is ignored.
    pub(super) fn snapshot(&mut self, job: SnapshotJob) {
        let vm = job.vm().to_string();
        let mut barrier = None;
        if !matches!(job, SnapshotJob::List { .. }) {
            if self.snapshot_busy.contains_key(&vm) {
                return;
            }
            self.snapshot_busy.insert(vm.clone(), job.clone());
            // The key-ups just sent to the guest go before the snapshot.
            if let (SnapshotJob::Take { .. }, View::Vm(v)) = (&job, &self.view) {
                if v.name == vm {
                    barrier = Some(v.link.barrier());
                }
            }
        }
        let poke = self.poke.clone();
        worker::spawn_snapshot(self.library.clone(), job, barrier, self.events.clone(), poke);
        self.ctx.request_repaint();
    }

    /// Opens the snapshots panel on `vm` (and reads its list).
    pub(super) fn open_snapshots(&mut self, vm: &str) {
        self.snapshots = Some(SnapshotPanel::new(vm.to_string()));
        self.refresh_snapshots(vm);
    }

    /// Rereads the list of `vm` if the panel shows it.
    fn refresh_snapshots(&mut self, vm: &str) {
        if self.snapshots.as_ref().is_some_and(|p| p.vm == vm) {
            let known = self.snapshot_thumbs.known();
            self.snapshot(SnapshotJob::List { vm: vm.to_string(), known });
        }
    }

    fn on_snapshot_done(&mut self, job: SnapshotJob, result: Result<SnapshotDone, Vec<String>>) {
        let vm = job.vm().to_string();
        let listing = matches!(job, SnapshotJob::List { .. });
        if !listing {
            self.snapshot_busy.remove(&vm);
        }
        let now = Instant::now();
        match result {
            Ok(SnapshotDone::Listed { list, thumbnails }) => {
                for (path, image) in thumbnails {
                    self.snapshot_thumbs.insert(&self.ctx, path, image);
                }
                if let Some(p) = self.snapshots.as_mut().filter(|p| p.vm == vm) {
                    p.list = Some(Ok(list));
                }
            }
            Ok(done) => {
                if let SnapshotDone::Restored { .. } = &done {
                    if let View::Vm(v) = &mut self.view {
                        if v.name == vm {
                            v.restored();
                        }
                    }
                }
                if let Some(text) = done.message() {
                    // The log line is for whoever reads hutch's output later (and for tests).
                    log::info!("VM '{vm}': {text}");
                    self.toasts.note(text, now);
                }
                self.refresh_snapshots(&vm);
            }
            Err(chain) => {
                if listing {
                    if let Some(p) = self.snapshots.as_mut().filter(|p| p.vm == vm) {
                        p.list = Some(Err(chain.join(": ")));
                    }
                } else {
                    log::warn!("{}: {}", job.failure_title(), chain.join(": "));
                    self.toasts.error(job.failure_title(), chain, now);
                    self.refresh_snapshots(&vm);
                }
            }
        }
    }

    fn on_panel_action(&mut self, action: PanelAction) {
        let Some(vm) = self.snapshots.as_ref().map(|p| p.vm.clone()) else { return };
        match action {
            PanelAction::Take => self.snapshot(SnapshotJob::Take { vm }),
            PanelAction::Restore(snapshot) => {
                self.dialog = Some(Dialog::ConfirmRestore { vm, snapshot });
            }
            PanelAction::Delete(snapshot) => {
                self.dialog = Some(Dialog::ConfirmDeleteSnapshot { vm, snapshot });
            }
            PanelAction::Refresh => self.refresh_snapshots(&vm),
            PanelAction::Close => self.snapshots = None,
        }
    }

    /// The snapshots side panel, if open; call before the central panel.
    pub(super) fn snapshots_side_panel(&mut self, ui: &mut Ui) {
        let Some(panel) = &self.snapshots else { return };
        let state = self.vm(&panel.vm).map(|s| s.state.clone());
        let live = matches!(state, Some(VmState::Running | VmState::Paused));
        let busy = self.snapshot_busy.contains_key(&panel.vm);
        let now = crate::library::unix_now();
        let mut action = None;
        egui::Panel::right("snapshots").resizable(true).default_size(320.0).show(ui, |ui| {
            action = snapshot_panel::panel_ui(ui, panel, &self.snapshot_thumbs, live, busy, now);
        });
        if let Some(a) = action {
            self.on_panel_action(a);
        }
    }

    /// The network side panel, if open; call before the central panel.
    pub(super) fn network_side_panel(&mut self, ui: &mut Ui) {
        let Some(panel) = &mut self.network else { return };
        let summary = self.vms.iter().find(|v| v.name == panel.vm);
        let net = summary.map(|s| s.net.clone()).unwrap_or_default();
        let live = summary.is_some_and(|s| s.state.is_live());
        let busy = self.busy.contains(&panel.vm);
        let mut action = None;
        egui::Panel::right("network").resizable(true).default_size(300.0).show(ui, |ui| {
            action = net_panel::panel_ui(ui, panel, &net, live, busy);
        });
        let vm = panel.vm.clone();
        match action {
            None => {}
            Some(NetPanelAction::Close) => self.network = None,
            Some(NetPanelAction::Add(spec)) => self.run(Job::ForwardAdd { name: vm, spec }),
            Some(NetPanelAction::Remove(spec)) => self.run(Job::ForwardRemove { name: vm, spec }),
        }
    }

    /// What the in-flight indicator says: the open VM's operation first.
    fn snapshot_progress(&self) -> Option<&'static str> {
        let open = match &self.view {
            View::Vm(v) => self.snapshot_busy.get(&v.name),
            View::Library => None,
        };
        open.or_else(|| self.snapshot_busy.values().next()).and_then(SnapshotJob::progress_text)
    }

    pub(super) fn vm(&self, name: &str) -> Option<&VmSummary> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// Start, after the over-commit question if the host's RAM would not cover it.
    pub(super) fn start(&mut self, name: &str) {
        let memory = self.vm(name).map_or(0, |v| v.memory_mib);
        let running = capacity::usage(&self.vms).running_memory_mib;
        if capacity::would_overcommit(self.host, running, memory) {
            self.dialog = Some(Dialog::Overcommit {
                name: name.into(),
                memory_mib: memory,
                running_mib: running,
            });
        } else {
            self.run(Job::Start(name.into()));
        }
    }

    pub(super) fn open_vm(&mut self, name: &str) {
        let Ok(vm) = self.library.existing(name) else { return };
        let frame = match runtime::frame_path(vm.dir(), name) {
            Ok(p) => p,
            Err(e) => {
                self.dialog = Some(error_dialog(format!("Cannot show VM '{name}'"), &e));
                return;
            }
        };
        self.view = View::Vm(Box::new(VmView {
            name: name.into(),
            screen: GuestScreen::open(frame, self.ctx.clone()),
            link: VmLink::new(vm),
            keys: KeyRouter::new(),
            mouse: PointerRouter::new(self.state.pointer_mode),
            one_to_one: self.state.one_to_one,
            image: None,
            area: None,
            area_changed: None,
            sent_size: None,
            cpu: None,
            cpu_percent: None,
            cpu_sampled: Instant::now(),
            pointer: None,
            insert_iso: None,
        }));
    }

    pub(super) fn close_vm(&mut self) {
        if let View::Vm(v) = &mut self.view {
            v.release();
            self.state.one_to_one = v.one_to_one;
            self.state.pointer_mode = v.mouse.mode();
        }
        self.view = View::Library;
        self.network = None;
    }

    // ---- drawing ----------------------------------------------------------------------------

    pub fn ui(&mut self, ui: &mut Ui) {
        self.drain_events();
        let ctx = ui.ctx().clone();
        // Host shortcuts first, most specific first.
        let mut command = self.pending_host.take();
        if command.is_none() && self.dialog.is_none() {
            let in_vm = matches!(self.view, View::Vm(_));
            command = ctx.input_mut(|i| {
                if in_vm && i.consume_shortcut(&TAKE_SNAPSHOT) {
                    Some(HostCommand::TakeSnapshot)
                } else if in_vm && i.consume_shortcut(&RESTORE_LATEST) {
                    Some(HostCommand::RestoreLatestSnapshot)
                } else if i.consume_shortcut(&FULLSCREEN) {
                    Some(HostCommand::ToggleFullscreen)
                } else {
                    None
                }
            });
        }
        if let Some(c) = command {
            self.host_command(&ctx, c);
        }
        match &self.view {
            View::Library => self.library_ui(ui),
            View::Vm(_) => self.vm_ui(ui),
        }
        self.import_ui(&ctx);
        self.dialog_ui(&ctx);
        let progress = self.snapshot_progress();
        self.toasts.ui(&ctx, progress, 28.0);
    }

    fn host_command(&mut self, ctx: &egui::Context, command: HostCommand) {
        let open = match &self.view {
            View::Vm(v) => Some(v.name.clone()),
            View::Library => None,
        };
        match (command, open) {
            (HostCommand::ToggleFullscreen, _) => {
                let full = ctx.input(|i| i.viewport().fullscreen.unwrap_or(false));
                ctx.send_viewport_cmd(egui::ViewportCommand::Fullscreen(!full));
            }
            (HostCommand::TakeSnapshot, Some(vm)) => self.snapshot(SnapshotJob::Take { vm }),
            (HostCommand::RestoreLatestSnapshot, Some(vm)) => {
                self.snapshot(SnapshotJob::Restore { vm, snapshot: None });
            }
            (_, None) => {}
        }
    }

    fn drain_events(&mut self) {
        while let Ok(event) = self.events_rx.try_recv() {
            match event {
                Event::Library(vms) => {
                    self.thumbnails
                        .retain(|n, _| vms.iter().any(|v| &v.name == n && v.state.is_live()));
                    self.vms = vms;
                }
                Event::Thumbnail { name, image } => match self.thumbnails.get_mut(&name) {
                    Some(t) => t.set(image, egui::TextureOptions::LINEAR),
                    None => {
                        let t = self.ctx.load_texture(
                            format!("thumb-{name}"),
                            image,
                            egui::TextureOptions::LINEAR,
                        );
                        self.thumbnails.insert(name, t);
                    }
                },
                Event::Import(e) => {
                    if let Some(sheet) = &mut self.import {
                        let taken: Vec<String> = self.vms.iter().map(|v| v.name.clone()).collect();
                        sheet.on_event(e, &taken);
                    }
                }
                Event::Snapshot { job, result } => self.on_snapshot_done(job, result),
                Event::JobDone { job, result } => {
                    self.busy.remove(job.vm_name());
                    match result {
                        Ok(message) => {
                            if let Job::Delete(name) = &job {
                                if matches!(&self.view, View::Vm(v) if &v.name == name) {
                                    self.close_vm();
                                }
                                if self.snapshots.as_ref().is_some_and(|p| &p.vm == name) {
                                    self.snapshots = None;
                                }
                            }
                            if let Job::ForwardAdd { name, .. } = &job {
                                if let Some(p) = self.network.as_mut().filter(|p| &p.vm == name) {
                                    p.new_forward.clear();
                                }
                            }
                            self.message = message;
                        }
                        Err(chain) => {
                            self.dialog = Some(Dialog::Error { title: job.failure_title(), chain })
                        }
                    }
                }
            }
        }
    }

    /// Dropped files open (or join) the import sheet; hovering ones show a hint.
    fn import_ui(&mut self, ctx: &egui::Context) {
        let (hovering, dropped) = ctx.input(|i| {
            let paths: Vec<_> =
                i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect();
            (i.raw.hovered_files.len(), paths)
        });
        let taken: Vec<String> = self.vms.iter().map(|v| v.name.clone()).collect();
        if !dropped.is_empty() {
            if self.import.as_ref().is_some_and(ImportSheet::is_running) {
                self.message = "An import is running; drop more files when it is done".into();
            } else {
                let sheet = self.import.get_or_insert_with(ImportSheet::default);
                let new: Vec<_> = dropped
                    .into_iter()
                    .filter(|p| sheet.add(p.clone(), import_sheet::Probe::Probing, &taken))
                    .collect();
                import_sheet::spawn_probe(new, self.events.clone());
            }
        }
        if hovering > 0 {
            import_sheet::drop_hint(ctx, hovering);
        }
        if self.dialog.is_some() {
            return;
        }
        let Some(sheet) = self.import.as_mut() else { return };
        match import_sheet::sheet_ui(ctx, sheet, &taken) {
            SheetAction::None => {}
            SheetAction::Import => {
                if let Some((items, cancel)) = sheet.start(&taken) {
                    import_sheet::spawn_import(
                        self.library.clone(),
                        items,
                        cancel,
                        self.events.clone(),
                        self.poke.clone(),
                    );
                }
            }
            SheetAction::Cancel => sheet.cancel(),
            SheetAction::Close => {
                if !sheet.is_running() {
                    self.import = None;
                }
            }
        }
    }
}
