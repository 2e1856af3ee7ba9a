//! `xdnd-drop --window WID [--hold SECS] [--timeout SECS] FILE...`: drops FILEs on the X
//! window WID the way a file manager does, with a real XDND drag (protocol version 5,
//! `text/uri-list`), so GUI tests can exercise a drop under Xvfb where no tool can be a
//! drag source.
//!
//! ```text
//!  us (source)                                   target window
//!  own XdndSelection
//!  XdndEnter(types = text/uri-list)      ──▶
//!  XdndPosition(window centre, copy)     ──▶
//!                                         ◀──   SelectionRequest (any time from here on)
//!  uri-list into the requestor's property ──▶   SelectionNotify
//!                                         ◀──   XdndStatus(accept?)
//!  [--hold: the target shows its drop hint]
//!  XdndDrop                              ──▶
//!                                         ◀──   XdndFinished
//! ```
//! Every wait has a deadline and fails with what was missing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use x11rb::connection::Connection;
use x11rb::protocol::xproto::{
    Atom, AtomEnum, ClientMessageEvent, ConnectionExt as _, CreateWindowAux, EventMask, PropMode,
    SelectionNotifyEvent, SelectionRequestEvent, Timestamp, Window, WindowClass,
    SELECTION_NOTIFY_EVENT,
};
use x11rb::protocol::Event;
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

const XDND_VERSION: u32 = 5;
const USAGE: &str = "usage: xdnd-drop --window WID [--hold SECS] [--timeout SECS] FILE...";

type Result<T> = std::result::Result<T, String>;

struct Args {
    window: Window,
    hold: Duration,
    timeout: Duration,
    files: Vec<PathBuf>,
}

struct Atoms {
    aware: Atom,
    selection: Atom,
    enter: Atom,
    position: Atom,
    status: Atom,
    drop: Atom,
    finished: Atom,
    leave: Atom,
    action_copy: Atom,
    uri_list: Atom,
    targets: Atom,
    timestamp_probe: Atom,
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1)).and_then(|a| run(&a)) {
        Ok(msg) => {
            println!("xdnd-drop: {msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xdnd-drop: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut window = None;
    let mut hold = Duration::ZERO;
    let mut timeout = Duration::from_secs(10);
    let mut files = Vec::new();
    let secs = |v: Option<String>, what: &str| -> Result<Duration> {
        let v = v.ok_or(format!("{what} needs a value\n{USAGE}"))?;
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
            .ok_or(format!("{what}: '{v}' is not a number of seconds"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--window" => {
                let v = it.next().ok_or(format!("--window needs a value\n{USAGE}"))?;
                let parsed = match v.strip_prefix("0x") {
                    Some(hex) => u32::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                window = Some(parsed.map_err(|_| format!("--window: '{v}' is no window id"))?);
            }
            "--hold" => hold = secs(it.next(), "--hold")?,
            "--timeout" => timeout = secs(it.next(), "--timeout")?,
            "-h" | "--help" => return Err(USAGE.into()),
            f => files.push(PathBuf::from(f)),
        }
    }
    let window = window.ok_or(format!("--window is required\n{USAGE}"))?;
    if files.is_empty() {
        return Err(format!("no FILE to drop\n{USAGE}"));
    }
    Ok(Args { window, hold, timeout, files })
}

/// `file://` URIs, one per line, CRLF-terminated as RFC 2483 says.
fn uri_list(files: &[PathBuf]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for f in files {
        let abs = std::path::absolute(f).map_err(|e| format!("{}: {e}", f.display()))?;
        out.extend_from_slice(b"file://");
        out.extend(percent_encode(&abs));
        out.extend_from_slice(b"\r\n");
    }
    Ok(out)
}

fn percent_encode(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend(format!("%{b:02X}").bytes());
        }
    }
    out
}

fn intern(conn: &RustConnection, name: &str) -> Result<Atom> {
    Ok(conn
        .intern_atom(false, name.as_bytes())
        .map_err(|e| format!("intern {name}: {e}"))?
        .reply()
        .map_err(|e| format!("intern {name}: {e}"))?
        .atom)
}

fn atoms(conn: &RustConnection) -> Result<Atoms> {
    Ok(Atoms {
        aware: intern(conn, "XdndAware")?,
        selection: intern(conn, "XdndSelection")?,
        enter: intern(conn, "XdndEnter")?,
        position: intern(conn, "XdndPosition")?,
        status: intern(conn, "XdndStatus")?,
        drop: intern(conn, "XdndDrop")?,
        finished: intern(conn, "XdndFinished")?,
        leave: intern(conn, "XdndLeave")?,
        action_copy: intern(conn, "XdndActionCopy")?,
        uri_list: intern(conn, "text/uri-list")?,
        targets: intern(conn, "TARGETS")?,
        timestamp_probe: intern(conn, "_XDND_DROP_TIMESTAMP")?,
    })
}

struct Session<'a> {
    conn: &'a RustConnection,
    atoms: Atoms,
    source: Window,
    target: Window,
    data: Vec<u8>,
    timeout: Duration,
    served: usize,
}

