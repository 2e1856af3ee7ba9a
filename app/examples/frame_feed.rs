//! Test tool for the GUI's VM view on hosts that cannot boot a guest: plays the VM side of
//! the shared-memory frame for library VM NAME (at the path the GUI reads), drawing colour
//! bars and a moving square with dirty-rect updates, and a cursor (a pink arrow, as a guest's
//! virtio-gpu cursor) that follows the pointer input it gets.
//!
//! With `--fake-vm` it also plays a running VM process: holds the VM lock, writes `pid.json`
//! and answers the control socket (`status` says running; `input` and `display_size` are
//! accepted and printed on stdout, one JSON line each), so capture and input can be tested.
//!
//! `HUTCH_HOME=... cargo run --example frame_feed -- [--fake-vm] NAME [SECONDS] [WIDTH HEIGHT]`

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use display::frame::{FrameMut, FrameWriter};
use display::{CursorImage, InputEvent, PixelFormat, Rect};
use hutch::control::protocol::{ControlTarget, Request, StatusReply};
use hutch::control::server::{ConsoleTarget, ControlServer};
use hutch::library::{Library, PidFile};
use hutch::runtime;
use hutch::serial_hub::{SerialHub, SerialSubscription};

const SQUARE: u32 = 64;
/// The cursor's colour: in no bar, so a screenshot can find it.
const CURSOR_RGB: [u8; 3] = [255, 20, 147];
const CURSOR_SIZE: u32 = 24;

/// An arrow: the lower-left triangle of a square, transparent elsewhere, hot spot top-left.
fn arrow() -> CursorImage {
    let mut data = Vec::with_capacity((CURSOR_SIZE * CURSOR_SIZE * 4) as usize);
    for y in 0..CURSOR_SIZE {
        for x in 0..CURSOR_SIZE {
            let [r, g, b] = CURSOR_RGB;
            data.extend_from_slice(&if x <= y { [b, g, r, 0xff] } else { [0; 4] });
        }
    }
    CursorImage {
        width: CURSOR_SIZE,
        height: CURSOR_SIZE,
        hot_x: 0,
        hot_y: 0,
        format: PixelFormat::B8G8R8A8,
        data,
    }
}

/// Where the guest pointer is, moved by the input the fake VM gets (a tablet position or
/// relative motion), in guest pixels.
#[derive(Debug, Clone, Copy)]
struct Pointer {
    x: i64,
    y: i64,
    width: i64,
    height: i64,
}

impl Pointer {
    fn apply(&mut self, event: &InputEvent) {
        let (max_x, max_y) = (self.width - 1, self.height - 1);
        match *event {
            InputEvent::PointerAbs { x, y } => {
                self.x = i64::from(x) * max_x / i64::from(display::pointer::ABS_MAX);
                self.y = i64::from(y) * max_y / i64::from(display::pointer::ABS_MAX);
            }
            InputEvent::PointerRel { dx, dy } => {
                self.x = (self.x + i64::from(dx)).clamp(0, max_x);
                self.y = (self.y + i64::from(dy)).clamp(0, max_y);
            }
            _ => {}
        }
    }
}

fn fill(frame: &mut FrameMut<'_>, r: Rect, rgb: [u8; 3]) {
    let stride = frame.stride();
    let px = frame.pixels_mut();
    for y in r.y..r.y + r.height {
        for x in r.x..r.x + r.width {
            let i = y as usize * stride + x as usize * 4;
            px[i..i + 4].copy_from_slice(&[rgb[0], rgb[1], rgb[2], 0xff]);
        }
    }
}

