#![allow(clippy::unwrap_used)] // A failed unwrap is a failed test.

use std::path::{Path, PathBuf};

use super::*;
use testkit::Rng;

const OVMF_VARS_4M: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// A VM directory with a `vars.fd` of `blocks` erased blocks, `head` written at offset 0.
fn vars_file(blocks: usize, head: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vars.fd");
    let mut bytes = vec![0xffu8; blocks * BLOCK_SIZE as usize];
    bytes[..head.len()].copy_from_slice(head);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// The start of an OVMF varstore: a zero vector, then the FV GUID's first bytes.
const VARS_HEAD: &[u8] = &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x8d, 0x2b, 0xf1, 0xff];

fn read_u8(f: &mut Pflash, offset: u64) -> u8 {
    let mut b = [0u8];
    f.read(offset, &mut b);
    b[0]
}

fn write_u8(f: &mut Pflash, offset: u64, value: u8) {
    f.write(offset, &[value]);
}

fn read_array(f: &mut Pflash, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        f.read(offset + 8 * i as u64, chunk);
    }
    out
}

/// OVMF's `QemuFlashWrite`: 0x10 + byte per byte, 0xFF after the run.
fn ovmf_write(f: &mut Pflash, offset: u64, data: &[u8]) {
    for (i, &b) in data.iter().enumerate() {
        write_u8(f, offset + i as u64, CMD_PROGRAM);
        write_u8(f, offset + i as u64, b);
    }
    if !data.is_empty() {
        write_u8(f, offset + data.len() as u64 - 1, CMD_READ_ARRAY);
    }
}

/// OVMF's `QemuFlashEraseBlock`: 0x20 + 0xD0, no polling, no read array after.
fn ovmf_erase(f: &mut Pflash, lba: u64) {
    write_u8(f, lba * BLOCK_SIZE, CMD_ERASE_SETUP);
    write_u8(f, lba * BLOCK_SIZE, CMD_ERASE_CONFIRM);
}

#[derive(Debug, PartialEq)]
enum Probe {
    NoLocation,
    Ram,
    Rom,
    Flash,
    FlashWriteProtected,
    Unknown,
}

/// OVMF's `QemuFlashDetected()`, step by step. `refined` adds the write-protect check of
/// edk2 after 2023-06 (Debian 12 ships edk2-stable202211, without it).
fn ovmf_probe(f: &mut Pflash, block_size: u64, refined: bool) -> Probe {
    let Some(at) = (0..block_size)
        .find(|&o| !matches!(read_u8(f, o), CMD_CLEAR_STATUS | CMD_READ_STATUS | 0x00))
    else {
        return Probe::NoLocation;
    };
    let original = read_u8(f, at);
    write_u8(f, at, CMD_CLEAR_STATUS);
    let probe = read_u8(f, at);
    if original != CMD_CLEAR_STATUS && probe == CMD_CLEAR_STATUS {
        write_u8(f, at, original);
        return Probe::Ram;
    }
    write_u8(f, at, CMD_READ_STATUS);
    let probe = read_u8(f, at);
    if probe == original {
        Probe::Rom
    } else if probe == CMD_READ_STATUS {
        write_u8(f, at, original);
        Probe::Ram
    } else if probe == 0x00 {
        if !refined {
            write_u8(f, at, CMD_READ_ARRAY);
            return Probe::Flash;
        }
        write_u8(f, at, CMD_PROGRAM);
        write_u8(f, at, original);
        write_u8(f, at, CMD_READ_STATUS);
        let status = read_u8(f, at);
        write_u8(f, at, CMD_READ_ARRAY);
        if status & STATUS_PROGRAM_ERROR != 0 {
            Probe::FlashWriteProtected
        } else {
            Probe::Flash
        }
    } else {
        Probe::Unknown
    }
}

