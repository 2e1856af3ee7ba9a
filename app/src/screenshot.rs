//! Screenshots: a frame from the VM's shared screen, written as a PNG file atomically.

use std::path::Path;

use anyhow::Context;
use display::frame::FrameImage;

/// Encodes `image` (RGBA8) as PNG.
pub fn encode_png(image: &FrameImage) -> anyhow::Result<Vec<u8>> {
    let expected = (image.width as usize) * (image.height as usize) * 4;
    anyhow::ensure!(
        image.width > 0 && image.height > 0 && image.rgba.len() == expected,
        "The screen is empty ({}x{})",
        image.width,
        image.height
    );
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    // Screens are mostly flat colour: fast compression is plenty.
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().context("Cannot encode the PNG header")?;
    writer.write_image_data(&image.rgba).context("Cannot encode the PNG image")?;
    writer.finish().context("Cannot finish the PNG")?;
    Ok(out)
}

/// Writes `image` to `path` as PNG (temp file, fsync, rename: never a half-written file).
pub fn write_png(image: &FrameImage, path: &Path) -> anyhow::Result<()> {
    let bytes = encode_png(image)?;
    crate::fsutil::write_atomic(path, &bytes)
        .with_context(|| format!("Cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_the_pixels() {
        let rgba: Vec<u8> = (0..4 * 3 * 4).map(|i| i as u8).collect();
        let image = FrameImage { width: 4, height: 3, rgba: rgba.clone() };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shot.png");
        write_png(&image, &path).expect("write");
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).expect("open")));
        let mut reader = decoder.read_info().expect("info");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("frame");
        assert_eq!((info.width, info.height), (4, 3));
        assert_eq!(&buf[..info.buffer_size()], &rgba[..]);
    }

    #[test]
    fn empty_or_inconsistent_images_are_refused() {
        let empty = FrameImage { width: 0, height: 0, rgba: Vec::new() };
        assert!(encode_png(&empty).is_err());
        let short = FrameImage { width: 2, height: 2, rgba: vec![0; 3] };
        assert!(encode_png(&short).is_err());
    }
}
