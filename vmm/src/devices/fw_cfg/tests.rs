#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::apply::{FakeFirmware, FSEG_END, FSEG_START};
use super::dma::{DMA_CTL_ERROR, DMA_CTL_READ, DMA_CTL_SELECT, DMA_CTL_SKIP, DMA_CTL_WRITE};
use super::loader::{AllocZone, TableLoader};
use super::persist::{FwCfgFileState, FwCfgState};
use super::*;
use crate::state::StateError;

const MIB: u64 = 1 << 20;
/// Where the tests put DMA control structures.
const ACCESS: u64 = 0x1000;

fn memory(regions: &[(u64, u64)]) -> GuestMemory {
    let ranges: Vec<_> = regions.iter().map(|&(a, l)| (GuestAddress(a), l as usize)).collect();
    GuestMemory::from_ranges(&ranges).unwrap()
}

fn config() -> FwCfgConfig {
    FwCfgConfig { cpus: 3, max_cpus: 8, nographic: true, boot_menu: false }
}

fn device(mem: &GuestMemory) -> FwCfg {
    FwCfg::new(mem.clone(), &config())
}

fn select(dev: &mut FwCfg, key: u16) {
    dev.write(0, &key.to_le_bytes());
}

fn read_data(dev: &mut FwCfg, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let mut b = [0u8];
            dev.read(1, &mut b);
            b[0]
        })
        .collect()
}

/// Writes a control structure at `access`, triggers it (high half, then low half) and returns
/// the control word the device stored back.
fn dma_at(
    dev: &mut FwCfg,
    mem: &GuestMemory,
    access: u64,
    control: u32,
    len: u32,
    addr: u64,
) -> u32 {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&control.to_be_bytes());
    raw[4..8].copy_from_slice(&len.to_be_bytes());
    raw[8..16].copy_from_slice(&addr.to_be_bytes());
    mem.write_slice(&raw, GuestAddress(access)).unwrap();
    dev.write(4, &((access >> 32) as u32).to_be_bytes());
    dev.write(8, &(access as u32).to_be_bytes());
    u32::from_be_bytes(mem.read_obj(GuestAddress(access)).unwrap())
}

fn dma(dev: &mut FwCfg, mem: &GuestMemory, control: u32, len: u32, addr: u64) -> u32 {
    dma_at(dev, mem, ACCESS, control, len, addr)
}

fn select_read(key: u16) -> u32 {
    (u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ
}

fn guest_bytes(mem: &GuestMemory, addr: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn signature_and_feature_id_read_through_the_data_port() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    // Item 0 is selected at power-on.
    assert_eq!(read_data(&mut dev, 4), b"QEMU");
    select(&mut dev, keys::ID);
    assert_eq!(read_data(&mut dev, 4), [3, 0, 0, 0], "traditional and DMA");
}

#[test]
fn dma_address_register_reads_the_qemu_cfg_signature() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    let mut sig = [0u8; 8];
    dev.read(4, &mut sig);
    assert_eq!(&sig, b"QEMU CFG");
    assert_eq!(u64::from_be_bytes(sig), DMA_SIGNATURE);
    let mut low = [0u8; 4];
    dev.read(8, &mut low);
    assert_eq!(&low, b" CFG");
}

#[test]
fn fixed_items_carry_the_board_configuration() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    for (key, want) in [
        (keys::NB_CPUS, [3, 0]),
        (keys::MAX_CPUS, [8, 0]),
        (keys::NOGRAPHIC, [1, 0]),
        (keys::BOOT_MENU, [0, 0]),
    ] {
        select(&mut dev, key);
        assert_eq!(read_data(&mut dev, 2), want, "key {key:#x}");
    }
    dev.set_item(0x8002, vec![1]).unwrap();
    select(&mut dev, 0x8002);
    assert_eq!(read_data(&mut dev, 1), [1]);
    assert!(matches!(dev.set_item(keys::FILE_DIR, vec![]), Err(FwCfgError::ReservedKey { .. })));
    assert!(matches!(dev.set_item(0x20, vec![]), Err(FwCfgError::ReservedKey { .. })));
}

