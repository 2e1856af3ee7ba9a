//! `hutch`: the command line, the VM library on disk, the detached VM process and its control
//! socket. The GUI reuses [`control::client`] to talk to VM processes.
//!
//! ```text
//!  main ─▶ cli (clap) ─▶ commands ─┬─ library (vm.toml, names, lock/pid/exit records)
//!                                  ├─ start ─spawn─▶ vm_process ─┬─ backend ─▶ vmm::Machine
//!                                  │                              ├─ serial_hub ─▶ serial.log
//!                                  │                              └─ control::server
//!                                  ├─ stop/status ─▶ control::client ─▶ runtime (socket path)
//!                                  └─ console ─▶ console + terminal (raw mode)
//! ```

pub mod backend;
pub mod cli;
pub mod commands;
pub mod console;
pub mod control;
pub mod disk_cmd;
pub mod fsutil;
pub mod gui;
pub mod import;
pub mod library;
pub mod runtime;
pub mod screenshot;
pub mod serial_hub;
pub mod snapshot_cmd;
pub mod snapshots;
pub mod terminal;
pub mod vm_process;

use std::process::ExitCode;

use clap::Parser;

/// The whole program: parse, run, print the error chain as `hutch: error: a: b: c`.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let command = cli.command.unwrap_or(cli::Command::Gui);
    if !matches!(command, cli::Command::VmProcess { .. }) {
        // A command's output piped into `head` or `grep -q` ends it quietly, as for any Unix
        // tool, instead of a panic on EPIPE. The VM process keeps ignoring SIGPIPE: a console
        // client that goes away must not take the VM with it.
        // SAFETY: restoring the default disposition of SIGPIPE at start-up, before any thread
        // exists; no handler code is involved.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let default_level =
        if matches!(command, cli::Command::VmProcess { .. }) { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    match commands::dispatch(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hutch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
