#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::fw_cfg::apply::{FakeFirmware, FSEG_END, FSEG_START};
use crate::devices::fw_cfg::keys;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn memory_for(ram: u64) -> GuestMemory {
    // Only the low part is needed for the fake firmware's allocations.
    let low = ram.min(64 * MIB);
    GuestMemory::from_ranges(&[(GuestAddress(0), low as usize)]).unwrap()
}

/// Reads fixed item `key` through the port interface, as OVMF's first probe does.
fn pio_item(fw_cfg: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
    fw_cfg.write(0, &key.to_le_bytes());
    let mut out = vec![0u8; len];
    for b in &mut out {
        let mut byte = [0u8];
        fw_cfg.read(1, &mut byte);
        *b = byte[0];
    }
    out
}

fn read_file(fw: &mut FakeFirmware<'_>, name: &str) -> Vec<u8> {
    let (key, size) = fw.find_file(name).unwrap_or_else(|| panic!("no {name}"));
    fw.fw_cfg.write(0, &key.to_le_bytes());
    let mut out = vec![0u8; size];
    for b in &mut out {
        let mut byte = [0u8];
        fw.fw_cfg.read(1, &mut byte);
        *b = byte[0];
    }
    out
}

#[test]
fn small_ram_lies_below_the_ecam_in_one_region() {
    assert_eq!(ram_regions(512 * MIB), vec![(0, 512 * MIB)]);
    assert_eq!(ram_regions(LOW_RAM_MAX), vec![(0, LOW_RAM_MAX)]);
}

#[test]
fn ram_beyond_2816_mib_continues_at_4_gib() {
    let regions = ram_regions(4 * GIB);
    assert_eq!(regions, vec![(0, 0xb000_0000), (4 * GIB, 4 * GIB - 0xb000_0000)]);
    let total: u64 = regions.iter().map(|r| r.1).sum();
    assert_eq!(total, 4 * GIB);
}

#[test]
fn e820_lists_the_ram_and_reserves_the_kvm_pages() {
    assert_eq!(
        e820_entries(512 * MIB),
        vec![(0, 512 * MIB, E820_RAM), (0xfeff_c000, 0x4000, E820_RESERVED)]
    );
    assert_eq!(
        e820_entries(6 * GIB),
        vec![
            (0, 0xb000_0000, E820_RAM),
            (0xfeff_c000, 0x4000, E820_RESERVED),
            (4 * GIB, 6 * GIB - 0xb000_0000, E820_RAM),
        ]
    );
}

#[test]
fn nothing_of_the_layout_overlaps() {
    for ram in [128 * MIB, 2816 * MIB, 3 * GIB, 40 * GIB] {
        let high_end = ram_regions(ram).last().map(|r| r.0 + r.1).unwrap();
        let mmio64 = mmio64_window(ram);
        assert!(mmio64.start >= high_end.max(4 * GIB), "{ram:#x}: 64-bit window over RAM");
        assert_eq!(mmio64.start % GIB, 0);
        assert_eq!(mmio64.start + mmio64.size, MMIO64_END);
        let low_end = ram_regions(ram)[0].1;
        assert!(low_end <= ECAM_BASE);
    }
    // The firmware area lies above KVM's pages and ends at 4 GiB.
    assert_eq!(FIRMWARE_AREA_START, 0xff00_0000);
    assert_eq!(FIRMWARE_AREA_START + MAX_FIRMWARE_BYTES, FOUR_GIB);
}

#[test]
fn fw_cfg_carries_the_signature_dma_and_cpu_counts() {
    let mut fw_cfg = new_fw_cfg(memory_for(512 * MIB), 512 * MIB, 3, true).unwrap();
    assert_eq!(pio_item(&mut fw_cfg, keys::SIGNATURE, 4), b"QEMU");
    let id = u32::from_le_bytes(pio_item(&mut fw_cfg, keys::ID, 4).try_into().unwrap());
    assert_eq!(id & 0b11, 0b11, "traditional interface and DMA");
    assert_eq!(pio_item(&mut fw_cfg, keys::NB_CPUS, 2), 3u16.to_le_bytes());
    assert_eq!(pio_item(&mut fw_cfg, keys::MAX_CPUS, 2), 3u16.to_le_bytes());
    assert_eq!(pio_item(&mut fw_cfg, keys::NOGRAPHIC, 2), 1u16.to_le_bytes());
    assert_eq!(pio_item(&mut fw_cfg, keys::BOOT_MENU, 2), 0u16.to_le_bytes());
}

