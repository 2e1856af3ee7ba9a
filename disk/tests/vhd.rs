//! VHD images made by the real qemu-img read back exactly as qemu-img reads them.
//! qemu can't create differencing VHDs ("Backing file not supported"): those are covered by the
//! hand-built fixtures in `disk/src/vhd.rs`'s unit tests.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

mod common;

use common::{check_extents, have_qemu, read_all, run};
use std::path::Path;

use disk::vhd::Vhd;
use disk::{BlockBackend, ExtentKind, OpenOptions};

const SECTOR: usize = 512;

/// Distinct bytes per sector, with whole-block holes and a hole inside a block.
fn pattern(size: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..size).map(|i| ((i / SECTOR) % 251 + 1) as u8).collect();
    let mib = 1 << 20;
    data[2 * mib..4 * mib + 4096].fill(0); // one whole 2 MiB block (and a bit) unwritten
    data[5 * mib..5 * mib + 8 * SECTOR].fill(0);
    data[size - mib..].fill(0); // the tail
    data
}

/// qemu-img's own view of `image`'s contents.
fn qemu_raw(image: &Path, fmt: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-view.raw");
    run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()],
    );
    std::fs::read(out).unwrap()
}

fn convert(subformat: &str) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("pattern.raw");
    let data = pattern(10 << 20);
    std::fs::write(&raw, &data).unwrap();
    let vhd = dir.path().join(format!("{subformat}.vhd"));
    let opt = format!("subformat={subformat}");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            &opt,
            raw.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ],
    );
    (dir, vhd, data)
}

#[test]
fn fixed_vhd_reads_like_qemu() {
    if !have_qemu() {
        return;
    }
    let (dir, path, data) = convert("fixed");
    let disk = Vhd::open(&path, OpenOptions::default()).unwrap();
    let expected = qemu_raw(&path, "vpc", dir.path());
    assert_eq!(disk.size(), expected.len() as u64);
    let got = read_all(&disk);
    assert!(got == expected, "fixed VHD contents differ from qemu-img's");
    assert_eq!(&got[..data.len()], &data[..]);
    check_extents(&disk, &got);
    let info = disk.info();
    assert_eq!(info.subformat.as_deref(), Some("fixed"));
    assert_eq!(info.virtual_size, expected.len() as u64);
    assert!(!disk.is_writable());
}

#[test]
fn dynamic_vhd_reads_like_qemu_and_reports_holes() {
    if !have_qemu() {
        return;
    }
    let (dir, path, data) = convert("dynamic");
    let disk = Vhd::open(&path, OpenOptions::default()).unwrap();
    let expected = qemu_raw(&path, "vpc", dir.path());
    let got = read_all(&disk);
    assert!(got == expected, "dynamic VHD contents differ from qemu-img's");
    assert_eq!(&got[..data.len()], &data[..]);
    let extents = check_extents(&disk, &got);
    let holes: u64 =
        extents.iter().filter(|e| e.kind == ExtentKind::Unallocated).map(|e| e.len).sum();
    assert!(holes >= 2 << 20, "{extents:?}");
    assert_eq!(disk.info().subformat.as_deref(), Some("dynamic"));
    assert!(disk.info().allocated_bytes > 0);
}

#[test]
fn dynamic_vhd_written_by_qemu_io_reads_like_qemu() {
    if !have_qemu() {
        return;
    }
    let (dir, path, _) = convert("dynamic");
    let p = path.to_str().unwrap();
    // A new block inside the hole, and a partial overwrite.
    run("qemu-io", &["-f", "vpc", "-c", "write -P 0xab 2100000 70000", p]);
    run("qemu-io", &["-f", "vpc", "-c", "write -P 0xcd 512 1024", p]);
    let disk = Vhd::open(&path, OpenOptions::default()).unwrap();
    let expected = qemu_raw(&path, "vpc", dir.path());
    assert!(read_all(&disk) == expected);
}

#[test]
fn concurrent_reads_agree() {
    if !have_qemu() {
        return;
    }
    let (dir, path, _) = convert("dynamic");
    let disk = Vhd::open(&path, OpenOptions::default()).unwrap();
    let expected = qemu_raw(&path, "vpc", dir.path());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (disk, expected) = (&disk, &expected);
            s.spawn(move || {
                let mut buf = vec![0u8; 65_537];
                for i in 0..100u64 {
                    let off = (i * 7_919_993 + t * 1_000_003) % (disk.size() - buf.len() as u64);
                    disk.read_at(&mut buf, off).unwrap();
                    assert!(buf[..] == expected[off as usize..off as usize + buf.len()]);
                }
            });
        }
    });
}

#[test]
fn writes_are_refused() {
    if !have_qemu() {
        return;
    }
    let (_dir, path, _) = convert("dynamic");
    let disk = Vhd::open(&path, OpenOptions::default()).unwrap();
    assert_eq!(disk.write_at(&[1], 0).unwrap_err().kind(), disk::DiskErrorKind::UnsupportedFeature);
    assert_eq!(disk.discard(0, 512).unwrap_err().kind(), disk::DiskErrorKind::UnsupportedFeature);
    assert_eq!(
        disk.write_zeroes(0, 512).unwrap_err().kind(),
        disk::DiskErrorKind::UnsupportedFeature
    );
    let err = Vhd::open(&path, OpenOptions { writable: true }).unwrap_err();
    assert_eq!(err.kind(), disk::DiskErrorKind::UnsupportedFeature);
}
