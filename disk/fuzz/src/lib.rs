//! Shared harness for the disk parser fuzz targets: the input becomes an image file in a
//! tmpfs directory, the parser opens it, and the result is exercised (reads, extents, info).
//! Errors are fine; panics, hangs and runaway allocations are what libFuzzer reports.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use disk::BlockBackend;

/// Largest range whose extents are mapped (hostile headers claim exabyte disks).
const MAP_WINDOW: u64 = 64 << 20;
/// Largest single read.
const READ_LEN: u64 = 64 << 10;

/// A private directory for this process's input files: /dev/shm when it exists (no disk I/O).
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        base.join(format!("hutch-disk-fuzz-{}", std::process::id()))
    })
}

/// Writes `data` to `<dir>/<name>` and runs `f` on that path. The directory goes with the
/// file: a fuzzer process exits without running destructors, and would leave it behind.
pub fn with_file(data: &[u8], name: &str, f: impl FnOnce(&Path)) {
    let path = dir().join(name);
    std::fs::create_dir_all(dir()).expect("cannot create the fuzz input directory");
    std::fs::write(&path, data).expect("cannot write the fuzz input");
    f(&path);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(dir());
}

/// Reads a few ranges and maps extents, as a converter and a guest would.
pub fn exercise(disk: &dyn BlockBackend) {
    let size = disk.size();
    if let Ok(extents) = disk.extents(0, size.min(MAP_WINDOW)) {
        let mut pos = 0;
        for e in &extents {
            assert_eq!(e.offset, pos, "extents must tile the range");
            pos += e.len;
        }
        if let Some(e) = extents.iter().find(|e| e.kind == disk::ExtentKind::Data) {
            read(disk, e.offset, e.len);
        }
    }
    let tail = size.saturating_sub(READ_LEN);
    for offset in [0, size / 2, tail] {
        read(disk, offset, size - offset);
    }
    if size > 0 {
        let _ = disk.extents(size - 1, 1);
    }
    // Past the end must be an error, never a panic.
    let mut one = [0u8; 1];
    assert!(disk.read_at(&mut one, size).is_err(), "read past the end succeeded");
}

fn read(disk: &dyn BlockBackend, offset: u64, len: u64) {
    let mut buf = vec![0u8; len.min(READ_LEN) as usize];
    let _ = disk.read_at(&mut buf, offset);
}
