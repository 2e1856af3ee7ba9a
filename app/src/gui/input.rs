//! Keyboard and pointer routing for the VM view. Every winit key event comes here first: host shortcuts
//! are consumed first; while the guest holds the keyboard, keys go to it as evdev codes and
//! egui never sees them; otherwise they go to egui. Every key the guest was told is down is
//! released when the capture ends (hotkey, focus loss, leaving the view). The pointer is
//! either a tablet (absolute positions over the image) or, for guests without a tablet
//! driver, a grabbed mouse that sends raw relative motion ([`PointerRouter`]).

use std::collections::HashSet;

use display::keymap::{evdev_from_physical, HeldKeys};
use display::pointer::RelativeMotion;
use display::InputEvent;
use egui::{Key, KeyboardShortcut, Modifiers};
use winit::keyboard::{KeyCode, ModifiersState, PhysicalKey};

/// Toggles fullscreen (host shortcut, also while captured).
pub const FULLSCREEN: KeyboardShortcut = KeyboardShortcut::new(Modifiers::NONE, Key::F11);
/// The key that releases a captured keyboard and pointer (VirtualBox's host key).
pub const RELEASE_KEY: KeyCode = KeyCode::ControlRight;
pub const RELEASE_KEY_NAME: &str = "Right Ctrl";

/// Whether the host is a Mac (its shortcuts use Cmd where others use Ctrl+Alt).
pub const MAC: bool = cfg!(target_os = "macos");

/// What a host shortcut does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCommand {
    ToggleFullscreen,
    TakeSnapshot,
    RestoreLatestSnapshot,
}

/// A host shortcut: egui's form (menus, uncaptured use) and the physical key that triggers
/// it while the guest has the keyboard.
#[derive(Debug, Clone, Copy)]
pub struct HostShortcut {
    pub shortcut: KeyboardShortcut,
    pub key: KeyCode,
    pub command: HostCommand,
}

/// The snapshot shortcuts' modifiers: Ctrl+Alt (Cmd+Shift on a Mac, where Ctrl+Alt is rare
/// and Cmd never reaches a guest anyway).
const fn snapshot_modifiers(mac: bool) -> Modifiers {
    if mac {
        Modifiers::MAC_CMD.plus(Modifiers::SHIFT)
    } else {
        Modifiers::CTRL.plus(Modifiers::ALT)
    }
}

const fn shortcuts_for(mac: bool) -> [HostShortcut; 3] {
    let m = snapshot_modifiers(mac);
    [
        HostShortcut {
            shortcut: KeyboardShortcut::new(m, Key::S),
            key: KeyCode::KeyS,
            command: HostCommand::TakeSnapshot,
        },
        HostShortcut {
            shortcut: KeyboardShortcut::new(m, Key::R),
            key: KeyCode::KeyR,
            command: HostCommand::RestoreLatestSnapshot,
        },
        HostShortcut {
            shortcut: FULLSCREEN,
            key: KeyCode::F11,
            command: HostCommand::ToggleFullscreen,
        },
    ]
}

const PC_SHORTCUTS: [HostShortcut; 3] = shortcuts_for(false);
const MAC_SHORTCUTS: [HostShortcut; 3] = shortcuts_for(true);

/// The host shortcuts of a Mac or another host, most specific (most modifiers) first, so
/// Ctrl+Alt+X is matched before Alt+X.
pub fn host_shortcuts(mac: bool) -> &'static [HostShortcut] {
    if mac {
        &MAC_SHORTCUTS
    } else {
        &PC_SHORTCUTS
    }
}

/// This host's shortcuts.
pub const HOST_SHORTCUTS: &[HostShortcut] = if MAC { &MAC_SHORTCUTS } else { &PC_SHORTCUTS };
/// Takes a snapshot of the open VM.
pub const TAKE_SNAPSHOT: KeyboardShortcut = HOST_SHORTCUTS[0].shortcut;
/// Restores the open VM's latest snapshot.
pub const RESTORE_LATEST: KeyboardShortcut = HOST_SHORTCUTS[1].shortcut;

