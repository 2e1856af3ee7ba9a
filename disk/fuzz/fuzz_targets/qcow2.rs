//! qcow2 parser: open, describe, read and map whatever the fuzzer writes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    disk_fuzz::with_file(data, "input.qcow2", |path| {
        if let Ok(image) = disk::qcow2::Qcow2::open(path, disk::OpenOptions::default()) {
            let _ = image.info();
            let _ = image.check();
            disk_fuzz::exercise(&image);
        }
    });
});
