//! Keyboard mapping: host physical keys → Linux evdev codes (what [`crate::InputEvent::Key`]
//! carries) → PS/2 scan code set 1 (what an i8042 with translation delivers to the guest).
//!
//! Keys are mapped by position, never by the character they produce: the guest applies its own
//! layout. The host side (`evdev_from_keycode`, `evdev_from_physical`) needs the crate feature
//! `winit`; the VM process only needs [`set1_scancode`] and the [`evdev`] codes.

use std::fmt;

use crate::PointerButton;

/// Linux input event codes (`include/uapi/linux/input-event-codes.h`).
pub mod evdev {
    pub const EV_SYN: u16 = 0x00;
    pub const EV_KEY: u16 = 0x01;
    pub const EV_REL: u16 = 0x02;
    pub const EV_ABS: u16 = 0x03;

    pub const SYN_REPORT: u16 = 0;

    pub const REL_X: u16 = 0x00;
    pub const REL_Y: u16 = 0x01;
    pub const REL_HWHEEL: u16 = 0x06;
    pub const REL_WHEEL: u16 = 0x08;

    pub const ABS_X: u16 = 0x00;
    pub const ABS_Y: u16 = 0x01;

    pub const KEY_RESERVED: u16 = 0;
    pub const KEY_ESC: u16 = 1;
    pub const KEY_1: u16 = 2;
    pub const KEY_2: u16 = 3;
    pub const KEY_3: u16 = 4;
    pub const KEY_4: u16 = 5;
    pub const KEY_5: u16 = 6;
    pub const KEY_6: u16 = 7;
    pub const KEY_7: u16 = 8;
    pub const KEY_8: u16 = 9;
    pub const KEY_9: u16 = 10;
    pub const KEY_0: u16 = 11;
    pub const KEY_MINUS: u16 = 12;
    pub const KEY_EQUAL: u16 = 13;
    pub const KEY_BACKSPACE: u16 = 14;
    pub const KEY_TAB: u16 = 15;
    pub const KEY_Q: u16 = 16;
    pub const KEY_W: u16 = 17;
    pub const KEY_E: u16 = 18;
    pub const KEY_R: u16 = 19;
    pub const KEY_T: u16 = 20;
    pub const KEY_Y: u16 = 21;
    pub const KEY_U: u16 = 22;
    pub const KEY_I: u16 = 23;
    pub const KEY_O: u16 = 24;
    pub const KEY_P: u16 = 25;
    pub const KEY_LEFTBRACE: u16 = 26;
    pub const KEY_RIGHTBRACE: u16 = 27;
    pub const KEY_ENTER: u16 = 28;
    pub const KEY_LEFTCTRL: u16 = 29;
    pub const KEY_A: u16 = 30;
    pub const KEY_S: u16 = 31;
    pub const KEY_D: u16 = 32;
    pub const KEY_F: u16 = 33;
    pub const KEY_G: u16 = 34;
    pub const KEY_H: u16 = 35;
    pub const KEY_J: u16 = 36;
    pub const KEY_K: u16 = 37;
    pub const KEY_L: u16 = 38;
    pub const KEY_SEMICOLON: u16 = 39;
    pub const KEY_APOSTROPHE: u16 = 40;
    pub const KEY_GRAVE: u16 = 41;
    pub const KEY_LEFTSHIFT: u16 = 42;
    pub const KEY_BACKSLASH: u16 = 43;
    pub const KEY_Z: u16 = 44;
    pub const KEY_X: u16 = 45;
    pub const KEY_C: u16 = 46;
    pub const KEY_V: u16 = 47;
    pub const KEY_B: u16 = 48;
    pub const KEY_N: u16 = 49;
    pub const KEY_M: u16 = 50;
    pub const KEY_COMMA: u16 = 51;
    pub const KEY_DOT: u16 = 52;
    pub const KEY_SLASH: u16 = 53;
    pub const KEY_RIGHTSHIFT: u16 = 54;
    pub const KEY_KPASTERISK: u16 = 55;
    pub const KEY_LEFTALT: u16 = 56;
    pub const KEY_SPACE: u16 = 57;
    pub const KEY_CAPSLOCK: u16 = 58;
    pub const KEY_F1: u16 = 59;
    pub const KEY_F2: u16 = 60;
    pub const KEY_F3: u16 = 61;
    pub const KEY_F4: u16 = 62;
    pub const KEY_F5: u16 = 63;
    pub const KEY_F6: u16 = 64;
    pub const KEY_F7: u16 = 65;
    pub const KEY_F8: u16 = 66;
    pub const KEY_F9: u16 = 67;
    pub const KEY_F10: u16 = 68;
    pub const KEY_NUMLOCK: u16 = 69;
    pub const KEY_SCROLLLOCK: u16 = 70;
    pub const KEY_KP7: u16 = 71;
    pub const KEY_KP8: u16 = 72;
    pub const KEY_KP9: u16 = 73;
    pub const KEY_KPMINUS: u16 = 74;
    pub const KEY_KP4: u16 = 75;
    pub const KEY_KP5: u16 = 76;
    pub const KEY_KP6: u16 = 77;
    pub const KEY_KPPLUS: u16 = 78;
    pub const KEY_KP1: u16 = 79;
    pub const KEY_KP2: u16 = 80;
    pub const KEY_KP3: u16 = 81;
    pub const KEY_KP0: u16 = 82;
    pub const KEY_KPDOT: u16 = 83;
    pub const KEY_ZENKAKUHANKAKU: u16 = 85;
    /// The ISO key between left Shift and Z.
    pub const KEY_102ND: u16 = 86;
    pub const KEY_F11: u16 = 87;
    pub const KEY_F12: u16 = 88;
    pub const KEY_RO: u16 = 89;
    pub const KEY_KATAKANA: u16 = 90;
    pub const KEY_HIRAGANA: u16 = 91;
    pub const KEY_HENKAN: u16 = 92;
    pub const KEY_KATAKANAHIRAGANA: u16 = 93;
    pub const KEY_MUHENKAN: u16 = 94;
    pub const KEY_KPJPCOMMA: u16 = 95;
    pub const KEY_KPENTER: u16 = 96;
    pub const KEY_RIGHTCTRL: u16 = 97;
    pub const KEY_KPSLASH: u16 = 98;
    /// PrintScreen.
    pub const KEY_SYSRQ: u16 = 99;
    pub const KEY_RIGHTALT: u16 = 100;
    pub const KEY_HOME: u16 = 102;
    pub const KEY_UP: u16 = 103;
    pub const KEY_PAGEUP: u16 = 104;
    pub const KEY_LEFT: u16 = 105;
    pub const KEY_RIGHT: u16 = 106;
    pub const KEY_END: u16 = 107;
    pub const KEY_DOWN: u16 = 108;
    pub const KEY_PAGEDOWN: u16 = 109;
    pub const KEY_INSERT: u16 = 110;
    pub const KEY_DELETE: u16 = 111;
    pub const KEY_MUTE: u16 = 113;
    pub const KEY_VOLUMEDOWN: u16 = 114;
    pub const KEY_VOLUMEUP: u16 = 115;
    pub const KEY_POWER: u16 = 116;
    pub const KEY_KPEQUAL: u16 = 117;
    pub const KEY_PAUSE: u16 = 119;
    pub const KEY_KPCOMMA: u16 = 121;
    pub const KEY_HANGEUL: u16 = 122;
    pub const KEY_HANJA: u16 = 123;
    pub const KEY_YEN: u16 = 124;
    /// Left Super / Windows / Command.
    pub const KEY_LEFTMETA: u16 = 125;
    pub const KEY_RIGHTMETA: u16 = 126;
    /// The context-menu key.
    pub const KEY_COMPOSE: u16 = 127;
    pub const KEY_STOP: u16 = 128;
    pub const KEY_AGAIN: u16 = 129;
    pub const KEY_PROPS: u16 = 130;
    pub const KEY_UNDO: u16 = 131;
    pub const KEY_FRONT: u16 = 132;
    pub const KEY_COPY: u16 = 133;
    pub const KEY_OPEN: u16 = 134;
    pub const KEY_PASTE: u16 = 135;
    pub const KEY_FIND: u16 = 136;
    pub const KEY_CUT: u16 = 137;
    pub const KEY_HELP: u16 = 138;
    pub const KEY_MENU: u16 = 139;
    pub const KEY_CALC: u16 = 140;
    pub const KEY_SLEEP: u16 = 142;
    pub const KEY_WAKEUP: u16 = 143;
    pub const KEY_MAIL: u16 = 155;
    pub const KEY_BOOKMARKS: u16 = 156;
    pub const KEY_COMPUTER: u16 = 157;
    pub const KEY_BACK: u16 = 158;
    pub const KEY_FORWARD: u16 = 159;
    pub const KEY_EJECTCD: u16 = 161;
    pub const KEY_NEXTSONG: u16 = 163;
    pub const KEY_PLAYPAUSE: u16 = 164;
    pub const KEY_PREVIOUSSONG: u16 = 165;
    pub const KEY_STOPCD: u16 = 166;
    pub const KEY_HOMEPAGE: u16 = 172;
    pub const KEY_REFRESH: u16 = 173;
    pub const KEY_KPLEFTPAREN: u16 = 179;
    pub const KEY_KPRIGHTPAREN: u16 = 180;
    pub const KEY_F13: u16 = 183;
    pub const KEY_F14: u16 = 184;
    pub const KEY_F15: u16 = 185;
    pub const KEY_F16: u16 = 186;
    pub const KEY_F17: u16 = 187;
    pub const KEY_F18: u16 = 188;
    pub const KEY_F19: u16 = 189;
    pub const KEY_F20: u16 = 190;
    pub const KEY_F21: u16 = 191;
    pub const KEY_F22: u16 = 192;
    pub const KEY_F23: u16 = 193;
    pub const KEY_F24: u16 = 194;
    pub const KEY_SEARCH: u16 = 217;
    pub const KEY_MEDIA: u16 = 226;
    pub const KEY_FN: u16 = 0x1d0;
    /// Largest key code.
    pub const KEY_MAX: u16 = 0x2ff;

