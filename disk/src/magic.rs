//! The bytes that say which format a file is, shared by [`detect`](crate::detect()) and the
//! format parsers that check them again on open. Kept apart from both so that detection needs
//! no format module and no format needs detection.

/// qcow2, at offset 0.
pub(crate) const QCOW2: [u8; 4] = *b"QFI\xfb";
/// A hosted sparse VMDK extent, at offset 0.
pub(crate) const VMDK_SPARSE: &[u8; 4] = b"KDMV";
/// The marker line of a VMDK descriptor (comments may come before it).
pub(crate) const VMDK_DESCRIPTOR: &str = "# Disk DescriptorFile";
/// VHDX's file type identifier, at offset 0.
pub(crate) const VHDX: &[u8; 8] = b"vhdxfile";
/// The cookie of a VHD footer (at the end of the file, and copied to offset 0 when dynamic).
pub(crate) const VHD_FOOTER: &[u8; 8] = b"conectix";
/// Parallels images before and after the extended (64-bit) header.
pub(crate) const PARALLELS_OLD: &[u8; 16] = b"WithoutFreeSpace";
pub(crate) const PARALLELS_EXT: &[u8; 16] = b"WithouFreSpacExt";
/// The file that makes a directory a Parallels bundle.
pub(crate) const PARALLELS_BUNDLE_DESCRIPTOR: &str = "DiskDescriptor.xml";
/// VDI's text banner starts so; its signature follows at [`VDI_SIGNATURE_AT`].
pub(crate) const VDI_TEXT: &[u8; 3] = b"<<<";
pub(crate) const VDI_SIGNATURE: u32 = 0xbeda_107f;
pub(crate) const VDI_SIGNATURE_AT: usize = 0x40;
/// Where ISO 9660 volume descriptors start, each with this identifier at byte 1.
pub(crate) const ISO_DESCRIPTORS: u64 = 0x8000;
pub(crate) const ISO_STANDARD_ID: &[u8; 5] = b"CD001";
