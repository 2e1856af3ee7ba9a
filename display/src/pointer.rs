//! Window coordinates → guest pointer coordinates: where the guest screen sits in the window
//! ([`Viewport`]), absolute tablet positions, relative motion for the grabbed mouse, and the
//! guest mode to ask for when the window is resized.

use crate::{InputEvent, PointerButton, MAX_HEIGHT, MAX_WIDTH};

/// Largest absolute pointer coordinate (the tablet's axis range is 0..=ABS_MAX).
pub const ABS_MAX: u16 = 0x7fff;

/// The button bits of a PS/2 mouse packet's first byte (and of [`Ps2Motion`]).
pub const PS2_BUTTON_LEFT: u8 = 0x01;
pub const PS2_BUTTON_RIGHT: u8 = 0x02;
pub const PS2_BUTTON_MIDDLE: u8 = 0x04;

/// Host pointer events as a PS/2 mouse reports them: relative counts and the buttons held.
/// An absolute position (the window's pointer outside capture) becomes the motion from the
/// last one, on a nominal screen of [`Ps2Pointer::SCREEN`] counts: a PS/2 mouse cannot say
/// where the pointer is, so the guest's cursor follows the host's only roughly, as on a real
/// PC; capture (relative motion) tracks exactly.
#[derive(Debug, Default)]
pub struct Ps2Pointer {
    buttons: u8,
    last: Option<(i32, i32)>,
}

/// The PS/2 motion of one event: (dx, dy, wheel, buttons).
pub type Ps2Motion = (i32, i32, i32, u8);

impl Ps2Pointer {
    /// The counts a full sweep of the absolute range makes, per axis.
    pub const SCREEN: (i32, i32) = (1024, 768);

    /// What `event` makes the PS/2 mouse report; None for a key, or a button PS/2 lacks.
    pub fn motion(&mut self, event: &InputEvent) -> Option<Ps2Motion> {
        let scale = |v: u16, span: i32| i32::from(v.min(ABS_MAX)) * span / i32::from(ABS_MAX);
        match *event {
            InputEvent::PointerRel { dx, dy } => Some((dx, dy, 0, self.buttons)),
            InputEvent::PointerAbs { x, y } => {
                let now = (scale(x, Self::SCREEN.0), scale(y, Self::SCREEN.1));
                // The first position only says where the pointer starts.
                let (dx, dy) = self.last.map_or((0, 0), |(lx, ly)| (now.0 - lx, now.1 - ly));
                self.last = Some(now);
                Some((dx, dy, 0, self.buttons))
            }
            InputEvent::Button { button, down } => {
                let bit = match button {
                    PointerButton::Left => PS2_BUTTON_LEFT,
                    PointerButton::Right => PS2_BUTTON_RIGHT,
                    PointerButton::Middle => PS2_BUTTON_MIDDLE,
                    PointerButton::Side | PointerButton::Extra => return None,
                };
                if down {
                    self.buttons |= bit;
                } else {
                    self.buttons &= !bit;
                }
                Some((0, 0, 0, self.buttons))
            }
            InputEvent::Wheel { dy, .. } => Some((0, 0, dy, self.buttons)),
            InputEvent::Key { .. } => None,
        }
    }
}

/// Smallest mode [`guest_size_for_window`] asks for.
pub const MIN_WIDTH: u32 = 640;
pub const MIN_HEIGHT: u32 = 480;

/// Where the guest screen is drawn in the window, in window points (the GUI's logical units).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Viewport {
    x: f32,
    y: f32,
    w: f32,
    h: f32,
    guest_w: u32,
    guest_h: u32,
}

impl Viewport {
    /// The guest screen scaled (up or down) to fit `avail` = (x, y, w, h), aspect ratio kept,
    /// centred with bars on the two sides that don't fill.
    pub fn fit(avail: (f32, f32, f32, f32), guest: (u32, u32)) -> Viewport {
        let (ax, ay, aw, ah) = avail;
        let (aw, ah) = (finite_non_negative(aw), finite_non_negative(ah));
        let (gw, gh) = (guest.0 as f32, guest.1 as f32);
        let scale = if guest.0 == 0 || guest.1 == 0 { 0.0 } else { (aw / gw).min(ah / gh) };
        let (w, h) = (gw * scale, gh * scale);
        Viewport {
            x: ax + (aw - w) / 2.0,
            y: ay + (ah - h) / 2.0,
            w,
            h,
            guest_w: guest.0,
            guest_h: guest.1,
        }
    }

