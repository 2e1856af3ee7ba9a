//! The Bochs DISPI (VBE) registers and the display mode they describe.
//!
//! The guest's values are kept as written (read back unchanged, saved as they are); only the
//! mode computed from them is checked, as QEMU's `bochs_display_get_mode` does: a mode that
//! is not enabled, not 32 bits a pixel, under 64×64, or that does not fit the video memory is
//! no mode at all.

use display::PixelFormat;

pub const INDEX_ID: usize = 0x0;
pub const INDEX_XRES: usize = 0x1;
pub const INDEX_YRES: usize = 0x2;
pub const INDEX_BPP: usize = 0x3;
pub const INDEX_ENABLE: usize = 0x4;
pub const INDEX_BANK: usize = 0x5;
pub const INDEX_VIRT_WIDTH: usize = 0x6;
pub const INDEX_VIRT_HEIGHT: usize = 0x7;
pub const INDEX_X_OFFSET: usize = 0x8;
pub const INDEX_Y_OFFSET: usize = 0x9;
/// Read-only, not stored: the video memory in 64 KiB units.
pub const INDEX_VIDEO_MEMORY_64K: usize = 0xa;
/// Registers stored (ID through Y_OFFSET).
pub const NUM_REGISTERS: usize = 10;

/// The newest interface version; SeaBIOS's vgabios-bochs-display wants exactly it.
pub const ID5: u16 = 0xb0c5;
pub const ENABLED: u16 = 0x01;
// Bit 6 (LFB_ENABLED) chooses the linear framebuffer over banks: there are only the former.
pub const NOCLEARMEM: u16 = 0x80;

/// The smallest mode QEMU scans out; smaller ones are a guest mid-way through a mode set.
const MIN_RESOLUTION: u32 = 64;

/// A mode the framebuffer can show: `height` rows of `stride` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisplayMode {
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub offset: usize,
    pub format: PixelFormat,
}

/// The DISPI register file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispiRegisters {
    regs: [u16; NUM_REGISTERS],
}

impl DispiRegisters {
    /// What the guest reads at `index`; `video_memory` is in bytes.
    pub fn read(&self, index: usize, video_memory: u64) -> u16 {
        match index {
            INDEX_ID => ID5,
            INDEX_VIDEO_MEMORY_64K => (video_memory / 0x1_0000).min(u64::from(u16::MAX)) as u16,
            // Past the register file: as QEMU's bochs-display answers.
            _ => self.regs.get(index).copied().unwrap_or(u16::MAX),
        }
    }

