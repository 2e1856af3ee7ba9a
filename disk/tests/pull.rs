//! Pulling a snapshot layer into its children (snapshot delete), against chains made by the
//! real `qemu-img`/`qemu-io`: the children read the same before and after, QEMU agrees, and
//! the layer can then be deleted.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

mod common;

use common::{have_qemu, read_all, run};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use disk::qcow2::Qcow2;
use disk::{
    open_image, pull_backing_layer, qcow2_backing, BlockBackend, DiskErrorKind, ExtentKind,
    OpenOptions,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(s(image));
    run("qemu-io", &args);
}

fn create(path: &Path, backing: Option<(&str, &str)>, cluster: u64) {
    let opts = format!("cluster_size={cluster}");
    let size = SIZE.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
    if let Some((name, format)) = backing {
        args.extend_from_slice(&["-b", name, "-F", format]);
    }
    args.extend_from_slice(&[s(path), &size]);
    run("qemu-img", &args);
}

/// A raw base of `SIZE` bytes with no zero stretch (so zero clusters above it show).
fn base_raw(path: &Path) {
    let data: Vec<u8> = (0..SIZE).map(|i| (i / 512 % 251) as u8 | 1).collect();
    std::fs::write(path, data).unwrap();
}

/// Writes the "mid" layer: data, a compressed cluster and zero clusters.
fn write_mid(mid: &Path) {
    qemu_io(
        mid,
        &[
            "write -P 0xb1 0 192k",
            "write -P 0xb2 1000000 300000",
            "write -z 2M 256k",
            "write -c -P 0xb3 3M 64k",
            "write -P 0xb4 5M 1M",
            "write -z 7M 128k",
        ],
    );
}

/// Writes a child of mid, overlapping some of mid's clusters.
fn write_top(top: &Path, byte: u8) {
    qemu_io(
        top,
        &[
            &format!("write -P {byte} 64k 64k"),
            &format!("write -P {byte} 1100000 5000"),
            &format!("write -P {byte} 2M 64k"),
            &format!("write -P {byte} 5500000 70000"),
            "write -z 6M 64k",
        ],
    );
}

fn contents(path: &Path) -> Vec<u8> {
    read_all(&*open_image(path, OpenOptions::default()).unwrap())
}

fn info(path: &Path) -> String {
    let out = run("qemu-img", &["info", "--output=json", "-U", s(path)]);
    String::from_utf8(out.stdout).unwrap()
}

/// QEMU finds `image` clean and equal to the raw `want`.
fn qemu_agrees(image: &Path, want: &Path) {
    run("qemu-img", &["check", s(image)]);
    run("qemu-img", &["compare", "-F", "raw", s(image), s(want)]);
}

fn to_raw(image: &Path, out: &Path) {
    run("qemu-img", &["convert", "-O", "raw", s(image), s(out)]);
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i:#x}");
    }
}

/// The kind of top's own mapping at `offset` (through the chain).
fn kind_at(image: &Path, offset: u64) -> ExtentKind {
    let img = Qcow2::open(image, OpenOptions::default()).unwrap();
    img.extents(offset, 4096).unwrap()[0].kind
}

#[test]
fn pulling_the_middle_layer_keeps_the_top_content() {
    if !have_qemu() {
        return;
    }
    for (mid_cluster, top_cluster) in
        [(64 * KIB, 64 * KIB), (64 * KIB, 4 * KIB), (4 * KIB, 64 * KIB)]
    {
        let what = format!("mid {mid_cluster}, top {top_cluster}");
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join("top.qcow2");
        base_raw(&base);
        create(&mid, Some(("base.raw", "raw")), mid_cluster);
        write_mid(&mid);
        create(&top, Some(("mid.qcow2", "qcow2")), top_cluster);
        write_top(&top, 0xc1);
        let want = contents(&top);
        let before = dir.path().join("before.raw");
        to_raw(&top, &before);
        // Unallocated in top: mid's zero clusters and base show through.
        assert_eq!(kind_at(&top, 7 * MIB), ExtentKind::Zero, "{what}");

        let report = pull_backing_layer(&top).unwrap();
        assert_eq!(report.new_backing.as_deref(), Some(base.as_path()), "{what}");
        assert!(report.clusters_copied > 0 && report.bytes_copied > 0, "{what}: {report:?}");
        assert_same(&contents(&top), &want, &what);
        let i = info(&top);
        assert!(i.contains("\"backing-filename\": \"base.raw\""), "{what}: {i}");
        assert!(i.contains("\"backing-filename-format\": \"raw\""), "{what}: {i}");
        assert_eq!(qcow2_backing(&top).unwrap().as_deref(), Some(base.as_path()));
        qemu_agrees(&top, &before);
        // Mid's zero clusters became top's own.
        assert_eq!(kind_at(&top, 7 * MIB), ExtentKind::Zero, "{what}");
        assert_eq!(kind_at(&top, 2 * MIB + 128 * KIB), ExtentKind::Zero, "{what}");

        std::fs::remove_file(&mid).unwrap();
        assert_same(&contents(&top), &want, &format!("{what}, mid deleted"));
        qemu_agrees(&top, &before);
        // Pulling again moves on to base, which is not qcow2.
        let e = pull_backing_layer(&top).unwrap_err();
        assert_eq!(e.kind(), DiskErrorKind::UnsupportedFeature, "{e}");
    }
}