    pub const BTN_LEFT: u16 = 0x110;
    pub const BTN_RIGHT: u16 = 0x111;
    pub const BTN_MIDDLE: u16 = 0x112;
    pub const BTN_SIDE: u16 = 0x113;
    pub const BTN_EXTRA: u16 = 0x114;
    pub const BTN_TOUCH: u16 = 0x14a;
}

use evdev::*;

/// The evdev button code for a pointer button.
pub fn evdev_button(button: PointerButton) -> u16 {
    match button {
        PointerButton::Left => BTN_LEFT,
        PointerButton::Right => BTN_RIGHT,
        PointerButton::Middle => BTN_MIDDLE,
        PointerButton::Side => BTN_SIDE,
        PointerButton::Extra => BTN_EXTRA,
    }
}

/// The evdev code of a host key by position (winit's `KeyCode` follows the W3C UI Events `code`
/// names, which are positions on a US/ISO keyboard). None for keys a PC keyboard doesn't have.
#[cfg(feature = "winit")]
pub fn evdev_from_keycode(code: winit::keyboard::KeyCode) -> Option<u16> {
    use winit::keyboard::KeyCode as K;
    Some(match code {
        K::Escape => KEY_ESC,
        K::Digit1 => KEY_1,
        K::Digit2 => KEY_2,
        K::Digit3 => KEY_3,
        K::Digit4 => KEY_4,
        K::Digit5 => KEY_5,
        K::Digit6 => KEY_6,
        K::Digit7 => KEY_7,
        K::Digit8 => KEY_8,
        K::Digit9 => KEY_9,
        K::Digit0 => KEY_0,
        K::Minus => KEY_MINUS,
        K::Equal => KEY_EQUAL,
        K::Backspace => KEY_BACKSPACE,
        K::Tab => KEY_TAB,
        K::KeyQ => KEY_Q,
        K::KeyW => KEY_W,
        K::KeyE => KEY_E,
        K::KeyR => KEY_R,
        K::KeyT => KEY_T,
        K::KeyY => KEY_Y,
        K::KeyU => KEY_U,
        K::KeyI => KEY_I,
        K::KeyO => KEY_O,
        K::KeyP => KEY_P,
        K::BracketLeft => KEY_LEFTBRACE,
        K::BracketRight => KEY_RIGHTBRACE,
        K::Enter => KEY_ENTER,
        K::ControlLeft => KEY_LEFTCTRL,
        K::KeyA => KEY_A,
        K::KeyS => KEY_S,
        K::KeyD => KEY_D,
        K::KeyF => KEY_F,
        K::KeyG => KEY_G,
        K::KeyH => KEY_H,
        K::KeyJ => KEY_J,
        K::KeyK => KEY_K,
        K::KeyL => KEY_L,
        K::Semicolon => KEY_SEMICOLON,
        K::Quote => KEY_APOSTROPHE,
        K::Backquote => KEY_GRAVE,
        K::ShiftLeft => KEY_LEFTSHIFT,
        K::Backslash => KEY_BACKSLASH,
        K::KeyZ => KEY_Z,
        K::KeyX => KEY_X,
        K::KeyC => KEY_C,
        K::KeyV => KEY_V,
        K::KeyB => KEY_B,
        K::KeyN => KEY_N,
        K::KeyM => KEY_M,
        K::Comma => KEY_COMMA,
        K::Period => KEY_DOT,
        K::Slash => KEY_SLASH,
        K::ShiftRight => KEY_RIGHTSHIFT,
        K::NumpadMultiply | K::NumpadStar => KEY_KPASTERISK,
        K::AltLeft => KEY_LEFTALT,
        K::Space => KEY_SPACE,
        K::CapsLock => KEY_CAPSLOCK,
        K::F1 => KEY_F1,
        K::F2 => KEY_F2,
        K::F3 => KEY_F3,
        K::F4 => KEY_F4,
        K::F5 => KEY_F5,
        K::F6 => KEY_F6,
        K::F7 => KEY_F7,
        K::F8 => KEY_F8,
        K::F9 => KEY_F9,
        K::F10 => KEY_F10,
        K::NumLock => KEY_NUMLOCK,
        K::ScrollLock => KEY_SCROLLLOCK,
        K::Numpad7 => KEY_KP7,
        K::Numpad8 => KEY_KP8,
        K::Numpad9 => KEY_KP9,
        K::NumpadSubtract => KEY_KPMINUS,
        K::Numpad4 => KEY_KP4,
        K::Numpad5 => KEY_KP5,
        K::Numpad6 => KEY_KP6,
        K::NumpadAdd => KEY_KPPLUS,
        K::Numpad1 => KEY_KP1,
        K::Numpad2 => KEY_KP2,
        K::Numpad3 => KEY_KP3,
        K::Numpad0 => KEY_KP0,
        K::NumpadDecimal => KEY_KPDOT,
        K::Lang5 => KEY_ZENKAKUHANKAKU,
        K::IntlBackslash => KEY_102ND,
        K::F11 => KEY_F11,
        K::F12 => KEY_F12,
        K::IntlRo => KEY_RO,
        K::Lang3 | K::Katakana => KEY_KATAKANA,
        K::Lang4 | K::Hiragana => KEY_HIRAGANA,
        K::Convert => KEY_HENKAN,
        K::KanaMode => KEY_KATAKANAHIRAGANA,
        K::NonConvert => KEY_MUHENKAN,
        K::NumpadEnter => KEY_KPENTER,
        K::ControlRight => KEY_RIGHTCTRL,
        K::NumpadDivide => KEY_KPSLASH,
        K::PrintScreen => KEY_SYSRQ,
        K::AltRight => KEY_RIGHTALT,
        K::Home => KEY_HOME,
        K::ArrowUp => KEY_UP,
        K::PageUp => KEY_PAGEUP,
        K::ArrowLeft => KEY_LEFT,
        K::ArrowRight => KEY_RIGHT,
        K::End => KEY_END,
        K::ArrowDown => KEY_DOWN,
        K::PageDown => KEY_PAGEDOWN,
        K::Insert => KEY_INSERT,
        K::Delete => KEY_DELETE,
        K::AudioVolumeMute => KEY_MUTE,
        K::AudioVolumeDown => KEY_VOLUMEDOWN,
        K::AudioVolumeUp => KEY_VOLUMEUP,
        K::Power => KEY_POWER,
        K::NumpadEqual => KEY_KPEQUAL,
        K::Pause => KEY_PAUSE,
        K::NumpadComma => KEY_KPCOMMA,
        K::Lang1 => KEY_HANGEUL,
        K::Lang2 => KEY_HANJA,
        K::IntlYen => KEY_YEN,
        // winit calls the W3C "MetaLeft/Right" keys Super; `Meta` is the legacy name for them.
        K::SuperLeft | K::Meta => KEY_LEFTMETA,
        K::SuperRight => KEY_RIGHTMETA,
        K::ContextMenu => KEY_COMPOSE,
        K::BrowserStop => KEY_STOP,
        K::Again => KEY_AGAIN,
        K::Props => KEY_PROPS,
        K::Undo => KEY_UNDO,
        K::Copy => KEY_COPY,
        K::Open => KEY_OPEN,
        K::Paste => KEY_PASTE,
        K::Find => KEY_FIND,
        K::Cut => KEY_CUT,
        K::Help => KEY_HELP,
        K::LaunchApp2 => KEY_CALC,
        K::Sleep => KEY_SLEEP,
        K::WakeUp => KEY_WAKEUP,
        K::LaunchMail => KEY_MAIL,
        K::BrowserFavorites => KEY_BOOKMARKS,
        K::LaunchApp1 => KEY_COMPUTER,
        K::BrowserBack => KEY_BACK,
        K::BrowserForward => KEY_FORWARD,
        K::Eject => KEY_EJECTCD,
        K::MediaTrackNext => KEY_NEXTSONG,
        K::MediaPlayPause => KEY_PLAYPAUSE,
        K::MediaTrackPrevious => KEY_PREVIOUSSONG,
        K::MediaStop => KEY_STOPCD,
        K::BrowserHome => KEY_HOMEPAGE,
        K::BrowserRefresh => KEY_REFRESH,
        K::NumpadParenLeft => KEY_KPLEFTPAREN,
        K::NumpadParenRight => KEY_KPRIGHTPAREN,
        K::F13 => KEY_F13,
        K::F14 => KEY_F14,
        K::F15 => KEY_F15,
        K::F16 => KEY_F16,
        K::F17 => KEY_F17,
        K::F18 => KEY_F18,
        K::F19 => KEY_F19,
        K::F20 => KEY_F20,
        K::F21 => KEY_F21,
        K::F22 => KEY_F22,
        K::F23 => KEY_F23,
        K::F24 => KEY_F24,
        K::BrowserSearch => KEY_SEARCH,
        K::MediaSelect => KEY_MEDIA,
        K::Fn => KEY_FN,
        _ => return None,
    })
}

