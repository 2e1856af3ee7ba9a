//! The GUI's state and its egui drawing: the library view (VM cards, create/edit form,
//! dialogs, host capacity) and the VM view (guest screen, toolbar, menus, status bar). It
//! talks to VMs only through worker jobs ([`super::worker`]) and the VM link; window events
//! reach [`GuiApp::on_window_event`] before egui.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use display::pointer::Viewport;
use display::InputEvent;
use egui::{Color32, RichText, TextureHandle, Ui};
use winit::event::{ElementState, WindowEvent};

use super::capacity::{self, HostCapacity};
use super::demo;
use super::form::{error_for, Field, FormErrors, VmForm};
use super::import_sheet::{self, ImportSheet, SheetAction};
use super::input::{
    self, HostCommand, KeyRoute, KeyRouter, MotionRoute, PointerMode, PointerRouter, FULLSCREEN,
    RELEASE_KEY_NAME, RESTORE_LATEST, TAKE_SNAPSHOT,
};
use super::model::{VmState, VmSummary};
use super::persist::GuiState;
use super::procstat::CpuMeter;
use super::screen::{cursor_rect, GuestScreen};
use super::snapshot_panel::{self, PanelAction, SnapshotPanel, SnapshotRef, ThumbCache};
use super::toast::Toasts;
use super::vm_link::VmLink;
use super::worker::{self, Event, EventSender, Job, SnapshotDone, SnapshotJob};
use crate::library::Library;
use crate::runtime;

/// How long the screen area must stay the same size before the guest is asked to follow.
const RESIZE_DEBOUNCE: Duration = Duration::from_millis(400);
const CPU_SAMPLE: Duration = Duration::from_secs(1);

/// A modal dialog; one at a time.
enum Dialog {
    Error { title: String, chain: Vec<String> },
    ConfirmDelete { name: String },
    Overcommit { name: String, memory_mib: u64, running_mib: u64 },
    Form { editing: Option<String>, form: VmForm, errors: FormErrors },
    ConfirmRestore { vm: String, snapshot: SnapshotRef },
    ConfirmDeleteSnapshot { vm: String, snapshot: SnapshotRef },
}

/// The open VM's screen and capture state.
struct VmView {
    name: String,
    screen: GuestScreen,
    link: VmLink,
    keys: KeyRouter,
    mouse: PointerRouter,
    one_to_one: bool,
    /// Where the guest image is drawn, for pointer mapping.
    image: Option<Viewport>,
    /// The screen area (physical pixels) and when it last changed, for `display_size`.
    area: Option<(u32, u32)>,
    area_changed: Option<Instant>,
    sent_size: Option<(u32, u32)>,
    cpu: Option<CpuMeter>,
    cpu_percent: Option<f64>,
    cpu_sampled: Instant,
    /// The pointer in points, while it is over the window.
    pointer: Option<egui::Pos2>,
}

enum View {
    Library,
    Vm(Box<VmView>),
}

