//! Hostile and hand-built images: every bad header field or pointer gives a clear error with
//! its kind and offset, never a panic.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::error::Error;
use std::os::unix::fs::FileExt;

use super::*;

const CS: u64 = 65536;

/// A fresh 4 MiB image with data in its first cluster; returns (dir, path).
fn image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let img = Qcow2::create(&path, 4 << 20, None, CS as u32).unwrap();
    img.write_at(&[0xab; 4096], 0).unwrap();
    drop(img);
    (dir, path)
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn read_u64(path: &Path, offset: u64) -> u64 {
    let f = File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

fn open_err(path: &Path, writable: bool) -> DiskError {
    Qcow2::open(path, OpenOptions { writable }).unwrap_err()
}

fn reason(e: &DiskError) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

#[test]
fn truncated_header_is_invalid_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qcow2");
    let mut bytes = header::MAGIC.to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 3, 0, 0]);
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(&path, false);
    assert_eq!(e.kind(), DiskErrorKind::InvalidFormat);
    assert_eq!(e.offset(), Some(0));
    assert!(reason(&e).contains("too short"), "{e}: {}", reason(&e));
}

#[test]
fn truncated_image_after_the_header_is_corrupt() {
    let (_d, path) = image();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(CS + 100).unwrap();
    let e = open_err(&path, false);
    assert_eq!(e.kind(), DiskErrorKind::CorruptImage, "{e}");
    assert!(e.offset().is_some());
}

#[test]
fn cluster_bits_30_is_rejected() {
    let (_d, path) = image();
    patch(&path, field::CLUSTER_BITS, &30u32.to_be_bytes());
    let e = open_err(&path, false);
    assert_eq!(e.kind(), DiskErrorKind::InvalidFormat);
    assert_eq!(e.offset(), Some(field::CLUSTER_BITS));
}

#[test]
fn l1_table_past_eof_is_corrupt() {
    let (_d, path) = image();
    patch(&path, field::L1_OFFSET, &(1u64 << 40).to_be_bytes());
    let e = open_err(&path, false);
    assert_eq!(e.kind(), DiskErrorKind::CorruptImage);
    assert_eq!(e.offset(), Some(1 << 40));
}

#[test]
fn huge_l1_size_is_rejected_before_allocating() {
    let (_d, path) = image();
    patch(&path, field::L1_SIZE, &u32::MAX.to_be_bytes());
    let e = open_err(&path, false);
    assert_eq!(e.kind(), DiskErrorKind::UnsupportedFeature);
    assert_eq!(e.offset(), Some(field::L1_SIZE));
    // Within the limit but past the end of the file.
    patch(&path, field::L1_SIZE, &(1u32 << 20).to_be_bytes());
    assert_eq!(open_err(&path, false).kind(), DiskErrorKind::CorruptImage);
}

#[test]
fn l1_too_small_for_the_virtual_size_is_corrupt() {
    let (_d, path) = image();
    patch(&path, field::SIZE, &(1u64 << 40).to_be_bytes());
    let e = open_err(&path, false);
    assert_eq!(e.kind(), DiskErrorKind::CorruptImage);
    assert_eq!(e.offset(), Some(field::L1_SIZE));
    patch(&path, field::SIZE, &u64::MAX.to_be_bytes());
    assert_eq!(open_err(&path, false).offset(), Some(field::SIZE));
}

#[test]
fn refcount_table_past_eof_is_corrupt() {
    let (_d, path) = image();
    patch(&path, field::REFCOUNT_TABLE, &(1u64 << 36).to_be_bytes());
    let e = open_err(&path, false);
    assert_eq!(e.kind(), DiskErrorKind::CorruptImage);
    assert_eq!(e.offset(), Some(1 << 36));
}

#[test]
fn l2_entry_past_eof_fails_the_read_not_the_process() {
    let (_d, path) = image();
    let l1 = read_u64(&path, field::L1_OFFSET);
    let l2 = read_u64(&path, l1) & L1_OFFSET_MASK;
    patch(&path, l2, &(COPIED | (1u64 << 45)).to_be_bytes());
    let img = Qcow2::open(&path, OpenOptions::default()).unwrap();
    let mut buf = [0u8; 512];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), DiskErrorKind::CorruptImage);
    assert_eq!(e.offset(), Some(1 << 45));
    assert!(e.to_string().contains("a.qcow2"), "{e}");
    // Misaligned, too.
    patch(&path, l2, &(COPIED | (3 * CS + 512)).to_be_bytes());
    let img = Qcow2::open(&path, OpenOptions::default()).unwrap();
    assert_eq!(img.read_at(&mut buf, 0).unwrap_err().kind(), DiskErrorKind::CorruptImage);
    assert!(img.check().unwrap().corruptions > 0);
}