/// The evdev code of a host key event's physical key.
///
/// Keys winit can't name arrive as `Unidentified(NativeKeyCode::Xkb(n))` on Linux (X11 and
/// Wayland). winit 0.30 has already taken the X keycode's offset of 8 off by then (its xkb
/// `raw_keycode_to_physicalkey` passes `keycode - 8` through), so `n` is the evdev code itself.
#[cfg(feature = "winit")]
pub fn evdev_from_physical(key: winit::keyboard::PhysicalKey) -> Option<u16> {
    use winit::keyboard::{NativeKeyCode, PhysicalKey};
    match key {
        PhysicalKey::Code(code) => evdev_from_keycode(code),
        PhysicalKey::Unidentified(NativeKeyCode::Xkb(n)) => evdev_from_native_xkb(n),
        PhysicalKey::Unidentified(_) => None,
    }
}

/// The evdev code behind winit's `NativeKeyCode::Xkb(n)` on Linux (see `evdev_from_physical`).
pub fn evdev_from_native_xkb(n: u32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&code| code != KEY_RESERVED && code <= KEY_MAX)
}

/// The X11/xkb keycode of an evdev key (X keycodes are evdev codes offset by 8).
pub fn xkb_keycode(code: u16) -> u32 {
    u32::from(code) + 8
}

