//! vmdk parser: open, describe, read and map whatever the fuzzer writes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    disk_fuzz::with_file(data, "input.vmdk", |path| {
        if let Ok(image) = disk::Vmdk::open(path, disk::OpenOptions::default()) {
            let _ = image.info();
            disk_fuzz::exercise(&image);
        }
    });
});