#[test]
fn unknown_keys_and_reads_past_the_end_give_zeros() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    select(&mut dev, 0x1234);
    assert_eq!(read_data(&mut dev, 3), [0, 0, 0]);
    select(&mut dev, keys::SIGNATURE);
    assert_eq!(read_data(&mut dev, 6), [b'Q', b'E', b'M', b'U', 0, 0]);
    // Selecting again rewinds.
    select(&mut dev, keys::SIGNATURE);
    assert_eq!(read_data(&mut dev, 1), [b'Q']);
}

#[test]
fn directory_lists_files_by_name_with_sizes_and_keys() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_file("etc/table-loader", vec![0; 256]).unwrap();
    dev.add_file("bootorder", vec![1, 2, 3]).unwrap();
    dev.add_file("etc/e820", vec![0; 40]).unwrap();
    select(&mut dev, keys::FILE_DIR);
    let dir = read_data(&mut dev, 4 + 3 * 64);
    assert_eq!(&dir[..4], &[0, 0, 0, 3]);
    let mut want = Vec::new();
    for (i, (name, size)) in
        [("bootorder", 3u32), ("etc/e820", 40), ("etc/table-loader", 256)].into_iter().enumerate()
    {
        let mut entry = Vec::new();
        entry.extend_from_slice(&size.to_be_bytes());
        entry.extend_from_slice(&(0x20 + i as u16).to_be_bytes());
        entry.extend_from_slice(&[0, 0]);
        let mut field = [0u8; 56];
        field[..name.len()].copy_from_slice(name.as_bytes());
        entry.extend_from_slice(&field);
        want.extend_from_slice(&entry);
    }
    assert_eq!(&dir[4..], &want[..]);
    // The keys follow the name order.
    select(&mut dev, 0x20);
    assert_eq!(read_data(&mut dev, 3), [1, 2, 3]);
}

#[test]
fn file_reads_through_the_data_port_stop_at_its_end() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_file("etc/sercon-port", 0x3f8u16.to_le_bytes().to_vec()).unwrap();
    select(&mut dev, keys::FILE_FIRST);
    assert_eq!(read_data(&mut dev, 4), [0xf8, 0x03, 0, 0]);
}

#[test]
fn data_port_writes_are_ignored() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_writable_file("etc/w", vec![7; 4]).unwrap();
    select(&mut dev, keys::FILE_FIRST);
    dev.write(1, &[0xaa]);
    dev.write(0, &[0xbb]);
    assert_eq!(dev.file("etc/w").unwrap(), &[7; 4]);
    assert_eq!(read_data(&mut dev, 4), [7; 4], "the write neither changed nor moved anything");
}

#[test]
fn dma_reads_a_file_and_zero_fills_past_its_end() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_file("etc/e820", e820_file(&[(0, 0x9fc00, E820_RAM)])).unwrap();
    mem.write_slice(&[0xff; 32], GuestAddress(0x2000)).unwrap();
    select(&mut dev, keys::FILE_FIRST);
    assert_eq!(dma(&mut dev, &mem, DMA_CTL_READ, 24, 0x2000), 0);
    let got = guest_bytes(&mem, 0x2000, 32);
    assert_eq!(&got[..20], &e820_file(&[(0, 0x9fc00, E820_RAM)])[..]);
    assert_eq!(&got[20..24], &[0; 4], "past the end reads as zeros");
    assert_eq!(&got[24..], &[0xff; 8], "nothing beyond the length");
}

#[test]
fn dma_select_and_read_in_one_transfer() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    assert_eq!(dma(&mut dev, &mem, select_read(keys::ID), 4, 0x2000), 0);
    assert_eq!(guest_bytes(&mem, 0x2000, 4), [3, 0, 0, 0]);
    // The transfer moved the offset: the next read continues (past the end: zeros).
    assert_eq!(dma(&mut dev, &mem, DMA_CTL_READ, 2, 0x2000), 0);
    assert_eq!(guest_bytes(&mem, 0x2000, 2), [0, 0]);
}

