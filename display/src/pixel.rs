//! Guest pixel formats and conversion to the frame format.
//!
//! The shared frame (and the cursor) hold RGBA8: bytes R, G, B, A in memory, A = 255 for the
//! formats without alpha. Guest images and every size that describes them are untrusted: a bad
//! rect, stride or short buffer is an error, never a panic.

use crate::{Image, Rect};

/// 32-bit pixel formats, named by byte order in memory (virtio-gpu's names and codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PixelFormat {
    B8G8R8A8 = 1,
    B8G8R8X8 = 2,
    A8R8G8B8 = 3,
    X8R8G8B8 = 4,
    R8G8B8A8 = 67,
    X8B8G8R8 = 68,
    A8B8G8R8 = 121,
    R8G8B8X8 = 134,
}

impl PixelFormat {
    /// The format for a `VIRTIO_GPU_FORMAT_*` code; None for codes we don't support.
    pub fn from_virtio(code: u32) -> Option<PixelFormat> {
        use PixelFormat::*;
        Some(match code {
            1 => B8G8R8A8,
            2 => B8G8R8X8,
            3 => A8R8G8B8,
            4 => X8R8G8B8,
            67 => R8G8B8A8,
            68 => X8B8G8R8,
            121 => A8B8G8R8,
            134 => R8G8B8X8,
            _ => return None,
        })
    }

    /// The `VIRTIO_GPU_FORMAT_*` code.
    pub fn to_virtio(self) -> u32 {
        self as u32
    }

    pub fn bytes_per_pixel(self) -> u32 {
        4
    }