/// Where a key event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRoute {
    /// Not captured: egui gets it (and may match host shortcuts itself).
    Egui,
    /// To the guest; egui must not see it.
    Guest(Vec<InputEvent>),
    /// A host shortcut fired while captured; the key-ups release every key the guest was
    /// told is down (the shortcut's own modifiers included), so that it never sees them stuck,
    /// not even in a snapshot taken now.
    Host(HostCommand, Vec<InputEvent>),
    /// The release key: the capture ended; these key-ups go to the guest.
    Released(Vec<InputEvent>),
    /// Nothing to do (an unmapped key, a repeat, the release of a consumed key).
    Drop,
}

/// The modifiers that matter for host shortcuts, as (alt, shift, ctrl, cmd). Elsewhere than
/// on a Mac egui's `command` is Ctrl and the Super key is the guest's.
fn modifier_set(m: Modifiers, mac: bool) -> (bool, bool, bool, bool) {
    if mac {
        (m.alt, m.shift, m.ctrl, m.mac_cmd || m.command)
    } else {
        (m.alt, m.shift, m.ctrl || m.command, false)
    }
}

fn modifiers_of(state: ModifiersState, mac: bool) -> Modifiers {
    let cmd = mac && state.super_key();
    Modifiers {
        alt: state.alt_key(),
        ctrl: state.control_key(),
        shift: state.shift_key(),
        mac_cmd: cmd,
        command: if mac { cmd } else { state.control_key() },
    }
}

/// The host command that a press of `code` with `state` held fires, if any.
pub fn host_command(code: KeyCode, state: ModifiersState, mac: bool) -> Option<HostCommand> {
    let held = modifier_set(modifiers_of(state, mac), mac);
    host_shortcuts(mac)
        .iter()
        .find(|s| s.key == code && modifier_set(s.shortcut.modifiers, mac) == held)
        .map(|s| s.command)
}

/// The keyboard capture state of one VM view.
pub struct KeyRouter {
    captured: bool,
    held: HeldKeys,
    modifiers: ModifiersState,
    /// Keys whose press was consumed by the host: their release is not the guest's.
    consumed: HashSet<KeyCode>,
    /// Match the Mac's shortcuts.
    mac: bool,
}

impl Default for KeyRouter {
    fn default() -> KeyRouter {
        KeyRouter::new()
    }
}

impl KeyRouter {
    pub fn new() -> KeyRouter {
        KeyRouter::for_host(MAC)
    }

    /// A router with a Mac's (`mac`) or another host's shortcuts.
    pub fn for_host(mac: bool) -> KeyRouter {
        KeyRouter {
            captured: false,
            held: HeldKeys::default(),
            modifiers: ModifiersState::empty(),
            consumed: HashSet::new(),
            mac,
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
            if let Some(command) = host_command(code, self.modifiers, self.mac) {
                self.consumed.insert(code);
                if repeat {
                    return KeyRoute::Drop;
                }
                // The modifiers still held physically: their releases find nothing held and
                // are dropped; the capture goes on.
                let ups = self
                    .held
                    .release_all()
                    .into_iter()
                    .map(|code| InputEvent::Key { code, down: false })
                    .collect();
                return KeyRoute::Host(command, ups);
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

/// How the guest's pointer follows the host's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointerMode {
    /// A tablet: the guest pointer is where the host pointer is over the image.
    #[default]
    Absolute,
    /// A mouse: while captured the host pointer is grabbed and hidden, and its raw motion
    /// moves the guest's pointer.
    Relative,
}

impl PointerMode {
    pub fn label(self) -> &'static str {
        match self {
            PointerMode::Absolute => "Pointer: absolute (tablet)",
            PointerMode::Relative => "Pointer: relative (grabbed)",
        }
    }
}

/// Where a host pointer motion goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MotionRoute {
    /// Not the guest's: egui gets it.
    Egui,
    /// To the guest; egui must not see it.
    Guest(Vec<InputEvent>),
    /// The guest's, but nothing to send (e.g. cursor positions while grabbed).
    Drop,
}

/// The pointer half of a VM view's capture: which motion goes to the guest, and how.
#[derive(Debug, Default)]
pub struct PointerRouter {
    mode: PointerMode,
    motion: RelativeMotion,
    /// Where the window keeps a grabbed pointer (physical pixels) when it can only confine
    /// it (X11, where winit also doubles raw motion while confined): motion is then measured
    /// from here and the window warps the pointer back. None: raw device motion counts.
    centre: Option<(f64, f64)>,
}

impl PointerRouter {
    pub fn new(mode: PointerMode) -> PointerRouter {
        PointerRouter { mode, motion: RelativeMotion::new(), centre: None }
    }

