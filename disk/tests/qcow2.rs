//! qcow2 against the real `qemu-img`/`qemu-io`: Hutch reads images QEMU made, and QEMU finds
//! the images Hutch wrote clean and equal to a raw file that got the same operations.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

mod common;

use common::{have_qemu, run};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use disk::qcow2::Qcow2;
use disk::{open_image, BlockBackend, ExtentKind, ImageFormat, OpenOptions};
use testkit::Rng;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A disk pattern: runs of data (some compressible, some not) and holes, odd sizes.
fn pattern(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut data = vec![0u8; size as usize];
    let mut pos = 0usize;
    while pos < data.len() {
        let len = (1 + rng.below(200_000) as usize).min(data.len() - pos);
        match rng.below(4) {
            0 => {} // hole
            1 => data[pos..pos + len].fill((rng.next() as u8) | 1),
            _ => rng.fill(&mut data[pos..pos + len]),
        }
        pos += len;
    }
    data
}

fn write_raw(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Reads the whole disk in chunks of `chunk` bytes.
fn read_all(disk: &dyn BlockBackend, chunk: u64) -> Vec<u8> {
    let mut out = vec![0u8; disk.size() as usize];
    let mut pos = 0u64;
    while pos < disk.size() {
        let n = chunk.min(disk.size() - pos);
        disk.read_at(&mut out[pos as usize..(pos + n) as usize], pos).unwrap();
        pos += n;
    }
    out
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i:#x}");
    }
}

fn check_reads(path: &Path, want: &[u8], what: &str) {
    let img = Qcow2::open(path, OpenOptions::default()).unwrap();
    assert_eq!(img.size(), want.len() as u64, "{what}");
    assert_same(&read_all(&img, MIB), want, what);
    assert_same(&read_all(&img, 12_345), want, what);
    // Unaligned random reads.
    let mut rng = Rng(7);
    for _ in 0..200 {
        let off = rng.below(want.len() as u64 - 1);
        let len = 1 + rng.below((want.len() as u64 - off).min(300_000));
        let mut buf = vec![0u8; len as usize];
        img.read_at(&mut buf, off).unwrap();
        assert_same(&buf, &want[off as usize..(off + len) as usize], what);
    }
    assert!(img.check().unwrap().is_clean(), "{what}: {:?}", img.check().unwrap());
}

#[test]
fn reads_images_made_by_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 9 * MIB + 4096 + 512;
    let data = pattern(size, 0x1234_5678);
    let raw = write_raw(dir.path(), "src.raw", &data);
    let variants: &[(&str, &[&str])] = &[
        ("v2", &["-o", "compat=0.10"]),
        ("v3-512", &["-o", "cluster_size=512"]),
        ("v3-64k", &[]),
        ("v3-2m", &["-o", "cluster_size=2M"]),
        ("deflate", &["-c"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        ("deflate-4k", &["-c", "-o", "cluster_size=4096"]),
    ];
    for (name, opts) in variants {
        let out = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&raw), s(&out)]);
        run("qemu-img", &args);
        check_reads(&out, &data, name);
        let img = open_image(&out, OpenOptions::default()).unwrap();
        assert_eq!(img.size(), size, "{name} through open_image");
    }
}