    /// Stores a guest write. The ID and the memory size are read-only; beyond them nothing.
    pub fn write(&mut self, index: usize, value: u16) {
        if index != INDEX_ID {
            if let Some(reg) = self.regs.get_mut(index) {
                *reg = value;
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.regs[INDEX_ENABLE] & ENABLED != 0
    }

    /// The mode the registers describe, if they describe one that fits `video_memory` bytes.
    /// `big_endian` is the framebuffer byte order the QEMU extension registers chose.
    pub fn mode(&self, video_memory: u64, big_endian: bool) -> Option<DisplayMode> {
        if !self.enabled() {
            return None;
        }
        let (bytes_per_pixel, format) = match self.regs[INDEX_BPP] {
            32 if big_endian => (4u32, PixelFormat::X8R8G8B8),
            32 => (4, PixelFormat::B8G8R8X8),
            // 8, 15, 16 and 24 bits a pixel: kept in the registers, not scanned out.
            _ => return None,
        };
        let width = u32::from(self.regs[INDEX_XRES]);
        let height = u32::from(self.regs[INDEX_YRES]);
        if width < MIN_RESOLUTION || height < MIN_RESOLUTION {
            return None;
        }
        let virt_width = u32::from(self.regs[INDEX_VIRT_WIDTH]).max(width);
        // At most 65535 × 4: no overflow in u32, nor below in u64.
        let stride = virt_width * bytes_per_pixel;
        let size = u64::from(stride) * u64::from(height);
        let offset = u64::from(self.regs[INDEX_X_OFFSET]) * u64::from(bytes_per_pixel)
            + u64::from(self.regs[INDEX_Y_OFFSET]) * u64::from(stride);
        if offset + size > video_memory {
            return None;
        }
        Some(DisplayMode { width, height, stride, offset: offset as usize, format })
    }

    /// How much memory enabling the display clears (unless NOCLEARMEM): the rows of the
    /// mode from the start of the memory, as a VGA BIOS's mode set expects to find them.
    pub fn clear_len(&self) -> u64 {
        let bytes_per_pixel = match self.regs[INDEX_BPP] {
            15 | 16 => 2,
            bpp => u64::from(bpp).div_ceil(8),
        };
        let virt_width = self.regs[INDEX_VIRT_WIDTH].max(self.regs[INDEX_XRES]);
        u64::from(virt_width) * bytes_per_pixel * u64::from(self.regs[INDEX_YRES])
    }

    /// The stored registers, for saved state.
    pub fn registers(&self) -> [u16; NUM_REGISTERS] {
        self.regs
    }

    pub fn from_registers(regs: [u16; NUM_REGISTERS]) -> DispiRegisters {
        DispiRegisters { regs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY: u64 = 16 << 20;

    fn with(values: &[(usize, u16)]) -> DispiRegisters {
        let mut r = DispiRegisters::default();
        for &(index, value) in values {
            r.write(index, value);
        }
        r
    }

    fn mode_1024x768() -> DispiRegisters {
        with(&[(INDEX_BPP, 32), (INDEX_XRES, 1024), (INDEX_YRES, 768), (INDEX_ENABLE, 0x41)])
    }

    #[test]
    fn an_enabled_32_bpp_mode_is_shown_with_its_stride_and_panning() {
        let mut r = mode_1024x768();
        assert_eq!(
            r.mode(MEMORY, false),
            Some(DisplayMode {
                width: 1024,
                height: 768,
                stride: 4096,
                offset: 0,
                format: PixelFormat::B8G8R8X8
            })
        );
        r.write(INDEX_VIRT_WIDTH, 1280);
        r.write(INDEX_X_OFFSET, 8);
        r.write(INDEX_Y_OFFSET, 2);
        let m = r.mode(MEMORY, true).unwrap();
        assert_eq!((m.stride, m.offset, m.format), (5120, 2 * 5120 + 32, PixelFormat::X8R8G8B8));
    }

    #[test]
    fn disabled_tiny_other_depth_or_oversized_modes_are_no_mode() {
        let mut r = mode_1024x768();
        r.write(INDEX_ENABLE, 0);
        assert_eq!(r.mode(MEMORY, false), None, "disabled");
        for (index, value) in [
            (INDEX_BPP, 16),
            (INDEX_BPP, 8),
            (INDEX_BPP, 0),
            (INDEX_XRES, 0),
            (INDEX_YRES, 63),
            (INDEX_VIRT_WIDTH, 0xffff),
            (INDEX_Y_OFFSET, 0xffff),
        ] {
            let mut r = mode_1024x768();
            r.write(index, value);
            assert_eq!(r.mode(MEMORY, false), None, "register {index} = {value}");
        }
        let r =
            with(&[(INDEX_BPP, 32), (INDEX_XRES, 0xffff), (INDEX_YRES, 0xffff), (INDEX_ENABLE, 1)]);
        assert_eq!(r.mode(MEMORY, false), None, "65535² does not fit 16 MiB");
        assert_eq!(r.clear_len(), 0xffff * 4 * 0xffff, "no overflow in the clear length");
        let mut r = mode_1024x768();
        r.write(INDEX_X_OFFSET, 0xffff);
        assert!(r.mode(MEMORY, false).is_some(), "panned into later rows, still inside");
        r.write(INDEX_Y_OFFSET, 3264);
        assert!(r.mode(MEMORY, false).is_some(), "ends inside");
        r.write(INDEX_Y_OFFSET, 3265);
        assert_eq!(r.mode(MEMORY, false), None, "one row further ends outside");
    }

    #[test]
    fn id_and_memory_size_are_read_only_and_the_rest_reads_back() {
        let mut r = DispiRegisters::default();
        r.write(INDEX_ID, 0xb0c0);
        r.write(INDEX_VIDEO_MEMORY_64K, 1);
        r.write(11, 7);
        assert_eq!(r.read(INDEX_ID, MEMORY), ID5);
        assert_eq!(r.read(INDEX_VIDEO_MEMORY_64K, MEMORY), 256);
        assert_eq!(r.read(11, MEMORY), 0xffff);
        for index in INDEX_XRES..NUM_REGISTERS {
            r.write(index, 0x100 + index as u16);
            assert_eq!(r.read(index, MEMORY), 0x100 + index as u16);
        }
    }
}
