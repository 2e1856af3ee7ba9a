//! Images made by the real `qemu-img` read back byte for byte, holes reported as holes, and
//! every format detected by content. Skips (loudly) without qemu-img, fails so in CI.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use disk::{detect, image_info, open_image, BlockBackend, ExtentKind, ImageFormat, OpenOptions};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

fn have(tool: &str) -> bool {
    testkit::require_tool(tool)
}

fn have_qemu_img() -> bool {
    have("qemu-img")
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Distinct bytes for every sector: its number and a position-dependent byte.
fn sector_bytes(sector: u64) -> [u8; SECTOR as usize] {
    let mut s = [0u8; SECTOR as usize];
    for (i, b) in s.iter_mut().enumerate() {
        *b = (sector as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
    }
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s
}

/// A raw file of `size` bytes holding the pattern in `data` ranges and zeroes elsewhere.
fn write_raw(path: &Path, size: u64, data: &[(u64, u64)]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &(start, end) in data {
        let mut buf = Vec::new();
        for s in start / SECTOR..end / SECTOR {
            buf.extend_from_slice(&sector_bytes(s));
        }
        f.write_all_at(&buf, start).unwrap();
    }
}

/// 3 MiB + 9 sectors (not a multiple of any grain or block): data at the start, a 1 MiB
/// aligned hole, data, a 64 KiB hole, data up to the odd end.
fn small_layout(dir: &Path) -> (PathBuf, u64) {
    let size = 3 * MIB + 9 * SECTOR;
    let raw = dir.join("pattern.raw");
    write_raw(
        &raw,
        size,
        &[(0, MIB), (2 * MIB, 2 * MIB + 128 * 1024), (2 * MIB + 192 * 1024, size)],
    );
    (raw, size)
}

/// Reads `disk` and `raw` in chunks and asserts they are equal.
fn assert_same_bytes(disk: &dyn BlockBackend, raw: &Path) {
    let f = File::open(raw).unwrap();
    let size = f.metadata().unwrap().len();
    assert_eq!(disk.size(), size);
    let chunk = 8 * MIB;
    let mut a = vec![0u8; chunk as usize];
    let mut b = vec![0u8; chunk as usize];
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos) as usize;
        disk.read_at(&mut a[..n], pos).unwrap();
        f.read_exact_at(&mut b[..n], pos).unwrap();
        assert!(a[..n] == b[..n], "bytes differ in the {n} bytes at {pos:#x}");
        pos += n as u64;
    }
    // Unaligned small reads across grain and block boundaries.
    for &at in &[511u64, 65535, MIB - 3, 2 * MIB + 128 * 1024 - 100, size - 700] {
        let mut x = [0u8; 700];
        let mut y = [0u8; 700];
        disk.read_at(&mut x, at).unwrap();
        f.read_exact_at(&mut y, at).unwrap();
        assert_eq!(x, y, "small read at {at:#x}");
    }
}

/// Asserts the `len` bytes at `offset` of `f` are zero (in chunks, compared with memcmp).
fn assert_zero(f: &File, offset: u64, len: u64, what: &str) {
    let zeroes = vec![0u8; (8 * MIB).min(len) as usize];
    let mut buf = zeroes.clone();
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], pos).unwrap();
        assert!(buf[..n] == zeroes[..n], "{what}");
        pos += n as u64;
    }
}

/// Asserts the extents cover the disk exactly, never call data a hole, and (for sparse
/// formats) report `holes` as not-data.
fn assert_extents(disk: &dyn BlockBackend, raw: &Path, holes: &[(u64, u64)]) {
    let size = disk.size();
    let extents = disk.extents(0, size).unwrap();
    let f = File::open(raw).unwrap();
    let mut pos = 0;
    for e in &extents {
        assert_eq!(e.offset, pos, "extents must be consecutive: {extents:?}");
        if e.kind != ExtentKind::Data {
            assert_zero(&f, e.offset, e.len, &format!("{e:?} is not data but holds data"));
        }
        pos += e.len;
    }
    assert_eq!(pos, size);
    for &(start, end) in holes {
        let covered = extents
            .iter()
            .filter(|e| e.kind != ExtentKind::Data)
            .any(|e| e.offset <= start && e.offset + e.len >= end);
        assert!(covered, "hole {start:#x}..{end:#x} reported as data: {extents:?}");
    }
    // A sub-range is mapped exactly.
    let part = disk.extents(MIB / 2, MIB).unwrap();
    assert_eq!(part.first().unwrap().offset, MIB / 2);
    assert_eq!(part.iter().map(|e| e.len).sum::<u64>(), MIB);
}

