//! The VM → GUI frame path end to end: a producer drawing into a 1920x1080 B8G8R8X8 image
//! through `Screen::update` (4 small 64x64 rects per frame, as fast as it can), a consumer
//! polling a `FrameReader` and copying each rect into a local RGBA "texture" staging buffer.
//! Then an idle phase: no updates, the consumer polls every 4 ms; it must upload nothing.
//! Prints figures only (no timed assertions): `cargo bench -p display --bench frame_path`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use display::frame::{FrameReader, FrameWriter};
use display::{Image, PixelFormat, Rect, ScanoutSink, SourceId};

const W: u32 = 1920;
const H: u32 = 1080;
const RECT: u32 = 64;
const RECTS_PER_FRAME: u32 = 4;
const PRODUCE: Duration = Duration::from_secs(3);
const IDLE: Duration = Duration::from_secs(2);
/// Send times by frame number (mod this), for latency.
const SLOTS: usize = 1 << 20;

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the one we own. The thread CPU clock is
    // on Linux and macOS alike (RUSAGE_THREAD is Linux-only).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Where rect `k` of frame `n` goes: spread over the screen, never overlapping within a frame.
fn rect_for(n: u64, k: u32) -> Rect {
    let across = W / RECT;
    let down = H / RECT;
    let i = (n as u32).wrapping_mul(7).wrapping_add(k * 131) % (across * down);
    Rect::new((i % across) * RECT, (i / across) * RECT, RECT, RECT)
}

struct ConsumerStats {
    updates: u64,
    rects: u64,
    bytes: u64,
    frames_seen: u64,
    latency_sum: Duration,
    latency_max: Duration,
    latency_n: u64,
}