#[test]
fn dma_skip_moves_the_offset_without_touching_memory() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_file("f", (0u8..16).collect()).unwrap();
    let skip = (u32::from(keys::FILE_FIRST) << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP;
    // A skip's address is not used; even one outside memory is fine.
    assert_eq!(dma(&mut dev, &mem, skip, 10, u64::MAX), 0);
    assert_eq!(read_data(&mut dev, 3), [10, 11, 12]);
    // Skipping past the end stops at the end.
    assert_eq!(dma(&mut dev, &mem, DMA_CTL_SKIP, 100, 0), 0);
    assert_eq!(read_data(&mut dev, 1), [0]);
}

#[test]
fn dma_into_memory_outside_the_guest_is_an_error_and_writes_nothing() {
    let mem = memory(&[(0, MIB), (2 * MIB, MIB)]);
    let mut dev = device(&mem);
    dev.add_file("f", vec![0xab; 64]).unwrap();
    // Straddles the end of the first region into the hole.
    let at = MIB - 16;
    mem.write_slice(&[0x11; 16], GuestAddress(at)).unwrap();
    assert_eq!(dma(&mut dev, &mem, select_read(keys::FILE_FIRST), 64, at), DMA_CTL_ERROR);
    assert_eq!(guest_bytes(&mem, at, 16), [0x11; 16], "no partial write");
    // Entirely outside, and straddling the end of all memory.
    assert_eq!(dma(&mut dev, &mem, select_read(keys::FILE_FIRST), 4, 5 * MIB), DMA_CTL_ERROR);
    assert_eq!(dma(&mut dev, &mem, select_read(keys::FILE_FIRST), 64, 3 * MIB - 8), DMA_CTL_ERROR);
    // The refused transfers did not consume the file.
    assert_eq!(dma(&mut dev, &mem, DMA_CTL_READ, 1, 0x2000), 0);
    assert_eq!(guest_bytes(&mem, 0x2000, 1), [0xab]);
}

#[test]
fn dma_lengths_that_wrap_or_overrun_memory_are_errors() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_file("f", vec![1; 8]).unwrap();
    // Wraps the 64-bit address space.
    assert_eq!(
        dma(&mut dev, &mem, select_read(keys::FILE_FIRST), 0x100, u64::MAX - 0x10),
        DMA_CTL_ERROR
    );
    // The largest length: far more than the guest has.
    assert_eq!(dma(&mut dev, &mem, select_read(keys::FILE_FIRST), u32::MAX, 0x2000), DMA_CTL_ERROR);
    let write = (u32::from(keys::FILE_FIRST) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE;
    assert_eq!(dma(&mut dev, &mem, write, u32::MAX, 0x2000), DMA_CTL_ERROR);
}

#[test]
fn dma_control_structure_outside_memory_is_dropped() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    // Wholly outside: nothing to read, nothing to write back, no panic.
    dev.write(4, &0xffff_ffffu32.to_be_bytes());
    dev.write(8, &0xffff_fff8u32.to_be_bytes());
    dev.write(4, &[0xff; 8]);
    // Its control word inside, the rest outside: the ERROR lands on the control word.
    let access = MIB - 8;
    mem.write_slice(&select_read(keys::ID).to_be_bytes(), GuestAddress(access)).unwrap();
    dev.write(8, &(access as u32).to_be_bytes());
    let control: [u8; 4] = mem.read_obj(GuestAddress(access)).unwrap();
    assert_eq!(u32::from_be_bytes(control), DMA_CTL_ERROR);
}

#[test]
fn dma_write_into_a_read_only_item_is_an_error() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_file("etc/acpi/tables", vec![5; 8]).unwrap();
    mem.write_slice(&[9; 8], GuestAddress(0x2000)).unwrap();
    let write = (u32::from(keys::FILE_FIRST) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE;
    assert_eq!(dma(&mut dev, &mem, write, 8, 0x2000), DMA_CTL_ERROR);
    assert_eq!(dev.file("etc/acpi/tables").unwrap(), &[5; 8]);
    let write_id =
        (u32::from(keys::ID | keys::WRITE_CHANNEL) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE;
    assert_eq!(dma(&mut dev, &mem, write_id, 4, 0x2000), DMA_CTL_ERROR);
}

#[test]
fn dma_write_updates_a_writable_file_within_its_bounds() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_writable_file("etc/vmgenid_addr", vec![0; 8]).unwrap();
    mem.write_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9], GuestAddress(0x2000)).unwrap();
    let select_skip = (u32::from(keys::FILE_FIRST) << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP;
    assert_eq!(dma(&mut dev, &mem, select_skip, 4, 0), 0);
    assert_eq!(dma(&mut dev, &mem, DMA_CTL_WRITE, 4, 0x2000), 0);
    assert_eq!(dev.file("etc/vmgenid_addr").unwrap(), &[0, 0, 0, 0, 1, 2, 3, 4]);
    // Past the end: refused whole, the file unchanged.
    assert_eq!(dma(&mut dev, &mem, select_skip, 4, 0), 0);
    assert_eq!(dma(&mut dev, &mem, DMA_CTL_WRITE, 5, 0x2000), DMA_CTL_ERROR);
    assert_eq!(dev.file("etc/vmgenid_addr").unwrap(), &[0, 0, 0, 0, 1, 2, 3, 4]);
}