#[test]
fn ovmf_probe_detects_flash_and_leaves_the_contents_alone() {
    for refined in [false, true] {
        for access in [PflashAccess::ReadWrite, PflashAccess::ReadOnly] {
            let (_dir, path) = vars_file(2, VARS_HEAD);
            let before = std::fs::read(&path).unwrap();
            let mut f = Pflash::open(&path, access).unwrap();
            assert_eq!(ovmf_probe(&mut f, BLOCK_SIZE, refined), Probe::Flash, "{access:?}");
            assert_eq!(f.mode, PflashMode::ReadArray);
            assert_eq!(read_array(&mut f, 0, VARS_HEAD.len()), VARS_HEAD);
            drop(f);
            assert_eq!(std::fs::read(&path).unwrap(), before);
        }
    }
}

#[test]
fn clear_status_clears_the_ready_bit_until_an_operation_completes() {
    let (_dir, path) = vars_file(1, &[]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    write_u8(&mut f, 0, CMD_READ_STATUS);
    assert_eq!(read_u8(&mut f, 0), STATUS_READY);
    write_u8(&mut f, 0, CMD_CLEAR_STATUS);
    assert_eq!(read_u8(&mut f, 0), 0xff, "clear status returns to read array");
    write_u8(&mut f, 0, CMD_READ_STATUS);
    let mut wide = [0u8; 4];
    f.read(0, &mut wide);
    assert_eq!(wide, [0; 4]);
    assert_eq!(read_u8(&mut f, 0), 0, "status mode lasts until another command");
    write_u8(&mut f, 0, CMD_PROGRAM);
    write_u8(&mut f, 0, 0xff);
    assert_eq!(read_u8(&mut f, 0), STATUS_READY, "status mode after a program");
}

#[test]
fn programmed_bytes_read_back_in_read_array_mode() {
    let (_dir, path) = vars_file(2, &[]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    write_u8(&mut f, 0x1234, CMD_PROGRAM);
    write_u8(&mut f, 0x1234, 0x5a);
    write_u8(&mut f, 0x1235, CMD_PROGRAM_ALT);
    write_u8(&mut f, 0x1235, 0xa5);
    assert_eq!(read_u8(&mut f, 0x1234), STATUS_READY, "status until read array");
    write_u8(&mut f, 0, CMD_READ_ARRAY);
    assert_eq!(read_array(&mut f, 0x1233, 4), [0xff, 0x5a, 0xa5, 0xff]);
    let mut word = [0u8; 2];
    f.read(0x1234, &mut word);
    assert_eq!(u16::from_le_bytes(word), 0xa55a);
}

#[test]
fn a_wide_program_writes_every_byte_of_the_access() {
    let (_dir, path) = vars_file(1, &[]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    f.write(0x10, &[CMD_PROGRAM, 0, 0, 0]);
    f.write(0x10, &0x1234_5678u32.to_le_bytes());
    write_u8(&mut f, 0, CMD_READ_ARRAY);
    let mut got = [0u8; 4];
    f.read(0x10, &mut got);
    assert_eq!(u32::from_le_bytes(got), 0x1234_5678);
}

#[test]
fn program_can_only_clear_bits() {
    let (_dir, path) = vars_file(1, &[0b1010_1010]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    ovmf_write(&mut f, 0, &[0b0110_0110]);
    assert_eq!(read_u8(&mut f, 0), 0b0010_0010);
    ovmf_write(&mut f, 0, &[0xff]);
    assert_eq!(read_u8(&mut f, 0), 0b0010_0010, "setting bits needs an erase");
}

#[test]
fn block_erase_sets_exactly_one_block_to_ones() {
    let (_dir, path) = vars_file(3, &[]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    for block in 0..3 {
        ovmf_write(&mut f, block * BLOCK_SIZE + 7, &[0x00, 0x11]);
    }
    // The erase address may be anywhere in the block.
    write_u8(&mut f, BLOCK_SIZE + 0x345, CMD_ERASE_SETUP);
    write_u8(&mut f, BLOCK_SIZE + 0x345, CMD_ERASE_CONFIRM);
    assert_eq!(read_u8(&mut f, BLOCK_SIZE), STATUS_READY, "status until read array");
    write_u8(&mut f, 0, CMD_READ_ARRAY);
    assert_eq!(read_array(&mut f, BLOCK_SIZE, BLOCK_SIZE as usize), vec![0xff; 4096]);
    assert_eq!(read_array(&mut f, 7, 2), [0x00, 0x11]);
    assert_eq!(read_array(&mut f, 2 * BLOCK_SIZE + 7, 2), [0x00, 0x11]);
}

#[test]
fn erase_setup_without_confirm_erases_nothing() {
    let (_dir, path) = vars_file(1, &[0x42]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    for cancel in [CMD_READ_ARRAY, CMD_PROGRAM, 0x33] {
        write_u8(&mut f, 0, CMD_ERASE_SETUP);
        write_u8(&mut f, 0, cancel);
        assert_eq!(f.mode, PflashMode::ReadArray);
        assert_eq!(read_u8(&mut f, 0), 0x42);
    }
}

/// What `InitializeVariableFvHeader` and a variable update do: erase the blocks, write a
/// header, later append a record and flip its state byte, each as its own 0xFF-ended run.
#[test]
fn ovmf_fvb_erase_and_program_sequences_land_in_the_file() {
    let (_dir, path) = vars_file(4, &[0x5a; 64]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    assert_eq!(ovmf_probe(&mut f, BLOCK_SIZE, false), Probe::Flash);
    for lba in 0..4 {
        ovmf_erase(&mut f, lba);
    }
    let header: Vec<u8> = (0..72u8).collect();
    ovmf_write(&mut f, 0, &header);
    let record = b"\xaa\x55\x7fBootOrder";
    ovmf_write(&mut f, BLOCK_SIZE + 0x48, record);
    ovmf_write(&mut f, BLOCK_SIZE + 0x4a, &[0x3f]); // VAR_HEADER_VALID_ONLY -> VAR_ADDED
                                                    // The file already holds it all: no flush call, no drop.
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[..72], &header[..]);
    assert!(on_disk[72..BLOCK_SIZE as usize].iter().all(|&b| b == 0xff));
    let rec = &on_disk[BLOCK_SIZE as usize + 0x48..][..record.len()];
    assert_eq!(rec, b"\xaa\x55\x3fBootOrder");
    assert_eq!(read_array(&mut f, BLOCK_SIZE + 0x48, record.len()), rec);
    std::mem::forget(f);
}

#[test]
fn variables_survive_a_power_off_without_a_clean_shutdown() {
    let (_dir, path) = vars_file(2, VARS_HEAD);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    ovmf_write(&mut f, 0x1000, b"Boot0001");
    // A killed VMM runs no destructor.
    std::mem::forget(f);
    let mut again = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    assert_eq!(read_array(&mut again, 0x1000, 8), b"Boot0001");
    assert_eq!(ovmf_probe(&mut again, BLOCK_SIZE, true), Probe::Flash);
}

#[test]
fn changes_not_yet_flushed_are_written_on_drop() {
    let (_dir, path) = vars_file(1, &[]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    write_u8(&mut f, 3, CMD_PROGRAM);
    write_u8(&mut f, 3, 0x00); // no read array after it
    assert_eq!(std::fs::read(&path).unwrap()[3], 0xff, "not flushed yet");
    drop(f);
    assert_eq!(std::fs::read(&path).unwrap()[3], 0x00);
}

#[test]
fn a_flush_replaces_the_file_whole_and_leaves_no_temp_file() {
    let (dir, path) = vars_file(2, &[]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    ovmf_write(&mut f, 0x1fff, &[0x01]);
    drop(f);
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["vars.fd"]);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 2 * BLOCK_SIZE as usize);
    assert_eq!(bytes[0x1fff], 0x01);
}

#[cfg(unix)]
#[test]
fn a_flush_keeps_the_files_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path) = vars_file(1, &[]);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    ovmf_write(&mut f, 0, &[0]);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// The crash-safety a unit test can show: a flush that fails part-way (here the temp file
/// cannot be created: its name is too long) leaves the old file intact and no temp file, and
/// the guest's change stays pending in the device.
#[test]
fn a_failed_flush_leaves_the_old_file_and_keeps_the_change_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v".repeat(250));
    std::fs::write(&path, vec![0xffu8; BLOCK_SIZE as usize]).unwrap();
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    ovmf_write(&mut f, 0, &[0x12]);
    assert_eq!(read_u8(&mut f, 0), 0x12);
    assert!(matches!(f.flush(), Err(PflashError::Write { .. })));
    assert!(f.dirty);
    assert_eq!(std::fs::read(&path).unwrap(), vec![0xff; BLOCK_SIZE as usize]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    std::mem::forget(f);
}

#[test]
fn read_only_mode_takes_writes_in_memory_and_never_touches_the_file() {
    let (_dir, path) = vars_file(2, VARS_HEAD);
    let before = std::fs::read(&path).unwrap();
    let mut f = Pflash::open(&path, PflashAccess::ReadOnly).unwrap();
    ovmf_erase(&mut f, 0);
    ovmf_write(&mut f, 0x20, b"volatile");
    f.flush().unwrap();
    assert_eq!(read_array(&mut f, 0x20, 8), b"volatile");
    assert_eq!(read_u8(&mut f, 0x10), 0xff, "the erase happened in memory");
    drop(f);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[cfg(unix)]
#[test]
fn read_only_mode_opens_a_file_without_write_permission() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path) = vars_file(1, VARS_HEAD);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let f = Pflash::open(&path, PflashAccess::ReadOnly).unwrap();
    assert_eq!(f.size(), BLOCK_SIZE);
}

#[test]
fn bad_files_are_refused_with_an_error_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.fd");
    let err = Pflash::open(&missing, PflashAccess::ReadWrite).err().unwrap();
    assert!(matches!(&err, PflashError::NotFound { path } if path == &missing));
    assert!(err.to_string().contains("missing.fd"), "{err}");

    let empty = dir.path().join("empty.fd");
    std::fs::write(&empty, b"").unwrap();
    let err = Pflash::open(&empty, PflashAccess::ReadOnly).err().unwrap();
    assert!(matches!(&err, PflashError::Empty { path } if path == &empty));

    let odd = dir.path().join("odd.fd");
    std::fs::write(&odd, vec![0xffu8; 4096 + 512]).unwrap();
    let err = Pflash::open(&odd, PflashAccess::ReadWrite).err().unwrap();
    assert!(
        matches!(&err, PflashError::NotWholeBlocks { path, size: 4608, block: 4096 } if path == &odd)
    );
    assert!(err.to_string().contains("odd.fd"), "{err}");

    let dir_as_file = Pflash::open(dir.path(), PflashAccess::ReadOnly).err().unwrap();
    assert!(matches!(dir_as_file, PflashError::Open { .. }), "{dir_as_file}");
}

#[test]
fn create_vars_copies_the_template_once_and_never_overwrites() {
    let (dir, template) = vars_file(2, VARS_HEAD);
    let dest = dir.path().join("vm").join("vars.fd");
    std::fs::create_dir(dest.parent().unwrap()).unwrap();
    assert!(Pflash::create_vars(&template, &dest).unwrap());
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&template).unwrap());

    // The guest writes a variable; creating again keeps it.
    let mut f = Pflash::open(&dest, PflashAccess::ReadWrite).unwrap();
    ovmf_write(&mut f, 0x1000, b"kept");
    drop(f);
    assert!(!Pflash::create_vars(&template, &dest).unwrap());
    assert_eq!(&std::fs::read(&dest).unwrap()[0x1000..0x1004], b"kept");
    assert_eq!(std::fs::read_dir(dest.parent().unwrap()).unwrap().count(), 1, "no temp left");
}

#[test]
fn create_vars_refuses_a_bad_template_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("vars.fd");
    let missing = dir.path().join("OVMF_VARS_4M.fd");
    let err = Pflash::create_vars(&missing, &dest).err().unwrap();
    assert!(matches!(&err, PflashError::NotFound { path } if path == &missing));
    std::fs::write(&missing, [0u8; 100]).unwrap();
    let err = Pflash::create_vars(&missing, &dest).err().unwrap();
    assert!(matches!(&err, PflashError::NotWholeBlocks { path, .. } if path == &missing));
    assert!(!dest.exists());
}