    /// The guest screen unscaled: one guest pixel per physical window pixel, top-left at
    /// `origin` (points). A window larger than the guest shows it in the corner; a smaller one
    /// clips it.
    pub fn one_to_one(origin: (f32, f32), guest: (u32, u32), pixels_per_point: f32) -> Viewport {
        let ppp = if pixels_per_point.is_finite() && pixels_per_point > 0.0 {
            pixels_per_point
        } else {
            1.0
        };
        Viewport {
            x: origin.0,
            y: origin.1,
            w: guest.0 as f32 / ppp,
            h: guest.1 as f32 / ppp,
            guest_w: guest.0,
            guest_h: guest.1,
        }
    }

    /// Where to draw the guest texture: (x, y, w, h) in window points.
    pub fn rect(&self) -> (f32, f32, f32, f32) {
        (self.x, self.y, self.w, self.h)
    }

    /// The guest screen size this viewport shows.
    pub fn guest_size(&self) -> (u32, u32) {
        (self.guest_w, self.guest_h)
    }

    /// The guest pixel under window point (`x`, `y`); None outside the image. The far edges
    /// belong to the last pixel.
    pub fn window_to_guest(&self, x: f32, y: f32) -> Option<(u32, u32)> {
        let gx = axis_to_pixel(x - self.x, self.w, self.guest_w)?;
        let gy = axis_to_pixel(y - self.y, self.h, self.guest_h)?;
        Some((gx, gy))
    }

    /// The absolute tablet position (0..=[`ABS_MAX`] on each axis) of window point (`x`, `y`);
    /// None outside the image.
    ///
    /// Tablet convention: the guest maps abs 0 to pixel 0 and ABS_MAX to pixel size-1, i.e.
    /// pixel = abs * (size-1) / ABS_MAX. We round abs = pixel * ABS_MAX / (size-1) *up* so that
    /// converting back lands on the same pixel whether the guest rounds down or to nearest.
    pub fn window_to_abs(&self, x: f32, y: f32) -> Option<(u16, u16)> {
        let (gx, gy) = self.window_to_guest(x, y)?;
        Some((pixel_to_abs(gx, self.guest_w), pixel_to_abs(gy, self.guest_h)))
    }
}

fn finite_non_negative(v: f32) -> f32 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

/// The pixel at `offset` points into a `len`-point span showing `pixels` pixels.
fn axis_to_pixel(offset: f32, len: f32, pixels: u32) -> Option<u32> {
    // Written so NaN offsets fail the test too.
    if pixels == 0 || !(len > 0.0 && offset >= 0.0 && offset <= len) {
        return None;
    }
    let pixel = (f64::from(offset) / f64::from(len) * f64::from(pixels)).floor() as u32;
    Some(pixel.min(pixels - 1))
}

/// Guest pixel → absolute coordinate (see [`Viewport::window_to_abs`]).
fn pixel_to_abs(pixel: u32, size: u32) -> u16 {
    if size <= 1 {
        return 0;
    }
    let span = u64::from(size - 1);
    let abs = (u64::from(pixel.min(size - 1)) * u64::from(ABS_MAX)).div_ceil(span);
    abs.min(u64::from(ABS_MAX)) as u16
}

/// The guest mode to request for a window (or the part of it showing the guest) of
/// `w_px`×`h_px` physical pixels: clamped to 640×480..=[`MAX_WIDTH`]×[`MAX_HEIGHT`], width rounded
/// down to a multiple of 8 (what guest drivers and framebuffer strides like).
pub fn guest_size_for_window(w_px: u32, h_px: u32) -> (u32, u32) {
    let w = w_px.clamp(MIN_WIDTH, MAX_WIDTH) / 8 * 8;
    let h = h_px.clamp(MIN_HEIGHT, MAX_HEIGHT);
    (w, h)
}

/// Relative motion for the grabbed mouse: host deltas are fractional (high-resolution mice,
/// scaled displays), the guest's are whole counts. The fraction left over is kept for the next
/// event so slow movement isn't lost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RelativeMotion {
    rem_x: f64,
    rem_y: f64,
}

impl RelativeMotion {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a host delta; returns the whole counts to send, or None if it doesn't add up to one
    /// yet. Non-finite deltas are ignored.
    pub fn push(&mut self, dx: f64, dy: f64) -> Option<(i32, i32)> {
        let x = take_whole(&mut self.rem_x, dx);
        let y = take_whole(&mut self.rem_y, dy);
        (x != 0 || y != 0).then_some((x, y))
    }