    pub fn mode(&self) -> PointerMode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: PointerMode) {
        self.mode = mode;
        self.motion.reset();
    }

    /// Measure grabbed motion from `centre` (physical pixels) instead of raw motion.
    pub fn set_centre(&mut self, centre: Option<(f64, f64)>) {
        self.centre = centre;
    }

    /// Whether the host pointer must be grabbed (confined, hidden).
    pub fn grabs(&self, captured: bool) -> bool {
        captured && self.mode == PointerMode::Relative
    }

    /// The host cursor moved to `pos` (physical pixels); `abs` is the tablet position under
    /// it (None off the image).
    pub fn cursor_moved(
        &mut self,
        captured: bool,
        pos: (f64, f64),
        abs: Option<(u16, u16)>,
    ) -> MotionRoute {
        match (captured, self.mode, abs) {
            (false, _, _) | (true, PointerMode::Absolute, None) => MotionRoute::Egui,
            (true, PointerMode::Absolute, Some((x, y))) => {
                MotionRoute::Guest(vec![InputEvent::PointerAbs { x, y }])
            }
            // Grabbed: the distance from the centre is the motion (the warp back to it is
            // none); with no centre, positions mean nothing and raw motion counts.
            (true, PointerMode::Relative, _) => match self.centre {
                Some((cx, cy)) => self.relative(pos.0 - cx, pos.1 - cy),
                None => MotionRoute::Drop,
            },
        }
    }

    /// Raw device motion (unaccelerated counts); only a grabbed pointer sends it.
    pub fn raw_motion(&mut self, captured: bool, dx: f64, dy: f64) -> Vec<InputEvent> {
        if !self.grabs(captured) || self.centre.is_some() {
            return Vec::new();
        }
        match self.relative(dx, dy) {
            MotionRoute::Guest(events) => events,
            _ => Vec::new(),
        }
    }

    fn relative(&mut self, dx: f64, dy: f64) -> MotionRoute {
        match self.motion.push(dx, dy) {
            Some((dx, dy)) => MotionRoute::Guest(vec![InputEvent::PointerRel { dx, dy }]),
            None => MotionRoute::Drop,
        }
    }

    /// Whether buttons and the wheel go to the guest: over the image, or anywhere while
    /// grabbed (the host pointer is hidden then, its position means nothing).
    pub fn takes_buttons(&self, captured: bool, over_image: bool) -> bool {
        captured && (over_image || self.mode == PointerMode::Relative)
    }

    /// The capture ended: leftover fractions of motion are not carried into the next one.
    pub fn release(&mut self) {
        self.motion.reset();
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
            KeyRoute::Host(HostCommand::ToggleFullscreen, Vec::new())
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
        for mac in [false, true] {
            for pair in host_shortcuts(mac).windows(2) {
                assert!(count(pair[0].shortcut.modifiers) >= count(pair[1].shortcut.modifiers));
            }
        }
    }

    const KEY_LEFTCTRL: u16 = 29;
    const KEY_LEFTALT: u16 = 56;