pub struct GuiApp {
    library: Library,
    ctx: egui::Context,
    events: EventSender,
    events_rx: Receiver<Event>,
    poke: Option<Sender<()>>,
    host: HostCapacity,
    vms: Vec<VmSummary>,
    thumbnails: HashMap<String, TextureHandle>,
    view: View,
    dialog: Option<Dialog>,
    /// Files dropped on the window, being imported.
    import: Option<ImportSheet>,
    /// VMs with a job in flight (their buttons are disabled).
    busy: HashSet<String>,
    message: String,
    state: GuiState,
    /// A host shortcut fired while the guest had the keyboard; applied in the next frame.
    pending_host: Option<HostCommand>,
    pixels_per_point: f32,
    toasts: Toasts,
    /// The snapshots panel, when open (in the VM view and the library view alike).
    snapshots: Option<SnapshotPanel>,
    snapshot_thumbs: ThumbCache,
    /// Snapshot operations in flight (not lists), one per VM at most.
    snapshot_busy: HashMap<String, SnapshotJob>,
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
            self.run(Job::Create { name: demo::DEMO_NAME.into(), config: guest.config() });
        }
    }

    fn run(&mut self, job: Job) {
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
    fn snapshot(&mut self, job: SnapshotJob) {
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
    fn open_snapshots(&mut self, vm: &str) {
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
    fn snapshots_side_panel(&mut self, ui: &mut Ui) {
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

    /// What the in-flight indicator says: the open VM's operation first.
    fn snapshot_progress(&self) -> Option<&'static str> {
        let open = match &self.view {
            View::Vm(v) => self.snapshot_busy.get(&v.name),
            View::Library => None,
        };
        open.or_else(|| self.snapshot_busy.values().next()).and_then(SnapshotJob::progress_text)
    }

    fn vm(&self, name: &str) -> Option<&VmSummary> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// Start, after the over-commit question if the host's RAM would not cover it.
    fn start(&mut self, name: &str) {
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

    fn open_vm(&mut self, name: &str) {
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
        }));
    }

    fn close_vm(&mut self) {
        if let View::Vm(v) = &mut self.view {
            v.release();
            self.state.one_to_one = v.one_to_one;
            self.state.pointer_mode = v.mouse.mode();
        }
        self.view = View::Library;
    }

    // ---- window events, before egui -------------------------------------------------------

    /// Whether the window must grab (confine and hide) the host pointer: a relative pointer
    /// while the guest has the input.
    pub fn wants_grab(&self) -> bool {
        match &self.view {
            View::Vm(v) => v.mouse.grabs(v.keys.is_captured()),
            View::Library => false,
        }
    }

    /// Where the window keeps the grabbed pointer (physical pixels), when it recentres it;
    /// None when raw motion is used.
    pub fn set_pointer_centre(&mut self, centre: Option<(f64, f64)>) {
        if let View::Vm(v) = &mut self.view {
            v.mouse.set_centre(centre);
        }
    }

    /// Raw mouse motion (winit's `DeviceEvent::MouseMotion`), for the grabbed pointer.
    pub fn on_raw_motion(&mut self, dx: f64, dy: f64) {
        if let View::Vm(v) = &mut self.view {
            let events = v.mouse.raw_motion(v.keys.is_captured(), dx, dy);
            v.link.input(events);
        }
    }

    /// Routes a window event; true when it was the guest's and egui must not see it.
    pub fn on_window_event(&mut self, event: &WindowEvent, pixels_per_point: f32) -> bool {
        self.pixels_per_point = pixels_per_point;
        let View::Vm(v) = &mut self.view else { return false };
        match event {
            WindowEvent::ModifiersChanged(m) => {
                v.keys.set_modifiers(m.state());
                false
            }
            WindowEvent::KeyboardInput { event, .. } => {
                let pressed = event.state == ElementState::Pressed;
                match v.keys.key(event.physical_key, pressed, event.repeat) {
                    KeyRoute::Egui => false,
                    KeyRoute::Guest(events) => {
                        v.link.input(events);
                        true
                    }
                    KeyRoute::Released(ups) => {
                        v.link.input(ups);
                        v.mouse.release();
                        self.ctx.request_repaint();
                        true
                    }
                    KeyRoute::Host(cmd, ups) => {
                        v.link.input(ups);
                        self.pending_host = Some(cmd);
                        self.ctx.request_repaint();
                        true
                    }
                    KeyRoute::Drop => true,
                }
            }
            WindowEvent::Focused(false) => {
                if v.keys.is_captured() {
                    v.release();
                    self.ctx.request_repaint();
                }
                false
            }
            WindowEvent::CursorLeft { .. } => {
                v.pointer = None;
                false
            }
            WindowEvent::CursorMoved { position, .. } => {
                let p = egui::pos2(
                    position.x as f32 / pixels_per_point,
                    position.y as f32 / pixels_per_point,
                );
                v.pointer = Some(p);
                let abs = v.image.and_then(|vp| vp.window_to_abs(p.x, p.y));
                match v.mouse.cursor_moved(v.keys.is_captured(), (position.x, position.y), abs) {
                    MotionRoute::Egui => false,
                    MotionRoute::Guest(events) => {
                        v.link.input(events);
                        // The guest's cursor is drawn by us: follow it.
                        self.ctx.request_repaint();
                        true
                    }
                    MotionRoute::Drop => true,
                }
            }
            WindowEvent::MouseInput { state, button, .. } if v.takes_buttons() => {
                if let Some(b) = input::pointer_button(*button) {
                    v.link.input(vec![InputEvent::Button {
                        button: b,
                        down: *state == ElementState::Pressed,
                    }]);
                }
                true
            }
            WindowEvent::MouseWheel { delta, .. } if v.takes_buttons() => {
                let (dx, dy) = input::wheel_clicks(*delta);
                if (dx, dy) != (0, 0) {
                    v.link.input(vec![InputEvent::Wheel { dx, dy }]);
                }
                true
            }
            _ => false,
        }
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

    fn capacity_bar(&self, ui: &mut Ui) {
        egui::Panel::bottom("status").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label(capacity::capacity_line(self.host, capacity::usage(&self.vms)));
                if !self.message.is_empty() {
                    ui.separator();
                    ui.label(&self.message);
                }
            });
        });
    }

    fn library_ui(&mut self, ui: &mut Ui) {
        egui::Panel::top("menu").show(ui, |ui| {
            egui::MenuBar::new().ui(ui, |ui| {
                ui.menu_button("Machine", |ui| {
                    if ui.button("New…").clicked() {
                        self.new_vm_form();
                    }
                });
                ui.menu_button("View", |ui| {
                    let text = ui.ctx().format_shortcut(&FULLSCREEN);
                    if ui.add(egui::Button::new("Fullscreen").shortcut_text(text)).clicked() {
                        self.pending_host = Some(HostCommand::ToggleFullscreen);
                    }
                });
            });
        });
        self.capacity_bar(ui);
        self.snapshots_side_panel(ui);
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("Virtual machines");
                if ui.button("New…").clicked() {
                    self.new_vm_form();
                }
            });
            ui.separator();
            if self.vms.is_empty() {
                ui.label("No virtual machines yet. Create one with “New”.");
                return;
            }
            let mut clicked: Option<CardAction> = None;
            egui::ScrollArea::vertical().show(ui, |ui| {
                for vm in &self.vms {
                    if let Some(a) = self.vm_card(ui, vm) {
                        clicked = Some(a);
                    }
                    ui.add_space(6.0);
                }
            });
            if let Some(action) = clicked {
                self.card_action(action);
            }
        });
    }

    fn new_vm_form(&mut self) {
        self.dialog =
            Some(Dialog::Form { editing: None, form: VmForm::default(), errors: Vec::new() });
    }

    fn vm_card(&self, ui: &mut Ui, vm: &VmSummary) -> Option<CardAction> {
        let mut action = None;
        let busy = self.busy.contains(&vm.name);
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.horizontal(|ui| {
                let (thumb_rect, _) =
                    ui.allocate_exact_size(egui::vec2(192.0, 120.0), egui::Sense::hover());
                ui.painter().rect_filled(thumb_rect, 4.0, Color32::from_gray(20));
                if let Some(t) = self.thumbnails.get(&vm.name) {
                    let fit = fit_rect(thumb_rect, t.size());
                    ui.painter().image(
                        t.id(),
                        fit,
                        egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                        Color32::WHITE,
                    );
                } else {
                    ui.painter().text(
                        thumb_rect.center(),
                        egui::Align2::CENTER_CENTER,
                        vm.state.label(),
                        egui::FontId::proportional(14.0),
                        Color32::GRAY,
                    );
                }
                ui.vertical(|ui| {
                    ui.horizontal(|ui| {
                        ui.label(RichText::new(&vm.name).strong().size(18.0));
                        ui.label(RichText::new(vm.state.label()).color(state_color(&vm.state)));
                        if busy {
                            ui.spinner();
                        }
                    });
                    ui.label(format!(
                        "{} vCPU{} · {}",
                        vm.cpus,
                        if vm.cpus == 1 { "" } else { "s" },
                        capacity::format_mib(vm.memory_mib)
                    ));
                    if let Some(err) = vm.state.error() {
                        ui.label(RichText::new(err).color(Color32::LIGHT_RED));
                    }
                    if !vm.log_tail.is_empty() {
                        egui::CollapsingHeader::new("Log").id_salt(("log", &vm.name)).show(
                            ui,
                            |ui| {
                                for line in &vm.log_tail {
                                    ui.monospace(line);
                                }
                            },
                        );
                    }
                    ui.horizontal(|ui| {
                        let down = vm.state.is_down();
                        let running = matches!(vm.state, VmState::Running | VmState::Paused);
                        let mut button = |ui: &mut Ui, enabled: bool, text: &str, a: CardAction| {
                            if ui.add_enabled(enabled && !busy, egui::Button::new(text)).clicked() {
                                action = Some(a);
                            }
                        };
                        let n = || vm.name.clone();
                        button(ui, down, "Start", CardAction::Start(n()));
                        button(ui, true, "Show", CardAction::Show(n()));
                        button(ui, running, "Shut down", CardAction::Job(Job::Shutdown(n())));
                        button(
                            ui,
                            vm.state.is_live(),
                            "Force off",
                            CardAction::Job(Job::PowerOff(n())),
                        );
                        button(ui, true, "Snapshots…", CardAction::Snapshots(n()));
                        button(ui, down, "Settings…", CardAction::Edit(n()));
                        button(ui, down, "Delete…", CardAction::Delete(n()));
                    });
                });
            });
        });
        action
    }

    fn card_action(&mut self, action: CardAction) {
        match action {
            CardAction::Start(name) => self.start(&name),
            CardAction::Show(name) => self.open_vm(&name),
            CardAction::Snapshots(name) => self.open_snapshots(&name),
            CardAction::Job(job) => self.run(job),
            CardAction::Delete(name) => self.dialog = Some(Dialog::ConfirmDelete { name }),
            CardAction::Edit(name) => {
                let loaded = self.library.existing(&name).and_then(|vm| vm.load_config());
                self.dialog = Some(match loaded {
                    Ok(c) => Dialog::Form {
                        editing: Some(name.clone()),
                        form: VmForm::from_config(&name, &c),
                        errors: Vec::new(),
                    },
                    Err(e) => error_dialog(format!("Cannot edit VM '{name}'"), &e),
                });
            }
        }
    }

    fn vm_ui(&mut self, ui: &mut Ui) {
        let View::Vm(v) = &self.view else { return };
        let name = v.name.clone();
        let summary = self.vm(&name).cloned();
        let state = summary.as_ref().map(|s| s.state.clone());
        // No display device: nothing to show or resize (not even the last frame of an earlier
        // run); its console is serial.
        let headless = summary.as_ref().is_some_and(|s| !s.display);
        let busy = self.busy.contains(&name);
        let live = state.as_ref().is_some_and(VmState::is_live);
        let down = state.as_ref().is_none_or(VmState::is_down);
        let paused = state == Some(VmState::Paused);
        let running = state == Some(VmState::Running);
        let snapshot_busy = self.snapshot_busy.contains_key(&name);
        let restoring = matches!(self.snapshot_busy.get(&name), Some(SnapshotJob::Restore { .. }));
        let mut act: Option<VmAction> = None;

        egui::Panel::top("vm-menu").show(ui, |ui| {
            egui::MenuBar::new().ui(ui, |ui| {
                ui.menu_button("Machine", |ui| {
                    machine_actions(ui, busy, down, running, paused, live, &mut act);
                    ui.separator();
                    if ui.button("Back to library").clicked() {
                        act = Some(VmAction::Back);
                    }
                });
                ui.menu_button("View", |ui| {
                    let text = ui.ctx().format_shortcut(&FULLSCREEN);
                    if ui.add(egui::Button::new("Fullscreen").shortcut_text(text)).clicked() {
                        act = Some(VmAction::Fullscreen);
                    }
                    if ui.button("Scale to fit / 1:1").clicked() {
                        act = Some(VmAction::ToggleScale);
                    }
                    ui.separator();
                    if let View::Vm(v) = &self.view {
                        for mode in [PointerMode::Absolute, PointerMode::Relative] {
                            if ui.radio(v.mouse.mode() == mode, mode.label()).clicked() {
                                act = Some(VmAction::Pointer(mode));
                            }
                        }
                    }
                });
                ui.menu_button("Snapshots", |ui| {
                    let can = (running || paused) && !snapshot_busy;
                    let take = egui::Button::new("Take Snapshot")
                        .shortcut_text(ui.ctx().format_shortcut(&TAKE_SNAPSHOT));
                    if ui.add_enabled(can, take).clicked() {
                        act = Some(VmAction::Host(HostCommand::TakeSnapshot));
                    }
                    let restore = egui::Button::new("Restore Latest")
                        .shortcut_text(ui.ctx().format_shortcut(&RESTORE_LATEST));
                    if ui.add_enabled(!snapshot_busy, restore).clicked() {
                        act = Some(VmAction::Host(HostCommand::RestoreLatestSnapshot));
                    }
                    ui.separator();
                    if ui.button("Snapshots…").clicked() {
                        act = Some(VmAction::Snapshots);
                    }
                });
            });
            ui.horizontal(|ui| {
                if ui.button("Library").clicked() {
                    act = Some(VmAction::Back);
                }
                ui.separator();
                machine_actions(ui, busy, down, running, paused, live, &mut act);
                ui.separator();
                if let View::Vm(v) = &self.view {
                    let label = if v.one_to_one { "1:1" } else { "Fit" };
                    if ui.button(format!("Scale: {label}")).clicked() {
                        act = Some(VmAction::ToggleScale);
                    }
                }
            });
        });

        self.snapshots_side_panel(ui);
        let View::Vm(v) = &mut self.view else { return };
        // CPU use, once a second.
        if let Some(pid) = summary.as_ref().and_then(|s| s.pid) {
            if v.cpu.as_ref().is_none_or(|c| c.pid() != pid) {
                v.cpu = Some(CpuMeter::new(pid));
                v.cpu_percent = None;
            }
            if v.cpu_sampled.elapsed() >= CPU_SAMPLE {
                v.cpu_sampled = Instant::now();
                if let Some(p) = v.cpu.as_mut().and_then(CpuMeter::sample) {
                    v.cpu_percent = Some(p);
                }
            }
        } else {
            v.cpu = None;
            v.cpu_percent = None;
        }

        egui::Panel::bottom("vm-status").show(ui, |ui| {
            ui.horizontal(|ui| {
                // Mid-restore the process restarts: not stopped, not crashed.
                let label = if restoring {
                    "restoring"
                } else {
                    state.as_ref().map_or("unknown", VmState::label)
                };
                ui.label(
                    RichText::new(format!("{name}: {label}"))
                        .color(state.as_ref().map_or(Color32::GRAY, state_color)),
                );
                if let Some(p) = v.cpu_percent {
                    ui.separator();
                    ui.label(format!("CPU {p:.0}%"));
                }
                ui.separator();
                if v.mouse.grabs(v.keys.is_captured()) {
                    let text = format!("Pointer grabbed: {RELEASE_KEY_NAME} releases");
                    ui.label(RichText::new(text).strong());
                } else if v.keys.is_captured() {
                    ui.label(RichText::new(format!("{RELEASE_KEY_NAME} releases")).strong());
                } else if headless {
                    ui.label("No display");
                } else {
                    ui.label("Click the screen to capture keyboard and pointer");
                    ui.separator();
                    ui.label(v.screen.status());
                }
                if !self.message.is_empty() {
                    ui.separator();
                    ui.label(&self.message);
                }
            });
        });

        egui::CentralPanel::no_frame().show(ui, |ui| {
            let avail = ui.available_rect_before_wrap();
            ui.painter().rect_filled(avail, 0.0, Color32::BLACK);
            // The guest follows the window (debounced): ask in physical pixels.
            let ppp = ui.ctx().pixels_per_point();
            let area = ((avail.width() * ppp) as u32, (avail.height() * ppp) as u32);
            if v.area != Some(area) {
                v.area = Some(area);
                v.area_changed = Some(Instant::now());
            }
            let response = ui.allocate_rect(avail, egui::Sense::click());
            let ctx = ui.ctx().clone();
            let texture = if headless { None } else { v.screen.update(&ctx).cloned() };
            match &texture {
                Some(t) => {
                    let size = t.size();
                    let guest = (size[0] as u32, size[1] as u32);
                    let viewport = if v.one_to_one {
                        Viewport::one_to_one((avail.left(), avail.top()), guest, ppp)
                    } else {
                        Viewport::fit(
                            (avail.left(), avail.top(), avail.width(), avail.height()),
                            guest,
                        )
                    };
                    let (x, y, w, h) = viewport.rect();
                    let rect = egui::Rect::from_min_size(egui::pos2(x, y), egui::vec2(w, h));
                    let uv = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));
                    ui.painter().image(t.id(), rect, uv, Color32::WHITE);
                    v.image = Some(viewport);
                    let cursor = v.screen.cursor();
                    if let Some(c) = &cursor {
                        if let Some((cx, cy, cw, ch)) = cursor_rect(&viewport, &c.place) {
                            let at =
                                egui::Rect::from_min_size(egui::pos2(cx, cy), egui::vec2(cw, ch));
                            // Clipped to the image: the guest's cursor never leaves its screen.
                            let clip = rect.intersect(avail);
                            ui.painter().with_clip_rect(clip).image(
                                c.texture.id(),
                                at,
                                uv,
                                Color32::WHITE,
                            );
                        }
                    }
                    // Captured, the guest's cursor is the pointer: the host's would be a second
                    // one (a guest without a cursor plane keeps the host's).
                    let over = v.pointer.is_some_and(|p| rect.contains(p));
                    if v.keys.is_captured() && (v.mouse.grabs(true) || (over && cursor.is_some())) {
                        ui.ctx().set_cursor_icon(egui::CursorIcon::None);
                    }
                }
                None => {
                    v.image = None;
                    let text = if live && headless {
                        format!("VM '{name}' has no display; its console: hutch console {name}")
                    } else if live {
                        v.screen.status().to_string()
                    } else if let Some(VmState::Crashed { error }) = &state {
                        format!("Crashed: {}", error.as_deref().unwrap_or("the VM process died"))
                    } else {
                        format!("The VM is {}", state.as_ref().map_or("unknown", VmState::label))
                    };
                    ui.painter().text(
                        avail.center(),
                        egui::Align2::CENTER_CENTER,
                        text,
                        egui::FontId::proportional(18.0),
                        Color32::GRAY,
                    );
                    if let Some(s) = &summary {
                        let mut y = avail.center().y + 30.0;
                        for line in &s.log_tail {
                            ui.painter().text(
                                egui::pos2(avail.left() + 20.0, y),
                                egui::Align2::LEFT_TOP,
                                line,
                                egui::FontId::monospace(12.0),
                                Color32::LIGHT_RED,
                            );
                            y += 16.0;
                        }
                    }
                }
            }
            let over_image = response
                .interact_pointer_pos()
                .is_some_and(|p| v.image.is_some_and(|vp| vp.window_to_guest(p.x, p.y).is_some()));
            if response.clicked() && over_image && !v.keys.is_captured() && running {
                v.keys.capture();
                // Keys the window had queued before this frame were routed uncaptured.
                log::info!("VM '{}': keyboard and pointer captured", v.name);
            }
        });

        // The guest is asked to follow the window only once it has stopped changing.
        if running && !headless {
            if let (Some(changed), Some((w, h))) = (v.area_changed, v.area) {
                let left = RESIZE_DEBOUNCE.saturating_sub(changed.elapsed());
                if left.is_zero() {
                    v.area_changed = None;
                    let (gw, gh) = display::pointer::guest_size_for_window(w, h);
                    if v.sent_size != Some((gw, gh)) && gw > 0 && gh > 0 {
                        v.sent_size = Some((gw, gh));
                        v.link.display_size(gw, gh);
                    }
                } else {
                    ui.ctx().request_repaint_after(left);
                }
            }
        }
        if !running && v.keys.is_captured() {
            v.release();
        }

        match act {
            None => {}
            Some(VmAction::Back) => self.close_vm(),
            Some(VmAction::Fullscreen) => self.pending_host = Some(HostCommand::ToggleFullscreen),
            Some(VmAction::ToggleScale) => v.one_to_one = !v.one_to_one,
            Some(VmAction::Pointer(mode)) => {
                // A switch mid-capture must not leave the pointer grabbed or stray.
                v.release();
                v.mouse.set_mode(mode);
                self.state.pointer_mode = mode;
            }
            Some(VmAction::Start) => self.start(&name),
            Some(VmAction::Job(make)) => self.run(make(name)),
            Some(VmAction::Host(command)) => self.pending_host = Some(command),
            Some(VmAction::Snapshots) => {
                if self.snapshots.as_ref().is_some_and(|p| p.vm == name) {
                    self.snapshots = None;
                } else {
                    self.open_snapshots(&name);
                }
            }
        }
    }

    fn dialog_ui(&mut self, ctx: &egui::Context) {
        let Some(dialog) = self.dialog.take() else { return };
        let mut keep = true;
        let mut then: Option<Job> = None;
        let mut then_snapshot: Option<SnapshotJob> = None;
        let id = egui::Id::unique("hutch-dialog");
        let dialog = match dialog {
            Dialog::Error { title, chain } => {
                egui::Modal::new(id).show(ctx, |ui| {
                    ui.set_max_width(520.0);
                    ui.heading(&title);
                    for (i, cause) in chain.iter().enumerate() {
                        let text =
                            if i == 0 { cause.clone() } else { format!("Caused by: {cause}") };
                        ui.label(text);
                    }
                    if ui.button("OK").clicked() {
                        keep = false;
                    }
                });
                Dialog::Error { title, chain }
            }
            Dialog::ConfirmDelete { name } => {
                egui::Modal::new(id).show(ctx, |ui| {
                    ui.heading(format!("Delete VM '{name}'?"));
                    ui.label("Its directory (settings, logs) is removed. Disk images outside it are kept.");
                    ui.horizontal(|ui| {
                        if ui.button("Delete").clicked() {
                            keep = false;
                            then = Some(Job::Delete(name.clone()));
                        }
                        if ui.button("Cancel").clicked() {
                            keep = false;
                        }
                    });
                });
                Dialog::ConfirmDelete { name }
            }
            Dialog::Overcommit { name, memory_mib, running_mib } => {
                egui::Modal::new(id).show(ctx, |ui| {
                    ui.heading("Not enough host memory");
                    ui.label(format!(
                        "VM '{name}' needs {}; running VMs already use {} of the host's {}.",
                        capacity::format_mib(memory_mib),
                        capacity::format_mib(running_mib),
                        capacity::format_mib(self.host.memory_mib)
                    ));
                    ui.horizontal(|ui| {
                        if ui.button("Start anyway").clicked() {
                            keep = false;
                            then = Some(Job::Start(name.clone()));
                        }
                        if ui.button("Cancel").clicked() {
                            keep = false;
                        }
                    });
                });
                Dialog::Overcommit { name, memory_mib, running_mib }
            }
            Dialog::ConfirmRestore { vm, snapshot } => {
                egui::Modal::new(id).show(ctx, |ui| {
                    ui.set_max_width(480.0);
                    ui.heading(format!("Restore '{}'?", snapshot.name));
                    ui.label(
                        "The current state of the VM is lost unless you take a snapshot first.",
                    );
                    ui.horizontal(|ui| {
                        if ui.button("Restore").clicked() {
                            keep = false;
                            then_snapshot = Some(SnapshotJob::Restore {
                                vm: vm.clone(),
                                snapshot: Some(snapshot.clone()),
                            });
                        }
                        if ui.button("Cancel").clicked() {
                            keep = false;
                        }
                    });
                });
                Dialog::ConfirmRestore { vm, snapshot }
            }
            Dialog::ConfirmDeleteSnapshot { vm, snapshot } => {
                egui::Modal::new(id).show(ctx, |ui| {
                    ui.set_max_width(480.0);
                    ui.heading(format!("Delete snapshot '{}'?", snapshot.name));
                    ui.label("The other snapshots keep their data.");
                    ui.horizontal(|ui| {
                        if ui.button("Delete").clicked() {
                            keep = false;
                            then_snapshot = Some(SnapshotJob::Delete {
                                vm: vm.clone(),
                                snapshot: snapshot.clone(),
                            });
                        }
                        if ui.button("Cancel").clicked() {
                            keep = false;
                        }
                    });
                });
                Dialog::ConfirmDeleteSnapshot { vm, snapshot }
            }
            Dialog::Form { editing, mut form, mut errors } => {
                egui::Modal::new(id).show(ctx, |ui| {
                    ui.set_width(520.0);
                    ui.heading(match &editing {
                        Some(n) => format!("Settings of '{n}'"),
                        None => "New virtual machine".into(),
                    });
                    egui::Grid::new("form").num_columns(2).spacing([8.0, 6.0]).show(ui, |ui| {
                        let fields: [(&str, Field, &mut String, bool); 7] = [
                            ("Name", Field::Name, &mut form.name, false),
                            ("Kernel", Field::Kernel, &mut form.kernel, false),
                            ("Initrd", Field::Initrd, &mut form.initrd, false),
                            (
                                "Disks (one per line, PATH[,readonly])",
                                Field::Disks,
                                &mut form.disks,
                                true,
                            ),
                            ("CPUs", Field::Cpus, &mut form.cpus, false),
                            ("Memory (MiB)", Field::Memory, &mut form.memory_mib, false),
                            ("Command line", Field::Cmdline, &mut form.cmdline, false),
                        ];
                        for (label, field, text, multiline) in fields {
                            ui.label(label);
                            ui.vertical(|ui| {
                                let enabled = !(field == Field::Name && editing.is_some());
                                let edit = if multiline {
                                    egui::TextEdit::multiline(text).desired_rows(2)
                                } else {
                                    egui::TextEdit::singleline(text)
                                };
                                ui.add_enabled(enabled, edit.desired_width(360.0));
                                if let Some(msg) = error_for(&errors, field) {
                                    ui.label(RichText::new(msg).color(Color32::LIGHT_RED));
                                }
                            });
                            ui.end_row();
                        }
                    });
                    ui.horizontal(|ui| {
                        let ok = if editing.is_some() { "Save" } else { "Create" };
                        if ui.button(ok).clicked() {
                            let existing: Vec<String> = self
                                .vms
                                .iter()
                                .map(|v| v.name.clone())
                                .filter(|n| Some(n) != editing.as_ref())
                                .collect();
                            match form.validate(&existing) {
                                Ok(config) => {
                                    keep = false;
                                    let name = form.name.trim().to_string();
                                    let job = match &editing {
                                        Some(_) => Job::SaveSettings { name, config },
                                        None => Job::Create { name, config },
                                    };
                                    then = Some(job);
                                }
                                Err(e) => errors = e,
                            }
                        }
                        if ui.button("Cancel").clicked() {
                            keep = false;
                        }
                    });
                });
                Dialog::Form { editing, form, errors }
            }
        };
        if keep {
            self.dialog = Some(dialog);
        }
        if let Some(job) = then {
            self.run(job);
        }
        if let Some(job) = then_snapshot {
            self.snapshot(job);
        }
    }
}

