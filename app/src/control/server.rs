//! The control server inside the VM process: accepts on `control.sock`, one thread per
//! client; checks each connection's hello, serves the console itself and hands every other
//! request to [`apply`] on a [`ControlTarget`] (the machine, or a test double).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::protocol::{apply, greet, ControlTarget, Request, Response, MAX_LINE};
use crate::serial_hub::{Received, SerialSubscription};

/// The serial console a connection can turn into (`{"cmd":"console"}`); the other requests go
/// to the [`ControlTarget`] through [`apply`].
pub trait ConsoleTarget {
    /// Attaches a console to the serial output.
    fn console_output(&self) -> SerialSubscription;
    /// Bytes typed on the serial console.
    fn console_input(&self, bytes: &[u8]);
}

/// Everything a control server serves: the VM process's machine, or a test double.
pub trait ServedTarget: ControlTarget + ConsoleTarget + Send + Sync + 'static {}

impl<T: ControlTarget + ConsoleTarget + Send + Sync + 'static> ServedTarget for T {}

#[derive(Debug, thiserror::Error)]
pub enum ControlServerError {
    #[error("Cannot remove the stale socket {path}")]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot start the control thread")]
    Thread(#[source] io::Error),
}

/// A listening control socket. Stop it with [`ControlServer::stop`] (also on drop).
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path`, replacing a stale socket there. The caller must own the VM (hold
    /// its lock), so whatever socket is at `path` belongs to a dead process.
    pub fn bind<T: ServedTarget>(
        path: &Path,
        target: Arc<T>,
    ) -> Result<ControlServer, ControlServerError> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path)
                .map_err(|source| ControlServerError::Stale { path: path.into(), source })?;
        }
        let bind_err = |source| ControlServerError::Bind { path: path.into(), source };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, target, stop2))
            .map_err(ControlServerError::Thread)?;
        Ok(ControlServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket. Clients already connected keep their thread
    /// until they hang up (consoles end when the serial hub closes).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept(). If the socket file is gone (removed behind our back),
        // nothing can wake it: leave the thread rather than hang the VM process's exit.
        if UnixStream::connect(&self.path).is_ok() {
            let _ = thread.join();
        } else {
            log::warn!(
                "control socket {} is gone; not waiting for its thread",
                self.path.display()
            );
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop<T: ServedTarget>(listener: UnixListener, target: Arc<T>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("Control socket accept failed: {e}");
                // Avoid spinning if the error persists (e.g. out of descriptors).
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let target = target.clone();
        let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
            if let Err(e) = serve_client(stream, &*target) {
                log::debug!("Control client ended: {e}");
            }
        });
        if let Err(e) = spawned {
            log::warn!("Cannot start a control client thread: {e}");
        }
    }
}

enum Line {
    Text(Vec<u8>),
    TooLong,
}

/// One request line (without the newline), bounded by [`MAX_LINE`]; `None` at end of stream.
fn read_line<R: BufRead>(reader: &mut R) -> io::Result<Option<Line>> {
    let mut buf = Vec::new();
    let n = reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        return Ok(Some(Line::TooLong));
    }
    Ok(Some(Line::Text(buf)))
}

fn reply(out: &mut UnixStream, response: &Response) -> io::Result<()> {
    out.write_all(response.to_line().as_bytes())
}

fn serve_client<T: ServedTarget>(stream: UnixStream, target: &T) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut greeted = false;
    while let Some(line) = read_line(&mut reader)? {
        let text = match line {
            Line::TooLong => {
                // The rest of the line cannot be told from the next request: hang up.
                return reply(&mut out, &Response::error("Request line too long"));
            }
            Line::Text(bytes) => bytes,
        };
        let Ok(text) = std::str::from_utf8(&text) else {
            reply(&mut out, &Response::error("Malformed request: not UTF-8"))?;
            if !greeted {
                return Ok(());
            }
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        if !greeted {
            match greet(text) {
                Ok(hello) => {
                    greeted = true;
                    reply(&mut out, &hello)?;
                    continue;
                }
                // Another version: it would misread whatever we answer next.
                Err(refusal) => return reply(&mut out, &refusal),
            }
        }
        let response = match Request::parse(text) {
            Err(e) => Response::error(vmm::error_chain(&e)),
            Ok(Request::Console) => {
                // Subscribe before replying so no output after the reply is missed.
                let output = target.console_output();
                reply(&mut out, &Response::done())?;
                return run_console(reader, out, output, target);
            }
            Ok(request) => apply(request, target),
        };
        reply(&mut out, &response)?;
    }
    Ok(())
}

/// Raw console: a pump thread copies serial output to the client while this thread feeds
/// the client's bytes (starting with any already buffered) to the guest.
fn run_console<T: ConsoleTarget + ?Sized>(
    mut input: BufReader<UnixStream>,
    mut out: UnixStream,
    output: SerialSubscription,
    target: &T,
) -> io::Result<()> {
    let hung_up = Arc::new(AtomicBool::new(false));
    let hung_up2 = hung_up.clone();
    let pump = std::thread::Builder::new().name("console-out".into()).spawn(move || {
        loop {
            match output.recv_timeout(Duration::from_millis(200)) {
                Received::Data(bytes) => {
                    if out.write_all(&bytes).is_err() {
                        break;
                    }
                }
                Received::Timeout if hung_up2.load(Ordering::SeqCst) => break,
                Received::Timeout => {}
                // The VM is gone: hang up so the client sees end of stream.
                Received::Closed => break,
            }
        }
        let _ = out.shutdown(std::net::Shutdown::Both);
    })?;
    let mut buf = [0u8; 4096];
    loop {
        match input.read(&mut buf) {
            // End of input is a half-close: keep sending output until the client hangs up.
            Ok(0) => break,
            Ok(n) => target.console_input(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                hung_up.store(true, Ordering::SeqCst);
                break;
            }
        }
    }
    let _ = pump.join();
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::control::client::{ControlClient, ControlClientError};
    use crate::control::protocol::RunState;
    use crate::control::protocol::{StatusReply, MAX_INPUT_EVENTS};
    use crate::serial_hub::SerialHub;
    use std::sync::Mutex;

    struct FakeTarget {
        calls: Mutex<Vec<&'static str>>,
        input: Mutex<Vec<u8>>,
        hub: SerialHub,
    }

    impl FakeTarget {
        fn new() -> Arc<FakeTarget> {
            Arc::new(FakeTarget {
                calls: Mutex::new(Vec::new()),
                input: Mutex::new(Vec::new()),
                hub: SerialHub::new(None),
            })
        }
        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }
        fn record(&self, call: &'static str) {
            self.calls.lock().unwrap().push(call);
        }
        /// Waits until the guest has been sent `want` (console input is asynchronous).
        fn wait_for_input(&self, want: &[u8]) -> Vec<u8> {
            for _ in 0..200 {
                let got = self.input.lock().unwrap().clone();
                if got.len() >= want.len() {
                    return got;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            self.input.lock().unwrap().clone()
        }
    }

    impl ControlTarget for FakeTarget {
        fn status(&self) -> anyhow::Result<StatusReply> {
            self.record("status");
            Ok(StatusReply {
                name: "fake".into(),
                state: RunState::Running,
                pid: 42,
                cpus: 3,
                memory_mib: 256,
                uptime_secs: 9,
                instance: 0,
                display: None,
                net: None,
                cd: None,
            })
        }
        fn pause(&self) -> anyhow::Result<()> {
            self.record("pause");
            Ok(())
        }
        fn resume(&self) -> anyhow::Result<()> {
            self.record("resume");
            Err(anyhow::anyhow!("cannot resume").context("Resume failed"))
        }
        fn shutdown(&self) -> anyhow::Result<()> {
            self.record("shutdown");
            Ok(())
        }
        fn poweroff(&self) -> anyhow::Result<()> {
            self.record("poweroff");
            Ok(())
        }
        fn input(&self, events: Vec<display::InputEvent>) -> anyhow::Result<()> {
            self.record(if events.is_empty() { "input (none)" } else { "input" });
            Ok(())
        }
        fn display_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
            self.record(if (width, height) == (1280, 800) {
                "display_size 1280x800"
            } else {
                "display_size"
            });
            Ok(())
        }
    }

    impl ConsoleTarget for FakeTarget {
        fn console_output(&self) -> SerialSubscription {
            self.hub.subscribe()
        }
        fn console_input(&self, bytes: &[u8]) {
            self.input.lock().unwrap().extend_from_slice(bytes);
        }
    }

    fn serve() -> (tempfile::TempDir, ControlServer, Arc<FakeTarget>) {
        let dir = tempfile::tempdir().unwrap();
        let target = FakeTarget::new();
        let server = ControlServer::bind(&dir.path().join("control.sock"), target.clone()).unwrap();
        (dir, server, target)
    }

    const HELLO: &[u8] = b"{\"cmd\":\"hello\",\"version\":2}\n";
    const HELLO_REPLY: &str = "{\"ok\":true,\"reply\":\"hello\",\"version\":2}\n";
    const DONE: &str = "{\"ok\":true,\"reply\":\"done\"}\n";

    /// Sends raw text and returns every reply line until the server hangs up or `n` lines.
    fn raw_lines(path: &Path, text: &[u8], n: usize) -> Vec<String> {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(text).unwrap();
        let mut r = BufReader::new(s);
        let mut lines = Vec::new();
        while lines.len() < n {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() == 0 {
                break;
            }
            lines.push(l);
        }
        lines
    }

    /// Says hello, sends raw text, returns the reply lines until the server answers `n` times.
    fn raw_exchange(path: &Path, text: &[u8], n: usize) -> Vec<String> {
        let lines = raw_lines(path, &[HELLO, text].concat(), n + 1);
        assert_eq!(lines[0], HELLO_REPLY);
        lines[1..].to_vec()
    }

    #[test]
    fn status_reports_the_targets_status() {
        let (_d, server, target) = serve();
        let status = ControlClient::connect(server.path()).unwrap().status().unwrap();
        assert_eq!((status.pid, status.cpus, status.memory_mib), (42, 3, 256));
        assert_eq!(status.state, RunState::Running);
        assert_eq!(target.calls(), vec!["status"]);
    }

    #[test]
    fn lifecycle_commands_reach_the_target_on_one_connection() {
        let (_d, server, target) = serve();
        let mut c = ControlClient::connect(server.path()).unwrap();
        c.pause().unwrap();
        c.shutdown().unwrap();
        c.poweroff().unwrap();
        assert_eq!(target.calls(), vec!["pause", "shutdown", "poweroff"]);
    }

    #[test]
    fn input_and_display_size_reach_the_target_and_floods_are_refused() {
        let (_d, server, target) = serve();
        let mut c = ControlClient::connect(server.path()).unwrap();
        c.input(vec![display::InputEvent::Key { code: 30, down: true }]).unwrap();
        c.display_size(1280, 800).unwrap();
        let flood = vec![display::InputEvent::PointerRel { dx: 1, dy: 1 }; MAX_INPUT_EVENTS + 1];
        match c.input(flood).unwrap_err() {
            ControlClientError::Refused(msg) => assert!(msg.contains("Too many"), "{msg}"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(target.calls(), vec!["input", "display_size 1280x800"]);
    }

    #[test]
    fn target_errors_become_error_replies_with_the_whole_chain() {
        let (_d, server, _t) = serve();
        let err = ControlClient::connect(server.path()).unwrap().resume().unwrap_err();
        match err {
            ControlClientError::Refused(msg) => assert_eq!(msg, "Resume failed: cannot resume"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_and_unknown_commands_get_error_replies_and_the_connection_survives() {
        let (_d, server, target) = serve();
        let lines = raw_exchange(
            server.path(),
            b"not json\n{\"cmd\":\"bogus\"}\n\xff\xfe\n\n{\"cmd\":\"pause\"}\n",
            4,
        );
        for l in &lines[..3] {
            assert!(
                l.starts_with("{\"ok\":false,\"reply\":\"error\",\"error\":\"Malformed request"),
                "{l}"
            );
        }
        assert!(lines[1].contains("bogus"), "{}", lines[1]);
        assert_eq!(lines[3], DONE);
        assert_eq!(target.calls(), vec!["pause"]);
    }

    #[test]
    fn a_request_before_the_hello_is_refused_naming_both_versions_and_the_server_hangs_up() {
        let (_d, server, target) = serve();
        // What a version-1 client sends.
        let lines = raw_lines(server.path(), b"{\"cmd\":\"pause\"}\n{\"cmd\":\"pause\"}\n", 5);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("{\"ok\":false,\"reply\":\"error\""), "{}", lines[0]);
        assert!(lines[0].contains("version 2") && lines[0].contains("version 1"), "{}", lines[0]);
        assert!(target.calls().is_empty());
    }

    #[test]
    fn a_hello_of_another_version_is_refused_and_the_server_hangs_up() {
        let (_d, server, target) = serve();
        let lines = raw_lines(
            server.path(),
            b"{\"cmd\":\"hello\",\"version\":3}\n{\"cmd\":\"pause\"}\n",
            5,
        );
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("version 2") && lines[0].contains("version 3"), "{}", lines[0]);
        assert!(target.calls().is_empty());
    }

    #[test]
    fn the_client_reports_a_version_1_server_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
            // Version 1's answer to a command it does not know.
            s.write_all(b"{\"ok\":false,\"error\":\"Malformed request: unknown variant\"}\n")
                .unwrap();
        });
        let err = ControlClient::connect(&path).err().unwrap();
        assert!(matches!(err, ControlClientError::OldServer), "{err:?}");
        assert!(err.to_string().contains("version 1"), "{err}");
    }

    #[test]
    fn an_overlong_line_is_refused_without_crashing_the_server() {
        let (_d, server, _t) = serve();
        let mut big = vec![b'x'; MAX_LINE + 10];
        big.push(b'\n');
        let lines = raw_exchange(server.path(), &big, 1);
        assert!(lines[0].contains("too long"), "{}", lines[0]);
        // Still serving others.
        ControlClient::connect(server.path()).unwrap().status().unwrap();
    }

    #[test]
    fn a_final_line_without_newline_is_still_answered() {
        let (_d, server, _t) = serve();
        let mut s = UnixStream::connect(server.path()).unwrap();
        s.write_all(HELLO).unwrap();
        s.write_all(b"{\"cmd\":\"pause\"}").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, format!("{HELLO_REPLY}{DONE}"));
    }

    #[test]
    fn console_streams_output_and_feeds_input_including_bytes_sent_with_the_request() {
        let (_d, server, target) = serve();
        let mut s = UnixStream::connect(server.path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(HELLO).unwrap();
        s.write_all(b"{\"cmd\":\"console\"}\nroot\n").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, HELLO_REPLY);
        l.clear();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, DONE);
        assert_eq!(target.wait_for_input(b"root\n"), b"root\n");
        target.hub.publish(b"login: ");
        let mut got = [0u8; 7];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"login: ");
        s.write_all(b"\x03").unwrap();
        assert_eq!(target.wait_for_input(b"root\n\x03"), b"root\n\x03");
    }

    #[test]
    fn console_ends_with_end_of_stream_when_the_vm_goes_away() {
        let (_d, server, target) = serve();
        let mut console = ControlClient::connect(server.path()).unwrap().into_console().unwrap();
        target.hub.publish(b"Power down.\r\n");
        target.hub.close();
        let mut all = Vec::new();
        console.reader.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"Power down.\r\n");
    }

    #[test]
    fn half_closed_console_still_receives_output() {
        let (_d, server, target) = serve();
        let mut console = ControlClient::connect(server.path()).unwrap().into_console().unwrap();
        console.writer.write_all(b"ls\n").unwrap();
        console.writer.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(target.wait_for_input(b"ls\n"), b"ls\n");
        target.hub.publish(b"bin etc\r\n");
        let mut got = [0u8; 9];
        console.reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"bin etc\r\n");
    }

    #[test]
    fn clients_are_served_concurrently() {
        let (_d, server, _t) = serve();
        // A console holds its connection; status on another one must still answer.
        let _console = ControlClient::connect(server.path()).unwrap().into_console().unwrap();
        let mut idle = UnixStream::connect(server.path()).unwrap();
        idle.write_all(HELLO).unwrap();
        idle.write_all(b"{\"cmd\":").unwrap();
        ControlClient::connect(server.path()).unwrap().status().unwrap();
    }

    #[test]
    fn stop_removes_the_socket_and_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A leftover socket from a dead process.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = ControlServer::bind(&path, FakeTarget::new()).unwrap();
        ControlClient::connect(&path).unwrap().status().unwrap();
        server.stop();
        assert!(!path.exists());
        assert!(ControlClient::connect(&path).is_err());
    }
}