#[test]
fn an_eight_byte_write_or_the_low_half_alone_triggers_dma() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&select_read(keys::SIGNATURE).to_be_bytes());
    raw[4..8].copy_from_slice(&4u32.to_be_bytes());
    raw[8..16].copy_from_slice(&0x3000u64.to_be_bytes());
    mem.write_slice(&raw, GuestAddress(ACCESS)).unwrap();
    dev.write(4, &ACCESS.to_be_bytes());
    assert_eq!(guest_bytes(&mem, 0x3000, 4), b"QEMU");
    assert_eq!(guest_bytes(&mem, ACCESS, 4), [0; 4]);
    // SeaBIOS writes only the low half: the latch was cleared by the last transfer.
    mem.write_slice(&raw, GuestAddress(ACCESS)).unwrap();
    mem.write_slice(&[0; 4], GuestAddress(0x3000)).unwrap();
    dev.write(8, &(ACCESS as u32).to_be_bytes());
    assert_eq!(guest_bytes(&mem, 0x3000, 4), b"QEMU");
}

#[test]
fn generated_file_is_built_once_until_reset() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    let builds = Arc::new(AtomicUsize::new(0));
    let counter = builds.clone();
    dev.add_generated_file(
        "etc/table-loader",
        vec![0; 4],
        Box::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) as u8 + 1;
            vec![n; 4]
        }),
    )
    .unwrap();
    assert_eq!(builds.load(Ordering::SeqCst), 0, "not built before the guest asks");
    // Reading the directory does not build it.
    select(&mut dev, keys::FILE_DIR);
    assert_eq!(builds.load(Ordering::SeqCst), 0);
    select(&mut dev, keys::FILE_FIRST);
    assert_eq!(read_data(&mut dev, 4), [1; 4]);
    assert_eq!(dma(&mut dev, &mem, select_read(keys::FILE_FIRST), 4, 0x2000), 0);
    assert_eq!(guest_bytes(&mem, 0x2000, 4), [1; 4]);
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    dev.reset();
    assert_eq!(read_data(&mut dev, 4), b"QEMU", "reset selects item 0");
    select(&mut dev, keys::FILE_FIRST);
    assert_eq!(read_data(&mut dev, 4), [2; 4]);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}

#[test]
fn files_generated_together_are_built_once_by_whichever_is_selected_first() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    let builds = Arc::new(AtomicUsize::new(0));
    let counter = builds.clone();
    dev.add_generated_files(
        vec![("etc/table-loader", vec![0; 2]), ("etc/acpi/tables", vec![0; 3])],
        Box::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) as u8 + 1;
            vec![vec![n; 2], vec![n + 10; 3]]
        }),
    )
    .unwrap();
    // Name order: etc/acpi/tables is 0x20, etc/table-loader 0x21.
    select(&mut dev, keys::FILE_FIRST + 1);
    assert_eq!(read_data(&mut dev, 2), [1, 1]);
    select(&mut dev, keys::FILE_FIRST);
    assert_eq!(read_data(&mut dev, 3), [11, 11, 11], "from the same build");
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    dev.reset();
    select(&mut dev, keys::FILE_FIRST);
    assert_eq!(read_data(&mut dev, 3), [12, 12, 12]);
    select(&mut dev, keys::FILE_FIRST + 1);
    assert_eq!(read_data(&mut dev, 2), [2, 2]);
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}

