//! The per-VM control channel: a Unix socket speaking one JSON object per line.
//!
//! ```text
//!  hutch stop/status/console, GUI ──client──▶ control.sock ──server──▶ ControlTarget
//!                                                                  (the VM process's machine)
//! ```

pub mod client;
pub mod protocol;
pub mod server;