    #[test]
    fn snapshot_shortcuts_are_ctrl_alt_elsewhere_and_cmd_shift_on_a_mac() {
        let ctrl_alt = ModifiersState::CONTROL | ModifiersState::ALT;
        let cmd_shift = ModifiersState::SUPER | ModifiersState::SHIFT;
        let pc = |code, m| host_command(code, m, false);
        let mac = |code, m| host_command(code, m, true);
        assert_eq!(pc(KeyCode::KeyS, ctrl_alt), Some(HostCommand::TakeSnapshot));
        assert_eq!(pc(KeyCode::KeyR, ctrl_alt), Some(HostCommand::RestoreLatestSnapshot));
        assert_eq!(mac(KeyCode::KeyS, cmd_shift), Some(HostCommand::TakeSnapshot));
        assert_eq!(mac(KeyCode::KeyR, cmd_shift), Some(HostCommand::RestoreLatestSnapshot));
        // Each platform's combo is an ordinary key on the other.
        assert_eq!(pc(KeyCode::KeyS, cmd_shift), None);
        assert_eq!(mac(KeyCode::KeyS, ctrl_alt), None);
        // Partial or extra modifiers are the guest's (Ctrl+S saves in the guest's editor).
        assert_eq!(pc(KeyCode::KeyS, ModifiersState::CONTROL), None);
        assert_eq!(pc(KeyCode::KeyS, ctrl_alt | ModifiersState::SHIFT), None);
        assert_eq!(mac(KeyCode::KeyS, ModifiersState::SUPER), None);
        assert_eq!(pc(KeyCode::F11, ModifiersState::empty()), Some(HostCommand::ToggleFullscreen));
        assert_eq!(mac(KeyCode::F11, ModifiersState::empty()), Some(HostCommand::ToggleFullscreen));
    }

    #[test]
    fn the_menu_shows_the_platforms_snapshot_shortcut() {
        let pc = host_shortcuts(false)[0].shortcut;
        assert_eq!(pc.format(&egui::ModifierNames::NAMES, false), "Ctrl+Alt+S");
        let mac = host_shortcuts(true)[1].shortcut;
        assert_eq!(mac.format(&egui::ModifierNames::SYMBOLS, true), "⇧⌘R");
    }

    #[test]
    fn a_captured_snapshot_shortcut_is_not_sent_and_releases_the_guests_modifiers() {
        let mut r = KeyRouter::for_host(false);
        r.capture();
        // Ctrl and Alt reach the guest before anyone knows a shortcut is coming.
        let down = |code| KeyRoute::Guest(vec![InputEvent::Key { code, down: true }]);
        assert_eq!(r.key(code(KeyCode::ControlLeft), true, false), down(KEY_LEFTCTRL));
        r.set_modifiers(ModifiersState::CONTROL);
        assert_eq!(r.key(code(KeyCode::AltLeft), true, false), down(KEY_LEFTALT));
        r.set_modifiers(ModifiersState::CONTROL | ModifiersState::ALT);
        let KeyRoute::Host(cmd, mut ups) = r.key(code(KeyCode::KeyS), true, false) else {
            panic!("not a host shortcut")
        };
        assert_eq!(cmd, HostCommand::TakeSnapshot);
        ups.sort_by_key(|e| match e {
            InputEvent::Key { code, .. } => *code,
            _ => 0,
        });
        assert_eq!(
            ups,
            vec![
                InputEvent::Key { code: KEY_LEFTCTRL, down: false },
                InputEvent::Key { code: KEY_LEFTALT, down: false }
            ]
        );
        // Auto-repeat and the releases of S, Ctrl and Alt are nobody's business now.
        assert_eq!(r.key(code(KeyCode::KeyS), true, true), KeyRoute::Drop);
        assert_eq!(r.key(code(KeyCode::KeyS), false, false), KeyRoute::Drop);
        assert_eq!(r.key(code(KeyCode::AltLeft), false, false), KeyRoute::Drop);
        r.set_modifiers(ModifiersState::CONTROL);
        assert_eq!(r.key(code(KeyCode::ControlLeft), false, false), KeyRoute::Drop);
        r.set_modifiers(ModifiersState::empty());
        assert!(r.is_captured(), "the capture goes on");
        assert!(r.release().is_empty(), "nothing is left held");
        // Ctrl+Alt+S is a guest key on a Mac host.
        let mut mac = KeyRouter::for_host(true);
        mac.capture();
        mac.set_modifiers(ModifiersState::CONTROL | ModifiersState::ALT);
        assert!(matches!(mac.key(code(KeyCode::KeyS), true, false), KeyRoute::Guest(_)));
        mac.set_modifiers(ModifiersState::SUPER | ModifiersState::SHIFT);
        assert!(matches!(
            mac.key(code(KeyCode::KeyR), true, false),
            KeyRoute::Host(HostCommand::RestoreLatestSnapshot, _)
        ));
    }