    /// Drops any leftover fraction (e.g. when the grab ends).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

fn take_whole(rem: &mut f64, delta: f64) -> i32 {
    if !delta.is_finite() {
        return 0;
    }
    let total = *rem + delta;
    // Truncate toward zero so the remainder keeps the sign of the motion.
    let whole = total.trunc().clamp(f64::from(i32::MIN), f64::from(i32::MAX));
    *rem = total - whole;
    if !rem.is_finite() || rem.abs() >= 1.0 {
        *rem = 0.0;
    }
    whole as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps2_motion_carries_relative_moves_buttons_and_the_wheel() {
        let mut p = Ps2Pointer::default();
        assert_eq!(p.motion(&InputEvent::PointerRel { dx: 5, dy: -3 }), Some((5, -3, 0, 0)));
        let left = InputEvent::Button { button: PointerButton::Left, down: true };
        assert_eq!(p.motion(&left), Some((0, 0, 0, PS2_BUTTON_LEFT)));
        let right = InputEvent::Button { button: PointerButton::Right, down: true };
        assert_eq!(p.motion(&right), Some((0, 0, 0, PS2_BUTTON_LEFT | PS2_BUTTON_RIGHT)));
        // Motion while dragging keeps the buttons held.
        assert_eq!(
            p.motion(&InputEvent::PointerRel { dx: 1, dy: 1 }),
            Some((1, 1, 0, PS2_BUTTON_LEFT | PS2_BUTTON_RIGHT))
        );
        let up = InputEvent::Button { button: PointerButton::Left, down: false };
        assert_eq!(p.motion(&up), Some((0, 0, 0, PS2_BUTTON_RIGHT)));
        assert_eq!(
            p.motion(&InputEvent::Wheel { dx: 0, dy: 2 }),
            Some((0, 0, 2, PS2_BUTTON_RIGHT))
        );
        let side = InputEvent::Button { button: PointerButton::Side, down: true };
        assert_eq!(p.motion(&side), None, "PS/2 has three buttons");
        assert_eq!(p.motion(&InputEvent::Key { code: 30, down: true }), None);
    }

    #[test]
    fn ps2_motion_of_absolute_positions_is_the_move_from_the_last_one() {
        let mut p = Ps2Pointer::default();
        let at = |x: u16, y: u16| InputEvent::PointerAbs { x, y };
        assert_eq!(p.motion(&at(ABS_MAX / 2, ABS_MAX / 2)), Some((0, 0, 0, 0)), "only a start");
        // From the middle (511, 383 after rounding down) to the far corner.
        assert_eq!(p.motion(&at(ABS_MAX, ABS_MAX)), Some((513, 385, 0, 0)));
        assert_eq!(p.motion(&at(0, 0)), Some((-1024, -768, 0, 0)));
        // Many small moves add up to the whole sweep: nothing is lost to rounding.
        let (mut x, mut y) = (0, 0);
        for i in 1..=ABS_MAX / 7 {
            let (dx, dy, _, _) = p.motion(&at(i * 7, i * 7)).unwrap();
            x += dx;
            y += dy;
        }
        let last = ABS_MAX / 7 * 7;
        assert_eq!(
            (x, y),
            (
                i32::from(last) * 1024 / i32::from(ABS_MAX),
                i32::from(last) * 768 / i32::from(ABS_MAX)
            )
        );
        // Out-of-range positions are clamped to the edge.
        assert_eq!(p.motion(&at(u16::MAX, u16::MAX)).unwrap().0, 1024 - x);
    }

    fn close(a: (f32, f32, f32, f32), b: (f32, f32, f32, f32)) -> bool {
        let d = [a.0 - b.0, a.1 - b.1, a.2 - b.2, a.3 - b.3];
        d.iter().all(|v| v.abs() < 1e-3)
    }

    #[test]
    fn wide_window_gets_bars_left_and_right() {
        let v = Viewport::fit((0.0, 0.0, 1000.0, 300.0), (800, 600));
        assert!(close(v.rect(), (300.0, 0.0, 400.0, 300.0)), "{:?}", v.rect());
    }

    #[test]
    fn tall_window_gets_bars_top_and_bottom() {
        let v = Viewport::fit((10.0, 20.0, 400.0, 1000.0), (800, 600));
        assert!(close(v.rect(), (10.0, 370.0, 400.0, 300.0)), "{:?}", v.rect());
    }

    #[test]
    fn fit_scales_up_a_small_guest() {
        let v = Viewport::fit((0.0, 0.0, 1600.0, 1200.0), (640, 480));
        assert!(close(v.rect(), (0.0, 0.0, 1600.0, 1200.0)), "{:?}", v.rect());
        assert_eq!(v.window_to_guest(800.0, 600.0), Some((320, 240)));
    }

    #[test]
    fn clicks_in_the_bars_are_outside() {
        let v = Viewport::fit((0.0, 0.0, 1000.0, 300.0), (800, 600));
        assert_eq!(v.window_to_guest(299.0, 150.0), None);
        assert_eq!(v.window_to_guest(701.0, 150.0), None);
        assert_eq!(v.window_to_abs(500.0, -1.0), None);
        assert_eq!(v.window_to_abs(500.0, 301.0), None);
        assert_eq!(v.window_to_abs(f32::NAN, 100.0), None);
        assert_eq!(v.window_to_guest(300.0, 0.0), Some((0, 0)));
    }

    #[test]
    fn corners_map_to_zero_and_abs_max() {
        let v = Viewport::fit((0.0, 0.0, 1000.0, 300.0), (800, 600));
        assert_eq!(v.window_to_guest(300.0, 0.0), Some((0, 0)));
        assert_eq!(v.window_to_abs(300.0, 0.0), Some((0, 0)));
        assert_eq!(v.window_to_guest(700.0, 300.0), Some((799, 599)));
        assert_eq!(v.window_to_abs(700.0, 300.0), Some((ABS_MAX, ABS_MAX)));
    }

    #[test]
    fn abs_round_trips_to_the_same_pixel() {
        for size in [640u32, 1024, 1920, 3840] {
            for pixel in 0..size {
                let abs = u64::from(pixel_to_abs(pixel, size));
                let span = u64::from(size - 1);
                let floor = abs * span / u64::from(ABS_MAX);
                let nearest = (abs * span + u64::from(ABS_MAX) / 2) / u64::from(ABS_MAX);
                assert_eq!(floor, u64::from(pixel), "size {size} pixel {pixel} (floor)");
                assert_eq!(nearest, u64::from(pixel), "size {size} pixel {pixel} (nearest)");
            }
        }
    }

    #[test]
    fn one_to_one_uses_physical_pixels() {
        let v = Viewport::one_to_one((5.0, 7.0), (1024, 768), 2.0);
        assert!(close(v.rect(), (5.0, 7.0, 512.0, 384.0)), "{:?}", v.rect());
        assert_eq!(v.window_to_guest(5.0, 7.0), Some((0, 0)));
        assert_eq!(v.window_to_guest(5.5, 7.5), Some((1, 1)));
        assert_eq!(v.window_to_guest(517.0, 391.0), Some((1023, 767)));
        assert_eq!(v.window_to_guest(518.0, 10.0), None);
        let v = Viewport::one_to_one((0.0, 0.0), (800, 600), 1.0);
        assert_eq!(v.window_to_guest(10.5, 20.9), Some((10, 20)));
    }

    #[test]
    fn empty_guest_or_window_has_no_pixels() {
        let v = Viewport::fit((0.0, 0.0, 100.0, 100.0), (0, 0));
        assert_eq!(v.window_to_guest(50.0, 50.0), None);
        let v = Viewport::fit((0.0, 0.0, 0.0, 0.0), (800, 600));
        assert_eq!(v.window_to_guest(0.0, 0.0), None);
        let v = Viewport::fit((0.0, 0.0, f32::NAN, 10.0), (800, 600));
        assert_eq!(v.window_to_abs(0.0, 0.0), None);
    }

    #[test]
    fn single_pixel_guest_is_abs_zero() {
        let v = Viewport::fit((0.0, 0.0, 10.0, 10.0), (1, 1));
        assert_eq!(v.window_to_abs(10.0, 10.0), Some((0, 0)));
    }

    #[test]
    fn guest_size_for_window_clamps_and_aligns() {
        assert_eq!(guest_size_for_window(1280, 720), (1280, 720));
        assert_eq!(guest_size_for_window(1285, 721), (1280, 721));
        assert_eq!(guest_size_for_window(100, 100), (640, 480));
        assert_eq!(guest_size_for_window(0, 0), (640, 480));
        assert_eq!(guest_size_for_window(10_000, 10_000), (MAX_WIDTH, MAX_HEIGHT));
        assert_eq!(guest_size_for_window(u32::MAX, u32::MAX), (MAX_WIDTH, MAX_HEIGHT));
        let (w, _) = guest_size_for_window(1927, 1080);
        assert_eq!(w % 8, 0);
    }

    #[test]
    fn relative_motion_accumulates_fractions() {
        let mut m = RelativeMotion::new();
        assert_eq!(m.push(0.4, -0.4), None);
        assert_eq!(m.push(0.4, -0.4), None);
        assert_eq!(m.push(0.4, -0.4), Some((1, -1)));
        assert_eq!(m.push(2.5, 0.0), Some((2, 0)));
        // 0.2 + 0.5 left from before: still under one.
        assert_eq!(m.push(0.1, 0.0), None);
    }

    #[test]
    fn relative_motion_ignores_garbage_and_saturates() {
        let mut m = RelativeMotion::new();
        assert_eq!(m.push(f64::NAN, f64::INFINITY), None);
        assert_eq!(m.push(1e12, -1e12), Some((i32::MAX, i32::MIN)));
        assert_eq!(m.push(0.0, 0.0), None);
        m.push(0.9, 0.0);
        m.reset();
        assert_eq!(m.push(0.2, 0.0), None);
    }
}
