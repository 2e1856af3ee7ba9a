//! Which format an image is, by its content (never its name). The bytes it looks for are in
//! `magic`; this module needs no format module.
//!
//! ```text
//!   offset 0: "QFI\xfb" qcow2 · "KDMV" VMDK sparse · "vhdxfile" VHDX · "conectix" VHD (dynamic)
//!             Parallels magics · "<<< ... >>>" + 0xbeda107f at 0x40 VDI
//!             "# Disk DescriptorFile" VMDK descriptor · tar with a first member *.ovf: OVA
//!   end:      "conectix" in the last 512 (or 511) bytes: VHD
//!   0x8001:   "CD001": ISO 9660               otherwise: raw
//! ```

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::bytes::Fields;
use crate::{magic, DiskError, DiskErrorKind, ImageFormat};

/// Bytes of the head [`detect_bytes`] looks at (through the ISO 9660 identifier).
pub const HEAD_LEN: usize = 0x8000 + 8;
/// Bytes of the tail [`detect_bytes`] looks at.
pub const TAIL_LEN: usize = 1024;
/// Where a VMDK descriptor's marker line may appear (comments may come first).
const DESCRIPTOR_WINDOW: usize = 1024;

/// The format of the image at `path`. A directory is a Parallels bundle if it holds the
/// bundle descriptor.
pub fn detect(path: &Path) -> Result<ImageFormat, DiskError> {
    let meta = std::fs::metadata(path).map_err(|e| DiskError::io("open", e).with_path(path))?;
    if meta.is_dir() {
        if path.join(magic::PARALLELS_BUNDLE_DESCRIPTOR).is_file() {
            return Ok(ImageFormat::Parallels);
        }
        let e = DiskErrorKind::InvalidFormat;
        return Err(DiskError::new(e, "use a directory as a disk image").with_path(path));
    }
    let mut file = File::open(path).map_err(|e| DiskError::io("open", e).with_path(path))?;
    // Seeking (not metadata) also sizes a host block device.
    let len = file.seek(SeekFrom::End(0)).map_err(|e| DiskError::io("open", e).with_path(path))?;
    let mut head = vec![0u8; (len as usize).min(HEAD_LEN)];
    let mut tail = vec![0u8; (len as usize).min(TAIL_LEN)];
    let read = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at)
            .map_err(|e| DiskError::io("detect the format of", e).with_path(path).with_offset(at))
    };
    read(&mut head, 0)?;
    let tail_at = len - tail.len() as u64;
    read(&mut tail, tail_at)?;
    Ok(detect_bytes(&head, &tail, len))
}

/// The format of an image whose first bytes are `head` (up to [`HEAD_LEN`]) and last bytes
/// `tail` (up to [`TAIL_LEN`]), of `file_len` bytes in all.
pub fn detect_bytes(head: &[u8], tail: &[u8], file_len: u64) -> ImageFormat {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, &magic::QCOW2) {
        return ImageFormat::Qcow2;
    }
    if at(0, magic::VMDK_SPARSE) {
        return ImageFormat::Vmdk;
    }
    if at(0, magic::VHDX) {
        return ImageFormat::Vhdx;
    }
    if at(0, magic::VHD_FOOTER) {
        return ImageFormat::Vhd;
    }
    if at(0, magic::PARALLELS_OLD) || at(0, magic::PARALLELS_EXT) {
        return ImageFormat::Parallels;
    }
    let vdi_signature = Fields::new(head, "detect the format").le32(magic::VDI_SIGNATURE_AT);
    if at(0, magic::VDI_TEXT) && vdi_signature.is_ok_and(|s| s == magic::VDI_SIGNATURE) {
        return ImageFormat::Vdi;
    }
    if is_vmdk_descriptor(head) {
        return ImageFormat::Vmdk;
    }
    if is_ova(head) {
        return ImageFormat::Ova;
    }
    if has_vhd_footer(tail, file_len) {
        return ImageFormat::Vhd;
    }
    let iso_id = magic::ISO_DESCRIPTORS as usize + 1;
    if at(iso_id, magic::ISO_STANDARD_ID) {
        return ImageFormat::Iso;
    }
    ImageFormat::Raw
}

/// A text file whose first lines include the descriptor marker (before any NUL byte).
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let window = &head[..head.len().min(DESCRIPTOR_WINDOW)];
    let text = &window[..window.iter().position(|&b| b == 0).unwrap_or(window.len())];
    let marker = magic::VMDK_DESCRIPTOR.as_bytes();
    text.windows(marker.len()).any(|w| w.eq_ignore_ascii_case(marker))
}