/// A key's scan-code bytes for one press or release: at most 6 bytes (Pause), no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scancodes {
    bytes: [u8; 6],
    len: u8,
}

impl Scancodes {
    /// Largest sequence a key sends (Pause).
    pub const CAPACITY: usize = 6;

    fn from_slice(bytes: &[u8]) -> Self {
        debug_assert!(bytes.len() <= Self::CAPACITY);
        let mut out = Self::default();
        for &b in bytes.iter().take(Self::CAPACITY) {
            out.bytes[usize::from(out.len)] = b;
            out.len += 1;
        }
        out
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True for a key that sends nothing on this transition (Pause's release).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Scancodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scancodes(")?;
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            write!(f, "{b:02X}")?;
        }
        write!(f, ")")
    }
}

impl std::ops::Deref for Scancodes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

const E0: u8 = 0xe0;
/// Break codes are make codes with this bit set.
const BREAK: u8 = 0x80;

/// A key's set-1 make code: (needs the E0 prefix, code). Values follow the "XT KBD" column of
/// QEMU's keycodemapdb, i.e. what Linux's atkbd maps back to these evdev codes.
fn set1_make(code: u16) -> Option<(bool, u8)> {
    let plain = |c: u8| Some((false, c));
    let extended = |c: u8| Some((true, c));
    match code {
        // Escape ... F10, NumLock, ScrollLock, the keypad and F11/F12: the evdev code *is* the
        // XT scan code (evdev's first 88 codes were laid out after the XT keyboard).
        KEY_ESC..=KEY_KPDOT | KEY_102ND | KEY_F11 | KEY_F12 => plain(code as u8),
        KEY_ZENKAKUHANKAKU => plain(0x76),
        KEY_RO => plain(0x73),
        KEY_KATAKANA => plain(0x78),
        KEY_HIRAGANA => plain(0x77),
        KEY_HENKAN => plain(0x79),
        KEY_KATAKANAHIRAGANA => plain(0x70),
        KEY_MUHENKAN => plain(0x7b),
        KEY_KPJPCOMMA => plain(0x5c),
        KEY_KPENTER => extended(0x1c),
        KEY_RIGHTCTRL => extended(0x1d),
        KEY_KPSLASH => extended(0x35),
        KEY_RIGHTALT => extended(0x38),
        KEY_HOME => extended(0x47),
        KEY_UP => extended(0x48),
        KEY_PAGEUP => extended(0x49),
        KEY_LEFT => extended(0x4b),
        KEY_RIGHT => extended(0x4d),
        KEY_END => extended(0x4f),
        KEY_DOWN => extended(0x50),
        KEY_PAGEDOWN => extended(0x51),
        KEY_INSERT => extended(0x52),
        KEY_DELETE => extended(0x53),
        KEY_MUTE => extended(0x20),
        KEY_VOLUMEDOWN => extended(0x2e),
        KEY_VOLUMEUP => extended(0x30),
        KEY_POWER => extended(0x5e),
        KEY_KPEQUAL => plain(0x59),
        KEY_KPCOMMA => plain(0x7e),
        KEY_YEN => plain(0x7d),
        KEY_LEFTMETA => extended(0x5b),
        KEY_RIGHTMETA => extended(0x5c),
        KEY_COMPOSE => extended(0x5d),
        KEY_STOP => extended(0x68),
        KEY_AGAIN => extended(0x05),
        KEY_PROPS => extended(0x06),
        KEY_UNDO => extended(0x07),
        KEY_COPY => extended(0x78),
        KEY_OPEN => plain(0x64),
        KEY_PASTE => plain(0x65),
        KEY_FIND => extended(0x41),
        KEY_CUT => extended(0x3c),
        KEY_HELP => extended(0x75),
        KEY_CALC => extended(0x21),
        KEY_SLEEP => extended(0x5f),
        KEY_WAKEUP => extended(0x63),
        KEY_MAIL => extended(0x6c),
        KEY_BOOKMARKS => extended(0x66),
        KEY_COMPUTER => extended(0x6b),
        KEY_BACK => extended(0x6a),
        KEY_FORWARD => extended(0x69),
        KEY_EJECTCD => plain(0x6c),
        KEY_NEXTSONG => extended(0x19),
        KEY_PLAYPAUSE => extended(0x22),
        KEY_PREVIOUSSONG => extended(0x10),
        KEY_STOPCD => extended(0x24),
        KEY_HOMEPAGE => extended(0x32),
        KEY_REFRESH => extended(0x67),
        KEY_KPLEFTPAREN => extended(0x76),
        KEY_KPRIGHTPAREN => extended(0x7b),
        KEY_F13 => plain(0x5d),
        KEY_F14 => plain(0x5e),
        KEY_F15 => plain(0x5f),
        KEY_F16 => plain(0x55),
        KEY_F17 => extended(0x03),
        KEY_F18 => extended(0x77),
        KEY_F19 => extended(0x04),
        KEY_F20 => plain(0x5a),
        KEY_F21 => plain(0x74),
        KEY_F22 => extended(0x79),
        KEY_F23 => plain(0x6d),
        KEY_F24 => plain(0x6f),
        KEY_SEARCH => extended(0x65),
        KEY_MEDIA => extended(0x6d),
        _ => None,
    }
}

