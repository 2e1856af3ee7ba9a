//! The VM view: the guest screen, its toolbar, menus and status bar, and the routing of
//! window events (keys, pointer) to the guest while it has the input.

use std::time::{Duration, Instant};

use display::pointer::Viewport;
use display::InputEvent;
use egui::{Color32, RichText, Ui};
use winit::event::{ElementState, WindowEvent};

use super::library::state_color;
use crate::gui::app::{GuiApp, View};
use crate::gui::input::{
    self, HostCommand, KeyRoute, KeyRouter, MotionRoute, PointerMode, PointerRouter, FULLSCREEN,
    RELEASE_KEY_NAME, RESTORE_LATEST, TAKE_SNAPSHOT,
};
use crate::gui::model::VmState;
use crate::gui::net_panel::NetPanel;
use crate::gui::procstat::CpuMeter;
use crate::gui::screen::{cursor_rect, GuestScreen};
use crate::gui::vm_link::VmLink;
use crate::gui::worker::{Job, SnapshotJob};

/// How long the screen area must stay the same size before the guest is asked to follow.
const RESIZE_DEBOUNCE: Duration = Duration::from_millis(400);
const CPU_SAMPLE: Duration = Duration::from_secs(1);

/// The open VM's screen and capture state.
pub(in crate::gui) struct VmView {
    pub(in crate::gui) name: String,
    pub(in crate::gui) screen: GuestScreen,
    pub(in crate::gui) link: VmLink,
    pub(in crate::gui) keys: KeyRouter,
    pub(in crate::gui) mouse: PointerRouter,
    pub(in crate::gui) one_to_one: bool,
    /// Where the guest image is drawn, for pointer mapping.
    pub(in crate::gui) image: Option<Viewport>,
    /// The screen area (physical pixels) and when it last changed, for `display_size`.
    pub(in crate::gui) area: Option<(u32, u32)>,
    pub(in crate::gui) area_changed: Option<Instant>,
    pub(in crate::gui) sent_size: Option<(u32, u32)>,
    pub(in crate::gui) cpu: Option<CpuMeter>,
    pub(in crate::gui) cpu_percent: Option<f64>,
    pub(in crate::gui) cpu_sampled: Instant,
    /// The pointer in points, while it is over the window.
    pub(in crate::gui) pointer: Option<egui::Pos2>,
    /// The path typed in the Insert ISO dialog, while it is open.
    pub(in crate::gui) insert_iso: Option<String>,
}

impl GuiApp {
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

    pub(in crate::gui) fn vm_ui(&mut self, ui: &mut Ui) {
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
                ui.menu_button("Network", |ui| {
                    if ui.button("Network and Port Forwards…").clicked() {
                        act = Some(VmAction::Network);
                    }
                });
                ui.menu_button("CD", |ui| {
                    let cd = summary.as_ref().map(|s| s.cd.clone()).unwrap_or_default();
                    ui.label(cd.label(down));
                    ui.separator();
                    // A running VM changes its drive at once; one without a drive cannot.
                    let can = !busy && (down || cd.drive);
                    if ui.add_enabled(can, egui::Button::new("Insert ISO…")).clicked() {
                        act = Some(VmAction::InsertIso);
                    }
                    if ui.add_enabled(can && cd.iso.is_some(), egui::Button::new("Eject")).clicked()
                    {
                        act = Some(VmAction::Job(|name| Job::Media { name, iso: None }));
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
        self.network_side_panel(ui);
        let View::Vm(v) = &mut self.view else { return };
        if let Some(path) = &mut v.insert_iso {
            let mut open = true;
            let mut insert = false;
            let mut cancel = false;
            egui::Window::new("Insert ISO")
                .collapsible(false)
                .resizable(false)
                .open(&mut open)
                .show(ui.ctx(), |ui| {
                    ui.label("Path of the ISO image:");
                    let field = ui.add(
                        egui::TextEdit::singleline(path)
                            .hint_text("/home/me/Downloads/debian.iso")
                            .desired_width(360.0),
                    );
                    let entered =
                        field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                    // Typing goes to the path at once, as in a file dialog (after Enter,
                    // so that taking the focus back does not hide the Enter).
                    if !entered && ui.memory(|m| m.focused().is_none()) {
                        field.request_focus();
                    }
                    ui.horizontal(|ui| {
                        insert = ui.button("Insert").clicked() || entered;
                        cancel = ui.button("Cancel").clicked();
                    });
                });
            let typed = path.trim().to_string();
            if insert && !typed.is_empty() {
                v.insert_iso = None;
                act = Some(VmAction::Media(std::path::PathBuf::from(typed)));
            } else if !open || cancel {
                v.insert_iso = None;
            }
        }
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
                if v.mouse.grabs(v.keys.is_captured()) {
                    ui.separator();
                    let text = format!("Pointer grabbed: {RELEASE_KEY_NAME} releases");
                    ui.label(RichText::new(text).strong());
                } else if v.keys.is_captured() {
                    ui.separator();
                    ui.label(RichText::new(format!("{RELEASE_KEY_NAME} releases")).strong());
                } else if headless {
                    ui.separator();
                    ui.label("No display");
                } else if !down {
                    // Only a VM that runs has a screen to capture or to wait for.
                    ui.separator();
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
            Some(VmAction::InsertIso) => {
                v.release();
                v.insert_iso = Some(String::new());
            }
            Some(VmAction::Media(iso)) => self.run(Job::Media { name, iso: Some(iso) }),
            Some(VmAction::Job(make)) => self.run(make(name)),
            Some(VmAction::Host(command)) => self.pending_host = Some(command),
            Some(VmAction::Network) => {
                if self.network.as_ref().is_some_and(|p| p.vm == name) {
                    self.network = None;
                } else {
                    self.network = Some(NetPanel::new(&name));
                }
            }
            Some(VmAction::Snapshots) => {
                if self.snapshots.as_ref().is_some_and(|p| p.vm == name) {
                    self.snapshots = None;
                } else {
                    self.open_snapshots(&name);
                }
            }
        }
    }
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
    /// Open or close the network panel.
    Network,
    /// Open the Insert ISO dialog.
    InsertIso,
    /// Put this ISO in the CD drive.
    Media(std::path::PathBuf),
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
    pub(in crate::gui) fn release(&mut self) {
        let ups = self.keys.release();
        self.link.input(ups);
        self.mouse.release();
    }

    /// The VM process restarted into a snapshot: the guest's screen size is the snapshot's,
    /// so ask it again to follow the window (the screen and the link reconnect by
    /// themselves).
    pub(in crate::gui) fn restored(&mut self) {
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