/// A POSIX tar archive whose first member is the OVF descriptor.
fn is_ova(head: &[u8]) -> bool {
    if head.get(257..262) != Some(b"ustar") {
        return false;
    }
    let name = &head[..100];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    name.len() > 4 && name[name.len() - 4..].eq_ignore_ascii_case(b".ovf")
}

/// The VHD footer sits in the last 512 bytes (511 in images from old Virtual PC versions).
fn has_vhd_footer(tail: &[u8], file_len: u64) -> bool {
    if file_len < 511 {
        return false;
    }
    [512usize, 511]
        .iter()
        .any(|&n| tail.len() >= n && tail[tail.len() - n..].starts_with(magic::VHD_FOOTER))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    fn head_with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; HEAD_LEN];
        h[offset..offset + magic.len()].copy_from_slice(magic);
        h
    }

    fn detect_head(head: &[u8]) -> ImageFormat {
        detect_bytes(head, &[0u8; TAIL_LEN], 1 << 20)
    }

    #[test]
    fn magics_at_offset_zero_pick_their_format() {
        assert_eq!(detect_head(&head_with(0, b"QFI\xfb\0\0\0\x03")), ImageFormat::Qcow2);
        assert_eq!(detect_head(&head_with(0, b"KDMV")), ImageFormat::Vmdk);
        assert_eq!(detect_head(&head_with(0, b"vhdxfile")), ImageFormat::Vhdx);
        assert_eq!(detect_head(&head_with(0, b"conectix")), ImageFormat::Vhd);
        assert_eq!(detect_head(&head_with(0, b"WithoutFreeSpace")), ImageFormat::Parallels);
        assert_eq!(detect_head(&head_with(0, b"WithouFreSpacExt")), ImageFormat::Parallels);
        assert_eq!(detect_head(&head_with(0x8001, b"CD001")), ImageFormat::Iso);
        assert_eq!(detect_head(&vec![0u8; HEAD_LEN]), ImageFormat::Raw);
        assert_eq!(detect_bytes(&[], &[], 0), ImageFormat::Raw);
    }

    #[test]
    fn vdi_needs_both_text_and_signature() {
        let mut h = head_with(0, b"<<< Oracle VM VirtualBox Disk Image >>>\n");
        assert_eq!(detect_head(&h), ImageFormat::Raw);
        h[0x40..0x44].copy_from_slice(&magic::VDI_SIGNATURE.to_le_bytes());
        assert_eq!(detect_head(&h), ImageFormat::Vdi);
    }

    #[test]
    fn vmdk_descriptor_is_found_after_comments() {
        let text = b"# a comment first\r\n# Disk DescriptorFile\r\nversion=1\r\n";
        assert_eq!(detect_head(text), ImageFormat::Vmdk);
        let mut late = vec![b' '; 2000];
        late.extend_from_slice(b"# Disk DescriptorFile\n");
        assert_eq!(detect_head(&late), ImageFormat::Raw);
    }

    #[test]
    fn tar_is_ova_only_when_the_ovf_comes_first() {
        let mut h = head_with(0, b"appliance.OVF");
        h[257..262].copy_from_slice(b"ustar");
        assert_eq!(detect_head(&h), ImageFormat::Ova);
        let mut h = head_with(0, b"disk1.vmdk");
        h[257..262].copy_from_slice(b"ustar");
        assert_eq!(detect_head(&h), ImageFormat::Raw);
    }

    #[test]
    fn vhd_footer_is_found_at_512_or_511_from_the_end() {
        let head = vec![0u8; HEAD_LEN];
        let mut tail = vec![0u8; TAIL_LEN];
        tail[TAIL_LEN - 512..TAIL_LEN - 504].copy_from_slice(b"conectix");
        assert_eq!(detect_bytes(&head, &tail, 1 << 20), ImageFormat::Vhd);
        let mut tail = vec![0u8; TAIL_LEN];
        tail[TAIL_LEN - 511..TAIL_LEN - 503].copy_from_slice(b"conectix");
        assert_eq!(detect_bytes(&head, &tail, 1 << 20), ImageFormat::Vhd);
    }

    #[test]
    fn directory_is_an_image_only_with_a_bundle_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect(dir.path()).unwrap_err().kind(), DiskErrorKind::InvalidFormat);
        std::fs::write(dir.path().join("DiskDescriptor.xml"), b"<x/>").unwrap();
        assert_eq!(detect(dir.path()).unwrap(), ImageFormat::Parallels);
    }
}