fn run(args: &Args) -> Result<String> {
    let data = uri_list(&args.files)?;
    let (conn, screen_num) =
        x11rb::connect(None).map_err(|e| format!("cannot connect to the X display: {e}"))?;
    let root = conn.setup().roots[screen_num].root;
    let atoms = atoms(&conn)?;
    let target = args.window;

    // The target must speak XDND; take the lower of our versions.
    let aware = conn
        .get_property(false, target, atoms.aware, AtomEnum::ATOM, 0, 1)
        .map_err(|e| format!("window {target:#x}: {e}"))?
        .reply()
        .map_err(|e| format!("window {target:#x} does not exist ({e})"))?;
    let their_version = aware
        .value32()
        .and_then(|mut v| v.next())
        .ok_or(format!("window {target:#x} is not XDND-aware (no XdndAware property)"))?;
    let version = their_version.min(XDND_VERSION);

    // An unmapped window of our own: the drag source and the selection owner.
    let source = conn.generate_id().map_err(|e| e.to_string())?;
    conn.create_window(
        0,
        source,
        root,
        -10,
        -10,
        1,
        1,
        0,
        WindowClass::INPUT_ONLY,
        0,
        &CreateWindowAux::new().event_mask(EventMask::PROPERTY_CHANGE),
    )
    .map_err(|e| format!("cannot create the source window: {e}"))?;
    let time = server_time(&conn, source, &atoms)?;
    conn.set_selection_owner(source, atoms.selection, time).map_err(|e| e.to_string())?;
    let owner = conn
        .get_selection_owner(atoms.selection)
        .map_err(|e| e.to_string())?
        .reply()
        .map_err(|e| e.to_string())?
        .owner;
    if owner != source {
        return Err("cannot own XdndSelection".into());
    }

    // The target's centre in root coordinates (XDND positions are root-relative).
    let geometry = conn
        .get_geometry(target)
        .map_err(|e| e.to_string())?
        .reply()
        .map_err(|e| format!("window {target:#x}: {e}"))?;
    let centre = conn
        .translate_coordinates(
            target,
            root,
            (geometry.width / 2) as i16,
            (geometry.height / 2) as i16,
        )
        .map_err(|e| e.to_string())?
        .reply()
        .map_err(|e| e.to_string())?;
    let (x, y) = (centre.dst_x.max(0) as u32, centre.dst_y.max(0) as u32);

    let mut s =
        Session { conn: &conn, atoms, source, target, data, timeout: args.timeout, served: 0 };
    s.send(s.atoms.enter, [source, version << 24, s.atoms.uri_list, 0, 0])?;
    s.send(s.atoms.position, [source, 0, (x << 16) | (y & 0xffff), time, s.atoms.action_copy])?;
    let status = s.wait_for(s.atoms.status, "XdndStatus (answer to XdndPosition)")?;
    if status[1] & 1 == 0 {
        let _ = s.send(s.atoms.leave, [source, 0, 0, 0, 0]);
        return Err(format!("window {target:#x} refused the drop (XdndStatus without accept)"));
    }
    // Keep answering requests while the target shows its hover state.
    let hold_until = Instant::now() + args.hold;
    while Instant::now() < hold_until {
        s.pump()?;
        std::thread::sleep(Duration::from_millis(10));
    }
    s.send(s.atoms.drop, [source, 0, time, 0, 0])?;
    let finished = s.wait_for(s.atoms.finished, "XdndFinished (answer to XdndDrop)")?;
    if version >= 5 && finished[1] & 1 == 0 {
        return Err(format!("window {target:#x} did not accept the drop (XdndFinished)"));
    }
    if s.served == 0 {
        return Err("the drop finished but the target never asked for the data".into());
    }
    Ok(format!(
        "dropped {} file(s) on window {target:#x} at ({x}, {y}) (XDND v{version})",
        args.files.len()
    ))
}