fn main() {
    // Where the app should put it too: on tmpfs, so page writeback never touches the frame.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }
        .expect("tempdir");
    let writer = FrameWriter::create(&dir.path().join("frame"), W, H).expect("frame");
    let screen = Arc::new(display::scanout::Screen::new(writer));
    screen.set_mode(SourceId::Gpu(0), Some((W, H)));
    let mut reader = FrameReader::open(&screen.frame_path()).expect("reader");

    let start = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..SLOTS).map(|_| AtomicU64::new(0)).collect());
    let producing = Arc::new(AtomicBool::new(true));

    let producer = {
        let (screen, sent, producing) = (screen.clone(), sent.clone(), producing.clone());
        std::thread::spawn(move || {
            let stride = W * 4;
            let mut image = vec![0u8; (stride * H) as usize];
            let mut n: u64 = 1;
            while start.elapsed() < PRODUCE {
                sent[n as usize % SLOTS]
                    .store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                for k in 0..RECTS_PER_FRAME {
                    let r = rect_for(n, k);
                    // The frame number in B, G, R of every pixel: the consumer reads it back.
                    let px = [n as u8, (n >> 8) as u8, (n >> 16) as u8, 0];
                    for y in r.y..r.y + r.height {
                        let o = (y * stride + r.x * 4) as usize;
                        for p in image[o..o + (r.width * 4) as usize].chunks_exact_mut(4) {
                            p.copy_from_slice(&px);
                        }
                    }
                    let img = Image {
                        data: &image,
                        width: W,
                        height: H,
                        stride,
                        format: PixelFormat::B8G8R8X8,
                    };
                    screen.update(SourceId::Gpu(0), &img, r);
                }
                n += 1;
            }
            producing.store(false, Ordering::Release);
            n - 1
        })
    };

    let consumer = std::thread::spawn(move || {
        let mut texture = vec![0u8; (W * H * 4) as usize];
        let mut stats = ConsumerStats {
            updates: 0,
            rects: 0,
            bytes: 0,
            frames_seen: 0,
            latency_sum: Duration::ZERO,
            latency_max: Duration::ZERO,
            latency_n: 0,
        };
        let mut last_frame = 0u64;
        let mut upload = |reader: &mut FrameReader, stats: &mut ConsumerStats| -> bool {
            let Ok(Some(update)) = reader.poll() else {
                return false;
            };
            stats.updates += 1;
            for rp in &update.rects {
                let row = rp.rect.width as usize * 4;
                for (i, src) in rp.rgba.chunks_exact(row).enumerate() {
                    let o = (rp.rect.y as usize + i) * W as usize * 4 + rp.rect.x as usize * 4;
                    texture[o..o + row].copy_from_slice(src);
                }
                stats.rects += 1;
                stats.bytes += rp.rgba.len() as u64;
                // RGBA of the producer's BGRX: R, G, B = frame bits 16.., 8.., 0...
                let p = &rp.rgba[..4];
                let frame = p[2] as u64 | (p[1] as u64) << 8 | (p[0] as u64) << 16;
                if frame > last_frame && !update.full {
                    last_frame = frame;
                    stats.frames_seen += 1;
                    let sent_at = sent[frame as usize % SLOTS].load(Ordering::Relaxed);
                    let lat = start.elapsed().saturating_sub(Duration::from_nanos(sent_at));
                    stats.latency_sum += lat;
                    stats.latency_max = stats.latency_max.max(lat);
                    stats.latency_n += 1;
                }
            }
            true
        };
        // Producing phase: poll as fast as possible.
        let cpu0 = thread_cpu_time();
        let t0 = Instant::now();
        while producing.load(Ordering::Acquire) {
            if !upload(&mut reader, &mut stats) {
                // Two shared cores: spinning would steal the producer's.
                std::thread::yield_now();
            }
        }
        let busy_elapsed = t0.elapsed();
        let busy_cpu = thread_cpu_time() - cpu0;
        // Drain what the last frames left (pending torn rects).
        while upload(&mut reader, &mut stats) {}
        let busy = std::mem::replace(
            &mut stats,
            ConsumerStats {
                updates: 0,
                rects: 0,
                bytes: 0,
                frames_seen: 0,
                latency_sum: Duration::ZERO,
                latency_max: Duration::ZERO,
                latency_n: 0,
            },
        );
        // Idle phase: poll every 4 ms.
        let cpu0 = thread_cpu_time();
        let t0 = Instant::now();
        while t0.elapsed() < IDLE {
            upload(&mut reader, &mut stats);
            std::thread::sleep(Duration::from_millis(4));
        }
        let idle_cpu = thread_cpu_time() - cpu0;
        let idle_elapsed = t0.elapsed();
        (busy, busy_elapsed, busy_cpu, stats.updates, idle_cpu, idle_elapsed)
    });

    let produced = producer.join().expect("producer");
    let (busy, busy_elapsed, busy_cpu, idle_uploads, idle_cpu, idle_elapsed) =
        consumer.join().expect("consumer");
    let secs = busy_elapsed.as_secs_f64();
    let per_frame = |v: u64| v as f64 / busy.updates.max(1) as f64;
    println!(
        "frame path, {W}x{H} B8G8R8X8, {RECTS_PER_FRAME} rects of {RECT}x{RECT} per frame, {:.1} s",
        secs
    );
    println!(
        "  producer frames        {:>10}  ({:.0}/s, {} Screen::update calls)",
        produced,
        produced as f64 / secs,
        produced * RECTS_PER_FRAME as u64
    );
    println!("  consumer updates       {:>10}  ({:.0}/s: distinct seqs delivered, {:.1}x the 60 fps target)", busy.updates, busy.updates as f64 / secs, busy.updates as f64 / secs / 60.0);
    println!(
        "  producer frames seen   {:>10}  ({:.0}/s, {:.1}x the 60 fps target)",
        busy.frames_seen,
        busy.frames_seen as f64 / secs,
        busy.frames_seen as f64 / secs / 60.0
    );
    println!("  rects per update       {:>10.2}", per_frame(busy.rects));
    println!(
        "  bytes copied per update{:>10.0}  (a full frame is {})",
        per_frame(busy.bytes),
        W * H * 4
    );
    if busy.latency_n > 0 {
        println!(
            "  latency (frame start → consumer has it): avg {:.1} µs, max {:.1} µs",
            busy.latency_sum.as_secs_f64() * 1e6 / busy.latency_n as f64,
            busy.latency_max.as_secs_f64() * 1e6
        );
    }
    println!(
        "  consumer CPU while producing: {:.0} ms/s (it yields when idle)",
        busy_cpu.as_secs_f64() * 1e3 / secs
    );
    println!("idle, polling every 4 ms for {:.1} s", idle_elapsed.as_secs_f64());
    println!("  uploads                {:>10}  (must be 0)", idle_uploads);
    println!(
        "  consumer CPU           {:>10.2} ms/s",
        idle_cpu.as_secs_f64() * 1e3 / idle_elapsed.as_secs_f64()
    );
}
