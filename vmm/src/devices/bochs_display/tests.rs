#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::sync::Arc;

use display::{Rect, SourceId};

use super::dispi::{
    INDEX_BANK, INDEX_BPP, INDEX_ENABLE, INDEX_VIRT_HEIGHT, INDEX_VIRT_WIDTH, INDEX_XRES,
    INDEX_X_OFFSET, INDEX_YRES, INDEX_Y_OFFSET,
};
use super::*;
use crate::pci::config::{BAR0_REG, ROM_BAR_REG};
use crate::testing::assert_hostile_state_is_refused_or_runs;
use crate::virtio::gpu::testing::RecordingScreen;

/// The size of Debian's vgabios-bochs-display.bin, with an option ROM header.
fn vga_bios() -> Vec<u8> {
    let mut rom: Vec<u8> = (0..28672u32).map(|i| (i * 7 % 251) as u8).collect();
    rom[0] = 0x55;
    rom[1] = 0xaa;
    rom[2] = (28672 / 512) as u8;
    rom
}

fn device() -> (BochsDisplay, Arc<RecordingScreen>) {
    let screen = Arc::new(RecordingScreen::default());
    (BochsDisplay::new((1280, 800), &vga_bios(), screen.clone()).unwrap(), screen)
}

fn read(dev: &mut BochsDisplay, bar: u8, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    dev.bar_read(bar, offset, &mut data);
    data
}

fn mmio_read16(dev: &mut BochsDisplay, offset: u64) -> u16 {
    let d = read(dev, MMIO_BAR, offset, 2);
    u16::from_le_bytes([d[0], d[1]])
}

fn mmio_read32(dev: &mut BochsDisplay, offset: u64) -> u32 {
    let d = read(dev, MMIO_BAR, offset, 4);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// QemuVideoDxe's `BochsWrite`: a 16-bit write at 0x500 + (index << 1) in BAR 2.
fn bochs_write(dev: &mut BochsDisplay, index: usize, value: u16) {
    dev.bar_write(MMIO_BAR, 0x500 + ((index as u64) << 1), &value.to_le_bytes());
}

fn bochs_read(dev: &mut BochsDisplay, index: usize) -> u16 {
    mmio_read16(dev, 0x500 + ((index as u64) << 1))
}

/// A vCPU's write into BAR 0: straight into the host memory the root maps there.
fn guest_write(dev: &BochsDisplay, offset: usize, bytes: &[u8]) {
    let bar = dev.bars().into_iter().find(|b| b.index == FRAMEBUFFER_BAR).unwrap();
    let ram = bar.ram.unwrap();
    assert!(offset + bytes.len() <= ram.len() as usize);
    // SAFETY: in bounds (checked above) of the live mapping the device's framebuffer owns,
    // which `ram` keeps alive; written as a guest would, with no Rust reference into it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (ram.host_addr() + offset) as *mut u8,
            bytes.len(),
        );
    }
}

/// QemuVideoDxe's `InitializeBochsGraphicsMode` for a 32-bit mode, write for write
/// (Driver.c), the VGA port accesses going through the 0x400 mirror.
fn ovmf_mode_set(dev: &mut BochsDisplay, width: u16, height: u16) {
    let vga = |port: u64| 0x400 - 0x3c0 + port;
    dev.bar_write(MMIO_BAR, vga(0x3c2), &[0x01]); // MISC_OUTPUT: colour mode
    read(dev, MMIO_BAR, vga(0x3da), 1); // INPUT_STATUS_1: reset the flip-flop
    dev.bar_write(MMIO_BAR, vga(0x3c0), &[0x20]); // ATT_ADDRESS: unblank
    bochs_write(dev, INDEX_ENABLE, 0);
    bochs_write(dev, INDEX_BANK, 0);
    bochs_write(dev, INDEX_X_OFFSET, 0);
    bochs_write(dev, INDEX_Y_OFFSET, 0);
    bochs_write(dev, INDEX_BPP, 32);
    bochs_write(dev, INDEX_XRES, width);
    bochs_write(dev, INDEX_VIRT_WIDTH, width);
    bochs_write(dev, INDEX_YRES, height);
    bochs_write(dev, INDEX_VIRT_HEIGHT, height);
    bochs_write(dev, INDEX_ENABLE, 0x01 | 0x40);
    // SetDefaultPalette: the DAC write index and 256 × RGB, ignored here.
    dev.bar_write(MMIO_BAR, vga(0x3c8), &[0]);
    for i in 0..768u32 {
        dev.bar_write(MMIO_BAR, vga(0x3c9), &[(i % 64) as u8]);
    }
}