#[test]
fn a_generator_returning_the_wrong_files_leaves_them_as_they_were() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_generated_files(vec![("a", vec![1]), ("b", vec![2])], Box::new(|| vec![vec![9]]))
        .unwrap();
    select(&mut dev, keys::FILE_FIRST);
    assert_eq!(read_data(&mut dev, 1), [1]);
    assert!(matches!(
        dev.add_generated_files(vec![("c", vec![]), ("c", vec![])], Box::new(Vec::new)),
        Err(FwCfgError::DuplicateFile { .. })
    ));
    assert!(matches!(
        dev.add_generated_files(vec![("d", vec![]), ("a", vec![])], Box::new(Vec::new)),
        Err(FwCfgError::DuplicateFile { .. })
    ));
    assert!(dev.file("c").is_none() && dev.file("d").is_none(), "nothing added on an error");
}

#[test]
fn directory_follows_a_generated_files_length() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_generated_file("g", vec![0; 4], Box::new(|| vec![7; 100])).unwrap();
    select(&mut dev, keys::FILE_DIR);
    assert_eq!(read_data(&mut dev, 8)[4..], [0, 0, 0, 4]);
    select(&mut dev, keys::FILE_FIRST);
    select(&mut dev, keys::FILE_DIR);
    assert_eq!(read_data(&mut dev, 8)[4..], [0, 0, 0, 100]);
}

#[test]
fn host_file_api_refuses_bad_names_duplicates_and_overflow() {
    let mem = memory(&[(0, MIB)]);
    let mut dev = device(&mem);
    dev.add_file(&"n".repeat(55), vec![]).unwrap();
    assert!(matches!(
        dev.add_file(&"n".repeat(56), vec![]),
        Err(FwCfgError::NameTooLong { max: 55, .. })
    ));
    assert!(matches!(dev.add_file("", vec![]), Err(FwCfgError::InvalidName { .. })));
    assert!(matches!(dev.add_file("a\0b", vec![]), Err(FwCfgError::InvalidName { .. })));
    dev.add_file("etc/e820", vec![]).unwrap();
    assert!(matches!(
        dev.add_writable_file("etc/e820", vec![]),
        Err(FwCfgError::DuplicateFile { .. })
    ));
    for i in dev.files.len()..MAX_FILES {
        dev.add_file(&format!("f{i}"), vec![]).unwrap();
    }
    assert!(matches!(dev.add_file("last", vec![]), Err(FwCfgError::TooManyFiles { .. })));
    // The last key stays clear of the write-channel bit.
    assert!(keys::FILE_FIRST as usize + MAX_FILES <= usize::from(keys::WRITE_CHANNEL));
}

#[test]
fn e820_entries_are_packed_little_endian() {
    let bytes =
        e820_file(&[(0x10_0000, 0x7ff0_0000, E820_RAM), (0xb000_0000, 1 << 28, E820_RESERVED)]);
    assert_eq!(bytes.len(), 40);
    assert_eq!(&bytes[..8], &0x10_0000u64.to_le_bytes());
    assert_eq!(&bytes[8..16], &0x7ff0_0000u64.to_le_bytes());
    assert_eq!(&bytes[16..20], &[1, 0, 0, 0]);
    assert_eq!(&bytes[20..28], &0xb000_0000u64.to_le_bytes());
    assert_eq!(&bytes[36..40], &[2, 0, 0, 0]);
}

