//! OVA reader: tar member table, OVF descriptor, manifest check, member extraction.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    disk_fuzz::with_file(data, "input.ova", |path| {
        if let Ok(ova) = disk::ova::Ova::open(path) {
            let _ = ova.info();
            let _ = ova.problems();
            let d = ova.descriptor();
            if let Some(first) = d.disks.first() {
                let out = path.with_extension("member");
                let _ = ova.extract_member(&first.file_name, &out);
                let _ = std::fs::remove_file(out);
            }
        }
    });
});