enum CardAction {
    Start(String),
    Show(String),
    Snapshots(String),
    Job(Job),
    Edit(String),
    Delete(String),
}

enum VmAction {
    Back,
    Fullscreen,
    ToggleScale,
    Pointer(PointerMode),
    Start,
    Job(fn(String) -> Job),
    /// What a host shortcut does (menu items with one).
    Host(HostCommand),
    /// Open or close the snapshots panel.
    Snapshots,
}

fn machine_actions(
    ui: &mut Ui,
    busy: bool,
    down: bool,
    running: bool,
    paused: bool,
    live: bool,
    act: &mut Option<VmAction>,
) {
    if ui.add_enabled(down && !busy, egui::Button::new("Start")).clicked() {
        *act = Some(VmAction::Start);
    }
    if ui.add_enabled((running || paused) && !busy, egui::Button::new("Shut down")).clicked() {
        *act = Some(VmAction::Job(Job::Shutdown));
    }
    if ui.add_enabled(live && !busy, egui::Button::new("Force off")).clicked() {
        *act = Some(VmAction::Job(Job::PowerOff));
    }
    if paused {
        if ui.add_enabled(!busy, egui::Button::new("Resume")).clicked() {
            *act = Some(VmAction::Job(Job::Resume));
        }
    } else if ui.add_enabled(running && !busy, egui::Button::new("Pause")).clicked() {
        *act = Some(VmAction::Job(Job::Pause));
    }
    if ui.add_enabled(running || paused, egui::Button::new("Screenshot")).clicked() {
        *act = Some(VmAction::Job(|name| Job::Screenshot { name }));
    }
}

