//! `hutch`: the command line and the GUI over one service layer, the VM library on disk, the
//! detached VM process and its control socket.
//!
//! ```text
//!  main ─▶ cli (clap, printing) ─┐
//!          gui (winit + egui) ───┴─▶ service ─┬─ library (vm.toml, names, lock/pid/exit records)
//!                                  vm, snapshot, ├─ start ─spawn─▶ vm_process ─┬─ backend ─▶ vmm
//!                                  import, disk  │                             ├─ serial_hub
//!                                                │                             └─ control::server
//!                                                ├─ control::client ─▶ runtime (socket path)
//!                                                └─ snapshots, disk images
//! ```

pub mod backend;
pub mod cli;
pub mod console;
pub mod control;
pub mod firmware;
pub mod fsutil;
pub mod gui;
pub mod library;
pub mod runtime;
pub mod screenshot;
pub mod serial_hub;
pub mod service;
pub mod snapshots;
pub mod terminal;
pub mod vm_process;

use std::process::ExitCode;

use clap::Parser;

/// The whole program: parse, run, print the error chain as `hutch: error: a: b: c`.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let command = cli.command.unwrap_or(cli::args::Command::Gui);
    if !matches!(command, cli::args::Command::VmProcess { .. }) {
        // A command's output piped into `head` or `grep -q` ends it quietly, as for any Unix
        // tool, instead of a panic on EPIPE. The VM process keeps ignoring SIGPIPE: a console
        // client that goes away must not take the VM with it.
        // SAFETY: restoring the default disposition of SIGPIPE at start-up, before any thread
        // exists; no handler code is involved.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let default_level =
        if matches!(command, cli::args::Command::VmProcess { .. }) { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    match cli::dispatch(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hutch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