#[test]
fn fw_cfg_e820_file_is_the_layout() {
    let ram = 5 * GIB;
    let memory = memory_for(ram);
    let mut fw_cfg = new_fw_cfg(memory.clone(), ram, 1, true).unwrap();
    let mut fw = FakeFirmware::new(&mut fw_cfg, memory, 8 * MIB, 0x10000);
    let e820 = read_file(&mut fw, "etc/e820");
    let entries: Vec<(u64, u64, u32)> = e820
        .chunks_exact(20)
        .map(|e| {
            (
                u64::from_le_bytes(e[0..8].try_into().unwrap()),
                u64::from_le_bytes(e[8..16].try_into().unwrap()),
                u32::from_le_bytes(e[16..20].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(entries, e820_entries(ram));
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Runs the table-loader as firmware would and returns the tables, keyed by signature.
fn linked_tables(ram: u64, vcpus: u32) -> std::collections::BTreeMap<String, Vec<u8>> {
    let memory = memory_for(ram);
    let mut fw_cfg = new_fw_cfg(memory.clone(), ram, vcpus, true).unwrap();
    FakeFirmware::new(&mut fw_cfg, memory.clone(), 8 * MIB, 0x10000).run_table_loader();
    let read = |addr: u64, len: usize| {
        let mut v = vec![0u8; len];
        memory.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    };
    let rsdp = (FSEG_START..FSEG_END)
        .step_by(16)
        .find(|&a| read(a, 8) == b"RSD PTR ")
        .expect("RSDP in the F segment");
    let table = |addr: u64| {
        let len = u32_at(&read(addr, 8), 4) as usize;
        let t = read(addr, len);
        assert_eq!(t.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0, "checksum");
        t
    };
    let xsdt = table(u64_at(&read(rsdp, 36), 24));
    let mut tables = std::collections::BTreeMap::new();
    for i in (36..xsdt.len()).step_by(8) {
        let t = table(u64_at(&xsdt, i));
        if &t[..4] == b"FACP" {
            tables.insert("DSDT".to_string(), table(u64_at(&t, fadt::X_DSDT)));
        }
        tables.insert(String::from_utf8_lossy(&t[..4]).into_owned(), t);
    }
    tables
}

#[test]
fn fadt_describes_the_ich9_pm_block_reset_register_and_century() {
    let tables = linked_tables(512 * MIB, 2);
    let f = &tables["FACP"];
    assert_eq!(u32_at(f, fadt::PM1A_EVT_BLK), 0x600);
    assert_eq!(u32_at(f, fadt::PM1A_CNT_BLK), 0x604);
    assert_eq!(u32_at(f, fadt::PM_TMR_BLK), 0x608);
    assert_eq!(u32_at(f, fadt::GPE0_BLK), 0x620);
    assert_eq!(f[fadt::GPE0_BLK_LEN], 16);
    assert_eq!(u64_at(f, fadt::X_PM_TMR_BLK + 4), 0x608);
    assert_eq!(u64_at(f, fadt::RESET_REG + 4), 0xcf9);
    assert_eq!(f[fadt::RESET_VALUE], 0x06);
    assert_eq!(f[fadt::CENTURY], 0x32);
    let boot_arch = u16::from_le_bytes([f[fadt::IAPC_BOOT_ARCH], f[fadt::IAPC_BOOT_ARCH + 1]]);
    assert_eq!(boot_arch, fadt::BOOT_ARCH_LEGACY_DEVICES | fadt::BOOT_ARCH_8042);
}

#[test]
fn mcfg_names_the_ecam_at_0xb0000000_for_256_buses() {
    let tables = linked_tables(512 * MIB, 1);
    let m = &tables["MCFG"];
    assert_eq!(u64_at(m, 44), ECAM_BASE);
    assert_eq!(&m[52..56], &[0, 0, 0, 255]);
}

#[test]
fn dsdt_has_the_windows_and_the_lpc_devices() {
    let ram = 6 * GIB;
    let tables = linked_tables(ram, 1);
    let d = &tables["DSDT"];
    let has = |bytes: &[u8]| d.windows(bytes.len()).any(|w| w == bytes);
    for name in [&b"PCI0"[..], b"COM1", b"RTC_", b"KBD_", b"MOU_", b"FWCF", b"MRES", b"QEMU0002"] {
        assert!(has(name), "{} missing", String::from_utf8_lossy(name));
    }
    // The windows' bounds, as the DWord and QWord descriptors hold them.
    assert!(has(&(MMIO32_START as u32).to_le_bytes()));
    assert!(has(&((MMIO32_END - 1) as u32).to_le_bytes()));
    let mmio64 = mmio64_window(ram);
    assert!(has(&mmio64.start.to_le_bytes()));
    assert!(has(&(mmio64.start + mmio64.size - 1).to_le_bytes()));
}

#[test]
fn the_acpi_files_keep_their_lengths_when_built_again_after_a_reset() {
    let memory = memory_for(512 * MIB);
    let mut fw_cfg = new_fw_cfg(memory.clone(), 512 * MIB, 4, true).unwrap();
    let sizes = |fw_cfg: &mut FwCfg| {
        let mut fw = FakeFirmware::new(fw_cfg, memory.clone(), 8 * MIB, 0x10000);
        [acpi_fw::TABLE_LOADER_FILE, acpi_fw::ACPI_TABLES_FILE, acpi_fw::ACPI_RSDP_FILE]
            .map(|name| fw.find_file(name).unwrap().1)
    };
    let before = sizes(&mut fw_cfg);
    FakeFirmware::new(&mut fw_cfg, memory.clone(), 8 * MIB, 0x10000).run_table_loader();
    fw_cfg.reset();
    assert_eq!(sizes(&mut fw_cfg), before);
}

#[test]
fn a_firmware_image_that_is_not_whole_pages_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.fd");
    std::fs::write(&path, vec![0u8; 4097]).unwrap();
    let err = load_rom(&path).err().unwrap();
    assert!(matches!(err, Q35Error::FirmwareSize { size: 4097, .. }), "{err:?}");
    assert!(err.to_string().contains("odd.fd"));
    let missing = dir.path().join("missing.fd");
    let err = load_rom(&missing).err().unwrap();
    assert!(err.to_string().contains("missing.fd"), "{err}");
}

#[test]
fn a_firmware_image_is_loaded_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("code.fd");
    let bytes: Vec<u8> = (0..0x2000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let (region, size) = load_rom(&path).unwrap();
    assert_eq!(size, 0x2000);
    // SAFETY: the region is 0x2000 bytes and nothing writes it meanwhile.
    let loaded = unsafe { std::slice::from_raw_parts(region.as_ptr(), 0x2000) };
    assert_eq!(loaded, &bytes[..]);
}

/// A VM that records its memory slots; the board test never runs a vCPU.
#[derive(Default)]
struct RecordingVm(Mutex<Vec<(u64, u64, bool)>>);

impl InterruptSink for RecordingVm {
    fn set_irq_line(&self, _gsi: u32, _active: bool) -> crate::hypervisor::Result<()> {
        Ok(())
    }
    fn signal_msi(&self, _address: u64, _data: u32) -> crate::hypervisor::Result<()> {
        Ok(())
    }
}

impl crate::hypervisor::Vm for RecordingVm {
    unsafe fn map_memory(
        &self,
        mapping: crate::hypervisor::GuestRamMapping,
    ) -> crate::hypervisor::Result<()> {
        lock(&self.0).push((mapping.guest_addr, mapping.size, mapping.readonly));
        Ok(())
    }
    fn unmap_memory(&self, _slot: u32, _addr: u64, _size: u64) -> crate::hypervisor::Result<()> {
        Ok(())
    }
    fn create_vcpu(&self, _id: u32) -> crate::hypervisor::Result<Box<dyn ArchVcpu>> {
        Err(HypervisorError::Unsupported("vCPUs in a board test"))
    }
    fn save_state(&self) -> crate::hypervisor::Result<crate::hypervisor::VmState> {
        Ok(crate::hypervisor::VmState { backend: "test".into(), blobs: Default::default() })
    }
    fn restore_state(&self, _state: &crate::hypervisor::VmState) -> crate::hypervisor::Result<()> {
        Ok(())
    }
}

/// A vCPU that counts every change of its registers.
#[derive(Default)]
struct CountingVcpu(u32);

impl crate::hypervisor::Vcpu for CountingVcpu {
    fn id(&self) -> u32 {
        0
    }
    fn run(
        &mut self,
        _handler: &mut dyn crate::hypervisor::ExitHandler,
    ) -> crate::hypervisor::Result<crate::hypervisor::VcpuExit> {
        Err(HypervisorError::Unsupported("running"))
    }
    fn kicker(&self) -> Arc<dyn crate::hypervisor::VcpuKicker> {
        struct NoKick;
        impl crate::hypervisor::VcpuKicker for NoKick {
            fn kick(&self) {}
        }
        Arc::new(NoKick)
    }
    fn save_state(&self) -> crate::hypervisor::Result<crate::hypervisor::VcpuState> {
        Ok(Default::default())
    }
    fn restore_state(
        &mut self,
        _state: &crate::hypervisor::VcpuState,
    ) -> crate::hypervisor::Result<()> {
        self.0 += 1;
        Ok(())
    }
}

impl crate::hypervisor::VcpuX86_64 for CountingVcpu {
    fn regs(&self) -> crate::hypervisor::Result<crate::hypervisor::X86Regs> {
        Ok(Default::default())
    }
    fn set_regs(&mut self, _regs: &crate::hypervisor::X86Regs) -> crate::hypervisor::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn sregs(&self) -> crate::hypervisor::Result<crate::hypervisor::X86Sregs> {
        Ok(Default::default())
    }
    fn set_sregs(&mut self, _sregs: &crate::hypervisor::X86Sregs) -> crate::hypervisor::Result<()> {
        self.0 += 1;
        Ok(())
    }
}

const CODE_SIZE: u64 = 0x2_0000;
const VARS_SIZE: u64 = 0x8000;

/// A Q35 board built on a recording VM with a 128 KiB CODE image ending in 0xC3 and a 32 KiB
/// store starting "VARS".
struct Built {
    board: Q35Board,
    vm: Arc<RecordingVm>,
    io: IoBuses,
    _dir: tempfile::TempDir,
    memory: GuestMemory,
    firmware: FirmwareBoot,
    display: Option<DisplayDevices>,
    saved: Vec<SavedDevice>,
    pci: Arc<Mutex<PciRoot>>,
}

/// What a test board is built with besides the firmware.
#[derive(Default)]
struct Extras {
    net: Option<crate::board::NetAttachment>,
    /// A screen, and the VGA BIOS bytes (None: no VGA BIOS path in the firmware).
    screen: Option<Option<Vec<u8>>>,
}

fn build_board() -> Built {
    build_board_with(None)
}

fn build_board_with(net: Option<crate::board::NetAttachment>) -> Built {
    try_build_board(Extras { net, ..Extras::default() }).unwrap()
}

/// A board with a screen whose VGA BIOS is `vga_bios` (None: the firmware names none).
fn build_board_with_screen(vga_bios: Option<Vec<u8>>) -> Built {
    try_build_board(Extras { screen: Some(vga_bios), ..Extras::default() }).unwrap()
}

fn try_build_board(extras: Extras) -> Result<Built, BoardError> {
    let Extras { net, screen } = extras;
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("code.fd");
    let mut image = vec![0u8; CODE_SIZE as usize];
    *image.last_mut().unwrap() = 0xc3;
    std::fs::write(&code, image).unwrap();
    let vars = dir.path().join("vars.fd");
    let mut store = vec![0xffu8; VARS_SIZE as usize];
    store[..4].copy_from_slice(b"VARS");
    std::fs::write(&vars, store).unwrap();
    let mut firmware = FirmwareBoot { code, vars: Some(vars), vga_bios: None };
    let screen = screen.map(|vga_bios| {
        if let Some(bytes) = vga_bios {
            let path = dir.path().join("vgabios-bochs-display.bin");
            // An empty file stands for a missing one.
            if !bytes.is_empty() {
                std::fs::write(&path, bytes).unwrap();
            }
            firmware.vga_bios = Some(path);
        }
        let frame = dir.path().join("screen.shm");
        let writer = display::frame::FrameWriter::create(&frame, 1920, 1080).unwrap();
        Arc::new(display::scanout::Screen::new(writer))
    });

    let vm = Arc::new(RecordingVm::default());
    let memory = GuestMemory::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap();
    let dyn_vm: Arc<dyn crate::hypervisor::Vm> = vm.clone();
    let guest_map = Arc::new(crate::memory::slots::VmMemory::new(dyn_vm.clone()));
    let boot = BootSource::Firmware(firmware.clone());
    let mut board = Q35Board::new();
    let devices = board.build_devices(BoardContext {
        vm: &dyn_vm,
        memory: &memory,
        irq: dyn_vm.clone(),
        serial_out: Box::new(std::io::sink()),
        screen,
        disks: &[],
        on_poweroff: Box::new(|| {}),
        on_reset: Box::new(|| {}),
        guest_map: &guest_map,
        vcpu_count: 2,
        boot: &boot,
        net,
    })?;
    Ok(Built {
        board,
        vm,
        io: devices.io,
        _dir: dir,
        memory,
        firmware,
        display: devices.display,
        saved: devices.saved,
        pci: devices.pci,
    })
}

/// Bus, device and function as CONFIG_ADDRESS holds them (bits 23..8).
fn config_bits(bdf: Bdf) -> u32 {
    (u32::from(bdf.bus()) << 16)
        | (u32::from(bdf.device()) << 11)
        | (u32::from(bdf.function()) << 8)
}

fn pio_read32(io: &IoBuses, port: u16) -> u32 {
    let mut data = [0u8; 4];
    if !io.pio.read(u64::from(port), &mut data) {
        return u32::MAX;
    }
    u32::from_le_bytes(data)
}

fn config_read32(io: &IoBuses, bdf: Bdf, reg: u8) -> u32 {
    let address = 0x8000_0000 | config_bits(bdf) | u32::from(reg);
    assert!(io.pio.write(0xcf8, &address.to_le_bytes()));
    pio_read32(io, 0xcfc)
}

fn config_write32(io: &IoBuses, bdf: Bdf, reg: u8, value: u32) {
    let address = 0x8000_0000 | config_bits(bdf) | u32::from(reg);
    assert!(io.pio.write(0xcf8, &address.to_le_bytes()));
    assert!(io.pio.write(0xcfc, &value.to_le_bytes()));
}

#[test]
fn the_firmware_code_is_read_only_memory_ending_at_4_gib_with_the_store_right_below() {
    let built = build_board();
    let slots = lock(&built.vm.0).clone();
    let code_base = FOUR_GIB - CODE_SIZE;
    assert!(slots.contains(&(code_base, CODE_SIZE, true)), "{slots:x?}");
    assert_eq!(built.board.firmware_base(), Some(code_base));
    // The store is trapped MMIO (no slot), in read-array mode.
    assert!(slots.iter().all(|&(base, _, _)| base != code_base - VARS_SIZE));
    let mut head = [0u8; 4];
    assert!(built.io.mmio.read(code_base - VARS_SIZE, &mut head));
    assert_eq!(&head, b"VARS");
    // Below the store nothing answers: an all-ones read for the firmware's probes.
    assert!(!built.io.mmio.read(code_base - VARS_SIZE - 4, &mut head));
}

#[test]
fn firmware_finds_the_q35_chipset_at_its_addresses() {
    let built = build_board();
    let io = &built.io;
    let mch = Bdf::new(0, 0, 0).unwrap();
    assert_eq!(config_read32(io, mch, 0), 0x29c0_8086);
    assert_eq!(config_read32(io, mch, 0x2c), 0x1100_1af4, "subsystem: SeaBIOS's QEMU check");
    assert_eq!(config_read32(io, LPC_BDF, 0), 0x2918_8086);
    assert_eq!(config_read32(io, LPC_BDF, 8) >> 16, 0x0601, "an ISA bridge for SioBusDxe");
    // fw_cfg's signature through its ports.
    assert!(io.pio.write(fw_cfg::FW_CFG_PORT_BASE, &0u16.to_le_bytes()));
    let mut sig = [0u8; 4];
    for b in &mut sig {
        let mut byte = [0u8];
        assert!(io.pio.read(fw_cfg::FW_CFG_PORT_BASE + 1, &mut byte));
        *b = byte[0];
    }
    assert_eq!(&sig, b"QEMU");
}

#[test]
fn a_nic_from_the_context_is_a_virtio_net_function_after_the_rng() {
    let rng = Bdf::new(0, 1, 0).unwrap();
    let after_rng = Bdf::new(0, 2, 0).unwrap();
    let without = build_board();
    assert_eq!(config_read32(&without.io, rng, 0), 0x1044_1af4, "virtio-rng");
    assert_eq!(config_read32(&without.io, after_rng, 0), u32::MAX, "no card: nothing after it");

    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    let user = net::slirp::UserNet::new(net::slirp::UserNetConfig {
        guest_mac: mac,
        ..Default::default()
    })
    .unwrap();
    let with = build_board_with(Some(crate::board::NetAttachment {
        mac,
        mtu: 1500,
        backend: Box::new(user),
    }));
    assert_eq!(config_read32(&with.io, rng, 0), 0x1044_1af4, "the rng keeps its address");
    assert_eq!(config_read32(&with.io, after_rng, 0), 0x1041_1af4, "virtio-net");
    assert_eq!(config_read32(&with.io, after_rng, 8) >> 8, 0x02_0000, "an Ethernet controller");
}

#[test]
fn the_ecam_and_pm_block_decode_once_firmware_programs_them() {
    let built = build_board();
    let io = &built.io;
    let mut data = [0u8; 4];
    // Before PCIEXBAR: nothing at the ECAM.
    assert!(!built.io.mmio.read(ECAM_BASE, &mut data) || data == [0xff; 4]);
    config_write32(io, Bdf::new(0, 0, 0).unwrap(), 0x64, 0);
    config_write32(io, Bdf::new(0, 0, 0).unwrap(), 0x60, ECAM_BASE as u32 | 1);
    assert!(io.mmio.read(ECAM_BASE, &mut data));
    assert_eq!(u32::from_le_bytes(data), 0x29c0_8086);
    let lpc_in_ecam = ECAM_BASE + (u64::from(config_bits(LPC_BDF)) << 4);
    assert!(io.mmio.read(lpc_in_ecam, &mut data));
    assert_eq!(u32::from_le_bytes(data), 0x2918_8086);

    // The PM timer answers only once PMBASE and ACPI_EN are set, as OVMF's SEC sets them.
    let timer = PM_BASE + 8;
    assert_eq!(pio_read32(io, timer), u32::MAX);
    config_write32(io, LPC_BDF, 0x40, u32::from(PM_BASE) | 1);
    let acpi_cntl = config_read32(io, LPC_BDF, 0x44);
    config_write32(io, LPC_BDF, 0x44, acpi_cntl | 0x80);
    let first = pio_read32(io, timer);
    assert!(first < 1 << 24, "a 24-bit timer: {first:#x}");
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_ne!(pio_read32(io, timer), first, "the PM timer runs");
    // SMI_EN holds APMC_EN, so SeaBIOS's SMM set-up stands down.
    assert_eq!(pio_read32(io, PM_BASE + 0x30) & 0x20, 0x20);
}

#[test]
fn vcpus_stay_in_their_reset_state_for_the_firmware() {
    let built = build_board();
    for id in 0..2 {
        let mut vcpu = CountingVcpu::default();
        built.board.init_vcpu(id, &mut vcpu).unwrap();
        assert_eq!(vcpu.0, 0, "vCPU {id}: the BSP starts at the reset vector, APs wait for SIPI");
    }
}

#[test]
fn a_reset_boots_the_same_firmware_and_nothing_else() {
    let built = build_board();
    let same = BootSource::Firmware(built.firmware.clone());
    built.board.load_boot(&built.memory, &same, 2).unwrap();
    let other =
        BootSource::Firmware(FirmwareBoot { code: "/other.fd".into(), vars: None, vga_bios: None });
    assert!(built.board.load_boot(&built.memory, &other, 2).is_err());
    let kernel = BootSource::Kernel(crate::board::KernelBoot {
        kernel: "/k".into(),
        initrd: None,
        cmdline: String::new(),
        cache_dir: None,
    });
    assert!(matches!(
        built.board.load_boot(&built.memory, &kernel, 2),
        Err(BoardError::UnsupportedBoot { board: "q35", .. })
    ));
}

#[test]
fn the_end_of_the_firmware_is_in_ram_below_1_mib_again_after_every_reset() {
    let built = build_board();
    let boot = BootSource::Firmware(built.firmware.clone());
    built.board.load_boot(&built.memory, &boot, 2).unwrap();
    let last = |memory: &GuestMemory| -> u8 {
        vm_memory::Bytes::read_obj(memory, GuestAddress(0xf_ffff)).unwrap()
    };
    // CODE is 128 KiB: all of it, ending at 1 MiB, with its reset-vector byte last.
    assert_eq!(last(&built.memory), 0xc3);
    // The guest owns the shadow (it copies itself there); a reset brings back the image.
    vm_memory::Bytes::write_obj(&built.memory, 0x90u8, GuestAddress(0xf_ffff)).unwrap();
    assert_eq!(last(&built.memory), 0x90);
    built.board.load_boot(&built.memory, &boot, 2).unwrap();
    assert_eq!(last(&built.memory), 0xc3);
}

#[test]
fn the_firmware_debug_port_answers_that_it_is_there() {
    let built = build_board();
    let mut byte = [0u8];
    assert!(built.io.pio.read(0x402, &mut byte));
    assert_eq!(byte, [0xe9]);
    assert!(built.io.pio.write(0x402, b"SeaBIOS\n"));
}

/// Debian's vgabios-bochs-display.bin is 28 KiB with an option ROM header.
fn vga_bios_image() -> Vec<u8> {
    let mut rom: Vec<u8> = (0..28672u32).map(|i| (i * 13 % 251) as u8).collect();
    rom[..3].copy_from_slice(&[0x55, 0xaa, (28672 / 512) as u8]);
    rom
}

/// The BAR register `reg` sized as firmware does: all-ones written, the mask read back and
/// the old value put back.
fn bar_size(io: &IoBuses, bdf: Bdf, reg: u8) -> u32 {
    let old = config_read32(io, bdf, reg);
    config_write32(io, bdf, reg, u32::MAX);
    let mask = config_read32(io, bdf, reg);
    config_write32(io, bdf, reg, old);
    !(mask & !0xf) + 1
}

#[test]
fn the_display_slot_is_free_of_the_chipset_and_out_of_reach_of_the_virtio_devices() {
    assert_eq!(DISPLAY_BDF.to_string(), "00:1e.0");
    assert_ne!(DISPLAY_BDF, LPC_BDF);
    // Devices are numbered up from 00:01.0: a machine has far fewer than 29 before it.
    assert!(DISPLAY_BDF.device() > 20);
}

#[test]
fn with_a_screen_a_bochs_display_at_00_1e_0_serves_the_vga_bios_and_moves_no_device() {
    let without = build_board();
    let with = build_board_with_screen(Some(vga_bios_image()));
    assert!(without.display.is_none());
    assert_eq!(config_read32(&without.io, DISPLAY_BDF, 0), u32::MAX, "no screen: no display");
    let functions = |b: &Built| lock(&b.pci).functions();
    let mut expected = functions(&without);
    expected.push(DISPLAY_BDF);
    expected.sort();
    assert_eq!(functions(&with), expected, "every other function at the BDF it had");
    for bdf in functions(&without) {
        for reg in [0x10, 0x14, 0x18] {
            assert_eq!(
                config_read32(&with.io, bdf, reg),
                config_read32(&without.io, bdf, reg),
                "{bdf} BAR at {reg:#x}"
            );
        }
    }

    let io = &with.io;
    assert_eq!(config_read32(io, DISPLAY_BDF, 0), 0x1111_1234);
    assert_eq!(config_read32(io, DISPLAY_BDF, 8) >> 8, 0x03_8000, "a display, not VGA");
    assert_eq!(bar_size(io, DISPLAY_BDF, 0x10), 16 << 20, "the framebuffer");
    assert_eq!(bar_size(io, DISPLAY_BDF, 0x18), 0x1000, "the registers");
    assert_eq!(bar_size(io, DISPLAY_BDF, 0x30), 32 << 10, "the ROM, 28 KiB rounded up");
    // Enabled at an address in the 32-bit window (as SeaBIOS does), it reads the VGA BIOS.
    let rom_at = 0xfe00_0000u32;
    config_write32(io, DISPLAY_BDF, 0x30, rom_at | 1);
    let mut head = [0u8; 16];
    assert!(io.mmio.read(u64::from(rom_at), &mut head));
    assert_eq!(&head[..], &vga_bios_image()[..16]);
    assert!(matches!(
        with.display.as_ref().map(|d| &d.hardware),
        Some(DisplayHardware::BochsDisplay(_))
    ));
}

#[test]
fn under_uefi_the_display_has_no_rom() {
    let built = build_board_with_screen(None);
    assert_eq!(config_read32(&built.io, DISPLAY_BDF, 0), 0x1111_1234);
    config_write32(&built.io, DISPLAY_BDF, 0x30, u32::MAX);
    assert_eq!(config_read32(&built.io, DISPLAY_BDF, 0x30), 0, "no expansion ROM");
}

#[test]
fn an_unreadable_vga_bios_is_an_error_naming_it() {
    // An empty file stands for a missing one: nothing is written.
    let Err(err) = try_build_board(Extras { screen: Some(Some(Vec::new())), ..Extras::default() })
    else {
        panic!("built without its VGA BIOS");
    };
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        text += &format!(": {e}");
        source = e.source();
    }
    assert!(text.contains("vgabios-bochs-display.bin"), "{text}");
}

#[test]
fn the_scanner_finds_the_framebuffer_wherever_firmware_moves_bar_0() {
    let built = build_board_with_screen(Some(vga_bios_image()));
    let display = built.display.as_ref().unwrap();
    let host = lock(display.hardware.framebuffer()).host_addr() as usize;
    let placed = |_: &Built| display.memory_slots.find_host(host).map(|r| (r.guest_addr, r.size));
    let first = u64::from(config_read32(&built.io, DISPLAY_BDF, 0x10) & !0xf);
    assert_eq!(placed(&built), Some((first, 16 << 20)), "mapped where the board put it");
    let generation = display.memory_slots.find_host(host).unwrap().generation;
    // OVMF and SeaBIOS place BARs themselves: decoding off, the BAR moved, decoding on.
    let command = config_read32(&built.io, DISPLAY_BDF, 0x04);
    config_write32(&built.io, DISPLAY_BDF, 0x04, command & !0x2);
    assert_eq!(placed(&built), None, "unmapped while memory decoding is off");
    config_write32(&built.io, DISPLAY_BDF, 0x10, 0xc100_0000);
    config_write32(&built.io, DISPLAY_BDF, 0x04, command);
    assert_eq!(placed(&built), Some((0xc100_0000, 16 << 20)));
    let moved = display.memory_slots.find_host(host).unwrap();
    assert_ne!(moved.generation, generation, "a new mapping the scanner rescans in full");
    assert!(lock(&built.vm.0).contains(&(0xc100_0000, 16 << 20, false)));
}

#[test]
fn the_display_is_saved_with_the_pci_functions_and_comes_back() {
    let built = build_board_with_screen(Some(vga_bios_image()));
    let id = format!("pci/{DISPLAY_BDF}");
    let saved = built.saved.iter().find(|d| d.id == id).expect("the display in saved state");
    assert_eq!(saved.when_missing, WhenMissing::Refuse);
    // The guest sets a mode and draws; the state taken then comes back after a reset's.
    let regs = u64::from(config_read32(&built.io, DISPLAY_BDF, 0x18) & !0xf);
    let dispi = |index: u64, value: u16| {
        assert!(built.io.mmio.write(regs + 0x500 + 2 * index, &value.to_le_bytes()));
    };
    let power_on = (saved.save)().unwrap();
    for (index, value) in [(1, 640), (2, 480), (3, 32), (4, 0x41)] {
        dispi(index, value);
    }
    let with_mode = (saved.save)().unwrap();
    assert_ne!(with_mode, power_on);
    (saved.restore)(&power_on).unwrap();
    assert_eq!((saved.save)().unwrap(), power_on);
    (saved.restore)(&with_mode).unwrap();
    assert_eq!((saved.save)().unwrap(), with_mode);
    let mut xres = [0u8; 2];
    assert!(built.io.mmio.read(regs + 0x502, &mut xres));
    assert_eq!(u16::from_le_bytes(xres), 640);
}

#[test]
fn the_host_pointer_reaches_the_ps2_mouse_once_the_guest_enables_it() {
    let built = build_board();
    let read = |port: u16| {
        let mut byte = [0u8];
        assert!(built.io.pio.read(u64::from(port), &mut byte));
        byte[0]
    };
    // Before the guest enables reporting, a real mouse sends nothing.
    assert!(built.board.legacy_pointer(4, 0, 0, 0));
    assert_eq!(read(0x64) & 0x01, 0, "no byte waits");
    // Enable the aux port, then tell the mouse (0xD4) to report (0xF4): it acknowledges.
    assert!(built.io.pio.write(0x64, &[0xa8]));
    assert!(built.io.pio.write(0x64, &[0xd4]));
    assert!(built.io.pio.write(0x60, &[0xf4]));
    assert_eq!(read(0x64) & 0x21, 0x21, "a mouse byte waits");
    assert_eq!(read(0x60), 0xfa);
    assert!(built.board.legacy_pointer(5, 0, 0, crate::devices::i8042::BUTTON_LEFT));
    let packet: Vec<u8> = (0..3).map(|_| read(0x60)).collect();
    assert_eq!(packet[0] & 0x0f, 0x08 | 0x01, "always-one bit and the left button: {packet:?}");
    assert_eq!(packet[1], 5, "dx");
}