    const AT: (f64, f64) = (300.0, 200.0);

    #[test]
    fn absolute_mode_sends_positions_over_the_image_only_while_captured() {
        let mut p = PointerRouter::new(PointerMode::Absolute);
        assert_eq!(p.cursor_moved(false, AT, Some((1, 2))), MotionRoute::Egui);
        assert_eq!(
            p.cursor_moved(true, AT, Some((1, 2))),
            MotionRoute::Guest(vec![InputEvent::PointerAbs { x: 1, y: 2 }])
        );
        assert_eq!(p.cursor_moved(true, AT, None), MotionRoute::Egui, "off the image");
        assert!(p.raw_motion(true, 5.0, 5.0).is_empty(), "no relative motion for a tablet");
        assert!(!p.grabs(true));
        assert!(!p.takes_buttons(true, false));
        assert!(p.takes_buttons(true, true));
    }

    #[test]
    fn relative_mode_sends_only_relative_motion_while_captured() {
        let mut p = PointerRouter::new(PointerMode::Relative);
        assert_eq!(p.cursor_moved(true, AT, Some((1, 2))), MotionRoute::Drop, "no PointerAbs");
        assert_eq!(p.cursor_moved(true, AT, None), MotionRoute::Drop);
        assert_eq!(p.raw_motion(true, 2.5, -1.0), vec![InputEvent::PointerRel { dx: 2, dy: -1 }]);
        // The half count left over is kept for the next motion.
        assert_eq!(p.raw_motion(true, 0.5, 0.0), vec![InputEvent::PointerRel { dx: 1, dy: 0 }]);
        assert!(p.grabs(true));
        assert!(p.takes_buttons(true, false), "buttons go to the guest wherever the pointer is");
        // Not captured: nothing is the guest's.
        assert!(!p.grabs(false));
        assert!(p.raw_motion(false, 10.0, 10.0).is_empty());
        assert_eq!(p.cursor_moved(false, AT, Some((1, 2))), MotionRoute::Egui);
        assert!(!p.takes_buttons(false, true));
    }

    #[test]
    fn a_recentred_pointer_sends_its_distance_from_the_centre_and_ignores_raw_motion() {
        let mut p = PointerRouter::new(PointerMode::Relative);
        p.set_centre(Some((500.0, 300.0)));
        assert!(p.raw_motion(true, 5.0, 5.0).is_empty(), "raw motion is doubled when confined");
        assert_eq!(
            p.cursor_moved(true, (485.0, 310.0), Some((1, 2))),
            MotionRoute::Guest(vec![InputEvent::PointerRel { dx: -15, dy: 10 }])
        );
        // The warp back to the centre is no motion.
        assert_eq!(p.cursor_moved(true, (500.0, 300.0), None), MotionRoute::Drop);
        assert_eq!(p.cursor_moved(false, (485.0, 310.0), None), MotionRoute::Egui);
    }

    #[test]
    fn releasing_drops_leftover_relative_motion() {
        let mut p = PointerRouter::new(PointerMode::Relative);
        assert!(p.raw_motion(true, 0.75, 0.0).is_empty());
        p.release();
        assert!(p.raw_motion(true, 0.5, 0.0).is_empty());
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
