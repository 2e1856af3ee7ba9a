//! The modal dialogs: errors, confirmations (delete, restore, over-commit) and the VM form.

use egui::{Color32, RichText};

use crate::gui::app::GuiApp;
use crate::gui::capacity;
use crate::gui::form::{error_for, Field, FormErrors, FormOutcome, VmForm, DEFAULT_NEW_DISK};
use crate::gui::snapshot_panel::SnapshotRef;
use crate::gui::worker::{Job, SnapshotJob};
use crate::library::BootMode;

/// A modal dialog; one at a time.
pub(in crate::gui) enum Dialog {
    Error { title: String, chain: Vec<String> },
    ConfirmDelete { name: String },
    Overcommit { name: String, memory_mib: u64, running_mib: u64 },
    Form { editing: Option<String>, form: Box<VmForm>, errors: FormErrors },
    ConfirmRestore { vm: String, snapshot: SnapshotRef },
    ConfirmDeleteSnapshot { vm: String, snapshot: SnapshotRef },
}

impl GuiApp {
    pub(in crate::gui) fn dialog_ui(&mut self, ctx: &egui::Context) {
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
                    if editing.is_none() {
                        // What users bring first: an installer ISO; a kernel second.
                        ui.horizontal(|ui| {
                            let installing = form.boot != BootMode::Kernel;
                            if ui.selectable_label(installing, "Install from an ISO").clicked()
                                && !installing
                            {
                                form.boot = BootMode::Uefi;
                                if form.new_disk.is_empty() {
                                    form.new_disk = DEFAULT_NEW_DISK.into();
                                }
                            }
                            if ui.selectable_label(!installing, "Boot a Linux kernel").clicked() {
                                form.boot = BootMode::Kernel;
                            }
                        });
                        ui.add_space(4.0);
                    }
                    egui::Grid::new("form").num_columns(2).spacing([8.0, 6.0]).show(ui, |ui| {
                        ui.label("Name");
                        ui.vertical(|ui| {
                            let edit =
                                egui::TextEdit::singleline(&mut form.name).desired_width(360.0);
                            ui.add_enabled(editing.is_none(), edit);
                            if let Some(msg) = error_for(&errors, Field::Name) {
                                ui.label(RichText::new(msg).color(Color32::LIGHT_RED));
                            }
                        });
                        ui.end_row();
                        if editing.is_some() || form.boot != BootMode::Kernel {
                            ui.label("Firmware");
                            ui.vertical(|ui| {
                                ui.horizontal(|ui| {
                                    ui.radio_value(&mut form.boot, BootMode::Uefi, "UEFI");
                                    ui.radio_value(&mut form.boot, BootMode::Bios, "BIOS");
                                    if editing.is_some() {
                                        ui.radio_value(
                                            &mut form.boot,
                                            BootMode::Kernel,
                                            "Linux kernel",
                                        );
                                    }
                                });
                                if let Some(msg) = error_for(&errors, Field::Boot) {
                                    ui.label(RichText::new(msg).color(Color32::LIGHT_RED));
                                }
                            });
                            ui.end_row();
                        }
                        // After the radio buttons: this frame shows the boot just picked.
                        let firmware = form.boot != BootMode::Kernel;
                        let mut fields: Vec<(&str, Field, &mut String, bool)> = Vec::new();
                        if firmware {
                            fields.push(("ISO (CD)", Field::Iso, &mut form.iso, false));
                            if editing.is_none() {
                                fields.push((
                                    "New disk size",
                                    Field::NewDisk,
                                    &mut form.new_disk,
                                    false,
                                ));
                            }
                        } else {
                            fields.push(("Kernel", Field::Kernel, &mut form.kernel, false));
                            fields.push(("Initrd", Field::Initrd, &mut form.initrd, false));
                        }
                        fields.push((
                            if firmware && editing.is_none() {
                                "Other disks (one per line, PATH[,readonly])"
                            } else {
                                "Disks (one per line, PATH[,readonly])"
                            },
                            Field::Disks,
                            &mut form.disks,
                            true,
                        ));
                        fields.push(("CPUs", Field::Cpus, &mut form.cpus, false));
                        fields.push(("Memory (MiB)", Field::Memory, &mut form.memory_mib, false));
                        if !firmware {
                            fields.push(("Command line", Field::Cmdline, &mut form.cmdline, false));
                        }
                        for (label, field, text, multiline) in fields {
                            ui.label(label);
                            ui.vertical(|ui| {
                                let edit = if multiline {
                                    egui::TextEdit::multiline(text).desired_rows(2)
                                } else {
                                    egui::TextEdit::singleline(text)
                                };
                                ui.add(edit.desired_width(360.0));
                                if let Some(msg) = error_for(&errors, field) {
                                    ui.label(RichText::new(msg).color(Color32::LIGHT_RED));
                                }
                            });
                            ui.end_row();
                        }
                        ui.label("Network");
                        ui.vertical(|ui| {
                            ui.checkbox(&mut form.network, "Network card (user-mode NAT, DHCP)");
                            ui.add_enabled(
                                form.network,
                                egui::Checkbox::new(
                                    &mut form.isolate_from_host,
                                    "Isolate from host (the guest cannot reach 10.0.2.2)",
                                ),
                            );
                            if !form.mac.is_empty() {
                                ui.label(format!("MAC address {}", form.mac));
                            }
                        });
                        ui.end_row();
                        ui.label("Port forwards (one per line, tcp:127.0.0.1:2222-:22)");
                        ui.vertical(|ui| {
                            let edit = egui::TextEdit::multiline(&mut form.forwards)
                                .desired_rows(2)
                                .desired_width(360.0);
                            ui.add_enabled(form.network, edit);
                            if let Some(msg) = error_for(&errors, Field::Forwards) {
                                ui.label(RichText::new(msg).color(Color32::LIGHT_RED));
                            }
                        });
                        ui.end_row();
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
                                Ok(FormOutcome { config, new_disk }) => {
                                    keep = false;
                                    let name = form.name.trim().to_string();
                                    let job = match &editing {
                                        Some(_) => Job::SaveSettings { name, config },
                                        None => Job::Create { name, config, new_disk },
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

pub(in crate::gui) fn error_dialog(title: String, e: &(dyn std::error::Error + 'static)) -> Dialog {
    let mut chain = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    Dialog::Error { title, chain }
}