#[test]
fn a_v2_child_gets_real_zeroes_for_the_layer_zero_clusters() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    base_raw(&base);
    create(&mid, Some(("base.raw", "raw")), 64 * KIB);
    write_mid(&mid);
    let size = SIZE.to_string();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "mid.qcow2", "-F", "qcow2"]
            .iter()
            .copied()
            .chain([s(&top), &size])
            .collect::<Vec<_>>(),
    );
    write_top(&top, 0xc8);
    let want = contents(&top);
    let before = dir.path().join("before.raw");
    to_raw(&top, &before);
    pull_backing_layer(&top).unwrap();
    assert!(info(&top).contains("\"compat\": \"0.10\""));
    std::fs::remove_file(&mid).unwrap();
    assert_same(&contents(&top), &want, "v2 child");
    qemu_agrees(&top, &before);
}

#[test]
fn pulling_a_layer_without_backing_makes_the_child_complete() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&mid, None, 64 * KIB);
    write_mid(&mid);
    create(&top, Some(("mid.qcow2", "qcow2")), 64 * KIB);
    write_top(&top, 0xc2);
    let want = contents(&top);
    let before = dir.path().join("before.raw");
    to_raw(&top, &before);

    let report = pull_backing_layer(&top).unwrap();
    assert_eq!(report.new_backing, None);
    assert!(!info(&top).contains("backing-filename"), "{}", info(&top));
    assert_eq!(qcow2_backing(&top).unwrap(), None);
    std::fs::remove_file(&mid).unwrap();
    assert_same(&contents(&top), &want, "no backing");
    qemu_agrees(&top, &before);
}

#[test]
fn both_branches_of_a_layer_keep_their_content() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    create(&base, None, 64 * KIB);
    qemu_io(&base, &["write -P 0xa1 0 8M"]);
    create(&mid, Some(("base.qcow2", "qcow2")), 64 * KIB);
    write_mid(&mid);
    let mut branches = Vec::new();
    for (name, byte) in [("left.qcow2", 0xd1u8), ("right.qcow2", 0xd2)] {
        let top = dir.path().join(name);
        create(&top, Some(("mid.qcow2", "qcow2")), 64 * KIB);
        write_top(&top, byte);
        let raw = dir.path().join(format!("{name}.raw"));
        to_raw(&top, &raw);
        branches.push((top.clone(), contents(&top), raw));
    }
    for (top, want, _) in &branches {
        pull_backing_layer(top).unwrap();
        assert_same(&contents(top), want, s(top));
        assert!(info(top).contains("\"backing-filename\": \"base.qcow2\""));
    }
    std::fs::remove_file(&mid).unwrap();
    for (top, want, raw) in &branches {
        assert_same(&contents(top), want, s(top));
        qemu_agrees(top, raw);
    }
}

#[test]
fn a_child_in_another_directory_gets_an_absolute_backing_name() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = sub.join("top.qcow2");
    base_raw(&base);
    create(&mid, Some(("base.raw", "raw")), 64 * KIB);
    write_mid(&mid);
    create(&top, Some(("../mid.qcow2", "qcow2")), 64 * KIB);
    write_top(&top, 0xc3);
    let want = contents(&top);
    let before = dir.path().join("before.raw");
    to_raw(&top, &before);

    let report = pull_backing_layer(&top).unwrap();
    let abs = base.canonicalize().unwrap();
    assert_eq!(report.new_backing.as_deref(), Some(abs.as_path()));
    let i = info(&top);
    assert!(i.contains(&format!("\"backing-filename\": \"{}\"", s(&abs))), "{i}");
    std::fs::remove_file(&mid).unwrap();
    assert_same(&contents(&top), &want, "other directory");
    qemu_agrees(&top, &before);
}

