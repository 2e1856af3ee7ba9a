//! The network panel of a VM: its card, the guest's address once it has a DHCP lease, and
//! the port forwards with Add / Remove. On a running VM a change applies at once (its VM
//! process binds the host port first, so a busy port is refused by name); on a stopped one it
//! is kept for the next start. The work runs as [`super::worker::Job`]s through
//! `service::net`, as `hutch forward` does.

use egui::{Color32, RichText, Ui};
use net::slirp::Forward;

use super::model::NetSummary;

/// The panel's own state: which VM, and the forward being typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPanel {
    pub vm: String,
    pub new_forward: String,
}

impl NetPanel {
    pub fn new(vm: &str) -> NetPanel {
        NetPanel { vm: vm.to_string(), new_forward: String::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetPanelAction {
    Add(String),
    Remove(String),
    Close,
}

/// What the Add button would add: the forward, canonical, or why the text is not one.
pub fn check_new_forward(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("e.g. tcp::2222-:22 (host port 2222 on 127.0.0.1 to the guest's 22)".into());
    }
    text.parse::<Forward>().map(|f| f.to_string()).map_err(|e| e.to_string())
}

/// The lines the panel shows above the forwards: the card and the guest's address.
pub fn summary_lines(net: &NetSummary, live: bool) -> Vec<String> {
    if net.mode == "none" {
        return vec!["No network card (net = none in its settings)".into()];
    }
    let mut lines = vec![format!("Network: {} (NAT)", net.mode)];
    lines.push(match (&net.guest_ip, live) {
        (Some(ip), true) => format!("Guest address: {ip}"),
        (None, true) => "Guest address: none yet (no DHCP lease)".into(),
        (_, false) => "Guest address: when it runs".into(),
    });
    lines
}

/// Draws the panel; returns what the user asked for. `busy`: a change is in flight.
pub fn panel_ui(
    ui: &mut Ui,
    panel: &mut NetPanel,
    net: &NetSummary,
    live: bool,
    busy: bool,
) -> Option<NetPanelAction> {
    let mut action = None;
    ui.horizontal(|ui| {
        ui.heading("Network");
        if ui.small_button("Close").clicked() {
            action = Some(NetPanelAction::Close);
        }
    });
    for line in summary_lines(net, live) {
        ui.label(line);
    }
    if net.mode == "none" {
        return action;
    }
    ui.separator();
    ui.label(RichText::new("Port forwards").strong());
    if live {
        ui.label("Changes apply to the running VM at once.");
    }
    if net.forwards.is_empty() {
        ui.label(RichText::new("None").color(Color32::GRAY));
    }
    for forward in &net.forwards {
        ui.horizontal(|ui| {
            ui.monospace(forward);
            if ui.add_enabled(!busy, egui::Button::new("Remove")).clicked() {
                action = Some(NetPanelAction::Remove(forward.clone()));
            }
        });
    }
    ui.separator();
    let checked = check_new_forward(&panel.new_forward);
    ui.horizontal(|ui| {
        let edit = ui.add(
            egui::TextEdit::singleline(&mut panel.new_forward)
                .hint_text("tcp::2222-:22")
                .desired_width(180.0),
        );
        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        let add = ui.add_enabled(!busy && checked.is_ok(), egui::Button::new("Add"));
        if let Ok(spec) = &checked {
            if add.clicked() || (enter && !busy) {
                action = Some(NetPanelAction::Add(spec.clone()));
            }
        }
    });
    match &checked {
        Err(why) if !panel.new_forward.trim().is_empty() => {
            ui.label(RichText::new(why).color(Color32::LIGHT_RED));
        }
        Err(hint) => {
            ui.label(RichText::new(hint).color(Color32::GRAY));
        }
        Ok(_) => {}
    }
    action
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(forwards: &[&str], guest_ip: Option<&str>) -> NetSummary {
        NetSummary {
            mode: "user".into(),
            guest_ip: guest_ip.map(str::to_string),
            forwards: forwards.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn a_typed_forward_is_offered_in_its_canonical_form() {
        assert_eq!(check_new_forward(" tcp::2222-:22 "), Ok("tcp:127.0.0.1:2222-:22".into()));
        assert_eq!(
            check_new_forward("udp:127.0.0.1:5353-:53"),
            Ok("udp:127.0.0.1:5353-:53".into())
        );
    }

    #[test]
    fn a_bad_forward_is_explained_and_an_empty_one_gets_an_example() {
        let why = check_new_forward("tcp:2222").expect_err("no guest port");
        assert!(!why.is_empty());
        assert!(check_new_forward("sctp::1-:2").is_err());
        assert!(check_new_forward("  ").expect_err("empty").contains("tcp::2222-:22"));
    }

    #[test]
    fn the_guest_address_shows_once_leased_and_only_while_running() {
        let leased = user(&[], Some("10.0.2.15"));
        assert_eq!(summary_lines(&leased, true)[1], "Guest address: 10.0.2.15");
        assert!(summary_lines(&user(&[], None), true)[1].contains("no DHCP lease"));
        assert!(summary_lines(&leased, false)[1].contains("when it runs"));
        let none = NetSummary { mode: "none".into(), guest_ip: None, forwards: Vec::new() };
        assert_eq!(
            summary_lines(&none, true),
            vec!["No network card (net = none in its settings)"]
        );
    }
}
