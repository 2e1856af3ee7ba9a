//! VHDX images made by the real qemu-img read back exactly as qemu-img reads them.
//! qemu can't create differencing VHDX ("Backing file not supported"): those are covered by the
//! hand-built fixtures in `disk/src/vhdx.rs`'s unit tests.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

mod common;

use common::{check_extents, have_qemu, read_all, run};
use std::path::{Path, PathBuf};

use disk::vhdx::Vhdx;
use disk::{BlockBackend, ExtentKind, OpenOptions};

const SECTOR: usize = 512;

/// Distinct bytes per sector, with whole-block holes and a hole inside a block.
fn pattern(size: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..size).map(|i| ((i / SECTOR) % 251 + 1) as u8).collect();
    let mib = 1 << 20;
    data[2 * mib..5 * mib].fill(0);
    data[6 * mib + 4096..6 * mib + 8192].fill(0);
    data[size - mib..].fill(0);
    data
}

fn qemu_raw(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-view.raw");
    run(
        "qemu-img",
        &["convert", "-f", "vhdx", "-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()],
    );
    std::fs::read(out).unwrap()
}

fn convert(opts: &str) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("pattern.raw");
    let data = pattern(12 << 20);
    std::fs::write(&raw, &data).unwrap();
    let image = dir.path().join("disk.vhdx");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            opts,
            raw.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    (dir, image, data)
}

#[test]
fn fixed_vhdx_reads_like_qemu() {
    if !have_qemu() {
        return;
    }
    let (dir, path, data) = convert("subformat=fixed");
    let disk = Vhdx::open(&path, OpenOptions::default()).unwrap();
    let expected = qemu_raw(&path, dir.path());
    assert_eq!(disk.size(), data.len() as u64);
    let got = read_all(&disk);
    assert!(got == expected && got == data, "fixed VHDX contents differ");
    check_extents(&disk, &got);
    assert_eq!(disk.info().subformat.as_deref(), Some("fixed"));
}

#[test]
fn dynamic_vhdx_reads_like_qemu_and_reports_holes() {
    if !have_qemu() {
        return;
    }
    let (dir, path, data) = convert("subformat=dynamic,block_size=1M");
    let disk = Vhdx::open(&path, OpenOptions::default()).unwrap();
    let expected = qemu_raw(&path, dir.path());
    let got = read_all(&disk);
    assert!(got == expected && got == data, "dynamic VHDX contents differ");
    let extents = check_extents(&disk, &got);
    let holes: u64 = extents.iter().filter(|e| e.kind != ExtentKind::Data).map(|e| e.len).sum();
    assert!(holes >= 3 << 20, "{extents:?}");
    let info = disk.info();
    assert_eq!(info.subformat.as_deref(), Some("dynamic"));
    assert_eq!(info.virtual_size, data.len() as u64);
    assert!(info.backing.is_none());
}

#[test]
fn dynamic_vhdx_with_default_block_size_written_by_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (dir, path, _) = convert("subformat=dynamic");
    let p = path.to_str().unwrap();
    run("qemu-io", &["-f", "vhdx", "-c", "write -P 0xab 3000000 70000", p]);
    run("qemu-io", &["-f", "vhdx", "-c", "write -P 0xcd 512 1024", p]);
    let disk = Vhdx::open(&path, OpenOptions::default()).unwrap();
    assert!(read_all(&disk) == qemu_raw(&path, dir.path()));
}

#[test]
fn concurrent_reads_agree() {
    if !have_qemu() {
        return;
    }
    let (_dir, path, data) = convert("subformat=dynamic,block_size=1M");
    let disk = Vhdx::open(&path, OpenOptions::default()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (disk, data) = (&disk, &data);
            s.spawn(move || {
                let mut buf = vec![0u8; 65_537];
                for i in 0..100u64 {
                    let off = (i * 7_919_993 + t * 1_000_003) % (disk.size() - buf.len() as u64);
                    disk.read_at(&mut buf, off).unwrap();
                    assert!(buf[..] == data[off as usize..off as usize + buf.len()]);
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
    let (_dir, path, _) = convert("subformat=dynamic");
    let disk = Vhdx::open(&path, OpenOptions::default()).unwrap();
    assert!(!disk.is_writable());
    assert_eq!(disk.write_at(&[1], 0).unwrap_err().kind(), disk::DiskErrorKind::UnsupportedFeature);
    let err = Vhdx::open(&path, OpenOptions { writable: true }).unwrap_err();
    assert_eq!(err.kind(), disk::DiskErrorKind::UnsupportedFeature);
}
