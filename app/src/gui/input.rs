//! Keyboard routing for the VM view. Every winit key event comes here first: host shortcuts
//! are consumed first; while the guest holds the keyboard, keys go to it as evdev codes and
//! egui never sees them; otherwise they go to egui. Every key the guest was told is down is
//! released when the capture ends (hotkey, focus loss, leaving the view).

use std::collections::HashSet;

use display::keymap::{evdev_from_physical, HeldKeys};
use display::InputEvent;
use egui::{Key, KeyboardShortcut, Modifiers};
use winit::keyboard::{KeyCode, ModifiersState, PhysicalKey};

/// Toggles fullscreen (host shortcut, also while captured).
pub const FULLSCREEN: KeyboardShortcut = KeyboardShortcut::new(Modifiers::NONE, Key::F11);
/// The key that releases a captured keyboard and pointer (VirtualBox's host key).
pub const RELEASE_KEY: KeyCode = KeyCode::ControlRight;
pub const RELEASE_KEY_NAME: &str = "Right Ctrl";

/// What a host shortcut does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCommand {
    ToggleFullscreen,
}

/// A host shortcut: egui's form (menus, uncaptured use) and the physical key that triggers
/// it while the guest has the keyboard.
#[derive(Debug, Clone, Copy)]
pub struct HostShortcut {
    pub shortcut: KeyboardShortcut,
    pub key: KeyCode,
    pub command: HostCommand,
}

/// Most specific (most modifiers) first, so Ctrl+Alt+X is matched before Alt+X.
pub const HOST_SHORTCUTS: &[HostShortcut] = &[HostShortcut {
    shortcut: FULLSCREEN,
    key: KeyCode::F11,
    command: HostCommand::ToggleFullscreen,
}];

/// Where a key event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRoute {
    /// Not captured: egui gets it (and may match host shortcuts itself).
    Egui,
    /// To the guest; egui must not see it.
    Guest(Vec<InputEvent>),
    /// A host shortcut fired while captured.
    Host(HostCommand),
    /// The release key: the capture ended; these key-ups go to the guest.
    Released(Vec<InputEvent>),
    /// Nothing to do (an unmapped key, a repeat, the release of a consumed key).
    Drop,
}

fn modifiers_of(state: ModifiersState) -> Modifiers {
    Modifiers {
        alt: state.alt_key(),
        ctrl: state.control_key(),
        shift: state.shift_key(),
        mac_cmd: false,
        command: state.control_key(),
    }
}

fn same_modifiers(a: Modifiers, b: Modifiers) -> bool {
    (a.alt, a.ctrl || a.command, a.shift) == (b.alt, b.ctrl || b.command, b.shift)
}

/// The keyboard capture state of one VM view.
pub struct KeyRouter {
    captured: bool,
    held: HeldKeys,
    modifiers: ModifiersState,
    /// Keys whose press was consumed by the host: their release is not the guest's.
    consumed: HashSet<KeyCode>,
}

impl Default for KeyRouter {
    fn default() -> KeyRouter {
        KeyRouter::new()
    }
}

impl KeyRouter {
    pub fn new() -> KeyRouter {
        KeyRouter {
            captured: false,
            held: HeldKeys::default(),
            modifiers: ModifiersState::empty(),
            consumed: HashSet::new(),
        }
    }

    pub fn is_captured(&self) -> bool {
        self.captured
    }

    pub fn capture(&mut self) {
        self.captured = true;
    }

    /// Ends the capture; the key-ups for every key the guest holds.
    pub fn release(&mut self) -> Vec<InputEvent> {
        self.captured = false;
        self.held
            .release_all()
            .into_iter()
            .map(|code| InputEvent::Key { code, down: false })
            .collect()
    }

    pub fn set_modifiers(&mut self, state: ModifiersState) {
        self.modifiers = state;
    }

    pub fn key(&mut self, physical: PhysicalKey, pressed: bool, repeat: bool) -> KeyRoute {
        if !self.captured {
            return KeyRoute::Egui;
        }
        let PhysicalKey::Code(code) = physical else { return KeyRoute::Drop };
        if code == RELEASE_KEY {
            return if pressed { KeyRoute::Released(self.release()) } else { KeyRoute::Drop };
        }
        if !pressed && self.consumed.remove(&code) {
            return KeyRoute::Drop;
        }
        if pressed {
            let mods = modifiers_of(self.modifiers);
            if let Some(hit) = HOST_SHORTCUTS
                .iter()
                .find(|s| s.key == code && same_modifiers(s.shortcut.modifiers, mods))
            {
                self.consumed.insert(code);
                return if repeat { KeyRoute::Drop } else { KeyRoute::Host(hit.command) };
            }
        }
        // The guest repeats held keys itself.
        if repeat {
            return KeyRoute::Drop;
        }
        let Some(evdev) = evdev_from_physical(physical) else { return KeyRoute::Drop };
        // A press of a held key (repeat) or the release of a key the guest never saw
        // pressed (pressed before the capture) is not the guest's business.
        let news = if pressed { self.held.press(evdev) } else { self.held.release(evdev) };
        if !news {
            return KeyRoute::Drop;
        }
        KeyRoute::Guest(vec![InputEvent::Key { code: evdev, down: pressed }])
    }
}