#[test]
fn saved_state_restores_selection_latch_and_guest_written_files() {
    let mem = memory(&[(0, MIB)]);
    let build = |mem: &GuestMemory| {
        let mut dev = device(mem);
        dev.add_file("a", (0u8..8).collect()).unwrap();
        dev.add_writable_file("w", vec![0; 4]).unwrap();
        dev.add_generated_file("g", vec![0; 2], Box::new(|| vec![0xee; 2])).unwrap();
        dev
    };
    let mut dev = build(&mem);
    let g_key = keys::FILE_FIRST + 1;
    select(&mut dev, g_key); // builds "g"
    mem.write_slice(&[4, 3, 2, 1], GuestAddress(0x2000)).unwrap();
    let write = (u32::from(keys::FILE_FIRST + 2) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE;
    assert_eq!(dma(&mut dev, &mem, write, 4, 0x2000), 0);
    select(&mut dev, keys::FILE_FIRST);
    read_data(&mut dev, 3);
    dev.write(4, &1u32.to_be_bytes());
    let state = dev.save_state();
    assert_eq!(
        state.files,
        vec![
            FwCfgFileState { name: "g".into(), data: vec![0xee; 2] },
            FwCfgFileState { name: "w".into(), data: vec![4, 3, 2, 1] },
        ]
    );

    let mut restored = build(&mem);
    restored.restore_state(&state).unwrap();
    assert_eq!(restored.save_state(), state);
    assert_eq!(read_data(&mut restored, 2), [3, 4], "the selection and offset came back");
    assert_eq!(restored.file("w").unwrap(), &[4, 3, 2, 1]);
    assert_eq!(restored.dma_address, 1 << 32);

    let refused = |files: Vec<FwCfgFileState>| {
        let mut target = build(&mem);
        let before = target.save_state();
        let bad = FwCfgState { files, ..state.clone() };
        assert!(matches!(target.restore_state(&bad), Err(StateError::Invalid { .. })));
        assert_eq!(target.save_state(), before, "a refused restore changes nothing");
    };
    refused(vec![FwCfgFileState { name: "nope".into(), data: vec![] }]);
    let mut grouped = device(&mem);
    grouped.add_generated_files(vec![("x", vec![0]), ("y", vec![0])], Box::new(Vec::new)).unwrap();
    let partial = FwCfgState {
        files: vec![FwCfgFileState { name: "x".into(), data: vec![1] }],
        ..state.clone()
    };
    assert!(matches!(grouped.restore_state(&partial), Err(StateError::Invalid { .. })));
    refused(vec![FwCfgFileState { name: "a".into(), data: vec![] }]);
    refused(vec![FwCfgFileState { name: "w".into(), data: vec![1; 5] }]);
    refused(vec![
        FwCfgFileState { name: "w".into(), data: vec![1; 4] },
        FwCfgFileState { name: "w".into(), data: vec![2; 4] },
    ]);
}

// --- The table-loader script run the way the firmware runs it ---------------------------

/// A table with its standard header (checksum left 0 for the loader to fill in).
fn sdt(signature: &[u8; 4], len: usize) -> Vec<u8> {
    let mut t = vec![0u8; len];
    t[0..4].copy_from_slice(signature);
    t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    t[8] = 1;
    t[10..16].copy_from_slice(b"HUTCH ");
    t
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

fn u32_at(mem: &GuestMemory, addr: u64) -> u32 {
    u32::from_le_bytes(mem.read_obj(GuestAddress(addr)).unwrap())
}

fn u64_at(mem: &GuestMemory, addr: u64) -> u64 {
    u64::from_le_bytes(mem.read_obj(GuestAddress(addr)).unwrap())
}

/// A table in guest memory whose length and checksum validate; returns its bytes.
fn checked_table(mem: &GuestMemory, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let len = u32_at(mem, addr + 4) as usize;
    let table = guest_bytes(mem, addr, len);
    assert_eq!(&table[..4], signature);
    assert_eq!(sum(&table), 0, "{} checksum", String::from_utf8_lossy(signature));
    table
}

#[test]
fn firmware_running_the_script_finds_a_valid_rsdp_xsdt_chain() {
    const FADT_LEN: usize = 276;
    // etc/acpi/tables: DSDT at 0, FACS at 64, FADT at 128, XSDT after it.
    let dsdt = {
        let mut t = sdt(b"DSDT", 40);
        t[36..40].copy_from_slice(&[0x10, 0x03, b'_', b'S']);
        t
    };
    let mut facs = vec![0u8; 64];
    facs[0..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&64u32.to_le_bytes());
    let (dsdt_at, facs_at, fadt_at) = (0usize, 64usize, 128usize);
    let xsdt_at = fadt_at + FADT_LEN;
    let mut fadt = sdt(b"FACP", FADT_LEN);
    // Offsets into the blob; the loader adds the blob's address.
    fadt[36..40].copy_from_slice(&(facs_at as u32).to_le_bytes());
    fadt[40..44].copy_from_slice(&(dsdt_at as u32).to_le_bytes());
    fadt[140..148].copy_from_slice(&(dsdt_at as u64).to_le_bytes());
    let mut xsdt = sdt(b"XSDT", 44);
    xsdt[36..44].copy_from_slice(&(fadt_at as u64).to_le_bytes());
    let mut tables = dsdt.clone();
    tables.resize(facs_at, 0);
    tables.extend_from_slice(&facs);
    tables.resize(fadt_at, 0);
    tables.extend_from_slice(&fadt);
    tables.extend_from_slice(&xsdt);
    let mut rsdp = vec![0u8; 36];
    rsdp[0..8].copy_from_slice(b"RSD PTR ");
    rsdp[9..15].copy_from_slice(b"HUTCH ");
    rsdp[15] = 2;
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    rsdp[24..32].copy_from_slice(&(xsdt_at as u64).to_le_bytes());

    let t = "etc/acpi/tables";
    let r = "etc/acpi/rsdp";
    let mut loader = TableLoader::new();
    loader.allocate(r, rsdp.len(), 16, AllocZone::FSeg).unwrap();
    loader.allocate(t, tables.len(), 64, AllocZone::High).unwrap();
    loader.add_pointer(t, (fadt_at + 36) as u32, 4, t).unwrap();
    loader.add_pointer(t, (fadt_at + 40) as u32, 4, t).unwrap();
    loader.add_pointer(t, (fadt_at + 140) as u32, 8, t).unwrap();
    loader.add_pointer(t, (xsdt_at + 36) as u32, 8, t).unwrap();
    for (at, len) in [(dsdt_at, dsdt.len()), (fadt_at, FADT_LEN), (xsdt_at, xsdt.len())] {
        loader.add_checksum(t, (at + 9) as u32, at as u32, len as u32).unwrap();
    }
    loader.add_pointer(r, 24, 8, t).unwrap();
    loader.add_checksum(r, 8, 0, 20).unwrap();
    loader.add_checksum(r, 32, 0, 36).unwrap();
    loader.write_pointer("etc/facs-addr", 0, 8, t, facs_at as u32).unwrap();

    let mem = memory(&[(0, 16 * MIB)]);
    let mut dev = device(&mem);
    dev.add_file("etc/table-loader", loader.script()).unwrap();
    dev.add_file(t, tables.clone()).unwrap();
    dev.add_file(r, rsdp).unwrap();
    dev.add_writable_file("etc/facs-addr", vec![0; 8]).unwrap();
    let mut firmware = FakeFirmware::new(&mut dev, mem.clone(), 8 * MIB, 0x10000);
    firmware.run_table_loader();
    let (tables_base, _) = firmware.placed[t];
    assert_eq!(tables_base % 64, 0);

    // What an OS does: scan the F segment for the RSDP on 16-byte boundaries.
    let rsdp_at = (FSEG_START..FSEG_END)
        .step_by(16)
        .find(|&a| guest_bytes(&mem, a, 8) == b"RSD PTR ")
        .expect("no RSDP in the F segment");
    let rsdp = guest_bytes(&mem, rsdp_at, 36);
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    let xsdt_addr = u64_at(&mem, rsdp_at + 24);
    assert_eq!(xsdt_addr, tables_base + xsdt_at as u64);
    let xsdt = checked_table(&mem, xsdt_addr, b"XSDT");
    assert_eq!(xsdt.len(), 44);
    let fadt_addr = u64_at(&mem, xsdt_addr + 36);
    checked_table(&mem, fadt_addr, b"FACP");
    let dsdt_addr = u64_at(&mem, fadt_addr + 140);
    assert_eq!(u64::from(u32_at(&mem, fadt_addr + 40)), dsdt_addr);
    assert_eq!(checked_table(&mem, dsdt_addr, b"DSDT")[36..], dsdt[36..]);
    let facs_addr = u64::from(u32_at(&mem, fadt_addr + 36));
    assert_eq!(guest_bytes(&mem, facs_addr, 4), b"FACS");
    // WRITE_POINTER reached the device's writable file.
    assert_eq!(dev.file("etc/facs-addr").unwrap(), &facs_addr.to_le_bytes());
}