#[test]
fn a_backing_name_too_long_for_the_header_cluster_is_refused_untouched() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters leave under 400 bytes for the name; the pulled name is ~420.
    let deep: PathBuf = ["a".repeat(200), "b".repeat(200)].iter().collect();
    let sub = dir.path().join("sub");
    std::fs::create_dir_all(sub.join(&deep)).unwrap();
    let base = sub.join(&deep).join("base.raw");
    let mid = sub.join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    base_raw(&base);
    create(&mid, Some((s(&deep.join("base.raw")), "raw")), 64 * KIB);
    write_mid(&mid);
    create(&top, Some(("sub/mid.qcow2", "qcow2")), 512);
    write_top(&top, 0xc4);
    let bytes = std::fs::read(&top).unwrap();

    let e = pull_backing_layer(&top).unwrap_err();
    assert_eq!(e.kind(), DiskErrorKind::InvalidFormat, "{e}");
    assert_eq!(e.path(), Some(top.as_path()));
    assert!(std::fs::read(&top).unwrap() == bytes, "top changed");
}

#[test]
fn a_longer_backing_name_replaces_a_short_one() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let long = "layer-with-a-much-longer-name-than-mid-had.raw";
    let base = dir.path().join(long);
    let mid = dir.path().join("m.qcow2");
    let top = dir.path().join("top.qcow2");
    base_raw(&base);
    create(&mid, Some((long, "raw")), 64 * KIB);
    write_mid(&mid);
    create(&top, Some(("m.qcow2", "qcow2")), 512);
    write_top(&top, 0xc5);
    let want = contents(&top);
    let before = dir.path().join("before.raw");
    to_raw(&top, &before);
    pull_backing_layer(&top).unwrap();
    assert!(info(&top).contains(&format!("\"backing-filename\": \"{long}\"")));
    std::fs::remove_file(&mid).unwrap();
    assert_same(&contents(&top), &want, "longer name");
    qemu_agrees(&top, &before);
}

#[test]
fn non_qcow2_children_and_backings_are_refused_untouched() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    base_raw(&raw);
    let vhdx = dir.path().join("parent.vhdx");
    run("qemu-img", &["create", "-q", "-f", "vhdx", s(&vhdx), "8M"]);
    let over_vhdx = dir.path().join("over-vhdx.qcow2");
    create(&over_vhdx, Some(("parent.vhdx", "vhdx")), 64 * KIB);
    qemu_io(&over_vhdx, &["write -P 0x11 0 64k"]);
    let over_raw = dir.path().join("over-raw.qcow2");
    create(&over_raw, Some(("disk.raw", "raw")), 64 * KIB);
    let alone = dir.path().join("alone.qcow2");
    create(&alone, None, 64 * KIB);
    for (child, kind) in [
        (&raw, DiskErrorKind::InvalidFormat),
        (&over_vhdx, DiskErrorKind::UnsupportedFeature),
        (&over_raw, DiskErrorKind::UnsupportedFeature),
        (&alone, DiskErrorKind::UnsupportedFeature),
    ] {
        let bytes = std::fs::read(child).unwrap();
        let e = pull_backing_layer(child).unwrap_err();
        assert_eq!(e.kind(), kind, "{}: {e}", child.display());
        assert_eq!(e.path(), Some(child.as_path()), "{e}");
        assert!(std::fs::read(child).unwrap() == bytes, "{} changed", child.display());
    }
    let e = pull_backing_layer(&over_vhdx).unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(chain.contains("parent.vhdx"), "{chain}");
    // The backing lookup refuses non-qcow2 files too.
    assert_eq!(qcow2_backing(&raw).unwrap_err().kind(), DiskErrorKind::InvalidFormat);
    assert_eq!(qcow2_backing(&over_vhdx).unwrap(), Some(vhdx));
}