#[test]
fn pci_identity_is_qemus_bochs_display() {
    let (mut dev, _) = device();
    assert_eq!(dev.read_config_register(0), 0x1111_1234, "vendor 1234, device 1111");
    assert_eq!(dev.read_config_register(2), 0x0380_0002, "class 03/80/00, revision 2");
    assert_eq!(dev.read_config_register(3) & 0x00ff_0000, 0, "type 0, single function");
    assert_eq!(dev.read_config_register(11), 0x1100_1af4, "subsystem 1af4:1100");
    assert_eq!(dev.read_config_register(15) & 0xff00, 0, "no interrupt pin");
}

#[test]
fn bars_are_a_prefetchable_ram_framebuffer_an_mmio_page_and_the_rom() {
    let (mut dev, _) = device();
    let bars = dev.bars();
    assert_eq!(bars.len(), 3);
    let fb = &bars[0];
    assert_eq!(
        (fb.index, fb.size, fb.kind, fb.prefetchable),
        (0, 16 << 20, PciBarKind::Memory32, true)
    );
    let ram = fb.ram.as_ref().unwrap();
    assert_eq!(ram.len(), 16 << 20);
    assert!(ram.track_dirty(), "the scanner compares only written pages");
    let mmio = &bars[1];
    assert_eq!(
        (mmio.index, mmio.size, mmio.kind, mmio.prefetchable),
        (2, 0x1000, PciBarKind::Memory32, false)
    );
    assert!(mmio.ram.is_none(), "register accesses exit");
    let rom = &bars[2];
    assert_eq!(
        (rom.index, rom.size, rom.kind),
        (ROM_BAR_INDEX, 0x8000, PciBarKind::Rom),
        "28 KiB → 32 KiB"
    );
    for reg in [BAR0_REG, BAR0_REG + 2, ROM_BAR_REG] {
        dev.write_config_register(reg, 0, &u32::MAX.to_le_bytes());
    }
    assert_eq!(dev.read_config_register(BAR0_REG), 0xff00_0008, "16 MiB, 32-bit, prefetchable");
    assert_eq!(dev.read_config_register(BAR0_REG + 1), 0, "BAR 1 unused");
    assert_eq!(dev.read_config_register(BAR0_REG + 2), 0xffff_f000, "4 KiB, 32-bit");
    assert_eq!(dev.read_config_register(ROM_BAR_REG), 0xffff_8001, "32 KiB ROM");
}

#[test]
fn rom_bar_size_is_the_next_power_of_two_of_at_least_2_kib_or_absent() {
    let screen: Arc<RecordingScreen> = Arc::default();
    let rom_size = |bios: &[u8]| {
        let dev = BochsDisplay::new((1024, 768), bios, screen.clone()).unwrap();
        dev.bars().iter().find(|b| b.kind == PciBarKind::Rom).map(|b| b.size)
    };
    assert_eq!(rom_size(&[0x55, 0xaa]), Some(2048));
    assert_eq!(rom_size(&[0; 4097]), Some(8192));
    assert_eq!(rom_size(&[]), None, "no image, no ROM BAR");
    let too_large = vec![0; (16 << 20) + 1];
    assert!(matches!(
        BochsDisplay::new((1024, 768), &too_large, screen.clone()),
        Err(BochsDisplayError::RomTooLarge(_))
    ));
}

