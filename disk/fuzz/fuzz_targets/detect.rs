//! Format detection and the generic open/info dispatch, over every format at once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Detection from bytes must agree with detection from the file.
    let head = &data[..data.len().min(disk::detect::HEAD_LEN)];
    let tail = &data[data.len().saturating_sub(disk::detect::TAIL_LEN)..];
    let from_bytes = disk::detect_bytes(head, tail, data.len() as u64);
    disk_fuzz::with_file(data, "input.img", |path| {
        let from_file = disk::detect(path).expect("detect failed on a readable file");
        assert_eq!(from_bytes, from_file);
        let _ = disk::image_info(path);
        if let Ok(image) = disk::open_image(path, disk::OpenOptions::default()) {
            disk_fuzz::exercise(image.as_ref());
        }
    });
});