#[test]
fn reads_zero_clusters_and_backing_chains() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 6 * MIB;
    let data = pattern(size, 99);
    let raw = write_raw(dir.path(), "base.raw", &data);
    let base = dir.path().join("base.qcow2");
    run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    // Overlay with a relative backing name, some data, and zero clusters over backing data.
    let top = dir.path().join("top.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&top)]);
    run("qemu-io", &["-c", "write -P 0x5a 1000000 300000", "-c", "write -z 2M 512k", s(&top)]);
    run("qemu-io", &["-c", "write -z 4000000 70000", s(&top)]);
    let mut want = data.clone();
    want[1_000_000..1_300_000].fill(0x5a);
    want[2 * MIB as usize..(2 * MIB + 512 * 1024) as usize].fill(0);
    want[4_000_000..4_070_000].fill(0);
    check_reads(&top, &want, "overlay");
    // Zero flags on allocated clusters of a standalone image.
    let z = dir.path().join("z.qcow2");
    std::fs::copy(&base, &z).unwrap();
    run("qemu-io", &["-c", "write -z 1M 1M", "-c", "write -z -u 3M 128k", s(&z)]);
    let mut want = data.clone();
    want[MIB as usize..2 * MIB as usize].fill(0);
    want[3 * MIB as usize..(3 * MIB + 128 * 1024) as usize].fill(0);
    check_reads(&z, &want, "zero clusters");
    let img = Qcow2::open(&z, OpenOptions::default()).unwrap();
    let ext = img.extents(MIB, MIB).unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].kind, ExtentKind::Zero);
    // A raw backing file, also through a chain of two overlays.
    let mid = dir.path().join("mid.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&mid)]);
    run("qemu-io", &["-c", "write -P 0x11 0 65536", s(&mid)]);
    let top2 = dir.path().join("top2.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-b", s(&mid), "-F", "qcow2", s(&top2)]);
    run("qemu-io", &["-c", "write -P 0x22 32768 65536", s(&top2)]);
    let mut want = data.clone();
    want[..65536].fill(0x11);
    want[32768..98304].fill(0x22);
    check_reads(&top2, &want, "chain");
    let img = Qcow2::open(&top2, OpenOptions::default()).unwrap();
    assert_eq!(img.info().backing.as_deref(), Some(mid.as_path()));
}