    /// Whether the fourth channel is alpha (rather than padding shown as opaque).
    pub fn has_alpha(self) -> bool {
        use PixelFormat::*;
        matches!(self, B8G8R8A8 | A8R8G8B8 | R8G8B8A8 | A8B8G8R8)
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PixelError {
    #[error("Rect {rect:?} is outside the {width}x{height} image")]
    RectOutsideImage { rect: Rect, width: u32, height: u32 },
    #[error("Image stride {stride} is too small for width {width}")]
    StrideTooSmall { stride: u32, width: u32 },
    #[error("Image data is {len} bytes, {needed} needed")]
    ImageTooShort { len: usize, needed: u64 },
    #[error("Destination is too small for the rect at ({x}, {y})")]
    DestinationTooSmall { x: u32, y: u32 },
}

/// Converts `rect` of `src` to RGBA8 into `dst` (rows of `dst_stride` bytes) with the rect's
/// top-left corner landing at (`dst_x`, `dst_y`).
pub fn convert_rect_to_rgba(
    src: &Image<'_>,
    rect: Rect,
    dst: &mut [u8],
    dst_stride: usize,
    dst_x: u32,
    dst_y: u32,
) -> Result<(), PixelError> {
    if rect.right() > src.width as u64 || rect.bottom() > src.height as u64 {
        return Err(PixelError::RectOutsideImage { rect, width: src.width, height: src.height });
    }
    if rect.is_empty() {
        return Ok(());
    }
    let row_bytes = src.width as u64 * 4;
    if (src.stride as u64) < row_bytes {
        return Err(PixelError::StrideTooSmall { stride: src.stride, width: src.width });
    }
    // The whole image must be there (the last row needn't be padded to the stride).
    let needed = src.stride as u64 * (src.height as u64 - 1) + row_bytes;
    if (src.data.len() as u64) < needed {
        return Err(PixelError::ImageTooShort { len: src.data.len(), needed });
    }
    let too_small = PixelError::DestinationTooSmall { x: dst_x, y: dst_y };
    let dst_row_end = (dst_x as u64 + rect.width as u64) * 4;
    let dst_needed = (dst_y as u64 + rect.height as u64 - 1)
        .checked_mul(dst_stride as u64)
        .and_then(|v| v.checked_add(dst_row_end))
        .ok_or(too_small.clone())?;
    if dst_row_end > dst_stride as u64 || dst_needed > dst.len() as u64 {
        return Err(too_small);
    }

    // Every offset below is bounded by the checks above, so all fit usize and slicing can't
    // fail.
    let width_bytes = rect.width as usize * 4;
    let src_stride = src.stride as usize;
    let convert = row_converter(src.format);
    for row in 0..rect.height as usize {
        let s = (rect.y as usize + row) * src_stride + rect.x as usize * 4;
        let d = (dst_y as usize + row) * dst_stride + dst_x as usize * 4;
        convert(&src.data[s..s + width_bytes], &mut dst[d..d + width_bytes]);
    }
    Ok(())
}

type RowConverter = fn(&[u8], &mut [u8]);

fn row_converter(format: PixelFormat) -> RowConverter {
    use PixelFormat::*;
    // Source byte index of R, G, B and A for each format; A = 4 means "opaque".
    match format {
        R8G8B8A8 => copy_row,
        B8G8R8X8 => bgrx_row,
        B8G8R8A8 => swizzle_row::<2, 1, 0, 3>,
        A8R8G8B8 => swizzle_row::<1, 2, 3, 0>,
        X8R8G8B8 => swizzle_row::<1, 2, 3, 4>,
        X8B8G8R8 => swizzle_row::<3, 2, 1, 4>,
        A8B8G8R8 => swizzle_row::<3, 2, 1, 0>,
        R8G8B8X8 => swizzle_row::<0, 1, 2, 4>,
    }
}

fn copy_row(src: &[u8], dst: &mut [u8]) {
    dst.copy_from_slice(src);
}

/// The common case (Linux's XRGB8888 framebuffer): swap R and B, force A. Written on whole
/// `u32` pixels with no branches so the compiler vectorizes it.
fn bgrx_row(src: &[u8], dst: &mut [u8]) {
    for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(4)) {
        let v = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let out = ((v >> 16) & 0xff) | (v & 0xff00) | ((v & 0xff) << 16) | 0xff00_0000;
        d.copy_from_slice(&out.to_le_bytes());
    }
}

fn swizzle_row<const R: usize, const G: usize, const B: usize, const A: usize>(
    src: &[u8],
    dst: &mut [u8],
) {
    for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(4)) {
        let s: &[u8; 4] = match s.try_into() {
            Ok(s) => s,
            Err(_) => return,
        };
        let alpha = if A < 4 { s[A & 3] } else { 0xff };
        d.copy_from_slice(&[s[R], s[G], s[B], alpha]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [PixelFormat; 8] = [
        PixelFormat::B8G8R8A8,
        PixelFormat::B8G8R8X8,
        PixelFormat::A8R8G8B8,
        PixelFormat::X8R8G8B8,
        PixelFormat::R8G8B8A8,
        PixelFormat::X8B8G8R8,
        PixelFormat::A8B8G8R8,
        PixelFormat::R8G8B8X8,
    ];

    /// One pixel R=0x11 G=0x22 B=0x33 A=0x44 laid out in `format`.
    fn pixel(format: PixelFormat) -> [u8; 4] {
        use PixelFormat::*;
        let (r, g, b, a) = (0x11, 0x22, 0x33, 0x44);
        match format {
            B8G8R8A8 | B8G8R8X8 => [b, g, r, a],
            A8R8G8B8 | X8R8G8B8 => [a, r, g, b],
            R8G8B8A8 | R8G8B8X8 => [r, g, b, a],
            X8B8G8R8 | A8B8G8R8 => [a, b, g, r],
        }
    }

    fn image(data: &[u8], width: u32, height: u32, stride: u32, format: PixelFormat) -> Image<'_> {
        Image { data, width, height, stride, format }
    }

    #[test]
    fn virtio_codes_round_trip() {
        for f in ALL {
            assert_eq!(PixelFormat::from_virtio(f.to_virtio()), Some(f));
            assert_eq!(f.bytes_per_pixel(), 4);
        }
        assert_eq!(PixelFormat::from_virtio(0), None);
        assert_eq!(PixelFormat::from_virtio(5), None);
    }

    #[test]
    fn every_format_converts_to_rgba() {
        for f in ALL {
            // 19 pixels wide so vectorized loops also run their tail.
            let (w, h) = (19u32, 3u32);
            let stride = w * 4 + 8;
            let mut src = vec![0u8; (stride * h) as usize];
            for y in 0..h {
                for x in 0..w {
                    let o = (y * stride + x * 4) as usize;
                    src[o..o + 4].copy_from_slice(&pixel(f));
                }
            }
            let mut dst = vec![0u8; (w * h * 4) as usize];
            convert_rect_to_rgba(
                &image(&src, w, h, stride, f),
                Rect::full(w, h),
                &mut dst,
                (w * 4) as usize,
                0,
                0,
            )
            .unwrap();
            let a = if f.has_alpha() { 0x44 } else { 0xff };
            for px in dst.chunks_exact(4) {
                assert_eq!(px, [0x11, 0x22, 0x33, a], "{f:?}");
            }
        }
    }

    #[test]
    fn rect_lands_at_destination_offset_only() {
        let (w, h) = (8u32, 8u32);
        let src: Vec<u8> = (0..w * h * 4).map(|i| i as u8).collect();
        let mut dst = vec![0xaau8; 16 * 16 * 4];
        let rect = Rect::new(2, 3, 4, 2);
        let img = image(&src, w, h, w * 4, PixelFormat::R8G8B8A8);
        convert_rect_to_rgba(&img, rect, &mut dst, 64, 5, 7).unwrap();
        for y in 0..16usize {
            for x in 0..16usize {
                let d = &dst[y * 64 + x * 4..y * 64 + x * 4 + 4];
                if (5..9).contains(&x) && (7..9).contains(&y) {
                    let (sx, sy) = (x - 5 + 2, y - 7 + 3);
                    let s = sy * 32 + sx * 4;
                    assert_eq!(d, &src[s..s + 4]);
                } else {
                    assert_eq!(d, [0xaa; 4]);
                }
            }
        }
    }

    #[test]
    fn hostile_sizes_are_errors() {
        let f = PixelFormat::B8G8R8X8;
        let data = vec![0u8; 64];
        let mut dst = vec![0u8; 1 << 16];
        let mut run = |img: Image<'_>, rect: Rect, stride: usize, x: u32, y: u32| {
            convert_rect_to_rgba(&img, rect, &mut dst, stride, x, y)
        };
        // Rect past the image, including u32 wraparound.
        assert!(matches!(
            run(image(&data, 4, 4, 16, f), Rect::new(2, 0, 3, 1), 64, 0, 0),
            Err(PixelError::RectOutsideImage { .. })
        ));
        assert!(matches!(
            run(image(&data, 4, 4, 16, f), Rect::new(u32::MAX, 0, 2, 1), 64, 0, 0),
            Err(PixelError::RectOutsideImage { .. })
        ));
        // Data shorter than the image claims.
        assert!(matches!(
            run(image(&data, 4, 5, 16, f), Rect::new(0, 0, 1, 1), 64, 0, 0),
            Err(PixelError::ImageTooShort { .. })
        ));
        assert!(matches!(
            run(image(&data, u32::MAX, u32::MAX, u32::MAX, f), Rect::new(0, 0, 1, 1), 64, 0, 0),
            Err(PixelError::StrideTooSmall { .. })
        ));
        assert!(matches!(
            run(image(&data, 4, 4, 8, f), Rect::new(0, 0, 1, 1), 64, 0, 0),
            Err(PixelError::StrideTooSmall { .. })
        ));
        // Destination too small or placed past its end.
        assert!(matches!(
            run(image(&data, 4, 4, 16, f), Rect::full(4, 4), 8, 0, 0),
            Err(PixelError::DestinationTooSmall { .. })
        ));
        assert!(matches!(
            run(image(&data, 4, 4, 16, f), Rect::full(4, 4), usize::MAX, 0, u32::MAX),
            Err(PixelError::DestinationTooSmall { .. })
        ));
        assert!(matches!(
            run(image(&data, 4, 4, 16, f), Rect::full(4, 4), 64, 0, 1 << 20),
            Err(PixelError::DestinationTooSmall { .. })
        ));
        // An empty rect inside the image is a no-op; a tight last row is fine.
        assert_eq!(run(image(&data, 4, 4, 16, f), Rect::new(4, 4, 0, 0), 64, 0, 0), Ok(()));
        assert_eq!(run(image(&data[..60], 3, 4, 16, f), Rect::full(3, 4), 64, 0, 0), Ok(()));
    }
}
