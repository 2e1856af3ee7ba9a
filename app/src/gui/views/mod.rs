//! The GUI's views, each an `impl GuiApp` over the state in `app.rs`: the library
//! ([`library`]), one VM ([`vm`]) and the modal dialogs ([`dialogs`]).

mod dialogs;
mod library;
mod vm;

pub(in crate::gui) use dialogs::{error_dialog, Dialog};
pub(in crate::gui) use vm::VmView;

/// `size` scaled into `avail`, aspect kept, centred.
pub(in crate::gui) fn fit_rect(avail: egui::Rect, size: [usize; 2]) -> egui::Rect {
    let (w, h) = (size[0].max(1) as f32, size[1].max(1) as f32);
    let scale = (avail.width() / w).min(avail.height() / h);
    egui::Rect::from_center_size(avail.center(), egui::vec2(w * scale, h * scale))
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