#[test]
fn parallel_reads_see_the_same_data() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(pattern(8 * MIB, 5));
    let raw = write_raw(dir.path(), "p.raw", &data);
    let img_path = dir.path().join("p.qcow2");
    run("qemu-img", &["convert", "-c", "-f", "raw", "-O", "qcow2", s(&raw), s(&img_path)]);
    let img = Arc::new(Qcow2::open(&img_path, OpenOptions::default()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(t + 1);
                for _ in 0..300 {
                    let off = rng.below(8 * MIB - 70_000);
                    let mut buf = vec![0u8; 1 + rng.below(70_000) as usize];
                    img.read_at(&mut buf, off).unwrap();
                    assert_same(&buf, &data[off as usize..off as usize + buf.len()], "thread");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Bytes thread `t` writes, in pass `pass`, into guest cluster `gc`.
fn thread_cluster(t: u64, pass: u64, gc: u64, cs: u64) -> Vec<u8> {
    let mut buf = vec![0u8; cs as usize];
    Rng((t + 1) * 1_000_003 + pass * 7919 + gc).fill(&mut buf);
    buf
}

/// Writers running at once, as the converter's workers do: whole clusters (written without
/// the metadata lock), 4 KiB pieces of the same new clusters from every thread (merged under
/// it), and whole-cluster rewrites of one region racing each other. Nothing written is lost,
/// each raced cluster holds one writer's cluster entire, and what the losers replaced is
/// freed: `qemu-img check` exits 0, which it does not for leaked clusters.
#[test]
fn concurrent_writers_lose_nothing_and_leak_nothing() {
    if !have_qemu() {
        return;
    }
    const THREADS: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2");
    let img = Arc::new(Qcow2::create(&path, 24 * MIB, None, 65536).unwrap());
    let cs = img.cluster_size();
    // [0, 8 MiB): each thread its own 1 MiB-aligned chunks; [8, 12 MiB): 4 KiB pieces
    // interleaved between threads; [12, 24 MiB): every thread rewrites every cluster pair.
    let (own, pieces, raced) = (0..8 * MIB, 8 * MIB..12 * MIB, 12 * MIB..24 * MIB);
    // Lines the threads up before each raced pair, so that their writes really overlap.
    let barrier = Arc::new(std::sync::Barrier::new(THREADS as usize));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            let barrier = barrier.clone();
            let (own, pieces, raced) = (own.clone(), pieces.clone(), raced.clone());
            std::thread::spawn(move || {
                for chunk in own.step_by(MIB as usize).filter(|c| (c / MIB) % THREADS == t) {
                    let buf: Vec<u8> = (chunk / cs..(chunk + MIB) / cs)
                        .flat_map(|gc| thread_cluster(t, 0, gc, cs))
                        .collect();
                    img.write_at(&buf, chunk).unwrap();
                }
                for piece in pieces.step_by(4096).filter(|p| (p / 4096) % THREADS == t) {
                    img.write_at(&[(piece / 4096) as u8 | 1; 4096], piece).unwrap();
                }
                for pass in 0..3 {
                    for pair in raced.clone().step_by(2 * cs as usize) {
                        let gc = pair / cs;
                        let mut buf = thread_cluster(t, pass, gc, cs);
                        buf.extend(thread_cluster(t, pass, gc + 1, cs));
                        barrier.wait();
                        img.write_at(&buf, pair).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    img.flush().unwrap();
    let got = read_all(img.as_ref(), MIB);
    let mut want = vec![0u8; got.len()];
    for chunk in own.step_by(MIB as usize) {
        for gc in chunk / cs..(chunk + MIB) / cs {
            let at = (gc * cs) as usize;
            want[at..at + cs as usize].copy_from_slice(&thread_cluster(
                (chunk / MIB) % THREADS,
                0,
                gc,
                cs,
            ));
        }
    }
    for piece in pieces.step_by(4096) {
        want[piece as usize..piece as usize + 4096].fill((piece / 4096) as u8 | 1);
    }
    for gc in raced.start / cs..raced.end / cs {
        let at = (gc * cs) as usize;
        let cluster = &got[at..at + cs as usize];
        let writer = (0..THREADS)
            .flat_map(|t| (0..3).map(move |pass| (t, pass)))
            .find(|&(t, pass)| thread_cluster(t, pass, gc, cs) == cluster);
        assert!(writer.is_some(), "raced cluster {gc} is not any one writer's cluster");
        want[at..at + cs as usize].copy_from_slice(cluster);
    }
    assert_same(&got, &want, "concurrent writers");
    drop(img);
    qemu_agrees(dir.path(), &path, &want, "concurrent writers");
}

/// Applies the same random writes, zeroes and (whole-cluster) discards to `img` and `want`.
fn random_ops(img: &Qcow2, want: &mut [u8], seed: u64, ops: usize, discard: bool) {
    let mut rng = Rng(seed);
    let size = want.len() as u64;
    let cs = img.cluster_size();
    for i in 0..ops {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(if i % 7 == 0 { 3 * MIB } else { 200_000 }));
        let range = off as usize..(off + len) as usize;
        match rng.below(10) {
            0 | 1 => {
                img.write_zeroes(off, len).unwrap();
                want[range].fill(0);
            }
            2 if discard => {
                let first = off.div_ceil(cs) * cs;
                let last = ((off + len) / cs * cs).max(first);
                img.discard(first, last - first).unwrap();
                want[first as usize..last as usize].fill(0);
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                img.write_at(&buf, off).unwrap();
                want[range].copy_from_slice(&buf);
            }
        }
        if i % 50 == 0 {
            img.flush().unwrap();
        }
    }
    img.flush().unwrap();
}

/// `qemu-img check` exits 0 and `qemu-img compare` finds `img` equal to `want`.
fn qemu_agrees(dir: &Path, img: &Path, want: &[u8], what: &str) {
    let out = Command::new("qemu-img").args(["check", s(img)]).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = write_raw(dir, "want.raw", want);
    run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(img)]);
}

#[test]
fn random_writes_pass_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, cs, size) in
        [("64k", 65536u32, 24 * MIB), ("512", 512, 6 * MIB + 1000), ("2m", 2 << 20, 20 * MIB)]
    {
        let path = dir.path().join(format!("w-{name}.qcow2"));
        let mut want = vec![0u8; size as usize];
        {
            let img = Qcow2::create(&path, size, None, cs).unwrap();
            random_ops(&img, &mut want, 42 + u64::from(cs), 300, true);
            assert_same(&read_all(&img, MIB), &want, name);
            let report = img.check().unwrap();
            assert!(report.is_clean(), "{name}: {report:?}");
        }
        qemu_agrees(dir.path(), &path, &want, name);
        let info = Qcow2::open(&path, OpenOptions::default()).unwrap().info();
        assert_eq!(info.subformat.as_deref(), Some("v3"));
    }
}

#[test]
fn small_clusters_grow_the_refcount_table() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    let size = 12 * MIB;
    let mut want = vec![0u8; size as usize];
    {
        // 512-byte clusters: one refcount block covers 128 KiB, the first table 64 blocks.
        let img = Qcow2::create(&path, size, None, 512).unwrap();
        let mut rng = Rng(3);
        rng.fill(&mut want);
        for chunk in (0..size).step_by(MIB as usize) {
            img.write_at(&want[chunk as usize..(chunk + MIB) as usize], chunk).unwrap();
        }
        img.flush().unwrap();
        assert!(img.check().unwrap().is_clean());
    }
    qemu_agrees(dir.path(), &path, &want, "grow");
}

#[test]
fn writes_over_backing_files_copy_the_rest_of_the_cluster() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * MIB;
    let data = pattern(size, 77);
    let raw = write_raw(dir.path(), "base.raw", &data);
    let base = dir.path().join("base.qcow2");
    run("qemu-img", &["convert", "-c", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    let top = dir.path().join("top.qcow2");
    let mut want = data.clone();
    {
        let img =
            Qcow2::create(&top, size, Some((Path::new("base.qcow2"), ImageFormat::Qcow2)), 65536)
                .unwrap();
        random_ops(&img, &mut want, 11, 300, false);
        assert_same(&read_all(&img, MIB), &want, "overlay");
    }
    qemu_agrees(dir.path(), &top, &want, "overlay");
    let out = run("qemu-img", &["info", s(&top)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("backing file format: qcow2"));

    // Writing into a compressed image rewrites clusters uncompressed; a v2 image too.
    for (name, opts) in [("c", vec!["-c"]), ("v2", vec!["-o", "compat=0.10"])] {
        let path = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend(opts);
        args.extend([s(&raw), s(&path)]);
        run("qemu-img", &args);
        let mut want = data.clone();
        {
            let img = Qcow2::open(&path, OpenOptions { writable: true }).unwrap();
            random_ops(&img, &mut want, 5, 200, true);
        }
        qemu_agrees(dir.path(), &path, &want, name);
    }
}

#[test]
fn resize_grows_and_moves_the_l1_table() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    let img = Qcow2::create(&path, MIB, None, 4096).unwrap();
    img.write_at(&[7u8; 5000], 100).unwrap();
    // 4 KiB clusters: one L1 entry maps 2 MiB, one L1 cluster 1 GiB.
    img.resize(3 * MIB).unwrap();
    img.write_at(&[8u8; 3000], 3 * MIB - 3000).unwrap();
    img.resize(5 << 30).unwrap();
    img.write_at(&[9u8; 4096], (5 << 30) - 4096).unwrap();
    assert!(img.resize(MIB).is_err(), "shrinking over data must be refused");
    img.flush().unwrap();
    let mut buf = vec![0u8; 3000];
    img.read_at(&mut buf, 3 * MIB - 3000).unwrap();
    assert!(buf.iter().all(|&b| b == 8));
    assert!(img.check().unwrap().is_clean());
    drop(img);
    run("qemu-img", &["check", s(&path)]);
    let out = run("qemu-img", &["info", "--output=json", s(&path)]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("\"virtual-size\": {}", 5u64 << 30))
    );
}

#[test]
fn extents_merge_neighbours_and_ask_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.qcow2");
    let top = dir.path().join("t.qcow2");
    {
        let b = Qcow2::create(&base, 4 * MIB, None, 65536).unwrap();
        b.write_at(&vec![1u8; 2 * 65536], 0).unwrap();
    }
    let t = Qcow2::create(&top, 8 * MIB, Some((&base, ImageFormat::Qcow2)), 65536).unwrap();
    t.write_at(&[2u8; 65536], MIB).unwrap();
    t.write_zeroes(2 * MIB, 2 * 65536).unwrap();
    let ext = t.extents(0, 8 * MIB).unwrap();
    let kinds: Vec<_> = ext.iter().map(|e| (e.offset, e.len, e.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, 2 * 65536, ExtentKind::Data),
            (2 * 65536, MIB - 2 * 65536, ExtentKind::Unallocated),
            (MIB, 65536, ExtentKind::Data),
            (MIB + 65536, MIB - 65536, ExtentKind::Unallocated),
            (2 * MIB, 2 * 65536, ExtentKind::Zero),
            (2 * MIB + 2 * 65536, 6 * MIB - 2 * 65536, ExtentKind::Unallocated),
        ]
    );
}