/// The PS/2 scan code set 1 bytes for pressing (`down`) or releasing evdev key `code`, as an
/// i8042 with translation on hands them to the guest (Linux's atkbd reads them back into the same
/// evdev code). None for keys a PC keyboard can't send.
///
/// Pause sends its whole sequence on press and nothing (an empty sequence) on release, like a
/// real keyboard. Hangeul and Hanja are single bytes with no release either (atkbd
/// reports the release itself).
pub fn set1_scancode(code: u16, down: bool) -> Option<Scancodes> {
    let bytes = match (code, down) {
        // With no modifier held a real keyboard wraps PrintScreen in a fake left Shift.
        (KEY_SYSRQ, true) => Scancodes::from_slice(&[E0, 0x2a, E0, 0x37]),
        (KEY_SYSRQ, false) => Scancodes::from_slice(&[E0, 0xb7, E0, 0xaa]),
        (KEY_PAUSE, true) => Scancodes::from_slice(&[0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5]),
        (KEY_PAUSE, false) => Scancodes::default(),
        // Korean keyboards send one byte on press only; atkbd synthesizes the release.
        (KEY_HANGEUL, true) => Scancodes::from_slice(&[0xf2]),
        (KEY_HANJA, true) => Scancodes::from_slice(&[0xf1]),
        (KEY_HANGEUL | KEY_HANJA, false) => Scancodes::default(),
        _ => {
            let (extended, make) = set1_make(code)?;
            let byte = if down { make } else { make | BREAK };
            if extended {
                Scancodes::from_slice(&[E0, byte])
            } else {
                Scancodes::from_slice(&[byte])
            }
        }
    };
    Some(bytes)
}

/// The keys the guest currently sees as held, so focus loss can release them all and host
/// auto-repeat doesn't press a key twice.
///
/// Auto-repeat: [`press`](Self::press) of a key already held returns false and the GUI sends
/// nothing; the guest runs its own typematic repeat for a held key, as with a real keyboard.
/// Codes above [`evdev::KEY_MAX`] are never held (press returns false).
#[derive(Clone, PartialEq, Eq)]
pub struct HeldKeys {
    bits: [u64; HeldKeys::WORDS],
}

impl HeldKeys {
    const WORDS: usize = (KEY_MAX as usize + 1).div_ceil(64);

    pub fn new() -> Self {
        Self { bits: [0; Self::WORDS] }
    }

    fn slot(code: u16) -> Option<(usize, u64)> {
        (code <= KEY_MAX).then(|| (usize::from(code) / 64, 1u64 << (code % 64)))
    }

    /// Marks `code` held. False if it already was (send nothing) or isn't a key code.
    pub fn press(&mut self, code: u16) -> bool {
        let Some((word, bit)) = Self::slot(code) else {
            return false;
        };
        let was_held = self.bits[word] & bit != 0;
        self.bits[word] |= bit;
        !was_held
    }

    /// Marks `code` released. False if it wasn't held (send nothing: the guest never saw the
    /// press, e.g. it happened before the window had focus).
    pub fn release(&mut self, code: u16) -> bool {
        let Some((word, bit)) = Self::slot(code) else {
            return false;
        };
        let was_held = self.bits[word] & bit != 0;
        self.bits[word] &= !bit;
        was_held
    }

    pub fn is_held(&self, code: u16) -> bool {
        Self::slot(code).is_some_and(|(word, bit)| self.bits[word] & bit != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// The held keys in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=KEY_MAX).filter(|&code| self.is_held(code))
    }

    /// Forgets every held key and returns them (ascending) so the caller sends a release for
    /// each, e.g. when the window loses focus mid-chord.
    pub fn release_all(&mut self) -> Vec<u16> {
        let held: Vec<u16> = self.iter().collect();
        self.bits = [0; Self::WORDS];
        held
    }
}

impl Default for HeldKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HeldKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set1(code: u16, down: bool) -> Vec<u8> {
        set1_scancode(code, down)
            .unwrap_or_else(|| panic!("no set-1 code for evdev {code}"))
            .to_vec()
    }