impl VmView {
    /// Ends the capture: key-ups for held keys, no leftover motion.
    fn release(&mut self) {
        let ups = self.keys.release();
        self.link.input(ups);
        self.mouse.release();
    }

    /// The VM process restarted into a snapshot: the guest's screen size is the snapshot's,
    /// so ask it again to follow the window (the screen and the link reconnect by
    /// themselves).
    fn restored(&mut self) {
        self.sent_size = None;
        self.area_changed = Some(Instant::now());
    }

    /// Whether a button or wheel event now is the guest's.
    fn takes_buttons(&self) -> bool {
        let over_image = self
            .pointer
            .is_some_and(|p| self.image.and_then(|vp| vp.window_to_abs(p.x, p.y)).is_some());
        self.mouse.takes_buttons(self.keys.is_captured(), over_image)
    }
}

/// `size` scaled into `avail`, aspect kept, centred.
pub(super) fn fit_rect(avail: egui::Rect, size: [usize; 2]) -> egui::Rect {
    let (w, h) = (size[0].max(1) as f32, size[1].max(1) as f32);
    let scale = (avail.width() / w).min(avail.height() / h);
    egui::Rect::from_center_size(avail.center(), egui::vec2(w * scale, h * scale))
}

fn state_color(state: &VmState) -> Color32 {
    match state {
        VmState::Running => Color32::from_rgb(80, 200, 120),
        VmState::Paused | VmState::Starting | VmState::ShuttingDown => {
            Color32::from_rgb(230, 180, 60)
        }
        VmState::Crashed { .. } | VmState::Unresponsive { .. } | VmState::Invalid { .. } => {
            Color32::from_rgb(240, 90, 90)
        }
        VmState::Stopped => Color32::GRAY,
    }
}

fn error_dialog(title: String, e: &(dyn std::error::Error + 'static)) -> Dialog {
    let mut chain = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    Dialog::Error { title, chain }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_the_aspect_and_centres() {
        let avail = egui::Rect::from_min_size(egui::pos2(0.0, 0.0), egui::vec2(1000.0, 500.0));
        let r = fit_rect(avail, [800, 400]);
        assert_eq!(r.size(), egui::vec2(1000.0, 500.0));
        let r = fit_rect(avail, [100, 100]);
        assert_eq!(r.size(), egui::vec2(500.0, 500.0));
        assert_eq!(r.center(), avail.center());
    }
}