/// A real server timestamp: selection ownership with CurrentTime is discouraged by ICCCM.
fn server_time(conn: &RustConnection, window: Window, atoms: &Atoms) -> Result<Timestamp> {
    conn.change_property8(PropMode::APPEND, window, atoms.timestamp_probe, AtomEnum::STRING, &[])
        .map_err(|e| e.to_string())?;
    conn.flush().map_err(|e| e.to_string())?;
    loop {
        match conn.wait_for_event().map_err(|e| format!("X connection: {e}"))? {
            Event::PropertyNotify(ev) if ev.window == window => return Ok(ev.time),
            _ => {}
        }
    }
}

impl Session<'_> {
    fn send(&self, kind: Atom, data: [u32; 5]) -> Result<()> {
        let ev = ClientMessageEvent::new(32, self.target, kind, data);
        self.conn
            .send_event(false, self.target, EventMask::NO_EVENT, ev)
            .map_err(|e| format!("cannot send to {:#x}: {e}", self.target))?;
        self.conn.flush().map_err(|e| e.to_string())
    }

    /// Handles queued events; returns a ClientMessage addressed to us, if one came.
    fn pump(&mut self) -> Result<Option<(Atom, [u32; 5])>> {
        while let Some(ev) = self.conn.poll_for_event().map_err(|e| format!("X connection: {e}"))? {
            match ev {
                Event::SelectionRequest(req) => self.answer(&req)?,
                Event::ClientMessage(m) if m.window == self.source => {
                    return Ok(Some((m.type_, m.data.as_data32())));
                }
                Event::Error(e) => return Err(format!("X error: {e:?}")),
                _ => {}
            }
        }
        Ok(None)
    }

    fn wait_for(&mut self, kind: Atom, what: &str) -> Result<[u32; 5]> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some((k, data)) = self.pump()? {
                if k == kind {
                    return Ok(data);
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {:?} waiting for {what} from window {:#x}",
                    self.timeout, self.target
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Serves the selection: the uri-list, or the list of targets; anything else is refused.
    fn answer(&mut self, req: &SelectionRequestEvent) -> Result<()> {
        // Old clients pass None as the property: use the target then (ICCCM).
        let property =
            if req.property == u32::from(AtomEnum::NONE) { req.target } else { req.property };
        let ok = if req.selection != self.atoms.selection {
            false
        } else if req.target == self.atoms.uri_list {
            self.conn
                .change_property8(
                    PropMode::REPLACE,
                    req.requestor,
                    property,
                    self.atoms.uri_list,
                    &self.data,
                )
                .map_err(|e| e.to_string())?;
            self.served += 1;
            true
        } else if req.target == self.atoms.targets {
            self.conn
                .change_property32(
                    PropMode::REPLACE,
                    req.requestor,
                    property,
                    AtomEnum::ATOM,
                    &[self.atoms.targets, self.atoms.uri_list],
                )
                .map_err(|e| e.to_string())?;
            true
        } else {
            false
        };
        let notify = SelectionNotifyEvent {
            response_type: SELECTION_NOTIFY_EVENT,
            sequence: 0,
            time: req.time,
            requestor: req.requestor,
            selection: req.selection,
            target: req.target,
            property: if ok { property } else { AtomEnum::NONE.into() },
        };
        self.conn
            .send_event(false, req.requestor, EventMask::NO_EVENT, notify)
            .map_err(|e| e.to_string())?;
        self.conn.flush().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_percent_encoded_and_crlf_terminated() {
        let list = uri_list(&[PathBuf::from("/tmp/a b/ü.vmdk"), PathBuf::from("/x")]).unwrap();
        assert_eq!(
            String::from_utf8(list).unwrap(),
            "file:///tmp/a%20b/%C3%BC.vmdk\r\nfile:///x\r\n"
        );
    }

    #[test]
    fn window_ids_parse_in_hex_and_decimal() {
        let a = |v: &[&str]| parse_args(v.iter().map(|s| s.to_string()));
        assert_eq!(a(&["--window", "0x20", "f"]).unwrap().window, 32);
        assert_eq!(a(&["--window", "32", "f"]).unwrap().window, 32);
        assert!(a(&["--window", "zz", "f"]).is_err());
        assert!(a(&["--window", "1"]).is_err());
    }
}