    /// Every key of a US 104-key keyboard plus the ISO/JIS extras, as evdev codes.
    #[rustfmt::skip]
    const PC_KEYS: &[u16] = &[
        KEY_ESC, KEY_1, KEY_2, KEY_3, KEY_4, KEY_5, KEY_6, KEY_7, KEY_8, KEY_9, KEY_0,
        KEY_MINUS, KEY_EQUAL, KEY_BACKSPACE, KEY_TAB, KEY_Q, KEY_W, KEY_E, KEY_R, KEY_T, KEY_Y,
        KEY_U, KEY_I, KEY_O, KEY_P, KEY_LEFTBRACE, KEY_RIGHTBRACE, KEY_ENTER, KEY_LEFTCTRL,
        KEY_A, KEY_S, KEY_D, KEY_F, KEY_G, KEY_H, KEY_J, KEY_K, KEY_L, KEY_SEMICOLON,
        KEY_APOSTROPHE, KEY_GRAVE, KEY_LEFTSHIFT, KEY_BACKSLASH, KEY_Z, KEY_X, KEY_C, KEY_V,
        KEY_B, KEY_N, KEY_M, KEY_COMMA, KEY_DOT, KEY_SLASH, KEY_RIGHTSHIFT, KEY_KPASTERISK,
        KEY_LEFTALT, KEY_SPACE, KEY_CAPSLOCK, KEY_F1, KEY_F2, KEY_F3, KEY_F4, KEY_F5, KEY_F6,
        KEY_F7, KEY_F8, KEY_F9, KEY_F10, KEY_NUMLOCK, KEY_SCROLLLOCK, KEY_KP7, KEY_KP8, KEY_KP9,
        KEY_KPMINUS, KEY_KP4, KEY_KP5, KEY_KP6, KEY_KPPLUS, KEY_KP1, KEY_KP2, KEY_KP3, KEY_KP0,
        KEY_KPDOT, KEY_102ND, KEY_F11, KEY_F12, KEY_RO, KEY_KPENTER, KEY_RIGHTCTRL, KEY_KPSLASH,
        KEY_SYSRQ, KEY_RIGHTALT, KEY_HOME, KEY_UP, KEY_PAGEUP, KEY_LEFT, KEY_RIGHT, KEY_END,
        KEY_DOWN, KEY_PAGEDOWN, KEY_INSERT, KEY_DELETE, KEY_PAUSE, KEY_YEN, KEY_LEFTMETA,
        KEY_RIGHTMETA, KEY_COMPOSE, KEY_F13, KEY_F14, KEY_F15, KEY_F16, KEY_F17, KEY_F18,
        KEY_F19, KEY_F20, KEY_F21, KEY_F22, KEY_F23, KEY_F24, KEY_MUTE, KEY_VOLUMEDOWN,
        KEY_VOLUMEUP, KEY_PLAYPAUSE, KEY_NEXTSONG, KEY_PREVIOUSSONG, KEY_STOPCD,
    ];

    #[test]
    fn well_known_set1_codes() {
        assert_eq!(set1(KEY_A, true), [0x1e]);
        assert_eq!(set1(KEY_A, false), [0x9e]);
        assert_eq!(set1(KEY_ESC, true), [0x01]);
        assert_eq!(set1(KEY_ENTER, true), [0x1c]);
        assert_eq!(set1(KEY_SPACE, true), [0x39]);
        assert_eq!(set1(KEY_LEFTCTRL, true), [0x1d]);
        assert_eq!(set1(KEY_RIGHTCTRL, true), [0xe0, 0x1d]);
        assert_eq!(set1(KEY_RIGHTCTRL, false), [0xe0, 0x9d]);
        assert_eq!(set1(KEY_LEFTALT, true), [0x38]);
        assert_eq!(set1(KEY_RIGHTALT, true), [0xe0, 0x38]);
        assert_eq!(set1(KEY_LEFTSHIFT, true), [0x2a]);
        assert_eq!(set1(KEY_RIGHTSHIFT, true), [0x36]);
        assert_eq!(set1(KEY_LEFTMETA, true), [0xe0, 0x5b]);
        assert_eq!(set1(KEY_RIGHTMETA, true), [0xe0, 0x5c]);
        assert_eq!(set1(KEY_COMPOSE, true), [0xe0, 0x5d]);
        assert_eq!(set1(KEY_KPENTER, true), [0xe0, 0x1c]);
        assert_eq!(set1(KEY_KPSLASH, true), [0xe0, 0x35]);
        assert_eq!(set1(KEY_KPASTERISK, true), [0x37]);
        assert_eq!(set1(KEY_UP, true), [0xe0, 0x48]);
        assert_eq!(set1(KEY_DOWN, true), [0xe0, 0x50]);
        assert_eq!(set1(KEY_LEFT, true), [0xe0, 0x4b]);
        assert_eq!(set1(KEY_RIGHT, true), [0xe0, 0x4d]);
        assert_eq!(set1(KEY_RIGHT, false), [0xe0, 0xcd]);
        assert_eq!(set1(KEY_INSERT, true), [0xe0, 0x52]);
        assert_eq!(set1(KEY_DELETE, true), [0xe0, 0x53]);
        assert_eq!(set1(KEY_HOME, true), [0xe0, 0x47]);
        assert_eq!(set1(KEY_END, true), [0xe0, 0x4f]);
        assert_eq!(set1(KEY_PAGEUP, true), [0xe0, 0x49]);
        assert_eq!(set1(KEY_PAGEDOWN, true), [0xe0, 0x51]);
        assert_eq!(set1(KEY_F1, true), [0x3b]);
        assert_eq!(set1(KEY_F10, true), [0x44]);
        assert_eq!(set1(KEY_F11, true), [0x57]);
        assert_eq!(set1(KEY_F12, true), [0x58]);
        assert_eq!(set1(KEY_GRAVE, true), [0x29]);
        assert_eq!(set1(KEY_102ND, true), [0x56]);
        assert_eq!(set1(KEY_KPDOT, true), [0x53]);
        assert_eq!(set1(KEY_MUTE, true), [0xe0, 0x20]);
        assert_eq!(set1(KEY_VOLUMEUP, false), [0xe0, 0xb0]);
        assert_eq!(set1(KEY_PLAYPAUSE, true), [0xe0, 0x22]);
    }

    #[test]
    fn print_screen_is_wrapped_in_a_fake_shift() {
        assert_eq!(set1(KEY_SYSRQ, true), [0xe0, 0x2a, 0xe0, 0x37]);
        assert_eq!(set1(KEY_SYSRQ, false), [0xe0, 0xb7, 0xe0, 0xaa]);
    }