#[test]
fn rom_reads_the_vga_bios_padded_with_zeroes() {
    let (mut dev, _) = device();
    let bios = vga_bios();
    assert_eq!(read(&mut dev, ROM_BAR_INDEX, 0, 4), &bios[..4]);
    assert_eq!(read(&mut dev, ROM_BAR_INDEX, 0x1234, 8), &bios[0x1234..0x123c]);
    assert_eq!(read(&mut dev, ROM_BAR_INDEX, 28670, 4), [bios[28670], bios[28671], 0, 0]);
    assert_eq!(read(&mut dev, ROM_BAR_INDEX, 0x7ffe, 4), [0, 0, 0xff, 0xff], "past the BAR");
    dev.bar_write(ROM_BAR_INDEX, 0, &[0]);
    assert_eq!(read(&mut dev, ROM_BAR_INDEX, 0, 1), [0x55], "read-only");
}

#[test]
fn dispi_id_is_b0c5_and_every_register_reads_back() {
    let (mut dev, _) = device();
    assert_eq!(bochs_read(&mut dev, 0), 0xb0c5);
    bochs_write(&mut dev, 0, 0xb0c0);
    assert_eq!(bochs_read(&mut dev, 0), 0xb0c5, "the ID is fixed");
    assert_eq!(bochs_read(&mut dev, 0xa), 256, "16 MiB in 64 KiB units");
    bochs_write(&mut dev, 0xa, 1);
    assert_eq!(bochs_read(&mut dev, 0xa), 256, "read-only");
    let values = [
        (INDEX_XRES, 800),
        (INDEX_YRES, 600),
        (INDEX_BPP, 24),
        (INDEX_ENABLE, 0x41),
        (INDEX_BANK, 3),
        (INDEX_VIRT_WIDTH, 832),
        (INDEX_VIRT_HEIGHT, 1200),
        (INDEX_X_OFFSET, 16),
        (INDEX_Y_OFFSET, 600),
    ];
    for (index, value) in values {
        bochs_write(&mut dev, index, value);
    }
    for (index, value) in values {
        assert_eq!(bochs_read(&mut dev, index), value, "register {index}");
    }
    for bpp in [8, 15, 16, 24, 32] {
        bochs_write(&mut dev, INDEX_BPP, bpp);
        assert_eq!(bochs_read(&mut dev, INDEX_BPP), bpp);
    }
    // Wider and narrower accesses split into the 16-bit registers.
    assert_eq!(mmio_read32(&mut dev, 0x500), 0xb0c5 | 800 << 16);
    dev.bar_write(MMIO_BAR, 0x502, &[0x20, 0x03, 0x58, 0x02]);
    assert_eq!((bochs_read(&mut dev, INDEX_XRES), bochs_read(&mut dev, INDEX_YRES)), (800, 600));
    dev.bar_write(MMIO_BAR, 0x503, &[0x04]);
    assert_eq!(bochs_read(&mut dev, INDEX_XRES), 0x0420, "a byte write keeps the other byte");
    assert_eq!(read(&mut dev, MMIO_BAR, 0x501, 1), [0xb0]);
    assert_eq!(mmio_read16(&mut dev, 0x516), 0xffff, "past the registers");
}

#[test]
fn qemu_extension_registers_report_size_8_and_the_byte_order() {
    let (mut dev, screen) = device();
    assert_eq!(mmio_read32(&mut dev, 0x600), 8);
    assert_eq!(mmio_read32(&mut dev, 0x604), 0x1e1e_1e1e, "little-endian");
    ovmf_mode_set(&mut dev, 640, 480);
    guest_write(&dev, 0, &[0x11, 0x22, 0x33, 0x00]);
    dev.bar_write(MMIO_BAR, 0x604, &0xbebe_bebeu32.to_le_bytes());
    assert_eq!(mmio_read32(&mut dev, 0x604), 0xbebe_bebe);
    dev.scanout().scan(&*screen, false);
    let fb = dev.scanout();
    assert_eq!(lock(fb.framebuffer()).format(), display::PixelFormat::X8R8G8B8);
    dev.bar_write(MMIO_BAR, 0x604, &0x1234_5678u32.to_le_bytes());
    assert_eq!(mmio_read32(&mut dev, 0x604), 0xbebe_bebe, "other values change nothing");
    dev.bar_write(MMIO_BAR, 0x604, &0x1e1e_1e1eu32.to_le_bytes());
    assert_eq!(lock(fb.framebuffer()).format(), display::PixelFormat::B8G8R8X8);
    dev.bar_write(MMIO_BAR, 0x600, &0u32.to_le_bytes());
    assert_eq!(mmio_read32(&mut dev, 0x600), 8, "read-only");
}

