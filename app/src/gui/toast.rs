//! Toasts: short notes in the window's bottom-right corner ("Snapshot 'X' taken in 420 ms")
//! that go away by themselves; errors stay until closed. Also the "Saving snapshot…"
//! indicator of an operation in flight.

use std::time::{Duration, Instant};

use egui::{Color32, RichText};

/// How long a note stays.
pub const NOTE_TTL: Duration = Duration::from_secs(3);
/// How many toasts show at once (the oldest go first).
const MAX_TOASTS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToastKind {
    Note,
    /// Stays until closed.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toast {
    pub kind: ToastKind,
    pub text: String,
    /// Causes under the text (errors).
    pub detail: Vec<String>,
    shown: Instant,
}

impl Toast {
    /// Whether it should be gone at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.kind == ToastKind::Note && now.saturating_duration_since(self.shown) >= NOTE_TTL
    }

    /// How long until it expires at `now` (None: never).
    fn left(&self, now: Instant) -> Option<Duration> {
        match self.kind {
            ToastKind::Note => {
                Some(NOTE_TTL.saturating_sub(now.saturating_duration_since(self.shown)))
            }
            ToastKind::Error => None,
        }
    }
}

/// The toasts on screen, oldest first.
#[derive(Debug, Default)]
pub struct Toasts {
    toasts: Vec<Toast>,
}

impl Toasts {
    pub fn note(&mut self, text: impl Into<String>, now: Instant) {
        self.push(Toast {
            kind: ToastKind::Note,
            text: text.into(),
            detail: Vec::new(),
            shown: now,
        });
    }

    /// An error: `chain` is its cause chain, outermost first.
    pub fn error(&mut self, text: impl Into<String>, chain: Vec<String>, now: Instant) {
        self.push(Toast { kind: ToastKind::Error, text: text.into(), detail: chain, shown: now });
    }

    fn push(&mut self, toast: Toast) {
        self.toasts.push(toast);
        if self.toasts.len() > MAX_TOASTS {
            self.toasts.remove(0);
        }
    }

    /// Drops the expired ones; how long until the next one expires.
    pub fn expire(&mut self, now: Instant) -> Option<Duration> {
        self.toasts.retain(|t| !t.expired(now));
        self.toasts.iter().filter_map(|t| t.left(now)).min()
    }

    pub fn toasts(&self) -> &[Toast] {
        &self.toasts
    }

    pub fn close(&mut self, index: usize) {
        if index < self.toasts.len() {
            self.toasts.remove(index);
        }
    }

    /// Draws the toasts and `busy` (an operation in flight, with a spinner) in the window's
    /// bottom-right corner, above `bottom_margin` points.
    pub fn ui(&mut self, ctx: &egui::Context, busy: Option<&str>, bottom_margin: f32) {
        let now = Instant::now();
        if let Some(left) = self.expire(now) {
            ctx.request_repaint_after(left);
        }
        if self.toasts.is_empty() && busy.is_none() {
            return;
        }
        let mut close = None;
        egui::Area::new(egui::Id::unique("hutch-toasts"))
            .anchor(egui::Align2::RIGHT_BOTTOM, egui::vec2(-12.0, -bottom_margin - 12.0))
            .order(egui::Order::Foreground)
            .interactable(true)
            .show(ctx, |ui| {
                ui.set_max_width(380.0);
                for (i, toast) in self.toasts.iter().enumerate() {
                    let fill = match toast.kind {
                        ToastKind::Note => Color32::from_rgb(40, 60, 45),
                        ToastKind::Error => Color32::from_rgb(90, 30, 30),
                    };
                    let frame = egui::Frame::popup(ui.style()).fill(fill);
                    let response = frame
                        .show(ui, |ui| {
                            ui.horizontal(|ui| {
                                ui.vertical(|ui| {
                                    ui.label(RichText::new(&toast.text).color(Color32::WHITE));
                                    for cause in &toast.detail {
                                        ui.label(
                                            RichText::new(cause).small().color(Color32::LIGHT_GRAY),
                                        );
                                    }
                                });
                                if toast.kind == ToastKind::Error && ui.small_button("×").clicked()
                                {
                                    close = Some(i);
                                }
                            });
                        })
                        .response
                        .interact(egui::Sense::click());
                    if response.clicked() {
                        close = Some(i);
                    }
                    ui.add_space(4.0);
                }
                if let Some(text) = busy {
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.horizontal(|ui| {
                            ui.spinner();
                            ui.label(text);
                        });
                    });
                }
            });
        if let Some(i) = close {
            self.close(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_expire_after_their_time_and_errors_stay() {
        let t0 = Instant::now();
        let mut toasts = Toasts::default();
        toasts.note("taken", t0);
        toasts.error("failed", vec!["No space left".into()], t0);
        assert_eq!(toasts.expire(t0 + Duration::from_secs(1)), Some(Duration::from_secs(2)));
        assert_eq!(toasts.toasts().len(), 2);
        assert_eq!(toasts.expire(t0 + NOTE_TTL), None, "nothing else expires");
        assert_eq!(toasts.toasts().len(), 1);
        assert_eq!(toasts.toasts()[0].kind, ToastKind::Error);
        toasts.expire(t0 + Duration::from_secs(3600));
        assert_eq!(toasts.toasts().len(), 1, "errors wait to be closed");
        toasts.close(0);
        assert!(toasts.toasts().is_empty());
    }

    #[test]
    fn the_next_expiry_is_the_soonest_note() {
        let t0 = Instant::now();
        let mut toasts = Toasts::default();
        toasts.note("first", t0);
        toasts.note("second", t0 + Duration::from_secs(2));
        assert_eq!(toasts.expire(t0 + Duration::from_secs(2)), Some(Duration::from_secs(1)));
        assert_eq!(toasts.expire(t0 + Duration::from_secs(3)), Some(Duration::from_secs(2)));
        assert_eq!(toasts.toasts()[0].text, "second");
    }

    #[test]
    fn only_the_newest_toasts_are_kept() {
        let t0 = Instant::now();
        let mut toasts = Toasts::default();
        for i in 0..MAX_TOASTS + 2 {
            toasts.error(format!("e{i}"), Vec::new(), t0);
        }
        assert_eq!(toasts.toasts().len(), MAX_TOASTS);
        assert_eq!(toasts.toasts()[0].text, "e2");
        toasts.close(99);
        assert_eq!(toasts.toasts().len(), MAX_TOASTS);
    }
}