fn check_format(
    args: &[&str],
    name: &str,
    format: ImageFormat,
    subformat: &str,
    holes: &[(u64, u64)],
) {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = small_layout(dir.path());
    let image = dir.path().join(name);
    let mut full = vec!["convert", "-f", "raw"];
    full.extend_from_slice(args);
    full.extend_from_slice(&[raw.to_str().unwrap(), image.to_str().unwrap()]);
    qemu_img(&full);
    assert_eq!(detect(&image).unwrap(), format);
    let disk = open_image(&image, OpenOptions::default()).unwrap();
    assert!(!disk.is_writable());
    assert_same_bytes(disk.as_ref(), &raw);
    assert_extents(disk.as_ref(), &raw, holes);
    let info = image_info(&image).unwrap();
    assert_eq!(info.format, format);
    assert_eq!(info.subformat.as_deref(), Some(subformat));
    assert_eq!(info.virtual_size, disk.size());
    assert!(info.allocated_bytes > 0);
    assert!(info.problems.is_empty(), "{:?}", info.problems);
}

const HOLES: &[(u64, u64)] = &[(MIB, 2 * MIB), (2 * MIB + 128 * 1024, 2 * MIB + 192 * 1024)];
const BLOCK_HOLES: &[(u64, u64)] = &[(MIB, 2 * MIB)];

#[test]
fn vmdk_monolithic_sparse_reads_like_the_raw_original() {
    let args = ["-O", "vmdk", "-o", "subformat=monolithicSparse"];
    check_format(&args, "d.vmdk", ImageFormat::Vmdk, "monolithicSparse", HOLES);
}

#[test]
fn vmdk_stream_optimized_reads_like_the_raw_original() {
    let args = ["-O", "vmdk", "-o", "subformat=streamOptimized"];
    check_format(&args, "d.vmdk", ImageFormat::Vmdk, "streamOptimized", HOLES);
}

#[test]
fn vmdk_monolithic_flat_reads_like_the_raw_original() {
    let args = ["-O", "vmdk", "-o", "subformat=monolithicFlat"];
    check_format(&args, "d.vmdk", ImageFormat::Vmdk, "monolithicFlat", &[]);
}

#[test]
fn vdi_dynamic_reads_like_the_raw_original() {
    check_format(&["-O", "vdi"], "d.vdi", ImageFormat::Vdi, "dynamic", BLOCK_HOLES);
}

#[test]
fn vdi_fixed_reads_like_the_raw_original() {
    let args = ["-O", "vdi", "-o", "static=on"];
    check_format(&args, "d.vdi", ImageFormat::Vdi, "fixed", &[]);
}

#[test]
fn parallels_reads_like_the_raw_original() {
    check_format(&["-O", "parallels"], "d.hds", ImageFormat::Parallels, "image", BLOCK_HOLES);
}

/// 2 GiB + 1 MiB + 9 sectors, so the twoGbMaxExtent subformats need two extents; data
/// straddles the extent boundary.
fn check_two_gb(subformat: &str, sparse: bool) {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 2048 * MIB + MIB + 9 * SECTOR;
    let raw = dir.path().join("pattern.raw");
    let edge = 2048 * MIB;
    write_raw(&raw, size, &[(0, MIB), (edge - 64 * 1024, edge + 64 * 1024), (size - 4096, size)]);
    let image = dir.path().join("big.vmdk");
    let opt = format!("subformat={subformat}");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        &opt,
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(files >= 4, "expected a descriptor and several extents, found {files} files");
    assert_eq!(detect(&image).unwrap(), ImageFormat::Vmdk);
    let disk = open_image(&image, OpenOptions::default()).unwrap();
    assert_same_bytes(disk.as_ref(), &raw);
    let holes: &[(u64, u64)] = if sparse { &[(MIB, edge - 64 * 1024)] } else { &[] };
    assert_extents(disk.as_ref(), &raw, holes);
    assert_eq!(image_info(&image).unwrap().subformat.as_deref(), Some(subformat));
}

#[test]
fn vmdk_two_gb_max_extent_sparse_reads_across_extents() {
    check_two_gb("twoGbMaxExtentSparse", true);
}

#[test]
fn vmdk_two_gb_max_extent_flat_reads_across_extents() {
    check_two_gb("twoGbMaxExtentFlat", false);
}

#[test]
fn vmdk_delta_disk_reads_through_to_its_parent() {
    if !have_qemu_img() || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, size) = small_layout(dir.path());
    let base = dir.path().join("base.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    // The child differs from the base in one sector, written through qemu-io so the child
    // stores only that grain.
    let changed = dir.path().join("changed.raw");
    std::fs::copy(&raw, &changed).unwrap();
    File::options().write(true).open(&changed).unwrap().write_all_at(&[0xee; 512], 4096).unwrap();
    let child = dir.path().join("child.vmdk");
    qemu_img(&["create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child.to_str().unwrap()]);
    let out = Command::new("qemu-io")
        .args(["-f", "vmdk", "-c", "write -P 0xee 4096 512", child.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
    let disk = open_image(&child, OpenOptions::default()).unwrap();
    assert_eq!(disk.size(), size);
    assert_same_bytes(disk.as_ref(), &changed);
    let info = image_info(&child).unwrap();
    assert_eq!(info.backing.as_deref(), Some(base.as_path()));
    assert!(info.problems.is_empty(), "{:?}", info.problems);
    assert!(info.allocated_bytes < image_info(&base).unwrap().allocated_bytes * 4);
    // The base's hole is still a hole through the child.
    assert_extents(disk.as_ref(), &changed, BLOCK_HOLES);
    let own = disk.extents(4096, 512).unwrap();
    assert_eq!(own[0].kind, ExtentKind::Data);
}

#[test]
fn reads_from_several_threads_agree() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, size) = small_layout(dir.path());
    let image = dir.path().join("s.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let disk = open_image(&image, OpenOptions::default()).unwrap();
    let expected = std::fs::read(&raw).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (disk, expected) = (&disk, &expected);
            s.spawn(move || {
                let mut buf = vec![0u8; 4096 + 17];
                let mut at = t * 997;
                while at + buf.len() as u64 <= size {
                    disk.read_at(&mut buf, at).unwrap();
                    assert!(
                        buf[..] == expected[at as usize..at as usize + buf.len()],
                        "at {at:#x}"
                    );
                    at += 40_000 + t * 13;
                }
            });
        }
    });
}

