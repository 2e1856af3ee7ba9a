//! A 128-byte EDID 1.4 base block describing one monitor whose preferred (and native) mode is
//! the display size the host window offers.

/// "HUT", three 5-bit letters (A = 1), big-endian.
const MANUFACTURER: u16 = (8 << 10) | (21 << 5) | 20;
const PRODUCT: u16 = 0x0001;
/// sRGB primaries and white point, as most monitors encode them.
const SRGB_CHROMATICITY: [u8; 10] = [0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54];
const REFRESH_HZ: u64 = 60;
/// Reduced-blanking timings (CVT-RB style): fixed horizontal blanking, short vertical.
const H_BLANK: u32 = 160;
const H_FRONT: u32 = 48;
const H_SYNC: u32 = 32;
const V_FRONT: u32 = 3;
const V_SYNC: u32 = 5;
/// Pixels per centimetre at 96 dpi (for the physical size fields).
const PX_PER_CM: u32 = 38;

/// The EDID for a `width`×`height` preferred mode (each below 4096).
pub fn edid(width: u32, height: u32) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    e[8..10].copy_from_slice(&MANUFACTURER.to_be_bytes());
    e[10..12].copy_from_slice(&PRODUCT.to_le_bytes());
    // Serial number 0, week 1 of 2024.
    e[16] = 1;
    e[17] = (2024 - 1990) as u8;
    e[18] = 1;
    e[19] = 4;
    // Digital input, colour depth and interface undefined.
    e[20] = 0x80;
    e[21] = (width / PX_PER_CM).min(255) as u8;
    e[22] = (height / PX_PER_CM).min(255) as u8;
    e[23] = 120; // gamma 2.2
                 // sRGB default colour space, preferred timing is the native mode, RGB 4:4:4.
    e[24] = 0x06;
    e[25..35].copy_from_slice(&SRGB_CHROMATICITY);
    // Established timings: 640x480@60, 800x600@60, 1024x768@60.
    e[35] = 0x21;
    e[36] = 0x08;
    // Standard timings unused.
    for i in 0..8 {
        e[38 + 2 * i] = 0x01;
        e[39 + 2 * i] = 0x01;
    }
    e[54..72].copy_from_slice(&detailed_timing(width, height));
    e[72..90].copy_from_slice(&text_descriptor(0xfc, b"Hutch"));
    e[90..108].copy_from_slice(&range_limits());
    e[108..126].copy_from_slice(&text_descriptor(0xff, b"0"));
    e[127] = checksum(&e[..127]);
    e
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

fn detailed_timing(width: u32, height: u32) -> [u8; 18] {
    let (w, h) = (width.min(4095), height.min(4095));
    // At least 460 µs of vertical blanking at 60 Hz, as CVT-RB asks.
    let v_blank = (h * 46 / 1000 + 1).max(V_FRONT + V_SYNC + 6);
    let h_total = u64::from(w + H_BLANK);
    let v_total = u64::from(h + v_blank);
    // In 10 kHz units; the field holds at most 655.35 MHz.
    let clock = (h_total * v_total * REFRESH_HZ).div_ceil(10_000).min(0xffff) as u16;
    let (hmm, vmm) = (w * 10 / PX_PER_CM, h * 10 / PX_PER_CM);
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = w as u8;
    d[3] = H_BLANK as u8;
    d[4] = ((w >> 8) << 4 | (H_BLANK >> 8)) as u8;
    d[5] = h as u8;
    d[6] = v_blank as u8;
    d[7] = ((h >> 8) << 4 | (v_blank >> 8)) as u8;
    d[8] = H_FRONT as u8;
    d[9] = H_SYNC as u8;
    d[10] = ((V_FRONT & 0xf) << 4 | (V_SYNC & 0xf)) as u8;
    d[11] = ((H_FRONT >> 8) << 6 | (H_SYNC >> 8) << 4) as u8;
    d[12] = hmm as u8;
    d[13] = vmm as u8;
    d[14] = (((hmm >> 8) & 0xf) << 4 | ((vmm >> 8) & 0xf)) as u8;
    // Digital separate sync, both polarities positive.
    d[17] = 0x1e;
    d
}

fn text_descriptor(tag: u8, text: &[u8]) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let mut body = [0x20u8; 13];
    let n = text.len().min(12);
    body[..n].copy_from_slice(&text[..n]);
    body[n] = 0x0a;
    d[5..].copy_from_slice(&body);
    d
}

fn range_limits() -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = 0xfd;
    // 50-75 Hz vertical, 30-160 kHz horizontal, up to 600 MHz, range limits only.
    d[5..11].copy_from_slice(&[50, 75, 30, 160, 60, 0x01]);
    d[11] = 0x0a;
    d[12..].fill(0x20);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edid_checksum_makes_the_block_sum_to_zero() {
        for (w, h) in [(640, 480), (1024, 768), (1920, 1080), (3840, 2160)] {
            let e = edid(w, h);
            assert_eq!(e.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
            assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        }
    }

    #[test]
    fn preferred_timing_carries_the_mode() {
        let e = edid(1920, 1080);
        let d = &e[54..72];
        assert_eq!(u32::from(d[2]) | u32::from(d[4] >> 4) << 8, 1920);
        assert_eq!(u32::from(d[5]) | u32::from(d[7] >> 4) << 8, 1080);
        let clock = u16::from_le_bytes([d[0], d[1]]);
        assert!(clock > 10_000 && clock < 20_000, "about 140 MHz, got {clock}");
        let e4k = edid(3840, 2160);
        assert_ne!(u16::from_le_bytes([e4k[54], e4k[55]]), 0xffff, "4K@60 fits the clock field");
    }
}
