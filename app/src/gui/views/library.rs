//! The library view: the VM cards with their buttons and thumbnails, the menu bar and the
//! host capacity line.

use egui::{Color32, RichText, Ui};

use super::{error_dialog, fit_rect, Dialog};
use crate::gui::app::GuiApp;
use crate::gui::capacity;
use crate::gui::form::VmForm;
use crate::gui::input::{HostCommand, FULLSCREEN};
use crate::gui::model::{VmState, VmSummary};
use crate::gui::worker::Job;

impl GuiApp {
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

    pub(in crate::gui) fn library_ui(&mut self, ui: &mut Ui) {
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
            Some(Dialog::Form { editing: None, form: Box::default(), errors: Vec::new() });
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
                        button(
                            ui,
                            running,
                            "Shut down",
                            CardAction::Job(Box::new(Job::Shutdown(n()))),
                        );
                        button(
                            ui,
                            vm.state.is_live(),
                            "Force off",
                            CardAction::Job(Box::new(Job::PowerOff(n()))),
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
            CardAction::Job(job) => self.run(*job),
            CardAction::Delete(name) => self.dialog = Some(Dialog::ConfirmDelete { name }),
            CardAction::Edit(name) => {
                let loaded = self.library.existing(&name).and_then(|vm| vm.load_config());
                self.dialog = Some(match loaded {
                    Ok(c) => Dialog::Form {
                        editing: Some(name.clone()),
                        form: Box::new(VmForm::from_config(&name, &c)),
                        errors: Vec::new(),
                    },
                    Err(e) => error_dialog(format!("Cannot edit VM '{name}'"), &e),
                });
            }
        }
    }
}

enum CardAction {
    Start(String),
    Show(String),
    Snapshots(String),
    // Boxed: a job can carry a whole VM configuration.
    Job(Box<Job>),
    Edit(String),
    Delete(String),
}

pub(in crate::gui) fn state_color(state: &VmState) -> Color32 {
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