const CHILD_ENV: &str = "HUTCH_QCOW2_CRASH_CHILD";
const GEN_SIZE: u64 = 2 * MIB;

fn generation_data(g: u64) -> Vec<u8> {
    let mut buf = vec![0u8; GEN_SIZE as usize];
    Rng(g * 7919 + 1).fill(&mut buf);
    buf
}

/// The crash test's child: writes generation after generation, each into its own region,
/// in odd-sized pieces, flushing after each and reporting it. Does nothing as a normal test.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let img = Qcow2::open(Path::new(&path), OpenOptions { writable: true }).unwrap();
    let mut g = 0u64;
    loop {
        let data = generation_data(g);
        let base = g * GEN_SIZE;
        let mut pos = 0usize;
        let mut rng = Rng(g + 3);
        while pos < data.len() {
            let n = (1 + rng.below(150_000) as usize).min(data.len() - pos);
            img.write_at(&data[pos..pos + n], base + pos as u64).unwrap();
            pos += n;
        }
        // Churn on a scratch area: zeroes and discards free and allocate metadata.
        let scratch = 200 * MIB;
        img.write_at(&data[..300_000], scratch + rng.below(MIB)).unwrap();
        img.write_zeroes(scratch + rng.below(MIB), 200_000).unwrap();
        img.discard(scratch, MIB).unwrap();
        img.flush().unwrap();
        println!("gen {g}");
        g += 1;
        if base + 2 * GEN_SIZE >= scratch {
            g = 0; // Keep going over old regions; the parent kills us long before.
        }
    }
}