    #[test]
    fn pause_sends_everything_on_press_and_nothing_on_release() {
        assert_eq!(set1(KEY_PAUSE, true), [0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5]);
        let release = set1_scancode(KEY_PAUSE, false).expect("pause release");
        assert!(release.is_empty());
    }

    #[test]
    fn korean_keys_send_one_byte_and_no_release() {
        assert_eq!(set1(KEY_HANGEUL, true), [0xf2]);
        assert_eq!(set1(KEY_HANJA, true), [0xf1]);
        assert!(set1(KEY_HANGEUL, false).is_empty());
        assert!(set1(KEY_HANJA, false).is_empty());
    }

    #[test]
    fn break_codes_are_make_codes_with_the_top_bit() {
        for &code in PC_KEYS {
            if code == KEY_SYSRQ || code == KEY_PAUSE {
                continue;
            }
            let make = set1(code, true);
            let brk = set1(code, false);
            assert_eq!(make.len(), brk.len(), "evdev {code}");
            let last = make.len() - 1;
            assert_eq!(make[..last], brk[..last], "evdev {code}");
            assert_eq!(make[last] & BREAK, 0, "evdev {code} make has the break bit");
            assert_eq!(make[last] | BREAK, brk[last], "evdev {code}");
        }
    }

    #[test]
    fn every_pc_key_has_its_own_make_code() {
        let mut seen = std::collections::HashMap::new();
        for &code in PC_KEYS {
            let make = set1(code, true);
            if let Some(other) = seen.insert(make.clone(), code) {
                panic!("evdev {code} and {other} both send {make:02X?}");
            }
        }
    }

    #[test]
    fn no_two_evdev_codes_send_the_same_make_code() {
        let mut seen = std::collections::HashMap::new();
        for code in 0..=KEY_MAX {
            let Some(make) = set1_scancode(code, true) else {
                continue;
            };
            if let Some(other) = seen.insert(make.to_vec(), code) {
                panic!("evdev {code} and {other} both send {make:?}");
            }
        }
        assert!(seen.len() > 150, "only {} keys have scan codes", seen.len());
    }

    #[test]
    fn keys_a_pc_keyboard_lacks_have_no_scan_code() {
        assert_eq!(set1_scancode(KEY_RESERVED, true), None);
        assert_eq!(set1_scancode(KEY_FN, true), None);
        assert_eq!(set1_scancode(BTN_LEFT, true), None);
        assert_eq!(set1_scancode(u16::MAX, false), None);
    }

    #[test]
    fn scancodes_debug_is_hex_bytes() {
        let codes = set1_scancode(KEY_RIGHTCTRL, false).expect("right ctrl");
        assert_eq!(format!("{codes:?}"), "Scancodes(E0 9D)");
        assert_eq!(codes.len(), 2);
    }

    #[test]
    fn evdev_constants_match_input_event_codes() {
        assert_eq!(KEY_A, 30);
        assert_eq!(KEY_ENTER, 28);
        assert_eq!(KEY_F11, 87);
        assert_eq!(KEY_SYSRQ, 99);
        assert_eq!(KEY_PAUSE, 119);
        assert_eq!(KEY_LEFTMETA, 125);
        assert_eq!(KEY_COMPOSE, 127);
        assert_eq!(KEY_F24, 194);
        assert_eq!(BTN_LEFT, 0x110);
        assert_eq!(BTN_TOUCH, 0x14a);
        assert_eq!(REL_WHEEL, 8);
        assert_eq!(REL_HWHEEL, 6);
    }

    #[test]
    fn pointer_buttons_map_to_btn_codes() {
        assert_eq!(evdev_button(PointerButton::Left), BTN_LEFT);
        assert_eq!(evdev_button(PointerButton::Right), BTN_RIGHT);
        assert_eq!(evdev_button(PointerButton::Middle), BTN_MIDDLE);
        assert_eq!(evdev_button(PointerButton::Side), BTN_SIDE);
        assert_eq!(evdev_button(PointerButton::Extra), BTN_EXTRA);
    }

    #[test]
    fn held_key_is_pressed_once_and_released_once() {
        let mut held = HeldKeys::new();
        assert!(held.is_empty());
        assert!(held.press(KEY_A));
        assert!(!held.press(KEY_A), "auto-repeat must not press again");
        assert!(held.is_held(KEY_A));
        assert!(held.release(KEY_A));
        assert!(!held.release(KEY_A));
        assert!(!held.is_held(KEY_A));
        assert!(held.is_empty());
    }

    #[test]
    fn release_all_returns_every_held_key_and_clears() {
        let mut held = HeldKeys::new();
        for code in [KEY_RIGHTMETA, KEY_LEFTCTRL, KEY_A, KEY_MAX] {
            held.press(code);
        }
        held.press(KEY_B);
        held.release(KEY_B);
        assert_eq!(held.release_all(), [KEY_LEFTCTRL, KEY_A, KEY_RIGHTMETA, KEY_MAX]);
        assert!(held.is_empty());
        assert!(held.release_all().is_empty());
    }

    #[test]
    fn out_of_range_codes_are_never_held() {
        let mut held = HeldKeys::new();
        assert!(!held.press(KEY_MAX + 1));
        assert!(!held.is_held(KEY_MAX + 1));
        assert!(!held.release(u16::MAX));
        assert!(held.is_empty());
    }

    #[test]
    fn xkb_native_codes_are_evdev_codes() {
        // KEY_STOP: a key winit 0.30 doesn't name on Linux.
        assert_eq!(evdev_from_native_xkb(128), Some(KEY_STOP));
        assert_eq!(evdev_from_native_xkb(0), None);
        assert_eq!(evdev_from_native_xkb(u32::from(KEY_MAX) + 1), None);
        assert_eq!(xkb_keycode(KEY_A), 38);
    }

    #[cfg(feature = "winit")]
    mod host {
        use super::*;
        use winit::keyboard::{KeyCode as K, NativeKeyCode, PhysicalKey};