const BARS: [[u8; 3]; 8] = [
    [255, 255, 255],
    [255, 255, 0],
    [0, 255, 255],
    [0, 255, 0],
    [255, 0, 255],
    [255, 0, 0],
    [0, 0, 255],
    [40, 40, 40],
];

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let fake_vm = args.first().is_some_and(|a| a == "--fake-vm");
    if fake_vm {
        args.remove(0);
    }
    let name = args.first().context("usage: frame_feed NAME [SECONDS] [WIDTH HEIGHT]")?;
    let secs: u64 = args.get(1).map_or(Ok(30), |s| s.parse()).context("SECONDS")?;
    let width: u32 = args.get(2).map_or(Ok(800), |s| s.parse()).context("WIDTH")?;
    let height: u32 = args.get(3).map_or(Ok(600), |s| s.parse()).context("HEIGHT")?;
    let library = Library::from_env()?;
    let vm = library.existing(name)?;
    let path = runtime::frame_path(vm.dir(), name)?;
    runtime::prepare_socket_dir(&path)?;
    let mut writer = FrameWriter::create(&path, display::MAX_WIDTH, display::MAX_HEIGHT)?;
    writer.resize(width, height)?;
    let band = width / BARS.len() as u32;
    writer.update(&[Rect::full(width, height)], |f| {
        for (i, rgb) in BARS.iter().enumerate() {
            fill(f, Rect::new(i as u32 * band, 0, band, height * 2 / 3), *rgb);
        }
        fill(f, Rect::new(0, height * 2 / 3, width, height - height * 2 / 3), [20, 30, 60]);
    });
    writer.set_cursor(Some(&arrow()))?;
    let pointer = Arc::new(Mutex::new(Pointer {
        x: i64::from(width / 2),
        y: i64::from(height / 3),
        width: i64::from(width),
        height: i64::from(height),
    }));
    println!("{}", path.display());
    let _lock = if fake_vm {
        let lock = vm.try_lock()?.context("the VM is running")?;
        let socket = runtime::socket_path(vm.dir(), name)?;
        let config = vm.load_config()?;
        let status = StatusReply {
            name: name.clone(),
            state: hutch::control::protocol::RunState::Running,
            pid: std::process::id(),
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            uptime_secs: 0,
            instance: 1,
            display: Some("virtio-gpu 800x600".into()),
            net: None,
            cd: None,
        };
        let target =
            Arc::new(FakeVm { status, pointer: pointer.clone(), hub: SerialHub::new(None) });
        let server = ControlServer::bind(&socket, target)?;
        vm.write_pid_file(&PidFile {
            pid: std::process::id(),
            socket,
            started_at: hutch::library::unix_now(),
        })?;
        Some((lock, server))
    } else {
        None
    };
    let start = Instant::now();
    let (mut x, y) = (0u32, height * 2 / 3 + (height / 3 - SQUARE) / 2);
    let mut shown = None;
    while start.elapsed() < Duration::from_secs(secs) {
        let at = pointer.lock().map(|p| (p.x as u32, p.y as u32)).unwrap_or_default();
        if shown != Some(at) {
            writer.move_cursor(at.0, at.1);
            shown = Some(at);
        }
        let next = (x + 8) % (width - SQUARE);
        let (old, new) = (Rect::new(x, y, SQUARE, SQUARE), Rect::new(next, y, SQUARE, SQUARE));
        writer.update(&[old, new], |f| {
            fill(f, old, [20, 30, 60]);
            fill(f, new, [255, 160, 0]);
        });
        x = next;
        std::thread::sleep(Duration::from_millis(40));
    }
    if fake_vm {
        vm.write_last_exit(&hutch::library::ExitRecord::new(
            hutch::library::ExitKind::PowerOff,
            None,
        ))?;
        vm.remove_pid_file();
    }
    Ok(())
}

/// The fake VM's control side: `status` says running; `input` and `display_size` are
/// printed on stdout (one request line each); the rest is refused.
struct FakeVm {
    status: StatusReply,
    pointer: Arc<Mutex<Pointer>>,
    hub: SerialHub,
}

impl FakeVm {
    fn print(request: &Request) {
        print!("{}", request.to_line());
        let _ = std::io::stdout().flush();
    }
}

fn not_here() -> anyhow::Result<()> {
    Err(anyhow::anyhow!("Not in the fake VM"))
}

impl ControlTarget for FakeVm {
    fn status(&self) -> anyhow::Result<StatusReply> {
        Ok(self.status.clone())
    }
    fn pause(&self) -> anyhow::Result<()> {
        not_here()
    }
    fn resume(&self) -> anyhow::Result<()> {
        not_here()
    }
    fn shutdown(&self) -> anyhow::Result<()> {
        not_here()
    }
    fn poweroff(&self) -> anyhow::Result<()> {
        not_here()
    }
    fn input(&self, events: Vec<InputEvent>) -> anyhow::Result<()> {
        if let Ok(mut p) = self.pointer.lock() {
            events.iter().for_each(|e| p.apply(e));
        }
        FakeVm::print(&Request::Input { events });
        Ok(())
    }
    fn display_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
        FakeVm::print(&Request::DisplaySize { width, height });
        Ok(())
    }
}

impl ConsoleTarget for FakeVm {
    fn console_output(&self) -> SerialSubscription {
        self.hub.subscribe()
    }
    fn console_input(&self, _bytes: &[u8]) {}
}