#[test]
fn a_layer_shorter_than_its_child_keeps_reading_zeroes_past_its_end() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    base_raw(&base);
    // Mid ends 1.5 KiB into a cluster; past it top read zeroes, base would show data.
    let mid_size = (4 * MIB + 1536).to_string();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"]
            .iter()
            .copied()
            .chain([s(&mid), &mid_size])
            .collect::<Vec<_>>(),
    );
    qemu_io(&mid, &["write -P 0xb5 64k 64k", "write -P 0xb6 4M 1536"]);
    create(&top, Some(("mid.qcow2", "qcow2")), 64 * KIB);
    qemu_io(&top, &["write -P 0xc6 6M 64k"]);
    let want = contents(&top);
    assert!(want[5 * MIB as usize..6 * MIB as usize].iter().all(|&b| b == 0));
    let before = dir.path().join("before.raw");
    to_raw(&top, &before);
    pull_backing_layer(&top).unwrap();
    std::fs::remove_file(&mid).unwrap();
    assert_same(&contents(&top), &want, "short layer");
    qemu_agrees(&top, &before);
}

const CHILD_ENV: &str = "HUTCH_PULL_CRASH_CHILD";

/// The crash test's child: pulls the layer under the image named by the environment, then
/// reports it. Does nothing as a normal test.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    pull_backing_layer(Path::new(&path)).unwrap();
    println!("pulled");
}

#[test]
fn a_pull_killed_at_any_moment_leaves_the_child_reading_the_same() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    base_raw(&base);
    create(&mid, Some(("base.raw", "raw")), 64 * KIB);
    write_mid(&mid);
    // Enough data in mid that the copy takes a while.
    qemu_io(&mid, &["write -P 0xb7 3200k 1600k", "write -z 6400k 256k"]);
    create(&top, Some(("mid.qcow2", "qcow2")), 4 * KIB);
    write_top(&top, 0xc7);
    let want = contents(&top);
    let work = dir.path().join("work.qcow2");
    let spawn = || {
        std::fs::copy(&top, &work).unwrap();
        Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &work)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // How long a whole run takes (start-up included), to spread the kills over it.
    let start = Instant::now();
    assert!(spawn().wait().unwrap().success());
    let whole = start.elapsed().as_micros() as u64;
    let mut finished = 0;
    for delay_us in (1..=12).map(|i| whole * i / 13) {
        let mut child = spawn();
        std::thread::sleep(Duration::from_micros(delay_us));
        child.kill().unwrap(); // SIGKILL, or nothing if it already finished
        let stdout = child.stdout.take().unwrap();
        if BufReader::new(stdout).lines().any(|l| l.unwrap().contains("pulled")) {
            finished += 1;
        }
        child.wait().unwrap();
        let what = format!("killed after {delay_us} us");
        let grown =
            std::fs::metadata(&work).unwrap().len() > std::fs::metadata(&top).unwrap().len();
        let switched = qcow2_backing(&work).unwrap() == Some(base.clone());
        println!("{what}: copy started {grown}, header switched {switched}");
        assert_same(&contents(&work), &want, &what);
        let out = Command::new("qemu-img").args(["check", s(&work)]).output().unwrap();
        // 0: clean; 3: leaked clusters only.
        assert!(matches!(out.status.code(), Some(0 | 3)), "{what}: {out:?}");
        // Pulling again finishes the job (or finds the backing no longer qcow2).
        match pull_backing_layer(&work) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), DiskErrorKind::UnsupportedFeature, "{what}: {e}"),
        }
        assert!(info(&work).contains("\"backing-filename\": \"base.raw\""), "{what}");
        assert_same(&contents(&work), &want, &what);
    }
    println!("whole run {whole} us; {finished} of 12 pulls finished before the kill");
}

/// Pulls a 1 GiB layer holding 256 MiB of data in 1 MiB pieces; prints the time.
#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn pull_speed_for_a_gib_layer() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&mid), "1G"]);
    let cmds: Vec<String> =
        (0..256u64).map(|i| format!("write -P {} {}M 1M", i % 250 + 1, i * 4)).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&mid, &refs);
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", s(&top)]);
    let start = Instant::now();
    let report = pull_backing_layer(&top).unwrap();
    let took = start.elapsed();
    println!("pulled {report:?} in {took:?}");
    assert_eq!(report.bytes_copied, 256 * MIB);
    let status = Command::new("qemu-img").args(["compare", s(&top), s(&mid)]).status().unwrap();
    assert!(status.success());
}
