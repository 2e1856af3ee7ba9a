//! Helpers shared by the image-format integration tests (qemu-img made fixtures).
#![allow(dead_code)] // Each test crate uses its own subset.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::process::{Command, Output};

use disk::{BlockBackend, ExtentKind};

/// Whether qemu-img is here; skips when not (`testkit::skip`: a failure in CI).
pub fn have_qemu() -> bool {
    testkit::require_tool("qemu-img")
}

/// Runs `cmd`, which must succeed.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn read_all(disk: &dyn BlockBackend) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    // Odd-sized chunks cross sector and block boundaries.
    for (i, chunk) in buf.chunks_mut(300_007).enumerate() {
        disk.read_at(chunk, i as u64 * 300_007).unwrap();
    }
    buf
}

/// Extents cover the disk exactly, and every zero/unallocated one reads as zeroes.
pub fn check_extents(disk: &dyn BlockBackend, contents: &[u8]) -> Vec<disk::Extent> {
    let extents = disk.extents(0, disk.size()).unwrap();
    let mut pos = 0;
    for e in &extents {
        assert_eq!(e.offset, pos);
        if e.kind != ExtentKind::Data {
            let r = e.offset as usize..(e.offset + e.len) as usize;
            assert!(contents[r].iter().all(|&b| b == 0), "{e:?} is not zero");
        }
        pos += e.len;
    }
    assert_eq!(pos, disk.size());
    extents
}
