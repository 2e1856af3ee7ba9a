//! `hutch console`: attaches this terminal (or a script's pipe) to a running VM's serial
//! console through its control socket. Ctrl+] detaches when stdin is a terminal; with a pipe
//! the console ends shortly after end of input (output that arrives meanwhile is shown).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;

use crate::control::client::ConsoleStream;
use crate::terminal::{pump_input, stdin_kind, InputEnd, RawTerminal, StdinKind};

/// After end of input, how long the guest's answer is still shown (like socat's -t).
const LINGER: Duration = Duration::from_millis(500);

/// How an attached console ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEnd {
    Detached,
    InputEnded,
    VmStopped,
}

enum Event {
    Input(InputEnd),
    OutputClosed,
}

/// Runs the console until detach, end of input, or the VM going away.
pub fn attach(stream: ConsoleStream, name: &str) -> anyhow::Result<ConsoleEnd> {
    let kind = stdin_kind();
    let tty = kind == StdinKind::Tty;
    let ConsoleStream { mut reader, writer } = stream;
    let (tx, rx) = mpsc::channel();

    let out_tx = tx.clone();
    std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || {
            let mut stdout = io::stdout();
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = out_tx.send(Event::OutputClosed);
        })
        .context("Cannot start the console output thread")?;

    if tty {
        eprintln!("Connected to {name} (escape character is ^])");
    }
    let raw = if tty {
        Some(
            RawTerminal::enter(libc::STDIN_FILENO)
                .context("Cannot put the terminal in raw mode")?,
        )
    } else {
        None
    };

    if kind == StdinKind::Other {
        // Nothing to type with (a file or /dev/null): behave as immediate end of input.
        let _ = writer.shutdown(Shutdown::Write);
        let _ = tx.send(Event::Input(InputEnd::Eof));
    } else {
        let mut w = writer.try_clone().context("Cannot clone the console connection")?;
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                let end = pump_input(io::stdin().lock(), tty, |bytes| w.write_all(bytes).is_ok());
                if end == InputEnd::Eof {
                    let _ = w.shutdown(Shutdown::Write);
                }
                let _ = tx.send(Event::Input(end));
            })
            .context("Cannot start the console input thread")?;
    }

    let end = match rx.recv() {
        Ok(Event::Input(InputEnd::Escape)) => ConsoleEnd::Detached,
        Ok(Event::Input(InputEnd::Eof)) => match rx.recv_timeout(LINGER) {
            Ok(Event::OutputClosed) => ConsoleEnd::VmStopped,
            _ => ConsoleEnd::InputEnded,
        },
        Ok(Event::Input(InputEnd::SinkClosed)) | Ok(Event::OutputClosed) | Err(_) => {
            ConsoleEnd::VmStopped
        }
    };
    drop(raw);
    let _ = writer.shutdown(Shutdown::Both);
    if tty || end == ConsoleEnd::VmStopped {
        match end {
            ConsoleEnd::Detached => eprintln!("\nDetached from {name}"),
            ConsoleEnd::VmStopped => eprintln!("\nhutch: {name} stopped; console closed"),
            ConsoleEnd::InputEnded => {}
        }
    }
    Ok(end)
}