        /// A US 104-key keyboard plus the ISO and JIS extras, by winit name.
        #[rustfmt::skip]
        const US_ISO_KEYS: &[K] = &[
            K::Backquote, K::Digit1, K::Digit2, K::Digit3, K::Digit4, K::Digit5, K::Digit6,
            K::Digit7, K::Digit8, K::Digit9, K::Digit0, K::Minus, K::Equal, K::Backspace,
            K::Tab, K::KeyQ, K::KeyW, K::KeyE, K::KeyR, K::KeyT, K::KeyY, K::KeyU, K::KeyI,
            K::KeyO, K::KeyP, K::BracketLeft, K::BracketRight, K::Backslash, K::CapsLock,
            K::KeyA, K::KeyS, K::KeyD, K::KeyF, K::KeyG, K::KeyH, K::KeyJ, K::KeyK, K::KeyL,
            K::Semicolon, K::Quote, K::Enter, K::ShiftLeft, K::IntlBackslash, K::KeyZ, K::KeyX,
            K::KeyC, K::KeyV, K::KeyB, K::KeyN, K::KeyM, K::Comma, K::Period, K::Slash,
            K::IntlRo, K::IntlYen, K::ShiftRight, K::ControlLeft, K::SuperLeft, K::AltLeft,
            K::Space, K::AltRight, K::SuperRight, K::ContextMenu, K::ControlRight, K::Escape,
            K::F1, K::F2, K::F3, K::F4, K::F5, K::F6, K::F7, K::F8, K::F9, K::F10, K::F11,
            K::F12, K::F13, K::F14, K::F15, K::F16, K::F17, K::F18, K::F19, K::F20, K::F21,
            K::F22, K::F23, K::F24, K::PrintScreen, K::ScrollLock, K::Pause, K::Insert,
            K::Home, K::PageUp, K::Delete, K::End, K::PageDown, K::ArrowUp, K::ArrowLeft,
            K::ArrowDown, K::ArrowRight, K::NumLock, K::NumpadDivide, K::NumpadMultiply,
            K::NumpadSubtract, K::Numpad7, K::Numpad8, K::Numpad9, K::NumpadAdd, K::Numpad4,
            K::Numpad5, K::Numpad6, K::Numpad1, K::Numpad2, K::Numpad3, K::NumpadEnter,
            K::Numpad0, K::NumpadDecimal, K::AudioVolumeMute, K::AudioVolumeDown,
            K::AudioVolumeUp, K::MediaPlayPause, K::MediaTrackNext, K::MediaTrackPrevious,
            K::MediaStop,
        ];

        fn ev(code: K) -> u16 {
            evdev_from_keycode(code).unwrap_or_else(|| panic!("{code:?} has no evdev code"))
        }

        #[test]
        fn every_us_and_iso_key_maps_to_a_distinct_evdev_code_with_a_scan_code() {
            let mut seen = std::collections::HashMap::new();
            for &key in US_ISO_KEYS {
                let code = ev(key);
                if let Some(other) = seen.insert(code, key) {
                    panic!("{key:?} and {other:?} both map to evdev {code}");
                }
                let make = set1_scancode(code, true);
                assert!(make.is_some_and(|m| !m.is_empty()), "{key:?} has no make code");
                assert!(set1_scancode(code, false).is_some(), "{key:?}");
            }
        }

        #[test]
        fn well_known_evdev_codes() {
            assert_eq!(ev(K::KeyA), 30);
            assert_eq!(ev(K::Enter), 28);
            assert_eq!(ev(K::NumpadEnter), 96);
            assert_eq!(ev(K::NumpadDecimal), 83);
            assert_eq!(ev(K::Backquote), 41);
            assert_eq!(ev(K::IntlBackslash), 86);
            assert_eq!(ev(K::PrintScreen), 99);
            assert_eq!(ev(K::F24), 194);
            assert_eq!(evdev_from_keycode(K::F25), None);
        }

        #[test]
        fn modifiers_on_both_sides_are_distinct() {
            let pairs = [
                (K::ShiftLeft, K::ShiftRight, KEY_LEFTSHIFT, KEY_RIGHTSHIFT),
                (K::ControlLeft, K::ControlRight, KEY_LEFTCTRL, KEY_RIGHTCTRL),
                (K::AltLeft, K::AltRight, KEY_LEFTALT, KEY_RIGHTALT),
                (K::SuperLeft, K::SuperRight, KEY_LEFTMETA, KEY_RIGHTMETA),
            ];
            for (left, right, want_left, want_right) in pairs {
                assert_eq!(ev(left), want_left);
                assert_eq!(ev(right), want_right);
                assert_ne!(set1(want_left, true), set1(want_right, true));
            }
        }

        #[test]
        fn physical_keys_map_by_code_or_native_xkb() {
            assert_eq!(evdev_from_physical(PhysicalKey::Code(K::KeyZ)), Some(KEY_Z));
            // winit reports KEY_STOP (X keycode 136) as Unidentified(Xkb(128)).
            let stop = PhysicalKey::Unidentified(NativeKeyCode::Xkb(128));
            assert_eq!(evdev_from_physical(stop), Some(KEY_STOP));
            let unknown = PhysicalKey::Unidentified(NativeKeyCode::Unidentified);
            assert_eq!(evdev_from_physical(unknown), None);
            let mac = PhysicalKey::Unidentified(NativeKeyCode::MacOS(0x66));
            assert_eq!(evdev_from_physical(mac), None);
        }

        /// On Linux winit's own scancode table is evdev: every key it decodes must come back as
        /// the same evdev code, whether winit names it or passes it through as `Xkb`.
        #[cfg(target_os = "linux")]
        #[test]
        fn agrees_with_winits_linux_scancode_table() {
            use winit::platform::scancode::PhysicalKeyExtScancode;
            for code in 1..=KEY_MAX {
                let key = PhysicalKey::from_scancode(u32::from(code));
                if key == PhysicalKey::Unidentified(NativeKeyCode::Unidentified) {
                    continue; // KEY_UNKNOWN (240)
                }
                assert_eq!(evdev_from_physical(key), Some(code), "{key:?}");
            }
        }
    }
}