/// The guest's name for a winit mouse button.
pub fn pointer_button(button: winit::event::MouseButton) -> Option<display::PointerButton> {
    use display::PointerButton as P;
    use winit::event::MouseButton as M;
    Some(match button {
        M::Left => P::Left,
        M::Right => P::Right,
        M::Middle => P::Middle,
        M::Back => P::Side,
        M::Forward => P::Extra,
        M::Other(_) => return None,
    })
}

/// Wheel clicks from a winit scroll delta (pixel deltas count 1 click per 40 px... rounded
/// toward zero, at least one click for any motion).
pub fn wheel_clicks(delta: winit::event::MouseScrollDelta) -> (i32, i32) {
    use winit::event::MouseScrollDelta as D;
    let (x, y) = match delta {
        D::LineDelta(x, y) => (f64::from(x), f64::from(y)),
        D::PixelDelta(p) => (p.x / 40.0, p.y / 40.0),
    };
    let clicks = |v: f64| {
        if v == 0.0 {
            0
        } else {
            (v.abs().max(1.0).round() as i32) * v.signum() as i32
        }
    };
    (clicks(x), clicks(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: u16 = 30;
    const KEY_LEFTSHIFT: u16 = 42;

    fn code(k: KeyCode) -> PhysicalKey {
        PhysicalKey::Code(k)
    }

    #[test]
    fn uncaptured_keys_go_to_egui() {
        let mut r = KeyRouter::new();
        assert_eq!(r.key(code(KeyCode::KeyA), true, false), KeyRoute::Egui);
        assert_eq!(r.key(RELEASE_KEY_CODE, true, false), KeyRoute::Egui);
    }

    const RELEASE_KEY_CODE: PhysicalKey = PhysicalKey::Code(RELEASE_KEY);

    #[test]
    fn captured_keys_go_to_the_guest_as_evdev_codes() {
        let mut r = KeyRouter::new();
        r.capture();
        assert_eq!(
            r.key(code(KeyCode::KeyA), true, false),
            KeyRoute::Guest(vec![InputEvent::Key { code: KEY_A, down: true }])
        );
        assert_eq!(r.key(code(KeyCode::KeyA), true, true), KeyRoute::Drop, "repeats");
        assert_eq!(
            r.key(code(KeyCode::KeyA), false, false),
            KeyRoute::Guest(vec![InputEvent::Key { code: KEY_A, down: false }])
        );
    }

    #[test]
    fn the_release_key_releases_every_held_key_and_is_not_sent() {
        let mut r = KeyRouter::new();
        r.capture();
        r.key(code(KeyCode::ShiftLeft), true, false);
        r.key(code(KeyCode::KeyA), true, false);
        let KeyRoute::Released(mut ups) = r.key(RELEASE_KEY_CODE, true, false) else {
            panic!("not released")
        };
        ups.sort_by_key(|e| match e {
            InputEvent::Key { code, .. } => *code,
            _ => 0,
        });
        assert_eq!(
            ups,
            vec![
                InputEvent::Key { code: KEY_A, down: false },
                InputEvent::Key { code: KEY_LEFTSHIFT, down: false }
            ]
        );
        assert!(!r.is_captured());
        assert_eq!(r.key(RELEASE_KEY_CODE, false, false), KeyRoute::Egui);
        // Nothing is left held for the next capture.
        r.capture();
        assert!(r.release().is_empty());
    }

    #[test]
    fn keys_pressed_before_the_capture_are_not_released_in_the_guest() {
        let mut r = KeyRouter::new();
        r.key(code(KeyCode::KeyA), true, false);
        r.capture();
        assert_eq!(r.key(code(KeyCode::KeyA), false, false), KeyRoute::Drop);
    }

    #[test]
    fn focus_loss_release_lets_go_of_held_keys() {
        let mut r = KeyRouter::new();
        r.capture();
        r.key(code(KeyCode::KeyA), true, false);
        assert_eq!(r.release(), vec![InputEvent::Key { code: KEY_A, down: false }]);
    }

    #[test]
    fn host_shortcuts_win_over_the_guest_while_captured() {
        let mut r = KeyRouter::new();
        r.capture();
        assert_eq!(
            r.key(code(KeyCode::F11), true, false),
            KeyRoute::Host(HostCommand::ToggleFullscreen)
        );
        assert_eq!(r.key(code(KeyCode::F11), false, false), KeyRoute::Drop);
        // With other modifiers held it is the guest's key.
        r.set_modifiers(ModifiersState::SHIFT);
        assert!(matches!(r.key(code(KeyCode::F11), true, false), KeyRoute::Guest(_)));
    }

    #[test]
    fn host_shortcuts_are_most_specific_first() {
        let count =
            |m: Modifiers| [m.alt, m.ctrl || m.command, m.shift].iter().filter(|b| **b).count();
        for pair in HOST_SHORTCUTS.windows(2) {
            assert!(count(pair[0].shortcut.modifiers) >= count(pair[1].shortcut.modifiers));
        }
    }

    #[test]
    fn wheel_deltas_become_clicks() {
        use winit::event::MouseScrollDelta as D;
        assert_eq!(wheel_clicks(D::LineDelta(0.0, 1.0)), (0, 1));
        assert_eq!(wheel_clicks(D::LineDelta(-2.0, -0.3)), (-2, -1));
        let px = D::PixelDelta(winit::dpi::PhysicalPosition::new(0.0, 80.0));
        assert_eq!(wheel_clicks(px), (0, 2));
    }
}