#[test]
fn other_formats_made_by_qemu_img_are_detected() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = small_layout(dir.path());
    assert_eq!(detect(&raw).unwrap(), ImageFormat::Raw);
    for (fmt, opts, expected) in [
        ("qcow2", "", ImageFormat::Qcow2),
        ("vpc", "subformat=dynamic", ImageFormat::Vhd),
        ("vpc", "subformat=fixed", ImageFormat::Vhd),
        ("vhdx", "", ImageFormat::Vhdx),
    ] {
        let image = dir.path().join(format!("x.{fmt}{}", opts.len()));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend_from_slice(&["-o", opts]);
        }
        args.extend_from_slice(&[raw.to_str().unwrap(), image.to_str().unwrap()]);
        qemu_img(&args);
        assert_eq!(detect(&image).unwrap(), expected, "{fmt} {opts}");
    }
}

#[test]
fn iso_and_ova_are_detected_by_content() {
    let dir = tempfile::tempdir().unwrap();
    // A minimal ISO 9660 image: a primary volume descriptor at sector 16, a terminator.
    let mut iso = vec![0u8; 0x8000 + 2 * 2048];
    iso[0x8000] = 1;
    iso[0x8001..0x8006].copy_from_slice(b"CD001");
    iso[0x8006] = 1;
    iso[0x8028..0x8048].fill(b' ');
    iso[0x8028..0x802d].copy_from_slice(b"HUTCH");
    iso[0x8800] = 255;
    iso[0x8801..0x8806].copy_from_slice(b"CD001");
    let iso_path = dir.path().join("cd.img");
    std::fs::write(&iso_path, &iso).unwrap();
    assert_eq!(detect(&iso_path).unwrap(), ImageFormat::Iso);
    let info = image_info(&iso_path).unwrap();
    assert_eq!(info.subformat.as_deref(), Some("iso9660 volume \"HUTCH\""));
    let cd = open_image(&iso_path, OpenOptions::default()).unwrap();
    assert!(!cd.is_writable());
    assert!(open_image(&iso_path, OpenOptions { writable: true }).is_err());

    // A ustar archive whose first member is the OVF descriptor.
    let mut tar = vec![0u8; 2048];
    tar[..12].copy_from_slice(b"machine.ovf\0");
    tar[100..108].copy_from_slice(b"0000644\0");
    tar[124..136].copy_from_slice(b"00000000005\0");
    tar[156] = b'0';
    tar[257..263].copy_from_slice(b"ustar\0");
    tar[263..265].copy_from_slice(b"00");
    tar[148..156].fill(b' ');
    let sum: u32 = tar[..512].iter().map(|&b| u32::from(b)).sum();
    tar[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    tar[512..517].copy_from_slice(b"<ovf>");
    let ova = dir.path().join("vm.tar");
    std::fs::write(&ova, &tar).unwrap();
    assert_eq!(detect(&ova).unwrap(), ImageFormat::Ova);
    let err = open_image(&ova, OpenOptions::default()).err().unwrap();
    assert_eq!(err.kind(), disk::DiskErrorKind::UnsupportedFeature);
}

#[test]
fn renamed_sparse_vmdks_read_their_own_data() {
    if !have_qemu_img() {
        return;
    }
    for subformat in ["monolithicSparse", "streamOptimized"] {
        let dir = tempfile::tempdir().unwrap();
        let (raw, _) = small_layout(dir.path());
        let written = dir.path().join("written.vmdk");
        let opt = format!("subformat={subformat}");
        let args = ["convert", "-f", "raw", "-O", "vmdk", "-o", &opt];
        let mut full = args.to_vec();
        full.extend_from_slice(&[raw.to_str().unwrap(), written.to_str().unwrap()]);
        qemu_img(&full);
        // The embedded descriptor still names "written.vmdk": it must not matter.
        let renamed = dir.path().join("renamed.vmdk");
        std::fs::rename(&written, &renamed).unwrap();
        let disk = open_image(&renamed, OpenOptions::default()).unwrap();
        assert_same_bytes(disk.as_ref(), &raw);
    }
}