#[test]
fn killed_writer_leaves_a_consistent_image_with_flushed_data() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.qcow2");
    drop(Qcow2::create(&path, 256 * MIB, None, 65536).unwrap());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut last = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(g) = line.strip_prefix("gen ") {
            last = Some(g.trim().parse::<u64>().unwrap());
            if last == Some(40) {
                // Let it get into the next generation's writes, then kill it.
                std::thread::sleep(std::time::Duration::from_millis(3));
                child.kill().unwrap(); // SIGKILL
                break;
            }
        }
    }
    child.wait().unwrap();
    let last = last.expect("the child flushed nothing");
    let out = Command::new("qemu-img").args(["check", s(&path)]).output().unwrap();
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check found corruption: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let img = Qcow2::open(&path, OpenOptions::default()).unwrap();
    for g in 0..=last {
        let mut buf = vec![0u8; GEN_SIZE as usize];
        img.read_at(&mut buf, g * GEN_SIZE).unwrap();
        assert_same(&buf, &generation_data(g), &format!("generation {g}"));
    }
    assert_eq!(img.check().unwrap().corruptions, 0);
}

#[test]
#[ignore = "throughput measurement; run with --ignored --nocapture in release"]
fn sequential_write_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seq.qcow2");
    let img = Qcow2::create(&path, 1 << 30, None, 65536).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    Rng(1).fill(&mut buf);
    let start = std::time::Instant::now();
    for i in 0..1024u64 {
        img.write_at(&buf, i * MIB).unwrap();
    }
    let written = start.elapsed().as_secs_f64();
    img.flush().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "sequential 1 GiB write: {:.0} MiB/s to the page cache, {:.0} MiB/s with the final fsync",
        1024.0 / written,
        1024.0 / secs
    );
    let start = std::time::Instant::now();
    for i in 0..1024u64 {
        img.read_at(&mut buf, i * MIB).unwrap();
    }
    println!("sequential 1 GiB read: {:.0} MiB/s", 1024.0 / start.elapsed().as_secs_f64());
}

/// `disk info`'s size on disk is what the file occupies, as `qemu-img info` says: a qcow2
/// with preallocated metadata is 16 GiB long but holds a few MiB.
#[test]
fn preallocated_image_reports_its_blocks_not_its_length() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pre.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", s(&path), "16G"],
    );
    let info = Qcow2::open(&path, OpenOptions::default()).unwrap().info();
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 16 << 30, "qemu-img made a {len}-byte file");
    assert!(info.allocated_bytes < 64 * MIB, "{} bytes on disk", info.allocated_bytes);
}