#[test]
fn edid_at_the_start_of_bar2_is_valid_and_prefers_the_window_size() {
    let (mut dev, _) = device();
    let e = read(&mut dev, MMIO_BAR, 0, 128);
    assert_eq!(&e[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    assert_eq!(e.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "checksum");
    // What QemuVideoBochsEdid parses.
    assert_ne!((e[54], e[55]), (0, 0), "a detailed timing");
    let x = u32::from(e[56]) | (u32::from(e[58]) & 0xf0) << 4;
    let y = u32::from(e[59]) | (u32::from(e[61]) & 0xf0) << 4;
    assert_eq!((x, y), (1280, 800));
    assert_eq!(read(&mut dev, MMIO_BAR, 0x80, 4), [0; 4], "one block, no extensions");
    dev.bar_write(MMIO_BAR, 0, &[0xff]);
    assert_eq!(read(&mut dev, MMIO_BAR, 0, 1), [0], "read-only");
}

#[test]
fn vga_port_mirror_ignores_writes_and_reads_all_ones() {
    let (mut dev, _) = device();
    let before = dev.save_state().unwrap();
    for offset in 0x400..0x420 {
        dev.bar_write(MMIO_BAR, offset, &[0x5a]);
        assert_eq!(read(&mut dev, MMIO_BAR, offset, 1), [0xff]);
    }
    assert_eq!(dev.save_state().unwrap(), before);
}

#[test]
fn ovmf_mode_set_reports_the_mode_and_scans_out_what_the_guest_drew() {
    let (mut dev, screen) = device();
    // QemuVideoDxe's checks before it sets a mode.
    assert_eq!(bochs_read(&mut dev, 0) & 0xfff0, 0xb0c0);
    let available = u32::from(bochs_read(&mut dev, 0xa)) * 0x1_0000;
    assert!(available >= 1280 * 800 * 4, "the EDID mode is offered");
    let scanout = dev.scanout();
    assert!(!scanout.is_live());
    ovmf_mode_set(&mut dev, 1280, 800);
    assert!(scanout.is_live());
    assert_eq!(*screen.modes.lock().unwrap(), [(SourceId::BootFramebuffer, Some((1280, 800)))]);
    // The guest draws (BGRX) at (0, 0), (1279, 0) and (17, 799).
    guest_write(&dev, 0, &[0x01, 0x02, 0x03, 0x00]);
    guest_write(&dev, 1279 * 4, &[0x40, 0x50, 0x60, 0x00]);
    guest_write(&dev, (799 * 1280 + 17) * 4, &[0xff, 0x00, 0x80, 0x00]);
    scanout.scan(&*screen, false);
    assert_eq!(
        screen.updates(),
        [(SourceId::BootFramebuffer, Rect::new(0, 0, 1280, 800))],
        "a new mode is sent whole"
    );
    assert_eq!(screen.pixel(0, 0), Some(0x0003_0201));
    assert_eq!(screen.pixel(1279, 0), Some(0x0060_5040));
    assert_eq!(screen.pixel(17, 799), Some(0x0080_00ff));
    assert_eq!(screen.pixel(1, 0), Some(0));
    // Then only what changes.
    guest_write(&dev, (100 * 1280 + 200) * 4, &[9, 9, 9, 0]);
    scanout.scan(&*screen, false);
    assert_eq!(screen.updates()[1], (SourceId::BootFramebuffer, Rect::new(192, 96, 64, 16)));
    assert_eq!(screen.pixel(200, 100), Some(0x0009_0909));
    // A second mode set (GOP SetMode) to a smaller mode.
    ovmf_mode_set(&mut dev, 800, 600);
    assert_eq!(
        screen.modes.lock().unwrap().last(),
        Some(&(SourceId::BootFramebuffer, Some((800, 600))))
    );
}

#[test]
fn seabios_vgabios_mode_set_shows_its_1024x768_text_console() {
    // vgasrc/bochsdisplay.c: bochs_display_setup, word and byte accesses to BAR 2.
    let (mut dev, screen) = device();
    assert_eq!(bochs_read(&mut dev, 0), 0xb0c5, "it wants exactly ID5");
    let edid = read(&mut dev, MMIO_BAR, 0, 128);
    assert_eq!(edid[1], 0xff);
    bochs_write(&mut dev, INDEX_XRES, 1024);
    bochs_write(&mut dev, INDEX_YRES, 768);
    bochs_write(&mut dev, INDEX_BPP, 32);
    bochs_write(&mut dev, INDEX_ENABLE, 0x01); // no LFB bit, no VIRT_WIDTH: still linear
    dev.bar_write(MMIO_BAR, 0x400, &[0x20]);
    assert_eq!(*screen.modes.lock().unwrap(), [(SourceId::BootFramebuffer, Some((1024, 768)))]);
    guest_write(&dev, (767 * 1024 + 1023) * 4, &[0xaa, 0xaa, 0xaa, 0]);
    dev.scanout().scan(&*screen, false);
    assert_eq!(screen.pixel(1023, 767), Some(0x00aa_aaaa));
}

#[test]
fn enabling_clears_the_framebuffer_unless_noclearmem() {
    let (mut dev, screen) = device();
    guest_write(&dev, 0, &[7; 16]);
    ovmf_mode_set(&mut dev, 640, 480);
    dev.scanout().scan(&*screen, false);
    assert_eq!(screen.pixel(0, 0), Some(0), "cleared on enable");

    guest_write(&dev, 0, &[7; 16]);
    bochs_write(&mut dev, INDEX_ENABLE, 0);
    bochs_write(&mut dev, INDEX_ENABLE, 0x01 | 0x40 | 0x80);
    dev.scanout().scan(&*screen, false);
    assert_eq!(screen.pixel(0, 0), Some(0x0707_0707), "kept with NOCLEARMEM");
    bochs_write(&mut dev, INDEX_ENABLE, 0x41);
    dev.scanout().scan(&*screen, false);
    assert_eq!(screen.pixel(0, 0), Some(0x0707_0707), "only a disabled → enabled write clears");
}

#[test]
fn panning_and_virtual_width_move_the_scanned_rows() {
    let (mut dev, screen) = device();
    ovmf_mode_set(&mut dev, 640, 480);
    bochs_write(&mut dev, INDEX_VIRT_WIDTH, 1024);
    bochs_write(&mut dev, INDEX_Y_OFFSET, 480);
    bochs_write(&mut dev, INDEX_X_OFFSET, 8);
    // Pixel (3, 2) of the view is at row 482, column 11 of the 1024-pixel virtual screen.
    guest_write(&dev, (482 * 1024 + 11) * 4, &[0xaa, 0xbb, 0xcc, 0]);
    dev.scanout().scan(&*screen, false);
    assert_eq!(screen.pixel(3, 2), Some(0x00cc_bbaa));
    assert_eq!(
        screen.modes.lock().unwrap().last(),
        Some(&(SourceId::BootFramebuffer, Some((640, 480))))
    );
}

#[test]
fn modes_that_do_not_fit_or_are_not_32_bpp_stop_the_scan_and_keep_the_last_frame() {
    let (mut dev, screen) = device();
    ovmf_mode_set(&mut dev, 640, 480);
    let scanout = dev.scanout();
    scanout.scan(&*screen, false);
    let sent = screen.updates().len();
    let modes = screen.modes.lock().unwrap().len();
    let bad: [&[(usize, u16)]; 7] = [
        &[(INDEX_XRES, 0xffff), (INDEX_YRES, 0xffff)],
        &[(INDEX_VIRT_WIDTH, 0xffff), (INDEX_YRES, 0xffff)],
        &[(INDEX_Y_OFFSET, 0xffff)],
        &[(INDEX_Y_OFFSET, 0x1800), (INDEX_X_OFFSET, 0xffff)],
        &[(INDEX_XRES, 0)],
        &[(INDEX_YRES, 1)],
        &[(INDEX_BPP, 16)],
    ];
    for writes in bad {
        ovmf_mode_set(&mut dev, 640, 480);
        for &(index, value) in writes {
            bochs_write(&mut dev, index, value);
        }
        assert!(!scanout.is_live(), "{writes:?}");
        guest_write(&dev, (16 << 20) - 4, &[1, 2, 3, 4]);
        scanout.scan(&*screen, true);
    }
    assert_eq!(screen.updates().len(), sent, "no bad mode was scanned");
    assert_eq!(screen.modes.lock().unwrap().len(), modes + 7, "only the good mode sets");
    assert_eq!(
        screen.modes.lock().unwrap().last(),
        Some(&(SourceId::BootFramebuffer, Some((640, 480))))
    );
    ovmf_mode_set(&mut dev, 640, 480);
    bochs_write(&mut dev, INDEX_ENABLE, 0);
    guest_write(&dev, 0, &[5; 4]);
    scanout.scan(&*screen, true);
    assert_eq!(screen.updates().len(), sent, "disabled: nothing is sent");
    assert!(
        screen.modes.lock().unwrap().iter().all(|m| m.1.is_some()),
        "and the sink keeps its last frame"
    );
}

#[test]
fn odd_accesses_never_panic() {
    let (mut dev, screen) = device();
    for bar in [0, 1, 2, 3, 5, ROM_BAR_INDEX, 7, 0xff] {
        for offset in [0, 1, 0x3ff, 0x4ff, 0x514, 0x515, 0x5ff, 0x606, 0xfff, 0x7fff, u64::MAX - 2]
        {
            for len in [0, 1, 2, 3, 4, 8] {
                let mut data = vec![0; len];
                dev.bar_read(bar, offset, &mut data);
                dev.bar_write(bar, offset, &vec![0xff; len]);
            }
        }
    }
    dev.scanout().scan(&*screen, true);
}

#[test]
fn saved_state_round_trips_registers_and_the_drawn_framebuffer() {
    let (mut dev, _) = device();
    dev.write_config_register(BAR0_REG, 0, &0xc000_0000u32.to_le_bytes());
    dev.write_config_register(1, 0, &[0x02]);
    ovmf_mode_set(&mut dev, 1024, 768);
    guest_write(&dev, (10 * 1024 + 20) * 4, &[0x10, 0x20, 0x30, 0]);
    let saved = dev.save_state().unwrap();
    let decoded: BochsDisplayState = crate::state::decode("test", &saved).unwrap();
    assert_eq!(decoded.framebuffer.len(), 11 * 4096, "up to the last drawn page");

    let (mut fresh, screen) = device();
    fresh.restore_state(&saved).unwrap();
    assert_eq!(fresh.save_state().unwrap(), saved);
    assert_eq!(fresh.read_config_register(BAR0_REG), 0xc000_0008);
    assert_eq!(bochs_read(&mut fresh, INDEX_XRES), 1024);
    assert_eq!(*screen.modes.lock().unwrap(), [(SourceId::BootFramebuffer, Some((1024, 768)))]);
    fresh.scanout().scan(&*screen, false);
    assert_eq!(screen.updates(), [(SourceId::BootFramebuffer, Rect::new(0, 0, 1024, 768))]);
    assert_eq!(screen.pixel(20, 10), Some(0x0030_2010));
}

#[test]
fn hostile_saved_state_is_refused_or_leaves_a_working_display() {
    let (mut dev, _) = device();
    ovmf_mode_set(&mut dev, 640, 480);
    // An empty framebuffer keeps the state small enough to garble every byte.
    let saved = dev.save_state().unwrap();
    assert_hostile_state_is_refused_or_runs(
        &saved,
        || device().0,
        // Registers only: saving scans 16 MiB for the used part, too slow for every byte.
        |d| (d.config.registers(), d.dispi.clone(), d.big_endian_framebuffer, d.shown),
        |d, bytes| d.restore_state(bytes),
        |d| {
            bochs_write(d, INDEX_ENABLE, 0x41);
            let screen = RecordingScreen::default();
            d.scanout().scan(&screen, true);
            read(d, MMIO_BAR, 0x500, 0x16);
        },
    );
}