#[test]
fn backing_loop_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    drop(Qcow2::create(&a, 1 << 20, None, CS as u32).unwrap());
    drop(
        Qcow2::create(&b, 1 << 20, Some((Path::new("a.qcow2"), ImageFormat::Qcow2)), CS as u32)
            .unwrap(),
    );
    // Point a back at b: name after the header's end-of-extensions marker.
    patch(&a, 1024, b"b.qcow2");
    let mut f = [0u8; 12];
    f[..8].copy_from_slice(&1024u64.to_be_bytes());
    f[8..].copy_from_slice(&7u32.to_be_bytes());
    patch(&a, field::BACKING_OFFSET, &f);
    let e = open_err(&a, false);
    assert_eq!(e.kind(), DiskErrorKind::CorruptImage);
    assert!(reason(&e).contains("loops"), "{e}: {}", reason(&e));
    assert!(e.path().is_some_and(|p| p.ends_with("a.qcow2")), "{e}");
    // An image naming itself.
    patch(&a, 1024, b"a.qcow2");
    assert_eq!(open_err(&a, false).kind(), DiskErrorKind::CorruptImage);
}

#[test]
fn unknown_incompatible_feature_is_named() {
    let (_d, path) = image();
    patch(&path, field::INCOMPAT, &(1u64 << 4).to_be_bytes());
    let e = open_err(&path, false);
    assert_eq!(e.kind(), DiskErrorKind::UnsupportedFeature);
    assert!(reason(&e).contains("extended L2"), "{}", reason(&e));
    patch(&path, field::INCOMPAT, &(1u64 << 9).to_be_bytes());
    assert!(reason(&open_err(&path, false)).contains("bit 9"));
}

#[test]
fn dirty_image_opens_read_only_only() {
    let (_d, path) = image();
    patch(&path, field::INCOMPAT, &header::INCOMPAT_DIRTY.to_be_bytes());
    let e = open_err(&path, true);
    assert_eq!(e.kind(), DiskErrorKind::UnsupportedFeature);
    assert!(reason(&e).contains("dirty"));
    let img = Qcow2::open(&path, OpenOptions::default()).unwrap();
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xab; 4096]);
    assert!(!img.info().problems.is_empty());
    patch(&path, field::INCOMPAT, &header::INCOMPAT_CORRUPT.to_be_bytes());
    assert_eq!(open_err(&path, true).kind(), DiskErrorKind::CorruptImage);
}

#[test]
fn refcount_entries_of_every_width_round_trip() {
    for order in 0..=6u32 {
        let mut block = vec![0u8; 512];
        let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
        let entries = (512 * 8) >> order;
        for i in 0..entries {
            meta::rc_set(&mut block, order, i, i.wrapping_mul(0x9e37_79b9) & max);
        }
        for i in 0..entries {
            assert_eq!(
                meta::rc_get(&block, order, i),
                i.wrapping_mul(0x9e37_79b9) & max,
                "order {order}"
            );
        }
    }
}

#[test]
fn discarded_and_zeroed_clusters_read_as_zeroes_and_free_space() {
    let (_d, path) = image();
    let img = Qcow2::open(&path, OpenOptions { writable: true }).unwrap();
    img.write_at(&vec![1u8; 3 * CS as usize], CS).unwrap();
    img.discard(CS, CS).unwrap();
    img.write_zeroes(2 * CS + 10, CS).unwrap();
    let mut buf = vec![0u8; 3 * CS as usize];
    img.read_at(&mut buf, CS).unwrap();
    assert!(buf[..CS as usize].iter().all(|&b| b == 0));
    assert!(buf[CS as usize..CS as usize + 10].iter().all(|&b| b == 1));
    assert!(buf[CS as usize + 10..2 * CS as usize + 10].iter().all(|&b| b == 0));
    assert!(buf[2 * CS as usize + 10..].iter().all(|&b| b == 1));
    let report = img.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(img.extents(CS, CS).unwrap()[0].kind, ExtentKind::Unallocated);
}

#[test]
fn read_only_image_refuses_writes() {
    let (_d, path) = image();
    let img = Qcow2::open(&path, OpenOptions::default()).unwrap();
    assert!(img.write_at(&[1], 0).is_err());
    assert!(img.resize(8 << 20).is_err());
    assert_eq!(img.write_at(&[1], u64::MAX).unwrap_err().kind(), DiskErrorKind::Io);
}