#[test]
fn accesses_outside_the_device_or_of_odd_sizes_are_ignored() {
    let (_dir, path) = vars_file(1, &[0x42; 16]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    let end = BLOCK_SIZE;
    // Reads: all-ones, no panic.
    for (offset, len) in
        [(end, 1), (end - 4, 8), (u64::MAX, 8), (u64::MAX - 2, 4), (0, 3), (0, 0), (0, 16)]
    {
        let mut buf = vec![0u8; len];
        f.read(offset, &mut buf);
        assert!(buf.iter().all(|&b| b == 0xff), "{offset:#x}+{len}");
    }
    // Writes: neither commands nor data take effect.
    for (offset, data) in [
        (end, vec![CMD_PROGRAM]),
        (u64::MAX, vec![CMD_ERASE_SETUP]),
        (0, vec![CMD_PROGRAM; 3]),
        (0, vec![]),
    ] {
        f.write(offset, &data);
        assert_eq!(f.mode, PflashMode::ReadArray);
    }
    // A program whose data access leaves the device: nothing written, the error bit set.
    write_u8(&mut f, 0, CMD_PROGRAM);
    f.write(end - 4, &[0; 8]);
    assert_eq!(read_u8(&mut f, 0) & STATUS_PROGRAM_ERROR, STATUS_PROGRAM_ERROR);
    write_u8(&mut f, 0, CMD_PROGRAM);
    f.write(0, &[0; 3]);
    write_u8(&mut f, 0, CMD_READ_ARRAY);
    assert_eq!(read_array(&mut f, 0, 16), vec![0x42; 16]);
    assert_eq!(read_array(&mut f, end - 8, 8), vec![0xff; 8]);
    assert!(!f.dirty);
}

#[test]
fn unsupported_commands_return_to_read_array() {
    let (_dir, path) = vars_file(1, &[0x42]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    for cmd in [0x90, 0x98, 0x60, 0xe8, 0x01] {
        write_u8(&mut f, 0, CMD_READ_STATUS);
        write_u8(&mut f, 0, cmd);
        assert_eq!(read_u8(&mut f, 0), 0x42, "{cmd:#x}");
    }
}

#[test]
fn reset_returns_to_read_array_with_status_ready() {
    let (_dir, path) = vars_file(1, &[0x42]);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    write_u8(&mut f, 0, CMD_CLEAR_STATUS);
    write_u8(&mut f, 0, CMD_ERASE_SETUP);
    f.reset();
    assert_eq!(read_u8(&mut f, 0), 0x42);
    write_u8(&mut f, 0, CMD_READ_STATUS);
    assert_eq!(read_u8(&mut f, 0), STATUS_READY);
}

fn hostile_guest(f: &mut Pflash, seed: u64, steps: usize) {
    const COMMANDS: [u8; 12] =
        [0x10, 0x40, 0x20, 0xd0, 0x50, 0x70, 0xff, 0x00, 0x90, 0x98, 0xe8, 0x60];
    let size = f.size();
    let mut rng = Rng(seed);
    for _ in 0..steps {
        let r = rng.next();
        let offset = match r % 4 {
            0 => rng.next() % size,
            1 => rng.next() % (2 * size),
            2 => size - (rng.next() % 16),
            _ => rng.next(),
        };
        let len = [0, 1, 2, 3, 4, 5, 8, 9, 16][(rng.next() % 9) as usize];
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if let Some(first) = data.first_mut() {
            if rng.next().is_multiple_of(2) {
                *first = COMMANDS[(rng.next() % COMMANDS.len() as u64) as usize];
            }
        }
        if r & 0x100 == 0 {
            f.read(offset, &mut data);
        } else {
            f.write(offset, &data);
        }
        assert_eq!(f.size(), size);
    }
}

#[test]
fn hostile_command_sequences_never_panic() {
    let (_dir, path) = vars_file(2, VARS_HEAD);
    let mut volatile = Pflash::open(&path, PflashAccess::ReadOnly).unwrap();
    for seed in 1..=20u64 {
        hostile_guest(&mut volatile, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 5_000);
    }
    // With flushes to the file too (fewer steps: each flush fsyncs).
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    hostile_guest(&mut f, 0xdead_beef, 1_000);
    f.reset();
    f.flush().unwrap();
    let contents = f.contents.clone();
    let mut start = vec![0xffu8; contents.len()];
    start[..VARS_HEAD.len()].copy_from_slice(VARS_HEAD);
    assert_ne!(contents, start, "the hostile guest programmed or erased something");
    drop(f);
    assert_eq!(std::fs::read(&path).unwrap(), contents);
}

#[test]
fn saved_state_restores_mode_status_and_contents_into_the_file() {
    let (_dir, path) = vars_file(2, VARS_HEAD);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    ovmf_write(&mut f, 0x1000, b"at-snapshot");
    write_u8(&mut f, 0, CMD_CLEAR_STATUS);
    write_u8(&mut f, BLOCK_SIZE, CMD_ERASE_SETUP);
    let saved = f.save_state();
    let bytes = crate::state::encode("pflash", &saved).unwrap();

    // After the snapshot the guest goes on writing variables.
    f.reset();
    ovmf_write(&mut f, 0x100b, b"-after");
    ovmf_write(&mut f, 0x1000, b"\0\0");

    let decoded: PflashState = crate::state::decode("pflash", &bytes).unwrap();
    f.restore_state(&decoded).unwrap();
    assert_eq!(f.save_state(), saved);
    assert_eq!(
        &std::fs::read(&path).unwrap()[0x1000..0x1011],
        b"at-snapshot\xff\xff\xff\xff\xff\xff"
    );
    // The restored erase setup completes.
    write_u8(&mut f, BLOCK_SIZE, CMD_ERASE_CONFIRM);
    write_u8(&mut f, 0, CMD_READ_ARRAY);
    assert_eq!(read_array(&mut f, 0x1000, 11), vec![0xff; 11]);
}

#[test]
fn saved_state_that_does_not_fit_is_refused_and_changes_nothing() {
    let (_dir, path) = vars_file(2, VARS_HEAD);
    let mut f = Pflash::open(&path, PflashAccess::ReadWrite).unwrap();
    let before = f.save_state();
    let mut short = before.clone();
    short.contents.truncate(4096);
    let mut bad_block = before.clone();
    bad_block.mode = PflashMode::EraseSetup { block: 2 * BLOCK_SIZE };
    let mut unaligned = before.clone();
    unaligned.mode = PflashMode::EraseSetup { block: 17 };
    for state in [short, bad_block, unaligned] {
        assert!(matches!(f.restore_state(&state), Err(StateError::Invalid { .. })));
        assert_eq!(f.save_state(), before);
    }
    assert_eq!(std::fs::read(&path).unwrap(), before.contents);
}

fn ovmf_vars_template() -> Option<&'static Path> {
    let path = Path::new(OVMF_VARS_4M);
    if path.exists() {
        return Some(path);
    }
    testkit::skip("ovmf", &format!("{OVMF_VARS_4M} not found (Debian package ovmf)"));
    None
}

#[test]
fn debian_ovmf_vars_show_their_firmware_volume_header_and_probe_as_flash() {
    let Some(template) = ovmf_vars_template() else { return };
    let dir = tempfile::tempdir().unwrap();
    let vars = dir.path().join("vars.fd");
    assert!(Pflash::create_vars(template, &vars).unwrap());
    let mut f = Pflash::open(&vars, PflashAccess::ReadWrite).unwrap();
    assert_eq!(f.size(), 0x84000, "OVMF's 4 MiB build: VARS_SIZE");
    let mut sig = [0u8; 4];
    f.read(40, &mut sig);
    assert_eq!(&sig, b"_FVH");
    let mut fv_length = [0u8; 8];
    f.read(32, &mut fv_length);
    assert_eq!(u64::from_le_bytes(fv_length), 0x84000);
    assert_eq!(ovmf_probe(&mut f, BLOCK_SIZE, false), Probe::Flash);
    assert_eq!(ovmf_probe(&mut f, BLOCK_SIZE, true), Probe::Flash);
    drop(f);
    assert_eq!(std::fs::read(&vars).unwrap(), std::fs::read(template).unwrap());
}
